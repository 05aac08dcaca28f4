"""The examples run, at a tiny size, and the derivatives they rely on equal jax's."""

import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fungrad
from tests.harness import assert_close

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def _load(name):
    spec = importlib.util.spec_from_file_location(f"examples_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _assert_same_value_and_grad(loss, *args, static_argnums=()):
    """fungrad.value_and_grad equals jax.value_and_grad, each in one jit (eager is slower)."""
    run = lambda lib: jax.jit(lib.value_and_grad(loss), static_argnums=static_argnums,
                              compiler_options=_FAST_COMPILE)(*args)
    assert_close(run(fungrad), run(jax))


def test_readme_lists_every_example():
    readme = (EXAMPLES / "README.md").read_text()
    for script in sorted(EXAMPLES.glob("*.py")):
        assert f"python examples/{script.name}" in readme, f"{script.name} missing from README"


def test_mnist_mlp():
    pytest.importorskip("sklearn")
    ex = _load("mnist_mlp")
    (x, y), _ = ex.load_data()
    params = ex.init_mlp(jax.random.key(0), [64, 16, 10])
    params = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), params)
    _assert_same_value_and_grad(ex.loss_fn, params, x[:16], y[:16])
    accuracy = ex.main(["--epochs", "1", "--hidden", "16", "--batch-size", "16"])
    assert accuracy > 0.5, "one epoch should already beat chance (0.1) by far"


def test_char_transformer():
    ex = _load("char_transformer")
    assert len(ex.load_text(1000)) == 1000
    vocab, seq_len, heads = 7, 6, 2
    params = ex.init_params(jax.random.key(0), vocab, seq_len, d=8, layers=1)
    params = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), params)
    batch = jnp.asarray(np.random.default_rng(0).integers(0, vocab, (2, seq_len + 1)), jnp.int32)
    _assert_same_value_and_grad(ex.loss_fn, params, batch, heads, static_argnums=2)
    loss = ex.main(["--steps", "2", "--batch-size", "2", "--seq-len", "8", "--d-model", "8",
                    "--heads", "2", "--layers", "1", "--max-chars", "3000", "--sample-len", "4"])
    assert np.isfinite(loss)


def test_newton_cg():
    ex = _load("newton_cg")
    x, y = ex.make_problem(40, 6, condition=1e3)
    loss = ex.make_loss(x, y)
    w = jnp.linspace(-0.5, 0.5, 6)
    hessian, g = jax.jit(lambda w: (jax.hessian(loss)(w), jax.grad(loss)(w)))(w)
    step = ex.conjugate_gradient(lambda v: fungrad.hvp(loss, (w,), (v,))[0], -g, iters=30)
    assert_close(step, jnp.linalg.solve(hessian, -g), rtol=1e-8)
    newton, gd = ex.main(["--n", "40", "--dim", "6", "--newton-steps", "6", "--cg-iters", "12",
                          "--gd-steps", "20"])
    assert newton < gd, "Newton-CG should beat gradient descent on a badly conditioned problem"


def test_pictures(tmp_path):
    pytest.importorskip("matplotlib")
    ex = _load("pictures")
    x0 = jnp.float64(0.3)
    assert_close(fungrad.hvp(ex.g, (x0,), (jnp.ones_like(x0),))[0], jax.hessian(ex.g)(x0))
    assert_close(fungrad.grad(ex.loss_2d)(jnp.array([0.2, -0.4])),
                 jax.grad(ex.loss_2d)(jnp.array([0.2, -0.4])))
    paths = ex.main([str(tmp_path / "out"), "--points", "12", "--steps", "5"])
    assert len(paths) == 3
    for path in paths:
        assert pathlib.Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path


def test_custom_rules():
    ex = _load("custom_rules")
    results = ex.main(["--points", "4"])
    xs = jnp.linspace(-20.0, 100.0, 4, dtype=jnp.float32)
    assert_close(results["log1pexp"], jax.vmap(jax.grad(ex.log1pexp))(xs))
    assert_close(results["log1pexp"], jax.nn.sigmoid(xs))
    clip_loss = lambda w: 100.0 * ex.clip_gradient(w, 1.0) ** 2
    assert_close(results["clip"], jax.grad(clip_loss)(3.0))
    safe, away = results["safe_norm"]
    assert_close(safe, jax.grad(ex.safe_norm)(jnp.zeros(3)))
    assert not jnp.any(jnp.isnan(safe))
    assert_close(away, jax.grad(lambda v: jnp.linalg.norm(v))(jnp.array([3.0, 4.0, 0.0])))
