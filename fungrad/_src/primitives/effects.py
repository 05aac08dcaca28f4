"""Effects and opaque callbacks: debug prints and callbacks, sharding inspection and
checkify's `check` run on primal values; pure/io callbacks and FFI calls refuse."""

from __future__ import annotations

from fungrad._src import jaxutil, rules
from fungrad._src.jaxutil import Primitive

_internal = jaxutil.internal_prims


# --- effects with no outputs: the effect runs once, on the primals (as in jax) ---------
#
# Their JVP binds the primitive on the primal inputs and has no tangent outputs, so in
# a linearized program the equation depends only on known values: it lands in the
# primal part and runs once per evaluation of the primal (DCE keeps it: it has effects).
# An effect applied to a tangent (a custom JVP rule printing its tangent) is staged in
# the linear part and runs each time that is applied; reverse mode skips it, having no
# cotangent to send back (its transpose sends none), as jax does.

def _effect_rule(prim: Primitive):
    def jvp(primals, tangents, **params):
        del tangents
        return prim.bind(*primals, **params), []  # no outputs, so no tangents

    def transpose(cts, *args, **params):
        del cts, params
        return [None] * len(args)

    return jvp, transpose


for _name in ("debug_callback_p", "debug_print_p", "inspect_sharding_p", "check_p"):
    if _name in _internal:
        _prim = _internal[_name]
        rules.jvp_rules[_prim], rules.transpose_rules[_prim] = _effect_rule(_prim)


# --- opaque callbacks: nothing to differentiate, the user supplies the rule -------------

def _opaque_message(name: str, what: str) -> str:
    return (f"fungrad cannot differentiate through primitive '{name}' ({what}): like jax, it "
            f"cannot see inside an opaque callback. Wrap the function that calls it in "
            f"fungrad.custom_jvp or fungrad.custom_vjp (or jax.custom_jvp / jax.custom_vjp) "
            f"and give its derivative there.")


def _refuse_opaque(prim: Primitive, what: str) -> None:
    """Differentiating `prim`, forward or reverse, raises a message naming it (and the
    FFI target, which only the equation's params know)."""
    def message(params: dict) -> str:
        target = params.get("target_name")
        return _opaque_message(prim.name, f"{what} '{target}'" if target else what)

    def refuse_with_params(*args, **params):
        del args
        raise NotImplementedError(message(params))

    rules.refuse(prim, message({}))  # listed as n/a
    rules.jvp_rules[prim] = rules.transpose_rules[prim] = refuse_with_params


_OPAQUE = {
    "pure_callback_p": "jax.pure_callback",
    "io_callback_p": "jax.experimental.io_callback",
    "ffi_call_p": "the foreign function call jax.ffi.ffi_call",
}
for _name, _what in _OPAQUE.items():
    if _name in _internal:
        _refuse_opaque(_internal[_name], _what)
