"""Reverse mode through a while loop, which jax refuses, against jax's grad of the same loop
as a scan over the known trip count: python benchmarks/while_loop.py --help.

The loop is a damped nonlinear recurrence on a vector carry. fungrad differentiates the
`lax.while_loop` (trip count a traced argument, so the program does not depend on it);
jax differentiates a `lax.fori_loop` with static bounds (a scan, which stores one
residual per trip). Both are jitted; the table gives the steady-state time (median of
repeats), the compiled program's temporary memory, and their ratios.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import fungrad  # noqa: E402


def _step(x):
    return lambda i, c: 0.999 * c + 0.01 * jnp.sin(c) * x


def _median_time(fun, *args, repeats: int) -> float:
    jax.block_until_ready(fun(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fun(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(trips: int, width: int, repeats: int) -> dict:
    x = jnp.linspace(-1.0, 1.0, width, dtype=jnp.float32)
    ours = jax.jit(fungrad.grad(lambda x, n: jnp.sum(lax.while_loop(
        lambda s: s[0] < n, lambda s: (s[0] + 1, _step(x)(s[0], s[1])), (0, x))[1])))
    ref = jax.jit(jax.grad(lambda x: jnp.sum(lax.fori_loop(0, trips, _step(x), x))))
    n = np.int32(trips)
    g, g_ref = ours(x, n), ref(x)
    scale = float(jnp.max(jnp.abs(g_ref))) or 1.0
    return {
        "trips": trips,
        "err": float(jnp.max(jnp.abs(g - g_ref))) / scale,
        "time": _median_time(ours, x, n, repeats=repeats),
        "time_jax": _median_time(ref, x, repeats=repeats),
        "mem": ours.lower(x, n).compile().memory_analysis().temp_size_in_bytes,
        "mem_jax": ref.lower(x).compile().memory_analysis().temp_size_in_bytes,
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trips", type=int, nargs="+", default=[10, 1_000, 100_000])
    parser.add_argument("--width", type=int, default=1024, help="size of the carried vector")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--slots", type=int, default=64, help="fungrad.while_snapshots(slots)")
    args = parser.parse_args(argv)
    print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}, carry {args.width} x float32, "
          f"fungrad.while_snapshots({args.slots})\n")
    print("| trips | fungrad time | jax (scan) time | ratio | fungrad temp MB | jax temp MB | "
          "mem ratio | rel. err |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for trips in args.trips:
        with fungrad.while_snapshots(args.slots):
            r = measure(trips, args.width, args.repeats)
        print(f"| {trips:,} | {r['time'] * 1e3:.2f} ms | {r['time_jax'] * 1e3:.2f} ms | "
              f"{r['time'] / r['time_jax']:.2f} | {r['mem'] / 1e6:.2f} | {r['mem_jax'] / 1e6:.2f} | "
              f"{r['mem'] / max(r['mem_jax'], 1):.3f} | {r['err']:.1e} |", flush=True)


if __name__ == "__main__":
    main()
