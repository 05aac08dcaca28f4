"""fungrad.testing.check_grads: passes on right rules, fails loudly on a wrong one."""

import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from fungrad import extend
from fungrad.testing import check_grads


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_passes_on_correct_rules(dtype):
    x = jnp.asarray([0.3, -1.2, 2.0], dtype)
    y = jnp.asarray([1.5, 0.7, -0.4], dtype)
    check_grads(lambda x, y: jnp.sum(jnp.tanh(x) * y**2 + jnp.exp(x * y)), (x, y), order=2)


def test_pytree_args_and_outputs():
    params = {"w": jnp.ones((2, 3)), "b": jnp.zeros(3)}
    x = jnp.arange(2.0)
    f = lambda p, x: {"out": jnp.sin(x @ p["w"] + p["b"]), "norm": jnp.sum(p["w"] ** 2)}
    check_grads(f, (params, x), order=1)


def test_reverse_only():
    check_grads(lambda x: jnp.outer(jnp.sin(x), x), (jnp.linspace(0.0, 1.0, 4),), modes=("rev",))


@pytest.fixture
def wrong_sin_rule():
    saved = extend.jvp_rules[lax.sin_p]
    extend.defjvp(lax.sin_p, lambda g, x, accuracy: g * lax.sin(x))  # wrong: should be cos
    yield
    extend.jvp_rules[lax.sin_p] = saved


@pytest.mark.parametrize("modes", [("fwd",), ("rev",), ("fwd", "rev")])
def test_wrong_rule_fails_naming_mode_argument_and_primitive(wrong_sin_rule, modes):
    x = jnp.asarray([0.5, 1.0, 1.5], "float64")
    with pytest.raises(AssertionError) as info:
        check_grads(lambda x: jnp.sum(jnp.exp(x) * jnp.sin(x)), (x,), order=1, modes=modes)
    message = str(info.value)
    assert "argument 0" in message
    assert ("forward mode" if "fwd" in modes else "reverse mode") in message
    assert "primitive 'sin'" in message
    assert "differ by" in message


def test_wrong_transpose_rule_breaks_the_adjoint_identity():
    saved = extend.transpose_rules[lax.neg_p]
    extend.transpose_rules[lax.neg_p] = lambda ct, x: [ct]  # wrong: should be -ct
    try:
        with pytest.raises(AssertionError, match="adjoint identity|reverse mode"):
            check_grads(lambda x: jnp.sum(-x * jnp.sin(x)), (np.array([0.5, 1.0]),), order=1)
    finally:
        extend.transpose_rules[lax.neg_p] = saved
