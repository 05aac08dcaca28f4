"""Taylor arithmetic: the rule table of `fungrad.jet`, one recurrence per primitive.

A series is `None` (symbolically zero: a constant) or the list `[x_1, ..., x_K]` of the
normalized Taylor coefficients of a path `x(t) = x_0 + x_1 t + ... + x_K t^K` (the k-th
derivative divided by k!); `x_0` is the primal. In these coefficients products are
Cauchy products and every rule below is a recurrence of cost O(K^2) in the order K.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np
from jax import lax

from fungrad._src import jaxutil
from fungrad._src.broadcasting import broadcast_to
from fungrad._src.jaxutil import Primitive, prims

Series = list[Any] | None
TaylorRule = Callable[..., tuple[Any, Any]]
"""`(primals, series, **params) -> (out, out_series)`; lists of both for multiple results."""

taylor_rules: dict[Primitive, TaylorRule] = {}


def order_of(series: Sequence[Series]) -> int:
    """The truncation order K of the nonzero series among `series` (all have the same)."""
    return next(len(s) for s in series if s is not None)


def _coefs(x: Any, xs: Series, order: int) -> list[Any]:
    """`[x_0, x_1, ..., x_K]`, with zeros where `xs` is a symbolic zero."""
    return [x, *(xs if xs is not None else [jnp.zeros_like(x)] * order)]


def _sum(terms: Sequence[Any]) -> Any:
    total = terms[0]
    for t in terms[1:]:
        total = total + t
    return total


def _cauchy(a: Sequence[Any], b: Sequence[Any], k: int, mul: Callable = lax.mul) -> Any:
    """The k-th coefficient of a product: sum_{j=0..k} a_j b_{k-j}."""
    return _sum([mul(a[j], b[k - j]) for j in range(k + 1)])


def _weighted(x: Sequence[Any], w: Sequence[Any], k: int) -> Any:
    """(1/k) sum_{j=1..k} j x_j w_{k-j}: the k-th coefficient of z where z' = w x'."""
    return _sum([x[j] * (j / k) * w[k - j] for j in range(1, k + 1)])


# --- registrars ------------------------------------------------------------------------

def deflinear(prim: Primitive) -> None:
    """`prim` is linear in its floating inputs jointly (the others, indices or predicates,
    are read from the primals): z_k = prim(x_k, ...) for every k."""
    def rule(primals, series, **params):
        ans = prim.bind(*primals, **params)
        order = order_of(series)
        floating = [jnp.issubdtype(jaxutil.typeof(x).dtype, jnp.inexact) for x in primals]
        coefs = [_coefs(x, s, order) if f else [x] * (order + 1)
                 for x, s, f in zip(primals, series, floating, strict=True)]
        out_series = [prim.bind(*(c[k] for c in coefs), **params) for k in range(1, order + 1)]
        if prim.multiple_results:
            return ans, [list(s) for s in zip(*out_series, strict=True)]
        return ans, out_series

    taylor_rules[prim] = rule


def defbilinear(prim: Primitive) -> None:
    """`prim(x, y)` is linear in each argument: z_k = sum_j prim(x_j, y_{k-j}) (Cauchy)."""
    def rule(primals, series, **params):
        (x, y), (xs, ys) = primals, series
        bind = lambda a, b: prim.bind(a, b, **params)
        ans = bind(x, y)
        if xs is None:
            return ans, [bind(x, y_k) for y_k in ys]
        if ys is None:
            return ans, [bind(x_k, y) for x_k in xs]
        a, b = [x, *xs], [y, *ys]
        return ans, [_cauchy(a, b, k, bind) for k in range(1, len(xs) + 1)]

    taylor_rules[prim] = rule


def defunary(prim: Primitive, recurrence: Callable[[Any, list[Any], int], list[Any]]) -> None:
    """An elementwise primitive of one input: `recurrence(z_0, [x_0..x_K], K) -> [z_1..z_K]`."""
    def rule(primals, series, **params):
        (x,), (xs,) = primals, series
        ans = prim.bind(x, **params)
        return ans, recurrence(ans, [x, *xs], len(xs))

    taylor_rules[prim] = rule


# --- linear and structural primitives ----------------------------------------------------

for _p in (prims.add_p, prims.sub_p, prims.neg_p, prims.add_jaxvals_p, prims.reduce_sum_p,
           prims.cumsum_p, prims.broadcast_in_dim_p, prims.reshape_p, prims.squeeze_p,
           prims.transpose_p, prims.rev_p, prims.slice_p, prims.pad_p, prims.concatenate_p,
           prims.dynamic_slice_p, prims.dynamic_update_slice_p, prims.gather_p,
           prims.scatter_add_p, prims.select_n_p, prims.convert_element_type_p, prims.copy_p,
           prims.real_p, prims.imag_p, prims.complex_p, prims.conj_p,
           *(jaxutil.internal_prims[f"{name}_p"] for name in ("split", "stack", "unstack", "tile"))):
    deflinear(_p)  # z_k = prim(x_k): a linear map commutes with the expansion in t

defbilinear(prims.mul_p)  # (xy)_k = sum_j x_j y_{k-j}
defbilinear(prims.dot_general_p)
defbilinear(prims.conv_general_dilated_p)


def _div(primals, series):
    (x, y), (xs, ys) = primals, series
    ans = lax.div(x, y)
    if ys is None:
        return ans, [lax.div(x_k, y) for x_k in xs]
    order = len(ys)
    a, b, z = _coefs(x, xs, order), [y, *ys], [ans]
    for k in range(1, order + 1):  # y z = x:  z_k = (x_k - sum_{j=1..k} y_j z_{k-j}) / y_0
        z.append(lax.div(a[k] - _sum([b[j] * z[k - j] for j in range(1, k + 1)]), y))
    return ans, z[1:]


taylor_rules[prims.div_p] = _div


# --- elementwise: z' = w x' gives k z_k = sum_{j=1..k} j x_j w_{k-j} -----------------------

def _exp(z0, x, order):
    z = [z0]  # z' = z x'
    for k in range(1, order + 1):
        z.append(_weighted(x, z, k))
    return z[1:]


def _expm1(z0, x, order):
    e = [lax.exp(x[0])]  # (expm1 x)' = exp(x) x', and exp x = 1 + expm1 x past order 0
    for k in range(1, order + 1):
        e.append(_weighted(x, e, k))
    return e[1:]


def _log_of(u0: Any, x: list[Any], order: int, z0: Any) -> list[Any]:
    """log(u) where u = u0 + x_1 t + ...: u z' = x' gives z_k = (x_k - (1/k) sum j z_j x_{k-j}) / u0."""
    z = [z0]
    for k in range(1, order + 1):
        inner = [z[j] * (j / k) * x[k - j] for j in range(1, k)]
        z.append(lax.div(x[k] - _sum(inner) if inner else x[k], u0))
    return z[1:]


defunary(prims.exp_p, _exp)
defunary(prims.expm1_p, _expm1)
defunary(prims.log_p, lambda z0, x, order: _log_of(x[0], x, order, z0))
defunary(prims.log1p_p, lambda z0, x, order: _log_of(x[0] + 1, x, order, z0))


def _sin_cos(s0: Any, c0: Any, x: list[Any], order: int, sign: int) -> tuple[list, list]:
    """s' = c x', c' = sign * s x' (sign -1: sin and cos; +1: sinh and cosh)."""
    s, c = [s0], [c0]
    for k in range(1, order + 1):
        s.append(_weighted(x, c, k))
        c.append(_weighted(x, s, k) * sign)
    return s[1:], c[1:]


defunary(prims.sin_p, lambda z0, x, order: _sin_cos(z0, lax.cos(x[0]), x, order, -1)[0])
defunary(prims.cos_p, lambda z0, x, order: _sin_cos(lax.sin(x[0]), z0, x, order, -1)[1])
defunary(prims.sinh_p, lambda z0, x, order: _sin_cos(z0, lax.cosh(x[0]), x, order, 1)[0])
defunary(prims.cosh_p, lambda z0, x, order: _sin_cos(lax.sinh(x[0]), z0, x, order, 1)[1])


def _riccati(z0: Any, x: list[Any], order: int, w_of: Callable[[list[Any], int], Any]) -> list[Any]:
    """z' = w(z) x', where `w_of(z, m)` is the m-th coefficient of w from z_0..z_m."""
    z = [z0]
    w = [w_of(z, 0)]
    for k in range(1, order + 1):
        z.append(_weighted(x, w, k))
        w.append(w_of(z, k))
    return z[1:]


def _square_coef(z: list[Any], m: int) -> Any:
    return _cauchy(z, z, m)


# tan' = 1 + tan^2, tanh' = 1 - tanh^2, logistic' = s - s^2
defunary(prims.tan_p, lambda z0, x, order: _riccati(
    z0, x, order, lambda z, m: _square_coef(z, m) + (1 if m == 0 else 0)))
defunary(prims.tanh_p, lambda z0, x, order: _riccati(
    z0, x, order, lambda z, m: (1 if m == 0 else 0) - _square_coef(z, m)))
defunary(prims.logistic_p, lambda z0, x, order: _riccati(
    z0, x, order, lambda z, m: z[m] - _square_coef(z, m)))


def _sqrt(z0, x, order):
    z = [z0]  # z^2 = x:  2 z_0 z_k = x_k - sum_{j=1..k-1} z_j z_{k-j}
    for k in range(1, order + 1):
        inner = [z[j] * z[k - j] for j in range(1, k)]
        z.append(lax.div(x[k] - _sum(inner) if inner else x[k], z0 * 2))
    return z[1:]


def _power(z0: Any, x: list[Any], order: int, r: Any) -> list[Any]:
    """z = x^r (r constant): x z' = r z x' gives k x_0 z_k = sum_{j=1..k} (r j - (k - j)) x_j z_{k-j}."""
    z = [z0]
    for k in range(1, order + 1):
        terms = [(r * j - (k - j)) * x[j] * z[k - j] for j in range(1, k + 1)]
        z.append(lax.div(_sum(terms), x[0] * k))
    return z[1:]


defunary(prims.sqrt_p, _sqrt)
defunary(prims.rsqrt_p, lambda z0, x, order: _power(z0, x, order, -0.5))
defunary(prims.cbrt_p, lambda z0, x, order: _power(z0, x, order, 1 / 3))
defunary(prims.square_p, lambda z0, x, order: [_cauchy(x, x, k) for k in range(1, order + 1)])


def _truncated_product(a: list[Any], b: list[Any]) -> list[Any]:
    return [_cauchy(a, b, k) for k in range(len(a))]


def _integer_pow(primals, series, *, y):
    (x,), (xs,) = primals, series
    ans = lax.integer_pow(x, y)
    # Repeated squaring of the series: exact at x_0 = 0, where the power recurrence divides.
    result, base, n = None, [x, *xs], abs(y)
    while n:
        if n & 1:
            result = base if result is None else _truncated_product(result, base)
        n >>= 1
        if n:
            base = _truncated_product(base, base)
    if result is None:  # y == 0: a constant
        return ans, None
    if y < 0:  # 1 / x^|y|, by the division recurrence
        one = [jnp.ones_like(x), *[jnp.zeros_like(x)] * len(xs)]
        return ans, _div_series(ans, one, result)
    return ans, result[1:]


def _div_series(z0: Any, a: list[Any], b: list[Any]) -> list[Any]:
    z = [z0]
    for k in range(1, len(a)):
        z.append(lax.div(a[k] - _sum([b[j] * z[k - j] for j in range(1, k + 1)]), b[0]))
    return z[1:]


taylor_rules[prims.integer_pow_p] = _integer_pow


def _pow(primals, series):
    (x, y), (xs, ys) = primals, series
    ans = lax.pow(x, y)
    if ys is None:  # x^y with y constant
        return ans, broadcast_all(_power(ans, [x, *xs], len(xs), y), ans)
    order = len(ys)
    # x^y = exp(y log x): the log series of x, its Cauchy product with y, then exp.
    log_x = [lax.log(x), *(_log_of(x, _coefs(x, xs, order), order, lax.log(x)) if xs is not None
                           else [jnp.zeros_like(x)] * order)]
    u = [lax.mul(*_bcast(y, log_x[0])), *(_cauchy([y, *ys], log_x, k) for k in range(1, order + 1))]
    return ans, broadcast_all(_exp(ans, u, order), ans)


def _bcast(a: Any, b: Any) -> tuple[Any, Any]:
    shape = np.broadcast_shapes(np.shape(a), np.shape(b))
    return broadcast_to(a, shape), broadcast_to(b, shape)


def broadcast_all(zs: list[Any], ans: Any) -> list[Any]:
    """Each coefficient at the output's shape (lax broadcasts rank-0 operands implicitly)."""
    return [broadcast_to(z, np.shape(ans)) for z in zs]


taylor_rules[prims.pow_p] = _pow


def _erf(z0, x, order):
    # erf' = (2 / sqrt(pi)) exp(-x^2): the series of exp(-x^2) to order K-1, then integrate.
    neg_sq = [-_cauchy(x, x, m) for m in range(order)]
    g = [lax.exp(neg_sq[0]), *_exp(lax.exp(neg_sq[0]), neg_sq, order - 1)]
    c = 2 / math.sqrt(math.pi)
    return [_weighted(x, g, k) * c for k in range(1, order + 1)]


defunary(prims.erf_p, _erf)


# --- piecewise: a selection read from the primals, then linear ------------------------------

def _abs(primals, series):
    (x,), (xs,) = primals, series
    if jnp.issubdtype(jaxutil.typeof(x).dtype, jnp.complexfloating):
        return None  # the caller falls back on the JVP rule
    s = lax.sign(x)  # |x|_k = sign(x_0) x_k; 0 at x_0 = 0, as jax's derivative
    return lax.abs(x), [s * x_k for x_k in xs]


def _chooser(prim: Primitive, pick: Callable[[Any, Any], Any]) -> TaylorRule:
    """max / min: the series of the chosen side; at ties the mean of both, as jax's JVP."""
    def rule(primals, series):
        (x, y), (xs, ys) = primals, series
        ans = prim.bind(x, y)
        order = order_of(series)
        a, b = _coefs(x, xs, order), _coefs(y, ys, order)
        x_wins = pick(x, y)
        tie = lax.eq(*_bcast(x, y))
        half = lambda u: broadcast_to(u * 0.5, np.shape(ans))
        out = []
        for x_k, y_k in zip(a[1:], b[1:], strict=True):
            x_k, y_k = broadcast_to(x_k, np.shape(ans)), broadcast_to(y_k, np.shape(ans))
            mean = half(x_k + y_k)
            chosen = lax.select(broadcast_to(x_wins, np.shape(ans)), x_k, y_k)
            out.append(lax.select(broadcast_to(tie, np.shape(ans)), mean, chosen))
        return ans, out

    return rule


taylor_rules[prims.max_p] = _chooser(prims.max_p, lambda a, b: lax.gt(*_bcast(a, b)))
taylor_rules[prims.min_p] = _chooser(prims.min_p, lambda a, b: lax.lt(*_bcast(a, b)))


def _reduce_chooser(prim: Primitive) -> TaylorRule:
    """reduce_max / reduce_min: each coefficient averaged over the positions of the extremum."""
    def rule(primals, series, *, axes, **params):
        (x,), (xs,) = primals, series
        ans = prim.bind(x, axes=axes, **params)
        kept = tuple(d for d in range(np.ndim(x)) if d not in axes)
        at = lax.eq(x, lax.broadcast_in_dim(ans, np.shape(x), kept))
        mask = lax.convert_element_type(at, jaxutil.typeof(x).dtype)
        count = lax.reduce_sum(mask, axes)
        return ans, [lax.div(lax.reduce_sum(lax.mul(x_k, mask), axes), count) for x_k in xs]

    return rule


taylor_rules[prims.abs_p] = _abs
taylor_rules[prims.reduce_max_p] = _reduce_chooser(prims.reduce_max_p)
taylor_rules[prims.reduce_min_p] = _reduce_chooser(prims.reduce_min_p)
