"""Compiled memory of fungrad's gradients is no more than jax's for the same program.

`memory_analysis()` of a compiled program is deterministic for a given jax and XLA, so
these are exact comparisons: a residual that fungrad keeps and jax does not (one extra
stacked array per scan step, a value a checkpoint policy says to recompute) fails them.
"""

import contextlib
import io
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.ad_checkpoint import checkpoint_name, print_saved_residuals

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


# --- checkpoint policies applied inside jitted helpers, custom_jvp calls and scans --------
# jax's partial evaluation judges each equation inside a `jit` (and a scan body) against
# the policy, not the call as a whole; fungrad must keep the same residuals.


@jax.jit
def _helper(w, x):
    h = checkpoint_name(jnp.sin(x @ w), "h")
    return jnp.tanh(h @ w.T)


def _with_helper_and_relu(w, x):
    y = _helper(w, x) * x  # a user's jitted helper
    return jnp.sum(jax.nn.relu(checkpoint_name(y @ w, "h")) ** 2 + jnp.where(x > 0, x, 1.0))


def _with_nested_jits(w, x):
    @jax.jit
    def outer(w, x):
        batched = jnp.einsum("bi,bj->bij", x, x) @ w  # a dot with a batch dimension
        return jax.jit(lambda a, b: jnp.cos(checkpoint_name(b @ a, "h")))(w, x) + batched.sum(1)
    return jnp.sum(jnp.sin(outer(w, x)))


@jax.jit
def _scan(w, x):
    def step(c, xi):
        c = jnp.tanh(checkpoint_name(c @ w, "h") + xi)
        return c, jnp.sum(jnp.sin(c))
    c, ys = lax.scan(step, x[0], x)
    return jnp.sum(c) + jnp.sum(ys)


def _with_scan_in_jit(w, x):
    return _scan(w, jnp.cos(x)) + jnp.sum(_helper(w, x))


FUNCTIONS = {"helper_and_relu": _with_helper_and_relu, "nested_jits": _with_nested_jits,
             "scan_in_jit": _with_scan_in_jit}
_cp = jax.checkpoint_policies
NAMED_POLICIES = {
    **POLICIES,
    "save_only_these_names": _cp.save_only_these_names("h"),
    "dots_with_no_batch_dims_saveable": _cp.dots_with_no_batch_dims_saveable,
    "save_any_names_but_these": _cp.save_any_names_but_these("h"),
    "offload_dot_with_no_batch_dims": _cp.offload_dot_with_no_batch_dims("device", "pinned_host"),
    "save_and_offload_only_these_names": _cp.save_and_offload_only_these_names(
        names_which_can_be_saved=[], names_which_can_be_offloaded=["h"],
        offload_src="device", offload_dst="pinned_host"),
}


def _jax_residuals(f, *args):
    """(shape, dtype) of each residual jax keeps, read from `print_saved_residuals`."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        print_saved_residuals(f, *args)
    found = []
    for line in out.getvalue().splitlines():
        kind, bits, dims = re.match(r"([a-z]+?)(\d*)(?:<\w+>)?\[([\d,]*)\]", line).groups()
        dtype = np.dtype("bool" if kind == "bool" else {"f": "float", "i": "int", "u": "uint"}[kind] + bits)
        found.append((tuple(int(d) for d in dims.split(",") if d), dtype))
    return sorted(found, key=str)


@pytest.mark.parametrize("fun", FUNCTIONS)
@pytest.mark.parametrize("policy", NAMED_POLICIES)
def test_checkpoint_policy_keeps_jaxs_residuals_inside_calls(policy, fun):
    f = jax.checkpoint(FUNCTIONS[fun], policy=NAMED_POLICIES[policy])
    rng = np.random.default_rng(2)
    w = jnp.asarray(rng.standard_normal((4, 4)), jnp.float32)
    x = jnp.asarray(rng.standard_normal((3, 4)), jnp.float32)
    _, pullback = fungrad.vjp(f, w, x)
    ours = sorted(((r.shape, r.dtype) for r in jax.tree_util.tree_leaves(pullback)), key=str)
    theirs = _jax_residuals(f, w, x)
    assert ours == theirs
    assert_close(pullback(jnp.float32(1.0)), _jax_gradient(fun, w, x), rtol=1e-5, atol=1e-6)


_gradients: dict = {}


def _jax_gradient(fun, w, x):
    """jax's gradient of `FUNCTIONS[fun]`, which no checkpoint policy changes (computed once)."""
    if fun not in _gradients:
        _gradients[fun] = jax.grad(FUNCTIONS[fun], (0, 1))(w, x)
    return _gradients[fun]


@pytest.mark.parametrize("fun", FUNCTIONS)
def test_without_checkpoint_jitted_helpers_keep_jaxs_residuals(fun):
    # A residual that is an input or a known output of a jitted call is passed on from
    # outside, not returned by the call a second time.
    rng = np.random.default_rng(2)
    w = jnp.asarray(rng.standard_normal((4, 4)), jnp.float32)
    x = jnp.asarray(rng.standard_normal((3, 4)), jnp.float32)
    _, pullback = fungrad.vjp(FUNCTIONS[fun], w, x)
    ours = sorted(((r.shape, r.dtype) for r in jax.tree_util.tree_leaves(pullback)), key=str)
    assert ours == _jax_residuals(FUNCTIONS[fun], w, x)
    assert_close(pullback(jnp.float32(1.0)), _jax_gradient(fun, w, x), rtol=1e-5, atol=1e-6)
