"""Rules for equations that hold jaxprs or user functions: jit, closed_call,
custom_jvp_call, custom_vjp_call, composite, custom_vmap_call, linear_call."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax import lax, tree_util

from fungrad._src import jaxutil, linearize, rules, transpose
from fungrad._src.jaxutil import ClosedJaxpr, JaxprEqn, Literal, Primitive, Var, prims
from fungrad._src.jvp import fill, fixed_point, jvp_closed, jvp_program, merge, partition
from fungrad._src.rules import UndefinedPrimal, is_undefined
from fungrad._src.zeros import Zero, instantiate, is_zero

_internal = jaxutil.internal_prims

# --- jit ------------------------------------------------------------------------------

def _jit_jvp(primals, tangents, *, jaxpr, **params):
    nonzeros = tuple(not is_zero(t) for t in tangents)
    body, out_nonzeros = jvp_program(jaxpr, nonzeros)
    n_in, n_out = len(primals), len(jaxpr.out_avals)
    in_like = [*range(n_in), *(i for i, nz in enumerate(nonzeros) if nz)]
    out_like = [*range(n_out), *(i for i, nz in enumerate(out_nonzeros) if nz)]
    outs = prims.jit_p.bind(
        *primals, *(t for t in tangents if not is_zero(t)),
        **jaxutil.jit_params(params, body, in_like, out_like))
    zeros = [Zero(a.to_tangent_aval()) for a in jaxpr.out_avals]
    return outs[:n_out], fill(out_nonzeros, outs[n_out:], zeros)


def _jit_partial_eval(eqn: JaxprEqn, unknowns: Sequence[bool]):
    closed: ClosedJaxpr = eqn.params["jaxpr"]
    split = linearize.partial_eval(closed.jaxpr, unknowns)
    known_in = [i for i, u in enumerate(unknowns) if not u]
    known_out = [i for i, u in enumerate(split.out_unknowns) if not u]
    staged_in = [i for i, u in enumerate(unknowns) if u]
    staged_out = [i for i, u in enumerate(split.out_unknowns) if u]
    known_outs = split.known.outvars[:len(known_out)]
    # A residual that is an input of the call, or one of its known outputs, is passed to the
    # staged call from outside rather than returned again (jax keeps it once, too).
    outside: dict[Any, Any] = {
        **{o: eqn.outvars[i] for o, i in zip(known_outs, known_out, strict=True)
           if type(o) is not Literal and type(eqn.outvars[i]) is Var},
        **{v: eqn.invars[i] for v, i in zip(split.known.invars, known_in, strict=True)}}
    res = split.known.outvars[len(known_out):]  # residuals are variables, never literals
    returned = [r for r in res if r not in outside]
    new_vars: dict[Any, Var] = {r: Var(r.aval) for r in returned}
    res_atoms = [outside[r] if r in outside else new_vars[r] for r in res]
    known_body = jaxutil.new_jaxpr(split.known.constvars, split.known.invars,
                                   [*known_outs, *returned], split.known.eqns)
    known_eqn = jaxutil.new_eqn(
        [eqn.invars[i] for i in known_in],
        [*(eqn.outvars[i] for i in known_out), *new_vars.values()], prims.jit_p,
        jaxutil.jit_params(eqn.params, ClosedJaxpr(known_body, closed.consts),
                           known_in, [*known_out, *[None] * len(returned)]), eqn)
    staged_eqn = jaxutil.new_eqn(
        [*res_atoms, *(eqn.invars[i] for i in staged_in)],
        [eqn.outvars[i] for i in staged_out], prims.jit_p,
        jaxutil.jit_params(eqn.params, ClosedJaxpr(split.staged, ()),
                           [*[None] * split.num_res, *staged_in], staged_out), eqn)
    return [known_eqn], [staged_eqn], split.out_unknowns


@jaxutil.weak_cache
def transpose_of_closed(closed: ClosedJaxpr, undefined: tuple[bool, ...],
                         ct_nonzeros: tuple[bool, ...]) -> ClosedJaxpr:
    """`closed` transposed: (known inputs, nonzero cts) -> cts of the linear inputs."""
    jaxpr, consts = jaxutil.consts_as_invars(closed)
    n_known = undefined.count(False)

    def fun(*args):
        known, nz_cts = args[:n_known], args[n_known:]
        linear = [UndefinedPrimal(a) for a, u in zip(closed.in_avals, undefined, strict=False) if u]
        cts = fill(ct_nonzeros, nz_cts, [Zero(a.to_tangent_aval()) for a in closed.out_avals])
        cts_in = transpose.backward_pass(jaxpr, [*consts, *merge(undefined, linear, known)], cts)
        return [instantiate(ct) for ct, u in zip(cts_in[len(consts):], undefined, strict=False) if u]

    known_avals = [a for a, u in zip(closed.in_avals, undefined, strict=False) if not u]
    ct_avals = [a.to_tangent_aval() for a, nz in zip(closed.out_avals, ct_nonzeros, strict=False) if nz]
    return jaxutil.trace_to_jaxpr(fun, [*known_avals, *ct_avals])


def _jit_transpose(cts, *args, jaxpr, **params):
    undefined = tuple(is_undefined(x) for x in args)
    ct_nonzeros = tuple(not is_zero(ct) for ct in cts)
    body = transpose_of_closed(jaxpr, undefined, ct_nonzeros)
    known_in = [i for i, u in enumerate(undefined) if not u]
    linear_in = [i for i, u in enumerate(undefined) if u]
    # As jax: a cotangent keeps the sharding of its output, or of its input (for the results).
    ct_in = [i for i, nz in enumerate(ct_nonzeros) if nz]
    cts_in = prims.jit_p.bind(
        *(x for x in args if not is_undefined(x)), *(ct for ct in cts if not is_zero(ct)),
        **jaxutil.jit_transpose_params(params, body, known_in, ct_in, linear_in))
    return merge(undefined, cts_in, [None] * len(known_in))


def _closed_call_jvp(primals, tangents, *, call_jaxpr, **params):
    del params
    return jvp_closed(call_jaxpr, primals, tangents)


rules.jvp_rules[prims.jit_p] = _jit_jvp
rules.jvp_rules[prims.closed_call_p] = _closed_call_jvp
rules.refuse(prims.call_p, "fungrad cannot differentiate the legacy 'call' primitive, which "
                           "this jax no longer stages (jit and closed_call replaced it). Call "
                           "the function directly, or through jax.jit.")
rules.refuse(prims.custom_lin_p, "custom_lin only appears inside jax's own linearized "
                                 "programs; differentiate the original function with fungrad "
                                 "instead of a program jax's AD produced.")
rules.partial_eval_rules[prims.jit_p] = _jit_partial_eval
rules.transpose_rules[prims.jit_p] = _jit_transpose


# --- custom_jvp: the user's rule is the JVP ------------------------------------------

def _custom_jvp_call_jvp(primals, tangents, *, call_jaxpr, jvp_jaxpr_fun, num_consts,
                         symbolic_zeros):
    del call_jaxpr
    # Closed-over constants have no tangent in a custom rule, as in jax.
    args, arg_dots = primals[num_consts:], tangents[num_consts:]
    if symbolic_zeros:
        in_zeros = [is_zero(t) for t in arg_dots]
        nz_dots = [t for t in arg_dots if not is_zero(t)]
    else:
        in_zeros = [False] * len(arg_dots)
        nz_dots = [instantiate(t) for t in arg_dots]
    jaxpr, consts, out_zeros = jaxutil.custom_jvp_rule(jvp_jaxpr_fun, in_zeros)
    # The rule was traced inside fungrad: its equations carry the user's line of the call.
    outs = jaxutil.eval_jaxpr_at_current_line(jaxpr, consts, *args, *nz_dots)
    n_out = len(out_zeros)
    zeros = [Zero.like(x) for x in outs[:n_out]]
    return outs[:n_out], fill([not z for z in out_zeros], outs[n_out:], zeros)


def _transpose_inlined(closed: ClosedJaxpr, cts: Sequence[Any], args: Sequence[Any]) -> list[Any]:
    """The transpose of an equation running `closed` on `args`: that of `closed`, inlined."""
    undefined = tuple(is_undefined(x) for x in args)
    body = transpose_of_closed(closed, undefined, tuple(not is_zero(ct) for ct in cts))
    cts_in = jaxutil.eval_jaxpr(body.jaxpr, body.consts, *(x for x in args if not is_undefined(x)),
                                *(ct for ct in cts if not is_zero(ct)))
    return merge(undefined, cts_in, [None] * undefined.count(False))


def _custom_call_transpose(cts, *args, call_jaxpr, **params):
    # A custom_jvp / custom_vjp call in a linear program: a bwd (or a linear function) that
    # calls it on values linear in the cotangent. The transpose of the linear map it
    # computes is the transpose of its own program, whatever its rules say: they describe a
    # derivative (optax.scale_gradient's program is the identity; its rule scales). A call
    # that is not linear in those values fails here, in that program's transpose.
    del params
    return _transpose_inlined(call_jaxpr, cts, args)


rules.jvp_rules[prims.custom_jvp_call_p] = _custom_jvp_call_jvp
rules.transpose_rules[prims.custom_jvp_call_p] = _custom_call_transpose


# --- custom_vjp: fwd now, bwd when transposed, or transposed for forward mode ----------
#
# bwd maps an output cotangent u to J^T u at fwd's residuals, linearly in u; transposing
# it gives J v: forward mode (jvp, linearize, jacfwd, fwd-over-fwd) that jax refuses.
#
# Never a silently wrong tangent: a bwd is transposed only if it is structurally linear in
# u (`_first_nonlinear` names the first op that is not, looking into jits, loops and the
# custom functions it calls; the transpose itself fails on anything else), and only if
# every cotangent it returns is either linear in u or a literal zero (`_constant_output`:
# flax's fp8 ops return a state update as a "gradient", bwd(0) != 0).
#
# A custom_jvp / custom_vjp function that a bwd calls on u is transposed as its own
# program (`_custom_call_transpose`), not by its rules: the transpose of a linear map is a
# property of what it computes, and rules describe a derivative that may be deliberately
# untrue (optax.scale_gradient is the identity whose rule scales; inside a bwd it passes u
# on unscaled). Its rules still count when the bwd is differentiated (forward over
# reverse). jax.experimental.ode.odeint's bwd integrates the adjoint ODE with odeint: the
# solver's adaptive step depends on the norm of the adjoint state, so it is linear in u only
# to the solver's tolerance (and its state mixes u with the residual trajectory), and it is
# refused with that reason rather than accepted with an error no check could bound.

custom_lin_p = Primitive("fungrad_custom_lin")
"""The tangent map of a custom_vjp function, given by its bwd: `(residuals, nonzero input
tangents) -> output tangents`. Reverse mode calls bwd (its transpose rule); forward mode
runs bwd's transpose (its impl, lowering and batching rule)."""
custom_lin_p.multiple_results = True
custom_lin_p.def_abstract_eval(lambda *args, out_avals, **params: list(out_avals))


def _bwd_jaxpr(bwd: Any, res_avals: tuple, out_avals: tuple, in_nonzeros: tuple,
               dot_avals: tuple) -> ClosedJaxpr:
    """The user's bwd as a jaxpr: (residuals, output cotangents) -> the cotangents of the
    inputs with a nonzero tangent (zeros where bwd returns None)."""
    def fun(*args):
        res, cts = args[:len(res_avals)], list(args[len(res_avals):])
        cts_in = [ct for ct, nz in zip(jaxutil.call_custom_bwd(bwd, res, cts), in_nonzeros,
                                       strict=True) if nz]
        return [jaxutil.zeros_like_aval(a) if ct is None else ct
                for ct, a in zip(cts_in, dot_avals, strict=True)]

    return jaxutil.trace_to_jaxpr(fun, [*res_avals, *out_avals])


def _custom_lin_forward(*args, num_res, bwd, out_avals, symbolic_zeros, in_nonzeros):
    """J v at the residuals, from bwd alone: bwd is u -> J^T u, so J v = (bwd^T)(v)."""
    del symbolic_zeros  # bwd's cotangents are all given here
    res, dots = args[:num_res], args[num_res:]
    closed = _bwd_jaxpr(bwd.value, tuple(map(jaxutil.typeof, res)), tuple(out_avals),
                        in_nonzeros, tuple(map(jaxutil.typeof, dots)))
    undefined = (*[False] * num_res, *[True] * len(out_avals))
    nonlinear = _nonlinear_use(closed.jaxpr, num_res)
    if nonlinear is not None:
        prim, where = nonlinear
        where = f" at {where}" if where and _FUNGRAD_SRC not in where else ""
        raise _custom_vjp_forward_error(
            bwd.value, f"is not linear in the cotangent: it applies {prim} to it{where}"
                       f"{_NESTED_NOTE if ' inside the custom_' in prim else ''}")
    constant = _constant_output(closed.jaxpr, num_res)
    if constant is not None:
        arg = [i for i, nz in enumerate(in_nonzeros) if nz][constant]
        raise _custom_vjp_forward_error(
            bwd.value, f"is not linear in the cotangent: the cotangent it returns for input "
                       f"{arg} (counting the leaves of the differentiable arguments) does not "
                       "depend on the cotangent yet is not zero, so it is not zero when the "
                       "cotangent is (a state update passed as a gradient)")
    try:
        transposed = transpose_of_closed(closed, undefined, (True,) * len(dots))
    except Exception as err:  # a cotangent times a cotangent; a construct with no transpose
        raise _custom_vjp_forward_error(bwd.value, f"could not be transposed: {err}") from err
    return jaxutil.eval_jaxpr(transposed.jaxpr, transposed.consts, *res, *dots)


_FUNGRAD_SRC = os.path.join("fungrad", "_src")
_NESTED_NOTE = (
    " (a custom_vjp or custom_jvp function that a bwd calls is transposed as its own "
    "program, which must then be linear in the cotangent too: its rules give a derivative, "
    "not the transpose of what it computes. An adaptive solver such as "
    "jax.experimental.ode.odeint is linear in its initial state only to its tolerance)")


def _nonlinear_use(jaxpr: Any, num_res: int) -> tuple[str, str] | None:
    """The first primitive with no transpose rule (not linear) applied to a value that
    depends on the cotangent inputs (those after the `num_res` residuals), and the user's
    line that applies it."""
    return _first_nonlinear(jaxpr, [i >= num_res for i in range(len(jaxpr.invars))])


def _constant_output(jaxpr: Any, num_res: int) -> int | None:
    """The first output of a bwd that does not depend on the cotangents (the inputs after
    the `num_res` residuals) and is not a zero made from a literal: bwd(0) != 0."""
    linear = _depends(jaxpr, [i >= num_res for i in range(len(jaxpr.invars))])
    producers = {v: eqn for eqn in jaxpr.eqns for v in eqn.outvars}
    for k, (out, lin) in enumerate(zip(jaxpr.outvars, linear, strict=True)):
        if not lin and not _is_zero_fill(out, producers):
            return k
    return None


# Primitives that keep a zero a zero, on their first operand (zeros_like's broadcast...).
_ZERO_KEEPING = ("broadcast_in_dim", "convert_element_type", "reshape", "pvary", "pcast", "copy",
                 "copy_p", "squeeze", "expand_dims")


def _is_zero_fill(var: Any, producers: dict) -> bool:
    """Whether `var` is a zero built from a literal 0 (`jnp.zeros_like`, `lax.full(.., 0)`)."""
    while type(var) is not Literal:
        eqn = producers.get(var)
        if eqn is None or eqn.primitive.name not in _ZERO_KEEPING:
            return eqn is not None and eqn.primitive is prims.mul_p and any(
                type(v) is Literal and not np.any(v.val) for v in eqn.invars)
        var = eqn.invars[0]
    return not np.any(var.val)


def _first_nonlinear(jaxpr: Any, linear_in: Sequence[bool]) -> tuple[str, str] | None:
    linear = {v for v, lin in zip(jaxpr.invars, linear_in, strict=True) if lin}
    for eqn in jaxpr.eqns:
        flags = [type(v) is not Literal and v in linear for v in eqn.invars]
        if not any(flags):
            continue
        found = _nonlinear_in(eqn, flags)
        if found is not None:
            return found
        linear.update(eqn.outvars)
    return None


def _nonlinear_in(eqn: JaxprEqn, flags: list[bool]) -> tuple[str, str] | None:
    """Where `eqn` is not linear in its inputs marked by `flags`: looks inside the programs
    it runs (jnp's functions are jitted; loops; custom functions), or None."""
    line = jaxutil.source_line(eqn)
    inner_call = _inner_program(eqn, flags)
    if inner_call is None:
        if eqn.primitive not in rules.transpose_rules or _product_of_linear(eqn, flags):
            return f"`{eqn.primitive}`", line
        return None
    if isinstance(inner_call, str):
        return inner_call, line
    inner = _first_nonlinear(*inner_call)
    return None if inner is None else (_inside(eqn, inner[0]), inner[1] or line)


def _inner_program(eqn: JaxprEqn, flags: list[bool]) -> tuple[Any, list[bool]] | str | None:
    """The program `eqn` runs and which of its inputs are linear, for the equations that
    hold one; a description when the loop itself is not linear."""
    params = eqn.params
    if eqn.primitive is prims.scan_p:
        n_consts, n_carry = params["num_consts"], params["num_carry"]
        consts, carry, xs = partition(flags, n_consts, n_carry)
        carry = _carry_flags(params["jaxpr"].jaxpr, consts, carry, xs)
        return params["jaxpr"].jaxpr, [*consts, *carry, *xs]
    if eqn.primitive is prims.while_p:
        n_cond, n_body = params["cond_nconsts"], params["body_nconsts"]
        cond, body, carry = partition(flags, n_cond, n_body)
        carry = _carry_flags(params["body_jaxpr"].jaxpr, body, carry, [])
        if any(_depends(params["cond_jaxpr"].jaxpr, [*cond, *carry])):
            return "`while` (a loop whose condition depends on it)"
        return params["body_jaxpr"].jaxpr, [*body, *carry]
    called = _called_program(eqn)
    return None if called is None else (called.jaxpr, flags)


def _carry_flags(body: Any, before: list[bool], carry: list[bool], after: list[bool]) -> list[bool]:
    """Which carries of a loop are linear: those linear on entry, and those that come to
    depend on a linear value in some iteration (a fixed point)."""
    return fixed_point(lambda flags: _depends(body, [*before, *flags, *after])[:len(flags)], carry)


def _product_of_linear(eqn: JaxprEqn, flags: Sequence[bool]) -> bool:
    """A product of two linear values, or a division by one: transposable primitives whose
    use here is not linear (the transpose would fail; this names the line)."""
    if eqn.primitive in (prims.mul_p, prims.dot_general_p, prims.conv_general_dilated_p):
        return all(flags)
    return eqn.primitive is prims.div_p and flags[1]


def _called_program(eqn: JaxprEqn) -> ClosedJaxpr | None:
    """The program an equation runs that the transpose of a linear program inlines: a jit's
    body, or the primal program of a custom_jvp / custom_vjp function."""
    if eqn.primitive is prims.jit_p:
        return eqn.params["jaxpr"]
    if eqn.primitive in (prims.custom_vjp_call_p, prims.custom_jvp_call_p):
        return eqn.params["call_jaxpr"]
    return None


def _inside(eqn: JaxprEqn, what: str) -> str:
    """`what` (a primitive named in a message) qualified by the custom function running it."""
    if eqn.primitive not in (prims.custom_vjp_call_p, prims.custom_jvp_call_p):
        return what
    kind = "custom_vjp" if eqn.primitive is prims.custom_vjp_call_p else "custom_jvp"
    src = eqn.params["call_jaxpr"].jaxpr.debug_info.func_src_info
    name = src.split(" ")[0] if src else "<unknown>"
    return f"{what} inside the {kind} function `{name}`"


def _custom_vjp_forward_error(bwd: Any, why: str) -> TypeError:
    src = getattr(getattr(bwd, "debug_info", None), "func_src_info", None)
    return TypeError(
        "fungrad runs a custom_vjp function in forward mode (jvp, linearize, jacfwd, hessian) "
        "by transposing its bwd, which must be linear in the cotangent; this bwd"
        f"{f' ({src})' if src else ''} {why}. Give the function a custom_jvp rule for "
        "forward mode, or use reverse mode (grad, vjp, jacrev).")


def _custom_lin_jvp(primals, tangents, **params):
    # d(J(res) v) = J(res) dv + (dJ/dres . dres) v: the JVP of the forward evaluation.
    closed = jaxutil.trace_to_jaxpr(functools.partial(_custom_lin_forward, **params),
                                    [jaxutil.typeof(x) for x in primals])
    return jvp_closed(closed, primals, tangents)


jaxutil.register_impl_everywhere(custom_lin_p, _custom_lin_forward)
rules.jvp_rules[custom_lin_p] = _custom_lin_jvp


def _custom_vjp_call_jvp(primals, tangents, *, call_jaxpr, fwd_jaxpr_thunk, num_consts,
                         bwd, out_trees, symbolic_zeros):
    del call_jaxpr
    if any(not is_zero(t) for t in tangents[:num_consts]):
        raise TypeError(
            "fungrad cannot differentiate a custom_vjp function with respect to a value it "
            "closes over. Pass that value as an explicit argument of the custom_vjp "
            "function, or use jax.closure_convert.")
    args, arg_dots = primals[num_consts:], tangents[num_consts:]
    nonzeros = [not is_zero(t) for t in arg_dots]
    fwd, consts, num_res, input_fwds = jaxutil.custom_vjp_fwd(fwd_jaxpr_thunk, out_trees, nonzeros)
    res_and_outs = jaxutil.eval_jaxpr(fwd, consts, *args)
    n_new = sum(f is None for f in input_fwds)
    new_res, outs = iter(res_and_outs[:n_new]), res_and_outs[n_new:]
    res = [next(new_res) if f is None else primals[f] for f in input_fwds]
    assert len(res) == num_res
    out_dots = custom_lin_p.bind(
        *res, *(t for t in arg_dots if not is_zero(t)), num_res=num_res, bwd=jaxutil.ByIdentity(bwd),
        out_avals=tuple(jaxutil.typeof(x).to_tangent_aval() for x in outs),
        symbolic_zeros=symbolic_zeros, in_nonzeros=tuple(nonzeros))
    return outs, out_dots


def _custom_lin_transpose(cts, *args, num_res, bwd, out_avals, symbolic_zeros, in_nonzeros):
    del out_avals
    if symbolic_zeros:
        cts = [jaxutil.symbolic_zero_for_user(ct.aval) if is_zero(ct) else ct for ct in cts]
    else:
        cts = [instantiate(ct) for ct in cts]
    cts_in = jaxutil.call_custom_bwd(bwd.value, args[:num_res], cts)
    return [None] * num_res + [ct for ct, nz in zip(cts_in, in_nonzeros, strict=True) if nz]


rules.jvp_rules[prims.custom_vjp_call_p] = _custom_vjp_call_jvp
rules.transpose_rules[prims.custom_vjp_call_p] = _custom_call_transpose
rules.transpose_rules[custom_lin_p] = _custom_lin_transpose


# --- composite: a named op that the compiler may replace; its decomposition defines it ---

def _composite_jvp(primals, tangents, *, jaxpr, name, attributes, version):
    # d composite(x) = d decomposition(x): inlined, as for closed_call. (jax itself raises
    # here; the decomposition is the op's meaning, so its derivative is the op's.)
    del name, attributes, version
    return jvp_closed(jaxpr, primals, tangents)


if "composite_p" in _internal:
    rules.jvp_rules[_internal["composite_p"]] = _composite_jvp


# --- linear_call: a linear function with its transpose given by the user ------------------

def _linear_call_jvp(primals, tangents, *, callee, transpose_thunk, num_callee_consts,
                     num_res):
    # linear in its linear inputs: d linear_call(r, x) = linear_call(r, x_dot), for fixed r.
    params = dict(callee=callee, transpose_thunk=transpose_thunk,
                  num_callee_consts=num_callee_consts, num_res=num_res)
    n_fixed = num_callee_consts + num_res
    if any(not is_zero(t) for t in tangents[:n_fixed]):
        raise TypeError(
            "fungrad cannot differentiate jax.custom_derivatives.linear_call with respect to "
            "its residual arguments (or values its function closes over), as jax cannot: "
            "only the linear arguments may carry tangents. Pass values to differentiate as "
            "linear arguments, or compute them outside the linear_call.")
    outs = linear_call_p.bind(*primals, **params)
    if all(is_zero(t) for t in tangents[n_fixed:]):
        return outs, [Zero.like(x) for x in outs]
    out_dots = linear_call_p.bind(*primals[:n_fixed], *map(instantiate, tangents[n_fixed:]),
                                  **params)
    return outs, out_dots


def _linear_call_transpose(cts, *args, callee, transpose_thunk, num_callee_consts, num_res):
    # The user's transpose, called as a linear_call whose own transpose is the callee.
    t_jaxpr, t_consts = transpose_thunk()
    f_consts, res = args[:num_callee_consts], args[num_callee_consts:num_callee_consts + num_res]
    assert not any(is_undefined(x) for x in (*f_consts, *res)), "residuals must be known"

    def swapped_thunk():
        return callee, f_consts

    cts = [instantiate(ct) for ct in cts]
    cts_in = linear_call_p.bind(*t_consts, *res, *cts, callee=t_jaxpr,
                                transpose_thunk=swapped_thunk,
                                num_callee_consts=len(t_consts), num_res=num_res)
    linear = args[num_callee_consts + num_res:]
    return [*[None] * (num_callee_consts + num_res),
            *(ct if is_undefined(x) else None for x, ct in zip(linear, cts_in, strict=True))]


if "linear_call_p" in _internal:
    linear_call_p = _internal["linear_call_p"]
    rules.jvp_rules[linear_call_p] = _linear_call_jvp
    rules.transpose_rules[linear_call_p] = _linear_call_transpose


# --- custom_vmap: a function with its own batching rule ----------------------------------
#
# As in jax, the JVP is again a custom_vmap call: its body is the JVP of the body, and its
# batching rule is the JVP of the user's rule, so `vmap` of a JVP still batches with the
# user's rule. Linearizing splits such a call into a known and a staged call that batch
# by plain `jax.vmap` of their bodies (jax cannot linearize it at all): reverse mode
# differentiates the function itself, and `vmap` of a gradient works.

def _call_rule(rule: Callable, in_tree: Any, axis_size: int, flags: Sequence[bool],
               args: Sequence[Any]) -> tuple[list[Any], list[bool]]:
    """Calls a custom_vmap rule on flat arguments; returns its flat outputs and flags."""
    outs, out_batched = rule(axis_size, list(tree_util.tree_unflatten(in_tree, flags)),
                             *tree_util.tree_unflatten(in_tree, args))
    out_tree: Any = tree_util.tree_structure(outs)
    flags_tree: Any = tree_util.tree_structure(out_batched)
    if out_tree != flags_tree:
        raise ValueError(
            f"the custom_vmap rule {getattr(rule, '__name__', rule)} returned outputs and "
            f"batching flags of different structures: {out_tree} and {flags_tree}.")
    return tree_util.tree_leaves(outs), [bool(b) for b in tree_util.tree_leaves(out_batched)]


def _flat_tree(*sizes: int) -> Any:
    """The tree of a tuple of flat tuples of these sizes (one flat tuple: a single size)."""
    if len(sizes) == 1:
        return tree_util.tree_structure((0,) * sizes[0])
    return tree_util.tree_structure(tuple((0,) * n for n in sizes))


def _depends(jaxpr: Any, marked: Sequence[bool]) -> list[bool]:
    """Which outputs of `jaxpr` depend on the inputs marked."""
    seen = {v for v, m in zip(jaxpr.invars, marked, strict=True) if m}
    for eqn in jaxpr.eqns:
        if any(type(v) is not Literal and v in seen for v in eqn.invars):
            seen.update(eqn.outvars)
    return [type(v) is not Literal and v in seen for v in jaxpr.outvars]


class _VmapBody:
    """The batching rule of a call fungrad made: `jax.vmap` of its body; an output is
    batched when it depends on a batched input."""

    fixed: tuple[bool, ...] = ()

    def __init__(self, body: ClosedJaxpr):
        self.body = body

    def __call__(self, axis_size, in_batched, *args):
        def fun(*xs):
            return jaxutil.eval_jaxpr(self.body.jaxpr, self.body.consts, *xs)

        out_batched = tuple(_depends(self.body.jaxpr, in_batched))
        outs = jax.vmap(fun, in_axes=[0 if b else None for b in in_batched],
                        out_axes=[0 if b else None for b in out_batched],
                        axis_size=axis_size)(*args)
        return tuple(outs), out_batched


def _vmap_body_params(body: ClosedJaxpr) -> dict:
    return dict(call=body, rule=_VmapBody(body), in_tree=_flat_tree(len(body.in_avals)),
                out_tree=_flat_tree(len(body.out_avals)))


def _fixed_inputs(rule: Callable, in_tree: Any, num_in: int) -> tuple[bool, ...]:
    """Which inputs the rule must never see batched when they were not: the constants a
    jax custom_vmap function closes over (its inputs are `(constants, arguments)`)."""
    if isinstance(rule, (_JvpOfRule, _VmapBody)):
        return rule.fixed or (False,) * num_in
    children = in_tree.children()
    num_consts = children[0].num_leaves if len(children) == 2 else 0
    return (True,) * num_consts + (False,) * (num_in - num_consts)


class _JvpOfRule:
    """The batching rule of a custom_vmap call's JVP: the JVP of the call's own rule.

    Its inputs are `(primals, nonzero tangents)`. When some primals are batched, a primal
    that is not batched while its tangent is gets broadcast, so that the rule sees it
    batched (a closed-over constant cannot be: then the JVP body is batched by plain
    `jax.vmap` instead), and an unbatched tangent of a batched primal is broadcast too.
    """

    def __init__(self, rule: Callable, in_tree: Any, body: ClosedJaxpr,
                 nonzeros: Sequence[bool], out_nonzeros: Sequence[bool]):
        self.rule, self.in_tree, self.body = rule, in_tree, body
        self.nonzeros, self.out_nonzeros = tuple(nonzeros), tuple(out_nonzeros)
        self.inner_fixed = _fixed_inputs(rule, in_tree, len(nonzeros))
        self.fixed = (*self.inner_fixed,
                      *(f for f, nz in zip(self.inner_fixed, nonzeros, strict=True) if nz))

    def __call__(self, axis_size, in_batched, primals, nz_dots):
        ps_batched, nz_batched = in_batched
        if not any(ps_batched):
            return self._tangents_batched(axis_size, primals, nz_dots, nz_batched)
        dots_batched = fill(self.nonzeros, nz_batched, [False] * len(primals))
        flags = [p or t for p, t in zip(ps_batched, dots_batched, strict=True)]
        if any(f and fixed for f, fixed in zip(flags, self.inner_fixed, strict=True)):
            outs, out_batched = _VmapBody(self.body)(
                axis_size, [*ps_batched, *nz_batched], *primals, *nz_dots)
            return self._nest(outs), self._nest(out_batched)
        ps = [lax.broadcast(x, (axis_size,)) if f and not p else x
              for x, f, p in zip(primals, flags, ps_batched, strict=True)]
        dots = [Zero.like(x) if t is None else lax.broadcast(t, (axis_size,)) if f and not b
                else t for x, t, f, b in zip(ps, fill(self.nonzeros, nz_dots, [None] * len(ps)),
                                             flags, dots_batched, strict=True)]
        return self._jvp_of_rule(axis_size, flags, ps, dots)

    def _jvp_of_rule(self, axis_size, flags, primals, dots):
        """The JVP of the rule called with these batching flags, and its output flags."""
        out_batched: list[bool] = []

        def batched(*xs):
            outs, out_batched[:] = _call_rule(self.rule, self.in_tree, axis_size, flags, xs)
            return outs

        closed = jaxutil.trace_to_jaxpr(batched, [jaxutil.typeof(x) for x in primals])
        outs, out_dots = jvp_closed(closed, primals, dots)
        nz_out = [instantiate(t) for t, nz in zip(out_dots, self.out_nonzeros, strict=True) if nz]
        nz_out_batched = [b for b, nz in zip(out_batched, self.out_nonzeros, strict=True) if nz]
        return (tuple(outs), tuple(nz_out)), (tuple(out_batched), tuple(nz_out_batched))

    def _tangents_batched(self, axis_size, primals, nz_dots, nz_batched):
        """Only tangents batched: as in jax, the JVP of the rule called with nothing
        batched, mapped over the tangents; the primal outputs stay unbatched."""
        flags = [False] * len(primals)
        out_batched: list[Any] = []

        def one(*nz):
            dots = fill(self.nonzeros, nz, [Zero.like(x) for x in primals])
            outs, out_batched[:] = self._jvp_of_rule(axis_size, flags, primals, dots)
            return outs

        outs = jax.vmap(one, in_axes=[0 if b else None for b in nz_batched], out_axes=(None, 0),
                        axis_size=axis_size)(*nz_dots)
        return outs, (out_batched[0], (True,) * len(outs[1]))

    def _nest(self, flat: Sequence[Any]) -> tuple[tuple, tuple]:
        n_out = len(self.out_nonzeros)
        return tuple(flat[:n_out]), tuple(flat[n_out:])


if "custom_vmap_p" in _internal:
    custom_vmap_p = _internal["custom_vmap_p"]

    def _custom_vmap_jvp(primals, tangents, *, call, rule, in_tree, out_tree):
        # d call(x) = jvp(call)(x, x_dot), batched by the JVP of the rule.
        del out_tree
        nonzeros = tuple(not is_zero(t) for t in tangents)
        body, out_nonzeros = jvp_program(call, nonzeros)
        nz_dots = [t for t in tangents if not is_zero(t)]
        n_out = len(call.out_avals)
        outs = custom_vmap_p.bind(
            *primals, *nz_dots, call=body,
            rule=_JvpOfRule(rule, in_tree, body, nonzeros, out_nonzeros),
            in_tree=_flat_tree(len(primals), len(nz_dots)),
            out_tree=_flat_tree(n_out, out_nonzeros.count(True)))
        zeros = [Zero(a.to_tangent_aval()) for a in call.out_avals]
        return outs[:n_out], fill(out_nonzeros, outs[n_out:], zeros)

    def _custom_vmap_partial_eval(eqn: JaxprEqn, unknowns: Sequence[bool]):
        closed: ClosedJaxpr = eqn.params["call"]
        split = linearize.partial_eval(closed.jaxpr, unknowns)
        num_known_outs = len(split.known.outvars) - split.num_res
        residuals = [Var(v.aval) for v in split.known.outvars[num_known_outs:]]
        known_eqn = jaxutil.new_eqn(
            [x for x, u in zip(eqn.invars, unknowns, strict=True) if not u],
            [*(v for v, u in zip(eqn.outvars, split.out_unknowns, strict=True) if not u),
             *residuals], custom_vmap_p,
            _vmap_body_params(ClosedJaxpr(split.known, closed.consts)), eqn)
        if not any(split.out_unknowns):
            return [known_eqn], [], split.out_unknowns
        staged_eqn = jaxutil.new_eqn(
            [*residuals, *(x for x, u in zip(eqn.invars, unknowns, strict=True) if u)],
            [v for v, u in zip(eqn.outvars, split.out_unknowns, strict=True) if u],
            custom_vmap_p, _vmap_body_params(ClosedJaxpr(split.staged, ())), eqn)
        return [known_eqn], [staged_eqn], split.out_unknowns

    def _custom_vmap_transpose(cts, *args, call, rule, in_tree, out_tree):
        # Only staged calls (batched by plain vmap) are transposed: their body, inlined.
        del rule, in_tree, out_tree
        undefined = tuple(is_undefined(x) for x in args)
        body = transpose_of_closed(call, undefined, tuple(not is_zero(ct) for ct in cts))
        cts_in = jaxutil.eval_jaxpr(body.jaxpr, body.consts,
                                    *(x for x in args if not is_undefined(x)),
                                    *(ct for ct in cts if not is_zero(ct)))
        return merge(undefined, cts_in, [None] * undefined.count(False))

    rules.jvp_rules[custom_vmap_p] = _custom_vmap_jvp
    rules.partial_eval_rules[custom_vmap_p] = _custom_vmap_partial_eval
    rules.transpose_rules[custom_vmap_p] = _custom_vmap_transpose
