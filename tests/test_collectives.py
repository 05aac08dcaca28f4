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


def _emulate_ragged_all_to_all_on_cpu():  # runs in the subprocess
    """XLA:CPU cannot run ragged_all_to_all ("HLO opcode `ragged-all-to-all` is not
    supported by XLA:CPU"), so the subprocess lowers it on CPU as its documented
    semantics written with all_gather / all_to_all / gathers. Both libraries' derivatives
    still bind the primitive itself (the emulation only makes them runnable); being plain
    jnp, the emulation is also differentiated by jax as a second, independent oracle."""
    import jax.numpy as jnp
    from jax import lax
    from jax._src import core
    from jax._src.interpreters import mlir
    from jax.extend.core.primitives import ragged_all_to_all_p

    def emulate(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *,
                axis_name, axis_index_groups):
        del send_sizes  # equal to the peers' recv_sizes
        assert axis_index_groups is None and len(axis_name) == 1, "emulation: one axis only"
        (name,) = axis_name
        operands = lax.all_gather(operand, name)
        read_at = lax.all_gather(input_offsets, name)
        written_at = lax.all_to_all(output_offsets, name, 0, 0, tiled=True)
        per_member = input_offsets.shape[0] // operands.shape[0]
        slots = lax.iota(written_at.dtype, written_at.shape[0])[:, None]
        rows = lax.iota(written_at.dtype, output.shape[0])[None, :]
        at, size = written_at[:, None], recv_sizes[:, None]
        inside = (rows >= at) & (rows < at + size)  # [slot, row]: the slot writes the row
        slot = jnp.max(jnp.where(inside, slots, -1), axis=0)  # the last write wins
        sender, k = slot // per_member, slot % per_member
        read = read_at[sender, lax.axis_index(name) * per_member + k]
        source = jnp.clip(read + rows[0] - written_at[slot], 0, operand.shape[0] - 1)
        written = (slot >= 0).reshape((-1,) + (1,) * (output.ndim - 1))
        return jnp.where(written, operands[sender, source], output)

    def lowering(ctx, *args, axis_name, axis_index_groups):
        sizes = [(n, ctx.module_context.axis_context.mesh.shape[n]) for n in axis_name]
        with core.extend_axis_env_nd(sizes):
            return mlir.lower_fun(emulate, multiple_results=False)(
                ctx, *args, axis_name=axis_name, axis_index_groups=axis_index_groups)

    mlir.register_lowering(ragged_all_to_all_p, lowering, platform="cpu")
    return emulate


def _ragged_routes(send, per_member, rows, out_rows, packed=False):
    """Offsets and sizes for ragged_all_to_all over `len(send)` members, member s sending
    `send[s, j]` rows to member j // per_member. Senders read their slices in order, a
    skipped row after each; receivers write them in order from row 1, a skipped row after
    each (an empty slice marks one of its own), or `packed` back to back (an empty slice
    then starts where the next one does). Skipped rows keep `output`."""
    import numpy as np
    members, slots = send.shape
    gap = 0 if packed else 1
    input_offsets, output_offsets, recv = (np.zeros_like(send) for _ in range(3))
    for s in range(members):
        input_offsets[s] = np.cumsum(send[s] + 1) - send[s] - 1
        assert input_offsets[s, -1] + send[s, -1] <= rows
    for d in range(members):
        at = 1
        for i in range(slots):
            s, k = divmod(i, per_member)
            j = d * per_member + k
            recv[d, i] = send[s, j]
            output_offsets[s, j] = at
            at += send[s, j] + gap
        assert at <= out_rows
    return [a.reshape(-1).astype(np.int32) for a in (input_offsets, send, output_offsets, recv)]


def _main():  # runs in the subprocess
    from functools import partial

    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax import lax
    from jax.extend.core import jaxprs_in_params
    from jax.extend.core.primitives import ragged_all_to_all_p
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
            if a.dtype == e.dtype == jax.dtypes.float0:  # integer inputs' cotangents: no data
                continue
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
    # A linear rule given one zero tangent inside shard_map: its zeros vary like the other.
    both = smap(lambda v, w: jnp.concatenate([v, w]) * jnp.concatenate([w, v]),
                in_specs=(P("i"), P("i")))
    check("one zero tangent", lambda v: both(v, jnp.cos(x)), [x])
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
    # ragged_all_to_all, run on CPU through the emulation above: jax's rules are the oracle
    # where its transpose is right (every slice written at its own row), and jax's
    # derivative of the emulation where it is not (slices written where others start: jax's
    # mask of the received rows miscounts a row where two slices start, and then passes
    # the `output` cotangent through rows that were overwritten).
    emulate = _emulate_ragged_all_to_all_on_cpu()
    pair = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("i",))
    docstring = jax.jit(jax.shard_map(  # the example in ragged_all_to_all's docstring
        lambda *a: lax.ragged_all_to_all(*a, axis_name="i"), mesh=pair, in_specs=P("i"),
        out_specs=P("i")))(*(jnp.asarray(v, t) for v, t in [
            ([1, 2, 2, 3, 4, 0], jnp.float32), ([0] * 8, jnp.float32), ([0, 1, 0, 1], jnp.int32),
            ([1, 2, 1, 1], jnp.int32), ([0, 0, 1, 2], jnp.int32), ([1, 1, 2, 1], jnp.int32)]))
    np.testing.assert_array_equal(docstring, [1, 3, 0, 0, 2, 2, 4, 0])
    rng = np.random.default_rng(3)

    def ragged_args(per_member, rows, out_rows, row_shape, dtype, send, packed=False):
        routes = _ragged_routes(send, per_member, rows, out_rows, packed)
        data = [jnp.asarray(rng.standard_normal((N * n, *row_shape)), dtype)
                for n in (rows, out_rows)]
        return [*data, *(jnp.asarray(r) for r in routes)]

    def ragged(exchange):
        return smap(lambda a, b, *r: exchange(jnp.sin(a), b * b, *r, axis_name=("i",),
                                              axis_index_groups=None) * b)

    ragged_f = ragged(ragged_all_to_all_p.bind)
    one_each = ragged_args(1, 3 * N, 3 * N + 2, (), jnp.float64, rng.integers(0, 3, (N, N)))
    check("ragged_all_to_all one slice per peer", ragged_f, one_each, order=2)
    check("ragged_all_to_all two slices per peer, rows of 3", ragged_f,
          ragged_args(2, 6 * N, 6 * N + 2, (3,), jnp.float32, rng.integers(0, 3, (N, 2 * N))))
    check("ragged_all_to_all nothing sent", ragged_f,
          ragged_args(1, 2 * N, N + 2, (2,), jnp.float32, np.zeros((N, N), np.int64)))
    check("ragged_all_to_all packed, empty slices at others' starts", ragged_f,
          ragged_args(1, 3 * N, 2 * N + 1, (), jnp.float64, rng.integers(0, 3, (N, N)),
                      packed=True), ref=ragged(emulate))

    def ragged_calls(lib, args):  # (params, input types) of every ragged_all_to_all emitted
        def go(*a):
            out, pullback = lib.vjp(ragged_f, *a)
            return lib.jvp(ragged_f, a, a[:2] + tuple(random_like(a[2:], rng))), pullback(out)
        found = []

        def walk(jaxpr):
            for eqn in jaxpr.eqns:
                if eqn.primitive is ragged_all_to_all_p:
                    found.append((eqn.params, [str(v.aval) for v in eqn.invars]))
                for sub in jaxprs_in_params(eqn.params):
                    walk(sub)
        walk(jax.make_jaxpr(go)(*args).jaxpr)
        return found

    # Structure, independent of the emulation: jvp, linearized and transposed calls as jax's.
    fungrad_calls, jax_calls = ragged_calls(fungrad, one_each), ragged_calls(jax, one_each)
    assert len(fungrad_calls) == 4 and fungrad_calls == jax_calls, (fungrad_calls, jax_calls)
    assert not failures, "\n".join(failures)
    print("all sharded cases passed")


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    _main()
