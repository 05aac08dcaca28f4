"""fungrad's caches: bounded in entries and bytes, safe across threads, cleared as one.

Two kinds. An `LRU` holds its keys; a `weak_cache` holds its first argument (a jaxpr)
weakly, so what was derived from a program goes when the program goes. Neither lets a
cache grow with the number of calls: each has a limit on entries and on (estimated)
bytes, and drops its least recently used entries beyond them. `clear_caches()` empties
all of them, like `jax.clear_caches()`.

Locks guard only the dictionaries, never a computation: a value is computed outside the
lock (it may consult the same cache recursively), and when two threads compute the same
entry at once, the first stored wins; the two are equal, since an entry is a pure
function of its key.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import threading
import weakref
from collections.abc import Callable, Hashable
from typing import Any

import jax
import numpy as np

EQUATION_BYTES = 512  # what one equation of a jaxpr costs in memory, roughly


def approx_bytes(value: Any) -> int:
    """A rough size of a cached value: the constants it holds, and its equations."""
    seen: set[int] = set()
    todo, total = [value], 0
    while todo:
        v = todo.pop()
        if id(v) in seen:
            continue
        seen.add(id(v))
        if hasattr(v, "jaxpr") and hasattr(v, "consts"):  # a closed jaxpr
            todo.append(v.jaxpr)
            todo.extend(v.consts)
        elif hasattr(v, "eqns") and hasattr(v, "outvars"):  # a jaxpr
            # Its own equations only: the jaxprs nested in it are mostly shared with other
            # entries, and walking them on every store would cost the square of the depth.
            total += EQUATION_BYTES * (len(v.eqns) + 1)
        elif isinstance(v, (tuple, list)):
            todo.extend(v)
        elif dataclasses.is_dataclass(v) and not isinstance(v, type):
            todo.extend(getattr(v, f.name) for f in dataclasses.fields(v))
        elif isinstance(v, (np.ndarray, np.generic, jax.Array)):
            total += v.nbytes
        else:
            total += 64
    return total


class Identity:
    """A key part equal only to itself: holding the object keeps its id unique."""

    __slots__ = ("value",)

    def __init__(self, value: Any):
        self.value = value

    def __hash__(self) -> int:
        return id(self.value)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Identity) and other.value is self.value


class Hashed:
    """A key hashed once: a structural key is hashed when looked up, when stored, when
    moved to the front of an LRU and as part of every key that nests it."""

    __slots__ = ("key", "hash")

    def __init__(self, key: Hashable):
        self.key, self.hash = key, hash(key)

    def __hash__(self) -> int:
        return self.hash

    def __eq__(self, other: object) -> bool:
        return self is other or (isinstance(other, Hashed) and other.hash == self.hash
                                 and other.key == self.key)


@dataclasses.dataclass(frozen=True)
class CacheInfo:
    name: str
    entries: int
    bytes: int
    hits: int
    misses: int


class LRU:
    """A least-recently-used map bounded in entries and in `size(value)` bytes."""

    def __init__(self, name: str, max_entries: int, max_bytes: int,
                 size: Callable[[Any], int] = approx_bytes):
        self.name, self.max_entries, self.max_bytes, self._size = name, max_entries, max_bytes, size
        self._entries: collections.OrderedDict[Hashable, tuple[Any, int]] = collections.OrderedDict()
        self._bytes = self._hits = self._misses = 0
        self._lock = threading.RLock()
        _registry.append(self)

    def get(self, key: Hashable, default: Any = None) -> Any:
        """The value at `key` (now the most recently used), or `default`."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self._misses += 1
                return default
            self._entries.move_to_end(key)
            self._hits += 1
            return entry[0]

    def put(self, key: Hashable, value: Any) -> Any:
        """Stores `value` unless another thread stored one first; returns the stored one."""
        nbytes = self._size(value)
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                return entry[0]
            self._entries[key] = (value, nbytes)
            self._bytes += nbytes
            self._evict()
            return value

    def _evict(self) -> None:
        # The newest entry stays, even alone over the byte limit: it is in use.
        while len(self._entries) > 1 and (len(self._entries) > self.max_entries
                                          or self._bytes > self.max_bytes):
            _, (_, nbytes) = self._entries.popitem(last=False)
            self._bytes -= nbytes

    def count_miss(self) -> None:
        with self._lock:
            self._misses += 1

    def pop(self, key: Hashable) -> None:
        """Drops the entry at `key`, if any."""
        with self._lock:
            entry = self._entries.pop(key, None)
            if entry is not None:
                self._bytes -= entry[1]

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def info(self) -> CacheInfo:
        with self._lock:
            return CacheInfo(self.name, len(self._entries), self._bytes, self._hits, self._misses)

    def __len__(self) -> int:
        return len(self._entries)


_registry: list[LRU] = []
_MISSING = object()


def weak_cache(fun: Callable | None = None, *, context: Callable[[], Hashable] = lambda: None,
               max_entries: int = 4096, max_bytes: int = 256 << 20) -> Any:
    """Caches `fun(obj, *args)` by the identity of `obj`, held weakly, and the other
    arguments and `context()` by value. An entry goes when `obj` goes (or by LRU)."""
    if fun is None:
        return functools.partial(weak_cache, context=context, max_entries=max_entries,
                                 max_bytes=max_bytes)
    cache = LRU(f"{fun.__module__}.{fun.__qualname__}", max_entries, max_bytes)
    # Per id of a live first argument: a weak reference to it, and the keys stored for it.
    # A dead object's id may be reused, so a hit also checks the reference.
    refs: dict[int, tuple[weakref.ref, set[Hashable]]] = {}
    dead: list[int] = []  # ids whose object died; purged under the lock, not in the callback

    def purge() -> None:
        with cache._lock:
            while dead:
                _, keys = refs.pop(dead.pop(), (None, set()))
                for key in keys:
                    cache.pop(key)

    def forget(i: int, ref: weakref.ref) -> None:
        dead.append(i)

    @functools.wraps(fun)
    def cached(obj: Any, *args: Any) -> Any:
        if dead:
            purge()
        key = (id(obj), args, context())
        entry = refs.get(id(obj))
        if entry is not None and entry[0]() is obj:
            hit = cache.get(key, _MISSING)
            if hit is not _MISSING:
                return hit
        else:
            cache.count_miss()
        value = fun(obj, *args)
        with cache._lock:
            entry = refs.get(id(obj))
            if entry is None or entry[0]() is not obj:  # new, or where a dead one was
                for stale in entry[1] if entry else []:
                    cache.pop(stale)
                entry = refs[id(obj)] = (weakref.ref(obj, functools.partial(forget, id(obj))), set())
            entry[1].add(key)  # a set: a key evicted and computed again is listed once
            return cache.put(key, value)

    cached.cache = cache  # type: ignore[attr-defined]
    return cached


def clear_caches() -> None:
    """Empties every fungrad cache: captured programs, what was derived and compiled from
    them. Like `jax.clear_caches()`, for memory or for a clean benchmark; never needed
    for correct results."""
    for cache in _registry:
        cache.clear()


def cache_info() -> list[CacheInfo]:
    """Entries, estimated bytes, hits and misses of each fungrad cache."""
    return [cache.info() for cache in _registry]
