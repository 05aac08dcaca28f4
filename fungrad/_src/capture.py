"""Function over pytrees -> closed jaxpr, with a cache so that a repeated call does not retrace."""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import jax
from jax import tree_util

from fungrad._src import jaxutil
from fungrad._src.jaxutil import ClosedJaxpr


@dataclass(frozen=True)
class Captured:
    """`fun` as a jaxpr over flat inputs, and the trees to rebuild its outputs."""

    jaxpr: ClosedJaxpr
    out_tree: Any  # PyTreeDef of the outputs (of (out, aux) when has_aux)


_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_CACHE_PER_FUNCTION = 32


def capture(fun: Callable, in_tree: Any, leaves: Sequence[Any],
            dynamic: Sequence[bool]) -> Captured:
    """Traces `fun(*tree_unflatten(in_tree, leaves))` with the `dynamic` leaves abstract.

    The jaxpr's inputs are the dynamic leaves; the others (Python numbers, strings,
    ...) are passed to `fun` as they are, so Python code may branch on them.

    The result is cached per function, input signature and the identity of the values
    the function closes over; like `jax.jit`, the cache assumes `fun` is pure (a global
    that changes between calls must be passed as an argument instead). Nothing is
    cached when the function closes over values traced by an enclosing transformation.
    """
    avals = [jaxutil.typeof(x) for x, d in zip(leaves, dynamic, strict=True) if d]
    statics = tuple(x for x, d in zip(leaves, dynamic, strict=True) if not d)
    closure = (*_closure_values(fun), *statics)
    key = (in_tree, tuple(dynamic), tuple(avals), tuple(map(id, closure)))
    per_fun = _cache_for(fun)
    if per_fun is not None and key in per_fun:
        return per_fun[key][0]
    out_tree_box: list[Any] = []

    def flat_fun(*dyn_args):
        it_dyn, it_static = iter(dyn_args), iter(statics)
        flat_args = [next(it_dyn) if d else next(it_static) for d in dynamic]
        out = fun(*tree_util.tree_unflatten(in_tree, flat_args))
        flat_out, out_tree = tree_util.tree_flatten(out)
        out_tree_box.append(out_tree)
        return flat_out

    try:
        closed = jaxutil.trace_to_jaxpr(flat_fun, avals)
    except jax.errors.ConcretizationTypeError as err:
        err.add_note(_TRACING_NOTE)
        raise
    captured = Captured(closed, out_tree_box[-1])
    if per_fun is not None and not any(map(jaxutil.is_tracer, closed.consts)):
        if len(per_fun) >= _CACHE_PER_FUNCTION:
            per_fun.pop(next(iter(per_fun)))
        # Holding the closed-over values keeps their ids, part of the key, from reuse.
        per_fun[key] = (captured, closure)
    return captured


def _cache_for(fun: Callable) -> dict | None:
    try:
        return _cache.setdefault(fun, {})
    except TypeError:  # not weakly referenceable (a functools.partial of a builtin, ...)
        return None


def _closure_values(fun: Callable) -> tuple:
    cells = getattr(fun, "__closure__", None) or ()
    return tuple(_cell_contents(c) for c in cells)


def _cell_contents(cell: Any) -> Any:
    try:
        return cell.cell_contents
    except ValueError:  # an empty cell
        return None


_TRACING_NOTE = (
    "fungrad traces the function to a jaxpr before differentiating it, as jax.jit does, "
    "so Python control flow cannot depend on the values of differentiated arguments. "
    "Use lax.cond, lax.select or jnp.where instead.")
