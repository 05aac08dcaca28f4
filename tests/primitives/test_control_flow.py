"""Spec table for control flow and rematerialization: cond, switch, scan, fori_loop, while,
checkpoint with its policies, checkpoint_name, custom_root and custom_linear_solve."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.ad_checkpoint import checkpoint_name

import fungrad
from tests.harness import assert_close, check_all, random_like

# --- programs ------------------------------------------------------------------------


def _rnn(w, u, b, h0, xs):
    def cell(h, x):
        h = jnp.tanh(h @ w.T + x @ u + b)
        return h, jnp.sin(h).sum()

    h, ys = lax.scan(cell, h0, xs)
    return (h ** 2).sum() + ys.sum()


def _rk4(y0, k):
    # A pendulum integrated by RK4 steps in a fori_loop with static bounds (a scan).
    def field(y):
        return y[1], -k * jnp.sin(y[0])

    def axpy(y, dy, s):
        return jax.tree.map(lambda a, b: a + s * b, y, dy)

    def step(i, y):
        h = 0.1
        k1 = field(y)
        k2 = field(axpy(y, k1, h / 2))
        k3 = field(axpy(y, k2, h / 2))
        k4 = field(axpy(y, k3, h))
        return jax.tree.map(lambda a, b, c, d, e: a + h / 6 * (b + 2 * c + 2 * d + e),
                            y, k1, k2, k3, k4)

    p, v = lax.fori_loop(0, 8, step, (y0[0], y0[1]))
    return p * v


def _nested(x, xss):
    def outer(c, xs):
        def inner(d, e):
            return jnp.sin(d) * e + c, d * e

        d, ys = lax.scan(inner, c, xs)
        return d * 0.5, ys.sum(0)

    c, ys = lax.scan(outer, x, xss)
    return c.sum() + (ys ** 2).sum()


def _reverse(x, xs):
    c, ys = lax.scan(lambda c, a: (jnp.cos(c) + a * c, c * a), x, xs, reverse=True, unroll=2)
    return c.sum() + ys.sum()


def _no_xs(x, w):
    # length without xs; a const with a tangent; an integer carry and an integer ys.
    def body(carry, _):
        c, i = carry
        return (jnp.sin(c) * w + lax.convert_element_type(i, c.dtype), i + 1), (c * c, i)

    (c, _), (ys, _) = lax.scan(body, (x, 0), None, length=4)
    return c.sum() + ys.sum()


def _cond_switch_in_scan(x, xs):
    def body(c, a):
        c = lax.cond(a[0] > 0, lambda u: jnp.sin(u) * a, lambda u: u * u + a, c)
        i = lax.convert_element_type(jnp.abs(a[0]) * 2, jnp.int32)
        d = lax.switch(i, [lambda u: u, lambda u: jnp.exp(-u * u), lambda u: 2.0 * u], c)
        return c * 0.9, d

    c, ys = lax.scan(body, x, xs)
    return c.sum() + ys.sum()


def _scan_in_cond(x, xs):
    def looped(u):
        c, ys = lax.scan(lambda c, a: (c * jnp.tanh(a + c), c), u, xs)
        return c + ys.sum(0)

    return lax.cond(x.sum() > 0, looped, jnp.sin, x).sum()


def _cond_joined(x, y):
    # The tangent of the first output is zero in one branch only; the branches keep
    # residuals of different shapes.
    def left(a, b):
        return jnp.ones_like(a), jnp.sin(a) * b

    def right(a, b):
        return a * a, jnp.cos(jnp.sum(b * b)) * a

    u, v = lax.cond(x[0] > 0, left, right, x, y)
    return u * v


def _switch(x, index):
    return lax.switch(index, [lambda a: a, lambda a: jnp.sin(a) * a, lambda a: a ** 3], x)


def _carry_reset(x, xs):
    # The carry has a tangent on entry but the body overwrites it with a constant.
    def body(c, a):
        return jnp.ones_like(c) * 2.0, c * a

    c, ys = lax.scan(body, x, xs)
    return c * ys.sum(0)


def _empty_scan(x, xs):
    c, ys = lax.scan(lambda c, a: (c * jnp.sin(a), c + a), x, xs)
    return c * 2.0 + ys.sum(0)


def _both_branches(f):
    """`f` with its first argument made positive and negative: both branches of its cond run."""
    def both(x, *args):
        return f(jnp.abs(x), *args) + f(-jnp.abs(x), *args)
    return both


def _map(x):
    return lax.map(lambda a: jnp.sin(a) * a.sum(), x)


def _layer(w, x):
    h = checkpoint_name(x @ w, "pre")
    return jnp.tanh(h) * jnp.sin(x)


def _stack(policy, ws, x):
    for i in range(ws.shape[0]):
        x = jax.checkpoint(_layer, policy=policy)(ws[i], x)
    return x.sum()


def _checkpoint_in_scan(ws, x):
    layer = jax.checkpoint(lambda x, w: (jnp.sin(x @ w) * x, None))
    return lax.scan(layer, x, ws)[0].sum()


def _scan_in_checkpoint(x, xs):
    @functools.partial(jax.checkpoint, prevent_cse=False)
    def f(x):
        return lax.scan(lambda c, a: (jnp.sin(c) * a, jnp.cos(c)), x, xs)

    c, ys = f(x)
    return c.sum() * ys.sum()


def _nested_checkpoint(x):
    inner = jax.checkpoint(lambda u: jnp.sin(u) * u,
                           policy=jax.checkpoint_policies.everything_saveable)
    outer = jax.checkpoint(lambda u: inner(inner(u)) * jnp.cos(u))
    return outer(x)


def _named(x):
    return checkpoint_name(jnp.sin(x), "y") * x


def _cube_root(a):
    # Newton's method in a static fori_loop, differentiated implicitly by custom_root.
    def solve(g, x0):
        return lax.fori_loop(0, 20, lambda _, x: x - g(x) / (3 * x ** 2), x0)

    return lax.custom_root(lambda x: x ** 3 - a, jnp.ones_like(a), solve,
                           lambda g, y: y / g(jnp.ones_like(y)))


def _cg(matvec, b):
    # A few conjugate-gradient steps in a scan: exact for the 3x3 systems below.
    def step(state, _):
        x, r, p = state
        ap = matvec(p)
        alpha = (r @ r) / (p @ ap)
        x, r_new = x + alpha * p, r - alpha * ap
        return (x, r_new, r_new + (r_new @ r_new) / (r @ r) * p), None

    return lax.scan(step, (jnp.zeros_like(b), b, b), None, length=3)[0][0]


def _jacobi(a, b):
    d = jnp.diagonal(a)
    return lax.scan(lambda x, _: ((b - a @ x + d * x) / d, None), b / d, None, length=60)[0]


def _solve_symmetric(m, b):
    a = m @ m.T + 3 * jnp.eye(3, dtype=m.dtype)
    return lax.custom_linear_solve(lambda x: a @ x, b, _cg, symmetric=True)


def _solve_general(m, b):
    a = m + 4 * jnp.eye(3, dtype=m.dtype)  # diagonally dominant: Jacobi converges
    return lax.custom_linear_solve(lambda x: a @ x, b, lambda mv, r: _jacobi(a, r),
                                   lambda vm, r: _jacobi(a.T, r))


def _newton_while(a):
    def body(state):
        x, i = state
        return x - (x ** 3 - a) / (3 * x ** 2), i + 1

    return lax.while_loop(lambda s: s[1] < 20, body, (jnp.ones_like(a), 0))[0]


def _fori_dynamic(x, n):
    return lax.fori_loop(0, n, lambda i, c: jnp.sin(c) * x + c, x)


POLICIES = {
    "default": None,
    "everything": jax.checkpoint_policies.everything_saveable,
    "nothing": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "names": jax.checkpoint_policies.save_only_these_names("pre"),
}

LIGHT = {"order": 1, "jit": False}  # the cheaper oracles, for the variations of a case

# (id, function, argument shapes[, check_all options]): each shape becomes a random array
# of the test dtype. Every construct gets the full set of oracles (jit, second order)
# in at least one case; the variations around it get the first-order ones.
CASES = [
    ("scan/rnn", _rnn, [(3, 3), (2, 3), (3,), (3,), (5, 2)]),
    ("scan/rk4_fori", _rk4, [(2,), ()], LIGHT),
    ("scan/nested", _nested, [(2,), (3, 4, 2)]),
    ("scan/reverse_unroll", _reverse, [(3,), (5, 3)]),
    ("scan/no_xs_int_carry", _no_xs, [(3,), ()], LIGHT),
    ("scan/carry_reset", _carry_reset, [(2,), (3, 2)], LIGHT),
    ("scan/size0", _empty_scan, [(2,), (0, 2)], LIGHT),
    ("scan/map", _map, [(4, 3)], LIGHT),
    ("scan/cond_switch_inside", _cond_switch_in_scan, [(2,), (6, 2)]),
    ("cond/scan_inside", _both_branches(_scan_in_cond), [(2,), (4, 2)]),
    ("cond/joined", _both_branches(_cond_joined), [(3,), (3,)]),
    ("switch/vector", lambda x: _switch(x, 1) * _switch(x, 2), [(3,)], LIGHT),
    ("switch/scalar", lambda x: _switch(x, 0) + _switch(x, 2), [()], LIGHT),
    *((f"checkpoint/stack_{name}", functools.partial(_stack, policy), [(3, 4, 4), (2, 4)],
       {} if name == "dots" else LIGHT) for name, policy in POLICIES.items()),
    ("checkpoint/in_scan", _checkpoint_in_scan, [(4, 3, 3), (2, 3)]),
    ("checkpoint/scan_inside", _scan_in_checkpoint, [(2,), (3, 2)], LIGHT),
    ("checkpoint/nested", _nested_checkpoint, [(3,)], LIGHT),
    ("checkpoint/name_outside", _named, [(3,)], LIGHT),
    ("custom_root/newton", lambda a: _cube_root(jnp.abs(a) + 0.5), [(3,)]),
    ("linear_solve/symmetric", _solve_symmetric, [(3, 3), (3,)], LIGHT),
    ("linear_solve/general", _solve_general, [(3, 3), (3,)]),
]
FLOAT32 = {"scan/rnn", "scan/cond_switch_inside", "checkpoint/stack_names", "linear_solve/general"}


def _args(shapes, dtype, seed=0):
    rng = np.random.default_rng(seed)
    return [np.asarray(0.5 * rng.standard_normal(s), dtype) for s in shapes]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_against_jax(case):
    _, f, shapes, *opts = case
    # Under jit, as most code runs: one compiled call per transform instead of one per
    # primitive, which keeps this file fast; the rules are the same either way.
    check_all(jax.jit(f), _args(shapes, "float64"), **(opts[0] if opts else {}))


@pytest.mark.parametrize("case", [c for c in CASES if c[0] in FLOAT32],
                         ids=sorted(FLOAT32, key=[c[0] for c in CASES].index))
def test_against_jax_float32(case):
    _, f, shapes, *_ = case
    check_all(jax.jit(f), _args(shapes, "float32"), fd=False, **LIGHT)


# --- while_loop: forward mode; reverse mode (which jax refuses) in tests/test_loops.py ---


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_while_newton_forward(dtype):
    a = np.abs(_args([(3,)], dtype)[0]) + 0.5
    check_all(_newton_while, (a,), modes=("fwd",))
    t = np.ones(3, dtype)
    assert_close(fungrad.linearize(_newton_while, a)[1](t), jax.linearize(_newton_while, a)[1](t))
    assert_close(fungrad.jacfwd(_newton_while)(a), jax.jacfwd(_newton_while)(a))


def test_fori_loop_dynamic_bounds_forward():
    x = np.array([0.3, -0.2])
    f = functools.partial(_fori_dynamic, n=jnp.asarray(3))
    check_all(f, (x,), modes=("fwd",))
    assert_close(jax.jit(fungrad.jacfwd(f))(x), jax.jacfwd(f)(x))


def test_while_reverse_mode_where_jax_refuses():
    # jax raises for a while loop (or a fori_loop with a traced bound) in reverse mode;
    # fungrad replays its trips from snapshots (more in tests/test_loops.py).
    a = np.array([1.5, 2.0])
    with pytest.raises(ValueError, match="Reverse-mode differentiation does not work"):
        jax.grad(lambda a: _newton_while(a).sum())(a)
    newton_scan = lambda a: lax.fori_loop(  # noqa: E731
        0, 20, lambda _, x: x - (x ** 3 - a) / (3 * x ** 2), jnp.ones_like(a))
    assert_close(fungrad.grad(lambda a: _newton_while(a).sum())(a),
                 jax.grad(lambda a: newton_scan(a).sum())(a))
    _, pullback = fungrad.vjp(_newton_while, a)
    assert_close(pullback(np.ones(2)), jax.vjp(newton_scan, a)[1](np.ones(2)))
    traced_bound = jax.jit(fungrad.grad(lambda x, n: _fori_dynamic(x, n).sum()))
    static_bound = jax.grad(lambda x: _fori_dynamic(x, 2).sum())
    assert_close(traced_bound(a, jnp.asarray(2)), static_bound(a))
    # Outside jit the bound is a concrete array: a scan, differentiable, as under jax.grad.
    fori_sum = lambda x: _fori_dynamic(x, jnp.asarray(2)).sum()  # noqa: E731
    assert_close(fungrad.grad(fori_sum)(a), jax.grad(fori_sum)(a))


def test_while_partly_known_carries():
    # Only some carries depend on the input: the others are computed by a loop of their own.
    def f(x, y):
        def body(s):
            i, u, v = s
            return i + 1, u * 1.5 + y, jnp.sin(v) * u
        return lax.while_loop(lambda s: s[0] < 4, body, (0, y, x))[2]

    args = (np.array([0.2, 0.4]), np.array([0.7, -0.1]))
    y, f_jvp = fungrad.linearize(lambda x: f(x, args[1]), args[0])
    y_ref, f_jvp_ref = jax.linearize(lambda x: f(x, args[1]), args[0])
    assert_close(y, y_ref)
    assert_close(f_jvp(np.ones(2)), f_jvp_ref(np.ones(2)))
    check_all(f, args, modes=("fwd",))


def test_linear_solve_without_transpose_solve():
    def f(b):
        return lax.custom_linear_solve(lambda x: 2.0 * x, b, lambda mv, r: r / 2.0)

    b = np.array([1.0, 2.0])
    check_all(f, (b,), modes=("fwd",))
    with pytest.raises(TypeError, match="transpose_solve required"):
        fungrad.grad(lambda b: f(b).sum())(b)


# --- higher order, vmap, structure ---------------------------------------------------

def _small_rnn(v):
    w, u, b = v[:4].reshape(2, 2), v[4:8].reshape(2, 2), v[8:10]
    return _rnn(w, u, b, jnp.zeros(2, v.dtype), jnp.linspace(-1.0, 1.0, 6, dtype=v.dtype).reshape(3, 2))


SECOND_ORDER = {  # function of one vector, its size
    "rnn": (_small_rnn, 10),
    "cond": (lambda v: _both_branches(lambda u: lax.cond(
        u.sum() > 0, lambda a: jnp.sin(a) * a, lambda a: a ** 3, u).sum())(v), 3),
    "checkpoint": (lambda v: _stack(jax.checkpoint_policies.dots_saveable,
                                    v[:8].reshape(2, 2, 2), v[8:].reshape(1, 2)), 10),
    "nested_scan": (lambda v: _nested(v[:2], v[2:].reshape(2, 2, 2)), 10),
}


@pytest.mark.parametrize("name", sorted(SECOND_ORDER))
def test_hessian_hvp_vmap(name):
    f, size = SECOND_ORDER[name]
    rng = np.random.default_rng(1)
    x, v = 0.5 * rng.standard_normal(size), rng.standard_normal(size)
    batch = np.stack([x, -x, 0.5 * x])
    ours = jax.jit(lambda x, v, batch: (fungrad.hessian(f)(x), fungrad.hvp(f, (x,), (v,))[0],
                                        jax.vmap(fungrad.grad(f))(batch)))
    theirs = jax.jit(lambda x, v, batch: (jax.hessian(f)(x), jax.jvp(jax.grad(f), (x,), (v,))[1],
                                          jax.vmap(jax.grad(f))(batch)))
    assert_close(ours(x, v, batch), theirs(x, v, batch), err_msg="hessian, hvp, vmap(grad)")
    assert_close(fungrad.hessian(f)(x), jax.hessian(f)(x), err_msg="hessian without jit")


def _top_level_primitives(f, *args):
    return [str(eqn.primitive) for eqn in jax.make_jaxpr(f)(*args).eqns]


@pytest.mark.parametrize("prim, f, args", [
    ("scan", lambda x: _reverse(x, jnp.ones((4, 2))), (np.ones(2),)),
    ("cond", lambda x: _cond_joined(x, x).sum(), (np.ones(3),)),
    ("remat2", lambda x: _nested_checkpoint(x).sum(), (np.ones(3),)),
])
def test_control_flow_stays_control_flow(prim, f, args):
    # Forward primal loop and transposed loop (not unrolled); the same for jvp.
    grad_prims = _top_level_primitives(fungrad.grad(f), *args)
    assert grad_prims.count(prim) >= 2, grad_prims
    jvp_prims = _top_level_primitives(lambda x: fungrad.jvp(f, (x,), (x,)), *args)
    assert prim in jvp_prims, jvp_prims


@pytest.mark.parametrize("policy", ["default", "nothing", "dots", "names"])
def test_checkpoint_saves_what_the_policy_says(policy):
    # The residuals kept for the backward pass take as many bytes as jax keeps.
    f = functools.partial(_stack, POLICIES[policy])
    ws, x = _args([(3, 4, 4), (2, 4)], "float32")

    def nbytes(pullback):
        return sum(leaf.nbytes for leaf in jax.tree.leaves(pullback))

    _, pullback = fungrad.vjp(f, ws, x)
    assert nbytes(pullback) == nbytes(jax.vjp(f, ws, x)[1])
    ct = random_like(np.float32(0), np.random.default_rng(0))
    assert_close(pullback(ct), jax.vjp(f, ws, x)[1](ct))
