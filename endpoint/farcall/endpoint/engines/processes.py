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

A worker process never runs tasks of two users (``TaskMessage.user_id``): it is bound to the
user of the first chunk it is sent, and each user's tasks wait in a queue of their own. On a
shared endpoint the ``max_workers`` are shared out: a worker whose user has had nothing to
run for ``worker_idle_seconds``, or that holds more than its user's fair share
(``max_workers`` / users with work), is replaced by a fresh one when another user's tasks wait
for a worker. So whatever a task leaves in its worker's memory (a global, a patched module)
only ever meets that same user's tasks. With one user the engine runs as if users did not
exist.

Workers start with a scrubbed environment (``worker_env``), never the agent's.

With ``container_type`` set, each worker process runs inside the image (``containers``). No
descriptor can be passed into a container, so such a worker connects to a Unix socket of its
own, in a private directory mounted into the container, instead of inheriting a socketpair;
chunks sent before it connects wait in its backlog. A worker killed (or lost) has its container
removed too, off the dispatch thread; ``shutdown`` removes what is left before it returns.
"""

from __future__ import annotations

import collections
import logging
import math
import multiprocessing
import multiprocessing.connection as mpc
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

from pydantic import Field

from farcall.endpoint.engines import process_worker
from farcall.endpoint.engines.base import EngineStatus, OnDone, OnStart
from farcall.endpoint.engines.containers import (
    Container,
    ContainerOptions,
    container_name,
    worker_mounts,
)
from farcall.endpoint.engines.policy import (
    WALLTIME_GRACE,
    PolicyEngine,
    PolicyOptions,
    TaskDurations,
    TaskEntry,
)
from farcall.endpoint.engines.threads import POOL_KEYS
from farcall.endpoint.worker_env import worker_environment
from farcall.protocol.channel import TaskMessage, join_task_batch

log = logging.getLogger(__name__)

SHORT_TASK_SECONDS = 0.001
"""Below this average duration a worker gets a second chunk queued, hiding the IPC gap."""
TURN_SECONDS = 2.0
"""On a shared endpoint with more busy users than workers, the least time a worker serves one
user before it is taken for another (a fresh worker costs a process start)."""


class ProcessPoolOptions(ContainerOptions, PolicyOptions):
    globus_keys = {
        **POOL_KEYS,
        "mp_context": "farcall's workers are always fresh interpreters of their own (like "
                      "'spawn'), started with the worker environment",
        "max_tasks_per_child": "farcall keeps a worker until it is lost, stopped to end a task, "
                               "or retired to serve another user",
    }

    max_workers: int = Field(default_factory=lambda: os.cpu_count() or 1, ge=1)
    max_chunk: int = Field(default=64, ge=1, description="most tasks sent to a worker at once")
    worker_idle_seconds: float = Field(
        default=1.0, ge=0, allow_inf_nan=False,
        description="seconds a worker bound to one user may sit idle while another user's tasks "
                    "wait, before a fresh worker replaces it for them (shared endpoints)")


class _UserQueue:
    """One user's tasks waiting for a worker: lost ones to run again alone first, then the rest."""

    __slots__ = ("user", "pending", "suspects", "served_at")

    def __init__(self, user: str) -> None:
        self.user = user
        self.served_at = 0.0
        """When a fresh worker was last bound to this user (the longest unserved goes first)."""
        self.pending: collections.deque[TaskEntry] = collections.deque()
        self.suspects: collections.deque[TaskEntry] = collections.deque()

    def waiting(self) -> int:
        """How many tasks wait (answered ones at the head dropped first)."""
        for queue in (self.suspects, self.pending):
            while queue and queue[0].done:
                queue.popleft()
        return len(self.suspects) + len(self.pending)


class _Worker:
    """One worker process: its pipe, a pidfd that becomes readable when it exits, its chunks.

    A worker in a container has no pipe at first: ``listener`` is the socket it will connect
    to, and what is sent before it does waits in ``backlog``."""

    __slots__ = ("process", "conn", "pidfd", "inflight", "dead", "killed", "ready", "user",
                 "bound_at", "idle_since", "retiring", "listener", "socket_path", "backlog",
                 "container")

    def __init__(self, process: subprocess.Popen[bytes], conn: mpc.Connection | None,
                 listener: socket.socket | None = None, socket_path: str = "",
                 container: str = "") -> None:
        self.process = process
        self.conn = conn
        self.listener = listener
        self.socket_path = socket_path
        self.backlog: list[bytes] = []
        self.container = container
        """The name of its container (podman, docker), "" for none or an unnamed one."""
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
        self.user: str | None = None
        """The user whose tasks it runs, from its first chunk on; None until then."""
        self.bound_at = 0.0
        self.idle_since = time.monotonic()
        """When it last had nothing to run."""
        self.retiring = False
        """Taken for another user: it gets no more chunks, and is replaced once idle."""

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
        if self.conn is not None:
            self.conn.close()
        if self.listener is not None:
            self.listener.close()
            self.listener = None
            try:
                os.unlink(self.socket_path)
            except OSError:
                pass
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None

    def accept(self) -> None:
        """Take the connection of a worker in a container (its listener is readable) and send
        it what waited."""
        assert self.listener is not None
        try:
            sock, _ = self.listener.accept()
        except BlockingIOError:
            return
        sock.setblocking(True)
        self.listener.close()
        self.listener = None
        os.unlink(self.socket_path)
        self.conn = mpc.Connection(sock.detach())
        backlog, self.backlog = self.backlog, []
        for raw in backlog:
            self.conn.send_bytes(raw)


class ProcessPoolEngine(PolicyEngine):
    """``max_workers`` processes, each fed chunks of tasks over its own pipe."""

    Options = ProcessPoolOptions
    walltime_grace = WALLTIME_GRACE

    def __init__(
        self,
        max_workers: int | None = None,
        prefetch: int = 128,
        max_chunk: int = 64,
        worker_env: dict[str, str] | None = None,
        worker_env_passthrough: list[str] | None = None,
        worker_idle_seconds: float = 1.0,
        container_type: str | None = None,
        container_uri: str | None = None,
        container_cmd_options: str | None = None,
        max_retries_on_system_failure: int = 0,
        allowed_serializers: list[str] | None = None,
    ) -> None:
        super().__init__(max_retries_on_system_failure, allowed_serializers)
        self.container = ContainerOptions(
            container_type=container_type, container_uri=container_uri,
            container_cmd_options=container_cmd_options).container()
        self._run_dir = ""
        """Where workers in containers find their sockets (mounted into each container)."""
        self._removals: list[threading.Thread] = []
        self._early_deaths = 0
        """Workers in containers in a row that died before they connected (a bad image...)."""
        self.max_workers = max_workers or os.cpu_count() or 1
        self.prefetch = prefetch
        self.max_chunk = max_chunk
        self.worker_env = dict(worker_env or {})
        self.worker_env_passthrough = list(worker_env_passthrough or ())
        self.worker_idle_seconds = worker_idle_seconds
        self._env: dict[str, str] = {}
        self._workers: list[_Worker] = []
        self._queues: dict[str, _UserQueue] = {}
        """Each user's queue. Replaced whole (under ``_queues_lock``) when a user comes, never
        changed in place, so the dispatch thread reads it without a lock; never shrinks."""
        self._queues_lock = threading.Lock()
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
        self._env = worker_environment(self.worker_env_passthrough, self.worker_env)
        if self.container is not None:
            self.container.check_runtime()
            self._run_dir = tempfile.mkdtemp(prefix="farcall-workers-")
        for _ in range(self.max_workers):
            self._workers.append(self._spawn())
        self._thread = threading.Thread(target=self._loop, name="farcall-dispatch", daemon=True)
        self._thread.start()

    def submit(self, task: TaskMessage, on_done: OnDone, on_start: OnStart | None = None) -> None:
        if self._refuse(task, on_done):
            return
        entry = self._admit(task, on_done, on_start, payload=task.model_dump_json())
        queue = self._queues.get(entry.user) or self._new_queue(entry.user)
        queue.pending.append(entry)
        self._wake()

    def _new_queue(self, user: str) -> _UserQueue:
        with self._queues_lock:
            queue = self._queues.get(user)
            if queue is None:
                queue = _UserQueue(user)
                self._queues = {**self._queues, user: queue}
            return queue

    def _stop_tasks(self, entries: list[TaskEntry]) -> None:
        """Queued ones are skipped when their turn comes; the dispatch thread kills the
        workers running the others."""
        self._stops.extend(entries)
        self._wake()

    def status(self) -> EngineStatus:
        workers = running = idle = 0
        users = set()
        for w in list(self._workers):
            if w.dead:
                continue
            workers += 1
            users.add(w.user)
            try:
                running += len(w.inflight[0])
            except IndexError:
                idle += 1
        return EngineStatus(
            workers=workers,
            idle_workers=idle,
            pending_tasks=sum(len(q.pending) + len(q.suspects) for q in self._queues.values()),
            running_tasks=running,
            details={"avg_task_seconds": self._durations.mean,
                     "worker_users": len(users - {None})},
        )

    @property
    def capacity(self) -> int:
        return self.max_workers * self.prefetch

    def cancel_pending(self) -> list[str]:
        taken = []
        for queue in [q for user in self._queues.values() for q in (user.pending, user.suspects)]:
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
        killed: list[str] = []
        for w in self._workers:
            if (not wait or w.conn is None) and w.process.poll() is None:
                w.process.kill()  # workers ignore SIGTERM (see process_worker.serve_pipe)
                killed.append(w.container)
                continue
            try:
                w.conn.send_bytes(process_worker.STOP)  # type: ignore[union-attr]
            except OSError:
                pass
        for w in self._workers:
            if w.exit_code(2) is None:
                w.process.kill()
                w.exit_code(2)
                killed.append(w.container)
            w.close()
        if self.container is not None:
            self._remove_containers(killed)

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
        and it inherits nothing but the pipe and the worker environment.
        """
        if self.container is not None:
            return self._spawn_in_container(self.container)
        ours, theirs = socket.socketpair()
        try:
            process = subprocess.Popen(
                [sys.executable, "-m", process_worker.__name__, str(theirs.fileno())],
                pass_fds=[theirs.fileno()],
                stdin=subprocess.DEVNULL,
                env=self._env,
            )
        finally:
            theirs.close()
        return _Worker(process, mpc.Connection(ours.detach()))

    def _spawn_in_container(self, container: Container) -> _Worker:
        """Start a worker in ``container``: ``process_worker --connect PATH``, with PATH a
        socket of its own in the run directory (mounted into the container)."""
        if self._early_deaths >= 3:  # do not spin on a configuration that cannot start
            time.sleep(min(0.1 * 2 ** (self._early_deaths - 3), 5.0))
        name = container_name()
        path = os.path.join(self._run_dir, f"{name}.sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        listener.listen(1)
        listener.setblocking(False)
        argv = [sys.executable, "-m", process_worker.__name__, "--connect", path]
        cmd, env = container.command(argv, env=self._env, name=name, run_dir=self._run_dir,
                                     mounts=worker_mounts(self._env))
        try:
            process = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, env=env)
        except OSError:
            listener.close()
            os.unlink(path)
            raise
        return _Worker(process, None, listener, path, name if container.named else "")

    def _remove_containers(self, names: list[str], background: bool = False) -> None:
        """Remove the containers of killed or lost workers; at shutdown, wait for every
        removal (a killed ``podman run`` client leaves its container running)."""
        assert self.container is not None
        names = [n for n in names if n]
        if background:
            if names:
                t = threading.Thread(target=self.container.remove, args=(names,),
                                     name="farcall-container-rm", daemon=True)
                t.start()
                self._removals = [r for r in self._removals if r.is_alive()] + [t]
            return
        self.container.remove(names)
        for t in self._removals:
            t.join(30)
        shutil.rmtree(self._run_dir, ignore_errors=True)

    def _all_idle(self) -> bool:
        return all(not q.pending and not q.suspects for q in self._queues.values()) and all(
            not w.inflight for w in self._workers if not w.dead
        )

    def _loop(self) -> None:
        while not self._stopping:
            if self._stops:
                self._kill_for_stops()
            due = self._share_out() if len(self._queues) > 1 else None
            self._dispatch()
            live = [w for w in self._workers if not w.dead]
            by_conn: dict[Any, _Worker] = {w.listener if w.conn is None else w.conn: w for w in live}
            by_sentinel: dict[Any, _Worker] = {w.pidfd: w for w in live if w.pidfd is not None}
            ready = mpc.wait([self._wake_r, *by_conn, *by_sentinel], due)
            for obj in ready:
                if obj is self._wake_r:
                    # Drain first, then clear: a byte is in the pipe whenever the flag is set.
                    while self._wake_r.poll():
                        self._wake_r.recv_bytes()
                    self._wake_sent = False
                elif obj in by_conn:
                    w = by_conn[obj]
                    try:
                        if w.conn is None:
                            w.accept()
                        else:
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
        queues = self._queues
        if len(queues) == 1:  # one user (the usual endpoint): every worker is theirs
            (queue,) = queues.values()
            if not queue.pending and not queue.suspects:
                return
            avg = self._durations.mean
            depth = 2 if avg is not None and avg < SHORT_TASK_SECONDS else 1
            free = [w for w in self._workers
                    if not w.dead and len(w.inflight) < depth and not w.timed]
            for w in free:
                chunk = self._next_chunk(w, queue, free, depth, avg)
                if chunk is None:
                    break
                if chunk:
                    self._send(w, chunk)
        elif any(q.pending or q.suspects for q in queues.values()):
            self._dispatch_users(queues)

    def _dispatch_users(self, queues: dict[str, _UserQueue]) -> None:
        """Feed each user's free workers from that user's queue; give each fresh worker to the
        user with work who holds the fewest workers."""
        avg = self._durations.mean
        depth = 2 if avg is not None and avg < SHORT_TASK_SECONDS else 1
        live = [w for w in self._workers if not w.dead]
        held = collections.Counter(w.user for w in live)
        free: dict[str | None, list[_Worker]] = {}
        for w in live:
            if len(w.inflight) < depth and not w.timed and not w.retiring:
                free.setdefault(w.user, []).append(w)
        for user, queue in queues.items():
            mine = free.get(user, [])
            for w in mine:
                chunk = self._next_chunk(w, queue, mine, depth, avg)
                if chunk is None:
                    break
                if chunk:
                    self._send(w, chunk)
        fresh = free.get(None, [])
        for w in fresh:
            waiting = [q for q in queues.values() if q.waiting()]
            if not waiting:
                return
            queue = min(waiting, key=lambda q: (held[q.user], q.served_at))
            chunk = self._next_chunk(w, queue, fresh, depth, avg)
            if chunk:
                self._send(w, chunk)
                held[queue.user] += 1

    def _share_out(self) -> float | None:
        """Take workers from other users for users whose tasks wait without their share of
        workers (module docstring): an idle one is replaced at once by a fresh worker, a busy
        one retires after its chunks. The seconds until the next worker may be due, or None."""
        for w in self._workers:
            if w.retiring and not w.dead and not w.inflight:
                self._replace(w)
        queues = self._queues
        waiting = {user: n for user, q in queues.items() if (n := q.waiting())}
        if not waiting:
            return None
        live = [w for w in self._workers if not w.dead]
        held = collections.Counter(w.user for w in live if not w.retiring)
        active = set(waiting) | {w.user for w in live if w.inflight}
        share = max(1, self.max_workers // len(active))
        wanted = (sum(max(0, min(share, n) - held[user]) for user, n in waiting.items())
                  - held[None] - sum(w.retiring for w in live))
        if wanted <= 0:
            return None
        starved = any(not held[user] for user in waiting)
        now = time.monotonic()
        due: float | None = None
        for w in live:
            if wanted <= 0:
                break
            if w.user is None or w.retiring or not w.ready:
                continue
            if w.user in waiting:  # its user has more to run: take it only past its share
                if not (held[w.user] > share or (starved and held[w.user] >= share)):
                    continue
                left = w.bound_at + TURN_SECONDS - now
            elif w.inflight:
                continue
            else:
                left = w.idle_since + self.worker_idle_seconds - now
            if left > 0:
                due = left if due is None else min(due, left)
                continue
            held[w.user] -= 1
            wanted -= 1
            if w.inflight:
                w.retiring = True
            else:
                self._replace(w)
        return due

    def _replace(self, w: _Worker) -> None:
        """Stop ``w`` (idle) so that a fresh worker, bound to no user yet, takes its place."""
        log.info("replacing worker %s of one user with a fresh one for another", w.pid)
        self._kill(w)

    def _kill(self, w: _Worker) -> None:
        """Kill ``w`` on purpose (its other tasks are not suspects) and take it out of the pool."""
        w.killed = True
        try:
            w.process.kill()
        except OSError:
            pass
        self._on_death(w)

    def _next_chunk(self, w: _Worker, queue: _UserQueue, free: list[_Worker], depth: int,
                    avg: float | None) -> list[TaskEntry] | None:
        """The next chunk for ``w`` from ``queue``: a suspect or a task that travels alone, or
        up to a chunk of ordinary tasks. ``[]`` when ``w`` should wait (a task with a walltime
        starts only on an idle, ready worker, so its clock starts when it does); None when
        nothing is queued. Answered (cancelled) tasks are skipped."""
        busy = bool(w.inflight) or not w.ready
        for waiting in (queue.suspects, queue.pending):
            while waiting and waiting[0].done:
                waiting.popleft()
            if waiting and (waiting is queue.suspects or waiting[0].alone):
                if busy and waiting[0].walltime is not None:
                    return []
                return [waiting.popleft()]
        pending = queue.pending
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
        if w.user is None:
            w.user = chunk[0].user
            w.bound_at = time.monotonic()
            self._queues[w.user].served_at = w.bound_at
        w.inflight.append(chunk)
        self._started(chunk, time.time(), w)
        if w.conn is None:  # a worker in a container that has not connected yet
            w.backlog.append(join_task_batch([e.payload for e in chunk]))
            return
        try:
            w.conn.send_bytes(join_task_batch([e.payload for e in chunk]))
        except OSError:
            self._on_death(w)

    def _on_message(self, w: _Worker, raw: bytes) -> None:
        """A worker's message: the results of its oldest chunk, or that it is ready."""
        if raw == process_worker.READY:
            w.ready = True
            w.idle_since = time.monotonic()
            self._early_deaths = 0
        else:
            self._durations.add(self._deliver_chunk(w.inflight.popleft(), raw))
            if not w.inflight:
                w.idle_since = time.monotonic()

    def _rerun_alone(self, entries: list[TaskEntry]) -> None:
        for entry in entries:
            self._queues[entry.user].suspects.append(entry)

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
            self._kill(w)

    def _on_death(self, w: _Worker) -> None:
        if w.dead:
            return
        try:
            while w.conn is not None and w.conn.poll():
                self._on_message(w, w.conn.recv_bytes())
        except (EOFError, OSError):
            pass
        w.dead = True
        code = w.exit_code(5)
        how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
        if self.container is not None:
            self._remove_containers([w.container], background=True)
            if not w.ready and not w.killed:
                self._early_deaths += 1
                log.error("worker in container %s exited before it was ready (%s): check "
                          "container_type, container_uri and container_cmd_options, and the "
                          "runtime's message above", w.container or w.pid, how)
        lost = list(w.inflight)
        w.inflight.clear()
        if w.killed:  # stopped for a task already answered: the others are not suspects
            again = [e for chunk in lost for e in chunk if not e.done]
            for e in again:
                e.worker = e.started = None
            if again:  # a worker's tasks are all of its one user
                self._queues[again[0].user].pending.extendleft(reversed(again))
        elif lost:
            running, unstarted = lost[0], lost[1:]
            for chunk in reversed(unstarted):
                self._queues[chunk[0].user].pending.extendleft(reversed(chunk))
            self._lost(running, f"its worker process (pid {w.pid}, {how})")
        else:
            log.warning("idle worker %s died (%s)", w.pid, how)
        w.close()
        if not self._stopping:
            self._workers = [x for x in self._workers if not x.dead]
            self._workers.append(self._spawn())
