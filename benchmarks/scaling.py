"""Trace time of derivatives of nested control flow against nesting depth, fungrad against jax
in one process: python benchmarks/scaling.py --help.

Each level of a nesting wraps the next one in a `lax.cond`, a three-branch `lax.switch`, a
`lax.scan` of length 2 or a `lax.while_loop` of two iterations, whose body calls the next
level; the innermost level is `sin(x) * x`. The program grows linearly with the depth, and
so should the time to trace its derivative.
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
from jax import lax

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import fungrad  # noqa: E402


def nested(kind: str, depth: int) -> Callable:
    """`depth` levels of `kind` around `sin(x) * x`, each a fresh Python function."""
    if depth == 0:
        return lambda x: jnp.sin(x) * x
    inner = nested(kind, depth - 1)

    def level(y):
        return inner(y) + jnp.cos(y)

    if kind == "cond":
        return lambda x: lax.cond(x > 0, level, jnp.tanh, x)
    if kind == "switch":
        return lambda x: lax.switch(jnp.int32(x > 0), [jnp.tanh, level, jnp.sin], x)
    if kind == "scan":
        return lambda x: lax.scan(lambda c, _: (0.5 * level(c), None), x, length=2)[0]
    if kind == "while":
        return lambda x: lax.while_loop(lambda s: s[0] < 2, lambda s: (s[0] + 1, 0.5 * level(s[1])),
                                        (0, x))[1]
    raise ValueError(f"unknown nesting kind {kind!r}")


def transform(lib, name: str, f: Callable) -> Callable:
    """`name` (grad, hessian or jvp) of the scalar function `f`, taken with `lib`."""
    if name == "grad":
        return lib.grad(f)
    if name == "hessian":
        return lib.hessian(f)
    if name == "jvp":
        return lambda x: lib.jvp(f, (x,), (jnp.ones_like(x),))
    raise ValueError(f"unknown transform {name!r}")


# jax has no reverse mode through while loops to compare fungrad's with.
CASES = [(kind, t) for kind in ("cond", "switch", "scan", "while")
         for t in (("jvp",) if kind == "while" else ("grad", "hessian", "jvp"))]


def trace_times(kind: str, name: str, depth: int, reps: int) -> dict[str, float]:
    """Median seconds of `jax.make_jaxpr` of the derivative per library, each trace from
    scratch (a fresh function, fungrad's caches emptied), the order alternating."""
    times: dict[str, list[float]] = {"fungrad": [], "jax": []}
    for r in range(reps):
        for lib in (fungrad, jax) if r % 2 == 0 else (jax, fungrad):
            fungrad.clear_caches()
            fn = transform(lib, name, nested(kind, depth))
            start = time.perf_counter()
            jax.make_jaxpr(fn)(0.5)
            times[lib.__name__].append(time.perf_counter() - start)
    return {lib: statistics.median(t) for lib, t in times.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depths", type=int, nargs="*", default=[1, 2, 4, 8, 16, 32, 64, 100],
                        help="nesting depths to measure")
    parser.add_argument("--quick", action="store_true", help="depths 1, 2, 4 and 8 only")
    parser.add_argument("--reps", type=int, default=3, help="traces per measurement (median)")
    parser.add_argument("--only", nargs="*", help="nesting kinds to run (cond, switch, scan, while)")
    args = parser.parse_args(argv)
    depths = [1, 2, 4, 8] if args.quick else args.depths
    # jax and fungrad recurse once or more per level when tracing; 100 levels need more room.
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 200 * max(depths) + 1000))

    print(f"jax {jax.__version__}, backend {jax.default_backend()}")
    header = "| kind   | transform | depth | fungrad s |    jax s | ratio |"
    print(header)
    print("|" + "|".join("-" * len(c) for c in header.split("|")[1:-1]) + "|")
    worst = 0.0
    for kind, name in CASES:
        if args.only and kind not in args.only:
            continue
        trace_times(kind, name, 1, 2)  # warm-up: the first trace of a kind pays for imports
        for depth in depths:
            t = trace_times(kind, name, depth, args.reps)
            worst = max(worst, t["fungrad"] / t["jax"])
            print(f"| {kind:<6} | {name:<9} | {depth:>5} | {t['fungrad']:>9.4f} | {t['jax']:>8.4f} | "
                  f"{t['fungrad'] / t['jax']:>5.2f} |", flush=True)
    print(f"(ratio fungrad / jax; worst {worst:.2f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
