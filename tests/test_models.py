"""Whole models, written with jnp and jax.nn as users write them: fungrad against jax.

An MLP and a transformer block (embedding gather, layer norm, causal multi-head attention,
GELU MLP, cross-entropy). For each: grad, jvp, hvp and the full Hessian equal jax's, to
1e-5 relative in float32 and 1e-12 in float64. Sizes are tiny so the Hessians stay small.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import tree_util

import fungrad
from tests.harness import assert_close, random_like

# --- an MLP -------------------------------------------------------------------------------


def _mlp_init(rng, dtype, sizes=(3, 5, 4, 3)):
    return [{"w": jnp.asarray(rng.standard_normal((m, n)) / np.sqrt(m), dtype),
             "b": jnp.asarray(0.1 * rng.standard_normal(n), dtype)}
            for m, n in zip(sizes[:-1], sizes[1:], strict=True)]


def _mlp_loss(params, batch):
    x, labels = batch
    for layer in params[:-1]:
        x = jax.nn.relu(x @ layer["w"] + layer["b"])
        x = jnp.tanh(x) + 0.5 * x
    logits = x @ params[-1]["w"] + params[-1]["b"]
    one_hot = jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype)
    return -jnp.mean(jnp.sum(one_hot * jax.nn.log_softmax(logits), axis=-1))


def _mlp_problem(dtype):
    rng = np.random.default_rng(0)
    batch = (jnp.asarray(rng.standard_normal((4, 3)), dtype), jnp.asarray([0, 2, 1, 2]))
    return _mlp_loss, _mlp_init(rng, dtype), batch


# --- a transformer block --------------------------------------------------------------------

VOCAB, D_MODEL, HEADS, HIDDEN, SEQ = 5, 4, 2, 8, 3


def _transformer_init(rng, dtype):
    def normal(*shape, scale=0.5):
        return jnp.asarray(scale * rng.standard_normal(shape), dtype)

    return {
        "embed": normal(VOCAB, D_MODEL),
        "ln1": {"scale": 1.0 + normal(D_MODEL, scale=0.1), "bias": normal(D_MODEL, scale=0.1)},
        "attn": {"q": normal(D_MODEL, D_MODEL), "k": normal(D_MODEL, D_MODEL),
                 "v": normal(D_MODEL, D_MODEL), "out": normal(D_MODEL, D_MODEL)},
        "ln2": {"scale": 1.0 + normal(D_MODEL, scale=0.1), "bias": normal(D_MODEL, scale=0.1)},
        "mlp": {"w1": normal(D_MODEL, HIDDEN), "b1": normal(HIDDEN, scale=0.1),
                "w2": normal(HIDDEN, D_MODEL), "b2": normal(D_MODEL, scale=0.1)},
        "unembed": normal(D_MODEL, VOCAB),
    }


def _layer_norm(x, p, eps=1e-5):
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps) * p["scale"] + p["bias"]


def _attention(x, p):
    seq, d = x.shape
    head_dim = d // HEADS
    q, k, v = ((x @ p[name]).reshape(seq, HEADS, head_dim).transpose(1, 0, 2)
               for name in ("q", "k", "v"))
    scores = jnp.einsum("hqd,hkd->hqk", q, k) / jnp.sqrt(jnp.asarray(head_dim, x.dtype))
    causal = jnp.tril(jnp.ones((seq, seq), dtype=bool))
    scores = jnp.where(causal, scores, jnp.asarray(-1e9, x.dtype))
    heads = jnp.einsum("hqk,hkd->hqd", jax.nn.softmax(scores, axis=-1), v)
    return heads.transpose(1, 0, 2).reshape(seq, d) @ p["out"]


def _transformer_loss(params, batch):
    tokens, targets = batch
    x = params["embed"][tokens]  # an embedding gather
    x = x + _attention(_layer_norm(x, params["ln1"]), params["attn"])
    h = _layer_norm(x, params["ln2"])
    mlp = params["mlp"]
    x = x + jax.nn.gelu(h @ mlp["w1"] + mlp["b1"], approximate=False) @ mlp["w2"] + mlp["b2"]
    log_probs = jax.nn.log_softmax(x @ params["unembed"], axis=-1)
    return -jnp.mean(jnp.take_along_axis(log_probs, targets[:, None], axis=-1))


def _transformer_problem(dtype):
    rng = np.random.default_rng(1)
    batch = (jnp.asarray([1, 4, 0], jnp.int32), jnp.asarray([4, 0, 3], jnp.int32))
    return _transformer_loss, _transformer_init(rng, dtype), batch


MODELS = {"mlp": _mlp_problem, "transformer": _transformer_problem}
CASES = [(model, dtype) for model in MODELS for dtype in ("float32", "float64")]


def _problem(model, dtype):
    loss, params, batch = MODELS[model](dtype)
    return (lambda p: loss(p, batch)), params


# Compiling these programs dominates the run time; XLA's cheapest settings cut it by half
# or more. Both sides use them, and the values still match to the tolerances above.
_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _jit(fun):
    return jax.jit(fun, compiler_options=_FAST_COMPILE)


def _first_and_second_order(grad, jvp, hvp, loss):
    """value_and_grad, a jvp and an hvp, in one program."""
    def run(params, tangent):
        return {"value_and_grad": grad(loss)(params), "jvp": jvp(loss, (params,), (tangent,)),
                "hvp": hvp(loss, params, tangent)}
    return run


@pytest.mark.parametrize("model,dtype", CASES)
def test_grad_jvp_hvp(model, dtype):
    loss, params = _problem(model, dtype)
    tangent = random_like(params, np.random.default_rng(2))
    jax_hvp = lambda f, p, t: jax.jvp(jax.grad(f), (p,), (t,))[1]
    fungrad_hvp = lambda f, p, t: fungrad.hvp(f, (p,), (t,))[0]
    expected = _jit(_first_and_second_order(jax.value_and_grad, jax.jvp, jax_hvp, loss))(
        params, tangent)
    actual = _jit(_first_and_second_order(fungrad.value_and_grad, fungrad.jvp, fungrad_hvp, loss))(
        params, tangent)
    for name in expected:
        assert_close(actual[name], expected[name], err_msg=f"{model} {name}")


# The transformer's Hessian takes the longest to compile: float64 only (the tighter
# tolerance); the MLP's covers float32.
@pytest.mark.parametrize("model,dtype", [c for c in CASES if c != ("transformer", "float32")])
def test_hessian(model, dtype):
    loss, params = _problem(model, dtype)
    n = sum(np.size(a) for a in tree_util.tree_leaves(params))
    assert n < 250, "keep the model tiny: the Hessian has n^2 entries"
    assert_close(_jit(fungrad.hessian(loss))(params), _jit(jax.hessian(loss))(params))
