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
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from pydantic import ValidationError
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus, WebSocketException

from farcall.backoff import Backoff
from farcall.endpoint.engines.base import Engine
from farcall.endpoint.errors import EndpointRejected
from farcall.endpoint.worker import WORKER_VERSIONS, failed_result
from farcall.errors import FunctionNotAllowed
from farcall.messages import (
    Credit,
    ErrorFrame,
    Heartbeat,
    HeartbeatFrame,
    Hello,
    ResultMessage,
    ResultsAck,
    ResultsFrame,
    RunningFrame,
    TaskMessage,
    TasksFrame,
    Welcome,
    parse_broker_frame,
)
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


class ProtocolError(Exception):
    """The broker sent something the protocol does not allow; the agent reconnects."""


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
        self._url = websocket_url(broker_url, f"/endpoints/{endpoint_id}/connect")
        self._headers = {"Authorization": f"Bearer {credential}"}

        self.connected = threading.Event()
        """Set while a session with the broker is up (after its Welcome)."""
        self.connections = 0
        """Sessions opened so far (each reconnect adds one)."""

        # Owned by the event loop thread.
        self._running: set[str] = set()
        self._unacked: dict[str, ResultMessage] = {}
        self._outbox: list[ResultMessage] = []
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

        # Filled by engine threads, drained on the loop.
        self._done_q: collections.deque[ResultMessage] = collections.deque()
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
            try:
                await asyncio.wait_for(self._changed.wait(), left)
            except TimeoutError:
                pass

    # ------------------------------------------------------------- connection

    async def _connect_loop(self) -> None:
        backoff = Backoff(cap=self.max_backoff)
        while True:
            welcomed = False
            try:
                async with connect(
                    self._url,
                    additional_headers=self._headers,
                    compression=None,
                    max_size=None,
                    open_timeout=WELCOME_TIMEOUT,
                    close_timeout=2,
                ) as ws:
                    welcomed = await self._hello(ws)
                    backoff.reset()
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
            except (OSError, TimeoutError, WebSocketException, ProtocolError) as e:
                level = logging.WARNING if backoff.attempt == 0 else logging.INFO  # one warning per outage
                log.log(level, "connection to %s %s: %s", self._url,
                        "lost" if welcomed else "failed", str(e) or type(e).__name__)
            finally:
                if self.connected.is_set():
                    self.connected.clear()
                    self._report()
            delay = backoff.next_delay()
            log.info("reconnecting in %.1f s", delay)
            await asyncio.sleep(delay)

    async def _hello(self, ws: ClientConnection) -> bool:
        credit = 0 if self._stopping else max(0, self.engine.capacity - len(self._running))
        self._last_heartbeat = self._heartbeat()
        hello = Hello(
            held_task_ids=[*self._running, *self._unacked],
            credit=credit,
            heartbeat=self._last_heartbeat,
        )
        await ws.send(hello.model_dump_json())
        raw = await asyncio.wait_for(ws.recv(), WELCOME_TIMEOUT)
        try:
            frame = parse_broker_frame(raw)
        except ValidationError as e:
            raise ProtocolError(f"unreadable first frame from the broker: {e}") from None
        if isinstance(frame, ErrorFrame):
            raise ProtocolError(f"the broker refused the session: {frame.message}")
        if not isinstance(frame, Welcome):
            raise ProtocolError(f"expected a welcome frame, got {frame.type!r}")
        self._granted, self._received = credit, 0
        self._outbox = list(self._unacked.values())
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
            except ValidationError as e:
                log.error("ignoring an unreadable frame from the broker: %s", e)
                continue
            if isinstance(frame, TasksFrame):
                self._on_tasks(frame.tasks, frame.functions)
            elif isinstance(frame, ResultsAck):
                self._on_ack(frame.task_ids)
            elif isinstance(frame, ErrorFrame):
                log.error("broker: %s", frame.message)

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
        for task in tasks:
            task_id = task.task_id
            if (
                self._stopping
                or task_id in self._running
                or task_id in self._unacked
                or task_id in self._recent
            ):
                skipped = True
                continue
            if self.allowed_functions is not None and task.function_id not in self.allowed_functions:
                self._refuse(task)
                skipped = True
                continue
            if not task.function:
                cached = known.get(task.function_id)
                if cached is None:
                    self._fail(task, ProtocolError(
                        f"the broker sent task {task_id} without the body of function "
                        f"{task.function_id}, which this endpoint does not have; submit it again"))
                    skipped = True
                    continue
                task.function = cached
            self._running.add(task_id)
            submit(task, self._on_done, self._on_start)
        if skipped:
            self._kick()  # the skipped tasks' credit goes back to the broker

    def _refuse(self, task: TaskMessage) -> None:
        log.warning("refusing task %s: function %s is not in allowed_functions",
                    task.task_id, task.function_id)
        self._fail(task, FunctionNotAllowed(
            f"endpoint {self.display_name or self.endpoint_id} does not run function "
            f"{task.function_id}: it is not in the endpoint's allowed_functions. Ask the "
            "endpoint's operator to allow it, or use another endpoint."))

    def _fail(self, task: TaskMessage, error: BaseException) -> None:
        """Answer a task with ``error`` without running it."""
        result = failed_result(task.task_id, error)
        self._unacked[task.task_id] = result
        self._outbox.append(result)

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
        self._done_q.append(result)
        self._wake()

    def _on_start(self, task_id: str, started_at: float) -> None:
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
        while done:
            result = done.popleft()
            task_id = result.task_id
            self._running.discard(task_id)
            self._unacked[task_id] = result
            self._outbox.append(result)
            # Its result carries started_at; a separate "running" report would be wasted work.
            self._started_out.pop(task_id, None)
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
            try:
                await asyncio.wait_for(kick.wait(), RUNNING_REPORT_PERIOD)
            except TimeoutError:
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
                try:
                    await asyncio.wait_for(kick.wait(), wait)
                except TimeoutError:
                    break
            kick.clear()
            self._last_flush = loop.time()
            await self._flush(ws)

    async def _flush(self, ws: ClientConnection) -> None:
        if self._started_out:
            started, self._started_out = self._started_out, {}
            try:
                await ws.send(RunningFrame(started=started).model_dump_json())
            except BaseException:
                started.update(self._started_out)
                self._started_out = started
                raise
        sent_results = False
        while self._outbox:
            batch = [r for r in self._outbox[: self.max_batch] if r.task_id in self._unacked]
            del self._outbox[: self.max_batch]
            credit = 0 if self._outbox else self._owed_credit()
            if batch or credit:
                await ws.send(ResultsFrame(results=batch, credit=credit).model_dump_json())
                sent_results = True
        if not sent_results:
            n = self._owed_credit()
            if n:
                await ws.send(Credit(n=n).model_dump_json())

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
