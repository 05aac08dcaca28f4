"""Randomness and plumbing: keys flow through differentiated code, annotations survive."""

import jax
import jax.extend.random as jax_random
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.ad_checkpoint import checkpoint_name
from jax.experimental.shard_alike import shard_alike
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import fungrad
from fungrad import coverage
from tests.harness import assert_close, check_all

DTYPES = [np.float32, np.float64]


def _x(shape, dtype, seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def _random_loss(x, key):
    # normal noise times x, then dropout: split, fold_in, random_bits, wrap/unwrap.
    k1, k2 = jax.random.split(key)
    k2 = jax.random.fold_in(k2, 7)
    y = jax.random.normal(k1, x.shape, x.dtype) * x
    keep = jax.random.bernoulli(k2, 0.7, x.shape)
    return jnp.sum(jnp.where(keep, jnp.sin(y) / 0.7, 0.0))


@pytest.mark.parametrize("dtype,make_key", [(np.float32, jax.random.PRNGKey),
                                            (np.float64, jax.random.key)], ids=["raw", "typed"])
def test_keys_flow_through_grad(dtype, make_key):
    x, key = _x((3, 4), dtype), make_key(0)
    assert_close(fungrad.grad(_random_loss)(x, key), jax.grad(_random_loss)(x, key))
    assert_close(jax.jit(fungrad.grad(_random_loss))(x, key),
                 jax.jit(jax.grad(_random_loss))(x, key))


@pytest.mark.parametrize("dtype", DTYPES)
def test_random_code_all_oracles(dtype):
    key = jax.random.key(1)
    check_all(lambda x: _random_loss(x, key), [_x((5,), dtype)], order=2)


def test_traced_seed_and_rng_bit_generator():
    # random_seed from a traced integer; rng_bit_generator's key passes alongside x.
    def f(x, seed, raw):
        noise = jax.random.uniform(jax.random.key(seed), x.shape, x.dtype)
        _, bits = lax.rng_bit_generator(raw, x.shape, dtype=jnp.uint32)
        return jnp.sum(jnp.cos(x * noise) * bits.astype(x.dtype))

    args = (_x((2, 3), np.float64), jnp.int32(3), jnp.arange(4, dtype=jnp.uint32))
    assert_close(fungrad.grad(f)(*args), jax.grad(f)(*args))
    ct = jnp.float64(1.5)
    _, pullback = fungrad.vjp(f, *args)
    _, jax_pullback = jax.vjp(f, *args)
    assert_close(pullback(ct), jax_pullback(ct))


def test_threefry_has_zero_derivative():
    def f(x, key, count):
        bits = jax_random.threefry_2x32(key, count)
        return x * (bits >> 9).astype(x.dtype)

    args = (_x((4,), np.float64), jnp.array([1, 2], jnp.uint32), jnp.arange(4, dtype=jnp.uint32))
    assert_close(fungrad.grad(lambda *a: f(*a).sum())(*args), jax.grad(lambda *a: f(*a).sum())(*args))
    rows = {row.name: row.status for row in coverage.coverage_table()}
    for name in ("random_bits", "random_seed", "random_split", "random_fold_in",
                 "threefry2x32", "rng_bit_generator"):
        assert rows[name] == "zero-derivative", name


def _mesh():
    return jax.sharding.Mesh(np.array(jax.devices()[:1]), ("d",))


def _prims_of(jaxpr) -> list[str]:
    found = []
    for eqn in jaxpr.eqns:
        found.append(str(eqn.primitive))
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    found += _prims_of(inner)
    return found


ANNOTATED = [
    ("sharding_constraint", "sharding_constraint",
     lambda x, y: jnp.sin(lax.with_sharding_constraint(x * y, NamedSharding(_mesh(), P()))) * y),
    ("device_put", "device_put",
     lambda x, y: jnp.sin(jax.device_put((x, y * x), jax.devices()[0])[1]) * x),
    ("optimization_barrier", "optimization_barrier",
     lambda x, y: jnp.sin(x) * lax.optimization_barrier((jnp.sin(x), x * y))[1]),
    ("checkpoint_name", "name", lambda x, y: jnp.sin(checkpoint_name(x * y, "h")) * x),
    ("shard_alike", "shard_alike",
     lambda x, y: (lambda a, b: jnp.sin(a) * b)(*shard_alike(x * y, jnp.sin(y)))),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name,prim,f", ANNOTATED, ids=[c[0] for c in ANNOTATED])
def test_annotation_derivative_passes_through(name, prim, f, dtype):
    args = [_x((2, 3), dtype, 1), _x((2, 3), dtype, 2)]
    check_all(f, args, order=2 if dtype == np.float64 else 1)
    # The annotation is kept in fungrad's reverse pass, in the primal and cotangent parts.
    loss = lambda *a: jnp.sum(f(*a))  # noqa: E731
    found = _prims_of(jax.make_jaxpr(fungrad.grad(loss, argnums=(0, 1)))(*args).jaxpr)
    assert found.count(prim) >= (1 if prim == "name" else 2), found


def test_optimization_barrier_fences_tangents():
    f = ANNOTATED[2][2]
    args = (_x((3,), np.float64), _x((3,), np.float64, 1))
    jaxpr = jax.make_jaxpr(lambda a, t: fungrad.jvp(f, a, t))(args, args).jaxpr
    barriers = [e for e in jaxpr.eqns if str(e.primitive) == "optimization_barrier"]
    assert len(barriers) == 2 and all(len(e.invars) == 2 for e in barriers)


def test_device_put_with_one_zero_tangent():
    # Only the operand with a tangent moves in the tangent computation.
    def f(x, n):
        a, b = jax.device_put((x, n), jax.devices()[0])
        return jnp.sum(a * b)

    args = (_x((4,), np.float64), jnp.arange(4))
    assert_close(fungrad.grad(f)(*args), jax.grad(f)(*args))


def test_shard_alike_with_one_zero_cotangent():
    # Only the first output is used: its cotangent goes back alone, with no annotation to
    # share (as in jax); the second operand gets none.
    def f(x, y):
        a, _ = shard_alike(x * y, y)
        return jnp.sum(jnp.sin(a))

    args = (_x((2, 3), np.float64), _x((2, 3), np.float64, 1))
    assert_close(fungrad.grad(f, argnums=(0, 1))(*args), jax.grad(f, argnums=(0, 1))(*args))
    x, y = args  # forward mode with a zero tangent for the second operand
    assert_close(fungrad.jvp(lambda x: shard_alike(x, y), (x,), (y,)),
                 jax.jvp(lambda x: shard_alike(x, y), (x,), (y,)))
