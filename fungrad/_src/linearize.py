"""Partial evaluation: split a jaxpr into the part computable now and the part staged."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from fungrad._src import jaxutil, rules
from fungrad._src.jaxutil import ClosedJaxpr, Jaxpr, JaxprEqn, Literal, Var
from fungrad._src.jvp import jvp_program, merge


@dataclass(frozen=True)
class Split:
    """`jaxpr` split by which inputs are known.

    known:  (constvars; known inputs) -> (known outputs, residuals)
    staged: (residuals, unknown inputs) -> unknown outputs
    """

    known: Jaxpr
    staged: Jaxpr
    out_unknowns: list[bool]
    num_res: int


def partial_eval(jaxpr: Jaxpr, unknowns: Sequence[bool],
                 instantiate: Sequence[bool] | bool = False) -> Split:
    """Splits `jaxpr` given which inputs are unknown.

    An equation with an unknown input is staged (a rule in `partial_eval_rules` may
    split it further, as for `jit`); the rest runs now. The residuals are the known
    values the staged part reads. Outputs with `instantiate` set are staged even if
    known (as a residual passed straight through).
    """
    if isinstance(instantiate, bool):
        instantiate = [instantiate] * len(jaxpr.outvars)
    return _instantiated(_uninstantiated(jaxpr, tuple(unknowns)), instantiate)


@jaxutil.weak_cache
def _uninstantiated(jaxpr: Jaxpr, unknowns: tuple[bool, ...]) -> Split:
    """`partial_eval` with nothing instantiated, computed once per jaxpr and unknowns.

    Rules for conds and loops split a body to learn which outputs are unknown, then
    again with those instantiated; each split of a body splits the bodies nested in it,
    so without the cache the work would double with each level of nesting. Every caller
    gets the same split, whose jaxprs share variables with `jaxpr`: rules use them as
    bodies of their own, and inline their equations only on fresh variables (`_inline`).
    """
    unknown: set[Var] = {v for v, u in zip(jaxpr.invars, unknowns, strict=True) if u}
    known_eqns: list[JaxprEqn] = []
    staged_eqns: list[JaxprEqn] = []
    for eqn in jaxpr.eqns:
        in_unknowns = [type(v) is not Literal and v in unknown for v in eqn.invars]
        if not any(in_unknowns):
            known_eqns.append(eqn)
            continue
        rule = rules.partial_eval_rules.get(eqn.primitive)
        if rule is None:
            staged_eqns.append(eqn)
            unknown.update(eqn.outvars)
            continue
        eqn_known, eqn_staged, out_unknowns = rule(eqn, in_unknowns)
        known_eqns += eqn_known
        staged_eqns += eqn_staged
        unknown.update(v for v, u in zip(eqn.outvars, out_unknowns, strict=True) if u)

    out_unknowns = [type(v) is not Literal and v in unknown for v in jaxpr.outvars]
    staged_outs = [v for v, u in zip(jaxpr.outvars, out_unknowns, strict=True) if u]
    staged_eqns = dce(staged_eqns, staged_outs)
    residuals = _residuals(staged_eqns, unknown)
    known_outs = [v for v, u in zip(jaxpr.outvars, out_unknowns, strict=True) if not u]
    known_outvars = known_outs + residuals
    known = jaxutil.new_jaxpr(
        jaxpr.constvars,
        [v for v, u in zip(jaxpr.invars, unknowns, strict=True) if not u],
        known_outvars, dce(known_eqns, known_outvars))
    staged = jaxutil.new_jaxpr(
        [], residuals + [v for v, u in zip(jaxpr.invars, unknowns, strict=True) if u],
        staged_outs, staged_eqns)
    return Split(known, staged, out_unknowns, len(residuals))


def _instantiated(split: Split, instantiate: Sequence[bool]) -> Split:
    """`split` with the known outputs where `instantiate` is set staged too.

    Each such output leaves the known outputs and becomes a residual (unless it is one
    already, or a literal), which the staged part returns as it is. No equation moves:
    the known part computes the same values, the staged part reads the new residuals only
    as outputs.
    """
    known, staged = split.known, split.staged
    moved = [not u and inst for u, inst in zip(split.out_unknowns, instantiate, strict=True)]
    if not any(moved):
        return split
    n_known = len(known.outvars) - split.num_res
    outs = merge(split.out_unknowns, staged.outvars, known.outvars[:n_known])
    out_unknowns = [u or m for u, m in zip(split.out_unknowns, moved, strict=True)]
    new_res = [v for v, m in zip(outs, moved, strict=True) if m and type(v) is not Literal]
    residuals = list(dict.fromkeys([*known.outvars[n_known:], *new_res]))
    known_outs = [v for v, u in zip(outs, out_unknowns, strict=True) if not u]
    staged_outs = [v for v, u in zip(outs, out_unknowns, strict=True) if u]
    return Split(
        jaxutil.new_jaxpr(known.constvars, known.invars, [*known_outs, *residuals], known.eqns),
        jaxutil.new_jaxpr([], [*residuals, *staged.invars[split.num_res:]], staged_outs,
                          staged.eqns),
        out_unknowns, len(residuals))


def _residuals(staged_eqns: Sequence[JaxprEqn], unknown: set[Var]) -> list[Var]:
    """Known variables the staged equations read, each once, in order of first use."""
    seen: dict[Var, None] = {}
    for v in (v for eqn in staged_eqns for v in eqn.invars):
        if type(v) is not Literal and v not in unknown:
            seen.setdefault(v, None)
    return list(seen)


def dce(eqns: Sequence[JaxprEqn], outvars: Sequence, *,
        keep_effects: bool = True) -> list[JaxprEqn]:
    """The equations needed for `outvars` (and, with `keep_effects`, any with effects),
    in order."""
    live: set[Var] = {v for v in outvars if type(v) is not Literal}
    kept: list[JaxprEqn] = []
    for eqn in reversed(eqns):
        if (keep_effects and eqn.effects) or any(v in live for v in eqn.outvars):
            kept.append(eqn)
            live.update(v for v in eqn.invars if type(v) is not Literal)
    kept.reverse()
    return kept


@dataclass(frozen=True)
class LinearProgram:
    """A function in linearized form.

    `primal` maps (constants, primals) to (outputs, residuals); `linear` maps
    (residuals, nonzero input tangents) to the nonzero output tangents.
    """

    primal: Jaxpr
    primal_consts: list
    linear: Jaxpr
    num_outs: int
    out_nonzeros: list[bool]


@jaxutil.weak_cache
def linearize_program(closed: ClosedJaxpr, nonzeros: tuple[bool, ...]) -> LinearProgram:
    """Forward mode of `closed` traced, then split into its primal and linear parts."""
    traced, out_nonzeros = jvp_program(closed, nonzeros)
    jaxpr, consts = jaxutil.consts_as_invars(traced)
    num_known = len(consts) + len(closed.in_avals)
    num_outs = len(closed.out_avals)
    split = partial_eval(
        jaxpr, [False] * num_known + [True] * nonzeros.count(True),
        instantiate=[False] * num_outs + [True] * out_nonzeros.count(True))
    assert not any(split.out_unknowns[:num_outs]), "primal outputs must not need tangents"
    return LinearProgram(split.known, consts, split.staged, num_outs, out_nonzeros)
