"""Spec table for conv_general_dilated: layouts, strides, paddings, dilations and groups."""

import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from tests.harness import check_all

SECOND_ORDER = "second order"


def _conv(**kwargs):
    return lambda x, w: lax.conv_general_dilated(x, w, **kwargs)


# (id, convolution parameters, lhs shape, rhs shape[, SECOND_ORDER]).
CASES = [
    ("2d/NCHW_OIHW/strides_asym_negative_pad_dilations",
     dict(window_strides=(2, 1), padding=[(1, 2), (0, -1)], lhs_dilation=(2, 1),
          rhs_dilation=(1, 2)), (2, 3, 6, 7), (4, 3, 3, 2), SECOND_ORDER),
    ("2d/NHWC_HWIO/feature_groups_rhs_dilation",
     dict(window_strides=(2, 2), padding=[(1, 1), (2, 0)], rhs_dilation=(2, 1),
          dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=2),
     (2, 7, 6, 4), (3, 2, 2, 6), SECOND_ORDER),
    ("2d/NHWC_HWIO_NCHW/batch_groups_lhs_dilation",
     dict(window_strides=(1, 2), padding=[(0, 1), (1, 1)], lhs_dilation=(1, 3),
          dimension_numbers=("NHWC", "HWIO", "NCHW"), batch_group_count=2),
     (4, 5, 6, 3), (2, 3, 3, 4), SECOND_ORDER),
    ("1d/NWC_WIO/depthwise_SAME_size1_batch",
     dict(window_strides=(2,), padding="SAME", dimension_numbers=("NWC", "WIO", "NWC"),
          feature_group_count=3), (1, 7, 3), (3, 1, 6)),
    ("3d/NCDHW_OIDHW/size1_window_dim",
     dict(window_strides=(1, 1, 2), padding=[(0, 0), (1, 0), (1, 1)], rhs_dilation=(1, 2, 1),
          dimension_numbers=("NCDHW", "OIDHW", "NCDHW")), (1, 2, 3, 5, 5), (2, 2, 1, 2, 3)),
    ("2d/permuted_specs_stride_skips_tail_precision",
     dict(window_strides=(1, 3), padding=[(2, 0), (0, 0)], dimension_numbers=("HNCW", "IWOH", "WCNH"),
          precision=lax.Precision.HIGHEST, preferred_element_type="same"),
     (5, 2, 3, 8), (3, 2, 4, 2)),
    ("2d/size0_batch", dict(window_strides=(1, 1), padding="VALID"), (0, 2, 4, 4), (3, 2, 2, 2)),
]


def check_cases(cases, **options):
    """`check_all` over all `cases` at once, as one function of all their arguments.

    Each case is `(id, function, args)`. One traced program per library for the whole
    table keeps the compile time down; on a failure each case is checked alone so that
    the error names the culprit.
    """
    sizes = [len(args) for _, _, args in cases]
    flat = [a for _, _, args in cases for a in args]

    def together(*xs):
        outs, start = [], 0
        for (_, fn, _), n in zip(cases, sizes, strict=True):
            outs.append(fn(*xs[start:start + n]))
            start += n
        return tuple(outs)

    try:
        check_all(together, flat, **options)
    except AssertionError:
        for name, fn, args in cases:
            try:
                check_all(fn, args, **options)
            except AssertionError as e:
                raise AssertionError(f"case {name}: {e}") from e
        raise


def _instances(cases, dtype, second_order_only=False):
    rng = np.random.default_rng(0)
    out = []
    for name, kwargs, lhs_shape, rhs_shape, *tier in cases:
        if second_order_only and tier != [SECOND_ORDER]:
            continue
        if kwargs.get("preferred_element_type") == "same":
            kwargs = {**kwargs, "preferred_element_type": jnp.dtype(dtype)}
        args = [rng.standard_normal(lhs_shape).astype(dtype),
                rng.standard_normal(rhs_shape).astype(dtype)]
        out.append((name, _conv(**kwargs), args))
    return out


def _conv_of_shared_input(x):
    # The same array as both operands: both terms of the bilinear rule at once.
    return lax.conv_general_dilated(x, x[:, :, :2, :2], (1, 1), [(1, 0), (0, 1)])


# Every case at first order in both dtypes (float64 also against finite differences);
# the marked ones at second order too. Float32 rounding defeats the finite differences.

@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_first_order(dtype):
    shared = ("shared_input", _conv_of_shared_input,
              [np.random.default_rng(1).standard_normal((2, 2, 4, 4)).astype(dtype)])
    check_cases([*_instances(CASES, dtype), shared], order=1, fd=dtype == "float64")


def test_second_order():
    shared = ("shared_input", _conv_of_shared_input,
              [np.random.default_rng(1).standard_normal((2, 2, 4, 4))])
    check_cases([*_instances(CASES, "float64", second_order_only=True), shared], fd=False)
