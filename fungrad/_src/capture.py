"""Function over pytrees -> closed jaxpr, traced afresh on every call.

Capture never changes what a program means. The user's Python runs on every call and
reads the current globals and attributes; values it closes over stay constants; where
it needs a concrete value (`if x > 0`, `int(n)`, `x.item()`) it gets it, and the jaxpr
is that of the path it took (see `jaxutil.capture_jaxpr`).

What is cached is keyed by *what was traced*: the jaxpr's structure, types and
parameters. Its constants (arrays it closes over, Python floats) become inputs of a
shared canonical program, so a new closure, batch or learning rate on each call finds
the program (and the compiled derivative) that an earlier call derived. Two traces with
the same key are the same function of those inputs, so the cache can never return a
result computed from state other than the current one.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
from jax import tree_util

from fungrad._src import caching, jaxutil
from fungrad._src.jaxutil import ClosedJaxpr, Jaxpr, Literal, Var


@dataclass(frozen=True)
class Captured:
    """`fun` as a jaxpr over flat inputs, and the trees to rebuild its outputs.

    The jaxpr's inputs are the traced leaves of the arguments, then the constants of
    this call (arrays and Python floats the trace used). `reused` says whether the
    program was seen before with another call's constants: worth compiling.
    """

    jaxpr: ClosedJaxpr
    out_tree: Any  # PyTreeDef of the outputs (of (out, aux) when has_aux)
    reused: bool
    # The outputs the function returned untraced (a Python float, a numpy array: an aux
    # metric, a constant), by position among the flat outputs, as it returned them: jax
    # returns them so, where the program gives them as its literals or arrays.
    given_outs: tuple[tuple[int, Any], ...] = ()


def capture(fun: Callable, in_tree: Any, leaves: Sequence[Any], dynamic: Sequence[bool],
            debug: Any = None) -> tuple[Captured, list[Any]]:
    """Traces `fun(*tree_unflatten(in_tree, leaves))` with the `dynamic` leaves traced.

    The other leaves are passed to `fun` as they are, as `jax.grad` passes the arguments
    it does not differentiate. Returns the captured program and the constants to pass
    after the traced leaves. `debug` (a jax DebugInfo) names the function and its
    traced inputs in jax's error messages.
    """
    dyn_leaves = [x for x, d in zip(leaves, dynamic, strict=True) if d]
    avals = [jaxutil.typeof(x) for x in dyn_leaves]
    out_tree_box: list[Any] = []
    given_box: list[tuple] = []

    def flat_fun(*traced):
        it = iter(traced)
        flat_args = [next(it) if d else x for x, d in zip(leaves, dynamic, strict=True)]
        out = fun(*tree_util.tree_unflatten(in_tree, flat_args))
        flat_out, out_tree = tree_util.tree_flatten(out)
        out_tree_box.append(out_tree)
        given_box.append(tuple((i, x) for i, x in enumerate(flat_out)
                               if not jaxutil.is_tracer(x)))
        return flat_out

    name = getattr(fun, "__name__", None) or type(fun).__name__
    with jaxutil.collection_paused():
        closed = jaxutil.capture_jaxpr(flat_fun, avals, dyn_leaves, debug or name,
                                       defer_calls=True)
        program, consts, reused = _canonical(closed)
    return Captured(program, out_tree_box[-1], reused, given_box[-1]), consts


# --- the program cache: canonical jaxprs by structure -----------------------------------

# Canonical programs by structural key. What fungrad derives from a program (its forward
# mode, linearization, transposes) is cached weakly on it, so evicting it frees those too.
_programs = caching.LRU("fungrad.programs", max_entries=512, max_bytes=256 << 20)


def _canonical(closed: ClosedJaxpr) -> tuple[ClosedJaxpr, list[Any], bool]:
    """The shared program equal to `closed` with its constants as trailing inputs, those
    constants, and whether an earlier call traced the same program."""
    jaxpr = closed.jaxpr
    hoist: list[tuple[int, int]] = []
    try:
        key = caching.Hashed(_structure(jaxpr, hoist))
    except _Unkeyable:
        key = None
        hoist = _hoist_positions(jaxpr)
    consts = list(closed.consts)
    if hoist:
        operands = [*(eqn.invars for eqn in jaxpr.eqns), jaxpr.outvars]
        consts += [operands[i][j].val for i, j in hoist]
    if key is None:
        return _hoisted(closed, hoist), consts, False
    entry = _programs.get(key)
    if entry is not None:
        return entry, consts, True
    return _programs.put(key, _hoisted(closed, hoist)), consts, False


def _hoisted(closed: ClosedJaxpr, hoist: list[tuple[int, int]]) -> ClosedJaxpr:
    """`closed` with its constants, then the literals at `hoist` (as `_hoist_positions`
    gives them), as trailing inputs."""
    jaxpr = closed.jaxpr
    eqns, outvars = list(jaxpr.eqns), list(jaxpr.outvars)
    new_vars = []
    for i, j in hoist:
        if i == len(eqns):  # an output
            var = outvars[j] = Var(outvars[j].aval)
        else:
            eqn = eqns[i]
            var = Var(eqn.invars[j].aval)
            eqns[i] = eqn.replace(invars=[*eqn.invars[:j], var, *eqn.invars[j + 1:]])
        new_vars.append(var)
    program = jaxpr.replace(constvars=[], invars=[*jaxpr.invars, *jaxpr.constvars, *new_vars],
                            eqns=eqns, outvars=outvars)
    # The calls the trace kept whole are inlined here, once per program: what fungrad
    # derives from it is what it would derive from jax's trace.
    return ClosedJaxpr(jaxutil.inline_calls(program), ())


def _keeps_value(literal: Literal) -> bool:
    """Integer and boolean scalar literals stay in the program (sizes, indices, flags,
    which XLA uses to specialise); others (Python floats: scales, learning rates) are
    inputs, so that a new value does not compile a new program."""
    aval: Any = literal.aval
    return not aval.shape and getattr(aval.dtype, "kind", None) in _KEPT_KINDS


_KEPT_KINDS = frozenset("biu")


def _hoist_positions(jaxpr: Jaxpr) -> list[tuple[int, int]]:
    """The positions of the literals `_canonical` makes inputs: (equation, operand), or
    (number of equations, output) for an output."""
    operands = [*(eqn.invars for eqn in jaxpr.eqns), jaxpr.outvars]
    return [(i, j) for i, atoms in enumerate(operands) for j, a in enumerate(atoms)
            if type(a) is Literal and not _keeps_value(a)]


class _Unkeyable(Exception):
    """A parameter with no structural key (a per-call Python callable jax holds)."""


def _structure(jaxpr: Jaxpr, hoisted: list[tuple[int, int]] | None = None) -> Any:
    """The structural key of `jaxpr`: its types, equations (primitive, operands by
    position, params, output types, context) and outputs. With `hoisted`, the literals
    that `_canonical` makes inputs count by type only, and their positions (as in
    `_hoist_positions`) are appended to it."""
    names: dict[Any, int] = {v: i for i, v in enumerate([*jaxpr.constvars, *jaxpr.invars])}
    lookup = names.__getitem__

    def atoms(i: int, operands: list) -> tuple:
        try:
            return tuple(map(lookup, operands))
        except TypeError:  # a literal (unhashable): by value, or by type where hoisted
            return tuple(_literal_key(i, j, a, hoisted) if type(a) is Literal else names[a]
                         for j, a in enumerate(operands))

    eqn_keys = []
    for i, eqn in enumerate(jaxpr.eqns):
        ins = atoms(i, eqn.invars)
        outvars = eqn.outvars
        for v in outvars:
            names[v] = len(names)
        eqn_keys.append((eqn.primitive, ins, _eqn_params_key(eqn),
                         tuple([v.aval for v in outvars]), eqn.ctx))
    return (tuple([v.aval for v in jaxpr.constvars]), tuple([v.aval for v in jaxpr.invars]),
            tuple(eqn_keys), atoms(len(jaxpr.eqns), jaxpr.outvars))


def _literal_key(i: int, j: int, literal: Literal,
                 hoisted: list[tuple[int, int]] | None) -> tuple:
    """A literal operand's part of the key: by type where `_canonical` makes it an input
    (its position noted in `hoisted`), else by value."""
    if hoisted is not None and not _keeps_value(literal):
        hoisted.append((i, j))
        return ("input", literal.aval)
    return ("literal", literal.aval, np.asarray(literal.val).tobytes())


# Keys of nested jaxprs by identity (jax reuses the jaxpr of a jitted function across
# traces), hashed once: a key that nests them hashes them by their stored hash, and
# compares them by identity where both traces hold the same jaxpr.
_sub_keys = caching.LRU("fungrad.nested_keys", max_entries=4096, max_bytes=64 << 20,
                        size=lambda entry: 2 * caching.EQUATION_BYTES * (len(entry[1].key[2]) + 1))


def _jaxpr_key(jaxpr: Jaxpr) -> caching.Hashed:
    # By id (an int hashes and compares at C speed), the entry holding the jaxpr so
    # that its id stays its own while the entry lives.
    entry = _sub_keys.get(id(jaxpr))
    if entry is None:
        entry = _sub_keys.put(id(jaxpr), (jaxpr, caching.Hashed(_structure(jaxpr))))
    return entry[1]


# The parameters of a jit call that jax would inline (`jaxutil.inlinable`: no constants,
# shardings, layouts or compiler options to key), the common equation of a capture.
_INLINABLE_JIT_PARAMS = frozenset({"jaxpr", "in_shardings", "out_shardings", "in_layouts",
                                   "out_layouts", "donated_invars", "ctx_mesh", "name",
                                   "keep_unused", "inline", "compiler_options_kvs"})


def _eqn_params_key(eqn: Any) -> Any:
    params = eqn.params
    if eqn.primitive is jaxutil.prims.jit_p:
        return _jit_params_key(params)
    if eqn.primitive is jaxutil.prims.custom_jvp_call_p:
        return _custom_jvp_key(eqn)
    if eqn.primitive is jaxutil.prims.custom_vjp_call_p:
        return _custom_vjp_key(eqn)
    return _plain_params_key(params)


# The params keys of jit calls by the id of their jaxpr (jax holds one per jitted function
# and input types, so a trace's calls of jnp's functions repeat those of earlier traces),
# each entry with the params it was made from: a call with other params is keyed anew.
_jit_keys = caching.LRU("fungrad.jit_keys", max_entries=4096, max_bytes=16 << 20,
                        size=lambda _: 1024)


def _jit_params_key(params: dict) -> Any:
    closed = params["jaxpr"]
    items = tuple(params.items())  # (compared item by item, by identity first)
    entry = _jit_keys.get(id(closed))
    if entry is not None:
        if entry[0] == items:
            return entry[1]
        _jit_keys.pop(id(closed))
    if params.keys() == _INLINABLE_JIT_PARAMS and jaxutil.inlinable(params):
        key = ("inlinable", _jaxpr_key(closed.jaxpr), params["donated_invars"],
               params["ctx_mesh"], params["name"], params["keep_unused"])
    else:
        key = _plain_params_key(params)
    return _jit_keys.put(id(closed), (items, key))[1]


def _plain_params_key(params: dict) -> tuple:
    return tuple([(name, value if type(value) in _PLAIN else _value_key(value))
                  for name, value in params.items()])


def _custom_jvp_key(eqn: Any) -> Any:
    """A custom_jvp call by its function and its rule, traced now (jax holds the rule as
    a thunk). A rule that sees symbolic zeros is traced per zero pattern: no key."""
    params = eqn.params
    if params["symbolic_zeros"]:
        raise _Unkeyable
    num_args = len(eqn.invars) - params["num_consts"]
    call_key = (_value_key(params["call_jaxpr"]), params["num_consts"])
    stack = _rules_being_keyed.__dict__.setdefault("stack", [])
    if call_key in stack:
        # A rule that calls its own function (jnp.linalg.det's does): the inner call is
        # keyed by the outer one, which is being keyed.
        return ("recursive", call_key)
    try:
        rule, consts, out_zeros = jaxutil.custom_jvp_rule(params["jvp_jaxpr_fun"],
                                                          [False] * num_args)
    except Exception as err:  # the rule fails: fungrad's jvp reports it when it needs it
        raise _Unkeyable from err
    stack.append(call_key)
    try:
        return (call_key, _jaxpr_key(rule), tuple(map(_const_key, consts)), tuple(out_zeros))
    finally:
        stack.pop()


_rules_being_keyed = threading.local()


def _custom_vjp_key(eqn: Any) -> Any:
    """A custom_vjp call by its function and its fwd and bwd as traced at capture. Where
    they were not (a bwd that branches on residual values), the call holds the user's
    functions, which say nothing of what they compute: no key."""
    params = eqn.params
    rules = jaxutil.traced_vjp_rules(params)
    if rules is None:
        raise _Unkeyable
    out_tree, res_tree, input_fwds = rules.trees
    return (_value_key(params["call_jaxpr"]), params["num_consts"], params["symbolic_zeros"],
            _jaxpr_key(rules.fwd), tuple(map(_const_key, rules.fwd_consts)),
            _jaxpr_key(rules.bwd_jaxpr), tuple(map(_const_key, rules.bwd_consts)),
            out_tree, res_tree, tuple(input_fwds), rules.k)


_SMALL = 64  # constants of nested jaxprs up to this many elements are keyed by value


# Parameter types that are their own key (the common case, checked first).
_PLAIN = frozenset({str, int, bool, float, type(None), np.dtype, jaxutil.UnspecifiedValue})


def _value_key(value: Any) -> Any:
    kind = type(value)
    if kind in _PLAIN:
        return value
    if kind is tuple or kind is list:
        if all(type(v) in _PLAIN for v in value):
            return (kind, tuple(value))
        return (kind, tuple(map(_value_key, value)))
    if isinstance(value, ClosedJaxpr):
        return ("closed", _jaxpr_key(value.jaxpr), tuple(map(_const_key, value.consts)))
    if isinstance(value, Jaxpr):
        return ("jaxpr", _jaxpr_key(value))
    if isinstance(value, (np.ndarray, jax.Array)):
        return _const_key(value)
    try:
        hash(value)  # a function jax holds (a callback, a policy) compares by identity
    except TypeError as err:
        raise _Unkeyable from err
    return value


def _const_key(value: Any) -> Any:
    if not jaxutil.is_tracer(value) and np.size(value) <= _SMALL:
        return ("value", jaxutil.typeof(value), np.asarray(value).tobytes())
    return caching.Identity(value)
