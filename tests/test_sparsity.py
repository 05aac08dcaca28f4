"""Sparsity detection: the patterns contain every nonzero of jax's Jacobian and Hessian at
random points, and equal the known structure where there is one."""

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.flatten_util import ravel_pytree

import fungrad
from fungrad._src.sparsity import hessian_pattern, jacobian_pattern

RNG = np.random.default_rng(0)


# ---------------------------------------------------------------------------------------
# Oracles: jax's dense Jacobian / Hessian of the raveled function at random points.

def _flat(f, args, argnums):
    nums = (argnums,) if isinstance(argnums, int) else tuple(argnums)
    x0, unravel = ravel_pytree([args[i] for i in nums])

    def flat_f(x):
        new = list(args)
        for i, a in zip(nums, unravel(x), strict=True):
            new[i] = a
        return ravel_pytree(f(*new))[0]
    return flat_f, x0


def _observed(f, args, argnums=0, order=1, points=3):
    """Union over random points of the nonzeros of jax's Jacobian (order 1) or Hessian,
    in forward mode (while loops) or, for custom_vjp functions, reverse mode."""
    flat_f, x0 = _flat(f, args, argnums)
    rng = np.random.default_rng(1)  # the same points whatever order the tests run in
    xs = jnp.asarray(rng.standard_normal((points, *x0.shape)), x0.dtype)
    scalar = lambda x: flat_f(x)[0]  # noqa: E731
    oracles = ((jax.jacfwd(flat_f), jax.jacrev(flat_f)) if order == 1 else
               (jax.jacfwd(jax.jacfwd(scalar)), jax.jacrev(jax.jacrev(scalar))))
    try:
        values = jax.jit(jax.vmap(oracles[0]))(xs)
    except TypeError:  # jax has no forward mode through custom_vjp
        values = jax.jit(jax.vmap(oracles[1]))(xs)
    return np.any(np.asarray(values) != 0, axis=0)


def _dense(bcoo):
    assert bcoo.dtype == np.bool_ and bcoo.indices_sorted and bcoo.unique_indices
    idx = np.asarray(bcoo.indices)
    keys = idx[:, 0].astype(np.int64) * bcoo.shape[1] + idx[:, 1]
    assert np.all(np.diff(keys) > 0), "indices are not sorted row-major and unique"
    out = np.zeros(bcoo.shape, bool)
    out[idx[:, 0], idx[:, 1]] = np.asarray(bcoo.data)
    return out


def _check(f, args, argnums=0, order=1, exact=None):
    """The pattern contains jax's nonzeros; equals `exact` (a boolean matrix, or "observed":
    jax's nonzeros) when given."""
    detect = fungrad.jacobian_sparsity if order == 1 else fungrad.hessian_sparsity
    pattern = _dense(detect(f, *args, argnums=argnums))
    seen = _observed(f, args, argnums, order)
    assert pattern.shape == seen.shape
    missed = np.argwhere(seen & ~pattern)
    assert missed.size == 0, f"entries jax finds nonzero but the pattern misses: {missed[:10]}"
    if order == 2:
        assert np.array_equal(pattern, pattern.T)
    if exact is not None:
        exact = seen if isinstance(exact, str) else exact
        assert np.array_equal(pattern, exact), f"extra: {np.argwhere(pattern & ~exact)[:10]}"
    return pattern


# ---------------------------------------------------------------------------------------
# Known structures.

def _band(m, n, lo, hi, offset=0):
    i, j = np.indices((m, n))
    return (j - i - offset >= -lo) & (j - i - offset <= hi)


def _blocks(n, b):
    i, j = np.indices((n, n))
    return i // b == j // b


def _arrow(n):
    i, j = np.indices((n, n))
    return (i == j) | (i == n - 1) | (j == n - 1)


def _stencil(g):
    """The 5-point stencil on a g x g grid (zero boundary): rows and columns are cells."""
    i, j = np.indices((g * g, g * g))
    ri, ci, rj, cj = i // g, i % g, j // g, j % g
    return (np.abs(ri - rj) + np.abs(ci - cj)) <= 1


def laplacian(x, g):
    u = jnp.pad(x.reshape(g, g), 1)
    return (4 * u[1:-1, 1:-1] - u[:-2, 1:-1] - u[2:, 1:-1] - u[1:-1, :-2] - u[1:-1, 2:]).ravel()


def rosenbrock(x):
    return jnp.sum(100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2)


def arrowhead(x):
    return jnp.concatenate([jnp.sin(x[:-1]) * x[-1], jnp.sum(x ** 2, keepdims=True)])


W5 = jnp.asarray(RNG.standard_normal(5))
B4 = jnp.asarray(RNG.standard_normal((4, 3)))
N = 12
X = jnp.asarray(RNG.standard_normal(N))

EXACT_JACOBIANS = {
    "banded convolve": (lambda x: jnp.convolve(jnp.sin(x), W5, mode="same"), _band(N, N, 2, 2)),
    "banded matrix": (lambda x: jnp.asarray(_band(N, N, 1, 2), float) * 1.5 @ x, _band(N, N, 1, 2)),
    "bidiagonal chain": (lambda x: jnp.sin(x[1:]) * x[:-1] + jnp.cos(x[:-1]), _band(N - 1, N, 0, 1)),
    "block-diagonal": (lambda x: (jnp.tanh(x.reshape(4, 3)) @ B4.T).ravel(),
                       np.kron(np.eye(4, dtype=bool), np.ones((4, 3), bool))),
    "arrowhead": (arrowhead, _arrow(N)),
    "2-D stencil": (lambda x: laplacian(x[:9], 3), np.hstack([_stencil(3), np.zeros((9, 3), bool)])),
    "cumsum": (lambda x: jnp.cumsum(x * x), np.tril(np.ones((N, N), bool))),
    "reverse cumprod": (lambda x: lax.cumprod(x, reverse=True), np.triu(np.ones((N, N), bool))),
    "gather with constant indices": (lambda x: x[jnp.array([3, 0, 3, -1])] * 2,
                                     np.eye(N, dtype=bool)[[3, 0, 3, N - 1]]),
    "gather out of bounds": (lambda x: x.at[jnp.array([1, 70, -90])].get(mode="fill", fill_value=0.0),
                             np.eye(N, dtype=bool)[[1, 1, 1]] & np.array([[1], [0], [0]], bool)),
    "take_along_axis": (lambda x: jnp.take_along_axis(x.reshape(3, 4), jnp.array([[1], [0], [3]]), axis=1),
                        np.eye(N, dtype=bool)[[1, 4, 11]]),
    "batched gather, computed indices": (
        lambda x: jnp.take_along_axis(x.reshape(3, 4), jnp.argsort(x.reshape(3, 4), 1)[:, :2], axis=1),
        np.kron(np.eye(3, dtype=bool), np.ones((2, 4), bool))),
    "fft": (lambda x: jnp.abs(jnp.fft.fft(x.reshape(3, 4))).ravel(),
            np.kron(np.eye(3, dtype=bool), np.ones((4, 4), bool))),
    "transpose and rev": (lambda x: jnp.flip(x.reshape(3, 4).T, 0).ravel(),
                          np.eye(N, dtype=bool)[np.flip(np.arange(N).reshape(3, 4).T, 0).ravel()]),
    "where with a constant mask": (lambda x: jnp.where(jnp.arange(N) % 2 == 0, x, 0.0),
                                   np.diag(np.arange(N) % 2 == 0)),
}


@pytest.mark.parametrize("name", list(EXACT_JACOBIANS))
def test_exact_jacobian_patterns(name):
    f, exact = EXACT_JACOBIANS[name]
    _check(f, (X,), exact=exact)


def _mlp(w, b, x):
    return jnp.tanh(w @ x + b)


def _conv1d(x, k):
    return lax.conv_general_dilated(x.reshape(1, 2, 6), k, (1,), ((2, 1),))


def _scan_fn(x):
    def body(c, xi):
        return c * xi + jnp.sin(c), c * 2
    c, ys = lax.scan(body, x[:3], x[3:].reshape(3, 3))
    return jnp.concatenate([c, ys.ravel()])


def _long_scan(x):
    return lax.scan(lambda c, xi: (jnp.roll(c, 1) * xi, c[0]), x[:4], jnp.tile(x[4:8], (2000, 1)))


def _while(x):
    return lax.while_loop(lambda c: c[0] < 5, lambda c: (c[0] + 1, jnp.roll(c[1], 1) * c[1]), (0, x))[1]


def _fori(x):
    return lax.fori_loop(0, 3, lambda i, c: c.at[i].set(c[i + 1] ** 2), x)


@jax.custom_jvp
def _softclip(x):
    return jnp.tanh(x)


_softclip.defjvp(lambda p, t: (jnp.tanh(p[0]), t[0] / jnp.cosh(p[0]) ** 2))


@jax.custom_vjp
def _scaled_roll(x):
    return jnp.roll(x, 1) * x


_scaled_roll.defvjp(lambda x: (_scaled_roll(x), x),
                    lambda x, ct: (jnp.roll(ct * x, -1) + ct * jnp.roll(x, 1),))

@jax.custom_jvp
def _ste(x):  # a straight-through estimator: round forward, the identity's derivative
    return jnp.round(x)


_ste.defjvp(lambda p, t: (_ste(p[0]), t[0]))  # the rule calls the function itself


@jax.custom_vjp
def _ste_vjp(x, y):
    return (jnp.round(x) + 0.5) * jnp.sum(y)


_ste_vjp.defvjp(lambda x, y: (_ste_vjp(x, y), (jnp.round(x) + 0.5, jnp.sum(y), y)),
                lambda r, ct: (ct * r[1], jnp.full_like(r[2], jnp.sum(ct * r[0]))))

K2 = jnp.asarray(RNG.standard_normal((3, 2, 4)))
GENERAL = {
    "mlp layer": (_mlp, (jnp.asarray(RNG.standard_normal((3, 4))), jnp.ones(3), jnp.ones(4)), (0, 1, 2)),
    "conv1d": (lambda x: _conv1d(x, K2), (X,), 0),
    "conv1d kernel and input": (_conv1d, (X, K2), (0, 1)),
    "conv2d strided grouped": (lambda x, k: lax.conv_general_dilated(
        x, k, (2, 1), "SAME", rhs_dilation=(1, 2), feature_group_count=2,
        dimension_numbers=("NHWC", "HWIO", "NCHW")),
        (jnp.ones((1, 5, 4, 2)), jnp.ones((3, 2, 1, 4))), (0, 1)),
    "sort": (lambda x: jnp.sort(x.reshape(3, 4), axis=1) * jnp.argsort(x)[:4].reshape(1, 4), (X,), 0),
    "top_k": (lambda x: lax.top_k(x.reshape(3, 4), 2)[0], (X,), 0),
    "max pool": (lambda x: lax.reduce_window(x.reshape(3, 4), -jnp.inf, lax.max, (2, 2), (1, 2), "SAME"),
                 (X,), 0),
    "dilated average pool": (lambda x: lax.reduce_window(x.reshape(3, 4), 0.0, lax.add, (2, 2), (1, 1),
                                                         ((1, 0), (0, 2)), window_dilation=(1, 2)), (X,), 0),
    "scatter-add": (lambda x: jnp.zeros(5).at[jnp.array([0, 4, 0, 2])].add(x[:4]) + x[4:9], (X,), 0),
    "scatter": (lambda x: x.at[jnp.array([1, 3, 5])].set(x[6:9] ** 2), (X,), 0),
    "scatter with duplicates": (lambda x: x.at[jnp.array([1, 1, 5])].set(x[6:9] ** 2), (X,), 0),
    "dynamic index": (lambda x: x[jnp.argmax(x)] * x[3:6], (X,), 0),
    "dynamic_update_slice": (lambda x: lax.dynamic_update_slice(x, x[:2] ** 2, (jnp.argmin(x),)), (X,), 0),
    "scan": (_scan_fn, (X,), 0),
    "long scan": (_long_scan, (X,), 0),
    "cond": (lambda x: lax.cond(x[0] > 0, lambda y: y[::-1] * y, lambda y: jnp.cumsum(y), x), (X,), 0),
    "while": (_while, (X,), 0),
    "fori_loop": (_fori, (X,), 0),
    "jit": (jax.jit(lambda x: jnp.sin(x[2:]) - x[:-2]), (X,), 0),
    "custom_jvp": (lambda x: _softclip(x[::2]) + jax.nn.relu(x[1::2]), (X,), 0),
    "custom_vjp": (lambda x: _scaled_roll(x), (X,), 0),
    "straight-through custom_jvp": (lambda x: _ste(x[::-1]) + jnp.sin(x[0]), (X,), 0),
    "straight-through custom_vjp": (lambda x: _ste_vjp(x[:4], x[4:] ** 2), (X,), 0),
    "checkpoint": (jax.checkpoint(lambda x: jnp.sin(jnp.sin(x)) * x[0]), (X,), 0),
    "random key constant": (lambda x: x * jax.random.normal(jax.random.key(0), (N,)), (X,), 0),
    "pytrees": (lambda t, s: {"u": t["a"] * s, "v": jnp.sum(t["b"]) + t["a"][:2]},
                ({"a": X[:4], "b": X[4:]}, 2.0), (0, 1)),
    "integer parts": (lambda x: (jnp.floor(x) + jnp.round(x[::-1]), (x > 0).astype(int)), (X,), 0),
    "reductions": (lambda x: jnp.stack([jnp.max(x.reshape(3, 4), 1), jnp.prod(x.reshape(3, 4), 1),
                                        jnp.linalg.norm(x.reshape(3, 4), axis=1)]), (X,), 0),
    "unknown primitive (dense)": (lambda x: jnp.linalg.solve(jnp.eye(3) + x[:9].reshape(3, 3), x[9:]),
                                  (X,), 0),
}


# A convolution's pattern is its window, scatter's overwritten entries drop the operand, a
# known loop counter indexes exactly, a custom rule's derivative is the rule's: these
# patterns equal what jax's Jacobians show.
EQUAL_TO_OBSERVED = {"conv1d", "conv1d kernel and input", "conv2d strided grouped", "scatter", "scatter-add",
                     "dilated average pool", "fori_loop", "jit", "pytrees", "mlp layer",
                     "straight-through custom_jvp", "straight-through custom_vjp"}


@pytest.mark.parametrize("name", list(GENERAL))
def test_jacobian_pattern_contains_jax_nonzeros(name):
    f, args, argnums = GENERAL[name]
    _check(f, args, argnums, exact="observed" if name in EQUAL_TO_OBSERVED else None)


def test_mlp_layer_pattern():
    # Output i reads row i of w, b[i] and all of x.
    w, b, x = GENERAL["mlp layer"][1]
    pattern = _dense(fungrad.jacobian_sparsity(_mlp, w, b, x, argnums=(0, 1, 2)))
    expected = np.hstack([np.kron(np.eye(3, dtype=bool), np.ones((1, 4), bool)), np.eye(3, dtype=bool),
                          np.ones((3, 4), bool)])
    assert np.array_equal(pattern, expected)


EXACT_HESSIANS = {
    "chained rosenbrock": (rosenbrock, _band(N, N, 1, 1)),
    "arrowhead": (lambda x: jnp.sum(jnp.sin(x[:-1]) * x[-1]) + jnp.sum(x ** 3), _arrow(N)),
    "block-diagonal": (lambda x: jnp.sum(jnp.log1p(jnp.sum(x.reshape(4, 3) ** 2, axis=1))), _blocks(N, 3)),
    "stencil energy": (lambda x: jnp.sum(laplacian(x[:9], 3) ** 2) + jnp.sum(x[9:] ** 2),
                       np.block([[(_stencil(3).astype(int) @ _stencil(3).astype(int)) > 0,
                                  np.zeros((9, 3), bool)], [np.zeros((3, 9), bool), np.eye(3, dtype=bool)]])),
    "quadratic form": (lambda x: x @ (jnp.asarray(_band(N, N, 1, 1), float) @ x), _band(N, N, 1, 1)),
    "piecewise linear only": (lambda x: jnp.sum(jnp.abs(x) + jnp.maximum(x, 0.5) + jnp.sort(x)),
                              np.zeros((N, N), bool)),
}


@pytest.mark.parametrize("name", list(EXACT_HESSIANS))
def test_exact_hessian_patterns(name):
    f, exact = EXACT_HESSIANS[name]
    _check(f, (X,), order=2, exact=exact)


GENERAL_HESSIANS = {
    "mlp loss": (lambda w, x: jnp.sum(jnp.tanh(w @ x) ** 2),
                 (jnp.asarray(RNG.standard_normal((3, 4))), jnp.ones(4)), (0, 1)),
    "softmax cross-entropy": (lambda x: -jax.nn.log_softmax(x.reshape(3, 4))[:, 0].sum(), (X,), 0),
    "complex abs": (lambda x: jnp.sum(jnp.abs(jnp.fft.fft(x[:6])) + jnp.abs(x[6:])), (X,), 0),
    "division": (lambda x: jnp.sum(x[:6] / (2 + x[6:] ** 2)), (X,), 0),
    "scan": (lambda x: jnp.sum(_scan_fn(x)), (X,), 0),
    "cond": (lambda x: lax.cond(x[0] > 0, lambda y: jnp.sum(y[1:] * y[:-1]), lambda y: jnp.sum(y ** 3), x),
             (X,), 0),
    "while": (lambda x: jnp.sum(_while(x)), (X,), 0),
    "cumprod": (lambda x: jnp.sum(jnp.cumprod(x[:5])), (X,), 0),
    "gather and conv": (lambda x, k: jnp.sum(_conv1d(x[jnp.arange(N)[::-1]], k) ** 2), (X, K2), (0, 1)),
    "custom rules": (lambda x: jnp.sum(_softclip(x) * _scaled_roll(x)), (X,), 0),
    "straight-through custom_vjp": (lambda x: jnp.sum(_ste_vjp(x[:4], x[4:] ** 2) ** 2), (X,), 0),
    "argmax stops the derivative": (lambda x: x[jnp.argmax(jnp.sin(x) * x)] * 2.0 + jnp.sum(x[:3] ** 2)
                                    + jnp.sum(lax.stop_gradient(x[3:] ** 3) * x[3:]), (X,), 0),
}


@pytest.mark.parametrize("name", list(GENERAL_HESSIANS))
def test_hessian_pattern_contains_jax_nonzeros(name):
    f, args, argnums = GENERAL_HESSIANS[name]
    # An operand of argmax only: no second-order entries from it.
    _check(f, args, argnums, order=2, exact="observed" if name.startswith("argmax") else None)


def test_pattern_helpers_agree_with_the_bcoo():
    f = EXACT_JACOBIANS["2-D stencil"][0]
    p, b = jacobian_pattern(f, X), fungrad.jacobian_sparsity(f, X)
    assert np.array_equal(p.todense(), _dense(b)) and p.shape == b.shape and p.nnz == b.nse
    indptr = p.indptr()
    for r in range(p.shape[0]):
        assert np.array_equal(p.cols[indptr[r]:indptr[r + 1]], np.flatnonzero(p.todense()[r]))
    h = hessian_pattern(rosenbrock, X)
    assert np.array_equal(h.todense(), _dense(fungrad.hessian_sparsity(rosenbrock, X)))


def test_other_arguments_are_taken_as_given():
    f = lambda x, i: lax.dynamic_slice(x, (i,), (3,)) * x[i]  # noqa: E731
    eye = np.eye(N, dtype=bool)
    for i in (0, 4, 11):
        start = min(i, N - 3)  # lax clamps the slice into the array
        _check(f, (X, i), exact=eye[start:start + 3] | eye[i])


def _chain(x):
    for _ in range(10):  # output i depends on x[i], ..., x[i + 10]
        x = jnp.tanh(x[1:] * x[:-1]) + x[:-1]
    return x


def test_abstract_arguments():
    # Shapes and dtypes suffice; an abstract argument outside argnums is any value.
    f = lambda x, i, y: lax.dynamic_slice(x, (i,), (2,)) * y[0] + x[:2]  # noqa: E731
    s5, s2 = jax.ShapeDtypeStruct((5,), jnp.float32), jax.ShapeDtypeStruct((2,), jnp.float32)
    known = _dense(fungrad.jacobian_sparsity(f, s5, 1, s2, argnums=(0, 2)))
    assert np.array_equal(known, np.array([[1, 1, 0, 0, 0, 1, 0], [0, 1, 1, 0, 0, 1, 0]], bool))
    # An unknown start in [0, 3]: out[a] reads x[a], ..., x[a + 3].
    unknown = _dense(fungrad.jacobian_sparsity(f, s5, jax.ShapeDtypeStruct((), jnp.int32), jnp.ones(2)))
    assert np.array_equal(unknown, _band(2, 5, 0, 3))
    _check(lambda x: lax.dynamic_slice(x.reshape(3, 4), (jnp.argmax(x), 1), (2, 2)), (X,))


@pytest.mark.slow
def test_large_stencil_and_chain():
    g = 320  # n = 102,400
    x = jnp.ones(g * g)
    start = time.perf_counter()
    jac = jacobian_pattern(lambda x: laplacian(x, g), x)
    hess = hessian_pattern(rosenbrock, x)
    chain = jacobian_pattern(_chain, x)
    elapsed = time.perf_counter() - start
    # Each cell: itself and its (up to four) neighbours; 4 g edge cells lack one each.
    assert jac.shape == (g * g, g * g) and jac.nnz == 5 * g * g - 4 * g
    assert hess.nnz == 3 * g * g - 2
    assert chain.shape == (g * g - 10, g * g) and chain.nnz == 11 * (g * g - 10)
    assert elapsed < 20, elapsed  # about 2 s alone; the bound leaves room for a busy machine


def test_bad_input_gets_a_clear_error():
    with pytest.raises(ValueError, match="jacobian_sparsity: argnums=2 is out of bounds"):
        fungrad.jacobian_sparsity(jnp.sin, X, argnums=2)
    with pytest.raises(TypeError, match="hessian_sparsity: argnums must be an int or a tuple of ints"):
        fungrad.hessian_sparsity(jnp.sum, X, argnums="0")
    with pytest.raises(TypeError, match=r"hessian_sparsity: f must return one real or complex scalar.*"
                                        r"float64\[12\].*use jacobian_sparsity"):
        fungrad.hessian_sparsity(jnp.sin, X)
    with pytest.raises(TypeError, match="jacobian_sparsity: expected a callable"):
        fungrad.jacobian_sparsity(3, X)
    with pytest.raises(TypeError, match=r"jacobian_sparsity: args\[0\]\['a'\] is of type str"):
        fungrad.jacobian_sparsity(lambda t: t, {"a": "x"})


def test_detection_uses_no_differentiation():
    from tests.test_guard import guard

    f = GENERAL_HESSIANS["custom rules"][0]
    expected = _dense(fungrad.hessian_sparsity(f, X)), _dense(fungrad.jacobian_sparsity(_scan_fn, X))
    with guard():
        got = _dense(fungrad.hessian_sparsity(f, X)), _dense(fungrad.jacobian_sparsity(_scan_fn, X))
    assert all(np.array_equal(a, b) for a, b in zip(got, expected, strict=True))


def test_under_jit_with_a_closed_over_tracer():
    @jax.jit
    def g(y):
        f = lambda x: jnp.concatenate([jnp.sin(x[::-1]) * y[0], x[y.astype(int)][:1]])  # noqa: E731
        return jacobian_pattern(f, X[:3]).todense(), y

    # A traced value is unknown: as an index it reads any element; the reversal stays exact.
    assert np.array_equal(g(jnp.zeros(3))[0], np.vstack([np.eye(3, dtype=bool)[::-1], np.ones((1, 3), bool)]))
