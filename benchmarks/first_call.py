"""Eager first calls and steady state, fungrad against jax, as programs grow.

    python benchmarks/first_call.py [--quick]

Two families: a chain of N elementwise equations on one array, and a sum over a dict
of N leaves (one small array each). Per size, in one process, for `grad` from eager code:
the first call (every cache empty, jax's too), the total of the first ten calls (what
fungrad's choice between op-by-op dispatch and compiling costs), and the steady state
(the median of five calls once fungrad has compiled, or after 40 calls).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import fungrad  # noqa: E402
from fungrad._src import api  # noqa: E402


def chain(n: int):
    def f(x):
        for _ in range(n // 2):
            x = jnp.sin(x) * 1.01
        return jnp.sum(x)

    return f, jnp.linspace(0.0, 1.0, 8)


def leaves(n: int):
    def f(params):
        return sum(jnp.sum(jnp.sin(v) * v) for v in params.values())

    return f, {f"w{i}": jnp.full(4, 0.001 * i) for i in range(n)}


def _call(g, arg) -> float:
    start = time.perf_counter()
    jax.block_until_ready(g(arg))
    return time.perf_counter() - start


def _compiled_programs() -> int:
    return sum(d.compiled is not None for d, _ in api._dispatches._entries.values())


def measure(f, arg, lib: str) -> dict:
    fungrad.clear_caches()
    jax.clear_caches()
    g = (fungrad if lib == "fungrad" else jax).grad(f)
    before, compiled_at, times = _compiled_programs(), None, []
    while len(times) < 10 or (lib == "fungrad" and compiled_at is None and len(times) < 40):
        times.append(_call(g, arg))
        if compiled_at is None and _compiled_programs() > before:
            compiled_at = len(times)
    steady = statistics.median(_call(g, arg) for _ in range(5))
    return {"first": times[0], "ten": sum(times[:10]), "steady": steady, "calls": compiled_at}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes only")
    args = parser.parse_args()
    sizes = {"chain": [100, 300] if args.quick else [100, 1000, 5000],
             "leaves": [50, 250] if args.quick else [250, 1000, 5000]}
    print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}\n")
    print("| program | N | first call fungrad / jax (s) | ratio | first 10 calls fungrad / jax (s)"
          " | ratio | steady fungrad / jax (s) | ratio | compiled at call |")
    print("|---|---|---|---|---|---|---|---|---|")
    for family, make in (("chain", chain), ("leaves", leaves)):
        for n in sizes[family]:
            f, arg = make(n)
            ours, theirs = measure(f, arg, "fungrad"), measure(f, arg, "jax")
            cells = []
            for k in ("first", "ten", "steady"):
                cells += [f"{ours[k]:.3f} / {theirs[k]:.3f}", f"{ours[k] / theirs[k]:.2f}"]
            print(f"| {family} | {n} | " + " | ".join(cells) + f" | {ours['calls'] or '-'} |",
                  flush=True)


if __name__ == "__main__":
    main()
