"""Shape, type and layout primitives, select_n, dot_general, and zero-derivative ops."""

from __future__ import annotations

import numpy as np
from jax import lax

from fungrad._src import jaxutil
from fungrad._src.jaxutil import prims as p
from fungrad._src.rules import (
    defbilinear,
    defjvp_zero,
    deflinear,
    is_undefined,
    jvp_rules,
    transpose_rules,
)
from fungrad._src.zeros import Zero, has_tangent_space, instantiate, is_zero


def _shape(x):
    """The shape of a known value or of an `UndefinedPrimal`."""
    return x.aval.shape if is_undefined(x) else np.shape(x)


# --- layout: linear, transposed by the inverse layout change ---------------------------

def _broadcast_in_dim_transpose(ct, x, *dyn_shape, shape, broadcast_dimensions, sharding):
    # Sum over the new dimensions and over the size-1 dimensions that were stretched.
    del shape, sharding
    assert not dyn_shape, "dynamic shapes are not supported"
    in_shape = x.aval.shape
    new_dims = tuple(i for i in range(np.ndim(ct)) if i not in broadcast_dimensions)
    stretched = tuple(d for i, d in enumerate(broadcast_dimensions)
                      if in_shape[i] == 1 and np.shape(ct)[d] != 1)
    summed = lax.reduce_sum(ct, tuple(sorted(new_dims + stretched)))
    return [lax.reshape(summed, in_shape)]


deflinear(p.broadcast_in_dim_p, _broadcast_in_dim_transpose)


def _reshape_transpose(ct, x, *, new_sizes, dimensions, sharding):
    # Reshape back; a `dimensions` permutation applied before the reshape is undone after.
    del new_sizes, sharding
    if dimensions is None:
        return [lax.reshape(ct, x.aval.shape)]
    permuted = lax.reshape(ct, tuple(x.aval.shape[d] for d in dimensions))
    return [lax.transpose(permuted, tuple(np.argsort(dimensions)))]


deflinear(p.reshape_p, _reshape_transpose)
deflinear(p.squeeze_p, lambda ct, x, *, dimensions: [lax.reshape(ct, x.aval.shape)])
deflinear(p.transpose_p,
          lambda ct, x, *, permutation: [lax.transpose(ct, tuple(np.argsort(permutation)))])
deflinear(p.rev_p, lambda ct, x, *, dimensions: [lax.rev(ct, dimensions)])  # rev is its own inverse
deflinear(p.copy_p, lambda ct, x: [ct])


def _concatenate_transpose(ct, *operands, dimension):
    # Each operand's cotangent is its own slab of `ct` along `dimension`.
    cts, start = [], 0
    for x in operands:
        size = _shape(x)[dimension]
        cts.append(lax.slice_in_dim(ct, start, start + size, axis=dimension)
                   if is_undefined(x) else None)
        start += size
    return cts


deflinear(p.concatenate_p, _concatenate_transpose)


# jax emits these for jnp.split, jnp.stack, lax.unstack and jnp.tile without listing them
# in jax.extend.core.primitives: jaxutil looks them up.
_split_p, _stack_p = jaxutil.internal_prims["split_p"], jaxutil.internal_prims["stack_p"]
_unstack_p, _tile_p = jaxutil.internal_prims["unstack_p"], jaxutil.internal_prims["tile_p"]


def _split_transpose(cts, x, *, sizes, axis):
    # The pieces' cotangents side by side again; a zero piece contributes zeros.
    del sizes
    return [lax.concatenate([instantiate(ct) for ct in cts], axis)]


def _stack_transpose(ct, *operands, axis):
    # Operand i's cotangent is slice i of `ct` along the new axis.
    return [lax.index_in_dim(ct, i, axis, keepdims=False) if is_undefined(x) else None
            for i, x in enumerate(operands)]


def _unstack_transpose(cts, x, *, axis):
    # The pieces stacked back along `axis`; a zero piece contributes zeros.
    return [_stack_p.bind(*(instantiate(ct) for ct in cts), axis=axis)]


def _tile_transpose(ct, x, *, reps):
    # Each element of x appears once per tile: sum the tiles, split off as leading axes.
    shape = _shape(x)
    lead = len(reps) - len(shape)
    full = (1,) * lead + tuple(shape)
    split = tuple(d for r, n in zip(reps, full, strict=True) for d in (r, n))
    summed = lax.reduce_sum(lax.reshape(ct, split), tuple(range(0, 2 * len(reps), 2)))
    return [lax.reshape(summed, tuple(shape))]


deflinear(_split_p, _split_transpose)  # split and concatenate transpose into each other
deflinear(_stack_p, _stack_transpose)  # stack and unstack likewise
deflinear(_unstack_p, _unstack_transpose)
deflinear(_tile_p, _tile_transpose)  # tile's transpose sums the tiles


def _pad_transpose(ct, x, padding_value, *, padding_config):
    # Crop the edge padding (a negative pad re-grows what a negative pad cut, as zeros),
    # then take every (interior + 1)-th element; the padding value gets everything else.
    zero = lax.full_like(ct, 0, shape=())
    uncropped = lax.pad(ct, zero, [(-lo, -hi, 0) for lo, hi, _ in padding_config])
    ct_x = lax.slice(uncropped, (0,) * np.ndim(ct), np.shape(uncropped),
                     tuple(interior + 1 for _, _, interior in padding_config))
    ct_value = None
    if is_undefined(padding_value):
        everything = tuple(range(np.ndim(ct)))
        ct_value = lax.sub(lax.reduce_sum(ct, everything), lax.reduce_sum(ct_x, everything))
    return [ct_x if is_undefined(x) else None, ct_value]


deflinear(p.pad_p, _pad_transpose)  # linear in the operand and the padding value jointly


# --- convert_element_type: linear between inexact types, zero into integers ------------

def _convert_element_type_jvp(primals, tangents, *, new_dtype, weak_type, sharding):
    (x,), (x_dot,) = primals, tangents
    ans = p.convert_element_type_p.bind(x, new_dtype=new_dtype, weak_type=weak_type,
                                        sharding=sharding)
    if is_zero(x_dot) or not has_tangent_space(ans.aval if hasattr(ans, "aval") else ans):
        return ans, Zero.like(ans)
    return ans, p.convert_element_type_p.bind(x_dot, new_dtype=new_dtype, weak_type=weak_type,
                                              sharding=sharding)


def _convert_element_type_transpose(ct, x, *, new_dtype, weak_type, sharding):
    # Back to the input's dtype and weak type; complex -> real keeps the real part.
    del new_dtype, weak_type, sharding
    if np.iscomplexobj(ct) and not np.issubdtype(x.aval.dtype, np.complexfloating):
        ct = lax.real(ct)
    return [p.convert_element_type_p.bind(ct, new_dtype=x.aval.dtype, weak_type=x.aval.weak_type,
                                          sharding=None)]


jvp_rules[p.convert_element_type_p] = _convert_element_type_jvp
transpose_rules[p.convert_element_type_p] = _convert_element_type_transpose


# --- select_n: linear in the cases, not in the predicate -------------------------------

def _select_n_jvp(primals, tangents):
    # d select_n(w, *cases) = select_n(w, *d cases)
    which, *cases = primals
    ans = lax.select_n(which, *cases)
    case_dots = tangents[1:]
    if all(is_zero(t) for t in case_dots):
        return ans, Zero.like(ans)
    return ans, lax.select_n(which, *map(instantiate, case_dots))


def _select_n_transpose(ct, which, *cases):
    # Case i gets `ct` where `which` picks it, zero elsewhere.
    assert not is_undefined(which)
    zeros = lax.full_like(ct, 0)
    return [None] + [lax.select_n(which, *[ct if j == i else zeros for j in range(len(cases))])
                     if is_undefined(case) else None for i, case in enumerate(cases)]


jvp_rules[p.select_n_p] = _select_n_jvp
transpose_rules[p.select_n_p] = _select_n_transpose


# --- dot_general: bilinear ------------------------------------------------------------

def _free_dims(ndim, contract, batch):
    return [d for d in range(ndim) if d not in contract and d not in batch]


def _dot_back(ct, other, ct_contract, other_contract, other_batch, layout, aval, precision):
    """Contracts `ct` with the known operand, then lays the result out like the unknown one.

    The product comes out as (batch, free dims of ct, contracting dims of the unknown
    operand in the order of the known operand's matching dims); `layout` lists the
    unknown operand's dimension for each of those positions.
    """
    nb = len(other_batch)
    out = lax.dot_general(ct, other, ((ct_contract, other_contract), (tuple(range(nb)), other_batch)),
                          precision=precision, preferred_element_type=aval.dtype)
    return lax.convert_element_type(lax.transpose(out, tuple(np.argsort(layout))), aval.dtype)


def _dot_transpose_lhs(ct, x, y, *, dimension_numbers, precision, **params):
    del params
    (xc, yc), (xb, yb) = dimension_numbers
    x_free, y_free = _free_dims(x.aval.ndim, xc, xb), _free_dims(np.ndim(y), yc, yb)
    nb, nxf = len(xb), len(x_free)
    ct_y_free = tuple(range(nb + nxf, nb + nxf + len(y_free)))
    layout = [*xb, *x_free, *(x_d for _, x_d in sorted(zip(yc, xc, strict=True)))]
    return _dot_back(ct, y, ct_y_free, tuple(y_free), tuple(yb), layout, x.aval, precision)


def _dot_transpose_rhs(ct, x, y, *, dimension_numbers, precision, **params):
    del params
    (xc, yc), (xb, yb) = dimension_numbers
    x_free, y_free = _free_dims(np.ndim(x), xc, xb), _free_dims(y.aval.ndim, yc, yb)
    nb, nxf = len(xb), len(x_free)
    ct_x_free = tuple(range(nb, nb + nxf))
    layout = [*yb, *y_free, *(y_d for _, y_d in sorted(zip(xc, yc, strict=True)))]
    return _dot_back(ct, x, ct_x_free, tuple(x_free), tuple(xb), layout, y.aval, precision)


defbilinear(p.dot_general_p, _dot_transpose_lhs, _dot_transpose_rhs)  # d(xy) = dx y + x dy


# --- zero derivative: comparisons, logic, bits, iota, stop_gradient --------------------

_internal = jaxutil.internal_prims
for _prim in (p.stop_gradient_p, p.eq_p, p.ne_p, p.lt_p, p.le_p, p.gt_p, p.ge_p,
              p.and_p, p.or_p, p.not_p, p.xor_p, p.iota_p,
              p.shift_left_p, p.shift_right_arithmetic_p, p.shift_right_logical_p,
              p.population_count_p, p.clz_p, p.reduce_and_p, p.reduce_or_p, p.reduce_xor_p,
              p.eq_to_p, p.le_to_p, p.lt_to_p,
              # reinterpreting bits is not a smooth map (jax agrees: zero derivative)
              p.bitcast_convert_type_p):
    defjvp_zero(_prim)
defjvp_zero(p.empty2_p)  # no inputs: scan's uninitialized buffers
# integer results, or no inputs at all (`lax.empty`, `lax.platform_dependent`'s index)
for _name in ("mulhi_p", "empty_p", "lu_pivots_to_permutation_p", "platform_index_p"):
    if _name in _internal:
        defjvp_zero(_internal[_name])
