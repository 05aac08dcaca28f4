"""Rules for control flow and rematerialization: cond, scan, while, remat, name, linear solve.

Each construct stays what it is in every mode: the JVP of a cond is a cond of the
JVP'd branches, its linear part a cond, its transpose a cond of the transposed
branches; likewise scan (transposed into a reversed scan), while (its transpose replays
the trips backwards from snapshots of the carry, see `loops.py`; jax has no reverse
mode for it) and `jax.checkpoint` (whose residuals follow its policy).

Loops need a fixed point over their carries: a carry has a nonzero tangent (or is
unknown, in partial evaluation) if its initial value has one or if one iteration of
the body gives it one; the body is then rebuilt with those carries instantiated so
that its carry inputs and outputs agree.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

from jax import lax
from jax.ad_checkpoint import Recompute

from fungrad._src import jaxutil, linearize, loops, rules
from fungrad._src.jaxutil import ClosedJaxpr, Jaxpr, JaxprEqn, Literal, Var, prims
from fungrad._src.jvp import fill, fixed_point, jvp_closed, jvp_program, merge, partition
from fungrad._src.primitives.higher_order import transpose_of_closed
from fungrad._src.rules import is_undefined
from fungrad._src.zeros import Zero, add_tangents, has_tangent_space, instantiate, is_zero

# --- helpers: jaxprs rearranged, traced in forward mode, split ---------------------------


def _blocks(*sizes: int) -> list[list[int]]:
    """Consecutive index ranges of the given sizes: `_blocks(2, 1) == [[0, 1], [2]]`."""
    return partition(range(sum(sizes)), *sizes)[:-1]


def _permuted(closed: ClosedJaxpr, in_order: Sequence[int], out_order: Sequence[int]) -> ClosedJaxpr:
    """`closed` with its inputs and outputs reordered: new input i is old `in_order[i]`."""
    j = closed.jaxpr
    jaxpr = jaxutil.new_jaxpr(j.constvars, [j.invars[i] for i in in_order],
                              [j.outvars[i] for i in out_order], j.eqns)
    return ClosedJaxpr(jaxpr, closed.consts)


def _consts_as_args(closed: ClosedJaxpr) -> tuple[ClosedJaxpr, list[Any]]:
    """`closed` taking its constants as leading inputs, and those constants."""
    jaxpr, consts = jaxutil.consts_as_invars(closed)
    return ClosedJaxpr(jaxpr, ()), consts


def _jvp_instantiated(closed: ClosedJaxpr, nonzeros: tuple[bool, ...],
                      inst: tuple[bool, ...]) -> tuple[ClosedJaxpr, tuple[bool, ...]]:
    """Like `jvp_program`, with the output tangents where `inst` is set made nonzero.

    (primals, nonzero tangents) -> (outs, out tangents where the returned mask is set).
    """
    body, out_nonzeros = jvp_program(closed, nonzeros)
    out_nz = tuple(nz or (i and has_tangent_space(a))
                   for nz, i, a in zip(out_nonzeros, inst, closed.out_avals, strict=True))
    if list(out_nz) == out_nonzeros:
        return body, out_nz
    return _jvp_with_zeros(closed, nonzeros, out_nz), out_nz


@jaxutil.weak_cache
def _jvp_with_zeros(closed: ClosedJaxpr, nonzeros: tuple[bool, ...],
                    out_nz: tuple[bool, ...]) -> ClosedJaxpr:
    """`jvp_program`'s jaxpr with zeros for the output tangents it lacks where `out_nz` is
    set. Built on that jaxpr rather than by tracing the forward mode again, which would
    run the rules of the constructs nested in `closed` once more."""
    body, out_nonzeros = jvp_program(closed, nonzeros)
    n_out = len(closed.out_avals)

    def fun(*args):
        outs = jaxutil.eval_jaxpr(body.jaxpr, body.consts, *args)
        dots = fill(out_nonzeros, outs[n_out:], [Zero(a.to_tangent_aval()) for a in closed.out_avals])
        return [*outs[:n_out], *(instantiate(t) for t, nz in zip(dots, out_nz, strict=True) if nz)]

    return jaxutil.trace_to_jaxpr(fun, body.in_avals)


def _out_nonzeros(closed: ClosedJaxpr, nonzeros: Sequence[bool]) -> list[bool]:
    return jvp_program(closed, tuple(nonzeros))[1]


def _inline(jaxpr: Jaxpr, in_atoms: Sequence[Any]) -> tuple[list[JaxprEqn], list[Any]]:
    """The equations of `jaxpr` (without constants) on fresh variables, applied to `in_atoms`."""
    assert not jaxpr.constvars
    env: dict[Any, Any] = dict(zip(jaxpr.invars, in_atoms, strict=True))

    def sub(v):
        return v if type(v) is Literal else env[v]

    eqns = []
    for eqn in jaxpr.eqns:
        outs = [Var(v.aval) for v in eqn.outvars]
        eqns.append(jaxutil.new_eqn([sub(v) for v in eqn.invars], outs, eqn.primitive,
                                    eqn.params, eqn))
        env.update(zip(eqn.outvars, outs, strict=True))
    return eqns, [sub(v) for v in jaxpr.outvars]


def _known_outs(split: linearize.Split) -> list[Any]:
    return split.known.outvars[:len(split.known.outvars) - split.num_res]


def _residual_vars(split: linearize.Split) -> list[Any]:
    return split.known.outvars[len(split.known.outvars) - split.num_res:]


# --- cond: index is not differentiable; branches share one tangent / residual layout ---


def _cond_jvp(primals, tangents, *, branches, **params):
    index, *ops = primals
    nonzeros = tuple(not is_zero(t) for t in tangents[1:])
    out_nz = [any(nz) for nz in zip(*(_out_nonzeros(b, nonzeros) for b in branches), strict=True)]
    jvp_branches = tuple(_jvp_instantiated(b, nonzeros, tuple(out_nz))[0] for b in branches)
    outs = prims.cond_p.bind(index, *ops, *(t for t in tangents[1:] if not is_zero(t)),
                             branches=jvp_branches, **params)
    n_out = len(branches[0].out_avals)
    zeros = [Zero(a.to_tangent_aval()) for a in branches[0].out_avals]
    return outs[:n_out], fill(out_nz, outs[n_out:], zeros)


def _join_residuals(splits: Sequence[linearize.Split]) -> tuple[list[Any], list[list[int]]]:
    """Slots shared by the branches' residuals (one per aval and use), and each one's slots.

    A branch's i-th residual of a shape and dtype takes the i-th slot of that shape and
    dtype. (Residuals of conds nested in a branch are residuals of the branch, so their
    number grows with the depth of nesting: this must stay linear in it.)
    """
    slot_avals: list[Any] = []
    slots_by_type: dict[tuple, list[int]] = {}
    slots_of: list[list[int]] = []
    for split in splits:
        used: collections.Counter = collections.Counter()
        taken: list[int] = []
        for r in _residual_vars(split):
            key = (r.aval.shape, r.aval.dtype)
            same = slots_by_type.setdefault(key, [])
            if used[key] == len(same):
                same.append(len(slot_avals))
                slot_avals.append(r.aval)
            taken.append(same[used[key]])
            used[key] += 1
        slots_of.append(taken)
    return slot_avals, slots_of


def _known_branch(split: linearize.Split, consts: Sequence[Any], slots: Sequence[int],
                  slot_avals: Sequence[Any]) -> ClosedJaxpr:
    """(known ops) -> (known outs, residual slots), zeros in the slots this branch lacks.

    One zero per aval fills them all: a branch beside nested conds lacks a number of
    residuals that grows with the depth of the nesting.
    """
    n_known = len(split.known.outvars) - split.num_res

    def fun(*known_ops):
        outs = jaxutil.eval_jaxpr(split.known, consts, *known_ops)
        filled = dict(zip(slots, outs[n_known:], strict=True))
        zeros = {}
        for s, a in enumerate(slot_avals):
            if s in filled:
                continue
            if a not in zeros:
                zeros[a] = jaxutil.zeros_like_aval(a)
            filled[s] = zeros[a]
        return [*outs[:n_known], *(filled[s] for s in range(len(slot_avals)))]

    return jaxutil.trace_to_jaxpr(fun, [v.aval for v in split.known.invars])


def _staged_branch(split: linearize.Split, slots: Sequence[int], slot_avals: Sequence[Any]) -> ClosedJaxpr:
    """(residual slots, unknown ops) -> unknown outs; the slots it does not use are ignored."""
    slot_vars = [Var(a) for a in slot_avals]
    for s, r in zip(slots, split.staged.invars[:split.num_res], strict=True):
        slot_vars[s] = r
    jaxpr = jaxutil.new_jaxpr([], [*slot_vars, *split.staged.invars[split.num_res:]],
                              split.staged.outvars, split.staged.eqns)
    return ClosedJaxpr(jaxpr, ())


def _cond_partial_eval(eqn: JaxprEqn, unknowns: Sequence[bool]):
    branches = eqn.params["branches"]
    index_unknown, op_unknowns = unknowns[0], list(unknowns[1:])
    if index_unknown:
        return [], [eqn], [True] * len(eqn.outvars)
    out_uk = [any(u) for u in zip(*(linearize.partial_eval(b.jaxpr, op_unknowns).out_unknowns
                                    for b in branches), strict=True)]
    splits = [linearize.partial_eval(b.jaxpr, op_unknowns, instantiate=out_uk) for b in branches]
    slot_avals, slots_of = _join_residuals(splits)
    known_branches = tuple(_known_branch(s, b.consts, slots, slot_avals)
                           for s, b, slots in zip(splits, branches, slots_of, strict=True))
    staged_branches = tuple(_staged_branch(s, slots, slot_avals)
                            for s, slots in zip(splits, slots_of, strict=True))
    index, ops = eqn.invars[0], eqn.invars[1:]
    slot_vars = [Var(a) for a in slot_avals]
    known_ops = [x for x, u in zip(ops, op_unknowns, strict=True) if not u]
    known_outs = [v for v, u in zip(eqn.outvars, out_uk, strict=True) if not u]
    known_eqn = jaxutil.new_eqn([index, *known_ops], [*known_outs, *slot_vars], prims.cond_p,
                                dict(eqn.params, branches=known_branches), eqn)
    if not any(out_uk):
        return [known_eqn], [], out_uk
    staged_ops = [x for x, u in zip(ops, op_unknowns, strict=True) if u]
    staged_outs = [v for v, u in zip(eqn.outvars, out_uk, strict=True) if u]
    staged_eqn = jaxutil.new_eqn([index, *slot_vars, *staged_ops], staged_outs, prims.cond_p,
                                 dict(eqn.params, branches=staged_branches), eqn)
    return [known_eqn], [staged_eqn], out_uk


def _cond_transpose(cts, index, *ops, branches, **params):
    assert not is_undefined(index), "the index of a cond is never linear"
    undefined = tuple(is_undefined(x) for x in ops)
    ct_nonzeros = tuple(not is_zero(ct) for ct in cts)
    t_branches = tuple(transpose_of_closed(b, undefined, ct_nonzeros) for b in branches)
    cts_in = prims.cond_p.bind(
        index, *(x for x in ops if not is_undefined(x)), *(ct for ct in cts if not is_zero(ct)),
        branches=t_branches, **params)
    return [None, *merge(undefined, cts_in, [None] * undefined.count(False))]


rules.jvp_rules[prims.cond_p] = _cond_jvp  # d cond(i, x) = cond(i, jvp(branch_i)(x, x_dot))
rules.partial_eval_rules[prims.cond_p] = _cond_partial_eval
rules.transpose_rules[prims.cond_p] = _cond_transpose  # cond(i, transpose(branch_i))


# --- scan: carries by fixed point; residuals stacked as extra outputs ------------------


def _scan_jvp(primals, tangents, *, jaxpr, num_consts, num_carry, **params):
    nonzeros = [not is_zero(t) for t in tangents]
    const_nz, init_nz, xs_nz = partition(nonzeros, num_consts, num_carry)
    n_ys = len(jaxpr.out_avals) - num_carry

    def step(carry_nz):
        return _out_nonzeros(jaxpr, [*const_nz, *carry_nz, *xs_nz])[:num_carry]

    carry_nz = fixed_point(step, init_nz)
    nz_in = (*const_nz, *carry_nz, *xs_nz)
    body, out_nz = _jvp_instantiated(jaxpr, nz_in, (*carry_nz, *[False] * n_ys))
    body, body_consts = _consts_as_args(body)
    n_c, n_k, n_x = num_consts, num_carry, len(xs_nz)
    b, c, k, x, dc, dk, dx = _blocks(len(body_consts), n_c, n_k, n_x, sum(const_nz),
                                     sum(carry_nz), sum(xs_nz))
    ok, oy, odk, ody = _blocks(n_k, n_ys, sum(carry_nz), sum(out_nz[n_k:]))
    body = _permuted(body, [*b, *c, *dc, *k, *dk, *x, *dx], [*ok, *odk, *oy, *ody])
    consts, init, xs = partition(primals, num_consts, num_carry)
    const_dots, init_dots, xs_dots = partition(tangents, num_consts, num_carry)
    outs = prims.scan_p.bind(
        *body_consts, *consts, *(t for t in const_dots if not is_zero(t)),
        *init, *(instantiate(t) for t, nz in zip(init_dots, carry_nz, strict=True) if nz),
        *xs, *(t for t in xs_dots if not is_zero(t)),
        jaxpr=body, num_consts=len(body_consts) + n_c + sum(const_nz),
        num_carry=n_k + sum(carry_nz), **params)
    carry, carry_dots, ys, ys_dots = partition(outs, n_k, sum(carry_nz), n_ys)
    zeros = [Zero(a.to_tangent_aval()) for a in jaxpr.out_avals]
    return [*carry, *ys], fill([*carry_nz, *out_nz[n_k:]], [*carry_dots, *ys_dots], zeros)


def _loop_variant(jaxpr: Jaxpr, variant_in: Sequence[bool]) -> set[Any]:
    """The variables of `jaxpr` that depend on the inputs marked variant (or on effects)."""
    variant = {v for v, m in zip(jaxpr.invars, variant_in, strict=True) if m}
    variant.update(jaxpr.constvars)  # closed-over values are kept per iteration, to be safe
    for eqn in jaxpr.eqns:
        if eqn.effects or any(type(v) is not Literal and v in variant for v in eqn.invars):
            variant.update(eqn.outvars)
    return variant


def _scan_partial_eval(eqn: JaxprEqn, unknowns: Sequence[bool]):
    params = eqn.params
    body: ClosedJaxpr = params["jaxpr"]
    n_c, n_k = params["num_consts"], params["num_carry"]
    n_ys = len(body.out_avals) - n_k
    const_uk, init_uk, xs_uk = partition(unknowns, n_c, n_k)

    def step(carry_uk):
        uk = [*const_uk, *carry_uk, *xs_uk]
        return linearize.partial_eval(body.jaxpr, uk).out_unknowns[:n_k]

    carry_uk = fixed_point(step, init_uk)
    in_uk = [*const_uk, *carry_uk, *xs_uk]
    split = linearize.partial_eval(body.jaxpr, in_uk, instantiate=[*carry_uk, *[False] * n_ys])
    out_uk = split.out_unknowns

    # Where each residual comes from: computed once before the loop (it depends on
    # constants only), a known `xs` passed on, or stacked per iteration by the known scan.
    outer = {v: x for v, x, u in zip(body.jaxpr.invars, eqn.invars, in_uk, strict=True) if not u}
    known_xs_vars = set(split.known.invars[sum(not u for u in [*const_uk, *carry_uk]):])
    n_known_consts = const_uk.count(False)
    variant = _loop_variant(split.known, [i >= n_known_consts
                                          for i in range(len(split.known.invars))])
    residuals = _residual_vars(split)
    invariant = [r for r in residuals if type(r) is not Literal and r not in variant]
    forwarded = [r for r in residuals if r in known_xs_vars]
    stacked = [r for r in residuals if r in variant and r not in known_xs_vars]

    # The effects stay in the loop: they run once per iteration, not once before it.
    hoist = jaxutil.new_jaxpr([], split.known.invars[:n_known_consts], invariant,
                              linearize.dce(split.known.eqns, invariant, keep_effects=False))
    hoist_eqns, invariant_atoms = _inline(hoist, [outer[v] for v in hoist.invars])

    known_body = jaxutil.new_jaxpr(
        split.known.constvars, split.known.invars, [*_known_outs(split), *stacked],
        linearize.dce(split.known.eqns, [*_known_outs(split), *stacked]))
    known_in = [x for x, u in zip(eqn.invars, in_uk, strict=True) if not u]
    known_params = dict(params, jaxpr=ClosedJaxpr(known_body, body.consts),
                        num_consts=n_known_consts, num_carry=carry_uk.count(False))
    out_avals, _ = prims.scan_p.abstract_eval(*(x.aval for x in known_in), **known_params)
    stacked_vars = [Var(a) for a in out_avals[len(out_avals) - len(stacked):]]
    known_eqn = jaxutil.new_eqn(
        known_in, [*(v for v, u in zip(eqn.outvars, out_uk, strict=True) if not u),
                   *stacked_vars], prims.scan_p, known_params, eqn)
    if not any(out_uk):
        return [*hoist_eqns, known_eqn], [], out_uk

    uk_c, uk_k, uk_x = partition(split.staged.invars[split.num_res:], const_uk.count(True),
                              carry_uk.count(True))
    staged_body = jaxutil.new_jaxpr(
        [], [*invariant, *uk_c, *uk_k, *stacked, *forwarded, *uk_x],
        split.staged.outvars, split.staged.eqns)
    consts, init, xs = partition(eqn.invars, n_c, n_k)
    staged_in = [*invariant_atoms, *(x for x, u in zip(consts, const_uk, strict=True) if u),
                 *(x for x, u in zip(init, carry_uk, strict=True) if u),
                 *stacked_vars, *(outer[r] for r in forwarded),
                 *(x for x, u in zip(xs, xs_uk, strict=True) if u)]
    staged_params = dict(params, jaxpr=ClosedJaxpr(staged_body, ()),
                         num_consts=len(invariant) + const_uk.count(True),
                         num_carry=carry_uk.count(True))
    staged_eqn = jaxutil.new_eqn(
        staged_in, [v for v, u in zip(eqn.outvars, out_uk, strict=True) if u],
        prims.scan_p, staged_params, eqn)
    return [*hoist_eqns, known_eqn], [staged_eqn], out_uk


@jaxutil.weak_cache
def _scan_transposed_body(body: ClosedJaxpr, undefined: tuple[bool, ...],
                          ct_nonzeros: tuple[bool, ...], num_consts: int,
                          num_carry: int) -> ClosedJaxpr:
    """One step of the transposed scan.

    consts: known consts; carry: (ct of linear consts summed so far, ct of the carry);
    xs: (known xs, nonzero ct of ys) -> ys: ct of linear xs.
    """
    t_body = transpose_of_closed(body, undefined, ct_nonzeros)
    const_u, _, xs_u = partition(undefined, num_consts, num_carry)
    n_kc, n_lc, n_kx = const_u.count(False), const_u.count(True), xs_u.count(False)

    def fun(*args):
        known_c, acc, ct_carry, known_x, ct_ys = partition(args, n_kc, n_lc, num_carry, n_kx)
        cts = jaxutil.eval_jaxpr(t_body.jaxpr, t_body.consts, *known_c, *known_x, *ct_carry, *ct_ys)
        ct_consts, ct_init, ct_xs = partition(cts, n_lc, num_carry)
        return [*map(lax.add, acc, ct_consts), *ct_init, *ct_xs]

    in_avals = body.in_avals
    consts_av, carry_av, xs_av = partition(in_avals, num_consts, num_carry)
    ct_avals = [a.to_tangent_aval() for a, nz in zip(body.out_avals, ct_nonzeros, strict=True) if nz]
    avals = [*(a for a, u in zip(consts_av, const_u, strict=True) if not u),
             *(a.to_tangent_aval() for a, u in zip(consts_av, const_u, strict=True) if u),
             *(a.to_tangent_aval() for a in carry_av),
             *(a for a, u in zip(xs_av, xs_u, strict=True) if not u), *ct_avals[num_carry:]]
    return jaxutil.trace_to_jaxpr(fun, avals)


def _scan_transpose(cts, *args, jaxpr, num_consts, num_carry, reverse, **params):
    consts, init, xs = partition(args, num_consts, num_carry)
    # The carries are linear all through; a known initial carry is a zero tangent.
    undefined = tuple([*map(is_undefined, consts), *[True] * num_carry, *map(is_undefined, xs)])
    ct_carry, ct_ys = partition(cts, num_carry)
    ct_nonzeros = (*[True] * num_carry, *(not is_zero(ct) for ct in ct_ys))
    body = _scan_transposed_body(jaxpr, undefined, ct_nonzeros, num_consts, num_carry)
    lin_consts = [x for x in consts if is_undefined(x)]
    outs = prims.scan_p.bind(
        *(x for x in consts if not is_undefined(x)),
        *(jaxutil.zeros_like_aval(x.aval) for x in lin_consts), *map(instantiate, ct_carry),
        *(x for x in xs if not is_undefined(x)), *(ct for ct in ct_ys if not is_zero(ct)),
        jaxpr=body, num_consts=len(consts) - len(lin_consts),
        num_carry=len(lin_consts) + num_carry, reverse=not reverse, **params)
    ct_consts, ct_init, ct_xs = partition(outs, len(lin_consts), num_carry)
    const_u, xs_u = [is_undefined(x) for x in consts], [is_undefined(x) for x in xs]
    return [*merge(const_u, ct_consts, [None] * const_u.count(False)),
            *(ct if is_undefined(x) else None for x, ct in zip(init, ct_init, strict=True)),
            *merge(xs_u, ct_xs, [None] * xs_u.count(False))]


rules.jvp_rules[prims.scan_p] = _scan_jvp  # scan of the JVP'd body, tangent carries joined
rules.partial_eval_rules[prims.scan_p] = _scan_partial_eval
rules.transpose_rules[prims.scan_p] = _scan_transpose  # reversed scan of the transposed body


# --- while: forward mode; reverse mode replays the trips from snapshots ------------------


def _while_jvp(primals, tangents, *, cond_jaxpr, body_jaxpr, cond_nconsts, body_nconsts):
    nonzeros = [not is_zero(t) for t in tangents]
    _, bconst_nz, init_nz = partition(nonzeros, cond_nconsts, body_nconsts)

    def step(carry_nz):
        return _out_nonzeros(body_jaxpr, [*bconst_nz, *carry_nz])

    carry_nz = fixed_point(step, init_nz)
    body, _ = _jvp_instantiated(body_jaxpr, (*bconst_nz, *carry_nz), tuple(carry_nz))
    body, body_consts = _consts_as_args(body)
    b, c, k, dc, dk = _blocks(len(body_consts), body_nconsts, len(init_nz), sum(bconst_nz),
                              sum(carry_nz))
    body = _permuted(body, [*b, *c, *dc, *k, *dk], range(len(body.out_avals)))
    cond = cond_jaxpr.jaxpr
    dot_vars = [Var(a.to_tangent_aval()) for a, nz in
                zip(body_jaxpr.out_avals, carry_nz, strict=True) if nz]
    cond = ClosedJaxpr(jaxutil.new_jaxpr(cond.constvars, [*cond.invars, *dot_vars],
                                         cond.outvars, cond.eqns), cond_jaxpr.consts)
    cconsts, bconsts, init = partition(primals, cond_nconsts, body_nconsts)
    _, bconst_dots, init_dots = partition(tangents, cond_nconsts, body_nconsts)
    outs = prims.while_p.bind(
        *cconsts, *body_consts, *bconsts, *(t for t in bconst_dots if not is_zero(t)),
        *init, *(instantiate(t) for t, nz in zip(init_dots, carry_nz, strict=True) if nz),
        cond_jaxpr=cond, body_jaxpr=body, cond_nconsts=cond_nconsts,
        body_nconsts=len(body_consts) + body_nconsts + sum(bconst_nz))
    carry, carry_dots = partition(outs, len(init))
    zeros = [Zero(a.to_tangent_aval()) for a in body_jaxpr.out_avals]
    return carry, fill(carry_nz, carry_dots, zeros)


def _known_part(split: linearize.Split, num_outs: int, consts: Sequence[Any]) -> ClosedJaxpr:
    """The known jaxpr of `split` with only its first `num_outs` outputs (no residuals)."""
    outs = split.known.outvars[:num_outs]
    jaxpr = jaxutil.new_jaxpr(split.known.constvars, split.known.invars, outs,
                              linearize.dce(split.known.eqns, outs))
    return ClosedJaxpr(jaxpr, consts)


def _while_partial_eval(eqn: JaxprEqn, unknowns: Sequence[bool]):
    """The known carries by a while of their own; the whole loop again for the others.

    As in jax, the staged loop recomputes the primal values, so linearize works and
    only transposing it (reverse mode) fails.
    """
    p = eqn.params
    cond, body = p["cond_jaxpr"], p["body_jaxpr"]
    cconst_uk, bconst_uk, init_uk = partition(unknowns, p["cond_nconsts"], p["body_nconsts"])

    def step(carry_uk):
        return linearize.partial_eval(body.jaxpr, [*bconst_uk, *carry_uk]).out_unknowns

    carry_uk = fixed_point(step, init_uk)
    cond_split = linearize.partial_eval(cond.jaxpr, [*cconst_uk, *carry_uk])
    if cond_split.out_unknowns[0]:
        return [], [eqn], [True] * len(eqn.outvars)
    body_split = linearize.partial_eval(body.jaxpr, [*bconst_uk, *carry_uk], instantiate=carry_uk)
    cconsts, bconsts, init = partition(eqn.invars, p["cond_nconsts"], p["body_nconsts"])
    known_eqn = jaxutil.new_eqn(
        [*(x for x, u in zip(cconsts, cconst_uk, strict=True) if not u),
         *(x for x, u in zip(bconsts, bconst_uk, strict=True) if not u),
         *(x for x, u in zip(init, carry_uk, strict=True) if not u)],
        [v for v, u in zip(eqn.outvars, carry_uk, strict=True) if not u], prims.while_p,
        dict(p, cond_jaxpr=_known_part(cond_split, 1, cond.consts),
             body_jaxpr=_known_part(body_split, carry_uk.count(False), body.consts),
             cond_nconsts=cconst_uk.count(False), body_nconsts=bconst_uk.count(False)), eqn)
    if not any(carry_uk):
        return [known_eqn], [], carry_uk
    staged_outs = [v if u else Var(v.aval) for v, u in zip(eqn.outvars, carry_uk, strict=True)]
    staged_eqn = jaxutil.new_eqn(eqn.invars, staged_outs, prims.while_p, p, eqn)
    return [known_eqn], [staged_eqn], carry_uk


def _while_transpose(cts, *args, cond_jaxpr, body_jaxpr, cond_nconsts, body_nconsts):
    cconsts, bconsts, init = partition(args, cond_nconsts, body_nconsts)
    assert not any(map(is_undefined, cconsts)), "a loop's condition is never linear"
    lead = 0
    if cond_jaxpr.out_avals[0].shape:  # a batched condition: trips counted per element
        cond_jaxpr, body_jaxpr = _scalar_condition(cond_jaxpr, body_jaxpr, cond_nconsts)
        bconsts, lead = [*cconsts, *bconsts], cond_nconsts
    bconst_u = tuple(map(is_undefined, bconsts))

    def step(carry_u):
        return linearize.partial_eval(body_jaxpr.jaxpr, [*bconst_u, *carry_u]).out_unknowns

    # A carry is linear if its initial value is, or if the body makes it so (its known
    # initial value is then a zero tangent, as in the transpose of scan).
    carry_u = tuple(fixed_point(step, [is_undefined(x) for x in init]))
    assert all(is_zero(ct) for ct, u in zip(cts, carry_u, strict=True) if not u)
    program = _reversed_while(body_jaxpr, cond_jaxpr, cond_nconsts, bconst_u, carry_u,
                              loops.snapshot_slots())
    outs = jaxutil.eval_jaxpr(
        program.jaxpr, program.consts, *cconsts,
        *(x for x, u in zip(bconsts, bconst_u, strict=True) if not u),
        *(x for x, u in zip(init, carry_u, strict=True) if not u),
        *(instantiate(ct) for ct, u in zip(cts, carry_u, strict=True) if u))
    ct_bconsts, ct_carry = partition(outs, sum(bconst_u))
    ct_init = merge(carry_u, ct_carry, [None] * carry_u.count(False))
    ct_bconsts = merge(bconst_u, ct_bconsts, [None] * bconst_u.count(False))[lead:]
    return [*[None] * cond_nconsts, *ct_bconsts,
            *(ct if is_undefined(x) else None for x, ct in zip(init, ct_init, strict=True))]


@jaxutil.weak_cache
def _scalar_condition(cond: ClosedJaxpr, body: ClosedJaxpr,
                      cond_nconsts: int) -> tuple[ClosedJaxpr, ClosedJaxpr]:
    """A while loop whose condition is batched (`jax.vmap` of a loop whose condition
    depends on the batched values) as one with a scalar condition, as jax lowers it: the
    loop runs while any element's condition holds, and a trip changes only the carries of
    the elements whose condition holds. The new body takes the condition's constants
    first (they are never linear)."""
    def any_true(*args):
        (pred,) = jaxutil.eval_jaxpr(cond.jaxpr, cond.consts, *args)
        return [lax.reduce_or(pred, tuple(range(pred.ndim)))]

    def masked_body(*args):
        cconsts, rest = args[:cond_nconsts], args[cond_nconsts:]
        carry = rest[len(rest) - len(body.out_avals):]
        (pred,) = jaxutil.eval_jaxpr(cond.jaxpr, cond.consts, *cconsts, *carry)
        new = jaxutil.eval_jaxpr(body.jaxpr, body.consts, *rest)
        dims = tuple(range(pred.ndim))  # the batch dimensions lead, in every carry
        return [lax.select(lax.broadcast_in_dim(pred, jaxutil.typeof(x).shape, dims), n, x)
                for n, x in zip(new, carry, strict=True)]

    return (jaxutil.trace_to_jaxpr(any_true, cond.in_avals),
            jaxutil.trace_to_jaxpr(masked_body, [*cond.in_avals[:cond_nconsts], *body.in_avals]))


@jaxutil.weak_cache
def _reversed_while(body: ClosedJaxpr, cond: ClosedJaxpr, cond_nconsts: int,
                    bconst_u: tuple[bool, ...], carry_u: tuple[bool, ...],
                    slots: int) -> ClosedJaxpr:
    """The reverse pass of a while loop with linear constants and carries where `bconst_u`
    and `carry_u` are set, as one program (built once per loop, so that eager calls reuse
    its compiled loops): (cond consts, known body consts, known initial carries, cts of
    the linear carries) -> (cts of the linear body consts, cts of the linear carries)."""
    loop = _split_loop(body, cond, cond_nconsts, bconst_u, carry_u)
    n_c, n_kb, n_kc = cond_nconsts, bconst_u.count(False), carry_u.count(False)
    lin_consts = [a for a, u in zip(body.in_avals, bconst_u, strict=False) if u]

    def fun(*args):
        cconsts, consts, init, ct_carry = partition(args, n_c, n_kb, n_kc)
        ct_consts = [jaxutil.zeros_like_aval(a.to_tangent_aval()) for a in lin_consts]
        ct_consts, ct_carry = loops.reverse(loop, cconsts, consts, init, ct_consts, ct_carry, slots)
        return [*ct_consts, *ct_carry]

    known = [a for a, u in zip(body.in_avals, [*bconst_u, *carry_u], strict=True) if not u]
    linear_carries = [a.to_tangent_aval() for a, u in zip(body.out_avals, carry_u, strict=True) if u]
    return jaxutil.trace_to_jaxpr(fun, [*cond.in_avals[:n_c], *known, *linear_carries])


def _split_loop(body: ClosedJaxpr, cond: ClosedJaxpr, cond_nconsts: int,
                bconst_u: tuple[bool, ...], carry_u: tuple[bool, ...]) -> loops.Loop:
    """The loop's condition and body on its primal carries, and its transposed body."""
    cond_split = linearize.partial_eval(cond.jaxpr, [*[False] * cond_nconsts, *carry_u])
    assert not cond_split.out_unknowns[0], "a loop's condition never reads a linear carry"
    split = linearize.partial_eval(body.jaxpr, [*bconst_u, *carry_u], instantiate=list(carry_u))
    assert split.out_unknowns == list(carry_u)
    n_known = carry_u.count(False)
    residuals = ClosedJaxpr(split.known, body.consts)
    n_lin = bconst_u.count(True) + carry_u.count(True)
    t_staged = transpose_of_closed(ClosedJaxpr(split.staged, ()),
                                   (*[False] * split.num_res, *[True] * n_lin),
                                   (True,) * carry_u.count(True))

    def back(*args):
        known, ct_carry = args[:len(split.known.invars)], args[len(split.known.invars):]
        res = jaxutil.eval_jaxpr(residuals.jaxpr, residuals.consts, *known)[n_known:]
        return jaxutil.eval_jaxpr(t_staged.jaxpr, t_staged.consts, *res, *ct_carry)

    ct_avals = [a.to_tangent_aval() for a, u in zip(body.out_avals, carry_u, strict=True) if u]
    return loops.Loop(cond=_known_part(cond_split, 1, cond.consts),
                      step=_known_part(split, n_known, body.consts),
                      back=jaxutil.trace_to_jaxpr(back, [*residuals.in_avals, *ct_avals]),
                      num_linear_consts=bconst_u.count(True))


rules.jvp_rules[prims.while_p] = _while_jvp  # while over (carry, carry_dot); cond reads carry
rules.partial_eval_rules[prims.while_p] = _while_partial_eval
rules.transpose_rules[prims.while_p] = _while_transpose  # replayed from snapshots (loops.py)


# --- remat (jax.checkpoint): residuals only where the policy saves them ------------------


def _cse_flags(prevent_cse: bool | tuple, build: Callable[[tuple], list[bool]]) -> bool | tuple:
    """`prevent_cse` for a new input list: as it is when one flag covers all inputs."""
    return prevent_cse if isinstance(prevent_cse, bool) else tuple(build(prevent_cse))


def _remat_jvp(primals, tangents, *, jaxpr, prevent_cse, differentiated, policy):
    nonzeros = tuple(not is_zero(t) for t in tangents)
    body, out_nz = jvp_program(ClosedJaxpr(jaxpr, ()), nonzeros)
    body, consts = _consts_as_args(body)
    prevent_cse = _cse_flags(prevent_cse, lambda f: [*[False] * len(consts), *f,
                                                     *[True] * sum(nonzeros)])
    outs = prims.remat_p.bind(
        *consts, *primals, *(t for t in tangents if not is_zero(t)), jaxpr=body.jaxpr,
        prevent_cse=prevent_cse, differentiated=differentiated, policy=policy)
    n_out = len(jaxpr.outvars)
    zeros = [Zero(v.aval.to_tangent_aval()) for v in jaxpr.outvars]
    return outs[:n_out], fill(out_nz, outs[n_out:], zeros)


def _saves(policy: Any, eqn: JaxprEqn) -> bool:
    """Whether a remat `policy` lets the outputs of `eqn` be kept as residuals.

    An offloading policy's `Offloadable` counts as saved: fungrad keeps the value where
    it is (device memory) rather than moving it.
    """
    if policy is None:  # jax.checkpoint's default: save nothing but the inputs
        return False
    saved = policy(eqn.primitive, *(v.aval for v in eqn.invars), **eqn.params)
    return saved is not Recompute and bool(saved)


def _is_var(v: Any) -> bool:
    return type(v) is not Literal


@dataclasses.dataclass(frozen=True)
class _Remat:
    """How known equations hand values to the staged part of a checkpoint.

    known:     the known equations, each call among them rewritten to also return the
               values the policy saves inside it;
    saved:     values computed by `known` that the staged part reads;
    inputs:    inputs (or constants) of the enclosing jaxpr that the staged part reads;
    recompute: the equations the staged part runs again, in order.
    """

    known: list[JaxprEqn]
    saved: list[Var]
    inputs: list[Var]
    recompute: list[JaxprEqn]


def _rematerialize(eqns: Sequence[JaxprEqn], needed: Sequence[Any], policy: Any) -> _Remat:
    """Which values of `needed` (read after `eqns`) are saved and which recomputed.

    The equations are walked backwards, so that every use of a value is known when its
    equation is reached. An equation the policy saves keeps its wanted outputs; one it
    does not is recomputed, and its inputs are needed in turn. A call (`jit`) is judged
    not as a whole but equation by equation inside, as jax's partial evaluation does: it
    saves what the policy saves in its body and recomputes the rest in a second call.
    Debug callbacks run again with the recomputation, as in jax.
    """
    live: dict[Any, None] = dict.fromkeys(v for v in needed if _is_var(v))
    saved: list[Var] = []
    known: list[JaxprEqn] = []
    recompute: list[JaxprEqn] = []
    for eqn in reversed(eqns):
        wanted = [v in live for v in eqn.outvars]
        replay = jaxutil.has_debug_effect(eqn)
        if any(wanted) or replay:
            for v in eqn.outvars:
                live.pop(v, None)
            opener = _OPENERS.get(eqn.primitive)
            if opener is not None:
                eqn, again, kept, reads = opener(eqn, wanted, policy)
                saved += kept
                recompute += [again] if again is not None else []
                live.update(dict.fromkeys(v for v in reads if _is_var(v)))
            elif not replay and _saves(policy, eqn):
                saved += [v for v, w in zip(eqn.outvars, wanted, strict=True) if w]
            else:
                recompute.append(eqn)
                live.update(dict.fromkeys(v for v in eqn.invars if _is_var(v)))
        known.append(eqn)
    return _Remat(known[::-1], saved[::-1], list(live)[::-1], recompute[::-1])


def _open_call(eqn: JaxprEqn, wanted: Sequence[bool], policy: Any):
    """A known call split by `policy` inside, for the wanted outputs.

    Returns the call rewritten to also return the values it saves inside (a value it
    returns anyway is not returned twice), the call that recomputes the wanted outputs
    from the saved values and its inputs (None if it has nothing to do), the saved
    values outside, and the inputs outside the recomputation reads.
    """
    closed: ClosedJaxpr = eqn.params[_CALLS[eqn.primitive]]
    body = closed.jaxpr
    inner = _rematerialize(body.eqns, [o for o, w in zip(body.outvars, wanted, strict=True) if w], policy)
    returned = {o: v for o, v in zip(body.outvars, eqn.outvars, strict=True)
                if _is_var(o) and type(v) is Var}  # not a literal, not dropped
    extra = [s for s in inner.saved if s not in returned]
    fresh = dict(zip(extra, (Var(s.aval) for s in extra), strict=True))
    outer_of = {s: returned.get(s) or fresh[s] for s in inner.saved}
    outer_saved = list(outer_of.values())
    n_in, n_out = len(body.invars), len(body.outvars)
    known_body = jaxutil.new_jaxpr(body.constvars, body.invars, [*body.outvars, *extra], inner.known)
    known = _call_eqn(eqn, eqn.invars, [*eqn.outvars, *fresh.values()], known_body, closed.consts,
                      range(n_in), [*range(n_out), *[None] * len(extra)])
    position = {v: i for i, v in enumerate(body.invars)}
    ins = [position[v] for v in inner.inputs if v in position]  # the rest are constants
    # A wanted output is recomputed unless it is the very value saved (not a second
    # output of the call that returns the same inner value: that one is passed through).
    outs = [k for k, (o, w) in enumerate(zip(body.outvars, wanted, strict=True))
            if w and not (_is_var(o) and outer_of.get(o) is eqn.outvars[k])]
    if not outs and not inner.recompute:
        return known, None, outer_saved, []
    again_body = jaxutil.new_jaxpr(body.constvars, [*(body.invars[i] for i in ins), *inner.saved],
                                   [body.outvars[k] for k in outs], inner.recompute)
    again = _call_eqn(eqn, [*(eqn.invars[i] for i in ins), *outer_saved], [eqn.outvars[k] for k in outs],
                      again_body, closed.consts, [*ins, *[None] * len(outer_saved)], outs)
    return known, again, outer_saved, [eqn.invars[i] for i in ins]


def _call_eqn(eqn: JaxprEqn, invars: Sequence[Any], outvars: Sequence[Var], body: Jaxpr,
              consts: Sequence[Any], in_like: Sequence[int | None], out_like: Sequence[int | None]):
    """A call like `eqn` (same primitive and options) on new operands and body."""
    closed = ClosedJaxpr(body, consts)
    if eqn.primitive is prims.jit_p:
        params = jaxutil.jit_params(eqn.params, closed, list(in_like), list(out_like))
    else:
        params = dict(eqn.params, call_jaxpr=closed)
    return jaxutil.new_eqn(list(invars), list(outvars), eqn.primitive, params, eqn)


_CALLS = {prims.jit_p: "jaxpr", prims.closed_call_p: "call_jaxpr"}  # primitive -> its body


def _open_scan(eqn: JaxprEqn, wanted: Sequence[bool], policy: Any):
    """A known scan split by `policy` inside, for the wanted outputs (as `_open_call`).

    What the policy saves in the body is stacked by the known scan; a second scan
    recomputes the rest per iteration from those stacks. A carry the recomputation
    reads is recomputed with it from the initial carry (the carry-out is saved or
    recomputed in the body like any value), so a carry is never stacked for its own
    sake: jax keeps the same residuals.
    """
    params = eqn.params
    closed: ClosedJaxpr = params["jaxpr"]
    body = closed.jaxpr
    n_c, n_k = params["num_consts"], params["num_carry"]
    carry_in, carry_out = body.invars[n_c:n_c + n_k], body.outvars[:n_k]
    wanted_ys = [o for o, w in zip(body.outvars[n_k:], wanted[n_k:], strict=True) if w]

    def step(carried: list[bool]) -> list[bool]:
        inner = _rematerialize(body.eqns, [*_pick(carry_out, carried), *wanted_ys], policy)
        return [v in inner.inputs for v in carry_in]

    carried = fixed_point(step, wanted[:n_k])
    inner = _rematerialize(body.eqns, [*_pick(carry_out, carried), *wanted_ys], policy)
    returned = {o: v for o, v in zip(body.outvars[n_k:], eqn.outvars[n_k:], strict=True)
                if _is_var(o) and type(v) is Var}
    extra = [v for v in inner.saved if v not in returned]
    known_body = jaxutil.new_jaxpr(body.constvars, body.invars, [*body.outvars, *extra], inner.known)
    known_params = dict(params, jaxpr=ClosedJaxpr(known_body, closed.consts))
    out_avals, _ = prims.scan_p.abstract_eval(*(x.aval for x in eqn.invars), **known_params)
    fresh = dict(zip(extra, (Var(a) for a in out_avals[len(eqn.outvars):]), strict=True))
    known = jaxutil.new_eqn(eqn.invars, [*eqn.outvars, *fresh.values()], prims.scan_p, known_params, eqn)
    outer_of = {v: returned.get(v) or fresh[v] for v in inner.saved}
    ys = [j for j, (o, w) in enumerate(zip(body.outvars[n_k:], wanted[n_k:], strict=True))
          if w and not (_is_var(o) and outer_of.get(o) is eqn.outvars[n_k + j])]
    uses = set(inner.inputs)
    consts, xs = [i for i in range(n_c) if body.invars[i] in uses], [
        i for i in range(n_c + n_k, len(body.invars)) if body.invars[i] in uses]
    carries = [n_c + k for k in range(n_k) if carried[k]]
    if not ys and not carries and not inner.recompute:
        return known, None, list(outer_of.values()), []
    ins = [*consts, *carries, *xs]
    again_body = jaxutil.new_jaxpr(
        body.constvars, [*(body.invars[i] for i in ins), *inner.saved],
        [*_pick(carry_out, carried), *(body.outvars[n_k + j] for j in ys)], inner.recompute)
    again_params = dict(params, jaxpr=ClosedJaxpr(again_body, closed.consts), num_consts=len(consts),
                        num_carry=len(carries))
    finals = [eqn.outvars[k] if wanted[k] else Var(eqn.outvars[k].aval) for k in range(n_k) if carried[k]]
    again = jaxutil.new_eqn([*(eqn.invars[i] for i in ins), *outer_of.values()],
                            [*finals, *(eqn.outvars[n_k + j] for j in ys)], prims.scan_p, again_params, eqn)
    return known, again, list(outer_of.values()), [eqn.invars[i] for i in ins]


def _pick(xs: Sequence[Any], flags: Sequence[bool]) -> list[Any]:
    return [x for x, f in zip(xs, flags, strict=True) if f]


_OPENERS = {prims.jit_p: _open_call, prims.closed_call_p: _open_call, prims.scan_p: _open_scan}


def _remat_partial_eval(eqn: JaxprEqn, unknowns: Sequence[bool]):
    params = eqn.params
    jaxpr: Jaxpr = params["jaxpr"]
    split = linearize.partial_eval(jaxpr, unknowns)
    remat = _rematerialize(split.known.eqns, _residual_vars(split), params["policy"])
    outer = dict(zip(jaxpr.invars, eqn.invars, strict=True))
    inputs, computed = remat.inputs, remat.saved
    assert all(v in outer for v in inputs), "a checkpoint's body has no constants"
    known_outs = _known_outs(split)
    known_body = jaxutil.new_jaxpr([], split.known.invars, [*known_outs, *computed],
                                   linearize.dce(remat.known, [*known_outs, *computed]))
    computed_vars = [Var(v.aval) for v in computed]
    known = [not u for u in unknowns]
    known_eqn = jaxutil.new_eqn(
        [x for x, k in zip(eqn.invars, known, strict=True) if k],
        [*(v for v, u in zip(eqn.outvars, split.out_unknowns, strict=True) if not u),
         *computed_vars], prims.remat_p,
        dict(params, jaxpr=known_body, prevent_cse=_cse_flags(
            params["prevent_cse"], lambda f: [x for x, k in zip(f, known, strict=True) if k])), eqn)
    if not any(split.out_unknowns):
        return [known_eqn], [], split.out_unknowns
    uk_in = split.staged.invars[split.num_res:]
    staged_body = jaxutil.new_jaxpr([], [*inputs, *computed, *uk_in], split.staged.outvars,
                                    [*remat.recompute, *split.staged.eqns])
    staged_eqn = jaxutil.new_eqn(
        [*(outer[v] for v in inputs), *computed_vars,
         *(x for x, u in zip(eqn.invars, unknowns, strict=True) if u)],
        [v for v, u in zip(eqn.outvars, split.out_unknowns, strict=True) if u], prims.remat_p,
        dict(params, jaxpr=staged_body, differentiated=True, prevent_cse=_cse_flags(
            params["prevent_cse"], lambda f: [*[True] * (len(inputs) + len(computed)),
                                              *(x for x, k in zip(f, known, strict=True) if not k)])),
        eqn)
    return [known_eqn], [staged_eqn], split.out_unknowns


def _remat_transpose(cts, *args, jaxpr, prevent_cse, differentiated, policy):
    undefined = tuple(is_undefined(x) for x in args)
    ct_nonzeros = tuple(not is_zero(ct) for ct in cts)
    body = transpose_of_closed(ClosedJaxpr(jaxpr, ()), undefined, ct_nonzeros)
    body, consts = _consts_as_args(body)
    prevent_cse = _cse_flags(prevent_cse, lambda f: [
        *[False] * len(consts), *(x for x, u in zip(f, undefined, strict=True) if not u),
        *[True] * sum(ct_nonzeros)])
    cts_in = prims.remat_p.bind(
        *consts, *(x for x in args if not is_undefined(x)), *(ct for ct in cts if not is_zero(ct)),
        jaxpr=body.jaxpr, prevent_cse=prevent_cse, differentiated=differentiated, policy=policy)
    return merge(undefined, cts_in, [None] * undefined.count(False))


rules.jvp_rules[prims.remat_p] = _remat_jvp  # remat of the JVP'd body
rules.partial_eval_rules[prims.remat_p] = _remat_partial_eval
rules.transpose_rules[prims.remat_p] = _remat_transpose  # remat of the transposed body


def _name_jvp(primals, tangents, *, name):
    (x,), (x_dot,) = primals, tangents
    return prims.name_p.bind(x, name=name), x_dot  # the tangent is not named, as in jax


rules.jvp_rules[prims.name_p] = _name_jvp  # checkpoint_name is the identity
rules.transpose_rules[prims.name_p] = lambda ct, x, *, name: [ct]


# --- custom_linear_solve: implicit differentiation of A x = b -----------------------------


def _linear_solve_jvp(primals, tangents, *, const_lengths, jaxprs):
    x = prims.linear_solve_p.bind(*primals, const_lengths=const_lengths, jaxprs=jaxprs)
    n_consts = sum(const_lengths)
    b_dot = tangents[n_consts:]
    rhs = list(b_dot)
    mv_consts = primals[:const_lengths.matvec]
    mv_dots = tangents[:const_lengths.matvec]
    if any(not is_zero(t) for t in mv_dots):
        # d(A x) = dA x + A dx = db, so dx = A^{-1} (db - dA x).
        x_zeros = [Zero.like(xi) for xi in x[:len(b_dot)]]
        _, dA_x = jvp_closed(jaxprs.matvec, [*mv_consts, *x[:len(b_dot)]], [*mv_dots, *x_zeros])
        rhs = [add_tangents(r, t if is_zero(t) else lax.neg(t)) for r, t in zip(rhs, dA_x, strict=True)]
    zeros = [Zero.like(xi) for xi in x]
    if all(is_zero(r) for r in rhs):
        return x, zeros
    x_dot = prims.linear_solve_p.bind(*primals[:n_consts], *map(instantiate, rhs),
                                      const_lengths=const_lengths, jaxprs=jaxprs)
    return x, [*x_dot[:len(b_dot)], *zeros[len(b_dot):]]  # aux outputs have no tangent


def _linear_solve_transpose(cts, *args, const_lengths, jaxprs):
    if jaxprs.transpose_solve is None:
        raise TypeError("transpose_solve required for backwards mode automatic "
                        "differentiation of custom_linear_solve")
    n_consts = sum(const_lengths)
    consts, b = args[:n_consts], args[n_consts:]
    assert not any(map(is_undefined, consts)), "a linear solve is linear in b only"
    assert all(is_zero(ct) for ct in cts[len(b):]), "aux outputs of a solve have no cotangent"
    groups = partition(consts, *const_lengths)[:-1]
    t_consts = [x for g in (groups[1], groups[0], groups[3], groups[2]) for x in g]
    ct_b = prims.linear_solve_p.bind(  # b = A^{-T} ct
        *t_consts, *map(instantiate, cts[:len(b)]),
        const_lengths=const_lengths.transpose(), jaxprs=jaxprs.transpose())
    return [*[None] * n_consts,
            *(ct if is_undefined(x) else None for x, ct in zip(b, ct_b[:len(b)], strict=True))]


rules.jvp_rules[prims.linear_solve_p] = _linear_solve_jvp  # dx = solve(db - dA x)
rules.transpose_rules[prims.linear_solve_p] = _linear_solve_transpose  # solve with A^T
