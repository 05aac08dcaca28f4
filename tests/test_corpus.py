"""A corpus of public jax functions: fungrad's derivatives equal jax's.

Each entry is `(name, function, argument specs[, options])`; a `family` entry bundles several
related functions, each with its own arguments and named in every message. Both libraries
compute the jvp along a random tangent and the gradient (a vjp with a random cotangent when
the output is not a real scalar), in float64, at a point away from any kink, inside ONE
compiled program per entry, compiled with XLA's cheap settings: compile time, not run time,
is this file's cost. An entry that fungrad gets wrong carries
`{"marks": pytest.mark.xfail(strict=True, reason=...)}` in its options.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import Any

import jax
import jax.nn as jnn
import jax.numpy as jnp
import jax.scipy.linalg as jsl
import jax.scipy.signal as jss
import jax.scipy.special as jsp
import jax.scipy.stats as jst
import numpy as np
import pytest
from jax import lax, tree_util

import fungrad
from tests.harness import assert_close, random_like

RTOL = 1e-12  # float64, as elsewhere in the suite; an entry whose two formulas may differ says so

# --- argument specs: a spec draws one float64 argument from a seeded generator ------------

Spec = Callable[[np.random.Generator], np.ndarray]


def real(*shape: int, scale: float = 1.0) -> Spec:
    """Standard normal values (times `scale`)."""
    return lambda rng: scale * rng.standard_normal(shape)


def between(lo: float, hi: float, *shape: int) -> Spec:
    """Uniform values in (lo, hi)."""
    return lambda rng: rng.uniform(lo, hi, shape)


def pos(*shape: int) -> Spec:
    return between(0.5, 2.5, *shape)


def unit(*shape: int) -> Spec:
    """Values in (0, 1), away from the ends."""
    return between(0.1, 0.9, *shape)


def away(*shape: int) -> Spec:
    """Values of either sign with magnitude in (0.3, 2): away from kinks at zero."""
    return lambda rng: rng.choice([-1.0, 1.0], shape) * rng.uniform(0.3, 2.0, shape)


def spd(n: int, *batch: int) -> Spec:
    """Symmetric positive definite, well conditioned."""
    def draw(rng):
        a = rng.standard_normal((*batch, n, n))
        return a @ np.swapaxes(a, -1, -2) / n + np.eye(n)
    return draw


def sym(n: int) -> Spec:
    """Symmetric with well separated eigenvalues (eigenvectors then depend smoothly on it)."""
    def draw(rng):
        q, _ = np.linalg.qr(rng.standard_normal((n, n)))
        return q @ np.diag(np.arange(1.0, n + 1) * 1.5 - n) @ q.T
    return draw


def wellcond(n: int, *batch: int) -> Spec:
    """Square, well conditioned (identity plus a small random part)."""
    return lambda rng: 2 * np.eye(n) + 0.4 * rng.standard_normal((*batch, n, n))


def upper(n: int) -> Spec:
    return lambda rng: np.triu(0.5 * rng.standard_normal((n, n))) + 2 * np.eye(n)


def lower(n: int) -> Spec:
    return lambda rng: np.tril(0.5 * rng.standard_normal((n, n))) + 2 * np.eye(n)


def distinct(*shape: int) -> Spec:
    """A permutation of well separated values: no ties for sort, max, median, quantiles."""
    def draw(rng):
        size = int(np.prod(shape))
        return rng.permutation(np.linspace(-2.0, 2.0, size) + 0.01 * rng.uniform(size=size)) \
            .reshape(shape)
    return draw


def cplx(*shape: int) -> Spec:
    return lambda rng: rng.standard_normal(shape) + 1j * rng.standard_normal(shape)


# --- constants the entries close over --------------------------------------------------

IDX = np.array([3, 0, 2, 2, 4])         # repeats index 2
IDX2 = np.array([[1, 0, 2], [2, 2, 0]])
NANMASK = np.array([[False, True, False, False, False],
                    [False, False, False, True, True],
                    [True, False, False, False, False]])
MASK = np.array([[True, False, True, True], [True, True, False, True]])
LABELS = np.array([1, 0, 4, 2])
CAUSAL = np.tril(np.ones((4, 4), bool))


def _nanify(x):
    return jnp.where(NANMASK, jnp.nan, x)


# --- the corpus, group by group ---------------------------------------------------------

def family(**members: tuple[Callable, list[Spec]]) -> tuple[Callable, list[Spec]]:
    """Several functions as one entry (one compiled program, fewer fixed costs).

    Each member gets its own arguments, so its jvp and its gradient stay apart, under its
    name, in the outputs that the test compares.
    """
    def fn(args):
        return {name: f(*args[name]) for name, (f, _) in members.items()}

    def draw(rng):
        return {name: tuple(spec(rng) for spec in specs) for name, (_, specs) in members.items()}
    return fn, [draw]


ELEMENTWISE = [
    ("trig", *family(
        sin=(jnp.sin, [real(3, 4)]),
        sin_scalar=(jnp.sin, [real()]),
        cos=(jnp.cos, [real(3, 4)]),
        tan=(jnp.tan, [between(-1.2, 1.2, 3, 4)]),
        arcsin=(jnp.arcsin, [between(-0.9, 0.9, 5)]),
        arccos=(jnp.arccos, [between(-0.9, 0.9, 5)]),
        arctan=(jnp.arctan, [real(5)]),
        arctan2=(jnp.arctan2, [real(4), real(4)]),
        hypot=(jnp.hypot, [real(4), real(4)]),
        sinc=(jnp.sinc, [away(6)]),
        deg2rad=(lambda x: jnp.deg2rad(x) + jnp.rad2deg(x), [real(4)]),
    )),
    ("hyperbolic", *family(
        sinh=(jnp.sinh, [real(5)]),
        cosh=(jnp.cosh, [real(5)]),
        tanh=(jnp.tanh, [real(5)]),
        arcsinh=(jnp.arcsinh, [real(5)]),
        arccosh=(jnp.arccosh, [between(1.2, 4.0, 5)]),
        arctanh=(jnp.arctanh, [between(-0.9, 0.9, 5)]),
    )),
    ("exp_log", *family(
        exp=(jnp.exp, [real(5)]),
        exp2=(jnp.exp2, [real(5)]),
        expm1=(jnp.expm1, [real(5)]),
        log=(jnp.log, [pos(5)]),
        log2=(jnp.log2, [pos(5)]),
        log10=(jnp.log10, [pos(5)]),
        log1p=(jnp.log1p, [between(-0.5, 3.0, 5)]),
        logaddexp=(jnp.logaddexp, [real(2, 3), real(3)]),
        logaddexp2=(jnp.logaddexp2, [real(4), real(4)]),
    )),
    ("powers", *family(
        power=(jnp.power, [pos(4), real(4)]),
        power_scalar=(jnp.power, [pos(), real()]),
        float_power=(jnp.float_power, [pos(4), real(4)]),
        integer_pow=(lambda x: x ** 3 + x ** -2, [away(4)]),
        square=(jnp.square, [real(4)]),
        sqrt=(jnp.sqrt, [pos(4)]),
        cbrt=(jnp.cbrt, [away(4)]),
        rsqrt=(lax.rsqrt, [pos(4)]),
        reciprocal=(jnp.reciprocal, [away(4)]),
        divide=(jnp.divide, [real(3, 4), away(4)]),
    )),
    ("kinks", *family(  # non-smooth functions, evaluated away from their kinks
        clip=(lambda x: jnp.clip(x, -0.5, 0.7), [distinct(8)]),
        clip_array_bounds=(lambda x, lo, hi: jnp.clip(x, lo - 1, hi + 1),
                           [distinct(6), real(6, scale=0.1), real(6, scale=0.1)]),
        abs=(jnp.abs, [away(5)]),
        fabs=(jnp.fabs, [away(5)]),
        sign_times=(lambda x: jnp.sign(x) * x ** 2, [away(5)]),
        copysign=(jnp.copysign, [away(5), away(5)]),
        maximum=(jnp.maximum, [distinct(6), real(6, scale=0.1)]),
        minimum=(jnp.minimum, [distinct(6), real(6, scale=0.1)]),
        fmax=(jnp.fmax, [distinct(6), real(6, scale=0.1)]),
        fmin=(jnp.fmin, [distinct(6), real(6, scale=0.1)]),
        heaviside_times=(lambda x: jnp.heaviside(x, 0.5) * x, [away(5)]),
    )),
    ("rounding_remainders", *family(  # rounding has a zero derivative
        rounding=(lambda x: jnp.floor(x) + jnp.ceil(x) + jnp.round(x) + jnp.trunc(x)
                  + jnp.rint(x) + x, [real(6, scale=3.0)]),
        remainder=(jnp.remainder, [real(5, scale=3.0), pos(5)]),
        fmod=(jnp.fmod, [real(5, scale=3.0), pos(5)]),
        mod_op=(lambda x, y: x % y, [real(5, scale=3.0), pos(5)]),
        ldexp=(lambda x: jnp.ldexp(x, np.array([1, -2, 3, 0])), [real(4)]),
    )),
    ("where", lambda x, y: jnp.where(x > 0, x ** 2, jnp.sin(y)), [away(5), real(5)]),
    ("nan_to_num", lambda x: jnp.nan_to_num(jnp.log(x)), [pos(4)]),
    ("complex_abs_angle", lambda x, y: jnp.abs(jnp.exp(lax.complex(x, y))) + jnp.angle(
        lax.complex(x, y)), [real(4), away(4)]),
]

REDUCTIONS = [
    ("sums_moments", *family(
        sum=(lambda x: jnp.sum(x, axis=1), [real(3, 4)]),
        sum_scalar=(jnp.sum, [real()]),
        sum_size0=(lambda x: jnp.sum(x, axis=0), [real(0, 3)]),
        mean_size1=(lambda x: jnp.mean(x, axis=0), [real(1, 3)]),
        sum_keepdims_where=(lambda x: jnp.sum(x, axis=0, keepdims=True, where=MASK),
                            [real(2, 4)]),
        mean=(lambda x: jnp.mean(x, axis=(0, 2)), [real(2, 3, 4)]),
        average_weights=(lambda x, w: jnp.average(x, axis=1, weights=w), [real(3, 4), pos(4)]),
        var=(lambda x: jnp.var(x, axis=1), [real(3, 5)]),
        var_ddof=(lambda x: jnp.var(x, ddof=1), [real(3, 5)]),
        std=(lambda x: jnp.std(x, axis=0), [real(4, 3)]),
        prod=(lambda x: jnp.prod(x, axis=1), [real(3, 4)]),
    )),
    ("extrema", *family(
        max=(lambda x: jnp.max(x, axis=1), [distinct(3, 5)]),
        max_where_initial=(lambda x: jnp.max(x, axis=1, where=MASK, initial=-5.0),
                           [distinct(2, 4)]),
        min=(jnp.min, [distinct(3, 5)]),
        amax=(lambda x: jnp.amax(x, axis=0), [distinct(3, 5)]),
        ptp=(lambda x: jnp.ptp(x, axis=1), [distinct(3, 5)]),
    )),
    ("order_statistics", *family(
        median=(lambda x: jnp.median(x, axis=1), [distinct(3, 5)]),
        median_even=(jnp.median, [distinct(6)]),
        quantile=(lambda x: jnp.quantile(x, jnp.array([0.2, 0.5, 0.9]), axis=0),
                  [distinct(7, 2)]),
        quantile_nearest=(lambda x: jnp.quantile(x, 0.3, method="nearest"), [distinct(7)]),
        quantile_midpoint=(lambda x: jnp.quantile(x, 0.3, method="midpoint"), [distinct(7)]),
        percentile=(lambda x: jnp.percentile(x, 37.0, axis=1), [distinct(2, 9)]),
    )),
    ("nan_reductions", *family(
        nansum=(lambda x: jnp.nansum(_nanify(x), axis=1), [real(3, 5)]),
        nanmean=(lambda x: jnp.nanmean(_nanify(x), axis=1), [real(3, 5)]),
        nanvar=(lambda x: jnp.nanvar(_nanify(x), axis=1), [real(3, 5)]),
        nanstd=(lambda x: jnp.nanstd(_nanify(x)), [real(3, 5)]),
        nanprod=(lambda x: jnp.nanprod(_nanify(x), axis=0), [real(3, 5)]),
        nanmax=(lambda x: jnp.nanmax(_nanify(x), axis=1), [distinct(3, 5)]),
        nanmin=(lambda x: jnp.nanmin(_nanify(x), axis=0), [distinct(3, 5)]),
    )),
    ("nan_order_statistics", *family(
        nanmedian=(lambda x: jnp.nanmedian(_nanify(x), axis=1), [distinct(3, 5)]),
        nanquantile=(lambda x: jnp.nanquantile(_nanify(x), 0.4, axis=1), [distinct(3, 5)]),
        nanpercentile=(lambda x: jnp.nanpercentile(_nanify(x), 60.0), [distinct(3, 5)]),
    )),
    ("cumulative", *family(
        cumsum=(lambda x: jnp.cumsum(x, axis=1), [real(3, 4)]),
        cumprod=(lambda x: jnp.cumprod(x, axis=0), [real(4, 3)]),
        cummax=(lambda x: lax.cummax(x, axis=1), [distinct(3, 5)]),
        cummin_reverse=(lambda x: lax.cummin(x, axis=0, reverse=True), [distinct(5, 2)]),
        cumulative_sum=(lambda x: jnp.cumulative_sum(x, axis=1, include_initial=True),
                        [real(2, 4)]),
        nancumsum=(lambda x: jnp.nancumsum(_nanify(x), axis=1), [real(3, 5)]),
        nancumprod=(lambda x: jnp.nancumprod(_nanify(x), axis=1), [real(3, 5)]),
    )),
    ("sorting", *family(
        sort=(lambda x: jnp.sort(x, axis=1), [distinct(3, 5)]),
        sort_descending=(lambda x: jnp.sort(x, descending=True), [distinct(6)]),
        argsort_gather=(lambda x, y: y[jnp.argsort(x)], [distinct(6), real(6)]),
        argsort_take_along=(lambda x: jnp.take_along_axis(x, jnp.argsort(x, axis=0), axis=0),
                            [distinct(4, 3)]),
        argmax_gather=(lambda x: jnp.take_along_axis(x, jnp.argmax(x, 1)[:, None], 1),
                       [distinct(3, 4)]),
        partition=(lambda x: jnp.partition(x, 2), [distinct(6)]),
        top_k=(lambda x: lax.top_k(x, 3)[0], [distinct(2, 6)]),
    )),
    ("misc_reductions", *family(
        logsumexp=(lambda x: jnn.logsumexp(x, axis=1), [real(3, 4)]),
        logmeanexp=(lambda x: jnn.logmeanexp(x, axis=0), [real(3, 4)]),
        trapezoid=(jnp.trapezoid, [real(6), distinct(6)]),
        vector_norm=(lambda x: jnp.linalg.vector_norm(x, axis=1), [real(3, 4)]),
    )),
    ("cov_corrcoef", *family(
        cov=(jnp.cov, [real(3, 6)]),
        corrcoef=(jnp.corrcoef, [real(3, 6)]),
    )),
]

INDEXING = [
    ("basic_indexing", *family(
        slice=(lambda x: x[1:3, ::2], [real(4, 5)]),
        reverse_step=(lambda x: x[::-2], [real(7)]),
        int_index=(lambda x: x[2, 1:], [real(4, 5)]),
        ellipsis_newaxis=(lambda x: x[..., -1, None], [real(2, 3, 4)]),
        array_index=(lambda x: x[IDX], [real(5, 2)]),
        array_index_2d=(lambda x: x[IDX2, 1], [real(3, 4)]),
        boolean_static=(lambda x: x[np.array([True, False, True, True])], [real(4, 2)]),
    )),
    ("gathers", *family(
        take=(lambda x: jnp.take(x, IDX, axis=1), [real(2, 5)]),
        take_clip=(lambda x: jnp.take(x, np.array([0, 7, -9, 2]), mode="clip"), [real(5)]),
        take_along_axis=(lambda x: jnp.take_along_axis(x, IDX2 % 2, axis=0), [real(2, 3)]),
        at_get_fill=(lambda x: x.at[np.array([0, 9])].get(mode="fill", fill_value=2.0),
                     [real(5)]),
        choose=(lambda a, b: jnp.choose(np.array([0, 1, 1, 0]), [a, b], mode="clip"),
                [real(4), real(4)]),
        compress=(lambda x: jnp.compress(np.array([True, False, True]), x, axis=1, size=2),
                  [real(2, 3)]),
    )),
    ("dynamic_slices", *family(
        dynamic_slice=(lambda x: lax.dynamic_slice(x, (1, 2), (2, 2)), [real(4, 5)]),
        dynamic_update_slice=(lambda x, y: lax.dynamic_update_slice(x, y, (1, 0)),
                              [real(4, 3), real(2, 3)]),
    )),
    ("at_set_add_subtract", *family(
        set=(lambda x, y: x.at[IDX[:3]].set(y), [real(5, 2), real(3, 2)]),
        set_slice=(lambda x, y: x.at[1:, 0].set(y), [real(4, 3), real(3)]),
        add_repeated=(lambda x, y: x.at[IDX].add(y), [real(5), real(5)]),
        subtract=(lambda x, y: x.at[IDX].subtract(y), [real(5), real(5)]),
    )),
    ("at_multiply_divide_power", *family(  # jax differentiates these for unique indices
        multiply=(lambda x, y: x.at[IDX[:3]].multiply(y, unique_indices=True),
                  [real(5), real(3)]),
        divide=(lambda x, y: x.at[IDX[:3]].divide(y, unique_indices=True), [real(5), away(3)]),
        power=(lambda x, y: x.at[np.array([1, 3])].power(y, unique_indices=True),
               [pos(5), real(2)]),
    )),
    ("at_min_max", *family(
        min=(lambda x, y: x.at[IDX[:3]].min(y), [distinct(5), distinct(3)]),
        max=(lambda x, y: x.at[np.array([0, 2, 4])].max(y), [distinct(5), distinct(3)]),
    )),
    ("select_piecewise", *family(
        select=(lambda x: jnp.select([x < -0.5, x > 0.5], [x ** 2, jnp.sin(x)], x * 3),
                [distinct(8)]),
        piecewise=(lambda x: jnp.piecewise(x, [x < 0, x >= 0], [jnp.sin, lambda v: v ** 3]),
                   [away(6)]),
    )),
]

STRUCTURAL = [
    ("joining", *family(
        concatenate=(lambda x, y: jnp.concatenate([x, y, x], axis=1), [real(2, 3), real(2, 1)]),
        stack=(lambda x, y: jnp.stack([x, y], axis=-1), [real(2, 3), real(2, 3)]),
        hstack_vstack=(lambda x, y: jnp.vstack([jnp.hstack([x, y]), jnp.hstack([y, x])]),
                       [real(2, 2), real(2, 2)]),
        dstack_column_stack=(lambda x, y: jnp.dstack([x, y]).sum(-1)
                             + jnp.column_stack([x[:, 0], y[:, 1]]), [real(2, 2), real(2, 2)]),
        block=(lambda a, b: jnp.block([[a, b], [b, a]]), [real(2, 2), real(2, 2)]),
        append_insert_delete=(lambda x: jnp.delete(jnp.insert(jnp.append(x, x[:2]), 1, x[3]),
                                                   2), [real(5)]),
    )),
    ("splitting_repeating", *family(
        split=(lambda x: jnp.split(x, [1, 3], axis=1), [real(2, 5)]),
        array_split=(lambda x: jnp.array_split(x, 3), [real(7)]),
        tile=(lambda x: jnp.tile(x, (2, 3)), [real(2, 2)]),
        repeat=(lambda x: jnp.repeat(x, 3, axis=0), [real(2, 3)]),
        repeat_array=(lambda x: jnp.repeat(x, np.array([1, 0, 3]), total_repeat_length=4),
                      [real(3)]),
        resize=(lambda x: jnp.resize(x, (3, 3)), [real(4)]),
    )),
    ("reordering", *family(
        roll=(lambda x: jnp.roll(x, (1, -2), axis=(0, 1)), [real(3, 4)]),
        flip=(lambda x: jnp.flip(x, axis=1) + jnp.fliplr(x) + jnp.flipud(x), [real(3, 3)]),
        rot90=(lambda x: jnp.rot90(x, k=3), [real(2, 3)]),
        reshape_transpose=(lambda x: jnp.transpose(x.reshape(3, 2, 2), (2, 0, 1)),
                           [real(4, 3)]),
        moveaxis_swapaxes=(lambda x: jnp.swapaxes(jnp.moveaxis(x, 0, -1), 0, 1),
                           [real(2, 3, 4)]),
        squeeze_expand=(lambda x: jnp.expand_dims(jnp.squeeze(x, 1), 0), [real(3, 1, 2)]),
        broadcast_to=(lambda x: jnp.broadcast_to(x, (2, 3, 4)), [real(3, 1)]),
        ravel_atleast=(lambda x: jnp.atleast_2d(jnp.ravel(x)), [real(2, 3)]),
    )),
    ("pad", *family(
        constant=(lambda x: jnp.pad(x, ((1, 2), (0, 1)), constant_values=3.0), [real(2, 3)]),
        edge=(lambda x: jnp.pad(x, ((1, 2), (2, 1)), mode="edge"), [real(2, 3)]),
        reflect=(lambda x: jnp.pad(x, ((2, 3),), mode="reflect"), [real(4)]),
        reflect_odd=(lambda x: jnp.pad(x, 2, mode="reflect", reflect_type="odd"), [real(4)]),
        symmetric=(lambda x: jnp.pad(x, ((1, 2), (3, 1)), mode="symmetric"), [real(2, 3)]),
        wrap=(lambda x: jnp.pad(x, ((1, 5),), mode="wrap"), [real(3)]),
        linear_ramp=(lambda x: jnp.pad(x, ((2, 1),), mode="linear_ramp", end_values=1.5),
                     [real(3)]),
    )),
    ("pad_statistics", *family(
        maximum=(lambda x: jnp.pad(x, ((1, 2), (0, 1)), mode="maximum"), [distinct(2, 3)]),
        minimum=(lambda x: jnp.pad(x, ((1, 1),), mode="minimum", stat_length=2),
                 [distinct(5)]),
        mean=(lambda x: jnp.pad(x, ((2, 1), (1, 1)), mode="mean"), [real(2, 3)]),
        median=(lambda x: jnp.pad(x, ((1, 1),), mode="median"), [distinct(5)]),
    )),
    ("triangles_diagonals", *family(
        triu_tril=(lambda x: jnp.triu(x, 1) * 2 + jnp.tril(x, -1), [real(4, 4)]),
        diagonal=(lambda x: jnp.diagonal(x, offset=1, axis1=1, axis2=2), [real(2, 3, 4)]),
        trace=(lambda x: jnp.trace(x, offset=-1), [real(4, 3)]),
        diag_diagflat=(lambda v: jnp.diag(v, k=1)[:3, 1:] + jnp.diagflat(jnp.diag(
            jnp.outer(v, v))), [real(3)]),
        vander=(lambda x: jnp.vander(x, 4), [real(3)]),
    )),
    ("differences", *family(
        diff=(lambda x: jnp.diff(x, n=2, axis=1), [real(3, 5)]),
        diff_prepend=(lambda x: jnp.diff(x, prepend=x[:1] * 2), [real(5)]),
        ediff1d=(lambda x: jnp.ediff1d(x, to_end=x[:2]), [real(5)]),
        gradient=(lambda x: jnp.gradient(x, 0.5), [real(6)]),
    )),
    ("meshgrid", lambda x, y: jnp.sum(jnp.stack(jnp.meshgrid(x, y)) ** 2 * jnp.sin(
        jnp.meshgrid(x, y, indexing="ij")[0].T), axis=0), [real(3), real(2)]),
]

CONTRACTIONS = [
    ("einsum", *family(
        matmul=(lambda a, b: jnp.einsum("ij,jk->ik", a, b), [real(2, 3), real(3, 4)]),
        batch_trace=(lambda a: jnp.einsum("bii->b", a), [real(2, 3, 3)]),
        three=(lambda a, b, c: jnp.einsum("ij,jk,kl->il", a, b, c),
               [real(2, 3), real(3, 4), real(4, 2)]),
        outer_broadcast=(lambda a, b: jnp.einsum("...i,...j->...ij", a, b),
                         [real(2, 3), real(2, 4)]),
    )),
    ("products", *family(
        matmul=(jnp.matmul, [real(2, 3, 4), real(4, 2)]),
        matmul_size0=(jnp.matmul, [real(2, 0), real(0, 3)]),
        matmul_vector=(lambda a, v: a @ v, [real(3, 4), real(4)]),
        dot=(jnp.dot, [real(3, 4), real(4, 2)]),
        vdot=(jnp.vdot, [real(2, 3), real(2, 3)]),
        inner=(jnp.inner, [real(2, 3), real(4, 3)]),
        outer=(jnp.outer, [real(3), real(4)]),
        kron=(jnp.kron, [real(2, 2), real(2, 3)]),
    )),
    ("tensor_products", *family(
        tensordot=(lambda a, b: jnp.tensordot(a, b, axes=([0, 2], [1, 0])),
                   [real(2, 3, 4), real(4, 2, 5)]),
        tensordot_int=(lambda a, b: jnp.tensordot(a, b, 1), [real(2, 3), real(3, 2)]),
        multi_dot=(lambda a, b, c: jnp.linalg.multi_dot([a, b, c]),
                   [real(2, 3), real(3, 3), real(3, 2)]),
        vecdot_matmul=(lambda a, b: jnp.linalg.vecdot(a, b) + jnp.linalg.matmul(a, b.T).sum(0),
                       [real(3, 3), real(3, 3)]),
        cross=(jnp.cross, [real(4, 3), real(4, 3)]),
        cross_2d=(lambda a, b: jnp.cross(a, b, axisa=0, axisb=0), [real(3, 2), real(3, 2)]),
    )),
    ("vdot/complex", jnp.vdot, [cplx(3), cplx(3)]),
    ("interp", *family(
        fixed_xp=(lambda x, fp: jnp.interp(x, np.linspace(-2, 2, 5), fp),
                  [between(-1.9, 1.9, 6), real(5)]),
        xp=(lambda x, xp, fp: jnp.interp(x, jnp.sort(xp), fp),
            [between(-0.5, 0.5, 4), distinct(5), real(5)]),
    )),
    ("convolve_correlate", *family(
        convolve_full=(jnp.convolve, [real(7), real(3)]),
        convolve_same=(lambda a, v: jnp.convolve(a, v, mode="same"), [real(7), real(4)]),
        correlate_valid=(lambda a, v: jnp.correlate(a, v, mode="valid"), [real(7), real(3)]),
        correlate_full=(lambda a, v: jnp.correlate(a, v, mode="full"), [real(5), real(3)]),
    )),
    ("polynomials", *family(
        polyval=(jnp.polyval, [real(4), real(5)]),
        polymul_polyder=(lambda p, q: jnp.polyder(jnp.polymul(p, q)) + jnp.polyint(
            jnp.polyadd(p, q)), [real(3), real(3)]),
    )),
]

NN = [
    ("rectifiers", *family(  # piecewise activations, evaluated away from their kinks
        relu=(jnn.relu, [away(6)]),
        relu_scalar=(jnn.relu, [away()]),
        relu6=(jnn.relu6, [real(8, scale=4.0)]),
        elu=(jnn.elu, [away(6)]),
        selu=(jnn.selu, [away(6)]),
        celu=(lambda x: jnn.celu(x, alpha=0.7), [away(6)]),
        leaky_relu=(lambda x: jnn.leaky_relu(x, 0.1), [away(6)]),
        hard_tanh=(jnn.hard_tanh, [real(8, scale=2.0)]),
        hard_sigmoid=(jnn.hard_sigmoid, [real(8, scale=4.0)]),
        hard_silu=(jnn.hard_silu, [real(8, scale=4.0)]),
        hard_swish=(jnn.hard_swish, [real(8, scale=4.0)]),
        sparse_plus=(jnn.sparse_plus, [real(8, scale=2.0)]),
        sparse_sigmoid=(jnn.sparse_sigmoid, [real(8, scale=2.0)]),
    )),
    ("smooth_activations", *family(
        gelu_tanh=(lambda x: jnn.gelu(x, approximate=True), [real(6)]),
        gelu_erf=(lambda x: jnn.gelu(x, approximate=False), [real(6)]),
        silu=(jnn.silu, [real(6)]),
        swish=(jnn.swish, [real(6)]),
        softplus=(jnn.softplus, [real(6, scale=3.0)]),
        soft_sign=(jnn.soft_sign, [away(6)]),
        sigmoid=(jnn.sigmoid, [real(6)]),
        log_sigmoid=(jnn.log_sigmoid, [real(6, scale=3.0)]),
        mish=(jnn.mish, [real(6)]),
        squareplus=(jnn.squareplus, [real(6)]),
        log1mexp=(jnn.log1mexp, [pos(5)]),
        tanh=(jnn.tanh, [real(5)]),
    )),
    ("glu", lambda x: jnn.glu(x, axis=-1), [real(3, 4)]),
    ("softmax", lambda x: jnn.softmax(x, axis=0), [real(3, 4)]),
    ("softmax/where", lambda x: jnn.softmax(x, axis=-1, where=MASK), [real(2, 4)]),
    ("log_softmax", lambda x: jnn.log_softmax(x, axis=(0, 1)), [real(2, 3)]),
    ("log_softmax/where", lambda x: jnn.log_softmax(x, where=MASK), [real(2, 4)]),
    ("standardize", lambda x: jnn.standardize(x, axis=1), [real(3, 5)]),
    ("standardize/mean_var", lambda x, m, v: jnn.standardize(x, 0, mean=m, variance=v),
     [real(3, 2), real(2), pos(2)]),
    ("cross_entropy_one_hot", lambda x: -jnp.mean(jnp.sum(jnn.one_hot(LABELS, 5)
                                                          * jnn.log_softmax(x), -1)),
     [real(4, 5)]),
    ("sigmoid_binary_ce", lambda x, y: jnp.mean(-y * jnn.log_sigmoid(x)
                                                - (1 - y) * jnn.log_sigmoid(-x)),
     [real(6), unit(6)]),
    ("logsumexp/where_b", lambda x, b: jnn.logsumexp(x, axis=1, b=b, where=MASK),
     [real(2, 4), pos(2, 4)]),
    ("attention", lambda q, k, v: jnn.dot_product_attention(q, k, v),
     [real(1, 4, 2, 3), real(1, 5, 2, 3), real(1, 5, 2, 3)]),
    ("attention/bias_mask", lambda q, k, v, b: jnn.dot_product_attention(
        q, k, v, bias=b, mask=np.array([True, True, False, True, False])),
     [real(2, 3, 1, 4), real(2, 5, 1, 4), real(2, 5, 1, 4), real(1, 3, 5)]),
    ("attention/causal_scale", lambda q, k, v: jnn.dot_product_attention(
        q, k, v, is_causal=True, scale=0.3), [real(4, 2, 3), real(4, 2, 3), real(4, 2, 3)]),
    ("attention/gqa_mask", lambda q, k, v: jnn.dot_product_attention(q, k, v, mask=CAUSAL),
     [real(1, 4, 4, 2), real(1, 4, 2, 2), real(1, 4, 2, 2)]),
    ("attention/seq_lengths", lambda q, k, v: jnn.dot_product_attention(
        q, k, v, query_seq_lengths=np.array([3, 2], np.int32),
        key_value_seq_lengths=np.array([4, 2], np.int32)),
     [real(2, 3, 1, 2), real(2, 4, 1, 2), real(2, 4, 1, 2)]),
]

SPECIAL = [
    ("error_functions", *family(
        erf=(jsp.erf, [real(5)]),
        erfc=(jsp.erfc, [real(5)]),
        erfinv=(jsp.erfinv, [between(-0.9, 0.9, 5)]),
        erfcx=(jsp.erfcx, [real(5)]),
        ndtr=(jsp.ndtr, [real(4)]),
        log_ndtr=(jsp.log_ndtr, [real(6, scale=6.0)]),
        dawsn=(jsp.dawsn, [real(4)]),
    )),
    ("ndtri", jsp.ndtri, [unit(4)]),
    ("gamma_functions", *family(
        gammaln=(jsp.gammaln, [pos(5)]),
        gamma=(jsp.gamma, [pos(5)]),
        loggamma=(jsp.loggamma, [pos(5)]),
        digamma=(jsp.digamma, [pos(5)]),
        polygamma_1=(lambda x: jsp.polygamma(1, x), [pos(5)]),
        polygamma_3=(lambda x: jsp.polygamma(3, x), [pos(5)]),
        multigammaln=(lambda a: jsp.multigammaln(a, 3), [between(1.5, 4.0, 4)]),
        factorial=(jsp.factorial, [pos(4)]),
    )),
    ("gammainc", jsp.gammainc, [pos(5), pos(5)]),
    ("gammaincc", jsp.gammaincc, [pos(5), pos(5)]),
    ("betainc", lambda x: jsp.betainc(np.array([0.7, 1.5, 2.0, 3.0]),
                                      np.array([1.2, 0.8, 2.5, 1.0]), x), [unit(4)]),
    ("betaln", jsp.betaln, [pos(4), pos(4)]),
    ("entropies", *family(
        xlogy=(jsp.xlogy, [real(4), pos(4)]),
        xlog1py=(jsp.xlog1py, [real(4), pos(4)]),
        entr=(jsp.entr, [pos(4)]),
        kl_div=(jsp.kl_div, [pos(4), pos(4)]),
        rel_entr=(jsp.rel_entr, [pos(4), pos(4)]),
        logit=(jsp.logit, [unit(4)]),
        expit=(jsp.expit, [real(4)]),
        boxcox=(lambda x: jsp.boxcox(x, 0.3), [pos(4)]),
    )),
    ("bessel", *family(
        i0e=(jsp.i0e, [real(4)]),
        i1e=(jsp.i1e, [real(4)]),
        i0=(jsp.i0, [real(4)]),
        i1=(jsp.i1, [real(4)]),
        jnp_i0=(jnp.i0, [real(4)]),
    )),
    ("zeta", lambda q: jsp.zeta(np.array([2.0, 3.5, 5.0, 2.5]), q), [pos(4)]),
    ("spence", jsp.spence, [pos(4)]),
    ("more_special", *family(
        bessel_jn=(lambda x: jsp.bessel_jn(x, v=2), [pos(4)]),
        exp1=(jsp.exp1, [pos(4)]),
        expi=(jsp.expi, [pos(4)]),
        owens_t=(jsp.owens_t, [real(4), real(4)]),
    )),
    ("logsumexp/b", lambda x, b: jsp.logsumexp(x, axis=0, b=b), [real(3, 2), pos(3, 2)]),
    ("logsumexp/return_sign", lambda x, b: jsp.logsumexp(x, b=b, return_sign=True)[0],
     [real(4), away(4)]),
    ("softmax", lambda x: jsp.softmax(x, axis=1), [real(2, 3)]),
    ("log_softmax", lambda x: jsp.log_softmax(x, axis=0), [real(2, 3)]),
]

LINALG = [
    ("solves", *family(
        solve=(jsl.solve, [wellcond(3), real(3, 2)]),
        solve_assume_pos=(lambda a, b: jsl.solve(a, b, assume_a="pos"), [spd(3), real(3)]),
        solve_batched=(jnp.linalg.solve, [wellcond(3, 2), real(2, 3, 1)]),
        inv=(jsl.inv, [wellcond(3)]),
        cho_solve=(lambda a, b: jsl.cho_solve(jsl.cho_factor(a), b), [spd(3), real(3, 2)]),
        lu_solve=(lambda a, b: jsl.lu_solve(jsl.lu_factor(a), b), [wellcond(3), real(3)]),
    )),
    ("triangular_solves", *family(
        lower=(lambda a, b: jsl.solve_triangular(a, b, lower=True), [lower(3), real(3, 2)]),
        upper_trans=(lambda a, b: jsl.solve_triangular(a, b, trans=1), [upper(3), real(3)]),
        unit_diagonal=(lambda a, b: jsl.solve_triangular(a, b, lower=True,
                                                         unit_diagonal=True),
                       [lower(3), real(3)]),
    )),
    ("determinants", *family(
        det=(jsl.det, [wellcond(3)]),
        det_batched=(jnp.linalg.det, [wellcond(2, 3)]),
        slogdet=(lambda a: jnp.linalg.slogdet(a)[1], [wellcond(3)]),
    )),
    ("cholesky_lu", *family(
        cholesky=(jsl.cholesky, [spd(3)]),
        cholesky_lower_batched=(jnp.linalg.cholesky, [spd(3, 2)]),
        lu=(lambda a: jsl.lu(a)[1:], [wellcond(3)]),
        lu_factor=(lambda a: jsl.lu_factor(a)[0], [wellcond(3)]),
    )),
    ("qr", *family(
        full=(jsl.qr, [real(4, 3)]),
        economic=(lambda a: jsl.qr(a, mode="economic"), [real(4, 3)]),
        r=(lambda a: jnp.linalg.qr(a, mode="r"), [real(3, 3)]),
    )),
    ("eigh", *family(
        eigh=(jsl.eigh, [sym(4)]),
        eigvals_only=(lambda a: jsl.eigh(a, eigvals_only=True), [sym(3)]),
        eigvalsh=(jnp.linalg.eigvalsh, [sym(3)]),
    )),
    ("svd", *family(
        svd=(lambda a: jsl.svd(a, full_matrices=False), [real(4, 3)]),
        values=(lambda a: jnp.linalg.svd(a, compute_uv=False), [real(3, 5)]),
    )),
    ("expm", jsl.expm, [real(2, 3, 3, scale=0.5)]),
    ("svd_based", *family(
        pinv=(jnp.linalg.pinv, [real(4, 3)]),
        lstsq=(lambda a, b: jnp.linalg.lstsq(a, b)[0], [real(5, 3), real(5)]),
        cond=(jnp.linalg.cond, [wellcond(3)]),
        polar=(lambda a: jsl.polar(a, method="svd")[0], [wellcond(3)]),
    )),
    ("matrix_power", *family(
        positive=(lambda a: jnp.linalg.matrix_power(a, 3), [real(3, 3)]),
        negative=(lambda a: jnp.linalg.matrix_power(a, -2), [wellcond(3)]),
    )),
    ("vector_norms", *family(
        ord_2=(jnp.linalg.norm, [real(5)]),
        ord_1_inf_3=(lambda x: jnp.linalg.norm(x, 1) + jnp.linalg.norm(x, np.inf)
                     + jnp.linalg.norm(x, 3), [distinct(5)]),
        axis_keepdims=(lambda a: jnp.linalg.norm(a, 3, axis=0, keepdims=True), [real(3, 4)]),
    )),
    ("matrix_norms", *family(
        fro=(lambda a: jnp.linalg.norm(a, "fro"), [real(3, 4)]),
        nuc=(lambda a: jnp.linalg.norm(a, "nuc"), [real(3, 4)]),
        ord_2=(lambda a: jnp.linalg.norm(a, 2), [real(3, 4)]),
        ord_minus_2=(lambda a: jnp.linalg.norm(a, -2), [real(4, 3)]),
        ord_1_minus_inf=(lambda a: jnp.linalg.norm(a, 1) + jnp.linalg.norm(a, -np.inf),
                         [distinct(3, 3)]),
        matrix_norm=(jnp.linalg.matrix_norm, [real(2, 3, 3)]),
    )),
    ("tensor_linalg", *family(
        tensorsolve=(lambda a, b: jnp.linalg.tensorsolve(a.reshape(2, 3, 6), b),
                     [wellcond(6), real(2, 3)]),
        tensorinv=(lambda a: jnp.linalg.tensorinv(a.reshape(2, 3, 6), 2), [wellcond(6)]),
        block_diag=(jsl.block_diag, [real(2, 2), real(1, 3)]),
        toeplitz=(jsl.toeplitz, [real(3), real(4)]),
    )),
]

STATS_SIGNAL = [
    ("normal", *family(
        logpdf=(jst.norm.logpdf, [real(4), real(4), pos(4)]),
        cdf=(jst.norm.cdf, [real(4), real(4), pos(4)]),
        ppf=(jst.norm.ppf, [unit(4), real(4), pos(4)]),
    )),
    ("gamma_beta_t", *family(
        gamma_logpdf=(jst.gamma.logpdf, [pos(4), pos(4), real(4, scale=0.1), pos(4)]),
        beta_logpdf=(jst.beta.logpdf, [unit(4), pos(4), pos(4)]),
        t_logpdf=(jst.t.logpdf, [real(4), pos(4), real(4), pos(4)]),
    )),
    ("other_densities", *family(
        poisson_logpmf=(lambda mu: jst.poisson.logpmf(np.array([0, 2, 5, 1]), mu), [pos(4)]),
        laplace_logistic_cauchy=(lambda x: jst.laplace.logpdf(x) + jst.logistic.logpdf(x)
                                 + jst.cauchy.logpdf(x), [away(4)]),
        dirichlet_logpdf=(lambda x, a: jst.dirichlet.logpdf(x / x.sum(), a),
                          [pos(3), pos(3)]),
    )),
    ("multivariate_normal.logpdf", jst.multivariate_normal.logpdf,
     [real(2, 3), real(3), spd(3)]),
    ("signal", *family(
        convolve=(lambda a, v: jss.convolve(a, v, mode="same"), [real(6), real(3)]),
        correlate=(jss.correlate, [real(6), real(3)]),
        convolve2d=(lambda a, v: jss.convolve2d(a, v, mode="valid"),
                    [real(4, 5), real(2, 3)]),
        correlate2d=(jss.correlate2d, [real(3, 3), real(2, 2)]),
        fftconvolve=(jss.fftconvolve, [real(6), real(3)]),
        detrend=(jss.detrend, [real(6)]),
    )),
]

FFT = [
    ("complex", *family(
        fft=(jnp.fft.fft, [real(6)]),
        fft_complex_n=(lambda z: jnp.fft.fft(z, n=8, axis=0), [cplx(5, 2)]),
        ifft=(jnp.fft.ifft, [cplx(6)]),
        fft2=(jnp.fft.fft2, [real(3, 4)]),
        ifft2=(jnp.fft.ifft2, [cplx(3, 4)]),
        fftn_axes_s=(lambda x: jnp.fft.fftn(x, s=(4, 2), axes=(2, 0)), [real(3, 2, 3)]),
        ifftn=(jnp.fft.ifftn, [cplx(2, 3, 2)]),
    )),
    ("real", *family(
        rfft=(jnp.fft.rfft, [real(7)]),
        rfft_n_axis=(lambda x: jnp.fft.rfft(x, n=6, axis=0), [real(4, 3)]),
        irfft=(jnp.fft.irfft, [cplx(5)]),
        irfft_n=(lambda z: jnp.fft.irfft(z, n=7), [cplx(4)]),
        rfftn=(lambda x: jnp.fft.rfftn(x, axes=(0, 1)), [real(3, 4, 2)]),
        irfftn=(lambda z: jnp.fft.irfftn(z, s=(3, 4)), [cplx(3, 3)]),
        hfft=(lambda z: jnp.fft.hfft(z, n=6), [cplx(4)]),
        ihfft=(jnp.fft.ihfft, [real(5)]),
    )),
    ("shifts_spectra", *family(
        fftshift=(lambda x: jnp.fft.ifftshift(jnp.fft.fftshift(x, axes=1) * 2, axes=0),
                  [real(3, 4)]),
        power_spectrum=(lambda x: jnp.sum(jnp.abs(jnp.fft.rfft(x)) ** 2
                                          * jnp.fft.rfftfreq(8)), [real(8)]),
    )),
]

LAX_RANDOM = [
    ("random_reparameterized", *family(  # samples differentiated with respect to parameters
        gamma=(lambda a: jax.random.gamma(jax.random.key(0), a), [between(0.5, 3.0, 4)]),
        truncated_normal=(lambda lo: jax.random.truncated_normal(jax.random.key(3), lo,
                                                                 lo + 2.0), [real(3)]),
        normal_loc_scale=(lambda m, s: m + s * jax.random.normal(jax.random.key(4), (3,)),
                          [real(3), pos(3)]),
    )),
    ("ragged_dot", lambda lhs, rhs: lax.ragged_dot(lhs, rhs, np.array([2, 0, 3], np.int32)),
     [real(5, 3), real(3, 3, 2)]),
    ("reduce_variadic", lambda x, y: lax.reduce(
        (x, y), (0.0, 1.0), lambda a, b: (a[0] + b[0], a[1] * b[1]), (0,)),
     [real(3, 2), real(3, 2)]),
    ("pooling", *family(
        max_pool=(lambda x: lax.reduce_window(x, -jnp.inf, lax.max, (2, 2), (1, 1), "VALID"),
                  [distinct(3, 4)]),
        min_pool=(lambda x: lax.reduce_window(x, jnp.inf, lax.min, (2,), (2,), "SAME"),
                  [distinct(5)]),
        avg_pool=(lambda x: lax.reduce_window(x, 0.0, lax.add, (2, 2), (2, 1), "SAME") / 4,
                  [real(3, 4)]),
    )),
    ("associative_scan", lambda x: lax.associative_scan(jnp.multiply, x, axis=1),
     [real(2, 5)]),
    ("tridiagonal_solve", lambda dl, d, du, b: lax.linalg.tridiagonal_solve(
        dl * np.array([0, 1, 1]), d, du * np.array([1, 1, 0]), b),
     [real(3), between(3.0, 4.0, 3), real(3), real(3, 2)]),
    ("eigvals", jnp.linalg.eigvals, [lambda rng: np.diag([1.0, 2.5, 4.0])
                                     + 0.2 * rng.standard_normal((3, 3))],
     {"rtol": 1e-9}),  # non-symmetric eigenproblem: ill conditioned
    ("lu_permute_l", lambda a: jsl.lu(a, permute_l=True), [wellcond(3)]),
    ("stft_istft", *family(
        stft=(lambda x: jss.stft(x, nperseg=4)[2], [real(12)]),
        istft=(lambda z: jss.istft(z, nperseg=4)[1], [cplx(3, 5)]),
    )),
    ("welch_csd", *family(
        welch=(lambda x: jss.welch(x, nperseg=4)[1], [real(12)]),
        csd=(lambda x, y: jss.csd(x, y, nperseg=4)[1], [real(12), real(12)]),
    )),
]

CONTROL_FLOW = [
    ("scan_rnn", lambda w, xs: lax.scan(lambda h, x: (jnp.tanh(w @ h + x), h.sum()),
                                        jnp.zeros(3), xs), [real(3, 3, scale=0.5), real(4, 3)]),
    ("cond_switch", *family(
        cond=(lambda x: lax.cond(x.sum() > 0, jnp.sin, jnp.cos, x), [pos(3)]),
        switch=(lambda x: lax.switch(1, [jnp.sin, jnp.cos, jnp.tanh], x), [real(3)]),
    )),
    ("loops", *family(
        fori_loop=(lambda x: lax.fori_loop(0, 3, lambda i, c: jnp.sin(c) * x, x), [real(3)]),
        map=(lambda x: lax.map(lambda r: r @ r * r, x), [real(3, 2)]),
    )),
    ("checkpoint_vmap", *family(
        checkpoint=(jax.checkpoint(lambda x: jnp.sin(jnp.sin(x)) * x), [real(3)]),
        vmap=(jax.vmap(lambda a, v: jnp.linalg.solve(a, v)), [wellcond(2, 3), real(3, 2)]),
    )),
]

GROUPS = {
    "elementwise": ELEMENTWISE,
    "reductions": REDUCTIONS,
    "indexing": INDEXING,
    "structural": STRUCTURAL,
    "contractions": CONTRACTIONS,
    "nn": NN,
    "special": SPECIAL,
    "linalg": LINALG,
    "stats_signal": STATS_SIGNAL,
    "fft": FFT,
    "lax_random": LAX_RANDOM,
    "control_flow": CONTROL_FLOW,
}

# --- the oracle ------------------------------------------------------------------------

# XLA's CPU compiler spends most of this file's time optimizing programs that run once on
# tiny arrays: compile them with its cheap settings (one program holds both libraries'
# derivatives, so both get the same settings).
_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True,
                 "xla_cpu_use_fusion_emitters": False, "xla_cpu_parallel_codegen_split_count": 1}


def _compiled(fn: Callable, *args: Any) -> Callable:
    lowered = jax.jit(fn).lower(*args)
    if jax.default_backend() == "cpu":
        try:
            return lowered.compile(_FAST_COMPILE)
        except jax.errors.JaxRuntimeError as e:  # an XLA without one of these options
            if "No such compile option" not in str(e):
                raise
    return lowered.compile()


def _pullback(lib: Any, fn: Callable, args: tuple, ct: Any) -> Any:
    """The gradient (a real scalar output: `grad`'s path) or the vjp with `ct`."""
    leaves = tree_util.tree_leaves(ct)
    if (len(leaves) == 1 and np.shape(leaves[0]) == ()
            and jnp.issubdtype(jnp.result_type(leaves[0]), jnp.floating)):
        return lib.grad(fn, argnums=tuple(range(len(args))))(*args)
    return lib.vjp(fn, *args)[1](ct)


def _params():
    for group, entries in GROUPS.items():
        for name, fn, specs, *options in entries:
            opts = options[0] if options else {}
            yield pytest.param(name, fn, specs, opts.get("rtol", RTOL), id=f"{group}/{name}",
                               marks=opts.get("marks", ()))


@pytest.mark.parametrize(("name", "fn", "specs", "rtol"), list(_params()))
def test_corpus(name, fn, specs, rtol):
    """One compiled program computes both libraries' derivatives of one function."""
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    args = tree_util.tree_map(jnp.asarray, tuple(spec(rng) for spec in specs))
    tangents = random_like(args, rng)

    def both(args, tangents):
        jvps = [lib.jvp(fn, args, tangents) for lib in (jax, fungrad)]
        # Drawn here, where the output's shape is known: a constant of the program.
        ct = random_like(tree_util.tree_map(lambda y: np.zeros(y.shape, y.dtype), jvps[0][0]),
                         rng)
        return [{"jvp": jvp, "vjp": _pullback(lib, fn, args, ct)}
                for lib, jvp in zip((jax, fungrad), jvps, strict=True)]

    expected, actual = _compiled(both, args, tangents)(args, tangents)
    expected_leaves, expected_tree = tree_util.tree_flatten_with_path(expected)
    actual_leaves, actual_tree = tree_util.tree_flatten(actual)
    assert actual_tree == expected_tree
    for (path, e), a in zip(expected_leaves, actual_leaves, strict=True):
        assert_close(a, e, rtol=rtol, atol=rtol, err_msg=tree_util.keystr(path))


def test_corpus_names_are_unique():
    names = [f"{group}/{e[0]}" for group, entries in GROUPS.items() for e in entries]
    assert len(set(names)) == len(names)
