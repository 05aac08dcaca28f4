"""Refs (`jax.new_ref`, `ref[...]` reads and writes): discharged, not differentiated.

Tracing discharges the refs a function creates (`jaxutil.discharge_refs`): each read
becomes the value last written, so the rules of the ordinary primitives differentiate the
program. A ref still present when a rule is looked up came from outside the function (a
closed-over or argument ref), and writing a tangent into it has no meaning for fungrad:
the rule below says so.
"""

from __future__ import annotations

from fungrad._src import jaxutil, rules
from fungrad._src.jaxutil import prims as p


def _outside_ref_jvp(primals, tangents, **params):
    del tangents, params
    ref = next((a for a in map(jaxutil.typeof, primals) if jaxutil.is_ref_aval(a)), None)
    raise NotImplementedError(
        f"fungrad differentiates through refs that the differentiated function creates "
        f"itself (jax.new_ref inside it); this one{f' ({ref})' if ref else ''} comes from "
        f"outside (an argument or a closed-over ref), and a differentiated value flows "
        f"through it. Create the ref inside the function, or read its value outside and "
        f"pass the array as an argument.")


_STATE = [p.get_p, p.swap_p] + [
    jaxutil.internal_prims[name]
    for name in ("addupdate_p", "ref_p", "freeze_p", "empty_ref_p", "free_ref_p")
    if name in jaxutil.internal_prims]
for _prim in _STATE:
    rules.jvp_rules[_prim] = _outside_ref_jvp
    rules.discharged.add(_prim)
