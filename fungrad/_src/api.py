"""The public transforms: jvp, linearize, vjp, grad, value_and_grad, jacfwd, jacrev, hessian, hvp."""

from __future__ import annotations

import collections
import functools
import statistics
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax, tree_util

from fungrad._src import api_util, caching, debug_nans, jaxutil
from fungrad._src import primitives as _primitives  # noqa: F401  (registers the rules)
from fungrad._src.capture import Captured, capture
from fungrad._src.jaxutil import ClosedJaxpr
from fungrad._src.jvp import fill, jvp_closed
from fungrad._src.linearize import LinearProgram, linearize_program
from fungrad._src.rules import UndefinedPrimal
from fungrad._src.transpose import backward_pass
from fungrad._src.zeros import Zero, has_tangent_space, instantiate

# --- the flat layer: lists of arrays in, lists out ------------------------------------


def _trace(fun: Callable, args: Sequence[Any], diff_argnums: Sequence[int],
           fname: str, user_fun: Callable) -> tuple[Captured, list[Any], list[bool]]:
    """Captures `fun(*args)`; returns it with its jaxpr inputs and which are differentiated.

    The leaves of the differentiated arguments are traced; the other arguments reach
    `fun` as they are, as under `jax.grad`. The inputs end with the constants of the
    trace, never differentiated.
    """
    leaves, in_tree = tree_util.tree_flatten(tuple(args))
    dynamic = _leaf_is_diff([tree_util.tree_leaves(a) for a in args], diff_argnums)
    debug = jaxutil.user_debug_info(f"fungrad.{fname}", user_fun, args, diff_argnums)
    captured, consts = capture(fun, in_tree, leaves, dynamic, debug)
    inputs = [*(x for x, d in zip(leaves, dynamic, strict=True) if d), *consts]
    return captured, inputs, [*(True for d in dynamic if d), *(False for _ in consts)]


def _nonzeros(captured: Captured, diff: Sequence[bool]) -> tuple[bool, ...]:
    """Which inputs of the captured program get a tangent: the differentiated ones of a
    float or complex type."""
    return tuple(d and has_tangent_space(a)
                 for a, d in zip(captured.jaxpr.in_avals, diff, strict=True))


def _leaf_is_diff(leaves_per_arg: list[list[Any]], diff_argnums: Sequence[int]) -> list[bool]:
    return [i in diff_argnums for i, arg_leaves in enumerate(leaves_per_arg) for _ in arg_leaves]


def _is_traceable_array(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic)) or jaxutil.is_tracer(x)


def _linearize_flat(closed: ClosedJaxpr, inputs: Sequence[Any], nonzeros: Sequence[bool],
                    reused: bool = False):
    """Runs the primal part now; returns the outputs and the program with its residuals."""
    nonzeros = tuple(nonzeros)
    run = _runner(_primal_flat, closed, reused, inputs, nonzeros)
    outs, residuals = run(closed, nonzeros, *inputs)
    return outs, linearize_program(closed, nonzeros), residuals


def _primal_flat(closed: ClosedJaxpr, nonzeros: tuple[bool, ...], *inputs: Any):
    """The outputs of `closed` and the residuals its linear part needs."""
    program = linearize_program(closed, nonzeros)
    known = jaxutil.eval_jaxpr(program.primal, [], *program.primal_consts, *inputs)
    return known[:program.num_outs], known[program.num_outs:]


def _linear_apply(program: LinearProgram, residuals: Sequence[Any], nz_dots: Sequence[Any],
                  out_avals: Sequence[Any]) -> list[Any]:
    nz_out = jaxutil.eval_jaxpr(program.linear, [], *residuals, *nz_dots)
    zeros = [Zero(a.to_tangent_aval()) for a in out_avals]
    return [instantiate(t) for t in fill(program.out_nonzeros, nz_out, zeros)]


def _transpose_apply(program: LinearProgram, residuals: Sequence[Any], cts: Sequence[Any],
                     in_avals: Sequence[Any]) -> list[Any]:
    """Cotangents of the nonzero-tangent inputs, given those of every output."""
    nz_cts = [ct for ct, nz in zip(cts, program.out_nonzeros, strict=True) if nz]
    linear = [UndefinedPrimal(a.to_tangent_aval()) for a in in_avals]
    cts_in = backward_pass(program.linear, [*residuals, *linear], nz_cts)
    return cts_in[len(residuals):]


# --- jvp and linearize ----------------------------------------------------------------


@jaxutil.api_boundary
def jvp(fun: Callable, primals: Sequence[Any], tangents: Sequence[Any],
        has_aux: bool = False) -> tuple[Any, ...]:
    """Forward-mode derivative: evaluates `fun` and its Jacobian-vector product.

    Args:
      fun: function of ``len(primals)`` positional arguments returning arrays (or a pair
        ``(output, aux)`` when ``has_aux``).
      primals: tuple or list of the arguments at which to differentiate.
      tangents: tuple or list with the same structure, shapes and tangent dtypes.
      has_aux: whether ``fun`` returns auxiliary data that is not differentiated.

    Returns:
      ``(primals_out, tangents_out)``, or ``(primals_out, tangents_out, aux)``.

    >>> import jax.numpy as jnp, fungrad
    >>> y, y_dot = fungrad.jvp(jnp.sin, (0.0,), (2.0,))
    >>> float(y), float(y_dot)
    (0.0, 2.0)
    """
    return _jvp(fun, primals, tangents, has_aux, "jvp")


def _jvp(fun: Callable, primals: Sequence[Any], tangents: Sequence[Any], has_aux: bool,
         fname: str, with_primals: bool = True) -> Any:
    """`jvp`, or without `with_primals` the output tangents alone: a compiled program
    then returns only those, and XLA drops what computes only the primal outputs
    (hvp's gradient)."""
    api_util.check_callable(fun, fname)
    api_util.check_args_tuple(primals, "primals", fname)
    api_util.check_args_tuple(tangents, "tangents", fname)
    primals, tangents = tuple(primals), tuple(tangents)
    api_util.check_same_structure(tree_util.tree_structure(primals),
                                  tree_util.tree_structure(tangents), "primals", "tangents", fname)
    api_util.check_array_leaves(primals, "primals", fname)
    for (path, x), t in zip(tree_util.tree_flatten_with_path(primals)[0],
                            tree_util.tree_leaves(tangents), strict=True):
        api_util.check_tangent(x, t, api_util.leaf_name("the tangent at tangents", path), fname)
    fun_ = _with_aux_split(fun, has_aux, fname)
    captured, inputs, diff = _trace(fun_, primals, range(len(primals)), fname, fun)
    given = iter(tree_util.tree_leaves(tangents))
    dots = [next(given) if d else None for d in diff]
    nonzeros = _nonzeros(captured, diff)
    run = _runner(_jvp_flat, captured.jaxpr, captured.reused,
                  [*inputs, *tree_util.tree_leaves(tangents)], nonzeros, with_primals)
    nz_dots = [t for t, nz in zip(dots, nonzeros, strict=True) if nz]
    outs, out_dots = run(captured.jaxpr, nonzeros, with_primals, *inputs, *nz_dots)
    if debug_nans.enabled():
        retrace = functools.partial(debug_nans.fresh_trace, fun_, primals, range(len(primals)))
        debug_nans.check_forward(fname, retrace, inputs, nonzeros, nz_dots, out_dots)
    if not with_primals:
        return tree_util.tree_unflatten(_out_tree(captured, has_aux),
                                        out_dots[:_num_outs(captured, has_aux)])
    return _unflatten_outs(captured, has_aux, _as_given(captured, outs), out_dots)


def _jvp_flat(closed: ClosedJaxpr, nonzeros: tuple[bool, ...], with_primals: bool,
              *inputs_and_dots: Any):
    """The outputs of `closed` (none unless `with_primals`) and their tangents, given the
    tangents of the nonzero inputs."""
    inputs, nz_dots = inputs_and_dots[:len(nonzeros)], inputs_and_dots[len(nonzeros):]
    dots = fill(nonzeros, nz_dots, [Zero.like(x) for x in inputs])
    outs, out_dots = jvp_closed(closed, inputs, dots)
    return (outs if with_primals else []), [instantiate(t) for t in out_dots]


@jaxutil.api_boundary
def linearize(fun: Callable, *primals: Any, has_aux: bool = False) -> tuple[Any, ...]:
    """Evaluates `fun` and returns its linear approximation (a function of tangents).

    The primal computation runs once; each call of the returned function evaluates
    only the staged linear part on the saved residuals.

    >>> import jax.numpy as jnp, fungrad
    >>> y, f_jvp = fungrad.linearize(jnp.exp, 0.0)
    >>> float(f_jvp(3.0))
    3.0
    """
    api_util.check_callable(fun, "linearize")
    api_util.check_array_leaves(primals, "primals", "linearize")
    fun_ = _with_aux_split(fun, has_aux, "linearize")
    captured, inputs, diff = _trace(fun_, primals, range(len(primals)), "linearize", fun)
    nonzeros = _nonzeros(captured, diff)
    outs, _, residuals = _linearize_flat(captured.jaxpr, inputs, nonzeros, captured.reused)
    spec = _LinearizeSpec(captured.jaxpr, tuple(nonzeros), _num_outs(captured, has_aux),
                          _out_tree(captured, has_aux), primals, captured.reused)
    if debug_nans.enabled():
        spec.debug = (functools.partial(debug_nans.fresh_trace, fun_, primals, range(len(primals))),
                      inputs)
    # A pytree (the residuals are its leaves), so it can be passed through jax.jit.
    f_jvp = tree_util.Partial(functools.partial(_linearized, spec), residuals)
    return _finish(captured, has_aux, _as_given(captured, outs), f_jvp)


class _LinearizeSpec:
    """What a linearized function needs besides the residuals; static, hashed by identity."""

    def __init__(self, closed, nonzeros, num_outs, out_tree, primals, reused):
        self.closed, self.nonzeros, self.num_outs, self.out_tree = closed, nonzeros, num_outs, out_tree
        self.in_tree = tree_util.tree_structure(primals)
        self.primal_types = [(tree_util.keystr(path), jax.ShapeDtypeStruct(np.shape(x),
                                                                           jaxutil.typeof(x).dtype))
                             for path, x in tree_util.tree_flatten_with_path(primals)[0]]
        self.compile = reused  # compiled from the second call on
        self.debug: tuple[Callable | None, list] = (None, [])  # under debug_nans: retrace, inputs


def _linearized(spec: _LinearizeSpec, residuals: list, *tangents: Any) -> Any:
    api_util.check_same_structure(spec.in_tree, tree_util.tree_structure(tangents), "primals",
                                  "tangents", "linearize's f_jvp")
    flat = tree_util.tree_leaves(tangents)
    for (path, x), t in zip(spec.primal_types, flat, strict=True):
        api_util.check_tangent(x, t, f"the tangent at tangents{path}", "linearize's f_jvp")
    nz = [t for t, keep in zip(flat, spec.nonzeros[:len(flat)], strict=True) if keep]
    run = _runner(_linear_flat, spec.closed, spec.compile, [*residuals, *nz], spec.nonzeros,
                  len(residuals))
    spec.compile = True
    out_dots = run(spec.closed, spec.nonzeros, len(residuals), *residuals, *nz)
    if debug_nans.enabled():
        debug_nans.check_forward("linearize", *spec.debug, spec.nonzeros, nz, out_dots)
    return tree_util.tree_unflatten(spec.out_tree, out_dots[:spec.num_outs])


def _linear_flat(closed: ClosedJaxpr, nonzeros: tuple[bool, ...], num_residuals: int,
                 *residuals_and_dots: Any) -> list[Any]:
    """The output tangents of `closed`, given the residuals and the nonzero input tangents."""
    residuals, dots = residuals_and_dots[:num_residuals], residuals_and_dots[num_residuals:]
    return _linear_apply(linearize_program(closed, nonzeros), residuals, dots, closed.out_avals)


# --- vjp ------------------------------------------------------------------------------


@jaxutil.api_boundary
def vjp(fun: Callable, *primals: Any, has_aux: bool = False) -> tuple[Any, ...]:
    """Reverse-mode derivative: evaluates `fun` and returns its vector-Jacobian product.

    The returned ``vjp_fun(ct)`` takes a cotangent shaped like the output and returns a
    tuple with one cotangent per primal. It may be called many times, and passed to
    or through ``jax.jit``.

    >>> import jax.numpy as jnp, fungrad
    >>> y, vjp_fun = fungrad.vjp(lambda x: x * x, 3.0)
    >>> [float(g) for g in vjp_fun(1.0)]
    [6.0]
    """
    api_util.check_callable(fun, "vjp")
    api_util.check_array_leaves(primals, "primals", "vjp")
    fun_ = _with_aux_split(fun, has_aux, "vjp")
    captured, inputs, diff = _trace(fun_, primals, range(len(primals)), "vjp", fun)
    nonzeros = _nonzeros(captured, diff)
    outs, _, residuals = _linearize_flat(captured.jaxpr, inputs, nonzeros, captured.reused)
    n_out = _num_outs(captured, has_aux)
    spec = _VjpSpec(captured.jaxpr, n_out, tuple(nonzeros), _out_tree(captured, has_aux),
                    tree_util.tree_structure(primals), captured.reused)
    if debug_nans.enabled():
        spec.debug = (functools.partial(debug_nans.fresh_trace, fun_, primals, range(len(primals))),
                      inputs)
    vjp_fun = tree_util.Partial(functools.partial(_pullback, spec), residuals)
    return _finish(captured, has_aux, _as_given(captured, outs), vjp_fun)


class _VjpSpec:
    """What a pullback needs besides the residuals; static, so hashed by identity."""

    def __init__(self, closed, num_outs, nonzeros, out_tree, in_tree, reused):
        self.closed, self.num_outs, self.nonzeros = closed, num_outs, nonzeros
        self.compile = reused  # compiled from the second call on
        self.in_avals, self.out_avals = tuple(closed.in_avals), tuple(closed.out_avals)
        self.out_tree, self.in_tree = out_tree, in_tree
        self.debug: tuple[Callable | None, list] = (None, [])  # under debug_nans: retrace, inputs


def _pullback(spec: _VjpSpec, residuals: list, ct: Any) -> tuple:
    api_util.check_same_structure(spec.out_tree, tree_util.tree_structure(ct),
                                  "the primal output", "the cotangent", "vjp_fun")
    with_paths = tree_util.tree_flatten_with_path(ct)[0]
    flat_cts = [c for _, c in with_paths]
    for aval, (path, c) in zip(spec.out_avals[:spec.num_outs], with_paths, strict=True):
        api_util.check_tangent(jax.ShapeDtypeStruct(aval.shape, aval.dtype), c,
                               api_util.leaf_name("the cotangent", path, " at "), "vjp_fun",
                               primal_what="the corresponding output of fun")
    run = _runner(_pullback_flat, spec.closed, spec.compile, [*residuals, *flat_cts],
                  spec.nonzeros, spec.num_outs, len(residuals))
    spec.compile = True
    nz_cts = run(spec.closed, spec.nonzeros, spec.num_outs, len(residuals), *residuals, *flat_cts)
    if debug_nans.enabled():
        debug_nans.check_reverse("vjp", *spec.debug, spec.nonzeros, spec.num_outs, flat_cts, nz_cts)
    zeros = [Zero(a.to_tangent_aval()) for a in spec.in_avals]
    cts_in = [instantiate(c) for c in fill(spec.nonzeros, nz_cts, zeros)]
    return tree_util.tree_unflatten(spec.in_tree, cts_in[:spec.in_tree.num_leaves])  # not the lifted


def _pullback_flat(closed: ClosedJaxpr, nonzeros: tuple[bool, ...], num_outs: int,
                   num_residuals: int, *residuals_and_cts: Any) -> list[Any]:
    """Cotangents of the nonzero-tangent inputs, given the residuals and the cotangents
    of the first `num_outs` outputs (the others, aux, get none)."""
    residuals, cts = residuals_and_cts[:num_residuals], residuals_and_cts[num_residuals:]
    aux_zeros = [Zero(a.to_tangent_aval()) for a in closed.out_avals[num_outs:]]
    nz_avals = [a for a, nz in zip(closed.in_avals, nonzeros, strict=True) if nz]
    cts_in = _transpose_apply(linearize_program(closed, nonzeros), residuals,
                              [*cts, *aux_zeros], nz_avals)
    return [instantiate(ct) for ct in cts_in]  # arrays, as a compiled program returns


# --- grad -----------------------------------------------------------------------------


def value_and_grad(fun: Callable, argnums: int | Sequence[int] = 0, has_aux: bool = False,
                   holomorphic: bool = False, allow_int: bool = False) -> Callable:
    """A function that evaluates `fun` and its gradient with respect to `argnums`.

    Args:
      fun: function returning a scalar (or ``(scalar, aux)`` when ``has_aux``).
      argnums: which positional argument(s) to differentiate (int or tuple of ints).
      has_aux: whether ``fun`` returns auxiliary data that is not differentiated.
      holomorphic: whether ``fun`` is holomorphic (complex inputs and output).
      allow_int: allow integer inputs; their gradient is float0 zeros.

    Returns:
      A function returning ``(value, grad)``, or ``((value, aux), grad)``; ``grad`` is a
      tuple when ``argnums`` is a tuple.

    >>> import fungrad
    >>> value, g = fungrad.value_and_grad(lambda x: x ** 2)(3.0)
    >>> float(value), float(g)
    (9.0, 6.0)
    """
    fname = "value_and_grad"
    api_util.check_callable(fun, fname)

    @jaxutil.api_boundary
    @functools.wraps(fun)
    def value_and_grad_f(*args, **kwargs):
        nums = api_util.argnums_tuple(argnums, len(args), fname)
        value, grads, aux = _value_and_grad(fun, args, kwargs, nums, has_aux, holomorphic,
                                            allow_int, fname)
        grads = grads if isinstance(argnums, (tuple, list)) else grads[0]
        return ((value, aux), grads) if has_aux else (value, grads)

    return value_and_grad_f


def grad(fun: Callable, argnums: int | Sequence[int] = 0, has_aux: bool = False,
         holomorphic: bool = False, allow_int: bool = False) -> Callable:
    """A function that evaluates the gradient of scalar-valued `fun`.

    Arguments as for :func:`value_and_grad`; returns ``grad`` or ``(grad, aux)``.

    >>> import jax.numpy as jnp, fungrad
    >>> float(fungrad.grad(lambda x: 3 * x ** 2 - 4 * x + 5)(3.0))
    14.0
    """
    fname = "grad"
    api_util.check_callable(fun, fname)

    @jaxutil.api_boundary
    @functools.wraps(fun)
    def grad_f(*args, **kwargs):
        nums = api_util.argnums_tuple(argnums, len(args), fname)
        _, grads, aux = _value_and_grad(fun, args, kwargs, nums, has_aux, holomorphic,
                                        allow_int, fname, with_value=False)
        grads = grads if isinstance(argnums, (tuple, list)) else grads[0]
        return (grads, aux) if has_aux else grads

    return grad_f


def _value_and_grad(fun, args, kwargs, nums, has_aux, holomorphic, allow_int, fname,
                    with_value=True):
    diff_args = tuple(args[i] for i in nums)
    api_util.check_diff_args(args, nums, fname)
    for x in tree_util.tree_leaves(diff_args):
        api_util.check_input_dtype(x, holomorphic=holomorphic, allow_int=allow_int, fname=fname)
    fun_ = _with_aux_split(functools.partial(fun, **kwargs) if kwargs else fun, has_aux, fname)
    captured, inputs, diff = _trace(fun_, args, nums, fname, fun)
    n_out = _num_outs(captured, has_aux)
    out_tree = _out_tree(captured, has_aux)
    if out_tree.num_leaves != 1 or not tree_util.treedef_is_leaf(out_tree):
        raise TypeError(f"{fname} requires fun to return a single scalar array, but it returned "
                        f"a pytree {out_tree}." + (" Did you mean has_aux=True?" if not has_aux
                                                    and out_tree.num_nodes == 3 else ""))
    out_aval = captured.jaxpr.out_avals[0]
    api_util.check_scalar_output(out_aval, holomorphic=holomorphic, fname=fname)
    nonzeros = _nonzeros(captured, diff)
    # Without the value, a compiled program has one output less to keep: XLA compiles a
    # gradient of many leaves several times faster without its value.
    run = _runner(_value_and_grad_flat, captured.jaxpr, captured.reused, inputs, nonzeros, n_out,
                  with_value)
    outs, nz_grads = run(captured.jaxpr, nonzeros, n_out, with_value, *inputs)
    if debug_nans.enabled():
        debug_nans.check_reverse(fname, functools.partial(debug_nans.fresh_trace, fun_, args, nums),
                                 inputs, nonzeros, n_out, None, nz_grads, captured.jaxpr.out_avals[0])
    outs = _as_given(captured, outs if with_value else [None, *outs])
    nz_grads = iter(nz_grads)
    grads_flat = [next(nz_grads) if nz else instantiate(Zero.like(x))
                  for x, nz, d in zip(inputs, nonzeros, diff, strict=True) if d]
    # `_trace` orders the differentiated leaves by argument position; return them in argnums order.
    positions = sorted(set(nums))
    by_position = dict(zip(positions, tree_util.tree_unflatten(
        tree_util.tree_structure(tuple(args[i] for i in positions)), grads_flat), strict=True))
    grads = tuple(by_position[i] for i in nums)
    aux = tree_util.tree_unflatten(_aux_tree(captured), outs[n_out:]) if has_aux else None
    return outs[0], grads, aux


def _value_and_grad_flat(closed: ClosedJaxpr, nonzeros: tuple[bool, ...], n_out: int,
                         with_value: bool, *inputs: Any) -> tuple[list[Any], list[Any]]:
    """The outputs of `closed` (without the first unless `with_value`) and the gradient of
    the first with respect to the nonzeros."""
    outs, program, residuals = _linearize_flat(closed, inputs, nonzeros)
    ct = lax.full_like(outs[0], 1)  # keeps the output's weak type, so the gradient does too
    cts = [ct, *(Zero(a.to_tangent_aval()) for a in closed.out_avals[n_out:])]
    nz_avals = [jaxutil.typeof(x) for x, nz in zip(inputs, nonzeros, strict=True) if nz]
    grads = [instantiate(g) for g in _transpose_apply(program, residuals, cts, nz_avals)]
    return (outs if with_value else outs[1:]), grads


# --- eager dispatch: op by op, or compiled once compiling pays --------------------------


def _runner(flat: Callable, closed: ClosedJaxpr, reused: bool, values: Sequence[Any],
            *static: Any) -> Callable:
    """`flat` for a call with these values: from eager code, a program seen before runs
    compiled once that pays (see `_Dispatch`); a program traced for this call alone (such
    as a loop's path that depends on values) runs op by op, as jax's eager AD runs. Inside
    a trace (jax.jit, vmap, another transform) `flat` is inlined, so the output stays
    plain lax; in the capture of a transform around this one, a program seen before is
    one call of its jaxpr, traced once (`_Staged`)."""
    if not reused:
        return flat
    key = (flat, caching.Identity(closed), static)
    if not _all_concrete(values):
        if not jaxutil.in_capture():
            return flat
        staged = _staged.get(key)
        if staged is None:
            staged = _staged.put(key, _Staged(flat, closed, static))
        return staged
    dispatch = _dispatches.get(key)
    if dispatch is None:
        dispatch = _dispatches.put(key, _Dispatch(flat, closed, static))
    return dispatch


class _Staged:
    """`flat` for one program inside the capture of another transform (hessian's jacrev,
    hvp's grad), as jax.jit with `inline`: traced once per input types, and one equation
    of the capture (inlined with the program once, see `capture`), which saves running
    fungrad's passes, and tracing their output equation by equation, at every call."""

    def __init__(self, flat: Callable, closed: ClosedJaxpr, static: tuple):
        self.closed, self.num_static = closed, len(static)

        def derived(*args):
            return flat(closed, *static, *args)

        derived.__name__ = derived.__qualname__ = jaxutil.DERIVED_PROGRAM
        self.jitted = jax.jit(derived, inline=True)

    def __call__(self, *args: Any) -> Any:
        return self.jitted(*args[1 + self.num_static:])


_staged = caching.LRU("fungrad.staged", max_entries=512, max_bytes=256 << 20,
                      size=lambda s: caching.approx_bytes(s.closed))


def _all_concrete(values: Sequence[Any]) -> bool:
    """Whether no value is traced: the call comes from eager code, not from a transform."""
    return not any(map(jaxutil.is_tracer, values))


_EXECUTABLE_BYTES = 1 << 20  # a compiled program's size in memory, roughly
_MAX_CHAIN = 2000  # longest chain of dependent equations fungrad hands XLA from eager code


class _Dispatch:
    """How one derived program runs from eager code: op by op (no compile) until the time
    spent so exceeds what compiling it would cost, then compiled.

    As renting skis until the rent paid equals the price: the total time is never more
    than about twice that of the better choice made in hindsight, so a first call costs
    what jax's eager call costs, a program called once is never compiled, and a program
    called often runs compiled. The compile cost is predicted from the program's size,
    at a rate measured on this machine's earlier compiles.
    """

    def __init__(self, flat: Callable, closed: ClosedJaxpr, static: tuple):
        self.flat, self.closed, self.static = flat, closed, static
        self.size = jaxutil.count_eqns(closed.jaxpr)
        self.spent = 0.0  # seconds run op by op
        self.compiled: Callable | None = None
        # Op by op for good where a primitive cannot be compiled, or where XLA would take
        # too long: its compile time grows faster than linearly with the longest chain of
        # dependent equations (3 s at 1,000 on a CPU, minutes at 5,000).
        self.eager_only = jaxutil.longest_chain(closed.jaxpr) > _MAX_CHAIN
        self.compiling = threading.Lock()

    def __call__(self, *args: Any) -> Any:
        if self.compiled is not None:
            try:
                return self.compiled(*args[1 + len(self.static):])
            except (NotImplementedError, ValueError) as err:
                # Whether a program lowers can depend on the context (`check` lowers
                # inside `checkify`), so an earlier success does not rule this out.
                if not jaxutil.is_missing_lowering(err):
                    raise
                self.compiled, self.eager_only = None, True
        elif (not self.eager_only and self.spent >= _compile_cost.predict(self.size)
              and self.compiling.acquire(blocking=False)):
            try:
                return self._compile(args)
            finally:
                self.compiling.release()
        start = time.perf_counter()
        try:
            return self.flat(*args)
        finally:
            self.spent += time.perf_counter() - start

    def _compile(self, args: tuple) -> Any:
        compiled = jax.jit(functools.partial(self.flat, self.closed, *self.static))
        start = time.perf_counter()
        try:
            outs = compiled(*args[1 + len(self.static):])
        except (NotImplementedError, ValueError) as err:
            if not jaxutil.is_missing_lowering(err):
                raise
            self.eager_only = True  # a primitive with an impl only: run it eagerly, as jax does
            return self.flat(*args)
        _compile_cost.observe(self.size, time.perf_counter() - start)
        self.compiled = compiled
        return outs


class _CompileCost:
    """Seconds that compiling a derived program takes, predicted as a fixed cost plus a
    rate per equation of the captured program: the median rate of this process's last
    compiles, so one pathological program (XLA is superlinear on some) does not decide
    for all the others."""

    _BASE = 0.05  # seconds, whatever the size
    _PRIOR_RATE = 5e-4  # seconds per equation on a CPU

    def __init__(self):
        self._rates: collections.deque[float] = collections.deque([self._PRIOR_RATE], maxlen=9)

    def predict(self, size: int) -> float:
        return self._BASE + statistics.median(list(self._rates)) * size

    def observe(self, size: int, seconds: float) -> None:
        self._rates.append(max(seconds - self._BASE, 0.0) / max(size, 1))


_compile_cost = _CompileCost()
_dispatches = caching.LRU("fungrad.compiled", max_entries=256, max_bytes=512 << 20,
                          size=lambda d: _EXECUTABLE_BYTES + caching.approx_bytes(d.closed))


def _eager_transform(impl: Callable, config: tuple, fun: Callable, args: tuple,
                    kwargs: dict, nums: tuple[int, ...], memory_budget: int | None = None,
                    has_aux: bool = False) -> Any:
    """`impl(fun, *config, args, kwargs, nums)`: a Jacobian transform at these arguments.

    From eager code, `fun` is captured once (its Python runs once, as under jax) and the
    transform of the captured program runs as one program, compiled once that program has
    been seen before. Inside a trace the transform is inlined as it is. With
    `memory_budget`, the last entry of `config` (the chunk size) is chosen to fit it.
    """
    if memory_budget is not None:
        return _budgeted_transform(impl, config, fun, args, kwargs, nums, memory_budget, has_aux)
    dyn = tuple(args[i] for i in nums)
    dyn_leaves, dyn_tree = tree_util.tree_flatten(dyn)
    if not all(map(_is_traceable_array, dyn_leaves)) or debug_nans.enabled() or (
            not _all_concrete(tree_util.tree_leaves((args, kwargs))) and not jaxutil.in_capture()):
        # (Checking, the transforms inside trace the user's function itself: the reports
        # name its lines, and run op by op: the checks' errors reach the caller as raised.)
        return impl(fun, *config, args, kwargs, nums)
    debug = jaxutil.user_debug_info(f"fungrad.{impl.__name__[1:-5]}", fun, args, nums)
    captured, consts = capture(_partial_args(fun, args, nums, kwargs), dyn_tree, dyn_leaves,
                               [True] * len(dyn_leaves), debug)
    static = (impl, config, dyn_tree, captured.out_tree)
    run = _runner(_transform_flat, captured.jaxpr, captured.reused, dyn_leaves, *static)
    return _aux_as_given(captured, has_aux, run(captured.jaxpr, *static, *dyn_leaves, *consts))


def _aux_as_given(captured: Captured, has_aux: bool, result: Any) -> Any:
    """A Jacobian transform's `(jac, aux)` with the aux leaves the function returned
    untraced as it returned them (`_as_given`)."""
    if not has_aux or not captured.given_outs:
        return result
    jac, aux = result
    n_out = _out_tree(captured, has_aux=True).num_leaves
    leaves, aux_tree = tree_util.tree_flatten(aux)
    for i, x in captured.given_outs:
        if i >= n_out:
            leaves[i - n_out] = x
    return jac, tree_util.tree_unflatten(aux_tree, leaves)


def _transform_flat(closed: ClosedJaxpr, impl: Callable, config: tuple, dyn_tree: Any,
                    out_tree: Any, *inputs: Any) -> Any:
    """`impl(replay, *config, ...)` at the differentiated arguments, where `replay` runs the
    captured program of the user's function on them (and the trace's constants)."""
    num_dyn = dyn_tree.num_leaves
    consts = inputs[num_dyn:]

    def replay(*dyn_args):
        outs = jaxutil.eval_jaxpr(closed.jaxpr, closed.consts,
                                  *tree_util.tree_leaves(dyn_args), *consts)
        return tree_util.tree_unflatten(out_tree, outs)

    dyn_args = tree_util.tree_unflatten(dyn_tree, list(inputs[:num_dyn]))
    return impl(replay, *config, dyn_args, {}, tuple(range(len(dyn_args))))


# --- chunks at a memory budget ---------------------------------------------------------

# The chunk chosen for a budget, by (canonical program, transform, budget, backend). The
# canonical program is shared by every trace with its structural key and holds the input
# shapes, so a choice is never reused for another program or other shapes.
_chunk_choices = caching.LRU("fungrad.chunk_choices", max_entries=1024, max_bytes=16 << 20,
                             size=lambda _: 256)
_PROBES = 8  # most compiles to find a chunk, after those of chunks 1 and 2


def _budgeted_transform(impl: Callable, config: tuple, fun: Callable, args: tuple,
                        kwargs: dict, nums: tuple[int, ...], budget: int,
                        has_aux: bool = False) -> Any:
    """`impl` with the largest chunk whose compiled program fits `budget` bytes of XLA's
    temporary memory. `fun` is captured (also inside a trace, where its inputs are
    tracers: the choice needs their shapes only) and the chosen transform of the
    captured program runs as `_eager_transform` runs it."""
    fname = impl.__name__[1:-5]
    dyn_leaves, dyn_tree = tree_util.tree_flatten(tuple(args[i] for i in nums))
    debug = jaxutil.user_debug_info(f"fungrad.{fname}", fun, args, nums)
    captured, consts = capture(_partial_args(fun, args, nums, kwargs), dyn_tree, dyn_leaves,
                               [True] * len(dyn_leaves), debug)
    chunk = _chunk_for_budget(captured.jaxpr, consts, impl, config[:-1], dyn_tree,
                              captured.out_tree, budget, fname)
    config = (*config[:-1], chunk)
    if debug_nans.enabled():
        return impl(fun, *config, args, kwargs, nums)
    static = (impl, config, dyn_tree, captured.out_tree)
    reused = captured.reused and all(map(_is_traceable_array, dyn_leaves))
    run = _runner(_transform_flat, captured.jaxpr, reused, [*dyn_leaves, *consts], *static)
    return _aux_as_given(captured, has_aux, run(captured.jaxpr, *static, *dyn_leaves, *consts))


def _chunk_for_budget(closed: ClosedJaxpr, consts: Sequence[Any], impl: Callable, prefix: tuple,
                      dyn_tree: Any, out_tree: Any, budget: int, fname: str) -> int:
    """The chunk for `budget` (cached), warning when even chunk 1 does not fit.

    The probes see concrete constants as constants and traced ones as inputs, as the
    caller's `jax.jit` does: XLA simplifies around constants, which changes the memory.
    Their values are not in the key (only which are concrete): memory depends on shapes.
    """
    concrete = tuple(not jaxutil.is_tracer(c) for c in consts)
    key = (caching.Identity(closed), concrete, impl, prefix, dyn_tree, out_tree, budget,
           jax.default_backend())
    choice = _chunk_choices.get(key)
    if choice is None:
        num_dyn = len(closed.in_avals) - len(consts)
        in_avals = [jax.ShapeDtypeStruct(a.shape, a.dtype, weak_type=a.weak_type)
                    for a, fixed in zip(closed.in_avals, (False,) * num_dyn + concrete, strict=True)
                    if not fixed]

        def measure(k: int) -> int:
            def program(*inputs):
                it = iter(inputs)
                values = [*(next(it) for _ in range(num_dyn)),
                          *(c if fixed else next(it) for c, fixed in zip(consts, concrete, strict=True))]
                return _transform_flat(closed, impl, (*prefix, k), dyn_tree, out_tree, *values)
            return _temp_bytes(jax.jit(program).lower(*in_avals).compile(), fname)

        # The basis is the inputs (forward) or the outputs (reverse): a chunk of the larger
        # size is all at once either way.
        n = max(_basis_size(closed.in_avals[:dyn_tree.num_leaves]), _basis_size(closed.out_avals))
        choice = _chunk_choices.put(key, choose_chunk(measure, max(n, 1), budget))
    chunk, needed = choice
    if needed > budget:
        warnings.warn(f"fungrad.{fname}: even one product at a time (chunk_size=1) needs "
                      f"{needed} bytes of temporary memory, more than memory_budget={budget}; "
                      f"running with chunk_size=1. Raise the budget, or make one product "
                      f"smaller (for example with jax.checkpoint).", stacklevel=4)
    return chunk


def _temp_bytes(compiled: Any, fname: str) -> int:
    analysis = compiled.memory_analysis()
    if analysis is None:
        raise NotImplementedError(
            f"fungrad.{fname}: memory_budget needs XLA's memory analysis of the compiled "
            f"program, which the {jax.default_backend()} backend does not provide; pass "
            f"chunk_size instead.")
    return int(analysis.temp_size_in_bytes)


def choose_chunk(measure: Callable[[int], int], n: int, budget: int) -> tuple[int, int]:
    """The largest chunk k in [1, n] found with ``measure(k) <= budget``, and its measure
    (that of chunk 1, over the budget, when none fits).

    Memory is about linear in the chunk, m(k) ~ a + b k: chunks 1 and 2 give a and b,
    the predicted k is measured, and while it does not fit the line through it and
    chunk 2 predicts a smaller one (XLA's buffer assignment is not exactly linear).

    >>> choose_chunk(lambda k: 100 + 10 * k, 64, 300)
    (20, 300)
    """
    m1 = measure(1)
    if m1 > budget and n > 1:  # the loop itself costs: all at once may still fit
        m_all = measure(n)
        return (n, m_all) if m_all <= budget else (1, m1)
    if m1 > budget or n == 1:
        return 1, m1
    m2 = measure(2)
    if m2 > budget:
        return 1, m1
    k = n if m2 <= m1 else min(n, 2 + (budget - m2) // (m2 - m1))
    for _ in range(_PROBES):
        if k <= 2:
            break
        m = measure(k)
        if m <= budget:
            return k, m
        slope = (m - m2) / (k - 2)
        k = min(k - 1, 2 + int((budget - m2) // slope)) if slope > 0 else k // 2
    return 2, m2


# --- Jacobians, Hessians --------------------------------------------------------------


def jacfwd(fun: Callable, argnums: int | Sequence[int] = 0, has_aux: bool = False,
           holomorphic: bool = False, chunk_size: int | None = None,
           memory_budget: int | None = None) -> Callable:
    """Jacobian of `fun` by forward mode: one JVP per input dimension, vectorized.

    The Jacobian of an output leaf of shape ``out`` with respect to an input leaf of
    shape ``in`` has shape ``out + in``.

    Args:
      fun: the function to differentiate.
      argnums: which positional argument(s) to differentiate (int or tuple of ints).
      has_aux: whether ``fun`` returns ``(output, aux)``; then returns ``(jac, aux)``.
      holomorphic: whether ``fun`` is holomorphic (complex inputs and outputs).
      chunk_size: at most this many JVPs at once (a loop over chunks of the basis, each
        vectorized): the memory of one chunk, the same result exactly.
      memory_budget: instead of ``chunk_size``, bytes of temporary memory (XLA's
        ``temp_size_in_bytes``: neither the inputs nor the returned Jacobian) the compiled
        program may use; the largest chunk that fits is found by compiling, once per
        program, shapes and budget. If even one JVP at a time needs more, it runs one at
        a time with a warning.

    >>> import jax.numpy as jnp, fungrad
    >>> fungrad.jacfwd(lambda x: x ** 2)(jnp.array([1.0, 2.0])).tolist()
    [[2.0, 0.0], [0.0, 4.0]]
    >>> x = jnp.linspace(0.0, 1.0, 64)
    >>> jac = fungrad.jacfwd(jnp.sin, memory_budget=8 * 2**10)(x)
    >>> bool((jac == fungrad.jacfwd(jnp.sin)(x)).all())
    True
    """
    fname = "jacfwd"
    api_util.check_callable(fun, fname)
    api_util.check_chunk_size(chunk_size, fname)
    api_util.check_memory_budget(memory_budget, chunk_size, fname)

    @jaxutil.api_boundary
    @functools.wraps(fun)
    def jacfwd_f(*args, **kwargs):
        nums = api_util.forward_argnums(argnums, args, fname, holomorphic)
        return _eager_transform(_jacfwd_impl, (isinstance(argnums, int), has_aux, chunk_size), fun,
                                args, kwargs, nums, memory_budget, has_aux)

    return jacfwd_f


def _jacfwd_impl(fun: Callable, single: bool, has_aux: bool, chunk_size: int | None,
                 args: tuple, kwargs: dict, nums: tuple[int, ...]) -> Any:
    dyn = tuple(args[i] for i in nums)
    dyn_leaves, dyn_tree = tree_util.tree_flatten(dyn)

    def one_column(i):
        tangents = tree_util.tree_unflatten(dyn_tree, _one_hot(i, dyn_leaves))
        return jvp(_partial_args(fun, args, nums, kwargs), dyn, tangents, has_aux=has_aux)

    results = _map_basis(one_column, [jnp.arange(_basis_size(dyn_leaves))], chunk_size,
                         (None, -1, None) if has_aux else (None, -1))
    y, jac = results[0], results[1]
    jac = tree_util.tree_map(lambda j, out: _reshape_jac_fwd(j, out, dyn_leaves, dyn_tree,
                                                             single), jac, y)
    return (jac, results[2]) if has_aux else jac


def _map_basis(fun: Callable, basis: Sequence[Any], chunk_size: int | None,
               out_axes: Any) -> Any:
    """`jax.vmap(fun, out_axes=out_axes)(*basis)` over the leading axis of the basis, at
    most `chunk_size` vectors at a time (see `_chunked_map`)."""
    n = basis[0].shape[0] if basis else 0
    if (chunk_size is None or chunk_size >= n
            or any(b.dtype == jaxutil.float0 for b in basis)):  # integer inputs: no slicing
        return jax.vmap(fun, out_axes=out_axes)(*basis)
    return _chunked_map(fun, basis, chunk_size, out_axes, n)


def _chunked_map(fun: Callable, basis: Sequence[Any], k: int, out_axes: Any, n: int) -> Any:
    """A loop over chunks of `k` rows of the basis, each vmapped. Chunk c covers rows
    [s, s + k), s = min(c k, n - k): the last chunk overlaps the one before rather than
    being padded, so each chunk's results are written in place into the output (the
    loop's carry). Memory: one chunk's products and the output; no stacked copy."""
    count = -(-n // k)
    batched = jax.vmap(fun, out_axes=out_axes)

    def chunk(c):
        start = jnp.minimum(c * k, n - k)
        return start, batched(*(lax.dynamic_slice_in_dim(b, start, k) for b in basis))

    shapes = jax.eval_shape(lambda: chunk(0)[1])
    leaves, tree = tree_util.tree_flatten(shapes)
    axes = _leaf_axes(shapes, out_axes)
    full = [_full_shape(x.shape, a, n) for x, a in zip(leaves, axes, strict=True)]
    carried = [x.dtype != jaxutil.float0 for x in leaves]  # float0 results are zeros anyway

    def body(c, bufs):
        start, res = chunk(c)
        res = [r for r, keep in zip(tree_util.tree_leaves(res), carried, strict=True) if keep]
        axes_kept = [a for a, keep in zip(axes, carried, strict=True) if keep]
        return [_write(b, r, start, a) for b, r, a in zip(bufs, res, axes_kept, strict=True)]

    init = [jnp.zeros(shape, x.dtype) for x, shape, keep in zip(leaves, full, carried, strict=True)
            if keep]
    done = iter(lax.fori_loop(0, count, body, init))
    outs = [jaxutil.weak_like(next(done), x) if keep else np.zeros(shape, jaxutil.float0)
            for x, shape, keep in zip(leaves, full, carried, strict=True)]
    return tree_util.tree_unflatten(tree, outs)


def _leaf_axes(shapes: Any, out_axes: Any) -> list[Any]:
    """The batch axis (0, -1 or None) of each output leaf, from `out_axes` per part."""
    if not isinstance(out_axes, tuple):
        return [out_axes] * len(tree_util.tree_leaves(shapes))
    return [axis for axis, part in zip(out_axes, shapes, strict=True)
            for _ in tree_util.tree_leaves(part)]


def _full_shape(shape: tuple[int, ...], axis: Any, n: int) -> tuple[int, ...]:
    if axis is None:
        return shape
    axis = axis % len(shape)
    return (*shape[:axis], n, *shape[axis + 1:])


def _write(buf: Any, res: Any, start: Any, axis: Any) -> Any:
    if axis is None:
        return res  # the same in every chunk (the primal output)
    return lax.dynamic_update_slice_in_dim(buf, res.astype(buf.dtype), start, axis % buf.ndim)


def _one_hot(i: Any, leaves: Sequence[Any]) -> list[Any]:
    """Row `i` of the identity over the concatenated flat `leaves`, split per leaf in each
    leaf's tangent dtype. Made from the index inside the loop, so that a chunk of the
    basis never needs the whole identity (n x n) in memory."""
    out, start = [], 0
    for x in leaves:
        aval = jaxutil.typeof(x)
        dtype, size = aval.to_tangent_aval().dtype, int(np.prod(aval.shape))
        if dtype == jaxutil.float0:
            out.append(np.zeros(aval.shape, jaxutil.float0))
        else:
            hot = jnp.arange(size, dtype=jnp.asarray(i).dtype) + start == i
            out.append(hot.astype(dtype).reshape(aval.shape))
        start += size
    return out


def _basis_size(leaves: Sequence[Any]) -> int:
    return sum(int(np.prod(x.shape if hasattr(x, "shape") else np.shape(x))) for x in leaves)


def _reshape_jac_fwd(j, out, dyn_leaves, dyn_tree, single):
    """Splits the last axis of a stacked Jacobian by input leaf: out.shape + in.shape each."""
    out_shape = np.shape(out)
    pieces, start = [], 0
    for x in dyn_leaves:
        size = int(np.prod(np.shape(x)))
        piece = jnp.reshape(j[..., start:start + size], (*out_shape, *np.shape(x)))
        pieces.append(jaxutil.weak_like(piece, out))  # as jax's, weak where the output is
        start += size
    tree = tree_util.tree_unflatten(dyn_tree, pieces)
    return tree[0] if single else tree


def jacrev(fun: Callable, argnums: int | Sequence[int] = 0, has_aux: bool = False,
           holomorphic: bool = False, allow_int: bool = False,
           chunk_size: int | None = None, memory_budget: int | None = None) -> Callable:
    """Jacobian of `fun` by reverse mode: one VJP per output dimension, vectorized.

    Arguments as for :func:`jacfwd`, and ``allow_int`` (integer inputs, whose Jacobian is
    zeros); ``chunk_size`` and ``memory_budget`` bound the VJPs at once. The residuals of
    the one linearization are temporary memory too: a budget below them cannot be met.

    >>> import jax.numpy as jnp, fungrad
    >>> fungrad.jacrev(lambda x: x ** 2)(jnp.array([1.0, 2.0])).tolist()
    [[2.0, 0.0], [0.0, 4.0]]
    """
    fname = "jacrev"
    api_util.check_callable(fun, fname)
    api_util.check_chunk_size(chunk_size, fname)
    api_util.check_memory_budget(memory_budget, chunk_size, fname)

    @jaxutil.api_boundary
    @functools.wraps(fun)
    def jacrev_f(*args, **kwargs):
        nums = api_util.argnums_tuple(argnums, len(args), fname)
        dyn = tuple(args[i] for i in nums)
        api_util.check_diff_args(args, nums, fname)
        for x in tree_util.tree_leaves(dyn):
            api_util.check_input_dtype(x, holomorphic=holomorphic, allow_int=allow_int,
                                       fname=fname)
        return _eager_transform(_jacrev_impl, (isinstance(argnums, int), has_aux, holomorphic,
                                               chunk_size),
                                fun, args, kwargs, nums, memory_budget, has_aux)

    return jacrev_f


def _jacrev_impl(fun: Callable, single: bool, has_aux: bool, holomorphic: bool,
                 chunk_size: int | None, args: tuple,
                 kwargs: dict, nums: tuple[int, ...]) -> Any:
    dyn = tuple(args[i] for i in nums)
    outs = vjp(_partial_args(fun, args, nums, kwargs), *dyn, has_aux=has_aux)
    y, pullback = outs[0], outs[1]
    y_leaves, y_tree = tree_util.tree_flatten(y)
    for leaf in y_leaves:
        api_util.check_output_dtype(jaxutil.typeof(leaf).dtype, holomorphic=holomorphic,
                                    fname="jacrev")
    cols = _map_basis(lambda i: pullback(tree_util.tree_unflatten(y_tree, _one_hot(i, y_leaves))),
                      [jnp.arange(_basis_size(y_leaves))], chunk_size, 0)
    cols = tree_util.tree_map(_like_input, cols, dyn)
    jac = _reshape_jac_rev(cols, y_leaves, y_tree, single)
    return (jac, outs[2]) if has_aux else jac


def _like_input(col, x):
    """As jax's: the Jacobian with respect to an integer input is zeros of its dtype, and
    with respect to a weakly typed input is weakly typed."""
    if col.dtype != jaxutil.float0:
        return jaxutil.weak_like(col, x)
    return jnp.zeros(col.shape, jaxutil.typeof(x).dtype)


def _reshape_jac_rev(cols, y_leaves, y_tree, single):
    """From per-input stacks of shape (N_out, *in.shape) to out tree of in trees."""
    cols = cols[0] if single else cols
    per_out, start = [], 0
    for y in y_leaves:
        size = int(np.prod(np.shape(y)))
        per_out.append(tree_util.tree_map(
            lambda c, start=start, size=size, y=y: jnp.reshape(
                c[start:start + size], (*np.shape(y), *c.shape[1:])), cols))
        start += size
    return tree_util.tree_unflatten(y_tree, per_out)


def hessian(fun: Callable, argnums: int | Sequence[int] = 0, has_aux: bool = False,
            holomorphic: bool = False, chunk_size: int | None = None,
            memory_budget: int | None = None) -> Callable:
    """Hessian of scalar `fun`: ``jacfwd(jacrev(fun))``, each with ``chunk_size`` or
    ``memory_budget``. With a budget the inner ``jacrev`` takes the largest chunk that
    fits it, then the outer ``jacfwd`` the largest chunk of those that still fits.

    >>> import jax.numpy as jnp, fungrad
    >>> fungrad.hessian(lambda x: jnp.sum(x ** 3))(jnp.array([1.0, 2.0])).tolist()
    [[6.0, 0.0], [0.0, 12.0]]
    """
    api_util.check_chunk_size(chunk_size, "hessian")
    api_util.check_memory_budget(memory_budget, chunk_size, "hessian")
    return jacfwd(jacrev(fun, argnums, has_aux=has_aux, holomorphic=holomorphic,
                         chunk_size=chunk_size, memory_budget=memory_budget), argnums,
                  has_aux=has_aux, holomorphic=holomorphic, chunk_size=chunk_size,
                  memory_budget=memory_budget)


@jaxutil.api_boundary
def hvp(fun: Callable, primals: Sequence[Any], tangents: Sequence[Any]) -> tuple[Any, ...]:
    """Hessian-vector product of scalar `fun`, forward over reverse.

    Returns a tuple shaped like ``primals``: the Hessian of ``fun`` at ``primals``
    applied to ``tangents``.

    >>> import jax.numpy as jnp, fungrad
    >>> (h,) = fungrad.hvp(lambda x: jnp.sum(x ** 3), (jnp.array([1.0, 2.0]),),
    ...                    (jnp.array([1.0, 0.0]),))
    >>> h.tolist()
    [6.0, 0.0]
    """
    api_util.check_callable(fun, "hvp")
    api_util.check_args_tuple(primals, "primals", "hvp")  # the rest is checked by _jvp
    all_args = tuple(range(len(primals)))
    return _jvp(grad(fun, argnums=all_args), primals, tangents, False, "hvp",
                with_primals=False)


# --- helpers --------------------------------------------------------------------------


def _partial_args(fun: Callable, args: tuple, nums: Sequence[int],
                  kwargs: dict[str, Any]) -> Callable:
    """`fun` as a function of the arguments at `nums`, the others (and `kwargs`) fixed."""
    def f(*dyn):
        full = list(args)
        for i, x in zip(nums, dyn, strict=True):
            full[i] = x
        return fun(*full, **kwargs)
    return f


def _with_aux_split(fun: Callable, has_aux: bool, fname: str) -> Callable:
    if not has_aux:
        return fun

    def f(*args):
        return api_util.split_aux(fun(*args), fname)

    return f


def _num_outs(captured: Captured, has_aux: bool) -> int:
    return _out_tree(captured, has_aux).num_leaves


def _out_tree(captured: Captured, has_aux: bool) -> Any:
    if not has_aux:
        return captured.out_tree
    return tree_util.treedef_children(captured.out_tree)[0]


def _aux_tree(captured: Captured) -> Any:
    return tree_util.treedef_children(captured.out_tree)[1]


def _as_given(captured: Captured, outs: Sequence[Any]) -> list[Any]:
    """`outs` with the outputs the function returned untraced as it returned them (as jax
    returns a Python float or numpy array given as aux), not as the program's values."""
    outs = list(outs)
    for i, x in captured.given_outs:
        outs[i] = x
    return outs


def _unflatten_outs(captured, has_aux, outs, out_dots):
    n_out = _num_outs(captured, has_aux)
    out_tree = _out_tree(captured, has_aux)
    y = tree_util.tree_unflatten(out_tree, outs[:n_out])
    y_dot = tree_util.tree_unflatten(out_tree, out_dots[:n_out])
    if has_aux:
        return y, y_dot, tree_util.tree_unflatten(_aux_tree(captured), outs[n_out:])
    return y, y_dot


def _finish(captured, has_aux, outs, fn):
    n_out = _num_outs(captured, has_aux)
    y = tree_util.tree_unflatten(_out_tree(captured, has_aux), outs[:n_out])
    if has_aux:
        return y, fn, tree_util.tree_unflatten(_aux_tree(captured), outs[n_out:])
    return y, fn
