"""Capture means what jax.grad means: Python runs on every call, reads the current state,
may branch on values; the program cache is keyed by what was traced, so it never goes stale."""

import collections
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fungrad
from tests.harness import assert_close

traces = []


def _loss(w, x, scale=1.0):
    traces.append(None)  # runs once per call, as under jax
    return scale * jnp.sum(jnp.tanh(x @ w) ** 2)


def _batches(n):
    rng = np.random.default_rng(0)
    return [jnp.asarray(rng.standard_normal((4, 3))) for _ in range(n)]


W = jnp.asarray(np.random.default_rng(1).standard_normal((3, 2)))


def test_a_closure_made_per_call_sees_each_new_batch_and_runs_each_time():
    traces.clear()
    for x in _batches(3):
        got = fungrad.grad(lambda w: _loss(w, x))(W)  # noqa: B023  (x is this step's batch)
        assert_close(got, jax.grad(lambda w: _loss(w, x))(W))  # noqa: B023
    assert len(traces) == 3 + 3  # fungrad's three calls, jax's three


def test_inside_jit_a_per_call_closure_over_traced_values():
    @jax.jit
    def two_steps(w, x):
        return [fungrad.grad(lambda w: _loss(w, xk))(w) for xk in (x, x * 2.0)]  # noqa: B023

    x = _batches(1)[0]
    assert_close(two_steps(W, x), [jax.grad(_loss)(W, x * k) for k in (1.0, 2.0)])


def test_eager_calls_run_a_compiled_program_with_jax_semantics():
    # Weak types and dtypes come back as from jax's own eager grad.
    for f, x in [(lambda x: x * x, 3.0), (lambda x: jnp.sin(x) * 2.0, jnp.float32(0.5))]:
        got, want = fungrad.grad(f)(x), jax.grad(f)(x)
        assert jax.typeof(got) == jax.typeof(want)
        assert_close(got, want)


def _count_calls(monkeypatch, name):
    """Counts the calls of fungrad._src.api.`name`: a compiled path runs it only while
    jax.jit traces, so a second eager call that hits the cache does not run it at all.
    Programs compile as soon as they recur (not after paying for it op by op)."""
    from fungrad._src import api

    monkeypatch.setattr(api._compile_cost, "predict", lambda size: 0.0)
    calls = []
    original = getattr(api, name)

    def counting(*args, **kwargs):
        calls.append(None)
        return original(*args, **kwargs)

    monkeypatch.setattr(api, name, counting)
    return calls


def test_eager_jacobians_compile_once_the_program_recurs(monkeypatch):
    calls = _count_calls(monkeypatch, "_transform_flat")
    cases = [
        (fungrad.jacfwd, jax.jacfwd, {}, 1),
        (fungrad.jacrev, jax.jacrev, {"argnums": (0,)}, 1),
        (fungrad.hessian, jax.hessian, {}, 2),  # jacfwd of jacrev: two levels
    ]
    for ours, theirs, kw, levels in cases:
        calls.clear()
        for step, x in enumerate(_batches(3)):
            calls.clear()
            got = ours(lambda w: _loss(w, x, 2.0), **kw)(W)  # noqa: B023  (a new closure)
            # Per level, at most once op by op (a program not seen before), then once traced
            # for compiling (the inner level: for inlining into the outer's trace), then never.
            assert len(calls) <= (levels if step < 2 else 0)
            assert_close(got, theirs(lambda w: _loss(w, x, 2.0), **kw)(W))  # noqa: B023


def test_eager_jacobians_keep_kwargs_aux_and_static_leaves():
    def f(w, config, *, shift):
        y = jnp.tanh(w * config["scale"] + shift)
        return y, {"norm": jnp.sum(y) if config["name"] == "layer" else None}

    w = jnp.arange(3.0)
    config = {"scale": 2.0, "name": "layer"}
    for ours, theirs in [(fungrad.jacfwd, jax.jacfwd), (fungrad.jacrev, jax.jacrev)]:
        jac, aux = ours(f, has_aux=True)(w, config, shift=jnp.float32(0.5))
        want_jac, want_aux = theirs(lambda w, c, *, shift: (f(w, c, shift=shift)[0],
                                                             f(w, c, shift=shift)[1]["norm"]),
                                    has_aux=True)(w, config, shift=jnp.float32(0.5))
        assert_close(jac, want_jac)
        assert_close(aux["norm"], want_aux)


def test_python_code_may_branch_on_a_non_differentiated_array_argument():
    def f(x, n):
        return x ** 3 if n > 2 else x ** 2

    x = jnp.arange(3.0)
    for n in (jnp.asarray(3), jnp.asarray(1), 3):
        assert_close(fungrad.jacfwd(f)(x, n), jax.jacfwd(f)(x, n))


def test_eager_vjp_and_linearize_run_compiled_programs(monkeypatch):
    x = _batches(1)[0]
    for name in ("_primal_flat", "_pullback_flat", "_linear_flat"):
        calls = _count_calls(monkeypatch, name)
        for step in range(3):
            calls.clear()
            _, pullback = fungrad.vjp(_loss, W, x)
            _, f_jvp = fungrad.linearize(_loss, W, x)
            got = pullback(jnp.ones(()))
            assert_close(got, jax.vjp(_loss, W, x)[1](jnp.ones(())))
            assert_close(f_jvp(W, x), jax.jvp(_loss, (W, x), (W, x))[1])
            if step == 2:  # compiled programs by now: the flat functions no longer run
                assert calls == []
        # Inside a trace the pullback is inlined, not compiled separately.
        assert_close(jax.jit(pullback)(jnp.ones(())), got)
        assert_close(jax.vmap(pullback)(jnp.ones(3))[0][1], got[0])


def test_an_eager_hvp_compiles_a_program_of_the_tangents_alone(monkeypatch):
    # hvp is jvp of grad without the gradient: its compiled program returns the
    # Hessian-vector product only, so XLA drops what computes only the gradient.
    from fungrad._src import api

    compiled_outs = []
    original = api._Dispatch._compile

    def compile_(self, args):
        jitted = jax.jit(functools.partial(self.flat, self.closed, *self.static))
        compiled_outs.append(len(jitted.trace(*args[1 + len(self.static):]).jaxpr.out_avals))
        return original(self, args)

    monkeypatch.setattr(api._Dispatch, "_compile", compile_)
    monkeypatch.setattr(api._compile_cost, "predict", lambda size: 0.0)  # compile at once
    fungrad.clear_caches()
    loss = lambda w, x: jnp.sum(jnp.tanh(x @ w) ** 2)  # noqa: E731
    x = _batches(1)[0]
    for _ in range(3):
        got = fungrad.hvp(loss, (W, x), (W, x))
    assert compiled_outs == [2]  # the two tangents, not the two gradients too
    assert_close(got, jax.jvp(jax.grad(loss, argnums=(0, 1)), (W, x), (W, x))[1])


def test_an_eager_pullback_with_a_structurally_zero_cotangent_returns_arrays():
    # The second derivative of a piecewise-linear function is a symbolic zero inside
    # fungrad; its compiled eager pullback still returns arrays, as jax's does.
    x = jnp.array([1.0, -2.0, 3.0])

    def first(lib):
        return lambda x: lib.vjp(lambda x: jnp.maximum(x, 0.0), x)[1](jnp.ones(3))[0]

    got = fungrad.vjp(first(fungrad), x)[1](jnp.ones(3))
    assert_close(got, jax.vjp(first(jax), x)[1](jnp.ones(3)))


# --- issue 11: the meaning of an eager call is jax.grad's ------------------------------------

X = jnp.arange(1.0, 4.0)


def _both(transform, fun, *args):
    """`transform` of `fun` at `args`, by fungrad and by jax (same names in both)."""
    if transform == "hvp":
        got = fungrad.hvp(fun, args, args)
        return got, jax.jvp(jax.grad(fun, argnums=tuple(range(len(args)))), args, args)[1]
    ours, theirs = getattr(fungrad, transform), getattr(jax, transform)
    if transform == "vjp":
        (y, pb), (y_jax, pb_jax) = ours(fun, *args), theirs(fun, *args)
        return (y, pb(jnp.ones_like(y))), (y_jax, pb_jax(jnp.ones_like(y_jax)))
    return ours(fun)(*args), theirs(fun)(*args)


TRANSFORMS = ["grad", "value_and_grad", "vjp", "jacrev", "jacfwd", "hessian", "hvp"]


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_a_changed_global_array_is_seen(transform):
    global G
    G = jnp.ones(3)

    def loss(x):
        return jnp.sum(G * x ** 2)

    _both(transform, loss, X)
    G = 2.0 * jnp.ones(3)
    got, want = _both(transform, loss, X)
    assert_close(got, want)


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_a_changed_global_python_float_is_seen(transform):
    global T
    T = 4.0

    def loss(x):
        return jnp.sum(x ** 2 / T)

    _both(transform, loss, X)
    T = 0.5
    got, want = _both(transform, loss, X)
    assert_close(got, want)


class _Model:
    def __init__(self):
        self.w = jnp.ones(3)

    def loss(self, x):
        return jnp.sum(jnp.sin(self.w * x))


class _Config:
    scale = 1.0


@pytest.mark.parametrize("transform", ["grad", "value_and_grad", "vjp", "jacrev", "hessian"])
def test_a_bound_method_and_a_closed_over_object_see_changed_attributes(transform):
    m, cfg = _Model(), _Config()
    loss = lambda x: cfg.scale * jnp.sum(x ** 3)  # noqa: E731
    _both(transform, m.loss, X), _both(transform, loss, X)
    m.w = m.w * 5
    cfg.scale = 7.0
    for fun in (m.loss, loss):
        got, want = _both(transform, fun, X)
        assert_close(got, want)


@pytest.mark.parametrize("transform", ["grad", "vjp", "jacfwd", "hessian"])
def test_python_side_effects_run_on_every_call(transform):
    log = []

    def loss(x):
        log.append(None)
        return jnp.sum(jnp.tanh(x) ** 2)

    counts = []
    for lib in (fungrad, jax):
        log.clear()
        for _ in range(3):
            getattr(lib, transform)(loss, X) if transform == "vjp" else getattr(
                lib, transform)(loss)(X)
        counts.append(len(log))
    assert counts[0] == counts[1] == 3


def test_print_runs_on_every_call(capsys):
    def loss(x):
        print("step")
        return jnp.sum(x ** 2)

    for _ in range(3):
        fungrad.grad(loss)(X)
    assert capsys.readouterr().out == "step\n" * 3


def _abs_branch(x):
    return x if x > 0 else -x


def _newton_sqrt(a):
    y = a
    while jnp.abs(y * y - a) > 1e-6:
        y = 0.5 * (y + a / y)
    return y


def _loop_count(x):
    y = x
    for _ in range(int(x[0])):
        y = jnp.sin(y) + x
    return jnp.sum(y)


def _item(x):
    return x * x.item() if x.item() > 1 else x


def _float_of_argument(x, scale):
    return jnp.sum(x * float(scale))


VALUE_DEPENDENT = [
    ("if", _abs_branch, (-2.0,)),
    ("newton_while", _newton_sqrt, (2.0,)),
    ("int_loop_count", _loop_count, (jnp.array([3.0, 0.5]),)),
    ("item", _item, (jnp.float32(1.5),)),
    ("float_of_other_argument", _float_of_argument, (X, jnp.asarray(3.0))),
]


@pytest.mark.parametrize("name,fun,args", VALUE_DEPENDENT, ids=[c[0] for c in VALUE_DEPENDENT])
def test_python_control_flow_on_values_differentiates_the_path_taken(name, fun, args):
    for transform in ("grad", "value_and_grad", "jacrev", "hessian"):
        got, want = getattr(fungrad, transform)(fun)(*args), getattr(jax, transform)(fun)(*args)
        assert_close(got, want, err_msg=f"{name} {transform}")
    with jax.disable_jit():
        assert_close(fungrad.grad(fun)(*args), jax.grad(fun)(*args))


def test_the_path_changes_with_the_value():
    for x in (-2.0, 3.0, -2.0):
        assert_close(fungrad.grad(_abs_branch)(x), jax.grad(_abs_branch)(x))


def test_under_jit_value_dependent_python_raises_jaxs_error():
    for lib in (jax, fungrad):
        with pytest.raises(jax.errors.TracerBoolConversionError):
            jax.jit(lib.grad(_abs_branch))(2.0)


def test_float_of_a_differentiated_value_raises_as_in_jax():
    def f(x):
        return x * float(x)

    for lib in (jax, fungrad):
        with pytest.raises(jax.errors.ConcretizationTypeError):
            lib.grad(f)(2.0)


def test_closed_over_constants_stay_constants():
    # jax's reduce_window recognises a concrete -inf init as a max: reverse mode works.
    init = np.asarray(-np.inf, np.float32)

    def pool(x):
        return jnp.sum(jax.lax.reduce_window(x, init, jax.lax.max, (2,), (1,), "VALID") ** 2)

    x = jnp.array([1.0, 3.0, 2.0, 5.0])
    assert_close(fungrad.grad(pool)(x), jax.grad(pool)(x))
    sizes = (np.int64(1), np.int64(3))  # numpy integers as static sizes

    def split_sum(x):
        a, b = jax.lax.split(x, sizes)
        return jnp.sum(a) * jnp.sum(b ** 2)

    assert_close(fungrad.grad(split_sum)(x), jax.grad(split_sum)(x))


def test_a_python_scalar_argument_does_not_compile_a_program_per_value(monkeypatch):
    from fungrad._src import api

    monkeypatch.setattr(api._compile_cost, "predict", lambda size: 0.0)  # compile once the program recurs
    calls = []
    original = api._value_and_grad_flat
    monkeypatch.setattr(api, "_value_and_grad_flat",
                        lambda *a: calls.append(None) or original(*a))

    def f(x, a):
        return jnp.sum(jnp.sin(x) * a)

    for i in range(30):
        assert_close(fungrad.grad(f)(X, float(i)), jax.grad(f)(X, float(i)))
    assert len(calls) <= 2  # run op by op once, traced for compilation once


@jax.custom_vjp
def _scaled_sin(x):
    return jnp.sin(x)


def _scaled_sin_fwd(x):
    return jnp.sin(x), jnp.cos(x)


def _scaled_sin_bwd(cos_x, g):
    return (BWD_SCALE * cos_x * g,)  # reads a global at each call, as the user wrote it


_scaled_sin.defvjp(_scaled_sin_fwd, _scaled_sin_bwd)
BWD_SCALE = 1.0


def test_a_custom_vjp_program_is_shared_between_calls_and_sees_its_rules_change(monkeypatch):
    # The call is keyed by its fwd and bwd as traced at capture: a new batch per call reuses
    # one compiled program (forward and reverse mode), and a bwd that now reads another
    # value is another program.
    global BWD_SCALE
    plain = lambda x, b: jnp.sum(jnp.sin(x) * b)  # noqa: E731  (the rule's true derivative)
    for transform, reference, flat in [(fungrad.grad, jax.grad, "_value_and_grad_flat"),
                                       (fungrad.jacfwd, jax.jacfwd, "_transform_flat")]:
        calls = _count_calls(monkeypatch, flat)
        for x in _batches(4):
            got = transform(lambda w: jnp.sum(_scaled_sin(w) * x[0, 0]))(W[0])  # noqa: B023
            assert_close(got, reference(lambda w: plain(w, x[0, 0]))(W[0]))  # noqa: B023
        assert len(calls) <= 2, transform
    try:
        BWD_SCALE = 3.0
        got = fungrad.grad(lambda w: jnp.sum(_scaled_sin(w)))(W[0])
        assert_close(got, 3.0 * jnp.cos(W[0]))
    finally:
        BWD_SCALE = 1.0


def test_equal_structure_with_other_constants_is_a_different_result():
    def make(c):
        return lambda x: jnp.sum(jnp.sin(x * c))

    for c in (jnp.float32(1.0), jnp.float32(3.0), np.float32(-2.0), 0.5):
        assert_close(fungrad.grad(make(c))(X), jax.grad(make(c))(X))


def test_a_constant_output_is_that_of_the_current_call():
    # A Python float the function returns as it is (an aux metric, a constant output) is
    # a literal output of the trace. The shared program takes it as an input, as other
    # float literals: run with this call's constants it gives this call's value, not the
    # first trace's (the transforms also return it as given, see the next test).
    from fungrad._src import capture, jaxutil

    fungrad.clear_caches()
    for step, c in enumerate((1.5, 2.5, -3.0)):
        fun = lambda x: (jnp.sum(x * x), c)  # noqa: B023, E731
        captured, consts = capture.capture(fun, jax.tree_util.tree_structure((X,)), [X], [True])
        assert captured.reused == (step > 0)
        out = jaxutil.eval_jaxpr(captured.jaxpr.jaxpr, captured.jaxpr.consts, X, *consts)
        assert float(out[1]) == c
        (got, got_aux), (want, want_aux) = (fungrad.grad(fun, has_aux=True)(X),
                                            jax.grad(fun, has_aux=True)(X))
        assert_close(got, want)
        assert got_aux == want_aux == c


def _given_outputs(lib):
    aux = lambda x: {"lr": 1.5, "mask": np.ones(2), "step": 3, "scale": np.float32(2)}  # noqa: E731
    f = lambda x: (jnp.sum(jnp.sin(x) ** 2), aux(x))  # noqa: E731
    v = lambda x: (jnp.sin(x), 2.5)  # noqa: E731
    return [lib.grad(f, has_aux=True)(X)[1], lib.value_and_grad(f, has_aux=True)(X)[0][1],
            lib.vjp(v, X)[0][1], lib.jvp(v, (X,), (X,))[0][1], lib.linearize(v, X)[0][1],
            lib.jacfwd(f, has_aux=True)(X)[1], lib.jacrev(f, has_aux=True)(X)[1],
            lib.hessian(f, has_aux=True)(X)[1]]


def test_untraced_outputs_come_back_as_given_as_in_jax(monkeypatch):
    # What the function returns untraced (an aux metric, a numpy mask, a constant output)
    # jax returns as it was given: the same types and dtypes (a float64 numpy array stays
    # one), at every call, whether fungrad ran the program op by op (the first call) or
    # compiled (the later ones).
    from fungrad._src import api

    monkeypatch.setattr(api._compile_cost, "predict", lambda size: 0.0)  # compile at once
    fungrad.clear_caches()
    want = _given_outputs(jax)
    for _ in range(4):
        got = _given_outputs(fungrad)
        for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want),
                        strict=True):
            assert type(g) is type(w) and np.asarray(g).dtype == np.asarray(w).dtype
            np.testing.assert_array_equal(g, w)


def test_linearize_returns_a_pytree_that_passes_into_and_out_of_jit():
    def f(x):
        return jnp.sin(x) * x

    want = jax.jvp(f, (X,), (jnp.ones(3),))[1]
    _, f_jvp = fungrad.linearize(f, X)
    assert_close(jax.jit(lambda fj, t: fj(t))(f_jvp, jnp.ones(3)), want)
    returned = jax.jit(lambda x: fungrad.linearize(f, x)[1])(X)
    assert_close(returned(jnp.ones(3)), want)


@jax.custom_jvp
def _scaled_cube(x):
    return x ** 3


@_scaled_cube.defjvp
def _scaled_cube_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    return x ** 3, JVP_SCALE * 3 * x ** 2 * t  # reads a global at each call


JVP_SCALE = 1.0


def test_jax_rules_are_traced_once_per_types_and_the_users_at_every_call(monkeypatch):
    # jax.nn.relu's function and rule are jax's code, fixed functions of their arguments:
    # traced once for these types. A user's may read state that changes: traced at every call.
    global JVP_SCALE
    from fungrad._src import jaxutil

    traced, functions = [], []
    original = jaxutil._trace_jvp_rule
    monkeypatch.setattr(jaxutil, "_trace_jvp_rule",
                        lambda jvp, *a, **k: traced.append(jvp.f) or original(jvp, *a, **k))
    trace_function = jaxutil._pe.trace_to_jaxpr_dynamic  # jax's trace of a custom_jvp's function
    monkeypatch.setattr(jaxutil._pe, "trace_to_jaxpr_dynamic",
                        lambda f, *a, **k: functions.append(f.f) or trace_function(f, *a, **k))
    fungrad.clear_caches()
    relu = lambda w: jnp.sum(jax.nn.relu(w) * w)  # noqa: E731
    xs = [x[0] for x in _batches(3)]
    wants = [jax.grad(relu)(x) for x in xs]
    traced.clear()
    functions.clear()
    for i, (x, want) in enumerate(zip(xs, wants, strict=True)):
        calls = len(functions)
        assert_close(fungrad.grad(relu)(x), want)
        assert (jax.nn.relu.fun in functions[calls:]) == (i == 0)  # then from the cache
    assert traced == [jax.nn.relu.jvp]
    traced.clear()
    functions.clear()
    cube = lambda w: jnp.sum(_scaled_cube(w))  # noqa: E731
    try:
        for scale in (1.0, 2.0, -1.0):
            JVP_SCALE = scale
            want = jax.grad(cube)(W[0])
            calls = len(functions)
            got = fungrad.grad(cube)(W[0])
            assert functions[calls:].count(_scaled_cube.fun) == 1  # traced at every call
            assert_close(got, want)
            assert_close(got, scale * 3 * W[0] ** 2)
    finally:
        JVP_SCALE = 1.0
    assert len(traced) == 3  # one per call


def test_only_code_of_jax_counts_as_jax_owned():
    from fungrad._src.jaxutil import _jax_owned

    assert _jax_owned(jax.nn.relu.jvp) and _jax_owned(jax.nn.relu)
    assert not _jax_owned(_scaled_cube_jvp) and not _jax_owned(_scaled_cube)
    assert not _jax_owned(jax.jit(_scaled_cube_jvp))
    assert not _jax_owned(functools.partial(jax.nn.relu.jvp, _scaled_cube_jvp))
    assert not _jax_owned((jax.nn.relu.jvp, [1.0]))  # a list may change


@jax.custom_jvp
def _signed_slope(x):
    return jnp.sin(x)


@_signed_slope.defjvp
def _signed_slope_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    return _signed_slope(x), (2.0 if x > 0 else -3.0) * t  # a rule that branches on x


@jax.custom_vjp
def _signed_back(x):
    return jnp.sin(x)


_signed_back.defvjp(lambda x: (jnp.sin(x), x),
                    lambda x, ct: ((2.0 if x > 0 else -3.0) * ct,))  # a bwd that branches


@pytest.mark.parametrize("fun", [_signed_slope, _signed_back], ids=["custom_jvp", "custom_vjp"])
def test_custom_rules_may_branch_on_values(fun):
    def loss(x):
        return fun(x) * x

    for x in (1.0, -1.0, 1.0):
        assert_close(fungrad.grad(loss)(x), jax.grad(loss)(x))
        assert_close(fungrad.value_and_grad(fun)(x), jax.value_and_grad(fun)(x))


@pytest.mark.parametrize("transform", ["grad", "jacfwd", "jacrev", "hessian"])
def test_derivatives_at_a_python_float_keep_its_weak_type(transform):
    for fun in (lambda x: x, lambda x: x * x):
        got, want = getattr(fungrad, transform)(fun)(3.0), getattr(jax, transform)(fun)(3.0)
        assert jax.typeof(got) == jax.typeof(want)
        assert_close(got, want)


def _vmapped_rule_closure(x):
    def per(c):
        @jax.custom_jvp
        def h(y):
            return jnp.sin(y) * c

        @h.defjvp
        def h_jvp(primals, tangents):
            return h(primals[0]), jnp.cos(primals[0]) * c * tangents[0]

        return h(x)

    return jnp.sum(jax.vmap(per)(jnp.arange(3.0)))


def test_a_custom_rule_may_close_over_a_value_vmapped_inside_the_function():
    for transform in ("grad", "jacfwd", "jacrev", "hessian"):  # second order: the rule's own call
        got = getattr(fungrad, transform)(_vmapped_rule_closure)(0.5)
        assert_close(got, getattr(jax, transform)(_vmapped_rule_closure)(0.5))


def _vmapped_custom_vjp(closed_over: bool):
    @jax.custom_vjp
    def h(y, c):
        return jnp.sin(y) * c

    h.defvjp(lambda y, c: (h(y, c), (jnp.cos(y), c)),
             lambda res, ct: (res[0] * res[1] * ct, jnp.zeros_like(res[1])))

    def per_closing_over(x, c):
        g = jax.custom_vjp(lambda y: jnp.sin(y) * c)
        g.defvjp(lambda y: (g(y), jnp.cos(y)), lambda r, ct: (r * c * ct,))
        return g(x)

    per = per_closing_over if closed_over else h
    return lambda x: jnp.sum(jax.vmap(lambda c: per(x, c))(jnp.arange(3.0)))


def test_a_custom_vjp_rule_may_close_over_a_value_vmapped_inside_the_function():
    # jax.grad itself leaks the vmapped value here; fungrad traces fwd and bwd while the
    # vmap lives. Checked against jax on the same function with the value an argument.
    ours, same = _vmapped_custom_vjp(closed_over=True), _vmapped_custom_vjp(closed_over=False)
    for x in (0.5, -1.25):
        assert_close(fungrad.grad(ours)(x), jax.grad(same)(x))
        assert_close(fungrad.jacrev(ours)(x), jax.jacrev(same)(x))
        assert_close(fungrad.value_and_grad(ours)(x), jax.value_and_grad(same)(x))
        assert_close(jax.jit(fungrad.grad(ours))(x), jax.grad(same)(x))
        step = 1e-3
        assert_close(fungrad.grad(ours)(x), (ours(x + step) - ours(x - step)) / (2 * step),
                     rtol=1e-2)


def test_a_jax_without_the_eager_trace_layout_falls_back_to_plain_tracing(monkeypatch):
    from fungrad._src import jaxutil

    monkeypatch.setattr(jaxutil, "_EAGER_TRACE_SUPPORTED", False)

    def loss(x):
        return jnp.sum(jnp.tanh(x) ** 2 * G2)

    for transform in ("grad", "jacrev", "hessian"):
        got, want = _both(transform, loss, X)
        assert_close(got, want)


G2 = jnp.arange(3.0)


def test_calls_kept_whole_by_capture_inline_to_what_jax_traces():
    # jnp's functions stay one call each during capture and are inlined once per program:
    # the program has the equations of jax's own trace, with the user's lines.
    from fungrad._src import jaxutil

    def f(x):
        return jnp.sum(jnp.where(x > 0, jnp.sqrt(jnp.abs(x)), 0.0) * jnp.mean(x)) + jnp.var(x)

    x = jnp.linspace(-1.0, 2.0, 7)
    kept = jaxutil.capture_jaxpr(lambda x: [f(x)], [jax.typeof(x)], [x], "f", defer_calls=True)
    assert any(e.primitive is jaxutil.prims.jit_p for e in kept.jaxpr.eqns)
    inlined = jaxutil.inline_calls(kept.jaxpr)
    traced = jax.make_jaxpr(f)(x).jaxpr
    ours = collections.Counter(str(e.primitive) for e in inlined.eqns)
    theirs = collections.Counter(str(e.primitive) for e in traced.eqns)
    # jax's trace folds conversions and broadcasts of literals; inlining does not (XLA does)
    assert not theirs - ours and set(ours - theirs) <= {"convert_element_type", "broadcast_in_dim"}
    assert all(__file__ in jaxutil.source_line(e) for e in inlined.eqns)
    assert_close(jaxutil.eval_jaxpr(inlined, kept.consts, x)[0], f(x))
    assert_close(fungrad.grad(f)(x), jax.grad(f)(x))


def test_a_transform_inside_another_is_staged_once_and_runs_the_users_python_each_call():
    from fungrad._src import api

    fungrad.clear_caches()
    for step, x in enumerate(_batches(4)):
        for ours, theirs in [(fungrad.hessian(lambda w: _loss(w, x)), jax.hessian(lambda w: _loss(w, x))),  # noqa: B023
                             (lambda w: fungrad.hvp(lambda w: _loss(w, x), (w,), (w,)),  # noqa: B023
                              lambda w: (jax.jvp(jax.grad(lambda w: _loss(w, x)), (w,), (w,))[1],))]:  # noqa: B023
            traces.clear()
            got = ours(W)
            assert traces  # the user's Python ran in fungrad's call, as in jax's
            assert_close(got, theirs(W))
        if step >= 2:
            assert api._staged.info().hits > 0


def test_the_collector_is_paused_for_a_call_and_back_on_after_it_even_one_that_raises():
    import gc

    assert gc.isenabled()
    seen = []

    def loss(x):
        seen.append(gc.isenabled())
        return jnp.sum(x ** 2)

    fungrad.grad(loss)(W)
    fungrad.hessian(loss)(W)  # nested transforms: back on once the outer one returns
    assert seen == [False, False] and gc.isenabled()
    with pytest.raises(ZeroDivisionError):
        fungrad.grad(lambda x: 1 / 0)(W)
    assert gc.isenabled()
    gc.disable()
    try:
        fungrad.grad(lambda x: jnp.sum(x ** 2))(W)
        assert not gc.isenabled()  # the user's choice stands
    finally:
        gc.enable()


def _two_relus(x):
    a = jax.nn.relu(x)  # the first call's line
    b = jax.nn.relu(2 * x)  # the second's: the same types
    return [a * b]


def test_jax_custom_jvp_calls_from_the_cache_have_the_lines_of_jaxs_trace():
    # jax traces a custom_jvp's function and rule with the stack reset: their equations
    # record no line of the caller, the same for every call, and the call's equation its
    # own line. Those from fungrad's cache (the second capture) are what jax's trace gives.
    from jax._src import source_info_util

    from fungrad._src import jaxutil

    def lines(jaxpr):
        where = lambda e: getattr(source_info_util.user_frame(e.source_info.traceback),  # noqa: E731
                                  "start_line", None)
        return [(where(e), [where(i) for i in e.params["call_jaxpr"].jaxpr.eqns])
                for e in jaxpr.eqns if e.primitive.name == "custom_jvp_call"]

    first = _two_relus.__code__.co_firstlineno + 1
    want = lines(jax.make_jaxpr(_two_relus)(W[0]).jaxpr)
    assert [line for line, _ in want] == [first, first + 1]
    for _ in range(2):
        closed = jaxutil.capture_jaxpr(_two_relus, [jaxutil.typeof(W[0])], [W[0]], "two_relus")
        assert lines(closed.jaxpr) == want


def test_argument_names_for_messages_are_jaxs_also_from_the_cache():
    # fungrad caches what jax's messages say of a function (name, line, argument names)
    # by what jax makes it of; every kind of callable, asked twice, gets jax's answer.
    from jax._src import api_util

    from fungrad._src import jaxutil

    def loss(weights, scale=2.0, *, k=1):
        return jnp.sum(weights) * scale

    class Model:
        def loss(self, weights, scale):
            return jnp.sum(weights) * scale

    @functools.wraps(loss)
    def wrapper(*args, **kwargs):
        return loss(*args, **kwargs)

    def other(x, y):
        return x * y

    retargeted = functools.wraps(loss)(lambda *a: loss(*a))
    cycle = functools.wraps(loss)(lambda *a: loss(*a))
    cycle.__wrapped__ = cycle  # jax cannot unwrap it, and names it by itself
    callables = [loss, Model().loss, wrapper, fungrad.grad(loss), fungrad.jacrev(wrapper),
                 fungrad.grad(Model().loss), functools.partial(loss, scale=3.0), retargeted]
    args = ({"w": jnp.ones(2), "b": [jnp.ones(1)]}, 3.0)
    for fun in callables:
        for nums in [(0,), (0, 1)]:
            static = [i for i in range(len(args)) if i not in nums]
            for _ in range(2):
                ours = jaxutil.user_debug_info("fungrad.grad", fun, args, nums)
                assert ours == api_util.debug_info("fungrad.grad", fun, args, {},
                                                   static_argnums=static), (fun, nums)
        if fun is retargeted:  # a wrapper made to wrap another function: named by that one
            fun.__wrapped__ = other
            assert jaxutil.user_debug_info("fungrad.grad", fun, args, (0,)) == (
                api_util.debug_info("fungrad.grad", fun, args, {}, static_argnums=[1]))
            assert "other" in jaxutil.user_debug_info("fungrad.grad", fun, args, (0,)).func_src_info
    with pytest.raises(ValueError, match="wrapper loop"):
        api_util.debug_info("fungrad.grad", cycle, args, {}, static_argnums=[1])
    for _ in range(2):  # jax cannot name it: fungrad names the function alone, and goes on
        assert jaxutil.user_debug_info("fungrad.grad", cycle, args, (0,)).arg_names is None


def test_one_function_jitted_with_other_options_is_another_program():
    # jax traces a function once for all its jit wrappers, so calls of `jax.jit(g)` and of
    # `jax.jit(g, keep_unused=True)` hold the same jaxpr: their keys must still differ.
    from fungrad._src import capture

    def g(x):
        return jnp.sin(x) * 2.0

    x = jnp.ones(3)
    tree = jax.tree_util.tree_structure((x,))
    programs = []
    for wrapper in (jax.jit(g), jax.jit(g, keep_unused=True), jax.jit(g, inline=True)):
        for _ in range(2):
            captured, _ = capture.capture(lambda x: wrapper(x) + 1.0, tree, [x], [True])
        programs.append(captured.jaxpr)
        assert captured.reused  # the second call of each shares the first's program
    assert len({id(p) for p in programs}) == 3
    for wrapper in (jax.jit(g), jax.jit(g, keep_unused=True), jax.jit(g, inline=True)):
        assert_close(fungrad.grad(lambda x: jnp.sum(wrapper(x)))(x),
                     jax.grad(lambda x: jnp.sum(wrapper(x)))(x))
