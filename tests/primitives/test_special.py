"""Spec table for the special functions, reduce_precision, nextafter, integer primitives,
and the jax.scipy.special functions built on them; jax's refusals are matched."""

import jax
import jax.numpy as jnp
import jax.scipy.special as jsp
import numpy as np
import pytest
from jax import lax

import fungrad
from fungrad.testing import check_grads
from tests.harness import assert_close, check_all, check_case

LIGHT = {"order": 1}  # jax has no second derivative here (its rule needs igamma_grad_a's)
NOFD = {"fd": False}  # piecewise constant or kinked: jax is the only oracle

INTS = np.array([[0, 1, 7, -3], [12, -1, 255, 64]], np.int32)
SMALL_INTS = np.array([[0, 1, 3, 2], [5, 1, 2, 7]], np.int32)


# Argument specs: ("pos", shape) uniform in (0.5, 3); ("unit", shape) in (0.1, 0.9); ("r",
# shape) standard normal; ("away", shape) normal with |x| >= 0.3 (away from kinks at 0);
# an integer array is passed as it is (float0 tangents).
def _arr(kind, shape, dtype, rng):
    if kind == "pos":
        val = rng.uniform(0.5, 3.0, shape)
    elif kind == "unit":
        val = rng.uniform(0.1, 0.9, shape)
    elif kind == "away":
        val = rng.standard_normal(shape)
        val = np.sign(val) * (0.3 + np.abs(val))
    else:
        val = rng.standard_normal(shape)
    return val.astype(dtype)


def _const(value):
    """A scalar of the dtype of `like`: keeps float32 cases in float32."""
    return lambda like: jnp.asarray(value, like.dtype)


C = _const

CASES = [
    # Primitives (where a jax.scipy.special function is the bare primitive, it is used).
    ("igamma/gammainc", lambda a, x: jsp.gammainc(a, x), [("pos", (3,)), ("pos", (3,))], LIGHT),
    ("igammac/gammaincc", lambda a, x: jsp.gammaincc(a, x), [("pos", (3,)), ("pos", (3,))],
     LIGHT),
    ("betainc/x", lambda x: jsp.betainc(C(2.0)(x), C(3.5)(x), x), [("unit", (2, 3))]),
    ("betainc/x_small_a", lambda x: lax.betainc(C(0.6)(x), C(0.8)(x), x ** 2), [("unit", (4,))]),
    ("bessel_i0e", lambda x: jsp.i0e(x * jnp.array([1.0, 30.0], x.dtype)), [("away", (3, 2))]),
    ("bessel_i1e", lambda x: jsp.i1e(x) * x, [("away", (2, 4))]),
    ("bessel_i1e/at_zero", lambda x: lax.bessel_i1e(x * jnp.array([0.0, 1.0, 1e-30], x.dtype)),
     [("r", (3,))], NOFD),
    ("bessel_i0e/at_zero", lambda x: lax.bessel_i0e(x * jnp.array([0.0, 1.0], x.dtype)),
     [("r", (2,))], NOFD),
    ("lgamma/gammaln", lambda x: jsp.gammaln(x), [("pos", (2, 3))]),
    ("digamma", lambda x: jsp.digamma(x), [("pos", (3,))]),
    ("polygamma/x", lambda x: jsp.polygamma(2, x), [("pos", (3,))]),
    ("erf_erfc", lambda x: jsp.erf(x) * jsp.erfc(x), [("r", (4,))]),
    ("rem/float", lambda x, y: lax.rem(x, y), [("r", (2, 3)), ("pos", (2, 3))]),
    ("rem/int_divisor", lambda x: lax.rem(x, 0.75 * jnp.ones_like(x)), [("pos", (4,))]),
    ("reduce_precision/bf16",
     lambda x: lax.reduce_precision(x, exponent_bits=8, mantissa_bits=7) * x, [("r", (2, 3))],
     NOFD),
    ("reduce_precision/f16", lambda x: lax.reduce_precision(x ** 2, 5, 10), [("r", (4,))], NOFD),
    # integer primitives inside a float function: zero derivative, float0 tangents for ints
    ("int/rem", lambda x, i: x * lax.rem(i, np.int32(3)).astype(x.dtype),
     [("r", (2, 4)), INTS], NOFD),
    ("int/population_count", lambda x, i: x * lax.population_count(i).astype(x.dtype),
     [("r", (2, 4)), INTS], NOFD),
    ("int/clz", lambda x, i: x * lax.clz(i).astype(x.dtype), [("r", (2, 4)), INTS], NOFD),
    ("int/shifts",
     lambda x, i, s: x * (lax.shift_left(i, s) + lax.shift_right_arithmetic(i, s)
                          + lax.shift_right_logical(i, s)).astype(x.dtype),
     [("r", (2, 4)), INTS, SMALL_INTS], NOFD),
    ("int/bitwise_pow_floordiv",
     lambda x, i: x ** 2 * (((i & 5) | (~i ^ 3)) + i ** 2 // 3 % 5).astype(x.dtype),
     [("r", (2, 4)), INTS], NOFD),
    # jax.scipy.special functions built from several primitives (float64 only)
    ("jsp/gammainc_x", lambda x: jsp.gammainc(C(2.5)(x), x) * x, [("pos", (2, 3))]),
    ("jsp/xlogy", lambda x, y: jsp.xlogy(x, y), [("r", (3,)), ("pos", (3,))]),
    ("jsp/xlogy_zero", lambda y: jsp.xlogy(jnp.zeros_like(y), y), [("pos", (3,))]),
    ("jsp/xlog1py", lambda x, y: jsp.xlog1py(x, y), [("r", (3,)), ("pos", (3,))]),
    ("jsp/ndtr", lambda x: jsp.ndtr(x), [("r", (4,))]),
    ("jsp/ndtri", lambda p: jsp.ndtri(p), [("unit", (4,))], LIGHT),
    ("jsp/log_ndtr", lambda x: jsp.log_ndtr(4 * x), [("r", (2, 3))]),
    ("jsp/logsumexp", lambda x: jsp.logsumexp(x, axis=1), [("r", (2, 3))]),
    ("jsp/logsumexp_b", lambda x, b: jsp.logsumexp(x, b=b), [("r", (3,)), ("pos", (3,))]),
    ("jsp/entr", lambda x: jsp.entr(x), [("pos", (3,))]),
    ("jsp/expit", lambda x: jsp.expit(x), [("r", (4,))]),
    ("jsp/logit", lambda p: jsp.logit(p), [("unit", (4,))]),
]


def _args(specs, dtype, seed=0):
    rng = np.random.default_rng(seed)
    return [_arr(*s, dtype, rng) if isinstance(s, tuple) else s for s in specs]


# The primitives run in float32 and float64; the jax.scipy.special wrappers, built on the
# same primitives, in float64 only (it keeps the file's compile time down).
PARAMS = [pytest.param(case, dtype, id=f"{case[0]}-{dtype}")
          for case in CASES for dtype in ("float32", "float64")
          if dtype == "float64" or not case[0].startswith("jsp/")]


@pytest.mark.parametrize(("case", "dtype"), PARAMS)
def test_rule(case, dtype):
    check_case(case, _args(case[2], dtype), light=dtype == "float32")


# --- derivatives jax lacks: fungrad's own, checked with finite differences ---------------

def test_igamma_mixed_second_derivative():
    # d2 P / da dx: igamma's a-derivative is igamma_grad_a, whose x-derivative jax lacks.
    def da(a, x):
        return fungrad.jvp(lambda a: lax.igamma(a, x), (a,), (jnp.ones_like(a),))[1]
    check_grads(lambda x: da(jnp.array([1.3, 2.0]), x), (jnp.array([0.9, 2.2]),), order=1)


def test_zeta():
    # lax.zeta has no rule in jax; jax.scipy.special.zeta's custom rule gives the q-derivative,
    # and fungrad honours that rule for both arguments.
    s, q = jnp.array([2.0, 3.5, 5.0]), jnp.array([0.7, 1.5, 4.0])
    ts, tq = jnp.array([0.3, 1.0, -1.0]), jnp.array([1.0, -2.0, 0.5])
    ours = fungrad.jvp(lambda q: lax.zeta(s, q), (q,), (tq,))
    assert_close(ours, jax.jvp(lambda q: jsp.zeta(s, q), (q,), (tq,)), rtol=1e-10)
    assert_close(fungrad.jvp(jsp.zeta, (s, q), (ts, tq)), jax.jvp(jsp.zeta, (s, q), (ts, tq)))
    check_grads(lambda q: lax.zeta(s, q), (q,), order=2)


# --- where jax refuses, fungrad refuses the same way, naming the primitive ---------------

REFUSALS = [
    ("igamma_grad_a/a", lambda a: lax.igamma_grad_a(a, jnp.full_like(a, 1.5)), NotImplementedError),
    ("zeta/s", lambda s: lax.zeta(s, jnp.full_like(s, 2.0)), NotImplementedError),
    ("nextafter/x1", lambda x: lax.nextafter(x, jnp.full_like(x, 2.0)), NotImplementedError),
    ("nextafter/x2", lambda x: lax.nextafter(jnp.full_like(x, 2.0), x), NotImplementedError),
    ("regularized_incomplete_beta/a",
     lambda a: lax.betainc(a, jnp.full_like(a, 2.0), jnp.full_like(a, 0.3)), ValueError),
    ("regularized_incomplete_beta/b",
     lambda b: lax.betainc(jnp.full_like(b, 2.0), b, jnp.full_like(b, 0.3)), ValueError),
    ("polygamma/m", lambda m: lax.polygamma(m, jnp.full_like(m, 2.0)), ValueError),
]


@pytest.mark.parametrize("mode", ["jvp", "vjp"])
@pytest.mark.parametrize("case", REFUSALS, ids=[c[0] for c in REFUSALS])
def test_refuses_like_jax(case, mode):
    name, fn, error = case
    x = jnp.array([1.0, 2.0])
    for lib in (jax, fungrad):
        with pytest.raises(error) as info:
            if mode == "jvp":
                lib.jvp(fn, (x,), (jnp.ones_like(x),))
            else:
                lib.vjp(fn, x)[1](jnp.ones_like(x))
        if lib is fungrad:
            assert name.split("/")[0] in str(info.value)


def test_random_gamma_grad_like_jax():
    # Not a primitive: lax ops around while loops. Forward mode matches jax; reverse mode,
    # which jax refuses (while loops), is the transpose of jax's forward mode.
    a, x = jnp.array([0.7, 2.0, 5.0]), jnp.array([0.3, 1.5, 6.0])
    ta, tx = jnp.array([1.0, -0.5, 2.0]), jnp.array([0.2, 1.0, -1.0])

    def f(a, x):
        return lax.random_gamma_grad(a, x)

    out, out_dot = jax.jvp(f, (a, x), (ta, tx))
    assert_close(fungrad.jvp(f, (a, x), (ta, tx)), (out, out_dot))
    u = jnp.array([0.5, -1.0, 0.25])
    ct_a, ct_x = fungrad.vjp(f, a, x)[1](u)
    assert_close(jnp.vdot(ct_a, ta) + jnp.vdot(ct_x, tx), jnp.vdot(u, out_dot))
    with pytest.raises(ValueError, match="while_loop"):
        jax.vjp(f, a, x)[1](u)


# --- random_gamma: derivatives of samples with respect to the shape parameter ------------
# A sample is a function of `a` at fixed noise (implicit reparameterization), computed by
# a rejection sampler: finite differences are no oracle (a step in `a` can change which
# proposal is accepted), so jax's own transforms are. The key is an argument too: its
# tangent is float0 and it gets no cotangent. Each sampler takes seconds to compile, so
# the cases are spread over the dtypes rather than crossed with them.

KEY = jax.random.key(0)
UNDERFLOW = np.array([1 / 5000, 1.0, 1.0])  # a tiny shape: exp(loggamma(a)) rounds to 0


def _loggamma(k, a):
    return jax.random.loggamma(k, a * UNDERFLOW.astype(a.dtype), dtype=a.dtype)


SAMPLERS = [
    ("gamma", lambda k, a: jax.random.gamma(k, a, (2, 3), dtype=a.dtype) * a, 1, "float32"),
    ("loggamma", _loggamma, 1, "float64"),
    # built on the same rule: reverse mode only (beta: test_random_gamma_vmap_over_keys)
    ("dirichlet", lambda k, a: jax.random.dirichlet(k, a, dtype=a.dtype), 1, "float64"),
]


def _shapes(num, dtype, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.uniform(0.3, 3.0, (3,)).astype(dtype) for _ in range(num)]


@pytest.mark.parametrize("case", SAMPLERS, ids=[f"{c[0]}-{c[3]}" for c in SAMPLERS])
def test_random_gamma(case):
    name, sampler, num, dtype = case
    modes = ("fwd", "rev") if name in ("gamma", "loggamma") else ("rev",)
    check_all(sampler, [KEY, *_shapes(num, dtype)], order=1, fd=False, modes=modes)


def test_random_gamma_second_order():
    # Forward over reverse matches jax (in log space, whose rule has every operation of
    # the other); reverse over reverse runs random_gamma_grad's while loops backwards,
    # which jax refuses: it equals jax's forward over reverse (H @ 1, H symmetric).
    (a,), (t,) = _shapes(1, "float64"), _shapes(1, "float64", seed=1)

    def f(a):
        return jnp.sum(jnp.sin(jax.random.loggamma(KEY, a)))

    @jax.jit
    def both(a, t):
        return [lib.jvp(lib.grad(f), (a,), (t,)) for lib in (fungrad, jax)]

    actual, expected = both(a, t)
    assert_close(actual, expected)
    with pytest.raises(ValueError, match="while_loop"):
        jax.grad(lambda a: jnp.sum(jax.grad(f)(a)))(a)
    rev_rev = jax.jit(fungrad.grad(lambda a: jnp.sum(fungrad.grad(f)(a))))(a)
    assert_close(rev_rev, jax.jvp(jax.grad(f), (a,), (jnp.ones_like(a),))[1])


def test_random_gamma_vmap_over_keys():
    # fungrad.grad under jax.vmap over several keys, inside jax.jit, against jax.grad.
    def f(key, a):
        return jnp.sum(jax.random.beta(key, a, 2 * a, dtype=a.dtype) ** 2)

    @jax.jit
    def both(keys, a):
        return [jax.vmap(lib.grad(f, argnums=1), (0, None))(keys, a) for lib in (fungrad, jax)]

    (a,) = _shapes(1, "float32")
    actual, expected = both(jax.random.split(KEY, 4), a)
    assert_close(actual, expected)
    assert not np.allclose(actual[0], actual[1])  # each key its own sample
