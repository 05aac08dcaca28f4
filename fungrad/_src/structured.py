"""Structured derivatives: compressed sparse Jacobians and Hessians, automatic mode, and
conveniences (value_and_jacobian, value_and_hessian, vhp, hessian_diag, hutchinson_trace).

A sparse Jacobian (or Hessian) costs one JVP, VJP or HVP per color of its pattern instead
of one per column: the seeds are the sums of the basis vectors of a color, run together
under `jax.vmap` (in chunks, with ``chunk_size``), and each entry is read from the
compressed product (see `coloring`). The pattern and its coloring are computed once, in
numpy, from the first call's argument shapes, and kept in a prepared object; the result is
a BCOO matrix whose indices are the pattern's (constants), so it works inside `jax.jit`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import tree_util
from jax.experimental import sparse as jsparse
from jax.flatten_util import ravel_pytree

from fungrad._src import api, api_util, coloring, jaxutil

_JAC_MODES = ("auto", "forward", "reverse")
_HESSIAN_MODE = "forward_over_reverse"


# --- patterns and plans (numpy, at preparation time) ----------------------------------


def _as_pattern(sparsity: Any, fname: str) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """The nonzero coordinates of a pattern, unique and sorted row-major, and its shape."""
    if jaxutil.is_tracer(sparsity) or (isinstance(sparsity, jsparse.BCOO)
                                       and jaxutil.is_tracer(sparsity.data)):
        raise TypeError(f"{fname}: sparsity must be concrete (numpy or a BCOO built outside "
                        f"jax.jit), got a traced value. Build the pattern outside the traced "
                        f"function, or pass sparsity=None to detect it.")
    if isinstance(sparsity, jsparse.BCOO):
        if sparsity.ndim != 2 or sparsity.n_batch or sparsity.n_dense:
            raise ValueError(f"{fname}: sparsity must be a 2-D BCOO without batch or dense "
                             f"dimensions, got shape {sparsity.shape} with n_batch="
                             f"{sparsity.n_batch}, n_dense={sparsity.n_dense}.")
        keep = np.asarray(sparsity.data) != 0
        indices = np.asarray(sparsity.indices)[keep]
        rows, cols, shape = indices[:, 0], indices[:, 1], sparsity.shape
    elif hasattr(sparsity, "tocoo"):  # a scipy.sparse matrix or array
        coo = sparsity.tocoo()
        keep = np.asarray(coo.data) != 0
        rows, cols, shape = np.asarray(coo.row)[keep], np.asarray(coo.col)[keep], coo.shape
    else:
        dense = np.asarray(sparsity)
        if dense.ndim != 2:
            raise ValueError(f"{fname}: sparsity must be a 2-D pattern of shape (outputs, "
                             f"inputs): a jax.experimental.sparse.BCOO or a dense boolean "
                             f"array; got an array of shape {dense.shape}.")
        rows, cols = np.nonzero(dense)
        shape = dense.shape
    m, n = int(shape[0]), int(shape[1])
    linear = np.unique(np.asarray(rows, np.int64) * n + np.asarray(cols, np.int64))
    return linear // max(n, 1), linear % max(n, 1), (m, n)


class Plan:
    """A pattern, its coloring and where each entry is read from the compressed product.

    The compressed product ``B`` has one row per color: ``J @ seed`` (forward, length m),
    ``seed @ J`` (reverse, length n) or ``H @ seed`` (Hessian, length n); the entry k of
    the pattern is ``B[read_color[k], read_pos[k]]``. Static: hashed by identity.
    """

    def __init__(self, kind: str, mode: str, rows: np.ndarray, cols: np.ndarray,
                 shape: tuple[int, int], colors: np.ndarray, read_color: np.ndarray,
                 read_pos: np.ndarray):
        self.kind, self.mode, self.shape = kind, mode, shape
        self.rows, self.cols, self.colors = rows, cols, colors
        self.num_colors = coloring.num_colors(colors)
        self.read_color, self.read_pos = read_color, read_pos
        self.indices = np.stack([rows, cols], axis=1).astype(np.int32)

    def sparsity(self) -> jsparse.BCOO:
        data = jnp.ones(len(self.rows), bool)
        return jsparse.BCOO((data, jnp.asarray(self.indices)), shape=self.shape,
                            indices_sorted=True, unique_indices=True)


def jacobian_plan(rows: np.ndarray, cols: np.ndarray, shape: tuple[int, int], mode: str) -> Plan:
    """The cheaper (fewer colors; forward on a tie) of column and row coloring, or the one
    `mode` names. A coloring is skipped when a lower bound on its colors (the most entries
    of a row, or of a column) shows that it cannot beat the other side's."""
    forward = lambda: Plan("jacobian", "forward", rows, cols, shape,
                           col := coloring.column_coloring(rows, cols, shape), col[cols], rows)
    reverse = lambda: Plan("jacobian", "reverse", rows, cols, shape,
                           row := coloring.row_coloring(rows, cols, shape), row[rows], cols)
    if mode != "auto":
        return forward() if mode == "forward" else reverse()
    fwd_bound = int(np.bincount(rows, minlength=shape[0]).max(initial=0))
    rev_bound = int(np.bincount(cols, minlength=shape[1]).max(initial=0))
    if fwd_bound <= rev_bound:
        fwd = forward()
        if rev_bound >= fwd.num_colors:
            return fwd
        rev = reverse()
    else:
        rev = reverse()
        if fwd_bound > rev.num_colors:
            return rev
        fwd = forward()
    return fwd if fwd.num_colors <= rev.num_colors else rev


def hessian_plan(rows: np.ndarray, cols: np.ndarray, n: int) -> Plan:
    """A star coloring and direct recovery: ``H[i, j]`` is read at row i of the product of
    j's color when j is the only column of its color in row i (the diagonal counted),
    else at row j of the product of i's color (the star coloring makes one of them so)."""
    colors = coloring.star_coloring(rows, cols, n)
    k = max(coloring.num_colors(colors), 1)
    diag = np.arange(n)
    with_diag = np.unique(np.r_[rows * n + cols, diag * n + diag])
    keys, counts = np.unique((with_diag // n) * k + colors[with_diag % n], return_counts=True)

    def alone(i, c):  # whether row i has exactly one column of color c
        return counts[np.searchsorted(keys, i * k + c)] == 1

    direct = alone(rows, colors[cols])
    assert np.all(direct | alone(cols, colors[rows])), "not a star coloring"
    read_color = np.where(direct, colors[cols], colors[rows])
    read_pos = np.where(direct, rows, cols)
    return Plan("hessian", _HESSIAN_MODE, rows, cols, (n, n), colors, read_color, read_pos)


def diag_plan(rows: np.ndarray, cols: np.ndarray, n: int) -> Plan:
    """The diagonal only: ``H[i, i]`` is entry i of the product of i's color, exact when
    no other column of row i has that color, a distance-1 coloring of the graph."""
    colors = coloring.distance1_coloring(rows, cols, n)
    diag = np.arange(n)
    return Plan("diag", _HESSIAN_MODE, diag, diag, (n, n), colors, colors, diag)


def _check_square_symmetric(rows: np.ndarray, cols: np.ndarray, shape: tuple[int, int],
                            fname: str) -> None:
    if shape[0] != shape[1]:
        raise ValueError(f"{fname}: sparsity must be a square (n, n) pattern of the Hessian, "
                         f"got shape {shape}.")
    n = shape[0]
    if not np.array_equal(np.sort(cols * n + rows), rows * n + cols):
        raise ValueError(f"{fname}: sparsity must be symmetric, as a Hessian is; pass the "
                         f"union of the pattern and its transpose (for a dense array p: "
                         f"p | p.T).")


def _make_plan(kind: str, mode: str, rows: np.ndarray, cols: np.ndarray,
               shape: tuple[int, int], fname: str) -> Plan:
    if kind == "jacobian":
        return jacobian_plan(rows, cols, shape, mode)
    _check_square_symmetric(rows, cols, shape, fname)
    return hessian_plan(rows, cols, shape[0]) if kind == "hessian" else diag_plan(rows, cols,
                                                                                   shape[0])


# --- the prepared objects --------------------------------------------------------------


class SparseJacobian:
    """A prepared sparse Jacobian (or Hessian, or Hessian diagonal) of a function.

    Made by :func:`sparse_jacobian` and its siblings. Holds the pattern and its coloring,
    computed at construction from an explicit ``sparsity``, else at the first call (by
    sparsity detection, from the argument shapes) and kept for later calls with the same
    shapes. Calling it returns a ``jax.experimental.sparse.BCOO`` (for Hessian diagonals,
    an array shaped like the differentiated arguments); it works inside ``jax.jit``.

    Attributes (``None`` until prepared): ``sparsity`` (the pattern as a boolean BCOO),
    ``colors`` (one per column in forward mode and for Hessians, one per row in reverse
    mode), ``num_colors`` (the number of products per call), ``mode`` (``"forward"``,
    ``"reverse"`` or ``"forward_over_reverse"``).
    """

    def __init__(self, fun: Callable, sparsity: Any, argnums: int | Sequence[int], mode: str,
                 chunk_size: int | None, kind: str, with_value: bool, fname: str):
        api_util.check_callable(fun, fname)
        api_util.check_chunk_size(chunk_size, fname)
        if kind == "jacobian" and mode not in _JAC_MODES:
            raise ValueError(f"{fname}: mode must be one of {', '.join(map(repr, _JAC_MODES))}, "
                             f"got {mode!r}.")
        self.fun, self.argnums, self.chunk_size = fun, argnums, chunk_size
        self._kind, self._mode, self._with_value, self._fname = kind, mode, with_value, fname
        self._plans: dict[Any, Plan] = {}
        self._plan: Plan | None = None
        self._fixed = sparsity is not None
        if self._fixed:
            rows, cols, shape = _as_pattern(sparsity, fname)
            self._plan = _make_plan(kind, mode, rows, cols, shape, fname)
        functools.update_wrapper(self, fun, updated=())

    @property
    def sparsity(self) -> jsparse.BCOO | None:
        return None if self._plan is None else self._plan.sparsity()

    @property
    def colors(self) -> np.ndarray | None:
        return None if self._plan is None else self._plan.colors

    @property
    def num_colors(self) -> int | None:
        return None if self._plan is None else self._plan.num_colors

    @property
    def mode(self) -> str | None:
        return None if self._plan is None else self._plan.mode

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return _call_prepared(self, args, kwargs)

    def plan_for(self, args: tuple, kwargs: dict, nums: tuple[int, ...]) -> Plan:
        """The plan for these arguments: the fixed one (checked), or one detected once per
        argument structure and shapes."""
        dyn_leaves = tree_util.tree_leaves(tuple(args[i] for i in nums))
        n = sum(int(np.prod(np.shape(x))) for x in dyn_leaves)
        if self._fixed:
            assert self._plan is not None
            if self._plan.shape[1] != n:
                raise ValueError(
                    f"{self._fname}: sparsity has shape {self._plan.shape}, so {self._plan.shape[1]} "
                    f"inputs, but the differentiated argument(s) have {n} entries in all; pass "
                    f"a pattern of (outputs, {n}), or sparsity=None to detect it.")
            return self._plan
        key = (tree_util.tree_structure(args), nums, tuple(map(_signature, tree_util.tree_leaves(args))))
        plan = self._plans.get(key)
        if plan is None:
            rows, cols, shape = _detect(self.fun, self._kind, args, kwargs, self.argnums, self._fname)
            plan = self._plans[key] = _make_plan(self._kind, self._mode, rows, cols, shape,
                                                 self._fname)
        self._plan = plan
        return plan


def _detect(fun: Callable, kind: str, args: tuple, kwargs: dict, argnums: Any,
            fname: str) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """The pattern by fungrad's sparsity detection, from the shapes of the array arguments
    alone (so it holds for every value of them, as a plan kept per shapes must)."""
    from fungrad._src import sparsity  # imported here: optional until it is used

    args = tree_util.tree_map(_abstract, args)
    f = functools.partial(fun, **kwargs) if kwargs else fun
    if kind != "jacobian":
        f = _scalar_checked(f, fname)  # named as the user called it, not by detection
    detect = sparsity.jacobian_sparsity if kind == "jacobian" else sparsity.hessian_sparsity
    with jax.ensure_compile_time_eval():  # under jax.jit, the pattern's arrays stay concrete
        pattern = detect(f, *args, argnums=argnums)
    return _as_pattern(pattern, fname)


def _is_array(x: Any) -> bool:
    return api_util.is_array_like(x) and not isinstance(x, (bool, int, float, complex))


def _abstract(x: Any) -> Any:
    if _is_array(x):
        aval = jaxutil.typeof(x)
        return jax.ShapeDtypeStruct(aval.shape, aval.dtype)
    return x


def _signature(x: Any) -> Any:
    """What a plan detected for an argument leaf depends on: an array's shape and dtype,
    another value (a Python number or option) itself."""
    if _is_array(x):
        return ("array", np.shape(x), jaxutil.typeof(x).dtype)
    try:
        hash(x)
    except TypeError:
        return ("object", id(x))
    return ("value", type(x), x)


@jaxutil.api_boundary
def _call_prepared(prepared: SparseJacobian, args: tuple, kwargs: dict) -> Any:
    fname = prepared._fname
    nums = api_util.forward_argnums(prepared.argnums, args, fname)
    plan = prepared.plan_for(args, kwargs, nums)
    single = isinstance(prepared.argnums, (int, np.integer))
    config = (plan, prepared._with_value, prepared.chunk_size, single, fname)
    impl = _sparse_jacobian_impl if plan.kind == "jacobian" else _sparse_hessian_impl
    return api._eager_transform(impl, config, prepared.fun, args, kwargs, nums)


# --- the compressed products (traced or eager) ----------------------------------------


def _raveled(fun: Callable, args: tuple, kwargs: dict,
             nums: tuple[int, ...]) -> tuple[Callable, Any, Callable]:
    """`fun` as a function of one flat vector (the differentiated arguments raveled in
    order), the vector, and the inverse of the raveling."""
    x_flat, unravel = ravel_pytree(tuple(args[i] for i in nums))
    partial = api._partial_args(fun, args, nums, kwargs)
    return (lambda x: partial(*unravel(x))), x_flat, unravel


def _seeds(colors: np.ndarray, num_colors: int, dtype: Any) -> jax.Array:
    """Row c: the sum of the basis vectors of color c."""
    return (jnp.asarray(colors)[None, :] == jnp.arange(num_colors)[:, None]).astype(dtype)


def _products(linear: Callable, plan: Plan, length: int, dtype: Any,
              chunk_size: int | None) -> jax.Array:
    """The compressed product: `linear` of each color's seed, stacked (colors first)."""
    if plan.num_colors == 0:
        return jnp.zeros((0, length), dtype)
    seeds = _seeds(plan.colors, plan.num_colors, dtype)
    return api._map_basis(linear, [seeds], chunk_size, 0)


def _to_bcoo(plan: Plan, products: jax.Array) -> jsparse.BCOO:
    data = products[plan.read_color, plan.read_pos] if len(plan.rows) else products.reshape(-1)[:0]
    return jsparse.BCOO((data, jnp.asarray(plan.indices)), shape=plan.shape,
                        indices_sorted=True, unique_indices=True)


def _sparse_jacobian_impl(fun: Callable, plan: Plan, with_value: bool, chunk_size: int | None,
                          single: bool, fname: str, args: tuple, kwargs: dict,
                          nums: tuple[int, ...]) -> Any:
    del single  # the Jacobian is of the raveled arguments, whatever argnums is
    g, x, _ = _raveled(fun, args, kwargs, nums)

    def g_flat(x):
        out = g(x)
        return ravel_pytree(out)[0], out

    if plan.mode == "forward":
        y, linear, out = api.linearize(g_flat, x, has_aux=True)
        _check_outputs(y, plan, fname)
        products = _products(linear, plan, y.size, x.dtype, chunk_size)
    else:
        y, pullback, out = api.vjp(g_flat, x, has_aux=True)
        _check_outputs(y, plan, fname)
        products = _products(lambda s: pullback(s)[0], plan, x.size, y.dtype, chunk_size)
    jac = _to_bcoo(plan, products)
    return (out, jac) if with_value else jac


def _check_outputs(y: Any, plan: Plan, fname: str) -> None:
    if y.size != plan.shape[0]:
        raise ValueError(f"{fname}: sparsity has shape {plan.shape}, so {plan.shape[0]} "
                         f"outputs, but the function returned {y.size} entries in all; pass a "
                         f"pattern of ({y.size}, {plan.shape[1]}), or sparsity=None to detect it.")


def _sparse_hessian_impl(fun: Callable, plan: Plan, with_value: bool, chunk_size: int | None,
                         single: bool, fname: str, args: tuple, kwargs: dict,
                         nums: tuple[int, ...]) -> Any:
    g, x, unravel = _raveled(_scalar_checked(fun, fname), args, kwargs, nums)
    grad, hvp, value = _linearized_gradient(g, x)
    products = _products(hvp, plan, x.size, x.dtype, chunk_size)
    if plan.kind == "diag":
        result = unravel(products[plan.read_color, plan.read_pos])  # shaped like the arguments
        result = result[0] if single else result
    else:
        result = _to_bcoo(plan, products)
    return (value, result) if with_value else result


def _linearized_gradient(g: Callable, x: Any) -> tuple[Any, Callable, Any]:
    """The gradient of scalar `g` at `x`, its linearization (the HVP, forward over
    reverse) and the value."""
    def grad_and_value(x):
        value, grad = api.value_and_grad(g)(x)
        return grad, value

    return api.linearize(grad_and_value, x, has_aux=True)


def _scalar_checked(fun: Callable, fname: str) -> Callable:
    """`fun`, raising a clear error when its output is not a scalar."""
    def f(*args, **kwargs):
        out = fun(*args, **kwargs)
        if not api_util.is_array_like(out) or np.shape(out) != ():
            got = (f"shape {np.shape(out)}" if api_util.is_array_like(out)
                   else f"a {type(out).__name__}")
            raise TypeError(f"{fname} needs f to return a scalar, but it returned {got}. "
                            f"Sum the outputs, or use fungrad.sparse_jacobian for a "
                            f"vector-valued function.")
        return out
    return f


# --- public: sparse ---------------------------------------------------------------------


def sparse_jacobian(fun: Callable, sparsity: Any = None, argnums: int | Sequence[int] = 0,
                    mode: str = "auto", chunk_size: int | None = None) -> SparseJacobian:
    """A prepared sparse Jacobian of `fun`: call it like `fun`, get a BCOO matrix.

    The Jacobian is of the output raveled against the differentiated argument(s) raveled
    (``jax.flatten_util.ravel_pytree`` order), shape ``(m, n)``. It costs one JVP per
    color of a column coloring (``mode="forward"``) or one VJP per color of a row coloring
    (``mode="reverse"``); ``"auto"`` takes the side with fewer colors.

    Args:
      fun: the function.
      sparsity: the pattern, a boolean ``jax.experimental.sparse.BCOO`` or a dense boolean
        array of shape ``(m, n)`` (true where output i may depend on input j); ``None``
        detects it (``fungrad.jacobian_sparsity``) once per shapes of the arguments, from
        those shapes alone, so that it holds for any values: index arrays that decide the
        pattern are best closed over (they are then constants the detection reads).
      argnums: which positional argument(s) to differentiate.
      mode: ``"auto"``, ``"forward"`` or ``"reverse"``.
      chunk_size: at most this many products at once (a loop over chunks of colors).

    Returns:
      A :class:`SparseJacobian`; ``.colors``, ``.num_colors``, ``.mode``, ``.sparsity``.

    >>> import jax.numpy as jnp, numpy as np, fungrad
    >>> f = lambda x: x[1:] * x[:-1]
    >>> pattern = np.eye(3, 4, dtype=bool) | np.eye(3, 4, 1, dtype=bool)
    >>> sj = fungrad.sparse_jacobian(f, sparsity=pattern)
    >>> sj(jnp.arange(4.0)).todense().tolist(), sj.mode, sj.num_colors
    ([[1.0, 0.0, 0.0, 0.0], [0.0, 2.0, 1.0, 0.0], [0.0, 0.0, 3.0, 2.0]], 'forward', 2)
    """
    return SparseJacobian(fun, sparsity, argnums, mode, chunk_size, "jacobian", False,
                          "sparse_jacobian")


def value_and_sparse_jacobian(fun: Callable, sparsity: Any = None,
                              argnums: int | Sequence[int] = 0, mode: str = "auto",
                              chunk_size: int | None = None) -> SparseJacobian:
    """As :func:`sparse_jacobian`, returning ``(fun's output, the BCOO Jacobian)``.

    >>> import jax.numpy as jnp, numpy as np, fungrad
    >>> y, jac = fungrad.value_and_sparse_jacobian(jnp.sin, sparsity=np.eye(2, dtype=bool))(
    ...     jnp.zeros(2))
    >>> y.tolist(), jac.todense().tolist()
    ([0.0, 0.0], [[1.0, 0.0], [0.0, 1.0]])
    """
    return SparseJacobian(fun, sparsity, argnums, mode, chunk_size, "jacobian", True,
                          "value_and_sparse_jacobian")


def sparse_hessian(fun: Callable, sparsity: Any = None, argnums: int | Sequence[int] = 0,
                   chunk_size: int | None = None) -> SparseJacobian:
    """A prepared sparse Hessian of scalar `fun`: call it like `fun`, get a BCOO matrix.

    One Hessian-vector product (forward over reverse, on one linearization of the
    gradient) per color of a star coloring of the symmetric pattern; every entry is read
    directly from one product.

    Args:
      fun: a function returning a scalar.
      sparsity: the symmetric pattern ``(n, n)`` (boolean BCOO or dense boolean array), or
        ``None`` to detect it at the first call.
      argnums: which positional argument(s) to differentiate (raveled together).
      chunk_size: at most this many HVPs at once.

    >>> import jax.numpy as jnp, numpy as np, fungrad
    >>> f = lambda x: jnp.sum(x[1:] * x[:-1]) + jnp.sum(x ** 3)
    >>> pattern = np.abs(np.subtract.outer(np.arange(4), np.arange(4))) <= 1
    >>> sh = fungrad.sparse_hessian(f, sparsity=pattern)
    >>> sh(jnp.ones(4)).todense().tolist()[1], sh.num_colors
    ([1.0, 6.0, 1.0, 0.0], 3)
    """
    return SparseJacobian(fun, sparsity, argnums, _HESSIAN_MODE, chunk_size, "hessian", False,
                          "sparse_hessian")


def value_and_sparse_hessian(fun: Callable, sparsity: Any = None,
                             argnums: int | Sequence[int] = 0,
                             chunk_size: int | None = None) -> SparseJacobian:
    """As :func:`sparse_hessian`, returning ``(fun's value, the BCOO Hessian)``.

    >>> import jax.numpy as jnp, numpy as np, fungrad
    >>> v, h = fungrad.value_and_sparse_hessian(lambda x: jnp.sum(x ** 2),
    ...                                         sparsity=np.eye(2, dtype=bool))(jnp.ones(2))
    >>> float(v), h.todense().tolist()
    (2.0, [[2.0, 0.0], [0.0, 2.0]])
    """
    return SparseJacobian(fun, sparsity, argnums, _HESSIAN_MODE, chunk_size, "hessian", True,
                          "value_and_sparse_hessian")


def hessian_diag(fun: Callable, argnums: int | Sequence[int] = 0, sparsity: Any = None,
                 chunk_size: int | None = None) -> Callable:
    """The exact diagonal of the Hessian of scalar `fun`, shaped like the argument(s).

    Without ``sparsity``, one HVP per coordinate (all at once under ``vmap``, or
    ``chunk_size`` at a time): the cost of the whole Hessian, the memory of one chunk.
    With a pattern (or ``sparsity="detect"``), one HVP per color of a distance-1 coloring
    of the pattern's graph: ``H[i, i]`` is entry i of its color's product, since no other
    column of row i shares i's color.

    Args:
      fun: a function returning a scalar.
      argnums: which positional argument(s) to differentiate.
      sparsity: ``None`` (dense), ``"detect"``, or the symmetric Hessian pattern ``(n, n)``.
      chunk_size: at most this many HVPs at once.

    >>> import jax.numpy as jnp, fungrad
    >>> fungrad.hessian_diag(lambda x: jnp.sum(x ** 3) + x[0] * x[1])(jnp.arange(3.0)).tolist()
    [0.0, 6.0, 12.0]
    """
    fname = "hessian_diag"
    if sparsity is not None:
        detect = isinstance(sparsity, str)
        if detect and sparsity != "detect":
            raise ValueError(f"{fname}: sparsity must be None (dense), 'detect' or a pattern, "
                             f"got {sparsity!r}.")
        return SparseJacobian(fun, None if detect else sparsity, argnums, _HESSIAN_MODE,
                              chunk_size, "diag", False, fname)
    api_util.check_callable(fun, fname)
    api_util.check_chunk_size(chunk_size, fname)

    @jaxutil.api_boundary
    @functools.wraps(fun)
    def hessian_diag_f(*args, **kwargs):
        nums = api_util.forward_argnums(argnums, args, fname)
        single = isinstance(argnums, (int, np.integer))
        return api._eager_transform(_dense_diag_impl, (single, chunk_size), fun, args, kwargs, nums)

    return hessian_diag_f


def _dense_diag_impl(fun: Callable, single: bool, chunk_size: int | None, args: tuple,
                     kwargs: dict, nums: tuple[int, ...]) -> Any:
    g, x, unravel = _raveled(_scalar_checked(fun, "hessian_diag"), args, kwargs, nums)
    _, hvp, _ = _linearized_gradient(g, x)

    def entry(i):  # e_i . H e_i; the basis vector is made inside, so no (n, n) basis exists
        return hvp(jax.nn.one_hot(i, x.size, dtype=x.dtype))[i]

    diag = api._map_basis(entry, [jnp.arange(x.size)], chunk_size, 0)
    result = unravel(diag)
    return result[0] if single else result


# --- public: dense conveniences ---------------------------------------------------------


def jacobian(fun: Callable, argnums: int | Sequence[int] = 0, mode: str = "auto",
             has_aux: bool = False, chunk_size: int | None = None,
             memory_budget: int | None = None) -> Callable:
    """The dense Jacobian of `fun`, by forward or reverse mode.

    ``mode="auto"`` takes forward mode (:func:`fungrad.jacfwd`, one JVP per input entry)
    when the differentiated arguments have at most as many entries as the output, else
    reverse mode (:func:`fungrad.jacrev`, one VJP per output entry). The result is laid
    out as theirs (the same as ``jax.jacfwd`` / ``jax.jacrev``).

    Args:
      fun: the function.
      argnums: which positional argument(s) to differentiate.
      mode: ``"auto"``, ``"forward"`` or ``"reverse"``.
      has_aux: whether ``fun`` returns ``(output, aux)``; then returns ``(jac, aux)``.
      chunk_size: at most this many products at once.
      memory_budget: instead of ``chunk_size``, bytes of temporary memory for the compiled
        program, as for :func:`fungrad.jacfwd`.

    >>> import jax.numpy as jnp, fungrad
    >>> fungrad.jacobian(lambda x: jnp.sum(x ** 2))(jnp.array([1.0, 2.0])).tolist()  # reverse
    [2.0, 4.0]
    """
    fname = "jacobian"
    api_util.check_callable(fun, fname)
    api_util.check_chunk_size(chunk_size, fname)
    api_util.check_memory_budget(memory_budget, chunk_size, fname)
    if mode not in _JAC_MODES:
        raise ValueError(f"{fname}: mode must be one of {', '.join(map(repr, _JAC_MODES))}, "
                         f"got {mode!r}.")

    @jaxutil.api_boundary
    @functools.wraps(fun)
    def jacobian_f(*args, **kwargs):
        nums = api_util.forward_argnums(argnums, args, fname)
        config = (isinstance(argnums, (int, np.integer)), has_aux, mode, chunk_size)
        return api._eager_transform(_jacobian_impl, config, fun, args, kwargs, nums,
                                    memory_budget)

    return jacobian_f


def _jacobian_impl(fun: Callable, single: bool, has_aux: bool, mode: str,
                   chunk_size: int | None, args: tuple, kwargs: dict,
                   nums: tuple[int, ...]) -> Any:
    if mode == "auto":
        mode = choose_dense_mode(fun, args, kwargs, nums, has_aux)
    if mode == "forward":
        return api._jacfwd_impl(fun, single, has_aux, chunk_size, args, kwargs, nums)
    return api._jacrev_impl(fun, single, has_aux, False, chunk_size, args, kwargs, nums)


def choose_dense_mode(fun: Callable, args: tuple, kwargs: dict, nums: tuple[int, ...],
                      has_aux: bool) -> str:
    """"forward" when the inputs have at most as many entries as the output, else
    "reverse". The output's size comes from an abstract evaluation (no computation)."""
    dyn = tuple(args[i] for i in nums)
    out = jax.eval_shape(api._partial_args(fun, args, nums, kwargs), *dyn)
    out = api_util.split_aux(out, "jacobian")[0] if has_aux else out
    size = lambda tree: sum(int(np.prod(np.shape(x))) for x in tree_util.tree_leaves(tree))
    return "forward" if size(dyn) <= size(out) else "reverse"


def value_and_jacobian(fun: Callable, argnums: int | Sequence[int] = 0, mode: str = "auto",
                       has_aux: bool = False, chunk_size: int | None = None) -> Callable:
    """As :func:`jacobian`, returning ``(value, jac)`` (``((value, aux), jac)`` with
    ``has_aux``); the function runs once, its output being the primal of the products.

    >>> import jax.numpy as jnp, fungrad
    >>> y, jac = fungrad.value_and_jacobian(lambda x: x ** 2)(jnp.array([1.0, 2.0]))
    >>> y.tolist(), jac.tolist()
    ([1.0, 4.0], [[2.0, 0.0], [0.0, 4.0]])
    """
    jac_f = jacobian(_value_as_aux(fun, has_aux, "value_and_jacobian"), argnums, mode, True,
                     chunk_size)

    @functools.wraps(fun)
    def value_and_jacobian_f(*args, **kwargs):
        jac, value = jac_f(*args, **kwargs)
        return value, jac

    return value_and_jacobian_f


def _value_as_aux(fun: Callable, has_aux: bool, fname: str) -> Callable:
    """`fun` returning ``(output, output)`` (``(output, (output, aux))`` with has_aux)."""
    def f(*args, **kwargs):
        out = fun(*args, **kwargs)
        if has_aux:
            y, aux = api_util.split_aux(out, fname)
            return y, (y, aux)
        return out, out
    return f


def value_and_hessian(fun: Callable, argnums: int | Sequence[int] = 0, has_aux: bool = False,
                      chunk_size: int | None = None) -> Callable:
    """The value of scalar `fun` and its Hessian (forward over reverse), as ``(value,
    hessian)`` like ``jax.value_and_grad`` (``((value, aux), hessian)`` with has_aux). The
    gradient is not returned: use :func:`fungrad.value_and_grad` when it is needed too.

    >>> import jax.numpy as jnp, fungrad
    >>> v, h = fungrad.value_and_hessian(lambda x: jnp.sum(x ** 3))(jnp.array([1.0, 2.0]))
    >>> float(v), h.tolist()
    (9.0, [[6.0, 0.0], [0.0, 12.0]])
    """
    api_util.check_callable(fun, "value_and_hessian")
    gradient = api.jacrev(_value_as_aux(fun, has_aux, "value_and_hessian"), argnums, has_aux=True,
                          chunk_size=chunk_size)
    hess = api.jacfwd(gradient, argnums, has_aux=True, chunk_size=chunk_size)

    @functools.wraps(fun)
    def value_and_hessian_f(*args, **kwargs):
        h, value = hess(*args, **kwargs)
        return value, h

    return value_and_hessian_f


@jaxutil.api_boundary
def vhp(fun: Callable, primals: Sequence[Any], cotangents: Sequence[Any]) -> tuple[Any, ...]:
    """Vector-Hessian product ``v^T H`` of scalar `fun`, reverse over reverse.

    A tuple shaped like ``primals``. For a twice continuously differentiable `fun` the
    Hessian is symmetric, so this equals :func:`fungrad.hvp` (``H v``), which is cheaper
    (forward over reverse); ``vhp`` is the transpose computed as such, as
    ``torch.autograd.functional.vhp``.

    >>> import jax.numpy as jnp, fungrad
    >>> (v,) = fungrad.vhp(lambda x: x[0] ** 2 * x[1], (jnp.array([1.0, 2.0]),),
    ...                    (jnp.array([1.0, 0.0]),))
    >>> v.tolist()
    [4.0, 2.0]
    """
    fname = "vhp"
    api_util.check_callable(fun, fname)
    api_util.check_args_tuple(primals, "primals", fname)
    api_util.check_args_tuple(cotangents, "cotangents", fname)
    primals, cotangents = tuple(primals), tuple(cotangents)
    api_util.check_same_structure(tree_util.tree_structure(primals),
                                  tree_util.tree_structure(cotangents), "primals", "cotangents",
                                  fname)
    gradient = api.grad(fun, argnums=tuple(range(len(primals))))
    _, pullback = api.vjp(gradient, *primals)
    return pullback(cotangents)


@jaxutil.api_boundary
def hutchinson_trace(fun: Callable, x: Any, key: Any, n: int,
                     chunk_size: int | None = None) -> jax.Array:
    """Hutchinson's unbiased estimate of the trace of the Hessian of scalar `fun` at `x`.

    The mean of ``z^T H z`` over ``n`` Rademacher probes ``z`` (entries +-1, so
    ``E[z z^T] = I`` and ``E[z^T H z] = tr H``), each by one HVP on one linearization of
    the gradient; the variance is ``2 sum_{i != j} H_ij^2 / n`` (exact for a diagonal H).

    Args:
      fun: a function of one argument (an array or a pytree) returning a scalar.
      x: where to evaluate.
      key: a ``jax.random`` key.
      n: the number of probes, a positive int.
      chunk_size: at most this many HVPs at once.

    >>> import jax, jax.numpy as jnp, fungrad
    >>> f = lambda x: jnp.sum(jnp.arange(1.0, 4.0) * x ** 2)  # H = diag(2, 4, 6)
    >>> float(fungrad.hutchinson_trace(f, jnp.zeros(3), jax.random.key(0), 4))
    12.0
    """
    fname = "hutchinson_trace"
    api_util.check_callable(fun, fname)
    api_util.check_chunk_size(chunk_size, fname)
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
        raise ValueError(f"{fname}: n (the number of probes) must be a positive integer, got {n!r}.")
    api_util.check_array_leaves(x, "x", fname)
    for leaf in tree_util.tree_leaves(x):
        api_util.check_jacfwd_input_dtype(leaf, holomorphic=False, fname=fname)
    g, x_flat, _ = _raveled(_scalar_checked(fun, fname), (x,), {}, (0,))
    _, hvp, _ = _linearized_gradient(g, x_flat)
    probes = jax.random.rademacher(key, (int(n), x_flat.size), dtype=x_flat.dtype)
    quad = api._map_basis(lambda z: jnp.vdot(z, hvp(z)), [probes], chunk_size, 0)
    return jnp.mean(quad)
