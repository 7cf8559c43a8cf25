"""``Backoff``: how long to wait before the next attempt to reach the broker.

One policy for every reconnect and retry (the SDK's HTTP retries, the
Executor's result stream, the endpoint agent's channel), so that many clients
coming back after a broker restart spread out instead of arriving together.
"""

from __future__ import annotations

import random

_MAX_DOUBLINGS = 1000
"""Past this many doublings the delay is far beyond any cap; stopping there keeps
``base * 2**attempt`` from overflowing a float in an outage of thousands of attempts."""


class Backoff:
    """Delays of ``min(cap, base * 2**attempt)``, each scaled by a random factor in [0.5, 1].

    Every ``next_delay`` counts one ``attempt`` (0: none yet in this outage);
    only ``reset`` starts again from ``base``, so the caller decides what counts
    as having got through.
    """

    __slots__ = ("attempt", "base", "cap")

    def __init__(self, cap: float, base: float = 0.1) -> None:
        self.cap = cap
        self.base = base
        self.attempt = 0

    def next_delay(self) -> float:
        """Seconds to wait before the next attempt; the following one will be longer, up to ``cap``."""
        nominal = min(self.cap, self.base * 2 ** min(self.attempt, _MAX_DOUBLINGS))
        self.attempt += 1
        return nominal * random.uniform(0.5, 1.0)

    def reset(self) -> None:
        """The broker was reached: the next delay is short again."""
        self.attempt = 0

    def __repr__(self) -> str:
        return f"Backoff(cap={self.cap}, base={self.base}, attempt={self.attempt})"
