"""Ragged dot (mixture of experts): `ragged_dot_general`, bilinear in its two operands.

`group_sizes` splits one dimension of the lhs (the ragged dimension) into consecutive
groups. jax has three modes, by the kind of that dimension:

1. non-contracting (`lax.ragged_dot`, the MoE forward): the rows of group g are
   multiplied by slice g of the rhs's group dimension; rows past the groups give 0;
2. contracting: group g contracts only its own part of the ragged dimension, and the
   result gets a leading dimension of size g;
3. batch: every batch element is a plain dot (the sizes change nothing).

The transposes are ragged dots themselves (as in jax, which transposes mode 1 only):
mode 1's lhs transpose is a mode 1 product with `ct`, its rhs transpose the mode 2
product of lhs and `ct`; mode 2 transposes into mode 1 products with `ct` as the grouped
rhs; mode 3 into mode 3 products. Each keeps `group_sizes` as it is: the dimensions its
leading axes stand for (batch dimensions, then the dimensions outer to the ragged one)
keep their order, by permuting the operand where needed.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from jax import lax

from fungrad._src.jaxutil import internal_prims
from fungrad._src.rules import is_undefined, jvp_rules, transpose_rules
from fungrad._src.zeros import Zero, add_tangents, is_zero

_NONCONTRACTING, _CONTRACTING, _BATCH = "non-contracting", "contracting", "batch"


def _free(ndim: int, *used) -> list[int]:
    """The dimensions of an operand that are in none of the lists `used`, in order."""
    taken = {d for dims in used for d in dims}
    return [d for d in range(ndim) if d not in taken]


def _mode(lhs_ndim: int, dnums) -> str:
    (xc, _), (xb, _) = dnums.dot_dimension_numbers
    (r,) = dnums.lhs_ragged_dimensions
    return _CONTRACTING if r in xc else _BATCH if r in xb else _NONCONTRACTING


def _ragged(lhs, rhs, group_sizes, contract, batch, ragged: int, group: list[int], aval,
            params: dict[str, Any]):
    """A ragged dot with new dimension numbers, giving an `aval.dtype` result."""
    dnums = lax.RaggedDotDimensionNumbers(
        dot_dimension_numbers=(contract, batch), lhs_ragged_dimensions=[ragged],
        rhs_group_dimensions=group)
    new = dict(params, ragged_dot_dimension_numbers=dnums, preferred_element_type=aval.dtype)
    if "out_sharding" in new:
        new["out_sharding"] = None
    return _ragged_dot_general_p.bind(lhs, rhs, group_sizes, **new)


def _laid_out(out, layout: list[int]):
    """`out`, whose axis i is dimension `layout[i]` of the operand, in the operand's order."""
    perm = tuple(int(i) for i in np.argsort(layout))
    return out if perm == tuple(range(len(perm))) else lax.transpose(out, perm)


def _arranged(x, batch, contract, free):
    """`x` transposed to (batch, contract, free), each list in its given order."""
    perm = (*batch, *contract, *free)
    return x if perm == tuple(range(x.ndim)) else lax.transpose(x, perm)


def _transpose_lhs(ct, x, y, group_sizes, *, ragged_dot_dimension_numbers, **params):
    dnums = ragged_dot_dimension_numbers
    (xc, yc), (xb, yb) = dnums.dot_dimension_numbers
    (r,) = dnums.lhs_ragged_dimensions
    mode, ndim = _mode(x.aval.ndim, dnums), x.aval.ndim
    group = list(dnums.rhs_group_dimensions)
    nb, nc = len(xb), len(xc)
    x_free, y_free = _free(ndim, xc, xb), _free(np.ndim(y), yc, yb, group)
    if mode == _CONTRACTING:  # ct (g, b, x_free, y_free): a mode 1 product of y with ct
        y = _arranged(y, yb, yc, y_free)  # y's contracting dims in xc's order
        ct_y_free = range(1 + nb + len(x_free), 1 + nb + len(x_free) + len(y_free))
        out = _ragged(y, ct, group_sizes, (range(nb + nc, np.ndim(y)), ct_y_free),
                      (range(nb), range(1, 1 + nb)), nb + xc.index(r), [0], x.aval, params)
        return _laid_out(out, [*xb, *xc, *x_free])
    # ct (b, x_free, y_free): contract y's free dims, in mode 1 or 3 as the primal.
    ct_y_free = range(nb + len(x_free), nb + len(x_free) + len(y_free))
    ragged = nb + x_free.index(r) if mode == _NONCONTRACTING else xb.index(r)
    out = _ragged(ct, y, group_sizes, (ct_y_free, y_free), (range(nb), yb), ragged, group,
                  x.aval, params)
    return _laid_out(out, [*xb, *x_free, *(x_d for _, x_d in sorted(zip(yc, xc, strict=True)))])


def _transpose_rhs(ct, x, y, group_sizes, *, ragged_dot_dimension_numbers, **params):
    dnums = ragged_dot_dimension_numbers
    (xc, yc), (xb, yb) = dnums.dot_dimension_numbers
    (r,) = dnums.lhs_ragged_dimensions
    mode, ndim = _mode(np.ndim(x), dnums), np.ndim(x)
    group = list(dnums.rhs_group_dimensions)
    nb, nc = len(xb), len(xc)
    x_free, y_free = _free(ndim, xc, xb), _free(y.aval.ndim, yc, yb, group)
    if mode == _CONTRACTING:  # ct (g, b, x_free, y_free): a mode 1 product of x with ct
        x = _arranged(x, xb, xc, x_free)
        out = _ragged(x, ct, group_sizes, (range(nb + nc, ndim), range(1 + nb, 1 + nb + len(x_free))),
                      (range(nb), range(1, 1 + nb)), nb + xc.index(r), [0], y.aval, params)
        return _laid_out(out, [*yb, *yc, *y_free])
    # ct (b, x_free, y_free): contract x's free dims; mode 1 gives mode 2 (a leading g).
    out = _ragged(x, ct, group_sizes, (x_free, range(nb, nb + len(x_free))), (xb, range(nb)),
                  r, [], y.aval, params)
    layout = [*yb, *(y_d for _, y_d in sorted(zip(xc, yc, strict=True))), *y_free]
    return _laid_out(out, group + layout)


def _ragged_dot_general_jvp(primals, tangents, **params):
    (x, y, group_sizes), (x_dot, y_dot, _) = primals, tangents
    ans = _ragged_dot_general_p.bind(x, y, group_sizes, **params)
    out_dot = Zero.like(ans)
    if not is_zero(x_dot):
        out_dot = _ragged_dot_general_p.bind(x_dot, y, group_sizes, **params)
    if not is_zero(y_dot):
        out_dot = add_tangents(out_dot, _ragged_dot_general_p.bind(x, y_dot, group_sizes, **params))
    return ans, out_dot


def _ragged_dot_general_transpose(ct, x, y, group_sizes, **params):
    assert is_undefined(x) != is_undefined(y) and not is_undefined(group_sizes), \
        "ragged_dot_general is bilinear in (lhs, rhs), with group_sizes known"
    if is_undefined(x):
        return [_transpose_lhs(ct, x, y, group_sizes, **params), None, None]
    return [None, _transpose_rhs(ct, x, y, group_sizes, **params), None]


if "ragged_dot_general_p" in internal_prims:
    _ragged_dot_general_p = internal_prims["ragged_dot_general_p"]
    # d ragged(x, y) = ragged(dx, y) + ragged(x, dy); no tangent for group_sizes
    jvp_rules[_ragged_dot_general_p] = _ragged_dot_general_jvp
    transpose_rules[_ragged_dot_general_p] = _ragged_dot_general_transpose
