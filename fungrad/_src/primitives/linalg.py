"""Matrix decompositions and solves: cholesky, triangular_solve, lu, qr, eigh, svd, eig, ...

The rules follow jax's derivatives and conventions (jax/_src/lax/linalg.py), including
what happens at degenerate points: repeated eigenvalues or singular values give
infinities or NaNs, as in jax. Everything works on leading batch dimensions.

Slicing, padding and permuting the last two dimensions is done here with one-hot
matrix products (`_window`, `_permutation_matrix`): exact in floating point, and it
keeps every rule's linear part inside `dot_general`, `select_n` and the solves, whose
derivatives and transposes are simple. jax's own primitives without derivatives
(hessenberg, schur, tridiagonal) have none here either; householder_product, which jax
cannot differentiate, has one here (a scan over its reflectors).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from jax import lax

from fungrad._src import rules
from fungrad._src.jaxutil import internal_prims
from fungrad._src.jaxutil import prims as p
from fungrad._src.rules import defjvp2, is_undefined, jvp_rules, transpose_rules
from fungrad._src.zeros import Zero, add_tangents, instantiate, is_zero

_HIGHEST = lax.Precision.HIGHEST


# --- helpers on the last two dimensions ------------------------------------------------

def _is_complex(x: Any) -> bool:
    return np.issubdtype(x.dtype, np.complexfloating)


def _conj(x):
    return lax.conj(x) if _is_complex(x) else x


def _real(x):
    return lax.real(x) if _is_complex(x) else x


def _mT(x):
    return lax.transpose(x, (*range(x.ndim - 2), x.ndim - 1, x.ndim - 2))


def _H(x):
    return _conj(_mT(x))


def _batched(x, batch: tuple[int, ...]):
    """`x` with leading dimensions `batch` (a plain matrix is broadcast over them)."""
    x_batch = tuple(np.shape(x)[:-2])
    if x_batch == batch:
        return x
    assert not x_batch, f"batch dimensions {x_batch} and {batch} differ"
    nb = len(batch)
    return lax.broadcast_in_dim(x, (*batch, *np.shape(x)[-2:]), (nb, nb + 1))


def _mm(a, b, precision: Any = _HIGHEST):
    """Matrix product over the last two dimensions, batched over the leading ones."""
    batch = max(tuple(np.shape(a)[:-2]), tuple(np.shape(b)[:-2]), key=len)
    a, b = _batched(a, batch), _batched(b, batch)
    nb = len(batch)
    dims = (((nb + 1,), (nb,)), (tuple(range(nb)), tuple(range(nb))))
    return lax.dot_general(a, b, dims, precision=precision)


def _mask(x, mask: np.ndarray):
    """`x` where the matrix `mask` is set, 0 elsewhere (select: no NaN leaks from 0 * inf)."""
    nd = x.ndim
    which = lax.broadcast_in_dim(mask, x.shape, (nd - 2, nd - 1))
    return lax.select(which, x, lax.full_like(x, 0))


def _tril(x, k: int = 0):
    return _mask(x, np.tri(x.shape[-2], x.shape[-1], k, dtype=bool))


def _triu(x, k: int = 0):
    return _mask(x, ~np.tri(x.shape[-2], x.shape[-1], k - 1, dtype=bool))


def _eye_like(x):
    """Identity matrices shaped like the square matrices `x` (batch dimensions included)."""
    return _batched(np.eye(x.shape[-1], dtype=x.dtype), tuple(x.shape[:-2]))


def _diag_part(x):
    """The diagonal of square matrices: (..., n, n) -> (..., n)."""
    return lax.reduce_sum(_mask(x, np.eye(x.shape[-1], dtype=bool)), (x.ndim - 1,))


def _diag_matrix(s):
    """Square matrices with diagonal `s`: (..., n) -> (..., n, n)."""
    n = s.shape[-1]
    rows = lax.broadcast_in_dim(s, (*s.shape, n), (*range(s.ndim - 1), s.ndim))
    return _mask(rows, np.eye(n, dtype=bool))


def _along_rows(s, rows: int):
    """(..., k) -> (..., rows, k): entry [i, j] is s[j]."""
    return lax.broadcast_in_dim(s, (*s.shape[:-1], rows, s.shape[-1]),
                                (*range(s.ndim - 1), s.ndim))


def _along_cols(s, cols: int):
    """(..., k) -> (..., k, cols): entry [i, j] is s[i]."""
    return lax.broadcast_in_dim(s, (*s.shape, cols), tuple(range(s.ndim)))


def _window(x, r0: int, rows: int, c0: int, cols: int):
    """`out[i, j] = x[r0 + i, c0 + j]`, zero where that is outside `x`.

    Crops or pads (negative offsets) the last two dimensions with one-hot products.
    """
    xr, xc = x.shape[-2:]
    if (r0, rows) != (0, xr):
        x = _mm(np.eye(rows, xr, k=r0, dtype=x.dtype), x)
    if (c0, cols) != (0, xc):
        x = _mm(x, np.eye(xc, cols, k=-c0, dtype=x.dtype))
    return x


def _permutation_matrix(perm, dtype: Any):
    """One-hot (..., n, n) matrix P with P[i, j] = (perm[i] == j), so P @ b = b[perm]."""
    n = perm.shape[-1]
    shape = (*perm.shape, n)
    rows = lax.broadcast_in_dim(perm, shape, tuple(range(perm.ndim)))
    cols = lax.broadcasted_iota(perm.dtype, shape, perm.ndim)
    return lax.convert_element_type(lax.eq(rows, cols), dtype)


def _trsm(a, b, *, left_side: bool = False, lower: bool = False, transpose_a: bool = False,
          conjugate_a: bool = False, unit_diagonal: bool = False):
    return p.triangular_solve_p.bind(
        a, b, left_side=left_side, lower=lower, transpose_a=transpose_a,
        conjugate_a=conjugate_a and _is_complex(a), unit_diagonal=unit_diagonal)


def _lu_solve(lu, perm, b):
    """`A^{-1} b` from `lu, perm` = the LU factorization of A (P A = L U)."""
    x = _mm(_permutation_matrix(perm, b.dtype), b)
    x = _trsm(lu, x, left_side=True, lower=True, unit_diagonal=True)
    return _trsm(lu, x, left_side=True, lower=False)


def _lu_solve_adjoint(lu, perm, b):
    """`A^{-H} b` from `lu, perm` = the LU factorization of A (A^H = U^H L^H P)."""
    x = _trsm(lu, b, left_side=True, lower=False, transpose_a=True, conjugate_a=True)
    x = _trsm(lu, x, left_side=True, lower=True, unit_diagonal=True, transpose_a=True,
              conjugate_a=True)
    return _mm(_mT(_permutation_matrix(perm, b.dtype)), x)


def _solve(a, b):
    lu, _, perm = p.lu_p.bind(a)
    return _lu_solve(lu, perm, b)


def _inverse_gaps(w, dtype: Any):
    """F[i, j] = 1 / (w_j - w_i) off the diagonal, 0 on it (inf where eigenvalues repeat)."""
    n = w.shape[-1]
    w_row = _along_rows(lax.convert_element_type(w, dtype), n)
    eye = _eye_like(w_row)
    gaps = lax.sub(lax.add(eye, w_row), _along_cols(lax.convert_element_type(w, dtype), n))
    return lax.sub(lax.integer_pow(gaps, -1), eye)


def _scalar(x, value):
    return lax.full_like(x, value, shape=())


# --- cholesky -------------------------------------------------------------------------

def _cholesky_jvp(primals, tangents):
    (x,), (x_dot,) = primals, tangents
    L = _tril(p.cholesky_p.bind(x))
    tmp = _trsm(L, x_dot, left_side=False, lower=True, transpose_a=True, conjugate_a=True)
    inner = _trsm(L, tmp, left_side=True, lower=True)  # L^{-1} dA L^{-H}
    n = x.shape[-1]
    half_diagonal = np.where(np.eye(n, dtype=bool), 0.5, 1.0).astype(x.dtype)
    phi = lax.mul(_tril(inner), lax.broadcast_in_dim(half_diagonal, inner.shape,
                                                      (inner.ndim - 2, inner.ndim - 1)))
    return L, _mm(L, phi)


jvp_rules[p.cholesky_p] = _cholesky_jvp  # dL = L phi(L^{-1} dA L^{-H}), phi: tril, halved diagonal


# --- triangular_solve: linear in b ----------------------------------------------------

def _triangular_solve_jvp_a(g_a, ans, a, b, *, left_side, lower, transpose_a, conjugate_a,
                            unit_diagonal):
    del b
    k = 1 if unit_diagonal else 0
    g_a = lax.neg(_tril(g_a, -k) if lower else _triu(g_a, k))
    g_a = _mT(g_a) if transpose_a else g_a
    g_a = _conj(g_a) if conjugate_a else g_a
    params = dict(left_side=left_side, lower=lower, transpose_a=transpose_a,
                  conjugate_a=conjugate_a, unit_diagonal=unit_diagonal)
    m, n = ans.shape[-2:]
    # Whichever order is cheaper: the solve costs about what a product does.
    if left_side:
        if m > n:
            return _trsm(a, _mm(g_a, ans), **params)  # A^{-1} (dA X)
        return _mm(_trsm(a, g_a, **params), ans)  # (A^{-1} dA) X
    if m < n:
        return _trsm(a, _mm(ans, g_a), **params)  # (X dA) A^{-1}
    return _mm(ans, _trsm(a, g_a, **params))  # X (dA A^{-1})


def _triangular_solve_transpose(ct, a, b, *, left_side, lower, transpose_a, conjugate_a,
                                unit_diagonal):
    assert not is_undefined(a) and is_undefined(b), "triangular_solve is linear in b only"
    return [None, _trsm(a, ct, left_side=left_side, lower=lower, transpose_a=not transpose_a,
                        conjugate_a=conjugate_a, unit_diagonal=unit_diagonal)]


defjvp2(p.triangular_solve_p,  # X = op(A)^{-1} B: dX = -op(A)^{-1} op(dA) X + op(A)^{-1} dB
        _triangular_solve_jvp_a,
        lambda g_b, ans, a, b, **params: _trsm(a, g_b, **params))
transpose_rules[p.triangular_solve_p] = _triangular_solve_transpose


# --- lu -------------------------------------------------------------------------------

def _lu_factors(lu):
    """Square L (m x m, unit lower) and U (n x n, upper) from the packed (m x n) `lu`."""
    m, n = lu.shape[-2:]
    k = min(m, n)
    l_part = _tril(_window(lu, 0, m, 0, m), -1)
    lower = lax.add(l_part, _eye_like(l_part))
    u_eye = np.diag((np.arange(n) >= k).astype(lu.dtype))
    upper = lax.add(_triu(_window(lu, 0, n, 0, n)), _batched(u_eye, tuple(lu.shape[:-2])))
    return lower, upper


def _lu_jvp(primals, tangents):
    (a,), (a_dot,) = primals, tangents
    lu, pivots, perm = p.lu_p.bind(a)
    lower, upper = _lu_factors(lu)
    la = _trsm(lower, _mm(_permutation_matrix(perm, a.dtype), a_dot), left_side=True, lower=True,
               unit_diagonal=True)
    lau = _trsm(upper, la, left_side=False, lower=False)  # L^{-1} P dA U^{-1}
    lu_dot = lax.add(_mm(lower, _tril(lau, -1)), _mm(_triu(lau), upper))
    return [lu, pivots, perm], [lu_dot, Zero.like(pivots), Zero.like(perm)]


jvp_rules[p.lu_p] = _lu_jvp  # dL = L tril(X, -1), dU = triu(X) U, X = L^{-1} P dA U^{-1}


# --- qr -------------------------------------------------------------------------------

def _thin_qr_jvp(q, r, dx):
    """dQ, dR of X = QR for m >= n, with Q m x n and R n x n."""
    dx_rinv = _trsm(r, dx)  # dX R^{-1}
    qt_dx_rinv = _mm(_H(q), dx_rinv, None)
    lower = _tril(qt_dx_rinv, -1)
    do = lax.sub(lower, _H(lower))  # skew-Hermitian part of Q^H dQ
    if _is_complex(qt_dx_rinv):  # and the imaginary diagonal
        imag_part = lax.sub(qt_dx_rinv, lax.convert_element_type(lax.real(qt_dx_rinv),
                                                                 qt_dx_rinv.dtype))
        do = lax.add(do, _mask(imag_part, np.eye(r.shape[-1], dtype=bool)))
    dq = lax.add(_mm(q, lax.sub(do, qt_dx_rinv), None), dx_rinv)
    dr = _mm(lax.sub(qt_dx_rinv, do), r, None)
    return dq, dr


def _wide_qr_jvp(q, r, x, dx):
    """m < n: the square block X1 = Q R1 as above, and R2 = Q^H X2."""
    m, n = x.shape[-2:]
    dq, dr1 = _thin_qr_jvp(q, _window(r, 0, m, 0, m), _window(dx, 0, m, 0, m))
    x2, dx2 = _window(x, 0, m, m, n - m), _window(dx, 0, m, m, n - m)
    dr2 = lax.add(_mm(_H(dq), x2, None), _mm(_H(q), dx2, None))
    return dq, lax.add(_window(dr1, 0, m, 0, n), _window(dr2, 0, m, -m, n))


def _full_qr_jvp(q, r, dx):
    """m > n with full_matrices: the thin rule, then the last m - n columns of Q."""
    m, n = dx.shape[-2:]
    q_mn = _window(q, 0, m, 0, n)
    dq_mn, dr_nn = _thin_qr_jvp(q_mn, _window(r, 0, n, 0, n), dx)
    q_nn, q_pn = _window(q_mn, 0, n, 0, n), _window(q_mn, n, m - n, 0, n)
    q_mp = _window(q, 0, m, n, m - n)
    dq_nn, dq_pn = _window(dq_mn, 0, n, 0, n), _window(dq_mn, n, m - n, 0, n)
    # Z = Q_pn (Q_nn - I)^{-1}, through a solve with (Q_nn - I)^H.
    lu, _, perm = p.lu_p.bind(lax.sub(q_nn, _eye_like(q_nn)))
    z_h = _lu_solve_adjoint(lu, perm, _H(q_pn))
    z = _H(z_h)
    dq_mp = lax.sub(_mm(dq_mn, z_h, None),
                    _mm(lax.add(q_mn, _mm(q_mp, z, None)),
                        _H(lax.sub(dq_pn, _mm(z, dq_nn, None))), None))
    dq = lax.add(_window(dq_mn, 0, m, 0, m), _window(dq_mp, 0, m, -n, m))
    return dq, _window(dr_nn, 0, m, 0, n)


def _qr_jvp(primals, tangents, *, pivoting, full_matrices, use_magma):
    (x,), (dx,) = primals, tangents
    q, r, *piv = p.qr_p.bind(x, pivoting=pivoting, full_matrices=full_matrices,
                             use_magma=use_magma)
    m, n = x.shape[-2:]
    if pivoting:  # X P = Q R: differentiate in the permuted columns
        columns = _mT(_permutation_matrix(piv[0], x.dtype))
        x, dx = _mm(x, columns), _mm(dx, columns)
    if m < n:
        dq, dr = _wide_qr_jvp(q, r, x, dx)
    elif full_matrices and m > n:
        dq, dr = _full_qr_jvp(q, r, dx)
    else:
        dq, dr = _thin_qr_jvp(q, r, dx)
    return [q, r, *piv], [dq, dr, *(Zero.like(v) for v in piv)]


jvp_rules[p.qr_p] = _qr_jvp  # dQ = Q (dO - Q^H dX R^{-1}) + dX R^{-1}, dR = (Q^H dX R^{-1} - dO) R


# --- eigh -----------------------------------------------------------------------------

def _eigh_jvp(primals, tangents, *, lower, sort_eigenvalues, subset_by_index, algorithm):
    (a,), (a_dot,) = primals, tangents
    n = a.shape[-1]
    if subset_by_index not in (None, (0, n)):
        raise NotImplementedError(
            "fungrad cannot differentiate eigh with subset_by_index (a partial "
            "eigendecomposition); jax has no derivative for it either. Compute all "
            "eigenvalues to differentiate.")
    symmetric = lax.div(lax.add(a, _H(a)), _scalar(a, 2))
    v, w_real = p.eigh_p.bind(symmetric, lower=lower, sort_eigenvalues=sort_eigenvalues,
                              subset_by_index=subset_by_index, algorithm=algorithm)
    w = lax.convert_element_type(w_real, a.dtype)
    vdag_adot_v = _mm(_mm(_H(v), a_dot), v)
    dv = _mm(v, lax.mul(_inverse_gaps(w, a.dtype), vdag_adot_v))
    dw = _diag_part(_real(vdag_adot_v))
    return [v, w_real], [dv, dw]


jvp_rules[p.eigh_p] = _eigh_jvp  # dw = diag(V^H dA V), dV = V (F * V^H dA V), F = 1/(w_j - w_i)


# --- svd ------------------------------------------------------------------------------

def _svd_vectors_jvp(s, u, vt, a_dot, ds_mat):
    """dU and dV^H of the thin SVD from dS = U^H dA V."""
    m, n = a_dot.shape[-2:]
    k = s.shape[-1]
    dtype = u.dtype
    s_row, s_col = _along_rows(s, k), _along_cols(s, k)  # [i, j] = s_j, s_i
    eye = _eye_like(s_row)
    f = lax.convert_element_type(lax.sub(lax.div(
        lax.full_like(s_row, 1), lax.add(lax.mul(lax.add(s_row, s_col), lax.sub(s_row, s_col)),
                                         eye)), eye), dtype)  # 1 / (s_j^2 - s_i^2)
    dss = lax.mul(lax.convert_element_type(s_row, dtype), ds_mat)
    sds = lax.mul(lax.convert_element_type(s_col, dtype), ds_mat)
    inner_u = lax.mul(f, lax.add(dss, _H(dss)))
    if _is_complex(ds_mat):  # the imaginary diagonal of dS, split between U and V
        s_zero = lax.convert_element_type(lax.eq(s, _scalar(s, 0)), s.dtype)
        s_inv = lax.sub(lax.div(lax.full_like(s, 1), lax.add(s, s_zero)), s_zero)
        half_skew = lax.mul(_scalar(ds_mat, 0.5), lax.sub(ds_mat, _H(ds_mat)))
        inner_u = lax.add(inner_u, lax.mul(half_skew, lax.convert_element_type(
            _diag_matrix(s_inv), dtype)))
    v = _H(vt)
    du = _mm(u, inner_u)
    dv = _mm(v, lax.mul(f, lax.add(sds, _H(sds))))
    if m > n:  # the part of dA V outside the span of U
        da_v = _mm(a_dot, v)
        resid = lax.sub(da_v, _mm(u, _mm(_H(u), da_v)))
        du = lax.add(du, lax.div(resid, lax.convert_element_type(_along_rows(s, m), dtype)))
    if n > m:
        dah_u = _mm(_H(a_dot), u)
        resid = lax.sub(dah_u, _mm(v, _mm(vt, dah_u)))
        dv = lax.add(dv, lax.div(resid, lax.convert_element_type(_along_rows(s, n), dtype)))
    return du, _H(dv)


def _svd_jvp(primals, tangents, *, full_matrices, compute_uv, subset_by_index, algorithm):
    (a,), (a_dot,) = primals, tangents
    s, u, vt = p.svd_p.bind(a, full_matrices=False, compute_uv=True,
                            subset_by_index=subset_by_index, algorithm=algorithm)
    m, n = a.shape[-2:]
    if compute_uv and full_matrices and m != n:
        raise NotImplementedError(
            "fungrad cannot differentiate the singular vectors of svd with "
            "full_matrices=True for a non-square matrix (jax cannot either); pass "
            "full_matrices=False.")
    ds_mat = _mm(_mm(_H(u), a_dot), _H(vt))
    ds = _diag_part(_real(ds_mat))
    if not compute_uv:
        return [s], [ds]
    du, dvt = _svd_vectors_jvp(s, u, vt, a_dot, ds_mat)
    return [s, u, vt], [ds, du, dvt]


jvp_rules[p.svd_p] = _svd_jvp  # ds = diag Re(U^H dA V); dU, dV from F = 1/(s_j^2 - s_i^2)


# --- eig ------------------------------------------------------------------------------

def _eig_vectors_jvp(w, v, a_dot):
    """dw and dv for A v_j = w_j v_j, v_j normalized as LAPACK does (unit norm, and real
    largest-magnitude component), as in jax."""
    p_mat = _mm(_solve(v, a_dot), v)  # V^{-1} dA V
    dw = _diag_part(p_mat)
    du = _mm(v, lax.mul(_inverse_gaps(w, v.dtype), p_mat))
    rows = v.ndim - 2
    k = lax.argmax(lax.abs(v), rows, np.int32)
    at_max = lax.convert_element_type(
        lax.eq(lax.broadcasted_iota(np.int32, v.shape, rows),
               lax.broadcast_in_dim(k, v.shape, (*range(rows), rows + 1))), v.dtype)
    c_real = lax.neg(lax.real(lax.reduce_sum(lax.mul(lax.conj(v), du), (rows,))))
    c_imag = lax.neg(lax.div(lax.imag(lax.reduce_sum(lax.mul(at_max, du), (rows,))),
                             lax.real(lax.reduce_sum(lax.mul(at_max, v), (rows,)))))
    c = lax.complex(c_real, c_imag)
    return dw, lax.add(du, lax.mul(v, _along_rows(c, v.shape[-2])))


def _eig_jvp(primals, tangents, *, compute_left_eigenvectors, compute_right_eigenvectors,
             enable_eigvec_derivs, implementation):
    (a,), (a_dot,) = primals, tangents
    vectors = compute_left_eigenvectors or compute_right_eigenvectors
    if vectors and not enable_eigvec_derivs:
        raise NotImplementedError(
            "The derivatives of non-symmetric eigenvectors hold only under assumptions "
            "on the input that cannot be checked (see jax-ml/jax#2748). To differentiate "
            "them anyway, call jax.lax.linalg.eig(..., enable_eigvec_derivs=True); for "
            "eigenvalues alone use jnp.linalg.eigvals.")
    outs = p.eig_p.bind(a, compute_left_eigenvectors=compute_left_eigenvectors,
                        compute_right_eigenvectors=True,
                        enable_eigvec_derivs=enable_eigvec_derivs,
                        implementation=implementation)
    w, vr = outs[0], outs[-1]
    a_dot = lax.convert_element_type(a_dot, vr.dtype)
    if not vectors:  # dw_i = (V^{-1} dA V)_ii
        return [w], [lax.reduce_sum(lax.mul(_solve(vr, a_dot), _mT(vr)), (vr.ndim - 1,))]
    dw, dvr = _eig_vectors_jvp(w, vr, a_dot)
    primal_out, tangent_out = [w], [dw]
    if compute_left_eigenvectors:  # left eigenvectors: those of A^H, for conj(w)
        primal_out.append(outs[1])
        tangent_out.append(_eig_vectors_jvp(lax.conj(w), outs[1], _H(a_dot))[1])
    if compute_right_eigenvectors:
        primal_out.append(vr)
        tangent_out.append(dvr)
    return primal_out, tangent_out


jvp_rules[p.eig_p] = _eig_jvp  # dw = diag(V^{-1} dA V); dV by nondegenerate perturbation theory


# --- tridiagonal_solve: linear in b ---------------------------------------------------

def _shift_rows(x, k: int):
    """`out[..., i, :] = x[..., i - k, :]`, zero where that is outside `x`."""
    return _mm(np.eye(x.shape[-2], k=-k, dtype=x.dtype), x)


def _shift_vector(v, k: int):
    """`out[..., i] = v[..., i - k]`, zero where that is outside `v`."""
    return lax.reshape(_shift_rows(lax.reshape(v, (*v.shape, 1)), k), v.shape)


def _tridiagonal_matmul(dl_dot, d_dot, du_dot, x):
    """T x for the tridiagonal T with the given diagonals (`Zero` ones skipped)."""
    out = Zero.like(x)
    for diag, neighbours in ((d_dot, x), (dl_dot, _shift_rows(x, 1)), (du_dot, _shift_rows(x, -1))):
        if not is_zero(diag):
            term = lax.mul(lax.broadcast_in_dim(diag, x.shape, tuple(range(diag.ndim))), neighbours)
            out = add_tangents(out, term)
    return out


def _tridiagonal_solve_jvp(primals, tangents, *, perturb_singular):
    (dl, d, du, b), (dl_dot, d_dot, du_dot, b_dot) = primals, tangents
    ans = p.tridiagonal_solve_p.bind(dl, d, du, b, perturb_singular=perturb_singular)
    t_dot = _tridiagonal_matmul(dl_dot, d_dot, du_dot, ans)
    rhs = b_dot if is_zero(t_dot) else add_tangents(b_dot, lax.neg(t_dot))
    ans_dot = p.tridiagonal_solve_p.bind(dl, d, du, instantiate(rhs),
                                         perturb_singular=perturb_singular)
    return ans, ans_dot


def _tridiagonal_solve_transpose(ct, dl, d, du, b, *, perturb_singular):
    assert is_undefined(b) and not any(map(is_undefined, (dl, d, du))), \
        "tridiagonal_solve is linear in b only"
    # T^T has sub-diagonal du shifted down and super-diagonal dl shifted up.
    ct_b = p.tridiagonal_solve_p.bind(_shift_vector(du, 1), d, _shift_vector(dl, -1), ct,
                                      perturb_singular=perturb_singular)
    return [None, None, None, ct_b]


jvp_rules[p.tridiagonal_solve_p] = _tridiagonal_solve_jvp  # dX = T^{-1} (dB - dT X)
transpose_rules[p.tridiagonal_solve_p] = _tridiagonal_solve_transpose


# --- householder_product: a scan over the reflectors ----------------------------------

def _columns_first(x):
    """(..., m, k) -> (k, ..., m): the columns of `x` stacked for a scan."""
    nd = x.ndim
    return lax.transpose(x, (nd - 1, *range(nd - 2), nd - 2))


def _last_first(t):
    """(..., k) -> (k, ...)."""
    return lax.transpose(t, (t.ndim - 1, *range(t.ndim - 1)))


def _adjoint_times(v, x):
    """v^H X for vectors v (..., m) and matrices X (..., m, n): (..., n)."""
    nb = v.ndim - 1
    batch = tuple(range(nb))
    return lax.dot_general(_conj(v), x, (((nb,), (nb,)), (batch, batch)), precision=_HIGHEST)


def _outer(u, w):
    """u w^T for vectors u (..., m) and w (..., n): (..., m, n)."""
    nb = u.ndim - 1
    shape = (*u.shape, w.shape[-1])
    return lax.mul(lax.broadcast_in_dim(u, shape, tuple(range(nb + 1))),
                   lax.broadcast_in_dim(w, shape, (*range(nb), nb + 1)))


def _scaled(tau, v):
    """tau_i v_i for scalars tau (...) and vectors v (..., m)."""
    return lax.mul(lax.broadcast_in_dim(tau, v.shape, tuple(range(tau.ndim))), v)


def _householder_step(carry, xs):
    """X <- H X = X - tau v (v^H X), and its tangent, for one reflector."""
    x, x_dot = carry
    v, tau, v_dot, tau_dot = xs
    w = _adjoint_times(v, x)
    tau_v = _scaled(tau, v)
    dw = _adjoint_times(v, x_dot)  # d(v^H X) = dv^H X + v^H dX
    if v_dot is not None:
        dw = lax.add(dw, _adjoint_times(v_dot, x))
    d_tau_v = None  # d(tau v) = dtau v + tau dv
    if v_dot is not None:
        d_tau_v = _scaled(tau, v_dot)
    if tau_dot is not None:
        term = _scaled(tau_dot, v)
        d_tau_v = term if d_tau_v is None else lax.add(d_tau_v, term)
    x_dot = lax.sub(x_dot, _outer(tau_v, dw))
    if d_tau_v is not None:
        x_dot = lax.sub(x_dot, _outer(d_tau_v, w))
    return (lax.sub(x, _outer(tau_v, w)), x_dot), None


def _householder_product_jvp(primals, tangents):
    (a, taus), (a_dot, taus_dot) = primals, tangents
    ans = p.householder_product_p.bind(a, taus)
    m, n = a.shape[-2:]
    k = taus.shape[-1]
    if k == 0:  # no reflectors: Q = I[:, :n]
        return ans, Zero.like(ans)
    # Reflector i is column i of `a` below the diagonal, with an implicit 1 on it.
    unit = _batched(np.eye(m, n, dtype=a.dtype), tuple(a.shape[:-2]))
    v = _columns_first(_window(lax.add(_tril(a, -1), unit), 0, m, 0, k))
    v_dot = None if is_zero(a_dot) else _columns_first(_window(_tril(a_dot, -1), 0, m, 0, k))
    tau = _last_first(taus)
    tau_dot = None if is_zero(taus_dot) else _last_first(taus_dot)
    # Q E = H_1 (H_2 (... (H_k E))), E = I[:, :n]: the reflectors from the last to the first.
    (_, ans_dot), _ = lax.scan(_householder_step, (unit, lax.full_like(unit, 0)),
                               (v, tau, v_dot, tau_dot), reverse=True)
    return ans, ans_dot


# X <- X - tau v (v^H X) per reflector: dX <- dX - d(tau v) (v^H X) - tau v d(v^H X)
jvp_rules[p.householder_product_p] = _householder_product_jvp


# --- factorizations jax has no derivative for ------------------------------------------

_NO_DERIVATIVE = {
    p.schur_p: "jnp.linalg.eig or eigh (differentiable) instead of the Schur form",
    p.hessenberg_p: "a differentiable factorization (qr, eigh, eig) instead",
    p.tridiagonal_p: "jnp.linalg.eigh on the matrix itself instead",
}
for _prim, _instead in _NO_DERIVATIVE.items():
    rules.refuse(_prim, f"fungrad cannot differentiate {_prim}; jax has no derivative for "
                        f"it either. Use {_instead}.")
for _name in ("geqrf_p", "geqp3_p", "ormqr_p", "cholesky_update_p", "symmetric_product_p"):
    if _name in internal_prims:
        _prim = internal_prims[_name]
        rules.refuse(_prim, f"fungrad cannot differentiate {_prim}, a LAPACK building block "
                            f"jax gives no derivative either; differentiate the jnp.linalg "
                            f"function built on it (qr, cholesky, ...) instead.")
