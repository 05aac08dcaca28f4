"""Function over pytrees -> closed jaxpr, with a cache so that a repeated call does not retrace.

The cache is keyed by the function's *structure*, not its identity: its code, and what
its closure holds. Arrays a function closes over are lifted to extra inputs of the
jaxpr instead of being baked into it as constants, so a closure created per call, such
as ``grad(lambda p: loss(p, batch))`` on a new batch every step, finds the program that
the previous step traced.
"""

from __future__ import annotations

import collections
import functools
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
from jax import tree_util

from fungrad._src import jaxutil
from fungrad._src.jaxutil import ClosedJaxpr


@dataclass(frozen=True)
class Captured:
    """`fun` as a jaxpr over flat inputs, and the trees to rebuild its outputs.

    The jaxpr's inputs are the traced leaves of the arguments, then `num_lifted` arrays
    that the function closes over.
    """

    jaxpr: ClosedJaxpr
    out_tree: Any  # PyTreeDef of the outputs (of (out, aux) when has_aux)
    num_lifted: int


_CACHE_SIZE = 256
_cache: collections.OrderedDict = collections.OrderedDict()


def capture(fun: Callable, in_tree: Any, leaves: Sequence[Any], dynamic: Sequence[bool],
            *, lift: bool = True) -> tuple[Captured, list[Any]]:
    """Traces `fun(*tree_unflatten(in_tree, leaves))` with the `dynamic` leaves abstract.

    Returns the captured program and the values of its lifted inputs for this call
    (the arrays `fun` closes over; none unless `lift`). The other leaves (Python numbers,
    strings, ...) are passed to `fun` as they are, so Python code may branch on them.

    Like `jax.jit`, the cache assumes `fun` is pure: a global that changes between
    calls must be passed as an argument instead.
    """
    shape = _decompose(fun, lift)
    avals = [jaxutil.typeof(x) for x, d in zip(leaves, dynamic, strict=True) if d]
    lifted_avals = [jaxutil.typeof(x) for x in shape.lifted]
    statics = tuple(x for x, d in zip(leaves, dynamic, strict=True) if not d)
    key = (shape.key, in_tree, tuple(dynamic), tuple(avals), tuple(lifted_avals),
           tuple(_static_key(x) for x in statics))
    hit = _cache.get(key)
    if hit is not None:
        _cache.move_to_end(key)
        return hit[0], shape.lifted
    out_tree_box: list[Any] = []

    def flat_fun(*traced):
        dyn_args, lifted = traced[:len(avals)], traced[len(avals):]
        it_dyn, it_static = iter(dyn_args), iter(statics)
        flat_args = [next(it_dyn) if d else next(it_static) for d in dynamic]
        out = shape.rebuild(list(lifted))(*tree_util.tree_unflatten(in_tree, flat_args))
        flat_out, out_tree = tree_util.tree_flatten(out)
        out_tree_box.append(out_tree)
        return flat_out

    try:
        closed = jaxutil.trace_to_jaxpr(flat_fun, [*avals, *lifted_avals])
    except jax.errors.ConcretizationTypeError as err:
        err.add_note(_TRACING_NOTE)
        raise
    captured = Captured(closed, out_tree_box[-1], len(lifted_avals))
    if not any(map(jaxutil.is_tracer, closed.consts)):
        # The entry holds the objects whose ids are in its key, so those ids stay unique.
        _cache[key] = (captured, shape.held, statics)
        if len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    return captured, shape.lifted


# --- a function taken apart: structure (the key), arrays (lifted), and a rebuilder ------

@dataclass
class _Shape:
    key: Any
    lifted: list[Any]  # the arrays the function closes over, in a fixed order
    held: list[Any]  # the objects whose identity is part of `key`
    rebuild: Callable[[list[Any]], Callable]  # the function with other arrays in their place


_MAX_DEPTH = 8


def _decompose(fun: Any, lift: bool, depth: int = 0) -> _Shape:
    """Takes apart Python functions (their closures), partials and bound methods."""
    if lift and depth < _MAX_DEPTH:
        if isinstance(fun, types.FunctionType):
            return _decompose_function(fun, depth)
        if isinstance(fun, functools.partial):
            return _decompose_partial(fun, depth)
        if isinstance(fun, types.MethodType):  # a new object at each attribute access
            func = _decompose(fun.__func__, True, depth + 1)
            owner = fun.__self__
            return _Shape(("method", func.key, id(owner)), func.lifted, [*func.held, owner],
                          lambda arrays: types.MethodType(func.rebuild(arrays), owner))
    return _Shape(("id", id(fun)), [], [fun], lambda arrays: fun)


def _decompose_function(fun: types.FunctionType, depth: int) -> _Shape:
    parts = [_decompose_value(_cell_contents(c), depth) for c in fun.__closure__ or ()]
    key = ("function", fun.__code__, id(fun.__globals__), _static_key(fun.__defaults__),
           _static_key(fun.__kwdefaults__), tuple(p.key for p in parts))

    def rebuild(arrays: list[Any]) -> Callable:
        if not parts:
            return fun
        cells = tuple(types.CellType(value) for value in _rebuild_all(parts, arrays))
        new = types.FunctionType(fun.__code__, fun.__globals__, fun.__name__, fun.__defaults__,
                                 cells)
        new.__kwdefaults__ = fun.__kwdefaults__
        return new

    return _combine(key, parts, rebuild, held=[fun.__globals__, fun.__defaults__,
                                               fun.__kwdefaults__])


def _decompose_partial(fun: functools.partial, depth: int) -> _Shape:
    func = _decompose(fun.func, True, depth + 1)
    args = _decompose_value(fun.args, depth)
    kwargs = _decompose_value(tuple(fun.keywords.items()), depth)  # a new dict per partial
    parts = [func, args, kwargs]

    def rebuild(arrays: list[Any]) -> Callable:
        new_func, new_args, new_kwargs = _rebuild_all(parts, arrays)
        return functools.partial(new_func, *new_args, **dict(new_kwargs))

    return _combine(("partial", tuple(p.key for p in parts)), parts, rebuild, held=[])


def _decompose_value(value: Any, depth: int) -> _Shape:
    """A closed-over value: a function, or a pytree whose array leaves are lifted."""
    if isinstance(value, (types.FunctionType, functools.partial)):
        shape = _decompose(value, True, depth + 1)
        return _Shape(shape.key, shape.lifted, shape.held, shape.rebuild)
    leaves, treedef = tree_util.tree_flatten(value)
    is_array = [_is_liftable(x) for x in leaves]
    if not any(is_array):
        # Nothing to lift: the function keeps the object itself, so that a list it appends
        # to (say from a callback) is the caller's list. A mutable container is keyed by
        # identity, since its contents may change after the trace.
        key = (("id", id(value)) if isinstance(value, (list, dict, set))
               else ("tree", treedef, tuple(map(_static_key, leaves))))
        return _Shape(key, [], [value, *leaves], lambda arrays: value)
    key = ("tree", treedef, tuple(jaxutil.typeof(x) if a else _static_key(x)
                                  for x, a in zip(leaves, is_array, strict=True)))
    lifted = [x for x, a in zip(leaves, is_array, strict=True) if a]
    held = [x for x, a in zip(leaves, is_array, strict=True) if not a]

    def rebuild(arrays: list[Any]) -> Any:
        it = iter(arrays)
        return tree_util.tree_unflatten(
            treedef, [next(it) if a else x for x, a in zip(leaves, is_array, strict=True)])

    return _Shape(key, lifted, held, rebuild)


def _combine(key: Any, parts: list[_Shape], rebuild: Callable, held: list[Any]) -> _Shape:
    lifted = [x for p in parts for x in p.lifted]
    return _Shape(key, lifted, [*held, *(x for p in parts for x in p.held)], rebuild)


def _rebuild_all(parts: list[_Shape], arrays: list[Any]) -> list[Any]:
    out, start = [], 0
    for p in parts:
        out.append(p.rebuild(arrays[start:start + len(p.lifted)]))
        start += len(p.lifted)
    return out


def _is_liftable(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray)) or jaxutil.is_tracer(x)


def _static_key(x: Any) -> Any:
    """Python scalars and strings by value (a new float each call still hits); else by id."""
    if x is None or type(x) in (bool, int, float, complex, str):
        return (type(x), x)
    if type(x) is tuple:
        return tuple(map(_static_key, x))
    return ("id", id(x))


def _cell_contents(cell: Any) -> Any:
    try:
        return cell.cell_contents
    except ValueError:  # an empty cell
        return None


_TRACING_NOTE = (
    "fungrad traces the function to a jaxpr before differentiating it, as jax.jit does, "
    "so Python control flow cannot depend on the values of its array arguments, "
    "differentiated or not. Use lax.cond, lax.select or jnp.where instead, or pass a "
    "value that only steers Python code as a Python number.")
