"""fungrad.explain: what a gradient costs, by the user's source line.

The residuals are the values the primal part of a linearized program hands to its linear
part (`LinearProgram.primal`'s outputs after the first `num_outs`): what reverse mode keeps
alive between the forward and the backward pass. Each is traced to the equation that made
it (through nested jit and checkpoint bodies and scan bodies, a scan's residual counted at
its full stacked size) and so to the user's line. FLOPs come from a per-primitive model
applied to the captured program (forward) and to the traced transpose of the linear part
(backward, with any recompute a `jax.checkpoint` asks for).
"""

from __future__ import annotations

import functools
import linecache
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import jax
import numpy as np
from jax import tree_util

from fungrad._src import api, api_util, jaxutil
from fungrad._src.jaxutil import ClosedJaxpr, Jaxpr, JaxprEqn, Literal, Var
from fungrad._src.jvp import fill
from fungrad._src.linearize import LinearProgram, linearize_program
from fungrad._src.zeros import Zero, has_tangent_space, instantiate

Location = tuple[str, int, str]  # (file, line, function) of the user's code
INPUTS = "(inputs)"  # residuals that are the function's inputs or constants: alive anyway
UNATTRIBUTED = "(fungrad)"  # equations with no user line (sums of cotangents, zeros)

# --- the FLOP model ---------------------------------------------------------------------

# Data movement only: 0 FLOPs (their bytes are counted in `bytes_moved`).
_STRUCTURAL = frozenset({
    "reshape", "broadcast_in_dim", "transpose", "squeeze", "expand_dims", "slice",
    "dynamic_slice", "dynamic_update_slice", "concatenate", "pad", "gather", "select_n",
    "convert_element_type", "copy", "copy_p", "iota", "rev", "device_put", "name", "split",
    "optimization_barrier", "sharding_constraint", "bitcast_convert_type",
    "reduce_precision", "stop_gradient", "full_like", "zeros_like",
})
# One FLOP per element read.
_REDUCTIONS = frozenset({
    "reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "reduce_and", "reduce_or",
    "reduce_xor", "argmax", "argmin", "cumsum", "cumprod", "cummax", "cummin", "cumlogsumexp",
})


def _size(aval: Any) -> int:
    return int(np.prod(aval.shape, dtype=np.int64)) if hasattr(aval, "shape") else 1


def _nbytes(aval: Any) -> int:
    return _size(aval) * np.dtype(aval.dtype).itemsize


def eqn_flops(eqn: JaxprEqn) -> int:
    """FLOPs of one equation without nested programs (a multiply-add counts 2).

    dot_general: 2 per output element per contracted element; convolution: 2 per output
    element per kernel element feeding it; reductions: one per input element; windowed
    reductions: one per output element per window element; data movement: 0; the rest
    (elementwise, transcendental included, weight 1): one per output element.
    """
    name = eqn.primitive.name
    out = eqn.outvars[0].aval if eqn.outvars else None
    if name in _STRUCTURAL or out is None:
        return 0
    if name == "dot_general":
        (lhs_contract, _), _ = eqn.params["dimension_numbers"]
        lhs_shape = _shape(eqn.invars[0])
        return 2 * _size(out) * int(np.prod([lhs_shape[d] for d in lhs_contract], dtype=np.int64))
    if name == "conv_general_dilated":
        out_feature_dim = eqn.params["dimension_numbers"].rhs_spec[0]
        rhs_shape = _shape(eqn.invars[1])
        return 2 * _size(out) * (_size(eqn.invars[1].aval) // max(rhs_shape[out_feature_dim], 1))
    if name in _REDUCTIONS:
        return _size(eqn.invars[0].aval)
    if name.startswith("reduce_window") or name.startswith("select_and_"):
        window = int(np.prod(eqn.params.get("window_dimensions", (1,)), dtype=np.int64))
        return _size(out) * window
    if name.startswith("scatter"):
        return _size(eqn.invars[2].aval)  # one combine per update element
    return sum(_size(v.aval) for v in eqn.outvars)


_JITS = frozenset({"jit", "pjit"})  # the primitive's name in jax 0.10 and before


def _shape(var: Any) -> tuple[int, ...]:
    return var.aval.shape


def _sub_jaxprs(eqn: JaxprEqn) -> list[Jaxpr]:
    found: list[Jaxpr] = []
    for value in eqn.params.values():
        for item in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(item, ClosedJaxpr):
                found.append(item.jaxpr)
            elif isinstance(item, Jaxpr):
                found.append(item)
    return found


# --- where an equation comes from ---------------------------------------------------------


_FUNGRAD_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
_THIS_FILE = os.path.abspath(__file__)


def _user_line(eqn: JaxprEqn) -> Location | None:
    """The innermost frame of the user's code in `eqn`'s traceback, past fungrad's frames
    (a custom_jvp rule fungrad traces for the user's call); None for an equation fungrad
    made while this module traced the backward pass outside any rule's context (the sum
    of two cotangents of a value used twice)."""
    for frame in jaxutil.user_frames(eqn):
        if os.path.abspath(frame[0]) == _THIS_FILE:
            return None
        if not frame[0].startswith(_FUNGRAD_DIR):
            return frame
    return None


def _location(eqn: JaxprEqn, enclosing: Location | None, in_jit: bool) -> Location | None:
    """The user's line of `eqn`, inside an equation at `enclosing` (None at top level),
    which is a `jit` if `in_jit`.

    jax reuses the jaxpr of a jitted library function (`jnp.where`) across calls with the
    same types, so its equations may name the call site of another line of the same
    function: there the enclosing line is the one that ran. A body in another function
    (the user's jitted layer, a scan step) keeps its own lines.
    """
    loc = _user_line(eqn)
    if loc is None or (in_jit and enclosing is not None
                       and (loc[0], loc[2]) == (enclosing[0], enclosing[2])):
        return enclosing
    return loc


def _locations(jaxpr: Jaxpr, enclosing: Location | None, cache: dict,
               in_jit: bool = False) -> list[Location | None]:
    """`_location` of each equation of `jaxpr`; one without a line of its own takes that of
    the equation before it (or, first of all, after it).

    Such equations come from a custom_jvp rule (jax.nn.relu's, softmax's), which fungrad
    traces apart from the user's code and inlines where the call was, or from fungrad's
    own sums of cotangents, emitted next to the transpose of the value's last use.
    """
    key = (id(jaxpr), enclosing, in_jit)
    if key not in cache:
        locs = [_location(eqn, enclosing, in_jit) for eqn in jaxpr.eqns]
        known = [loc for loc in locs if loc is not None]
        last = known[0] if known else None
        for i, loc in enumerate(locs):
            locs[i] = last = loc if loc is not None else last
        cache[key] = (jaxpr, locs)  # the jaxpr is kept so that its id stays unique
    return cache[key][1]


@dataclass
class _Line:
    """What one source line costs, accumulated while walking the programs."""

    primitives: dict[str, None] = field(default_factory=dict)
    residual_bytes: int = 0
    residual_shapes: list[tuple[int, str]] = field(default_factory=list)
    forward_flops: int = 0
    backward_flops: int = 0
    bytes_moved: int = 0


def _key(loc: Location | None) -> Any:
    return UNATTRIBUTED if loc is None else (loc[0], loc[1])


def _count_flops(jaxpr: Jaxpr, lines: dict, enclosing: Location | None, times: int,
                 attr: str, names: dict, cache: dict, in_jit: bool = False) -> None:
    """Adds the FLOPs of `jaxpr` (run `times` times) to `lines[key].<attr>`."""
    for eqn, loc in zip(jaxpr.eqns, _locations(jaxpr, enclosing, cache, in_jit), strict=True):
        names.setdefault(_key(loc), loc)
        line = lines.setdefault(_key(loc), _Line())
        name = eqn.primitive.name
        subs = _sub_jaxprs(eqn)
        if not subs:
            if attr == "forward_flops":
                line.primitives.setdefault(name, None)
            setattr(line, attr, getattr(line, attr) + times * eqn_flops(eqn))
            if attr == "forward_flops" and name in _STRUCTURAL:
                line.bytes_moved += times * sum(_nbytes(v.aval) for v in eqn.outvars)
        elif name == "cond":  # the most expensive branch
            costs = []
            for branch in subs:
                branch_lines: dict = {}
                _count_flops(branch, branch_lines, loc, times, attr, names, cache)
                costs.append((sum(getattr(b, attr) for b in branch_lines.values()), branch_lines))
            for k, b in max(costs, key=lambda c: c[0])[1].items():
                target = lines.setdefault(k, _Line())
                setattr(target, attr, getattr(target, attr) + getattr(b, attr))
                if attr == "forward_flops":
                    target.primitives.update(b.primitives)
        else:  # a scan runs its body `length` times; a while loop's count is unknown: once
            inner = times * int(eqn.params.get("length", 1))
            for sub in subs:
                _count_flops(sub, lines, loc, inner, attr, names, cache, name in _JITS)


# --- residuals ------------------------------------------------------------------------


def _residual_source(jaxpr: Jaxpr, var: Any, enclosing: Location | None,
                     cache: dict, in_jit: bool = False) -> Location | None | str:
    """The user's line whose equation made `var`, or INPUTS where it is an input of the
    top-level program (a body's input maps back to its equation's operand)."""
    if type(var) is Literal:
        return INPUTS
    if ("producers", id(jaxpr)) not in cache:
        cache["producers", id(jaxpr)] = {v: i for i, eqn in enumerate(jaxpr.eqns) for v in eqn.outvars}
    position = cache["producers", id(jaxpr)].get(var)
    if position is None:
        return INPUTS
    eqn, loc = jaxpr.eqns[position], _locations(jaxpr, enclosing, cache, in_jit)[position]
    index = eqn.outvars.index(var)
    name = eqn.primitive.name
    body = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
    body = body.jaxpr if isinstance(body, ClosedJaxpr) else body
    if not isinstance(body, Jaxpr) or name in ("while", "cond"):
        return loc
    inner = body.outvars[index]
    if inner in body.invars:  # passed through: a scan stacks a new array; a call forwards it
        if name == "scan":
            return loc
        return _residual_source(jaxpr, eqn.invars[body.invars.index(inner)], enclosing, cache,
                                in_jit)
    found = _residual_source(body, inner, loc, cache, name in _JITS)
    return loc if found == INPUTS else found


# --- the analysis ---------------------------------------------------------------------


@dataclass(frozen=True)
class _Analysis:
    lines: dict  # key -> _Line
    locations: dict  # key -> Location | None
    residual_bytes: int
    input_bytes: int
    forward_flops: int
    backward_flops: int
    program: Jaxpr  # the captured program
    primal: Jaxpr  # its primal part: (consts, inputs) -> (outputs, residuals)
    num_outs: int


def _analyse(fun: Callable, args: tuple, nums: tuple[int, ...], has_aux: bool) -> _Analysis:
    fun_ = api._with_aux_split(fun, has_aux, "explain")
    captured, inputs, diff = api._trace(fun_, args, nums, "explain", fun)
    nonzeros = tuple(d and has_tangent_space(jaxutil.typeof(x))
                     for x, d in zip(inputs, diff, strict=True))
    program = linearize_program(captured.jaxpr, nonzeros)
    lines: dict = {}
    names: dict = {}
    cache: dict = {}
    _count_flops(captured.jaxpr.jaxpr, lines, None, 1, "forward_flops", names, cache)
    n_out = api._num_outs(captured, has_aux)
    backward = _backward_jaxpr(program, captured.jaxpr, nonzeros, n_out)
    _count_flops(backward, lines, None, 1, "backward_flops", names, cache)
    residual_bytes = input_bytes = 0
    for var in program.primal.outvars[program.num_outs:]:
        source = _residual_source(program.primal, var, None, cache)
        key = INPUTS if source == INPUTS else _key(source)  # type: ignore[arg-type]
        names.setdefault(key, None if source == INPUTS else source)
        line = lines.setdefault(key, _Line())
        line.residual_bytes += _nbytes(var.aval)
        line.residual_shapes.append((_nbytes(var.aval), var.aval.str_short(short_dtypes=True)))
        if key == INPUTS:
            input_bytes += _nbytes(var.aval)
        else:
            residual_bytes += _nbytes(var.aval)
    return _Analysis(lines, names, residual_bytes, input_bytes,
                     sum(b.forward_flops for b in lines.values()),
                     sum(b.backward_flops for b in lines.values()),
                     captured.jaxpr.jaxpr, program.primal, program.num_outs)


def _backward_jaxpr(program: LinearProgram, closed: ClosedJaxpr, nonzeros: tuple[bool, ...],
                    n_out: int) -> Jaxpr:
    """The transpose of the linear part as equations: (residuals, output cotangents) ->
    cotangents of the differentiated inputs; outputs past `n_out` (aux) get none."""
    res_avals: list[Any] = [v.aval for v in program.primal.outvars[program.num_outs:]]
    out_avals = closed.out_avals
    ct_avals = [a.to_tangent_aval() for a, nz in zip(out_avals[:n_out], program.out_nonzeros,
                                                     strict=False) if nz]
    nz_avals = [a for a, nz in zip(closed.in_avals, nonzeros, strict=True) if nz]

    def backward(residuals, nz_cts):
        wanted = [nz and i < n_out for i, nz in enumerate(program.out_nonzeros)]
        zeros = [Zero(a.to_tangent_aval()) for a in out_avals]
        cts = fill(wanted, list(nz_cts), zeros)
        cts_in = api._transpose_apply(program, residuals, cts, nz_avals)
        return [instantiate(ct) for ct in cts_in]

    specs = [[jax.ShapeDtypeStruct(a.shape, a.dtype) for a in avals]
             for avals in (res_avals, ct_avals)]
    return jax.make_jaxpr(backward)(*specs).jaxpr


# --- where to put a checkpoint ----------------------------------------------------------

# A place a `jax.checkpoint` can go: ("line", file, line, depth), the code at a line of
# the function `depth` frames in from the one explained (its statements), or
# ("function", file, name, depth), every call of a function called from there.
Unit = tuple[str, str, Any, int]


def _chain(eqn: JaxprEqn) -> list[Location]:
    """The user's frames of `eqn`, innermost first, from its own line out to the function
    fungrad was given; empty for an equation fungrad made (see `_user_line`)."""
    chain: list[Location] = []
    for frame in jaxutil.user_frames(eqn):
        if frame[0].startswith(_FUNGRAD_DIR):
            if chain:
                break
            if os.path.abspath(frame[0]) == _THIS_FILE:
                return []
            continue
        chain.append(frame)
    return chain


def _chains(eqns: Sequence[JaxprEqn]) -> list[list[Location]]:
    """`_chain` of each equation; one without frames takes its neighbour's, as in
    `_locations`."""
    chains = [_chain(eqn) for eqn in eqns]
    last = next((c for c in chains if c), [])
    for i, chain in enumerate(chains):
        chains[i] = last = chain or last
    return chains


def _member(chain: list[Location], unit: Unit) -> tuple | None:
    """Which call of `unit` an equation with this chain is part of: (the caller's file and
    line, the line in the unit), or None where it is not part of one."""
    kind, file, what, depth = unit
    chain = chain[:len(chain) - depth]
    if not chain:
        return None
    if kind == "line":
        return (None, 0) if (chain[-1][0], chain[-1][1]) == (file, what) else None
    for k in range(len(chain) - 2, -1, -1):  # the outermost call of the function
        if (chain[k][0], chain[k][2]) == (file, what):
            return chain[k + 1][:2], chain[k][1]
    return None


def _groups(chains: list[list[Location]], units: Sequence[Unit]) -> list[int | None]:
    """For each equation, the checkpoint it falls in: consecutive equations of one call of
    a unit (the first unit that claims them); a call starts again where the caller's line
    changes or the line in the function goes back (the next turn of the caller's loop)."""
    out: list[int | None] = []
    gid, prev = -1, None
    for chain in chains:
        found = next(((u, m) for u, unit in enumerate(units)
                      if (m := _member(chain, unit)) is not None), None)
        if found is None:
            out.append(None)
            prev = None
            continue
        u, (caller, line) = found
        if prev is None or prev[:2] != (u, caller) or line < prev[2]:
            gid += 1
        prev = (u, caller, line)
        out.append(gid)
    return out


def _common_depth(chains: list[list[Location]]) -> int:
    """How many outer frames every equation shares (a wrapper such as `lambda p: loss(p,
    x, y)`): units start below them."""
    depth = 0
    while chains and all(len(c) > depth + 1 for c in chains) and len(
            {c[len(c) - 1 - depth][:2] for c in chains}) == 1:
        depth += 1
    return depth


def _units(chains: list[list[Location]]) -> list[Unit]:
    depth = _common_depth([c for c in chains if c])
    units: dict[Unit, None] = {}
    for chain in chains:
        chain = chain[:len(chain) - depth]
        if chain:
            units[("line", chain[-1][0], chain[-1][1], depth)] = None
            for frame in chain[:-1]:
                units[("function", frame[0], frame[2], depth)] = None
    return list(units)


def _run_with_checkpoints(closed: ClosedJaxpr, args: Sequence[Any], units: Sequence[Unit],
                          policy: Any) -> list[Any]:
    """Evaluates `closed` with each call of a unit inside its own `jax.checkpoint`."""
    jaxpr = closed.jaxpr
    env: dict[Any, Any] = dict(zip([*jaxpr.constvars, *jaxpr.invars], [*closed.consts, *args],
                                   strict=True))
    read = lambda v: v.val if type(v) is Literal else env[v]
    last_use = {v: i for i, eqn in enumerate(jaxpr.eqns) for v in eqn.invars if type(v) is not Literal}
    last_use.update({v: len(jaxpr.eqns) for v in jaxpr.outvars if type(v) is not Literal})
    groups = _groups(_chains(jaxpr.eqns), units)
    i = 0
    while i < len(jaxpr.eqns):
        end = i + 1
        while groups[i] is not None and end < len(groups) and groups[end] == groups[i]:
            end += 1
        eqns = jaxpr.eqns[i:end]
        made = [v for eqn in eqns for v in eqn.outvars]
        made_here = set(made)
        ins = list(dict.fromkeys(v for eqn in eqns for v in eqn.invars
                                 if type(v) is not Literal and v not in made_here))
        outs = [v for v in made if last_use.get(v, -1) >= end]
        body = functools.partial(_run_eqns, eqns, ins, outs)
        call = body if groups[i] is None else jax.checkpoint(body, policy=policy)
        env.update(zip(outs, call(*map(read, ins)), strict=True))
        i = end
    return [read(v) for v in jaxpr.outvars]


def _run_eqns(eqns: Sequence[JaxprEqn], ins: Sequence[Var], outs: Sequence[Var],
              *values: Any) -> list[Any]:
    env = dict(zip(ins, values, strict=True))
    for eqn in eqns:
        invals = [v.val if type(v) is Literal else env[v] for v in eqn.invars]
        env.update(zip(eqn.outvars, jaxutil.bind_eqn(eqn, invals), strict=True))
    return [env[v] for v in outs]


def _with_checkpoints(fun: Callable, units: Sequence[Unit], policy: Any = None) -> Callable:
    """`fun` with a `jax.checkpoint` around each call of the units (as if the user had put
    them there): traces `fun` at each call and evaluates its program so."""
    def checkpointed(*args: Any) -> Any:
        closed, out_shape = jax.make_jaxpr(fun, return_shape=True)(*args)
        outs = _run_with_checkpoints(closed, tree_util.tree_leaves(args), units, policy)
        return tree_util.tree_unflatten(tree_util.tree_structure(out_shape), outs)

    return checkpointed


# --- the report -------------------------------------------------------------------------


@dataclass(frozen=True)
class Record:
    """What one source line of the user's code costs the gradient.

    Attributes:
      where: ``"file.py:12 (function)"``, or ``"(inputs)"`` for residuals that are the
        function's own inputs or constants (alive anyway: no extra memory).
      file, line, function: the location (None for ``"(inputs)"``).
      code: the source text of the line.
      primitives: the primitives the line's forward computation binds.
      residual_bytes: bytes of the values saved at this line for the backward pass.
      residual_shapes: their types, largest first (``"f32[8,32,64]"``).
      forward_flops, backward_flops: FLOPs of the line in the function and in its
        backward pass (the transposed linear part, with any recompute).
      bytes_moved: bytes written by the line's data-movement operations (0 FLOPs).
    """

    where: str
    file: str | None
    line: int | None
    function: str | None
    code: str
    primitives: tuple[str, ...]
    residual_bytes: int
    residual_shapes: tuple[str, ...]
    forward_flops: int
    backward_flops: int
    bytes_moved: int


@dataclass(frozen=True)
class Suggestion:
    """Where to put `jax.checkpoint` so that the residuals fit a memory budget.

    Attributes:
      kind: ``"none"`` (they fit already), ``"function"`` (wrap the whole function with
        the named jax policy) or ``"calls"`` (wrap each call of the places in ``where``,
        with jax.checkpoint's default policy: nothing saved but the call's inputs).
      where: the places, as ``"file.py:108 `code`"`` or ``"function name (file.py)"``.
      policy: the name of a ``jax.checkpoint_policies`` policy, or None (the default).
      residual_bytes: the residuals that the checkpointed function keeps (measured by
        fungrad on the checkpointed program, not estimated).
      saved_bytes: how much less than without checkpoints.
      peak_bytes: residual bytes alive at once during the backward pass, about: while a
        checkpointed call is recomputed, what it makes and what was kept from before it
        (at least all that is kept); a whole-function checkpoint recomputes all at once.
      extra_backward_flops: FLOPs the recomputation adds to the backward pass.
      meets_budget: whether ``residual_bytes`` is within the budget.
    """

    kind: str
    where: tuple[str, ...]
    policy: str | None
    residual_bytes: int
    saved_bytes: int
    peak_bytes: int
    extra_backward_flops: int
    meets_budget: bool
    units: tuple = field(default=(), repr=False, compare=False)

    def apply(self, fun: Callable) -> Callable:
        """`fun` with the checkpoints put where this suggestion says (for array arguments).

        The same program as the user's code with ``jax.checkpoint`` written there.
        """
        policy = None if self.policy is None else getattr(jax.checkpoint_policies, self.policy)
        if self.kind == "none":
            return fun
        if self.kind == "function":
            return jax.checkpoint(fun, policy=policy)
        return _with_checkpoints(fun, self.units, policy)

    def __str__(self) -> str:
        if self.kind == "none":
            return f"no checkpoint needed: the residuals ({_fmt_bytes(self.residual_bytes)}) fit."
        if self.kind == "function":
            what = (f"wrap the whole function: jax.checkpoint(fun, "
                    f"policy=jax.checkpoint_policies.{self.policy})")
        else:
            what = ("put a jax.checkpoint (default policy: keep only its inputs) around each "
                    "call of: " + "; ".join(self.where))
        return (f"{what}. Residuals {_fmt_bytes(self.residual_bytes)} "
                f"(saves {_fmt_bytes(self.saved_bytes)}); peak during the backward pass about "
                f"{_fmt_bytes(self.peak_bytes)}; the backward pass recomputes "
                f"{_fmt_flops(self.extra_backward_flops)} FLOPs"
                f"{'' if self.meets_budget else '; this does NOT meet the budget'}.")


@dataclass(frozen=True)
class Report:
    """The cost of a gradient by source line: see `explain`.

    Attributes:
      name: the function's name.
      records: one `Record` per source line, most residual bytes first.
      residual_bytes: bytes the gradient keeps from the forward to the backward pass,
        inputs and constants left out (they are alive anyway).
      input_residual_bytes: residuals that are inputs or constants.
      forward_flops, backward_flops: FLOPs of the function and of its backward pass.
      memory_budget: the budget given, or None.
      suggestion: the cheapest `Suggestion` (least recomputation) that meets the budget,
        or None without a budget.
      candidates: every suggestion considered (to trade memory for FLOPs by hand).
    """

    name: str
    records: list[Record]
    residual_bytes: int
    input_residual_bytes: int
    forward_flops: int
    backward_flops: int
    memory_budget: int | None = None
    suggestion: Suggestion | None = None
    candidates: list[Suggestion] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        """Predicted cost of the backward pass over the forward pass (FLOPs)."""
        return self.backward_flops / max(self.forward_flops, 1)

    def table(self, top: int = 15) -> str:
        """The report as fixed-width text: totals, then the `top` lines by residual bytes."""
        head = [f"fungrad.explain({self.name}): residuals {_fmt_bytes(self.residual_bytes)} "
                f"(+{_fmt_bytes(self.input_residual_bytes)} of inputs and constants, alive anyway); "
                f"FLOPs forward {_fmt_flops(self.forward_flops)}, backward "
                f"{_fmt_flops(self.backward_flops)} (backward/forward {self.ratio:.2f})",
                f"{'residuals':>10} {'share':>6} {'fwd FLOPs':>10} {'bwd FLOPs':>10}  "
                f"{'largest residuals':<30} line"]
        total = max(self.residual_bytes + self.input_residual_bytes, 1)
        for r in self.records[:top]:
            head.append(f"{_fmt_bytes(r.residual_bytes):>10} {100 * r.residual_bytes / total:5.1f}% "
                        f"{_fmt_flops(r.forward_flops):>10} {_fmt_flops(r.backward_flops):>10}  "
                        f"{_shapes_summary(r.residual_shapes):<30} {_short_where(r)}")
        if len(self.records) > top:
            head.append(f"... {len(self.records) - top} more lines (Report.records has them all)")
        if self.memory_budget is not None and self.suggestion is not None:
            head.append(f"to fit {_fmt_bytes(self.memory_budget)}: {self.suggestion}")
            head += self._candidates_table()
        return "\n".join(head)

    def _candidates_table(self) -> list[str]:
        if len(self.candidates) < 2:
            return []
        rows = [f"checkpoints measured: {'kept':>10} {'peak':>10} {'recompute':>10}  where"]
        for c in self.candidates:
            what = (f"jax.checkpoint(fun, policy={c.policy})" if c.kind == "function"
                    else "each call of " + ", ".join(w.split(" `")[0] for w in c.where))
            mark = "  <- suggested" if c is self.suggestion else ""
            rows.append(f"{'':21} {_fmt_bytes(c.residual_bytes):>10} {_fmt_bytes(c.peak_bytes):>10} "
                        f"{_fmt_flops(c.extra_backward_flops):>10}  {what}{mark}")
        return rows

    def __str__(self) -> str:
        return self.table()

    def __repr__(self) -> str:
        return (f"Report({self.name}: residual_bytes={self.residual_bytes}, "
                f"forward_flops={self.forward_flops}, backward_flops={self.backward_flops}, "
                f"{len(self.records)} records{', with a suggestion' if self.suggestion else ''})")

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:  # IPython shows the table
        printer.text(repr(self) if cycle else self.table())


def _fmt_bytes(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def _fmt_flops(n: int) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)


def _shapes_summary(shapes: tuple[str, ...]) -> str:
    counts = dict.fromkeys(shapes, 0)
    for s in shapes:
        counts[s] += 1
    text = ", ".join(f"{s}" + (f" x{c}" if c > 1 else "") for s, c in list(counts.items())[:2])
    text += ", ..." if len(counts) > 2 else ""
    return text if len(text) <= 30 else text[:27] + "..."


def _short_where(r: Record) -> str:
    if r.file is None:
        return r.where
    code = r.code if len(r.code) <= 60 else r.code[:57] + "..."
    return f"{os.path.basename(r.file)}:{r.line} ({r.function})  {code}"


def _records(analysis: _Analysis) -> list[Record]:
    records = []
    for key, line in analysis.lines.items():
        loc = analysis.locations.get(key)
        shapes = tuple(s for _, s in sorted(line.residual_shapes, key=lambda bs: -bs[0]))
        if loc is None:
            where, file, number, function, code = str(key), None, None, None, ""
        else:
            file, number, function = loc
            where = f"{file}:{number} ({function})"
            code = linecache.getline(file, number).strip()
        records.append(Record(where, file, number, function, code, tuple(line.primitives),
                              line.residual_bytes, shapes, line.forward_flops,
                              line.backward_flops, line.bytes_moved))
    records.sort(key=lambda r: (-r.residual_bytes, -r.forward_flops - r.backward_flops))
    return records


# --- the search for a suggestion ----------------------------------------------------------

_NAMED_POLICIES = ("dots_with_no_batch_dims_saveable", "dots_saveable", "nothing_saveable")


@dataclass(frozen=True)
class _Problem:
    """The function as one of its differentiated arguments only, and what it costs."""

    fun: Callable  # of the differentiated arguments, the others fixed
    args: tuple
    has_aux: bool
    base: _Analysis
    budget: int

    def measure(self, kind: str, units: tuple, policy: str | None,
                peak: Callable[[int], int]) -> Suggestion:
        jax_policy = None if policy is None else getattr(jax.checkpoint_policies, policy)
        wrapped = (jax.checkpoint(self.fun, policy=jax_policy) if kind == "function"
                   else _with_checkpoints(self.fun, units, jax_policy))
        got = _analyse(wrapped, self.args, tuple(range(len(self.args))), self.has_aux)
        held = got.residual_bytes
        return Suggestion(kind, tuple(_describe(u) for u in units), policy, held,
                          self.base.residual_bytes - held, peak(held),
                          max(got.backward_flops - self.base.backward_flops, 0),
                          held <= self.budget, units)


def _suggest(fun: Callable, args: tuple, nums: tuple[int, ...], has_aux: bool,
             base: _Analysis, budget: int) -> tuple[Suggestion, list[Suggestion]]:
    """The checkpoints with the least recomputation that keep the residuals within
    `budget`, and every candidate measured."""
    if base.residual_bytes <= budget:
        fits = Suggestion("none", (), None, base.residual_bytes, 0, base.residual_bytes, 0, True)
        return fits, [fits]
    problem = _Problem(api._partial_args(fun, args, nums, {}), tuple(args[i] for i in nums),
                       has_aux, base, budget)
    # A checkpoint of the whole function recomputes everything it does not save at once.
    candidates = [problem.measure("function", (), name, lambda held: max(held, base.residual_bytes))
                  for name in _NAMED_POLICIES]
    candidates += _search_calls(problem)
    fitting = [c for c in candidates if c.meets_budget]
    best = (min(fitting, key=lambda c: (c.extra_backward_flops, c.peak_bytes)) if fitting
            else min(candidates, key=lambda c: c.residual_bytes))
    return best, candidates


class _Places:
    """Where checkpoints around calls can go in the analysed program, and the residuals
    each call holds."""

    def __init__(self, base: _Analysis):
        self.chains = _chains(base.primal.eqns)
        position = {v: i for i, eqn in enumerate(base.primal.eqns) for v in eqn.outvars}
        invars = set(base.primal.invars)
        self.residuals = [(position[v], _nbytes(v.aval))
                          for v in base.primal.outvars[base.num_outs:]
                          if v in position and v not in invars]
        self.program_chains = _chains(base.program.eqns)

    def held_in(self, units: Sequence[Unit]) -> dict[int, int]:
        """Residual bytes made inside each call of the units (by group)."""
        per_group: dict[int, int] = {}
        groups = _groups(self.chains, units)
        for pos, nbytes in self.residuals:
            group = groups[pos]
            if group is not None:
                per_group[group] = per_group.get(group, 0) + nbytes
        return per_group

    def peak(self, units: Sequence[Unit], held: int) -> int:
        """Residual bytes alive at once in the backward pass, about: while it recomputes a
        call, what that call makes plus what was kept from before the call (the backward
        pass has used what came after); at least all that is kept."""
        groups = _groups(self.chains, units)
        inside = self.held_in(units)
        starts: dict[int, int] = {}
        for pos, group in enumerate(groups):
            if group is not None:
                starts.setdefault(group, pos)
        peak = held
        for group, start in starts.items():
            before = sum(nbytes for pos, nbytes in self.residuals if pos < start and groups[pos] is None)
            peak = max(peak, before + inside.get(group, 0))
        return peak

    def ordered(self) -> list[Unit]:
        """The places by the residuals they hold, the function's own lines first, then the
        functions it calls; a place that overlaps one before it is left out."""
        sized = [(sum(self.held_in([u]).values()), u) for u in _units(self.program_chains)]
        order = sorted((su for su in sized if su[0] > 0),
                       key=lambda su: (su[1][0] != "line", -su[0]))
        chosen: list[Unit] = []
        claimed: set[int] = set()
        for _, unit in order:
            members = {i for i, c in enumerate(self.program_chains) if _member(c, unit) is not None}
            if not members & claimed:
                chosen.append(unit)
                claimed |= members
        return chosen


def _search_calls(problem: _Problem) -> list[Suggestion]:
    """Checkpoints around calls of the first k places of `_Places.ordered`, the least k
    that meets the budget (by bisection, each k measured); every k measured."""
    places = _Places(problem.base)
    chosen = places.ordered()
    measured: dict[int, Suggestion] = {}

    def measure(k: int) -> Suggestion:
        if k not in measured:
            units = tuple(chosen[:k])
            measured[k] = problem.measure("calls", units, None,
                                          functools.partial(places.peak, units))
        return measured[k]

    lo, hi = 1, len(chosen)
    while lo < hi:
        mid = (lo + hi) // 2
        if measure(mid).meets_budget:
            hi = mid
        else:
            lo = mid + 1
    if chosen:
        measure(lo)
    return [measured[k] for k in sorted(measured)]


def _describe(unit: Unit) -> str:
    kind, file, what, _ = unit
    if kind == "function":
        return f"function {what} ({os.path.basename(file)})"
    return f"{os.path.basename(file)}:{what} `{linecache.getline(file, what).strip()}`"


# --- the public function ----------------------------------------------------------------


def explain(fun: Callable, argnums: int | Sequence[int] = 0, has_aux: bool = False,
            memory_budget: int | None = None) -> Callable[..., Report]:
    """A function that reports what the gradient of `fun` costs, by source line.

    For each line of the user's code: the bytes of the values reverse mode saves there for
    the backward pass (the residuals, with their shapes), and the FLOPs of the line in the
    forward and in the backward pass; in total, the predicted backward/forward cost ratio.
    With ``memory_budget`` (bytes of residuals), a suggestion of where to put
    ``jax.checkpoint`` (and with which policy) so that they fit, with the memory saved and
    the recomputation it costs, measured on the checkpointed program.

    Args:
      fun: the function to differentiate (it may return any pytree of arrays).
      argnums: which positional argument(s) are differentiated.
      has_aux: whether ``fun`` returns ``(output, aux)``; aux gets no cotangent.
      memory_budget: bytes the residuals may take, or None for no suggestion.

    Returns:
      A function of ``fun``'s arguments (arrays, or ``jax.ShapeDtypeStruct`` for zeros of
      that type) returning a `Report`: ``str(report)`` is a table, ``report.records`` the
      data.

    >>> import jax.numpy as jnp, fungrad
    >>> x = jnp.ones((2, 3), jnp.float32)
    >>> report = fungrad.explain(lambda w: jnp.sum(jnp.tanh(x @ w)))(jnp.ones((3, 4), jnp.float32))
    >>> report.residual_bytes, report.forward_flops  # tanh's output and 1 - output; 48 + 8 + 8
    (64, 64)
    >>> report.records[0].residual_shapes
    ('f32[2,4]', 'f32[2,4]')
    """
    api_util.check_callable(fun, "explain")
    budget = _check_budget(memory_budget)

    @jaxutil.api_boundary
    def explained(*args: Any) -> Report:
        nums = api_util.argnums_tuple(argnums, len(args), "explain")
        args = tree_util.tree_map(_as_array, args)
        _check_concrete(args)
        api_util.check_diff_args(args, nums, "explain")
        _check_float_inputs(args, nums)
        base = _analyse(fun, args, nums, has_aux)
        suggestion, candidates = (None, []) if budget is None else _suggest(
            fun, args, nums, has_aux, base, budget)
        return Report(getattr(fun, "__name__", type(fun).__name__), _records(base),
                      base.residual_bytes, base.input_bytes, base.forward_flops,
                      base.backward_flops, budget, suggestion, candidates)

    return explained


def _check_budget(memory_budget: Any) -> int | None:
    if memory_budget is None:
        return None
    if (isinstance(memory_budget, bool) or not isinstance(memory_budget, (int, float, np.integer))
            or not memory_budget >= 0 or memory_budget == float("inf")):
        raise ValueError(f"explain: memory_budget must be a number of bytes (an int >= 0) or "
                         f"None, got {memory_budget!r}; for example memory_budget=64 * 2**20 "
                         f"for 64 MiB of residuals.")
    return int(memory_budget)


def _as_array(x: Any) -> Any:
    """A `jax.ShapeDtypeStruct` becomes zeros of its type (the report depends on types only,
    unless the function branches on values)."""
    return jax.numpy.zeros(x.shape, x.dtype) if isinstance(x, jax.ShapeDtypeStruct) else x


def _check_concrete(args: tuple) -> None:
    for path, x in tree_util.tree_flatten_with_path(args)[0]:
        if jaxutil.is_tracer(x):
            raise TypeError(f"explain: args{tree_util.keystr(path)} is a traced value: call "
                            f"fungrad.explain(fun)(...) outside jax.jit, vmap and other "
                            f"transforms, on arrays or jax.ShapeDtypeStructs; it reports on "
                            f"the gradient that fungrad.grad(fun) would compute there.")


def _check_float_inputs(args: tuple, nums: tuple[int, ...]) -> None:
    for i in nums:
        for path, x in tree_util.tree_flatten_with_path(args[i])[0]:
            dtype = jaxutil.typeof(x).dtype
            if not jax.numpy.issubdtype(dtype, jax.numpy.inexact):
                raise TypeError(f"explain: args[{i}]{tree_util.keystr(path)} has dtype "
                                f"{api_util.dtype_name(dtype)}, but the differentiated arguments "
                                f"must be floats (or complex): pass floats (for example "
                                f"x.astype(jnp.float32)), or leave this argument out of argnums.")
