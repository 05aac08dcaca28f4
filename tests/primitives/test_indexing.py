"""Spec table for the indexing rules: slice, dynamic_slice, dynamic_update_slice, gather, scatter-add."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from tests.harness import check_all

IDX = np.array([2, 0, 2])  # a repeated index: the transposes must add, not overwrite
OUT_OF_BOUNDS = np.array([1, 5, -7])
FULL = {"jit": True}
LIGHT = {"order": 1}


def _dnums_rows():
    """Gather whole rows of a matrix: x[idx] written out in lax."""
    return lax.GatherDimensionNumbers(offset_dims=(1,), collapsed_slice_dims=(0,),
                                      start_index_map=(0,), operand_batching_dims=(),
                                      start_indices_batching_dims=())


def _scatter_rows():
    return lax.ScatterDimensionNumbers(update_window_dims=(1,), inserted_window_dims=(0,),
                                       scatter_dims_to_operand_dims=(0,), operand_batching_dims=(),
                                       scatter_indices_batching_dims=())


# (id, function, argument specs[, check_all options]): a shape becomes a random array of
# the test dtype; an integer array is passed as it is (indices, with float0 tangents).
CASES = [
    ("slice/basic", lambda x: x[1:3, 1:] ** 2, [(3, 4)], FULL),
    ("slice/strided", lambda x: lax.slice(x, (0, 1), (5, 7), (2, 3)), [(5, 7)]),
    ("slice/strided_jnp", lambda x: x[::-2, 1::2], [(3, 4)]),
    ("slice/empty", lambda x: x[2:2] * 3, [(4,)]),
    ("slice/size1", lambda x: x[:, :1], [(3, 1)]),
    ("index/int", lambda x: x[1] * x[-1], [(3, 4)]),
    ("index/scalar_out", lambda x: x[2], [(4,)]),
    ("dynamic_slice/static", lambda x: lax.dynamic_slice(x, (1, 2), (2, 2)) ** 2, [(3, 4)], FULL),
    ("dynamic_slice/clamped", lambda x: lax.dynamic_slice(x, (5, -9), (2, 3)), [(3, 4)]),
    ("dynamic_slice/traced_index", lambda x, i: lax.dynamic_slice_in_dim(x, i, 2, axis=1),
     [(3, 4), np.int32(1)]),
    ("dynamic_slice/size0", lambda x, i: lax.dynamic_slice(x, (i, i), (0, 2)), [(3, 4), np.int32(1)]),
    ("dynamic_update_slice/both",
     lambda x, u: lax.dynamic_update_slice(x, u ** 2, (1, 1)) * x, [(3, 4), (2, 2)], FULL),
    ("dynamic_update_slice/clamped_traced",
     lambda x, u, i: lax.dynamic_update_slice(x, u, (i, np.int32(0))), [(3, 4), (2, 4), np.int32(7)]),
    ("dynamic_update_slice/operand_only",
     lambda x: lax.dynamic_update_slice(x, jnp.ones((1, 2), x.dtype), (0, 1)), [(3, 4)]),
    ("dynamic_update_slice/update_only",
     lambda u: lax.dynamic_update_slice(jnp.zeros(5, u.dtype), u, (2,)), [(2,)]),
    ("dynamic_update_slice/scalar_in_1d",
     lambda x, u: lax.dynamic_update_slice(x, u[None], (3,)), [(4,), ()]),
    ("gather/rows", lambda x: x[IDX] ** 2, [(3, 4)], FULL),
    ("gather/columns", lambda x: x[:, IDX], [(3, 4)]),
    ("gather/traced_idx", lambda x, i: x[i], [(4,), np.array([[3, 0], [1, 3]])]),
    ("gather/two_arrays", lambda x: x[IDX, np.array([0, 3, 3])], [(3, 4)]),
    ("gather/take_along_axis",
     lambda x: jnp.take_along_axis(x, jnp.argsort(x, axis=1), axis=1) * x, [(3, 4)]),
    ("gather/clip", lambda x: x.at[OUT_OF_BOUNDS].get(mode="clip"), [(4,)]),
    ("gather/fill", lambda x: x.at[OUT_OF_BOUNDS].get(mode="fill", fill_value=1.5) * x[0], [(4,)]),
    ("gather/take_clip", lambda x: jnp.take(x, OUT_OF_BOUNDS, axis=1, mode="clip"), [(3, 4)]),
    ("gather/size0", lambda x: x[np.zeros(0, np.int32)], [(3, 4)]),
    ("gather/lax_promise",
     lambda x: lax.gather(x, IDX[:, None], _dnums_rows(), (1, 4),
                          mode=lax.GatherScatterMode.PROMISE_IN_BOUNDS), [(3, 4)]),
    ("scatter_add/rows", lambda x, u: x.at[IDX].add(u) ** 2, [(3, 4), (3, 4)], FULL),
    ("scatter_add/columns", lambda x, u: x.at[:, IDX].add(u * x[:, :3]), [(3, 4), (3, 3)]),
    ("scatter_add/drop", lambda x, u: x.at[OUT_OF_BOUNDS].add(u), [(4,), (3,)]),
    ("scatter_add/scalar_update", lambda x, u: x.at[IDX].add(u), [(4,), ()]),
    ("scatter_add/segment_sum",
     lambda u: jax.ops.segment_sum(u, np.array([0, 2, 0, 1, 2]), num_segments=3), [(5, 2)]),
    ("scatter_add/lax_clip",
     lambda x, u: lax.scatter_add(x, OUT_OF_BOUNDS[:, None], u, _scatter_rows(),
                                  mode=lax.GatherScatterMode.CLIP), [(3, 4), (3, 4)]),
    ("scatter_add/size0", lambda x, u: x.at[np.zeros(0, np.int32)].add(u), [(3,), (0,)], LIGHT),
]


def _args(specs, dtype, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(dtype) if isinstance(s, tuple) else s for s in specs]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_rule(case, dtype):
    _, fn, specs, *options = case
    options = {"jit": False, **(options[0] if options else {})}
    if dtype == "float32":  # every oracle runs in float64; float32 checks jvp and vjp
        options.update(order=1, jit=False, fd=False)
    check_all(fn, _args(specs, dtype), **options)

