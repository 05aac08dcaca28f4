"""Indexing primitives: slice, dynamic_slice, dynamic_update_slice, gather, scatter-add."""

from __future__ import annotations

import numpy as np
from jax import lax

from fungrad._src.jaxutil import prims as p
from fungrad._src.rules import deflinear, is_undefined, jvp_rules, transpose_rules
from fungrad._src.zeros import Zero, instantiate, is_zero


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


def _scatter_add_jvp(primals, tangents, **params):
    # d x.at[idx].add(u) = dx.at[idx].add(du)
    (x, indices, updates), (x_dot, _, updates_dot) = primals, tangents
    ans = p.scatter_add_p.bind(x, indices, updates, **params)
    if is_zero(x_dot) and is_zero(updates_dot):
        return ans, Zero.like(ans)
    return ans, p.scatter_add_p.bind(instantiate(x_dot), indices, instantiate(updates_dot),
                                     **params)


def _scatter_add_transpose(ct, x, indices, updates, *, dimension_numbers, indices_are_sorted,
                           unique_indices, mode, update_jaxpr, update_consts):
    # x gets `ct`; each update gets the window of `ct` it was added to (0 if dropped).
    del update_jaxpr, update_consts
    assert not is_undefined(indices)
    ct_updates = None
    if is_undefined(updates):
        dnums = dimension_numbers
        window = iter(updates.aval.shape[d] for d in dnums.update_window_dims)
        one_element = (*dnums.inserted_window_dims, *dnums.operand_batching_dims)
        slice_sizes = tuple(1 if d in one_element else next(window) for d in range(np.ndim(ct)))
        ct_updates = lax.gather(ct, indices, _gather_dnums(dnums), slice_sizes,
                                indices_are_sorted=indices_are_sorted,
                                unique_indices=unique_indices, mode=mode, fill_value=0)
    return [ct if is_undefined(x) else None, None, ct_updates]


jvp_rules[p.scatter_add_p] = _scatter_add_jvp
transpose_rules[p.scatter_add_p] = _scatter_add_transpose
