"""Jacobian and Hessian sparsity patterns by abstract interpretation of the jaxpr.

The function is traced once with abstract values for the differentiated arguments; an
interpreter then walks the jaxpr with, for each array, the set of differentiated input
elements each of its elements may depend on (`sparsity_rules.Deps`), or the array itself
when it is a constant of the program. The patterns are global (they hold for every value
of the differentiated arguments) and conservative: an unknown primitive makes its outputs
depend on all of its inputs, so no entry is ever missed. Values the program computes from
constants alone (index arrays, masks, the other arguments, which are taken as given) are
evaluated, so gathers, scatters, dynamic slices and selects with such values are exact.
Control flow: `cond` joins its branches (or takes the one a known index picks), a short
`scan` is followed step by step and a long one, like `while_loop`, by a fixed point over
its carry. Custom rules are read: a `custom_jvp` function's pattern is that of its JVP
rule, a `custom_vjp` function's that of its bwd (cotangents numbered, transposed), so a
straight-through estimator gets the rule's entries, not round's empty ones.

Helpers for code that wants index arrays rather than a BCOO: `jacobian_pattern` and
`hessian_pattern` return a `Pattern` (rows, cols, shape; sorted row-major, unique).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import tree_util
from jax.experimental import sparse

from fungrad._src import api_util, jaxutil
from fungrad._src import sparsity_rules as sr
from fungrad._src.jaxutil import Jaxpr, JaxprEqn, Literal


class Pattern(NamedTuple):
    """A boolean sparsity pattern as index arrays: entry (rows[k], cols[k]) may be nonzero.

    The entries are sorted row-major and unique, so `rows` is nondecreasing.
    """

    rows: np.ndarray
    cols: np.ndarray
    shape: tuple[int, int]

    @property
    def nnz(self) -> int:
        return int(self.rows.size)

    def indptr(self) -> np.ndarray:
        """The CSR row pointer: row r's columns are cols[indptr[r]:indptr[r + 1]]."""
        return np.searchsorted(self.rows, np.arange(self.shape[0] + 1)).astype(np.int64)

    def todense(self) -> np.ndarray:
        out = np.zeros(self.shape, bool)
        out[self.rows, self.cols] = True
        return out

    def to_bcoo(self) -> sparse.BCOO:
        indices = np.stack([self.rows, self.cols], axis=1).astype(np.int32 if max(self.shape, default=0)
                                                                  < 2**31 - 1 else np.int64)
        data = np.ones(self.nnz, bool)
        return sparse.BCOO((jnp.asarray(data), jnp.asarray(indices)), shape=self.shape,
                           indices_sorted=True, unique_indices=True)


# Hessian pairs are merged into a sorted unique set once this many are pending.
_MERGE_AT = 1 << 22


class _Interpreter:
    """Walks jaxprs on abstract values (known arrays or `Deps`); the `Context` of the rules."""

    def __init__(self, n: int, tracks_hessian: bool):
        self.n = n
        self.tracks_hessian = tracks_hessian
        self._pending: list[np.ndarray] = []
        self._num_pending = 0
        self._keys = np.zeros(0, np.int64)
        self._quiet = 0  # > 0 inside equations that cannot reach the output's derivative

    def fresh(self) -> _Interpreter:
        return _Interpreter(0, tracks_hessian=False)

    def hessian_pairs(self, rows: np.ndarray, cols: np.ndarray) -> None:
        if self._quiet or rows.size == 0:
            return
        self._pending.append(np.minimum(rows, cols) * self.n + np.maximum(rows, cols))
        self._num_pending += rows.size
        if self._num_pending >= _MERGE_AT:
            self._merge()

    def _merge(self) -> None:
        self._keys = sr.sorted_unique(np.concatenate([self._keys, *self._pending]))
        self._pending, self._num_pending = [], 0

    def hessian(self) -> tuple[np.ndarray, np.ndarray]:
        """The symmetric pattern collected so far, sorted row-major."""
        self._merge()
        i, j = np.divmod(self._keys, self.n) if self.n else (self._keys, self._keys)
        keys = sr.sorted_unique(np.concatenate([i * self.n + j, j * self.n + i]))
        return np.divmod(keys, self.n) if self.n else (keys, keys)

    def eval_jaxpr(self, jaxpr: Jaxpr, consts: Sequence[Any], args: Sequence[Any]) -> list[Any]:
        env: dict[Any, Any] = {}

        def read(v):
            if type(v) is Literal:
                return np.broadcast_to(np.asarray(v.val, v.aval.dtype), v.aval.shape)
            return env[v]

        for v, x in zip([*jaxpr.constvars, *jaxpr.invars], [*consts, *args], strict=True):
            env[v] = _host(x) if sr.is_known(x) else x
        needed, reaches = _liveness(jaxpr)
        for k, eqn in enumerate(jaxpr.eqns):
            if k not in needed:
                continue
            self._quiet += k not in reaches
            try:
                outs = self._eval_eqn(eqn, [read(v) for v in eqn.invars])
            finally:
                self._quiet -= k not in reaches
            for v, x in zip(eqn.outvars, outs, strict=True):
                env[v] = x
        return [read(v) for v in jaxpr.outvars]

    def _eval_eqn(self, eqn: JaxprEqn, invals: list[Any]) -> list[Any]:
        if all(sr.is_known(x) for x in invals) and not eqn.effects:
            known = _evaluate(eqn, invals)
            if known is not None:
                return known
            return [sr.empty(_shape(v.aval)) for v in eqn.outvars]
        if not any(_inexact(v.aval) for v in eqn.outvars):
            return [sr.empty(_shape(v.aval)) for v in eqn.outvars]
        outs = sr.lookup(eqn)(self, eqn, invals)
        return [x if _inexact(v.aval) else sr.empty(_shape(v.aval))
                for x, v in zip(outs, eqn.outvars, strict=True)]


def _shape(aval: Any) -> tuple[int, ...]:
    return tuple(getattr(aval, "shape", ()))


def _inexact(aval: Any) -> bool:
    dtype = getattr(aval, "dtype", None)
    return dtype is not None and jnp.issubdtype(dtype, jnp.inexact)


def _host(x: Any) -> Any:
    """A known value as a numpy array (PRNG keys, which numpy cannot hold, stay as they are)."""
    if jax.dtypes.issubdtype(getattr(x, "dtype", np.float64), jax.dtypes.extended):
        return x
    return np.asarray(x)


def _evaluate(eqn: JaxprEqn, invals: list[Any]) -> list[Any] | None:
    """The outputs of an equation on known inputs, or None when it cannot run now."""
    try:
        with jax.ensure_compile_time_eval():
            return [_host(x) for x in jaxutil.bind_eqn(eqn, invals)]
    except Exception:  # noqa: BLE001 -- any failure: the outputs are unknown (still no deps)
        return None


def _liveness(jaxpr: Jaxpr) -> tuple[set[int], set[int]]:
    """Equations whose outputs are used at all, and those that can reach the derivative of
    an output (an equation with only integer outputs, or a zero derivative, stops it)."""
    used = {v for v in jaxpr.outvars if type(v) is not Literal}
    diff = {v for v in jaxpr.outvars if type(v) is not Literal and _inexact(v.aval)}
    needed, reaches = set(), set()
    for k in range(len(jaxpr.eqns) - 1, -1, -1):
        eqn = jaxpr.eqns[k]
        if eqn.effects or any(v in used for v in eqn.outvars):
            needed.add(k)
            used.update(v for v in eqn.invars if type(v) is not Literal)
        if any(v in diff and _inexact(v.aval) for v in eqn.outvars):
            reaches.add(k)
            if not sr.stops_derivative(eqn):
                diff.update(v for v in eqn.invars if type(v) is not Literal)
    return needed, reaches


def _struct(x: Any) -> jax.ShapeDtypeStruct:
    if isinstance(x, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, weak_type=x.weak_type)
    aval = jaxutil.typeof(x)
    return jax.ShapeDtypeStruct(aval.shape, aval.dtype, weak_type=aval.weak_type)


def _trace(f: Callable, args: Sequence[Any], argnums: Any, fname: str) -> tuple:
    """The jaxpr of f on abstract differentiated arguments, the number of those inputs,
    and the output leaves' avals. Other arguments are taken as given, except leaves given
    as `jax.ShapeDtypeStruct`: those are further abstract inputs (unknown values)."""
    api_util.check_callable(f, fname)
    nums = api_util.argnums_tuple(argnums, len(args), fname)
    is_abstract = lambda x: isinstance(x, jax.ShapeDtypeStruct)  # noqa: E731
    api_util.check_diff_args(tree_util.tree_map(lambda x: 0.0 if is_abstract(x) else x, list(args)),
                             nums, fname)
    others = [i for i in range(len(args)) if i not in nums]
    diff_leaves, diff_tree = tree_util.tree_flatten([args[i] for i in nums])
    other_leaves, other_tree = tree_util.tree_flatten([args[i] for i in others])
    abstract = [k for k, x in enumerate(other_leaves) if is_abstract(x)]

    def flat_fun(*flat):
        filled = list(other_leaves)
        for k, x in zip(abstract, flat[len(diff_leaves):], strict=True):
            filled[k] = x
        new_args = list(args)
        for i, arg in zip(others, tree_util.tree_unflatten(other_tree, filled), strict=True):
            new_args[i] = arg
        for i, arg in zip(nums, tree_util.tree_unflatten(diff_tree, flat[:len(diff_leaves)]), strict=True):
            new_args[i] = arg
        return f(*new_args)

    structs = [_struct(x) for x in diff_leaves] + [_struct(other_leaves[k]) for k in abstract]
    closed, out_shapes = jax.make_jaxpr(flat_fun, return_shape=True)(*structs)
    return closed, structs, len(diff_leaves), tree_util.tree_leaves(out_shapes)


def _interpret(closed: Any, structs: Sequence[Any], num_diff: int,
               tracks_hessian: bool) -> tuple[_Interpreter, list]:
    n = sum(int(np.prod(a.shape)) for a in structs[:num_diff])
    interp = _Interpreter(n, tracks_hessian)
    inputs, offset = [], 0
    for a in structs[:num_diff]:
        inputs.append(sr.identity(a.shape, offset) if _inexact(a) else sr.empty(a.shape))
        offset += int(np.prod(a.shape))
    inputs += [sr.empty(a.shape) for a in structs[num_diff:]]
    # Under an outer jax trace, values closed over may be tracers: unknown, no dependency.
    consts = [sr.empty(np.shape(c)) if jaxutil.is_tracer(c) else c for c in closed.consts]
    outs = interp.eval_jaxpr(closed.jaxpr, consts, inputs)
    return interp, outs


def jacobian_pattern(f: Callable, *args: Any, argnums: int | Sequence[int] = 0) -> Pattern:
    """The Jacobian sparsity pattern of `f` at `args` as index arrays; see `jacobian_sparsity`.

    Example:
        >>> import jax.numpy as jnp
        >>> p = jacobian_pattern(lambda x: x[1:] * x[:-1], jnp.ones(4))
        >>> p.rows.tolist(), p.cols.tolist(), p.shape
        ([0, 0, 1, 1, 2, 2], [0, 1, 1, 2, 2, 3], (3, 4))
    """
    closed, structs, num_diff, out_avals = _trace(f, args, argnums, "jacobian_sparsity")
    interp, outs = _interpret(closed, structs, num_diff, tracks_hessian=False)
    rows = sr.stack([sr.as_deps(x, a.shape) for x, a in zip(outs, out_avals, strict=True)])
    return Pattern(rows.row_ids(), rows.indices, (rows.size, interp.n))


def hessian_pattern(f: Callable, *args: Any, argnums: int | Sequence[int] = 0) -> Pattern:
    """The Hessian sparsity pattern of a scalar `f` as index arrays; see `hessian_sparsity`.

    Example:
        >>> import jax.numpy as jnp
        >>> p = hessian_pattern(lambda x: jnp.sum(x[1:] * x[:-1]), jnp.ones(3))
        >>> p.rows.tolist(), p.cols.tolist()
        ([0, 1, 1, 2], [1, 0, 2, 1])
    """
    closed, structs, num_diff, out_avals = _trace(f, args, argnums, "hessian_sparsity")
    if len(out_avals) != 1 or out_avals[0].shape != () or not _inexact(out_avals[0]):
        got = ", ".join(f"{a.dtype}{list(a.shape)}" for a in out_avals) or "nothing"
        raise TypeError(f"hessian_sparsity: f must return one real or complex scalar (shape ()), "
                        f"but it returned {got}. Reduce the output to a scalar (for example "
                        f"with jnp.sum), or use jacobian_sparsity for array outputs.")
    interp, _ = _interpret(closed, structs, num_diff, tracks_hessian=True)
    rows, cols = interp.hessian()
    return Pattern(rows, cols, (interp.n, interp.n))


@jaxutil.api_boundary
def jacobian_sparsity(f: Callable, *args: Any, argnums: int | Sequence[int] = 0) -> sparse.BCOO:
    """Which entries of the Jacobian of `f` may be nonzero, for any value of the inputs.

    The Jacobian is that of the raveled output (all output leaves, in
    `jax.tree_util.tree_leaves` order, each raveled) with respect to the raveled
    differentiated arguments (`args[i]` for i in `argnums`, in that order; within each,
    its leaves in `tree_leaves` order), as `jax.flatten_util.ravel_pytree` ravels. The
    pattern is found on the jaxpr, without evaluating derivatives; it is conservative
    (contains every entry that can be nonzero) and global. Arguments outside `argnums`
    are taken as the constants given (a `jax.ShapeDtypeStruct` among them stands for any
    value of that type); integer inputs and outputs get no entries.

    Args:
        f: the function.
        *args: its positional arguments; only shapes and dtypes of the differentiated
            ones matter (they may be given as `jax.ShapeDtypeStruct`).
        argnums: an int or a tuple of ints: the positional arguments to differentiate.

    Returns:
        A `jax.experimental.sparse.BCOO` of booleans of shape (output size, input size),
        indices sorted row-major and unique. `jacobian_pattern` gives the same as numpy
        index arrays. (jax cannot densify a boolean BCOO: use `.astype(int).todense()`.)

    Example:
        >>> import jax.numpy as jnp
        >>> import fungrad
        >>> p = fungrad.jacobian_sparsity(lambda x: jnp.sin(x[1:]) * x[:-1], jnp.ones(4))
        >>> p.dtype, p.shape, p.nse
        (dtype('bool'), (3, 4), 6)
        >>> p.astype(jnp.int32).todense()
        Array([[1, 1, 0, 0],
               [0, 1, 1, 0],
               [0, 0, 1, 1]], dtype=int32)
    """
    return jacobian_pattern(f, *args, argnums=argnums).to_bcoo()


@jaxutil.api_boundary
def hessian_sparsity(f: Callable, *args: Any, argnums: int | Sequence[int] = 0) -> sparse.BCOO:
    """Which entries of the Hessian of a scalar `f` may be nonzero, for any input value.

    Inputs are raveled as in `jacobian_sparsity`. The pattern is symmetric, global and
    conservative: each nonlinear operation contributes the products of its operands'
    dependency sets (only the cross products for bilinear ones such as `*` and
    `dot_general`); linear and piecewise-linear ones (`+`, slicing, sums, `max`, `abs`,
    `where`, sort) contribute none, as their second derivative is zero almost everywhere.

    Args:
        f: a function returning one real scalar.
        *args: its positional arguments.
        argnums: an int or a tuple of ints: the positional arguments to differentiate.

    Returns:
        A `jax.experimental.sparse.BCOO` of booleans of shape (n, n), indices sorted
        row-major and unique. `hessian_pattern` gives the same as numpy index arrays.

    Example:
        >>> import jax.numpy as jnp
        >>> import fungrad
        >>> rosenbrock = lambda x: jnp.sum(100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2)
        >>> fungrad.hessian_sparsity(rosenbrock, jnp.ones(4)).astype(jnp.int32).todense()
        Array([[1, 1, 0, 0],
               [1, 1, 1, 0],
               [0, 1, 1, 1],
               [0, 0, 1, 1]], dtype=int32)
    """
    return hessian_pattern(f, *args, argnums=argnums).to_bcoo()
