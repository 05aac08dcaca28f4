"""fungrad against jax on the same workloads, in one process: python benchmarks/run.py --help."""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import workloads  # noqa: E402


def count_eqns(jaxpr) -> int:
    total = 0
    for eqn in jaxpr.eqns:
        total += 1
        for value in eqn.params.values():
            for item in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(item, "jaxpr", item)
                if hasattr(inner, "eqns"):
                    total += count_eqns(inner)
    return total


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def compile_stats(fn, args) -> dict:
    jitted = jax.jit(lambda *a: fn(*a))  # a fresh function: no jit cache hit
    traced, trace_s = _timed(lambda: jitted.trace(*args))
    compiled, compile_s = _timed(lambda: traced.lower().compile())
    mem = compiled.memory_analysis()
    return {"trace_s": trace_s, "compile_s": compile_s, "trace_compile_s": trace_s + compile_s,
            "temp_bytes": int(mem.temp_size_in_bytes) if mem else None,
            "arg_bytes": int(mem.argument_size_in_bytes) if mem else None,
            "eqns": count_eqns(traced.jaxpr.jaxpr), "compiled": compiled}


def interleaved_runs(compiled: dict, args, reps: int) -> dict:
    times: dict[str, list[float]] = {lib: [] for lib in compiled}
    for lib in compiled:  # warm-up
        jax.block_until_ready(compiled[lib](*args))
    for _ in range(reps):
        for lib, fn in compiled.items():
            _, dt = _timed(lambda fn=fn: jax.block_until_ready(fn(*args)))
            times[lib].append(dt)
    return {lib: statistics.median(t) for lib, t in times.items()}


def _compiled_programs() -> int:
    from fungrad._src import api

    return sum(d.compiled is not None for d, _ in api._dispatches._entries.values())


def eager_latencies(fns: dict, args, reps: int, blocks: int = 5) -> dict:
    """The steady state of eager calls: each library's median over `reps` calls, made in
    `blocks` runs of consecutive calls that alternate between the libraries, so that a
    change in the machine's load falls on both alike while each call follows one of its
    own (as in a user's loop: right after the other library's call, XLA's threads and the
    CPU caches are still busy with its work; one untimed call starts each run). fungrad
    runs a program op by op until compiling it pays (benchmarks/first_call.py measures
    those first calls), so it first warms up until it has compiled (at most 40 calls)."""
    for lib, fn in fns.items():
        before = _compiled_programs()
        for _ in range(40 if lib == "fungrad" else 1):
            jax.block_until_ready(fn(*args))
            if _compiled_programs() > before:
                break
    samples: dict[str, list[float]] = {lib: [] for lib in fns}
    per_block = max(1, -(-reps // blocks))
    for _ in range(blocks):
        for lib, fn in fns.items():
            jax.block_until_ready(fn(*args))
            for _ in range(per_block):
                _, dt = _timed(lambda fn=fn: jax.block_until_ready(fn(*args)))
                samples[lib].append(dt)
    return {lib: statistics.median(s) for lib, s in samples.items()}


def fresh_compile_stats(fns: dict, args, rounds: int) -> dict:
    """`compile_stats` per library, `rounds` times with the order alternating (the first
    compile in a process also warms jax's own caches), keeping each one's median round.

    fungrad's capture cache is emptied before each of its rounds, so every round traces
    from scratch, as jax's does.
    """
    import fungrad

    rounds_of: dict[str, list[dict]] = {lib: [] for lib in fns}
    for r in range(max(rounds, 1)):
        for lib in (list(fns) if r % 2 else list(fns)[::-1]):
            fungrad.clear_caches()
            rounds_of[lib].append(compile_stats(fns[lib], args))
    out = {}
    for lib, runs in rounds_of.items():
        runs.sort(key=lambda s: s["trace_compile_s"])
        out[lib] = runs[len(runs) // 2]
    return out


def capture_time(fn, args, reps: int) -> float:
    """fungrad's per-call tracing time inside `fn` (median over `reps` eager calls)."""
    from fungrad._src import api

    original, spent, depth = api.capture, [], [0]

    def timed(*a, **k):  # a capture nested in another (hvp's grad) is counted in it once
        depth[0] += 1
        try:
            out, dt = _timed(lambda: original(*a, **k))
        finally:
            depth[0] -= 1
        if depth[0] == 0:
            spent[-1] += dt
        return out

    api.capture = timed
    try:
        for _ in range(reps):
            spent.append(0.0)
            jax.block_until_ready(fn(*args))
    finally:
        api.capture = original
    return statistics.median(spent)


def run_workload(w: workloads.Workload, reps: int, eager_reps: int, compile_rounds: int) -> dict:
    fns = {"fungrad": w.fungrad_fn, "jax": w.jax_fn}
    stats: dict = {lib: {} for lib in fns}
    if not w.eager_only:
        stats = fresh_compile_stats(fns, w.args, compile_rounds)
        run = interleaved_runs({lib: s.pop("compiled") for lib, s in stats.items()}, w.args, reps)
        for lib in fns:
            stats[lib]["run_s"] = run[lib]
    eager = eager_latencies(fns, w.args, eager_reps) if eager_reps else {}
    for lib in fns:
        stats[lib]["eager_s"] = eager.get(lib)
    if eager_reps:
        # The share of a fungrad eager call spent tracing the user's function, against the
        # whole of jax's eager call (so that the two columns add up to fungrad's eager).
        stats["fungrad"]["trace_per_call_s"] = capture_time(w.fungrad_fn, w.args, eager_reps)
        stats["jax"]["trace_per_call_s"] = stats["jax"]["eager_s"]
    return stats


METRICS = [("run_s", "run"), ("trace_compile_s", "trace+compile"), ("eager_s", "eager"),
           ("trace_per_call_s", "eager trace"), ("temp_bytes", "temp mem"), ("eqns", "eqns")]


def ratio(a, b):
    return None if a is None or not b else a / b


def print_table(results: dict) -> None:
    header = f"| {'workload':<10} | " + " | ".join(f"{label:>13}" for _, label in METRICS) + " |"
    print(header)
    print("|" + "|".join("-" * (len(c) + 0) for c in header.split("|")[1:-1]) + "|")
    for name, r in results.items():
        if "error" in r:
            print(f"| {name:<10} | error: {r['error'][:80]}")
            continue
        cells = []
        for key, _ in METRICS:
            q = ratio(r["fungrad"].get(key), r["jax"].get(key))
            cells.append(f"{q:>13.2f}" if q is not None else f"{'-':>13}")
        print(f"| {name:<10} | " + " | ".join(cells) + " |")
    print("(ratios fungrad / jax; below 1 means fungrad is faster or smaller)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--scale", type=int, default=1, help="enlarge the workloads (e.g. 8 on a GPU)")
    parser.add_argument("--reps", type=int, default=50, help="timed runs of each compiled function")
    parser.add_argument("--eager-reps", type=int, default=5, help="timed un-jitted calls (0: skip)")
    parser.add_argument("--compile-rounds", type=int, default=3,
                        help="trace+compile measurements per library, order alternating (median)")
    parser.add_argument("--only", nargs="*", help="workload names to run")
    parser.add_argument("--out", default="benchmarks/results/latest.json", help="JSON output path")
    args = parser.parse_args(argv)

    device = jax.devices()[0]
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, device {device.device_kind}")
    results: dict = {}
    makers = [m for m in workloads.ALL if not args.only or m.__name__ in args.only]
    for i, make in enumerate(makers, 1):
        w = make(args.scale)
        print(f"[{i}/{len(makers)}] {w.name}: {w.what} ...", flush=True)
        try:
            results[w.name] = run_workload(w, args.reps, args.eager_reps, args.compile_rounds)
            results[w.name]["value_dependent"] = w.eager_only
        except Exception as err:  # report and go on: one broken workload must not hide the rest
            traceback.print_exc(limit=3)
            results[w.name] = {"error": f"{type(err).__name__}: {err}".splitlines()[0]}
    print_table(results)
    ok = [r for r in results.values() if "error" not in r]
    for key, label in METRICS:
        qs = [q for r in ok if (q := ratio(r["fungrad"].get(key), r["jax"].get(key))) is not None]
        if qs:
            print(f"median {label} ratio: {float(np.median(qs)):.2f}")
    # The eager targets differ: functions whose Python branches on values (jax.jit cannot
    # run them) are traced anew with each path; the others are compared apart.
    for dependent, what in ((False, "without"), (True, "with")):
        qs = [q for r in ok if r["value_dependent"] == dependent
              and (q := ratio(r["fungrad"].get("eager_s"), r["jax"].get("eager_s"))) is not None]
        if qs:
            print(f"median eager ratio, functions {what} value-dependent Python: "
                  f"{float(np.median(qs)):.2f} ({len(qs)} workloads)")
    meta = {"date": datetime.date.today().isoformat(), "jax": jax.__version__,
            "backend": jax.default_backend(), "device": device.device_kind, "scale": args.scale}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
