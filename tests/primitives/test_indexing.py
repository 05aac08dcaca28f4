"""Spec table for the indexing rules: slice, dynamic_slice, dynamic_update_slice, gather, every
scatter, top_k; and jax's conventions at colliding indices, ties and out-of-bounds modes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import fungrad
from fungrad.testing import check_grads
from tests.harness import check_all, check_case, spec_args

IDX = np.array([2, 0, 2])  # a repeated index: the transposes must add, not overwrite
OUT_OF_BOUNDS = np.array([1, 5, -7])
UNIQUE = np.array([3, 0, 2])
SORTED = np.array([0, 2, 2, 3])
CLIPPED = np.array([1, 5, -7, 9])  # 5 and 9 both clip to the last row: a collision
FACTORS = np.array([0.5, -2.0, 3.0])  # constant updates of scatter_mul
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
    # scatter (set): the tangent of the update that was written, the operand's elsewhere
    ("scatter_sub/rows", lambda x, u: x.at[IDX].subtract(u * x[:3]) ** 2, [(3, 4), (3, 4)], FULL),
    ("scatter_sub/drop", lambda x, u: x.at[OUT_OF_BOUNDS].subtract(u), [(4,), (3,)]),
    ("scatter/rows_repeated", lambda x, u: x.at[IDX].set(u * x[:3]) ** 2, [(3, 4), (3, 4)], FULL),
    ("scatter/unique", lambda x, u: x.at[UNIQUE].set(u, unique_indices=True) * x,
     [(4, 2), (3, 2)], FULL),
    ("scatter/sorted", lambda x, u: x.at[SORTED].set(u, indices_are_sorted=True), [(4,), (4,)]),
    ("scatter/columns", lambda x, u: x.at[:, IDX].set(u), [(3, 4), (3, 3)]),
    ("scatter/scalar_update", lambda x, u: x.at[IDX].set(u), [(4,), ()]),
    ("scatter/operand_only", lambda x: x.at[IDX].set(2.0) * x, [(4,)]),
    ("scatter/updates_only", lambda u: jnp.zeros((3, 4), u.dtype).at[IDX].set(u), [(3, 4)]),
    ("scatter/drop", lambda x, u: x.at[OUT_OF_BOUNDS].set(u, mode="drop"), [(4,), (3,)]),
    ("scatter/fill", lambda x, u: x.at[OUT_OF_BOUNDS].set(u, mode="fill") * x, [(4,), (3,)]),
    ("scatter/clip", lambda x, u: x.at[CLIPPED].set(u, mode="clip"), [(4, 2), (4, 2)]),
    ("scatter/promise", lambda x, u: x.at[IDX].set(u, mode="promise_in_bounds"), [(4,), (3,)]),
    ("scatter/lax_clip_unique",
     lambda x, u: lax.scatter(x, OUT_OF_BOUNDS[:, None], u, _scatter_rows(), unique_indices=True,
                              mode=lax.GatherScatterMode.CLIP), [(4, 3), (3, 3)]),
    ("scatter/two_arrays", lambda x, u: x.at[IDX, np.array([0, 3, 0])].set(u), [(3, 4), (3,)]),
    ("scatter/size0", lambda x, u: x.at[np.zeros(0, np.int32)].set(u), [(3,), (0,)], LIGHT),
    # scatter_mul: in the operand always; in the updates with unique indices only (as jax)
    ("scatter_mul/operand", lambda x: x.at[IDX].mul(FACTORS.astype(x.dtype)) * x, [(4,)], FULL),
    ("scatter_mul/unique", lambda x, u: x.at[UNIQUE].mul(u, unique_indices=True),
     [(4, 2), (3, 2)], FULL),
    ("scatter_mul/rows", lambda x: x.at[IDX].mul(FACTORS[:, None].astype(x.dtype)), [(3, 2)]),
    ("scatter_mul/drop_unique",
     lambda x, u: x.at[OUT_OF_BOUNDS].mul(u, mode="drop", unique_indices=True), [(4,), (3,)]),
    ("scatter_mul/clip", lambda x: x.at[CLIPPED].mul(2.0, mode="clip"), [(4,)]),
    # scatter_min / scatter_max with colliding indices (ties are below)
    ("scatter_max/rows", lambda x, u: x.at[IDX].max(u) ** 2, [(3, 4), (3, 4)], FULL),
    ("scatter_min/rows", lambda x, u: x.at[IDX].min(u), [(3, 4), (3, 4)], FULL),
    ("scatter_max/unique", lambda x, u: x.at[UNIQUE].max(u, unique_indices=True), [(4,), (3,)]),
    ("scatter_min/scalar_update", lambda x, u: x.at[IDX].min(u), [(4,), ()]),
    ("scatter_max/drop", lambda x, u: x.at[OUT_OF_BOUNDS].max(u, mode="drop"), [(4,), (3,)]),
    ("scatter_min/operand_only", lambda x: x.at[IDX].min(0.1) * x, [(4,)]),
    ("scatter_max/updates_only", lambda u: jnp.zeros(4, u.dtype).at[IDX].max(u), [(3,)]),
    ("scatter_max/segment_max",
     lambda u: jax.ops.segment_max(u, np.array([0, 2, 0, 1, 2]), num_segments=3), [(5, 2)]),
    ("scatter_min/size0", lambda x, u: x.at[np.zeros(0, np.int32)].min(u), [(3,), (0,)], LIGHT),
    # top_k: the tangents at the chosen indices
    ("top_k/last_axis", lambda x: lax.top_k(x, 2)[0] ** 2, [(3, 5)], FULL),
    ("top_k/vector_all", lambda x: lax.top_k(x, 4)[0] * jnp.arange(4.0, dtype=x.dtype), [(4,)]),
    ("top_k/k1_indices", lambda x: (lax.top_k(x, 1)[0], lax.top_k(x, 1)[1]), [(2, 3, 4)]),
    ("top_k/k0", lambda x: lax.top_k(x, 0)[0], [(3,)], LIGHT),
    ("approx_max_k", lambda x: lax.approx_max_k(x, 2)[0] ** 2, [(3, 5)]),
    ("approx_min_k/axis0", lambda x: lax.approx_min_k(x, 2, reduction_dimension=0)[0], [(4, 3)]),
]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_rule(case, dtype):
    check_case(case, spec_args(case[2], dtype), light=dtype == "float32")



# --- jax's conventions at collisions and ties ---------------------------------------------
# Finite differences do not apply at a tie; jax's own transforms are the oracle. The
# operand and updates hold equal values, so winners tie with each other and with the
# operand, in every combination.

TIE_X = np.array([1.0, 3.0, 2.0, 5.0, 0.0, 4.0])
TIE_U = np.array([3.0, 3.0, 2.0, 1.0, 5.0, 5.0, 4.0, 0.5])
TIE_IDX = np.array([1, 1, 2, 2, 3, 0, 0, 5])  # [1]: 3 vs 3 vs 3; [3]: 5 vs 5 ...
TIE_KEYS = np.array([[2.0, 1.0, 2.0, 0.0, 1.0, 2.0], [1.0, 1.0, 1.0, 1.0, 0.0, 0.0]])

TIE_CASES = [
    ("scatter_max", lambda x, u: x.at[TIE_IDX].max(u)),
    ("scatter_min", lambda x, u: x.at[TIE_IDX].min(u)),
    ("scatter_min_drop", lambda x, u: x.at[TIE_IDX + 1].min(u, mode="drop")),
    ("scatter_set_repeated", lambda x, u: x.at[TIE_IDX].set(u)),
    ("scatter_set_clip", lambda x, u: x.at[TIE_IDX + 2].set(u, mode="clip")),
    ("top_k_ties", lambda x, u: lax.top_k(u, 5)[0] * x[0]),
    ("sort_ties", lambda x, u: (jnp.sort(u) * jnp.arange(8.0), jnp.sort(x))),
    ("argsort_ties", lambda x, u: u[jnp.argsort(u)] * jnp.arange(8.0)),
    ("argsort_descending", lambda x, u: u[jnp.argsort(-u, stable=True)] ** 2),
    ("lax_sort_two_keys",
     lambda x, u: lax.sort((TIE_KEYS, -TIE_KEYS, TIE_KEYS * x, x ** 2 + TIE_KEYS), num_keys=2)),
    ("lax_sort_float_keys",
     lambda x, u: lax.sort((jnp.floor(u / 2), u, u ** 2), num_keys=2)),
    ("lax_sort_keys_differentiated",
     lambda x, u: lax.sort((u, jnp.floor(u), u * 3), num_keys=3, is_stable=True)),
]


@pytest.mark.parametrize("fn", [c[1] for c in TIE_CASES], ids=[c[0] for c in TIE_CASES])
def test_ties_follow_jax(fn):
    check_all(fn, [TIE_X, TIE_U], fd=False, jit=True)


@pytest.mark.parametrize("method", ["min", "max"])
def test_scatter_extremal_clip_out_of_bounds(method):
    # With mode="clip" and an index out of bounds, jax 0.10's scatter_min/max JVP gives NaN
    # (its internal gathers fill out-of-bounds reads with NaN instead of clipping them);
    # fungrad clips them like the scatter, so finite differences are the oracle here.
    x, u = np.array([1.0, 3.0, 2.0, 5.0]), np.array([0.5, 4.0, 2.5, 7.0])
    def f(x, u):
        return getattr(x.at[CLIPPED], method)(u, mode="clip")

    check_grads(f, (x, u), order=2)


def test_scatter_mul_repeated_updates_refuse_like_jax():
    x, u = np.arange(1.0, 5.0), np.array([2.0, 3.0, 4.0])
    def f(x, u):
        return x.at[IDX].mul(u)

    for lib in (jax, fungrad):
        with pytest.raises(NotImplementedError, match="unique_indices"):
            lib.jvp(f, (x, u), (x, u))
        with pytest.raises(NotImplementedError, match="unique_indices"):
            lib.vjp(f, x, u)[1](x)
