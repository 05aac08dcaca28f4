"""The capture cache: repeated calls do not retrace, and never reuse a stale value."""

import jax
import jax.numpy as jnp
import numpy as np

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
