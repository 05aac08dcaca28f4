"""The engine end to end on small programs that mix primitives, jit and custom rules."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.harness import check_all


def _mixed(x, y):
    a = jnp.where(x > 0, x, y)
    b = jax.nn.relu(a) + jax.nn.softmax(a).sum()
    return jnp.sum(b * jnp.sin(y)) + jax.nn.logsumexp(a)


def _mlp(w, x):
    return jnp.tanh(x @ w).sum()


def _nested_jit(x):
    inner = jax.jit(lambda u: jnp.exp(u) * u)
    return jax.jit(lambda v: inner(v) + inner(2.0 * v))(x)


PROGRAMS = {
    "mixed": (_mixed, lambda rng, dt: (rng.standard_normal(5).astype(dt),
                                         rng.standard_normal(5).astype(dt))),
    "mlp": (_mlp, lambda rng, dt: (rng.standard_normal((3, 4)).astype(dt),
                                     rng.standard_normal((2, 3)).astype(dt))),
    "nested_jit": (_nested_jit, lambda rng, dt: (rng.standard_normal(4).astype(dt),)),
}


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", sorted(PROGRAMS))
def test_program(name, dtype):
    f, make_args = PROGRAMS[name]
    check_all(f, make_args(np.random.default_rng(0), dtype))
