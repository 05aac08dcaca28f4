"""Jacobians and Hessians in chunks of the basis: the same result, the memory of a chunk."""

import functools

import jax
import jax.numpy as jnp
import pytest

import fungrad
from fungrad._src import api, caching
from tests.harness import assert_close


def _f(x, y):
    return {"a": jnp.sin(x) * y[0], "b": jnp.outer(x, y).sum(0)}


X, Y = jnp.linspace(0.1, 1.0, 7), jnp.array([2.0, -1.0, 0.5])


def _equal(a, b):
    return jax.tree_util.tree_all(jax.tree_util.tree_map(
        lambda u, v: u.shape == v.shape and u.dtype == v.dtype and bool(jnp.array_equal(u, v)),
        a, b))


@pytest.mark.parametrize("transform", ["jacfwd", "jacrev"])
@pytest.mark.parametrize("chunk_size", [1, 2, 3, 9, 100])
def test_a_chunked_jacobian_equals_the_unchunked_one_exactly(transform, chunk_size):
    ours = getattr(fungrad, transform)
    full = ours(_f, argnums=(0, 1))(X, Y)
    assert _equal(ours(_f, argnums=(0, 1), chunk_size=chunk_size)(X, Y), full)
    assert _equal(jax.jit(ours(_f, argnums=(0, 1), chunk_size=chunk_size))(X, Y),
                  jax.jit(ours(_f, argnums=(0, 1)))(X, Y))
    assert_close(full, getattr(jax, transform)(_f, argnums=(0, 1))(X, Y))


def test_a_chunked_hessian_and_aux():
    h = lambda x: jnp.sum(jnp.sin(x) * jnp.roll(x, 1)) + jnp.sum(x ** 4)  # noqa: E731
    assert _equal(fungrad.hessian(h, chunk_size=3)(X), fungrad.hessian(h)(X))
    assert_close(fungrad.hessian(h, chunk_size=3)(X), jax.hessian(h)(X))
    g = lambda x: (jnp.sin(x), {"sum": jnp.sum(x)})  # noqa: E731
    for transform in ("jacfwd", "jacrev"):
        jac, aux = getattr(fungrad, transform)(g, has_aux=True, chunk_size=2)(X)
        want_jac, want_aux = getattr(jax, transform)(g, has_aux=True)(X)
        assert_close((jac, aux), (want_jac, want_aux))


def test_chunks_bound_the_compiled_programs_memory():
    # A small Jacobian (4 x 256) through a wide intermediate (8192): all 256 tangents of
    # the intermediate at once against 16 at a time.
    kb, kc = jax.random.split(jax.random.key(0))
    b = jax.random.normal(kb, (8192, 256)) / 16.0
    c = jax.random.normal(kc, (4, 8192)) / 90.0
    f = lambda x: c @ jnp.tanh(b @ x)  # noqa: E731
    x = jnp.linspace(-1.0, 1.0, 256)

    def temp_bytes(chunk_size):
        compiled = jax.jit(fungrad.jacfwd(f, chunk_size=chunk_size)).lower(x).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    assert temp_bytes(16) < temp_bytes(None) / 4
    assert_close(fungrad.jacfwd(f, chunk_size=16)(x), jax.jacfwd(f)(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "8"])
def test_chunk_size_must_be_a_positive_integer(bad):
    for transform in (fungrad.jacfwd, fungrad.jacrev, fungrad.hessian):
        with pytest.raises(ValueError, match="chunk_size must be a positive integer or None"):
            transform(jnp.sin, chunk_size=bad)


# --- memory_budget: the largest chunk whose compiled program fits -------------------------


def _wide():
    """A 4 x 256 Jacobian through a wide intermediate (2048): memory grows with the chunk."""
    kb, kc = jax.random.split(jax.random.key(1))
    b = jax.random.normal(kb, (2048, 256), jnp.float32) / 16.0
    c = jax.random.normal(kc, (4, 2048), jnp.float32) / 45.0
    return (lambda x: c @ jnp.tanh(b @ x)), jnp.linspace(-1.0, 1.0, 256, dtype=jnp.float32)


def _tall():
    """A 256 x 4 Jacobian through the same: reverse mode's memory grows with the chunk."""
    kb, kc = jax.random.split(jax.random.key(2))
    b = jax.random.normal(kb, (256, 2048), jnp.float32) / 45.0
    c = jax.random.normal(kc, (2048, 4), jnp.float32) / 2.0
    return (lambda x: b @ jnp.tanh(c @ x)), jnp.linspace(-1.0, 1.0, 4, dtype=jnp.float32)


def _temp_bytes(fun, *args):
    return jax.jit(fun).lower(*args).compile().memory_analysis().temp_size_in_bytes


def _budget_choices():
    (info,) = [c for c in caching.cache_info() if c.name == "fungrad.chunk_choices"]
    return info


def _last_chunk():
    return next(reversed(api._chunk_choices._entries.values()))[0][0]


@pytest.mark.parametrize("transform, example", [("jacfwd", _wide), ("jacrev", _tall)])
def test_a_budget_is_met_by_a_large_chunk_and_gives_its_result_exactly(transform, example):
    ours = getattr(fungrad, transform)
    if transform == "jacobian":
        ours = functools.partial(ours, mode="forward")
    f, x = example()
    budget = _temp_bytes(ours(f), x) // 8
    chosen = _temp_bytes(ours(f, memory_budget=budget), x)
    assert budget // 4 < chosen <= budget  # fits, and not far from the largest that does
    got = jax.jit(ours(f, memory_budget=budget))(x)
    assert 1 < _last_chunk() < 256
    # The program of the chosen chunk, exactly; the unchunked one to rounding (XLA picks
    # its matrix kernels by batch size, so products in small chunks may differ in the
    # last bits).
    assert _equal(got, jax.jit(ours(f, chunk_size=_last_chunk()))(x))
    assert_close(got, jax.jit(ours(f))(x), rtol=1e-5, atol=1e-6)
    assert_close(ours(f, memory_budget=budget)(x), jax.jacfwd(f)(x), rtol=1e-5, atol=1e-6)


def test_a_budget_for_a_pytree_function_with_aux_and_a_hessian():
    for transform in ("jacfwd", "jacrev"):
        ours = getattr(fungrad, transform)
        budget = max(_temp_bytes(ours(_f, argnums=(0, 1)), X, Y), 1)  # all at once fits
        got = jax.jit(ours(_f, argnums=(0, 1), memory_budget=budget))(X, Y)
        assert _equal(got, jax.jit(ours(_f, argnums=(0, 1)))(X, Y))
        g = lambda x: (jnp.sin(x), {"sum": jnp.sum(x)})  # noqa: E731
        budget = max(_temp_bytes(ours(g, has_aux=True), X), 1)
        assert_close(ours(g, has_aux=True, memory_budget=budget)(X),
                     getattr(jax, transform)(g, has_aux=True)(X))
    h = lambda x: jnp.sum(jnp.tanh(jnp.outer(x, x)) @ x)  # noqa: E731
    x = jnp.linspace(0.1, 1.0, 96)
    budget = _temp_bytes(fungrad.hessian(h), x) // 2
    assert _temp_bytes(fungrad.hessian(h, memory_budget=budget), x) <= budget
    assert_close(jax.jit(fungrad.hessian(h, memory_budget=budget))(x), jax.hessian(h)(x))


def test_the_choice_is_cached_by_program_and_shapes_never_stale():
    f, x = _wide()
    budget = _temp_bytes(fungrad.jacfwd(f), x) // 8
    jac = fungrad.jacfwd(f, memory_budget=budget)
    jac(x)
    before = _budget_choices()
    jac(x + 1.0)  # the same program and shapes: the choice is reused
    assert (_budget_choices().hits, _budget_choices().misses) == (before.hits + 1, before.misses)
    # Other shapes: a new choice, which fits them, and the right Jacobian.
    x2 = jnp.linspace(-1.0, 1.0, 128, dtype=jnp.float32)
    f2 = lambda z: f(jnp.concatenate([z, -z]))  # noqa: E731
    assert_close(fungrad.jacfwd(f2, memory_budget=budget)(x2), jax.jacfwd(f2)(x2),
                 rtol=1e-5, atol=1e-6)
    assert _budget_choices().misses == before.misses + 1
    assert _temp_bytes(fungrad.jacfwd(f2, memory_budget=budget), x2) <= budget
    # Other constants, the same program: the cached choice, the current constants' result.
    g = lambda z: 2.0 * f(z)  # noqa: E731
    h = lambda z: 3.0 * f(z)  # noqa: E731
    fungrad.jacfwd(g, memory_budget=budget)(x)
    assert_close(fungrad.jacfwd(h, memory_budget=budget)(x), jax.jacfwd(h)(x), rtol=1e-5, atol=1e-6)


def test_a_budget_below_one_product_runs_one_at_a_time_with_a_warning():
    f, x = _tall()
    with pytest.warns(UserWarning, match=r"even one product at a time \(chunk_size=1\) needs"):
        jac = fungrad.jacrev(f, memory_budget=64)(x)
    assert _equal(jac, fungrad.jacrev(f, chunk_size=1)(x))


def test_integer_inputs_chunked_as_unchunked():
    # jacrev with allow_int: the Jacobian for an integer input is zeros of its dtype, in
    # chunks too; jacfwd refuses integer inputs with or without chunks, as jax's does.
    f = lambda x, n: jnp.sin(x) * n  # noqa: E731
    x, n = jnp.linspace(0.1, 1.0, 7), jnp.arange(7)
    want = jax.jacrev(f, argnums=(0, 1), allow_int=True)(x, n)
    for kw in ({"chunk_size": 3}, {"memory_budget": 2000}):
        got = fungrad.jacrev(f, argnums=(0, 1), allow_int=True, **kw)
        assert_close(got(x, n), want)
        assert_close(jax.jit(got)(x, n), want)
        with pytest.raises(TypeError, match="jacfwd requires real-valued inputs"):
            fungrad.jacfwd(f, argnums=(0, 1), **kw)(x, n)


def test_choose_chunk_shrinks_until_the_measure_fits():
    # Linear up to 40, then a jump (as XLA's buffer assignment can make): the prediction
    # from chunks 1 and 2 (98) is too large, so smaller chunks are measured until one fits.
    calls = []

    def measure(k):
        calls.append(k)
        return 100 + 10 * k + (5000 if k > 40 else 0)

    k, m = api.choose_chunk(measure, 1000, 1100)
    assert m == measure(k) <= 1100 and 2 <= k <= 40
    assert api.choose_chunk(lambda k: 100 + k, 30, 10**6) == (30, 130)  # all at once fits
    assert api.choose_chunk(lambda k: 100 + k, 30, 50) == (1, 101)  # nothing fits


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "8"])
def test_memory_budget_must_be_a_positive_integer(bad):
    for transform in (fungrad.jacfwd, fungrad.jacrev, fungrad.hessian, fungrad.jacobian):
        with pytest.raises(ValueError, match="memory_budget must be a positive integer number"):
            transform(jnp.sin, memory_budget=bad)


def test_chunk_size_and_memory_budget_are_exclusive():
    for transform in (fungrad.jacfwd, fungrad.jacrev, fungrad.hessian, fungrad.jacobian):
        with pytest.raises(ValueError, match="pass chunk_size or memory_budget, not both"):
            transform(jnp.sin, chunk_size=4, memory_budget=1 << 20)
