"""Rate limits: a token bucket per key (a token's id, a client's address), held in memory.

Each broker replica counts on its own, so N replicas let a client make up to N
times the rate; what the limits guard against (a runaway loop, a password
guesser, a log flood) is stopped either way, without a store round trip per
request.
"""

from __future__ import annotations

import math
import time

import cachetools


class RateLimiter:
    """Up to ``burst`` events at once per key, refilled at ``rate`` per second.

    ``rate`` 0 means no limit. Past ``max_keys`` keys the least recently used is
    forgotten, and starts again with a full bucket (as an idle key would have).
    """

    def __init__(self, rate: float, burst: int, max_keys: int = 100_000) -> None:
        self.rate, self.burst, self.max_keys = rate, max(1, burst), max_keys
        self._buckets: cachetools.LRUCache[str, tuple[float, float]] = cachetools.LRUCache(max_keys)
        """key -> (tokens left, when last refilled)"""

    def _level(self, key: str, at: float) -> float:
        try:
            tokens, since = self._buckets[key]
        except KeyError:
            return float(self.burst)
        return min(float(self.burst), tokens + (at - since) * self.rate)

    def take(self, key: str, cost: float = 1.0) -> float:
        """Spend ``cost`` from ``key``'s bucket: 0.0 if it held enough, else (spending nothing)
        the seconds until it will."""
        if self.rate <= 0:
            return 0.0
        at = time.monotonic()
        tokens = self._level(key, at)
        if tokens < cost:
            return (cost - tokens) / self.rate
        self._buckets[key] = (tokens - cost, at)
        return 0.0


class Slots:
    """At most ``limit`` things at once per key (uploads of a user, bodies of a token); 0 means
    no limit. Held in memory, per replica, like the rate limits; a key with nothing in
    progress is forgotten."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._held: dict[str, int] = {}

    def take(self, key: str) -> bool:
        """Take one of ``key``'s slots: False (taking nothing) if all are in use."""
        held = self._held.get(key, 0)
        if self.limit and held >= self.limit:
            return False
        self._held[key] = held + 1
        return True

    def give(self, key: str) -> None:
        """Give back a slot ``take`` gave."""
        held = self._held.get(key, 0) - 1
        if held > 0:
            self._held[key] = held
        else:
            self._held.pop(key, None)

    def held(self, key: str) -> int:
        return self._held.get(key, 0)


def retry_seconds(seconds: float) -> float:
    """A wait to report: rounded up to the millisecond, at least one (a wait of 40 µs rounded
    to 0.0 would tell the client to try again at once, and be refused again)."""
    return max(1, math.ceil(round(seconds * 1000, 6))) / 1000


def retry_after(seconds: float) -> str:
    """A ``Retry-After`` header value: whole seconds, at least 1."""
    return str(max(1, math.ceil(seconds)))
