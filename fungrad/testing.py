"""The checker API: `check_grads` verifies fungrad's derivatives without jax's AD."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import tree_util

from fungrad._src import jaxutil
from fungrad._src.api import jvp, vjp

__all__ = ["check_grads"]

# Central differences err by about eps^2 (truncation) plus ulp/eps (rounding): a step near
# ulp^(1/3) balances the two. Tolerances are relative to the size of the derivative.
_EPS = {"float16": 1e-1, "bfloat16": 1e-1, "float32": 3e-3, "float64": 1e-6}
_TOL = {"float16": 1e-1, "bfloat16": 2e-1, "float32": 2e-2, "float64": 1e-6}
_ADJOINT_TOL = {"float16": 2e-2, "bfloat16": 5e-2, "float32": 1e-5, "float64": 1e-12}


def check_grads(f: Callable, args: Sequence[Any], order: int = 2,
                modes: Sequence[str] = ("fwd", "rev"), atol: float | None = None,
                rtol: float | None = None, eps: float | None = None, seed: int = 0) -> None:
    """Checks fungrad's derivatives of `f` at `args`, up to `order`, against its own values.

    Forward mode is compared with central finite differences along random directions
    (with a step chosen for the dtype unless `eps` is given); reverse mode likewise,
    through ``<u, J v>``; with both modes, the exact adjoint identity
    ``<u, J v> = <J^T u, v>`` between fungrad's jvp and vjp is also checked. Each
    order checks the derivative functions of the previous one. On failure, raises
    AssertionError naming the argument, the mode, the order, the error, and the first
    primitive of `f` whose rule disagrees with finite differences.

    >>> import jax.numpy as jnp
    >>> check_grads(lambda x: jnp.sin(x) * x, (jnp.array([0.5, 1.0]),), order=2)
    """
    args = tuple(args)
    rng = np.random.default_rng(seed)
    try:
        _check(f, args, order, tuple(modes), atol, rtol, eps, rng, level=1)
    except AssertionError as err:
        culprit = _first_wrong_rule(f, args, rng)
        raise AssertionError(f"{err}{culprit}") from None


def _check(f, args, order, modes, atol, rtol, eps, rng, level):
    if "fwd" in modes:
        _check_fwd(f, args, atol, rtol, eps, rng, level)
    if "rev" in modes:
        _check_rev(f, args, atol, rtol, eps, rng, level)
    if "fwd" in modes and "rev" in modes:
        _check_adjoint(f, args, atol, rtol, rng, level)
    if order > 1:
        if "fwd" in modes:
            v = _random_like(args, rng)
            _check(lambda *a: jvp(f, a, v)[1], args, order - 1, modes, atol, rtol, eps, rng,
                   level + 1)
        if "rev" in modes:
            u = _random_like(jax.eval_shape(f, *args), rng)
            _check(lambda *a: vjp(f, *a)[1](u), args, order - 1, modes, atol, rtol, eps, rng,
                   level + 1)


def _check_fwd(f, args, atol, rtol, eps, rng, level):
    for i in _float_args(args):
        v = _only(i, _random_like(args, rng), args)
        _, y_dot = jvp(f, args, v)
        fd = _finite_difference(f, args, v, eps)
        _assert_close(y_dot, fd, atol, rtol, f"forward mode (jvp) at order {level}, argument {i}",
                      "the jvp", "central finite differences")


def _check_rev(f, args, atol, rtol, eps, rng, level):
    y, pullback = vjp(f, *args)
    u = _random_like(y, rng)
    cts = pullback(u)
    for i in _float_args(args):
        v = _only(i, _random_like(args, rng), args)
        from_vjp = _inner(cts[i], v[i])
        from_fd = _inner(u, _finite_difference(f, args, v, eps))
        _assert_close(from_vjp, from_fd, atol, rtol, f"reverse mode (vjp) at order {level}, "
                      f"argument {i}", "<J^T u, v> from the vjp", "<u, J v> by finite differences")


def _check_adjoint(f, args, atol, rtol, rng, level):
    v = _random_like(args, rng)
    y, y_dot = jvp(f, args, v)
    u = _random_like(y, rng)
    cts = vjp(f, *args)[1](u)
    lhs, rhs = _inner(u, y_dot), sum(_inner(c, t) for c, t in zip(cts, v, strict=True))
    tol = _ADJOINT_TOL[_dtype_name(args)] if atol is None and rtol is None else (rtol or atol)
    _assert_close(lhs, rhs, tol, tol, f"adjoint identity between jvp and vjp at order {level}",
                  "<u, J v>", "<J^T u, v>")


def _finite_difference(f, args, v, eps):
    step = eps if eps is not None else _EPS[_dtype_name(args)]
    shifted = lambda s: f(*tree_util.tree_map(lambda x, t: _shift(x, t, s), args, v))
    plus, minus = shifted(step), shifted(-step)
    return tree_util.tree_map(lambda p, m: _fd_leaf(p, m, step), plus, minus)


def _fd_leaf(plus, minus, step):
    if not jnp.issubdtype(jnp.result_type(plus), jnp.inexact):
        return np.zeros(np.shape(plus), jax.dtypes.float0)
    return (plus - minus) / (2 * step)


def _shift(x, t, step):
    if jnp.result_type(t) == jax.dtypes.float0:
        return x
    return x + step * t


def _assert_close(actual, expected, atol, rtol, where, actual_name, expected_name):
    for a, e in zip(tree_util.tree_leaves(actual), tree_util.tree_leaves(expected), strict=True):
        if jnp.result_type(e) == jax.dtypes.float0:
            continue
        wide = np.complex128 if np.iscomplexobj(a) or np.iscomplexobj(e) else np.float64
        a, e = np.asarray(a, wide), np.asarray(e, wide)
        dtype = _dtype_name((actual,))
        r = rtol if rtol is not None else _TOL[dtype]
        scale = max(1.0, float(np.max(np.abs(e), initial=0.0)))
        tol = (atol if atol is not None else r) * scale
        err = float(np.max(np.abs(a - e), initial=0.0))
        if not err <= tol:
            raise AssertionError(
                f"check_grads: {where} is wrong: {actual_name} and {expected_name} differ by "
                f"{err:.3g} (tolerance {tol:.3g}).\n  {actual_name}: {_short(a)}\n  "
                f"{expected_name}: {_short(e)}")


def _first_wrong_rule(f, args, rng) -> str:
    """Checks each equation of `f`'s jaxpr alone; names the first whose rule is wrong."""
    try:
        closed = jax.make_jaxpr(f)(*args)
        leaves = tree_util.tree_leaves(args)
        env = dict(zip(closed.jaxpr.invars, leaves, strict=True))
        env.update(zip(closed.jaxpr.constvars, closed.consts, strict=True))
        for eqn in closed.jaxpr.eqns:
            invals = [v.val if type(v) is jaxutil.Literal else env[v] for v in eqn.invars]
            outs = jaxutil.bind_eqn(eqn, invals)
            env.update(zip(eqn.outvars, outs, strict=True))
            if _eqn_rule_is_wrong(eqn, invals, rng):
                line = jaxutil.source_line(eqn)
                return (f"\nThe first equation whose derivative rule disagrees with finite "
                        f"differences is primitive '{eqn.primitive}'"
                        f"{f' at {line}' if line else ''}.")
    except Exception:  # localizing is a courtesy: never mask the original failure
        return ""
    return ""


def _eqn_rule_is_wrong(eqn, invals, rng) -> bool:
    if not any(jnp.issubdtype(jnp.result_type(x), jnp.inexact) for x in invals):
        return False
    fun = lambda *xs: jaxutil.bind_eqn(eqn, xs)
    try:
        _check_fwd(fun, tuple(invals), None, None, None, rng, 1)
    except AssertionError:
        return True
    return False


def _float_args(args) -> list[int]:
    return [i for i, a in enumerate(args)
            if any(jnp.issubdtype(jnp.result_type(x), jnp.inexact) for x in tree_util.tree_leaves(a))]


def _only(i, tangents, args):
    """Tangents that are zero except for argument `i`."""
    return tuple(t if j == i else _zeros_like_tangent(a) for j, (t, a) in enumerate(zip(tangents, args,
                                                                                       strict=True)))


def _zeros_like_tangent(tree):
    def one(x):
        dtype = jaxutil.typeof(x).to_tangent_aval().dtype
        return np.zeros(np.shape(x), dtype) if dtype == jax.dtypes.float0 else jnp.zeros(np.shape(x), dtype)
    return tree_util.tree_map(one, tree)


def _random_like(tree, rng):
    def one(x):
        dtype = jaxutil.typeof(x).to_tangent_aval().dtype
        if dtype == jax.dtypes.float0:
            return np.zeros(np.shape(x), dtype)
        val = rng.standard_normal(np.shape(x))
        if jnp.issubdtype(dtype, jnp.complexfloating):
            val = val + 1j * rng.standard_normal(np.shape(x))
        return jnp.asarray(val, dtype)
    return tree_util.tree_map(one, tree)


def _inner(a, b):
    total = 0.0
    for x, y in zip(tree_util.tree_leaves(a), tree_util.tree_leaves(b), strict=True):
        if jnp.result_type(x) == jax.dtypes.float0:
            continue
        total = total + jnp.sum(jnp.real(jnp.asarray(x) * jnp.asarray(y)))
    return total


def _dtype_name(tree) -> str:
    names = [jnp.result_type(x).name for x in tree_util.tree_leaves(tree)
             if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
    for name in ("float16", "bfloat16", "float32"):
        if name in names or name.replace("float", "complex") in names:
            return name
    if "complex64" in names:
        return "float32"
    return "float64" if names else "float32"


def _short(x) -> str:
    return np.array2string(np.asarray(x).ravel()[:6], precision=5) + (" ..." if np.size(x) > 6 else "")
