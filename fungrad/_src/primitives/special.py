"""Special functions (incomplete gamma and beta, zeta, scaled Bessel), gamma sampling, and
numeric odds and ends.

lgamma, digamma, polygamma, erf, erfc, erf_inv and rem live in `arithmetic.py`. Where jax
defines no derivative for an argument, the rule raises as jax does, naming the primitive
(and jax's exception type): a derivative fungrad cannot vouch for is never returned.
"""

from __future__ import annotations

import numpy as np
from jax import lax

from fungrad._src.jaxutil import prims as p
from fungrad._src.rules import defjvp, defjvp2, deflinear


def _const(x, value):
    return lax.full_like(x, value, shape=())


def _no_derivative(prim, argument: str, error: type[Exception], hint: str = ""):
    """A JVP function that refuses: jax has no derivative of `prim` in `argument` either."""
    def refuse(g, *primals, **params):
        del g, primals, params
        raise error(f"fungrad cannot differentiate '{prim}' with respect to its argument "
                    f"{argument}: jax defines no derivative there either.{hint}")
    return refuse


# --- incomplete gamma -------------------------------------------------------------------

def _igamma_dx(g, a, x):
    # d/dx P(a, x) = x^(a-1) e^(-x) / Gamma(a)
    one = _const(a, 1)
    return lax.mul(g, lax.exp(lax.sub(lax.mul(lax.sub(a, one), lax.log(x)),
                                      lax.add(x, lax.lgamma(a)))))


defjvp(p.igamma_p,  # dP = igamma_grad_a(a, x) da + x^(a-1) e^(-x) / Gamma(a) dx
       lambda g, a, x: lax.mul(g, lax.igamma_grad_a(a, x)),
       _igamma_dx)
defjvp(p.igammac_p,  # Q = 1 - P: dQ = -dP
       lambda g, a, x: lax.neg(lax.mul(g, lax.igamma_grad_a(a, x))),
       lambda g, a, x: lax.neg(_igamma_dx(g, a, x)))

# d/dx (dP/da) = d/da (dP/dx) = x^(a-1) e^(-x) / Gamma(a) (log x - digamma(a)): exact, so
# fungrad gives it (jax has no rule for igamma_grad_a at all); the a-derivative has no
# closed form and raises as jax does.
defjvp(p.igamma_grad_a_p,
       _no_derivative(p.igamma_grad_a_p, "a", NotImplementedError),
       lambda g, a, x: lax.mul(_igamma_dx(g, a, x), lax.sub(lax.log(x), lax.digamma(a))))


# --- gamma sampling: implicit reparameterization ----------------------------------------

def _random_gamma_da(g, ans, key, a, *, log_space):
    # A sample x = F^-1(u; a) at fixed noise u moves with a as dx/da = -(dP/da) / (dP/dx)
    # (P the gamma CDF): lax.random_gamma_grad(a, x). In log space d log x = dx / x, with
    # an x = exp(ans) that rounds to 0 taken as the smallest normal float, as jax does.
    del key
    if not log_space:
        return lax.mul(g, lax.random_gamma_grad(a, ans))
    x = lax.exp(ans)
    x = lax.select(lax.eq(x, _const(x, 0)), lax.full_like(x, np.finfo(x.dtype).tiny), x)
    return lax.mul(g, lax.div(lax.random_gamma_grad(a, x), x))


defjvp2(p.random_gamma_p, None, _random_gamma_da)  # the key has no tangent


# --- incomplete beta --------------------------------------------------------------------

def _betainc_dx(g, a, b, x):
    # d/dx I_x(a, b) = x^(a-1) (1-x)^(b-1) / B(a, b)
    one = _const(a, 1)
    log_beta = lax.sub(lax.add(lax.lgamma(a), lax.lgamma(b)), lax.lgamma(lax.add(a, b)))
    log_density = lax.add(lax.mul(lax.sub(b, one), lax.log1p(lax.neg(x))),
                          lax.mul(lax.sub(a, one), lax.log(x)))
    return lax.mul(g, lax.exp(lax.sub(log_density, log_beta)))


defjvp(p.regularized_incomplete_beta_p,  # only dx: jax raises ValueError for a and b
       _no_derivative(p.regularized_incomplete_beta_p, "a", ValueError),
       _no_derivative(p.regularized_incomplete_beta_p, "b", ValueError),
       _betainc_dx)


# --- Hurwitz zeta -----------------------------------------------------------------------

_ZETA_HINT = (" jax.scipy.special.zeta has a custom derivative in both arguments, which "
              "fungrad honours; call it instead of lax.zeta.")
# d/dq zeta(s, q) = -s zeta(s + 1, q) (differentiate the series term by term); jax's zeta_p
# has no rule, but its jax.scipy.special.zeta wrapper gives this same derivative in q.
defjvp(p.zeta_p,
       _no_derivative(p.zeta_p, "x (the order s)", NotImplementedError, _ZETA_HINT),
       lambda g, s, q: lax.mul(g, lax.neg(lax.mul(s, lax.zeta(lax.add(s, _const(s, 1)), q)))))


# --- exponentially scaled modified Bessel functions --------------------------------------

# i0e(x) = e^(-|x|) I0(x): d i0e = i1e(x) - sign(x) i0e(x), since I0' = I1.
defjvp2(p.bessel_i0e_p,
        lambda g, ans, x: lax.mul(g, lax.sub(lax.bessel_i1e(x), lax.mul(lax.sign(x), ans))))


def _bessel_i1e_jvp(g, ans, x):
    # d i1e = i0e(x) - i1e(x) (sign(x) + 1/x), since I1' = I0 - I1/x; the limit 1/2 at 0
    # (jax switches to it for |x| <= eps, and so does fungrad).
    eps = float(np.finfo(x.dtype).eps)
    not_tiny = lax.gt(lax.abs(x), _const(x, eps))
    safe_x = lax.select(not_tiny, x, lax.full_like(x, eps))
    slope = lax.sub(lax.bessel_i0e(safe_x),
                    lax.mul(ans, lax.add(lax.sign(safe_x), lax.div(_const(x, 1), safe_x))))
    return lax.mul(g, lax.select(not_tiny, slope, lax.full_like(x, 0.5)))


defjvp2(p.bessel_i1e_p, _bessel_i1e_jvp)


# --- floating-point representation ------------------------------------------------------

# Rounding to fewer bits: the tangent passes through rounded the same way (jax's convention).
deflinear(p.reduce_precision_p,
          lambda ct, x, *, exponent_bits, mantissa_bits: [
              lax.reduce_precision(ct, exponent_bits=exponent_bits, mantissa_bits=mantissa_bits)])

# nextafter(x, y) steps to the adjacent float: jax defines no derivative in either argument.
defjvp(p.nextafter_p,
       _no_derivative(p.nextafter_p, "x1", NotImplementedError),
       _no_derivative(p.nextafter_p, "x2", NotImplementedError))
