"""Rules for equations that hold jaxprs: jit, custom_jvp_call, custom_vjp_call."""

from __future__ import annotations

from collections.abc import Sequence

from fungrad._src import jaxutil, linearize, rules, transpose
from fungrad._src.jaxutil import ClosedJaxpr, JaxprEqn, Primitive, Var, prims
from fungrad._src.jvp import fill, jvp_closed, jvp_program, merge
from fungrad._src.rules import UndefinedPrimal, is_undefined
from fungrad._src.zeros import Zero, instantiate, is_zero

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
    residuals = [Var(v.aval) for v in split.known.outvars[len(split.known.outvars) - split.num_res:]]
    known_in = [i for i, u in enumerate(unknowns) if not u]
    known_out = [i for i, u in enumerate(split.out_unknowns) if not u]
    staged_in = [i for i, u in enumerate(unknowns) if u]
    staged_out = [i for i, u in enumerate(split.out_unknowns) if u]
    known_eqn = jaxutil.new_eqn(
        [eqn.invars[i] for i in known_in],
        [*(eqn.outvars[i] for i in known_out), *residuals], prims.jit_p,
        jaxutil.jit_params(eqn.params, ClosedJaxpr(split.known, closed.consts),
                           known_in, [*known_out, *[None] * split.num_res]), eqn)
    staged_eqn = jaxutil.new_eqn(
        [*residuals, *(eqn.invars[i] for i in staged_in)],
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
    outs = jaxutil.eval_jaxpr(jaxpr, consts, *args, *nz_dots)
    n_out = len(out_zeros)
    zeros = [Zero.like(x) for x in outs[:n_out]]
    return outs[:n_out], fill([not z for z in out_zeros], outs[n_out:], zeros)


rules.jvp_rules[prims.custom_jvp_call_p] = _custom_jvp_call_jvp


# --- custom_vjp: fwd now, bwd when transposed -----------------------------------------

def _custom_vjp_jvp_error() -> TypeError:
    return TypeError("can't apply forward-mode autodiff (jvp) to a custom_vjp function.")


def _raise_custom_vjp_jvp_error(*args, **params):
    del args, params
    raise _custom_vjp_jvp_error()


custom_lin_p = Primitive("fungrad_custom_lin")
"""The tangent map of a custom_vjp function: known only through its transpose (the bwd)."""
custom_lin_p.multiple_results = True
custom_lin_p.def_abstract_eval(lambda *args, out_avals, **params: list(out_avals))
custom_lin_p.def_impl(_raise_custom_vjp_jvp_error)
jaxutil.register_failing_lowering(custom_lin_p, _custom_vjp_jvp_error)


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
rules.transpose_rules[custom_lin_p] = _custom_lin_transpose
