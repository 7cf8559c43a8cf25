"""The endpoint agent: one outbound WebSocket to the broker, an engine behind it.

What a caller may rely on (see docs/protocol.md, "Endpoint channel"):

- Tasks are pulled with credit: the agent never asks for more than the
  engine's ``capacity`` minus what it already holds.
- A task id the agent holds (running, or finished with an unacknowledged
  result) is never run again when it is delivered again.
- Results are batched (one frame per ``linger`` seconds at most while tasks
  are running, sent at once when the last running task finishes), kept until
  the broker acknowledges them, and sent again after a reconnect. Tasks keep
  running while the broker is away.
- ``request_stop`` stops taking tasks, lets running ones finish for up to
  ``stop_timeout`` seconds, flushes their results and returns from ``run``.
- With ``allowed_functions`` set, a task for any other function never reaches
  the engine: it fails at once with ``FunctionNotAllowed``.
- ``on_status`` (if given) gets a status snapshot (connection, last heartbeat)
  on every connect, disconnect and heartbeat, for ``farcall-endpoint status``.
- Every task it hands to the engine carries the data plane's ``DataAccess`` (the broker
  URL, the endpoint's upload grant as ``X-Farcall-Grant`` sends it, the per-task limit),
  so workers fetch big arguments and upload big results themselves.
- Nothing wedges it: every frame it sends stays under the broker's
  ``Welcome.max_frame_bytes`` (a result too big for any frame fails its task with
  ``ResultTooLarge``), a task the agent cannot read fails alone, and sessions
  that die right after their welcome are retried further and further apart.
- With ``journal_path`` set, tasks that were running when the agent process
  died are reported once in the next ``Hello.crashed_task_ids`` (``journal.py``).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import json
import logging
import ssl
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter, ValidationError
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus, WebSocketException
from websockets.frames import CloseCode

from farcall import tls
from farcall.backoff import Backoff
from farcall.endpoint.engines.base import Engine
from farcall.endpoint.errors import EndpointRejected, ResultTooLarge
from farcall.endpoint.journal import CrashJournal
from farcall.endpoint.worker import WORKER_VERSIONS, failed_result
from farcall.errors import FunctionNotAllowed
from farcall.protocol.channel import (
    CancelFrame,
    Credit,
    DataAccess,
    ErrorFrame,
    Heartbeat,
    HeartbeatFrame,
    Hello,
    ResultMessage,
    ResultsAck,
    RunningFrame,
    TaskMessage,
    TasksFrame,
    Welcome,
    parse_broker_frame,
)
from farcall.protocol.common import MAX_SPEC_BYTES, MAX_SPEC_DEPTH
from farcall.urls import websocket_url

log = logging.getLogger(__name__)

ACK_TIMEOUT = 5.0
"""On stop: how long to wait for the broker to acknowledge the last results."""
WELCOME_TIMEOUT = 30.0
RUNNING_REPORT_PERIOD = 0.2
"""Seconds between reports of tasks that started and are still running."""
FUNCTION_CACHE = 4096
"""Function bodies kept by id; the broker sends each once per session."""
RECENT_IDS = 10_000
"""Acknowledged task ids remembered, so a late redelivery of a finished task is not run again."""
HEALTHY_SESSION = 5.0
"""Seconds a session must last before the reconnect backoff starts again from its shortest delay.

Time, not a round trip, is the proof: heartbeats get no answer and an idle
endpoint sends no results, while a broker that cannot serve (its RabbitMQ down)
drops the session within a moment of its welcome, every time.
"""
DEFAULT_MAX_FRAME_BYTES = 16 * 1024 * 1024
"""Frame limit when the broker's ``Welcome`` does not say (``max_frame_bytes`` 0)."""
MIN_FRAME_BYTES = 64 * 1024
"""The agent never shrinks its frame limit below this after a 1009 close (a failed result fits)."""
FRAME_OVERHEAD = 64
"""Bytes of a results frame around its results: ``{"type":"results","credit":N,"results":[]}``."""

_RESULT: TypeAdapter[ResultMessage] = TypeAdapter(ResultMessage)


class ProtocolError(Exception):
    """The broker sent something the protocol does not allow; the agent reconnects."""


def _problem(error: BaseException) -> str:
    """What was wrong with a task, in one line: each bad field and why."""
    if isinstance(error, ValidationError):
        return "; ".join(f"{'.'.join(str(p) for p in item['loc']) or 'task'}: {item['msg']}"
                         for item in error.errors()[:5])[:2000]
    return f"{type(error).__name__}: {error}"[:2000]


def _size(n: int) -> str:
    return f"{n} bytes ({n / 2**20:.1f} MiB)"


async def _wait_event(event: asyncio.Event, timeout: float) -> bool:
    """Wait for ``event`` at most ``timeout`` seconds; ``True`` if it was set.

    Not ``asyncio.wait_for``: on Python 3.11 it swallows a cancellation that comes as the
    event is set, so a session's sender outlived its session and the agent wedged.
    """
    try:
        async with asyncio.timeout(timeout):
            await event.wait()
    except TimeoutError:
        return False
    return True


def _results_frame(parts: list[bytes], credit: int) -> bytes:
    """A ``ResultsFrame`` from results already in ``ResultMessage`` JSON (each encoded once)."""
    return b'{"type":"results","credit":%d,"results":[%b]}' % (credit, b",".join(parts))


class Agent:
    """Connects to the broker, feeds tasks to ``engine``, sends back results and heartbeats."""

    def __init__(
        self,
        broker_url: str,
        endpoint_id: str,
        credential: str,
        engine: Engine,
        *,
        heartbeat_period: float = 10.0,
        stop_timeout: float = 10.0,
        display_name: str = "",
        linger: float = 0.002,
        max_batch: int = 1000,
        max_backoff: float = 10.0,
        allowed_functions: Iterable[str] | None = None,
        on_status: Callable[[dict[str, Any]], None] | None = None,
        journal_path: Path | None = None,
    ) -> None:
        self.broker_url = broker_url
        self.endpoint_id = endpoint_id
        self.engine = engine
        self.heartbeat_period = heartbeat_period
        self.stop_timeout = stop_timeout
        self.display_name = display_name
        self.linger = linger
        self.max_batch = max_batch
        self.max_backoff = max_backoff
        self.allowed_functions = None if allowed_functions is None else frozenset(allowed_functions)
        self.on_status = on_status
        self.journal_path = journal_path
        """The crash journal's file (in the endpoint's directory); ``None``: no journal."""
        self._url = websocket_url(broker_url, f"/endpoints/{endpoint_id}/connect")
        self._headers = {"Authorization": f"Bearer {credential}"}
        self._ssl = tls.client_context() if self._url.startswith("wss:") else None
        tls.warn_if_insecure(self._url)

        self.connected = threading.Event()
        """Set while a session with the broker is up (after its Welcome)."""
        self.connections = 0
        """Sessions opened so far (each reconnect adds one)."""

        # Owned by the event loop thread.
        self._running: set[str] = set()
        self._unacked: dict[str, bytes] = {}
        """Results not acknowledged yet, by task id, as ``ResultMessage`` JSON (encoded once)."""
        self._outbox: list[str] = []
        """Ids of results to send on this session, in order."""
        self._started_out: dict[str, float] = {}
        self._recent: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._functions: collections.OrderedDict[str, str] = collections.OrderedDict()
        self._granted = 0
        self._received = 0
        self._stopping = False
        self._closing = False
        self._ws: ClientConnection | None = None
        self._last_flush = 0.0
        self._last_heartbeat: Heartbeat | None = None
        self._backoff = Backoff(cap=max_backoff)
        self._frame_limit = DEFAULT_MAX_FRAME_BYTES
        """Largest frame to send on this session (read by engine threads too)."""
        self._frame_cap: int | None = None
        """Set when the broker closed with 1009: the agent then stays under it for good."""
        self._largest_sent = 0
        self._journal: CrashJournal | None = None
        self._crashed: list[str] = []
        self._data: DataAccess | None = None
        """How workers reach the data plane (from the last Welcome); set on every task."""

        # Filled by engine threads, drained on the loop.
        self._done_q: collections.deque[tuple[str, bytes]] = collections.deque()
        self._start_q: collections.deque[tuple[str, float]] = collections.deque()
        self._wake_pending = False

        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_requests = 0
        self._stop_event: asyncio.Event | None = None
        self._changed: asyncio.Event | None = None
        self._kick_event: asyncio.Event | None = None

    # ---------------------------------------------------------------- control

    def request_stop(self) -> None:
        """Begin a graceful stop; a second request abandons running tasks. Thread-safe."""
        self._stop_requests += 1
        loop = self._loop
        if loop is None:
            return
        try:
            loop.call_soon_threadsafe(self._on_stop_request)
        except RuntimeError:  # loop already closed: nothing left to stop
            pass

    def _on_stop_request(self) -> None:
        assert self._stop_event is not None and self._changed is not None
        self._stop_event.set()
        self._changed.set()

    async def run(self) -> None:
        """Run until stopped. Raises ``EndpointRejected`` if the broker refuses the credential."""
        self._loop = asyncio.get_running_loop()
        self._stop_event = asyncio.Event()
        self._changed = asyncio.Event()
        self._kick_event = asyncio.Event()
        if self._stop_requests:
            self._stop_event.set()
        if self.journal_path is not None:
            self._journal = CrashJournal(self.journal_path)
            self._crashed = self._journal.open()
        await asyncio.to_thread(self.engine.start)
        log.info("engine %s started (capacity %d)", self.engine.name, self.engine.capacity)
        connection = asyncio.create_task(self._connect_loop(), name="farcall-connection")
        stop = asyncio.create_task(self._stop_event.wait())
        try:
            await asyncio.wait({connection, stop}, return_when=asyncio.FIRST_COMPLETED)
            if connection.done():
                stop.cancel()
                connection.result()  # re-raises a fatal error such as EndpointRejected
            else:
                await self._drain()
        finally:
            connection.cancel()
            stop.cancel()
            await asyncio.gather(connection, stop, return_exceptions=True)
            self.connected.clear()
            await asyncio.to_thread(self.engine.shutdown, False)
            if self._journal is not None:
                self._journal.close()
            self._report()
            log.info("endpoint agent stopped")

    async def _drain(self) -> None:
        """Graceful stop: no new tasks, running ones finish (bounded), results flushed."""
        assert self._loop is not None
        self._stopping = True
        for task_id in self.engine.cancel_pending():
            self._running.discard(task_id)
        log.info("stopping: waiting up to %.0f s for %d running task(s)",
                 self.stop_timeout, len(self._running))
        loop = self._loop
        if not await self._wait_for(lambda: not self._running, loop.time() + self.stop_timeout):
            log.warning("stopping: abandoning %d running task(s); the broker will hand them "
                        "out again", len(self._running))
        self._kick()
        if self._unacked and not await self._wait_for(
            lambda: not self._unacked, loop.time() + ACK_TIMEOUT
        ):
            log.warning("stopping: %d result(s) not acknowledged; their tasks will run again",
                        len(self._unacked))
        self._closing = True
        if self._ws is not None:
            await self._ws.close()  # a normal close (1000), so the broker sees a clean goodbye

    async def _wait_for(self, condition: Callable[[], bool], deadline: float) -> bool:
        assert self._loop is not None and self._changed is not None
        while True:
            self._changed.clear()
            if condition():
                return True
            left = deadline - self._loop.time()
            if left <= 0 or self._stop_requests > 1:
                return False
            await _wait_event(self._changed, left)

    # ------------------------------------------------------------- connection

    async def _connect_loop(self) -> None:
        """Connect, serve, reconnect; only a session that lasted ``HEALTHY_SESSION`` resets the backoff."""
        assert self._loop is not None
        backoff, loop = self._backoff, self._loop
        while True:
            welcomed = False
            welcomed_at: float | None = None
            session_ws: ClientConnection | None = None
            try:
                async with connect(
                    self._url,
                    additional_headers=self._headers,
                    compression=None,
                    max_size=None,
                    open_timeout=WELCOME_TIMEOUT,
                    close_timeout=2,
                    ssl=self._ssl,
                ) as ws:
                    session_ws = ws
                    welcomed = await self._hello(ws)
                    welcomed_at = loop.time()
                    await self._session(ws)
                    if self._closing:
                        return
                    log.warning("broker closed the connection")
            except InvalidStatus as e:
                status = e.response.status_code
                if status in (401, 403, 404):
                    raise EndpointRejected(
                        f"the broker refused endpoint {self.endpoint_id} ({status}): it was "
                        "deleted or its credential revoked. Delete endpoint.json in the "
                        "endpoint's directory and start again to register a new endpoint."
                    ) from None
                log.warning("broker answered %s to the connection", status)
            except ssl.SSLCertVerificationError as e:
                raise tls.certificate_error(self._url, e) from None  # fatal: retrying cannot help
            except (OSError, TimeoutError, WebSocketException, ProtocolError) as e:
                level = logging.WARNING if backoff.attempt == 0 else logging.INFO  # one warning per outage
                log.log(level, "connection to %s %s: %s", self._url,
                        "lost" if welcomed else "failed", str(e) or type(e).__name__)
            except Exception:
                # Whatever else ends a session (a race inside websockets when the broker closes
                # during a big send was seen), the endpoint keeps serving: it reconnects.
                log.exception("connection to %s %s unexpectedly; reconnecting", self._url,
                              "lost" if welcomed else "failed")
            finally:
                if self.connected.is_set():
                    self.connected.clear()
                    self._report()
            # The close frame as received: close_code stays None if the closing went wrong.
            refused = session_ws.protocol.close_rcvd if session_ws is not None else None
            if refused is not None and refused.code == CloseCode.MESSAGE_TOO_BIG:
                self._shrink_frames()
            if welcomed_at is not None and loop.time() - welcomed_at >= HEALTHY_SESSION:
                backoff.reset()
            delay = backoff.next_delay()
            log.info("reconnecting in %.1f s", delay)
            await asyncio.sleep(delay)

    async def _hello(self, ws: ClientConnection) -> bool:
        credit = 0 if self._stopping else max(0, self.engine.capacity - len(self._running))
        self._last_heartbeat = self._heartbeat()
        hello = Hello(
            held_task_ids=[*self._running, *self._unacked],
            crashed_task_ids=self._crashed,
            credit=credit,
            heartbeat=self._last_heartbeat,
            heartbeat_period=self.heartbeat_period,
        )
        await ws.send(hello.model_dump_json())
        async with asyncio.timeout(WELCOME_TIMEOUT):
            raw = await ws.recv()
        try:
            frame = parse_broker_frame(raw)
        except ValidationError as e:
            raise ProtocolError(f"unreadable first frame from the broker: {e}") from None
        if isinstance(frame, ErrorFrame):
            raise ProtocolError(f"the broker refused the session: {frame.message}")
        if not isinstance(frame, Welcome):
            raise ProtocolError(f"expected a welcome frame, got {frame.type!r}")
        if self._crashed:
            self._crashed = []  # the broker has them: reported once
            if self._journal is not None:
                self._journal.forget_crashed()
        self._data = DataAccess(
            url=self.broker_url, grant=f"{self.endpoint_id}:{frame.upload_grant}",
            max_task_bytes=frame.max_task_bytes) if frame.upload_grant else None
        limit = frame.max_frame_bytes or DEFAULT_MAX_FRAME_BYTES
        self._frame_limit = limit if self._frame_cap is None else min(limit, self._frame_cap)
        self._largest_sent = 0
        self._granted, self._received = credit, 0
        self._outbox = list(self._unacked)
        self._ws = ws
        self.connections += 1
        self.connected.set()
        self._report()
        log.info("connected to %s as endpoint %s (credit %d, %d running, %d results to resend)",
                 self.broker_url, self.endpoint_id, credit, len(self._running), len(self._outbox))
        return True

    async def _session(self, ws: ClientConnection) -> None:
        tasks = [
            asyncio.create_task(self._reader(ws)),
            asyncio.create_task(self._sender(ws)),
            asyncio.create_task(self._heartbeats(ws)),
        ]
        self._kick()
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._ws = None
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for t in done:
            t.result()

    async def _reader(self, ws: ClientConnection) -> None:
        async for raw in ws:
            try:
                frame = parse_broker_frame(raw)
            except (ValueError, RecursionError) as e:  # ValidationError is a ValueError
                if not self._on_unreadable_tasks(raw):
                    log.error("ignoring an unreadable frame from the broker (%d bytes): %s",
                              len(raw), str(e)[:2000])
                continue
            if isinstance(frame, TasksFrame):
                self._on_tasks(frame.tasks, frame.functions)
            elif isinstance(frame, ResultsAck):
                self._on_ack(frame.task_ids)
            elif isinstance(frame, CancelFrame):
                await self._on_cancel(frame.task_ids)
            elif isinstance(frame, ErrorFrame):
                log.error("broker: %s", frame.message)

    def _on_unreadable_tasks(self, raw: str | bytes) -> bool:
        """A tasks frame that failed to parse: read its tasks one by one, so one bad task fails
        alone. The good ones run, each bad one with an id fails, every one's credit comes back.
        ``False`` if ``raw`` is not a tasks frame at all."""
        try:
            found = json.loads(raw)
        except (ValueError, RecursionError):
            return False
        if not isinstance(found, dict) or found.get("type") != "tasks":
            return False
        items = found.get("tasks")
        functions = found.get("functions")
        if not isinstance(items, list):
            return False
        if not isinstance(functions, dict):
            functions = {}
        good: list[TaskMessage] = []
        bad: list[tuple[str, str]] = []
        for item in items:
            try:
                good.append(TaskMessage.model_validate(item))
            except (ValueError, RecursionError) as e:
                task_id = item.get("task_id") if isinstance(item, dict) else None
                bad.append((task_id if isinstance(task_id, str) else "", _problem(e)))
        log.error("a tasks frame from the broker did not parse: %d of its %d task(s) are "
                  "unreadable and fail alone", len(bad), len(items))
        self._on_tasks(good, {k: v for k, v in functions.items() if isinstance(v, str)})
        self._received += len(bad)
        for task_id, problem in bad:
            if not task_id or self._holds(task_id):
                continue  # nothing to answer; its credit comes back all the same
            self._answer(task_id, ValueError(
                f"the endpoint could not read task {task_id}: {problem}. Fix the task and "
                f"submit it again (a resource_specification may be at most {MAX_SPEC_DEPTH} "
                f"levels deep and {MAX_SPEC_BYTES} bytes as JSON)."))
        self._kick()
        return True

    def _holds(self, task_id: str) -> bool:
        return task_id in self._running or task_id in self._unacked or task_id in self._recent

    async def _on_cancel(self, task_ids: list[str]) -> None:
        """Stop the tasks the engine still runs; a finished one's result stands (the broker
        ignores it). The engine answers each with a failed result through ``on_done``."""
        running = [t for t in task_ids if t in self._running]
        if not running:
            return
        reason = concurrent.futures.CancelledError(
            "the task was cancelled at the user's request and stopped on the endpoint")
        try:
            # In a thread: stopping a worker may take a moment; the reader is the only
            # caller of engine.submit, so nothing is submitted meanwhile.
            await asyncio.to_thread(self.engine.cancel, running, reason)
        except NotImplementedError as e:
            log.warning("cannot stop %d cancelled task(s) (%s); they run to the end and the "
                        "broker ignores their results", len(running), e)
        except Exception:
            log.exception("engine %s failed to cancel %d task(s)", self.engine.name, len(running))
        else:
            log.info("cancelled %d task(s) at the user's request", len(running))

    def _on_tasks(self, tasks: list[TaskMessage], functions: dict[str, str]) -> None:
        self._received += len(tasks)
        known = self._functions
        for function_id, body in functions.items():
            known[function_id] = body
            known.move_to_end(function_id)
        while len(known) > FUNCTION_CACHE:
            known.popitem(last=False)
        skipped = False
        submit = self.engine.submit
        data = self._data
        for task in tasks:
            task_id = task.task_id
            if self._stopping or self._holds(task_id):
                skipped = True
                continue
            if self.allowed_functions is not None and task.function_id not in self.allowed_functions:
                self._refuse(task)
                skipped = True
                continue
            if not task.function:
                cached = known.get(task.function_id)
                if cached is None:
                    self._answer(task_id, ProtocolError(
                        f"the broker sent task {task_id} without the body of function "
                        f"{task.function_id}, which this endpoint does not have; submit it again"))
                    skipped = True
                    continue
                task.function = cached
            task.data = data
            self._running.add(task_id)
            submit(task, self._on_done, self._on_start)
        if skipped:
            self._kick()  # the skipped tasks' credit goes back to the broker

    def _refuse(self, task: TaskMessage) -> None:
        log.warning("refusing task %s: function %s is not in allowed_functions",
                    task.task_id, task.function_id)
        self._answer(task.task_id, FunctionNotAllowed(
            f"endpoint {self.display_name or self.endpoint_id} does not run function "
            f"{task.function_id}: it is not in the endpoint's allowed_functions. Ask the "
            "endpoint's operator to allow it, or use another endpoint."))

    def _answer(self, task_id: str, error: BaseException) -> None:
        """Answer a task with ``error`` without running it."""
        self._unacked[task_id] = _RESULT.dump_json(failed_result(task_id, error))
        self._outbox.append(task_id)

    def _on_ack(self, task_ids: list[str]) -> None:
        recent = self._recent
        for task_id in task_ids:
            if self._unacked.pop(task_id, None) is not None:
                recent[task_id] = None
        while len(recent) > RECENT_IDS:
            recent.popitem(last=False)
        assert self._changed is not None
        self._changed.set()

    # --------------------------------------------- engine callbacks (any thread)

    def _on_done(self, result: ResultMessage) -> None:
        # Encoded here, once, off the loop; a result too big for any frame fails at once.
        encoded = _RESULT.dump_json(result)
        limit = self._frame_limit
        if len(encoded) > limit - FRAME_OVERHEAD:
            encoded = _RESULT.dump_json(_too_large(result, len(encoded), limit))
        self._done_q.append((result.task_id, encoded))
        self._wake()

    def _on_start(self, task_id: str, started_at: float) -> None:
        if self._journal is not None:
            self._journal.started(task_id)  # before the task runs: it might kill this process
        # No wake-up: starts are reported with the next results, or by the sender's
        # RUNNING_REPORT_PERIOD tick for tasks still running by then.
        self._start_q.append((task_id, started_at))

    def _wake(self) -> None:
        if not self._wake_pending and self._loop is not None:
            self._wake_pending = True
            try:
                self._loop.call_soon_threadsafe(self._take_engine_events)
            except RuntimeError:  # the loop is closed: the agent has stopped
                pass

    def _take_starts(self) -> None:
        started = self._start_q
        while started:
            task_id, at = started.popleft()
            if task_id in self._running:
                self._started_out[task_id] = at

    def _take_engine_events(self) -> None:
        self._wake_pending = False
        self._take_starts()
        done = self._done_q
        finished = []
        while done:
            task_id, encoded = done.popleft()
            finished.append(task_id)
            self._running.discard(task_id)
            self._unacked[task_id] = encoded
            self._outbox.append(task_id)
            # Its result carries started_at; a separate "running" report would be wasted work.
            self._started_out.pop(task_id, None)
        if self._journal is not None and finished:
            self._journal.finished(finished)
        assert self._changed is not None
        self._changed.set()
        self._kick()

    # ---------------------------------------------------------------- sending

    def _kick(self) -> None:
        if self._kick_event is not None:
            self._kick_event.set()

    async def _sender(self, ws: ClientConnection) -> None:
        assert self._kick_event is not None and self._loop is not None
        kick, loop = self._kick_event, self._loop
        while True:
            if not await _wait_event(kick, RUNNING_REPORT_PERIOD):
                self._take_starts()
                if self._started_out:
                    await self._flush(ws)
                continue
            # Under load, at most one flush per `linger`, so results travel in batches; when
            # nothing is running no more results are coming, so waiting would only add latency.
            while True:
                wait = self._last_flush + self.linger - loop.time()
                if wait <= 0 or not self._running or len(self._outbox) >= self.max_batch:
                    break
                kick.clear()
                if not await _wait_event(kick, wait):
                    break
            kick.clear()
            self._last_flush = loop.time()
            await self._flush(ws)

    async def _flush(self, ws: ClientConnection) -> None:
        """Send what is due: running reports, then results in frames capped by count
        (``max_batch``) and by bytes (the session's frame limit), with the credit owed."""
        if self._started_out:
            started, self._started_out = self._started_out, {}
            try:
                for frame in self._running_frames(started):
                    await self._send(ws, frame)
            except BaseException:
                started.update(self._started_out)
                self._started_out = started
                raise
        sent_results = False
        unacked = self._unacked
        while self._outbox:
            outbox, limit = self._outbox, self._frame_limit
            parts: list[bytes] = []
            size, taken = FRAME_OVERHEAD, 0
            for task_id in outbox:
                part = unacked.get(task_id)
                if part is not None:
                    if len(part) > limit - FRAME_OVERHEAD:  # the limit shrank since it came
                        part = unacked[task_id] = self._refit(part, limit)
                    if parts and (size + len(part) + 1 > limit or len(parts) >= self.max_batch):
                        break
                    parts.append(part)
                    size += len(part) + 1
                taken += 1
            del outbox[:taken]
            credit = 0 if outbox else self._owed_credit()
            if parts or credit:
                await self._send(ws, _results_frame(parts, credit))
                sent_results = True
        if not sent_results:
            n = self._owed_credit()
            if n:
                await ws.send(Credit(n=n).model_dump_json())

    async def _send(self, ws: ClientConnection, frame: bytes) -> None:
        self._largest_sent = max(self._largest_sent, len(frame))
        await ws.send(frame, text=True)

    def _running_frames(self, started: dict[str, float]) -> list[bytes]:
        """``started`` as running reports, split in halves until each is under the frame limit."""
        frame = RunningFrame(started=started).model_dump_json().encode()
        if len(frame) <= self._frame_limit or len(started) < 2:
            return [frame]
        items = list(started.items())
        half = len(items) // 2
        return self._running_frames(dict(items[:half])) + self._running_frames(dict(items[half:]))

    @staticmethod
    def _refit(part: bytes, limit: int) -> bytes:
        """A held result that no longer fits a frame, replaced by its failure (rare: parsed)."""
        return _RESULT.dump_json(_too_large(_RESULT.validate_json(part), len(part), limit))

    def _shrink_frames(self) -> None:
        """The broker closed with 1009: a frame was too big for it, whatever it said.

        Halving the largest frame sent puts the refused one over the new limit, so its
        results go in smaller frames, and a result refused alone fails with
        ``ResultTooLarge`` instead of being sent again for ever. The cap stays for the
        process: the broker has shown what it reads.
        """
        largest = min(self._largest_sent or self._frame_limit, self._frame_limit)
        cap = max(MIN_FRAME_BYTES, largest // 2)
        if self._frame_cap is not None and cap >= self._frame_cap:
            log.error("the broker refused a frame of %s as too big (close code 1009) although "
                      "frames are already capped at %s; check the broker's WebSocket size limit",
                      _size(largest), _size(self._frame_cap))
        else:
            log.warning("the broker refused a frame of %s as too big (close code 1009); frames "
                        "from this endpoint are now capped at %s", _size(largest), _size(cap))
        self._frame_cap = cap if self._frame_cap is None else min(cap, self._frame_cap)
        self._frame_limit = min(self._frame_limit, self._frame_cap)

    def _owed_credit(self) -> int:
        """Credit that tops (running + granted, undelivered) back up to the engine's capacity."""
        if self._stopping:
            return 0
        n = self.engine.capacity - len(self._running) - (self._granted - self._received)
        if n <= 0:
            return 0
        self._granted += n
        return n

    async def _heartbeats(self, ws: ClientConnection) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_period)
            self._last_heartbeat = self._heartbeat()
            await ws.send(HeartbeatFrame(heartbeat=self._last_heartbeat).model_dump_json())
            self._report()
            self._kick()  # an elastic engine's capacity may have grown

    def _report(self) -> None:
        if self.on_status is None:
            return
        hb = self._last_heartbeat
        snapshot = {
            "endpoint_id": self.endpoint_id,
            "broker_url": self.broker_url,
            "connected": self.connected.is_set(),
            "connections": self.connections,
            "stopping": self._stopping,
            "updated_at": time.time(),
            "heartbeat": hb.model_dump(mode="json") if hb is not None else None,
        }
        try:
            self.on_status(snapshot)
        except Exception:
            log.exception("status callback failed")

    def _heartbeat(self) -> Heartbeat:
        """What the engine reports, with the agent's own figures in ``details``."""
        status = self.engine.status()
        details = dict(status.details or {})
        details.update(
            capacity=self.engine.capacity,
            held_results=len(self._unacked),
            display_name=self.display_name,
            stopping=self._stopping,
        )
        return Heartbeat(
            workers=status.workers,
            idle_workers=status.idle_workers,
            pending_tasks=status.pending_tasks,
            running_tasks=status.running_tasks,
            engine=self.engine.name,
            versions=WORKER_VERSIONS,
            details=details,
        )


def _too_large(result: ResultMessage, size: int, limit: int) -> ResultMessage:
    """The failed result that stands for ``result`` when it is too big to send."""
    error = ResultTooLarge(
        f"the result of task {result.task_id} is {_size(size)} as JSON, over the limit of "
        f"{_size(limit)} for a frame from the endpoint to the broker; return less data, or "
        "write it to shared storage and return its path")
    log.warning("task %s: %s", result.task_id, error)
    failed = failed_result(result.task_id, error, started_at=result.started_at,
                           finished_at=result.finished_at)
    failed.attempts = result.attempts
    return failed
