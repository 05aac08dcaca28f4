"""Models written with Flax (linen and nnx) and Equinox: fungrad's gradients equal jax's.

Each model keeps its library's own parameter pytree (linen's variable dicts, nnx's State,
Equinox's module with its non-array leaves partitioned out). For each, the loss and its
gradient from fungrad.value_and_grad equal jax.value_and_grad's to 1e-5 relative in float32.
Both sides run in one `jax.jit` each, with XLA's cheapest compile settings.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax

import fungrad
from tests.harness import assert_close

flax = pytest.importorskip("flax")
eqx = pytest.importorskip("equinox")
linen = pytest.importorskip("flax.linen")
nnx = pytest.importorskip("flax.nnx")

_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _assert_same_value_and_grad(loss, params, *args, has_aux=False):
    """fungrad.value_and_grad(loss) equals jax.value_and_grad(loss), both under jax.jit."""
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(params))
    def run(lib):
        return jax.jit(lib.value_and_grad(loss, has_aux=has_aux), compiler_options=_FAST_COMPILE)

    expected = run(jax)(params, *args)
    actual = run(fungrad)(params, *args)
    assert_close(actual, expected, err_msg="value_and_grad")
    grads = jax.tree_util.tree_leaves(expected[1])
    assert grads and all(jnp.any(g != 0) for g in grads), "every parameter should get a gradient"


def _data(shape, seed=0, dtype=jnp.float32):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def _labels(n, classes, seed=1):
    return jnp.asarray(np.random.default_rng(seed).integers(0, classes, n), jnp.int32)


def _cross_entropy(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


# --- Flax linen -----------------------------------------------------------------------------


class LinenMLP(linen.Module):
    features: tuple = (16, 16, 3)

    @linen.compact
    def __call__(self, x):
        for width in self.features[:-1]:
            x = linen.gelu(linen.Dense(width)(x))
        return linen.Dense(self.features[-1])(x)


def test_linen_mlp():
    model = LinenMLP()
    x, labels = _data((8, 5)), _labels(8, 3)
    params = model.init(jax.random.key(0), x)["params"]

    def loss(params, x, labels):
        return _cross_entropy(model.apply({"params": params}, x), labels)

    _assert_same_value_and_grad(loss, params, x, labels)


class LinenCNN(linen.Module):
    """Conv -> BatchNorm -> relu -> max pool, twice, then a dense head."""

    @linen.compact
    def __call__(self, x, train: bool):
        for features in (4, 6):
            x = linen.Conv(features, kernel_size=(3, 3), padding="SAME", use_bias=False)(x)
            x = linen.BatchNorm(use_running_average=not train, momentum=0.9)(x)
            x = linen.max_pool(linen.relu(x), window_shape=(2, 2), strides=(2, 2))
        x = linen.avg_pool(x, window_shape=(2, 2), strides=(1, 1), padding="SAME")
        return linen.Dense(3)(x.reshape(x.shape[0], -1))


def test_linen_cnn_batchnorm_maxpool():
    model = LinenCNN()
    x, labels = _data((4, 8, 8, 2)), _labels(4, 3)
    variables = model.init(jax.random.key(0), x, train=False)
    params, batch_stats = variables["params"], variables["batch_stats"]

    def loss(params, batch_stats, x, labels):
        logits, updates = model.apply({"params": params, "batch_stats": batch_stats}, x,
                                      train=True, mutable=["batch_stats"])
        return _cross_entropy(logits, labels), updates["batch_stats"]

    _assert_same_value_and_grad(loss, params, batch_stats, x, labels, has_aux=True)


class LinenEncoderBlock(linen.Module):
    heads: int = 2
    width: int = 8
    dropout: float = 0.2

    @linen.compact
    def __call__(self, x, mask, train: bool):
        h = linen.LayerNorm()(x)
        h = linen.MultiHeadDotProductAttention(num_heads=self.heads, dropout_rate=self.dropout,
                                               deterministic=not train)(h, h, mask=mask)
        x = x + linen.Dropout(self.dropout, deterministic=not train)(h)
        h = linen.LayerNorm()(x)
        h = linen.Dense(self.width)(linen.gelu(linen.Dense(2 * self.width)(h)))
        return x + linen.Dropout(self.dropout, deterministic=not train)(h)


class LinenEncoder(linen.Module):
    vocab: int = 11
    width: int = 8
    layers: int = 1

    @linen.compact
    def __call__(self, tokens, train: bool):
        padding = tokens != 0
        mask = linen.combine_masks(linen.make_attention_mask(padding, padding),
                                   linen.make_causal_mask(tokens))
        x = linen.Embed(self.vocab, self.width)(tokens)
        x = x + self.param("position", linen.initializers.normal(0.02), x.shape[1:], jnp.float32)
        for _ in range(self.layers):
            x = LinenEncoderBlock(width=self.width)(x, mask, train)
        return linen.Dense(self.vocab)(linen.LayerNorm()(x))


def test_linen_transformer_encoder_dropout_and_masks():
    model = LinenEncoder()
    tokens = jnp.asarray([[3, 5, 1, 7, 0, 0], [2, 2, 9, 4, 10, 6]], jnp.int32)
    targets = jnp.roll(tokens, -1, axis=1)
    params = model.init(jax.random.key(0), tokens, train=False)["params"]

    def loss(params, tokens, targets, key):
        logits = model.apply({"params": params}, tokens, train=True, rngs={"dropout": key})
        weights = (tokens != 0).astype(logits.dtype)
        per_token = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
        return jnp.sum(per_token * weights) / jnp.sum(weights)

    _assert_same_value_and_grad(loss, params, tokens, targets, jax.random.key(1))


# --- Flax nnx -------------------------------------------------------------------------------


class NnxMLP(nnx.Module):
    def __init__(self, sizes, rngs):
        pairs = zip(sizes[:-1], sizes[1:], strict=True)
        self.layers = nnx.List([nnx.Linear(m, n, rngs=rngs) for m, n in pairs])
        self.norm = nnx.LayerNorm(sizes[1], rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.norm(self.layers[0](x)))
        for layer in self.layers[1:-1]:
            x = nnx.tanh(layer(x))
        return self.layers[-1](x)


def test_nnx_mlp_split_merge():
    graphdef, params = nnx.split(NnxMLP((5, 12, 12, 3), nnx.Rngs(0)))
    x, labels = _data((8, 5)), _labels(8, 3)

    def loss(params, x, labels):
        return _cross_entropy(nnx.merge(graphdef, params)(x), labels)

    _assert_same_value_and_grad(loss, params, x, labels)


# --- Equinox --------------------------------------------------------------------------------


# The test session enables float64, which Equinox then takes as its default: ask for float32.
F32 = jnp.float32


def _eqx_params(module):
    """The module's float arrays (the parameters) and the rest, as Equinox users split them."""
    return eqx.partition(module, eqx.is_inexact_array)


def test_eqx_mlp():
    params, static = _eqx_params(eqx.nn.MLP(5, 3, width_size=12, depth=2,
                                            activation=jax.nn.softplus, dtype=F32,
                                            key=jax.random.key(0)))
    x, labels = _data((8, 5)), _labels(8, 3)

    def loss(params, x, labels):
        model = eqx.combine(params, static)
        return _cross_entropy(jax.vmap(model)(x), labels)

    _assert_same_value_and_grad(loss, params, x, labels)


class EqxCNN(eqx.Module):
    conv1: eqx.nn.Conv2d
    conv2: eqx.nn.Conv2d
    pool: eqx.nn.MaxPool2d
    head: eqx.nn.Linear

    def __init__(self, key):
        k1, k2, k3 = jax.random.split(key, 3)
        self.conv1 = eqx.nn.Conv2d(2, 4, kernel_size=3, padding=1, dtype=F32, key=k1)
        self.conv2 = eqx.nn.Conv2d(4, 4, kernel_size=3, stride=2, dtype=F32, key=k2)
        self.pool = eqx.nn.MaxPool2d(kernel_size=2, stride=2)
        self.head = eqx.nn.Linear(4 * 2 * 2, 3, dtype=F32, key=k3)

    def __call__(self, x):  # x: (channels, height, width), one example
        x = self.pool(jax.nn.relu(self.conv1(x)))
        x = jax.nn.relu(self.conv2(x))
        return self.head(x.reshape(-1))


def test_eqx_conv2d():
    params, static = _eqx_params(EqxCNN(jax.random.key(0)))
    x, labels = _data((4, 2, 10, 10)), _labels(4, 3)

    def loss(params, x, labels):
        return _cross_entropy(jax.vmap(eqx.combine(params, static))(x), labels)

    _assert_same_value_and_grad(loss, params, x, labels)


def test_eqx_multihead_attention_with_mask():
    attention = eqx.nn.MultiheadAttention(num_heads=2, query_size=8, dtype=F32,
                                           key=jax.random.key(0))
    params, static = _eqx_params(attention)
    queries, keys = _data((2, 5, 8), seed=0), _data((2, 7, 8), seed=1)
    mask = jnp.asarray(np.random.default_rng(2).random((2, 5, 7)) < 0.7).at[:, :, 0].set(True)

    def loss(params, queries, keys, mask):
        module = eqx.combine(params, static)
        out = jax.vmap(lambda q, kv, m: module(q, kv, kv, mask=m))(queries, keys, mask)
        return jnp.mean(jnp.sin(out) ** 2)

    _assert_same_value_and_grad(loss, params, queries, keys, mask)


@pytest.mark.parametrize("cell_type", ["gru", "lstm"])
def test_eqx_recurrent_cell_under_scan(cell_type):
    features, hidden, steps = 3, 6, 7
    key = jax.random.key(0)
    cell_class = eqx.nn.GRUCell if cell_type == "gru" else eqx.nn.LSTMCell
    cell = cell_class(features, hidden, dtype=F32, key=key)
    head = eqx.nn.Linear(hidden, 1, dtype=F32, key=jax.random.key(1))
    params, static = _eqx_params((cell, head))
    xs, ys = _data((steps, features)), _data((steps,), seed=1)

    def loss(params, xs, ys):
        cell, head = eqx.combine(params, static)
        zeros = jnp.zeros(hidden, F32)
        init = zeros if cell_type == "gru" else (zeros, zeros)

        def step(state, x):
            state = cell(x, state)
            out = state if cell_type == "gru" else state[0]
            return state, head(out)[0]

        _, preds = lax.scan(step, init, xs)
        return jnp.mean((preds - ys) ** 2)

    _assert_same_value_and_grad(loss, params, xs, ys)
