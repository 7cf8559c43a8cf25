"""Run tasks on a pool of threads in the agent's own process.

For I/O-bound functions and for tests. Worker threads are daemons, so a task
that never returns cannot keep the agent from exiting after a stop.
"""

from __future__ import annotations

import os
import queue
import threading
import time

from pydantic import Field

from farcall.endpoint.engines.base import Engine, EngineOptions, EngineStatus, OnDone, OnStart
from farcall.endpoint.worker import execute, failed_result
from farcall.messages import TaskMessage

_Item = tuple[TaskMessage, OnDone, "OnStart | None"]


class ThreadPoolOptions(EngineOptions):
    max_workers: int = Field(default_factory=lambda: os.cpu_count() or 1, ge=1)


class ThreadPoolEngine(Engine):
    """``max_workers`` daemon threads pulling from one queue."""

    Options = ThreadPoolOptions

    def __init__(self, max_workers: int | None = None, prefetch: int = 128) -> None:
        self.max_workers = max_workers or os.cpu_count() or 1
        self.prefetch = prefetch
        self._queue: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._queued = 0
        self._running = 0
        self._closed = False

    def start(self) -> None:
        for i in range(self.max_workers):
            t = threading.Thread(target=self._work, name=f"farcall-worker-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    def submit(self, task: TaskMessage, on_done: OnDone, on_start: OnStart | None = None) -> None:
        with self._lock:
            self._queued += 1
        self._queue.put((task, on_done, on_start))

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None or self._closed:
                return
            task, on_done, on_start = item
            started = time.time()
            with self._lock:
                self._queued -= 1
                self._running += 1
            try:
                if on_start is not None:
                    on_start(task.task_id, started)
                result = execute(task, started)
            except BaseException as e:  # noqa: BLE001 - execute never raises; on_start might
                result = failed_result(task.task_id, e, started_at=started)
            with self._lock:
                self._running -= 1
            if not self._closed:
                self._deliver(on_done, result)

    def status(self) -> EngineStatus:
        with self._lock:
            running, queued = self._running, self._queued
        return EngineStatus(
            workers=self.max_workers,
            idle_workers=max(0, self.max_workers - running),
            pending_tasks=queued,
            running_tasks=running,
        )

    @property
    def capacity(self) -> int:
        return self.max_workers * self.prefetch

    def cancel_pending(self) -> list[str]:
        cancelled: list[str] = []
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                continue
            cancelled.append(item[0].task_id)
            with self._lock:
                self._queued -= 1
        return cancelled

    def shutdown(self, wait: bool = True, timeout: float | None = None) -> None:
        if not wait:
            self.cancel_pending()
            self._closed = True
        for _ in self._threads:
            self._queue.put(None)
        deadline = None if timeout is None else time.monotonic() + timeout
        for t in self._threads:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            t.join(left if wait else 0)
        self._closed = True
