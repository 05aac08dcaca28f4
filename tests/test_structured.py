"""Colorings, compressed sparse Jacobians and Hessians, automatic mode, and conveniences,
against jax's dense transforms."""

import functools
import importlib.util
import itertools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import sparse as jsparse

import fungrad
from fungrad._src import coloring, structured
from tests.harness import assert_close

RNG = np.random.default_rng(0)


# --- the workloads: functions with known structure ---------------------------------------


def banded(x, b=2):  # y_i depends on x_{i-b..i+b}
    return jnp.convolve(x ** 2, jnp.arange(1.0, 2.0 * b + 2), mode="same") + jnp.sin(x)


def block_diag(x):  # blocks of 3
    w = jnp.array([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0], [2.0, 1.0, 1.0]])
    blocks = x.reshape(-1, 3)
    return (jnp.tanh(blocks @ w.T) + blocks ** 2).reshape(-1)


def arrow_row(x):  # a diagonal and a full last row: few row colors, n column colors
    return jnp.concatenate([x[:-1] ** 2, jnp.sum(jnp.sin(x))[None]])


def arrow_col(x):  # a diagonal and a full last column: few column colors, n row colors
    return x * x[-1]


def laplacian_residual(u):  # r(u) = A u + u^3 - 1, A the 5-point Laplacian, Dirichlet 0
    side = int(round(u.size ** 0.5))
    grid = jnp.pad(u.reshape(side, side), 1)
    au = (4 * grid[1:-1, 1:-1] - grid[:-2, 1:-1] - grid[2:, 1:-1] - grid[1:-1, :-2]
          - grid[1:-1, 2:])
    return (au + u.reshape(side, side) ** 3 - 1.0).reshape(-1)


def rosenbrock(x):  # chained: a tridiagonal Hessian
    return jnp.sum(100.0 * (x[1:] - x[:-1] ** 2) ** 2 + (1.0 - x[:-1]) ** 2)


def arrow_energy(x):  # a hub: the Hessian is an arrowhead
    return jnp.sum(x[:-1] ** 2 * x[-1]) + jnp.sum(x ** 4)


def block_energy(x):
    return jnp.sum(jnp.sum(jnp.tanh(x.reshape(-1, 3)), axis=1) ** 2) + jnp.sum(jnp.cos(x))


def laplacian_energy(u):
    return 0.5 * jnp.vdot(u, laplacian_residual(u) + 1.0 - u ** 3) + jnp.sum(u ** 4) / 4


def _dense_pattern(bcoo):  # BCOO.todense cannot scatter booleans
    dense = np.zeros(bcoo.shape, bool)
    dense[tuple(np.asarray(bcoo.indices).T)] = np.asarray(bcoo.data)
    return dense


def _pattern(jac):
    """The pattern read from a dense Jacobian at a generic point (a structural oracle)."""
    return np.asarray(jac) != 0


JACOBIANS = {"banded": (banded, 12), "block_diag": (block_diag, 12), "arrow_row": (arrow_row, 9),
             "arrow_col": (arrow_col, 9), "laplacian": (laplacian_residual, 25),
             "rosenbrock_gradient": (jax.grad(rosenbrock), 10)}
HESSIANS = {"banded": (lambda x: jnp.sum(banded(x) ** 2), 12), "block": (block_energy, 12),
            "arrow": (arrow_energy, 9), "laplacian": (laplacian_energy, 25),
            "rosenbrock": (rosenbrock, 10)}


def _point(n):
    return jnp.asarray(np.random.default_rng(n).uniform(0.2, 1.2, n))


# Jitted: jax's eager Jacobians compile op by op, seconds for each of these small functions.
@functools.cache
def _jax_jacobian(fun, n):
    return jax.jit(jax.jacfwd(fun))(_point(n))


@functools.cache
def _jax_hessian(fun, n):
    return jax.jit(jax.hessian(fun))(_point(n))


# --- colorings -----------------------------------------------------------------------------


def _random_pattern(shape, density, seed):
    return np.random.default_rng(seed).random(shape) < density


def _symmetric(pattern):
    return pattern | pattern.T | np.eye(pattern.shape[0], dtype=bool)


def _assert_column_coloring(dense, colors):
    for row in dense:
        used = colors[np.nonzero(row)[0]]
        assert len(set(used.tolist())) == len(used), "two columns sharing a row share a color"


def _assert_star_coloring(dense, colors):
    """Proper, and no path on four vertices (w-x the middle edge) with two colors."""
    adj = dense & ~np.eye(len(dense), dtype=bool)
    rows, cols = np.nonzero(adj)
    assert np.all(colors[rows] != colors[cols]), "neighbors share a color"
    for w, x in zip(rows, cols, strict=True):
        for v, y in itertools.product(np.nonzero(adj[w])[0], np.nonzero(adj[x])[0]):
            if len({v, w, x, y}) == 4:
                assert not (colors[v] == colors[x] and colors[y] == colors[w]), \
                    f"path {v}-{w}-{x}-{y} has two colors"


@pytest.mark.parametrize("seed", range(4))
def test_colorings_have_their_defining_property(seed):
    dense = _random_pattern((30, 24), 0.12, seed)
    rows, cols = np.nonzero(dense)
    _assert_column_coloring(dense, coloring.column_coloring(rows, cols, dense.shape))
    _assert_column_coloring(dense.T, coloring.row_coloring(rows, cols, dense.shape))
    sym = _symmetric(_random_pattern((25, 25), 0.1, seed))
    rows, cols = np.nonzero(sym)
    _assert_star_coloring(sym, coloring.star_coloring(rows, cols, 25))
    d1 = coloring.distance1_coloring(rows, cols, 25)
    off = rows != cols
    assert np.all(d1[rows[off]] != d1[cols[off]])


@pytest.mark.parametrize("half_width", [0, 1, 2, 4])
def test_banded_patterns_take_about_as_many_colors_as_a_row_has_entries(half_width):
    n = 40
    dense = np.abs(np.subtract.outer(np.arange(n), np.arange(n))) <= half_width
    rows, cols = np.nonzero(dense)
    width = 2 * half_width + 1  # the entries of a full row: a lower bound on the colors
    for colors in (coloring.column_coloring(rows, cols, (n, n)),
                   coloring.row_coloring(rows, cols, (n, n))):
        assert width <= coloring.num_colors(colors) <= width + 1
    star = coloring.star_coloring(rows, cols, n)
    _assert_star_coloring(dense, star)
    assert coloring.num_colors(star) <= width  # a star coloring needs no more


def test_arrowheads_color_cheaply_on_one_side_and_auto_takes_it():
    n = 30
    for fun, cheap in ((arrow_row, "reverse"), (arrow_col, "forward")):
        pattern = _pattern(_jax_jacobian(fun, n))
        sj = fungrad.sparse_jacobian(fun, sparsity=pattern)
        assert (sj.mode, sj.num_colors) == (cheap, 2)
        other = "forward" if cheap == "reverse" else "reverse"
        assert fungrad.sparse_jacobian(fun, sparsity=pattern, mode=other).num_colors == n
    hub = _pattern(_jax_hessian(arrow_energy, n))
    assert fungrad.sparse_hessian(arrow_energy, sparsity=hub).num_colors == 2  # distance-2: n


# --- sparse Jacobians and Hessians against jax's dense ones --------------------------------


@pytest.mark.parametrize("mode", ["auto", "forward", "reverse"])
@pytest.mark.parametrize("name", sorted(JACOBIANS))
def test_sparse_jacobian_equals_jax_jacfwd(name, mode):
    fun, n = JACOBIANS[name]
    want = _jax_jacobian(fun, n)
    sj = fungrad.sparse_jacobian(fun, sparsity=_pattern(want), mode=mode)
    jac = jax.jit(sj)(_point(n))
    assert isinstance(jac, jsparse.BCOO) and jac.shape == want.shape
    assert_close(jac.todense(), want)
    assert mode == "auto" or sj.mode == mode
    assert sj.num_colors < n or name.startswith("arrow")


@pytest.mark.parametrize("name", sorted(HESSIANS))
def test_sparse_hessian_equals_jax_hessian(name):
    fun, n = HESSIANS[name]
    want = _jax_hessian(fun, n)
    sh = fungrad.sparse_hessian(fun, sparsity=_pattern(want))
    assert_close(jax.jit(sh)(_point(n)).todense(), want)
    assert sh.mode == "forward_over_reverse" and sh.num_colors < n
    _assert_star_coloring(_symmetric(_pattern(want)), sh.colors)


def test_eager_calls_equal_jax():
    sj = fungrad.sparse_jacobian(banded, sparsity=_pattern(_jax_jacobian(banded, 12)))
    assert_close(sj(_point(12)).todense(), _jax_jacobian(banded, 12))
    want = _jax_hessian(rosenbrock, 10)
    assert_close(fungrad.sparse_hessian(rosenbrock, sparsity=_pattern(want))(_point(10)).todense(),
                 want)


def test_patterns_as_bcoo_or_scipy_and_wider_than_needed():
    scipy_sparse = pytest.importorskip("scipy.sparse")
    x = _point(12)
    want = _jax_jacobian(banded, 12)
    wide = np.abs(np.subtract.outer(np.arange(12), np.arange(12))) <= 3  # a superset is fine
    assert_close(jax.jit(fungrad.sparse_jacobian(banded, sparsity=wide))(x).todense(), want)
    as_bcoo = jsparse.BCOO((np.ones(wide.sum(), bool), np.argwhere(wide)), shape=wide.shape)
    for pattern in (as_bcoo, scipy_sparse.csr_matrix(wide), scipy_sparse.coo_array(wide.T).T):
        sj = fungrad.sparse_jacobian(banded, sparsity=pattern)
        assert np.array_equal(_dense_pattern(sj.sparsity), wide)
        assert np.array_equal(np.asarray(sj.sparsity.indices), np.argwhere(wide))  # row-major


def test_value_and_variants_chunks_and_several_arguments():
    energy = HESSIANS["banded"][0]
    want_j, want_h = _jax_jacobian(banded, 12), _jax_hessian(energy, 12)
    value_and_jac = fungrad.value_and_sparse_jacobian(banded, sparsity=_pattern(want_j),
                                                      chunk_size=2)
    value_and_hess = fungrad.value_and_sparse_hessian(energy, sparsity=_pattern(want_h),
                                                      chunk_size=2)

    def two(a, scale, b):  # differentiated with respect to (b, a), raveled in that order
        return jnp.concatenate([a * b[0], jnp.sin(b) * scale])

    a, b, x = _point(3), _point(2), _point(12)
    flat = lambda v: two(v[2:], 2.0, v[:2])  # noqa: E731
    want = jax.jit(jax.jacfwd(flat))(jnp.concatenate([b, a]))
    by_mode = {mode: fungrad.sparse_jacobian(two, sparsity=_pattern(want), argnums=(2, 0),
                                             mode=mode) for mode in ("forward", "reverse")}

    @jax.jit
    def ours(x, a, b):
        (y, jac), (v, hess) = value_and_jac(x), value_and_hess(x)
        return ((y, jac.todense()), (v, hess.todense()),
                {mode: sj(a, 2.0, b).todense() for mode, sj in by_mode.items()})

    assert_close(ours(x, a, b), ((banded(x), want_j), (energy(x), want_h),
                                 {"forward": want, "reverse": want}))


def test_the_prepared_object_is_reused_and_traced_once_under_jit():
    traces = []

    def fun(x):
        traces.append(1)
        return laplacian_residual(x)

    x = _point(16)
    sj = fungrad.sparse_jacobian(fun, sparsity=_pattern(_jax_jacobian(laplacian_residual, 16)))
    colors = sj.colors
    jitted = jax.jit(sj)
    first, second = jitted(x), jitted(x + 1.0)
    assert len(traces) == 1, "the jitted prepared object re-traced the function"
    assert sj.colors is colors
    assert_close(second.todense(), jax.jit(jax.jacfwd(laplacian_residual))(x + 1.0))
    assert np.array_equal(first.indices, second.indices)


def test_detection_runs_once_per_argument_shape(monkeypatch):
    from fungrad._src import sparsity
    calls = []

    def fake(f, *args, argnums=0):
        calls.append(args[0].shape)
        n = args[0].shape[0]
        indices = np.argwhere(_pattern(_jax_jacobian(banded, n)))
        return jsparse.BCOO((np.ones(len(indices), bool), indices), shape=(n, n))

    monkeypatch.setattr(sparsity, "jacobian_sparsity", fake)
    sj = fungrad.sparse_jacobian(banded)
    assert sj.colors is None  # not prepared before the first call
    jitted = jax.jit(sj)
    for n in (10, 10, 14, 10):
        assert_close(jitted(_point(n)).todense(), _jax_jacobian(banded, n))
    assert calls == [(10,), (14,)]


# --- the messages ---------------------------------------------------------------------------


def test_messages_for_bad_input():
    x = _point(6)
    with pytest.raises(ValueError, match=r"mode must be one of 'auto', 'forward', 'reverse', got 'fwd'"):
        fungrad.sparse_jacobian(jnp.sin, sparsity=np.eye(6, dtype=bool), mode="fwd")
    with pytest.raises(ValueError, match=r"mode must be one of"):
        fungrad.jacobian(jnp.sin, mode="backward")
    with pytest.raises(ValueError, match=r"sparsity has shape \(6, 5\), so 5 inputs, but the "
                                         r"differentiated argument\(s\) have 6 entries"):
        fungrad.sparse_jacobian(jnp.sin, sparsity=np.eye(6, 5, dtype=bool))(x)
    with pytest.raises(ValueError, match=r"so 4 outputs, but the function returned 6 entries"):
        fungrad.sparse_jacobian(jnp.sin, sparsity=np.eye(4, 6, dtype=bool))(x)
    with pytest.raises(ValueError, match=r"sparsity must be a 2-D pattern .* got an array of "
                                         r"shape \(6,\)"):
        fungrad.sparse_jacobian(jnp.sin, sparsity=np.ones(6, dtype=bool))
    with pytest.raises(TypeError, match=r"sparse_hessian needs f to return a scalar, but it "
                                        r"returned shape \(6,\)"):
        fungrad.sparse_hessian(jnp.sin, sparsity=np.eye(6, dtype=bool))(x)
    with pytest.raises(TypeError, match=r"sparse_hessian needs f to return a scalar"):
        fungrad.sparse_hessian(jnp.sin)(x)  # the pattern detected: the same message
    with pytest.raises(ValueError, match=r"sparse_hessian: sparsity must be symmetric"):
        fungrad.sparse_hessian(rosenbrock, sparsity=np.eye(6, dtype=bool) | np.eye(6, k=1, dtype=bool))
    with pytest.raises(ValueError, match=r"must be a square \(n, n\) pattern"):
        fungrad.sparse_hessian(rosenbrock, sparsity=np.eye(6, 5, dtype=bool))
    with pytest.raises(ValueError, match=r"hessian_diag: sparsity must be None \(dense\), 'detect'"):
        fungrad.hessian_diag(rosenbrock, sparsity="auto")
    with pytest.raises(ValueError, match=r"n \(the number of probes\) must be a positive integer"):
        fungrad.hutchinson_trace(rosenbrock, x, jax.random.key(0), 0)
    with pytest.raises(TypeError, match=r"sparse_jacobian requires real-valued inputs"):
        fungrad.sparse_jacobian(lambda i: i * 2.0, sparsity=np.eye(6, dtype=bool))(jnp.arange(6))


# --- automatic mode and conveniences ---------------------------------------------------------


def test_jacobian_auto_chooses_by_sizes_and_equals_jax():
    wide = lambda x: jnp.outer(x, x).reshape(-1)  # noqa: E731  (n in, n^2 out: forward)
    narrow = lambda x: jnp.sum(x ** 3) * x[:2]  # noqa: E731  (n in, 2 out: reverse)
    x, y = _point(5), _point(3)
    for fun, mode in ((wide, "forward"), (narrow, "reverse")):
        assert structured.choose_dense_mode(fun, (x,), {}, (0,), False) == mode
    pair = lambda x, y: {"a": x * y[0], "b": jnp.sum(y) * x[:2]}  # noqa: E731
    with_aux = lambda x: (wide(x), {"s": jnp.sum(x)})  # noqa: E731

    def ours(x, y):
        modes = {m: (fungrad.jacobian(wide, mode=m)(x), fungrad.jacobian(narrow, mode=m)(x))
                 for m in ("auto", "forward", "reverse")}
        return (modes, fungrad.jacobian(pair, argnums=(0, 1))(x, y),
                fungrad.value_and_jacobian(narrow)(x),
                fungrad.value_and_jacobian(with_aux, has_aux=True, chunk_size=2)(x))

    def theirs(x, y):
        both = (jax.jacfwd(wide)(x), jax.jacrev(narrow)(x))
        return ({m: both for m in ("auto", "forward", "reverse")},
                jax.jacrev(pair, argnums=(0, 1))(x, y), (narrow(x), jax.jacrev(narrow)(x)),
                ((wide(x), {"s": jnp.sum(x)}), jax.jacfwd(wide)(x)))

    assert_close(jax.jit(ours)(x, y), jax.jit(theirs)(x, y))
    assert_close(fungrad.jacobian(narrow)(x), jax.jit(jax.jacrev(narrow))(x))  # eager


def _two(a, b):
    return jnp.sum(jnp.sin(a) * b[0]) + jnp.sum(b ** 3) * a[0]


def test_value_and_hessian_vhp_and_hessian_diag():
    x, a, b, v = _point(10), _point(3), _point(2), (_point(3) + 1.0, _point(2) - 1.0)
    pattern = _pattern(_jax_hessian(rosenbrock, 10))
    colored = fungrad.hessian_diag(rosenbrock, sparsity=pattern)

    def ours(x, a, b, v):
        return (fungrad.value_and_hessian(rosenbrock)(x),
                fungrad.value_and_hessian(lambda a, b: (_two(a, b), a), argnums=(0, 1),
                                          has_aux=True)(a, b),
                fungrad.vhp(_two, (a, b), v), fungrad.hvp(_two, (a, b), v),
                (fungrad.hessian_diag(rosenbrock)(x), fungrad.hessian_diag(rosenbrock, chunk_size=3)(x),
                 colored(x)),
                fungrad.hessian_diag(_two, argnums=(0, 1))(a, b))

    def theirs(x, a, b, v):
        full = jax.hessian(_two, argnums=(0, 1))(a, b)
        diag = jnp.diag(jax.hessian(rosenbrock)(x))
        vhp = jax.vjp(jax.grad(_two, argnums=(0, 1)), a, b)[1](v)
        return ((rosenbrock(x), jax.hessian(rosenbrock)(x)), ((_two(a, b), a), full), vhp,
                vhp,  # the Hessian is symmetric: hvp = vhp
                (diag, diag, diag), (jnp.diag(full[0][0]), jnp.diag(full[1][1])))

    assert_close(jax.jit(ours)(x, a, b, v), jax.jit(theirs)(x, a, b, v))
    assert colored.num_colors == 2  # a tridiagonal graph is a path: two colors


def test_hutchinson_trace():
    weights = jnp.arange(1.0, 13.0)
    diagonal = lambda x: jnp.sum(weights * x ** 2) + jnp.sum(x)  # noqa: E731
    a = jnp.asarray(RNG.standard_normal((12, 12)))
    a = a + a.T
    quadratic = lambda x: 0.5 * x @ a @ x + jnp.sum(jnp.sin(x))  # noqa: E731
    x = _point(12)

    @jax.jit
    def estimates(x, key):
        keys = jax.random.split(key, 3)
        return (fungrad.hutchinson_trace(diagonal, x, keys[0], 3),
                fungrad.hutchinson_trace(quadratic, x, keys[1], 50),
                fungrad.hutchinson_trace(quadratic, x, keys[2], 20000, chunk_size=5000))

    exact, few, many = estimates(x, jax.random.key(1))
    # z_i^2 = 1, so a diagonal Hessian's estimate is exact with any probe.
    assert_close(exact, 2 * jnp.sum(weights))
    trace = jnp.trace(a) - jnp.sum(jnp.sin(x))
    off = np.asarray(a) - np.diag(np.diag(a))
    for estimate, n in ((few, 50), (many, 20000)):  # variance 2 sum_{i != j} a_ij^2 / n
        assert abs(float(estimate - trace)) < 4 * np.sqrt(2 * np.sum(off ** 2) / n)


def test_fungrad_uses_no_jax_differentiation():
    from tests.test_guard import guard
    x = _point(9)
    want = (_jax_jacobian(laplacian_residual, 9), _jax_hessian(rosenbrock, 9))
    sj = fungrad.sparse_jacobian(laplacian_residual, sparsity=_pattern(want[0]), mode="reverse")
    sh = fungrad.sparse_hessian(rosenbrock, sparsity=_pattern(want[1]))

    def ours(x):
        return (sj(x).todense(), sh(x).todense(), fungrad.hessian_diag(rosenbrock)(x),
                fungrad.jacobian(laplacian_residual)(x), fungrad.vhp(rosenbrock, (x,), (x,))[0],
                fungrad.hutchinson_trace(rosenbrock, x, jax.random.key(0), 2))

    with guard():
        got = jax.jit(ours)(x)
    assert_close(got[:5], (want[0], want[1], jnp.diag(want[1]), want[0], want[1] @ x))


# --- with fungrad's sparsity detection (sparsity=None) -------------------------------------


def test_detected_patterns_give_jax_values_eagerly_and_under_jit():
    x, u = _point(10), _point(16)
    want_h, want_j = _jax_hessian(rosenbrock, 10), _jax_jacobian(laplacian_residual, 16)
    sh = fungrad.sparse_hessian(rosenbrock)
    sj = fungrad.sparse_jacobian(laplacian_residual)
    diag = fungrad.hessian_diag(rosenbrock, sparsity="detect")
    hess, jac, d = jax.jit(lambda x, u: (sh(x).todense(), sj(u).todense(), diag(x)))(x, u)
    assert_close((hess, jac, d), (want_h, want_j, jnp.diag(want_h)))
    assert np.all(_dense_pattern(sh.sparsity) >= _pattern(want_h))  # detection is conservative
    assert (sh.num_colors, sj.mode, diag.num_colors) == (3, "forward", 2)
    assert sj.num_colors <= 7  # a 5-point stencil: at least 5
    assert_close(fungrad.sparse_jacobian(banded)(_point(12)).todense(), _jax_jacobian(banded, 12))


# --- the example ---------------------------------------------------------------------------


def test_sparse_newton_example_converges():
    path = pathlib.Path(__file__).resolve().parent.parent / "examples" / "sparse_newton.py"
    spec = importlib.util.spec_from_file_location("examples_sparse_newton", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    norms = module.main(n=8, verbose=False)
    assert norms[-1] < 1e-9 * norms[0]
    assert len(norms) <= 8, "Newton's method with an exact Jacobian converges quadratically"


def test_sparse_benchmark_smoke(capsys):
    from benchmarks import sparse as bench
    rows = bench.main(["--sizes", "64", "--reps", "1"])
    assert [r["equal"] for r in rows] == [True, True]
    assert "| hessian | 64 | 3 (forward_over_reverse) |" in capsys.readouterr().out
