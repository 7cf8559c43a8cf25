"""The walltime watchdog: one thread that stops tasks still running at their walltime.

An engine tells it when a task with a walltime starts a run; when that run is due and
the task is still unanswered on the same run, the watchdog hands it to the engine's
``expire``. It holds tasks weakly, so a finished task is not kept until its deadline,
and drops finished ones whenever its heap doubles, so the heap stays about the size
of the running set however many short tasks go by.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
import weakref
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar

log = logging.getLogger(__name__)

COMPACT_DEADLINES = 1024
"""Deadlines held before the first compaction (then twice what a compaction leaves)."""


class Timed(Protocol):
    """What the watchdog reads of a task."""

    task_id: str
    walltime: float | None
    started: float | None
    """When its current run started (``time.time()``); a rerun sets it anew."""
    done: bool
    """Answered: its deadline no longer matters."""


T = TypeVar("T", bound=Timed)


class WalltimeWatchdog(Generic[T]):
    """Calls ``expire(task)`` at most once per watched run, when the run outlives its walltime
    plus ``grace``; never for a task answered or run again meanwhile."""

    def __init__(self, expire: Callable[[T], None], *, grace: float = 0.0,
                 name: str = "engine") -> None:
        self.grace = grace
        """Seconds past a walltime before ``expire``: time for a worker to stop the task itself."""
        self._expire = expire
        self._name = name
        self._heap: list[tuple[float, int, weakref.ref[T], float]] = []
        """(due on the monotonic clock, seq, task, its run's start)."""
        self._compact_at = COMPACT_DEADLINES
        self._cond = threading.Condition()
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None
        self._stopped = False

    def __len__(self) -> int:
        """Deadlines held, finished tasks' included until they are due or compacted away."""
        with self._cond:
            return len(self._heap)

    def watch(self, task: T, started: float) -> None:
        """Expire ``task`` if its run that started at ``started`` is still going when due."""
        assert task.walltime is not None
        due = time.monotonic() + task.walltime + self.grace - (time.time() - started)
        with self._cond:
            heap = self._heap
            if len(heap) >= self._compact_at:
                heap[:] = [d for d in heap if (t := d[2]()) is not None and not t.done]
                heapq.heapify(heap)
                self._compact_at = max(COMPACT_DEADLINES, 2 * len(heap))
            heapq.heappush(heap, (due, next(self._seq), weakref.ref(task), started))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, daemon=True,
                                                name=f"farcall-walltime-{self._name}")
                self._thread.start()
            if heap[0][2]() is task:
                self._cond.notify()

    def stop(self) -> None:
        """End the thread (at the engine's shutdown); nothing expires after this."""
        with self._cond:
            self._stopped = True
            self._cond.notify()

    def _run(self) -> None:
        cond, heap = self._cond, self._heap
        while True:
            with cond:
                while not self._stopped and (not heap or heap[0][0] > time.monotonic()):
                    cond.wait(heap[0][0] - time.monotonic() if heap else None)
                if self._stopped:
                    return
                _, _, ref, started = heapq.heappop(heap)
            task = ref()
            if task is not None and not task.done and task.started == started:
                try:
                    self._expire(task)
                except Exception:  # the watchdog must outlive a bug in one engine's stop
                    log.exception("stopping task %s at its walltime failed", task.task_id)
