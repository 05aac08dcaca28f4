"""The capture cache: repeated calls do not retrace, and never reuse a stale value."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fungrad
from tests.harness import assert_close

traces = []


def _loss(w, x, scale=1.0):
    traces.append(None)  # runs once per trace, not per call
    return scale * jnp.sum(jnp.tanh(x @ w) ** 2)


def _batches(n):
    rng = np.random.default_rng(0)
    return [jnp.asarray(rng.standard_normal((4, 3))) for _ in range(n)]


W = jnp.asarray(np.random.default_rng(1).standard_normal((3, 2)))


def test_a_closure_made_per_call_is_traced_once_and_sees_each_new_batch():
    traces.clear()
    for x in _batches(3):
        got = fungrad.grad(lambda w: _loss(w, x))(W)  # noqa: B023  (x is this step's batch)
        assert_close(got, jax.grad(lambda w: _loss(w, x))(W))  # noqa: B023
    assert len(traces) == 1 + 3  # fungrad's one trace, jax's three


def test_has_aux_keyword_arguments_and_vjp_hit_the_cache():
    traces.clear()
    for x in _batches(3):
        fungrad.grad(lambda w: (_loss(w, x), x), has_aux=True)(W)  # noqa: B023
    assert len(traces) == 1
    traces.clear()
    for x in _batches(3):
        fungrad.value_and_grad(_loss)(W, x, scale=2.0)
    assert len(traces) == 1
    traces.clear()
    for x in _batches(3):
        y, pullback = fungrad.vjp(lambda w: _loss(w, x), W)  # noqa: B023
        assert_close(pullback(jnp.ones(()))[0], jax.grad(_loss)(W, x))
    assert len(traces) == 1 + 3  # fungrad's one trace, jax's three


def test_a_closed_over_python_number_is_part_of_the_key():
    x = _batches(1)[0]
    for scale in (1.0, 3.0):
        got = fungrad.grad(lambda w: _loss(w, x, scale))(W)  # noqa: B023
        assert_close(got, jax.grad(_loss)(W, x, scale))


def test_inside_jit_a_per_call_closure_over_traced_values_is_cached_too():
    @jax.jit
    def two_steps(w, x):
        return [fungrad.grad(lambda w: _loss(w, xk))(w) for xk in (x, x * 2.0)]  # noqa: B023

    x = _batches(1)[0]
    traces.clear()
    got = two_steps(W, x)
    assert len(traces) == 1  # the second closure finds the first one's program
    assert_close(got, [jax.grad(_loss)(W, x * k) for k in (1.0, 2.0)])


def test_eager_calls_run_a_compiled_program_with_jax_semantics():
    # Weak types and dtypes come back as from jax's own eager grad.
    for f, x in [(lambda x: x * x, 3.0), (lambda x: jnp.sin(x) * 2.0, jnp.float32(0.5))]:
        got, want = fungrad.grad(f)(x), jax.grad(f)(x)
        assert jax.typeof(got) == jax.typeof(want)
        assert_close(got, want)


def _count_calls(monkeypatch, name):
    """Counts the calls of fungrad._src.api.`name`: a compiled path runs it only while
    jax.jit traces, so a second eager call that hits the cache does not run it at all."""
    from fungrad._src import api

    calls = []
    original = getattr(api, name)

    def counting(*args, **kwargs):
        calls.append(None)
        return original(*args, **kwargs)

    monkeypatch.setattr(api, name, counting)
    return calls


def test_eager_jacobians_run_one_cached_compiled_program(monkeypatch):
    calls = _count_calls(monkeypatch, "_transform_flat")
    cases = [
        (fungrad.jacfwd, jax.jacfwd, {}),
        (fungrad.jacrev, jax.jacrev, {"argnums": (0,)}),
        (fungrad.hessian, jax.hessian, {}),
    ]
    for ours, theirs, kw in cases:
        for step, x in enumerate(_batches(2)):
            calls.clear()
            got = ours(lambda w: _loss(w, x, 2.0), **kw)(W)  # noqa: B023  (a new closure)
            assert calls == ([None] if step == 0 else [])
            assert_close(got, theirs(lambda w: _loss(w, x, 2.0), **kw)(W))  # noqa: B023


def test_eager_jacobians_keep_kwargs_aux_and_static_leaves():
    def f(w, config, *, shift):
        y = jnp.tanh(w * config["scale"] + shift)
        return y, {"norm": jnp.sum(y) if config["name"] == "layer" else None}

    w = jnp.arange(3.0)
    config = {"scale": 2.0, "name": "layer"}
    for ours, theirs in [(fungrad.jacfwd, jax.jacfwd), (fungrad.jacrev, jax.jacrev)]:
        jac, aux = ours(f, has_aux=True)(w, config, shift=jnp.float32(0.5))
        want_jac, want_aux = theirs(lambda w, c, *, shift: (f(w, c, shift=shift)[0],
                                                             f(w, c, shift=shift)[1]["norm"]),
                                    has_aux=True)(w, config, shift=jnp.float32(0.5))
        assert_close(jac, want_jac)
        assert_close(aux["norm"], want_aux)


def test_python_code_that_branches_on_an_array_argument_gets_the_tracing_note():
    def f(x, n):
        return x ** 3 if n > 2 else x ** 2

    with pytest.raises(jax.errors.TracerBoolConversionError,
                       match="array arguments, differentiated or not.*Python number"):
        fungrad.jacfwd(f)(jnp.arange(3.0), jnp.asarray(3))
    x = jnp.arange(3.0)
    assert_close(fungrad.jacfwd(f)(x, 3), jax.jacfwd(f)(x, 3))


def test_eager_vjp_and_linearize_run_compiled_programs(monkeypatch):
    x = _batches(1)[0]
    for name in ("_primal_flat", "_pullback_flat", "_linear_flat"):
        calls = _count_calls(monkeypatch, name)
        for step in range(2):
            calls.clear()
            _, pullback = fungrad.vjp(_loss, W, x)
            _, f_jvp = fungrad.linearize(_loss, W, x)
            got = pullback(jnp.ones(()))
            assert_close(got, jax.vjp(_loss, W, x)[1](jnp.ones(())))
            assert_close(f_jvp(W, x), jax.jvp(_loss, (W, x), (W, x))[1])
            assert len(calls) == (0 if step else 1)  # vjp and linearize share the primal
        # Inside a trace the pullback is inlined, not compiled separately.
        assert_close(jax.jit(pullback)(jnp.ones(())), got)
        assert_close(jax.vmap(pullback)(jnp.ones(3))[0][1], got[0])


def test_an_eager_pullback_with_a_structurally_zero_cotangent_returns_arrays():
    # The second derivative of a piecewise-linear function is a symbolic zero inside
    # fungrad; its compiled eager pullback still returns arrays, as jax's does.
    x = jnp.array([1.0, -2.0, 3.0])

    def first(lib):
        return lambda x: lib.vjp(lambda x: jnp.maximum(x, 0.0), x)[1](jnp.ones(3))[0]

    got = fungrad.vjp(first(fungrad), x)[1](jnp.ones(3))
    assert_close(got, jax.vjp(first(jax), x)[1](jnp.ones(3)))
