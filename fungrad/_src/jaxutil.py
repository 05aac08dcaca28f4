"""The one module that touches jax internals; version differences live here."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax._src import ad_util, core, source_info_util
from jax._src.interpreters import batching, mlir
from jax._src.sharding_impls import UNSPECIFIED
from jax._src.util import weakref_lru_cache as _weakref_lru_cache
from jax.extend.core import (
    ClosedJaxpr,
    DebugInfo,
    Jaxpr,
    JaxprEqn,
    Literal,
    Primitive,
    Var,
    new_jaxpr_eqn,
)
from jax.extend.core import primitives as prims

__all__ = [
    "ClosedJaxpr",
    "Jaxpr",
    "JaxprEqn",
    "Literal",
    "Primitive",
    "Var",
    "bind_eqn",
    "float0",
    "is_tracer",
    "jit_params",
    "new_jaxpr",
    "new_eqn",
    "prims",
    "source_line",
    "trace_to_jaxpr",
    "typeof",
]

float0 = jax.dtypes.float0
typeof = jax.typeof


def is_tracer(x: Any) -> bool:
    return isinstance(x, jax.core.Tracer)


def bind_eqn(eqn: JaxprEqn, invals: Sequence[Any]) -> list[Any]:
    """Runs one equation on values (concrete or traced); always returns a list."""
    params = eqn.primitive.get_bind_params(eqn.params)
    with source_info_util.user_context(eqn.source_info.traceback), eqn.ctx.manager:
        out = eqn.primitive.bind(*invals, **params)
    return list(out) if eqn.primitive.multiple_results else [out]


def new_eqn(invars, outvars, primitive: Primitive, params: dict, like: JaxprEqn) -> JaxprEqn:
    """A new equation carrying the source information and context of `like`."""
    return new_jaxpr_eqn(invars, outvars, primitive, params, like.effects,
                         like.source_info, like.ctx)


def source_line(eqn: JaxprEqn) -> str:
    """The user's source line that produced `eqn`, or '' when jax recorded none."""
    return source_info_util.summarize(eqn.source_info)


def trace_to_jaxpr(fun: Callable, avals: Sequence[Any]) -> ClosedJaxpr:
    """Traces `fun(*flat_args) -> flat_outs` at the given avals to a closed jaxpr."""
    specs = [jax.ShapeDtypeStruct(a.shape, a.dtype, weak_type=a.weak_type) for a in avals]
    return jax.make_jaxpr(fun)(*specs)


def zeros_like_aval(aval) -> Any:
    if aval.dtype == float0:
        return np.zeros(aval.shape, float0)
    return jax.lax.full(aval.shape, 0, aval.dtype)


def jit_params(params: dict, closed: ClosedJaxpr, in_like: Sequence[int | None],
               out_like: Sequence[int | None]) -> dict:
    """Params of a `jit` equation on a new body, mirroring the old per-argument params.

    `in_like[i]` is the old input whose sharding and layout new input `i` keeps (None
    for a new input such as a residual); likewise `out_like` for the outputs.
    """
    def pick(old: tuple, like: Sequence[int | None], default: Any) -> tuple:
        return tuple(default if i is None else old[i] for i in like)

    return dict(
        params,
        jaxpr=closed,
        in_shardings=pick(params["in_shardings"], in_like, UNSPECIFIED),
        in_layouts=pick(params["in_layouts"], in_like, None),
        out_shardings=pick(params["out_shardings"], out_like, UNSPECIFIED),
        out_layouts=pick(params["out_layouts"], out_like, None),
        donated_invars=(False,) * len(in_like),
    )


def new_jaxpr(constvars: Sequence[Var], invars: Sequence[Var], outvars: Sequence[Any],
              eqns: Sequence[JaxprEqn]) -> Jaxpr:
    """A jaxpr over existing variables and equations, with the effects they carry."""
    effects = core.join_effects(*(eqn.effects for eqn in eqns))
    debug = DebugInfo("fungrad", "<fungrad>", None, None)
    return Jaxpr(constvars, invars, outvars, eqns, effects, debug)


def eval_jaxpr(jaxpr: Jaxpr, consts: Sequence[Any], *args: Any) -> list[Any]:
    """Runs `jaxpr` by binding each equation on the current trace."""
    env: dict[Any, Any] = {}

    def read(v):
        return v.val if type(v) is Literal else env[v]

    for v, x in zip([*jaxpr.constvars, *jaxpr.invars], [*consts, *args], strict=True):
        env[v] = x
    for eqn in jaxpr.eqns:
        for v, x in zip(eqn.outvars, bind_eqn(eqn, [read(v) for v in eqn.invars]), strict=True):
            env[v] = x
    return [read(v) for v in jaxpr.outvars]


def consts_as_invars(closed: ClosedJaxpr) -> tuple[Jaxpr, list[Any]]:
    """The open jaxpr taking `closed`'s constants as leading inputs, and those constants."""
    jaxpr = closed.jaxpr
    return (new_jaxpr([], [*jaxpr.constvars, *jaxpr.invars], jaxpr.outvars, jaxpr.eqns),
            list(closed.consts))


weak_cache = _weakref_lru_cache
"""An LRU cache whose first argument (a jaxpr) is held weakly."""


# --- custom_jvp / custom_vjp: how jax stores the user's rules in an equation ----------

def custom_jvp_rule(jvp_jaxpr_fun: Any, in_zeros: Sequence[bool]) -> tuple[Jaxpr, list, list[bool]]:
    """The user's JVP rule as a jaxpr `(primals, nonzero tangents) -> (outs, nonzero out tangents)`."""
    jaxpr, consts, out_zeros = jvp_jaxpr_fun.call_wrapped(*in_zeros)
    return jaxpr, list(consts), list(out_zeros)


def custom_vjp_fwd(fwd_jaxpr_thunk: Any, out_trees: Callable,
                   in_nonzeros: Sequence[bool]) -> tuple[Jaxpr, list, int, list[int | None]]:
    """The user's fwd as a jaxpr `primals -> (new residuals, outs)`.

    Also returns the number of residuals in all and, per residual, the index of the
    input it simply forwards (those are not among the jaxpr's outputs), or None.
    """
    fwd, consts = fwd_jaxpr_thunk.call_wrapped(*in_nonzeros)
    _, res_tree, input_fwds = out_trees()
    return fwd, list(consts), res_tree.num_leaves, list(input_fwds)


def call_custom_bwd(bwd: Any, res: Sequence[Any], cts: Sequence[Any]) -> list[Any]:
    """Runs the user's bwd; cotangents that it reports as zero come back as None."""
    cts_in = bwd.call_wrapped(*res, *cts)
    return [None if x is None or isinstance(x, (ad_util.Zero, ad_util.SymbolicZero)) else x
            for x in cts_in]


def symbolic_zero_for_user(aval: Any) -> Any:
    """The object a `symbolic_zeros=True` custom rule expects in place of a zero tangent."""
    return ad_util.SymbolicZero(aval)


def custom_rules_close_over_inputs(jaxpr: Jaxpr) -> bool:
    """Whether a custom_jvp/custom_vjp function in `jaxpr` closes over traced values.

    jax hands the user's rule to us as a thunk that traces it on demand; a value the
    rule closes over that was traced with the function itself is then out of scope.
    """
    for eqn in jaxpr.eqns:
        if eqn.primitive in (prims.custom_jvp_call_p, prims.custom_vjp_call_p):
            if eqn.params["num_consts"]:
                return True
        for sub in _sub_jaxprs(eqn.params):
            if custom_rules_close_over_inputs(sub):
                return True
    return False


def _sub_jaxprs(params: dict) -> list[Jaxpr]:
    found = []
    for value in params.values():
        for item in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(item, ClosedJaxpr):
                found.append(item.jaxpr)
            elif isinstance(item, Jaxpr):
                found.append(item)
    return found


def register_failing_lowering(prim: Primitive, error: Callable[..., Any]) -> None:
    """Makes compiling or batching `prim` raise `error()`; for primitives that must be
    transposed away."""
    def lowering(ctx, *args, **params):
        del ctx, args, params
        raise error()

    def batching_rule(args, dims, **params):
        del args, dims, params
        raise error()

    mlir.register_lowering(prim, lowering)
    batching.primitive_batchers[prim] = batching_rule


def is_missing_lowering(err: NotImplementedError) -> bool:
    """Whether `err` says a primitive cannot be compiled (it has no MLIR lowering)."""
    return "MLIR translation rule for primitive" in str(err)


class ByIdentity:
    """An equation parameter compared and hashed by identity (jax requires hashable params;
    a user's bwd with nondiff_argnums closes over values that need not be)."""

    __slots__ = ("value",)

    def __init__(self, value: Any):
        self.value = value

    def __repr__(self) -> str:
        return f"ByIdentity({self.value!r})"
