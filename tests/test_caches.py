"""fungrad's caches under load: bounded in entries and bytes, freed with their programs,
shared across threads, never mixing programs up; eager programs compiled once it pays."""

import gc
import resource
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fungrad
from fungrad._src import api, caching, capture
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
    monkeypatch.setattr(capture._programs, "max_entries", 4)  # evict all the time
    monkeypatch.setattr(capture._sub_keys, "max_entries", 8)
    monkeypatch.setattr(api._dispatches, "max_entries", 2)
    monkeypatch.setattr(api._compile_cost, "predict", lambda size: 0.0)  # compile at once
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


def test_an_lru_keeps_its_newest_entries_within_entries_and_bytes():
    cache = caching.LRU("test", max_entries=3, max_bytes=100, size=len)
    for key in "abcd":
        cache.put(key, "x" * 10)
    assert [cache.get(k) for k in "abcd"] == [None, "x" * 10, "x" * 10, "x" * 10]
    cache.put("big", "y" * 95)  # over the byte limit with any other entry
    assert len(cache) == 1 and cache.get("big") == "y" * 95
    assert cache.put("big", "other") == "y" * 95  # the first stored wins
    caching._registry.remove(cache)


def test_a_weak_cache_forgets_an_object_when_it_dies_and_never_serves_its_id_to_another():
    calls = []

    @caching.weak_cache
    def describe(obj, n):
        calls.append(n)
        return (obj.name, n)

    class Thing:
        def __init__(self, name):
            self.name = name

    a = Thing("a")
    assert describe(a, 1) == describe(a, 1) == ("a", 1) and calls == [1]
    del a
    gc.collect()
    assert describe(Thing("tmp"), 2) == ("tmp", 2)  # may take a's id; purges a's entry
    assert describe.cache.info().entries <= 1
    for i in range(50):  # fresh objects, ids often reused: each sees its own name
        assert describe(Thing(str(i)), 1) == (str(i), 1)
    caching._registry.remove(describe.cache)


def _weak_caches():
    return [c for c in caching.cache_info() if c.name.startswith("fungrad._src.")]


def test_derived_caches_are_freed_with_their_programs_and_cleared_on_request(monkeypatch):
    monkeypatch.setattr(capture._programs, "max_entries", 4)
    fungrad.clear_caches()  # what earlier tests left (their programs may still be alive)
    x = jnp.linspace(0.1, 1.0, 5)
    for k in range(40):  # forty different programs, at most four alive
        f = lambda x, k=k: jnp.sum(jnp.sin(x) ** k)  # noqa: E731
        assert_close(fungrad.grad(f)(x), jax.grad(f)(x))
    gc.collect()
    for info in _weak_caches():
        assert info.entries <= 16, info  # what the live programs need, not forty's worth
    fungrad.clear_caches()
    gc.collect()
    assert all(info.entries == 0 for info in caching.cache_info()), caching.cache_info()
    assert_close(fungrad.grad(jnp.sin)(0.5), jax.grad(jnp.sin)(0.5))


@pytest.mark.parametrize("predicted, runs", [(1e9, 6), (0.0, 2)], ids=["never-pays", "pays"])
def test_an_eager_program_compiles_once_its_op_by_op_time_would_pay_for_it(
        monkeypatch, predicted, runs):
    monkeypatch.setattr(api._compile_cost, "predict", lambda size: predicted)
    fungrad.clear_caches()  # the program is new: its first call runs op by op
    calls = []
    original = api._value_and_grad_flat
    monkeypatch.setattr(api, "_value_and_grad_flat",
                        lambda *a: calls.append(None) or original(*a))
    f = lambda x: jnp.sum(jnp.cos(x) * x)  # noqa: E731
    x = jnp.linspace(0.1, 1.0, 5)
    for _ in range(6):
        assert_close(fungrad.grad(f)(x), jax.grad(f)(x))
    # Op by op, each call runs the flat function; compiled, it ran once, to be traced.
    assert len(calls) == runs


def test_the_compile_cost_model_learns_from_compiles_and_resists_outliers():
    model = api._CompileCost()
    assert 0 < model.predict(10) < model.predict(1000)
    for _ in range(5):  # this machine: 10 ms per equation
        model.observe(100, 0.05 + 1.0)
    assert model.predict(200) == pytest.approx(0.05 + 2.0, rel=0.01)
    model.observe(5000, 500.0)  # one program XLA takes very long over
    assert model.predict(200) == pytest.approx(0.05 + 2.0, rel=0.01)


def test_a_program_with_a_very_long_chain_of_equations_runs_op_by_op(monkeypatch):
    # XLA's compile time grows faster than linearly with such chains: never worth it.
    monkeypatch.setattr(api, "_MAX_CHAIN", 5)
    monkeypatch.setattr(api._compile_cost, "predict", lambda size: 0.0)
    fungrad.clear_caches()
    calls = []
    original = api._value_and_grad_flat
    monkeypatch.setattr(api, "_value_and_grad_flat",
                        lambda *a: calls.append(None) or original(*a))

    def chain(x):
        for _ in range(4):
            x = jnp.sin(x) * 1.5
        return jnp.sum(x)

    x = jnp.linspace(0.1, 1.0, 5)
    for _ in range(4):
        assert_close(fungrad.grad(chain)(x), jax.grad(chain)(x))
    assert len(calls) == 4  # every call op by op
