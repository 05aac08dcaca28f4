"""Reverse mode through while loops (fungrad/_src/loops.py), which jax refuses.

The reference is jax's derivative of the same loop written as a scan over a bound on the
trip count, each trip applying the body only while the condition holds (the semantics
of a while loop, in a form jax can differentiate), and finite differences.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax, tree_util

import fungrad
from tests.harness import assert_close, check_all


def _bounded(trips):
    """A while_loop as a scan of `trips` masked trips: jax can differentiate it."""

    def while_loop(cond, body, init):
        def trip(carry, _):
            go = cond(carry)
            return tree_util.tree_map(functools.partial(jnp.where, go), body(carry), carry), None

        return lax.scan(trip, init, None, length=trips)[0]

    return while_loop


def _newton(a, while_loop=lax.while_loop):
    # Cube root to a tolerance: the trip count depends on `a`.
    def body(x):
        return x - (x ** 3 - a) / (3 * x ** 2)

    tol = 1e4 * jnp.finfo(a.dtype).eps
    return while_loop(lambda x: jnp.max(jnp.abs(x ** 3 - a)) > tol, body, jnp.ones_like(a))


def _fixed_point(a, while_loop=lax.while_loop):
    # x = cos(x) / 2 + a, a contraction, iterated until the step is small.
    def body(s):
        x, _ = s
        return jnp.cos(x) / 2 + a, x

    tol = 100 * jnp.finfo(a.dtype).eps
    x, _ = while_loop(lambda s: jnp.max(jnp.abs(s[0] - s[1])) > tol, body, (a, a + 1))
    return x


def _ode(k, y0, while_loop=lax.while_loop):
    # y' = -k y + sin(t) y / 2 on [0, 1] by an adaptive Heun-Euler pair: the step count
    # depends on the values; the last step is cut to land on t = 1.
    def f(t, y):
        return -k * y + jnp.sin(t) * y / 2

    def body(s):
        t, y, h, n = s
        h = jnp.minimum(h, 1.0 - t)
        k1 = f(t, y)
        k2 = f(t + h, y + h * k1)
        y_new = y + h / 2 * (k1 + k2)
        err = jnp.max(jnp.abs(h / 2 * (k2 - k1))) + 1e-12
        ok = err < 1e-4
        grow = jnp.clip(0.9 * jnp.sqrt(1e-4 / err), 0.3, 3.0)
        return (jnp.where(ok, t + h, t), jnp.where(ok, y_new, y), h * grow, n + 1)

    init = (jnp.zeros((), y0.dtype), y0, jnp.full((), 0.1, y0.dtype), 0)
    return while_loop(lambda s: s[0] < 1.0 - 1e-12, body, init)[1]


def _counted(x, while_loop=lax.while_loop):
    # Carries known at entry (a counter, a constant zero) made linear by the body, which
    # reads the differentiated `x` as a constant.
    def body(s):
        i, acc, c = s
        return i + 1, acc + jnp.sin(c) * x, c * 0.9 + x

    init = (0, jnp.zeros_like(x), jnp.ones_like(x))
    return while_loop(lambda s: s[0] < 6, body, init)[1:]


def _in_scan(x, while_loop=lax.while_loop):
    def step(c, k):
        c = while_loop(lambda s: s[1] < k, lambda s: (jnp.sin(s[0]) + x, s[1] + 1), (c, 0))[0]
        return c, jnp.sum(c ** 2)

    return lax.scan(step, x, jnp.arange(4))[1]


def _in_while(x, while_loop=lax.while_loop):
    def outer(s):
        c, i = s
        c = while_loop(lambda t: t[1] < i, lambda t: (jnp.cos(t[0]) * x, t[1] + 1), (c, 0))[0]
        return c + 0.1, i + 1

    return while_loop(lambda s: s[1] < 4, outer, (x, 0))[0]


def _in_cond(x, while_loop=lax.while_loop):
    loop = lambda x: while_loop(lambda s: s[1] < 3, lambda s: (s[0] * jnp.tanh(s[0]), s[1] + 1),
                                (x, 0))[0]
    return lax.cond(jnp.sum(x) > 0, loop, jnp.sin, x)


def _scan_inside(x, while_loop=lax.while_loop):
    def body(s):
        c, i = s
        return lax.scan(lambda c, _: (jnp.sin(c) * x, None), c, None, length=2)[0], i + 1

    return while_loop(lambda s: s[1] < 3, body, (x, 0))[0]


# (id, function, arguments, bound on the trip count of each loop, check_all options)
FIRST = {"order": 1}  # second order in `test_second_order` and for a few cases here

CASES = [
    ("newton", _newton, [np.array([0.7, 2.0, 8.0])], 60, {}),
    ("fixed_point", _fixed_point, [np.array([0.3, -0.4])], 200, FIRST),
    ("ode_adaptive", _ode, [np.array(1.3), np.array([1.0, -0.5])], 400, FIRST),
    ("linear_carries", _counted, [np.array([0.4, -0.3])], 10, {}),
    ("in_scan", _in_scan, [np.array([0.2, 0.5])], 8, FIRST),
    ("in_while", _in_while, [np.array([0.2, 0.5])], 8, FIRST),
    ("in_cond", _in_cond, [np.array([0.6, 0.5])], 8, FIRST),
    ("scan_inside", _scan_inside, [np.array([0.6, 0.5])], 8, FIRST),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_against_scan(case):
    _, f, args, trips, opts = case
    check_all(f, args, ref=functools.partial(f, while_loop=_bounded(trips)), **opts)


def test_second_order_nested():
    # hvp (forward over reverse) and hessian through a while inside a while.
    x, t = np.array([0.2, 0.5]), np.array([1.0, -0.3])
    f = lambda x: jnp.sum(_in_while(x) ** 2)  # noqa: E731
    ref = lambda x: jnp.sum(_in_while(x, _bounded(8)) ** 2)  # noqa: E731
    assert_close(jax.jit(lambda x, t: fungrad.hvp(f, (x,), (t,)))(x, t),
                 jax.jvp(jax.grad(ref), (x,), (t,))[1:])
    assert_close(jax.jit(fungrad.hessian(f))(x), jax.hessian(ref)(x))


def test_float32():
    a = np.array([0.7, 2.0, 8.0], np.float32)
    check_all(_fixed_point, [a], ref=functools.partial(_fixed_point, while_loop=_bounded(200)),
              order=1, fd=False)


def _decay(x, n):
    return lax.fori_loop(0, n, lambda i, c: 0.9 * c + 0.3 * jnp.sin(c) * x, x)


@pytest.mark.parametrize("slots", [2, 3, 4, 64])
def test_every_trip_count_and_slot_count(slots):
    # The thinning of the snapshots, segments shorter than the slots or longer (more
    # trips than slots ** 2), empty loops: against jax's grad of a scan of n trips.
    x = np.array([0.3, -0.7])
    with fungrad.while_snapshots(slots):
        grad = jax.jit(fungrad.grad(lambda x, n: jnp.sum(_decay(x, n) ** 2)))
        for n in [0, 1, 2, 3, 5, 8, 9, 17, 40, 130]:
            expected = jax.grad(lambda x: jnp.sum(_decay(x, n) ** 2))(x)  # noqa: B023
            assert_close(grad(x, np.int32(n)), expected, err_msg=f"n={n}")


def test_vmap_runs_to_the_longest_loop():
    xs = np.array([[0.3, -0.7], [0.1, 0.2], [1.0, 0.5]])
    ns = np.array([3, 11, 0], np.int32)
    grads = jax.jit(jax.vmap(fungrad.grad(lambda x, n: jnp.sum(_decay(x, n)))))(xs, ns)
    for x, n, g in zip(xs, ns, grads, strict=True):
        assert_close(g, jax.grad(lambda x: jnp.sum(_decay(x, int(n))))(x))  # noqa: B023


def test_a_vmapped_loop_inside_the_differentiated_function():
    # jax.vmap of a loop whose condition depends on the batched value makes a while with a
    # batched condition: each element runs its own trips. grad, under jit, and hessian.
    def f(x, while_loop=lax.while_loop):
        body = lambda c: (jnp.sin(c[0]) * 1.1 + 0.2, c[1] + 1)  # noqa: E731
        return while_loop(lambda c: c[1] < 3 + (c[0] > 0.5), body, (x, 0))[0]

    xs = np.array([0.1, 0.9, 0.4])
    loss = lambda xs: jnp.sum(jax.vmap(f)(xs) ** 2)  # noqa: E731
    ref = lambda xs: jnp.sum(jax.vmap(functools.partial(f, while_loop=_bounded(6)))(xs) ** 2)  # noqa: E731
    assert_close(fungrad.grad(loss)(xs), jax.grad(ref)(xs))
    assert_close(jax.jit(fungrad.grad(loss))(xs), jax.grad(ref)(xs))
    assert_close(fungrad.hessian(loss)(xs), jax.hessian(ref)(xs))


def test_eager_outside_jit():
    # Outside jit a fori_loop's bounds are concrete (a scan); a while_loop stays one.
    a = np.array([0.7, 2.0, 8.0])
    for _ in range(2):  # the second call reuses the program derived by the first
        assert_close(fungrad.grad(lambda a: jnp.sum(_newton(a)))(a),
                     jax.grad(lambda a: jnp.sum(_newton(a, _bounded(60))))(a))


def test_backward_pass_body_evaluations():
    # A callback in the body counts its runs: the forward pass runs it once per trip and
    # the backward pass at most three times more (snapshots, segment replay, residuals)
    # while the trips fit in slots ** 2; beyond, a little more, as the docs say.
    runs = []

    def f(x, n):
        def body(i, c):
            jax.debug.callback(lambda: runs.append(1))
            return jnp.sin(c) * x

        return jnp.sum(lax.fori_loop(0, n, body, x))

    for slots, trips, most in [(8, 64, 4), (64, 100, 4), (4, 100, 4 + 100 / (2 * 16) + 1)]:
        runs.clear()
        with fungrad.while_snapshots(slots):
            jax.jit(fungrad.grad(f))(np.ones(2), np.int32(trips)).block_until_ready()
        assert 3 * trips <= len(runs) <= most * trips, (slots, trips, len(runs))


def test_memory_does_not_grow_with_trips():
    # The compiled gradient's temporaries: about two sets of slots of the carry, whatever
    # the trip count (traced); jax's scan version stores one residual per trip.
    x = np.ones(4096)
    carry_bytes = x.nbytes
    for slots in (8, 64):
        with fungrad.while_snapshots(slots):
            compiled = jax.jit(fungrad.grad(lambda x, n: jnp.sum(_decay(x, n)))).lower(
                x, np.int32(1)).compile()
        temp = compiled.memory_analysis().temp_size_in_bytes
        assert temp <= (2 * slots + 8) * carry_bytes, (slots, temp / carry_bytes)
    scan = jax.jit(jax.grad(lambda x: jnp.sum(_decay(x, 1000)))).lower(x).compile()
    assert scan.memory_analysis().temp_size_in_bytes > 500 * carry_bytes  # the contrast


def test_while_snapshots_validates_and_restores():
    for bad in (1, 0, 2.5, "4", True):
        with pytest.raises(ValueError, match=r"while_snapshots expects an int >= 2"):
            fungrad.while_snapshots(bad)
    from fungrad._src import loops

    with fungrad.while_snapshots(5):
        assert loops.snapshot_slots() == 5
        with fungrad.while_snapshots(3):
            assert loops.snapshot_slots() == 3
        assert loops.snapshot_slots() == 5
    assert loops.snapshot_slots() == 64
