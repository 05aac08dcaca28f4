"""The one module that touches jax internals; version differences live here."""

from __future__ import annotations

import contextlib
import functools
import gc
import os
import sys
import threading
import types
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax._src import ad_util, core, source_info_util, traceback_util
from jax._src import api_util as _api_util
from jax._src import config as _config
from jax._src import custom_derivatives as _custom_derivatives
from jax._src import dtypes as _dtypes
from jax._src import linear_util as _lu
from jax._src.interpreters import batching, mlir
from jax._src.interpreters import partial_eval as _pe
from jax._src.lax import lax as _lax
from jax._src.sharding_impls import UNSPECIFIED
from jax.extend.core import (
    ClosedJaxpr,
    DebugInfo,
    Jaxpr,
    JaxprEqn,
    Literal,
    Primitive,
    Var,
    new_jaxpr_eqn,
)
from jax.extend.core import primitives as prims

from fungrad._src import caching

__all__ = [
    "ClosedJaxpr",
    "Jaxpr",
    "JaxprEqn",
    "Literal",
    "Primitive",
    "Var",
    "bind_eqn",
    "float0",
    "is_tracer",
    "jit_params",
    "new_jaxpr",
    "new_eqn",
    "prims",
    "source_line",
    "trace_to_jaxpr",
    "typeof",
]

float0 = jax.dtypes.float0
typeof = jax.typeof

# fungrad's own frames are left out of the tracebacks users see, as jax leaves out its own
# (JAX_TRACEBACK_FILTERING=off shows them); the public transforms are the boundary.
traceback_util.register_exclusion(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def api_boundary(fun: Callable) -> Callable:
    """A public transform: jax's traceback boundary, the collector paused for the call (see
    `collection_paused`), and jax's FloatingPointError (under jax_debug_nans) where a rule
    ran a jitted computation that made a nan or inf."""
    @functools.wraps(fun)
    def transform(*args, **kwargs):
        try:
            with collection_paused():
                return fun(*args, **kwargs)
        except _api_util.InternalFloatingPointError as err:
            raise FloatingPointError(f"invalid value ({err.ty}) encountered in {err.name}; "
                                     "fungrad computed it in a derivative") from None

    return traceback_util.api_boundary(transform)


# Python's cyclic garbage collector is paused for a transform's call (and a capture's): a
# trace makes tens of thousands of objects, freed by their reference counts when the call
# is over. Collections during the call would walk them (and jax's large heap: a full
# collection every few dozen calls of a large model cost a tenth of its eager call), and
# resuming between the trace and the end of the call would promote the live trace to the
# old generations. Garbage in cycles made during the call is collected after it.
_pause_lock = threading.Lock()
_pausing = [0, False]  # calls paused now; whether the collector was on before the first


@contextlib.contextmanager
def collection_paused():
    with _pause_lock:
        if _pausing[0] == 0:
            _pausing[1] = gc.isenabled()
            gc.disable()
        _pausing[0] += 1
    try:
        yield
    finally:
        with _pause_lock:
            _pausing[0] -= 1
            if _pausing[0] == 0 and _pausing[1]:
                gc.enable()


def is_tracer(x: Any) -> bool:
    return isinstance(x, jax.core.Tracer)


def in_capture() -> bool:
    """Whether the current trace is a capture that keeps inlinable calls whole: that of a
    transform around the caller."""
    trace = core.trace_ctx.trace
    return type(trace) is _EagerTrace and trace.defers_calls


def weak_like(x: Any, example: Any) -> Any:
    """`x` weakly typed where `example` is (a Jacobian keeps its function's weak type)."""
    if not typeof(example).weak_type or typeof(x).dtype != typeof(example).dtype:
        return x
    return _lax._convert_element_type(x, typeof(x).dtype, weak_type=True)


def bind_eqn(eqn: JaxprEqn, invals: Sequence[Any]) -> list[Any]:
    """Runs one equation on values (concrete or traced); always returns a list."""
    params = eqn.primitive.get_bind_params(eqn.params)
    with (source_info_util.user_context(eqn.source_info.traceback), eqn.ctx.manager,
          _rebinding()):
        try:
            out = eqn.primitive.bind(*invals, **params)
        except _api_util.InternalFloatingPointError as err:  # jax_debug_nans / debug_infs
            _raise_floating_point_error(eqn, invals, err)
    return list(out) if eqn.primitive.multiple_results else [out]


_rebinding_state = threading.local()


@contextlib.contextmanager
def _rebinding():
    """Marks equations that fungrad re-binds from a program it holds (not the user's own
    calls): their custom_jvp rules were traced when that program was captured."""
    depth = getattr(_rebinding_state, "depth", 0)
    _rebinding_state.depth = depth + 1
    try:
        yield
    finally:
        _rebinding_state.depth = depth


def _raise_floating_point_error(eqn: JaxprEqn, invals: Sequence[Any], err: Any):
    """As jax does for a jitted call: re-run the body op by op so that the error names
    the primitive that made the nan or inf, then raise a FloatingPointError."""
    inner = eqn.params.get("jaxpr")
    if isinstance(inner, ClosedJaxpr):
        eval_jaxpr(inner.jaxpr, inner.consts, *invals)
    raise FloatingPointError(f"invalid value ({err.ty}) encountered in {err.name}") from None


def new_eqn(invars, outvars, primitive: Primitive, params: dict, like: JaxprEqn) -> JaxprEqn:
    """A new equation carrying the source information and context of `like`."""
    return new_jaxpr_eqn(invars, outvars, primitive, params, like.effects,
                         like.source_info, like.ctx)


def rule_context(eqn: JaxprEqn):
    """A context in which the equations a rule emits for `eqn` carry `eqn`'s source line
    (the user's), not the rule's, so errors and reports name the user's code."""
    return source_info_util.user_context(eqn.source_info.traceback)


def source_line(eqn: JaxprEqn) -> str:
    """The user's source line that produced `eqn`, or '' when jax recorded none."""
    return source_info_util.summarize(eqn.source_info)


def trace_to_jaxpr(fun: Callable, avals: Sequence[Any]) -> ClosedJaxpr:
    """Traces `fun(*flat_args) -> flat_outs` at the given avals to a closed jaxpr.

    The avals are used whole: weak type, sharding and the mesh axes a value varies
    over (inside a shard_map body) all reach the traced function.
    """
    name = getattr(fun, "__name__", "<fungrad>")
    debug = DebugInfo("fungrad", name, None, None)
    jaxpr, _, consts = _pe.trace_to_jaxpr_dynamic(
        _lu.wrap_init(lambda *args: list(fun(*args)), debug_info=debug), list(avals))
    closed = ClosedJaxpr(jaxpr, consts)
    if core.internal_mutable_array_effect in jaxpr.effects:
        closed = discharge_refs(closed)
    return closed


def discharge_refs(closed: ClosedJaxpr) -> ClosedJaxpr:
    """The same program with the refs it creates (`jax.new_ref`, ...) turned into plain
    values threaded through it: reads and writes become value flow, so no rule ever sees
    a ref (a program transformation, not differentiation)."""
    from jax._src.state.discharge import discharge_state

    return discharge_state(closed, should_discharge=False)


def zeros_like_aval(aval) -> Any:
    """Zeros of `aval`'s type (weakly typed where it is, as jax's zero tangents are),
    varying over the same mesh axes inside `shard_map`."""
    if aval.dtype == float0:
        return np.zeros(aval.shape, float0)
    if getattr(aval, "weak_type", False):
        zeros = jax.lax.full(aval.shape, _lax._convert_element_type(0, aval.dtype, weak_type=True))
    else:
        zeros = jax.lax.full(aval.shape, 0, aval.dtype)
    axes = varying_axes(aval)
    return jax.lax.pcast(zeros, tuple(sorted(axes)), to="varying") if axes else zeros


def jit_params(params: dict, closed: ClosedJaxpr, in_like: Sequence[int | None],
               out_like: Sequence[int | None]) -> dict:
    """Params of a `jit` equation on a new body, mirroring the old per-argument params.

    `in_like[i]` is the old input whose sharding and layout new input `i` keeps (None
    for a new input such as a residual); likewise `out_like` for the outputs.
    """
    def pick(old: tuple, like: Sequence[int | None], default: Any) -> tuple:
        return tuple(default if i is None else old[i] for i in like)

    return dict(
        params,
        jaxpr=closed,
        in_shardings=pick(params["in_shardings"], in_like, UNSPECIFIED),
        in_layouts=pick(params["in_layouts"], in_like, None),
        out_shardings=pick(params["out_shardings"], out_like, UNSPECIFIED),
        out_layouts=pick(params["out_layouts"], out_like, None),
        donated_invars=(False,) * len(in_like),
    )


def new_jaxpr(constvars: Sequence[Var], invars: Sequence[Var], outvars: Sequence[Any],
              eqns: Sequence[JaxprEqn]) -> Jaxpr:
    """A jaxpr over existing variables and equations, with the effects they carry."""
    effects = core.join_effects(*(eqn.effects for eqn in eqns))
    debug = DebugInfo("fungrad", "<fungrad>", None, None)
    return Jaxpr(constvars, invars, outvars, eqns, effects, debug)


def eval_jaxpr(jaxpr: Jaxpr, consts: Sequence[Any], *args: Any) -> list[Any]:
    """Runs `jaxpr` by binding each equation on the current trace."""
    env: dict[Any, Any] = {}

    def read(v):
        return v.val if type(v) is Literal else env[v]

    for v, x in zip([*jaxpr.constvars, *jaxpr.invars], [*consts, *args], strict=True):
        env[v] = x
    for eqn in jaxpr.eqns:
        for v, x in zip(eqn.outvars, bind_eqn(eqn, [read(v) for v in eqn.invars]), strict=True):
            env[v] = x
    return [read(v) for v in jaxpr.outvars]


def consts_as_invars(closed: ClosedJaxpr) -> tuple[Jaxpr, list[Any]]:
    """The open jaxpr taking `closed`'s constants as leading inputs, and those constants."""
    jaxpr = closed.jaxpr
    return (new_jaxpr([], [*jaxpr.constvars, *jaxpr.invars], jaxpr.outvars, jaxpr.eqns),
            list(closed.consts))


def int_option(name: str, default: int, help: str) -> Any:
    """A jax configuration option of fungrad's, part of jax's trace context: a program
    traced under one value is never reused under another (by jit or fungrad's caches).
    Calling it with a value gives a context manager that sets it."""
    return _config.int_state(name, default, help, include_in_trace_context=True)


def weak_cache(fun: Callable) -> Callable:
    """A bounded cache of `fun(jaxpr, *args)` holding the jaxpr weakly; jax's configuration
    (x64, the axis environment...) is part of the key, as it is of what a trace gives."""
    return caching.weak_cache(fun, context=_config.trace_context)


# --- custom_jvp / custom_vjp: how jax stores the user's rules in an equation ----------

def custom_jvp_rule(jvp_jaxpr_fun: Any, in_zeros: Sequence[bool]) -> tuple[Jaxpr, list, list[bool]]:
    """The user's JVP rule as a jaxpr `(primals, nonzero tangents) -> (outs, nonzero out tangents)`."""
    jaxpr, consts, out_zeros = jvp_jaxpr_fun.call_wrapped(*in_zeros)
    return jaxpr, list(consts), list(out_zeros)


def custom_vjp_fwd(fwd_jaxpr_thunk: Any, out_trees: Callable,
                   in_nonzeros: Sequence[bool]) -> tuple[Jaxpr, list, int, list[int | None]]:
    """The user's fwd as a jaxpr `primals -> (new residuals, outs)`.

    Also returns the number of residuals in all and, per residual, the index of the
    input it simply forwards (those are not among the jaxpr's outputs), or None.
    """
    with _closed_over_trace_values(fwd_jaxpr_thunk, "fwd"):
        fwd, consts = fwd_jaxpr_thunk.call_wrapped(*in_nonzeros)
    _, res_tree, input_fwds = out_trees()
    return fwd, list(consts), res_tree.num_leaves, list(input_fwds)


def call_custom_bwd(bwd: Any, res: Sequence[Any], cts: Sequence[Any]) -> list[Any]:
    """Runs the user's bwd; cotangents that it reports as zero come back as None."""
    with _closed_over_trace_values(bwd, "bwd"):
        cts_in = bwd.call_wrapped(*res, *cts)
    return [None if x is None or isinstance(x, (ad_util.Zero, ad_util.SymbolicZero)) else x
            for x in cts_in]


@contextlib.contextmanager
def _closed_over_trace_values(rule: Any, what: str):
    """fungrad runs a custom_vjp's fwd and bwd after capturing the function: one that
    closes over a value of a trace inside it (a jax.vmap) finds that trace ended."""
    try:
        yield
    except jax.errors.UnexpectedTracerError as err:
        src = getattr(getattr(rule, "debug_info", None), "func_src_info", None)
        where = f" ({src})" if src else ""
        raise NotImplementedError(
            f"fungrad cannot differentiate this custom_vjp function: its {what}{where} closes "
            "over a value computed by a transform inside the differentiated function (most "
            "likely a jax.vmap), which has ended when fungrad runs the rule. Pass that value "
            "as an argument of the custom_vjp function instead.") from err


def symbolic_zero_for_user(aval: Any) -> Any:
    """The object a `symbolic_zeros=True` custom rule expects in place of a zero tangent."""
    return ad_util.SymbolicZero(aval)


def register_impl_everywhere(prim: Primitive, impl: Callable[..., list]) -> None:
    """Makes `prim` (with multiple results) run as `impl(*args, **params)` eagerly, when
    compiled (lowered as the ops `impl` binds) and under `vmap` (`impl` vmapped)."""
    prim.def_impl(impl)
    mlir.register_lowering(prim, mlir.lower_fun(impl, multiple_results=True))

    def batching_rule(args, dims, **params):
        outs = jax.vmap(functools.partial(impl, **params), in_axes=tuple(dims))(*args)
        return outs, [0] * len(outs)

    batching.primitive_batchers[prim] = batching_rule


def is_ref_aval(aval: Any) -> bool:
    """Whether `aval` is the type of a mutable ref (`jax.new_ref`)."""
    from jax._src.state.types import AbstractRef

    return isinstance(aval, AbstractRef)


def has_debug_effect(eqn: JaxprEqn) -> bool:
    """Whether `eqn` is (or contains) a `jax.debug` callback or print."""
    from jax._src import debugging

    return any(e in (debugging.debug_effect, debugging.ordered_debug_effect) for e in eqn.effects)


def count_eqns(jaxpr: Jaxpr) -> int:
    """The equations of `jaxpr` and of the jaxprs nested in it (each once)."""
    seen: set[int] = set()
    todo, total = [jaxpr], 0
    while todo:
        j = todo.pop()
        if id(j) in seen:
            continue
        seen.add(id(j))
        total += len(j.eqns)
        todo.extend(core.subjaxprs(j))
    return total


def longest_chain(jaxpr: Jaxpr) -> int:
    """The most equations on one path of dependencies through `jaxpr` (a nested jaxpr's
    equation counts once)."""
    depth: dict[Any, int] = {}
    longest = 0
    for eqn in jaxpr.eqns:
        d = 1 + max((depth.get(v, 0) for v in eqn.invars if type(v) is not Literal), default=0)
        for v in eqn.outvars:
            depth[v] = d
        longest = max(longest, d)
    return longest


def is_missing_lowering(err: Exception) -> bool:
    """Whether `err` says a primitive cannot be compiled, only run eagerly: it has no MLIR
    lowering, or it is a `checkify.check` outside `checkify` (jax runs it eagerly)."""
    message = str(err)
    return ((isinstance(err, NotImplementedError) and "MLIR translation rule for primitive" in message)
            or (isinstance(err, ValueError) and "checkify.check which was not functionalized" in message))


class ByIdentity:
    """An equation parameter compared and hashed by identity (jax requires hashable params;
    a user's bwd with nondiff_argnums closes over values that need not be)."""

    __slots__ = ("value",)

    def __init__(self, value: Any):
        self.value = value

    def __repr__(self) -> str:
        return f"ByIdentity({self.value!r})"


# --- primitives jax keeps outside jax.extend --------------------------------------------

_INTERNAL_PRIMS = {
    "jax._src.core": ["pvary_p", "ref_p", "freeze_p", "empty_ref_p", "free_ref_p"],
    "jax._src.lax.lax": ["optimization_barrier_p", "split_p", "stack_p", "unstack_p", "tile_p",
                         "mulhi_p", "empty_p", "composite_p", "ragged_dot_general_p"],
    "jax._src.lax.slicing": ["scatter_sub_p"],
    "jax._src.lax.linalg": ["lu_pivots_to_permutation_p", "geqrf_p", "geqp3_p", "ormqr_p",
                            "cholesky_update_p", "symmetric_product_p"],
    "jax._src.lax.parallel": ["psum_invariant_p", "all_gather_invariant_p", "reduce_scatter_p",
                              "pbroadcast_p"],
    "jax._src.lax.control_flow.conditionals": ["platform_index_p"],
    "jax._src.pjit": ["reshard_p", "layout_constraint_p"],
    "jax._src.random.prng": ["random_wrap_p", "random_unwrap_p", "iota_2x32_shape_p"],
    "jax._src.random.core": ["random_clone_p"],
    "jax._src.random.threefry4x32": ["threefry4x32_p"],
    "jax._src.random.philox2x32": ["philox2x32_p"],
    "jax._src.random.philox4x32": ["philox4x32_p"],
    "jax._src.shard_map": ["shard_map_p"],
    "jax._src.shard_alike": ["shard_alike_p"],
    "jax._src.state.primitives": ["addupdate_p"],
    "jax._src.debugging": ["debug_callback_p", "debug_print_p", "inspect_sharding_p"],
    "jax._src.callback": ["pure_callback_p", "io_callback_p"],
    "jax._src.ffi": ["ffi_call_p"],
    "jax._src.custom_batching": ["custom_vmap_p"],
    "jax._src.custom_derivatives": ["linear_call_p"],
    "jax._src.checkify": ["check_p"],
}


def _internal_prims() -> dict[str, Primitive]:
    """Primitives that plain jax code emits but `jax.extend.core.primitives` does not list
    (`jnp.stack`'s `stack`, `.at[].subtract`'s `scatter-sub`, `jax.debug.print`, ...).

    Looked up by name so that a primitive renamed or removed in another jax version is
    simply absent here (its rules are then not registered) instead of an import error.
    """
    import importlib

    found = {}
    for module_name, names in _INTERNAL_PRIMS.items():
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        for name in names:
            prim = getattr(module, name, None)
            if isinstance(prim, Primitive):
                found[name] = prim
    return found


internal_prims: dict[str, Primitive] = _internal_prims()


def device_put_transpose_params(devices: tuple, srcs: tuple, copy_semantics: tuple) -> dict:
    """Params of the `device_put` that sends cotangents back where the primals came from."""
    from jax._src.dispatch import ArrayCopySemantics

    if any(c == ArrayCopySemantics.DONATE_INPUT for c in copy_semantics):
        raise ValueError("fungrad cannot transpose device_put(..., donate=True): a donated "
                         "buffer has no cotangent to send back. Drop donate=True.")
    return dict(devices=srcs, srcs=devices,
                copy_semantics=(ArrayCopySemantics.ALWAYS_COPY,) * len(devices))


def varying_axes(aval: Any) -> frozenset:
    """The manual mesh axes over which a value inside `shard_map` varies."""
    mat = getattr(aval, "mat", None)
    if mat is not None:
        return frozenset(mat.varying)
    return frozenset(getattr(aval, "vma", frozenset()))


def shard_map_residual_spec(aval: Any, mesh: Any, newly_manual_axes: frozenset,
                            check_vma: bool) -> Any:
    """The spec of a residual carried out of a `shard_map` with a leading singleton dim:
    its per-shard values stacked along dim 0 over the axes it varies along."""
    from jax.sharding import PartitionSpec

    names = varying_axes(aval) if check_vma else newly_manual_axes
    ordered = tuple(n for n in mesh.axis_names if n in names)
    return PartitionSpec(ordered) if ordered else PartitionSpec()


def shard_map_global_aval(aval: Any, spec: Any, *, mesh: Any, check_vma: bool,
                          newly_manual_axes: frozenset) -> Any:
    """The aval outside `shard_map` of a per-shard `aval` leaving through `spec`."""
    del newly_manual_axes
    return core.unshard_aval(mesh, check_vma, spec, aval)


def shard_map_local_aval(aval: Any, spec: Any, *, mesh: Any, check_vma: bool,
                         newly_manual_axes: frozenset) -> Any:
    """The per-shard aval inside `shard_map` of a global `aval` entering through `spec`."""
    return core.shard_aval(mesh, newly_manual_axes, check_vma, spec, aval)


def trace_in_shard_map(fun: Callable, avals: Sequence[Any], *, mesh: Any,
                       newly_manual_axes: frozenset, check_vma: bool) -> tuple[Jaxpr, list[Any]]:
    """Traces `fun(*per_shard_args) -> list` as a `shard_map` body (collectives allowed).

    Returns an open jaxpr and the constants it closes over (its constvars).
    """
    from jax._src import config
    from jax._src import linear_util as lu
    from jax._src import shard_map as shard_map_lib
    from jax._src.interpreters import partial_eval as pe
    from jax._src.mesh import use_abstract_mesh

    inner = shard_map_lib._as_manual_mesh(mesh, frozenset(newly_manual_axes))
    debug = DebugInfo("fungrad", "<fungrad shard_map body>", None, None)
    with (shard_map_lib._extend_axis_env(mesh, frozenset(newly_manual_axes)),
          use_abstract_mesh(inner), config._check_vma(check_vma)):
        jaxpr, _, consts = pe.trace_to_jaxpr_dynamic(
            lu.wrap_init(lambda *a: list(fun(*a)), debug_info=debug), list(avals))
    return jaxpr, list(consts)


def replicated_spec() -> Any:
    from jax.sharding import PartitionSpec

    return PartitionSpec()


def bind_shard_map(args: Sequence[Any], params: dict) -> list[Any]:
    """Runs a `shard_map` equation with these params on `args` (values or tracers)."""
    prim = internal_prims["shard_map_p"]
    return list(prim.bind(*args, **prim.get_bind_params(params)))


def jit_transpose_params(params: dict, closed: ClosedJaxpr, known_in: Sequence[int],
                         ct_in: Sequence[int], linear_in: Sequence[int]) -> dict:
    """Params of the transpose of a `jit` equation, with shardings and layouts as jax's.

    The new inputs are the known inputs `known_in`, then the cotangents of outputs
    `ct_in` (which keep those outputs' shardings); the new outputs are the cotangents of
    the linear inputs `linear_in`, which keep those inputs' shardings.
    """
    def pick(key: str, idx: Sequence[int]) -> tuple:
        return tuple(params[key][i] for i in idx)

    return dict(
        params,
        jaxpr=closed,
        in_shardings=pick("in_shardings", known_in) + pick("out_shardings", ct_in),
        in_layouts=pick("in_layouts", known_in) + pick("out_layouts", ct_in),
        out_shardings=pick("in_shardings", linear_in),
        out_layouts=pick("in_layouts", linear_in),
        donated_invars=(False,) * (len(known_in) + len(ct_in)),
    )


def cotangent_spec(spec: Any) -> Any:
    """The `shard_map` spec of the cotangent of a value with this spec (reduced and
    unreduced axes trade places; a plain spec is its own)."""
    to_ct = getattr(spec, "to_ct_spec", None)
    return spec if to_ct is None else to_ct()


# --- capture: a jaxpr of the path the user's Python takes, with values on demand --------
#
# jax.grad runs the user's function on values, so Python may branch on them (`if x > 0`,
# `int(n)`, `x.item()`). fungrad records a jaxpr instead, and gives its tracers values
# on demand: a tracer asked for its concrete value evaluates, once, the recorded equations
# it depends on. Python runs exactly once per call; a function that never asks costs no
# more than a trace, and one that asks gets the jaxpr of the path it took.

class _EagerTracer(_pe.DynamicJaxprTracer):
    """A staged value of a capture whose concrete value is computed when asked for.

    Like a tracer of jax.grad: `bool`, `int`, `item()` see the value; `float`, `complex`
    and numpy conversion of a value that depends on the differentiated inputs raise as
    they do in jax, and work on values computed from constants alone.
    """

    __slots__ = ()
    _trace: _EagerTrace

    def to_concrete_value(self):
        caller = sys._getframe(1)
        while caller is not None and caller.f_code.co_name in ("to_concrete_value", "is_concrete"):
            caller = caller.f_back
        if caller is not None and caller.f_code.co_name in _OPPORTUNISTIC_CALLERS:
            return self._trace.concrete(self, compute=False)
        return self._trace.concrete(self)

    def _converted(self, convert: Callable, fallback: Callable):
        if self._trace.depends_on_inputs(self):
            return fallback()
        value = self._trace.concrete(self)
        return fallback() if value is None else convert(np.asarray(value))

    def __float__(self):
        return self._converted(float, super().__float__)

    def __complex__(self):
        return self._converted(complex, super().__complex__)

    def __array__(self, *args, **kwargs):
        return self._converted(lambda v: np.asarray(v, *args, **kwargs),
                               lambda: super(_EagerTracer, self).__array__(*args, **kwargs))

    def tolist(self):
        return self._converted(lambda v: v.tolist(), super().tolist)


# jax functions that ask whether a value is concrete only to take a shortcut that does not
# change the result (skip a no-op conversion, stage a constant, read a sharding): they get
# the value only if it is already known, so that asking does not evaluate the program.
_OPPORTUNISTIC_CALLERS = frozenset({
    "_convert_element_type", "array", "asarray", "_is_slice_element_none_or_constant_or_symbolic",
    "_infer_src_sharding",
})


class _EagerTrace(_pe.DynamicJaxprTrace):
    """A jaxpr trace whose tracers can compute their values from the inputs' values."""

    __slots__ = ("_sources", "_values", "_depends", "_trace_rules", "defers_calls")

    def init_values(self, trace_rules: int, defer_calls: bool = False):
        # How deep custom rules are traced while the capture is live: 2, the function's own
        # calls; 1, the calls inside their rules that close over values of a trace (the
        # rule's call of its own function under a vmap: second order needs its rule); 0,
        # none (lazily, as jax does), since a rule may call its own function.
        self._trace_rules = trace_rules
        # Whether inlinable jit calls (jnp's functions) stay whole: `inline_calls` inlines
        # them once per program, where jax's trace inlines them at every trace.
        self.defers_calls = defer_calls
        self._sources: dict[Any, Any] = {}  # input var -> a value, or a tracer to ask
        self._values: dict[Any, Any] = {}
        self._depends: dict[Any, bool] = {}

    def var_to_tracer(self, var, source_info, parent=None):
        return _as_eager(super().var_to_tracer(var, source_info, parent))

    def new_arg(self, aval, source_info):
        return _as_eager(super().new_arg(aval, source_info))

    def _new_const(self, aval, c, source_info):
        return _as_eager(super()._new_const(aval, c, source_info))

    def process_primitive(self, primitive, tracers, params, /):
        if primitive is prims.jit_p and self.defers_calls and inlinable(params):
            source_info = source_info_util.current()
            tracers = [self.to_jaxpr_tracer(t, source_info) for t in tracers]
            return self.default_process_primitive(primitive, tracers, params, source_info)
        return super().process_primitive(primitive, tracers, params)

    def process_custom_jvp_call(self, prim, fun, jvp, tracers, /, *, symbolic_zeros):
        if self._trace_rules == 2 and not symbolic_zeros:
            outs = self._jax_custom_jvp_call(prim, fun, jvp, tracers)
            if outs is not None:
                return outs
        outs = super().process_custom_jvp_call(prim, fun, jvp, tracers,
                                               symbolic_zeros=symbolic_zeros)
        eqn = getattr(outs[0], "parent", None) if outs else None
        if (self._trace_rules <= 0 or symbolic_zeros or eqn is None or eqn.primitive is not prim
                or getattr(_rebinding_state, "depth", 0)
                or (self._trace_rules == 1 and not eqn.params["num_consts"])):
            return outs
        # Trace the user's rule now, while this trace is live, with primals that can give
        # their values: a rule may branch on them, as under jax.grad. The rule's jaxpr for
        # the only zero pattern fungrad asks of such a rule (none: zeros are instantiated)
        # is kept in the equation in place of jax's lazy thunk.
        params = dict(eqn.params)
        num_consts = params["num_consts"]
        in_zeros = (False,) * (len(eqn.in_tracers) - num_consts)
        try:
            rule = ((_jax_rule(jvp, in_zeros, tracers) if self._trace_rules == 2 else None)
                    or _trace_jvp_rule(jvp, in_zeros, tracers, self._trace_rules - 1))
        except Exception:  # e.g. a rule that refuses nonzero tangents (equinox's
            return outs   # `nondifferentiable`): it stays lazy, run only where needed
        closed_over = [c for c in rule[1] if isinstance(c, _pe.DynamicJaxprTracer)]
        if closed_over:  # the rule closes over values of this trace (a vmapped value)
            rule, in_zeros = self._pass_closed_over(eqn, params, rule, closed_over)
        params["jvp_jaxpr_fun"] = _jvp_thunk_with(params["jvp_jaxpr_fun"].debug_info, in_zeros,
                                                   rule)
        eqn.params = params
        return outs

    def _jax_custom_jvp_call(self, prim, fun, jvp, tracers) -> list | None:
        """A custom_jvp call of jax's own (jax.nn.relu, ...) as jax's trace makes it, with
        its function's jaxpr and its rule's each traced once per types (`_jax_call`,
        `_jax_rule`), or None where the call is not one (jax's trace makes it then)."""
        if (not _JAX_CALL_SUPPORTED or getattr(self, "requires_low", False)
                or getattr(_rebinding_state, "depth", 0)
                or not any(isinstance(t, core.Tracer) for t in tracers)
                or not _jax_wrapped(fun, _FLATTEN_FUN) or not _jax_wrapped(jvp, _FLATTEN_JVP)):
            return None
        source_info = source_info_util.current()
        tracers = [self.to_jaxpr_tracer(t, source_info) for t in tracers]
        in_zeros = (False,) * len(tracers)
        avals, context = tuple([t.aval for t in tracers]), _config.trace_context()
        rule = _jax_rule(jvp, in_zeros, tracers, avals, context, wrapped=True)
        if rule is None:
            return None
        call_jaxpr, consts, out_type = _jax_call(fun, avals, context)
        fun.stores[0].store(out_type)  # what the function's trace leaves for its caller
        self.frame.is_high |= getattr(call_jaxpr.jaxpr, "is_high", False)
        params = dict(call_jaxpr=call_jaxpr,
                      jvp_jaxpr_fun=_jvp_thunk_with(jvp.debug_info, in_zeros, rule),
                      num_consts=len(consts), symbolic_zeros=False)
        const_tracers = [self.to_jaxpr_tracer(c, source_info) for c in consts]
        return self.emit_eqn([*const_tracers, *tracers], out_type[1], prim, params,
                             core.positional_effects(call_jaxpr), source_info=source_info)

    def process_custom_vjp_call(self, prim, fun, fwd, bwd, tracers, /, *, out_trees,
                                symbolic_zeros):
        outs = super().process_custom_vjp_call(prim, fun, fwd, bwd, tracers,
                                               out_trees=out_trees, symbolic_zeros=symbolic_zeros)
        eqn = getattr(outs[0], "parent", None) if outs else None
        if (self._trace_rules <= 0 or symbolic_zeros or eqn is None or eqn.primitive is not prim
                or getattr(_rebinding_state, "depth", 0)
                or (self._trace_rules == 1 and not eqn.params["num_consts"])):
            return outs
        # Trace fwd and bwd now, while this trace is live: they may close over its values
        # (a value vmapped inside the differentiated function), which are then passed as
        # arguments of the call; and as jaxprs they key the call by what they compute
        # (`traced_vjp_rules`), so that programs holding it are shared between calls.
        params = dict(eqn.params)
        try:
            fwd_rule, trees, bwd_rule = self._trace_vjp_rules(eqn, params, fwd)
        except Exception:  # e.g. a bwd that branches on values: it stays lazy, as before
            return outs
        finally:
            for store in fwd.stores:  # as jax leaves them: the caller reads the function's
                if store:
                    store.reset()
        consts = [*fwd_rule[1], *bwd_rule[1]]
        extra = list({id(c): c for c in consts if isinstance(c, _pe.DynamicJaxprTracer)}.values())
        self._pass_vjp_closed_over(eqn, params, fwd_rule, trees, bwd_rule, extra)
        eqn.params = params
        return outs

    def _trace_vjp_rules(self, eqn, params: dict, fwd: Any) -> tuple[tuple, tuple, tuple]:
        """The fwd as a jaxpr `args -> (new residuals, outs)` and its consts, as jax's thunk
        gives them (one for every zero pattern: without symbolic zeros the user's fwd does
        not see it), the output, residual and forwarding trees, and the bwd as a jaxpr
        `(residuals, output cotangents) -> input cotangents` (zeros instantiated). Both
        are traced as the function is: with values on demand, their own custom calls live."""
        num_consts = params["num_consts"]
        args = eqn.in_tracers[num_consts:]
        closed_fwd = capture_jaxpr(
            lambda *xs: fwd.call_wrapped(*(v for x in xs for v in (x, True))),
            [t.aval for t in args], list(args), "custom_vjp fwd",
            trace_rules=self._trace_rules - 1)
        fwd_jaxpr, fwd_consts = closed_fwd.jaxpr, closed_fwd.consts
        trees = params["out_trees"]()
        input_fwds = trees[2]
        new_res = iter(v.aval for v in fwd_jaxpr.outvars)
        res_avals = [next(new_res) if f is None else eqn.in_tracers[f].aval for f in input_fwds]
        ct_avals = [a.to_tangent_aval() for a in new_res]
        arg_avals = [t.aval.to_tangent_aval() for t in args]
        bwd = params["bwd"]

        def instantiated_bwd(*res_and_cts):
            cts = bwd.call_wrapped(*res_and_cts)
            return [zeros_like_aval(a) if ct is None or isinstance(
                        ct, (ad_util.Zero, ad_util.SymbolicZero)) else ct
                    for ct, a in zip(cts, arg_avals, strict=True)]

        closed = capture_jaxpr(instantiated_bwd, [*res_avals, *ct_avals],
                               [None] * (len(res_avals) + len(ct_avals)), "custom_vjp bwd",
                               trace_rules=self._trace_rules - 1)
        return (fwd_jaxpr, list(fwd_consts)), trees, (closed.jaxpr, list(closed.consts))

    def _pass_vjp_closed_over(self, eqn, params: dict, fwd_rule: tuple, trees: tuple,
                              bwd_rule: tuple, extra: list) -> None:
        """The call's fwd and bwd replaced by the jaxprs traced, with closure conversion:
        the values of this trace they read (`extra`) become leading arguments (after the
        constants), forwarded as residuals, so that the rules run after the trace has
        ended. Their cotangents are None."""
        num_consts, k = params["num_consts"], len(extra)
        source_info = source_info_util.current()
        extra_tracers = [self.to_jaxpr_tracer(c, source_info) for c in extra]
        if any(self.depends_on_inputs(t) for t in extra_tracers):
            raise TypeError(
                "fungrad cannot differentiate a custom_vjp function with respect to a value "
                "its fwd or bwd closes over: the rules only say how the function's explicit "
                "arguments move it. Pass that value as an argument of the custom_vjp function.")
        new_fwd, new_fwd_consts = _consts_as_leading_inputs(fwd_rule[0], fwd_rule[1], extra)
        new_bwd, new_bwd_consts = _consts_as_leading_inputs(bwd_rule[0], bwd_rule[1], extra)

        out_tree, res_tree, input_fwds = trees
        shifted = [f if f is None or f < num_consts else f + k for f in input_fwds]
        res_tree = jax.tree_util.tree_structure([0] * (k + res_tree.num_leaves))
        new_trees = (out_tree, res_tree, [*range(num_consts, num_consts + k), *shifted])
        rules = _TracedVjpRules(new_fwd, new_fwd_consts, new_bwd, new_bwd_consts, new_trees, k)

        call = params["call_jaxpr"]
        invars = list(call.jaxpr.invars)
        params["call_jaxpr"] = ClosedJaxpr(call.jaxpr.replace(invars=[
            *invars[:num_consts], *(Var(x.aval) for x in extra), *invars[num_consts:]]),
            call.consts)
        params["fwd_jaxpr_thunk"] = _lu.wrap_init(
            rules.fwd_thunk, debug_info=params["fwd_jaxpr_thunk"].debug_info)
        params["bwd"] = _lu.wrap_init(rules.bwd, debug_info=params["bwd"].debug_info)
        params["out_trees"] = rules.out_trees
        eqn.in_tracers = [*eqn.in_tracers[:num_consts], *extra_tracers,
                          *eqn.in_tracers[num_consts:]]

    def _pass_closed_over(self, eqn, params: dict, rule: tuple, closed_over: list) -> tuple:
        """Closure conversion: values of this trace that the rule closed over become leading
        arguments of the call (the function ignores them; the rule reads them, and, as in
        jax, their tangents do not enter it), so the rule can be run after the trace."""
        jaxpr, consts, out_zeros = rule
        num_consts, k = params["num_consts"], len(closed_over)
        is_extra = [isinstance(c, _pe.DynamicJaxprTracer) for c in consts]
        extra_vars = [v for v, e in zip(jaxpr.constvars, is_extra, strict=True) if e]
        num_args = len(jaxpr.invars) // 2
        primals, tangents = jaxpr.invars[:num_args], jaxpr.invars[num_args:]
        new_rule = jaxpr.replace(
            constvars=[v for v, e in zip(jaxpr.constvars, is_extra, strict=True) if not e],
            invars=[*extra_vars, *primals, *(Var(v.aval.to_tangent_aval()) for v in extra_vars),
                    *tangents])
        call = params["call_jaxpr"]
        invars = list(call.jaxpr.invars)
        params["call_jaxpr"] = ClosedJaxpr(call.jaxpr.replace(invars=[
            *invars[:num_consts], *(Var(v.aval) for v in extra_vars), *invars[num_consts:]]),
            call.consts)
        source_info = source_info_util.current()
        extra = [self.to_jaxpr_tracer(c, source_info)
                 for c, e in zip(consts, is_extra, strict=True) if e]
        if any(self.depends_on_inputs(t) for t in extra):
            raise TypeError(
                "fungrad cannot differentiate a custom_jvp function with respect to a value "
                "its rule closes over: the rule only says how the function's explicit "
                f"arguments move it (the function is {call.jaxpr.debug_info.func_src_info}). "
                "Pass that value as an argument of the custom_jvp function.")
        eqn.in_tracers = [*eqn.in_tracers[:num_consts], *extra, *eqn.in_tracers[num_consts:]]
        kept = [c for c, e in zip(consts, is_extra, strict=True) if not e]
        in_zeros = (False,) * (len(eqn.in_tracers) - num_consts)
        assert len(in_zeros) == num_args + k
        return (new_rule, kept, out_zeros), in_zeros

    def depends_on_inputs(self, tracer) -> bool:
        """Whether `tracer`'s value depends on the traced inputs (not only on constants)."""
        def eqn_flags(eqn):
            flag = any(type(x.val) is not Literal and self._depends[x.val] for x in eqn.in_tracers)
            return [flag] * len(eqn.outvars)

        return self._walk(tracer, self._depends, lambda var: var in self._sources, eqn_flags)

    def concrete(self, tracer, compute: bool = True) -> Any:
        """The value of `tracer` at this call's inputs, or None where an input has none
        (inside jax.jit). Without `compute`, only a value already known."""
        var = tracer.val
        if not compute and type(var) is not Literal and var not in self._values:
            return None

        def leaf_value(var):  # an input, or a constant that may be an outer tracer
            consts = self.frame.constvar_to_val
            return core.to_concrete_value(consts[var] if var in consts else self._sources[var])

        def eqn_values(eqn):
            invals = [x.val.val if type(x.val) is Literal else self._values[x.val]
                      for x in eqn.in_tracers]
            if any(x is None for x in invals):
                return [None] * len(eqn.outvars)
            with core.set_current_trace(core.eval_trace):
                return bind_eqn(eqn, invals)

        return self._walk(tracer, self._values, leaf_value, eqn_values)

    def _walk(self, root, known: dict, leaf: Callable, eqn_outs: Callable) -> Any:
        """What `known` holds for `root`'s variable, filling it in dependency order: `leaf`
        for inputs and constants, `eqn_outs` for an equation's outputs once its inputs are
        known. An explicit stack: a chain of equations may be longer than Python's stack."""
        todo = [root]
        while todo:
            t = todo[-1]
            var, eqn = t.val, t.parent
            if type(var) is Literal or var in known:
                todo.pop()
            elif eqn is None or var in self._sources:
                known[var] = leaf(var)
                todo.pop()
            else:
                missing = [x for x in eqn.in_tracers
                           if type(x.val) is not Literal and x.val not in known]
                if missing:
                    todo.extend(missing)
                    continue
                todo.pop()
                for v, out in zip(eqn.outvars, eqn_outs(eqn), strict=True):
                    known[v] = out
        var = root.val
        return var.val if type(var) is Literal else known[var]


class _TracedVjpRules:
    """A custom_vjp call's fwd and bwd as the jaxprs traced at capture, in the shapes jax
    calls them (a thunk giving the fwd jaxpr, a bwd function, the trees); `k` leading
    arguments were closure-converted and get no cotangent."""

    def __init__(self, fwd: Jaxpr, fwd_consts: list, bwd: Jaxpr, bwd_consts: list,
                 trees: tuple, k: int):
        self.fwd, self.fwd_consts, self.bwd_jaxpr, self.bwd_consts = fwd, fwd_consts, bwd, bwd_consts
        self.trees, self.k = trees, k

    def fwd_thunk(self, *nonzeros):
        return self.fwd, self.fwd_consts

    def bwd(self, *res_and_cts):
        return [None] * self.k + list(eval_jaxpr(self.bwd_jaxpr, self.bwd_consts, *res_and_cts))

    def out_trees(self):
        return self.trees


def traced_vjp_rules(params: dict) -> _TracedVjpRules | None:
    """The fwd and bwd of a custom_vjp call as traced at capture, or None where the call
    holds the user's functions (traced lazily, when differentiated)."""
    owner = getattr(params["out_trees"], "__self__", None)
    return owner if isinstance(owner, _TracedVjpRules) else None


def _consts_as_leading_inputs(jaxpr: Jaxpr, consts: list, extra: list) -> tuple[Jaxpr, list]:
    """`jaxpr` taking the values `extra` as leading inputs, in place of the constants that
    are those values (by identity); and its other constants."""
    extra_vars = [Var(x.aval) for x in extra]
    position = {id(x): i for i, x in enumerate(extra)}
    rename = {v: extra_vars[position[id(c)]] for v, c in zip(jaxpr.constvars, consts, strict=True)
              if id(c) in position}

    def atom(a):
        return a if type(a) is Literal else rename.get(a, a)

    new = jaxpr.replace(
        constvars=[v for v in jaxpr.constvars if v not in rename],
        invars=[*extra_vars, *jaxpr.invars],
        eqns=[eqn.replace(invars=[atom(a) for a in eqn.invars]) for eqn in jaxpr.eqns],
        outvars=[atom(a) for a in jaxpr.outvars])
    return new, [c for c in consts if id(c) not in position]


def _as_eager(tracer):
    tracer.__class__ = _EagerTracer
    return tracer


def _trace_jvp_rule(jvp: Any, in_zeros: tuple[bool, ...], primals: Sequence[Any],
                    trace_rules: int, values: bool = True) -> tuple:
    """The user's JVP rule as jax's thunk gives it, `(jaxpr, consts, out_zeros)`, traced with
    primal inputs whose values come from `primals` on demand (without `values`, none:
    a rule that asks for one fails)."""
    wrapped, out_zeros = _pe._jvp_jaxpr_zeros(jvp, in_zeros, ())
    avals = [typeof(x) for x in primals]
    tangent_avals = [a.to_tangent_aval() for a in avals]
    sources = primals if values else [None] * len(primals)
    closed = capture_jaxpr(lambda *args: wrapped.call_wrapped(*args), [*avals, *tangent_avals],
                           [*sources, *(None for _ in tangent_avals)], "custom_jvp rule",
                           trace_rules=trace_rules)
    rule = closed.jaxpr, list(closed.consts), out_zeros()
    for store in jvp.stores:  # as jax leaves them: the caller reads the function's store
        if store:
            store.reset()
    return rule


# jax's own custom_jvp rules (jax.nn.relu's, jnp.linalg's, ...) traced once per types: they
# are fixed functions of their arguments (no state, no values asked for), so the jaxpr
# traced at one call is the one any later call would trace. Any other rule (the user's,
# another library's) is traced at every call, while the capture is live.
_jax_rules = caching.LRU("fungrad.jax_rules", max_entries=1024, max_bytes=64 << 20)
_JAX_DIR = os.path.dirname(os.path.abspath(jax.__file__)) + os.sep


def _jax_rule(jvp: Any, in_zeros: tuple[bool, ...], primals: Sequence[Any],
              avals: tuple | None = None, context: Any = None,
              wrapped: bool = False) -> tuple | None:
    """The rule of a custom_jvp function that is jax's own, from the cache or traced without
    values, or None for any other rule (or one wrapped by another transform, as a vmap's).
    Its equations record their stack and name stack from the rule down, as jax's trace of
    it does: the same whatever the call's. The caller may pass the primals' types and
    jax's trace context, and say that `_jax_wrapped(jvp, _FLATTEN_JVP)` holds."""
    if not (wrapped or _jax_wrapped(jvp, _FLATTEN_JVP)):
        return None
    static = jvp.transforms[0][1]
    if len(static) != 4:
        return None
    primal_name, jvp_name, in_tree, _out_type = static  # the out type: the function's, known
    key = (jvp.f, primal_name, jvp_name, in_tree, in_zeros,
           tuple(map(typeof, primals)) if avals is None else avals,
           _config.trace_context() if context is None else context)
    rule = _jax_rules.get(key)
    if rule is None:
        try:
            rule = _trace_jvp_rule(jvp, in_zeros, primals, trace_rules=1, values=False)
        except Exception:  # e.g. it asks for a value after all: traced as the user's are
            return None
        if any(is_tracer(c) for c in rule[1]):
            return None
        rule = _jax_rules.put(key, rule)
    return rule


_jax_calls = caching.LRU("fungrad.jax_calls", max_entries=1024, max_bytes=64 << 20)


def _jax_call(fun: Any, in_avals: tuple, context: Any) -> tuple:
    """The function of a custom_jvp call of jax's own as jax's trace makes it: its closed
    jaxpr, its constants and what its flattening stores (output tree and types), from the
    cache or traced now under jax's trace `context`. jax traces it with the stack and name
    stack reset, so its equations are the same whatever the call's lines."""
    key = (fun.f, fun.transforms[0][1], in_avals, context)
    hit = _jax_calls.get(key)
    if hit is not None:
        return hit
    jaxpr, _, consts = _pe.trace_to_jaxpr_dynamic(fun, list(in_avals))
    call = (ClosedJaxpr(_pe.convert_constvars_jaxpr(jaxpr), ()), list(consts), fun.stores[0].val)
    fun.stores[0].reset()  # filled again by the caller, as for a call from the cache
    if any(is_tracer(c) for c in consts):
        return call
    return _jax_calls.put(key, call)


def _jax_wrapped(fun: Any, flatten: Any) -> bool:
    """Whether `fun` is jax's own code wrapped only by custom_jvp's flattening `flatten`."""
    return (len(fun.transforms) == 1 and not fun.params and fun.transforms[0][0] is flatten
            and _jax_owned(fun.f))


_PjitFunction = type(jax.jit(lambda: None))
UnspecifiedValue = type(UNSPECIFIED)  # jit's sharding parameters when none is given
_FLATTEN_JVP = getattr(getattr(_custom_derivatives, "_flatten_jvp", None), "args", (None,))[0]
_FLATTEN_FUN = getattr(getattr(_custom_derivatives, "_flatten_fun_nokwargs", None), "args",
                       (None,))[0]
# What `_jax_custom_jvp_call` relies on in jax's trace and stores (another jax release that
# lays them out otherwise gets jax's own trace of every call).
_JAX_CALL_SUPPORTED = (None not in (_FLATTEN_JVP, _FLATTEN_FUN)
                       and hasattr(_pe.DynamicJaxprTrace, "emit_eqn")
                       and hasattr(_lu.Store, "reset") and hasattr(_lu.Store, "val"))


def _jax_owned(obj: Any, seen: set[int] | None = None) -> bool:
    """Whether `obj` is code of jax's own (a function defined in jax's sources, a custom_jvp
    of them) that holds nothing but such code and immutable values."""
    seen = set() if seen is None else seen
    if id(obj) in seen or obj is None or type(obj) in (bool, int, float, str):
        return True
    seen.add(id(obj))
    if isinstance(obj, tuple):
        return all(_jax_owned(x, seen) for x in obj)
    if isinstance(obj, _custom_derivatives.custom_jvp):
        return _jax_owned(obj.fun, seen) and _jax_owned(obj.jvp, seen)
    if isinstance(obj, functools.partial):
        return (_jax_owned(obj.func, seen) and _jax_owned(obj.args, seen)
                and _jax_owned(tuple(obj.keywords.values()), seen))
    if type(obj) is _PjitFunction:  # jax.jit of a function: that function
        return _jax_owned(getattr(obj, "__wrapped__", None), seen)
    code = getattr(obj, "__code__", None)
    if code is None or not code.co_filename.startswith(_JAX_DIR):
        return False
    return all(_jax_owned(cell.cell_contents, seen) for cell in obj.__closure__ or ())


def _jvp_thunk_with(debug: DebugInfo, in_zeros: tuple[bool, ...], rule: tuple) -> Any:
    """A rule thunk as jax's, answering the pattern `in_zeros` with the rule traced already."""
    def jvp_jaxpr_fun(*zeros):
        if tuple(zeros) == in_zeros:
            return rule
        if len(zeros) != len(in_zeros):  # a rule whose closed-over values became arguments
            raise NotImplementedError("fungrad traced this custom_jvp rule for one pattern of "
                                      "zero tangents only; symbolic_zeros rules that close "
                                      "over vmapped values are not supported")
        # Not the user's rule again: it may close over values of a trace that has ended.
        return _rule_with_zeros(rule, zeros)

    return _lu.wrap_init(jvp_jaxpr_fun, debug_info=debug)


def _rule_with_zeros(rule: tuple, zeros: Sequence[bool]) -> tuple:
    """A rule traced with every tangent given, `(jaxpr, consts, out_zeros)`, as the rule
    for the tangents where `zeros` is set being zero: those are fed as zero arrays, which
    is what jax gives a rule without `symbolic_zeros` anyway."""
    jaxpr, consts, out_zeros = rule
    n = len(zeros)
    primal_avals = [v.aval for v in jaxpr.invars[:n]]
    tangent_avals = [v.aval for v in jaxpr.invars[n:]]

    def fun(*args):
        nz_tangents = iter(args[n:])
        tangents = [zeros_like_aval(a) if z else next(nz_tangents)
                    for a, z in zip(tangent_avals, zeros, strict=True)]
        return eval_jaxpr(jaxpr, consts, *args[:n], *tangents)

    closed = trace_to_jaxpr(fun, [*primal_avals, *(a for a, z in zip(tangent_avals, zeros,
                                                                      strict=True) if not z)])
    return closed.jaxpr, list(closed.consts), out_zeros


def user_debug_info(traced_for: str, fun: Callable, args: Sequence[Any],
                    diff_argnums: Sequence[int]) -> DebugInfo:
    """What jax's messages say of a trace: the user's function (name, file and line) and
    the names of the differentiated arguments' leaves, the trace's inputs.

    For a plain Python function, cached by what the answer is made of: its code, name and
    which parameters have defaults (`inspect.signature` costs a tenth of a small eager
    call), and the arguments' tree.
    """
    args = tuple(args)
    static = [i for i in range(len(args)) if i not in diff_argnums]
    key = _signature_key(fun)
    if key is not None:
        key = (traced_for, key, jax.tree_util.tree_structure(args), tuple(static))
        try:
            hash(key)
        except TypeError:  # a pytree node whose data has no hash
            key = None
    debug = _debug_infos.get(key) if key is not None else None
    if debug is None:
        try:
            debug = _api_util.debug_info(traced_for, fun, args, {}, static_argnums=static)
        except Exception:  # a callable jax cannot inspect: its name alone
            debug = DebugInfo(traced_for, getattr(fun, "__name__", type(fun).__name__), None,
                              None)
        if key is not None:
            debug = _debug_infos.put(key, debug)
    return debug


_MAX_WRAPS = 16  # wrappers of wrappers whose names are cached
_debug_infos = caching.LRU("fungrad.debug_infos", max_entries=1024, max_bytes=16 << 20,
                           size=lambda d: 64 * (len(d.arg_names or ()) + 4))


def _signature_key(fun: Any, depth: int = 0) -> tuple | None:
    """What jax's debug info of `fun` is made of, for a plain function (or a method of one)
    that carries nothing that changes its signature (`__signature__`, attributes), or a
    function that only wraps such a function (`functools.wraps`, as fungrad's transforms
    do: jax names it by the function it wraps); None for any other callable."""
    bound = type(fun) is types.MethodType
    func = fun.__func__ if bound else fun
    if type(func) is not types.FunctionType:
        return None
    attrs = func.__dict__
    if attrs:
        if bound or attrs.keys() != {"__wrapped__"} or depth > _MAX_WRAPS:
            return None  # (a chain that long may be a cycle, which jax reports)
        wrapped = _signature_key(attrs["__wrapped__"], depth + 1)
        return None if wrapped is None else ("wraps", wrapped)
    return (bound, func.__code__, func.__name__, len(func.__defaults__ or ()),
            tuple(func.__kwdefaults__ or ()))


# What the eager trace relies on in jax's tracer (checked once, so that a jax release that
# lays its tracers out otherwise degrades to plain tracing instead of failing).
_EAGER_TRACE_SUPPORTED = (
    "parent" in getattr(_pe.DynamicJaxprTracer, "__slots__", ())
    and all(hasattr(_pe.DynamicJaxprTrace, m) for m in ("var_to_tracer", "new_arg", "_new_const"))
    and hasattr(_pe, "TracingEqn") and hasattr(_pe, "_jvp_jaxpr_zeros"))


def capture_jaxpr(fun: Callable, avals: Sequence[Any], sources: Sequence[Any],
                  name: str | DebugInfo, trace_rules: int = 2,
                  defer_calls: bool = False) -> ClosedJaxpr:
    """Traces `fun(*flat_args) -> flat_outs` to a closed jaxpr, like `trace_to_jaxpr`,
    with tracers that can compute their concrete value from `sources` (one per input:
    a value, or an outer tracer asked for its own) when the Python code needs it.

    Values the function closes over stay what they are: constants of the jaxpr. With
    `defer_calls`, the calls jax would inline stay whole (see `inline_calls`).
    """
    debug = DebugInfo("fungrad", name, None, None) if isinstance(name, str) else name
    debug = debug._replace(result_paths=None)
    if debug.arg_names is not None and len(debug.arg_names) != len(avals):
        debug = debug._replace(arg_names=None)
    wrapped = _lu.wrap_init(lambda *args: list(fun(*args)), debug_info=debug)
    if not _EAGER_TRACE_SUPPORTED:  # another jax's tracer layout: a plain trace, no values
        jaxpr, _, consts = _pe.trace_to_jaxpr_dynamic(wrapped, list(avals))
        return ClosedJaxpr(jaxpr, consts)
    trace = _EagerTrace(debug, parent_trace=core.trace_ctx.trace)
    trace.init_values(trace_rules, defer_calls)
    with (core.ensure_no_leaks(trace), source_info_util.reset_name_stack(),
          _pe.TracebackScope()):
        source_info = source_info_util.current()
        in_tracers = [trace.new_arg(aval, source_info) for aval in avals]
        for t, source in zip(in_tracers, sources, strict=True):
            trace._sources[t.val] = source
        with core.set_current_trace(trace):
            ans = wrapped.call_wrapped(*in_tracers)
        ans = [_dtypes.canonicalize_value(x) for x in ans]
        out_tracers = [trace.to_jaxpr_tracer(x, source_info) for x in ans]
        jaxpr, consts = trace.frame.to_jaxpr(trace, out_tracers, debug, source_info)
        del trace, in_tracers, out_tracers, ans
    closed = ClosedJaxpr(jaxpr, consts)
    if core.internal_mutable_array_effect in jaxpr.effects:
        closed = discharge_refs(closed)
    return closed


# --- jit calls kept whole by a capture, inlined once per program --------------------------


def inlinable(params: dict) -> bool:
    """Whether a jit call is one jax inlines into the trace that calls it (jnp's functions,
    fungrad's staged programs), with nothing that inlining would have to rewrite."""
    closed = params["jaxpr"]
    if not params["inline"] or closed.consts or closed.effects or params["compiler_options_kvs"]:
        return False
    # (`count` compares by identity first: jax's own singletons, checked at C speed.)
    ins, outs = params["in_shardings"], params["out_shardings"]
    in_layouts, out_layouts = params["in_layouts"], params["out_layouts"]
    return (ins.count(UNSPECIFIED) == len(ins) and outs.count(UNSPECIFIED) == len(outs)
            and in_layouts.count(None) == len(in_layouts)
            and out_layouts.count(None) == len(out_layouts))


# The name of the jit calls of fungrad's derived programs (see api._Staged): no Python
# function has a dotted name. Their equations carry the user's lines already (as those of
# jax's functions do not).
DERIVED_PROGRAM = "fungrad.derived"


class _CallOutputs:
    """In `inline_calls`' work list: where an inlined call's outputs are known."""

    def __init__(self, outer: Sequence[Any], inner: Sequence[Any]):
        self.outer, self.inner = outer, inner


def inline_calls(jaxpr: Jaxpr) -> Jaxpr:
    """`jaxpr` with its inlinable jit calls (see `inlinable`) replaced by their equations,
    where jax's trace would have put them: under the call's source line, with the call's
    name stack in front of theirs."""
    if not any(eqn.primitive is prims.jit_p for eqn in jaxpr.eqns):
        return jaxpr
    rename: dict[Any, Any] = {}

    def atom(a):
        return a if type(a) is Literal else rename.get(a, a)

    eqns: list[JaxprEqn] = []
    todo: list[tuple[Any, JaxprEqn | None]] = [(eqn, None) for eqn in reversed(jaxpr.eqns)]
    while todo:
        eqn, caller = todo.pop()
        if type(eqn) is _CallOutputs:
            rename.update((o, atom(i)) for o, i in zip(eqn.outer, eqn.inner, strict=True))
            continue
        invars = [atom(a) for a in eqn.invars]
        if eqn.primitive is prims.jit_p and inlinable(eqn.params):
            inner = eqn.params["jaxpr"].jaxpr
            rename.update(zip(inner.invars, invars, strict=True))
            todo.append((_CallOutputs(eqn.outvars, inner.outvars), None))
            todo.extend((e, caller or eqn) for e in reversed(inner.eqns))
            continue
        if caller is None:
            eqns.append(eqn.replace(invars=invars))
            continue
        # An equation of an inlined call (whose jaxpr may be inlined more than once): new
        # variables, and the caller's line.
        outvars = []
        for v in eqn.outvars:
            if type(v) is Var:
                rename[v] = v = Var(v.aval)
            outvars.append(v)
        info = caller.source_info
        if caller.params["name"] != DERIVED_PROGRAM:  # a derived program keeps the user's lines
            eqn = eqn.replace(source_info=info.replace(
                name_stack=info.name_stack + eqn.source_info.name_stack))
        eqns.append(eqn.replace(invars=invars, outvars=outvars))
    return jaxpr.replace(eqns=eqns, outvars=[atom(a) for a in jaxpr.outvars])


# --- fungrad.explain: where an equation comes from -----------------------------------------


def user_frames(eqn: JaxprEqn) -> list[tuple[str, int, str]]:
    """`(file, line, function)` of each frame outside jax and the standard library in the
    traceback jax recorded for `eqn`, innermost first (fungrad's own frames included)."""
    return [(f.file_name, f.start_line, f.function_name)
            for f in source_info_util.user_frames(eqn.source_info.traceback)]


# --- custom_jvp rules: their equations carry the user's line --------------------------------


def eval_jaxpr_at_current_line(jaxpr: Jaxpr, consts: Sequence[Any], *args: Any) -> list[Any]:
    """`eval_jaxpr`, with each top-level equation bound under the current source line (the
    user's, set by `rule_context`) instead of its own: for a rule's jaxpr traced inside
    fungrad (a custom_jvp rule), whose own lines are fungrad's or the library's."""
    here = source_info_util.current()
    env: dict[Any, Any] = {}

    def read(v):
        return v.val if type(v) is Literal else env[v]

    env.update(zip([*jaxpr.constvars, *jaxpr.invars], [*consts, *args], strict=True))
    for eqn in jaxpr.eqns:
        moved = eqn.replace(source_info=eqn.source_info.replace(traceback=here.traceback))
        env.update(zip(eqn.outvars, bind_eqn(moved, [read(v) for v in eqn.invars]), strict=True))
    return [read(v) for v in jaxpr.outvars]


# The tracer methods above run inside the user's calls (a custom_jvp call under capture): jax
# names the user's line of what they emit, not this module's.
source_info_util.register_exclusion(os.path.abspath(__file__))
