"""Spec table for the shape, type and layout rules, select_n, dot_general and zero-derivative ops."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import fungrad
from tests.harness import check_case, spec_args


def _other_float(x):
    return jnp.float64 if x.dtype == jnp.float32 else jnp.float32


def _via_int(x):
    # The integer path carries no derivative; the float path around it does.
    rounded = lax.convert_element_type(lax.convert_element_type(x * 3, jnp.int32), x.dtype)
    return x * rounded + lax.convert_element_type(x, jnp.float64).astype(x.dtype) ** 2


def _comparisons(x):
    mask = (x > 0.1) & ~(x < -1.0) | (x == x[..., :1]) ^ (x <= -0.5) & (x != 2.0) | (x >= 1.5)
    return jnp.where(mask, x, 2 * x)


def _bits(x):
    i = lax.convert_element_type(x * 8, jnp.int32)
    one, two = np.int32(1), np.int32(2)
    j = lax.shift_left(i, one) + lax.shift_right_arithmetic(i, one) + lax.shift_right_logical(i, two)
    k = lax.population_count(j) + lax.clz(j) + (j & 5) + (j | 2) + (j ^ 1) + ~j
    return x * lax.convert_element_type(k, x.dtype)


NO_FD = {"fd": False}

# (id, function, argument shapes[, check_all options]): each shape becomes a random array
# of the test dtype.
CASES = [
    ("convert/to_f64", lambda x: lax.convert_element_type(x, jnp.float64) * 2, [(3, 4)]),
    # Float32 rounding defeats the float64 finite differences: jax is the oracle here.
    ("convert/to_f32", lambda x: lax.convert_element_type(x, jnp.float32) ** 2, [(3, 4)], NO_FD),
    ("convert/scalar", lambda x: lax.convert_element_type(x, _other_float(x)), [()], NO_FD),
    ("convert/via_int", _via_int, [(5,)]),
    ("broadcast_in_dim/new_dims", lambda x: lax.broadcast_in_dim(x, (2, 3, 4), (1,)), [(3,)]),
    ("broadcast_in_dim/scalar", lambda x: lax.broadcast_in_dim(x, (2, 3), ()), [()]),
    ("broadcast_in_dim/stretch_size1", lambda x: lax.broadcast_in_dim(x, (2, 3, 4), (1, 2)),
     [(1, 4)]),
    ("broadcast_in_dim/size0", lambda x: lax.broadcast_in_dim(x, (2, 0, 3), (1, 2)), [(0, 3)]),
    ("broadcast_to", lambda x: jnp.broadcast_to(x, (2, 3, 4)) * jnp.arange(4.0), [(3, 1)]),
    ("reshape/basic", lambda x: lax.reshape(x, (2, 6)), [(3, 4)]),
    ("reshape/dimensions", lambda x: lax.reshape(x, (2, 6), dimensions=(1, 0)) ** 2, [(3, 4)]),
    ("reshape/scalar", lambda x: lax.reshape(x, (1, 1)), [()]),
    ("reshape/size0", lambda x: lax.reshape(x, (3, 0)), [(0, 3)]),
    ("squeeze/two_dims", lambda x: lax.squeeze(x, (0, 2)) ** 2, [(1, 3, 1)]),
    ("squeeze/to_scalar", lambda x: lax.squeeze(x, (0,)), [(1,)]),
    ("expand_dims/jnp", lambda x: jnp.expand_dims(x, (0, 2)) * x[:, None], [(3, 4)]),
    ("expand_dims/lax_scalar", lambda x: lax.expand_dims(x, (0,)), [()]),
    ("transpose/3d", lambda x: lax.transpose(x, (2, 0, 1)) ** 2, [(2, 3, 4)]),
    ("transpose/size0", lambda x: x.T, [(0, 3)]),
    ("rev/both", lambda x: lax.rev(x, (0, 1)) * x, [(3, 4)]),
    ("rev/size1", lambda x: jnp.flip(x, 0), [(1,)]),
    ("concatenate/axis0", lambda x, y: jnp.concatenate([x, y]) ** 2, [(2, 3), (4, 3)]),
    ("concatenate/size0", lambda x, y, z: lax.concatenate([x, y, z], 1), [(2, 0), (2, 3), (2, 1)]),
    ("concatenate/with_const", lambda x: jnp.concatenate([jnp.ones(2, x.dtype), x, x]), [(3,)]),
    ("split/pieces", lambda x: [y * (i + 1) for i, y in enumerate(jnp.split(x, [1, 3], axis=1))],
     [(2, 5)]),
    ("split/one_piece_used", lambda x: jnp.split(x, 2)[1] ** 2, [(4, 3)]),
    ("stack/axis1", lambda x, y: jnp.stack([x, y * y, x], axis=1), [(2, 3), (2, 3)]),
    ("stack/scalars", lambda x, y: jnp.stack([x, y]) ** 2, [(), ()]),
    ("unstack/some_used", lambda x: lax.unstack(x, 1)[0] * lax.unstack(x, 1)[2], [(2, 3)]),
    ("tile/reps", lambda x: jnp.tile(x, (2, 1, 3)) ** 2, [(2, 3)]),
    ("tile/size1", lambda x: jnp.tile(x, 3), [(1,)]),
    ("pad/interior",
     lambda x, v: lax.pad(x, v, ((1, 2, 0), (0, 1, 1))) ** 2, [(2, 3), ()]),
    ("pad/negative",
     lambda x, v: lax.pad(x, v, ((-1, 2, 1), (2, -3, 0), (-1, -1, 2))), [(3, 4, 2), ()]),
    ("pad/jnp_const_value", lambda x: jnp.pad(x, ((1, 0), (2, 1))) * 3, [(2, 2)]),
    ("pad/size0", lambda x, v: lax.pad(x, v, ((1, 1, 1), (0, 2, 0))), [(0, 3), ()]),
    ("pad/size1", lambda x, v: lax.pad(x, v, ((0, 0, 3),)), [(1,), ()]),
    ("copy", lambda x: jnp.copy(x) * lax.copy_p.bind(x), [(3,)]),
    ("select_n/bool", lambda p, x, y: lax.select_n(p > 0, x, y) ** 2, [(3, 4), (3, 4), (3, 4)]),
    ("select_n/three_cases",
     lambda p, x, y, z: lax.select_n(jnp.clip(p + 1, 0, 2).astype(jnp.int32), x, y, z),
     [(5,), (5,), (5,), (5,)]),
    ("select_n/scalar_pred", lambda p, x, y: lax.select_n(p > 0, x, y * 2), [(), (2, 3), (2, 3)]),
    ("select_n/const_case", lambda x: jnp.where(x > 0, x, 0.5), [(4,)]),
    ("dot/matmul", lambda x, y: x @ y, [(3, 4), (4, 2)]),
    ("dot/vector", lambda x, y: jnp.dot(x, y), [(4,), (4,)]),
    ("dot/batch", lambda x, y: lax.dot_general(x, y, (((2,), (1,)), ((0,), (0,)))),
     [(2, 3, 4), (2, 4, 5)]),
    ("dot/unsorted_contract", lambda x, y: lax.dot_general(x, y, (((2, 1), (0, 2)), ((), ()))),
     [(3, 4, 5), (5, 2, 4)]),
    ("dot/batch_not_leading",
     lambda x, y: lax.dot_general(x, y, (((2,), (0,)), ((1,), (1,)))), [(3, 2, 4), (4, 2, 5)]),
    ("dot/einsum", lambda x, y: jnp.einsum("bij,bkj->bki", x, y), [(2, 3, 4), (2, 5, 4)]),
    ("dot/einsum_full", lambda x, y: jnp.einsum("ij,ij->", x, y), [(3, 4), (3, 4)]),
    ("dot/size0_contract", lambda x, y: x @ y, [(3, 0), (0, 2)]),
    ("dot/size1", lambda x, y: x @ y, [(1, 1), (1, 3)]),
    ("dot/preferred_f64",
     lambda x, y: lax.dot_general(x, y, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float64),
     [(3, 4), (4, 2)]),
    ("dot/mixed_precision", lambda x, y: x @ y.astype(_other_float(y)), [(3, 4), (4, 2)], NO_FD),
    ("iota", lambda x: x * lax.iota(x.dtype, 4) + jnp.arange(4, dtype=x.dtype) ** 2 * x, [(4,)]),
    ("stop_gradient", lambda x: x * lax.stop_gradient(x) + lax.stop_gradient(x) ** 2, [(3,)], NO_FD),
    ("comparisons", _comparisons, [(2, 5)]),
    ("bits", _bits, [(6,)]),
    ("reduce_and_or", lambda x: x * jnp.all(x > -1, axis=0) + jnp.any(x > 1, axis=0), [(3, 2)]),
]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_rule(case, dtype):
    check_case(case, spec_args(case[2], dtype), light=dtype == "float32")


def test_bitcast_and_integer_internals_have_zero_derivative_as_in_jax():
    def f(x):
        bits = lax.bitcast_convert_type(x, jnp.int32)
        hi = lax.mul(bits, bits) // 7  # integer work: no tangent
        return jnp.sin(x) * hi.astype(x.dtype)

    x = jnp.linspace(0.5, 1.5, 4, dtype=jnp.float32)
    np.testing.assert_allclose(fungrad.grad(lambda x: f(x).sum())(x),
                               jax.grad(lambda x: f(x).sum())(x), rtol=1e-6)
