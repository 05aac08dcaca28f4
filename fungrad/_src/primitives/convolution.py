"""conv_general_dilated: bilinear, each transpose a convolution of its own.

Per spatial dimension, with input length n, lhs dilation a, padding (lo, hi), kernel
length k, rhs dilation r, stride s and output length m, the output is

    out[o] = sum_q xp[o s + q r] w[q],   xp = x dilated by a and padded by (lo, hi),

and features and groups contract as in a matrix product. Transposing:

- to x: `ct` dilated by s, correlated with the spatially reversed kernel (dilation r),
  read at stride a; the kernel's in and out features swap roles.
- to w: x (dilated by a, padded by lo) correlated with `ct` used as a kernel dilated by
  s, read at stride r; batch becomes the contracted dimension, x's features the batch.

Feature groups of the forward convolution become batch groups of the kernel's
transpose and the other way round.
"""

from __future__ import annotations

import numpy as np
from jax import lax

from fungrad._src.jaxutil import prims as p
from fungrad._src.rules import defbilinear
from fungrad._src.zeros import Zero


def _regroup(x, src, dst, groups):
    """Splits dimension `src` into (groups, rest) and merges `groups` into `dst`, major.

    The sizes of `src` and `dst` become `size / groups` and `size * groups`.
    """
    shape = list(x.shape)
    split = lax.reshape(x, (*shape[:src], groups, shape[src] // groups, *shape[src + 1:]))
    kept = [d for d in range(x.ndim + 1) if d != src]  # the dims of `split` but the groups
    at = kept.index(dst + (1 if dst > src else 0))
    moved = lax.transpose(split, (*kept[:at], src, *kept[at:]))
    shape[src] //= groups
    shape[dst] *= groups
    return lax.reshape(moved, tuple(shape))


def _swap_first_two(spec):
    return (spec[1], spec[0], *spec[2:])


def _dilated(size, dilation):
    return 0 if size == 0 else (size - 1) * dilation + 1


def _conv_transpose_lhs(ct, x, w, *, window_strides, padding, lhs_dilation, rhs_dilation,
                        dimension_numbers, feature_group_count, batch_group_count, precision,
                        preferred_element_type, out_sharding):
    # ct_x = ct (dilated by s) correlated with rev(w), features swapped, read at stride a.
    del out_sharding
    lhs_spec, rhs_spec, out_spec = dimension_numbers
    if np.size(ct) == 0:
        return Zero(x.aval.to_tangent_aval())
    groups = max(feature_group_count, batch_group_count)
    if groups > 1:  # the group index moves from the kernel's out features to its in features
        w = _regroup(w, rhs_spec[0], rhs_spec[1], groups)
    pads = []
    for n, k, m, s, (lo, _), a, r in zip(
            (x.aval.shape[d] for d in lhs_spec[2:]), (w.shape[d] for d in rhs_spec[2:]),
            (ct.shape[d] for d in out_spec[2:]), window_strides, padding, lhs_dilation,
            rhs_dilation, strict=True):
        span = _dilated(k, r)
        pads.append((span - 1 - lo, _dilated(n, a) - 1 + lo - _dilated(m, s) + 1))
    out = lax.conv_general_dilated(
        ct, lax.rev(lax.convert_element_type(w, ct.dtype), tuple(rhs_spec[2:])),
        window_strides=lhs_dilation, padding=pads, lhs_dilation=window_strides,
        rhs_dilation=rhs_dilation,
        dimension_numbers=lax.ConvDimensionNumbers(out_spec, _swap_first_two(rhs_spec),
                                                   lhs_spec),
        feature_group_count=groups, precision=precision,
        preferred_element_type=preferred_element_type)
    if batch_group_count > 1:  # the groups were batch groups: move them back to the batch
        out = _regroup(out, lhs_spec[1], lhs_spec[0], batch_group_count)
    return lax.convert_element_type(out, x.aval.dtype)


def _conv_transpose_rhs(ct, x, w, *, window_strides, padding, lhs_dilation, rhs_dilation,
                        dimension_numbers, feature_group_count, batch_group_count, precision,
                        preferred_element_type, out_sharding):
    # ct_w[q] = sum_o xp[q r + o s] ct[o]: x correlated with ct as the kernel, stride r.
    del out_sharding
    lhs_spec, rhs_spec, out_spec = dimension_numbers
    if np.size(ct) == 0:
        return Zero(w.aval.to_tangent_aval())
    pads = []
    for n, k, m, s, (lo, _), a, r in zip(
            (x.shape[d] for d in lhs_spec[2:]), (w.aval.shape[d] for d in rhs_spec[2:]),
            (ct.shape[d] for d in out_spec[2:]), window_strides, padding, lhs_dilation,
            rhs_dilation, strict=True):
        pads.append((lo, _dilated(k, r) + _dilated(m, s) - _dilated(n, a) - lo - 1))
    out = lax.conv_general_dilated(
        lax.convert_element_type(x, ct.dtype), ct, window_strides=rhs_dilation, padding=pads,
        lhs_dilation=lhs_dilation, rhs_dilation=window_strides,
        dimension_numbers=lax.ConvDimensionNumbers(
            _swap_first_two(lhs_spec), _swap_first_two(out_spec), _swap_first_two(rhs_spec)),
        feature_group_count=batch_group_count, batch_group_count=feature_group_count,
        precision=precision, preferred_element_type=preferred_element_type)
    return lax.convert_element_type(out, w.aval.dtype)


defbilinear(p.conv_general_dilated_p, _conv_transpose_lhs,  # d conv(x, w) = conv(dx, w) + conv(x, dw)
            _conv_transpose_rhs)
