"""Jacobians and Hessians in chunks of the basis: the same result, the memory of a chunk."""

import jax
import jax.numpy as jnp
import pytest

import fungrad
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
