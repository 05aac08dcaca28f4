"""Elementwise arithmetic, transcendental and complex-part functions: add, mul, exp, real, ...

lax's binary operations broadcast a rank-0 operand, or size-1 dimensions, against the
other operand: tangents are broadcast to the output's shape (the registrars do it for
`defjvp` rules) and transposes sum back with `unbroadcast`. Complex values are
transposed linearly, without conjugation (the pairing is `Re(sum(x * ct))`), as in
jax; `conj` is the one primitive whose transpose conjugates.
"""

from __future__ import annotations

import numpy as np
from jax import lax

from fungrad._src.broadcasting import broadcast_to, unbroadcast
from fungrad._src.jaxutil import prims as p
from fungrad._src.rules import (
    defbilinear,
    defjvp,
    defjvp2,
    defjvp_zero,
    deflinear,
    is_undefined,
    jvp_rules,
    transpose_rules,
)
from fungrad._src.zeros import Zero, is_zero


def _const(x, value):
    """A rank-0 constant of `x`'s dtype."""
    return lax.full_like(x, value, shape=())


def _replace_zero(x):
    """`x` with its zeros replaced by ones, so that a masked-out division stays finite."""
    return lax.select(lax.eq(x, _const(x, 0)), lax.full_like(x, 1), x)


def _is_complex(x) -> bool:
    return np.issubdtype(x.dtype, np.complexfloating)


def _masked(mask, g):
    """`g` where `mask` holds, 0 elsewhere, with the shape of `mask`."""
    g = broadcast_to(g, mask.shape)
    return lax.select(mask, g, lax.full_like(g, 0))


# --- linear ---------------------------------------------------------------------------

def _add_jvp(primals, tangents):
    (x, y), (x_dot, y_dot) = primals, tangents
    ans = lax.add(x, y)
    if is_zero(x_dot) and is_zero(y_dot):
        return ans, Zero.like(ans)
    if is_zero(y_dot):
        return ans, broadcast_to(x_dot, ans.shape)
    if is_zero(x_dot):
        return ans, broadcast_to(y_dot, ans.shape)
    return ans, lax.add(x_dot, y_dot)


def _sub_jvp(primals, tangents):
    (x, y), (x_dot, y_dot) = primals, tangents
    ans = lax.sub(x, y)
    if is_zero(x_dot) and is_zero(y_dot):
        return ans, Zero.like(ans)
    if is_zero(y_dot):
        return ans, broadcast_to(x_dot, ans.shape)
    if is_zero(x_dot):
        return ans, broadcast_to(lax.neg(y_dot), ans.shape)
    return ans, lax.sub(x_dot, y_dot)


def _add_transpose(ct, x, y):
    return [unbroadcast(x.aval, ct) if is_undefined(x) else None,
            unbroadcast(y.aval, ct) if is_undefined(y) else None]


def _sub_transpose(ct, x, y):
    return [unbroadcast(x.aval, ct) if is_undefined(x) else None,
            unbroadcast(y.aval, lax.neg(ct)) if is_undefined(y) else None]


jvp_rules[p.add_p] = _add_jvp  # d(x + y) = dx + dy
transpose_rules[p.add_p] = _add_transpose
jvp_rules[p.sub_p] = _sub_jvp  # d(x - y) = dx - dy
transpose_rules[p.sub_p] = _sub_transpose
jvp_rules[p.add_jaxvals_p] = _add_jvp
transpose_rules[p.add_jaxvals_p] = _add_transpose
deflinear(p.neg_p, lambda ct, x: [lax.neg(ct)])  # d(-x) = -dx


def _mul_transpose_lhs(ct, x, y, *, out_dtype):
    # With `out_dtype` set the product may change dtype: the cotangent takes x's back.
    return unbroadcast(x.aval, lax.mul(ct, y, out_dtype=None if out_dtype is None else x.aval.dtype))


def _mul_transpose_rhs(ct, x, y, *, out_dtype):
    return unbroadcast(y.aval, lax.mul(x, ct, out_dtype=None if out_dtype is None else y.aval.dtype))


defbilinear(p.mul_p, _mul_transpose_lhs, _mul_transpose_rhs)  # d(xy) = dx y + x dy


def _div_transpose(ct, x, y):
    assert is_undefined(x) and not is_undefined(y), "div is linear in its numerator only"
    return [unbroadcast(x.aval, lax.div(ct, y)), None]


defjvp(p.div_p,
       lambda g, x, y: lax.div(g, y),  # d(x/y) = dx/y - x dy/y^2
       lambda g, x, y: lax.mul(lax.mul(lax.neg(g), x), lax.integer_pow(y, -2)))
transpose_rules[p.div_p] = _div_transpose


# --- complex parts: linear over the reals ---------------------------------------------

def _real_transpose(ct, x):
    del x
    return [lax.complex(ct, lax.full_like(ct, 0))]


def _imag_transpose(ct, x):
    del x
    return [lax.complex(lax.full_like(ct, 0), lax.neg(ct))]


def _complex_transpose(ct, x, y):
    return [unbroadcast(x.aval, lax.real(ct)) if is_undefined(x) else None,
            unbroadcast(y.aval, lax.neg(lax.imag(ct))) if is_undefined(y) else None]


def _conj_transpose(ct, x, *, input_dtype):
    del x
    if np.issubdtype(input_dtype, np.complexfloating):
        return [lax.conj(ct)]
    return [lax.real(ct)]  # conj of a real x is complex(x, 0)


deflinear(p.real_p, _real_transpose)  # d Re z = Re dz; ct -> complex(ct, 0)
deflinear(p.imag_p, _imag_transpose)  # d Im z = Im dz; ct -> complex(0, -ct)
deflinear(p.complex_p, _complex_transpose)  # d(x + iy) = dx + i dy
deflinear(p.conj_p, _conj_transpose)  # d conj z = conj dz


# --- min, max, clamp: piecewise, ties split evenly ------------------------------------

def _balanced_eq(x, ans, y):
    """1 where `x` won, 1/2 where `x` and `y` tie, 0 where `y` won: jax's tie convention."""
    won = lax.select(lax.eq(x, ans), lax.full_like(ans, 1), lax.full_like(ans, 0))
    return lax.div(won, lax.select(lax.eq(y, ans), lax.full_like(ans, 2), lax.full_like(ans, 1)))


defjvp2(p.max_p,  # the winner's tangent; half of each at a tie
        lambda g, ans, x, y: lax.mul(g, _balanced_eq(x, ans, y)),
        lambda g, ans, x, y: lax.mul(g, _balanced_eq(y, ans, x)))
defjvp2(p.min_p,
        lambda g, ans, x, y: lax.mul(g, _balanced_eq(x, ans, y)),
        lambda g, ans, x, y: lax.mul(g, _balanced_eq(y, ans, x)))


# clamp(lo, x, hi): x's tangent strictly inside (lo, hi), lo's where lo > x (and lo < hi),
# hi's where hi < x; at a bound itself the derivative is 0, as in jax. A rank-0 lo or hi
# broadcasts against x, so its tangent is broadcast to x's shape before the select.
defjvp(p.clamp_p,
       lambda g, lo, x, hi: _masked(lax.bitwise_and(lax.gt(lo, x), lax.lt(lo, hi)), g),
       lambda g, lo, x, hi: _masked(lax.bitwise_and(lax.gt(x, lo), lax.lt(x, hi)), g),
       lambda g, lo, x, hi: _masked(lax.lt(hi, x), g))


# --- powers ---------------------------------------------------------------------------

def _pow_jvp_x(g, ans, x, y):
    # d x^y / dx = y x^(y-1); for an integer y the y = 0 case is exactly 0, even at x = 0.
    del ans
    if np.issubdtype(y.dtype, np.integer):
        shape = np.broadcast_shapes(np.shape(x), np.shape(y))
        x = broadcast_to(x, shape)
        y = lax.convert_element_type(broadcast_to(y, shape), x.dtype)
        jac = lax.select(lax.eq(y, _const(y, 0)), lax.full_like(y, 0),
                         lax.mul(y, lax.pow(x, lax.sub(y, _const(y, 1)))))
    else:
        jac = lax.mul(y, lax.pow(x, lax.sub(y, _const(y, 1))))
    return lax.mul(g, jac)


def _pow_jvp_y(g, ans, x, y):
    # d x^y / dy = x^y log x, taken as 0 at x = 0 (log is evaluated at 1 there).
    del y
    return lax.mul(g, lax.mul(lax.log(_replace_zero(x)), ans))


defjvp2(p.pow_p, _pow_jvp_x, _pow_jvp_y)


def _integer_pow_jvp(primals, tangents, *, y):
    (x,), (x_dot,) = primals, tangents
    ans = lax.integer_pow(x, y)
    if y == 0 or is_zero(x_dot):
        return ans, Zero.like(ans)  # x^0 = 1 is constant
    if y == 1:
        return ans, x_dot
    if y == 2:
        return ans, lax.mul(x_dot, lax.mul(_const(x, 2), x))
    return ans, lax.mul(x_dot, lax.mul(_const(x, y), lax.integer_pow(x, y - 1)))


jvp_rules[p.integer_pow_p] = _integer_pow_jvp  # d x^n = n x^(n-1) dx
defjvp(p.square_p, lambda g, x: lax.mul(g, lax.mul(_const(x, 2), x)))  # d x^2 = 2x dx
defjvp2(p.sqrt_p,  # 1 / (2 sqrt x)
        lambda g, ans, x, *, accuracy: lax.mul(g, lax.div(_const(x, 0.5), ans)))
defjvp2(p.rsqrt_p,  # -x^(-3/2) / 2 = -rsqrt(x) / (2x)
        lambda g, ans, x, *, accuracy: lax.mul(g, lax.mul(_const(x, -0.5), lax.div(ans, x))))
defjvp2(p.cbrt_p,  # x^(-2/3) / 3 = cbrt(x)^(-2) / 3
        lambda g, ans, x, *, accuracy: lax.mul(g, lax.mul(_const(x, 1 / 3), lax.integer_pow(ans, -2))))


# --- exponentials and logarithms ------------------------------------------------------

def _is_highest(accuracy) -> bool:
    return accuracy is lax.AccuracyMode.HIGHEST


def _expm1_jvp(g, ans, x, *, accuracy):
    # d expm1 x = e^x, which is expm1(x) + 1, or recomputed when asked for the most accuracy.
    if _is_highest(accuracy):
        return lax.mul(g, lax.exp(x, accuracy=accuracy))
    return lax.mul(g, lax.add(ans, _const(ans, 1)))


defjvp2(p.exp_p, lambda g, ans, x, *, accuracy: lax.mul(g, ans))  # d e^x = e^x dx
defjvp2(p.exp2_p,  # d 2^x = 2^x log 2 dx
        lambda g, ans, x, *, accuracy: lax.mul(lax.log(_const(x, 2)), lax.mul(g, ans)))
defjvp(p.log_p, lambda g, x, *, accuracy: lax.div(g, x))  # 1/x
defjvp(p.log1p_p, lambda g, x, *, accuracy: lax.div(g, lax.add(x, _const(x, 1))))  # 1/(1+x)
defjvp2(p.expm1_p, _expm1_jvp)


def _tanh_jvp(g, ans, x, *, accuracy):
    # d tanh x = 1 - tanh^2 x = (1 + tanh x)(1 - tanh x) = 4 s(2x) s(-2x), s the logistic.
    if _is_highest(accuracy):
        both = lax.mul(lax.logistic(lax.mul(_const(x, 2), x), accuracy=accuracy),
                       lax.logistic(lax.mul(_const(x, -2), x), accuracy=accuracy))
        return lax.mul(g, lax.mul(_const(x, 4), both))
    # As (g + g t)(1 - t): the linear part keeps t (usually kept anyway) and 1 - t, and in
    # forward mode only the tangent g itself is read twice.
    return lax.mul(lax.add(g, lax.mul(g, ans)), lax.sub(_const(ans, 1), ans))


def _logistic_jvp(g, ans, x, *, accuracy):
    # d s(x) = s(x) (1 - s(x)) = s(x) s(-x).
    if _is_highest(accuracy):
        return lax.mul(g, lax.mul(ans, lax.logistic(lax.neg(x), accuracy=accuracy)))
    return lax.mul(g, lax.mul(ans, lax.sub(_const(ans, 1), ans)))


defjvp2(p.tanh_p, _tanh_jvp)
defjvp2(p.logistic_p, _logistic_jvp)


# --- trigonometric and hyperbolic -----------------------------------------------------

defjvp(p.sin_p, lambda g, x, *, accuracy: lax.mul(g, lax.cos(x, accuracy=accuracy)))  # cos
defjvp(p.cos_p,  # -sin
       lambda g, x, *, accuracy: lax.neg(lax.mul(g, lax.sin(x, accuracy=accuracy))))
defjvp2(p.tan_p,  # 1 + tan^2
        lambda g, ans, x, *, accuracy: lax.mul(g, lax.add(_const(x, 1), lax.square(ans))))
defjvp(p.asin_p,  # 1/sqrt(1 - x^2)
       lambda g, x: lax.mul(g, lax.rsqrt(lax.sub(_const(x, 1), lax.square(x)))))
defjvp(p.acos_p,  # -1/sqrt(1 - x^2)
       lambda g, x: lax.mul(g, lax.neg(lax.rsqrt(lax.sub(_const(x, 1), lax.square(x))))))
defjvp(p.atan_p, lambda g, x: lax.div(g, lax.add(_const(x, 1), lax.square(x))))  # 1/(1+x^2)
defjvp(p.atan2_p,  # atan2(x, y): (y dx - x dy) / (x^2 + y^2)
       lambda g, x, y: lax.mul(g, lax.div(y, lax.add(lax.square(x), lax.square(y)))),
       lambda g, x, y: lax.mul(g, lax.div(lax.neg(x), lax.add(lax.square(x), lax.square(y)))))
defjvp(p.sinh_p, lambda g, x: lax.mul(g, lax.cosh(x)))  # cosh
defjvp(p.cosh_p, lambda g, x: lax.mul(g, lax.sinh(x)))  # sinh
defjvp(p.asinh_p,  # 1/sqrt(x^2 + 1)
       lambda g, x: lax.mul(g, lax.rsqrt(lax.add(lax.square(x), _const(x, 1)))))
defjvp(p.acosh_p,  # 1/sqrt(x^2 - 1)
       lambda g, x: lax.mul(g, lax.rsqrt(lax.sub(lax.square(x), _const(x, 1)))))
defjvp(p.atanh_p,  # 1/((1 + x)(1 - x)), factored to stay accurate near |x| = 1
       lambda g, x: lax.mul(lax.div(_const(x, 1), lax.add(_const(x, 1), x)),
                            lax.div(g, lax.sub(_const(x, 1), x))))


# --- abs and the piecewise-constant functions -----------------------------------------

def _abs_jvp(g, ans, x):
    if _is_complex(x):
        # d|z| = Re(conj(z) dz) / |z|, taken as 0 at z = 0.
        unit = lax.div(lax.conj(x), lax.convert_element_type(_replace_zero(ans), x.dtype))
        return lax.real(lax.mul(g, unit))
    return lax.select(lax.ge(x, _const(x, 0)), g, lax.neg(g))  # sign(x) dx, with slope +1 at 0


defjvp2(p.abs_p, _abs_jvp)
# Piecewise constant: zero derivative everywhere, their jumps included (as in jax).
for _prim in (p.sign_p, p.floor_p, p.ceil_p, p.round_p, p.is_finite_p):
    defjvp_zero(_prim)


def _rem_jvp_y(g, x, y):
    # rem(x, y) = x - y trunc(x/y): d/dy = -trunc(x/y), trunc(q) = sign(q) floor(|q|).
    q = lax.div(x, y)
    return lax.mul(lax.neg(g), lax.mul(lax.sign(q), lax.floor(lax.abs(q))))


defjvp(p.rem_p, lambda g, x, y: g, _rem_jvp_y)  # d rem = dx - trunc(x/y) dy


# --- special functions ----------------------------------------------------------------

_TWO_OVER_SQRT_PI = 2 / np.sqrt(np.pi)
defjvp(p.erf_p,  # 2/sqrt(pi) e^(-x^2)
       lambda g, x: lax.mul(_const(x, _TWO_OVER_SQRT_PI), lax.mul(g, lax.exp(lax.neg(lax.square(x))))))
defjvp(p.erfc_p,  # -2/sqrt(pi) e^(-x^2)
       lambda g, x: lax.mul(_const(x, -_TWO_OVER_SQRT_PI),
                            lax.mul(g, lax.exp(lax.neg(lax.square(x))))))
defjvp2(p.erf_inv_p,  # sqrt(pi)/2 e^(erfinv(x)^2)
        lambda g, ans, x: lax.mul(_const(x, np.sqrt(np.pi) / 2), lax.mul(g, lax.exp(lax.square(ans)))))
defjvp(p.lgamma_p, lambda g, x: lax.mul(g, lax.digamma(x)))  # digamma
defjvp(p.digamma_p, lambda g, x: lax.mul(g, lax.polygamma(_const(x, 1), x)))  # trigamma


def _polygamma_jvp_m(g, m, x):
    del g, m, x
    raise ValueError("fungrad cannot differentiate polygamma(m, x) with respect to its order m "
                     "(neither can jax); pass m as a constant, e.g. under lax.stop_gradient.")


# d/dx polygamma(m, x) = polygamma(m + 1, x); digamma's rule emits it, so second order needs it.
defjvp(p.polygamma_p, _polygamma_jvp_m,
       lambda g, m, x: lax.mul(g, lax.polygamma(lax.add(m, _const(m, 1)), x)))
