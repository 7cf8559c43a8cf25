"""In-process ``TimerStore`` (embedded mode and unit tests): the Redis one's semantics; each
method runs on the one event loop without awaiting, so each is atomic as a Lua script is."""

from __future__ import annotations

from farcall.broker.records import TimerRecord
from farcall.broker.store.base import TimerStore
from farcall.protocol.timers import TIMER_RUNS_KEPT, TimerRun


class MemoryTimers(TimerStore):
    def __init__(self) -> None:
        self._timers: dict[str, TimerRecord] = {}
        """timer id -> its record, runs included (insertion order: oldest first)"""
        self._unsubmitted: dict[tuple[str, int], float] = {}
        """(timer id, run number) -> when claimed, for runs with no task attached yet"""

    async def create(self, timer: TimerRecord, max_timers: int = 0) -> bool:
        if max_timers > 0 and sum(t.user_id == timer.user_id
                                  for t in self._timers.values()) >= max_timers:
            return False
        self._timers[timer.timer_id] = timer.model_copy(deep=True)
        return True

    async def get(self, timer_id: str) -> TimerRecord | None:
        found = self._timers.get(timer_id)
        return None if found is None else found.model_copy(deep=True)

    async def by_user(self, user_id: str) -> list[TimerRecord]:
        return [t.model_copy(deep=True, update={"runs": []})
                for t in self._timers.values() if t.user_id == user_id]

    async def delete(self, timer_id: str) -> bool:
        return self._timers.pop(timer_id, None) is not None

    async def pause(self, timer_id: str, reason: str = "") -> bool:
        timer = self._timers.get(timer_id)
        if timer is None or timer.state != "active":
            return False
        timer.state, timer.next_run = "paused", None
        if reason:
            timer.reason = reason
        return True

    async def resume(self, timer_id: str, next_run: float | None) -> bool:
        timer = self._timers.get(timer_id)
        if timer is None or timer.state != "paused":
            return False
        timer.state, timer.next_run = ("active", next_run) if next_run is not None else (
            "finished", None)
        timer.reason = None
        return True

    async def stop(self, timer_id: str, reason: str) -> bool:
        timer = self._timers.get(timer_id)
        if timer is None or timer.state not in ("active", "paused"):
            return False
        timer.state, timer.reason, timer.next_run = "stopped", reason, None
        return True

    async def due(self, at: float, limit: int) -> list[TimerRecord]:
        due = sorted((t for t in self._timers.values()
                      if t.state == "active" and t.next_run is not None and t.next_run <= at),
                     key=lambda t: (t.next_run, t.timer_id))
        return [t.model_copy(deep=True, update={"runs": []}) for t in due[:limit]]

    async def claim(
        self, timer_id: str, due_at: float, next_at: float | None, at: float,
        stop_after_runs: int | None = None,
    ) -> TimerRun | None:
        timer = self._timers.get(timer_id)
        if timer is None or timer.state != "active" or timer.next_run != due_at:
            return None
        timer.run_count += 1
        if next_at is None or (stop_after_runs is not None and timer.run_count >= stop_after_runs):
            timer.state, timer.next_run = "finished", None
        else:
            timer.next_run = next_at
        run = TimerRun(number=timer.run_count, at=at)
        timer.runs = [*timer.runs, run][-TIMER_RUNS_KEPT:]
        self._unsubmitted[(timer_id, run.number)] = at
        return run.model_copy()

    async def attach(self, timer_id: str, run: TimerRun) -> None:
        self._unsubmitted.pop((timer_id, run.number), None)
        timer = self._timers.get(timer_id)
        if timer is None:
            return
        timer.runs = [run.model_copy() if r.number == run.number else r for r in timer.runs]

    async def unsubmitted(self, claimed_before: float, at: float, limit: int
                          ) -> list[tuple[str, int]]:
        for gone in [run for run in self._unsubmitted if run[0] not in self._timers]:
            del self._unsubmitted[gone]
        found = sorted((since, run) for run, since in self._unsubmitted.items()
                       if since < claimed_before)[:limit]
        for _, run in found:
            self._unsubmitted[run] = at
        return [run for _, run in found]
