"""Compiled memory of fungrad's gradients is no more than jax's for the same program.

`memory_analysis()` of a compiled program is deterministic for a given jax and XLA, so
these are exact comparisons: a residual that fungrad keeps and jax does not (one extra
stacked array per scan step, a value a checkpoint policy says to recompute) fails them.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.ad_checkpoint import checkpoint_name

import fungrad
from tests.harness import assert_close


def _compiled_bytes(f, *args):
    analysis = jax.jit(f).lower(*args).compile().memory_analysis()
    return analysis.temp_size_in_bytes, analysis.argument_size_in_bytes, analysis.output_size_in_bytes


def _assert_no_more_memory_than_jax(loss, *args):
    ours, theirs = fungrad.grad(loss), jax.grad(loss)
    assert_close(jax.jit(ours)(*args), jax.jit(theirs)(*args), rtol=1e-4, atol=1e-4)
    temp, arg, out = _compiled_bytes(ours, *args)
    jax_temp, jax_arg, jax_out = _compiled_bytes(theirs, *args)
    assert (arg, out) == (jax_arg, jax_out)
    assert temp <= jax_temp, f"fungrad needs {temp} bytes of temporaries, jax {jax_temp}"


def _rnn_loss(w, xs):
    def step(h, x):
        h = jnp.tanh(w @ h + x)
        return h, jnp.sum(h * h)
    _, ys = lax.scan(step, jnp.zeros(w.shape[0], w.dtype), xs)
    return jnp.sum(ys)


def test_grad_through_a_1000_step_scan():
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.standard_normal((32, 32)) / 8, jnp.float32)
    xs = jnp.asarray(rng.standard_normal((1000, 32)), jnp.float32)
    _assert_no_more_memory_than_jax(_rnn_loss, w, xs)


def _layer(w, x):
    h = checkpoint_name(jnp.tanh(x @ w), "hidden")
    return jnp.tanh(h @ w.T) + x


POLICIES = {
    "default": None,
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
    "everything_saveable": jax.checkpoint_policies.everything_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "save_only_these_names": jax.checkpoint_policies.save_only_these_names("hidden"),
}


@pytest.mark.parametrize("policy", POLICIES)
def test_grad_through_a_checkpointed_8_layer_stack(policy):
    layer = jax.checkpoint(_layer, policy=POLICIES[policy])

    def loss(ws, x):
        for w in ws:
            x = layer(w, x)
        return jnp.sum(x * x)

    rng = np.random.default_rng(1)
    ws = [jnp.asarray(rng.standard_normal((64, 64)) / 8, jnp.float32) for _ in range(8)]
    x = jnp.asarray(rng.standard_normal((128, 64)), jnp.float32)
    _assert_no_more_memory_than_jax(loss, ws, x)
