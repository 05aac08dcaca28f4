"""Taylor mode: `fungrad.jet` pushes truncated Taylor series through a jaxpr in one pass.

The interpreter walks the equations with (primal, series) pairs; a series is `None` (a
symbolic zero: constants cost nothing) or the list of normalized coefficients
`[x_1, ..., x_K]` (see `taylor.py`, which holds the rules of first-order primitives).
This module adds the rules of the primitives that hold jaxprs (they re-emit `lax.cond`,
`lax.scan` and `lax.while_loop` over the series) and the generic rule of any primitive
without a Taylor rule, built from its JVP rule.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax.numpy as jnp
from jax import lax, tree_util

from fungrad._src import api_util, jaxutil, linearize, rules
from fungrad._src import primitives as _primitives  # noqa: F401  (registers the JVP rules)
from fungrad._src.jaxutil import ClosedJaxpr, Jaxpr, JaxprEqn, Literal, prims
from fungrad._src.jvp import fill, fixed_point, partition
from fungrad._src.taylor import Series, order_of, taylor_rules
from fungrad._src.zeros import Zero, is_zero

# --- the interpreter ----------------------------------------------------------------------


def _inexact(aval: Any) -> bool:
    return jnp.issubdtype(aval.dtype, jnp.inexact)


def jet_jaxpr(jaxpr: Jaxpr, consts: Sequence[Any], primals: Sequence[Any],
              series: Sequence[Series]) -> tuple[list[Any], list[Series]]:
    """Evaluates `jaxpr` on `primals` and pushes their Taylor `series` (None: zero) forward."""
    env: dict[Any, Any] = {}
    series_env: dict[Any, list[Any]] = {}

    def read(v):
        return v.val if type(v) is Literal else env[v]

    def read_series(v):
        return None if type(v) is Literal else series_env.get(v)

    def write(v, val, s):
        env[v] = val
        # Integer and boolean values never carry a series, whatever a rule returned.
        if s is not None and _inexact(v.aval):
            series_env[v] = s

    for v, c in zip(jaxpr.constvars, consts, strict=True):
        write(v, c, None)
    for v, x, s in zip(jaxpr.invars, primals, series, strict=True):
        write(v, x, s)
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        in_series = [read_series(v) for v in eqn.invars]
        if all(s is None for s in in_series) or eqn.primitive in rules.zero_derivative:
            outs, out_series = jaxutil.bind_eqn(eqn, invals), [None] * len(eqn.outvars)
        else:
            with jaxutil.rule_context(eqn):
                outs, out_series = _apply_rule(eqn, invals, in_series)
        for v, x, s in zip(eqn.outvars, outs, out_series, strict=True):
            write(v, x, s)
    return [read(v) for v in jaxpr.outvars], [read_series(v) for v in jaxpr.outvars]


def jet_closed(closed: ClosedJaxpr, primals: Sequence[Any],
               series: Sequence[Series]) -> tuple[list[Any], list[Series]]:
    return jet_jaxpr(closed.jaxpr, closed.consts, primals, series)


def _apply_rule(eqn: JaxprEqn, invals: list[Any], in_series: list[Series]) -> tuple[list, list]:
    """The Taylor rule of `eqn`'s primitive, or the generic one from its JVP rule."""
    rule = taylor_rules.get(eqn.primitive)
    result = rule(invals, in_series, **eqn.params) if rule is not None else None
    if result is None:  # no rule, or a rule that declines these inputs (complex abs)
        return via_jvp(eqn, invals, in_series)
    outs, out_series = result
    if not eqn.primitive.multiple_results:
        return [outs], [out_series]
    return list(outs), list(out_series)


# --- the generic rule: Taylor series from a JVP, one order lower ----------------------------
#
# z(t) = f(x(t)) has z'(t) = J(x(t), x'(t)), the tangent output of f's JVP. Pushing the
# series of x (to order K-1) and of x' (whose coefficients are (j+1) x_{j+1}) through the
# JVP's jaxpr at order K-1 gives z' to order K-1, and z_{m+1} = z'_m / (m+1). The JVP's
# jaxpr is handled by this interpreter, so the primitive, when it appears in its own JVP,
# recurses at a lower order: the cost stays polynomial in K where the JVP is.

def via_jvp(eqn: JaxprEqn, primals: Sequence[Any], series: Sequence[Series]) -> tuple[list, list]:
    """The generic Taylor rule of `eqn`, from its JVP rule in `fungrad._src.rules`."""
    jvp_rule = rules.lookup_jvp(eqn)
    nonzero = [s is not None for s in series]
    avals = [jaxutil.typeof(x) for x in primals]
    out_nz: list[bool] = []

    def jvp_fun(*args):
        xs, nz_dots = args[:len(avals)], args[len(avals):]
        dots = fill(nonzero, nz_dots, [Zero(a.to_tangent_aval()) for a in avals])
        outs, out_dots = jvp_rule(list(xs), dots, **eqn.params)
        if not eqn.primitive.multiple_results:
            outs, out_dots = [outs], [out_dots]
        out_nz[:] = [not is_zero(t) and _inexact(jaxutil.typeof(o))
                     for o, t in zip(outs, out_dots, strict=True)]
        return [*outs, *(t for t, nz in zip(out_dots, out_nz, strict=True) if nz)]

    dot_avals = [a.to_tangent_aval() for a, nz in zip(avals, nonzero, strict=True) if nz]
    closed = jaxutil.trace_to_jaxpr(jvp_fun, [*avals, *dot_avals])
    return jet_of_jvp(closed, primals, series, jaxutil.bind_eqn(eqn, primals), out_nz)


def jet_of_jvp(closed: ClosedJaxpr, primals: Sequence[Any], series: Sequence[Series],
               outs: Sequence[Any], out_nz: Sequence[bool]) -> tuple[list, list]:
    """Series of f's outputs `outs` from `closed`, f's JVP: (primals, tangents of the
    inputs with a series) -> (outs, tangents of the outputs marked in `out_nz`)."""
    order = order_of(series)
    # Only the tangents are pushed: the primal outputs' own series would recurse once more
    # per order (exponential for a chain like lgamma -> digamma -> polygamma).
    n_out = len(out_nz)
    jaxpr = closed.jaxpr
    dot_vars = jaxpr.outvars[n_out:]
    tangent_only = jaxutil.new_jaxpr(jaxpr.constvars, jaxpr.invars, dot_vars,
                                     linearize.dce(jaxpr.eqns, dot_vars))
    t0 = [s[0] for s in series if s is not None]
    if order == 1:
        dots = jaxutil.eval_jaxpr(tangent_only, closed.consts, *primals, *t0)
        d_series: list[Series] = [None] * len(dots)
    else:
        lower = [None if s is None else s[:order - 1] for s in series]
        t_series = [[s[j] * (j + 1) for j in range(1, order)] for s in series if s is not None]
        dots, d_series = jet_jaxpr(tangent_only, closed.consts, [*primals, *t0], [*lower, *t_series])
    out_series = []
    for d, ds in zip(dots, d_series, strict=True):
        higher = [jnp.zeros_like(d)] * (order - 1) if ds is None else [c / (m + 2) for m, c in enumerate(ds)]
        out_series.append([d, *higher])  # z_1 = z'_0, z_{m+1} = z'_m / (m + 1)
    return list(outs), fill(out_nz, out_series, [None] * n_out)


# --- primitives that hold jaxprs -------------------------------------------------------------

def _inline(key: str) -> Callable[..., tuple[list, list]]:
    """jit, closed_call, remat, custom_vjp_call: the series of the body, run in place."""
    def rule(primals, series, **params):
        body = params[key]
        if isinstance(body, ClosedJaxpr):
            return jet_closed(body, primals, series)
        return jet_jaxpr(body, [], primals, series)

    return rule


taylor_rules[prims.jit_p] = _inline("jaxpr")
taylor_rules[prims.closed_call_p] = _inline("call_jaxpr")
taylor_rules[prims.remat_p] = _inline("jaxpr")
# As jax's jet: a custom_vjp function's implementation (its bwd gives only first order).
taylor_rules[prims.custom_vjp_call_p] = _inline("call_jaxpr")


def _custom_jvp_call(primals, series, *, call_jaxpr, jvp_jaxpr_fun, num_consts, symbolic_zeros):
    """The user's JVP rule is the JVP: the generic rule applied to it, not to the body."""
    # Closed-over constants have no tangent in a custom rule, as in jax and fungrad.jvp.
    args, arg_series = primals[num_consts:], list(series[num_consts:])
    if all(s is None for s in arg_series):
        return None
    order = order_of(arg_series)
    if symbolic_zeros:
        in_zeros = [s is None for s in arg_series]
    else:
        in_zeros = [False] * len(args)
        arg_series = [[jnp.zeros_like(x)] * order if s is None else s
                      for x, s in zip(args, arg_series, strict=True)]
    jaxpr, consts, out_zeros = jaxutil.custom_jvp_rule(jvp_jaxpr_fun, in_zeros)
    nz_series = [s if not z else None for s, z in zip(arg_series, in_zeros, strict=True)]
    outs = jaxutil.eval_jaxpr(call_jaxpr.jaxpr, call_jaxpr.consts, *primals)
    return jet_of_jvp(ClosedJaxpr(jaxpr, consts), args, nz_series, outs, [not z for z in out_zeros])


taylor_rules[prims.custom_jvp_call_p] = _custom_jvp_call


def carries_series(jaxpr: Jaxpr, in_nz: Sequence[bool]) -> list[bool]:
    """Which outputs of `jaxpr` may carry a series when the inputs in `in_nz` do (a cheap,
    conservative dependence analysis: the series layout of loop carries and branches)."""
    nz = {v for v, m in zip(jaxpr.invars, in_nz, strict=True) if m}
    for eqn in jaxpr.eqns:
        if eqn.primitive in rules.zero_derivative:
            continue
        if any(type(v) is not Literal and v in nz for v in eqn.invars):
            nz.update(v for v in eqn.outvars if _inexact(v.aval))
    return [type(v) is not Literal and v in nz for v in jaxpr.outvars]


def _conform(series: Sequence[Series], layout: Sequence[bool], outs: Sequence[Any],
             order: int) -> list[Series]:
    """Series in a fixed layout: zeros where the layout has one and the body gave none."""
    out: list[Series] = []
    for s, keep, x in zip(series, layout, outs, strict=True):
        assert keep or s is None, "the dependence analysis missed a series"
        out.append(([jnp.zeros_like(x)] * order if s is None else s) if keep else None)
    return out


def _carry_layout(body: Jaxpr, before: Sequence[bool], init: Sequence[bool],
                  after: Sequence[bool] = ()) -> list[bool]:
    """The carries that carry a series: a fixed point of the body's dependence."""
    return fixed_point(lambda flags: carries_series(body, [*before, *flags, *after])[:len(flags)],
                       init)


def _cond(primals, series, *, branches, **params):
    del params
    index, ops, op_series = primals[0], list(primals[1:]), list(series[1:])
    order = order_of(op_series)
    nz = [s is not None for s in op_series]
    layout = [any(m) for m in zip(*(carries_series(b.jaxpr, nz) for b in branches), strict=True)]

    def branch_fun(closed):
        def fun(ops, op_series):
            outs, out_series = jet_closed(closed, ops, op_series)
            return outs, _conform(out_series, layout, outs, order)
        return fun

    return lax.switch(index, [branch_fun(b) for b in branches], ops, op_series)


taylor_rules[prims.cond_p] = _cond  # cond(i, jet(branch_i)): the series share one layout


def _scan(primals, series, *, jaxpr, num_consts, num_carry, length, reverse, unroll, **params):
    del params
    consts, init, xs = partition(primals, num_consts, num_carry)
    c_s, i_s, x_s = partition(series, num_consts, num_carry)
    order = order_of(series)
    c_nz, x_nz = [s is not None for s in c_s], [s is not None for s in x_s]
    carry_nz = _carry_layout(jaxpr.jaxpr, c_nz, [s is not None for s in i_s], x_nz)
    layout = [*carry_nz, *carries_series(jaxpr.jaxpr, [*c_nz, *carry_nz, *x_nz])[num_carry:]]

    def body(carry, x):
        (carry, carry_s), (x, x_s) = carry, x
        outs, out_s = jet_closed(jaxpr, [*consts, *carry, *x], [*c_s, *carry_s, *x_s])
        out_s = _conform(out_s, layout, outs, order)
        return (outs[:num_carry], out_s[:num_carry]), (outs[num_carry:], out_s[num_carry:])

    init_s = _conform(i_s, carry_nz, init, order)
    (carry, carry_s), (ys, ys_s) = lax.scan(body, (init, init_s), (xs, x_s), length=length,
                                            reverse=reverse, unroll=unroll)
    return [*carry, *ys], [*carry_s, *ys_s]


taylor_rules[prims.scan_p] = _scan  # scan over (carry, carry series), (xs, xs series)


def _while(primals, series, *, cond_jaxpr, body_jaxpr, cond_nconsts, body_nconsts):
    cconsts, bconsts, init = partition(primals, cond_nconsts, body_nconsts)
    _, b_s, i_s = partition(series, cond_nconsts, body_nconsts)
    order = order_of(series)
    carry_nz = _carry_layout(body_jaxpr.jaxpr, [s is not None for s in b_s], [s is not None for s in i_s])

    def cond_fun(state):
        return jaxutil.eval_jaxpr(cond_jaxpr.jaxpr, cond_jaxpr.consts, *cconsts, *state[0])[0]

    def body_fun(state):
        outs, out_s = jet_closed(body_jaxpr, [*bconsts, *state[0]], [*b_s, *state[1]])
        return outs, _conform(out_s, carry_nz, outs, order)

    return lax.while_loop(cond_fun, body_fun, (init, _conform(i_s, carry_nz, init, order)))


taylor_rules[prims.while_p] = _while  # while over (carry, carry series); cond reads the carry


# --- the public function ----------------------------------------------------------------------


@jaxutil.api_boundary
def jet(fun: Callable, primals: Sequence[Any], series: Sequence[Sequence[Any]]) -> tuple[Any, Any]:
    """Taylor mode: the truncated Taylor series of ``fun`` along a path, in one pass.

    The API and conventions of ``jax.experimental.jet.jet``: ``series[i][k]`` is the
    (k+1)-th derivative of the i-th input along the path (not divided by a factorial), and
    the result's series holds the derivatives of the output in the same convention. The
    cost is polynomial in the order, where nested ``jvp`` is exponential.

    Args:
      fun: function of ``len(primals)`` positional arguments returning arrays.
      primals: tuple or list of the arguments (arrays or pytrees of floating arrays).
      series: tuple or list with one entry per argument: a tuple or list of its K
        derivative terms, each shaped like the argument (same K for all arguments).

    Returns:
      ``(primals_out, series_out)``: ``fun(*primals)``, and the output's structure with
      each leaf replaced by the list of its K derivative terms.

    >>> import jax.numpy as jnp, fungrad
    >>> y, (y1, y2) = fungrad.jet(jnp.exp, (0.0,), ((1.0, 0.0),))
    >>> float(y), float(y1), float(y2)
    (1.0, 1.0, 1.0)
    """
    api_util.check_callable(fun, "jet")
    api_util.check_args_tuple(primals, "primals", "jet")
    order = _check_series(primals, series)
    leaves, in_tree = tree_util.tree_flatten(tuple(primals))
    leaves = [jnp.asarray(x) for x in leaves]
    terms = [tree_util.tree_leaves(tuple(s[k] for s in series)) for k in range(order)]
    leaf_series = [[t[i] for t in terms] for i in range(len(leaves))] if order else [None] * len(leaves)
    out_tree: list[Any] = []

    def flat_fun(*args):
        out_leaves, tree = tree_util.tree_flatten(fun(*tree_util.tree_unflatten(in_tree, args)))
        out_tree.append(tree)
        return out_leaves

    closed = jaxutil.trace_to_jaxpr(flat_fun, [jaxutil.typeof(x) for x in leaves])
    outs, out_series = jet_closed(closed, leaves, [_scaled(s, lambda k: 1 / math.factorial(k))
                                                     for s in leaf_series])
    outs = [jnp.asarray(x) for x in outs]  # a constant output is a jaxpr literal
    out_terms = [[jnp.zeros_like(x)] * order if s is None else _scaled(s, math.factorial)
                 for x, s in zip(outs, out_series, strict=True)]
    return tree_util.tree_unflatten(out_tree[0], outs), tree_util.tree_unflatten(out_tree[0], out_terms)


def _scaled(series: Series, factor: Callable[[int], float]) -> Series:
    """Derivatives to normalized coefficients (x_k = x^(k) / k!) and back."""
    if series is None:
        return None
    return [t * factor(k) for k, t in enumerate(series, start=1)]


def _check_series(primals: Sequence[Any], series: Any) -> int:
    """Validates `series` against `primals`; returns the order K."""
    api_util.check_args_tuple(series, "series", "jet")
    if len(series) != len(primals):
        raise ValueError(f"jet: series must have one entry per primal, got {len(series)} for "
                         f"{len(primals)} primals; give each argument a tuple of its K terms.")
    for i, terms in enumerate(series):
        if not isinstance(terms, (tuple, list)):
            raise TypeError(f"jet: series[{i}] must be a tuple or list of the K derivative terms "
                            f"of primals[{i}], got {type(terms).__name__}; wrap one term as (term,).")
    orders = {len(terms) for terms in series}
    if len(orders) > 1:
        raise ValueError(f"jet: every argument needs the same number of series terms, got "
                         f"lengths {[len(t) for t in series]}; pad the shorter ones with zeros.")
    api_util.check_array_leaves(tuple(primals), "primals", "jet")
    for i, (x, terms) in enumerate(zip(primals, series, strict=True)):
        for path, leaf in tree_util.tree_flatten_with_path(x)[0]:
            if not _inexact(jaxutil.typeof(leaf)):
                raise TypeError(
                    f"jet: primals[{i}]{tree_util.keystr(path)} has dtype "
                    f"{api_util.dtype_name(jaxutil.typeof(leaf).dtype)}; Taylor series need "
                    f"floating inputs. Close over integer values instead (functools.partial).")
        for k, term in enumerate(terms):
            api_util.check_same_structure(tree_util.tree_structure(x), tree_util.tree_structure(term),
                                          f"primals[{i}]", f"series[{i}][{k}]", "jet")
            for (path, leaf), t in zip(tree_util.tree_flatten_with_path(x)[0],
                                       tree_util.tree_leaves(term), strict=True):
                where = f"{tree_util.keystr(path)}"
                api_util.check_tangent(leaf, t, f"series[{i}][{k}]{where}", "jet",
                                       f"primals[{i}]{where}")
    return orders.pop() if orders else 0
