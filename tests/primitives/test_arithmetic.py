"""The elementwise arithmetic family: a spec table checked against jax, plus its conventions.

Each spec names a lax function, how to draw valid inputs for it and the dtypes jax
differentiates it for; the table is expanded over shapes and dtypes and each case goes
through `check_all` (jvp, vjp, jit, second order, finite differences). The explicit
tests after it pin down jax's conventions where the functions are not smooth (abs at 0,
max ties, relu at 0, clamp at its bounds, pow at 0, ...) and lax's implicit broadcasting.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import fungrad
from tests.harness import assert_close, check_all

F = ("float32", "float64")
C = ("complex64", "complex128")
FC = F + C
SHAPES = {"scalar": (), "0": (0,), "1": (1,), "3": (3,), "2x3": (2, 3)}

Draw = Callable[[np.random.Generator, tuple[int, ...], str], np.ndarray]


def uniform(lo: float, hi: float, imag: float = 0.5) -> Draw:
    """Reals in [lo, hi]; complex numbers get an imaginary part in [-imag, imag]."""
    def draw(rng, shape, dtype):
        x = rng.uniform(lo, hi, shape)
        if np.issubdtype(dtype, np.complexfloating):
            x = x + 1j * rng.uniform(-imag, imag, shape)
        return np.asarray(x, dtype)
    return draw


def away_from_zero(lo: float, hi: float) -> Draw:
    """Magnitudes in [lo, hi] with a random sign (complex: a random phase)."""
    def draw(rng, shape, dtype):
        r = rng.uniform(lo, hi, shape)
        if np.issubdtype(dtype, np.complexfloating):
            return np.asarray(r * np.exp(1j * rng.uniform(-np.pi, np.pi, shape)), dtype)
        return np.asarray(r * rng.choice([-1.0, 1.0], shape), dtype)
    return draw


def integers(lo: int, hi: int) -> Draw:
    """Integer exponents in [lo, hi], whatever the case's dtype."""
    return lambda rng, shape, dtype: rng.integers(lo, hi + 1, shape).astype(np.int32)


def real_part(draw: Draw) -> Draw:
    """Draws the real counterpart of the case's (complex) dtype: for functions of real inputs."""
    def real(rng, shape, dtype):
        return draw(rng, shape, np.finfo(np.dtype(dtype)).dtype.name)
    return real


NORMAL = uniform(-2.0, 2.0)
POSITIVE = uniform(0.5, 2.0)
UNIT = uniform(-0.9, 0.9)


@dataclasses.dataclass(frozen=True)
class Spec:
    fun: Callable[..., Any]
    domains: Sequence[Draw]  # one per argument
    dtypes: Sequence[str] = F
    order: int = 2
    fd: bool = True  # whether jax's derivative is the function's (sign of complex z is not)
    tol: dict = dataclasses.field(default_factory=dict)


def _highest(f: Callable) -> Callable:
    return lambda x: f(x, accuracy=lax.AccuracyMode.HIGHEST)


SPECS: dict[str, Spec] = {
    # linear and bilinear
    "add": Spec(lax.add, [NORMAL, NORMAL], FC),
    "sub": Spec(lax.sub, [NORMAL, NORMAL], FC),
    "neg": Spec(lax.neg, [NORMAL], FC),
    "mul": Spec(lax.mul, [NORMAL, NORMAL], FC),
    "div": Spec(lax.div, [NORMAL, away_from_zero(0.5, 2.0)], FC),
    "rem": Spec(lax.rem, [uniform(-3.0, 3.0), away_from_zero(0.7, 1.7)]),
    # complex parts
    "real": Spec(lax.real, [NORMAL], C),
    "imag": Spec(lax.imag, [NORMAL], C),
    "complex": Spec(lax.complex, [real_part(NORMAL), real_part(NORMAL)], C),
    "conj": Spec(lax.conj, [NORMAL], FC),
    # piecewise
    "max": Spec(lax.max, [NORMAL, NORMAL]),
    "min": Spec(lax.min, [NORMAL, NORMAL]),
    "clamp": Spec(lax.clamp, [uniform(-1.0, -0.3), NORMAL, uniform(0.3, 1.0)]),
    "abs": Spec(lax.abs, [away_from_zero(0.2, 2.0)], FC),
    "sign": Spec(lax.sign, [away_from_zero(0.2, 2.0)]),
    "sign_complex": Spec(lax.sign, [away_from_zero(0.2, 2.0)], C, fd=False),  # z/|z|: 0 by fiat
    "floor": Spec(lax.floor, [NORMAL]),
    "ceil": Spec(lax.ceil, [NORMAL]),
    "round": Spec(lax.round, [NORMAL]),
    "round_even": Spec(lambda x: lax.round(x, lax.RoundingMethod.TO_NEAREST_EVEN), [NORMAL]),
    "is_finite": Spec(lax.is_finite, [NORMAL]),
    # powers
    "pow": Spec(lax.pow, [POSITIVE, NORMAL], FC),
    "pow_int": Spec(lax.pow, [away_from_zero(0.5, 2.0), integers(-3, 3)], FC),
    "integer_pow_0": Spec(lambda x: lax.integer_pow(x, 0), [NORMAL], FC),
    "integer_pow_1": Spec(lambda x: lax.integer_pow(x, 1), [NORMAL], FC),
    "integer_pow_2": Spec(lambda x: lax.integer_pow(x, 2), [NORMAL], FC),
    "integer_pow_3": Spec(lambda x: lax.integer_pow(x, 3), [NORMAL], FC),
    "integer_pow_-1": Spec(lambda x: lax.integer_pow(x, -1), [away_from_zero(0.5, 2.0)], FC),
    "integer_pow_-3": Spec(lambda x: lax.integer_pow(x, -3), [away_from_zero(0.5, 2.0)], FC),
    "square": Spec(lax.square, [NORMAL], FC),
    "sqrt": Spec(lax.sqrt, [POSITIVE], FC),
    "rsqrt": Spec(lax.rsqrt, [POSITIVE], FC),
    "cbrt": Spec(lax.cbrt, [away_from_zero(0.5, 2.0)]),
    # exponentials and logarithms
    "exp": Spec(lax.exp, [NORMAL], FC),
    "exp2": Spec(lax.exp2, [NORMAL], FC),
    "log": Spec(lax.log, [POSITIVE], FC),
    "log1p": Spec(lax.log1p, [uniform(-0.5, 2.0)], FC),
    "expm1": Spec(lax.expm1, [NORMAL], FC),
    "expm1_highest": Spec(_highest(lax.expm1), [NORMAL]),
    "tanh": Spec(lax.tanh, [NORMAL], FC),
    "tanh_highest": Spec(_highest(lax.tanh), [NORMAL]),
    "logistic": Spec(lax.logistic, [NORMAL], FC),
    "logistic_highest": Spec(_highest(lax.logistic), [NORMAL]),
    # trigonometric and hyperbolic
    "sin": Spec(lax.sin, [NORMAL], FC),
    "cos": Spec(lax.cos, [NORMAL], FC),
    "tan": Spec(lax.tan, [uniform(-1.2, 1.2)], FC),
    "asin": Spec(lax.asin, [UNIT], FC),
    "acos": Spec(lax.acos, [UNIT], FC),
    "atan": Spec(lax.atan, [NORMAL], FC),
    "atan2": Spec(lax.atan2, [NORMAL, away_from_zero(0.5, 2.0)]),
    "sinh": Spec(lax.sinh, [NORMAL], FC),
    "cosh": Spec(lax.cosh, [NORMAL], FC),
    "asinh": Spec(lax.asinh, [NORMAL], FC),
    "acosh": Spec(lax.acosh, [uniform(1.2, 3.0)], FC),
    "atanh": Spec(lax.atanh, [UNIT], FC),
    # special functions
    "erf": Spec(lax.erf, [NORMAL]),
    "erfc": Spec(lax.erfc, [NORMAL]),
    "erf_inv": Spec(lax.erf_inv, [UNIT]),
    "lgamma": Spec(lax.lgamma, [uniform(0.5, 3.0)]),
    "digamma": Spec(lax.digamma, [uniform(0.5, 3.0)]),
    "polygamma": Spec(lambda x: lax.polygamma(lax.full_like(x, 2), x), [uniform(0.5, 3.0)]),
}


def _cases():
    """Each spec at one array shape in its first two dtypes, at the scalar, and once complex.

    The array shape rotates through (0,), (1,), (3,), (2, 3) with the spec; both real
    dtypes use the same one, so that the float64 programs compiled for the finite
    differences of the float32 case serve again (compiling is most of the cost). Specs
    that take both complex dtypes alternate between them. jit (four compiled programs)
    runs once per spec, at its first case.
    """
    arrays = [name for name in SHAPES if name != "scalar"]
    for i, (name, spec) in enumerate(SPECS.items()):
        dtypes = list(spec.dtypes)
        if dtypes[0] in F and set(C) <= set(dtypes):  # real and complex: one complex dtype
            dtypes = [d for d in dtypes if d not in C] + [C[i % 2]]
        shape = arrays[i % len(arrays)]
        schedule = [(dtypes[0], shape), (dtypes[1], shape), (dtypes[1], "scalar")]
        schedule += [(d, arrays[(i + 1 + k) % len(arrays)]) for k, d in enumerate(dtypes[2:])]
        for k, (dtype, shape) in enumerate(schedule):
            yield pytest.param(name, dtype, shape, k == 0, id=f"{name}-{dtype}-{shape}")


@pytest.mark.parametrize(("name", "dtype", "shape", "jit"), list(_cases()))
def test_spec(name, dtype, shape, jit):
    spec = SPECS[name]
    rng = np.random.default_rng(zlib.crc32(f"{name}-{dtype}-{shape}".encode()))
    args = [jnp.asarray(draw(rng, SHAPES[shape], dtype)) for draw in spec.domains]
    check_all(spec.fun, args, order=spec.order, fd=spec.fd, jit=jit, **spec.tol)


def test_every_primitive_has_a_spec():
    """The table covers every primitive of the family: a new rule comes with its spec."""
    covered = set()
    for name, spec in SPECS.items():
        dtype = spec.dtypes[0]
        args = [draw(np.random.default_rng(0), (), dtype) for draw in spec.domains]
        covered |= {str(e.primitive) for e in jax.make_jaxpr(spec.fun)(*args).eqns}
        del name
    family = {"add", "sub", "mul", "div", "neg", "max", "min", "pow", "integer_pow", "square",
              "sqrt", "rsqrt", "cbrt", "exp", "exp2", "log", "log1p", "expm1", "tanh",
              "logistic", "sin", "cos", "tan", "asin", "acos", "atan", "atan2", "sinh", "cosh",
              "asinh", "acosh", "atanh", "abs", "sign", "floor", "ceil", "round", "is_finite",
              "erf", "erfc", "erf_inv", "lgamma", "digamma", "clamp", "real", "imag", "complex",
              "conj", "rem", "polygamma"}
    assert family <= covered, sorted(family - covered)


def test_polygamma_order_is_not_differentiable():
    x = jnp.asarray([0.5, 1.5])
    with pytest.raises(ValueError, match="with respect to its order m"):
        fungrad.jvp(lax.polygamma, (jnp.ones_like(x), x), (jnp.ones_like(x), jnp.ones_like(x)))


# --- conventions at non-smooth points: compared with jax, not with finite differences ----
# Each test checks several functions at once (a tuple of outputs) to keep compiles few;
# jit runs in one dtype only.

@pytest.mark.parametrize("dtype", ["float64", "complex128"])
def test_abs_at_zero(dtype):
    x = jnp.asarray([-1.5, 0.0, 0.0, 2.0], dtype)
    zero = jnp.asarray(0.0, dtype)
    check_all(lambda x, zero: (lax.abs(x), jnp.abs(zero)), [x, zero], fd=False,
              jit=dtype == "float64")


@pytest.mark.parametrize("dtype", ["float32"])
def test_max_min_ties(dtype):
    x = jnp.asarray([1.0, 2.0, -3.0, 0.5], dtype)
    y = jnp.asarray([1.0, 0.0, -3.0, 4.0], dtype)  # ties at 0 and 2

    def f(x, y):
        return (lax.max(x, y), lax.min(x, y), jnp.maximum(y, x), jnp.minimum(y, x),
                lax.max(x, x), lax.min(y, y))  # the last two: the same value twice

    check_all(f, [x, y], fd=False)


@pytest.mark.parametrize("dtype", ["float64"])
def test_relu_at_zero(dtype):
    x = jnp.asarray([-1.0, 0.0, 0.0, 2.0], dtype)
    check_all(lambda x: (jax.nn.relu(x), jnp.maximum(x, 0.0), jax.nn.relu6(x + 6)), [x],
              fd=False)


@pytest.mark.parametrize("dtype", ["float32"])
def test_clamp_at_bounds(dtype):
    lo = jnp.asarray([-1.0, -1.0, -1.0, -1.0, 0.5, 0.5], dtype)
    x = jnp.asarray([-1.0, 1.0, -2.0, 0.0, 0.5, 0.5], dtype)
    hi = jnp.asarray([1.0, 1.0, 1.0, 1.0, 0.5, 0.0], dtype)  # last two: lo == hi, lo > hi
    check_all(lambda lo, x, hi: (lax.clamp(lo, x, hi), jnp.clip(x, lo, hi)), [lo, x, hi],
              fd=False)


@pytest.mark.parametrize("dtype", ["float64"])
def test_clamp_rank0_bounds(dtype):
    """A rank-0 lo or hi broadcasts against x; its tangent must too (jax's own rule fails
    here, so the reference clamps with the bounds broadcast by hand)."""
    x = jnp.asarray([[-2.0, -0.5, 0.25], [0.75, 1.5, 3.0]], dtype)
    lo, hi = jnp.asarray(-1.0, dtype), jnp.asarray(1.0, dtype)

    def by_hand(lo, x, hi):
        return lax.clamp(jnp.broadcast_to(lo, x.shape), x, jnp.broadcast_to(hi, x.shape))

    check_all(lax.clamp, [lo, x, hi], ref=by_hand)
    # Only lo differentiated: x's and hi's tangents are symbolic zeros.
    check_all(lambda lo: lax.clamp(lo, x.astype(lo.dtype), hi.astype(lo.dtype)), [lo],
              ref=lambda lo: by_hand(lo, x, hi))
    check_all(lambda x: lax.clamp(lo.astype(x.dtype), x, hi.astype(x.dtype)), [x], jit=False)


def _piecewise_constant(x):
    return (lax.sign(x), lax.floor(x), lax.ceil(x), lax.round(x),
            lax.round(x, lax.RoundingMethod.TO_NEAREST_EVEN))


@pytest.mark.parametrize("dtype", ["float32"])
def test_piecewise_constant_at_jumps(dtype):
    x = jnp.asarray([-1.5, -1.0, -0.5, 0.0, 0.5, 1.0, 2.5], dtype)  # each at a jump of one
    check_all(_piecewise_constant, [x], fd=False, jit=False)
    # d(f(x) x) = f(x) dx: nothing comes from f's jumps.
    outs, x_dots = fungrad.jvp(lambda v: [f * v for f in _piecewise_constant(v)], (x,),
                               (jnp.ones_like(x),))
    assert_close(x_dots, list(_piecewise_constant(x)))


EXPONENTS = [0, 1, 2, 3, -1, -2]


@pytest.mark.parametrize("dtype", ["float64", "complex128"])
def test_pow_integer_exponent_at_zero(dtype):
    """x^n at x = 0 (and at a few other points) for n in EXPONENTS, as pow and integer_pow."""
    x = jnp.asarray(np.repeat([[0.0, 1.5, -0.5]], len(EXPONENTS), 0).ravel(), dtype)
    y = jnp.asarray(np.repeat(EXPONENTS, 3), jnp.int32)

    def f(x):
        return (lax.pow(x, y), lax.pow(x, jnp.int32(2)),
                *(lax.integer_pow(x, n) for n in EXPONENTS))

    check_all(lax.pow, [x, y], fd=False, jit=dtype == "float64")
    check_all(f, [x], fd=False, jit=False)


@pytest.mark.parametrize("dtype", ["float32"])
def test_pow_float_exponent_at_zero(dtype):
    exponents = [0.0, 1.0, 2.0, 0.5, 2.5, -1.0]
    x = jnp.asarray(np.repeat([[0.0, 1.5, 0.25]], len(exponents), 0).ravel(), dtype)
    y = jnp.asarray(np.repeat(exponents, 3), dtype)
    check_all(lambda x, y: (lax.pow(x, y), x ** 2.0, x ** 0.5), [x, y], fd=False)


@pytest.mark.parametrize("dtype", ["float64", "complex64"])
def test_integer_pow_negative(dtype):
    x = jnp.asarray(away_from_zero(0.5, 2.0)(np.random.default_rng(0), (2, 3), dtype))
    check_all(lambda x: [lax.integer_pow(x, n) for n in (-1, -2, -3, -4, -7)], [x], jit=False)


# --- implicit broadcasting of a rank-0 or size-1 operand --------------------------------

BINARY = {"add": lax.add, "sub": lax.sub, "mul": lax.mul, "div": lax.div, "max": lax.max,
          "min": lax.min, "pow": lax.pow, "atan2": lax.atan2, "rem": lax.rem,
          "complex": lax.complex}
PAIRS = [((), (2, 3)), ((2, 3), ()), ((1, 3), (2, 3)), ((2, 1), (1, 3)), ((), (0,))]


@pytest.mark.parametrize(("name", "dtype"), [(name, F[i % 2]) for i, name in enumerate(BINARY)])
def test_implicit_broadcasting(name, dtype):
    """Each operand pair of PAIRS: a rank-0 operand on either side, size-1 dims, size 0.

    The dtype alternates over the operations; jit runs for the float32 ones."""
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    args = []
    for x_shape, y_shape in PAIRS:
        args.append(jnp.asarray(rng.uniform(0.5, 2.0, x_shape), dtype))
        args.append(jnp.asarray(rng.uniform(0.5, 2.0, y_shape) * rng.choice([-1, 1], y_shape),
                                dtype))
    op = BINARY[name]
    check_all(lambda *a: [op(a[i], a[i + 1]) for i in range(0, len(a), 2)], args,
              jit=dtype == "float32")


@pytest.mark.parametrize("dtype", ["float32"])
def test_pow_integer_exponent_broadcast(dtype):
    x, s = jnp.asarray([[0.5, -1.5, 2.0]], dtype), jnp.asarray(1.5, dtype)
    n1, n2 = jnp.asarray([[2], [-1]], jnp.int32), jnp.asarray([[2, 0, -3]], jnp.int32)
    check_all(lambda x, n1, s, n2: (lax.pow(x, n1), lax.pow(s, n2)), [x, n1, s, n2], jit=False)


def test_mul_out_dtype():
    """A mixed-precision product: the cotangents come back in the inputs' dtype."""
    x = jnp.asarray([0.25, -1.5, 3.0], jnp.bfloat16)
    y = jnp.asarray([2.0, 0.5, -0.75], jnp.bfloat16)
    check_all(lambda x, y: lax.mul(x, y, out_dtype=jnp.float32), [x, y], fd=False, jit=False)


# --- complex: the pairing of transposes, and non-holomorphic functions ------------------

@pytest.mark.parametrize("dtype", ["float64"])
def test_complex_round_trip(dtype):
    """Real and imaginary parts taken apart and put back, through conj and abs."""
    rng = np.random.default_rng(1)
    x, y = (jnp.asarray(rng.standard_normal((2, 3)), dtype) for _ in range(2))

    def f(x, y):
        z = lax.complex(x, y) * lax.conj(lax.complex(y, x)) + lax.conj(x)
        return lax.real(z) * lax.imag(z) + lax.abs(jnp.exp(z) / z)

    check_all(f, [x, y])


# --- comparisons and logic: no tangent, and reverse mode goes through them ----------------

def _with_comparisons(x, y):
    lt, eq, ge = lax.lt(x, y), lax.eq(x, y), lax.ge(x, y)
    mask = lax.bitwise_or(lax.bitwise_and(lt, lax.bitwise_not(eq)), lax.bitwise_xor(ge, eq))
    picked = lax.select(mask, x * y, lax.sin(x))
    return picked + lax.convert_element_type(mask, x.dtype) * x, mask, lax.ne(x, y), lax.le(x, y)


@pytest.mark.parametrize("dtype", ["float32"])
def test_comparisons_and_logic(dtype):
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal(5), dtype)
    y = jnp.where(jnp.arange(5) % 2 == 0, x, jnp.asarray(rng.standard_normal(5), dtype))
    # Ties at the even positions, where a finite difference would cross the comparison.
    check_all(_with_comparisons, [x, y], fd=False)
    outs, out_dots = fungrad.jvp(_with_comparisons, (x, y), (jnp.ones_like(x), jnp.ones_like(y)))
    for out, out_dot in zip(outs[1:], out_dots[1:], strict=True):
        assert out.dtype == jnp.bool_ and out_dot.dtype == jax.dtypes.float0
        assert out_dot.shape == out.shape
    _, x_dot = fungrad.jvp(lambda x: lax.convert_element_type(lax.gt(x, jnp.zeros_like(x)), dtype),
                           (x,), (jnp.ones_like(x),))
    assert_close(x_dot, jnp.zeros_like(x))
