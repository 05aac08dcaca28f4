"""Effects, callbacks and call-like primitives: debug callbacks and prints, sharding
inspection and checkify's check run as often as under jax; opaque callbacks refuse with
a message; composite, custom_vmap and linear_call differentiate as their jax meaning."""

import collections
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.custom_batching import custom_vmap, sequential_vmap
from jax.custom_derivatives import linear_call
from jax.experimental import checkify, io_callback

import fungrad
from tests.harness import assert_close, check_all

DTYPES = [np.float32, np.float64]


def _x(shape, dtype=np.float64, seed=0):
    return jnp.asarray(np.random.default_rng(seed).uniform(0.2, 1.5, shape), dtype)


# --- effects: the callback runs on primals, as many times as under jax -----------------

class _Log:
    """Where the callbacks log. Not a plain list: fungrad's capture rebuilds a closed-over
    pytree, so a plain list would be copied (see test_callback_into_closed_over_list)."""

    def __init__(self):
        self.tags: list = []

    def append(self, tag):
        self.tags.append(tag)


def _effect_program(log):
    """A function with debug callbacks on primals (plain, in jit, in cond) and on a
    tangent (in a custom_jvp rule), each logging its tag."""
    def tag(name):
        return lambda *_: log.append(name)

    @jax.custom_jvp
    def g(x):
        return jnp.sin(x)

    @g.defjvp
    def g_jvp(primals, tangents):
        (x,), (x_dot,) = primals, tangents
        jax.debug.callback(tag("rule primal"), x)
        jax.debug.callback(tag("rule tangent"), x_dot)
        return jnp.sin(x), jnp.cos(x) * x_dot

    def in_jit(y):
        jax.debug.callback(tag("jit"), y)
        return y * 2

    def in_cond(y):
        jax.debug.callback(tag("cond"), y)
        return y * 3

    def f(x):
        jax.debug.callback(tag("primal"), x)
        y = jax.jit(in_jit)(g(x))
        y = lax.cond(jnp.sum(y) > 0, in_cond, lambda y: y, y)
        return jnp.sum(y * x)

    return f


def _linearize_twice(lib, f, x):
    y, f_jvp = lib.linearize(f, x)
    return y, f_jvp(x), f_jvp(2 * x)


def _vjp_twice(lib, f, x):
    y, pullback = lib.vjp(f, x)
    return y, pullback(1.0), pullback(2.0)


TRANSFORMS = {
    "jvp": lambda lib, f, x: lib.jvp(f, (x,), (x,)),
    "grad": lambda lib, f, x: lib.grad(f)(x),
    "linearize_twice": _linearize_twice,
    "vjp_twice": _vjp_twice,
    "hessian": lambda lib, f, x: lib.hessian(f)(x),
}


def _run_counted(transform, lib, f, x, log, jit):
    log.tags.clear()
    run = jax.jit(partial(transform, lib, f)) if jit else partial(transform, lib, f)
    out = run(x)
    jax.effects_barrier()
    return out, collections.Counter(log.tags)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_callback_counts_match_jax(name, jit):
    log = _Log()
    f, x = _effect_program(log), _x((3,))
    expected, expected_counts = _run_counted(TRANSFORMS[name], jax, f, x, log, jit)
    actual, counts = _run_counted(TRANSFORMS[name], fungrad, f, x, log, jit)
    assert counts == expected_counts
    assert counts["primal"] >= 1  # the callbacks did run
    assert_close(actual, expected)


def test_debug_print_output_matches_jax(capfd):
    def f(x):
        jax.debug.print("x = {x}, s = {s}", x=x, s=jnp.sum(x), ordered=True)
        y = jnp.tanh(x) * x
        jax.debug.print("y = {}", y, ordered=True)
        return jnp.sum(y)

    x = _x((2,))
    outputs = {}
    for lib in (jax, fungrad):
        grads = [lib.grad(f)(x), jax.jit(lib.grad(f))(x), lib.jvp(f, (x,), (x,))[1]]
        jax.effects_barrier()
        outputs[lib.__name__] = (grads, capfd.readouterr().out.splitlines())
    assert_close(outputs["fungrad"][0], outputs["jax"][0])
    assert outputs["fungrad"][1] == outputs["jax"][1]  # the same lines, in the same order
    assert len(outputs["jax"][1]) == 6


@pytest.mark.parametrize("dtype", DTYPES)
def test_debug_callback_derivatives(dtype):
    # The effect does not change any derivative, to second order.
    def f(x, y):
        jax.debug.callback(lambda *_: None, x, y)
        return jnp.sin(x) * y

    check_all(f, [_x((2, 3), dtype), _x((2, 3), dtype, 1)], order=2 if dtype == np.float64 else 1,
              fd=dtype == np.float64)


def test_inspect_sharding_runs_once_on_the_primal():
    for jit in (False, True):
        seen = {}
        for lib in (jax, fungrad):
            found = []

            def f(x, found=found):
                jax.debug.inspect_array_sharding(x * 2, callback=found.append)
                return jnp.sum(jnp.sin(x))

            x = _x((4,))
            grad = jax.jit(lib.grad(f)) if jit else lib.grad(f)
            assert_close(grad(x), jnp.cos(x))
            seen[lib.__name__] = found
        assert len(seen["fungrad"]) == len(seen["jax"]) == 1
        # fungrad's eager path is compiled: the sharding is the same one, stated as jit's.
        assert seen["fungrad"][0].is_equivalent_to(seen["jax"][0], 1)


def _checked(x):
    checkify.check(jnp.all(x > 0), "x must be positive, got {x}", x=x)
    return jnp.sum(jnp.log(x) * x)


@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["passes", "fails"])
def test_checkify_check_under_derivatives(sign):
    x = sign * _x((3,))
    cases = {
        "grad": lambda lib: checkify.checkify(lib.grad(_checked)),
        "jit_grad": lambda lib: jax.jit(checkify.checkify(lib.grad(_checked))),
        "grad_jit": lambda lib: checkify.checkify(jax.jit(lib.grad(_checked))),
        "jvp": lambda lib: checkify.checkify(lambda v: lib.jvp(_checked, (v,), (v,))),
        "linearize": lambda lib: checkify.checkify(lambda v: lib.linearize(_checked, v)[1](v)),
    }
    for name, make in cases.items():
        err, out = make(fungrad)(x)
        jax_err, jax_out = make(jax)(x)
        assert err.get() == jax_err.get(), name
        assert (err.get() is None) == (sign > 0), name
        assert_close(out, jax_out, err_msg=name)


def test_check_outside_checkify_eagerly_as_jax():
    # jax.grad runs the check eagerly (it raises only for a failing input); so should
    # fungrad.grad, whose compiled eager path falls back to op by op where `check`
    # does not lower.
    x = _x((3,))
    assert_close(fungrad.grad(_checked)(x), jax.grad(_checked)(x))
    with pytest.raises(checkify.JaxRuntimeError, match="must be positive"):
        fungrad.grad(_checked)(-x)


def test_callback_into_closed_over_list():
    # A callback appending to a list the function closes over, the usual way to collect
    # values. Fails today: fungrad's capture rebuilds closed-over pytrees, so the traced
    # function appends to a copy of the list (see the report).
    def make():
        found: list = []

        def f(x):
            jax.debug.callback(found.append, x)
            return jnp.sum(jnp.sin(x))

        return f, found

    x = _x((2,))
    for grad in (jax.grad, fungrad.grad):
        f, found = make()
        grad(f)(x)
        jax.effects_barrier()
        assert len(found) == 1, grad


def test_callback_in_scan_under_grad():
    # Fails today with a KeyError in scan's partial eval (see the report).
    log = _Log()

    def f(x):
        def body(c, xi):
            jax.debug.callback(lambda *_: log.append(1), xi)
            return c * xi + xi, None
        return lax.scan(body, x[0], x)[0]

    x = _x((3,))
    counts = {}
    for lib in (jax, fungrad):
        log.tags.clear()
        grad = lib.grad(f)(x)
        jax.effects_barrier()
        counts[lib.__name__] = (len(log.tags), grad)
    assert counts["fungrad"][0] == counts["jax"][0] == 3
    assert_close(counts["fungrad"][1], counts["jax"][1])


def test_callback_in_remat_replayed_as_jax():
    # jax replays a debug callback in a rematerialized (jax.checkpoint) backward pass.
    # Fails today: fungrad's remat recomputes only the residuals (see the report).
    log = _Log()

    def f(x):
        def block(y):
            jax.debug.callback(lambda *_: log.append(1), y)
            return jnp.sin(y)
        return jnp.sum(jax.checkpoint(block)(x))

    x = _x((3,))
    counts = {}
    for lib in (jax, fungrad):
        log.tags.clear()
        _vjp_twice(lib, f, x)
        jax.effects_barrier()
        counts[lib.__name__] = len(log.tags)
    assert counts["fungrad"] == counts["jax"]


# --- opaque callbacks: refused with a message; a custom rule makes them differentiable --

def _pure_sin(x):
    return jax.pure_callback(np.sin, jax.ShapeDtypeStruct(x.shape, x.dtype), x)


def _pure_cos(x):
    return jax.pure_callback(np.cos, jax.ShapeDtypeStruct(x.shape, x.dtype), x)


def _io_sin(x):
    return io_callback(np.sin, jax.ShapeDtypeStruct(x.shape, x.dtype), x)


def _ffi(x):
    return jax.ffi.ffi_call("fungrad_test_target", jax.ShapeDtypeStruct(x.shape, x.dtype))(x)


OPAQUE = [("pure_callback", _pure_sin, ""), ("io_callback", _io_sin, ""),
          ("ffi_call", _ffi, "fungrad_test_target")]


@pytest.mark.parametrize("prim,call,target", OPAQUE, ids=[c[0] for c in OPAQUE])
def test_opaque_callbacks_refuse(prim, call, target):
    def f(x):
        return jnp.sum(call(x) * x)

    x = _x((3,))
    with pytest.raises(ValueError):  # jax refuses as well
        jax.grad(f)(x)
    message = (f"primitive '{prim}'.*{target}.*cannot see inside an opaque callback.*"
               f"fungrad.custom_jvp or fungrad.custom_vjp")
    for transform in (fungrad.grad(f), jax.jit(fungrad.grad(f)),
                      lambda x: fungrad.jvp(f, (x,), (x,))):
        with pytest.raises(NotImplementedError, match=message):
            transform(x)


def test_opaque_callback_without_tangent_runs():
    # No tangent reaches the callback: it only runs, as in jax.
    def f(x, y):
        return jnp.sum(_pure_sin(y) * x) + jnp.sum(_io_sin(y))

    x, y = _x((3,)), _x((3,), seed=1)
    assert_close(fungrad.grad(f)(x, y), jax.grad(f)(x, y))


def test_pure_callback_transposed_refuses():
    # A custom JVP applying a pure_callback to its tangent: forward mode runs it, reverse
    # mode must transpose it, which neither jax nor fungrad can.
    @fungrad.custom_jvp
    def f(x):
        return jnp.sin(x)

    @f.defjvp
    def f_jvp(primals, tangents):
        (x,), (x_dot,) = primals, tangents
        return jnp.sin(x), _pure_cos(x) * _pure_sin(x_dot)

    x = _x((3,))
    assert_close(fungrad.jvp(f, (x,), (x,)), jax.jvp(f, (x,), (x,)))
    with pytest.raises(ValueError, match="transpose"):
        jax.grad(lambda x: jnp.sum(f(x)))(x)
    with pytest.raises(NotImplementedError, match="primitive 'pure_callback'"):
        fungrad.grad(lambda x: jnp.sum(f(x)))(x)


@pytest.mark.parametrize("dtype", DTYPES)
def test_pure_callback_in_custom_vjp_and_custom_jvp(dtype):
    @fungrad.custom_vjp
    def sin_vjp(x):
        return _pure_sin(x)

    sin_vjp.defvjp(lambda x: (_pure_sin(x), x), lambda x, ct: (ct * _pure_cos(x),))

    @fungrad.custom_jvp
    def sin_jvp(x):
        return _pure_sin(x)

    sin_jvp.defjvp(lambda p, t: (_pure_sin(p[0]), _pure_cos(p[0]) * t[0]))

    x = _x((4,), dtype)
    for sin in (sin_vjp, sin_jvp):
        def loss(x, sin=sin):
            return jnp.sum(sin(x) ** 2)

        analytic = 2 * jnp.sin(x) * jnp.cos(x)
        assert_close(fungrad.grad(loss)(x), analytic, rtol=1e-5 if dtype == np.float32 else 1e-12)
        assert_close(jax.jit(fungrad.grad(loss))(x), jax.grad(loss)(x))


# --- composite: differentiated through its decomposition --------------------------------

def _tan_plain(x, y):
    return jnp.sin(x) / jnp.cos(x) * y, x * y


_tan_composite = lax.composite(_tan_plain, name="fungrad.test.tan")


@pytest.mark.parametrize("dtype,shape", [(np.float32, (3,)), (np.float64, ()),
                                         (np.float64, (2, 0))], ids=["f32", "f64-scalar",
                                                                     "f64-size0"])
def test_composite_differentiates_its_decomposition(dtype, shape):
    args = [_x(shape, dtype), _x(shape, dtype, 1)]
    double = dtype == np.float64
    check_all(_tan_composite, args, ref=_tan_plain, order=2 if double else 1, fd=double)


def test_composite_kept_where_no_tangent_flows():
    # The gradient with respect to `z` only leaves the composite untouched.
    def f(x, z):
        return jnp.sum(_tan_composite(x, x)[0] * z)

    x, z = _x((3,)), _x((3,), seed=1)
    jaxpr = jax.make_jaxpr(fungrad.grad(f, argnums=1))(x, z)
    assert "composite" in {str(e.primitive) for e in jaxpr.jaxpr.eqns}
    assert_close(fungrad.grad(f, argnums=1)(x, z), jnp.tan(x) * x)


# --- custom_vmap: jvp keeps the rule (as jax); reverse mode through the function --------

def _custom_vmap_fn(offset):
    """sin(x) * y whose batching rule adds `offset`: a nonzero offset shows which of the
    function and the rule computed a batched result."""
    @custom_vmap
    def f(x, y):
        return jnp.sin(x) * y

    @f.def_vmap
    def rule(axis_size, in_batched, xs, ys):
        del axis_size
        return jnp.sin(xs) * ys + offset, any(in_batched)

    return f


def _plain(x, y):
    return jnp.sin(x) * y


@pytest.mark.parametrize("dtype", DTYPES)
def test_custom_vmap_derivatives(dtype):
    f = _custom_vmap_fn(0.0)
    double = dtype == np.float64
    check_all(f, [_x((3,), dtype), _x((3,), dtype, 1)], ref=_plain, order=2 if double else 1,
                   fd=double)


VMAPPED_JVPS = {
    "both": (lambda jvp, f, X, Y: jax.vmap(lambda a, b: jvp(f, (a, b), (b, a)))(X, Y)),
    "primals_only": (lambda jvp, f, X, Y: jax.vmap(lambda a: jvp(f, (a, Y[0]), (Y[1], a)))(X)),
    "tangents_only": (lambda jvp, f, X, Y: jax.vmap(lambda t: jvp(f, (X[0], Y[0]), (t, t)))(Y)),
    "mixed": (lambda jvp, f, X, Y: jax.vmap(lambda a, t: jvp(f, (a, Y[0]), (X[0], t)))(X, Y)),
    "jvp_of_jvp": (lambda jvp, f, X, Y: jax.vmap(
        lambda a: jvp(lambda u: jvp(f, (u, Y[0]), (Y[1], u))[1], (a,), (Y[2],)))(X)),
}


@pytest.mark.parametrize("name", list(VMAPPED_JVPS))
def test_vmap_of_jvp_uses_the_rule_as_jax(name):
    f = _custom_vmap_fn(1.0)  # the rule's result differs from the function's
    X, Y = _x((3, 2)), _x((3, 2), seed=1)
    expected = VMAPPED_JVPS[name](jax.jvp, f, X, Y)
    assert_close(VMAPPED_JVPS[name](fungrad.jvp, f, X, Y), expected)
    assert_close(jax.jit(partial(VMAPPED_JVPS[name], fungrad.jvp, f))(X, Y), expected)


def test_vmap_of_grad_and_jacfwd_of_custom_vmap():
    f = _custom_vmap_fn(0.0)
    X, Y = _x((3, 2)), _x((3, 2), seed=1)

    def loss(lib_f):
        return lambda x, y: jnp.sum(lib_f(x, y))

    assert_close(jax.vmap(fungrad.grad(loss(f), argnums=(0, 1)))(X, Y),
                 jax.vmap(jax.grad(loss(_plain), argnums=(0, 1)))(X, Y))
    assert_close(fungrad.grad(lambda X: jnp.sum(jax.vmap(f)(X, Y)))(X),
                 jax.grad(lambda X: jnp.sum(jax.vmap(f)(X, Y)))(X))
    assert_close(fungrad.jacfwd(f)(X[0], Y[0]), jax.jacfwd(f)(X[0], Y[0]))


def test_sequential_vmap_grad():
    @sequential_vmap
    def f(x):
        return jnp.sum(jnp.tanh(x) * x)

    X = _x((2, 3))
    assert_close(fungrad.grad(f)(X[0]), jax.grad(lambda x: jnp.sum(jnp.tanh(x) * x))(X[0]))
    # (jax cannot linearize a custom_vmap function: its reference is the plain function.)
    assert_close(jax.vmap(fungrad.grad(f))(X),
                 jax.vmap(jax.grad(lambda x: jnp.sum(jnp.tanh(x) * x)))(X))


# --- linear_call: the user's transpose ---------------------------------------------------

def _linear(scale, v):
    return scale * v[0] + 2.0 * v[1]


def _linear_t(scale, ct):
    return scale * ct, 2.0 * ct


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_call(dtype):
    def f(x, y):
        return jnp.sin(linear_call(_linear, _linear_t, jnp.cos(y), (x, x * x)))

    y = _x((3,), dtype, 1)
    double = dtype == np.float64
    check_all(lambda x: f(x, y), [_x((3,), dtype)], order=2 if double else 1, fd=double)


def test_linear_call_uses_the_given_transpose():
    # A "transpose" that is not the true one: jax's and fungrad's reverse mode both use it,
    # and the transpose of the transpose is the function again.
    def f(x):
        return linear_call(lambda r, v: 2.0 * v, lambda r, ct: 7.0 * ct, (), x)

    x = _x((3,))
    check_all(f, [x], order=2, fd=False)
    assert_close(fungrad.grad(lambda x: jnp.sum(f(x)))(x), jnp.full(3, 7.0))


def test_linear_call_residual_tangent_raises():
    def f(x):
        return linear_call(_linear, _linear_t, jnp.cos(x), (x, x))

    with pytest.raises(TypeError, match="linear_call with respect to its residual"):
        fungrad.grad(lambda x: jnp.sum(f(x)))(_x((3,)))
