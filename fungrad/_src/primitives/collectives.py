"""Collectives under `shard_map` (psum, all_gather, ppermute, ...) and `shard_map` itself."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
from jax import lax

from fungrad._src import jaxutil, linearize, rules, transpose
from fungrad._src.jaxutil import Jaxpr, JaxprEqn, Var
from fungrad._src.jaxutil import prims as p
from fungrad._src.jvp import fill, jvp_jaxpr, merge
from fungrad._src.rules import UndefinedPrimal, defjvp_zero, deflinear, is_undefined
from fungrad._src.zeros import Zero, instantiate, is_zero

_internal = jaxutil.internal_prims

defjvp_zero(p.axis_index_p)  # an integer


# --- reductions over mesh axes ---------------------------------------------------------

def _psum_transpose(ct, x, *, axes, axis_index_groups):
    # psum is a sum then a broadcast to every member: its transpose is a psum again.
    named = tuple(a for a in axes if not isinstance(a, int))
    positional = tuple(a for a in axes if isinstance(a, int))
    if positional:
        kept = tuple(d for d in range(len(x.aval.shape)) if d not in positional)
        ct = lax.broadcast_in_dim(ct, x.aval.shape, kept)
    if named:
        ct = p.psum_p.bind(ct, axes=named, axis_index_groups=axis_index_groups)
    return [ct]


deflinear(p.psum_p, _psum_transpose)

if "psum_invariant_p" in _internal and "pvary_p" in _internal:
    _psum_invariant_p = _internal["psum_invariant_p"]
    _pvary_p = _internal["pvary_p"]

    def _pvary(x, axes):
        new = tuple(a for a in axes if a not in jaxutil.varying_axes(jaxutil.typeof(x)))
        return _pvary_p.bind(x, axes=new) if new else x

    # psum (varying -> invariant) and pvary (invariant -> varying) transpose to each other.
    deflinear(_psum_invariant_p, lambda ct, x, *, axes: [_pvary(ct, axes)])
    deflinear(_pvary_p, lambda ct, x, *, axes: [_psum_invariant_p.bind(ct, axes=axes)])


def _pextremum_jvp(prim):
    def rule(primals, tangents, *, axes, axis_index_groups):
        # The tangent of the members holding the extremum, averaged over ties (as reduce_max).
        (x,), (x_dot,) = primals, tangents
        ans = prim.bind(x, axes=axes, axis_index_groups=axis_index_groups)
        at_extremum = lax.eq(x, ans)
        picked = lax.select(at_extremum, x_dot, lax.full_like(x_dot, 0))
        count = lax.convert_element_type(at_extremum, x_dot.dtype)
        total = lax.psum(picked, axes, axis_index_groups=axis_index_groups)
        return ans, lax.div(total, lax.psum(count, axes, axis_index_groups=axis_index_groups))
    return rule


rules.jvp_rules[p.pmax_p] = _pextremum_jvp(p.pmax_p)
rules.jvp_rules[p.pmin_p] = _pextremum_jvp(p.pmin_p)


# --- data movement between members: linear --------------------------------------------

def _all_gather_transpose(ct, x, *, all_gather_dimension, axis_name, axis_index_groups,
                          axis_size, tiled):
    # Each member gets back the sum of the cotangents of its own block.
    del x, axis_size
    return [lax.psum_scatter(ct, axis_name, scatter_dimension=all_gather_dimension,
                             axis_index_groups=axis_index_groups, tiled=tiled)]


deflinear(p.all_gather_p, _all_gather_transpose)

if "all_gather_invariant_p" in _internal:
    def _all_gather_invariant_transpose(ct, x, *, all_gather_dimension, axis_name,
                                        axis_size, tiled):
        # The gathered value is the same everywhere: each member keeps its own block.
        del x
        size = ct.shape[all_gather_dimension] // axis_size
        start = lax.mul(lax.axis_index(axis_name), size)
        block = lax.dynamic_slice_in_dim(ct, start, size, axis=all_gather_dimension)
        return [block if tiled else lax.squeeze(block, (all_gather_dimension,))]

    deflinear(_internal["all_gather_invariant_p"], _all_gather_invariant_transpose)

if "reduce_scatter_p" in _internal:
    def _reduce_scatter_transpose(ct, x, *, scatter_dimension, axis_name, axis_index_groups,
                                  axis_size, tiled):
        del x, axis_size
        return [lax.all_gather(ct, axis_name, axis_index_groups=axis_index_groups,
                               axis=scatter_dimension, tiled=tiled)]

    deflinear(_internal["reduce_scatter_p"], _reduce_scatter_transpose)


def _all_to_all_transpose(ct, x, *, axis_name, split_axis, concat_axis, axis_index_groups,
                          tiled):
    # Send every block back: split where it was concatenated and vice versa.
    del x
    return [p.all_to_all_p.bind(ct, axis_name=axis_name, split_axis=concat_axis,
                                concat_axis=split_axis, axis_index_groups=axis_index_groups,
                                tiled=tiled)]


deflinear(p.all_to_all_p, _all_to_all_transpose)


def _ppermute_transpose(ct, x, *, axis_name, perm):
    del x
    return [p.ppermute_p.bind(ct, axis_name=axis_name, perm=tuple((d, s) for s, d in perm))]


deflinear(p.ppermute_p, _ppermute_transpose)  # the inverse permutation


def _ragged_all_to_all_jvp(primals, tangents, *, axis_name, axis_index_groups):
    # Linear in (operand, output) jointly: the tangents travel the same ragged routes.
    (operand, output, *routes), (operand_dot, output_dot, *_) = primals, tangents
    params = dict(axis_name=axis_name, axis_index_groups=axis_index_groups)
    ans = p.ragged_all_to_all_p.bind(operand, output, *routes, **params)
    if is_zero(operand_dot) and is_zero(output_dot):
        return ans, Zero.like(ans)
    ans_dot = p.ragged_all_to_all_p.bind(instantiate(operand_dot), instantiate(output_dot),
                                         *routes, **params)
    return ans, ans_dot


def _received_rows(ct, starts, sizes):
    """Which rows of `ct` some slice [start, start + size) was written to: +1 at each
    start, -1 at each end, summed up (so an empty slice marks nothing)."""
    edges = jnp.zeros(ct.shape[0], jnp.int32)
    edges = edges.at[starts].add(1, mode="drop").at[starts + sizes].add(-1, mode="drop")
    covered = lax.gt(lax.cumsum(edges, axis=0), lax.full_like(edges, 0))
    return lax.broadcast_in_dim(covered, ct.shape, (0,))


def _ragged_all_to_all_transpose(ct, operand, output, input_offsets, send_sizes,
                                 output_offsets, recv_sizes, *, axis_name, axis_index_groups):
    # Every received slice goes back to the rows it was read from (the same call with the
    # sending and receiving roles swapped); `output` keeps the cotangent of the rows that
    # nothing overwrote. Like jax's, it assumes no operand row is sent twice (the second
    # cotangent would overwrite the first instead of adding to it).
    def exchange(x):  # the offsets each peer used for the slices this member holds
        return p.all_to_all_p.bind(x, axis_name=axis_name, split_axis=0, concat_axis=0,
                                   axis_index_groups=axis_index_groups, tiled=True)

    written_at = exchange(output_offsets)
    operand_ct = output_ct = None
    if is_undefined(operand):
        zeros = lax.full_like(ct, 0, operand.aval.dtype, operand.aval.shape)
        operand_ct = p.ragged_all_to_all_p.bind(
            ct, zeros, written_at, recv_sizes, exchange(input_offsets), send_sizes,
            axis_name=axis_name, axis_index_groups=axis_index_groups)
    if is_undefined(output):
        output_ct = lax.select(_received_rows(ct, written_at, recv_sizes),
                               lax.full_like(ct, 0), ct)
    return [operand_ct, output_ct, None, None, None, None]


rules.jvp_rules[p.ragged_all_to_all_p] = _ragged_all_to_all_jvp
rules.transpose_rules[p.ragged_all_to_all_p] = _ragged_all_to_all_transpose

if "pbroadcast_p" in _internal:
    def _pbroadcast_transpose(ct, x, *, axis_name, source):
        # Everything broadcast came from `source`: it gets the sum, the others zero.
        del x
        total = lax.psum(ct, axis_name)
        is_source = lax.eq(lax.axis_index(axis_name), source)
        return [lax.select(is_source, lax.full_like(ct, total), lax.full_like(ct, 0))]

    deflinear(_internal["pbroadcast_p"], _pbroadcast_transpose)


# --- shard_map: the body transformed, re-emitted as a shard_map ------------------------

def _ctx(params: dict) -> dict:
    return dict(mesh=params["mesh"], newly_manual_axes=params["newly_manual_axes"],
                check_vma=params["check_vma"])


def _consts_first(jaxpr: Jaxpr) -> Jaxpr:
    return jaxutil.new_jaxpr([], [*jaxpr.constvars, *jaxpr.invars], jaxpr.outvars, jaxpr.eqns)


def _emit(args: Sequence[Any], body: Jaxpr, consts: Sequence[Any], in_specs: Sequence[Any],
          out_specs: Sequence[Any], ctx: dict) -> list[Any]:
    """Runs `body` (with its constants as replicated leading inputs) as a shard_map."""
    rep = jaxutil.replicated_spec()
    params = dict(ctx, jaxpr=_consts_first(body), in_specs=(*[rep] * len(consts), *in_specs),
                  out_specs=tuple(out_specs))
    return jaxutil.bind_shard_map([*consts, *args], params)


@jaxutil.weak_cache
def _jvp_body(jaxpr: Jaxpr, nonzeros: tuple[bool, ...], mesh: Any,
              newly_manual_axes: frozenset, check_vma: bool):
    """The body in forward mode: (primals, nonzero tangents) -> (outs, nonzero out tangents)."""
    n = len(jaxpr.invars)
    out_nonzeros: list[bool] = []

    def fun(*args):
        zeros = [Zero(v.aval.to_tangent_aval()) for v in jaxpr.invars]
        outs, out_dots = jvp_jaxpr(jaxpr, (), args[:n], fill(nonzeros, args[n:], zeros))
        out_nonzeros[:] = [not is_zero(t) for t in out_dots]
        return [*outs, *(t for t in out_dots if not is_zero(t))]

    avals = [v.aval for v in jaxpr.invars]
    dot_avals = [a.to_tangent_aval() for a, nz in zip(avals, nonzeros, strict=True) if nz]
    body, consts = jaxutil.trace_in_shard_map(fun, [*avals, *dot_avals], mesh=mesh,
                                              newly_manual_axes=newly_manual_axes,
                                              check_vma=check_vma)
    return body, consts, out_nonzeros


def _shard_map_jvp(primals, tangents, *, jaxpr, in_specs, out_specs, **params):
    # d shard_map(f) = shard_map(jvp f), the tangents split like their primals.
    ctx = _ctx(params)
    nonzeros = tuple(not is_zero(t) for t in tangents)
    body, consts, out_nonzeros = _jvp_body(jaxpr, nonzeros, *ctx.values())
    dot_in_specs = [s for s, nz in zip(in_specs, nonzeros, strict=True) if nz]
    dot_out_specs = [s for s, nz in zip(out_specs, out_nonzeros, strict=True) if nz]
    outs = _emit([*primals, *(t for t in tangents if not is_zero(t))], body, consts,
                 [*in_specs, *dot_in_specs], [*out_specs, *dot_out_specs], ctx)
    n_out = len(out_specs)
    zeros = [Zero(jaxutil.typeof(x).to_tangent_aval()) for x in outs[:n_out]]
    return outs[:n_out], fill(out_nonzeros, outs[n_out:], zeros)


def _stacked_residuals(split: linearize.Split, ctx: dict):
    """The known part with each residual given a leading singleton dimension (so that
    a scalar residual can leave the shard_map too), and the staged part taking them so."""
    known, staged, num_res = split.known, split.staged, split.num_res
    n_known_out = len(known.outvars) - num_res

    def known_fun(*args):
        outs = jaxutil.eval_jaxpr(known, (), *args)
        return [*outs[:n_known_out], *(lax.expand_dims(r, (0,)) for r in outs[n_known_out:])]

    def staged_fun(*args):
        res = [lax.squeeze(r, (0,)) for r in args[:num_res]]
        return jaxutil.eval_jaxpr(staged, (), *res, *args[num_res:])

    known_jaxpr, known_consts = jaxutil.trace_in_shard_map(
        known_fun, [v.aval for v in known.invars], **ctx)
    res_avals = [v.aval for v in known_jaxpr.outvars[n_known_out:]]
    staged_jaxpr, staged_consts = jaxutil.trace_in_shard_map(
        staged_fun, [*res_avals, *(v.aval for v in staged.invars[num_res:])], **ctx)
    return known_jaxpr, known_consts, staged_jaxpr, staged_consts, res_avals


def _shard_map_partial_eval(eqn: JaxprEqn, unknowns: Sequence[bool]):
    # Known shard_map: known inputs -> known outputs and residuals (stacked over the
    # axes they vary along); staged shard_map: residuals and unknown inputs -> the rest.
    params = eqn.params
    ctx = _ctx(params)
    split = linearize.partial_eval(params["jaxpr"], unknowns)
    known_jaxpr, known_consts, staged_jaxpr, staged_consts, res_avals = _stacked_residuals(
        split, ctx)
    assert not known_consts and not staged_consts, "split bodies close over no constants"
    res_specs = [jaxutil.shard_map_residual_spec(a, **ctx) for a in res_avals]
    residuals = [Var(jaxutil.shard_map_global_aval(a, s, **ctx))
                 for a, s in zip(res_avals, res_specs, strict=True)]
    in_specs, out_specs = params["in_specs"], params["out_specs"]
    known_out = [i for i, u in enumerate(split.out_unknowns) if not u]
    staged_out = [i for i, u in enumerate(split.out_unknowns) if u]
    known_eqn = jaxutil.new_eqn(
        [v for v, u in zip(eqn.invars, unknowns, strict=True) if not u],
        [*(eqn.outvars[i] for i in known_out), *residuals], eqn.primitive,
        dict(params, jaxpr=known_jaxpr,
             in_specs=tuple(s for s, u in zip(in_specs, unknowns, strict=True) if not u),
             out_specs=(*(out_specs[i] for i in known_out), *res_specs)), eqn)
    staged_eqn = jaxutil.new_eqn(
        [*residuals, *(v for v, u in zip(eqn.invars, unknowns, strict=True) if u)],
        [eqn.outvars[i] for i in staged_out], eqn.primitive,
        dict(params, jaxpr=staged_jaxpr,
             in_specs=(*res_specs, *(s for s, u in zip(in_specs, unknowns, strict=True) if u)),
             out_specs=tuple(out_specs[i] for i in staged_out)), eqn)
    return [known_eqn], [staged_eqn], split.out_unknowns


def _mentioned(spec: Any) -> set[Any]:
    names: set[Any] = set()
    for entry in spec:
        if entry is not None:
            names.update(entry if isinstance(entry, tuple) else (entry,))
    return names


def _unmentioned(spec: Any, ctx: dict) -> tuple[Any, ...]:
    return tuple(n for n in ctx["mesh"].axis_names
                 if n in ctx["newly_manual_axes"] and n not in _mentioned(spec))


@jaxutil.weak_cache
def _transpose_body(jaxpr: Jaxpr, undefined: tuple[bool, ...], ct_nonzeros: tuple[bool, ...],
                    in_specs: tuple, out_specs: tuple, mesh: Any, newly_manual_axes: frozenset,
                    check_vma: bool):
    """The body transposed: (known inputs, nonzero cts) -> cts of the linear inputs."""
    ctx = dict(mesh=mesh, newly_manual_axes=newly_manual_axes, check_vma=check_vma)
    n_known = undefined.count(False)
    in_avals = [v.aval for v in jaxpr.invars]
    sizes = ctx["mesh"].shape

    def fun(*args):
        known, nz_cts = args[:n_known], args[n_known:]
        cts = fill(ct_nonzeros, nz_cts, [Zero(v.aval.to_tangent_aval()) for v in jaxpr.outvars])
        if not check_vma:  # an output replicated over an axis gets its cotangent once per member
            cts = [ct if is_zero(ct) else
                   lax.div(ct, lax.full_like(ct, math.prod(sizes[n] for n in _unmentioned(s, ctx))))
                   for ct, s in zip(cts, out_specs, strict=True)]
        linear = [UndefinedPrimal(a) for a, u in zip(in_avals, undefined, strict=True) if u]
        cts_in = transpose.backward_pass(jaxpr, merge(undefined, linear, known), cts)
        out = []
        for ct, u, s in zip(cts_in, undefined, in_specs, strict=True):
            if u:
                ct = instantiate(ct)
                if not check_vma and _unmentioned(s, ctx):
                    ct = lax.psum(ct, _unmentioned(s, ctx))
                out.append(ct)
        return out

    known_avals = [a for a, u in zip(in_avals, undefined, strict=True) if not u]
    ct_avals = [v.aval.to_tangent_aval() for v, nz in zip(jaxpr.outvars, ct_nonzeros, strict=True)
                if nz]
    return jaxutil.trace_in_shard_map(fun, [*known_avals, *ct_avals], **ctx)


def _shard_map_transpose(cts, *args, jaxpr, in_specs, out_specs, **params):
    # The transpose of shard_map(f) is shard_map(transpose f): cotangents split like the
    # outputs going in and like the inputs coming out.
    ctx = _ctx(params)
    undefined = tuple(is_undefined(x) for x in args)
    ct_nonzeros = tuple(not is_zero(ct) for ct in cts)
    body, consts = _transpose_body(jaxpr, undefined, ct_nonzeros, tuple(in_specs),
                                   tuple(out_specs), *ctx.values())
    specs_in = [*(s for s, u in zip(in_specs, undefined, strict=True) if not u),
                *(jaxutil.cotangent_spec(s) for s, nz in zip(out_specs, ct_nonzeros, strict=True)
                  if nz)]
    specs_out = [jaxutil.cotangent_spec(s) for s, u in zip(in_specs, undefined, strict=True) if u]
    cts_in = _emit([*(x for x in args if not is_undefined(x)), *(ct for ct in cts if not is_zero(ct))],
                   body, consts, specs_in, specs_out, ctx)
    return merge(undefined, cts_in, [None] * undefined.count(False))


if "shard_map_p" in _internal:
    _shard_map_p = _internal["shard_map_p"]
    rules.jvp_rules[_shard_map_p] = _shard_map_jvp
    rules.partial_eval_rules[_shard_map_p] = _shard_map_partial_eval
    rules.transpose_rules[_shard_map_p] = _shard_map_transpose
