"""Windowed reductions: reduce_window_sum/max/min, the generic reduce_window, and the
select_and_scatter_add / select_and_gather_add pair that max pooling differentiates into.

Per dimension, a window reduction reads the operand dilated by `base_dilation` and
padded by `padding`, at windows of `window_dimensions` elements spaced by
`window_dilation`, starting every `window_strides` elements.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from jax import lax

from fungrad._src import jaxutil, linearize, rules
from fungrad._src.jaxutil import ClosedJaxpr, JaxprEqn, Var
from fungrad._src.jaxutil import prims as p
from fungrad._src.jvp import fill, jvp_closed
from fungrad._src.primitives.reductions import split_reducer_args
from fungrad._src.rules import defjvp, deflinear, is_undefined, jvp_rules, transpose_rules
from fungrad._src.zeros import Zero, instantiate, is_zero


def _dilated(size, dilation):
    return 0 if size == 0 else (size - 1) * dilation + 1


# --- reduce_window_sum: linear, transposed by a window sum over the padded cotangent --------

def _reduce_window_sum_transpose(ct, x, *, window_dimensions, window_strides, padding,
                                 base_dilation, window_dilation):
    # Input position j of the padded, dilated operand receives sum_q ct_dilated[j - q wd]:
    # dilate ct by the strides, pad it so that the windows land on the operand's
    # elements, and sum it over the same windows read every `base_dilation` elements.
    shape = x.aval.shape
    if np.size(ct) == 0:
        return [Zero(x.aval.to_tangent_aval())]
    pads = []
    for n, w, s, (lo, _), bd, wd, m in zip(shape, window_dimensions, window_strides, padding,
                                           base_dilation, window_dilation, np.shape(ct),
                                           strict=True):
        span = _dilated(w, wd)
        pads.append((span - 1 - lo, _dilated(n, bd) - 1 + lo - _dilated(m, s) + 1, s - 1))
    padded = lax.pad(ct, lax.full_like(ct, 0, shape=()), pads)
    ones = (1,) * len(shape)
    return [p.reduce_window_sum_p.bind(
        padded, window_dimensions=window_dimensions, window_strides=base_dilation,
        padding=((0, 0),) * len(shape), base_dilation=ones, window_dilation=window_dilation)]


deflinear(p.reduce_window_sum_p, _reduce_window_sum_transpose)


# --- reduce_window_max / min: the tangent of the element each window selects -------------

def _chooser_jvp(select_prim):
    # d max_window(x) = dx at the window's maximum (the first one, for ties, as in jax).
    def jvp(x_dot, x, **params):
        return p.select_and_gather_add_p.bind(x_dot, x, select_prim=select_prim, **params)
    return jvp


defjvp(p.reduce_window_max_p, _chooser_jvp(p.ge_p))
defjvp(p.reduce_window_min_p, _chooser_jvp(p.le_p))


# --- select_and_gather_add / select_and_scatter_add: linear in their first argument ------

def _linear_in_first(prim):
    """JVP of a primitive linear in its first argument, its second only choosing positions."""
    def rule(primals, tangents, **params):
        (t, x), (t_dot, _) = primals, tangents
        ans = prim.bind(t, x, **params)
        if is_zero(t_dot):
            return ans, Zero.like(ans)
        return ans, prim.bind(t_dot, x, **params)
    return rule


def _select_and_gather_add_transpose(ct, t, x, *, select_prim, window_dimensions,
                                     window_strides, padding, base_dilation, window_dilation):
    # Each window's cotangent goes back to the position its select chose: a scatter.
    assert is_undefined(t) and not is_undefined(x)
    if any(d != 1 for d in window_dilation):
        raise NotImplementedError(
            "fungrad cannot transpose select_and_gather_add (reverse mode of a max or min "
            f"pooling) with window_dilation={window_dilation}; jax cannot either. Use "
            "forward mode (fungrad.jvp, fungrad.jacfwd) or a window without dilation.")
    dilated = any(d != 1 for d in base_dilation)
    if dilated:  # the holes a base dilation makes are never selected: fill them so
        identity = -np.inf if select_prim is p.ge_p else np.inf
        x = lax.pad(x, lax.full_like(x, identity, shape=()),
                    [(0, 0, d - 1) for d in base_dilation])
    ct_t = p.select_and_scatter_add_p.bind(
        ct, x, select_prim=select_prim, window_dimensions=window_dimensions,
        window_strides=window_strides, padding=padding)
    if dilated:
        ct_t = lax.slice(ct_t, (0,) * ct_t.ndim, ct_t.shape, base_dilation)
    return [ct_t, None]


jvp_rules[p.select_and_gather_add_p] = _linear_in_first(p.select_and_gather_add_p)
transpose_rules[p.select_and_gather_add_p] = _select_and_gather_add_transpose


def _select_and_scatter_add_transpose(ct, source, x, *, select_prim, window_dimensions,
                                      window_strides, padding):
    # Each window reads the cotangent at the position its select chose: a gather.
    assert is_undefined(source) and not is_undefined(x)
    ones = (1,) * len(window_dimensions)
    return [p.select_and_gather_add_p.bind(
        ct, x, select_prim=select_prim, window_dimensions=window_dimensions,
        window_strides=window_strides, padding=padding, base_dilation=ones,
        window_dilation=ones), None]


jvp_rules[p.select_and_scatter_add_p] = _linear_in_first(p.select_and_scatter_add_p)
transpose_rules[p.select_and_scatter_add_p] = _select_and_scatter_add_transpose


# --- select_and_scatter: general select and scatter computations; jax has no rule ---------

rules.refuse(p.select_and_scatter_p,
             "fungrad cannot differentiate select_and_scatter (a select-and-scatter with "
             "arbitrary select and scatter computations); jax has no derivative for it either. "
             "Write the scatter as an addition (select_and_scatter_add), which is linear in "
             "its source.")


# --- reduce_window with a computation: forward mode over (value, tangent) pairs ---------

def _jvp_body(body: ClosedJaxpr, mask: tuple[bool, ...]) -> ClosedJaxpr:
    """The reducer on (values, tangents) pairs: (xl, dxl, xr, dxr) -> (out, d out).

    Only the operands where `mask` is set (the inexact ones) carry a tangent.
    """
    n = len(body.out_avals)
    avals = body.in_avals
    k = sum(mask)
    zeros = [Zero(a.to_tangent_aval()) for a in avals[:n]]

    def pair_body(*args):
        xl, dxl, xr, dxr = args[:n], args[n:n + k], args[n + k:2 * n + k], args[2 * n + k:]
        outs, out_dots = jvp_closed(body, [*xl, *xr], [*fill(mask, dxl, zeros),
                                                       *fill(mask, dxr, zeros)])
        return [*outs, *(instantiate(d) for d, m in zip(out_dots, mask, strict=True) if m)]

    dot_avals = [a.to_tangent_aval() for a, m in zip(avals[:n], mask, strict=True) if m]
    return jaxutil.trace_to_jaxpr(pair_body, [*avals[:n], *dot_avals, *avals[n:], *dot_avals])


def _reduce_window_jvp(primals, tangents, *, jaxpr, consts, **params):
    # Reduce (x, dx) pairs with the reducer's own JVP: d reduce(x) = reduce'((x, dx)).
    # Integer operands (an argmax carried along, say) take part without a tangent.
    n = len(primals) // 2
    operands, inits, operand_dots, mask = split_reducer_args(primals, tangents, TypeError(
        "fungrad cannot differentiate reduce_window with respect to its init_value "
        "(jax cannot either); pass a constant init_value, or wrap it in "
        "jax.lax.stop_gradient."))
    dots = [instantiate(t) for t, m in zip(operand_dots, mask, strict=True) if m]
    init_dots = [instantiate(Zero.like(i)) for i, m in zip(inits, mask, strict=True) if m]
    pair = _jvp_body(ClosedJaxpr(jaxpr, consts), mask)
    outs = p.reduce_window_p.bind(*operands, *dots, *inits, *init_dots,
                                  jaxpr=pair.jaxpr, consts=tuple(pair.consts), **params)
    zeros = [Zero.like(x) for x in outs[:n]]
    return outs[:n], fill(mask, outs[n:], zeros)


def _reduce_window_partial_eval(eqn: JaxprEqn, unknowns: Sequence[bool]):
    """The known results by a reduce_window of their own; the whole one again for the rest.

    An operand's result is unknown when the operand or its init is, or when the reducer
    mixes an unknown one into it. As for while loops, the staged equation recomputes
    the known values, so linearize works and only reverse mode fails.
    """
    n = len(eqn.outvars)
    body: Any = eqn.params["jaxpr"]
    uk = [a or b for a, b in zip(unknowns[:n], unknowns[n:], strict=True)]
    while True:
        out_uk = linearize.partial_eval(body, [*uk, *uk]).out_unknowns
        new = [a or b for a, b in zip(uk, out_uk, strict=True)]
        if new == uk:
            break
        uk = new
    if all(uk):
        return [], [eqn], uk
    split = linearize.partial_eval(body, [*uk, *uk], instantiate=uk)
    known_outs = split.known.outvars[:uk.count(False)]
    known_body = jaxutil.new_jaxpr(split.known.constvars, split.known.invars, known_outs,
                                   linearize.dce(split.known.eqns, known_outs))
    known_ins = [v for v, u in zip(eqn.invars, uk + uk, strict=True) if not u]
    known_eqn = jaxutil.new_eqn(
        known_ins, [v for v, u in zip(eqn.outvars, uk, strict=True) if not u],
        p.reduce_window_p, dict(eqn.params, jaxpr=known_body), eqn)
    staged_outs = [v if u else Var(v.aval) for v, u in zip(eqn.outvars, uk, strict=True)]
    staged_eqn = jaxutil.new_eqn(eqn.invars, staged_outs, p.reduce_window_p, eqn.params, eqn)
    return [known_eqn], [staged_eqn], uk


def _reduce_window_transpose(cts, *args, **params):
    del cts, args, params
    raise NotImplementedError(
        "fungrad cannot run reverse mode through reduce_window with a general reduction "
        "computation (jax cannot either); forward mode (fungrad.jvp, fungrad.jacfwd) "
        "works. Reductions by lax.add from 0, or lax.max / lax.min from -inf / +inf "
        "(sum, average and max pooling) become reduce_window_sum/max/min, which reverse "
        "mode supports.")


jvp_rules[p.reduce_window_p] = _reduce_window_jvp
rules.partial_eval_rules[p.reduce_window_p] = _reduce_window_partial_eval
transpose_rules[p.reduce_window_p] = _reduce_window_transpose  # no reverse mode, as in jax
rules.forward_only.add(p.reduce_window_p)
