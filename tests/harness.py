"""Oracles shared by the tests: fungrad against jax's own transforms and finite differences."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import tree_util

import fungrad

TOL = {np.dtype("float32"): 1e-5, np.dtype("float64"): 1e-12,
       np.dtype("complex64"): 1e-5, np.dtype("complex128"): 1e-12,
       np.dtype("float16"): 1e-2, np.dtype("bfloat16"): 1e-2}


def tol_for(tree: Any) -> float:
    dtypes = [np.dtype(jnp.result_type(x)) for x in tree_util.tree_leaves(tree)]
    return max((TOL.get(d, 1e-5) for d in dtypes), default=1e-5)


def assert_close(actual: Any, expected: Any, rtol: float | None = None,
                 atol: float | None = None, err_msg: str = "") -> None:
    """Same tree structure, shapes and dtypes; values equal to tolerance."""
    a_leaves, a_tree = tree_util.tree_flatten(actual)
    e_leaves, e_tree = tree_util.tree_flatten(expected)
    assert a_tree == e_tree, f"{err_msg}: structure {a_tree} != {e_tree}"
    for a, e in zip(a_leaves, e_leaves, strict=True):
        assert np.shape(a) == np.shape(e), f"{err_msg}: shape {np.shape(a)} != {np.shape(e)}"
        a_dtype, e_dtype = jnp.result_type(a), jnp.result_type(e)
        assert a_dtype == e_dtype, f"{err_msg}: dtype {a_dtype} != {e_dtype}"
        if e_dtype == jax.dtypes.float0:
            continue
        r = rtol if rtol is not None else tol_for(e)
        np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=r,
                                   atol=atol if atol is not None else r, err_msg=err_msg)


def random_like(tree: Any, rng: np.random.Generator) -> Any:
    """A random tangent for each leaf (float0 for integer leaves)."""
    def one(x):
        aval = jax.typeof(x)
        dtype = aval.to_tangent_aval().dtype
        if dtype == jax.dtypes.float0:
            return np.zeros(aval.shape, jax.dtypes.float0)
        val = rng.standard_normal(aval.shape)
        if jnp.issubdtype(dtype, jnp.complexfloating):
            val = val + 1j * rng.standard_normal(aval.shape)
        return jnp.asarray(val, dtype)
    return tree_util.tree_map(one, tree)


def check_jvp(f: Callable, args: Sequence[Any], rng: np.random.Generator, **tol) -> None:
    tangents = random_like(tuple(args), rng)
    expected = jax.jvp(f, tuple(args), tangents)
    actual = fungrad.jvp(f, tuple(args), tangents)
    assert_close(actual, expected, err_msg="jvp", **tol)


def check_vjp(f: Callable, args: Sequence[Any], rng: np.random.Generator, **tol) -> None:
    out, jax_pullback = jax.vjp(f, *args)
    ct = random_like(out, rng)
    out_f, pullback = fungrad.vjp(f, *args)
    assert_close(out_f, out, err_msg="vjp primal out", **tol)
    assert_close(pullback(ct), jax_pullback(ct), err_msg="vjp", **tol)


def check_jit(f: Callable, args: Sequence[Any], rng: np.random.Generator, **tol) -> None:
    """fungrad's transforms traced inside jax.jit equal jax's."""
    tangents = random_like(tuple(args), rng)
    out = jax.eval_shape(f, *args)
    ct = random_like(tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), out), rng)
    jvp_f = jax.jit(lambda a, t: fungrad.jvp(f, a, t))
    assert_close(jvp_f(tuple(args), tangents), jax.jvp(f, tuple(args), tangents),
                 err_msg="jit(jvp)", **tol)
    vjp_f = jax.jit(lambda a, c: fungrad.vjp(f, *a)[1](c))
    assert_close(vjp_f(tuple(args), ct), jax.vjp(f, *args)[1](ct), err_msg="jit(vjp)", **tol)


def check_second_order(f: Callable, args: Sequence[Any], rng: np.random.Generator,
                       **tol) -> None:
    """Forward over reverse and reverse over reverse, against jax's."""
    out = jax.eval_shape(f, *args)
    ct = random_like(tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), out), rng)
    tangents = random_like(tuple(args), rng)

    def pullback_with(vjp):
        return lambda *a: vjp(f, *a)[1](ct)

    assert_close(fungrad.jvp(pullback_with(fungrad.vjp), tuple(args), tangents),
                 jax.jvp(pullback_with(jax.vjp), tuple(args), tangents),
                 err_msg="jvp of vjp", **tol)
    ct2 = random_like(tuple(args), rng)
    assert_close(fungrad.vjp(pullback_with(fungrad.vjp), *args)[1](ct2),
                 jax.vjp(pullback_with(jax.vjp), *args)[1](ct2), err_msg="vjp of vjp", **tol)


def check_finite_differences(f: Callable, args: Sequence[Any], rng: np.random.Generator,
                             eps: float = 1e-6, rtol: float = 1e-5) -> None:
    """Central differences in float64 along a random direction equal fungrad's jvp."""
    args64 = tree_util.tree_map(_to64, tuple(args))
    tangents = random_like(args64, rng)

    @jax.jit
    def evaluate(a, t):
        _, y_dot = fungrad.jvp(f, a, t)
        plus = f(*tree_util.tree_map(lambda x, t: _step(x, t, eps), a, t))
        minus = f(*tree_util.tree_map(lambda x, t: _step(x, t, -eps), a, t))
        return y_dot, plus, minus

    y_dot, plus, minus = evaluate(args64, tangents)
    fd = tree_util.tree_map(lambda p, m: (p - m) / (2 * eps) if _is_float(p) else None,
                            plus, minus)
    for a, e in zip(tree_util.tree_leaves(y_dot), tree_util.tree_leaves(fd), strict=False):
        if e is None:
            continue
        scale = max(1.0, float(np.max(np.abs(np.asarray(e)))) if np.size(e) else 1.0)
        np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=rtol, atol=rtol * scale,
                                   err_msg="finite differences")


def _is_float(x: Any) -> bool:
    return jnp.issubdtype(jnp.result_type(x), jnp.inexact)


def _to64(x: Any) -> Any:
    dtype = jnp.result_type(x)
    if jnp.issubdtype(dtype, jnp.complexfloating):
        return jnp.asarray(x, jnp.complex128)
    if jnp.issubdtype(dtype, jnp.floating):
        return jnp.asarray(x, jnp.float64)
    return x


def _step(x: Any, t: Any, eps: float) -> Any:
    if jnp.result_type(t) == jax.dtypes.float0:
        return x
    return x + eps * t


def _derivatives(lib: Any, f: Callable, args: tuple, tangents: tuple, ct: Any, ct2: tuple,
                 modes: Sequence[str], order: int) -> dict[str, Any]:
    """Every derivative that `check_all` compares, computed with `lib` (fungrad or jax)."""
    out: dict[str, Any] = {}
    if "fwd" in modes:
        out["jvp"] = lib.jvp(f, args, tangents)
    if "rev" in modes:
        y, pullback = lib.vjp(f, *args)
        out["vjp"] = (y, pullback(ct))
        if order >= 2:
            def pulled(*a):
                return lib.vjp(f, *a)[1](ct)
            out["jvp of vjp"] = lib.jvp(pulled, args, tangents)
            out["vjp of vjp"] = lib.vjp(pulled, *args)[1](ct2)
    return out


def check_all(f: Callable, args: Sequence[Any], *, seed: int = 0, order: int = 2,
              fd: bool = True, jit: bool = True, modes: Sequence[str] = ("fwd", "rev"),
              ref: Callable | None = None, **tol) -> None:
    """Every oracle at once: jvp, vjp and (with `order=2`) forward and reverse over reverse,
    each against jax's, and finite differences in float64.

    With `jit` (the default) both libraries run inside one `jax.jit` each: fungrad's
    transforms are traced as a user's jitted code would trace them, and the suite compiles
    one program per case instead of one per primitive. `jit=False` runs them eagerly.
    Where jax cannot differentiate `f`, `ref` is the same function written so that it can:
    jax's derivatives of `ref` are the reference for fungrad's of `f`.
    """
    rng = np.random.default_rng(seed)
    args = tuple(args)
    tangents = random_like(args, rng)
    out = jax.eval_shape(f, *args)
    ct = random_like(tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), out), rng)
    ct2 = random_like(args, rng)

    def run(lib, fun):
        def go(a, t, c, c2):
            return _derivatives(lib, fun, a, t, c, c2, modes, order)
        return (jax.jit(go) if jit else go)(args, tangents, ct, ct2)

    expected, actual = run(jax, f if ref is None else ref), run(fungrad, f)
    assert expected.keys() == actual.keys()
    for name in expected:
        assert_close(actual[name], expected[name], err_msg=name, **tol)
    if fd and "fwd" in modes:
        check_finite_differences(f, args, rng)


def spec_args(specs: Sequence[Any], dtype: Any, seed: int = 0) -> list[Any]:
    """Random normal arrays of `dtype` for the shape tuples in `specs`; other entries as given."""
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(dtype) if isinstance(s, tuple) else s for s in specs]


def check_case(case: Sequence[Any], args: Sequence[Any], *, light: bool) -> None:
    """`check_all` on one spec-table row `(name, fun, specs[, options])`.

    A `light` row (single precision: every oracle also runs in double) checks first
    order against jax only, without second order or finite differences.
    """
    _, fn, _, *options = case
    opts = dict(options[0]) if options else {}
    if light:
        opts.update(order=1, fd=False)
    check_all(fn, args, **opts)

