"""Collectives and shard_map over 8 virtual CPU devices, and jit with shardings.

jax is already initialized in the pytest process with one CPU device, so the sharded
cases run in one subprocess: this file run as a script, with 8 host devices.
"""

import os
import subprocess
import sys

N = 8


def test_sharded_cases_in_subprocess():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu", PYTHONPATH=os.path.dirname(os.path.dirname(__file__)))
    proc = subprocess.run([sys.executable, "-W", "error", __file__], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "all sharded cases passed" in proc.stdout, proc.stdout


def _main():  # runs in the subprocess
    from functools import partial

    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax import lax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import fungrad
    from tests.harness import assert_close, random_like

    jax.config.update("jax_enable_x64", True)
    assert jax.device_count() == N
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("i",))
    ring = [(j, (j + 1) % N) for j in range(N)]
    split = P("i")

    def smap(body, in_specs=split, out_specs=split, check_vma=True):
        return jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                             check_vma=check_vma)

    def same_sharding(actual, expected, what):
        for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
            assert a.sharding.is_equivalent_to(e.sharding, a.ndim), (
                f"{what}: sharding {a.sharding} != jax's {e.sharding}")

    def derivatives(lib, f, args, tangents, ct):
        out, pullback = lib.vjp(f, *args)
        return dict(jvp=lib.jvp(f, args, tangents), vjp=(out, pullback(ct)),
                    grad=lib.grad(lambda *a: jnp.sum(jnp.sin(f(*a))), argnums=(0,))(*args))

    failures = []

    def check(name, *case, **options):
        try:
            check_case(name, *case, **options)
        except Exception as e:  # one case failing does not hide the others
            failures.append(f"FAIL {name}: {type(e).__name__}: {e}")
            print(failures[-1])

    def check_case(name, f, args, ref=None, eager=False, order=1):
        """fungrad's jvp, vjp and grad of `f` equal jax's of `ref` (default `f`), inside
        one jit each, with the same output shardings; `eager` also runs them unjitted."""
        ref = f if ref is None else ref
        rng = np.random.default_rng(0)
        tangents = random_like(tuple(args), rng)
        args = tuple(args)
        ct = random_like(jax.eval_shape(f, *args), rng)
        ct = jax.tree.map(lambda c: jnp.asarray(c, c.dtype), ct)
        args = tuple(args)
        runs = [jax.jit] + ([lambda g: g] if eager else [])
        for run in runs:
            expected = run(partial(derivatives, jax, ref))(args, tangents, ct)
            actual = run(partial(derivatives, fungrad, f))(args, tangents, ct)
            assert_close(actual, expected, err_msg=name)
            same_sharding(actual, expected, name)
        if order >= 2:
            def hvp(lib, g):
                return lib.jvp(lib.grad(lambda *a: jnp.sum(jnp.sin(g(*a)))), args, tangents)
            assert_close(jax.jit(lambda: hvp(fungrad, f))(), jax.jit(lambda: hvp(jax, ref))(),
                         err_msg=f"{name} hvp")
        print("ok", name)

    x = jnp.asarray(np.random.default_rng(1).standard_normal(2 * N), jnp.float64)
    x32 = x.astype(jnp.float32)
    m = jnp.asarray(np.random.default_rng(2).standard_normal((N, 2 * N)), jnp.float32)
    x_sharded = jax.device_put(x, NamedSharding(mesh, P("i")))

    # psum (psum_invariant with check_vma, psum without), pvary, axis_index, ppermute.
    check("psum", smap(lambda v: jnp.sin(lax.psum(v, "i")) * v), [x], eager=True, order=2)
    check("psum no check_vma",
          smap(lambda v: jnp.sin(lax.psum(v, "i")) * v, check_vma=False), [x32])
    check("psum to replicated", smap(lambda v: lax.psum(v * v, "i"), out_specs=P()), [x])
    check("pvary", smap(lambda v, w: v * jnp.cos(w), in_specs=(P("i"), P())), [x, x[:2]])
    check("ppermute and axis_index",
          smap(lambda v: lax.ppermute(v * v, "i", ring) * lax.axis_index("i")), [x32], eager=True)
    # all_gather (tiled and stacked), psum_scatter, all_to_all.
    check("all_gather tiled", smap(lambda v: jnp.tanh(lax.all_gather(v, "i", tiled=True)) * v[0]),
          [x])
    check("all_gather stacked", smap(lambda v: lax.all_gather(v * v, "i", axis=1)), [x32])
    check("psum_scatter", smap(lambda v: lax.psum_scatter(jnp.sin(v), "i", tiled=True) * v[:1],
                               in_specs=P(), out_specs=P("i")), [x])
    check("all_to_all", smap(lambda v: lax.all_to_all(v * v, "i", 1, 0, tiled=True),
                             in_specs=P("i"), out_specs=P("i")), [m])
    # pmax / pmin: jax has no rule; the oracle is the same function written with all_gather.
    for name, op, ref_op in [("pmax", lax.pmax, jnp.max), ("pmin", lax.pmin, jnp.min)]:
        check(name, smap(lambda v, op=op: op(v * v, "i") * v, check_vma=False), [x],
              ref=smap(lambda v, r=ref_op: r(lax.all_gather(v * v, "i"), 0) * v, check_vma=False))
    # shard_map inside jit with in/out shardings; jit with shardings inside shard_map's body.
    body = smap(lambda v: jnp.sin(lax.psum(v, "i")) * v)
    spec_i, rep = NamedSharding(mesh, P("i")), NamedSharding(mesh, P())
    check("jit with shardings", jax.jit(lambda v: body(v) * 2.0, in_shardings=spec_i,
                                        out_shardings=rep), [x_sharded], eager=True, order=2)
    check("jit inside shard_map", smap(lambda v: jax.jit(lambda u: u * lax.psum(u, "i"))(v)), [x])
    # Plain jit (no shard_map) with shardings: the cotangents come back sharded as jax's.
    g = jax.jit(lambda v, w: jnp.sin(v) * w[0], in_shardings=(spec_i, rep), out_shardings=spec_i)
    check("jit shardings only", g, [x_sharded, x[:3]], eager=True)
    # The transposed jit sends each cotangent out with its input's sharding, as jax's does.
    loss = lambda v, w: jnp.sum(g(v, w))  # noqa: E731
    for lib in (fungrad, jax):
        jaxpr = jax.make_jaxpr(lib.grad(loss, argnums=(0, 1)))(x_sharded, x[:3]).jaxpr
        last_jit = [e for e in jaxpr.eqns if str(e.primitive) == "jit"][-1]
        assert tuple(last_jit.params["out_shardings"]) == (spec_i, rep), (lib, last_jit.params)
        assert last_jit.params["in_shardings"][-1] == spec_i, (lib, last_jit.params)
    assert not failures, "\n".join(failures)
    print("all sharded cases passed")


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    _main()
