"""Which of jax's primitives fungrad can differentiate: ``python -m fungrad.coverage``.

Lists every primitive of ``jax.extend.core.primitives`` (each ``*_p`` name) with its
status in fungrad's rule tables, then the totals per status:

- ``jvp+transpose``: a JVP rule and a transpose rule (a linear primitive, or one whose
  tangent is expressed with itself): forward and reverse mode.
- ``jvp``: a JVP rule only; reverse mode works as long as the JVP is written with
  primitives that have transpose rules.
- ``forward-only``: a JVP rule, and reverse mode raises as jax's does (generic ``reduce_window``).
- ``zero-derivative``: its outputs never carry a tangent (comparisons, integer ops, ...).
- ``discharged``: a ref primitive (``jax.new_ref``, reads, writes): the refs a function
  creates are turned into plain values before differentiation, so no rule is needed.
- ``n/a``: no derivative to speak of (tokens, effects, ...).
- ``missing``: no rule; differentiating through it raises an error naming it.

A second column says how ``fungrad.jet`` (Taylor mode) handles the primitive:

- ``rule``: a Taylor rule (a recurrence, cost polynomial in the order).
- ``via-jvp``: the generic Taylor rule built from its JVP rule: correct, slower.
- ``zero``: its outputs carry no series.
- ``discharged``: refs are turned into plain values first, as above.
- ``-``: none (a primitive with no derivative, or missing).

>>> from fungrad.coverage import coverage_table
>>> rows = {row.name: row for row in coverage_table()}
>>> rows["sin"].status, rows["sin"].taylor
('jvp', 'rule')
"""

from __future__ import annotations

import argparse
import collections
from collections.abc import Sequence
from typing import NamedTuple

from jax.extend.core import primitives as jax_primitives

import fungrad  # noqa: F401  (importing fungrad registers every rule)
from fungrad._src import jaxutil, rules
from fungrad._src.taylor import taylor_rules

STATUSES = ("jvp+transpose", "jvp", "forward-only", "zero-derivative", "discharged", "n/a",
            "missing")
TAYLOR_STATUSES = ("rule", "via-jvp", "zero", "discharged", "-")


class Row(NamedTuple):
    """One primitive: its name in ``jax.extend.core.primitives`` (without ``_p``)."""

    name: str
    jax_name: str  # the primitive's own name, as it prints in a jaxpr
    status: str
    taylor: str  # how fungrad.jet handles it: one of TAYLOR_STATUSES


def status_of(prim: object) -> str:
    """The coverage status of one primitive object."""
    if prim in rules.discharged:
        return "discharged"
    if prim in rules.not_applicable:
        return "n/a"
    if prim in rules.zero_derivative:
        return "zero-derivative"
    if prim in rules.forward_only:
        return "forward-only"
    if prim in rules.jvp_rules:
        return "jvp+transpose" if prim in rules.transpose_rules else "jvp"
    return "missing"


def taylor_status_of(prim: object) -> str:
    """How ``fungrad.jet`` handles one primitive object."""
    if prim in rules.discharged:
        return "discharged"
    if prim in rules.zero_derivative:
        return "zero"
    if prim in taylor_rules:
        return "rule"
    if prim in rules.jvp_rules and prim not in rules.not_applicable:
        return "via-jvp"
    return "-"


def _row(name: str, jax_name: str, prim: object) -> Row:
    return Row(name, jax_name, status_of(prim), taylor_status_of(prim))


def coverage_table() -> list[Row]:
    """One row per ``*_p`` name of ``jax.extend.core.primitives``, sorted by name, then
    the primitives plain jax code emits that it does not list (``jnp.stack``'s ``stack``,
    ``shard_map``, ...), marked ``*``."""
    names = sorted(n[:-2] for n in dir(jax_primitives) if n.endswith("_p"))
    prims = [getattr(jax_primitives, f"{name}_p") for name in names]
    rows = [_row(name, str(prim), prim) for name, prim in zip(names, prims, strict=True)]
    listed = set(prims)
    for key, prim in sorted(jaxutil.internal_prims.items()):
        if prim not in listed:
            rows.append(_row(f"*{key[:-2]}", f"*{prim}", prim))
    return rows


def totals(rows: Sequence[Row]) -> dict[str, int]:
    """How many rows have each status, in the order of ``STATUSES``."""
    counts = collections.Counter(row.status for row in rows)
    return {status: counts[status] for status in STATUSES}


def taylor_totals(rows: Sequence[Row]) -> dict[str, int]:
    """How many rows have each Taylor status, in the order of ``TAYLOR_STATUSES``."""
    counts = collections.Counter(row.taylor for row in rows)
    return {status: counts[status] for status in TAYLOR_STATUSES}


def format_table(rows: Sequence[Row]) -> str:
    """The rows as an aligned text table followed by the totals."""
    width = max((len(row.name) for row in rows), default=4)
    lines = [f"{'primitive':<{width}}  {'status':<15}  taylor", f"{'-' * width}  {'-' * 15}  {'-' * 10}"]
    for row in rows:
        alias = f"  (prints as '{row.jax_name}')" if row.jax_name != row.name else ""
        lines.append(f"{row.name:<{width}}  {row.status:<15}  {row.taylor:<10}{alias}".rstrip())
    lines.append("")
    counts = totals(rows)
    lines.append("totals: " + ", ".join(f"{status} {n}" for status, n in counts.items())
                 + f"; {len(rows)} primitives")
    lines.append("taylor (fungrad.jet): " + ", ".join(
        f"{status} {n}" for status, n in taylor_totals(rows).items()))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fungrad.coverage", description=__doc__.split("\n")[0])
    parser.add_argument("--status", choices=STATUSES, action="append",
                        help="show only primitives with this status (repeatable)")
    args = parser.parse_args(argv)
    rows = coverage_table()
    if args.status:
        rows = [row for row in rows if row.status in args.status]
    print(format_table(rows))


if __name__ == "__main__":
    main()
