"""A small time-bounded cache for lookups a broker replica repeats on every request.

Entries expire after ``ttl`` seconds, so a change made through another replica
(a revoked token) takes effect here within that time; past ``max_entries`` the
least recently used go first. ``cachetools.TTLCache`` does the work; this keeps
the replica's four-method interface (a miss is ``None``, ``pop`` of an absent key
is no error).
"""

from __future__ import annotations

import time
from typing import Generic, TypeVar

import cachetools

K = TypeVar("K")
V = TypeVar("V")


def _now() -> float:
    """``time.monotonic`` looked up at each call, so a test's fake clock applies here too."""
    return time.monotonic()


class TTLCache(Generic[K, V]):
    def __init__(self, ttl: float, max_entries: int = 10_000) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self._items: cachetools.TTLCache[K, V] = cachetools.TTLCache(max_entries, ttl, timer=_now)

    def get(self, key: K) -> V | None:
        """The value put under ``key`` less than ``ttl`` seconds ago, else ``None``."""
        try:
            return self._items[key]  # ``cachetools``' ``get`` costs several times more
        except KeyError:
            return None

    def put(self, key: K, value: V) -> None:
        self._items[key] = value

    def pop(self, key: K) -> None:
        self._items.pop(key, None)

    def clear(self) -> None:
        self._items.clear()
