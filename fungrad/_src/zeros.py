"""Symbolic zeros: a tangent or cotangent known to be zero, carried as its type only."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from jax import lax

from fungrad._src import jaxutil


class Zero:
    """A zero tangent or cotangent of abstract value `aval`; never materialized inside."""

    __slots__ = ("aval",)

    def __init__(self, aval: Any):
        self.aval = aval

    @staticmethod
    def like(x: Any) -> Zero:
        """The zero tangent of primal value `x` (float0 for integer and boolean `x`)."""
        return Zero(jaxutil.typeof(x).to_tangent_aval())

    def __repr__(self) -> str:
        return f"Zero({self.aval.str_short()})"


def is_zero(x: Any) -> bool:
    return type(x) is Zero


def instantiate(x: Any) -> Any:
    """An array for `x`: zeros of the right shape and dtype if `x` is symbolic."""
    return jaxutil.zeros_like_aval(x.aval) if type(x) is Zero else x


def add_tangents(x: Any, y: Any) -> Any:
    """Sum of two tangents (or cotangents) of the same aval, skipping symbolic zeros."""
    if type(x) is Zero:
        return y
    if type(y) is Zero:
        return x
    return lax.add(x, y)


def has_tangent_space(aval: Any) -> bool:
    """Whether values of `aval` carry a real tangent (float or complex), not float0."""
    return is_inexact(aval.dtype)


def is_inexact(dtype: Any) -> bool:
    """Whether `dtype` is a float or complex type (`jnp.issubdtype(dtype, jnp.inexact)`,
    remembered per dtype: every differentiated input and equation asks)."""
    inexact = _inexact_dtypes.get(dtype)
    if inexact is None:
        inexact = _inexact_dtypes[dtype] = bool(jnp.issubdtype(dtype, jnp.inexact))
    return inexact


_inexact_dtypes: dict[Any, bool] = {}  # one entry per dtype seen
