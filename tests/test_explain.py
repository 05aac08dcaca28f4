"""fungrad.explain: residual bytes, FLOPs and checkpoint suggestions, by source line.

Oracles: jax's own list of saved residuals (`jax.ad_checkpoint`'s `saved_residuals` of the
same function), XLA's cost analysis (FLOPs of a compiled matmul or convolution), and the
compiled forward program of `fungrad.vjp` (its outputs are the residuals it keeps).
"""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax._src.ad_checkpoint import saved_residuals

import fungrad
from benchmarks import workloads
from tests.harness import assert_close

F32 = jnp.float32


def _nbytes(aval):
    return int(np.prod(aval.shape)) * np.dtype(aval.dtype).itemsize


def _jax_residual_bytes(fun, *args):
    """Bytes of the residuals jax.vjp keeps, its arguments and constants left out."""
    return sum(_nbytes(aval) for aval, what in saved_residuals(fun, *args)
               if "argument" not in what and "constant" not in what)


def _compiled_residual_bytes(fun, diff_arg, *rest):
    """Bytes the compiled forward program of fungrad.vjp outputs: the leaves of the pullback
    it returns are the residuals (inputs among them are copied out, so counted too). XLA's
    output size also counts the output tuple's table of pointers, 8 bytes an output."""
    forward = jax.jit(lambda p: fungrad.vjp(lambda p: fun(p, *rest), p)[1])
    compiled = forward.lower(diff_arg).compile()
    num_outputs = len(jax.tree_util.tree_leaves(compiled.out_info))
    return compiled.memory_analysis().output_size_in_bytes - 8 * num_outputs


def _line_of(fragment, fun):
    """The line number of the first line of `fun`'s source containing `fragment`."""
    lines, start = inspect.getsourcelines(fun)
    return start + next(i for i, text in enumerate(lines) if fragment in text)


# --- residuals on small functions ----------------------------------------------------


X = jnp.linspace(-1.0, 1.0, 6, dtype=F32).reshape(2, 3)
W = jnp.linspace(-0.5, 0.5, 12, dtype=F32).reshape(3, 4)


def _dot_tanh(w):
    h = X @ w
    y = jnp.tanh(h)
    return jnp.sum(y)


def test_dot_tanh_residuals_are_those_jax_keeps_at_the_same_lines():
    report = fungrad.explain(_dot_tanh)(W)
    jax_saved = [(aval, what) for aval, what in saved_residuals(_dot_tanh, W)]
    # jax keeps tanh's output and 1 - output (two f32[2,4]) and the constant X.
    kept = [aval for aval, what in jax_saved if "constant" not in what]
    assert report.residual_bytes == sum(map(_nbytes, kept)) == 2 * 2 * 4 * 4
    assert report.input_residual_bytes == sum(_nbytes(a) for a, w in jax_saved if "constant" in w)
    tanh_line = _line_of("jnp.tanh", _dot_tanh)
    (record,) = [r for r in report.records if r.residual_bytes and r.file]
    assert (record.line, record.function, record.code) == (tanh_line, "_dot_tanh", "y = jnp.tanh(h)")
    assert record.residual_shapes == ("f32[2,4]", "f32[2,4]")
    assert all(f":{tanh_line}:" in what for aval, what in jax_saved if "constant" not in what)
    assert "tanh" in record.primitives


def test_a_scan_residual_counts_its_stacked_size_at_the_line_in_the_body():
    def loss(w, xs):
        def step(h, x):
            h = jnp.tanh(w @ h + x)
            return h, h
        _, hs = lax.scan(step, jnp.zeros(4, F32), xs)
        return jnp.sum(hs ** 2)

    w, xs = jnp.eye(4, dtype=F32) * 0.5, jnp.ones((50, 4), F32)
    report = fungrad.explain(loss)(w, xs)
    assert report.residual_bytes == pytest.approx(_jax_residual_bytes(loss, w, xs), rel=0.1)
    body = next(r for r in report.records if r.code == "h = jnp.tanh(w @ h + x)")
    assert body.function.endswith("step") and "f32[50,4]" in body.residual_shapes
    # The body runs 50 times: its dot is 2 * 4 * 4 FLOPs per step.
    assert body.forward_flops >= 50 * 2 * 4 * 4


# --- FLOPs -------------------------------------------------------------------------------


def _matmul(a, b):
    c = a @ b
    return jnp.sum(c)


def test_matmul_flops_are_exact_and_as_xla_counts_them():
    a, b = jnp.ones((5, 7), F32), jnp.ones((7, 3), F32)
    report = fungrad.explain(_matmul, argnums=(0, 1))(a, b)
    dot = next(r for r in report.records if r.code == "c = a @ b")
    xla = jax.jit(lambda a, b: a @ b).lower(a, b).compile().cost_analysis()["flops"]
    assert dot.forward_flops == 2 * 5 * 7 * 3 == xla
    # Reverse mode: one matmul for each input's cotangent, each as costly as the forward.
    assert dot.backward_flops == 2 * dot.forward_flops
    assert report.forward_flops == dot.forward_flops + 5 * 3  # + the sum's additions


def test_convolution_flops_match_xla():
    x, k = jnp.ones((2, 9, 9, 3), F32), jnp.ones((3, 3, 3, 5), F32)
    dn = ("NHWC", "HWIO", "NHWC")

    def conv(k):
        return lax.conv_general_dilated(x, k, (1, 1), "VALID", dimension_numbers=dn)

    report = fungrad.explain(lambda k: jnp.sum(conv(k)))(k)
    xla = jax.jit(conv).lower(k).compile().cost_analysis()["flops"]
    conv_record = next(r for r in report.records if "conv_general_dilated" in r.primitives)
    assert conv_record.forward_flops == pytest.approx(xla, rel=0.01)


# --- the benchmark models: within 10% of the compiled program and of jax ------------------


# The models of benchmarks/workloads.py at their smallest sizes, with numpy's random
# numbers (jax.random compiles a program per shape: seconds of this file's time budget).
RNG = np.random.default_rng(0)


def _normal(*shape, scale=1.0):
    return jnp.asarray(RNG.standard_normal(shape) * scale, F32)


def _labels(n, classes):
    return jnp.asarray(RNG.integers(0, classes, n), jnp.int32)


def _mlp():
    sizes = [64, 128, 128, 10]
    params = [{"w": _normal(m, n, scale=m ** -0.5), "b": jnp.zeros(n, F32)}
              for m, n in zip(sizes[:-1], sizes[1:], strict=True)]
    loss = lambda p, x, y: workloads._xent(workloads._mlp_apply(p, x), y)  # noqa: E731
    return loss, params, (_normal(128, 64), _labels(128, 10))


def _cnn_loss(p, x, y):  # as workloads.cnn's
    dn = ("NHWC", "HWIO", "NHWC")
    h = jax.nn.relu(lax.conv_general_dilated(x, p["c1"], (1, 1), "SAME", dimension_numbers=dn))
    h = lax.reduce_window(h, -jnp.inf, lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
    h = jax.nn.relu(lax.conv_general_dilated(h, p["c2"], (1, 1), "SAME", dimension_numbers=dn))
    h = lax.reduce_window(h, 0.0, lax.add, (1, 2, 2, 1), (1, 2, 2, 1), "VALID") / 4
    return workloads._xent(h.reshape(h.shape[0], -1) @ p["out"], y)


def _cnn():
    params = {"c1": _normal(3, 3, 3, 8, scale=0.1), "c2": _normal(3, 3, 8, 8, scale=0.1),
              "out": _normal(8 * 4 * 4, 10, scale=0.1)}
    return _cnn_loss, params, (_normal(16, 16, 16, 3), _labels(16, 10))


def _rnn_loss(p, xs):  # as workloads.rnn's
    def step(h, x):
        h = jnp.tanh(h @ p["wh"] + x @ p["wx"])
        return h, h.sum()
    _, ys = lax.scan(step, jnp.zeros((xs.shape[1], p["wh"].shape[0]), F32), xs)
    return jnp.mean(ys ** 2)


def _rnn():
    params = {"wh": _normal(64, 64, scale=1 / 8), "wx": _normal(16, 64, scale=0.1)}
    return _rnn_loss, params, (_normal(100, 8, 16),)


def _gpt(layers=1, d=32):
    norm = lambda: {"g": jnp.ones(d, F32), "b": jnp.zeros(d, F32)}  # noqa: E731
    blocks = [{"ln1": norm(), "ln2": norm(), "qkv": _normal(d, 3 * d, scale=0.02),
               "proj": _normal(d, d, scale=0.02), "fc": _normal(d, 4 * d, scale=0.02),
               "out": _normal(4 * d, d, scale=0.02)} for _ in range(layers)]
    params = {"embed": _normal(32, d, scale=0.02), "blocks": blocks, "ln": norm(),
              "pos": _normal(64, d, scale=0.02)}
    return workloads.gpt_loss, params, (_labels((4, 17), 32),)


MODELS = {"mlp": _mlp, "cnn": _cnn, "gpt": _gpt, "rnn": _rnn}


@pytest.mark.parametrize("name", ["mlp", "cnn", "gpt", "rnn"])
def test_model_residuals_within_10_percent_of_the_compiled_program_and_of_jax(name):
    loss, params, rest = MODELS[name]()
    report = fungrad.explain(loss)(params, *rest)
    compiled = _compiled_residual_bytes(loss, params, *rest)
    total = report.residual_bytes + report.input_residual_bytes
    assert abs(total - compiled) <= 0.1 * compiled
    theirs = _jax_residual_bytes(loss, params, *rest)
    assert abs(report.residual_bytes - theirs) <= 0.1 * theirs
    assert sum(r.residual_bytes for r in report.records) == total
    assert 1.2 < report.ratio < 2.5  # backward/forward, about 2 where matmuls dominate


@pytest.mark.parametrize("policy", ["dots_saveable", "dots_with_no_batch_dims_saveable",
                                    "nothing_saveable"])
def test_jax_checkpoint_policies_keep_what_jax_keeps(policy):
    loss, params, rest = _gpt()
    checkpointed = jax.checkpoint(loss, policy=getattr(jax.checkpoint_policies, policy))
    report = fungrad.explain(checkpointed)(params, *rest)
    assert report.residual_bytes == _jax_residual_bytes(checkpointed, params, *rest)


# --- suggestions ---------------------------------------------------------------------------


def test_following_the_suggestion_reaches_the_budget_measured_on_the_compiled_program():
    loss, params, rest = _gpt()
    before = fungrad.explain(loss)(params, *rest)
    budget = before.residual_bytes // 6
    report = fungrad.explain(loss, memory_budget=budget)(params, *rest)
    suggestion = report.suggestion
    assert suggestion.meets_budget and suggestion.residual_bytes <= budget
    assert suggestion.saved_bytes == before.residual_bytes - suggestion.residual_bytes
    assert suggestion in report.candidates
    fitting = [c for c in report.candidates if c.meets_budget]
    assert suggestion.extra_backward_flops == min(c.extra_backward_flops for c in fitting)
    calls = [c for c in report.candidates if c.kind == "calls"]
    unchecked = before.residual_bytes + before.input_residual_bytes  # as compiled: see above
    for chosen in (suggestion, calls[-1]):  # a whole-function policy and per-call checkpoints
        applied = chosen.apply(loss)
        after = fungrad.explain(applied)(params, *rest)
        assert after.residual_bytes == chosen.residual_bytes
        compiled = _compiled_residual_bytes(applied, params, *rest)
        assert compiled - after.input_residual_bytes <= 1.1 * chosen.residual_bytes
        assert compiled < unchecked / 2


def test_checkpoints_around_calls_change_what_is_kept_not_the_gradient():
    report = fungrad.explain(_dot_tanh, memory_budget=0)(W)
    (calls,) = [c for c in report.candidates if c.kind == "calls"]
    assert calls.where == (f"test_explain.py:{_line_of('jnp.tanh', _dot_tanh)} `y = jnp.tanh(h)`",)

    def by_hand(w):  # _dot_tanh with that line in a checkpoint: only its input h is kept
        h = X @ w
        y = jax.checkpoint(jnp.tanh)(h)
        return jnp.sum(y)

    assert calls.residual_bytes == _jax_residual_bytes(by_hand, W) == 2 * 4 * 4
    assert_close(fungrad.grad(calls.apply(_dot_tanh))(W), jax.grad(_dot_tanh)(W))
    assert_close(jax.grad(calls.apply(_dot_tanh))(W), jax.grad(_dot_tanh)(W))


def test_no_checkpoint_is_suggested_when_the_residuals_fit():
    report = fungrad.explain(_dot_tanh, memory_budget=10_000)(W)
    assert report.suggestion.kind == "none" and report.suggestion.apply(_dot_tanh) is _dot_tanh
    assert "no checkpoint needed" in str(report)


# --- the table, the data, the arguments ------------------------------------------------------


def test_the_table_names_the_users_file_and_line():
    report = fungrad.explain(_dot_tanh, memory_budget=0)(W)
    text = str(report)
    assert f"test_explain.py:{_line_of('jnp.tanh', _dot_tanh)} (_dot_tanh)  y = jnp.tanh(h)" in text
    assert "residuals 64 B" in text and "backward/forward" in text
    assert "jax.checkpoint" in text and "<- suggested" in text
    assert repr(report).startswith("Report(_dot_tanh: residual_bytes=64")


def test_aux_non_scalar_outputs_and_shape_dtype_structs():
    def f(w):
        y = jnp.sin(X @ w)
        return y, {"norm": jnp.sum(y)}

    with_aux = fungrad.explain(f, has_aux=True)(W)
    plain = fungrad.explain(lambda w: f(w)[0])(W)
    assert with_aux.residual_bytes == plain.residual_bytes == _jax_residual_bytes(
        lambda w: f(w)[0], W)
    abstract = fungrad.explain(f, has_aux=True)(jax.ShapeDtypeStruct(W.shape, W.dtype))
    assert abstract.records == with_aux.records


@pytest.mark.parametrize("budget", [-1, "1MB", True, float("nan"), float("inf")])
def test_a_bad_budget_is_refused(budget):
    with pytest.raises(ValueError, match="memory_budget must be a number of bytes"):
        fungrad.explain(_dot_tanh, memory_budget=budget)


def test_bad_arguments_are_refused_with_what_to_do():
    with pytest.raises(TypeError, match="explain"):
        fungrad.explain(3)
    with pytest.raises(ValueError, match="argnums=1 is out of bounds"):
        fungrad.explain(_dot_tanh, argnums=1)(W)
    with pytest.raises(TypeError, match=r"explain: args\[0\] has dtype int32.*pass floats"):
        fungrad.explain(_dot_tanh)(jnp.ones((3, 4), jnp.int32))
    with pytest.raises(TypeError, match=r"explain: args\[0\] is a traced value: call .* outside jax.jit"):
        jax.jit(lambda w: fungrad.explain(_dot_tanh)(w).residual_bytes)(W)


def test_explain_uses_no_jax_differentiation():
    from tests.test_guard import guard

    expected = _jax_residual_bytes(_dot_tanh, W)
    with guard():
        report = fungrad.explain(_dot_tanh, memory_budget=0)(W)
        applied = fungrad.explain(report.suggestion.apply(_dot_tanh))(W)
    assert report.residual_bytes == expected and applied.residual_bytes == 0
