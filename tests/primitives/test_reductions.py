"""Spec table for reductions, cumulative reductions and sort, and jax's conventions at ties."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import fungrad
from fungrad.testing import check_grads
from tests.harness import assert_close, check_all, check_case, spec_args

FULL = {"jit": True}
LIGHT = {"order": 1}


def _with_zeros(x):
    """`x` (3 x 5) with one zero in its first row and two in its last: prod's hard cases."""
    return x * np.array([[1, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 1, 0, 1, 1]], x.dtype)


KEYS = np.array([[2, 0, 2, 1, 0], [1, 1, 1, 0, 0]])  # duplicate integer sort keys


# --- the generic reduce: lax.reduce with a computation jax does not recognise as a monoid ---

def _c(value, like):
    return jnp.asarray(value, like.dtype)


def _reduce_logaddexp(dims):
    return lambda x: lax.reduce(x, _c(-np.inf, x), jnp.logaddexp, dims)


def _reduce_maximum(dims):  # jnp.maximum is not lax.max: a generic reduce, not reduce_max
    return lambda x: lax.reduce(x, _c(-np.inf, x), lambda a, b: jnp.maximum(a, b), dims)


def _sum_and_prod(x, y, dims):  # variadic: (sum of x, product of y)
    return lax.reduce((x, y), (_c(0, x), _c(1, y)),
                      lambda a, b: (a[0] + b[0], a[1] * b[1]), dims)


def _argmax_pair(a, b):
    """(value, index) of the larger value; the lower index among equal ones."""
    (va, ia), (vb, ib) = a, b
    pick_a = (va > vb) | ((va == vb) & (ia < ib))
    return jnp.where(pick_a, va, vb), jnp.where(pick_a, ia, ib)


def _argmax_reduce(x, index_dtype):
    index = lax.broadcasted_iota(index_dtype, x.shape, 1)
    if jnp.issubdtype(index_dtype, jnp.floating):
        index = index + 0 * x  # jax's rule fails on an operand with a symbolic zero tangent
    return lax.reduce((x, index), (_c(-np.inf, x), jnp.zeros((), index_dtype)), _argmax_pair,
                      (1,))


# (id, function, argument specs[, check_all options]): a shape becomes a random array of
# the test dtype; an integer array is passed as it is.
CASES = [
    ("reduce_sum/axes", lambda x: jnp.sum(x ** 2, axis=(0, 2)), [(2, 3, 4)], FULL),
    ("reduce_sum/scalar", lambda x: jnp.sum(x), [()]),
    ("reduce_sum/size0", lambda x: jnp.sum(x, axis=0), [(0, 3)]),
    ("reduce_max/axis", lambda x: jnp.max(x, axis=1) ** 2, [(3, 4)], FULL),
    ("reduce_max/all_size1", lambda x: jnp.max(x), [(1, 3)]),
    ("reduce_min/axes", lambda x: jnp.min(x ** 2, axis=(0, 2)), [(2, 3, 4)]),
    ("reduce_min/scalar", lambda x: jnp.min(x), [()]),
    ("reduce_prod/axis", lambda x: jnp.prod(x, axis=1), [(3, 5)], FULL),
    ("reduce_prod/zeros", lambda x: jnp.prod(_with_zeros(x), axis=1), [(3, 5)]),
    ("reduce_prod/zeros_all", lambda x: jnp.prod(_with_zeros(x)), [(3, 5)], LIGHT),
    ("reduce_prod/axes", lambda x: jnp.prod(x, axis=(0, 2)), [(3, 2, 5)], LIGHT),
    ("reduce_prod/scalar", lambda x: jnp.prod(x), [()]),
    ("reduce_prod/size0", lambda x: jnp.prod(x, axis=0) * x.sum(), [(0, 3)], LIGHT),
    ("argmax", lambda x: jnp.take_along_axis(x, jnp.argmax(x, 1)[:, None], 1), [(3, 4)]),
    ("argmin", lambda x: x * jnp.argmin(x, axis=0).astype(x.dtype), [(3, 4)], LIGHT),
    ("cumsum/axis1", lambda x: jnp.cumsum(x, axis=1) ** 2, [(3, 5)], FULL),
    ("cumsum/reverse", lambda x: lax.cumsum(x, 0, reverse=True), [(5, 3)]),
    ("cumsum/size0", lambda x: jnp.cumsum(x, axis=0), [(0, 3)]),
    ("cumprod/axis1", lambda x: jnp.cumprod(x, axis=1), [(3, 5)], FULL),
    ("cumprod/zeros_reverse", lambda x: lax.cumprod(_with_zeros(x), 1, reverse=True), [(3, 5)],
     LIGHT),
    ("cumprod/size1", lambda x: jnp.cumprod(x), [(1,)]),
    ("cummax/axis1", lambda x: lax.cummax(x, 1) * x, [(3, 5)], FULL),
    ("cummax/reverse", lambda x: lax.cummax(x, 0, reverse=True), [(5, 3)], LIGHT),
    ("cummin/axis1", lambda x: lax.cummin(x, 1), [(3, 5)], LIGHT),
    ("cummin/reverse_size1", lambda x: lax.cummin(x, 0, reverse=True), [(1, 3)]),
    ("cumlogsumexp/axis1", lambda x: lax.cumlogsumexp(x, 1) ** 2, [(3, 5)], FULL),
    ("cumlogsumexp/reverse", lambda x: lax.cumlogsumexp(3 * x, 1, reverse=True), [(3, 5)], LIGHT),
    ("cumlogsumexp/size0", lambda x: lax.cumlogsumexp(x, 0), [(0, 2)]),
    ("sort/axis1", lambda x: jnp.sort(x, axis=1) * x, [(3, 5)], FULL),
    ("sort/axis0", lambda x: jnp.sort(x, axis=0), [(5, 3)]),
    ("sort/size1_size0", lambda x, y: (jnp.sort(x), jnp.sort(y)), [(1,), (0,)]),
    ("sort/two_operands", lambda x, y: lax.sort((x, y), num_keys=1), [(3, 5), (3, 5)]),
    ("sort/int_keys", lambda x: lax.sort((KEYS, x), dimension=1, num_keys=1)[1], [(2, 5)]),
    ("sort/two_keys",
     lambda x, y: lax.sort((KEYS, -KEYS, x, y), num_keys=2)[2:], [(2, 5), (2, 5)]),
    ("sort/argsort", lambda x: x[jnp.argsort(x)] ** 2, [(5,)]),
    ("reduce/logaddexp_axis1", _reduce_logaddexp((1,)), [(3, 5)], LIGHT),
    ("reduce/logaddexp_all_odd", lambda x: _reduce_logaddexp((0, 1, 2))(x) ** 2, [(3, 1, 7)]),
    ("reduce/logaddexp_none", _reduce_logaddexp(()), [(2, 3)], LIGHT),
    ("reduce/maximum_axes", _reduce_maximum((0, 2)), [(3, 4, 5)], LIGHT),
    ("reduce/maximum_size1", lambda x: _reduce_maximum((0,))(x) * x[0], [(1, 4)]),
    ("reduce/argmax_pair", lambda x: _argmax_reduce(x, x.dtype), [(4, 5)]),
    ("reduce/sum_prod_axes", lambda x, y: _sum_and_prod(x, y, (0, 2)), [(3, 2, 5), (3, 2, 5)],
     FULL),
    ("reduce/sum_prod_size0", lambda x, y: _sum_and_prod(x, y, (0,)), [(0, 3), (0, 3)],
     LIGHT),
]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_rule(case, dtype):
    check_case(case, spec_args(case[2], dtype), light=dtype == "float32")


# --- jax's conventions where the derivative is not unique -----------------------------
# Finite differences do not apply at a tie; jax's own transforms are the oracle.

TIES = np.array([[1.0, 3.0, 3.0, 2.0, 3.0, 0.0, 5.0, 5.0],
                 [2.0, 2.0, 2.0, 2.0, -1.0, -1.0, 4.0, 4.0]])

TIE_CASES = [
    ("reduce_max", lambda x: jnp.max(x, axis=1)),
    ("reduce_max_all", lambda x: jnp.max(x)),
    ("reduce_min", lambda x: jnp.min(x, axis=1)),
    ("cummax", lambda x: lax.cummax(x, 1)),
    ("cummax_reverse", lambda x: lax.cummax(x, 1, reverse=True)),
    ("cummin", lambda x: lax.cummin(x, 1)),
    ("cumlogsumexp", lambda x: lax.cumlogsumexp(x, 1)),
    ("sort_duplicate_keys", lambda x: lax.sort((jnp.floor(x), x * x), num_keys=1)),
    ("sort_values", lambda x: jnp.sort(x, axis=1) * jnp.arange(8.0)),
    ("argmax", lambda x: jnp.take_along_axis(x, jnp.argmax(x, axis=1)[:, None], axis=1)),
    ("argmin", lambda x: x[jnp.arange(2), jnp.argmin(x, axis=1)]),
]


@pytest.mark.parametrize("fn", [c[1] for c in TIE_CASES], ids=[c[0] for c in TIE_CASES])
def test_ties_follow_jax(fn):
    check_all(fn, [TIES], fd=False, jit=False)


def test_reduce_ties_follow_jax():
    # A generic reduce differentiates its reducer up the same tree as jax: jnp.maximum
    # splits a tie evenly at each step where the tree meets one (it pairs 5 with 5 here).
    check_all(_reduce_maximum((1,)), [TIES], fd=False)


# --- the generic reduce beyond what jax differentiates ----------------------------------

def test_reduce_with_integer_operand():
    # An argmax carried along as an int32 operand has no tangent; jax's rule fails on it
    # (it reshapes the symbolic zero), so the oracle is jax on the same reduce with the
    # index as a float, whose value output is the same function.
    x, t = spec_args([(4, 5), (4, 5)], "float64")
    ct = jnp.arange(4.0)

    def ours(x):
        return _argmax_reduce(x, jnp.int32)[0]

    def theirs(x):
        return _argmax_reduce(x, x.dtype)[0]

    @jax.jit
    def both(x, t, ct):
        return [(lib.jvp(f, (x,), (t,)), lib.vjp(f, x)[1](ct))
                for lib, f in ((fungrad, ours), (jax, theirs))]

    actual, expected = both(x, t, ct)
    assert_close(actual, expected)
    index, index_dot = fungrad.jvp(lambda x: _argmax_reduce(x, jnp.int32)[1], (x,), (t,))
    assert_close(index, jnp.argmax(x, axis=1).astype(jnp.int32))
    assert index_dot.dtype == jax.dtypes.float0
    check_grads(ours, (x,), order=2)


@pytest.mark.parametrize("mode", ["jvp", "vjp"])
def test_reduce_init_tangent_refused_like_jax(mode):
    def f(x, init):
        return lax.reduce(x, init, jnp.logaddexp, (0,))

    x, init = jnp.array([0.5, -1.0, 2.0]), jnp.array(-np.inf)
    for lib in (jax, fungrad):
        with pytest.raises(NotImplementedError) as info:
            if mode == "jvp":
                lib.jvp(f, (x, init), (jnp.ones_like(x), jnp.ones_like(init)))
            else:
                lib.vjp(f, x, init)[1](jnp.ones_like(init))
    assert "fungrad" in str(info.value) and "init_values" in str(info.value)
    assert "'reduce'" in str(info.value)
