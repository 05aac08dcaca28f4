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


# --- forward mode through the custom_vjp rules of these libraries ------------------------------
#
# fungrad runs a custom_vjp function in forward mode by transposing its bwd (jax refuses):
# where bwd is linear in the cotangent, fungrad's J v is the adjoint of jax's reverse mode,
# <u, J v> = <J^T u, v>; where it is not, the error names the bwd and the reason.


def _vdot(a, b):
    return sum(jnp.vdot(x, y) for x, y in zip(jax.tree_util.tree_leaves(a),
                                              jax.tree_util.tree_leaves(b), strict=True))


def _assert_adjoint(fun, primal, tangent, cotangent, rtol=1e-5):
    jv = fungrad.jvp(fun, (primal,), (tangent,))[1]
    (jtu,) = jax.vjp(fun, primal)[1](cotangent)
    np.testing.assert_allclose(_vdot(cotangent, jv), _vdot(jtu, tangent), rtol=rtol)
    return jv


def test_forward_mode_of_optax_scale_gradient_is_scaled():
    x, v, u = _data((6,), 0), _data((6,), 1), _data((6,), 2)
    jv = _assert_adjoint(lambda x: optax.scale_gradient(jnp.sin(x), 0.3), x, v, u)
    assert_close(jv, 0.3 * jnp.cos(x) * v)  # consistent with its reverse mode, not its value
    assert_close(fungrad.jacfwd(lambda x: optax.scale_gradient(x, 0.3))(x),
                 jax.jacrev(lambda x: optax.scale_gradient(x, 0.3))(x))


def test_forward_mode_of_flax_fp8_ops_straight_through_and_refusals():
    from flax.linen import fp8_ops

    x, v, u = _data((8,), 0), _data((8,), 1), _data((8,), 2)
    scale, history = jnp.ones((1,), jnp.float32), jnp.zeros((16,), jnp.float32)

    def qdq(op):
        return lambda x, s=scale, h=history: op(jnp.float32, jnp.float8_e4m3fn, x, s, h)

    # in_qdq's gradient passes the cotangent straight through: so does its forward mode.
    assert_close(_assert_adjoint(qdq(fp8_ops.in_qdq), x, v, u), v)
    with pytest.raises(TypeError, match=r"in_qdq_bwd .* returns for input 1 .* does not depend"):
        fungrad.jvp(lambda s: qdq(fp8_ops.in_qdq)(x, s), (scale,), (scale,))
    with pytest.raises(TypeError, match=r"out_qdq_bwd .* applies `abs` to it .*custom_jvp rule"):
        fungrad.jvp(qdq(fp8_ops.out_qdq), (x,), (v,))


class _LinenCustomVjp(linen.Module):
    """A Dense layer whose parameter gradients are scaled (`sign`ed when `sign`), with
    linen's lifted custom_vjp, as in its documentation."""
    sign: bool = False

    @linen.compact
    def __call__(self, x):
        def f(mdl, x):
            return mdl(x)

        def fwd(mdl, x):
            return linen.vjp(f, mdl, x)

        def bwd(vjp_fn, y_t):
            params_t, *inputs_t = vjp_fn(y_t)
            change = jnp.sign if self.sign else (lambda t: 0.5 * t)
            return (jax.tree_util.tree_map(change, params_t), *inputs_t)

        return linen.custom_vjp(f, forward_fn=fwd, backward_fn=bwd)(linen.Dense(3), x)


def test_forward_mode_of_flax_linen_custom_vjp():
    x, u = _data((4, 5), 0), _data((4, 3), 1)
    params = _LinenCustomVjp().init(jax.random.key(0), x)["params"]
    v = jax.tree_util.tree_map(lambda p: _data(p.shape, 2), params)
    apply = lambda sign: lambda p: _LinenCustomVjp(sign).apply({"params": p}, x)  # noqa: E731
    jv = _assert_adjoint(apply(False), params, v, u)
    assert_close(jv, 0.5 * (x @ v["Dense_0"]["kernel"] + v["Dense_0"]["bias"]))
    with pytest.raises(TypeError, match="applies `sign` to it"):
        fungrad.jvp(apply(True), (params,), (v,))


@eqx.filter_custom_vjp
def _eqx_layer(weights_and_x, activation):
    weights, x = weights_and_x
    return activation(x @ weights["w"])


@_eqx_layer.def_fwd
def _eqx_layer_fwd(perturbed, weights_and_x, activation):
    del perturbed
    weights, x = weights_and_x
    pre = x @ weights["w"]
    return activation(pre), pre


@_eqx_layer.def_bwd
def _eqx_layer_bwd(pre, g, perturbed, weights_and_x, activation):
    del perturbed, activation
    _, x = weights_and_x
    return {"w": x.T @ (g * (1.0 - jnp.tanh(pre) ** 2)) * 2.0}, None  # deliberately doubled


def test_forward_mode_of_equinox_filter_custom_vjp():
    x, u = _data((4, 3), 0), _data((4, 2), 1)
    weights, v = {"w": _data((3, 2), 2)}, {"w": _data((3, 2), 3)}
    jv = _assert_adjoint(lambda w: _eqx_layer((w, x), jnp.tanh), weights, v, u)
    assert_close(jv, 2.0 * (1.0 - jnp.tanh(x @ weights["w"]) ** 2) * (x @ v["w"]))


def test_equinox_filter_custom_vjp_with_array_args():
    # equinox marks the other array arguments with a custom_jvp rule that raises for any
    # tangent: capture cannot trace that rule ahead, so it stays lazy and never runs.
    @eqx.filter_custom_vjp
    def scale(w, x):
        return w * x

    scale.def_fwd(lambda perturbed, w, x: (w * x, None))
    scale.def_bwd(lambda res, g, perturbed, w, x: g * x)
    x = _data((3,), 0)
    assert_close(fungrad.grad(lambda w: jnp.sum(scale(w, x)))(x), jax.grad(lambda w: jnp.sum(scale(w, x)))(x))


def test_forward_mode_of_jax_custom_gradient():
    @jax.custom_gradient
    def soft_clip(x):
        return jnp.tanh(x), lambda g: (g * 0.25,)  # a linear, untrue rule

    x, v, u = _data((5,), 0), _data((5,), 1), _data((5,), 2)
    assert_close(_assert_adjoint(soft_clip, x, v, u), 0.25 * v)
