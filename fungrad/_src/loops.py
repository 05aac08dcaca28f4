"""Reverse mode through while loops: the trips replayed backwards from snapshots of the carry.

A while loop's trip count is known only once it has run, so its reverse pass cannot be
a reversed scan over residuals stacked on the way: there is no static size to stack
them in. Instead the backward pass walks the trips in reverse, recomputing each trip's
carry from a snapshot, with a fixed number of slots (`while_snapshots`, 64 by default):

1. Snapshots. The loop runs again on its primal carries, counting trips and keeping the
   carry at every `stride`-th trip. When the slots fill up, every other snapshot is
   dropped and the stride doubles; so at the end the trip count T is at most
   slots * stride, and stride < 2T / slots once T > slots (online thinning: T need not
   be known in advance).
2. Segments, from the last. The trips from one snapshot to the next are replayed into a
   second set of slots: every trip when the segment is no longer than the slots,
   every ceil(length / slots)-th trip otherwise.
3. Trips, from the last. A trip's carry is read from those slots (or replayed from the
   nearest), its residuals are recomputed, and the transposed body takes the carry's
   cotangent one trip back, adding to the cotangents of the loop's constants.

Memory: two sets of `slots` carries and the residuals of one trip. Time: for
T <= slots**2 the backward pass runs the body's primal part three times per trip (1, 2
and the residuals of 3) and its transpose once; beyond, a trip replays about
T / (2 * slots**2) more trips from its second-level snapshot: slower, never wrong.
Under `jax.vmap` the loops run to the longest trip count of the batch, as jax batches
while loops.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from jax import lax

from fungrad._src import jaxutil
from fungrad._src.jaxutil import ClosedJaxpr

_DEFAULT_SLOTS = 64
_slots_state = jaxutil.int_option(
    "fungrad_while_snapshots", _DEFAULT_SLOTS,
    "Carries fungrad keeps per level when it differentiates a while loop in reverse mode.")


def while_snapshots(slots: int) -> Any:
    """A context in which reverse mode through while loops keeps at most `slots` carries
    per level (two levels; 64 by default).

    The backward pass of a while loop replays its trips from snapshots of the carry
    (see README, "Reverse mode through while loops"). With more slots it replays less:
    up to `slots**2` trips, each trip's body runs three times in the backward pass;
    beyond, about `trips / (2 * slots**2)` more. Memory is `2 * slots` carries.

    Args:
      slots: an int >= 2.

    >>> import jax.numpy as jnp
    >>> from jax import lax
    >>> import fungrad
    >>> def f(x):
    ...     return lax.while_loop(lambda c: c[1] < 100, lambda c: (c[0] * 0.99, c[1] + 1),
    ...                           (x, 0))[0]
    >>> with fungrad.while_snapshots(4):
    ...     g = fungrad.grad(f)(1.0)
    >>> round(float(g), 6) == round(0.99 ** 100, 6)
    True
    """
    if isinstance(slots, bool) or not isinstance(slots, int | np.integer) or slots < 2:
        raise ValueError(
            f"while_snapshots expects an int >= 2 (the carries kept per level), got {slots!r}.")
    return _slots_state(int(slots))


def snapshot_slots() -> int:
    """The number of slots in effect (see `while_snapshots`)."""
    return int(_slots_state.value)


@dataclass(frozen=True)
class Loop:
    """A while loop split for its reverse pass, each part over flat lists.

    cond: (cond consts, primal carries) -> bool
    step: (primal consts, primal carries) -> primal carries
    back: (primal consts, primal carries, carry cts) -> (linear const cts, carry cts),
          one trip of the transposed body at the carry the trip started from.
    """

    cond: ClosedJaxpr
    step: ClosedJaxpr
    back: ClosedJaxpr
    num_linear_consts: int


def reverse(loop: Loop, cond_consts: Sequence[Any], consts: Sequence[Any], init: Sequence[Any],
            ct_consts: Sequence[Any], ct_carry: Sequence[Any], slots: int) -> tuple[list, list]:
    """Cotangents of the loop's linear constants and initial carries, given those of its
    final carries, by the schedule of the module docstring."""
    count, stride, snaps = _snapshots(loop, cond_consts, consts, init, slots)

    def segment(s, acc):
        start = s * stride
        carry = [lax.dynamic_index_in_dim(b, s, keepdims=False) for b in snaps]
        return _segment(loop, consts, carry, lax.min(stride, count - start), slots, acc)

    ct_consts, ct_carry = _reversed_fori(_ceil_div(count, stride), segment,
                                         (list(ct_consts), list(ct_carry)))
    return list(ct_consts), list(ct_carry)


def _snapshots(loop: Loop, cond_consts, consts, init, slots: int):
    """Runs the loop; returns its trip count, the final stride and the snapshots (the
    carry at trips 0, stride, 2 * stride, ... in slots 0, 1, 2, ...)."""

    def cond(state):
        _, _, carry, _ = state
        return _run(loop.cond, *cond_consts, *carry)[0]

    def body(state):
        t, stride, carry, bufs = state
        stride, bufs = lax.cond(t == slots * stride, _thinned, lambda s, b: (s, b), stride, bufs)
        keep = t % stride == 0
        bufs = [_store_if(keep, b, t // stride, x) for b, x in zip(bufs, carry, strict=True)]
        return t + 1, stride, _run(loop.step, *consts, *carry), bufs

    bufs = [lax.broadcast(x, (slots,)) for x in init]
    count, stride, _, bufs = lax.while_loop(cond, body, (_int(0), _int(1), list(init), bufs))
    return count, stride, bufs


def _thinned(stride, bufs):
    """Every other snapshot kept, in the first half of the slots; the stride doubled."""
    slots = bufs[0].shape[0]
    half = (slots + 1) // 2
    # The second half's contents are never read again: fill it with what is at hand.
    return stride * 2, [lax.concatenate([lax.slice_in_dim(b, 0, slots, stride=2),
                                         lax.slice_in_dim(b, 0, slots - half)], 0) for b in bufs]


def _store_if(keep, buf, i, x):
    """`buf` with `x` in slot `i` if `keep`: one slot written either way, not a select of
    the whole buffer."""
    old = lax.dynamic_index_in_dim(buf, i, keepdims=False)
    return lax.dynamic_update_index_in_dim(buf, lax.select(keep, x, old), i, 0)


def _segment(loop: Loop, consts, carry, length, slots: int, acc):
    """The trips of one segment (`length` trips from `carry`) backwards."""
    sub = _ceil_div(length, slots)  # 1 unless the segment is longer than the slots
    n_sub = _ceil_div(length, sub)

    def fill(j, state):
        carry, bufs = state
        bufs = [lax.dynamic_update_index_in_dim(b, x, j, 0) for b, x in zip(bufs, carry, strict=True)]
        trips = lax.select(j < n_sub - 1, sub, _int(0))  # the last slot needs no successor
        return _replay(loop, consts, carry, trips), bufs

    bufs = [lax.broadcast(x, (slots,)) for x in carry]
    _, bufs = lax.fori_loop(_int(0), n_sub, fill, (list(carry), bufs))

    def sub_segment(j, acc):
        start = [lax.dynamic_index_in_dim(b, j, keepdims=False) for b in bufs]

        def trip(i, acc):
            ct_consts, ct_carry = acc
            carry = _replay(loop, consts, start, i)
            outs = _run(loop.back, *consts, *carry, *ct_carry)
            d_consts, ct_carry = outs[:loop.num_linear_consts], outs[loop.num_linear_consts:]
            return list(map(lax.add, ct_consts, d_consts)), ct_carry

        return _reversed_fori(lax.min(sub, length - j * sub), trip, acc)

    return _reversed_fori(n_sub, sub_segment, acc)


def _replay(loop: Loop, consts, carry, trips):
    """The carry `trips` trips after `carry`."""
    return lax.fori_loop(_int(0), trips, lambda _, c: _run(loop.step, *consts, *c), list(carry))


def _reversed_fori(n, body: Callable, init):
    """`body(i, x)` for i = n - 1, ..., 0."""
    return lax.fori_loop(_int(0), n, lambda k, x: body(n - 1 - k, x), init)


def _ceil_div(a, b):
    return (a + b - 1) // b


def _int(i: int) -> Any:
    return np.int32(i)


def _run(closed: ClosedJaxpr, *args: Any) -> list[Any]:
    return jaxutil.eval_jaxpr(closed.jaxpr, closed.consts, *args)
