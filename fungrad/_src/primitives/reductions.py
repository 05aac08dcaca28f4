"""Reductions, cumulative reductions and sort: reduce_sum/max/min/prod, argmax, the generic
reduce, cum*, sort."""

from __future__ import annotations

from collections.abc import Callable

import jax
import numpy as np
from jax import lax

from fungrad._src import jaxutil
from fungrad._src.jaxutil import ClosedJaxpr, Primitive
from fungrad._src.jaxutil import prims as p
from fungrad._src.jvp import fill, jvp_closed
from fungrad._src.rules import defjvp2, defjvp_zero, deflinear, jvp_rules
from fungrad._src.zeros import Zero, has_tangent_space, instantiate, is_zero


def _const(x, value):
    return lax.full_like(x, value, shape=())


# --- reduce_sum: linear, transposed by a broadcast --------------------------------------

def _reduce_sum_transpose(ct, x, *, axes, **params):
    # The transpose of a sum is a broadcast over the summed axes.
    del params
    kept = tuple(i for i in range(x.aval.ndim) if i not in axes)
    return [lax.broadcast_in_dim(ct, x.aval.shape, kept)]


deflinear(p.reduce_sum_p, _reduce_sum_transpose)


# --- reductions that choose an element ------------------------------------------------

def _reduce_chooser_jvp(g, ans, x, *, axes, **params):
    # d max(x) = mean of dx over the positions that attain the max (ties share, as in jax).
    del params
    kept = tuple(i for i in range(x.ndim) if i not in axes)
    location = lax.convert_element_type(
        lax.eq(x, lax.broadcast_in_dim(ans, x.shape, kept)), g.dtype)
    counts = lax.reduce_sum(location, axes)
    return lax.div(lax.reduce_sum(lax.mul(g, location), axes), counts)


defjvp2(p.reduce_max_p, _reduce_chooser_jvp)
defjvp2(p.reduce_min_p, _reduce_chooser_jvp)
defjvp_zero(p.argmax_p)
defjvp_zero(p.argmin_p)


# --- reduce_prod: the product rule along a pairwise tree -----------------------------

def _reduce_prod_jvp(primals, tangents, *, axes, **params):
    # d prod(x) = sum_i dx_i prod_{j != i} x_j, by the product rule pairwise up a tree
    # (exact where x has zeros, unlike dividing prod(x) by x_i).
    (x,), (x_dot,) = primals, tangents
    ans = p.reduce_prod_p.bind(x, axes=axes, **params)
    if is_zero(x_dot):
        return ans, Zero.like(ans)
    kept = [d for d in range(x.ndim) if d not in axes]
    n = int(np.prod([x.shape[d] for d in axes], dtype=np.int64))
    if n == 0:
        return ans, lax.full_like(ans, 0)
    flat_shape = (n, *(x.shape[d] for d in kept))
    xs = lax.reshape(lax.transpose(x, (*axes, *kept)), flat_shape)
    ts = lax.reshape(lax.transpose(x_dot, (*axes, *kept)), flat_shape)
    while n > 1:
        half = (n + 1) // 2
        xa, xb = lax.slice_in_dim(xs, 0, half), lax.slice_in_dim(xs, half, n)
        ta, tb = lax.slice_in_dim(ts, 0, half), lax.slice_in_dim(ts, half, n)
        if n % 2:  # pad the shorter half with the identity of the product
            edge = [(0, 1, 0)] + [(0, 0, 0)] * len(kept)
            xb, tb = lax.pad(xb, _const(xb, 1), edge), lax.pad(tb, _const(tb, 0), edge)
        xs, ts = lax.mul(xa, xb), lax.add(lax.mul(ta, xb), lax.mul(xa, tb))
        n = half
    return ans, lax.reshape(ts, ans.shape)


jvp_rules[p.reduce_prod_p] = _reduce_prod_jvp


# --- reduce with a computation: forward mode up a pairwise tree --------------------------

def _pair_step(reducer: ClosedJaxpr, mask: tuple[bool, ...]):
    """The reducer on (value, tangent) pairs, elementwise over (rows, columns) arrays:
    (xs, dxs, ys, dys) -> (out, d out), with the tangent from fungrad's forward mode.

    Only the operands where `mask` is set (the inexact ones) carry a tangent.
    """
    zeros = [Zero(a.to_tangent_aval()) for a in reducer.in_avals[:len(mask)]]

    def step(xs, dxs, ys, dys):
        outs, out_dots = jvp_closed(reducer, [*xs, *ys], [*fill(mask, dxs, zeros),
                                                          *fill(mask, dys, zeros)])
        return outs, [instantiate(d) for d, m in zip(out_dots, mask, strict=True) if m]

    return jax.vmap(jax.vmap(step))


def _halves(xs, fills):
    """The first ceil(n/2) rows of each array, and the rest, padded by a row of `fills` if
    n is odd."""
    n = xs[0].shape[0]
    half = (n + 1) // 2
    firsts = [lax.slice_in_dim(x, 0, half) for x in xs]
    seconds = [lax.slice_in_dim(x, half, n) for x in xs]
    if n % 2:
        edge = [(0, 1, 0), (0, 0, 0)]
        seconds = [lax.pad(x, f, edge) for x, f in zip(seconds, fills, strict=True)]
    return firsts, seconds


def split_reducer_args(primals, tangents, init_tangent_error: Exception):
    """(operands, inits, operand tangents, which operands have tangents) of a reduction
    with a computation; `init_tangent_error` is raised if an init value has a tangent."""
    n = len(primals) // 2
    if not all(is_zero(t) for t in tangents[n:]):
        raise init_tangent_error
    mask = tuple(has_tangent_space(jaxutil.typeof(x)) for x in primals[:n])
    return primals[:n], primals[n:], tangents[:n], mask


def _tree_reduce(step, xs, dxs, inits, dot_inits):
    """Rows of (xs, dxs) reduced pairwise by `step` to one row: halve, combine, repeat."""
    while xs[0].shape[0] > 1:
        (xs_a, xs_b), (dxs_a, dxs_b) = _halves(xs, inits), _halves(dxs, dot_inits)
        xs, dxs = step(xs_a, dxs_a, xs_b, dxs_b)
    return xs, dxs


def _reduce_jvp(primals, tangents, *, computation, jaxpr, dimensions):
    # d reduce(x) = the reducer's JVP applied up a balanced tree of (x, dx) pairs, as jax
    # does (the reducer need only be associative; the primal output is the tree's). Each
    # step is ordinary lax operations, which linearize and transpose like any others.
    del computation
    operands, inits, operand_dots, mask = split_reducer_args(primals, tangents, NotImplementedError(
        "fungrad cannot differentiate lax.reduce (the generic 'reduce' primitive) with "
        "respect to its init_values (jax cannot either); pass constant init_values, or "
        "wrap them in jax.lax.stop_gradient."))
    shape = np.shape(operands[0])
    kept = [d for d in range(len(shape)) if d not in dimensions]
    out_shape = tuple(shape[d] for d in kept)
    n = int(np.prod([shape[d] for d in dimensions], dtype=np.int64))
    if n == 0:  # nothing to reduce: the init values, which have no tangent
        outs = [lax.full(out_shape, i) for i in inits]
        return outs, [Zero.like(o) for o in outs]

    def rows(x):  # reduced axes first, flattened: (n, prod(out_shape))
        return lax.reshape(lax.transpose(x, (*dimensions, *kept)), (n, int(np.prod(out_shape))))

    xs, dxs = _tree_reduce(
        _pair_step(jaxpr, mask), [rows(x) for x in operands],
        [rows(instantiate(t)) for t, m in zip(operand_dots, mask, strict=True) if m],
        inits, [lax.full_like(i, 0) for i, m in zip(inits, mask, strict=True) if m])
    outs = [lax.reshape(x, out_shape) for x in xs]
    out_dots = [lax.reshape(t, out_shape) for t in dxs]
    return outs, fill(mask, out_dots, [Zero.like(o) for o in outs])


jvp_rules[p.reduce_p] = _reduce_jvp


# --- cumulative reductions ------------------------------------------------------------

deflinear(p.cumsum_p,  # transpose of a prefix sum is a suffix sum
          lambda ct, x, *, axis, reverse: [lax.cumsum(ct, axis, reverse=not reverse)])


def _balanced_share(x, ans, y):
    """1 where `x` alone is the extremum, 1/2 where it ties with `y`, else 0 (jax's split)."""
    won = lax.select(lax.eq(x, ans), lax.full_like(ans, 1), lax.full_like(ans, 0))
    return lax.div(won, lax.select(lax.eq(y, ans), lax.full_like(ans, 2), lax.full_like(ans, 1)))


def _extremum_pair(op):
    def combine(a, b):  # (op(x, y), its tangent with ties split evenly)
        (x, x_dot), (y, y_dot) = a, b
        ans = op(x, y)
        return ans, lax.add(lax.mul(x_dot, _balanced_share(x, ans, y)),
                            lax.mul(y_dot, _balanced_share(y, ans, x)))
    return combine


def _product_pair(a, b):  # d(xy) = dx y + x dy
    (x, x_dot), (y, y_dot) = a, b
    return lax.mul(x, y), lax.add(lax.mul(x_dot, y), lax.mul(x, y_dot))


def _plus_inf_to_zero(x):
    return lax.select(lax.eq(x, _const(x, np.inf)), lax.full_like(x, 0), x)


def _logaddexp_pair(a, b):
    # d log(e^x + e^y) = e^(x - ans) dx + e^(y - ans) dy, with jax's handling of +inf.
    (x, x_dot), (y, y_dot) = a, b
    hi, lo = lax.max(x, y), lax.min(x, y)
    gap = lax.sub(lo, hi)  # written with max and min so that its derivative is right at ties
    ans = lax.select(lax.ne(gap, gap), lax.add(x, y), lax.add(hi, lax.log1p(lax.exp(gap))))
    ans_ = _plus_inf_to_zero(ans)
    w_x = lax.exp(lax.sub(_plus_inf_to_zero(x), ans_))
    w_y = lax.exp(lax.sub(_plus_inf_to_zero(y), ans_))
    return ans, lax.add(lax.mul(x_dot, w_x), lax.mul(y_dot, w_y))


def _def_cumulative(prim: Primitive, combine: Callable) -> None:
    """JVP of a cumulative reduction: a parallel prefix scan over (value, tangent) pairs.

    The scan is the one jax differentiates too, so ties are split the same way.
    """
    def rule(primals, tangents, *, axis, reverse):
        (x,), (x_dot,) = primals, tangents
        ans = prim.bind(x, axis=axis, reverse=reverse)
        if is_zero(x_dot):
            return ans, Zero.like(ans)
        _, ans_dot = lax.associative_scan(combine, (x, x_dot), reverse=reverse, axis=axis)
        return ans, ans_dot

    jvp_rules[prim] = rule


_def_cumulative(p.cumprod_p, _product_pair)
_def_cumulative(p.cummax_p, _extremum_pair(lax.max))
_def_cumulative(p.cummin_p, _extremum_pair(lax.min))
_def_cumulative(p.cumlogsumexp_p, _logaddexp_pair)


# --- sort: tangents follow the permutation ------------------------------------------

def _take_along(x, perm, axis):
    """`x` reordered along `axis` by the index array `perm` (same shape as `x`)."""
    others = tuple(d for d in range(x.ndim) if d != axis)
    dnums = lax.GatherDimensionNumbers(
        offset_dims=(), collapsed_slice_dims=(axis,), start_index_map=(axis,),
        operand_batching_dims=others, start_indices_batching_dims=others)
    return lax.gather(x, lax.reshape(perm, (*perm.shape, 1)), dnums, (1,) * x.ndim,
                      mode=lax.GatherScatterMode.PROMISE_IN_BOUNDS)


def _sort_jvp(primals, tangents, *, dimension, is_stable, num_keys):
    # Sort an iota along with the operands to learn the permutation, then apply it to the
    # tangents; a stable sort keeps tied keys in order, as jax does.
    shape = np.shape(primals[0])
    index_dtype = np.int32 if shape[dimension] < np.iinfo(np.int32).max else np.int64
    iota = lax.broadcasted_iota(index_dtype, shape, dimension)
    *outs, perm = p.sort_p.bind(*primals, iota, dimension=dimension, is_stable=is_stable,
                                num_keys=num_keys)
    out_dots = [t if is_zero(t) else _take_along(t, perm, dimension) for t in tangents]
    return outs, out_dots


jvp_rules[p.sort_p] = _sort_jvp
