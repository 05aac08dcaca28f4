"""Reverse mode: walk a linear jaxpr backwards, accumulating cotangents."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fungrad._src import jaxutil, rules
from fungrad._src.jaxutil import Jaxpr, JaxprEqn, Literal
from fungrad._src.rules import UndefinedPrimal, is_undefined
from fungrad._src.zeros import Zero, add_tangents, is_zero


def backward_pass(jaxpr: Jaxpr, args: Sequence[Any], cts_out: Sequence[Any]) -> list[Any]:
    """Cotangents of the linear inputs of `jaxpr` given those of its outputs.

    `args` holds a value for each known input and an `UndefinedPrimal` for each linear
    one; the result has a cotangent (possibly `Zero`) for every input.
    """
    assert not jaxpr.constvars, "close over constants as known inputs instead"
    primal_env: dict[Any, Any] = {}
    ct_env: dict[Any, Any] = {}

    def read(v):
        if type(v) is Literal:
            return v.val
        return primal_env[v] if v in primal_env else UndefinedPrimal(v.aval)

    def write_ct(v, ct):
        if ct is None or is_zero(ct) or type(v) is Literal:
            return
        ct_env[v] = add_tangents(ct_env[v], ct) if v in ct_env else ct

    def read_ct(v):
        ct = ct_env.pop(v, None)
        return Zero(v.aval.to_tangent_aval()) if ct is None else ct

    for v, x in zip(jaxpr.invars, args, strict=True):
        if not is_undefined(x):
            primal_env[v] = x
    linear_eqns = _forward_known(jaxpr.eqns, primal_env)
    for out, ct in zip(jaxpr.outvars, cts_out, strict=True):
        write_ct(out, ct)
    for eqn in reversed(linear_eqns):
        cts = [read_ct(v) for v in eqn.outvars]
        if all(is_zero(ct) for ct in cts):
            continue
        invals = [read(v) for v in eqn.invars]
        ct = cts if eqn.primitive.multiple_results else cts[0]
        with jaxutil.rule_context(eqn):
            cts_in = rules.lookup_transpose(eqn)(ct, *invals, **eqn.params)
        for atom, x, ct_in in zip(eqn.invars, invals, cts_in, strict=True):
            if is_undefined(x):
                write_ct(atom, ct_in)
    return [read_ct(v) if is_undefined(x) else Zero(v.aval.to_tangent_aval())
            for v, x in zip(jaxpr.invars, args, strict=True)]


def _forward_known(eqns: Sequence[JaxprEqn], primal_env: dict) -> list[JaxprEqn]:
    """Runs the equations whose inputs are all known; returns the linear ones."""
    linear = []
    for eqn in eqns:
        if any(type(v) is not Literal and v not in primal_env for v in eqn.invars):
            linear.append(eqn)
            continue
        invals = [v.val if type(v) is Literal else primal_env[v] for v in eqn.invars]
        for v, x in zip(eqn.outvars, jaxutil.bind_eqn(eqn, invals), strict=True):
            primal_env[v] = x
    return linear
