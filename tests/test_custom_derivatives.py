"""custom_jvp / custom_vjp: the user's rules are honoured by fungrad's transforms and by jax's."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fungrad
from tests.harness import assert_close, check_all


@fungrad.custom_jvp
def safe_log1pexp(x):
    return jnp.log1p(jnp.exp(x))


@safe_log1pexp.defjvp
def _safe_log1pexp_jvp(primals, tangents):
    (x,), (x_dot,) = primals, tangents
    return safe_log1pexp(x), x_dot * jax.nn.sigmoid(x)


@fungrad.custom_jvp
def scaled_product(x, y):
    return x * y


scaled_product.defjvps(lambda x_dot, ans, x, y: 2.0 * x_dot * y,  # deliberately not the true JVP
                       lambda y_dot, ans, x, y: 3.0 * x * y_dot)


@fungrad.custom_vjp
def clip_gradient(lo, hi, x):
    return x


clip_gradient.defvjp(lambda lo, hi, x: (x, (lo, hi)),
                     lambda res, g: (None, None, jnp.clip(g, res[0], res[1])))


@functools.partial(fungrad.custom_vjp, nondiff_argnums=(0,))
def apply_scaled(scale, x):
    return scale * jnp.sin(x)


apply_scaled.defvjp(lambda scale, x: (apply_scaled(scale, x), jnp.cos(x)),
                    lambda scale, cos_x, g: (scale * cos_x * g * 10.0,))  # deliberately x10


@functools.partial(fungrad.custom_jvp, nondiff_argnums=(1,))
def power(x, n):
    return x**n


@power.defjvp
def _power_jvp(n, primals, tangents):
    (x,), (x_dot,) = primals, tangents
    return power(x, n), n * x ** (n - 1) * x_dot * 0.5  # deliberately halved


X = jnp.asarray([-3.0, -0.5, 0.0, 0.7, 40.0])


@pytest.mark.parametrize("transform", ["fungrad", "jax"])
def test_custom_jvp_rule_used_by_both_libraries(transform):
    grad = fungrad.grad if transform == "fungrad" else jax.grad
    got = grad(lambda x: jnp.sum(safe_log1pexp(x)))(X)
    assert_close(got, jax.nn.sigmoid(X))
    got = grad(lambda x, y: jnp.sum(scaled_product(x, y)), argnums=(0, 1))(X, 2 * X)
    assert_close(got, (2.0 * 2 * X, 3.0 * X))


def test_custom_jvp_all_modes_and_orders_match_jax():
    check_all(lambda x, y: safe_log1pexp(x) * scaled_product(x, y), (X, X[::-1]), fd=False)
    check_all(lambda x: power(x, 3), (X,), fd=False)


def test_custom_vjp_rule_honoured_in_reverse_mode():
    f = lambda x: jnp.sum(5.0 * clip_gradient(-1.0, 1.0, x))
    assert_close(fungrad.grad(f)(X), jax.grad(f)(X))
    g = lambda x: jnp.sum(apply_scaled(2.0, x))
    assert_close(fungrad.grad(g)(X), jax.grad(g)(X))
    assert_close(jax.jit(fungrad.grad(g))(X), jax.grad(g)(X))
    assert_close(fungrad.vjp(g, X)[1](1.0), jax.vjp(g, X)[1](1.0))


def test_jax_custom_rules_in_jax_nn_are_honoured():
    x = jnp.linspace(-2.0, 2.0, 7).at[3].set(0.0)
    for fn in (jax.nn.relu, jax.nn.relu6, jax.nn.silu, jax.nn.gelu, jax.nn.softplus,
               jax.nn.log_sigmoid, jax.nn.elu, jax.nn.celu, jax.nn.hard_tanh):
        f = lambda x, fn=fn: jnp.sum(fn(x) ** 2)
        assert_close(fungrad.grad(f)(x), jax.grad(f)(x), err_msg=fn.__name__)
        assert_close(fungrad.hessian(f)(x), jax.hessian(f)(x), err_msg=fn.__name__)


def test_jvp_of_custom_vjp_raises_like_jax():
    with pytest.raises(TypeError, match="can't apply forward-mode autodiff"):
        fungrad.jvp(lambda x: clip_gradient(-1.0, 1.0, x), (X,), (X,))
    with pytest.raises(TypeError, match="can't apply forward-mode autodiff"):
        jax.jit(lambda x: fungrad.jvp(lambda x: clip_gradient(-1.0, 1.0, x), (x,), (x,)))(X)


def test_symbolic_zeros_rule_sees_zero_tangents():
    seen = []

    @jax.custom_jvp
    def f(x, y):
        return x * y

    def f_jvp(primals, tangents):
        (x, y), (x_dot, y_dot) = primals, tangents
        seen.append((type(x_dot).__name__, type(y_dot).__name__))
        x_dot = jnp.zeros_like(x) if isinstance(x_dot, jax.custom_derivatives.SymbolicZero) else x_dot
        y_dot = jnp.zeros_like(y) if isinstance(y_dot, jax.custom_derivatives.SymbolicZero) else y_dot
        return f(x, y), x_dot * y + x * y_dot

    f.defjvp(f_jvp, symbolic_zeros=True)
    got = fungrad.grad(lambda x, y: jnp.sum(f(x, y)))(X, 2 * X)
    assert_close(got, 2 * X)
    assert any("SymbolicZero" in names[1] for names in seen)


def test_custom_vjp_closing_over_a_traced_argument():
    def outer(c, x):
        @jax.custom_vjp
        def f(x):
            return jnp.sin(x) * c

        f.defvjp(lambda x: (f(x), jnp.cos(x)), lambda cos_x, g: (g * cos_x * c * 2.0,))
        return jnp.sum(f(x))

    c = jnp.asarray(3.0)
    assert_close(fungrad.grad(outer, argnums=1)(c, X), jax.grad(outer, argnums=1)(c, X))
    assert_close(jax.jit(fungrad.grad(outer, argnums=1))(c, X), jax.grad(outer, argnums=1)(c, X))


def test_custom_vjp_with_respect_to_closed_over_value_is_an_error():
    def outer(c, x):
        @jax.custom_vjp
        def f(x):
            return x * c

        f.defvjp(lambda x: (f(x), None), lambda _, g: (g * c,))
        return jnp.sum(f(x))

    with pytest.raises(TypeError, match="closes over"):
        fungrad.grad(outer, argnums=(0, 1))(np.float32(2.0), X)
