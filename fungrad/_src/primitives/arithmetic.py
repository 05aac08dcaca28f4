"""Elementwise arithmetic and transcendental functions: add, mul, exp, sin, ..."""

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
    return lax.full_like(x, value, shape=())


def _replace_zero(x):
    """`x` with its zeros replaced by ones, so that a masked-out division stays finite."""
    return lax.select(lax.eq(x, _const(x, 0)), lax.full_like(x, 1), x)


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


def _mul_transpose_lhs(ct, x, y, **params):
    del params
    return unbroadcast(x.aval, lax.mul(ct, y))


def _mul_transpose_rhs(ct, x, y, **params):
    del params
    return unbroadcast(y.aval, lax.mul(x, ct))


defbilinear(p.mul_p, _mul_transpose_lhs, _mul_transpose_rhs)  # d(xy) = dx y + x dy


def _div_transpose(ct, x, y):
    assert is_undefined(x) and not is_undefined(y), "div is linear in its numerator only"
    return [unbroadcast(x.aval, lax.div(ct, y)), None]


defjvp(p.div_p,
       lambda g, x, y: lax.div(g, y),  # d(x/y) = dx/y - x dy/y^2
       lambda g, x, y: lax.mul(lax.neg(g), lax.div(lax.div(x, y), y)))
transpose_rules[p.div_p] = _div_transpose


# --- elementwise non-linear -----------------------------------------------------------

def _balanced_eq(x, ans, y):
    """1 where `x` won, 1/2 where `x` and `y` tie, 0 where `y` won: jax's tie convention."""
    won = lax.select(lax.eq(x, ans), lax.full_like(ans, 1), lax.full_like(ans, 0))
    return lax.div(won, lax.select(lax.eq(y, ans), lax.full_like(ans, 2), lax.full_like(ans, 1)))


defjvp2(p.max_p,
        lambda g, ans, x, y: lax.mul(g, _balanced_eq(x, ans, y)),
        lambda g, ans, x, y: lax.mul(g, _balanced_eq(y, ans, x)))
defjvp2(p.min_p,
        lambda g, ans, x, y: lax.mul(g, _balanced_eq(x, ans, y)),
        lambda g, ans, x, y: lax.mul(g, _balanced_eq(y, ans, x)))


def _pow_jvp_x(g, x, y):
    # d x^y / dx = y x^(y-1); for an integer y the y = 0 case is exactly 0, even at x = 0.
    if np.issubdtype(y.dtype, np.integer):
        y = lax.convert_element_type(broadcast_to(y, np.broadcast_shapes(x.shape, y.shape)), x.dtype)
        jac = lax.select(lax.eq(y, _const(y, 0)), lax.full_like(y, 0),
                         lax.mul(y, lax.pow(x, lax.sub(y, _const(y, 1)))))
        return lax.mul(g, jac)
    return lax.mul(g, lax.mul(y, lax.pow(x, lax.sub(y, _const(y, 1)))))


defjvp2(p.pow_p,
        lambda g, ans, x, y: _pow_jvp_x(g, x, y),
        lambda g, ans, x, y: lax.mul(g, lax.mul(lax.log(_replace_zero(x)), ans)))  # x^y log x


def _integer_pow_jvp(g, x, *, y):
    if y == 0:
        return lax.full_like(g, 0)
    return lax.mul(g, lax.mul(_const(x, y), lax.integer_pow(x, y - 1)))  # y x^(y-1)


defjvp(p.integer_pow_p, _integer_pow_jvp)
defjvp(p.square_p, lambda g, x: lax.mul(g, lax.mul(_const(x, 2), x)))  # 2x
defjvp2(p.sqrt_p, lambda g, ans, x, accuracy: lax.div(g, lax.mul(_const(x, 2), ans)))  # 1/(2 sqrt x)
defjvp2(p.rsqrt_p,  # -x^(-3/2) / 2
        lambda g, ans, x, accuracy: lax.mul(g, lax.mul(_const(x, -0.5), lax.div(ans, x))))
defjvp2(p.cbrt_p,  # x^(-2/3) / 3
        lambda g, ans, x, accuracy: lax.mul(g, lax.mul(_const(x, 1 / 3), lax.integer_pow(ans, -2))))
defjvp2(p.exp_p, lambda g, ans, x, accuracy: lax.mul(g, ans))  # d e^x = e^x dx
defjvp2(p.exp2_p,  # 2^x log 2
        lambda g, ans, x, accuracy: lax.mul(g, lax.mul(_const(x, np.log(2)), ans)))
defjvp(p.log_p, lambda g, x, accuracy: lax.div(g, x))  # 1/x
defjvp(p.log1p_p, lambda g, x, accuracy: lax.div(g, lax.add(x, _const(x, 1))))  # 1/(1+x)
defjvp2(p.expm1_p,  # e^x = expm1(x) + 1
        lambda g, ans, x, accuracy: lax.mul(g, lax.add(ans, _const(ans, 1))))
defjvp2(p.tanh_p,  # 1 - tanh^2
        lambda g, ans, x, accuracy: lax.mul(g, lax.sub(_const(x, 1), lax.square(ans))))
defjvp2(p.logistic_p,  # s (1 - s)
        lambda g, ans, x, accuracy: lax.mul(g, lax.mul(ans, lax.sub(_const(ans, 1), ans))))
defjvp(p.sin_p, lambda g, x, accuracy: lax.mul(g, lax.cos(x, accuracy=accuracy)))  # cos
defjvp(p.cos_p, lambda g, x, accuracy: lax.neg(lax.mul(g, lax.sin(x, accuracy=accuracy))))  # -sin
defjvp2(p.tan_p,  # 1 + tan^2
        lambda g, ans, x, accuracy: lax.mul(g, lax.add(_const(x, 1), lax.square(ans))))
defjvp(p.asin_p, lambda g, x: lax.mul(g, lax.rsqrt(lax.sub(_const(x, 1), lax.square(x)))))
defjvp(p.acos_p, lambda g, x: lax.neg(lax.mul(g, lax.rsqrt(lax.sub(_const(x, 1), lax.square(x))))))
defjvp(p.atan_p, lambda g, x: lax.div(g, lax.add(_const(x, 1), lax.square(x))))  # 1/(1+x^2)
defjvp(p.atan2_p,  # atan2(x, y): (y dx - x dy) / (x^2 + y^2)
       lambda g, x, y: lax.mul(g, lax.div(y, lax.add(lax.square(x), lax.square(y)))),
       lambda g, x, y: lax.mul(g, lax.div(lax.neg(x), lax.add(lax.square(x), lax.square(y)))))
defjvp(p.sinh_p, lambda g, x: lax.mul(g, lax.cosh(x)))
defjvp(p.cosh_p, lambda g, x: lax.mul(g, lax.sinh(x)))
defjvp(p.asinh_p, lambda g, x: lax.mul(g, lax.rsqrt(lax.add(lax.square(x), _const(x, 1)))))
defjvp(p.acosh_p,  # 1/sqrt(x^2 - 1)
       lambda g, x: lax.mul(g, lax.rsqrt(lax.sub(lax.square(x), _const(x, 1)))))
defjvp(p.atanh_p,  # 1/(1 - x^2)
       lambda g, x: lax.div(g, lax.sub(_const(x, 1), lax.square(x))))


def _abs_jvp(g, ans, x):
    if np.issubdtype(x.dtype, np.complexfloating):
        # d|z| = Re(conj(z) dz) / |z|, taken as 0 at z = 0.
        unit = lax.div(lax.conj(x), lax.convert_element_type(_replace_zero(ans), x.dtype))
        return lax.real(lax.mul(g, unit))
    return lax.select(lax.ge(x, _const(x, 0)), g, lax.neg(g))  # jax: slope +1 at 0


defjvp2(p.abs_p, _abs_jvp)
for _prim in (p.sign_p, p.floor_p, p.ceil_p, p.round_p, p.is_finite_p, p.nextafter_p):
    defjvp_zero(_prim)

_TWO_OVER_SQRT_PI = 2 / np.sqrt(np.pi)
defjvp(p.erf_p, lambda g, x: lax.mul(lax.mul(g, _const(x, _TWO_OVER_SQRT_PI)),
                                     lax.exp(lax.neg(lax.square(x)))))
defjvp(p.erfc_p, lambda g, x: lax.mul(lax.mul(g, _const(x, -_TWO_OVER_SQRT_PI)),
                                      lax.exp(lax.neg(lax.square(x)))))
defjvp2(p.erf_inv_p, lambda g, ans, x: lax.mul(lax.mul(g, _const(x, np.sqrt(np.pi) / 2)),
                                               lax.exp(lax.square(ans))))
defjvp(p.lgamma_p, lambda g, x: lax.mul(g, lax.digamma(x)))
defjvp(p.digamma_p, lambda g, x: lax.mul(g, lax.polygamma(_const(x, 1), x)))


def _clamp_jvp_lo(g, lo, x, hi):
    return lax.select(lax.bitwise_and(lax.gt(lo, x), lax.lt(lo, hi)), g, lax.full_like(g, 0))


def _clamp_jvp_x(g, lo, x, hi):
    return lax.select(lax.bitwise_and(lax.gt(x, lo), lax.lt(x, hi)), g, lax.full_like(g, 0))


def _clamp_jvp_hi(g, lo, x, hi):
    return lax.select(lax.lt(hi, x), g, lax.full_like(g, 0))


defjvp(p.clamp_p, _clamp_jvp_lo, _clamp_jvp_x, _clamp_jvp_hi)
