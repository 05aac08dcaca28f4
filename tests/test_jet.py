"""Taylor mode (`fungrad.jet`): every rule family against nested jax.jvp and jax's jet."""

import importlib.util
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.experimental import jet as jax_jet

import fungrad
from fungrad._src import taylor
from tests.harness import assert_close

_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


# --- the reference: derivatives along the path by nested jax.jvp -------------------------

def _derivatives(g, order):
    """t -> [g(t), g'(t), ..., g^(order)(t)] by `order` nested jax.jvp (exponential cost)."""
    if order == 0:
        return lambda t: [g(t)]
    lower = _derivatives(g, order - 1)

    def fun(t):
        outs, dots = jax.jvp(lower, (t,), (jnp.ones_like(t),))
        return [*outs, dots[-1]]

    return fun


def nested_jvp_jet(f, primals, series):
    """What jet returns, from nested jax.jvp along x(t) = x + sum_k s_k t^k / k!."""
    order = len(series[0])

    def g(t):
        path = [jax.tree_util.tree_map(
            lambda x, *s: x + sum(s[k] * t ** (k + 1) / math.factorial(k + 1) for k in range(order)),
            x, *terms) for x, terms in zip(primals, series, strict=True)]
        return jax.tree_util.tree_leaves(f(*path))

    leaves = jax.jit(_derivatives(g, order), compiler_options=_FAST_COMPILE)(jnp.float64(0.0))
    tree = jax.tree_util.tree_structure(f(*primals))
    out = jax.tree_util.tree_unflatten(tree, leaves[0])
    terms = [[leaves[k][i] for k in range(1, order + 1)] for i in range(tree.num_leaves)]
    return out, jax.tree_util.tree_unflatten(tree, terms)


def _series(primals, order, seed=0):
    rng = np.random.default_rng(seed)
    return tuple(tuple(jax.tree_util.tree_map(lambda x: jnp.asarray(rng.standard_normal(np.shape(x)),
                                                                    jnp.result_type(x)), p)
                       for _ in range(order)) for p in primals)


def _check(f, primals, order=3, rtol=1e-10, seed=0, against_jax_jet=False):
    series = _series(primals, order, seed)
    ours = fungrad.jet(f, primals, series)
    assert_close(ours, nested_jvp_jet(f, primals, series), rtol=rtol, atol=rtol)
    if against_jax_jet:
        assert_close(ours, jax_jet.jet(f, primals, series), rtol=rtol, atol=rtol)
    return ours


# --- one spec per rule family --------------------------------------------------------------

A = jnp.linspace(0.2, 0.9, 6).reshape(2, 3)
B = jnp.linspace(-0.8, 1.1, 6).reshape(2, 3)
M = jnp.linspace(-1.0, 1.0, 12).reshape(3, 4)
IDX = jnp.array([2, 0, 1])

FAMILIES = {
    "add_sub_neg_mul_div": (lambda x, y: (x * y - x / (y + 2.0) + (-x), y / 3.0), (A, B)),
    "exp_log_expm1_log1p": (lambda x: jnp.exp(x) + jnp.log(x) * jnp.expm1(x) - jnp.log1p(x), (A,)),
    "sin_cos_tan": (lambda x: jnp.sin(x) * jnp.cos(2 * x) + jnp.tan(x), (A,)),
    "tanh_logistic_sinh_cosh": (lambda x: jnp.tanh(x) + jax.nn.sigmoid(x) * jnp.sinh(x) / jnp.cosh(x), (B,)),
    "sqrt_rsqrt_cbrt": (lambda x: jnp.sqrt(x) + lax.rsqrt(x) + jnp.cbrt(x), (A,)),
    "pow": (lambda x, y: x ** y + x ** 2.5 + 1.5 ** y, (A, B)),
    "integer_pow_square": (lambda x: x ** 3 + x ** -2 + jnp.square(x) + lax.integer_pow(x, 0), (A,)),
    "integer_pow_at_zero": (lambda x: x ** 4 + x ** 2, (jnp.zeros(3),)),
    "abs_sign_max_min": (lambda x, y: jnp.abs(x - 0.5) + jnp.maximum(x, y) * jnp.minimum(x, y)
                         + jnp.sign(x - 0.5), (A, B)),
    "max_ties": (lambda x, y: jnp.maximum(x, y) + jnp.minimum(x, 0.3), (A, A)),
    "erf": (lambda x: lax.erf(x) * x, (B,)),
    "structural": (lambda x: jnp.concatenate([x.T.reshape(6, 1)[1:4], jnp.pad(x, 1)[:3, :1]])
                   * jnp.broadcast_to(x[0, :1], (6, 1)), (A,)),
    "gather_scatter": (lambda x: x[:, IDX] + jnp.zeros((2, 3)).at[:, IDX].add(x ** 2), (A,)),
    "dynamic_slice_update": (lambda x, i: lax.dynamic_update_slice(
        x, lax.dynamic_slice(x ** 2, (0, i), (2, 1)), (0, 0)), (A, 1)),
    "select_n_convert_complex": (lambda x: jnp.where(x > 0.5, jnp.sin(x), (x.astype(jnp.complex128)
                                                                          * (1 + 2j)).real ** 2), (A,)),
    "reduce_sum_cumsum": (lambda x: jnp.cumsum(jnp.sin(x), axis=1).sum(0) + x.sum(), (A,)),
    "dot_general": (lambda x, m: jnp.tanh(x @ m) @ m.T, (A, M)),
    "reduce_max_argmax": (lambda x: jnp.max(jnp.sin(x), axis=1) + x[0, jnp.argmax(x[0])], (B,)),
    "complex_abs_via_fallback": (lambda x: jnp.abs(x + 1j * x ** 2), (A,)),
}


@pytest.mark.parametrize("name", list(FAMILIES))
def test_rule_family_against_nested_jvp(name):
    f, args = FAMILIES[name]
    primals = tuple(a for a in args if not isinstance(a, int))
    g = (lambda x: f(x, 1)) if name == "dynamic_slice_update" else f
    _check(g, primals, order=2 if name == "complex_abs_via_fallback" else 3)


def test_against_jax_jet_at_order_five():
    def f(x, y):
        z = jnp.sin(x) * jnp.exp(y) / (1.0 + x ** 2) + jnp.tanh(x @ M.T[:3, :3]) + jnp.log(x + 2)
        return jnp.sqrt(jnp.abs(z) + 1.0) + lax.erf(y) + jnp.max(z, axis=0) ** 3

    primals = (A, B)
    series = _series(primals, 5)
    theirs = jax.jit(lambda p, s: jax_jet.jet(f, p, s), compiler_options=_FAST_COMPILE)(primals, series)
    assert_close(fungrad.jet(f, primals, series), theirs, rtol=1e-11, atol=1e-11)


# Order 6 holds the terms of order 5 (truncation leaves the lower terms as they are).
@pytest.mark.parametrize("order", [1, 2, 3, 4, pytest.param(6, marks=pytest.mark.slow)])
def test_orders_one_to_six_against_nested_jvp(order):
    def f(x, y):
        return {"a": jnp.sin(x * y) / (2.0 + y), "b": jnp.exp(x).sum() * x[0]}

    _check(f, (B[0], A[1]), order=order)


def test_pytree_inputs_and_order_zero():
    f = lambda p: p["w"] * jnp.sin(p["b"])
    p = {"w": A, "b": B}
    _check(f, (p,), order=2)
    out, series = fungrad.jet(f, (p,), ((),))
    assert_close(out, f(p))
    assert series == []


def test_outputs_that_carry_no_series():
    f = lambda x: (x, jnp.ones(2), jnp.argmax(x), 2.0)
    out, series = fungrad.jet(f, (A[0],), ((A[1], A[0]),))
    assert_close(out, jax.tree_util.tree_map(jnp.asarray, f(A[0])))
    assert_close(series, ([A[1], A[0]], [jnp.zeros(2)] * 2, [jnp.zeros((), int)] * 2,
                          [jnp.zeros(())] * 2))


def test_float32_stays_float32():
    x = A.astype(jnp.float32)
    out, series = fungrad.jet(jnp.sin, (x,), ((jnp.ones_like(x), jnp.zeros_like(x)),))
    assert out.dtype == series[0].dtype == series[1].dtype == jnp.float32
    assert_close(series[1], -jnp.sin(x), rtol=1e-6, atol=1e-6)


# --- the generic rule from the JVP --------------------------------------------------------

def _primitives(jaxpr):
    """Every primitive of `jaxpr` and of the jaxprs nested in its equations."""
    found = set()
    for eqn in jaxpr.eqns:
        found.add(eqn.primitive)
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else [param]:
                if isinstance(sub, (jax.extend.core.ClosedJaxpr, jax.extend.core.Jaxpr)):
                    found |= _primitives(getattr(sub, "jaxpr", sub))
    return found


@pytest.mark.parametrize("fun, prim", [
    (lax.lgamma, lax.lgamma_p), (lax.erf_inv, lax.erf_inv_p), (jnp.arctan, lax.atan_p),
    (jax.scipy.special.digamma, lax.digamma_p), (lambda x: jnp.cumprod(x, axis=1), lax.cumprod_p),
    (lambda x: lax.clamp(0.3, x, 0.6), lax.clamp_p)])
def test_primitives_without_a_taylor_rule_fall_back_on_their_jvp(fun, prim):
    assert prim in _primitives(jax.make_jaxpr(fun)(A).jaxpr) and prim not in taylor.taylor_rules
    _check(fun, (A * 0.9,), order=3)


def test_the_fallback_equals_the_rule(monkeypatch):
    x = A
    series = _series((x,), 5)
    with_rules = fungrad.jet(lambda x: jnp.tanh(jnp.sin(x) * x), (x,), series)
    monkeypatch.delitem(taylor.taylor_rules, lax.sin_p)
    monkeypatch.delitem(taylor.taylor_rules, lax.tanh_p)
    monkeypatch.delitem(taylor.taylor_rules, lax.mul_p)
    assert_close(fungrad.jet(lambda x: jnp.tanh(jnp.sin(x) * x), (x,), series), with_rules)


# --- primitives that hold jaxprs ----------------------------------------------------------

def _scan_fun(x, y):
    def body(c, xi):
        c = jnp.sin(c) * y + xi
        return c, c ** 2

    c, ys = lax.scan(body, x[0], x, reverse=True)
    k = lax.fori_loop(0, 3, lambda i, k: k * jnp.cos(k) + y.sum(), 0.5)  # the carry's series starts at zero
    return c + ys.sum(0) + k


def _cond_fun(x, y):
    one = lax.cond(x.sum() > 0, lambda a: jnp.sin(a) * y, lambda a: a * 2.0, x)
    two = lax.switch(1, [jnp.exp, jnp.tanh, lambda a: y], x)
    return one + two


def _while_fun(x):
    return lax.while_loop(lambda c: c[1] < 3, lambda c: (jnp.sin(c[0]) + c[0] ** 2, c[1] + 1), (x, 0))[0]


@jax.custom_jvp
def _wrong_sin(x):
    return jnp.sin(x)


# The rule says sin' = 2 cos: a derivative that is not the implementation's, on purpose.
_wrong_sin.defjvp(lambda primals, tangents: (_wrong_sin(primals[0]), 2 * jnp.cos(primals[0]) * tangents[0]))


@jax.custom_vjp
def _cvjp(x):
    return jnp.sin(x) * x


_cvjp.defvjp(lambda x: (_cvjp(x), x), lambda x, ct: (ct * (jnp.cos(x) * x + jnp.sin(x)),))

CONTROL = {
    "jit": (jax.jit(lambda x, y: jnp.sin(x) * jax.jit(jnp.exp)(y)), (A, B)),
    "checkpoint": (jax.checkpoint(lambda x, y: jnp.sin(jnp.sin(x) * y)), (A, B)),
    "scan_fori": (_scan_fun, (A, B[0])),
    "cond_switch": (_cond_fun, (A, B)),
    "while": (_while_fun, (B,)),
    "custom_jvp_nn": (lambda x: jax.nn.relu(x) + jax.nn.softplus(x) + jax.nn.logsumexp(x, axis=1)[0],
                      (B,)),
    "custom_jvp_rule_is_used": (lambda x: _wrong_sin(x) * x, (A,)),
    "custom_vjp_implementation": (_cvjp, (A,)),
}


@pytest.mark.parametrize("name", list(CONTROL))
def test_higher_order_primitives_against_nested_jvp(name):
    f, primals = CONTROL[name]
    if name == "custom_vjp_implementation":  # jax refuses forward mode here: its implementation
        series = _series(primals, 3)
        assert_close(fungrad.jet(f, primals, series),
                     nested_jvp_jet(lambda x: jnp.sin(x) * x, primals, series))
        return
    _check(f, primals, order=3)


def test_custom_jvp_rule_differs_from_jax_jet_which_ignores_it():
    series = _series((A,), 2)
    ours = fungrad.jet(_wrong_sin, (A,), series)
    assert_close(ours[1][0], 2 * jnp.cos(A) * series[0][0])
    # jax's jet differentiates the implementation (here it even fails on the rule's closure).
    implementation = jax_jet.jet(jnp.sin, (A,), series)
    assert not np.allclose(ours[1][0], implementation[1][0])


def test_control_flow_stays_control_flow():
    f = lambda x: _scan_fun(x, B[0]) + _while_fun(x) + _cond_fun(x, B)
    jaxpr = jax.make_jaxpr(lambda x, s: fungrad.jet(f, (x,), ((s, s),)))(A, A)
    names = {e.primitive.name for e in jaxpr.jaxpr.eqns}
    assert {"scan", "while", "cond"} <= names


# --- composition, cost, symbolic zeros ----------------------------------------------------

def test_under_jit_and_vmap():
    f = lambda x: jnp.sin(x) * jnp.exp(x[::-1])
    series = _series((A,), 3)
    eager = fungrad.jet(f, (A,), series)
    assert_close(jax.jit(lambda x, s: fungrad.jet(f, (x,), (s,)))(A, series[0]), eager)
    batched = jax.vmap(lambda x, s: fungrad.jet(f, (x,), (s,)))(A, series[0])
    for i in range(2):
        row = fungrad.jet(f, (A[i],), (tuple(s[i] for s in series[0]),))
        assert_close(jax.tree_util.tree_map(lambda u, i=i: u[i], batched), row)


def test_constants_carry_no_series():
    c = jnp.arange(3.0)
    f = lambda x: x * jnp.exp(jnp.sin(c))  # the constant's sin and exp run once, on primals only
    jaxpr = jax.make_jaxpr(lambda x, s: fungrad.jet(f, (x,), ((s, s, s),)))(c, c)
    counts = [str(e.primitive) for e in jaxpr.jaxpr.eqns]
    assert counts.count("exp") == 1 and counts.count("sin") == 1


def _num_eqns(order, fun):
    x = jnp.ones(3)
    return len(jax.make_jaxpr(lambda s: fungrad.jet(fun, (x,), ((s,) * order,)))(x).jaxpr.eqns)


def test_cost_is_polynomial_in_the_order():
    for fun in (lambda x: jnp.tanh(jnp.sin(x) * x), lax.lgamma):  # a rule, and the fallback
        small, large = _num_eqns(4, fun), _num_eqns(8, fun)
        assert large < 6 * small, (small, large)  # quadratic (rules) / cubic (fallback) growth, not 2^4


def test_no_jax_differentiation_under_the_guard(monkeypatch):
    from tests.test_guard import ForbiddenCall, guard

    def f(x):  # Taylor rules, a custom_jvp rule, the generic rule (lgamma), a scan
        y = jax.nn.softplus(jnp.sin(x)) * lax.lgamma(x + 1.0)
        return lax.scan(lambda c, r: (c * jnp.tanh(r), c), y[0], y)[0]

    series = _series((A,), 3)
    expected = nested_jvp_jet(f, (A,), series)

    def forbidden(*args, **kwargs):
        raise ForbiddenCall("fungrad used jax.experimental.jet")

    monkeypatch.setattr(jax_jet, "jet", forbidden)
    with guard():
        actual = fungrad.jet(f, (A,), series)
    assert_close(actual, expected)


# --- errors -------------------------------------------------------------------------------

@pytest.mark.parametrize("args, error, match", [
    ((1.0, (1.0,), ((1.0,),)), TypeError, "expected a callable"),
    ((jnp.sin, 1.0, ((1.0,),)), TypeError, "primals must be a tuple or a list"),
    ((jnp.sin, (1.0,), (1.0,)), TypeError, r"series\[0\] must be a tuple or list"),
    ((jnp.sin, (1.0,), ((1.0,), (2.0,))), ValueError, "one entry per primal"),
    ((jnp.add, (1.0, 2.0), ((1.0,), (1.0, 2.0))), ValueError, "same number of series terms"),
    ((jnp.sin, (jnp.ones(2),), ((jnp.ones(3),),)), ValueError, r"series\[0\]\[0\] has shape"),
    ((jnp.sin, (jnp.ones(2),), ((jnp.ones(2, jnp.int32),),)), TypeError, r"series\[0\]\[0\] has dtype"),
    ((jnp.sin, (jnp.ones(2, jnp.int32),), ((jnp.ones(2),),)), TypeError, "need floating inputs"),
    ((jnp.sin, ({"a": 1.0},), (({"b": 1.0},),)), TypeError, "same tree structure"),
])
def test_bad_input_is_named(args, error, match):
    with pytest.raises(error, match=match):
        fungrad.jet(*args)


# --- the example --------------------------------------------------------------------------

def test_taylor_ode_example_runs_and_is_accurate():
    path = pathlib.Path(__file__).resolve().parent.parent / "examples" / "taylor_ode.py"
    spec = importlib.util.spec_from_file_location("examples_taylor_ode", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    err = module.main(steps=50, order=8, t_end=0.5, print_fn=lambda *a: None)
    assert err < 1e-7

