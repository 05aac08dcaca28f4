"""ragged_dot_general in each of its modes, against dense references and jax.

jax transposes only the non-contracting mode, and its rhs cotangent is a contracting-
mode product it cannot transpose again: so every case compares fungrad's derivatives
(jvp, vjp, forward and reverse over reverse) with jax's derivatives of a dense einsum
written out here (the groups as a 0/1 membership mask), plus float64 finite
differences; where jax can (`lax.ragged_dot`, first order), also with jax's own.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import fungrad
from tests.harness import (
    assert_close,
    check_all,
)

RD = lax.RaggedDotDimensionNumbers
F32, F64 = "float32", "float64"


def _member(group_sizes, size: int, dtype):
    """mask[..., g, i] = 1 where index i of the ragged dimension is in group g."""
    ends = jnp.cumsum(group_sizes, axis=-1)
    starts = ends - group_sizes
    i = jnp.arange(size)
    inside = (starts[..., None] <= i) & (i < ends[..., None])
    return inside.astype(dtype)


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    fun: Callable[..., Any]
    ref: Callable[..., Any]
    shapes: tuple[tuple[int, ...], ...]
    group_sizes: tuple[Any, ...]  # the last arguments (integers), passed as given
    dtype: str
    order: int = 1
    jax_vjp: bool = False  # jax can transpose it: compare with jax's own first order too


# --- mode 1, non-contracting: lax.ragged_dot -------------------------------------------

def _ragged_dot(x, y, gs):
    return lax.ragged_dot(x, y, gs)


def _ragged_dot_ref(x, y, gs):
    return jnp.einsum("gm,mk,gkn->mn", _member(gs, x.shape[0], x.dtype), x, y)


def _ragged_dot_f64(x, y, gs):
    return lax.ragged_dot(x, y, gs, preferred_element_type=jnp.float64)


def _ragged_dot_f64_ref(x, y, gs):
    return _ragged_dot_ref(x.astype(jnp.float64), y.astype(jnp.float64), gs)


# batch dim 0, ragged m (lhs dim 1), rhs (b, k, g, n) grouped on dim 2, sizes per batch
_DN_BATCHED = RD((([2], [1]), ([0], [0])), [1], [2])


def _batched(x, y, gs):
    return lax.ragged_dot_general(x, y, gs, _DN_BATCHED)


def _batched_ref(x, y, gs):
    return jnp.einsum("bgm,bmk,bkgn->bmn", _member(gs, x.shape[1], x.dtype), x, y)


# --- mode 2, contracting -----------------------------------------------------------------

_DN_CONTRACTING = RD((([1], [0]), ([], [])), [1], [])  # (m, k) (k, n) -> (g, m, n)


def _contracting(x, y, gs):
    return lax.ragged_dot_general(x, y, gs, _DN_CONTRACTING)


def _contracting_ref(x, y, gs):
    return jnp.einsum("gk,mk,kn->gmn", _member(gs, x.shape[1], x.dtype), x, y)


# Contracting dims listed out of order (k2 before the ragged k1), a batch dim, sizes of
# shape (b, k2, g): x (b, k1, m, k2), y (b, k2, k1, n) -> (g, b, m, n).
_DN_CONTRACTING_2 = RD((([3, 1], [1, 2]), ([0], [0])), [1], [])


def _contracting_2(x, y, gs):
    return lax.ragged_dot_general(x, y, gs, _DN_CONTRACTING_2)


def _contracting_2_ref(x, y, gs):
    return jnp.einsum("bqgk,bkmq,bqkn->gbmn", _member(gs, x.shape[1], x.dtype), x, y)


# --- mode 3, batch -----------------------------------------------------------------------

_DN_BATCH = RD((([2], [1]), ([0], [0])), [0], [])  # (b, m, k) (b, k, n), b ragged


def _batch(x, y, gs):
    return lax.ragged_dot_general(x, y, gs, _DN_BATCH)


def _batch_ref(x, y, gs):
    del gs  # a batch dimension's groups change nothing
    return jnp.einsum("bmk,bkn->bmn", x, y)


def _gs(*sizes):
    return np.array(sizes, np.int32)


CASES = [
    # name, function, dense reference, operand shapes, group sizes, dtype, options
    Case("ragged_dot", _ragged_dot, _ragged_dot_ref, ((6, 3), (3, 3, 2)), (_gs(2, 1, 3),), F64,
         order=2),
    Case("ragged_dot", _ragged_dot, _ragged_dot_ref, ((6, 3), (3, 3, 2)), (_gs(2, 1, 3),), F32,
         jax_vjp=True),
    Case("ragged_dot_empty_group", _ragged_dot, _ragged_dot_ref, ((6, 3), (3, 3, 2)),
         (_gs(2, 0, 4),), F64, jax_vjp=True),
    Case("ragged_dot_short_groups", _ragged_dot, _ragged_dot_ref, ((6, 3), (3, 3, 2)),
         (_gs(1, 2, 1),), F32),  # rows 4 and 5 are in no group: 0
    Case("ragged_dot_long_groups", _ragged_dot, _ragged_dot_ref, ((5, 2), (2, 2, 3)),
         (_gs(3, 4),), F64),  # the groups run past m: cut at m
    Case("ragged_dot_preferred_f64", _ragged_dot_f64, _ragged_dot_f64_ref, ((4, 3), (2, 3, 2)),
         (_gs(3, 1),), F32),
    Case("general_batched_sizes", _batched, _batched_ref, ((2, 5, 3), (2, 3, 2, 4)),
         (np.array([[2, 3], [0, 4]], np.int32),), F64, order=2),
    Case("contracting", _contracting, _contracting_ref, ((3, 6), (6, 2)), (_gs(2, 0, 3),), F64,
         order=2),
    Case("contracting", _contracting, _contracting_ref, ((3, 6), (6, 2)), (_gs(2, 0, 3),), F32),
    Case("contracting_batched_unsorted", _contracting_2, _contracting_2_ref,
         ((2, 3, 2, 2), (2, 2, 3, 2)),
         (np.array([[[1, 2], [3, 0]], [[0, 0], [2, 1]]], np.int32),), F64),
    Case("batch", _batch, _batch_ref, ((3, 2, 3), (3, 3, 2)), (_gs(1, 2),), F64, order=2),
    Case("batch", _batch, _batch_ref, ((3, 2, 3), (3, 3, 2)), (_gs(1, 2),), F32),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.name}-{c.dtype}")
def test_ragged_dot_general(case):
    rng = np.random.default_rng(len(case.name))
    operands = tuple(rng.standard_normal(s).astype(case.dtype) for s in case.shapes)
    args = (*operands, *case.group_sizes)
    check_all(case.fun, args, ref=case.ref, order=case.order)
    if case.jax_vjp:
        check_all(case.fun, args, order=1, fd=False)


def test_tangent_wrt_one_operand():
    """A zero tangent for one operand stays symbolic; group sizes closed over."""
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((6, 3)), rng.standard_normal((3, 3, 2))
    gs = _gs(2, 0, 4)
    check_all(lambda x: _ragged_dot(x, y, gs), (x,), ref=lambda x: _ragged_dot_ref(x, y, gs))
    z = rng.standard_normal((6, 2))
    check_all(lambda z: _contracting(x.T, z, gs), (z,),
              ref=lambda z: _contracting_ref(x.T, z, gs), order=1)


def test_under_jit_and_grad():
    """grad of a jitted MoE-style layer equals jax's gradient of it."""
    rng = np.random.default_rng(1)
    x, w = rng.standard_normal((6, 3)), rng.standard_normal((3, 3, 2))
    gs = _gs(1, 3, 2)

    @jax.jit
    def loss(x, w):
        return jnp.sum(jnp.tanh(lax.ragged_dot(x, w, gs)) ** 2)

    assert_close(jax.jit(fungrad.grad(loss, argnums=(0, 1)))(x, w),
                 jax.grad(loss, argnums=(0, 1))(x, w))
