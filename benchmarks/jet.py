"""Taylor mode against nested jvp: the cost of order k, fungrad.jet against nested jax.jvp and
jax.experimental.jet, in one process: python benchmarks/jet.py --help.

For each order k every method computes the same k derivatives of a function along a path
x(t) with k random derivative terms, jitted; the table gives the run time (minimum over the
repetitions), the time to trace and compile, and the ratios fungrad / nested jvp and
fungrad / jax's jet. Nested jvp
differentiates its own derivative k times, so its program doubles with each order; a
Taylor rule is a recurrence of cost O(k^2).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import jet as jax_jet

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import fungrad  # noqa: E402
from fungrad._src.jaxutil import count_eqns  # noqa: E402

jax.config.update("jax_enable_x64", True)


def mlp() -> tuple[Callable, jax.Array]:
    """An MLP-like function of a batch of 128 inputs: three tanh layers of width 256."""
    rng = np.random.default_rng(0)
    ws = [jnp.asarray(rng.standard_normal((256, 256)) / 16) for _ in range(3)]

    def f(x):
        for w in ws:
            x = jnp.tanh(x @ w + 0.1)
        return jnp.sum(x ** 2, axis=1)

    return f, jnp.asarray(rng.standard_normal((128, 256)))


def ode_rhs() -> tuple[Callable, jax.Array]:
    """Van der Pol right-hand sides of 65536 oscillators (mu from 0.5 to 2)."""
    n = 65536
    mu = jnp.linspace(0.5, 2.0, n)

    def f(x):
        p, q = x[:n], x[n:]
        return jnp.concatenate([q, mu * (1 - p ** 2) * q - p])

    return f, jnp.linspace(-1.0, 1.0, 2 * n)


def by_nested_jvp(f: Callable, order: int) -> Callable:
    """(x, terms) -> [f, d/dt f(x(t)), ..., d^k/dt^k] at t = 0 along
    x(t) = x + sum_k terms[k] t^(k+1) / (k+1)!, by k nested jax.jvp."""
    def derivatives(g, k):
        if k == 0:
            return lambda t: [g(t)]
        lower = derivatives(g, k - 1)
        return lambda t: (lambda o: [*o[0], o[1][-1]])(jax.jvp(lower, (t,), (jnp.ones_like(t),)))

    def run(x, terms):
        path = lambda t: x + sum(s * t ** (k + 1) / math.factorial(k + 1) for k, s in enumerate(terms))
        return derivatives(lambda t: f(path(t)), order)(jnp.zeros((), x.dtype))

    return run


def by_jet(lib_jet: Callable, f: Callable) -> Callable:
    """(x, terms) -> (f(x), its k derivatives along the same path), by Taylor mode."""
    return lambda x, terms: lib_jet(f, (x,), (tuple(terms),))


def measure(fun: Callable, args: tuple, reps: int) -> tuple[float, float]:
    """(seconds per call, seconds to trace and compile), jitted. The run time is the
    minimum over `reps` calls: on a shared machine the other processes only add to it."""
    jitted = jax.jit(fun)
    start = time.perf_counter()
    jax.block_until_ready(jitted(*args))
    first = time.perf_counter() - start
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(jitted(*args))
        times.append(time.perf_counter() - start)
    run = min(times)
    return run, max(first - run, 0.0)


def eqns(fun: Callable, args: tuple) -> int:
    """The equations of the traced program (nested jaxprs counted once each)."""
    return count_eqns(jax.make_jaxpr(fun)(*args).jaxpr)


def check(f: Callable, x: jax.Array, terms: list[jax.Array]) -> None:
    """fungrad.jet and nested jvp agree (the benchmark times equal work)."""
    ours = jax.jit(by_jet(fungrad.jet, f))(x, terms)
    nested = jax.jit(by_nested_jvp(f, len(terms)))(x, terms)
    for k in range(len(terms)):
        np.testing.assert_allclose(ours[1][k], nested[k + 1], rtol=1e-8, atol=1e-8)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--orders", type=int, nargs="+", default=list(range(2, 9)))
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--only", choices=("mlp", "ode"), action="append")
    args = parser.parse_args(argv)
    workloads = {"mlp": mlp, "ode": ode_rhs}
    print("| workload | k | fungrad.jet run, ms | nested jvp run, ms | jax jet run, ms | "
          "run: / nested | run: / jax jet | compile: fungrad / nested / jax jet, s | "
          "eqns: fungrad / nested / jax jet |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.only or workloads:
        f, x = workloads[name]()
        rng = np.random.default_rng(1)
        terms = [jnp.asarray(rng.standard_normal(x.shape) / 2) for _ in range(max(args.orders))]
        check(f, x, terms[:3])
        for k in args.orders:
            funs = by_jet(fungrad.jet, f), by_nested_jvp(f, k), by_jet(jax_jet.jet, f)
            ours, nested, theirs = (measure(fun, (x, terms[:k]), args.reps) for fun in funs)
            sizes = " / ".join(str(eqns(fun, (x, terms[:k]))) for fun in funs)
            print(f"| {name} | {k} | {ours[0] * 1e3:.3f} | {nested[0] * 1e3:.3f} | "
                  f"{theirs[0] * 1e3:.3f} | {ours[0] / nested[0]:.2f} | {ours[0] / theirs[0]:.2f} | "
                  f"{ours[1]:.2f} / {nested[1]:.2f} / {theirs[1]:.2f} | {sizes} |", flush=True)


if __name__ == "__main__":
    main()
