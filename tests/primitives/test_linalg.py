"""The linear-algebra family: a spec table per primitive checked against jax, then a corpus.

Every case goes through `check_all` (jvp, vjp, jit, second order where jax has it, and
float64 finite differences) on well-conditioned random inputs: symmetric positive
definite matrices for cholesky, diagonally dominant triangles for the solves, Gaussian
matrices (distinct eigenvalues and singular values almost surely) for the rest.
Eigenvectors and singular vectors of complex matrices are only fixed up to a phase, so
those cases differentiate phase-invariant functions of them. The corpus at the end runs
jnp.linalg and jax.scipy.linalg functions built on these primitives.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
import numpy as np
import pytest
from jax import lax

import fungrad
from tests.harness import assert_close, check_all, check_jvp, random_like

Make = Callable[[np.random.Generator, str], tuple[Any, ...]]


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    fun: Callable[..., Any]
    make: Make
    dtype: str
    order: int = 1
    fd: bool = True


def _cast(x: np.ndarray, dtype: str) -> np.ndarray:
    return np.asarray(x, dtype)


def gaussian(*shape: int) -> Make:
    def make(rng, dtype):
        x = rng.standard_normal(shape)
        if np.issubdtype(dtype, np.complexfloating):
            x = x + 1j * rng.standard_normal(shape)
        return (_cast(x, dtype),)
    return make


def spd(*shape: int) -> Make:
    """Hermitian positive definite, eigenvalues well apart from 0."""
    def make(rng, dtype):
        (a,) = gaussian(*shape)(rng, dtype)
        a = a.astype(np.complex128 if np.iscomplexobj(a) else np.float64)
        return (_cast(a @ np.conj(np.swapaxes(a, -1, -2)) + shape[-1] * np.eye(shape[-1]), dtype),)
    return make


def triangular_system(a_shape: tuple[int, ...], b_shape: tuple[int, ...]) -> Make:
    """A matrix with a dominant diagonal (both triangles well conditioned), and a rhs."""
    def make(rng, dtype):
        (a,) = gaussian(*a_shape)(rng, dtype)
        (b,) = gaussian(*b_shape)(rng, dtype)
        return (_cast(a + 3 * np.eye(a_shape[-1]), dtype), b)
    return make


def tridiagonal_system(n: int, batch: tuple[int, ...], k: int) -> Make:
    def make(rng, dtype):
        dl, d, du = (gaussian(*batch, n)(rng, dtype)[0] for _ in range(3))
        (b,) = gaussian(*batch, n, k)(rng, dtype)
        return dl, _cast(d + 4, dtype), du, b
    return make


# --- functions of the primitives ------------------------------------------------------

def _ts(**params):
    return lambda a, b: lax.linalg.triangular_solve(a, b, **params)


def _qr(full_matrices, pivoting=False):
    return lambda x: lax.linalg.qr(x, full_matrices=full_matrices, pivoting=pivoting)


def _phase_free(v):
    """|v_ij|^2: unchanged when a column of v is multiplied by a phase."""
    return (v * jnp.conj(v)).real


def _eigh_phase_free(x):
    v, w = lax.linalg.eigh(x)
    return _phase_free(v), w


def _svd(full_matrices=False):
    return lambda x: lax.linalg.svd(x, full_matrices=full_matrices)


def _svd_phase_free(x):
    u, s, vh = lax.linalg.svd(x, full_matrices=False)
    return _phase_free(u), s, _phase_free(vh)


def _eigvals(x):
    return lax.linalg.eig(x, compute_left_eigenvectors=False, compute_right_eigenvectors=False)[0]


def _eig(left):
    return lambda x: lax.linalg.eig(x, compute_left_eigenvectors=left, enable_eigvec_derivs=True)


F32, F64, C64, C128 = "float32", "float64", "complex64", "complex128"

CASES = [
    # cholesky (lax.linalg.cholesky symmetrizes its input)
    Case("cholesky_3x3", lax.linalg.cholesky, spd(3, 3), F64, order=2),
    Case("cholesky_batch", lax.linalg.cholesky, spd(2, 3, 3), F32),
    Case("cholesky_1x1", lax.linalg.cholesky, spd(1, 1), F64),
    Case("cholesky_complex", lax.linalg.cholesky, spd(3, 3), C128),
    # triangular_solve: each flag on and off, both sides, both orders of its products
    Case("trsm_left_lower", _ts(left_side=True, lower=True), triangular_system((3, 3), (3, 2)),
         F64, order=2),
    Case("trsm_left_upper_T_unit", _ts(left_side=True, transpose_a=True, unit_diagonal=True),
         triangular_system((3, 3), (3, 4)), F32),
    Case("trsm_right_lower_T_conj", _ts(lower=True, transpose_a=True, conjugate_a=True),
         triangular_system((3, 3), (2, 3)), C128, order=2),
    Case("trsm_right_upper_unit", _ts(unit_diagonal=True), triangular_system((3, 3), (4, 3)), F64),
    Case("trsm_left_all_flags_batch", _ts(left_side=True, lower=True, transpose_a=True,
                                          conjugate_a=True, unit_diagonal=True),
         triangular_system((2, 3, 3), (2, 3, 1)), C64),
    Case("trsm_1x1", _ts(left_side=True), triangular_system((1, 1), (1, 2)), F64),
    # lu: the integer pivots and permutation get zero tangents
    Case("lu_3x3", lax.linalg.lu, gaussian(3, 3), F64, order=2),
    Case("lu_wide", lax.linalg.lu, gaussian(3, 4), F32),
    Case("lu_tall", lax.linalg.lu, gaussian(4, 3), F64),
    Case("lu_complex", lax.linalg.lu, gaussian(3, 3), C128),
    Case("lu_complex_wide_batch", lax.linalg.lu, gaussian(2, 3, 4), C64),
    # qr: thin and full, tall, square and wide, with and without column pivoting
    Case("qr_thin_tall", _qr(False), gaussian(4, 3), F64, order=2),
    Case("qr_full_tall", _qr(True), gaussian(4, 3), F64, order=2),
    Case("qr_full_tall_batch", _qr(True), gaussian(2, 4, 3), F32),
    Case("qr_wide", _qr(True), gaussian(3, 4), F64, order=2),
    Case("qr_complex_thin_tall", _qr(False), gaussian(4, 3), C128),
    Case("qr_complex_full_tall", _qr(True), gaussian(4, 3), C64),
    Case("qr_complex_wide", _qr(False), gaussian(3, 4), C128),
    Case("qr_pivoting_tall", _qr(False, pivoting=True), gaussian(4, 3), F64),
    Case("qr_pivoting_full_tall", _qr(True, pivoting=True), gaussian(4, 3), F32),
    Case("qr_pivoting_square_complex", _qr(True, pivoting=True), gaussian(3, 3), C128),
    # eigh (lax.linalg.eigh symmetrizes its input)
    Case("eigh_3x3", lax.linalg.eigh, gaussian(3, 3), F64, order=2),
    Case("eigh_upper_batch", lambda x: lax.linalg.eigh(x, lower=False), gaussian(2, 3, 3), F32),
    Case("eigh_1x1", lax.linalg.eigh, gaussian(1, 1), F64),
    Case("eigh_complex", _eigh_phase_free, gaussian(3, 3), C128),
    Case("eigh_complex_batch", _eigh_phase_free, gaussian(2, 3, 3), C64),
    # svd
    Case("svd_values_tall", lambda x: lax.linalg.svd(x, compute_uv=False), gaussian(4, 3), F64),
    Case("svd_values_wide_batch", lambda x: lax.linalg.svd(x, compute_uv=False),
         gaussian(2, 3, 4), F32),
    Case("svd_tall", _svd(), gaussian(4, 3), F64, order=2),
    Case("svd_wide", _svd(), gaussian(3, 4), F64),
    Case("svd_square_full_matrices_batch", _svd(True), gaussian(2, 3, 3), F32),
    Case("svd_1x1", _svd(), gaussian(1, 1), F64),
    Case("svd_complex_tall", _svd_phase_free, gaussian(4, 3), C128),
    Case("svd_complex_wide", _svd_phase_free, gaussian(3, 4), C64),
    # eig (jax has no second derivative of eigenvalues alone: see test_eig_errors)
    Case("eigvals", _eigvals, gaussian(3, 3), F64),
    Case("eigvals_batch", _eigvals, gaussian(2, 3, 3), F32),
    Case("eigvals_complex", _eigvals, gaussian(3, 3), C128),
    Case("eig_right", _eig(False), gaussian(3, 3), F64, order=2),
    Case("eig_left_right", _eig(True), gaussian(3, 3), F64),
    Case("eig_complex", _eig(True), gaussian(3, 3), C128),
    # tridiagonal_solve: linear in b
    Case("tridiagonal_solve", lax.linalg.tridiagonal_solve, tridiagonal_system(4, (), 2), F64,
         order=2),
    Case("tridiagonal_solve_batch", lax.linalg.tridiagonal_solve, tridiagonal_system(3, (2,), 1),
         F32),
    Case("tridiagonal_solve_complex", lax.linalg.tridiagonal_solve, tridiagonal_system(3, (), 2),
         C128),
    Case("tridiagonal_solve_1", lax.linalg.tridiagonal_solve, tridiagonal_system(1, (), 1), F64),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.name}-{c.dtype}")
def test_primitive(case):
    rng = np.random.default_rng(len(case.name))
    check_all(case.fun, case.make(rng, case.dtype), order=case.order, fd=case.fd)


# --- conventions and errors -----------------------------------------------------------

def test_tangent_wrt_one_argument_of_a_solve():
    """Zero tangents for one argument (and cotangents flowing into one) stay symbolic."""
    a, b = triangular_system((3, 3), (3, 2))(np.random.default_rng(0), F64)
    solve = _ts(left_side=True, lower=True)
    for f, x in ((lambda a_: solve(a_, b), a), (lambda b_: solve(a, b_), b)):
        check_all(f, (x,), order=1, jit=False)
    dl, d, du, rhs = tridiagonal_system(4, (), 2)(np.random.default_rng(1), F64)
    check_all(lambda d_: lax.linalg.tridiagonal_solve(dl, d_, du, rhs), (d,), order=1, jit=False)


def test_eigh_repeated_eigenvalues_follow_jax():
    """At repeated eigenvalues jax's eigenvector tangents are infinite or NaN; so are ours."""
    x = np.diag([1.0, 1.0, 2.0])
    check_jvp(lax.linalg.eigh, (x,), np.random.default_rng(0))
    dw_f = fungrad.jvp(lambda x: lax.linalg.eigh(x)[1], (x,), (np.eye(3),))[1]
    dw_j = jax.jvp(lambda x: lax.linalg.eigh(x)[1], (x,), (np.eye(3),))[1]
    assert_close(dw_f, dw_j)
    assert np.all(np.isfinite(dw_f))


def test_svd_repeated_singular_values_follow_jax():
    x = np.diag([2.0, 2.0, 1.0])
    check_jvp(_svd(), (x,), np.random.default_rng(0))


def test_qr_pivoting_wide_against_the_permuted_matrix():
    """For m < n with pivoting, X P = Q R. jax's own rule uses X instead of X P for
    R's last columns (its jvp disagrees with finite differences), so the reference here is
    jax's derivative of the unpivoted QR of X P, with P held fixed, as it is locally."""
    x = gaussian(3, 4)(np.random.default_rng(0), F64)[0]
    perm = lax.linalg.qr(x, pivoting=True)[2]
    t = random_like(x, np.random.default_rng(1))
    for full_matrices in (True, False):
        f = _qr(full_matrices, pivoting=True)
        ref = jax.jvp(lambda x: _qr(full_matrices)(x[:, perm]), (x,), (t,))
        out, out_dot = fungrad.jvp(f, (x,), (t,))
        assert_close(out[:2], ref[0], rtol=1e-12, atol=1e-12)
        assert_close(out_dot[:2], ref[1], rtol=1e-10, atol=1e-10)
        eps = 1e-6
        fd = [(a - b) / (2 * eps) for a, b in zip(f(x + eps * t)[:2], f(x - eps * t)[:2], strict=True)]
        assert_close(out_dot[:2], tuple(fd), rtol=1e-5, atol=1e-5)
        ct = random_like(out[:2], np.random.default_rng(2))
        expected = jax.vjp(lambda x: _qr(full_matrices)(x[:, perm]), x)[1](ct)
        actual = fungrad.vjp(lambda x: f(x)[:2], x)[1](ct)
        assert_close(actual, expected, rtol=1e-10, atol=1e-10)


def test_eig_errors():
    x = gaussian(3, 3)(np.random.default_rng(0), F64)[0]
    with pytest.raises(NotImplementedError, match="enable_eigvec_derivs=True"):
        fungrad.jvp(lambda x: jnp.linalg.eig(x)[1], (x,), (x,))
    # jax has no second derivative of the eigenvalues alone either.
    with pytest.raises(NotImplementedError):
        jax.hessian(lambda x: _eigvals(x).real.sum())(x)
    with pytest.raises(NotImplementedError, match="enable_eigvec_derivs=True"):
        fungrad.hessian(lambda x: _eigvals(x).real.sum())(x)


def test_svd_full_matrices_of_a_rectangle_is_an_error():
    x = gaussian(4, 3)(np.random.default_rng(0), F64)[0]
    with pytest.raises(NotImplementedError, match="full_matrices=False"):
        fungrad.jvp(_svd(True), (x,), (x,))


@pytest.mark.parametrize("fun", [
    lambda x: lax.linalg.schur(x)[0],
    lax.linalg.hessenberg,
    lambda x: lax.linalg.tridiagonal(x + x.T)[0],
], ids=["schur", "hessenberg", "tridiagonal"])
def test_no_rule_where_jax_has_none(fun):
    x = gaussian(3, 3)(np.random.default_rng(0), F64)[0]
    with pytest.raises(NotImplementedError):
        jax.jvp(fun, (x,), (x,))
    with pytest.raises(NotImplementedError, match="jax has no derivative for it either. Use"):
        fungrad.jvp(fun, (x,), (x,))


# --- householder_product: jax has no derivative; against jax's of a plain jnp product ---

def _householder_reference(a, taus):
    """H_1 ... H_k I[:, :n] in jnp, H_i = I - tau_i v_i v_i^H, v_i column i of `a` below
    the diagonal with a 1 on it (LAPACK's orgqr / ungqr)."""
    m, n = a.shape[-2:]
    v = jnp.tril(a, -1) + jnp.eye(m, n, dtype=a.dtype)
    x = jnp.broadcast_to(jnp.eye(m, n, dtype=a.dtype), a.shape)
    for i in reversed(range(taus.shape[-1])):
        v_i = v[..., :, i]
        w = jnp.einsum("...m,...mn->...n", jnp.conj(v_i), x)
        x = x - taus[..., i, None, None] * v_i[..., :, None] * w[..., None, :]
    return x


def reflectors(*shape: int) -> Make:
    """`a` of shape (..., m, n) and `taus` of shape (..., k): shape is (..., m, n, k)."""
    def make(rng, dtype):
        *batch, m, n, k = shape
        return gaussian(*batch, m, n)(rng, dtype) + gaussian(*batch, k)(rng, dtype)
    return make


def from_hessenberg(n: int) -> Make:
    """The n - 1 reflectors jax.scipy.linalg.hessenberg turns into Q (an orthogonal one)."""
    def make(rng, dtype):
        a, taus = lax.linalg.hessenberg(gaussian(n, n)(rng, dtype)[0])
        return np.asarray(a)[1:, :-1], np.asarray(taus)
    return make


HOUSEHOLDER = [  # m > n > k; m = n = k; k = 0; k = 1 with a batch dimension; complex
    Case("tall", lax.linalg.householder_product, reflectors(5, 4, 3), F64, order=2),
    Case("square_from_hessenberg", lax.linalg.householder_product, from_hessenberg(4), F32),
    Case("no_reflectors", lax.linalg.householder_product, reflectors(4, 3, 0), F64),
    Case("one_reflector_batch", lax.linalg.householder_product, reflectors(2, 4, 3, 1), F32),
    Case("complex", lax.linalg.householder_product, reflectors(4, 3, 2), C128),
]


@pytest.mark.parametrize("case", HOUSEHOLDER, ids=lambda c: f"{c.name}-{c.dtype}")
def test_householder_product(case):
    args = case.make(np.random.default_rng(len(case.name)), case.dtype)
    check_all(case.fun, args, ref=_householder_reference, order=case.order)


def test_householder_product_one_argument():
    """Tangents of `a` alone or `taus` alone (the other symbolically zero)."""
    a, taus = reflectors(4, 3, 2)(np.random.default_rng(0), F64)
    hp = lax.linalg.householder_product
    check_all(lambda a: hp(a, taus), (a,), ref=lambda a: _householder_reference(a, taus), order=1)
    check_all(lambda t: hp(a, t), (taus,), ref=lambda t: _householder_reference(a, t), order=1)


# --- corpus: jnp.linalg and jax.scipy.linalg ------------------------------------------

def _lu_solve(a, b):
    return jsl.lu_solve(jsl.lu_factor(a), b)


def _cho_solve(a, b):
    # cho_factor reads one triangle: differentiate along symmetric directions only.
    return jsl.cho_solve(jsl.cho_factor((a + a.T) / 2), b)


def _svd_reconstruct(x):
    u, s, vh = jnp.linalg.svd(x, full_matrices=False)
    return (u * s) @ vh, s


def _eigh_projector(x):
    w, v = jnp.linalg.eigh(x)
    return w, v[:, :1] @ jnp.conj(v[:, :1]).T


def _qr_product(x):
    q, r = jnp.linalg.qr(x)
    return q @ r, jnp.abs(jnp.diagonal(r))


CORPUS = [
    # name, function, arguments, dtype, all checks (else: no jit or second order)
    ("solve", jnp.linalg.solve, lambda r, d: (gaussian(3, 3)(r, d)[0], gaussian(3, 2)(r, d)[0]),
     F64, True),
    ("solve_vector_batch", jnp.linalg.solve,
     lambda r, d: (gaussian(2, 3, 3)(r, d)[0], gaussian(3)(r, d)[0]), F32, False),
    ("inv", jnp.linalg.inv, gaussian(3, 3), F64, False),
    ("det", jnp.linalg.det, gaussian(3, 3), F64, True),
    ("det_complex", jnp.linalg.det, gaussian(3, 3), C128, False),
    ("slogdet", lambda x: jnp.linalg.slogdet(x)[1], gaussian(2, 3, 3), F32, False),
    ("pinv", jnp.linalg.pinv, gaussian(4, 3), F64, False),
    ("lstsq", lambda a, b: jnp.linalg.lstsq(a, b)[0],
     lambda r, d: (gaussian(4, 3)(r, d)[0], gaussian(4, 2)(r, d)[0]), F64, False),
    ("norm_fro", lambda x: jnp.linalg.norm(x, "fro"), gaussian(3, 4), F64, False),
    ("norm_2", lambda x: jnp.linalg.norm(x, 2), gaussian(3, 4), F64, True),
    ("norm_nuc", lambda x: jnp.linalg.norm(x, "nuc"), gaussian(4, 3), F32, False),
    ("matrix_power", lambda x: jnp.linalg.matrix_power(x, 3), gaussian(3, 3), F64, False),
    ("matrix_power_negative", lambda x: jnp.linalg.matrix_power(x, -2), gaussian(3, 3), F64,
     False),
    ("expm", jsl.expm, lambda r, d: (0.5 * gaussian(3, 3)(r, d)[0],), F64, False),
    ("cho_solve", _cho_solve, lambda r, d: (spd(3, 3)(r, d)[0], gaussian(3, 2)(r, d)[0]), F64,
     False),
    ("lu_solve", _lu_solve, lambda r, d: (gaussian(3, 3)(r, d)[0], gaussian(3, 2)(r, d)[0]), F64,
     False),
    ("solve_triangular", lambda a, b: jsl.solve_triangular(a, b, lower=True),
     triangular_system((3, 3), (3, 2)), F32, False),
    ("cholesky", jnp.linalg.cholesky, spd(3, 3), F32, False),
    ("eigvalsh", jnp.linalg.eigvalsh, gaussian(3, 3), F64, False),
    ("eigvals", jnp.linalg.eigvals, gaussian(3, 3), F64, False),
    ("svd_reconstruct", _svd_reconstruct, gaussian(3, 4), F64, False),
    ("eigh_projector", _eigh_projector, spd(3, 3), C128, False),
    ("qr_product", _qr_product, gaussian(4, 3), F64, False),
]


@pytest.mark.parametrize("name, fun, make, dtype, full", CORPUS, ids=[c[0] for c in CORPUS])
def test_corpus(name, fun, make, dtype, full):
    del name
    args = make(np.random.default_rng(0), dtype)
    check_all(fun, args, order=2 if full else 1, jit=full)
