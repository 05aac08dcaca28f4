"""Chunked Jacobians at a memory budget: compiled temporary memory and time, against unchunked.

A 512 x 4096 Jacobian through an MLP layer, y = W2 tanh(W1 x) (hidden 2048, float32),
by fungrad.jacfwd and fungrad.jacrev, unchunked and at budgets of 1/2, 1/8 and 1/32 of
the unchunked program's temporary memory (XLA's temp_size_in_bytes). Prints a markdown
table; checks each budget is met and each result equals the unchunked one to rounding.

    python benchmarks/chunking.py
"""

import time

import jax
import jax.numpy as jnp
import numpy as np

import fungrad


def _timed(fun, x, reps=3):
    fun(x).block_until_ready()
    best = np.inf
    for _ in range(reps):
        start = time.perf_counter()
        fun(x).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return best


def main():
    k1, k2 = jax.random.split(jax.random.key(0))
    w1 = jax.random.normal(k1, (2048, 4096), jnp.float32) / 64.0
    w2 = jax.random.normal(k2, (512, 2048), jnp.float32) / 45.0
    f = lambda x: w2 @ jnp.tanh(w1 @ x)  # noqa: E731
    x = jnp.linspace(-1.0, 1.0, 4096, dtype=jnp.float32)
    print("| transform | budget | temp MiB | fits | choice s | run ms | max abs diff |")
    print("|---|---|---|---|---|---|---|")
    for name in ("jacfwd", "jacrev"):
        transform = getattr(fungrad, name)
        full = jax.jit(transform(f)).lower(x).compile().memory_analysis().temp_size_in_bytes
        ref = jax.jit(transform(f))(x)
        base = 1e3 * _timed(jax.jit(transform(f)), x)
        print(f"| {name} | none | {full / 2**20:.2f} | - | - | {base:.1f} | 0 |")
        for frac in (2, 8, 32):
            budget = full // frac
            start = time.perf_counter()
            lowered = jax.jit(transform(f, memory_budget=budget)).lower(x)
            choice = time.perf_counter() - start
            temp = lowered.compile().memory_analysis().temp_size_in_bytes
            run = jax.jit(transform(f, memory_budget=budget))
            diff = float(jnp.abs(run(x) - ref).max())
            assert diff <= 1e-6, diff
            print(f"| {name} | 1/{frac} | {temp / 2**20:.2f} | {temp <= budget} | {choice:.2f} | "
                  f"{1e3 * _timed(run, x):.1f} | {diff:.1e} |")


if __name__ == "__main__":
    main()
