"""Spec table for windowed reductions (sum, average and max pooling as flax and equinox
write them), select_and_scatter_add / select_and_gather_add, and the generic reduce_window."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax._src.lax.windowed_reductions import _select_and_scatter
from jax.extend.core import primitives as prims

import fungrad
from tests.harness import assert_close, check_all, check_finite_differences, random_like
from tests.primitives.test_convolution import check_cases

SECOND_ORDER = "second order"


def _sum_pool(*args, **kwargs):
    return lambda x: lax.reduce_window(x, 0.0, lax.add, *args, **kwargs)


def _avg_pool(x):  # flax.linen.avg_pool: a window sum divided by the window size
    return lax.reduce_window(x, 0.0, lax.add, (1, 2, 2, 1), (1, 2, 2, 1), "VALID") / 4.0


def _max_pool(*args, **kwargs):  # flax.linen.max_pool, equinox.nn.MaxPool2d
    return lambda x: lax.reduce_window(x, -jnp.inf, lax.max, *args, **kwargs)


def _min_pool(*args, **kwargs):
    return lambda x: lax.reduce_window(x, jnp.inf, lax.min, *args, **kwargs)


def _bind(prim, **params):
    return lambda *args: prim.bind(*args, **params)


_GATHER = {"window_dimensions": (2, 3), "window_strides": (2, 1), "padding": ((1, 0), (1, 1))}

# (id, function, argument shapes[, SECOND_ORDER]); each shape becomes a random array.
CASES = [
    ("sum/valid_strides", _sum_pool((1, 2, 3), (1, 2, 1)), [(2, 7, 6)], SECOND_ORDER),
    ("sum/asym_negative_pad_dilations",
     _sum_pool((3, 2), (2, 3), [(1, 2), (2, -1)], (2, 1), (1, 2)), [(7, 6)], SECOND_ORDER),
    ("sum/avg_pool_NHWC", _avg_pool, [(2, 5, 4, 3)]),
    ("sum/size1_window_and_dim", _sum_pool((1, 3), (1, 2), "SAME"), [(1, 5)]),
    ("sum/window_beyond_padding", _sum_pool((2,), (1,), [(4, 3)]), [(3,)]),
    ("max/pool_NCHW_SAME", _max_pool((1, 1, 2, 2), (1, 1, 2, 2), "SAME"), [(2, 3, 5, 4)],
     SECOND_ORDER),
    ("max/overlapping_base_dilation_padding",
     _max_pool((2, 3), (1, 2), [(1, 1), (0, 2)], (2, 1)), [(4, 5)], SECOND_ORDER),
    ("max/window_dilation", _max_pool((2, 2), (1, 1), "VALID", None, (2, 1)), [(5, 4)]),
    ("max/size0", _max_pool((1, 2), (1, 1)), [(0, 3)]),
    ("min/strides_padding", _min_pool((3, 1, 2), (2, 1, 1), [(1, 1), (0, 0), (0, 1)]),
     [(5, 1, 4)], SECOND_ORDER),
    ("select_and_scatter_add/ge",
     _bind(prims.select_and_scatter_add_p, select_prim=lax.ge_p, **_GATHER), [(3, 6), (6, 6)],
     SECOND_ORDER),
    ("select_and_gather_add/le_base_dilation",
     _bind(prims.select_and_gather_add_p, select_prim=lax.le_p, base_dilation=(1, 2),
           window_dilation=(1, 1), **_GATHER), [(5, 3), (5, 3)], SECOND_ORDER),
]

# Window dilation has no reverse mode in jax (select_and_gather_add's transpose).
FORWARD_ONLY = {"max/window_dilation"}


def _instances(dtype, second_order_only=False):
    rng = np.random.default_rng(0)
    out = []
    for name, fn, shapes, *tier in CASES:
        if second_order_only and tier != [SECOND_ORDER]:
            continue
        out.append((name, fn, [rng.standard_normal(s).astype(dtype) for s in shapes]))
    return out


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_first_order(dtype):
    cases = _instances(dtype)
    fd = dtype == "float64"  # float32 rounding defeats the finite differences
    check_cases([c for c in cases if c[0] not in FORWARD_ONLY], order=1, fd=fd)
    check_cases([c for c in cases if c[0] in FORWARD_ONLY], modes=("fwd",), fd=fd)


def test_second_order():
    check_cases(_instances("float64", second_order_only=True), fd=False)


# --- jax's conventions where the derivative is not unique -----------------------------
# Finite differences do not apply at a tie; jax's own transforms are the oracle.

TIES = np.array([[1.0, 3.0, 3.0, 2.0, 3.0, 0.0],
                 [2.0, 3.0, 2.0, 2.0, -1.0, -1.0],
                 [3.0, 3.0, 0.0, 2.0, 4.0, 4.0],
                 [0.0, 0.0, 0.0, 0.0, -1.0, 0.0]])


def test_ties_follow_jax():
    def pools(x):
        return (_max_pool((2, 2), (1, 1))(x), _min_pool((2, 3), (2, 1), "SAME")(x),
                _max_pool((3, 2), (1, 2), [(1, 1), (0, 0)], (2, 1))(x))

    check_all(pools, [TIES], fd=False)


# --- reduce_window with a computation: forward mode only, as in jax ---------------------

def _product_pool(x):
    return lax.reduce_window(x, x.dtype.type(1.0), lax.mul, (2, 2), (1, 2), [(0, 1), (1, 0)])


def _offset_sum(x):  # an init value that is not the identity: the generic primitive
    return lax.reduce_window(x, x.dtype.type(0.5), lax.add, (3,), (2,), "SAME")


def _variadic(x, y):  # value and tangent of a max carried together, as a pair
    def pick(a, b):
        take_a = a[0] >= b[0]
        return lax.select(take_a, a[0], b[0]), lax.select(take_a, a[1], b[1]) * a[1]
    inits = (x.dtype.type(-np.inf), y.dtype.type(1.0))
    return lax.reduce_window((x, y), inits, pick, (2, 2), (1, 1), "VALID")


def _partly_known(x):  # one operand has no tangent: partial evaluation splits the reduction
    const = jnp.arange(20.0, dtype=x.dtype).reshape(4, 5)
    return _variadic(const, x)


GENERIC = [
    ("mul", _product_pool, [(4, 5)]),
    ("add_nonidentity_init", _offset_sum, [(7,)]),
    ("variadic", _variadic, [(4, 5), (4, 5)]),
]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_generic_reduce_window_forward(dtype):
    rng = np.random.default_rng(0)
    cases = [(name, fn, [rng.standard_normal(s).astype(dtype) for s in shapes])
             for name, fn, shapes in GENERIC]
    check_cases(cases, modes=("fwd",), fd=dtype == "float64")


def test_generic_reduce_window_partly_known_and_linearize():
    # jax's rule needs a tangent array for every operand (it fails on a symbolic zero) and
    # jax cannot linearize a generic reduce_window; fungrad can, by staging the whole
    # reduction again (as for while). The oracle: jax.jvp with explicit zero tangents.
    rng = np.random.default_rng(1)
    x, y, t, u = (rng.standard_normal((4, 5)) for _ in range(4))
    const = jnp.arange(20.0).reshape(4, 5)
    expected = jax.jvp(_variadic, (const, x), (jnp.zeros((4, 5)), t))
    assert_close(fungrad.jvp(_partly_known, (x,), (t,)), expected)
    out, f_lin = fungrad.linearize(_partly_known, x)
    assert_close((out, f_lin(t)), expected)
    out, f_lin = fungrad.linearize(_variadic, x, y)
    assert_close((out, f_lin(t, u)), jax.jvp(_variadic, (x, y), (t, u)))


def test_generic_reduce_window_second_order_forward():
    # jax's own rule fails at second order (a symbolic zero tangent again): fungrad's jvp
    # of jvp is checked against central differences of its first-order jvp, which
    # itself matches jax's above.
    rng = np.random.default_rng(2)
    x, y, t, u, v, w = (rng.standard_normal((4, 5)) for _ in range(6))

    def first(x, y):
        return fungrad.jvp(_variadic, (x, y), (t, u))[1]

    eps = 1e-6
    fd = [(p - m) / (2 * eps) for p, m in zip(first(x + eps * v, y + eps * w),
                                              first(x - eps * v, y - eps * w), strict=True)]
    second = fungrad.jvp(first, (x, y), (v, w))[1]
    for actual, approx in zip(second, fd, strict=True):
        np.testing.assert_allclose(actual, approx, rtol=1e-5, atol=1e-5)


def _argmax_pool(x):  # the maximum and its flat index, carried together
    def pick(a, b):
        take_a = a[0] >= b[0]
        return lax.select(take_a, a[0], b[0]), lax.select(take_a, a[1], b[1])
    index = lax.iota(np.int32, x.size).reshape(x.shape)
    return lax.reduce_window((x, index), (x.dtype.type(-np.inf), np.int32(0)), pick, (2, 3),
                             (1, 2), "VALID")


def test_generic_reduce_window_with_integer_operand():
    # jax's rule fails on the integer operand's symbolic zero tangent; fungrad reduces
    # the index without a tangent. Oracles: finite differences, and jax's max pooling.
    x = np.random.default_rng(4).standard_normal((4, 7))
    check_finite_differences(_argmax_pool, [x], np.random.default_rng(0))
    t = np.random.default_rng(5).standard_normal((4, 7))
    (value, index), (value_dot, index_dot) = fungrad.jvp(_argmax_pool, (x,), (t,))
    assert index_dot.dtype == jax.dtypes.float0
    expected = jax.jvp(_max_pool((2, 3), (1, 2)), (x,), (t,))
    assert_close((value, value_dot), expected)


@pytest.mark.parametrize("f", [_product_pool, _partly_known], ids=["mul", "partly_known"])
def test_generic_reduce_window_has_no_reverse_mode(f):
    x = np.random.default_rng(2).standard_normal((4, 5))
    with pytest.raises(ValueError):  # jax: "Linearization failed ..."
        jax.vjp(f, x)
    with pytest.raises(NotImplementedError, match="reverse mode through reduce_window"):
        fungrad.vjp(f, x)[1](random_like(jax.eval_shape(f, x), np.random.default_rng(0)))


def test_reduce_window_init_value_tangent_raises():
    def f(x, init):
        return lax.reduce_window(x, init, lax.add, (2,), (1,), "VALID")

    args, dots = (np.ones(4), 2.0), (np.ones(4), 1.0)
    with pytest.raises(TypeError, match="init_value"):
        jax.jvp(f, args, dots)
    with pytest.raises(TypeError, match="reduce_window.*init_value"):
        fungrad.jvp(f, args, dots)


def test_max_pool_with_window_dilation_has_no_reverse_mode():
    f = _max_pool((2, 2), (1, 1), "VALID", None, (2, 1))
    x = np.random.default_rng(3).standard_normal((5, 4))
    with pytest.raises(NotImplementedError, match="window dilation"):
        jax.grad(lambda x: f(x).sum())(x)
    with pytest.raises(NotImplementedError, match="select_and_gather_add.*window_dilation"):
        fungrad.grad(lambda x: f(x).sum())(x)


def test_select_and_scatter_is_not_differentiated():
    def f(x, source):
        return _select_and_scatter(x, lax.ge, (2,), (2,), [(0, 0)], source, 0.0, lax.add)

    args, dots = (np.arange(6.0), np.ones(3)), (np.ones(6), np.ones(3))
    with pytest.raises(NotImplementedError):
        jax.jvp(f, args, dots)
    with pytest.raises(NotImplementedError, match="select_and_scatter"):
        fungrad.jvp(f, args, dots)
