"""fungrad.debug_nans: a non-finite derivative names the rule, the user's line and the fix."""

import inspect
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import fungrad
from tests.harness import assert_close

# --- the patterns: each marks the line the report must name ----------------------------


def where_sqrt(x):
    return jnp.where(x > 0, jnp.sqrt(x), 0.0)  # <culprit>


def where_log(x):
    return jnp.where(x > 0, jnp.log(x), 0.0)  # <culprit>


def where_div(x):
    return jnp.where(x != 0, 1.0 / x, 0.0)  # <culprit>


def norm_at_0(x):
    return jnp.linalg.norm(x) * jnp.ones_like(x)  # <culprit>


def sqrt_at_0(x):
    return jnp.sqrt(x)  # <culprit>


# name -> (function, primitive, what the report says of the forward value, fix text)
PATTERNS = {
    "where_sqrt": (where_sqrt, "sqrt", "forward value is finite", 'the "double where"'),
    "where_log": (where_log, "log", "forward value is already non-finite", 'the "double where"'),
    "where_div": (where_div, "div", "forward value is already non-finite", 'the "double where"'),
    "norm_at_0": (norm_at_0, "sqrt", "forward value is finite", "a norm"),
    "sqrt_at_0": (sqrt_at_0, "sqrt", "forward value is finite", "`sqrt` at 0"),
}
# The masked patterns are finite in forward mode: the mask selects the finite tangent.
FORWARD_NAN = ("norm_at_0", "sqrt_at_0")

X = jnp.array([1.0, 0.0, 4.0])  # entry 1 is the unsafe point
X_NORM = jnp.zeros(3)


def _culprit_line(fun):
    lines, start = inspect.getsourcelines(fun)
    offset = next(i for i, line in enumerate(lines) if "# <culprit>" in line)
    return f"{inspect.getsourcefile(fun)}:{start + offset}:"


def _nest(kind, g):
    """`g` (elementwise on a vector) inside a scan over the entries, a cond, or a checkpoint."""
    if kind == "none":
        return g
    if kind == "scan":
        return lambda x: lax.scan(lambda c, xi: (c, g(xi[None])[0]), 0.0, x)[1]
    if kind == "cond":
        return lambda x: lax.cond(jnp.sum(x) > -1.0, g, jnp.zeros_like, x)
    assert kind == "checkpoint"
    return jax.checkpoint(g)


_INSIDE = {"none": "", "scan": "iteration 1 of the lax.scan", "cond": "branch 1 of the lax.cond",
           "checkpoint": "the jax.checkpoint"}


def _point(name, kind):
    # A norm is 0 at the zero vector: the whole vector, or in a scan over entries, entry 1.
    return X_NORM if name == "norm_at_0" and kind != "scan" else X


def _check_report(message, name, kind):
    fun, prim, forward, fix = PATTERNS[name]
    assert f"of `{prim}`" in message
    assert _culprit_line(fun) in message
    assert forward in message
    assert fix in message
    assert _INSIDE[kind] in message


def _reverse(transform, f):
    if transform == "grad":
        return fungrad.grad(lambda x: jnp.sum(f(x)))
    return fungrad.jacrev(f)


# --- reverse mode: grad everywhere, jacrev (vmapped pullbacks) on a subset --------------


@pytest.mark.parametrize("kind", ["none", "scan", "cond", "checkpoint"])
@pytest.mark.parametrize("name", list(PATTERNS))
def test_grad_names_the_rule_line_and_fix(name, kind):
    f = _nest(kind, PATTERNS[name][0])
    x = _point(name, kind)
    plain = fungrad.grad(lambda x: jnp.sum(f(x)))(x)
    assert_close(plain, jax.grad(lambda x: jnp.sum(f(x)))(x))  # off: jax's nan, no error
    assert not np.all(np.isfinite(plain))
    with fungrad.debug_nans(), pytest.raises(fungrad.NonFiniteDerivativeError) as err:
        fungrad.grad(lambda x: jnp.sum(f(x)))(x)
    _check_report(str(err.value), name, kind)
    assert "reverse mode" in str(err.value)


@pytest.mark.parametrize("kind", ["none", "scan"])
@pytest.mark.parametrize("name", ["where_sqrt", "norm_at_0", "where_div"])
def test_jacrev(name, kind):
    f = _nest(kind, PATTERNS[name][0])
    with fungrad.debug_nans(), pytest.raises(fungrad.NonFiniteDerivativeError) as err:
        fungrad.jacrev(f)(_point(name, kind))
    _check_report(str(err.value), name, kind)


# --- forward mode ---------------------------------------------------------------------


@pytest.mark.parametrize(("name", "kind"), [
    *((name, kind) for name in FORWARD_NAN for kind in ("none", "scan", "cond", "checkpoint")),
    *((name, "none") for name in PATTERNS if name not in FORWARD_NAN)])
def test_jvp(name, kind):
    f = _nest(kind, PATTERNS[name][0])
    x = _point(name, kind)
    t = jnp.ones_like(x)
    if name not in FORWARD_NAN:  # jnp.where masks the tangent too: finite, as jax's
        with fungrad.debug_nans():
            assert_close(fungrad.jvp(f, (x,), (t,)), jax.jvp(f, (x,), (t,)))
        return
    with fungrad.debug_nans(), pytest.raises(fungrad.NonFiniteDerivativeError) as err:
        fungrad.jvp(f, (x,), (t,))
    _check_report(str(err.value), name, kind)
    assert "the JVP rule of `sqrt`" in str(err.value) and "forward mode" in str(err.value)


@jax.custom_jvp
def _custom_sqrt(x):
    return jnp.sqrt(x)


_custom_sqrt.defjvp(lambda p, t: (jnp.sqrt(p[0]), t[0] / (2.0 * jnp.sqrt(p[0]))))


def _while_sqrt(x):
    return lax.while_loop(lambda c: c[1] < 2, lambda c: (c[0] + jnp.sqrt(x), c[1] + 1),
                          (jnp.zeros_like(x), 0))[0]  # <culprit> is the line of the loop call


def _custom_case(x):
    return jnp.sum(_custom_sqrt(x))  # <culprit>


# name -> (transform, function whose line is reported, primitive, text of the report)
OTHERS = {
    "hvp": (lambda: fungrad.hvp(lambda x: jnp.sum(where_sqrt(x)), (X,), (jnp.ones(3),)),
            where_sqrt, "sqrt", 'the "double where"'),
    "jacfwd": (lambda: fungrad.jacfwd(sqrt_at_0)(X), sqrt_at_0, "sqrt", "forward mode"),
    "value_and_grad_argnums_aux": (
        lambda: fungrad.value_and_grad(lambda a, b: (jnp.sum(where_log(a) * b), 1.0),
                                       argnums=(0, 1), has_aux=True)(X, X),
        where_log, "log", 'the "double where"'),
    "custom_jvp": (lambda: fungrad.grad(_custom_case)(X), _custom_case, "custom_jvp_call",
                   "a custom derivative rule"),
}


@pytest.mark.parametrize("name", list(OTHERS))
def test_other_transforms(name):
    run, fun, prim, text = OTHERS[name]
    with fungrad.debug_nans(), pytest.raises(fungrad.NonFiniteDerivativeError) as err:
        run()
    message = str(err.value)
    assert f"of `{prim}`" in message and text in message
    assert _culprit_line(fun).rstrip(":") in message


def test_while_loop_forward_names_the_iteration():
    with fungrad.debug_nans(), pytest.raises(fungrad.NonFiniteDerivativeError) as err:
        fungrad.jvp(_while_sqrt, (X,), (jnp.ones(3),))
    loop_line = _culprit_line(_while_sqrt).rsplit(":", 2)[1]
    assert "iteration 0 of the lax.while_loop" in str(err.value)
    assert f"test_debug_nans.py:{int(loop_line) - 1}:" in str(err.value)  # the loop's call
    assert "of `sqrt`" in str(err.value)


# --- under jax.jit: the check runs in a callback; jax raises with the report ---------------


@pytest.mark.parametrize(("transform", "name", "kind"), [
    ("grad", "where_sqrt", "none"), ("grad", "where_log", "scan"), ("grad", "norm_at_0", "cond"),
    ("grad", "where_div", "checkpoint"), ("jacrev", "where_sqrt", "scan"),
    ("jvp", "sqrt_at_0", "none"), ("jvp", "norm_at_0", "checkpoint")])
def test_under_jit(transform, name, kind):
    f, x = _nest(kind, PATTERNS[name][0]), _point(name, kind)
    if transform == "jvp":
        def run(x):
            return fungrad.jvp(f, (x,), (jnp.ones_like(x),))
    else:
        run = _reverse(transform, f)
    with fungrad.debug_nans():
        jitted = jax.jit(run)
        with pytest.raises(jax.errors.JaxRuntimeError) as err:
            jax.block_until_ready(jitted(x))
    assert "NonFiniteDerivativeError" in str(err.value)
    _check_report(str(err.value), name, kind)


def test_the_setting_is_read_when_jit_traces():
    f = fungrad.grad(lambda x: jnp.sum(where_sqrt(x)))
    traced_off = jax.jit(f)
    assert not np.all(np.isfinite(traced_off(X)))  # traced off: no check
    with fungrad.debug_nans():
        assert not np.all(np.isfinite(traced_off(X)))  # the cached trace has no check
        with pytest.raises(jax.errors.JaxRuntimeError, match="NonFiniteDerivativeError"):
            jax.jit(lambda x: f(x) * 1.0)(X).block_until_ready()  # a new trace has


# --- vjp, linearize, the decorator, switching off ----------------------------------------


def test_vjp_and_linearize():
    with fungrad.debug_nans():
        _, pullback = fungrad.vjp(where_sqrt, X)
        with pytest.raises(fungrad.NonFiniteDerivativeError) as err:
            pullback(jnp.ones(3))
        _check_report(str(err.value), "where_sqrt", "none")
        _, f_jvp = fungrad.linearize(sqrt_at_0, X)
        with pytest.raises(fungrad.NonFiniteDerivativeError) as err:
            f_jvp(jnp.ones(3))
        _check_report(str(err.value), "sqrt_at_0", "none")


def test_vjp_made_outside_says_how_to_locate():
    _, pullback = fungrad.vjp(where_sqrt, X)
    with fungrad.debug_nans(), pytest.raises(fungrad.NonFiniteDerivativeError,
                                             match="call fungrad.vjp or fungrad.linearize"):
        pullback(jnp.ones(3))


def test_decorator_and_nested_off():
    @fungrad.debug_nans()
    def checked(x):
        return fungrad.grad(lambda x: jnp.sum(where_sqrt(x)))(x)

    with pytest.raises(fungrad.NonFiniteDerivativeError):
        checked(X)
    with fungrad.debug_nans(), fungrad.debug_nans(False):
        g = fungrad.grad(lambda x: jnp.sum(where_sqrt(x)))(X)
    assert np.isnan(g[1])


def test_non_finite_inputs_or_cotangents_are_not_blamed():
    with fungrad.debug_nans():
        g = fungrad.grad(lambda x: jnp.sum(x * 2.0))(jnp.array([1.0, jnp.inf]))
        assert_close(g, jnp.array([2.0, 2.0]))
        g = fungrad.grad(lambda x: jnp.sum(jnp.log(x)))(jnp.array([1.0, jnp.nan]))
        assert np.isnan(g[1])
        _, pullback = fungrad.vjp(jnp.sin, X)
        assert np.isnan(pullback(jnp.array([1.0, jnp.nan, 1.0]))[0][1])


def _finite_case(x):
    return jnp.sum(jnp.sin(x) * jnp.where(x > 0, jnp.sqrt(jnp.where(x > 0, x, 1.0)), 0.0))


_XF, _TF = jnp.array([1.0, 0.0, 4.0, -2.0]), jnp.array([1.0, 2.0, 3.0, 4.0])
_FINITE_RUNS = {
    "grad": lambda: fungrad.grad(_finite_case)(_XF),
    "value_and_grad": lambda: fungrad.value_and_grad(_finite_case)(_XF),
    "jvp": lambda: fungrad.jvp(_finite_case, (_XF,), (_TF,)),
    "vjp": lambda: fungrad.vjp(_finite_case, _XF)[1](1.0),
    "linearize": lambda: fungrad.linearize(_finite_case, _XF)[1](_TF),
    "jacfwd": lambda: fungrad.jacfwd(_finite_case)(_XF),
    "hvp": lambda: fungrad.hvp(_finite_case, (_XF,), (_TF,)),
    "jit_grad": lambda: jax.jit(fungrad.grad(_finite_case))(_XF),
}


@pytest.mark.parametrize("name", list(_FINITE_RUNS))
def test_on_without_nans_results_are_identical(name):
    off = _FINITE_RUNS[name]()
    with fungrad.debug_nans():
        on = _FINITE_RUNS[name]()
    # The same types and values (to rounding: a call may run compiled or op by op).
    assert_close(on, off, rtol=1e-13, atol=0)
    if name == "grad":
        assert_close(on, jax.grad(_finite_case)(_XF))


def test_off_costs_nothing_measurable():
    # One context-variable lookup per transform call: the eager grad of a small function
    # takes the same time with the feature off as the engine's own spread between runs.
    f = fungrad.grad(lambda x: jnp.sum(jnp.sin(x)))
    f(X)

    def best(n=30):
        times = []
        for _ in range(n):
            start = time.perf_counter()
            f(X).block_until_ready()
            times.append(time.perf_counter() - start)
        return min(times)

    start = time.perf_counter()
    for _ in range(100_000):
        fungrad._src.debug_nans.enabled()
    per_check = (time.perf_counter() - start) / 100_000
    assert per_check < 0.01 * best()


def test_bad_argument_message():
    with pytest.raises(TypeError, match="debug_nans: `enabled` must be True or False, got 'yes'"):
        with fungrad.debug_nans("yes"):
            pass
