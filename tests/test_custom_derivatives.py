"""custom_jvp / custom_vjp: the user's rules are honoured by fungrad's transforms and by jax's."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fungrad
from fungrad._src import jaxutil
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


def test_forward_mode_of_a_custom_vjp_whose_bwd_is_not_linear_is_refused():
    # clip_gradient's bwd clips the cotangent: its transpose is no JVP (jax refuses every
    # custom_vjp in forward mode; fungrad refuses only these, and says why).
    message = "is not linear in the cotangent"
    f = lambda x: clip_gradient(-1.0, 1.0, x)  # noqa: E731
    with pytest.raises(TypeError, match=message):
        fungrad.jvp(f, (X,), (X,))
    with pytest.raises(TypeError, match=message):
        jax.jit(lambda x: fungrad.jvp(f, (x,), (x,)))(X)
    with pytest.raises(TypeError, match="custom_jvp rule for forward mode"):
        fungrad.jacfwd(f)(X)


@jax.custom_vjp
def _sin_times(x, y):
    return jnp.sin(x) * y


_sin_times.defvjp(lambda x, y: (_sin_times(x, y), (jnp.cos(x), jnp.sin(x), y)),
                  lambda r, g: (g * r[0] * r[2], g * r[1]))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _scaled_tree(scale, tree):
    return {"a": scale * jnp.tanh(tree["a"]), "b": tree["b"] ** 2}


def _scaled_tree_fwd(scale, tree):
    return _scaled_tree(scale, tree), tree


def _scaled_tree_bwd(scale, tree, ct):
    return ({"a": scale * ct["a"] / jnp.cosh(tree["a"]) ** 2, "b": 2 * tree["b"] * ct["b"]},)


_scaled_tree.defvjp(_scaled_tree_fwd, _scaled_tree_bwd)


def _plain_sin_times(x, y):
    return jnp.sin(x) * y


def _plain_scaled_tree(scale, tree):
    return {"a": scale * jnp.tanh(tree["a"]), "b": tree["b"] ** 2}


def test_forward_mode_through_custom_vjp_by_transposing_bwd():
    # jax refuses these; fungrad's forward mode equals jax's on the same function without
    # the custom rule (the rules here are the true derivatives), every order and mode.
    y = X[::-1] + 1.0
    tangents = (X * 0.5 + 0.25, y * -0.3)
    for ours in (fungrad.jvp, jax.jit(fungrad.jvp, static_argnums=0)):
        assert_close(ours(_sin_times, (X, y), tangents),
                     jax.jvp(_plain_sin_times, (X, y), tangents))
    _, f_jvp = fungrad.linearize(_sin_times, X, y)
    assert_close(f_jvp(*tangents), jax.jvp(_plain_sin_times, (X, y), tangents)[1])
    assert_close(fungrad.jacfwd(_sin_times, argnums=(0, 1))(X, y),
                 jax.jacfwd(_plain_sin_times, argnums=(0, 1))(X, y))
    loss = lambda f: (lambda x: jnp.sum(f(x, y) ** 2))  # noqa: E731
    assert_close(fungrad.hessian(loss(_sin_times))(X), jax.hessian(loss(_plain_sin_times))(X))
    assert_close(fungrad.jacfwd(fungrad.jacfwd(loss(_sin_times)))(X),
                 jax.hessian(loss(_plain_sin_times))(X))  # forward over forward
    assert_close(jax.vmap(lambda t: fungrad.jvp(_sin_times, (X, y), (t, y))[1])(jnp.stack([X, y])),
                 jax.vmap(lambda t: jax.jvp(_plain_sin_times, (X, y), (t, y))[1])(jnp.stack([X, y])))


def test_forward_mode_through_custom_vjp_with_nondiff_argnums_and_pytrees():
    tree = {"a": X, "b": X[::-1]}
    t_tree = {"a": X * 0.1 + 1.0, "b": -X}
    got = fungrad.jvp(lambda t: _scaled_tree(3.0, t), (tree,), (t_tree,))
    assert_close(got, jax.jvp(lambda t: _plain_scaled_tree(3.0, t), (tree,), (t_tree,)))
    assert_close(fungrad.jacfwd(lambda t: _scaled_tree(3.0, t))(tree),
                 jax.jacfwd(lambda t: _plain_scaled_tree(3.0, t))(tree))


def test_forward_and_reverse_mode_of_a_custom_vjp_are_adjoint():
    # <u, J v> = <J^T u, v>, with J v from fungrad's forward mode and J^T u from the bwd.
    rng = np.random.default_rng(0)
    y, u, v = (jnp.asarray(rng.standard_normal(X.shape), X.dtype) for _ in range(3))
    jv = fungrad.jvp(lambda x: _sin_times(x, y), (X,), (v,))[1]
    (jtu,) = fungrad.vjp(lambda x: _sin_times(x, y), X)[1](u)
    np.testing.assert_allclose(jnp.vdot(u, jv), jnp.vdot(jtu, v), rtol=1e-5)


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


# --- forward mode through a bwd that calls custom functions --------------------------------

@jax.custom_vjp
def _matvec(a, v):
    return a @ v


_matvec.defvjp(lambda a, v: (a @ v, (a, v)), lambda r, g: (jnp.outer(g, r[1]), r[0].T @ g))


@jax.custom_jvp
def _double(x):
    return 2.0 * x


_double.defjvp(lambda p, t: (_double(p[0]), 5.0 * t[0]))  # deliberately not the true JVP


_halve_gradient = jax.custom_vjp(lambda x: x)  # as optax.scale_gradient(x, 0.5)
_halve_gradient.defvjp(lambda x: (x, None), lambda _, g: (g * 0.5,))


@jax.custom_vjp
def _nested(a, x):
    return a @ jnp.sin(x)


def _nested_bwd(r, g):
    a, x = r
    # Linear in g through a custom_vjp, a custom_jvp and a scale_gradient-like call: each
    # is transposed as what it computes (g -> a^T g, g -> 2 g, g -> g), not by its rule.
    g_x = _halve_gradient(_matvec(a.T, _double(g))) * jnp.cos(x) / 2.0
    return jnp.outer(g, jnp.sin(x)), g_x


_nested.defvjp(lambda a, x: (_nested(a, x), (a, x)), _nested_bwd)


def _plain_nested(a, x):
    return a @ jnp.sin(x)


def _random(*shapes, seed=0):
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.standard_normal(s)) for s in shapes]


def test_forward_mode_through_a_bwd_that_calls_linear_custom_functions():
    a, x, a_dot, x_dot = _random((3, 4), (4,), (3, 4), (4,))
    got = fungrad.jvp(_nested, (a, x), (a_dot, x_dot))
    assert_close(got, jax.jvp(_plain_nested, (a, x), (a_dot, x_dot)), rtol=1e-12)
    (u,) = _random(3, seed=1)
    a_bar, x_bar = jax.vjp(_nested, a, x)[1](u)  # <u, J v> = <J^T u, v>, J^T by the rules
    np.testing.assert_allclose(jnp.vdot(u, got[1]), jnp.vdot(a_bar, a_dot) + jnp.vdot(x_bar, x_dot),
                               rtol=1e-12)
    loss = lambda x: jnp.sum(_nested(a, x) ** 2)  # noqa: E731
    # Forward over reverse differentiates the bwd itself, so the deliberately untrue rules
    # of the functions it calls count: as jax's reverse over reverse (finite differences
    # of the gradient would not see them). Forward over forward differentiates the
    # transposed bwd, which holds what they compute: the true Hessian.
    assert_close(fungrad.hvp(loss, (x,), (x_dot,))[0], jax.jacrev(jax.grad(loss))(x) @ x_dot,
                 rtol=1e-12)
    plain_loss = lambda x: jnp.sum(_plain_nested(a, x) ** 2)  # noqa: E731
    assert_close(fungrad.jacfwd(fungrad.jacfwd(loss))(x), jax.hessian(plain_loss)(x), rtol=1e-12)


def test_forward_mode_of_a_bwd_calling_a_nonlinear_custom_function_is_refused():
    @jax.custom_vjp
    def f(x):
        return jnp.exp(x)

    f.defvjp(lambda x: (f(x), x), lambda x, g: (_sin_times(g, jnp.exp(x)),))
    with pytest.raises(TypeError, match="applies `sin` inside the custom_vjp function "
                                        "`_sin_times` to it .*its own program"):
        fungrad.jvp(f, (X,), (X,))

    g = jax.custom_vjp(lambda x: x)
    g.defvjp(lambda x: (x, None), lambda _, ct: (jax.nn.relu(ct),))
    with pytest.raises(TypeError, match="inside the custom_jvp function `relu`"):
        fungrad.jvp(g, (X,), (X,))


def test_forward_mode_of_odeint_is_refused_with_the_reason():
    from jax.experimental.ode import odeint

    def solve(y0):
        return odeint(lambda y, t, k: -k * y, y0, jnp.asarray([0.0, 1.0]), 0.5)[-1]

    y0 = jnp.asarray([1.0, 2.0])
    with pytest.raises(TypeError, match="(?s)_odeint_rev.*inside the custom_vjp function `_odeint`"
                                        ".*odeint is linear in its initial state only to its tolerance"):
        fungrad.jvp(solve, (y0,), (y0,))


def test_forward_mode_of_a_bwd_returning_a_constant_is_refused():
    f = jax.custom_vjp(lambda x, s: x * s)
    f.defvjp(lambda x, s: (x * s, s), lambda s, g: (g * s, s))  # s: a state passed as "gradient"
    with pytest.raises(TypeError, match="returns for input 1 .* does not depend on the cotangent"):
        fungrad.jvp(f, (X, 2.0), (X, 1.0))
    assert_close(fungrad.jvp(lambda x: f(x, 2.0), (X,), (X,)), (2.0 * X, 2.0 * X))


# --- symbolic zeros in forward mode ------------------------------------------------------

def _two_outputs_with_symbolic_zeros(seen):
    @jax.custom_vjp
    def f(x, y):
        return jnp.sin(x) * y, jnp.exp(x)

    def fwd(x, y):
        seen.append(("fwd", x.perturbed, y.perturbed))
        return f(x.value, y.value), (x.value, y.value)

    def bwd(r, cts):
        (x, y), (a, b) = r, cts
        seen.append(("bwd", *(type(ct).__name__ for ct in cts)))
        a_zero, b_zero = (isinstance(ct, jax.custom_derivatives.SymbolicZero) for ct in cts)
        g_x = (0.0 if a_zero else a * jnp.cos(x) * y) + (0.0 if b_zero else b * jnp.exp(x))
        return g_x, jnp.zeros_like(y) if a_zero else a * jnp.sin(x)

    f.defvjp(fwd, bwd, symbolic_zeros=True)
    return f


def test_forward_mode_of_a_symbolic_zeros_custom_vjp():
    seen: list = []
    f = _two_outputs_with_symbolic_zeros(seen)
    plain = lambda x, y: (jnp.sin(x) * y, jnp.exp(x))  # noqa: E731
    x, y, v = _random(4, 4, 4)
    for argnum in (0, 1):  # the other input's tangent is a symbolic zero
        ours = fungrad.jvp(lambda z: f(*((z, y) if argnum == 0 else (x, z))), ((x, y)[argnum],), (v,))
        ref = jax.jvp(lambda z: plain(*((z, y) if argnum == 0 else (x, z))), ((x, y)[argnum],), (v,))
        assert_close(ours, ref, rtol=1e-12)
    assert ("fwd", True, False) in seen and ("fwd", False, True) in seen
    # Reverse mode with one output unused: its cotangent reaches bwd as a SymbolicZero; the
    # forward mode of the same function is its adjoint.
    u = _random(4, seed=1)[0]
    (jtu,) = jax.vjp(lambda x: f(x, y)[1], x)[1](u)
    assert_close(fungrad.vjp(lambda x: f(x, y)[1], x)[1](u), (jtu,), rtol=1e-12)
    assert ("bwd", "SymbolicZero", "ArrayImpl") in seen
    jv = fungrad.jvp(lambda x: f(x, y)[1], (x,), (v,))[1]
    np.testing.assert_allclose(jnp.vdot(u, jv), jnp.vdot(jtu, v), rtol=1e-12)
    assert_close(fungrad.hessian(lambda x: jnp.sum(f(x, y)[0]))(x),
                 jax.hessian(lambda x: jnp.sum(plain(x, y)[0]))(x), rtol=1e-12)


# --- source lines of the equations a custom_jvp rule emits -------------------------------

def test_equations_of_custom_jvp_rules_carry_the_users_line():
    def lines(fun, x):
        jaxpr = jax.make_jaxpr(fun)(x).jaxpr
        return {str(eqn.primitive): jaxutil.source_line(eqn) for eqn in jaxpr.eqns}

    x = jnp.linspace(-1.0, 1.0, 5)
    for fun in (fungrad.grad(lambda x: jnp.sum(jax.nn.relu(x) * 3.0)),
                fungrad.grad(lambda x: jnp.sum(jax.nn.softmax(x) * x[::-1])),
                fungrad.grad(lambda x: jnp.sum(jax.nn.relu(x) * x))):
        found = lines(fun, x)
        assert found and all(__file__ in line for prim, line in found.items()
                             if prim != "add"), found
    # The sum of two cotangents of `x` (used twice) is the transpose pass's own equation.
    found = lines(fungrad.grad(lambda x: jnp.sum(jax.nn.relu(x) * 3.0)), x)
    assert all(__file__ in line for line in found.values()), found
