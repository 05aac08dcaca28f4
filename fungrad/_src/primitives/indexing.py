"""Indexing primitives: slice, dynamic_slice, dynamic_update_slice, gather, every scatter
(set, add, subtract, mul, min, max), top_k.

The scatters follow jax's conventions where updates collide (jax/_src/lax/slicing.py):
`scatter` (set) keeps the tangent of the one update that was written; `scatter_min` and
`scatter_max` share the tangent evenly among tied winners (the operand counting as one
when it keeps its value); `scatter_mul` differentiates in its updates only with
`unique_indices=True`, and raises otherwise, as jax does.
"""

from __future__ import annotations

from functools import partial

import numpy as np
from jax import lax

from fungrad._src import jaxutil
from fungrad._src.jaxutil import prims as p
from fungrad._src.rules import deflinear, is_undefined, jvp_rules, transpose_rules
from fungrad._src.zeros import Zero, add_tangents, instantiate, is_zero


def _zeros(aval):
    return lax.full(aval.shape, 0, aval.dtype)


# --- slice: linear, transposed by padding with zeros ----------------------------------

def _slice_transpose(ct, x, *, start_indices, limit_indices, strides):
    # Put `ct` back where it was read: zeros before, between (strides) and after.
    del limit_indices
    shape = x.aval.shape
    if 0 in np.shape(ct):
        return [_zeros(x.aval)]
    strides = strides or (1,) * len(shape)
    config = [(lo, size - (lo + (n - 1) * s + 1), s - 1)
              for lo, size, n, s in zip(start_indices, shape, np.shape(ct), strides, strict=True)]
    return [lax.pad(ct, lax.full_like(ct, 0, shape=()), config)]


deflinear(p.slice_p, _slice_transpose)


# --- dynamic_slice / dynamic_update_slice: linear in the arrays, not the indices -------

def _dynamic_slice_jvp(primals, tangents, *, slice_sizes):
    # d x[i:i+k] = dx[i:i+k]
    (x, *starts), x_dot = primals, tangents[0]
    ans = p.dynamic_slice_p.bind(x, *starts, slice_sizes=slice_sizes)
    if is_zero(x_dot):
        return ans, Zero.like(ans)
    return ans, p.dynamic_slice_p.bind(x_dot, *starts, slice_sizes=slice_sizes)


def _dynamic_slice_transpose(ct, x, *starts, slice_sizes):
    # Both ops clamp `starts` the same way, so the window written is the window read.
    del slice_sizes
    assert is_undefined(x) and not any(map(is_undefined, starts))
    return [lax.dynamic_update_slice(_zeros(x.aval), ct, starts)] + [None] * len(starts)


jvp_rules[p.dynamic_slice_p] = _dynamic_slice_jvp
transpose_rules[p.dynamic_slice_p] = _dynamic_slice_transpose


def _dynamic_update_slice_jvp(primals, tangents):
    # d x.at[window].set(u) = dx.at[window].set(du)
    (x, update, *starts), (x_dot, update_dot, *_) = primals, tangents
    ans = p.dynamic_update_slice_p.bind(x, update, *starts)
    if is_zero(x_dot) and is_zero(update_dot):
        return ans, Zero.like(ans)
    return ans, p.dynamic_update_slice_p.bind(instantiate(x_dot), instantiate(update_dot),
                                              *starts)


def _dynamic_update_slice_transpose(ct, x, update, *starts):
    # x gets `ct` with the window zeroed; the update gets the window of `ct`.
    assert not any(map(is_undefined, starts))
    ct_x = ct_update = None
    update_shape = update.aval.shape if is_undefined(update) else np.shape(update)
    if is_undefined(x):
        ct_x = lax.dynamic_update_slice(ct, lax.full(update_shape, 0, ct.dtype), starts)
    if is_undefined(update):
        ct_update = lax.dynamic_slice(ct, starts, update_shape)
    return [ct_x, ct_update] + [None] * len(starts)


jvp_rules[p.dynamic_update_slice_p] = _dynamic_update_slice_jvp
transpose_rules[p.dynamic_update_slice_p] = _dynamic_update_slice_transpose


# --- gather and scatter-add: each the transpose of the other ---------------------------

def _scatter_dnums(dnums: lax.GatherDimensionNumbers) -> lax.ScatterDimensionNumbers:
    """The scatter that writes each gathered window back where it was read."""
    return lax.ScatterDimensionNumbers(
        update_window_dims=dnums.offset_dims,
        inserted_window_dims=dnums.collapsed_slice_dims,
        scatter_dims_to_operand_dims=dnums.start_index_map,
        operand_batching_dims=dnums.operand_batching_dims,
        scatter_indices_batching_dims=dnums.start_indices_batching_dims)


def _gather_dnums(dnums: lax.ScatterDimensionNumbers) -> lax.GatherDimensionNumbers:
    """The gather that reads each scattered window from where it was written."""
    return lax.GatherDimensionNumbers(
        offset_dims=tuple(dnums.update_window_dims),
        collapsed_slice_dims=tuple(dnums.inserted_window_dims),
        start_index_map=tuple(dnums.scatter_dims_to_operand_dims),
        operand_batching_dims=tuple(dnums.operand_batching_dims),
        start_indices_batching_dims=tuple(dnums.scatter_indices_batching_dims))


def _gather_jvp(primals, tangents, *, fill_value, **params):
    # d x[idx] = dx[idx]; out-of-bounds reads (mode fill) have zero tangent.
    (x, indices), (x_dot, _) = primals, tangents
    ans = p.gather_p.bind(x, indices, fill_value=fill_value, **params)
    if is_zero(x_dot):
        return ans, Zero.like(ans)
    return ans, p.gather_p.bind(x_dot, indices, fill_value=0, **params)


def _gather_transpose(ct, x, indices, *, dimension_numbers, slice_sizes, unique_indices,
                      indices_are_sorted, mode, fill_value):
    # Add each window of `ct` into zeros where it was read (dropped where it was filled).
    del slice_sizes, fill_value
    assert is_undefined(x) and not is_undefined(indices)
    ct_x = lax.scatter_add(lax.full(x.aval.shape, 0, ct.dtype), indices, ct,
                           _scatter_dnums(dimension_numbers),
                           indices_are_sorted=indices_are_sorted,
                           unique_indices=unique_indices, mode=mode)
    return [ct_x, None]


jvp_rules[p.gather_p] = _gather_jvp
transpose_rules[p.gather_p] = _gather_transpose


def _scatter_add_jvp(prim, primals, tangents, **params):
    # d x.at[idx].add(u) = dx.at[idx].add(du), and likewise for subtract
    (x, indices, updates), (x_dot, _, updates_dot) = primals, tangents
    ans = prim.bind(x, indices, updates, **params)
    if is_zero(x_dot) and is_zero(updates_dot):
        return ans, Zero.like(ans)
    return ans, prim.bind(instantiate(x_dot), indices, instantiate(updates_dot), **params)


def _window_sizes(dnums: lax.ScatterDimensionNumbers, updates_shape, operand_ndim: int):
    """The slice sizes of the gather that reads back the windows a scatter wrote."""
    window = iter(updates_shape[d] for d in dnums.update_window_dims)
    one_element = (*dnums.inserted_window_dims, *dnums.operand_batching_dims)
    return tuple(1 if d in one_element else next(window) for d in range(operand_ndim))


def _gather_back(x, indices, updates_shape, *, dimension_numbers, indices_are_sorted,
                 unique_indices, mode):
    """The windows of `x` that the scatter wrote to, shaped like its updates (0 if dropped)."""
    return lax.gather(x, indices, _gather_dnums(dimension_numbers),
                      _window_sizes(dimension_numbers, updates_shape, np.ndim(x)),
                      indices_are_sorted=indices_are_sorted, unique_indices=unique_indices,
                      mode=mode, fill_value=0)


def _shape(x):
    return x.aval.shape if is_undefined(x) else np.shape(x)


def _scatter_add_transpose(sign, ct, x, indices, updates, *, update_jaxpr, update_consts,
                           **params):
    # x gets `ct`; each update gets (sign times) the window of `ct` it went to (0 if dropped).
    del update_jaxpr, update_consts
    assert not is_undefined(indices)
    ct_updates = None
    if is_undefined(updates):
        ct_updates = _gather_back(ct, indices, updates.aval.shape, **params)
        ct_updates = ct_updates if sign > 0 else lax.neg(ct_updates)
    return [ct if is_undefined(x) else None, None, ct_updates]


_scatter_sub_p = jaxutil.internal_prims["scatter_sub_p"]  # `.at[].subtract`
jvp_rules[p.scatter_add_p] = partial(_scatter_add_jvp, p.scatter_add_p)
transpose_rules[p.scatter_add_p] = partial(_scatter_add_transpose, +1)
jvp_rules[_scatter_sub_p] = partial(_scatter_add_jvp, _scatter_sub_p)
transpose_rules[_scatter_sub_p] = partial(_scatter_add_transpose, -1)


def _scatter_add(x, indices, updates, *, dimension_numbers, indices_are_sorted,
                 unique_indices, mode):
    return lax.scatter_add(x, indices, updates, dimension_numbers,
                           indices_are_sorted=indices_are_sorted,
                           unique_indices=unique_indices, mode=mode)


def _gather_params(params):
    """The parameters that a read-back gather or a scatter-add shares with a scatter."""
    return {k: params[k] for k in ("dimension_numbers", "indices_are_sorted",
                                   "unique_indices", "mode")}


# --- scatter (set): the tangent of whichever value ends up in each place ----------------

def _scatter_winner_masks(x, indices, updates, g):
    """Which operand entries survive, and which updates are the ones written.

    Every update window gets a positive id; the ids are scattered like the updates and read
    back: an update won where it reads back its own id, the operand survived where no id
    landed. With colliding indices this names the update the scatter really keeps.
    """
    dnums = g["dimension_numbers"]
    ids_shape = [1 if d in dnums.update_window_dims else n for d, n in enumerate(updates.shape)]
    num_ids = int(np.prod(ids_shape, dtype=np.int64))
    id_dtype = np.int32 if num_ids < np.iinfo(np.int32).max else np.int64
    ids = lax.add(lax.iota(id_dtype, num_ids), lax.full((), 1, id_dtype))
    ids = lax.broadcast_in_dim(lax.reshape(ids, ids_shape), updates.shape,
                               tuple(range(updates.ndim)))
    placed = lax.scatter(lax.full(x.shape, 0, id_dtype), indices, ids,
                         dnums, indices_are_sorted=g["indices_are_sorted"],
                         unique_indices=g["unique_indices"], mode=g["mode"])
    kept = lax.eq(placed, lax.full_like(placed, 0))
    won = lax.eq(ids, _gather_back(placed, indices, updates.shape, **g))
    return kept, won


def _mask(mask, v):
    return lax.select(mask, v, lax.full_like(v, 0))


def _scatter_jvp(primals, tangents, *, update_jaxpr, update_consts, **params):
    # d x.at[idx].set(u) = dx with the written places replaced by the winning du.
    (x, indices, updates), (x_dot, _, updates_dot) = primals, tangents
    if update_jaxpr is not None:
        raise NotImplementedError("fungrad cannot differentiate 'scatter' with a custom "
                                  "combiner (lax.scatter_apply); jax cannot either.")
    bind = lambda a, u: p.scatter_p.bind(a, indices, u, update_jaxpr=None,  # noqa: E731
                                         update_consts=update_consts, **params)
    if is_zero(x_dot) and is_zero(updates_dot):
        ans = bind(x, updates)
        return ans, Zero.like(ans)
    x_dot, updates_dot = instantiate(x_dot), instantiate(updates_dot)
    if params["unique_indices"]:  # no collisions: scatter is linear in (x, u) jointly
        return bind(x, updates), bind(x_dot, updates_dot)
    # With collisions, scatter-add the masked values: primal and tangent agree on the winner.
    g = _gather_params(params)
    kept, won = _scatter_winner_masks(x, indices, updates, g)
    ans = _scatter_add(_mask(kept, x), indices, _mask(won, updates), **g)
    return ans, _scatter_add(_mask(kept, x_dot), indices, _mask(won, updates_dot), **g)


def _scatter_transpose(ct, x, indices, updates, *, update_jaxpr, update_consts, **params):
    # Only emitted with unique indices: x gets `ct` with the written windows zeroed, each
    # update the window of `ct` it wrote.
    assert not is_undefined(indices)
    if not params["unique_indices"]:
        raise NotImplementedError("fungrad transposes 'scatter' only with unique_indices=True "
                                  "(as jax does); its JVP rule never needs more.")
    updates_shape = _shape(updates)
    ct_x = ct_updates = None
    if is_undefined(x):
        ct_x = p.scatter_p.bind(ct, indices, lax.full(updates_shape, 0, ct.dtype),
                                update_jaxpr=update_jaxpr, update_consts=update_consts,
                                **params)
    if is_undefined(updates):
        ct_updates = _gather_back(ct, indices, updates_shape, **_gather_params(params))
    return [ct_x, None, ct_updates]


jvp_rules[p.scatter_p] = _scatter_jvp
transpose_rules[p.scatter_p] = _scatter_transpose


# --- scatter_mul: linear in the operand; in the updates only without collisions ---------

def _scatter_mul_jvp(primals, tangents, **params):
    # d x.at[idx].mul(u) = dx.at[idx].mul(u) + x * (0.at[idx].add(du))   (unique indices)
    (x, indices, updates), (x_dot, _, updates_dot) = primals, tangents
    ans = p.scatter_mul_p.bind(x, indices, updates, **params)
    out_dot = Zero.like(ans)
    if not is_zero(x_dot):
        out_dot = p.scatter_mul_p.bind(x_dot, indices, updates, **params)
    if not is_zero(updates_dot):
        if not params["unique_indices"]:
            raise NotImplementedError(
                "fungrad differentiates 'scatter-mul' (x.at[idx].mul(u)) with respect to its "
                "updates only with unique_indices=True, as jax does; pass "
                "unique_indices=True if the indices do not repeat.")
        spread = _scatter_add(lax.full_like(x, 0), indices, updates_dot,
                              **_gather_params(params))
        out_dot = add_tangents(out_dot, lax.mul(x, spread))
    return ans, out_dot


def _scatter_mul_transpose(ct, x, indices, updates, **params):
    # Linear in x for known u: ct.at[idx].mul(u). Linear in u for known x (unique indices):
    # each update gets the window of ct * x it multiplied.
    assert not is_undefined(indices) and is_undefined(x) != is_undefined(updates)
    if is_undefined(x):
        return [p.scatter_mul_p.bind(ct, indices, updates, **params), None, None]
    if not params["unique_indices"]:
        raise NotImplementedError("fungrad transposes 'scatter-mul' in its updates only with "
                                  "unique_indices=True, as jax does.")
    g = _gather_params(params)
    return [None, None, _gather_back(lax.mul(ct, x), indices, updates.aval.shape, **g)]


jvp_rules[p.scatter_mul_p] = _scatter_mul_jvp
transpose_rules[p.scatter_mul_p] = _scatter_mul_transpose


# --- scatter_min / scatter_max: the winners' tangent, shared evenly at ties --------------

def _scatter_extremal_jvp(prim, primals, tangents, **params):
    # Each place gets the mean tangent of the values equal to the result there: the winning
    # updates, and the operand if it kept its value; an even split at ties, as jax does.
    (x, indices, updates), (x_dot, _, updates_dot) = primals, tangents
    ans = prim.bind(x, indices, updates, **params)
    if is_zero(x_dot) and is_zero(updates_dot):
        return ans, Zero.like(ans)
    x_dot, updates_dot = instantiate(x_dot), instantiate(updates_dot)
    g = _gather_params(params)

    def back(v):
        return _gather_back(v, indices, updates.shape, **g)

    def count(mask):
        ones = lax.select(mask, lax.full_like(updates, 1), lax.full_like(updates, 0))
        return back(_scatter_add(lax.full_like(x, 0), indices, ones, **g))

    target = back(ans)
    won = lax.eq(updates, target)
    kept = lax.eq(back(x), target)
    one, zero = lax.full_like(updates, 1), lax.full_like(updates, 0)
    n_refs = lax.max(count(lax.full(updates.shape, True)), one)
    n_tied = lax.max(lax.add(count(won), lax.select(kept, one, zero)), one)
    share = lax.div(one, n_tied)
    updates_coef = lax.select(won, share, zero)
    x_coef = lax.div(lax.sub(lax.select(kept, share, zero), one), n_refs)
    shift = lax.add(lax.mul(back(x_dot), x_coef), lax.mul(updates_dot, updates_coef))
    return ans, _scatter_add(x_dot, indices, shift, **g)


jvp_rules[p.scatter_min_p] = partial(_scatter_extremal_jvp, p.scatter_min_p)
jvp_rules[p.scatter_max_p] = partial(_scatter_extremal_jvp, p.scatter_max_p)


# --- top_k and approx_top_k: the tangents of the chosen entries ---------------------------

def _take_chosen(x_dot, chosen, axis):
    """`x_dot` at `chosen` along `axis` (take_along_axis, written as one gather)."""
    rank = chosen.ndim
    others = tuple(d for d in range(rank) if d != axis)
    dnums = lax.GatherDimensionNumbers(offset_dims=(), collapsed_slice_dims=(axis,),
                                       start_index_map=(axis,), operand_batching_dims=others,
                                       start_indices_batching_dims=others)
    return lax.gather(x_dot, lax.expand_dims(chosen, (rank,)), dnums, (1,) * rank,
                      unique_indices=True, mode=lax.GatherScatterMode.PROMISE_IN_BOUNDS)


def _top_k_jvp(primals, tangents, *, k, axis):
    # d top_k(x) = dx at the indices top_k chose (the indices themselves are constant).
    (x,), (x_dot,) = primals, tangents
    values, chosen = p.top_k_p.bind(x, k=k, axis=axis)
    if is_zero(x_dot):
        return [values, chosen], [Zero.like(values), Zero.like(chosen)]
    return [values, chosen], [_take_chosen(x_dot, chosen, axis), Zero.like(chosen)]


jvp_rules[p.top_k_p] = _top_k_jvp


def _approx_top_k_jvp(primals, tangents, *, reduction_dimension, **params):
    # d approx_max_k(x) = dx at the indices it chose, as for top_k.
    (x,), (x_dot,) = primals, tangents
    values, chosen = p.approx_top_k_p.bind(x, reduction_dimension=reduction_dimension, **params)
    if is_zero(x_dot):
        return [values, chosen], [Zero.like(values), Zero.like(chosen)]
    axis = reduction_dimension % chosen.ndim
    return [values, chosen], [_take_chosen(x_dot, chosen, axis), Zero.like(chosen)]


jvp_rules[p.approx_top_k_p] = _approx_top_k_jvp
