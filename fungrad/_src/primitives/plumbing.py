"""Randomness and plumbing: PRNG keys (no derivative), sharding and placement
annotations, optimization barriers (derivatives pass through, the annotation is kept)."""

from __future__ import annotations

from fungrad._src import jaxutil, rules
from fungrad._src.jaxutil import prims as p
from fungrad._src.rules import defjvp_zero, deflinear, is_undefined
from fungrad._src.zeros import Zero, is_zero

_internal = jaxutil.internal_prims

# --- randomness: keys and random bits flow through, with no derivative (as in jax) ------

for _prim in (p.random_seed_p, p.random_bits_p, p.random_split_p, p.random_fold_in_p,
              p.threefry2x32_p, p.rng_bit_generator_p):
    defjvp_zero(_prim)
for _name in ("random_wrap_p", "random_unwrap_p", "iota_2x32_shape_p", "random_clone_p",
              "threefry4x32_p", "philox2x32_p", "philox4x32_p"):
    if _name in _internal:
        defjvp_zero(_internal[_name])


# --- annotations: linear, the tangent and cotangent carry the same annotation -----------

def _sharding_constraint_transpose(ct, x, **params):
    del x
    return [p.sharding_constraint_p.bind(ct, **params)]  # ct constrained like the primal


deflinear(p.sharding_constraint_p, _sharding_constraint_transpose)

if "layout_constraint_p" in _internal:
    _layout_constraint_p = _internal["layout_constraint_p"]
    deflinear(_layout_constraint_p,
              lambda ct, x, **params: [_layout_constraint_p.bind(ct, **params)])

if "reshard_p" in _internal:
    _reshard_p = _internal["reshard_p"]

    def _reshard_transpose(ct, x, *, dst_sharding, concrete_mesh):
        # Back to the sharding the input had.
        del dst_sharding
        return [_reshard_p.bind(ct, dst_sharding=x.aval.sharding, concrete_mesh=concrete_mesh)]

    deflinear(_reshard_p, _reshard_transpose)


# --- device_put: several operands, each moved; cotangents move back -------------------

def _device_put_jvp(primals, tangents, *, devices, srcs, copy_semantics):
    # d device_put(x) = device_put(dx), for the operands whose tangent is nonzero.
    outs = p.device_put_p.bind(*primals, devices=devices, srcs=srcs,
                               copy_semantics=copy_semantics)
    nz = [i for i, t in enumerate(tangents) if not is_zero(t)]
    moved = p.device_put_p.bind(
        *(tangents[i] for i in nz), devices=tuple(devices[i] for i in nz),
        srcs=tuple(srcs[i] for i in nz), copy_semantics=tuple(copy_semantics[i] for i in nz))
    out_dots: list = [Zero.like(x) for x in outs]
    for i, t in zip(nz, moved, strict=True):
        out_dots[i] = t
    return outs, out_dots


def _device_put_transpose(cts, *args, devices, srcs, copy_semantics):
    # Each nonzero cotangent goes back from the destination to the source.
    nz = [i for i, (ct, x) in enumerate(zip(cts, args, strict=True))
          if is_undefined(x) and not is_zero(ct)]
    if not nz:
        return [None] * len(args)
    params = jaxutil.device_put_transpose_params(
        tuple(devices[i] for i in nz), tuple(srcs[i] for i in nz),
        tuple(copy_semantics[i] for i in nz))
    moved = p.device_put_p.bind(*(cts[i] for i in nz), **params)
    out: list = [None] * len(args)
    for i, ct in zip(nz, moved, strict=True):
        out[i] = ct
    return out


rules.jvp_rules[p.device_put_p] = _device_put_jvp
rules.transpose_rules[p.device_put_p] = _device_put_transpose


# --- optimization_barrier: the tangents get a barrier of their own, as in jax ----------

if "optimization_barrier_p" in _internal:
    _barrier_p = _internal["optimization_barrier_p"]

    def _barrier_jvp(primals, tangents):
        outs = _barrier_p.bind(*primals)
        nz = [i for i, t in enumerate(tangents) if not is_zero(t)]
        fenced = _barrier_p.bind(*(tangents[i] for i in nz))
        out_dots: list = list(tangents)
        for i, t in zip(nz, fenced, strict=True):
            out_dots[i] = t
        return outs, out_dots

    def _barrier_transpose(cts, *args):
        nz = [i for i, (ct, x) in enumerate(zip(cts, args, strict=True))
              if is_undefined(x) and not is_zero(ct)]
        if not nz:
            return [None] * len(args)
        fenced = _barrier_p.bind(*(cts[i] for i in nz))
        out: list = [None] * len(args)
        for i, ct in zip(nz, fenced, strict=True):
            out[i] = ct
        return out

    rules.jvp_rules[_barrier_p] = _barrier_jvp
    rules.transpose_rules[_barrier_p] = _barrier_transpose


# --- shard_alike: linear in both operands; tangents and cotangents are sharded alike too --

if "shard_alike_p" in _internal:
    _shard_alike_p = _internal["shard_alike_p"]

    def _shard_alike_transpose(cts, x, y):
        # The identity on each operand: each cotangent goes back, the two sharded alike
        # as the primals were (as in jax, only when both are nonzero).
        x_ct, y_ct = cts
        if not (is_zero(x_ct) or is_zero(y_ct)):
            x_ct, y_ct = _shard_alike_p.bind(x_ct, y_ct)
        return [x_ct if is_undefined(x) else None, y_ct if is_undefined(y) else None]

    deflinear(_shard_alike_p, _shard_alike_transpose)


# --- no derivative to speak of --------------------------------------------------------

rules.refuse(p.rng_uniform_p,
             "fungrad cannot differentiate rng_uniform (XLA's stateful random number "
             "generator); jax has no derivative for it either. Draw the numbers with "
             "jax.random from a key, and they carry no tangent.")
for _prim in (p.create_token_p, p.after_all_p):
    rules.refuse(_prim, f"fungrad cannot differentiate {_prim}: tokens order effects and "
                        f"carry no values to differentiate (jax has no rule either).")
