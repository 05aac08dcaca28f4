"""NaN/Inf provenance: `debug_nans` names the rule and user line behind a non-finite derivative."""

from __future__ import annotations

import collections
import contextlib
import contextvars
import dataclasses
import functools
import linecache
import os
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import tree_util

from fungrad._src import jaxutil, rules
from fungrad._src.jaxutil import ClosedJaxpr, Jaxpr, JaxprEqn, Literal, prims
from fungrad._src.zeros import Zero, has_tangent_space, instantiate, is_zero

_enabled: contextvars.ContextVar[bool] = contextvars.ContextVar("fungrad_debug_nans", default=False)


class NonFiniteDerivativeError(FloatingPointError):
    """A fungrad transform made a nan or inf derivative from finite inputs, under
    :func:`debug_nans`; the message names the rule, the user's line and a fix."""

    __module__ = "fungrad"


@contextlib.contextmanager
def debug_nans(enabled: bool = True) -> Iterator[None]:
    """Within this context (or a function it decorates), a fungrad transform whose
    derivative is non-finite while its inputs are finite raises
    :class:`NonFiniteDerivativeError`.

    The error names the primitive whose JVP or transpose rule first made the non-finite
    value, the user's source line of that operation (and the loop iteration or branch
    it ran in), whether its forward value was finite, its operands, and for known
    patterns (``jnp.where`` over an unsafe branch, ``sqrt`` or a norm at 0, ``log`` or a
    division in a masked branch) the fix. To find it, the failing derivative is computed
    again op by op, uncompiled. Under ``jax.jit`` the check runs in a ``jax.debug.callback``
    and jax raises its runtime error with the same report at its end; the setting is read
    when the transform is traced. Off (the default), nothing is checked and nothing costs.

    Args:
      enabled: whether to check (``debug_nans(False)`` turns it off inside an outer one).

    >>> import jax.numpy as jnp, fungrad
    >>> f = lambda x: jnp.where(x > 0, jnp.sqrt(x), 0.0)
    >>> try:
    ...     with fungrad.debug_nans():
    ...         fungrad.grad(f)(0.0)
    ... except fungrad.NonFiniteDerivativeError as err:
    ...     print(str(err).splitlines()[0])
    fungrad.grad made a nan derivative from finite inputs (reverse mode).
    """
    if not isinstance(enabled, bool):
        raise TypeError(f"fungrad.debug_nans: `enabled` must be True or False, got {enabled!r}. "
                        "Call it as `with fungrad.debug_nans():` (or debug_nans(False) to turn "
                        "an outer one off).")
    token = _enabled.set(enabled)
    try:
        yield
    finally:
        _enabled.reset(token)


def enabled() -> bool:
    """Whether a transform called now must check its derivative (one lookup per call)."""
    return _enabled.get()


# --- the hooks the transforms call when enabled -----------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class _Problem:
    """What a derivative was computed from, besides the values."""

    fname: str
    nonzeros: tuple[bool, ...]  # of the transform's inputs: the traced leaves come first
    reverse: bool
    num_outs: int


# `retrace()` -> the user's function traced anew, as a jaxpr over (traced leaves, its
# constants), and those constants. The transform ran the canonical program of its trace,
# whose source lines are those of the first call that traced that structure: the report
# needs this call's own.
Retrace = Callable[[], tuple[ClosedJaxpr, list[Any]]]


def fresh_trace(fun: Callable, args: Sequence[Any], diff_argnums: Sequence[int]) -> tuple[
        ClosedJaxpr, list[Any]]:
    """`fun` traced at `args` with the leaves of `diff_argnums` traced (as the transforms
    capture it, without the cache): the jaxpr over (traced leaves, constants) and the
    constants."""
    leaves, in_tree = tree_util.tree_flatten(tuple(args))
    dynamic = [i in diff_argnums for i, a in enumerate(args) for _ in tree_util.tree_leaves(a)]
    dyn = [x for x, d in zip(leaves, dynamic, strict=True) if d]

    def flat_fun(*traced):
        it = iter(traced)
        flat = [next(it) if d else x for x, d in zip(leaves, dynamic, strict=True)]
        return tree_util.tree_leaves(fun(*tree_util.tree_unflatten(in_tree, flat)))

    closed = jaxutil.capture_jaxpr(flat_fun, [jaxutil.typeof(x) for x in dyn], dyn,
                                   "fungrad.debug_nans")
    jaxpr = closed.jaxpr
    opened = jaxutil.new_jaxpr([], [*jaxpr.invars, *jaxpr.constvars], jaxpr.outvars, jaxpr.eqns)
    return ClosedJaxpr(opened, ()), list(closed.consts)


def check_forward(fname: str, retrace: Retrace | None, inputs: Sequence[Any],
                  nonzeros: Sequence[bool], nz_dots: Sequence[Any], out_dots: Sequence[Any]) -> None:
    """Checks the output tangents of a transform given the nonzero input tangents."""
    problem = _Problem(fname, tuple(nonzeros), False, len(out_dots))
    _check(problem, retrace, inputs, list(nz_dots), list(out_dots))


def check_reverse(fname: str, retrace: Retrace | None, inputs: Sequence[Any],
                  nonzeros: Sequence[bool], num_outs: int, cts: Sequence[Any] | None,
                  nz_grads: Sequence[Any], out_aval: Any = None) -> None:
    """Checks the cotangents of the nonzero inputs given those of the first `num_outs`
    outputs (`None`: a unit cotangent on the first, of type `out_aval`, as `grad` seeds it)."""
    if cts is None:
        cts = [np.ones(out_aval.shape, out_aval.dtype)]
    problem = _Problem(fname, tuple(nonzeros), True, num_outs)
    _check(problem, retrace, inputs, list(cts), list(nz_grads))


def _check(problem: _Problem, retrace: Retrace | None, inputs: Sequence[Any], seeds: list,
           results: list) -> None:
    results = [r for r in results if not is_zero(r) and _inexact(r)]
    seeds = [s if _inexact(s) else None for s in seeds]
    inputs = list(inputs)
    if not any(map(jaxutil.is_tracer, tree_util.tree_leaves((inputs, seeds, results)))):
        _check_values(problem, retrace, inputs, seeds, results)
        return
    # Under a trace the values exist only when the program runs: check them then, with
    # this call's program (traced now: its constants may be values of the outer trace).
    closed, consts = retrace() if retrace is not None else (None, [])
    jax.debug.callback(functools.partial(_check_traced, problem, closed), inputs, consts,
                       seeds, results)


def _check_traced(problem: _Problem, closed: ClosedJaxpr | None, inputs: list, consts: list,
                  seeds: list, results: list) -> None:
    retrace = None if closed is None else (lambda: (closed, consts))
    _check_values(problem, retrace, inputs, seeds, results)


def _check_values(problem: _Problem, retrace: Retrace | None, inputs: list, seeds: list,
                  results: list) -> None:
    if all(map(_finite, results)):
        return
    # (No inputs where a pullback was made outside debug_nans: only the cotangents checked.)
    if not all(_finite(x) for x, nz in zip(inputs, problem.nonzeros, strict=False) if nz):
        return  # non-finite inputs: a non-finite derivative is no surprise
    if not all(_finite(s) for s in seeds if s is not None):
        return
    raise NonFiniteDerivativeError(_report(problem, retrace, inputs, seeds, results))


def _inexact(x: Any) -> bool:
    return jnp.issubdtype(jaxutil.typeof(x).dtype, jnp.inexact)


def _finite(x: Any) -> bool:
    a = np.asarray(x)
    return not jnp.issubdtype(a.dtype, jnp.inexact) or bool(np.all(np.isfinite(a)))


def _bad_mask(x: Any) -> np.ndarray:
    a = np.asarray(x)
    if not jnp.issubdtype(a.dtype, jnp.inexact):
        return np.zeros(a.shape, bool)
    return ~np.isfinite(a)


# --- the re-run: the derivative again, equation by equation, on concrete values ---------


@dataclasses.dataclass(eq=False)
class _Step:
    """One equation (or a slice or stack the re-run made for a scan) as it ran."""

    eqn: JaxprEqn | None
    where: tuple[str, ...]
    callers: tuple[JaxprEqn, ...]  # the jit, cond, loop... equations it ran inside
    in_ids: list[int]
    out_ids: list[int]
    # Reverse mode: the cotangents of the outputs -> one cotangent (or None) per input.
    backward: Callable[[list], list] | None = None
    residuals: list = dataclasses.field(default_factory=list)
    d_in: list = dataclasses.field(default_factory=list)  # derivatives seen, for the report
    d_out: list = dataclasses.field(default_factory=list)


class _Walk:
    """Runs a jaxpr op by op on concrete values, inlining jit, checkpoint, the branch a
    cond takes and each iteration of a loop, so every value has one node (an int) and
    every equation one step. Forward mode applies each JVP rule as it goes; reverse mode
    records a pullback per equation (fungrad's own vjp of that equation) and then runs
    them backwards. A non-finite derivative made from finite ones is blamed on its step
    (its origin); one made from non-finite ones inherits their origin."""

    def __init__(self, reverse: bool):
        self.reverse = reverse
        self.values: list[Any] = []
        self.dots: dict[int, Any] = {}  # forward: tangents; reverse: cotangents
        self.diff: set[int] = set()  # reverse: the nodes that depend on a differentiated input
        self.origin: dict[int, _Step] = {}
        self.steps: list[_Step] = []
        self.producer: dict[int, _Step] = {}
        self.consumers: dict[int, list[_Step]] = collections.defaultdict(list)
        self.where: list[str] = []
        self.callers: list[JaxprEqn] = []

    def node(self, value: Any) -> int:
        self.values.append(value)
        return len(self.values) - 1

    def vals(self, ids: Sequence[int]) -> list[Any]:
        return [self.values[i] for i in ids]

    @contextlib.contextmanager
    def inside(self, what: str) -> Iterator[None]:
        self.where.append(what)
        try:
            yield
        finally:
            self.where.pop()

    def record(self, eqn: JaxprEqn | None, in_ids: list[int], out_ids: list[int]) -> _Step:
        step = _Step(eqn, tuple(self.where), tuple(self.callers), in_ids, out_ids)
        self.steps.append(step)
        for i in in_ids:
            self.consumers[i].append(step)
        for i in out_ids:
            self.producer[i] = step
        return step

    def blame(self, step: _Step, d_in: list[tuple[int, Any]], d_out: list[tuple[int, Any]]) -> None:
        """Sets the origin of each non-finite derivative in `d_out`: `step` itself if every
        derivative in `d_in` is finite, else the origin of the first non-finite one."""
        bad_in = [i for i, d in d_in if not _finite(d)]
        for i, d in d_out:
            if _finite(d) or i in self.origin:
                continue
            if bad_in:
                self.origin[i] = self.origin.get(bad_in[0], step)
            else:
                self.origin[i] = step
                step.d_in, step.d_out = [d for _, d in d_in], [d for _, d in d_out]

    # -- the walk over equations ---------------------------------------------------------

    def run(self, jaxpr: Jaxpr, consts: Sequence[Any], in_ids: Sequence[int]) -> list[int]:
        env: dict[Any, int] = {}

        def atom(v) -> int:
            return self.node(v.val) if type(v) is Literal else env[v]

        for v, c in zip(jaxpr.constvars, consts, strict=True):
            env[v] = self.node(c)
        env.update(zip(jaxpr.invars, in_ids, strict=True))
        for eqn in jaxpr.eqns:
            env.update(zip(eqn.outvars, self.eqn(eqn, [atom(v) for v in eqn.invars]), strict=True))
        return [atom(v) for v in jaxpr.outvars]

    def call(self, closed: ClosedJaxpr, in_ids: Sequence[int]) -> list[int]:
        return self.run(closed.jaxpr, closed.consts, in_ids)

    def active(self, ids: Sequence[int]) -> bool:
        return any(i in (self.diff if self.reverse else self.dots) for i in ids)

    def eqn(self, eqn: JaxprEqn, ids: list[int]) -> list[int]:
        if not eqn.outvars:
            return []  # an effect (a print, a callback: an inner check): nothing to re-run
        if not self.active(ids):
            return self.primal(eqn, ids)
        self.callers.append(eqn)
        try:
            return self.nested(eqn, ids)
        finally:
            self.callers.pop()

    def nested(self, eqn: JaxprEqn, ids: list[int]) -> list[int]:
        p, params = eqn.primitive, eqn.params
        if p is prims.jit_p:
            return self.call(params["jaxpr"], ids)
        if p is prims.closed_call_p:
            return self.call(params["call_jaxpr"], ids)
        if p is prims.remat_p:
            with self.inside(f"the jax.checkpoint at {jaxutil.source_line(eqn)}"):
                return self.run(params["jaxpr"], [], ids)
        if p is prims.cond_p:
            return self.cond(eqn, ids)
        if p is prims.scan_p and params["length"] > 0:
            return self.scan(eqn, ids)
        if p is prims.while_p:
            return self.while_loop(eqn, ids)
        return self.reverse_leaf(eqn, ids) if self.reverse else self.forward_leaf(eqn, ids)

    def primal(self, eqn: JaxprEqn, ids: list[int]) -> list[int]:
        out_ids = [self.node(x) for x in jaxutil.bind_eqn(eqn, self.vals(ids))]
        self.record(eqn, ids, out_ids)
        return out_ids

    def forward_leaf(self, eqn: JaxprEqn, ids: list[int]) -> list[int]:
        invals = self.vals(ids)
        in_dots = [self.dots.get(i, Zero.like(x)) for i, x in zip(ids, invals, strict=True)]
        with jaxutil.rule_context(eqn):
            outs, out_dots = rules.lookup_jvp(eqn)(invals, in_dots, **eqn.params)
        if not eqn.primitive.multiple_results:
            outs, out_dots = [outs], [out_dots]
        out_ids = [self.node(x) for x in outs]
        step = self.record(eqn, ids, out_ids)
        written = []
        for i, x, t in zip(out_ids, outs, out_dots, strict=True):
            if not is_zero(t) and has_tangent_space(jaxutil.typeof(x)):
                self.dots[i] = t
                written.append((i, t))
        self.blame(step, [(i, self.dots[i]) for i in ids if i in self.dots], written)
        return out_ids

    def reverse_leaf(self, eqn: JaxprEqn, ids: list[int]) -> list[int]:
        from fungrad._src import api  # api calls this module: imported when first needed

        invals = self.vals(ids)
        diff_pos = [k for k, i in enumerate(ids) if i in self.diff and _inexact(invals[k])]
        if not diff_pos:
            return self.primal(eqn, ids)

        def one_eqn(*diff_vals):
            args = list(invals)
            for k, x in zip(diff_pos, diff_vals, strict=True):
                args[k] = x
            return jaxutil.bind_eqn(eqn, args)

        outs, pullback = api.vjp(one_eqn, *(invals[k] for k in diff_pos))
        out_ids = [self.node(x) for x in outs]
        step = self.record(eqn, ids, out_ids)
        self.diff.update(i for i, x in zip(out_ids, outs, strict=True) if _inexact(x))

        def backward(cts: list) -> list:
            got = iter(pullback(cts))
            return [next(got) if k in diff_pos else None for k in range(len(ids))]

        step.backward, step.residuals = backward, tree_util.tree_leaves(pullback)
        return out_ids

    def cond(self, eqn: JaxprEqn, ids: list[int]) -> list[int]:
        branches = eqn.params["branches"]
        index = int(np.clip(np.asarray(self.values[ids[0]]), 0, len(branches) - 1))
        with self.inside(f"branch {index} of the lax.cond at {jaxutil.source_line(eqn)}"):
            return self.call(branches[index], ids[1:])

    def scan(self, eqn: JaxprEqn, ids: list[int]) -> list[int]:
        params = eqn.params
        n_consts, n_carry, length = params["num_consts"], params["num_carry"], params["length"]
        consts, carry, xs = ids[:n_consts], ids[n_consts:n_consts + n_carry], ids[n_consts + n_carry:]
        ys: dict[int, list[int]] = {}
        for i in (reversed(range(length)) if params["reverse"] else range(length)):
            x_ids = [self.index(x, i) for x in xs]
            with self.inside(f"iteration {i} of the lax.scan at {jaxutil.source_line(eqn)}"):
                outs = self.call(params["jaxpr"], [*consts, *carry, *x_ids])
            carry, ys[i] = outs[:n_carry], outs[n_carry:]
        stacked = [self.stack([ys[i][k] for i in range(length)]) for k in range(len(ys[0]))]
        return [*carry, *stacked]

    def while_loop(self, eqn: JaxprEqn, ids: list[int]) -> list[int]:
        params = eqn.params
        n_cond, n_body = params["cond_nconsts"], params["body_nconsts"]
        cond_consts, body_consts, carry = ids[:n_cond], ids[n_cond:n_cond + n_body], ids[n_cond + n_body:]
        cond = params["cond_jaxpr"]
        i = 0
        while bool(jaxutil.eval_jaxpr(cond.jaxpr, cond.consts, *self.vals([*cond_consts, *carry]))[0]):
            with self.inside(f"iteration {i} of the lax.while_loop at {jaxutil.source_line(eqn)}"):
                carry = self.call(params["body_jaxpr"], [*body_consts, *carry])
            i += 1
        return carry

    def index(self, src: int, i: int) -> int:
        """A node for `values[src][i]` (a scan's slice), derivatives following it."""
        out = self.node(self.values[src][i])
        step = self.record(None, [src], [out])
        if src in self.dots and not self.reverse:
            self.dots[out] = self.dots[src][i]
            self.blame(step, [(src, self.dots[src])], [(out, self.dots[out])])
        if src in self.diff:
            self.diff.add(out)
            like = self.values[src]
            step.backward = lambda cts: [jnp.zeros_like(like).at[i].set(cts[0])]
        return out

    def stack(self, srcs: list[int]) -> int:
        """A node for the values of `srcs` stacked (a scan's output), derivatives following."""
        out = self.node(jnp.stack(self.vals(srcs)))
        step = self.record(None, srcs, [out])
        if not self.reverse and any(i in self.dots for i in srcs):
            d_in = [(i, self.dots[i]) for i in srcs if i in self.dots]
            self.dots[out] = jnp.stack([self.dots[i] if i in self.dots else
                                        instantiate(Zero.like(self.values[i])) for i in srcs])
            self.blame(step, d_in, [(out, self.dots[out])])
        if any(i in self.diff for i in srcs):
            self.diff.add(out)
            step.backward = lambda cts: list(cts[0])
        return out

    def backward(self, out_ids: Sequence[int], cts: Sequence[Any]) -> None:
        """Reverse mode: the recorded pullbacks, last step first, accumulating cotangents."""
        for i, ct in zip(out_ids, cts, strict=True):
            if ct is not None and i in self.diff:
                self.add_ct(i, ct)
        for step in reversed(self.steps):
            if step.backward is None or not any(i in self.dots for i in step.out_ids):
                continue
            cts_out = [self.dots.pop(i) if i in self.dots else instantiate(Zero.like(self.values[i]))
                       for i in step.out_ids]
            cts_in = step.backward(cts_out)
            sent = [(i, ct) for i, ct in zip(step.in_ids, cts_in, strict=True)
                    if ct is not None and i in self.diff]
            self.blame(step, list(zip(step.out_ids, cts_out, strict=True)), sent)
            for i, ct in sent:
                self.add_ct(i, ct)

    def add_ct(self, i: int, ct: Any) -> None:
        self.dots[i] = self.dots[i] + ct if i in self.dots else ct


def _find(problem: _Problem, closed: ClosedJaxpr, inputs: Sequence[Any],
          seeds: Sequence[Any]) -> tuple[_Walk, _Step | None]:
    """Re-runs the derivative of `closed` at `inputs` op by op; returns the walk and the
    step that made the first non-finite derivative reaching the result (None if the
    re-run's is finite)."""
    walk = _Walk(problem.reverse)
    in_ids = [walk.node(x) for x in inputs]
    nonzeros = [*problem.nonzeros, *[False] * len(inputs)][:len(inputs)]
    nz_ids = [i for i, nz in zip(in_ids, nonzeros, strict=True) if nz]
    if problem.reverse:
        walk.diff.update(nz_ids)
    else:
        walk.dots.update((i, t) for i, t in zip(nz_ids, seeds, strict=True) if t is not None)
    out_ids = walk.call(closed, in_ids)
    if problem.reverse:
        cts = [*seeds, *[None] * (len(out_ids) - len(seeds))]
        walk.backward(out_ids[:problem.num_outs], cts[:problem.num_outs])
        result_ids = nz_ids
    else:
        result_ids = out_ids
    for i in result_ids:
        if i in walk.dots and not _finite(walk.dots[i]) and i in walk.origin:
            return walk, walk.origin[i]
    return walk, None


# --- the report -----------------------------------------------------------------------


def _report(problem: _Problem, retrace: Retrace | None, inputs: Sequence[Any], seeds: list,
            results: list) -> str:
    kind = _kind(results)
    mode = "reverse mode" if problem.reverse else "forward mode"
    head = f"fungrad.{problem.fname} made {kind} derivative from finite inputs ({mode})."
    if retrace is None:
        return (f"{head}\nTo locate the rule that made it, call fungrad.vjp or fungrad.linearize "
                "itself inside fungrad.debug_nans() too (the re-run needs the primal inputs).")
    token = _enabled.set(False)  # the re-run's own transforms must not check themselves
    try:
        closed, consts = retrace()
        num_dyn = len(closed.jaxpr.invars) - len(consts)
        walk, step = _find(problem, closed, [*inputs[:num_dyn], *consts], seeds)
    except Exception as err:  # noqa: BLE001  (the re-run is a best effort; say why it failed)
        return f"{head}\nThe op-by-op re-run that locates the rule failed: {type(err).__name__}: {err}"
    finally:
        _enabled.reset(token)
    if step is None or step.eqn is None:
        return (f"{head}\nRe-run op by op, uncompiled, the derivative is finite: the compiled "
                "program differs (XLA may reorder or fuse floating-point operations).")
    return "\n".join([head, *_describe(walk, step, problem.reverse)])


def _kind(results: Sequence[Any]) -> str:
    bad = [np.asarray(r)[_bad_mask(r)] for r in results]
    flat = np.concatenate([b.ravel() for b in bad]) if bad else np.zeros(0)
    return "a nan" if np.isnan(flat).any() else "an inf"


def _describe(walk: _Walk, step: _Step, reverse: bool) -> list[str]:
    assert step.eqn is not None
    name = step.eqn.primitive.name
    invals, outs = walk.vals(step.in_ids), walk.vals(step.out_ids)
    rule, how = _which_rule(step, reverse)
    lines = [f"The first non-finite value came from {rule} of `{name}`{how}. The operation is at",
             *_source(step)]
    lines += [f"  inside {w}" for w in reversed(step.where)]
    if all(map(_finite, outs)):
        lines.append("Its forward value is finite: only the derivative is non-finite.")
    else:
        lines.append(f"Its forward value is already non-finite: {_summary(outs[0])}.")
    bad = next((_bad_mask(d) for d in step.d_out if not _finite(d)), None)
    for k, x in enumerate(invals):
        if _inexact(x):
            lines.append(f"  operand {k}: {_summary(x, bad)}")
    what = "cotangent" if reverse else "tangent"
    lines.append(f"  incoming {what}: {_summary(step.d_in[0], bad) if step.d_in else 'none'}")
    lines.append(f"  outgoing {what}: {_summary(next(d for d in step.d_out if not _finite(d)))}")
    return lines + _advice(walk, step, reverse, bad)


def _which_rule(step: _Step, reverse: bool) -> tuple[str, str]:
    """Which rule made the value, and how (in reverse mode both rules of the equation ran)."""
    if not reverse:
        return "the JVP rule", ""
    if not all(map(_finite, step.residuals)):
        return "the JVP rule", (": it made a non-finite derivative factor, which the transpose "
                                "rule multiplied by the incoming cotangent")
    return "the transpose rule", " (of its JVP), from finite derivative factors"


_LOCATION = re.compile(r"^(?P<file>.+?):(?P<line>\d+)(?::\d+)?(?: \((?P<fun>.*)\))?$")


_FUNGRAD_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _is_fungrad(file: str) -> bool:
    return os.path.abspath(file).startswith(_FUNGRAD_DIR + os.sep)


def source_location(eqn: JaxprEqn) -> tuple[str, int, str] | None:
    """The user's file and line of `eqn`, and how to show them ("file:line:col (function)");
    None when there is none outside jax and fungrad (a jnp function passed to a transform
    directly is called from fungrad)."""
    summary = jaxutil.source_line(eqn)
    match = _LOCATION.match(summary)
    if match is not None and not _is_fungrad(match["file"]):
        return match["file"], int(match["line"]), summary
    # The innermost frame is fungrad's where fungrad made the equation for the user's call
    # (a custom_jvp function's): the next frame out is the user's.
    frames = jaxutil.user_frames(eqn)
    for file, line, function in frames:
        if not _is_fungrad(file):
            return file, line, f"{file}:{line} ({function})"
    return None


def user_eqn(step: _Step) -> tuple[JaxprEqn | None, str]:
    """The equation of `step`, or of the innermost call around it, that has a user's source
    line (an operation inside jnp.linalg.norm has none; the call of norm has); and the
    name of that call, '' when the equation itself has one."""
    for eqn in (step.eqn, *reversed(step.callers)):
        if eqn is not None and source_location(eqn) is not None:
            name = "" if eqn is step.eqn else str(eqn.params.get("name", eqn.primitive.name))
            return eqn, name
    return None, ""


def _source(step: _Step) -> list[str]:
    eqn, via = user_eqn(step)
    if eqn is None:
        inside = [str(c.params.get("name", c.primitive.name)) for c in step.callers]
        return ["  (no source line of yours: " + (f"it runs inside `{inside[0]}`, which the "
                "transform was given directly)" if inside else "jax recorded none)")]
    loc = source_location(eqn)
    assert loc is not None
    code = linecache.getline(loc[0], loc[1]).strip()
    return [f"  {loc[2]}" + (f", inside `{via}`" if via else ""),
            *([f"    {code}"] if code else [])]


def _source_line(step: _Step) -> str:
    eqn, _ = user_eqn(step)
    loc = None if eqn is None else source_location(eqn)
    return "?" if loc is None else loc[2]


def _summary(x: Any, bad: np.ndarray | None = None) -> str:
    a = np.asarray(x)
    text = f"{a.dtype}{list(a.shape)} {np.array2string(a.ravel()[:6], precision=4)}"
    text += " ..." if a.size > 6 else ""
    if bad is not None and bad.shape == a.shape and bad.any() and a.ndim > 0:
        where = np.argwhere(bad)[:4]
        entries = ", ".join(f"{tuple(int(j) for j in w)}: {a[tuple(w)]}" for w in where)
        text += f"; where the derivative is non-finite: {entries}"
    return text


# --- patterns and their fixes ---------------------------------------------------------

_ROOTS = {"sqrt", "rsqrt", "cbrt", "pow", "integer_pow"}
_SAFE_INPUT = {"sqrt": "1.0", "rsqrt": "1.0", "cbrt": "1.0", "pow": "1.0", "log": "1.0",
               "log1p": "0.0", "div": "1.0", "atanh": "0.0", "acosh": "2.0", "asin": "0.0",
               "acos": "0.0", "integer_pow": "1.0", "lgamma": "1.0", "digamma": "1.0"}
_DERIVATIVE = {"sqrt": "1 / (2 sqrt(x))", "rsqrt": "-x^(-3/2) / 2", "cbrt": "x^(-2/3) / 3",
               "pow": "p x^(p-1), for p < 1", "integer_pow": "n x^(n-1), for n < 1"}
_CALL = {"div": "1.0 / {x}", "integer_pow": "{x} ** p", "pow": "{x} ** p"}


def _advice(walk: _Walk, step: _Step, reverse: bool, bad: np.ndarray | None) -> list[str]:
    assert step.eqn is not None
    name = step.eqn.primitive.name
    select = _downstream_select(walk, step)
    masked = select is not None and (not reverse or _zero_where(step.d_in, bad))
    call = _CALL.get(name, "jnp." + name + "({x})")
    if masked:
        assert select is not None
        safe = _SAFE_INPUT.get(name, "<a safe value>")
        return [
            f"Pattern: `{name}` in a branch that jnp.where masks out (the select_n at "
            f"{_source_line(select)}). jnp.where drops the branch's value but "
            f"not its derivative: the unused entries still compute {name}'s derivative, "
            "infinite there, and multiply it by the zero cotangent the mask sends back: "
            "0 * inf = nan.",
            "Fix (the \"double where\"): make the unsafe input safe in the masked-out entries too:",
            f"    safe_x = jnp.where(mask, x, {safe})",
            f"    y = jnp.where(mask, {call.format(x='safe_x')}, 0.0)"]
    if name in _ROOTS and _has_zero(walk.vals(step.in_ids)[0], bad):
        if _fed_by(walk, step.in_ids[0], "reduce_sum"):
            return [
                f"Pattern: a norm (`{name}` of a sum of squares) at 0: sqrt(sum(x**2)) has no "
                "derivative at x = 0 (its derivative x / norm(x) is 0/0 there).",
                "Fix: the double where on the squared norm, e.g.",
                "    sq = jnp.sum(x * x); nonzero = sq > 0",
                "    norm = jnp.where(nonzero, jnp.sqrt(jnp.where(nonzero, sq, 1.0)), 0.0)",
                "  or add a small eps inside the sqrt: jnp.sqrt(jnp.sum(x * x) + eps)."]
        return [
            f"Pattern: `{name}` at 0: its derivative ({_DERIVATIVE[name]}) is infinite there.",
            f"Fix: keep the input away from 0 ({_with_eps(call)}), or, if 0 is a legitimate "
            "input whose derivative you want to be 0, the double where:",
            "    nonzero = x > 0",
            f"    y = jnp.where(nonzero, {call.format(x='jnp.where(nonzero, x, 1.0)')}, 0.0)",
            "  or give the function the derivative you want with fungrad.custom_jvp."]
    if name in ("custom_jvp_call", "custom_vjp_call"):
        return [f"Pattern: a custom derivative rule (`{name}`: a jax.custom_jvp / custom_vjp or "
                "fungrad one, yours or a library's) gave a non-finite derivative at these "
                "operands.", "Fix: guard its rule (the double where inside the rule), or keep "
                "the operands inside the rule's domain."]
    if not all(map(_finite, walk.vals(step.out_ids))):
        return [f"Pattern: `{name}` is itself non-finite at this input (a log of 0, a division "
                "by 0, ...): the function has no finite derivative here.",
                "Fix: keep the input inside the domain (clip it, or add an eps), or, if this "
                "value is meant to be discarded, compute it on a safe input: "
                f"jnp.where(mask, {call.format(x='jnp.where(mask, x, 1.0)')}, 0.0)."]
    return [f"No known pattern: look at `{name}`'s derivative at the operands above."]


def _with_eps(call: str) -> str:
    return call.format(x="x + eps") if call.endswith("({x})") else call.format(x="(x + eps)")


def _zero_where(d_in: list, bad: np.ndarray | None) -> bool:
    """Whether the incoming cotangent is 0 where the outgoing one is non-finite."""
    if not d_in or bad is None:
        return False
    ct = np.asarray(d_in[0])
    return ct.shape == bad.shape and bool(np.all(ct[bad] == 0))


def _has_zero(x: Any, bad: np.ndarray | None) -> bool:
    a = np.asarray(x)
    if bad is not None and bad.shape == a.shape:
        a = a[bad]
    return bool(np.any(a == 0))


def _fed_by(walk: _Walk, node: int, name: str) -> bool:
    step = walk.producer.get(node)
    return step is not None and step.eqn is not None and step.eqn.primitive.name == name


def _downstream_select(walk: _Walk, step: _Step, limit: int = 64) -> _Step | None:
    """The first select_n (jnp.where) that a value of `step` reaches as a case (not as the
    predicate), following consumers breadth first, or None."""
    frontier, seen = list(step.out_ids), set(step.out_ids)
    while frontier and limit > 0:
        node = frontier.pop(0)
        for user in walk.consumers.get(node, ()):
            limit -= 1
            if user.eqn is not None and user.eqn.primitive is prims.select_n_p:
                if node in user.in_ids[1:]:
                    return user
                continue
            for out in user.out_ids:
                if out not in seen:
                    seen.add(out)
                    frontier.append(out)
    return None
