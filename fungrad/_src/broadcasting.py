"""lax's implicit broadcasting of rank-0 and size-1 operands, and its undoing."""

from __future__ import annotations

from typing import Any

import numpy as np
from jax import lax


def unbroadcast(aval: Any, ct: Any) -> Any:
    """Sums `ct` down to `aval`'s shape, undoing lax's implicit rank-0 or size-1 broadcast."""
    if tuple(aval.shape) == tuple(np.shape(ct)):
        return ct
    if not aval.shape:
        return lax.reduce_sum(ct, tuple(range(np.ndim(ct))))
    dims = tuple(i for i, (a, c) in enumerate(zip(aval.shape, np.shape(ct), strict=True))
                 if a != c)
    return lax.reshape(lax.reduce_sum(ct, dims), aval.shape)


def broadcast_to(x: Any, shape: tuple[int, ...]) -> Any:
    """`x` broadcast to `shape` when lax's implicit broadcast left it smaller."""
    if tuple(np.shape(x)) == tuple(shape):
        return x
    if np.ndim(x) == 0:
        return lax.broadcast(x, shape)
    return lax.broadcast_in_dim(x, shape, tuple(range(len(shape))))
