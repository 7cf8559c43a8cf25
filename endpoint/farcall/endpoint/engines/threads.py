"""Run tasks on a pool of threads in the agent's own process.

For I/O-bound functions and for tests. Worker threads are daemons, so a task
that never returns cannot keep the agent from exiting after a stop.

A thread cannot be killed, so a task stopped while it runs (cancelled, or past
its walltime) is answered at once and its thread abandoned: a new thread takes
its place, and the old one drops the task's result and exits when the function
returns.

Tasks run in the agent's process: a task can read all the agent holds (its endpoint
credential, its environment and memory) and any other task. There is no worker environment
to scrub (``worker_env`` does not apply) and no user apart from another; use it for your own
tasks only, never on an endpoint shared with other users (the agent warns at start).
"""

from __future__ import annotations

import itertools
import os
import queue
import threading
import time

from pydantic import Field

from farcall.endpoint.engines.base import EngineStatus, OnDone, OnStart
from farcall.endpoint.engines.policy import PolicyEngine, PolicyOptions, TaskEntry
from farcall.endpoint.outcomes import failed_result
from farcall.endpoint.worker import execute
from farcall.protocol.channel import TaskMessage

_DROPPED = object()
"""``TaskEntry.worker`` of a queued task that was cancelled: counted out of the queue once."""


INITIALIZER = ("farcall runs no initializer in its workers: do the set-up in the function "
               "(once per worker, e.g. behind a module-level flag), or in endpoint_setup for "
               "shell commands")
POOL_KEYS = {
    "label": "it names the engine in Globus Compute's logs; farcall's log names the engine by "
             "its type, so the label is not used",
    "initializer": INITIALIZER,
    "initargs": INITIALIZER,
}
"""Globus Compute keys of its pool engines (``concurrent.futures`` arguments) that farcall's
pools do not act on, and what they do instead."""


class ThreadPoolOptions(PolicyOptions):
    globus_keys = {**POOL_KEYS,
                   "thread_name_prefix": "farcall names its worker threads farcall-thread-N"}

    max_workers: int = Field(default_factory=lambda: os.cpu_count() or 1, ge=1)


class _Slot:
    """One worker thread: the task it runs, and whether the pool gave up on it."""

    __slots__ = ("thread", "entry", "abandoned")

    def __init__(self) -> None:
        self.thread: threading.Thread | None = None
        self.entry: TaskEntry | None = None
        self.abandoned = False


class ThreadPoolEngine(PolicyEngine):
    """``max_workers`` daemon threads pulling from one queue."""

    Options = ThreadPoolOptions
    runs_tasks_in_agent = True
    shared_caveat = ("tasks run as threads inside the agent's own process, so a task can read "
                     "everything the agent holds (its endpoint credential, its environment, its "
                     "memory) and every other user's tasks and results")

    def __init__(self, max_workers: int | None = None, prefetch: int = 128,
                 max_retries_on_system_failure: int = 0,
                 allowed_serializers: list[str] | None = None) -> None:
        super().__init__(max_retries_on_system_failure, allowed_serializers)
        self.max_workers = max_workers or os.cpu_count() or 1
        self.prefetch = prefetch
        self._queue: queue.SimpleQueue[TaskEntry | None] = queue.SimpleQueue()
        self._slots: list[_Slot] = []
        self._names = itertools.count()
        self._lock = threading.Lock()
        self._queued = 0
        self._running = 0
        self._abandoned = 0  # abandoned threads whose task has not returned yet
        self._closed = False

    def start(self) -> None:
        with self._lock:
            for _ in range(self.max_workers):
                self._add_thread()

    def _add_thread(self) -> None:
        """Start a worker thread (with ``_lock`` held)."""
        slot = _Slot()
        slot.thread = threading.Thread(target=self._work, args=(slot,), daemon=True,
                                       name=f"farcall-worker-{next(self._names)}")
        self._slots.append(slot)
        slot.thread.start()

    def submit(self, task: TaskMessage, on_done: OnDone, on_start: OnStart | None = None) -> None:
        if self._refuse(task, on_done):
            return
        entry = self._admit(task, on_done, on_start)
        entry.task = task
        with self._lock:
            self._queued += 1
        self._queue.put(entry)

    def _work(self, slot: _Slot) -> None:
        while True:
            entry = self._queue.get()
            if entry is None or self._closed:
                return
            with self._lock:
                if entry.worker is None:
                    self._queued -= 1
                if entry.done:  # cancelled while queued
                    entry.worker = _DROPPED
                    continue
                slot.entry = entry
                entry.worker = slot
                self._running += 1
            started = time.time()
            assert entry.task is not None
            try:
                self._started([entry], started, slot)
                result = execute(entry.task, started)
            except BaseException as e:  # noqa: BLE001 - execute never raises; on_start might
                result = failed_result(entry.task_id, e, started_at=started)
            with self._lock:
                if slot.abandoned:
                    self._abandoned -= 1
                    return  # its task was answered when it was abandoned
                slot.entry = None
                self._running -= 1
            if not self._closed:
                self._finish(entry, result)

    def _stop_tasks(self, entries: list[TaskEntry]) -> None:
        """Queued ones are skipped when their turn comes; running ones lose their thread."""
        with self._lock:
            for entry in entries:
                slot = entry.worker
                if slot is None:
                    self._queued -= 1
                    entry.worker = _DROPPED
                elif isinstance(slot, _Slot) and slot.entry is entry and not slot.abandoned:
                    slot.abandoned = True
                    self._abandoned += 1
                    self._running -= 1
                    self._slots.remove(slot)
                    if not self._closed:
                        self._add_thread()

    def status(self) -> EngineStatus:
        with self._lock:
            running, queued, abandoned = self._running, self._queued, self._abandoned
        return EngineStatus(
            workers=self.max_workers,
            idle_workers=max(0, self.max_workers - running),
            pending_tasks=queued,
            running_tasks=running,
            details={"abandoned_threads": abandoned},
        )

    @property
    def capacity(self) -> int:
        return self.max_workers * self.prefetch

    def cancel_pending(self) -> list[str]:
        taken: list[TaskEntry] = []
        while True:
            try:
                entry = self._queue.get_nowait()
            except queue.Empty:
                break
            if entry is None:
                continue
            with self._lock:
                if entry.worker is None:
                    self._queued -= 1
                    entry.worker = _DROPPED
            taken.append(entry)
        return self._forget(taken)

    def shutdown(self, wait: bool = True, timeout: float | None = None) -> None:
        if not wait:
            self.cancel_pending()
            self._closed = True
        with self._lock:
            slots = list(self._slots)
        for _ in slots:
            self._queue.put(None)
        deadline = None if timeout is None else time.monotonic() + timeout
        for slot in slots:
            assert slot.thread is not None
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            slot.thread.join(left if wait else 0)
        self._closed = True
        self._watchdog.stop()
