"""Shape, type and layout primitives, reductions, dot_general, and zero-derivative ops."""

from __future__ import annotations

import numpy as np
from jax import lax

from fungrad._src.jaxutil import prims as p
from fungrad._src.rules import (
    defbilinear,
    defjvp,
    defjvp2,
    defjvp_zero,
    deflinear,
    is_undefined,
    jvp_rules,
    transpose_rules,
)
from fungrad._src.zeros import Zero, has_tangent_space, instantiate, is_zero

# --- layout: linear, transposed by the inverse layout change ---------------------------


def _broadcast_in_dim_transpose(ct, x, *dyn_shape, shape, broadcast_dimensions, sharding):
    del shape, sharding
    assert not dyn_shape, "dynamic shapes are not supported"
    in_shape = x.aval.shape
    new_dims = tuple(i for i in range(np.ndim(ct)) if i not in broadcast_dimensions)
    stretched = tuple(d for i, d in enumerate(broadcast_dimensions)
                      if in_shape[i] == 1 and np.shape(ct)[d] != 1)
    summed = lax.reduce_sum(ct, tuple(sorted(new_dims + stretched)))
    return [lax.reshape(summed, in_shape)]


deflinear(p.broadcast_in_dim_p, _broadcast_in_dim_transpose)
deflinear(p.reshape_p, lambda ct, x, **params: [lax.reshape(ct, x.aval.shape)])
deflinear(p.squeeze_p, lambda ct, x, *, dimensions: [lax.reshape(ct, x.aval.shape)])
deflinear(p.transpose_p,
          lambda ct, x, *, permutation: [lax.transpose(ct, tuple(np.argsort(permutation)))])
deflinear(p.reduce_sum_p,  # transpose of a sum is a broadcast
          lambda ct, x, *, axes, **params: [lax.broadcast_in_dim(
              ct, x.aval.shape, tuple(i for i in range(x.aval.ndim) if i not in axes))])
deflinear(p.copy_p, lambda ct, x: [ct])


def _convert_element_type_jvp(primals, tangents, *, new_dtype, weak_type, sharding):
    (x,), (x_dot,) = primals, tangents
    ans = p.convert_element_type_p.bind(x, new_dtype=new_dtype, weak_type=weak_type,
                                        sharding=sharding)
    if is_zero(x_dot) or not has_tangent_space(ans.aval if hasattr(ans, "aval") else ans):
        return ans, Zero.like(ans)
    return ans, p.convert_element_type_p.bind(x_dot, new_dtype=new_dtype, weak_type=weak_type,
                                              sharding=sharding)


def _convert_element_type_transpose(ct, x, *, new_dtype, weak_type, sharding):
    del new_dtype, sharding
    if np.issubdtype(x.aval.dtype, np.complexfloating) or not np.iscomplexobj(ct):
        return [lax.convert_element_type(ct, x.aval.dtype)]
    return [lax.convert_element_type(lax.real(ct), x.aval.dtype)]


jvp_rules[p.convert_element_type_p] = _convert_element_type_jvp
transpose_rules[p.convert_element_type_p] = _convert_element_type_transpose


# --- select_n: linear in the cases, not in the predicate -------------------------------

def _select_n_jvp(primals, tangents):
    which, *cases = primals
    ans = lax.select_n(which, *cases)
    case_dots = tangents[1:]
    if all(is_zero(t) for t in case_dots):
        return ans, Zero.like(ans)
    return ans, lax.select_n(which, *map(instantiate, case_dots))


def _select_n_transpose(ct, which, *cases):
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
    layout = [*xb, *x_free, *(x_d for _, x_d in sorted(zip(yc, xc, strict=False)))]
    return _dot_back(ct, y, ct_y_free, tuple(y_free), tuple(yb), layout, x.aval, precision)


def _dot_transpose_rhs(ct, x, y, *, dimension_numbers, precision, **params):
    del params
    (xc, yc), (xb, yb) = dimension_numbers
    x_free, y_free = _free_dims(np.ndim(x), xc, xb), _free_dims(y.aval.ndim, yc, yb)
    nb, nxf = len(xb), len(x_free)
    ct_x_free = tuple(range(nb, nb + nxf))
    layout = [*yb, *y_free, *(y_d for _, y_d in sorted(zip(xc, yc, strict=False)))]
    return _dot_back(ct, x, ct_x_free, tuple(x_free), tuple(xb), layout, y.aval, precision)


defbilinear(p.dot_general_p, _dot_transpose_lhs, _dot_transpose_rhs)


# --- reductions that choose an element ------------------------------------------------

def _reduce_chooser_jvp(g, ans, x, *, axes, **params):
    # Ties share the derivative equally, as in jax.
    del params
    kept = tuple(i for i in range(x.ndim) if i not in axes)
    location = lax.convert_element_type(
        lax.eq(x, lax.broadcast_in_dim(ans, x.shape, kept)), g.dtype)
    counts = lax.reduce_sum(location, axes)
    return lax.div(lax.reduce_sum(lax.mul(g, location), axes), counts)


defjvp2(p.reduce_max_p, _reduce_chooser_jvp)
defjvp2(p.reduce_min_p, _reduce_chooser_jvp)


# --- zero derivative ------------------------------------------------------------------

for _prim in (p.stop_gradient_p, p.eq_p, p.ne_p, p.lt_p, p.le_p, p.gt_p, p.ge_p,
              p.and_p, p.or_p, p.not_p, p.xor_p, p.argmax_p, p.argmin_p, p.iota_p,
              p.shift_left_p, p.shift_right_arithmetic_p, p.shift_right_logical_p,
              p.population_count_p, p.clz_p, p.reduce_and_p, p.reduce_or_p, p.reduce_xor_p,
              p.eq_to_p, p.le_to_p, p.lt_to_p):
    defjvp_zero(_prim)

del defjvp
