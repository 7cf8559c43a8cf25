"""Faults to inject into a running farcall, and the one scenario every fault test runs.

``run_scenario`` submits a few thousand short tasks (or another :class:`Workload`,
such as big arguments and results), calls ``fault()`` when
about a third of them are done, waits for every future (bounded), and returns a
:class:`FaultReport` that counts what a user of the system would see: tasks that
succeeded, failed with a clear error, ran twice, or were lost. The injectors
are :class:`TcpProxy` (a connection that goes silent, or is cut),
:class:`Imposter` (a second session opened with an endpoint's credential),
:func:`kill_worker` and :class:`KillOnWrite` (a process killed the instant a Redis value
changes: a fault aimed at the window after a write); killing and restarting processes is
:class:`harness.procs.ManagedProcess`'s job.
"""

from __future__ import annotations

import collections
import concurrent.futures
import json
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

log = logging.getLogger(__name__)

DEFAULT_TASKS = 2000
"""Tasks per scenario; ``FARCALL_FAULT_TASKS`` overrides it."""
DEFAULT_DEADLINE = 120.0
"""Seconds from the first submit by which every future must have resolved."""
TASK_SECONDS = 0.003
"""How long each task sleeps: 2,000 tasks on 2 workers take a few seconds, so a fault lands mid-run."""
REPORT_ENV = "FARCALL_FAULT_REPORT"
"""When set, every report is appended to this file as one JSON line (for docs/reliability.md)."""


def task_count() -> int:
    """``FARCALL_FAULT_TASKS`` if set, else :data:`DEFAULT_TASKS`."""
    raw = os.environ.get("FARCALL_FAULT_TASKS", "")
    try:
        n = int(raw) if raw else DEFAULT_TASKS
    except ValueError:
        raise ValueError(f"FARCALL_FAULT_TASKS must be a whole number, got {raw!r}") from None
    if n < 3:
        raise ValueError(f"FARCALL_FAULT_TASKS must be at least 3 (a third of them run before the fault), "
                         f"got {n}")
    return n


# ------------------------------------------------------------------ the task


def recording_task(calls_file: str, seconds: float) -> Callable[[int], int]:
    """A task that appends its call id ``x`` to ``calls_file`` (``O_APPEND``), sleeps, returns ``x * 2``.

    Made by a factory so dill sends it by value: the endpoint's workers cannot
    import this module. Each run leaves one line, so a task that ran twice
    shows as a repeated id.
    """

    def farcall_fault_task(x: int) -> int:
        import os
        import time

        fd = os.open(calls_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, f"{x}\n".encode())
        finally:
            os.close(fd)
        time.sleep(seconds)
        return x * 2

    return farcall_fault_task


@dataclass(frozen=True)
class Workload:
    """What a scenario submits: ``task(calls_file)`` makes the function (it appends each call's
    id to the file, so a task that ran twice shows), ``args(i)`` the arguments of call ``i``,
    and ``right(i, result)`` says whether its result is the one expected."""

    task: Callable[[str], Callable[..., Any]]
    args: Callable[[int], tuple[Any, ...]]
    right: Callable[[int, Any], bool]


def short_tasks(task_seconds: float = TASK_SECONDS) -> Workload:
    """The default workload: ``recording_task`` sleeping ``task_seconds``, returning ``x * 2``."""
    return Workload(lambda calls: recording_task(calls, task_seconds), lambda i: (i,),
                    lambda i, result: bool(result == 2 * i))


# ---------------------------------------------------------------- the report


@dataclass
class FaultReport:
    """What one scenario's submitter saw. ``lost`` = unresolved at the deadline + wrong results."""

    scenario: str
    submitted: int
    succeeded: int = 0
    failed_clear: int = 0
    """Failed with an exception that has a message: a terminal state the user can act on."""
    failed_unclear: int = 0
    """Failed with an exception whose message is empty: breaks the promise of a clear error."""
    cancelled: int = 0
    ran_twice: int = 0
    """Task ids whose function ran more than once (allowed only for tasks in flight at the fault)."""
    unresolved: int = 0
    wrong: int = 0
    lost: int = 0
    seconds: float = 0.0
    """From the first submit to the last future resolved (or to the deadline)."""
    fault_at: float | None = None
    """Seconds into the run when ``fault()`` was called; None: the fault was never injected."""
    fault_seconds: float = 0.0
    """How long ``fault()`` took (a restart included)."""
    tail_seconds: float | None = None
    """From the end of ``fault()`` (a restart, a new agent) to the last future resolved."""
    errors: dict[str, int] = field(default_factory=dict)
    """The commonest failures, ``Type: message`` (cut short) -> count."""
    lost_states: dict[str, int] = field(default_factory=dict)
    """For the unresolved tasks: their state at the broker at the deadline -> count."""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def resolved(self) -> int:
        return self.submitted - self.unresolved

    def line(self) -> str:
        """The figures on one line, as the CI log shows them."""
        tail = "-" if self.tail_seconds is None else f"{self.tail_seconds:.1f}s"
        at = "never" if self.fault_at is None else f"{self.fault_at:.1f}s"
        text = (f"FAULT REPORT [{self.scenario}] submitted={self.submitted} succeeded={self.succeeded} "
                f"failed_clear={self.failed_clear} failed_unclear={self.failed_unclear} "
                f"cancelled={self.cancelled} ran_twice={self.ran_twice} lost={self.lost} "
                f"(unresolved={self.unresolved} wrong={self.wrong}) time={self.seconds:.1f}s "
                f"fault_at={at} fault_took={self.fault_seconds:.1f}s after_fault={tail}")
        for label, value in (("errors", self.errors), ("lost_states", self.lost_states),
                             ("extra", self.extra)):
            if value:
                text += f"\n    {label}: {json.dumps(value, default=str)}"
        return text

    def emit(self) -> None:
        """Print the report, and append it to ``$FARCALL_FAULT_REPORT`` as a JSON line when set."""
        print(self.line(), flush=True)
        path = os.environ.get(REPORT_ENV)
        if path:
            with open(path, "a") as out:
                out.write(json.dumps({**asdict(self), "at": time.time()}, default=str) + "\n")

    def assert_ok(self) -> None:
        """Every future resolved, nothing lost, every failure with a clear error."""
        assert self.fault_at is not None, f"the fault was never injected:\n{self.line()}"
        assert self.unresolved == 0 and self.lost == 0, f"tasks were lost:\n{self.line()}"
        assert self.failed_unclear == 0, f"tasks failed without an error message:\n{self.line()}"
        assert self.succeeded + self.failed_clear + self.cancelled == self.submitted, self.line()


def _error_key(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:120] if text else ''}"


# ---------------------------------------------------------------- the runner


def run_scenario(
    scenario: str,
    broker_url: str,
    token: str,
    endpoint_id: str,
    fault: Callable[[], None],
    workdir: Path,
    *,
    tasks: int | None = None,
    deadline: float = DEFAULT_DEADLINE,
    task_seconds: float = TASK_SECONDS,
    fault_when: float = 1 / 3,
    submit_after_fault: float = 0.0,
    extra: Callable[[], dict[str, Any]] | None = None,
    workload: Workload | None = None,
) -> FaultReport:
    """Submit ``tasks`` recording tasks, run ``fault()`` once a third are done, wait (bounded), report.

    ``fault_when`` is the fraction of tasks done when ``fault()`` runs; 0 runs
    it on an idle endpoint, before anything is submitted. ``submit_after_fault``
    is the fraction held back and submitted right after ``fault()`` returns, for
    faults that matter to tasks arriving while they last (a second session
    takes only what is dispatched after it opened). The report is printed (and
    written to ``$FARCALL_FAULT_REPORT``) before it is returned; ``extra()``, if
    given, adds the fault's own figures. Futures still pending at the deadline
    are abandoned, never waited for. ``workload`` replaces the short recording tasks
    (``task_seconds`` is theirs).
    """
    from farcall import Client, Executor

    n = tasks or task_count()
    threshold = int(n * fault_when)
    early = 0 if threshold == 0 else n - int(n * submit_after_fault)
    if not 0.0 <= fault_when < 1.0 or early < threshold:
        raise ValueError(f"fault_when={fault_when} and submit_after_fault={submit_after_fault}: the tasks "
                         "submitted before the fault must be enough to reach fault_when")
    calls_file = workdir / f"{scenario}-calls.txt"
    calls_file.write_bytes(b"")
    work = workload or short_tasks(task_seconds)
    fn = work.task(str(calls_file))
    report = FaultReport(scenario, submitted=n)

    lock = threading.Lock()
    reached = threading.Event()
    counts = {"done": 0}
    last_done = [0.0]

    def on_done(_: concurrent.futures.Future[Any]) -> None:
        with lock:
            counts["done"] += 1
            last_done[0] = time.perf_counter()
            if counts["done"] >= threshold:
                reached.set()

    client = Client(broker_url=broker_url, token=token)
    ex = Executor(endpoint_id=endpoint_id, client=client)
    t0 = time.perf_counter()
    end = t0 + deadline
    fault_end: float | None = None
    futures: list[Any] = []

    def submit(upto: int) -> None:
        for i in range(len(futures), upto):
            f = ex.submit(fn, *work.args(i))
            f.add_done_callback(on_done)
            futures.append(f)

    try:
        submit(early)
        if threshold == 0 or reached.wait(max(0.0, end - time.perf_counter())):
            t_fault = time.perf_counter()
            report.fault_at = t_fault - t0
            log.info("%s: injecting the fault after %d of %d results", scenario, counts["done"], n)
            fault()
            fault_end = time.perf_counter()
            report.fault_seconds = fault_end - t_fault
        submit(n)
        concurrent.futures.wait(futures, timeout=max(0.0, end - time.perf_counter()))
        t_end = time.perf_counter()
        _classify(report, futures, work.right)
        report.ran_twice = _ran_twice(calls_file)
        finished = last_done[0] if not report.unresolved else t_end
        report.seconds = finished - t0
        if fault_end is not None:
            report.tail_seconds = max(0.0, finished - fault_end)
        if report.unresolved:
            _describe_lost(report, client, endpoint_id, futures)
        if extra is not None:
            report.extra.update(extra())
    finally:
        abandon_executor(ex)
        client.close()
    report.emit()
    return report


def _classify(report: FaultReport, futures: list[Any], right: Callable[[int, Any], bool]) -> None:
    errors: collections.Counter[str] = collections.Counter()
    for i, f in enumerate(futures):
        if not f.done():
            report.unresolved += 1
        elif f.cancelled():
            report.cancelled += 1
        elif (e := f.exception()) is not None:
            errors[_error_key(e)] += 1
            if str(e).strip():
                report.failed_clear += 1
            else:
                report.failed_unclear += 1
        elif right(i, f.result()):
            report.succeeded += 1
        else:
            report.wrong += 1
    report.lost = report.unresolved + report.wrong
    report.errors = dict(errors.most_common(5))


def _ran_twice(calls_file: Path) -> int:
    runs = collections.Counter(calls_file.read_text().split())
    return sum(1 for count in runs.values() if count > 1)


def _describe_lost(report: FaultReport, client: Any, endpoint_id: str, futures: list[Any]) -> None:
    """Where the unresolved tasks sit at the broker, and what it says of the endpoint (best effort)."""
    from farcall import Client

    ids = [f.task_id for f in futures if not f.done() and f.task_id]
    report.extra["unresolved_without_task_id"] = sum(1 for f in futures if not f.done() and not f.task_id)
    quick = Client(broker_url=client.broker_url, token=client.token, timeout=10, retry_seconds=0)
    try:
        states = collections.Counter(r.get("state", "?") for r in quick.get_tasks(ids).values())
        report.lost_states = dict(states)
        status = quick.get_endpoint_status(endpoint_id)
        report.extra["endpoint_status"] = {k: status.get(k) for k in ("status", "queued_tasks")}
    except Exception as e:  # noqa: BLE001 - the broker may be the thing that is broken
        report.extra["broker_query_failed"] = _error_key(e)
    finally:
        quick.close()


def abandon_executor(ex: Any) -> None:
    """Stop the Executor without waiting for futures that may never resolve."""
    try:
        ex.shutdown(wait=False, cancel_futures=True)
        # An Executor has no public way to give up on outstanding futures; its result stream would
        # otherwise keep reconnecting after the scenario.
        ex._close_stream()  # noqa: SLF001
    except Exception:  # noqa: BLE001 - cleanup must not hide the report
        log.exception("closing the scenario's Executor failed")


# ------------------------------------------------------------------ injectors


def kill_worker(agent_pid: int) -> int:
    """``kill -9`` one worker process of the agent ``agent_pid`` (a ProcessPoolEngine); its pid."""
    try:
        children = psutil.Process(agent_pid).children()
        workers = [p for p in children if "process_worker" in " ".join(p.cmdline())]
    except psutil.Error as e:
        raise RuntimeError(f"cannot list the workers of agent {agent_pid}: {e}") from None
    if not workers:
        raise RuntimeError(f"agent {agent_pid} has no worker process to kill; is it a ProcessPoolEngine?")
    victim = workers[0].pid
    os.kill(victim, signal.SIGKILL)
    return victim


class _Link:
    """One relayed connection: the client's socket, the upstream one, and whether it went silent."""

    __slots__ = ("client", "upstream", "frozen")

    def __init__(self, client: socket.socket, upstream: socket.socket) -> None:
        self.client, self.upstream = client, upstream
        self.frozen = False

    def close(self) -> None:
        _close(self.client)
        _close(self.upstream)


class TcpProxy:
    """A TCP relay on a free loopback port to ``target_host:target_port`` that faults can break.

    ``freeze`` makes every connection relayed so far go silent without closing
    anything: bytes are read and dropped both ways and FINs are not passed on,
    so each peer learns of the loss only at its own keepalive timeout, as after
    a laptop sleep, a VPN switch or a NAT entry that expired. Connections made
    afterwards are relayed normally, as a client reconnecting to the same
    address would be. ``cut`` closes every relayed connection at once (both
    peers see it).
    """

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.port = int(self._listener.getsockname()[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._links: set[_Link] = set()
        self.connections = 0
        """Connections accepted so far."""
        self._accepter = threading.Thread(target=self._accept_loop, name=f"tcp-proxy-{self.port}",
                                          daemon=True)
        self._accepter.start()

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def freeze(self) -> int:
        """Make every current connection silent (dropping bytes both ways, sockets kept open); how many."""
        with self._lock:
            for link in self._links:
                link.frozen = True
            return len(self._links)

    def cut(self) -> None:
        """Close every relayed connection (both peers see a reset or EOF)."""
        with self._lock:
            doomed = list(self._links)
            self._links.clear()
        for link in doomed:
            link.close()

    def close(self) -> None:
        """Stop listening and cut every connection."""
        self._closed.set()
        self._accepter.join(5)
        _close(self._listener)
        self.cut()

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(None)
            self.connections += 1
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError as e:
                log.warning("proxy %d: cannot reach %s:%d: %s", self.port, *self.target, e)
                _close(conn)
                continue
            link = _Link(conn, upstream)
            with self._lock:
                self._links.add(link)
            for src, dst in ((conn, upstream), (upstream, conn)):
                threading.Thread(target=self._pump, args=(link, src, dst), daemon=True,
                                 name=f"tcp-proxy-{self.port}-pump").start()

    def _pump(self, link: _Link, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if not link.frozen:
                    dst.sendall(data)
        except OSError:
            pass
        if link.frozen:
            return  # silent: the other peer must not hear of it
        with self._lock:
            self._links.discard(link)
        link.close()


def _close(s: socket.socket) -> None:
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    s.close()


class Imposter:
    """A second endpoint session opened with a real endpoint's credential, which takes tasks and sits.

    It says hello with ``credit`` and then never runs or returns anything:
    whatever the broker hands it is stranded unless the broker ends the
    session (a newer session with the same credential must replace it).
    """

    def __init__(self, broker_url: str, endpoint_id: str, credential: str, credit: int = 64) -> None:
        from farcall.urls import websocket_url

        self.url = websocket_url(broker_url, f"/endpoints/{endpoint_id}/connect")
        self.credential = credential
        self.credit = credit
        self.first_frame: str = ""
        """The type of the broker's answer to the hello (``welcome``, or ``error``)."""
        self.tasks_received = 0
        self.opened_at = 0.0
        self.closed_after: float | None = None
        """Seconds from the welcome until the broker ended this session; None while it is open."""
        self._ws: Any = None
        self._reader: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @classmethod
    def for_endpoint(cls, broker_url: str, endpoint_dir: Path, credit: int = 64) -> Imposter:
        """Read the endpoint's id and credential from its ``endpoint.json`` (the one in use)."""
        from farcall.endpoint.registration import load_registration

        registration = load_registration(endpoint_dir)
        assert registration is not None, f"no endpoint.json in {endpoint_dir}"
        return cls(broker_url, registration.endpoint_id, registration.credential, credit)

    def start(self, timeout: float = 10.0) -> Imposter:
        """Connect, send a valid hello, read the broker's first frame, then sit (reading, dropping)."""
        self._reader = threading.Thread(target=self._sit, args=(timeout,), name="imposter", daemon=True)
        self._reader.start()
        if not self._ready.wait(timeout + 5):
            raise TimeoutError(f"the imposter session to {self.url} did not open within {timeout:.0f} s")
        if self._error is not None:
            raise RuntimeError(f"the imposter session to {self.url} failed: {self._error!r}")
        return self

    def _sit(self, timeout: float) -> None:
        from websockets.sync.client import connect

        from farcall.protocol.channel import Hello

        try:
            with connect(self.url, additional_headers={"Authorization": f"Bearer {self.credential}"},
                         open_timeout=timeout, max_size=None, compression=None) as ws:
                self._ws = ws
                ws.send(Hello(credit=self.credit).model_dump_json())
                self.first_frame = str(json.loads(ws.recv(timeout=timeout)).get("type", "?"))
                self.opened_at = time.perf_counter()
                self._ready.set()
                for raw in ws:
                    frame = json.loads(raw)
                    if frame.get("type") == "tasks":
                        self.tasks_received += len(frame.get("tasks", []))
        except Exception as e:  # noqa: BLE001 - any end of the connection is the observation
            if not self._ready.is_set():
                self._error = e
            log.info("imposter session ended: %r", e)
        finally:
            self._ready.set()
        if self.opened_at:
            self.closed_after = time.perf_counter() - self.opened_at

    def figures(self) -> dict[str, Any]:
        return {"imposter_first_frame": self.first_frame, "imposter_tasks_received": self.tasks_received,
                "imposter_closed_after_s": None if self.closed_after is None else round(self.closed_after, 2)}

    def close(self) -> None:
        if self._ws is not None:
            self._ws.close()
        if self._reader is not None:
            self._reader.join(5)


# ------------------------------------------------------------------- figures


def markdown_table(path: Path) -> str:
    """The reports in a ``$FARCALL_FAULT_REPORT`` file as the table of docs/reliability.md (last run of
    each scenario wins)."""
    latest: dict[str, dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            doc = json.loads(line)
            latest[doc["scenario"]] = doc
    rows = ["| fault | submitted | succeeded | failed (clear error) | ran twice | lost | time "
            "| after the fault |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, d in latest.items():
        if name == "load":
            continue
        tail = "-" if d.get("tail_seconds") is None else f"{d['tail_seconds']:.1f} s"
        failed = d["failed_clear"] + d["failed_unclear"]
        rows.append(f"| {name} | {d['submitted']:,} | {d['succeeded']:,} | {failed:,} | {d['ran_twice']:,} | "
                    f"{d['lost']:,} | {d['seconds']:.1f} s | {tail} |")
    return "\n".join(rows)


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 2:
        sys.exit("usage: python -m harness.faults REPORT.jsonl  (a file written via FARCALL_FAULT_REPORT)")
    print(markdown_table(Path(sys.argv[1])))


# ------------------------------------------------------------ aimed at a window


class KillOnWrite:
    """``kill -9`` a process the instant a watched Redis value changes.

    A thread reads ``read(redis)`` in a tight loop (tens of microseconds a round trip on
    loopback) and, as soon as the answer differs from the first one, pauses every client's
    writes on that Redis (``CLIENT PAUSE ... WRITE``: the process's next write, or Lua call,
    blocks instead of landing), kills ``pid`` and lifts the pause. So the process dies right
    after the write it was waiting for, before its next write could land, however busy the
    machine is. The pause stops every client of that Redis for a moment: give the test a
    Redis of its own (``harness.private_services.PrivateRedis``). Use as a context manager;
    ``fired`` is set once it killed.
    """

    PAUSE_MS = 10_000
    """The pause's bound, should the kill itself hang (it is lifted right after the kill)."""

    def __init__(self, redis_url: str, read: Callable[[Any], Any], pid: int) -> None:
        import redis

        self._redis = redis.Redis.from_url(redis_url)
        self._read, self._pid = read, pid
        self.fired = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="kill-on-write", daemon=True)

    def __enter__(self) -> KillOnWrite:
        self._before = self._read(self._redis)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self._redis.close()

    def _watch(self) -> None:
        while not self._stop.is_set():
            if self._read(self._redis) != self._before:
                self._redis.execute_command("CLIENT", "PAUSE", self.PAUSE_MS, "WRITE")
                try:
                    os.kill(self._pid, signal.SIGKILL)
                    _until_dead(self._pid)
                finally:
                    self._redis.execute_command("CLIENT", "UNPAUSE")
                self.fired.set()
                return

    def wait(self, timeout: float) -> None:
        """Return once it fired; ``AssertionError`` if the write never came within ``timeout``."""
        if not self.fired.wait(timeout):
            raise AssertionError(f"the watched value did not change in {timeout:g} s")


def _until_dead(pid: int, timeout: float = 10.0) -> None:
    """Return once ``pid`` is gone or a zombie (its writes can no longer land)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return
        except psutil.NoSuchProcess:
            return
        time.sleep(0.001)
