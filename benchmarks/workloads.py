"""Benchmark workloads: each builds a fungrad and a jax version of the same derivative."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax import lax

import fungrad


@dataclass(frozen=True)
class Workload:
    name: str
    what: str
    fungrad_fn: Callable
    jax_fn: Callable
    args: tuple
    eager_only: bool = False  # Python that branches on values: no jax.jit of it


def _dense_init(key, sizes):
    keys = jax.random.split(key, len(sizes) - 1)
    return [{"w": jax.random.normal(k, (m, n)) / jnp.sqrt(m), "b": jnp.zeros(n)}
            for k, m, n in zip(keys, sizes[:-1], sizes[1:], strict=True)]


def _mlp_apply(params, x):
    for layer in params[:-1]:
        x = jax.nn.relu(x @ layer["w"] + layer["b"])
    return x @ params[-1]["w"] + params[-1]["b"]


def _xent(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def mlp(scale: int) -> Workload:
    key = jax.random.key(0)
    params = _dense_init(key, [64 * scale, 128 * scale, 128 * scale, 10])
    x = jax.random.normal(key, (128 * scale, 64 * scale))
    y = jax.random.randint(key, (128 * scale,), 0, 10)
    loss = lambda p, x, y: _xent(_mlp_apply(p, x), y)
    return Workload("mlp", "grad of an MLP classifier loss", fungrad.grad(loss), jax.grad(loss),
                    (params, x, y))


def cnn(scale: int) -> Workload:
    key = jax.random.key(1)
    k1, k2, k3 = jax.random.split(key, 3)
    channels = 8 * scale
    params = {"c1": jax.random.normal(k1, (3, 3, 3, channels)) * 0.1,
              "c2": jax.random.normal(k2, (3, 3, channels, channels)) * 0.1,
              "out": jax.random.normal(k3, (channels * 4 * 4, 10)) * 0.1}
    x = jax.random.normal(key, (16 * scale, 16, 16, 3))
    y = jax.random.randint(key, (16 * scale,), 0, 10)
    dn = ("NHWC", "HWIO", "NHWC")

    def loss(p, x, y):
        h = jax.nn.relu(lax.conv_general_dilated(x, p["c1"], (1, 1), "SAME", dimension_numbers=dn))
        h = lax.reduce_window(h, -jnp.inf, lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
        h = jax.nn.relu(lax.conv_general_dilated(h, p["c2"], (1, 1), "SAME", dimension_numbers=dn))
        h = lax.reduce_window(h, 0.0, lax.add, (1, 2, 2, 1), (1, 2, 2, 1), "VALID") / 4
        return _xent(h.reshape(h.shape[0], -1) @ p["out"], y)

    return Workload("cnn", "grad of a CNN loss (conv, max and avg pooling)", fungrad.grad(loss),
                    jax.grad(loss), (params, x, y))


def _layer_norm(x, p):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) * lax.rsqrt(var + 1e-5) * p["g"] + p["b"]


def _attention(x, p, heads):
    t, d = x.shape[-2:]
    q, k, v = jnp.split(x @ p["qkv"], 3, axis=-1)
    split = lambda a: a.reshape(*a.shape[:-1], heads, d // heads).swapaxes(-2, -3)
    q, k, v = split(q), split(k), split(v)
    scores = q @ k.swapaxes(-1, -2) / jnp.sqrt(d // heads)
    mask = jnp.tril(jnp.ones((t, t), bool))
    att = jax.nn.softmax(jnp.where(mask, scores, -1e9), axis=-1)
    out = (att @ v).swapaxes(-2, -3).reshape(*x.shape)
    return out @ p["proj"]


def gpt_params(key, vocab, d, layers):
    keys = iter(jax.random.split(key, 4 * layers + 2))
    norm = lambda: {"g": jnp.ones(d), "b": jnp.zeros(d)}
    blocks = [{"ln1": norm(), "ln2": norm(),
               "qkv": jax.random.normal(next(keys), (d, 3 * d)) * 0.02,
               "proj": jax.random.normal(next(keys), (d, d)) * 0.02,
               "fc": jax.random.normal(next(keys), (d, 4 * d)) * 0.02,
               "out": jax.random.normal(next(keys), (4 * d, d)) * 0.02} for _ in range(layers)]
    return {"embed": jax.random.normal(next(keys), (vocab, d)) * 0.02, "blocks": blocks,
            "ln": norm(), "pos": jax.random.normal(next(keys), (64, d)) * 0.02}


def gpt_loss(params, tokens, heads=4):
    x = params["embed"][tokens[:, :-1]] + params["pos"][: tokens.shape[1] - 1]
    for blk in params["blocks"]:
        x = x + _attention(_layer_norm(x, blk["ln1"]), blk, heads)
        x = x + jax.nn.gelu(_layer_norm(x, blk["ln2"]) @ blk["fc"]) @ blk["out"]
    logits = _layer_norm(x, params["ln"]) @ params["embed"].T
    return _xent(logits, tokens[:, 1:])


def gpt(scale: int) -> Workload:
    key = jax.random.key(2)
    params = gpt_params(key, vocab=64, d=64 * scale, layers=4)
    tokens = jax.random.randint(key, (8 * scale, 33), 0, 64)
    return Workload("gpt", "grad of a 4-layer GPT-style LM loss", fungrad.grad(gpt_loss),
                    jax.grad(gpt_loss), (params, tokens))


def rnn(scale: int) -> Workload:
    key = jax.random.key(3)
    k1, k2 = jax.random.split(key)
    hidden = 64 * scale
    params = {"wh": jax.random.normal(k1, (hidden, hidden)) / jnp.sqrt(hidden),
              "wx": jax.random.normal(k2, (16, hidden)) * 0.1}
    xs = jax.random.normal(key, (100, 8 * scale, 16))

    def loss(p, xs):
        def step(h, x):
            h = jnp.tanh(h @ p["wh"] + x @ p["wx"])
            return h, h.sum()
        _, ys = lax.scan(step, jnp.zeros((xs.shape[1], hidden)), xs)
        return jnp.mean(ys**2)

    return Workload("rnn", "grad of an RNN loss under lax.scan (100 steps)", fungrad.grad(loss),
                    jax.grad(loss), (params, xs))


def hvp(scale: int) -> Workload:
    w = mlp(scale)
    params, x, y = w.args
    loss = lambda p: _xent(_mlp_apply(p, x), y)
    ours = lambda p, v: fungrad.hvp(loss, (p,), (v,))[0]
    theirs = lambda p, v: jax.jvp(jax.grad(loss), (p,), (v,))[1]
    v = jax.tree_util.tree_map(jnp.ones_like, params)
    return Workload("hvp", "Hessian-vector product of an MLP loss", ours, theirs, (params, v))


def jac_tall(scale: int) -> Workload:
    key = jax.random.key(4)
    a = jax.random.normal(key, (256 * scale, 8))
    f = lambda x: jnp.tanh(a @ x)
    return Workload("jacfwd", f"jacfwd of R^8 -> R^{256 * scale}", fungrad.jacfwd(f), jax.jacfwd(f),
                    (jnp.ones(8),))


def jac_wide(scale: int) -> Workload:
    key = jax.random.key(5)
    a = jax.random.normal(key, (8, 256 * scale))
    f = lambda x: jnp.tanh(a @ x)
    return Workload("jacrev", f"jacrev of R^{256 * scale} -> R^8", fungrad.jacrev(f), jax.jacrev(f),
                    (jnp.ones(256 * scale),))


def hessian(scale: int) -> Workload:
    f = lambda x: jnp.sum(jnp.sin(x) * jnp.roll(x, 1)) + jnp.sum(x**4)
    return Workload("hessian", f"hessian of R^{16 * scale} -> R", fungrad.hessian(f), jax.hessian(f),
                    (jnp.linspace(-1.0, 1.0, 16 * scale),))


def training(scale: int) -> Workload:
    w = mlp(scale)
    params, x, y = w.args
    loss = lambda p: _xent(_mlp_apply(p, x), y)
    opt = optax.adam(1e-3)

    def make(value_and_grad: Any):
        def train(p):
            def step(carry, _):
                p, state = carry
                value, g = value_and_grad(loss)(p)
                updates, state = opt.update(g, state, p)
                return (optax.apply_updates(p, updates), state), value
            (p, _), losses = lax.scan(step, (p, opt.init(p)), None, length=200)
            return losses
        return train

    return Workload("train", "200 optax.adam steps of the MLP (scan)", make(fungrad.value_and_grad),
                    make(jax.value_and_grad), (params,))


def mlp_fresh(scale: int) -> Workload:
    """The MLP gradient with a new closure and a new transformed function on every call."""
    w = mlp(scale)
    loss = lambda p, x, y: _xent(_mlp_apply(p, x), y)
    ours = lambda p, x, y: fungrad.grad(lambda p: loss(p, x, y))(p)
    theirs = lambda p, x, y: jax.grad(lambda p: loss(p, x, y))(p)
    return Workload("mlp_fresh", "grad of the MLP loss, a new closure per call", ours, theirs,
                    w.args)


def newton(scale: int) -> Workload:
    """Python control flow on values: a Newton solve whose trip count the values decide."""
    def root(a):
        y = a
        while jnp.max(jnp.abs(y * y - a)) > 1e-6:  # a Python loop on a concrete value
            y = 0.5 * (y + a / y)
        return jnp.sum(y * jnp.tanh(a))

    a = jnp.linspace(1.0, 4.0, 64 * scale)
    return Workload("newton_py", "grad through a Python while loop on values", fungrad.grad(root),
                    jax.grad(root), (a,), eager_only=True)


def jacfwd_custom_vjp(scale: int) -> Workload:
    """Forward mode through a custom_vjp layer (jax refuses it): fungrad transposes the bwd;
    jax differentiates the same layer written without the rule."""
    key = jax.random.key(6)
    a = jax.random.normal(key, (256 * scale, 16)) / 4.0

    @jax.custom_vjp
    def layer(x):
        return jnp.tanh(a @ x)

    def layer_fwd(x):
        y = jnp.tanh(a @ x)
        return y, y

    layer.defvjp(layer_fwd, lambda y, ct: (a.T @ ((1 - y * y) * ct),))
    plain = lambda x: jnp.tanh(a @ x)
    return Workload("jacfwd_cvjp", f"jacfwd of a custom_vjp layer R^16 -> R^{256 * scale}",
                    fungrad.jacfwd(layer), jax.jacfwd(plain), (jnp.linspace(-1.0, 1.0, 16),))


ALL = [mlp, cnn, gpt, rnn, hvp, jac_tall, jac_wide, hessian, training, mlp_fresh, newton,
       jacfwd_custom_vjp]
