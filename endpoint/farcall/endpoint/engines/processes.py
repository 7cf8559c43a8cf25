"""Run tasks in a pool of worker processes on this machine.

Why not ``concurrent.futures.ProcessPoolExecutor``: when one of its workers dies
it cannot say which, marks the whole pool broken and kills every sibling, so one
crashing task would fail every task in flight. Here each worker has its own
pipe, so a death costs only the chunk that worker was running, and the engine
policy for a lost chunk applies: its tasks run again, each alone, and
only the one that dies again fails, with ``WorkerLost``.

Tasks travel to workers in chunks, one JSON array per message (``worker.run_batch``
on the other side), to cut per-task IPC. A chunk is sized from a running average
of task duration (about 5 ms of work at most), so long tasks go one at a time
and never queue behind each other in one worker while another worker idles.

A task is stopped (cancelled, or past its walltime) by killing the worker process
that runs it; the other tasks sent to that worker go back to the front of the
queue, unharmed, and a new worker takes its place. A task with a walltime goes
alone to an idle worker, so killing its worker costs no other task, and its
clock starts when it starts. The worker raises ``TaskTimeout`` inside the
function first (``worker.run_batch``), so usually no kill is needed.
"""

from __future__ import annotations

import collections
import logging
import math
import multiprocessing
import multiprocessing.connection as mpc
import os
import socket
import subprocess
import sys
import threading
import time
from typing import Any

from pydantic import Field

from farcall.endpoint.engines import process_worker
from farcall.endpoint.engines.base import EngineOptions, EngineStatus, OnDone, OnStart
from farcall.endpoint.engines.policy import WALLTIME_GRACE, PolicyEngine, TaskDurations, TaskEntry
from farcall.protocol.channel import TaskMessage, join_task_batch

log = logging.getLogger(__name__)

SHORT_TASK_SECONDS = 0.001
"""Below this average duration a worker gets a second chunk queued, hiding the IPC gap."""


class ProcessPoolOptions(EngineOptions):
    max_workers: int = Field(default_factory=lambda: os.cpu_count() or 1, ge=1)
    max_chunk: int = Field(default=64, ge=1, description="most tasks sent to a worker at once")


class _Worker:
    """One worker process: its pipe, a pidfd that becomes readable when it exits, its chunks."""

    __slots__ = ("process", "conn", "pidfd", "inflight", "dead", "killed", "ready")

    def __init__(self, process: subprocess.Popen[bytes], conn: mpc.Connection) -> None:
        self.process = process
        self.conn = conn
        self.pidfd: int | None = None
        if hasattr(os, "pidfd_open"):
            try:
                self.pidfd = os.pidfd_open(process.pid)
            except OSError:  # old kernel: a death still shows as EOF on the pipe
                self.pidfd = None
        self.inflight: collections.deque[list[TaskEntry]] = collections.deque()
        self.dead = False
        self.killed = False
        """Killed by the engine to stop a task: its other tasks are not suspects."""
        self.ready = False
        """It said ``process_worker.READY``: it has started up and runs what it is sent."""

    @property
    def timed(self) -> bool:
        """Running a task with a walltime (it runs alone: nothing is sent behind it)."""
        return bool(self.inflight) and self.inflight[0][0].walltime is not None

    @property
    def pid(self) -> int:
        return self.process.pid

    def exit_code(self, timeout: float) -> int | None:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def close(self) -> None:
        self.conn.close()
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None


class ProcessPoolEngine(PolicyEngine):
    """``max_workers`` processes, each fed chunks of tasks over its own pipe."""

    Options = ProcessPoolOptions
    walltime_grace = WALLTIME_GRACE

    def __init__(
        self,
        max_workers: int | None = None,
        prefetch: int = 128,
        max_chunk: int = 64,
    ) -> None:
        super().__init__()
        self.max_workers = max_workers or os.cpu_count() or 1
        self.prefetch = prefetch
        self.max_chunk = max_chunk
        self._workers: list[_Worker] = []
        self._pending: collections.deque[TaskEntry] = collections.deque()
        self._suspects: collections.deque[TaskEntry] = collections.deque()
        self._stops: collections.deque[TaskEntry] = collections.deque()
        """Answered tasks whose workers the dispatch thread must stop (``_stop_tasks``)."""
        self._durations = TaskDurations()
        self._wake_r, self._wake_w = multiprocessing.Pipe(duplex=False)
        self._wake_sent = False
        self._stopping = False
        self._idle = threading.Condition()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------- agent side

    def start(self) -> None:
        for _ in range(self.max_workers):
            self._workers.append(self._spawn())
        self._thread = threading.Thread(target=self._loop, name="farcall-dispatch", daemon=True)
        self._thread.start()

    def submit(self, task: TaskMessage, on_done: OnDone, on_start: OnStart | None = None) -> None:
        self._pending.append(self._admit(task, on_done, on_start, payload=task.model_dump_json()))
        self._wake()

    def _stop_tasks(self, entries: list[TaskEntry]) -> None:
        """Queued ones are skipped when their turn comes; the dispatch thread kills the
        workers running the others."""
        self._stops.extend(entries)
        self._wake()

    def status(self) -> EngineStatus:
        workers = running = idle = 0
        for w in list(self._workers):
            if w.dead:
                continue
            workers += 1
            try:
                running += len(w.inflight[0])
            except IndexError:
                idle += 1
        return EngineStatus(
            workers=workers,
            idle_workers=idle,
            pending_tasks=len(self._pending) + len(self._suspects),
            running_tasks=running,
            details={"avg_task_seconds": self._durations.mean},
        )

    @property
    def capacity(self) -> int:
        return self.max_workers * self.prefetch

    def cancel_pending(self) -> list[str]:
        taken = []
        for queue in (self._pending, self._suspects):
            while True:
                try:
                    taken.append(queue.popleft())
                except IndexError:
                    break
        return self._forget(taken)

    def shutdown(self, wait: bool = True, timeout: float | None = None) -> None:
        if wait:
            with self._idle:
                self._idle.wait_for(self._all_idle, timeout)
        self._stopping = True
        try:
            self._wake_w.send_bytes(b"!")
        except OSError:
            pass
        self._watchdog.stop()
        if self._thread is not None:
            self._thread.join(5)
        for w in self._workers:
            if not wait and w.process.poll() is None:
                w.process.kill()  # workers ignore SIGTERM (see process_worker.serve_pipe)
                continue
            try:
                w.conn.send_bytes(process_worker.STOP)
            except OSError:
                pass
        for w in self._workers:
            if w.exit_code(2) is None:
                w.process.kill()
                w.exit_code(2)
            w.close()

    # --------------------------------------------------------- dispatch thread

    def _wake(self) -> None:
        if not self._wake_sent:
            self._wake_sent = True
            try:
                self._wake_w.send_bytes(b"!")
            except OSError:
                pass

    def _spawn(self) -> _Worker:
        """Start ``python -m farcall.endpoint.engines.process_worker FD``.

        A fresh interpreter rather than multiprocessing's spawn: it never re-imports
        the caller's ``__main__`` (a script without a ``__main__`` guard, a notebook),
        and it inherits nothing but the pipe.
        """
        ours, theirs = socket.socketpair()
        try:
            process = subprocess.Popen(
                [sys.executable, "-m", process_worker.__name__, str(theirs.fileno())],
                pass_fds=[theirs.fileno()],
                stdin=subprocess.DEVNULL,
            )
        finally:
            theirs.close()
        return _Worker(process, mpc.Connection(ours.detach()))

    def _all_idle(self) -> bool:
        return not self._pending and not self._suspects and all(
            not w.inflight for w in self._workers if not w.dead
        )

    def _loop(self) -> None:
        while not self._stopping:
            if self._stops:
                self._kill_for_stops()
            self._dispatch()
            live = [w for w in self._workers if not w.dead]
            by_conn: dict[Any, _Worker] = {w.conn: w for w in live}
            by_sentinel: dict[Any, _Worker] = {w.pidfd: w for w in live if w.pidfd is not None}
            ready = mpc.wait([self._wake_r, *by_conn, *by_sentinel])
            for obj in ready:
                if obj is self._wake_r:
                    # Drain first, then clear: a byte is in the pipe whenever the flag is set.
                    while self._wake_r.poll():
                        self._wake_r.recv_bytes()
                    self._wake_sent = False
                elif obj in by_conn:
                    w = by_conn[obj]
                    try:
                        self._on_message(w, w.conn.recv_bytes())
                    except (EOFError, OSError):
                        self._on_death(w)
            for obj in ready:
                if obj in by_sentinel:
                    self._on_death(by_sentinel[obj])
            if self._all_idle():
                with self._idle:
                    self._idle.notify_all()

    def _dispatch(self) -> None:
        if not self._pending and not self._suspects:
            return
        avg = self._durations.mean
        depth = 2 if avg is not None and avg < SHORT_TASK_SECONDS else 1
        free = [w for w in self._workers if not w.dead and len(w.inflight) < depth and not w.timed]
        for w in free:
            chunk = self._next_chunk(w, free, depth, avg)
            if chunk is None:
                break
            if chunk:
                self._send(w, chunk)

    def _next_chunk(self, w: _Worker, free: list[_Worker], depth: int,
                    avg: float | None) -> list[TaskEntry] | None:
        """The next chunk for ``w``: a suspect or a task that travels alone, or up to a chunk
        of ordinary tasks. ``[]`` when ``w`` should wait (a task with a walltime starts only on
        an idle, ready worker, so its clock starts when it does); None when nothing is queued.
        Answered (cancelled) tasks are skipped."""
        busy = bool(w.inflight) or not w.ready
        for queue in (self._suspects, self._pending):
            while queue and queue[0].done:
                queue.popleft()
            if queue and (queue is self._suspects or queue[0].alone):
                if busy and queue[0].walltime is not None:
                    return []
                return [queue.popleft()]
        pending = self._pending
        if not pending:
            return None
        slots = sum(depth - len(x.inflight) for x in free if not x.dead) or 1
        size = min(math.ceil(len(pending) / slots), self.max_chunk)
        if avg is not None:
            size = min(size, self._durations.chunk_size(self.max_chunk))
        chunk: list[TaskEntry] = []
        while pending and len(chunk) < size:
            entry = pending[0]
            if entry.done:
                pending.popleft()
            elif entry.alone:
                break
            else:
                chunk.append(pending.popleft())
        return chunk

    def _send(self, w: _Worker, chunk: list[TaskEntry]) -> None:
        w.inflight.append(chunk)
        self._started(chunk, time.time(), w)
        try:
            w.conn.send_bytes(join_task_batch([e.payload for e in chunk]))
        except OSError:
            self._on_death(w)

    def _on_message(self, w: _Worker, raw: bytes) -> None:
        """A worker's message: the results of its oldest chunk, or that it is ready."""
        if raw == process_worker.READY:
            w.ready = True
        else:
            self._durations.add(self._deliver_chunk(w.inflight.popleft(), raw))

    def _rerun_alone(self, entries: list[TaskEntry]) -> None:
        self._suspects.extend(entries)

    def _kill_for_stops(self) -> None:
        """Kill each worker that runs (or was sent) a task answered by ``cancel`` or the
        walltime watchdog; tasks still queued are skipped by ``_next_chunk``."""
        victims: dict[int, _Worker] = {}
        while self._stops:
            entry = self._stops.popleft()
            w = entry.worker
            if isinstance(w, _Worker) and not w.dead and any(entry in c for c in w.inflight):
                victims[w.pid] = w
        for w in victims.values():
            log.info("killing worker %s to stop a cancelled or timed-out task", w.pid)
            w.killed = True
            try:
                w.process.kill()
            except OSError:
                pass
            self._on_death(w)

    def _on_death(self, w: _Worker) -> None:
        if w.dead:
            return
        try:
            while w.conn.poll():
                self._on_message(w, w.conn.recv_bytes())
        except (EOFError, OSError):
            pass
        w.dead = True
        code = w.exit_code(5)
        how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
        lost = list(w.inflight)
        w.inflight.clear()
        if w.killed:  # stopped for a task already answered: the others are not suspects
            again = [e for chunk in lost for e in chunk if not e.done]
            for e in again:
                e.worker = e.started = None
            self._pending.extendleft(reversed(again))
        elif lost:
            running, unstarted = lost[0], lost[1:]
            for chunk in reversed(unstarted):
                self._pending.extendleft(reversed(chunk))
            self._lost(running, f"its worker process (pid {w.pid}, {how})")
        else:
            log.warning("idle worker %s died (%s)", w.pid, how)
        w.close()
        if not self._stopping:
            self._workers = [x for x in self._workers if not x.dead]
            self._workers.append(self._spawn())
