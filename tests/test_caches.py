"""The program cache under load: bounded, shared across threads, never mixing programs up."""

import resource
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fungrad
from fungrad._src import capture
from tests.harness import assert_close


def _rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # pragma: no cover


def test_a_new_constant_per_call_reuses_one_program_and_memory_stays_flat():
    x = jnp.ones(16)
    fungrad.grad(lambda x: jnp.sum(jnp.sin(x * 0.5)))(x)  # warm jax's own caches
    fungrad.grad(lambda x: jnp.sum(jnp.sin(x * 0.5)))(x)
    start = _rss_mb()
    for i in range(2000):
        c = 1.0 + i / 2000
        g = fungrad.grad(lambda x: jnp.sum(jnp.sin(x * c)))(x)  # noqa: B023
    assert_close(g, jax.grad(lambda x: jnp.sum(jnp.sin(x * c)))(x))
    assert _rss_mb() - start < 100


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_eight_threads_share_the_cache_with_evictions(monkeypatch, jit):
    monkeypatch.setattr(capture, "_CACHE_SIZE", 4)  # evict all the time
    monkeypatch.setattr(capture, "_SUB_KEYS_SIZE", 8)
    funs = [lambda x, k=k: jnp.sum(jnp.sin(x) ** (k + 1)) for k in range(6)]
    x = jnp.linspace(0.1, 1.0, 5)
    want = [jax.grad(f)(x) for f in funs]
    errors: list[BaseException] = []

    def worker(seed: int):
        rng = np.random.default_rng(seed)
        try:
            for _ in range(200 if not jit else 40):
                k = int(rng.integers(len(funs)))
                g = fungrad.grad(funs[k])
                got = jax.jit(g)(x) if jit else g(x)
                np.testing.assert_allclose(got, want[k], rtol=1e-5)
        except BaseException as err:  # reported by the main thread
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
