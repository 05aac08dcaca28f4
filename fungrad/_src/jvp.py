"""Forward mode: a jaxpr interpreter on (primal, tangent) pairs with symbolic zeros."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from fungrad._src import jaxutil, rules
from fungrad._src.jaxutil import ClosedJaxpr, Jaxpr, Literal
from fungrad._src.zeros import Zero, has_tangent_space, is_zero


def jvp_jaxpr(jaxpr: Jaxpr, consts: Sequence[Any], primals: Sequence[Any],
              tangents: Sequence[Any]) -> tuple[list[Any], list[Any]]:
    """Evaluates `jaxpr` on `primals` and pushes `tangents` (Zero allowed) forward."""
    primal_env: dict[Any, Any] = {}
    tangent_env: dict[Any, Any] = {}

    def read(v):
        return v.val if type(v) is Literal else primal_env[v]

    def read_tangent(v):
        if type(v) is Literal:
            return Zero.like(v.val)
        t = tangent_env.get(v)
        return Zero(v.aval.to_tangent_aval()) if t is None else t

    def write(v, val, tangent):
        primal_env[v] = val
        # Integer and boolean values never carry a tangent, whatever a rule returned.
        if not is_zero(tangent) and has_tangent_space(v.aval):
            tangent_env[v] = tangent

    for v, c in zip(jaxpr.constvars, consts, strict=True):
        write(v, c, Zero.like(c))
    for v, x, t in zip(jaxpr.invars, primals, tangents, strict=True):
        write(v, x, t)
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        in_dots = [read_tangent(v) for v in eqn.invars]
        if all(is_zero(t) for t in in_dots):
            outs = jaxutil.bind_eqn(eqn, invals)
            out_dots = [Zero(v.aval.to_tangent_aval()) for v in eqn.outvars]
        else:
            with jaxutil.rule_context(eqn):
                outs, out_dots = rules.lookup_jvp(eqn)(invals, in_dots, **eqn.params)
            if not eqn.primitive.multiple_results:
                outs, out_dots = [outs], [out_dots]
        for v, x, t in zip(eqn.outvars, outs, out_dots, strict=True):
            write(v, x, t)
    return [read(v) for v in jaxpr.outvars], [read_tangent(v) for v in jaxpr.outvars]


def jvp_closed(closed: ClosedJaxpr, primals: Sequence[Any],
               tangents: Sequence[Any]) -> tuple[list[Any], list[Any]]:
    return jvp_jaxpr(closed.jaxpr, closed.consts, primals, tangents)


def merge(mask: Sequence[bool], when_true: Sequence[Any], when_false: Sequence[Any]) -> list:
    """Interleaves two lists by a mask: the inverse of splitting a list by it."""
    it_true, it_false = iter(when_true), iter(when_false)
    out = [next(it_true) if m else next(it_false) for m in mask]
    assert next(it_true, None) is None and next(it_false, None) is None
    return out


def partition(xs: Sequence[Any], *sizes: int) -> list[list[Any]]:
    """`xs` cut into consecutive pieces of the given sizes, and the rest."""
    pieces, start = [], 0
    for n in sizes:
        pieces.append(list(xs[start:start + n]))
        start += n
    pieces.append(list(xs[start:]))
    return pieces


def fixed_point(step: Callable[[list[bool]], Sequence[bool]], init: Sequence[bool]) -> list[bool]:
    """The least `flags` containing `init` with `step(flags)` contained in it: which carries
    of a loop have a property (a tangent, an unknown value) after any number of trips."""
    flags = list(init)
    while True:
        new = [a or b for a, b in zip(flags, step(flags), strict=True)]
        if new == flags:
            return flags
        flags = new


def fill(mask: Sequence[bool], values: Sequence[Any], defaults: Sequence[Any]) -> list:
    """`defaults` with the positions where `mask` is set taken, in order, from `values`."""
    it = iter(values)
    out = [next(it) if m else d for m, d in zip(mask, defaults, strict=True)]
    assert next(it, None) is None
    return out


@jaxutil.weak_cache
def jvp_program(closed: ClosedJaxpr, nonzeros: tuple[bool, ...]) -> tuple[ClosedJaxpr, list[bool]]:
    """`closed` in forward mode as a jaxpr: (primals, nonzero tangents) -> (outs, nonzero out tangents).

    Also returns which output tangents are nonzero. Cached per jaxpr and zero pattern.
    """
    n = len(closed.in_avals)
    out_nonzeros: list[bool] = []

    def fun(*args):
        primals, nz_dots = args[:n], args[n:]
        dots = fill(nonzeros, nz_dots, [Zero(a.to_tangent_aval()) for a in closed.in_avals])
        outs, out_dots = jvp_closed(closed, primals, dots)
        out_nonzeros[:] = [not is_zero(t) for t in out_dots]
        return [*outs, *(t for t in out_dots if not is_zero(t))]

    dot_avals = [a.to_tangent_aval() for a, nz in zip(closed.in_avals, nonzeros, strict=True) if nz]
    return jaxutil.trace_to_jaxpr(fun, [*closed.in_avals, *dot_avals]), out_nonzeros
