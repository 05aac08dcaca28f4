"""The composition stress test: one derivative many ways, and each way equal to jax's.

After Autodidax: the same gradient through grad, jit∘grad, grad∘jit, jit∘grad∘jit, jvp
and vjp; the same Hessian through every pairing of forward and reverse mode; per-example
gradients under vmap; third derivatives by nesting grad.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fungrad
from tests.harness import assert_close


def _f(x):
    """Smooth, with jit, a custom_jvp (logsumexp) and a reduction inside."""
    y = jax.jit(lambda u: jnp.tanh(u) * jnp.sin(u) ** 2)(x)
    return jnp.sum(y * x) + jax.nn.logsumexp(x) + jnp.max(x * x)


def _jit(fun):
    """jax.jit with XLA's cheapest settings: compiling dominates these tests' run time."""
    return jax.jit(fun, compiler_options={"xla_backend_optimization_level": 0,
                                          "xla_llvm_disable_expensive_passes": True})


def _x(dtype):
    return jnp.asarray(np.random.default_rng(0).uniform(-1.0, 1.0, 4), dtype)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_gradient_every_way(dtype):
    x = _x(dtype)
    expected = jax.jit(jax.grad(_f))(x)
    e = jnp.eye(x.size, dtype=x.dtype)
    ways = {
        "grad": fungrad.grad(_f)(x),
        "jit(grad)": jax.jit(fungrad.grad(_f))(x),
        "grad(jit)": fungrad.grad(jax.jit(_f))(x),
        "jit(grad(jit))": jax.jit(fungrad.grad(jax.jit(_f)))(x),
        "value_and_grad": fungrad.value_and_grad(_f)(x)[1],
        "vjp": fungrad.vjp(_f, x)[1](jnp.ones((), x.dtype))[0],
        "jvp": fungrad.jvp(_f, (x,), (e[1],))[1],
        # one jvp per basis vector: the columns of the (1 x n) Jacobian
        "vmap(jvp)": jax.jit(jax.vmap(lambda v: fungrad.jvp(_f, (x,), (v,))[1]))(e),
        "linearize": jax.jit(jax.vmap(fungrad.linearize(_f, x)[1]))(e),
        "jacfwd": jax.jit(fungrad.jacfwd(_f))(x),
        "jacrev": jax.jit(fungrad.jacrev(_f))(x),
    }
    for name, got in ways.items():
        assert_close(got, expected[1] if name == "jvp" else expected, err_msg=name)


def test_hessian_every_way():
    x = _x("float64")
    expected = _jit(jax.hessian(_f))(x)
    g = fungrad.grad(_f)
    ways = {
        "jacfwd(jacrev)": fungrad.jacfwd(fungrad.jacrev(_f)),
        "jacrev(jacrev)": fungrad.jacrev(fungrad.jacrev(_f)),
        "jacfwd(jacfwd)": fungrad.jacfwd(fungrad.jacfwd(_f)),
        "jacrev(jacfwd)": fungrad.jacrev(fungrad.jacfwd(_f)),
        "jacfwd(grad)": fungrad.jacfwd(g),
        "hessian": fungrad.hessian(_f),
        "hvp": lambda x: jax.vmap(lambda v: fungrad.hvp(_f, (x,), (v,))[0])(jnp.eye(x.size)),
        "jvp(grad)": lambda x: jax.vmap(lambda v: fungrad.jvp(g, (x,), (v,))[1])(jnp.eye(x.size)),
        "vjp(grad)": lambda x: jax.vmap(lambda c: fungrad.vjp(g, x)[1](c)[0])(jnp.eye(x.size)),
    }
    for name, hess in ways.items():
        assert_close(_jit(hess)(x), expected, err_msg=name)
    assert_close(fungrad.hessian(_f)(x), expected, err_msg="hessian, eager")


def _loss(params, x, y):
    h = jnp.tanh(x @ params["w1"] + params["b1"])
    return (jnp.sum(h * params["w2"]) - y) ** 2


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_per_example_gradients(dtype):
    rng = np.random.default_rng(1)
    params = {"w1": rng.standard_normal((3, 4)), "b1": rng.standard_normal(4),
              "w2": rng.standard_normal(4)}
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), params)
    xs, ys = jnp.asarray(rng.standard_normal((5, 3)), dtype), jnp.asarray(rng.standard_normal(5), dtype)
    per_example = lambda grad: jax.vmap(grad(_loss), in_axes=(None, 0, 0))
    expected = per_example(jax.grad)(params, xs, ys)
    assert_close(per_example(fungrad.grad)(params, xs, ys), expected)
    assert_close(jax.jit(per_example(fungrad.grad))(params, xs, ys), expected)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_grad_of_grad_of_grad(dtype):
    f = lambda x: jnp.sin(x) * jnp.exp(x / 2) + x ** 4
    x = jnp.asarray(0.7, dtype)
    d3 = lambda grad: grad(grad(grad(f)))
    expected = d3(jax.grad)(x)
    assert_close(d3(fungrad.grad)(x), expected)
    assert_close(jax.jit(d3(fungrad.grad))(x), expected)
    # mixing fungrad's and jax's transforms in one nest
    assert_close(jax.grad(fungrad.grad(jax.grad(f)))(x), expected)
