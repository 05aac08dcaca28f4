"""Sparsity detection: the dependency-set algebra and one rule per primitive family.

An abstract value is either a *known* numpy array (a constant of the program: it depends
on no input) or a `Deps`: for each element of an array, the sorted set of input indices
it may depend on, stored as the rows of a CSR matrix (size x n). A rule maps the abstract
values of an equation's inputs to those of its outputs, and, when the interpreter tracks
second order, reports the Hessian pairs the equation may create to `ctx.hessian_pairs`.

Second order, globally: for v = phi(u_1, ..., u_k),
d2f = sum over equations of (df/dv) * sum_ab (d2 phi / du_a du_b) grad(u_a) grad(u_b)^T
(+ first-order terms through later equations), so the Hessian pattern is contained in the
union, over the equations, of set products deps(u_a) x deps(u_b) over the pairs (a, b)
with a second derivative that is not identically zero. Linear and piecewise-linear
equations (add, slicing, reductions, max, abs, select, sort...) add none; bilinear ones
(mul, dot_general, conv) add only the cross products of their two operands.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from fungrad._src import jaxutil
from fungrad._src.jaxutil import ClosedJaxpr, Jaxpr, JaxprEqn, Primitive, prims


class Deps:
    """Per element of an array of `shape` (row-major), the sorted, unique input indices it
    may depend on: row r is `indices[indptr[r]:indptr[r + 1]]`."""

    __slots__ = ("indices", "indptr", "shape")

    def __init__(self, shape: Sequence[int], indptr: np.ndarray, indices: np.ndarray):
        self.shape = tuple(int(s) for s in shape)
        self.indptr = indptr
        self.indices = indices
        assert indptr.shape == (self.size + 1,), (indptr.shape, self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nnz(self) -> int:
        return int(self.indptr[-1])

    def lengths(self) -> np.ndarray:
        return np.diff(self.indptr)

    def row_ids(self) -> np.ndarray:
        return np.repeat(np.arange(self.size, dtype=np.int64), self.lengths())

    def reshape(self, shape: Sequence[int]) -> Deps:
        return Deps(shape, self.indptr, self.indices)


Value = Any  # np.ndarray (known) or Deps


class Context(Protocol):
    """What rules need from the interpreter."""

    tracks_hessian: bool

    def hessian_pairs(self, rows: np.ndarray, cols: np.ndarray) -> None: ...

    def eval_jaxpr(self, jaxpr: Jaxpr, consts: Sequence[Value],
                   args: Sequence[Value]) -> list[Value]: ...

    def fresh(self) -> Context:
        """An interpreter of first-order dependencies only, for sets over other indices."""
        ...


# ---------------------------------------------------------------------------------------
# The set algebra (vectorized numpy; no Python loop over elements).

_I64 = np.int64


def empty(shape: Sequence[int]) -> Deps:
    return Deps(shape, np.zeros(math.prod(shape) + 1, _I64), np.zeros(0, _I64))


def identity(shape: Sequence[int], offset: int) -> Deps:
    """Element k depends on input offset + k: a differentiated argument."""
    size = math.prod(shape)
    return Deps(shape, np.arange(size + 1, dtype=_I64), np.arange(offset, offset + size, dtype=_I64))


def is_known(x: Value) -> bool:
    return not isinstance(x, Deps)


def as_deps(x: Value, shape: Sequence[int]) -> Deps:
    return x if isinstance(x, Deps) else empty(shape)


def from_pairs(shape: Sequence[int], rows: np.ndarray, cols: np.ndarray) -> Deps:
    """The sets {cols[p] : rows[p] = r}, sorted and without duplicates."""
    size = math.prod(shape)
    if rows.size == 0:
        return empty(shape)
    width = int(cols.max()) + 1
    r, c = np.divmod(sorted_unique(rows.astype(_I64) * width + cols), width)
    indptr = np.zeros(size + 1, _I64)
    np.cumsum(np.bincount(r, minlength=size), out=indptr[1:])
    return Deps(shape, indptr, c)


def sorted_unique(keys: np.ndarray) -> np.ndarray:
    """`np.unique` by a stable sort: keys made of a few sorted runs (the rows of several
    sets) merge in linear time, where numpy's hash-based unique is much slower."""
    keys = np.sort(keys, kind="stable")
    if keys.size < 2:
        return keys
    keep = np.empty(keys.size, bool)
    keep[0] = True
    np.not_equal(keys[1:], keys[:-1], out=keep[1:])
    return keys[keep]


def take(d: Deps, src: np.ndarray, shape: Sequence[int]) -> Deps:
    """Row r of the result is row src[r] of `d` (empty where src[r] < 0)."""
    src = np.asarray(src, _I64).ravel()
    assert src.size == math.prod(shape)
    lens = d.lengths()
    valid = src >= 0
    safe = np.where(valid, src, 0)
    out_lens = np.where(valid, lens[safe], 0)
    indptr = np.zeros(src.size + 1, _I64)
    np.cumsum(out_lens, out=indptr[1:])
    total = int(indptr[-1])
    # Position of each output entry in `d.indices`: its row's start there, plus its rank.
    shift = np.repeat(d.indptr[safe] - indptr[:-1], out_lens)
    return Deps(shape, indptr, d.indices[np.arange(total, dtype=_I64) + shift])


def stack(ds: Sequence[Deps]) -> Deps:
    """The rows of each of `ds` in turn, as one flat Deps."""
    offsets = np.cumsum([0] + [d.nnz for d in ds])
    indptr = np.concatenate([np.zeros(1, _I64)]
                            + [d.indptr[1:] + o for d, o in zip(ds, offsets[:-1], strict=True)])
    indices = np.concatenate([np.zeros(0, _I64)] + [d.indices for d in ds])
    return Deps((int(sum(d.size for d in ds)),), indptr, indices)


def union(shape: Sequence[int], ds: Sequence[Deps]) -> Deps:
    """Elementwise union of sets of equal size."""
    live = [d for d in ds if d.nnz]
    if not live:
        return empty(shape)
    if all(d is live[0] or (d.indptr is live[0].indptr and d.indices is live[0].indices) for d in live):
        return live[0].reshape(shape)
    rows = np.concatenate([d.row_ids() for d in live])
    cols = np.concatenate([d.indices for d in live])
    return from_pairs(shape, rows, cols)


def regroup(d: Deps, groups: np.ndarray, shape: Sequence[int]) -> Deps:
    """Row g of the result is the union of the rows r of `d` with groups[r] = g."""
    groups = np.asarray(groups, _I64).ravel()
    rows = groups[d.row_ids()]
    keep = rows >= 0
    return from_pairs(shape, rows[keep], d.indices[keep])


def relate(d: Deps, out_rows: np.ndarray, in_rows: np.ndarray, shape: Sequence[int]) -> Deps:
    """Row o of the result is the union of rows i of `d` over the pairs (o, i)."""
    in_rows = np.asarray(in_rows, _I64).ravel()
    return regroup(take(d, in_rows, (in_rows.size,)), out_rows, shape)


def positions(shape: Sequence[int]) -> np.ndarray:
    return np.arange(math.prod(shape), dtype=_I64).reshape(shape)


def broadcast(x: Value, shape: Sequence[int]) -> Deps:
    """`x` broadcast (numpy rules) to `shape`."""
    d = as_deps(x, np.shape(x) if is_known(x) else x.shape)
    if d.shape == tuple(shape):
        return d
    if not d.nnz:
        return empty(shape)
    return take(d, np.broadcast_to(positions(d.shape), shape), shape)


def reduce_axes(d: Deps, axes: Sequence[int]) -> Deps:
    """Union over `axes`, which are dropped."""
    kept = tuple(s for i, s in enumerate(d.shape) if i not in axes)
    if not d.nnz:
        return empty(kept)
    keep_dims = tuple(1 if i in axes else s for i, s in enumerate(d.shape))
    groups = np.broadcast_to(positions(kept).reshape(keep_dims), d.shape)
    return regroup(d, groups, kept)


def along_axis(d: Deps, axis: int, out_idx: np.ndarray, in_idx: np.ndarray, new_len: int) -> Deps:
    """Along `axis` (length becomes `new_len`), position out_idx[p] takes the union of
    positions in_idx[p]; every other index is kept."""
    out_shape = d.shape[:axis] + (new_len,) + d.shape[axis + 1:]
    if not d.nnz or len(in_idx) == 0:
        return empty(out_shape)
    ins = np.moveaxis(positions(d.shape), axis, -1)[..., in_idx]
    outs = np.moveaxis(positions(out_shape), axis, -1)[..., out_idx]
    return relate(d, outs, ins, out_shape)


def all_of(x: Value) -> Deps:
    """The union of every element's set, as one set (shape ())."""
    if is_known(x) or not x.nnz:
        return empty(())
    return from_pairs((), np.zeros(x.nnz, _I64), x.indices)


def self_pairs(d: Deps) -> tuple[np.ndarray, np.ndarray]:
    """All (i, j) with i, j in the same row: the Hessian pattern of a nonlinear function
    applied to each element."""
    return cross_pairs(d, d)


def cross_pairs(a: Deps, b: Deps) -> tuple[np.ndarray, np.ndarray]:
    """All (i, j) with i in row r of `a` and j in row r of `b`, for every r."""
    la, lb = a.lengths(), b.lengths()
    counts = la * lb
    keep = counts > 0
    if not keep.any():
        return np.zeros(0, _I64), np.zeros(0, _I64)
    la, lb, counts = la[keep], lb[keep], counts[keep]
    sa, sb = a.indptr[:-1][keep], b.indptr[:-1][keep]
    total = int(counts.sum())
    first = np.repeat(np.cumsum(counts) - counts, counts)
    k = np.arange(total, dtype=_I64) - first
    lb_rep = np.repeat(lb, counts)
    i = a.indices[np.repeat(sa, counts) + k // lb_rep]
    j = b.indices[np.repeat(sb, counts) + k % lb_rep]
    return i, j


# ---------------------------------------------------------------------------------------
# Rules: (ctx, eqn, invals) -> outvals. Outputs that are not inexact are made empty by
# the interpreter; an equation whose inputs are all known is evaluated, not abstracted.

Rule = Callable[[Context, JaxprEqn, list[Value]], list[Value]]
RULES: dict[Primitive, Rule] = {}
_BY_NAME: dict[str, Rule] = {}


def lookup(eqn: JaxprEqn) -> Rule:
    """The rule of `eqn`'s primitive; an unknown primitive is dense (never a missed entry)."""
    prim = eqn.primitive
    return RULES.get(prim) or _BY_NAME.get(prim.name) or dense


def stops_derivative(eqn: JaxprEqn) -> bool:
    """Whether `eqn`'s outputs have zero derivative whatever its inputs (floor, sign...)."""
    return lookup(eqn) is _zero


def _register(prim: Primitive | str | None, rule: Rule) -> None:
    if isinstance(prim, str):
        _BY_NAME[prim] = rule
    elif prim is not None:
        RULES[prim] = rule


def _prim(name: str) -> Primitive | None:
    return getattr(prims, f"{name}_p", None)


def shape_of(v: Any) -> tuple[int, ...]:
    """The shape of a jaxpr variable or literal (a token has none)."""
    return tuple(getattr(v.aval, "shape", ()))


def _out_shape(eqn: JaxprEqn, i: int = 0) -> tuple[int, ...]:
    return shape_of(eqn.outvars[i])


def _in_shape(eqn: JaxprEqn, i: int) -> tuple[int, ...]:
    return shape_of(eqn.invars[i])


def dense(ctx: Context, eqn: JaxprEqn, invals: list[Value]) -> list[Value]:
    """Every output element depends on every element of every input."""
    u = union((), [all_of(x) for x in invals])
    if ctx.tracks_hessian:
        ctx.hessian_pairs(*self_pairs(u))
    return [broadcast(u, shape_of(v)) for v in eqn.outvars]


# Elementwise. `linear`: no second derivative (or a piecewise-linear one: max, abs,
# select, clamp); `nonlinear`: every pair of the operands' sets; `zero`: zero derivative.

def _elementwise_deps(eqn: JaxprEqn, invals: list[Value]) -> list[Deps]:
    shape = _out_shape(eqn)
    return [broadcast(x, shape) for x in invals]


def _linear(ctx: Context, eqn: JaxprEqn, invals: list[Value]) -> list[Value]:
    return [union(_out_shape(eqn), _elementwise_deps(eqn, invals))]


def _nonlinear(ctx: Context, eqn: JaxprEqn, invals: list[Value]) -> list[Value]:
    out = union(_out_shape(eqn), _elementwise_deps(eqn, invals))
    if ctx.tracks_hessian:
        ctx.hessian_pairs(*self_pairs(out))
    return [out]


def _zero(ctx: Context, eqn: JaxprEqn, invals: list[Value]) -> list[Value]:
    return [empty(_out_shape(eqn))]


def _without_zeros(d: Deps, known: Any, shape: Sequence[int]) -> Deps:
    """`d` where the known factor is nonzero: d(c * x) = 0 where c = 0."""
    nonzero = np.broadcast_to(np.asarray(known) != 0, shape).ravel()
    if nonzero.all():
        return d
    return take(d, np.where(nonzero, np.arange(d.size), -1), shape)


def _mul(ctx: Context, eqn: JaxprEqn, invals: list[Value]) -> list[Value]:
    # d2(xy) = 2 dx dy: only the cross products.
    shape = _out_shape(eqn)
    (x, y), (dx, dy) = invals, _elementwise_deps(eqn, invals)
    if is_known(x):
        return [_without_zeros(dy, x, shape)]
    if is_known(y):
        return [_without_zeros(dx, y, shape)]
    if ctx.tracks_hessian:
        ctx.hessian_pairs(*cross_pairs(dx, dy))
    return [union(shape, [dx, dy])]


def _div(ctx: Context, eqn: JaxprEqn, invals: list[Value]) -> list[Value]:
    # x / y is linear in x: d2 = -2 dx dy / y^2 + 2 x dy dy / y^3.
    shape = _out_shape(eqn)
    dx, dy = _elementwise_deps(eqn, invals)
    if ctx.tracks_hessian:
        ctx.hessian_pairs(*cross_pairs(dx, dy))
        ctx.hessian_pairs(*self_pairs(dy))
    return [union(shape, [dx, dy])]


def _integer_pow(ctx: Context, eqn: JaxprEqn, invals: list[Value]) -> list[Value]:
    y = eqn.params["y"]
    if y == 0:
        return _zero(ctx, eqn, invals)
    return (_linear if y == 1 else _nonlinear)(ctx, eqn, invals)


def _select_n(ctx: Context, eqn: JaxprEqn, invals: list[Value]) -> list[Value]:
    # The predicate has zero derivative; a known one picks a case per element.
    shape = _out_shape(eqn)
    pred, cases = invals[0], [broadcast(c, shape) for c in invals[1:]]
    if not is_known(pred):
        return [union(shape, cases)]
    which = np.broadcast_to(np.asarray(pred).astype(_I64), shape)
    return [take(stack(cases), which * math.prod(shape) + positions(shape), shape)]


_LINEAR = ("add", "sub", "neg", "convert_element_type", "copy", "real", "imag", "conj",
           "complex", "reduce_precision", "max", "min", "clamp", "add_jaxvals",
           "rem")  # rem(x, y) = x - trunc(x / y) y: piecewise linear
_NONLINEAR = ("sin", "cos", "tan", "asin", "acos", "atan", "sinh", "cosh", "tanh", "asinh",
              "acosh", "atanh", "exp", "exp2", "log", "log1p", "expm1", "logistic", "sqrt",
              "rsqrt", "cbrt", "square", "pow", "atan2", "erf", "erfc", "erf_inv",
              "lgamma", "digamma", "igamma", "igammac", "igamma_grad_a", "bessel_i0e",
              "bessel_i1e", "polygamma", "zeta", "regularized_incomplete_beta")
_ZERO = ("sign", "floor", "ceil", "round", "stop_gradient", "nextafter", "is_finite")
for _name in _LINEAR:
    _register(_prim(_name), _linear)
for _name in _NONLINEAR:
    _register(_prim(_name), _nonlinear)
for _name in _ZERO:
    _register(_prim(_name), _zero)
_register(prims.mul_p, _mul)
_register(prims.div_p, _div)
_register(prims.integer_pow_p, _integer_pow)
_register(prims.select_n_p, _select_n)


def _abs(ctx: Context, eqn: JaxprEqn, invals: list[Value]) -> list[Value]:
    # |x| is piecewise linear on reals; |z| = sqrt(re^2 + im^2) is not.
    complex_in = jnp.issubdtype(getattr(eqn.invars[0].aval, "dtype", np.float32), jnp.complexfloating)
    return (_nonlinear if complex_in else _linear)(ctx, eqn, invals)


_register(prims.abs_p, _abs)


def _identity(ctx: Context, eqn: JaxprEqn, invals: list[Value]) -> list[Value]:
    return [as_deps(x, shape_of(v)) for x, v in zip(invals, eqn.outvars, strict=True)]


for _name in ("copy", "device_put", "sharding_constraint", "optimization_barrier", "name"):
    _register(_prim(_name) or _name, _identity)


# Structural: each output element comes from at most one input element, found by
# applying the operation to the positions of the (stacked) inputs.

def _index_map(ctx: Context, eqn: JaxprEqn, invals: list[Value], ops: Sequence[int],
               positions_fn: Callable[..., np.ndarray]) -> list[Value]:
    """Operands `ops` numbered consecutively; `positions_fn(*numbered)` gives, per output
    element, the number of the element it copies (negative: none)."""
    ds = [as_deps(invals[i], _in_shape(eqn, i)) for i in ops]
    numbered, offset = [], 0
    for d in ds:
        numbered.append(positions(d.shape) + offset)
        offset += d.size
    src = np.asarray(positions_fn(*numbered))
    return [take(stack(ds), np.where(src >= 0, src, -1), _out_shape(eqn))]


def _with_positions(fn: Callable[..., np.ndarray], ops: Sequence[int] = (0,)) -> Rule:
    def rule(ctx, eqn, invals):
        return _index_map(ctx, eqn, invals, ops, lambda *p: fn(eqn, *p))
    return rule


def _numbered(a: np.ndarray) -> jax.Array:
    """Positions as a jax array, int32 while they fit."""
    return jnp.asarray(a.astype(np.int32) if a.size == 0 or a.max() < 2**31 - 1 else a)


def _reshape(ctx: Context, eqn: JaxprEqn, invals: list[Value]) -> list[Value]:
    return [as_deps(invals[0], _in_shape(eqn, 0)).reshape(_out_shape(eqn))]


_register(prims.reshape_p, _reshape)
_register(prims.squeeze_p, _reshape)
_register(prims.transpose_p, _with_positions(lambda e, p: p.transpose(e.params["permutation"])))
_register(prims.rev_p, _with_positions(lambda e, p: np.flip(p, e.params["dimensions"])))


def _slice_positions(eqn: JaxprEqn, p: np.ndarray) -> np.ndarray:
    starts, limits = eqn.params["start_indices"], eqn.params["limit_indices"]
    strides = eqn.params["strides"] or (1,) * len(starts)
    return p[tuple(slice(s, e, st) for s, e, st in zip(starts, limits, strides, strict=True))]


def _broadcast_positions(eqn: JaxprEqn, p: np.ndarray) -> np.ndarray:
    shape, dims = eqn.params["shape"], eqn.params["broadcast_dimensions"]
    expanded = [1] * len(shape)
    for axis, size in zip(dims, p.shape, strict=True):
        expanded[axis] = size
    return np.broadcast_to(p.reshape(expanded), shape)


_register(prims.slice_p, _with_positions(_slice_positions))
_register(prims.broadcast_in_dim_p, _with_positions(_broadcast_positions))


def _concatenate(ctx: Context, eqn: JaxprEqn, invals: list[Value]) -> list[Value]:
    axis = eqn.params["dimension"]
    return _index_map(ctx, eqn, invals, range(len(invals)), lambda *p: np.concatenate(p, axis))


def _pad(ctx: Context, eqn: JaxprEqn, invals: list[Value]) -> list[Value]:
    config = eqn.params["padding_config"]

    def padded(p, v):
        with jax.ensure_compile_time_eval():
            return np.asarray(lax.pad(_numbered(p), _numbered(v), config), _I64)
    return _index_map(ctx, eqn, invals, (0, 1), padded)


def _split(ctx: Context, eqn: JaxprEqn, invals: list[Value]) -> list[Value]:
    d = as_deps(invals[0], _in_shape(eqn, 0))
    cuts = np.cumsum(eqn.params["sizes"])[:-1]
    pieces = np.split(positions(d.shape), cuts, axis=eqn.params["axis"])
    return [take(d, p, p.shape) for p in pieces]


_register(prims.concatenate_p, _concatenate)
_register(prims.pad_p, _pad)
_register(getattr(lax, "split_p", None) or "split", _split)


def _starts(invals: Sequence[Value]) -> list[int | None]:
    return [int(np.asarray(s)) if is_known(s) else None for s in invals]


def _window(start: int | None, n: int, k: int) -> slice:
    """The k positions from `start` along an axis of length n, clamped into it as lax does."""
    assert start is not None
    first = min(max(start, 0), n - k)
    return slice(first, first + k)


def _dynamic_slice(ctx: Context, eqn: JaxprEqn, invals: list[Value]) -> list[Value]:
    # Known start indices: the slice (clamped as lax does). An unknown start s lies in
    # [0, n - k], so out[a] may read any of x[a], ..., x[a + n - k] along that axis.
    d, sizes = as_deps(invals[0], _in_shape(eqn, 0)), eqn.params["slice_sizes"]
    starts = _starts(invals[1:])
    index = tuple(slice(None) if s is None else _window(s, n, k)
                  for s, n, k in zip(starts, d.shape, sizes, strict=True))
    src = positions(d.shape)[index]
    d = take(d, src, src.shape)
    for axis, (s, n, k) in enumerate(zip(starts, _in_shape(eqn, 0), sizes, strict=True)):
        if s is None:
            a, shift = np.meshgrid(np.arange(k), np.arange(n - k + 1), indexing="ij")
            d = along_axis(d, axis, a.ravel(), (a + shift).ravel(), k)
    return [d]


def _dynamic_update_slice(ctx: Context, eqn: JaxprEqn, invals: list[Value]) -> list[Value]:
    shape = _out_shape(eqn)
    operand, update = as_deps(invals[0], shape), as_deps(invals[1], _in_shape(eqn, 1))
    starts = _starts(invals[2:])
    if None in starts:
        return [union(shape, [operand, broadcast(all_of(update), shape)])]
    src = positions(shape).copy()
    index = tuple(_window(s, n, k) for s, n, k in zip(starts, shape, update.shape, strict=True))
    src[index] = positions(update.shape) + operand.size
    return [take(stack([operand, update]), src, shape)]


_register(prims.dynamic_slice_p, _dynamic_slice)
_register(prims.dynamic_update_slice_p, _dynamic_update_slice)


def _gather(ctx: Context, eqn: JaxprEqn, invals: list[Value]) -> list[Value]:
    # Known indices: gather the operand's positions (out-of-bounds fills are negative).
    operand, indices = invals
    shape = _out_shape(eqn)
    if not is_known(indices):
        return [_gather_unknown(as_deps(operand, _in_shape(eqn, 0)), eqn.params["dimension_numbers"], shape)]
    p = eqn.params

    def gathered(pos):
        with jax.ensure_compile_time_eval():
            out = lax.gather(_numbered(pos), jnp.asarray(indices), p["dimension_numbers"],
                             p["slice_sizes"], mode=p["mode"], fill_value=None)
        return np.asarray(out, _I64)
    return _index_map(ctx, eqn, invals, (0,), gathered)


def _gather_unknown(d: Deps, dn: Any, shape: Sequence[int]) -> Deps:
    """Unknown indices: an output element may read any operand element of its own batch
    (operand_batching_dims), any element at all when there are none."""
    reduced = _contract(d, tuple(dn.operand_batching_dims), ())
    # The output's dims that are not offset dims follow the indices' dims (its last, the
    # index vector, excepted) in order; a batching dim of the indices is one of them.
    batch_axes = [k for k in range(len(shape)) if k not in dn.offset_dims]
    out_axes = [batch_axes[i] for i in dn.start_indices_batching_dims]
    coords = np.indices(shape).reshape(len(shape), -1)
    src = (np.ravel_multi_index(tuple(coords[a] for a in out_axes), reduced.shape) if out_axes
           else np.zeros(coords.shape[1], _I64))
    return take(reduced, src, shape)


_register(prims.gather_p, _gather)


def _scatter_destinations(eqn: JaxprEqn, indices: np.ndarray) -> np.ndarray | None:
    """Per update element, the operand position it lands on (negative: dropped), by
    gathering the operand's positions with the scatter's own index map."""
    dn = eqn.params["dimension_numbers"]
    operand_shape, updates_shape = _in_shape(eqn, 0), _in_shape(eqn, 2)
    skipped = set(dn.inserted_window_dims) | set(dn.operand_batching_dims)
    windows = iter(updates_shape[i] for i in dn.update_window_dims)
    slice_sizes = tuple(1 if i in skipped else next(windows) for i in range(len(operand_shape)))
    gdn = lax.GatherDimensionNumbers(
        offset_dims=tuple(dn.update_window_dims), collapsed_slice_dims=tuple(dn.inserted_window_dims),
        start_index_map=tuple(dn.scatter_dims_to_operand_dims),
        operand_batching_dims=tuple(dn.operand_batching_dims),
        start_indices_batching_dims=tuple(dn.scatter_indices_batching_dims))
    with jax.ensure_compile_time_eval():
        gathered = lax.gather(_numbered(positions(operand_shape)), jnp.asarray(indices), gdn,
                              slice_sizes, mode=eqn.params["mode"])
    dest = np.asarray(gathered, _I64)
    return dest if dest.shape == updates_shape else None


def _scatter(ctx: Context, eqn: JaxprEqn, invals: list[Value]) -> list[Value]:
    # add/mul/min/max combine the operand with every update landing on an element;
    # scatter replaces the operand where an update lands.
    if eqn.primitive is prims.scatter_p and eqn.params.get("update_jaxpr") is not None:
        return dense(ctx, eqn, invals)  # x.at[i].apply(fun): fun of the operand's element
    shape = _out_shape(eqn)
    operand, indices, updates = as_deps(invals[0], shape), invals[1], invals[2]
    updates = as_deps(updates, _in_shape(eqn, 2))
    dest = _scatter_destinations(eqn, np.asarray(indices)) if is_known(indices) else None
    if dest is None:
        out = union(shape, [operand, broadcast(all_of(updates), shape)])
    else:
        landed = regroup(updates, np.where(dest >= 0, dest, -1), shape)
        if eqn.primitive is prims.scatter_p:
            hit = np.zeros(operand.size, bool)
            hit[dest[dest >= 0]] = True
            operand = take(operand, np.where(hit, -1, np.arange(operand.size)), shape)
        out = union(shape, [operand, landed])
    if ctx.tracks_hessian and eqn.primitive is prims.scatter_mul_p:
        ctx.hessian_pairs(*self_pairs(out))
    return [out]


for _p in (prims.scatter_p, prims.scatter_add_p, prims.scatter_mul_p, prims.scatter_min_p,
           prims.scatter_max_p, _prim("scatter_sub")):
    _register(_p, _scatter)


# Reductions, cumulative operations, sort.

def _reduce(nonlinear: bool) -> Rule:
    def rule(ctx, eqn, invals):
        # Each output: the union over the reduced axes of every operand, and (reduce_p)
        # of the initial values that follow the operands.
        axes = eqn.params["axes"] if "axes" in eqn.params else eqn.params["dimensions"]
        nops, shape = len(eqn.outvars), _out_shape(eqn)
        parts = [reduce_axes(as_deps(x, _in_shape(eqn, i)), axes) for i, x in enumerate(invals[:nops])]
        u = union(shape, [*parts, *[broadcast(all_of(x), shape) for x in invals[nops:]]])
        if ctx.tracks_hessian and nonlinear:
            ctx.hessian_pairs(*self_pairs(u))
        return [u] * nops
    return rule


for _name in ("reduce_sum", "reduce_max", "reduce_min"):
    _register(_prim(_name), _reduce(nonlinear=False))
_register(prims.reduce_prod_p, _reduce(nonlinear=True))
_register(prims.reduce_p, _reduce(nonlinear=True))  # operands then init values


def _cumulative(nonlinear: bool) -> Rule:
    def rule(ctx, eqn, invals):
        # out[k] depends on x[j] for j <= k (j >= k when reversed).
        d, axis = as_deps(invals[0], _in_shape(eqn, 0)), eqn.params["axis"]
        n = d.shape[axis]
        out_idx, in_idx = np.tril_indices(n) if not eqn.params["reverse"] else np.triu_indices(n)
        out = along_axis(d, axis, out_idx, in_idx, n)
        if ctx.tracks_hessian and nonlinear:
            ctx.hessian_pairs(*self_pairs(out))
        return [out]
    return rule


for _name in ("cumsum", "cummax", "cummin"):
    _register(_prim(_name), _cumulative(nonlinear=False))
for _name in ("cumprod", "cumlogsumexp"):
    _register(_prim(_name), _cumulative(nonlinear=True))


def _spread(d: Deps, axis: int, new_len: int) -> Deps:
    """Every position along `axis` (of length `new_len` after) depends on all of it."""
    collapsed = reduce_axes(d, (axis,))
    expanded = list(d.shape)
    expanded[axis] = 1
    shape = d.shape[:axis] + (new_len,) + d.shape[axis + 1:]
    return take(collapsed, np.broadcast_to(positions(collapsed.shape).reshape(expanded), shape), shape)


def _sort(ctx: Context, eqn: JaxprEqn, invals: list[Value]) -> list[Value]:
    # Each sorted output is a permutation of its own operand along the axis (the keys'
    # derivative moves values, never mixes them in): every position may take any.
    axis = eqn.params["dimension"]
    return [_spread(as_deps(x, _in_shape(eqn, i)), axis, _in_shape(eqn, i)[axis])
            for i, x in enumerate(invals)]


def _top_k(ctx: Context, eqn: JaxprEqn, invals: list[Value]) -> list[Value]:
    axis = eqn.params.get("axis", len(_in_shape(eqn, 0)) - 1)
    d = as_deps(invals[0], _in_shape(eqn, 0))
    return [_spread(d, axis, _out_shape(eqn)[axis]), empty(_out_shape(eqn, 1))]


_register(prims.sort_p, _sort)
_register(prims.top_k_p, _top_k)


# dot_general and convolutions.

def _contract(d: Deps, batch: Sequence[int], contract: Sequence[int]) -> Deps:
    """Union over the free (neither batch nor contracting) dims: shape (batch..., contract...)."""
    order = (*batch, *contract)
    sizes = [d.shape[i] for i in order]
    if not order:
        return regroup(d, np.zeros(d.size, _I64), ())
    coords = np.indices(d.shape).reshape(len(d.shape), -1)
    return regroup(d, np.ravel_multi_index(tuple(coords[i] for i in order), sizes), sizes)


def _dot_side(d: Deps, batch: Sequence[int], contract: Sequence[int], out_shape: Sequence[int],
              out_dims: Sequence[int]) -> Deps:
    """An operand's sets summed over `contract`, placed at output dims `out_dims`."""
    free = [i for i in range(len(d.shape)) if i not in batch and i not in contract]
    reduced = _contract(d, (*batch, *free), ())
    expanded = [1] * len(out_shape)
    for axis, i in zip(out_dims, (*batch, *free), strict=True):
        expanded[axis] = d.shape[i]
    return take(reduced, np.broadcast_to(positions(reduced.shape).reshape(expanded), out_shape), out_shape)


def _dot_known(d: Deps, known: np.ndarray, dn: tuple, lhs_known: bool,
               out_shape: Sequence[int]) -> Deps | None:
    """out <- unknown operand through the nonzeros of the known one (None: too many pairs)."""
    (lc, rc), (lb, rb) = dn
    kc, kb, uc, ub = (lc, lb, rc, rb) if lhs_known else (rc, rb, lc, lb)
    nz = np.asarray(known) != 0
    if nz.all():
        return None
    kfree = [i for i in range(known.ndim) if i not in kc and i not in kb]
    ufree = [i for i in range(len(d.shape)) if i not in uc and i not in ub]
    # mask[b, kf, c]: the known operand's pattern, batch, free, contracting.
    mask = np.transpose(nz, (*kb, *kfree, *kc)).reshape(
        math.prod(known.shape[i] for i in kb), math.prod(known.shape[i] for i in kfree), -1)
    nuf = math.prod(d.shape[i] for i in ufree)
    if np.count_nonzero(mask) * nuf > 5 * 10**7:
        return None
    b, f, c = np.nonzero(mask)
    u_pos = np.transpose(positions(d.shape), (*ub, *uc, *ufree)).reshape(mask.shape[0], mask.shape[2], nuf)
    free_sizes = (mask.shape[1], nuf) if lhs_known else (nuf, mask.shape[1])
    out_pos = positions(out_shape).reshape(mask.shape[0], *free_sizes)
    ins = u_pos[b, c, :]
    outs = out_pos[b, f, :] if lhs_known else out_pos[b, :, f]
    return relate(d, outs, ins, out_shape)


def _dot_general(ctx: Context, eqn: JaxprEqn, invals: list[Value]) -> list[Value]:
    # out[b, i, j] = sum_k lhs[b, i, k] rhs[b, k, j]: each side's union over k.
    (lc, rc), (lb, rb) = dn = eqn.params["dimension_numbers"]
    shape = _out_shape(eqn)
    lhs, rhs = invals
    ls, rs = _in_shape(eqn, 0), _in_shape(eqn, 1)
    nb, nlf = len(lb), len(ls) - len(lb) - len(lc)
    if is_known(lhs) != is_known(rhs):
        d, known = (rhs, lhs) if is_known(lhs) else (lhs, rhs)
        out = _dot_known(d, np.asarray(known), dn, is_known(lhs), shape)
        if out is not None:
            return [out]
    dl, dr = as_deps(lhs, ls), as_deps(rhs, rs)
    parts = [_dot_side(dl, lb, lc, shape, (*range(nb), *range(nb, nb + nlf))),
             _dot_side(dr, rb, rc, shape, (*range(nb), *range(nb + nlf, len(shape))))]
    if ctx.tracks_hessian and dl.nnz and dr.nnz:
        # d2 out / d lhs[b, i, k] d rhs[b, k, j] = 1: pairs over (b, k).
        ctx.hessian_pairs(*cross_pairs(_contract(dl, lb, lc), _contract(dr, rb, rc)))
    return [union(shape, parts)]


_register(prims.dot_general_p, _dot_general)


def _fft(ctx: Context, eqn: JaxprEqn, invals: list[Value]) -> list[Value]:
    # Linear; each output element mixes all elements of its transform (the trailing axes).
    d, shape = as_deps(invals[0], _in_shape(eqn, 0)), _out_shape(eqn)
    k = len(eqn.params["fft_lengths"])
    batch = reduce_axes(d, tuple(range(len(d.shape) - k, len(d.shape))))
    src = np.broadcast_to(positions(batch.shape).reshape(batch.shape + (1,) * k), shape)
    return [take(batch, src, shape)]


_register(prims.fft_p, _fft)


def window_pairs(in_len: int, out_len: int, window: int, stride: int, pad_lo: int,
                 base_dilation: int = 1, window_dilation: int = 1) -> tuple[np.ndarray, ...]:
    """(out position, input position, window tap) triples of a 1-D window: the input
    dilated by `base_dilation`, padded by `pad_lo` in front, read at y * stride + k * wd."""
    y, k = np.meshgrid(np.arange(out_len), np.arange(window), indexing="ij")
    p = y * stride + k * window_dilation - pad_lo
    ok = (p >= 0) & (p <= (in_len - 1) * base_dilation) & (p % base_dilation == 0)
    return y[ok], p[ok] // base_dilation, k[ok]


def _windows(d: Deps, out_shape: Sequence[int], axes: Sequence[int], params: dict) -> Deps:
    """Each output element of a windowed operation: the union over its window."""
    for j, axis in enumerate(axes):
        y, x, _ = window_pairs(d.shape[axis], out_shape[axis], params["window"][j], params["strides"][j],
                               params["padding"][j][0], params["base_dilation"][j],
                               params["window_dilation"][j])
        d = along_axis(d, axis, y, x, out_shape[axis])
    return d


def _reduce_window(nonlinear: bool) -> Rule:
    def rule(ctx, eqn, invals):
        p = eqn.params
        params = dict(window=p["window_dimensions"], strides=p["window_strides"], padding=p["padding"],
                      base_dilation=p["base_dilation"], window_dilation=p["window_dilation"])
        shape, nops = _out_shape(eqn), len(eqn.outvars)
        # The generic reduce_window's initial values (after the operands) fill the padding.
        u = union(shape, [*[_windows(as_deps(x, _in_shape(eqn, i)), shape, range(len(shape)), params)
                            for i, x in enumerate(invals[:nops])],
                          *[broadcast(all_of(x), shape) for x in invals[nops:]]])
        if ctx.tracks_hessian and nonlinear:
            ctx.hessian_pairs(*self_pairs(u))
        return [u] * nops
    return rule


for _name in ("reduce_window_sum", "reduce_window_max", "reduce_window_min"):
    _register(_prim(_name), _reduce_window(nonlinear=False))
_register(prims.reduce_window_p, _reduce_window(nonlinear=True))


def _conv(ctx: Context, eqn: JaxprEqn, invals: list[Value]) -> list[Value]:
    # out[n, o, y] = sum_{c in group(o), k} lhs[n, c, y * s + k * rd - pad] rhs[o, c, k].
    p = eqn.params
    if p["batch_group_count"] != 1:
        return dense(ctx, eqn, invals)
    lhs_spec, rhs_spec, out_spec = p["dimension_numbers"]
    lhs = _permute(as_deps(invals[0], _in_shape(eqn, 0)), lhs_spec)
    rhs = _permute(as_deps(invals[1], _in_shape(eqn, 1)), rhs_spec)
    out_shape = tuple(_out_shape(eqn)[i] for i in out_spec)
    parts = [_conv_lhs(lhs, rhs.shape, out_shape, p), _conv_rhs(rhs, lhs.shape, out_shape, p)]
    if ctx.tracks_hessian and lhs.nnz and rhs.nnz:
        ctx.hessian_pairs(*cross_pairs(all_of(lhs), all_of(rhs)))
    out = union(out_shape, parts)
    return [_permute(out, [int(i) for i in np.argsort(out_spec)])]


def _permute(d: Deps, perm: Sequence[int]) -> Deps:
    shape = tuple(d.shape[i] for i in perm)
    return take(d, positions(d.shape).transpose(perm), shape) if d.nnz else empty(shape)


def _conv_lhs(lhs: Deps, rhs_shape: Sequence[int], out_shape: Sequence[int], p: dict) -> Deps:
    groups = p["feature_group_count"]
    cin, cout = lhs.shape[1], out_shape[1]
    # Output channel o reads the input channels of its group.
    o = np.repeat(np.arange(cout), cin // groups)
    c = (o // (cout // groups)) * (cin // groups) + np.tile(np.arange(cin // groups), cout)
    d = along_axis(lhs, 1, o, c, cout)
    nsp = len(out_shape) - 2
    params = dict(window=rhs_shape[2:], strides=p["window_strides"], padding=p["padding"],
                  base_dilation=p["lhs_dilation"] or (1,) * nsp,
                  window_dilation=p["rhs_dilation"] or (1,) * nsp)
    return _windows(d, out_shape, range(2, 2 + nsp), params)


def _conv_rhs(rhs: Deps, lhs_shape: Sequence[int], out_shape: Sequence[int], p: dict) -> Deps:
    if not rhs.nnz:
        return empty(out_shape)
    d = reduce_axes(rhs, (1,))  # (O, K...): union over the input channels
    nsp = len(out_shape) - 2
    lhs_dil, rhs_dil = p["lhs_dilation"] or (1,) * nsp, p["rhs_dilation"] or (1,) * nsp
    for j in range(nsp):
        y, _, k = window_pairs(lhs_shape[2 + j], out_shape[2 + j], rhs.shape[2 + j], p["window_strides"][j],
                               p["padding"][j][0], lhs_dil[j], rhs_dil[j])
        d = along_axis(d, 1 + j, y, k, out_shape[2 + j])
    return take(d, np.broadcast_to(positions(d.shape), out_shape), out_shape)


_register(prims.conv_general_dilated_p, _conv)


# Calls and control flow: the body's own equations, interpreted with the same context.

def _body(eqn: JaxprEqn) -> tuple[Jaxpr, list] | None:
    for name in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
        sub = eqn.params.get(name)
        if isinstance(sub, ClosedJaxpr):
            return sub.jaxpr, list(sub.consts)
        if isinstance(sub, Jaxpr):
            return sub, []
    return None


def _call(ctx: Context, eqn: JaxprEqn, invals: list[Value]) -> list[Value]:
    # jit, closed_call, checkpoint: the function's jaxpr.
    body = _body(eqn)
    if body is None or len(body[0].invars) != len(invals):
        return dense(ctx, eqn, invals)
    return ctx.eval_jaxpr(body[0], body[1], invals)


for _name in ("jit", "closed_call", "remat", "call"):
    _register(_prim(_name), _call)
_register("pjit", _call)
_register("checkpoint", _call)
_register("remat2", _call)


def join(a: Sequence[Value], b: Sequence[Value], shapes: Sequence[tuple[int, ...]]) -> list[Deps]:
    """Elementwise union of two lists of abstract values."""
    return [union(s, [as_deps(x, s), as_deps(y, s)]) for x, y, s in zip(a, b, shapes, strict=True)]


def _closed_eval(ctx: Context, closed: ClosedJaxpr, args: Sequence[Value]) -> list[Value]:
    return ctx.eval_jaxpr(closed.jaxpr, list(closed.consts), args)


def _cond(ctx: Context, eqn: JaxprEqn, invals: list[Value]) -> list[Value]:
    # A known index picks its branch; otherwise the union of all branches.
    branches, index, ops = eqn.params["branches"], invals[0], invals[1:]
    if is_known(index):
        i = int(np.clip(np.asarray(index), 0, len(branches) - 1))
        return _closed_eval(ctx, branches[i], ops)
    shapes = [shape_of(v) for v in eqn.outvars]
    out: list[Value] = [empty(s) for s in shapes]
    for branch in branches:
        out = join(out, _closed_eval(ctx, branch, ops), shapes)
    return out


_register(prims.cond_p, _cond)


def _fixed_point(step: Callable[[list[Deps]], list[Value]], init: list[Deps],
                 shapes: Sequence[tuple[int, ...]], max_steps: int | None = None) -> list[Deps]:
    """The least carry C containing `init` with step(C) contained in C (sets only grow,
    so it terminates); at most `max_steps` steps."""
    carry, steps = init, 0
    while max_steps is None or steps < max_steps:
        new = join(carry, step(carry), shapes)
        steps += 1
        if sum(d.nnz for d in new) == sum(d.nnz for d in carry):
            return new
        carry = new
    return carry


# A scan this short (iterations x body equations) is followed iteration by iteration,
# exactly; a longer one by a fixed point over its carry.
UNROLL_BUDGET = 1000


def _scan(ctx: Context, eqn: JaxprEqn, invals: list[Value]) -> list[Value]:
    p = eqn.params
    body, length, nc, nk = p["jaxpr"], p["length"], p["num_consts"], p["num_carry"]
    consts, init, xs = invals[:nc], invals[nc:nc + nk], invals[nc + nk:]
    if length * max(len(body.jaxpr.eqns), 1) <= UNROLL_BUDGET:
        return _scan_unrolled(ctx, eqn, consts, init, xs)
    carry_shapes = [shape_of(v) for v in eqn.outvars[:nk]]
    x_slices = [reduce_axes(as_deps(x, shape_of(v)), (0,))
                for x, v in zip(xs, eqn.invars[nc + nk:], strict=True)]

    def step(carry):
        return _closed_eval(ctx, body, [*consts, *carry, *x_slices])[:nk]

    init_deps = [as_deps(x, s) for x, s in zip(init, carry_shapes, strict=True)]
    carry = _fixed_point(step, init_deps, carry_shapes, max_steps=length)
    ys = _closed_eval(ctx, body, [*consts, *carry, *x_slices])[nk:]
    return [*carry, *[broadcast(as_deps(y, shape_of(v)[1:]), shape_of(v))
                      for y, v in zip(ys, eqn.outvars[nk:], strict=True)]]


def _scan_unrolled(ctx: Context, eqn: JaxprEqn, consts: list, carry: list, xs: list) -> list[Value]:
    p = eqn.params
    body, length, nk = p["jaxpr"], p["length"], p["num_carry"]
    order = range(length - 1, -1, -1) if p["reverse"] else range(length)
    ys_by_step: dict[int, list] = {}
    for t in order:
        outs = _closed_eval(ctx, body, [*consts, *carry, *[_row(x, t) for x in xs]])
        carry, ys_by_step[t] = outs[:nk], outs[nk:]
    ys = []
    for j, v in enumerate(eqn.outvars[nk:]):
        rows = [as_deps(ys_by_step[t][j], shape_of(v)[1:]) for t in range(length)]
        ys.append(stack(rows).reshape(shape_of(v)) if rows else empty(shape_of(v)))
    return [*carry, *ys]


def _row(x: Value, t: int) -> Value:
    if is_known(x):
        return np.asarray(x)[t]
    step = x.size // x.shape[0]
    return take(x, np.arange(t * step, (t + 1) * step), x.shape[1:])


_register(prims.scan_p, _scan)


def _while(ctx: Context, eqn: JaxprEqn, invals: list[Value]) -> list[Value]:
    # The carry's fixed point; the predicate has zero derivative. Known carries (a loop
    # counter) change from one iteration to the next, so they are not known inside.
    p = eqn.params
    nc, nb = p["cond_nconsts"], p["body_nconsts"]
    body_consts, init = invals[nc:nc + nb], invals[nc + nb:]
    shapes = [shape_of(v) for v in eqn.outvars]

    def step(carry):
        return _closed_eval(ctx, p["body_jaxpr"], [*body_consts, *carry])

    return _fixed_point(step, [as_deps(x, s) for x, s in zip(init, shapes, strict=True)], shapes)


_register(prims.while_p, _while)


# Custom rules: the derivative is the rule's, which need not follow the function (a
# straight-through estimator differentiates round as the identity), so the rule is read.
# A rule that cannot be traced here makes the call dense.

_EXPANSION = threading.local()
# A rule may call its own function (`f.defjvp(lambda p, t: (f(p[0]), ...))`): nested
# this deep, custom calls are read through the function instead of the rule.
MAX_RULE_DEPTH = 3


@contextlib.contextmanager
def _expanding():
    depth = getattr(_EXPANSION, "depth", 0)
    _EXPANSION.depth = depth + 1
    try:
        yield depth < MAX_RULE_DEPTH
    finally:
        _EXPANSION.depth = depth


def _custom_jvp(ctx: Context, eqn: JaxprEqn, invals: list[Value]) -> list[Value]:
    with _expanding() as expand:
        return _custom_jvp_rule(ctx, eqn, invals) if expand else _call(ctx, eqn, invals)


def _custom_jvp_rule(ctx: Context, eqn: JaxprEqn, invals: list[Value]) -> list[Value]:
    # The rule's output tangents, with each input tangent carrying its input's sets. For
    # second order the primals carry theirs too: the rule's products of primal-derived
    # coefficients and tangents are the function's second-order terms.
    nc = eqn.params["num_consts"]
    args = invals[nc:]
    try:
        jaxpr, consts, out_zeros = jaxutil.custom_jvp_rule(eqn.params["jvp_jaxpr_fun"], [False] * len(args))
    except Exception:  # noqa: BLE001 -- any rule fungrad cannot trace: conservative
        return dense(ctx, eqn, invals)
    primals = args if ctx.tracks_hessian else [x if is_known(x) else empty(x.shape) for x in args]
    tangents = [as_deps(x, _in_shape(eqn, nc + i)) for i, x in enumerate(args)]
    outs = ctx.eval_jaxpr(jaxpr, consts, [*primals, *tangents])
    out_dots = iter(outs[len(out_zeros):])
    closed_over = union((), [all_of(x) for x in invals[:nc]])
    return [union(shape_of(v), [empty(shape_of(v)) if zero else as_deps(next(out_dots), shape_of(v)),
                                broadcast(closed_over, shape_of(v))])
            for v, zero in zip(eqn.outvars, out_zeros, strict=True)]


def _trace_bwd(bwd: Any, res_avals: Sequence[Any],
               out_avals: Sequence[Any]) -> tuple[Jaxpr, list, list[bool]]:
    """The user's bwd as a jaxpr (residuals, output cotangents) -> nonzero input cotangents,
    and which input cotangents are nonzero."""
    nonzero: list[bool] = []

    def fun(*a):
        cts_in = jaxutil.call_custom_bwd(bwd, a[:len(res_avals)], a[len(res_avals):])
        nonzero[:] = [ct is not None for ct in cts_in]
        return [ct for ct in cts_in if ct is not None]

    structs = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in res_avals]
    structs += [jax.ShapeDtypeStruct(a.shape, a.to_tangent_aval().dtype) for a in out_avals]
    closed = jax.make_jaxpr(fun)(*structs)
    return closed.jaxpr, list(closed.consts), nonzero


def _custom_vjp(ctx: Context, eqn: JaxprEqn, invals: list[Value]) -> list[Value]:
    with _expanding() as expand:
        if not expand:
            return _call(ctx, eqn, invals)
        try:
            return _custom_vjp_rule(ctx, eqn, invals)
        except Exception:  # noqa: BLE001 -- any rule fungrad cannot trace: conservative
            return dense(ctx, eqn, invals)


def _custom_vjp_rule(ctx: Context, eqn: JaxprEqn, invals: list[Value]) -> list[Value]:
    # bwd maps output cotangents u to J^T u. With u_i numbered i (and residuals carrying
    # nothing), input cotangent j holds {i : J_ij != 0}: the pattern of J, transposed.
    p, nc = eqn.params, eqn.params["num_consts"]
    args, arg_vars = invals[nc:], eqn.invars[nc:]
    fwd, consts, num_res, input_fwds = jaxutil.custom_vjp_fwd(p["fwd_jaxpr_thunk"], p["out_trees"],
                                                              [True] * len(args))
    sub = ctx.fresh()
    new_res = iter(sub.eval_jaxpr(fwd, consts, args)[:sum(f is None for f in input_fwds)])
    res_avals = iter([v.aval for v in fwd.outvars])
    res, avals = [], []
    for f in input_fwds:
        res.append(next(new_res) if f is None else args[f])
        avals.append(next(res_avals) if f is None else arg_vars[f].aval)
    bwd, bwd_consts, nonzero = _trace_bwd(p["bwd"], avals, [v.aval for v in eqn.outvars])
    sizes = [math.prod(shape_of(v)) for v in eqn.outvars]
    offsets = np.cumsum([0, *sizes])
    cts = [identity(shape_of(v), int(off)) for v, off in zip(eqn.outvars, offsets, strict=False)]
    blind = [x if is_known(x) else empty(x.shape) for x in res]
    transposed = _input_cotangents(sub.eval_jaxpr(bwd, bwd_consts, [*blind, *cts]), nonzero, arg_vars)
    stacked = stack([as_deps(x, shape_of(v)) for x, v in zip(args, arg_vars, strict=True)])
    flat = relate(stacked, transposed.indices, transposed.row_ids(), (sum(sizes),))
    flat = union(flat.shape, [flat, broadcast(union((), [all_of(x) for x in invals[:nc]]), flat.shape)])
    if ctx.tracks_hessian:
        # d(J_ij(res(x)) dx_j): the residuals J's column j reads, times dx_j's sets.
        coeffs = sub.eval_jaxpr(bwd, bwd_consts, [*res, *[empty(c.shape) for c in cts]])
        ctx.hessian_pairs(*cross_pairs(_input_cotangents(coeffs, nonzero, arg_vars), stacked))
    return [take(flat, np.arange(offsets[k], offsets[k + 1]), shape_of(v)) for k, v in enumerate(eqn.outvars)]


def _input_cotangents(outs: Sequence[Value], nonzero: Sequence[bool], arg_vars: Sequence[Any]) -> Deps:
    """bwd's nonzero outputs placed among all input cotangents (zero ones empty), stacked."""
    it = iter(outs)
    return stack([as_deps(next(it), shape_of(v)) if nz else empty(shape_of(v))
                  for nz, v in zip(nonzero, arg_vars, strict=True)])


_register(prims.custom_jvp_call_p, _custom_jvp)
_register(prims.custom_vjp_call_p, _custom_vjp)
