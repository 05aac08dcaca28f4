"""The rule tables, the registrars that fill them, and lookups with clear errors."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from fungrad._src import jaxutil
from fungrad._src.broadcasting import broadcast_to
from fungrad._src.jaxutil import JaxprEqn, Primitive
from fungrad._src.zeros import Zero, add_tangents, instantiate, is_zero

JvpRule = Callable[..., tuple[Any, Any]]
"""`(primals, tangents, **params) -> (out, out_dot)`; lists for multiple results."""
TransposeRule = Callable[..., Sequence[Any]]
"""`(ct, *args, **params) -> [ct_i or None]`; linear args come as `UndefinedPrimal`."""
PartialEvalRule = Callable[..., Any]
"""See `linearize.py`: splits one equation with unknown inputs into two."""

jvp_rules: dict[Primitive, JvpRule] = {}
transpose_rules: dict[Primitive, TransposeRule] = {}
partial_eval_rules: dict[Primitive, PartialEvalRule] = {}
zero_derivative: set[Primitive] = set()
"""Primitives whose outputs never carry a tangent (comparisons, integer ops, ...)."""
not_applicable: set[Primitive] = set()
"""Primitives with no derivative to speak of (tokens, effects): listed by the coverage report."""
forward_only: set[Primitive] = set()
"""Primitives with a JVP rule whose transpose rule only raises, as jax's does (while)."""
discharged: set[Primitive] = set()
"""State primitives (refs): discharged into plain values before any rule runs."""

RULES_HOME = "fungrad/_src/primitives/"


class UndefinedPrimal:
    """A linear input of an equation being transposed: only its aval is known."""

    __slots__ = ("aval",)

    def __init__(self, aval: Any):
        self.aval = aval

    def __repr__(self) -> str:
        return f"UndefinedPrimal({self.aval.str_short()})"


def is_undefined(x: Any) -> bool:
    return type(x) is UndefinedPrimal


def _out_zeros(prim: Primitive, ans: Any) -> Any:
    if prim.multiple_results:
        return [Zero.like(a) for a in ans]
    return Zero.like(ans)


def defjvp(prim: Primitive, *jvp_fns: Callable[..., Any] | None) -> None:
    """Per-argument JVP: `out_dot = sum_i jvp_fns[i](x_dot_i, *primals, **params)`.

    A `None` entry means the output does not depend on that argument.
    """
    def rule(primals, tangents, **params):
        ans = prim.bind(*primals, **params)
        out_dot = Zero.like(ans)
        for fn, t in zip(jvp_fns, tangents, strict=True):
            if fn is not None and not is_zero(t):
                out_dot = add_tangents(out_dot, broadcast_to(fn(t, *primals, **params), ans.shape))
        return ans, out_dot

    jvp_rules[prim] = rule


def defjvp2(prim: Primitive, *jvp_fns: Callable[..., Any] | None) -> None:
    """Like `defjvp`, but each function also receives the output: `fn(x_dot, ans, *primals)`."""
    def rule(primals, tangents, **params):
        ans = prim.bind(*primals, **params)
        out_dot = Zero.like(ans)
        for fn, t in zip(jvp_fns, tangents, strict=True):
            if fn is not None and not is_zero(t):
                out_dot = add_tangents(out_dot, broadcast_to(fn(t, ans, *primals, **params), ans.shape))
        return ans, out_dot

    jvp_rules[prim] = rule


def defjvp_zero(prim: Primitive) -> None:
    """The outputs of `prim` have zero derivative with respect to every input."""
    def rule(primals, tangents, **params):
        del tangents
        ans = prim.bind(*primals, **params)
        return ans, _out_zeros(prim, ans)

    jvp_rules[prim] = rule
    zero_derivative.add(prim)


def refuse(prim: Primitive, message: str) -> None:
    """`prim` has no derivative (n/a): differentiating through it raises `message`, which
    should say why and what to write instead."""
    def rule(primals, tangents, **params):
        del primals, tangents, params
        raise NotImplementedError(message)

    jvp_rules[prim] = rule
    not_applicable.add(prim)


def deflinear(prim: Primitive, transpose: TransposeRule) -> None:
    """`prim` is linear in all its inputs: its JVP is `prim` applied to the tangents."""
    def rule(primals, tangents, **params):
        ans = prim.bind(*primals, **params)
        if all(is_zero(t) for t in tangents):
            return ans, _out_zeros(prim, ans)
        return ans, prim.bind(*map(instantiate, tangents), **params)

    jvp_rules[prim] = rule
    transpose_rules[prim] = transpose


def defbilinear(prim: Primitive, lhs_transpose: Callable[..., Any],
                rhs_transpose: Callable[..., Any]) -> None:
    """`prim(x, y)` is linear in each argument: d prim = prim(x_dot, y) + prim(x, y_dot).

    `lhs_transpose(ct, x, y, **params)` gives the cotangent of `x` (an UndefinedPrimal)
    for a known `y`; `rhs_transpose` the same for `y`.
    """
    def rule(primals, tangents, **params):
        (x, y), (x_dot, y_dot) = primals, tangents
        ans = prim.bind(x, y, **params)
        out_dot = Zero.like(ans)
        if not is_zero(x_dot):
            out_dot = prim.bind(x_dot, y, **params)
        if not is_zero(y_dot):
            out_dot = add_tangents(out_dot, prim.bind(x, y_dot, **params))
        return ans, out_dot

    def transpose(ct, x, y, **params):
        assert is_undefined(x) != is_undefined(y), "bilinear transpose needs one known input"
        if is_undefined(x):
            return [lhs_transpose(ct, x, y, **params), None]
        return [None, rhs_transpose(ct, x, y, **params)]

    jvp_rules[prim] = rule
    transpose_rules[prim] = transpose


def _where(eqn: JaxprEqn) -> str:
    line = jaxutil.source_line(eqn)
    return f" (at {line})" if line else ""


def lookup_jvp(eqn: JaxprEqn) -> JvpRule:
    rule = jvp_rules.get(eqn.primitive)
    if rule is None:
        raise NotImplementedError(
            f"fungrad has no differentiation rule for primitive '{eqn.primitive}'"
            f"{_where(eqn)}. Rules live in {RULES_HOME}; register one with "
            f"fungrad.extend.defjvp (or assign fungrad.extend.jvp_rules[{eqn.primitive}_p]).")
    return rule


def lookup_transpose(eqn: JaxprEqn) -> TransposeRule:
    rule = transpose_rules.get(eqn.primitive)
    if rule is None:
        raise NotImplementedError(
            f"fungrad has no transpose rule for primitive '{eqn.primitive}'{_where(eqn)}, "
            f"so it cannot run reverse mode through it. Rules live in {RULES_HOME}; "
            f"register one in fungrad.extend.transpose_rules.")
    return rule
