"""Globus Compute's idle stop, counted in heartbeat periods (``idle_heartbeats_soft``/``_hard``).

The agent calls :meth:`IdleHeartbeats.tick` once per heartbeat period, whether or not it is
connected, saying whether a task or result moved during it and whether any is outstanding.
What a caller may rely on:

- ``soft`` = 0 turns both rules off (as in Globus Compute: the hard rule only backs the soft one).
- **soft**: once at least one task or result has moved, ``soft`` periods in a row with nothing
  moving and nothing outstanding (no task running, no result unacknowledged) stop the endpoint.
- **hard**: ``max(hard, soft + 1)`` periods in a row with nothing moving stop it even with
  tasks outstanding (a worker that went missing never answers), and even before any task came.
- Any movement starts both counts again.
"""

from __future__ import annotations

from typing import Literal

__all__ = ["IdleHeartbeats", "Verdict"]

Verdict = Literal["soft", "hard"]


class IdleHeartbeats:
    """Counts idle heartbeat periods; :meth:`tick` says when the endpoint should stop."""

    def __init__(self, soft: int, hard: int) -> None:
        self.soft = max(0, soft)
        self.hard = max(self.soft + 1, hard)
        self.soft_count = 0
        """Periods in a row idle with nothing outstanding, after some work."""
        self.hard_count = 0
        """Periods in a row with nothing moving."""

    @property
    def enabled(self) -> bool:
        return self.soft > 0

    def tick(self, *, moved: bool, worked: bool, outstanding: bool) -> Verdict | None:
        """One heartbeat period passed. ``moved``: a task or result moved during it; ``worked``:
        one ever moved; ``outstanding``: a task runs or a result waits for its acknowledgement.
        ``"soft"`` or ``"hard"`` when the endpoint should stop by that rule, else ``None``."""
        if not self.enabled:
            return None
        if moved:
            self.soft_count = self.hard_count = 0
            return None
        self.hard_count += 1
        if worked and not outstanding:
            self.soft_count += 1
            if self.soft_count >= self.soft:
                return "soft"
        elif self.hard_count >= self.hard:
            return "hard"
        return None

    def seconds_left(self, verdict: Verdict, period: float) -> float:
        """Seconds until the rule would stop the endpoint if nothing moves (for the log)."""
        if verdict == "soft":
            return max(0, self.soft - self.soft_count) * period
        return max(0, self.hard - self.hard_count) * period
