"""Sparse Jacobians and Hessians: fungrad (coloring + compressed products) against jax's dense
ones, in one process: python benchmarks/sparse.py --sizes 1000,10000,100000

Two workloads:
- hessian: the chained Rosenbrock function, f(x) = sum 100 (x_{i+1} - x_i^2)^2 + (1 - x_i)^2
  (a tridiagonal Hessian): `fungrad.sparse_hessian` against `jax.hessian`;
- jacobian: the residual r(u) = A u + u^3 - b of a 2-D Laplacian on a side x side grid
  (side = round(sqrt(n)); 5 entries a row): `fungrad.sparse_jacobian` against `jax.jacfwd`.

Both are jitted; "time" is the steady state (the median of --reps calls after a warm-up),
"memory" the compiled program's temporaries and outputs (`memory_analysis()`: temp_size +
output_size; for the dense Hessian XLA needs no temporaries beyond its n x n output),
"prep" fungrad's one-time preparation (sparsity detection and coloring, numpy on the
CPU), "compile" the first jitted call. The dense program is skipped where its output and
temporaries would exceed --mem-limit-gb (checked from the compiled program before it runs).
Where it runs, the sparse result is checked against it: equal entries on the pattern and
no dense nonzero off it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import fungrad  # noqa: E402


def rosenbrock(x: jax.Array) -> jax.Array:
    return jnp.sum(100.0 * (x[1:] - x[:-1] ** 2) ** 2 + (1.0 - x[:-1]) ** 2)


def laplacian_residual(u: jax.Array) -> jax.Array:
    side = int(round(u.size ** 0.5))
    grid = jnp.pad(u.reshape(side, side), 1)
    au = (4 * grid[1:-1, 1:-1] - grid[:-2, 1:-1] - grid[2:, 1:-1] - grid[1:-1, :-2]
          - grid[1:-1, 2:])
    return (au + u.reshape(side, side) ** 3 - 1.0).reshape(-1)


def _timed(fn: Callable) -> tuple:
    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    return out, time.perf_counter() - start


def _steady(fn: Callable, x: jax.Array, reps: int) -> float:
    jax.block_until_ready(fn(x))
    return statistics.median(_timed(lambda: fn(x))[1] for _ in range(reps))


def _compiled(fn: Callable, x: jax.Array) -> tuple:
    """The compiled program, its temporary and output bytes, and the seconds to compile."""
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(x).compile()
    seconds = time.perf_counter() - start
    mem = compiled.memory_analysis()
    return compiled, int(mem.temp_size_in_bytes), int(mem.output_size_in_bytes), seconds


def run_case(kind: str, n: int, reps: int, mem_limit: float) -> dict:
    if kind == "hessian":
        fun, dense_fn = rosenbrock, jax.hessian(rosenbrock)
        x = jnp.asarray(np.random.default_rng(0).uniform(-1.0, 1.0, n), jnp.float32)
        prepared = fungrad.sparse_hessian(fun)
    else:
        side = int(round(n ** 0.5))
        n = side * side
        fun, dense_fn = laplacian_residual, jax.jacfwd(laplacian_residual)
        x = jnp.asarray(np.random.default_rng(0).uniform(0.0, 1.0, n), jnp.float32)
        prepared = fungrad.sparse_jacobian(fun)
    row: dict = {"workload": kind, "n": n}
    _, row["prep_s"] = _timed(lambda: jax.eval_shape(prepared, x))  # detection and coloring
    row["colors"], row["mode"] = prepared.num_colors, prepared.mode
    sparse_compiled, temp, out, row["sparse_compile_s"] = _compiled(prepared, x)
    row["sparse_mem"] = temp + out
    row["sparse_s"] = _steady(sparse_compiled, x, reps)
    row["nnz"] = int(prepared.sparsity.nse)
    if 4.0 * n * n > mem_limit:  # the dense float32 output alone
        return row
    dense_compiled, temp, out, row["dense_compile_s"] = _compiled(dense_fn, x)
    if temp + out > mem_limit:
        return row
    row["dense_mem"] = temp + out
    row["dense_s"] = _steady(dense_compiled, x, reps)
    row["equal"] = _same_values(sparse_compiled(x), dense_compiled(x))
    return row


def _same_values(sparse_result, dense: jax.Array) -> bool:
    rows, cols = np.asarray(sparse_result.indices).T
    dense = np.array(dense)  # a copy, written below
    on = dense[rows, cols].copy()
    dense[rows, cols] = 0
    off = float(np.abs(dense).max(initial=0.0))
    scale = max(float(np.abs(on).max(initial=0.0)), 1.0)
    return bool(np.allclose(np.asarray(sparse_result.data), on, rtol=1e-5, atol=1e-5 * scale)
                and off <= 1e-6 * scale)


def _fmt_bytes(b: float | None) -> str:
    if b is None:
        return "-"
    return f"{b / 2 ** 20:.1f} MB" if b >= 2 ** 20 else f"{b / 2 ** 10:.1f} kB"


def table(rows: list[dict]) -> str:
    lines = ["| workload | n | colors (mode) | fungrad time | jax dense time | speedup | "
             "fungrad memory | jax memory | fungrad prep | compile fungrad / jax | values equal |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        dense = "dense_s" in r
        lines.append(
            f"| {r['workload']} | {r['n']:,} | {r['colors']} ({r['mode']}) | "
            f"{r['sparse_s'] * 1e3:.3f} ms | "
            + (f"{r['dense_s'] * 1e3:.1f} ms | {r['dense_s'] / r['sparse_s']:.0f}x | " if dense
               else "OOM/skipped | - | ")
            + f"{_fmt_bytes(r['sparse_mem'])} | {_fmt_bytes(r.get('dense_mem'))} | "
            f"{r['prep_s']:.2f} s | {r['sparse_compile_s']:.2f} s / "
            + (f"{r['dense_compile_s']:.2f} s" if "dense_compile_s" in r else "-")
            + f" | {r['equal'] if 'equal' in r else '-'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000", help="comma-separated n (default: a smoke run)")
    parser.add_argument("--workloads", default="hessian,jacobian")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--mem-limit-gb", type=float, default=8.0)
    args = parser.parse_args(argv)
    rows = []
    for n in (int(s) for s in args.sizes.split(",")):
        for kind in args.workloads.split(","):
            rows.append(run_case(kind, n, args.reps, args.mem_limit_gb * 2 ** 30))
            print(rows[-1], flush=True)
    print(f"\njax {jax.__version__}, {jax.devices()[0].platform}, float32\n")
    print(table(rows))
    return rows


if __name__ == "__main__":
    main()
