"""The endpoint agent: one outbound WebSocket to the broker, an engine behind it.

The agent keeps the connection (connect, backoff, hello, heartbeats, stop); its
``Intake`` (``intake.py``) takes tasks in with credit, its ``Outbox`` (``outbox.py``)
holds and sends results. What a caller may rely on (see docs/protocol.md, "Endpoint channel"):

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
  on every connect, disconnect and heartbeat, for ``farcall-endpoint status``;
  ``on_welcome`` (if given) gets every session's ``Welcome`` (the broker's identity in it).
- Every task it hands to the engine carries the data plane's ``DataAccess`` (the broker
  URL, that task's own grant as ``X-Farcall-Grant`` sends it, the per-task limit), so
  workers fetch big arguments and upload big results themselves; the grant key the
  ``Welcome`` carries stays in the agent.
- Nothing wedges it: every frame it sends stays under the broker's
  ``Welcome.max_frame_bytes`` (a result too big for any frame fails its task with
  ``ResultTooLarge``), a task the agent cannot read fails alone, and sessions
  that die right after their welcome are retried further and further apart.
- With ``journal_path`` set, tasks that were running when the agent process
  died are reported once in the next ``Hello.crashed_task_ids`` (``journal.py``).
- With ``idle_shutdown_seconds`` set, the agent stops by itself (as ``request_stop`` does)
  once that long has passed with no task running, no result held and no task arriving.
- With ``idle_heartbeats_soft`` > 0 it also stops by Globus Compute's rule, counted in
  heartbeat periods (``idle.py``): after some work, that many periods idle with nothing
  outstanding; or ``idle_heartbeats_hard`` periods with nothing moving even with tasks held.
  Either is the same graceful stop; tasks still held then are in flight at the broker, which
  hands them out again.
- With ``heartbeat_threshold`` set, a connection on which the broker has not been heard for
  that many seconds is deemed lost and the agent reconnects (WebSocket pings every half of it,
  each answered within the other half); unset, the pings' defaults (20 s, 20 s) apply.
- ``on_task_states`` (if given) gets, once per batch, the ``(task_id, state)`` of every task
  received, started and finished (``received``, ``running``, ``success``, ``failed``), and
  ``("", "connected")`` at each session's welcome: a multi-user endpoint's audit log.
- A multi-user endpoint's manager (``multi_user=True``) says so in its ``Hello`` with its
  ``user_config_schema``; each ``StartUserEndpoint`` the broker sends goes to
  ``on_start_user_endpoint`` (an ordinary agent logs and ignores it).
"""

from __future__ import annotations

import asyncio
import base64
import collections
import concurrent.futures
import logging
import ssl
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus, WebSocketException
from websockets.frames import CloseCode

from farcall import tls
from farcall.backoff import Backoff
from farcall.endpoint.engines.base import Engine
from farcall.endpoint.errors import EndpointRejected, ProtocolError
from farcall.endpoint.idle import IdleHeartbeats, Verdict
from farcall.endpoint.intake import Intake
from farcall.endpoint.journal import CrashJournal
from farcall.endpoint.outbox import Outbox
from farcall.endpoint.outcomes import WORKER_VERSIONS
from farcall.protocol.channel import (
    DATA_RETRY_SECONDS,
    CancelFrame,
    DataAccess,
    ErrorFrame,
    Heartbeat,
    HeartbeatFrame,
    Hello,
    ResultMessage,
    ResultsAck,
    StartUserEndpoint,
    TasksFrame,
    Welcome,
    parse_broker_frame,
)
from farcall.protocol.control import STOPPED_CLOSE_CODE
from farcall.urls import websocket_url

__all__ = ["Agent", "ProtocolError"]

log = logging.getLogger(__name__)

ACK_TIMEOUT = 5.0
"""On stop: how long to wait for the broker to acknowledge the last results."""
WELCOME_TIMEOUT = 30.0
CREDENTIAL_ROTATED = 4005
"""The broker's close code for a session opened with a credential that was since rotated."""
RUNNING_REPORT_PERIOD = 0.2
"""Seconds between reports of tasks that started and are still running."""
IDLE_CHECKS = 4
"""An idle shutdown is checked this many times per ``idle_shutdown_seconds`` (at most once a second)."""
PING_PERIOD = 20.0
"""Without ``heartbeat_threshold``: seconds between pings, and to answer one (websockets' own)."""
HEALTHY_SESSION = 5.0
"""Seconds a session must last before the reconnect backoff starts again from its shortest delay.

Time, not a round trip, is the proof: heartbeats get no answer and an idle
endpoint sends no results, while a broker that cannot serve (its RabbitMQ down)
drops the session within a moment of its welcome, every time.
"""


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


class Agent:
    """Connects to the broker, feeds tasks to ``engine``, sends back results and heartbeats.

    The connection is the agent's own; what comes in goes through its ``Intake``, what goes
    out through its ``Outbox``.
    """

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
        on_welcome: Callable[[Welcome], None] | None = None,
        journal_path: Path | None = None,
        data_retry_seconds: float = DATA_RETRY_SECONDS,
        reload_credential: Callable[[], str | None] | None = None,
        idle_shutdown_seconds: float | None = None,
        multi_user: bool = False,
        user_config_schema: dict[str, Any] | None = None,
        on_start_user_endpoint: Callable[[StartUserEndpoint], None] | None = None,
        on_task_states: Callable[[list[tuple[str, str]]], None] | None = None,
        heartbeat_threshold: float | None = None,
        idle_heartbeats_soft: int = 0,
        idle_heartbeats_hard: int = 5760,
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
        self.on_welcome = on_welcome
        self.journal_path = journal_path
        """The crash journal's file (in the endpoint's directory); ``None``: no journal."""
        self.data_retry_seconds = data_retry_seconds
        """How long workers retry a blob transfer (``DataAccess.retry_seconds`` of every task)."""
        self.reload_credential = reload_credential
        """Reads the endpoint's credential as stored now (``endpoint.json``): when the broker
        refuses the one in use or ends the session because it was rotated, the agent reconnects
        with the stored one if it changed (``farcall-endpoint rotate-credential``)."""
        self.idle_shutdown_seconds = idle_shutdown_seconds
        """Stop after this many seconds with nothing running, held or arriving; None: never."""
        self.multi_user = multi_user
        self.user_config_schema = user_config_schema
        self.on_start_user_endpoint = on_start_user_endpoint
        """Called on the event loop with each ``StartUserEndpoint``: must return at once."""
        self.on_task_states = on_task_states
        """Called on the event loop with a batch of ``(task_id, state)``: must return at once."""
        self.heartbeat_threshold = heartbeat_threshold
        """Seconds without hearing from the broker before the connection is deemed lost."""
        self.idle_heartbeats = IdleHeartbeats(idle_heartbeats_soft, idle_heartbeats_hard)
        self.idle_stopped = False
        """The agent stopped because it was idle (``idle_shutdown_seconds`` or the idle
        heartbeats)."""
        self._credential = credential
        self._url = websocket_url(broker_url, f"/endpoints/{endpoint_id}/connect")
        self._headers = {"Authorization": f"Bearer {credential}"}
        self._ssl = tls.client_context() if self._url.startswith("wss:") else None
        tls.warn_if_insecure(self._url)

        self.connected = threading.Event()
        """Set while a session with the broker is up (after its Welcome)."""
        self.connections = 0
        """Sessions opened so far (each reconnect adds one)."""

        # Owned by the event loop thread (Outbox.encode excepted).
        self._outbox = Outbox(max_batch)
        self._intake = Intake(engine, self._outbox, self._on_done, self._on_start,
                              allowed_functions=self.allowed_functions,
                              endpoint_name=display_name or endpoint_id)
        self._closing = False
        self._ws: ClientConnection | None = None
        self._last_flush = 0.0
        self._last_heartbeat: Heartbeat | None = None
        self._backoff = Backoff(cap=max_backoff)
        self._journal: CrashJournal | None = None
        self._crashed: list[str] = []

        # Filled by engine threads, drained on the loop.
        self._done_q: collections.deque[tuple[str, bytes]] = collections.deque()
        self._start_q: collections.deque[tuple[str, float]] = collections.deque()
        self._state_q: collections.deque[tuple[str, str]] = collections.deque()
        self._wake_pending = False
        self._last_activity = 0.0
        self._moved = 0
        """Tasks received, finished and acknowledged so far (the idle heartbeats' movement)."""

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
        watches: list[asyncio.Task[None]] = []
        if self.idle_shutdown_seconds:
            watches.append(asyncio.create_task(self._idle_watch(self.idle_shutdown_seconds)))
        if self.idle_heartbeats.enabled:
            watches.append(asyncio.create_task(self._idle_heartbeats_watch()))
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
            for watch in watches:
                watch.cancel()
            await asyncio.gather(connection, stop, *watches, return_exceptions=True)
            self.connected.clear()
            await asyncio.to_thread(self.engine.shutdown, False)
            if self._journal is not None:
                self._journal.close()
            self._report()
            log.info("endpoint agent stopped")

    async def _drain(self) -> None:
        """Graceful stop: no new tasks, running ones finish (bounded), results flushed."""
        assert self._loop is not None
        intake, outbox = self._intake, self._outbox
        intake.stop()
        log.info("stopping: waiting up to %.0f s for %d running task(s)",
                 self.stop_timeout, len(intake.running))
        loop = self._loop
        if not await self._wait_for(lambda: not intake.running, loop.time() + self.stop_timeout):
            log.warning("stopping: abandoning %d running task(s); the broker will hand them "
                        "out again", len(intake.running))
        self._kick()
        if outbox.held and not await self._wait_for(
            lambda: not outbox.held, loop.time() + ACK_TIMEOUT
        ):
            log.warning("stopping: %d result(s) not acknowledged; their tasks will run again",
                        outbox.held)
        self._closing = True
        if self._ws is not None:
            await self._ws.close()  # a normal close (1000), so the broker sees a clean goodbye

    async def _idle_watch(self, idle: float) -> None:
        """Stop the agent once ``idle`` seconds pass with nothing running, held or arriving."""
        assert self._loop is not None
        loop, intake, outbox = self._loop, self._intake, self._outbox
        self._last_activity = loop.time()
        period = min(1.0, idle / IDLE_CHECKS)
        while True:
            await asyncio.sleep(period)
            now = loop.time()
            if intake.running or outbox.held:
                self._last_activity = now
            elif now - self._last_activity >= idle:
                log.info("no task for %.0f s (idle_shutdown_seconds): stopping", idle)
                self.idle_stopped = True
                self.request_stop()
                return

    async def _idle_heartbeats_watch(self) -> None:
        """Stop the agent by Globus Compute's idle rule, checked once per heartbeat period."""
        rule, intake, outbox = self.idle_heartbeats, self._intake, self._outbox
        seen = self._moved
        while True:
            await asyncio.sleep(self.heartbeat_period)
            moved, seen = self._moved != seen, self._moved
            outstanding = len(intake.running) + outbox.held
            counts = rule.soft_count, rule.hard_count
            verdict = rule.tick(moved=moved, worked=self._moved > 0, outstanding=bool(outstanding))
            if verdict == "soft":
                log.info("idle for %d heartbeat periods with nothing outstanding "
                         "(idle_heartbeats_soft): stopping", rule.soft_count)
            elif verdict == "hard":
                log.warning("no task or result moved for %d heartbeat periods "
                            "(idle_heartbeats_hard) with %d task(s) or result(s) outstanding: "
                            "stopping; the broker hands out again the tasks still held",
                            rule.hard_count, outstanding)
            elif counts[0] == 0 < rule.soft_count or counts[1] == rule.soft < rule.hard_count:
                which: Verdict = "soft" if counts[0] == 0 < rule.soft_count else "hard"
                log.info("idle: stopping in %.0f s unless a task or result moves "
                         "(idle_heartbeats_%s)", rule.seconds_left(which, self.heartbeat_period),
                         which)
            if verdict is not None:
                self.idle_stopped = True
                self.request_stop()
                return

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
                    ping_interval=self._ping_every,
                    ping_timeout=self._ping_every,
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
                if status in (401, 403) and self._credential_changed():
                    continue
                if status in (401, 403, 404):
                    raise EndpointRejected(
                        f"the broker at {self.broker_url} refused endpoint {self.endpoint_id} "
                        f"({status}): it was deleted, its owner was disabled, or its credential "
                        "was rotated and endpoint.json does not hold the new one (farcall-endpoint "
                        "rotate-credential). To register a "
                        "new endpoint, start again with --register-again "
                        "(farcall-endpoint start NAME --register-again)."
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
                self._outbox.shrink()
            if refused is not None and refused.code == STOPPED_CLOSE_CODE:
                log.warning("the endpoint's owner asked it to stop (Client.stop_endpoint): "
                            "stopping; start it again with farcall-endpoint start")
                self.request_stop()  # results of running tasks still go out on a new session
            if refused is not None and refused.code == CREDENTIAL_ROTATED:
                log.warning("the broker ended the session: this endpoint's credential was rotated")
                if self._credential_changed():
                    continue
            if welcomed_at is not None and loop.time() - welcomed_at >= HEALTHY_SESSION:
                backoff.reset()
            delay = backoff.next_delay()
            log.info("reconnecting in %.1f s", delay)
            await asyncio.sleep(delay)

    @property
    def _ping_every(self) -> float:
        """The WebSocket pings that tell a silent broker from a live one: one every this many
        seconds, each to be answered within as many (``heartbeat_threshold``: half of it each)."""
        return PING_PERIOD if self.heartbeat_threshold is None else self.heartbeat_threshold / 2

    def _credential_changed(self) -> bool:
        """Take up the stored credential if it is not the one in use (True: reconnect with it)."""
        if self.reload_credential is None:
            return False
        try:
            stored = self.reload_credential()
        except Exception as e:  # noqa: BLE001 - a damaged file: carry on as if unchanged
            log.warning("could not read the endpoint's stored credential: %s", e)
            return False
        if not stored or stored == self._credential:
            return False
        self._credential = stored
        self._headers = {"Authorization": f"Bearer {stored}"}
        log.info("reconnecting with the endpoint's new credential")
        return True

    async def _hello(self, ws: ClientConnection) -> bool:
        intake, outbox = self._intake, self._outbox
        credit = intake.open_session()
        self._last_heartbeat = self._heartbeat()
        hello = Hello(
            held_task_ids=[*intake.running, *outbox.held_ids()],
            crashed_task_ids=self._crashed,
            credit=credit,
            heartbeat=self._last_heartbeat,
            heartbeat_period=self.heartbeat_period,
            multi_user=self.multi_user,
            user_config_schema=self.user_config_schema,
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
        if self.on_welcome is not None:
            try:
                self.on_welcome(frame)
            except Exception:
                log.exception("welcome callback failed")
        if self._crashed:
            self._crashed = []  # the broker has them: reported once
            if self._journal is not None:
                self._journal.forget_crashed()
        intake.set_data(DataAccess(
            url=self.broker_url, max_task_bytes=frame.max_task_bytes,
            retry_seconds=self.data_retry_seconds) if frame.upload_grant else None,
            self.endpoint_id, _grant_key(frame.upload_grant))
        resend = outbox.open_session(frame.max_frame_bytes)
        self._ws = ws
        self.connections += 1
        self.connected.set()
        self._report()
        self._states([("", "connected")])
        log.info("connected to %s as endpoint %s (credit %d, %d running, %d results to resend)",
                 self.broker_url, self.endpoint_id, credit, len(intake.running), resend)
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
        intake = self._intake
        async for raw in ws:
            try:
                frame = parse_broker_frame(raw)
            except (ValueError, RecursionError) as e:  # ValidationError is a ValueError
                if intake.take_unreadable(raw):
                    self._kick()  # the unread tasks' credit goes back, their failures out
                else:
                    log.error("ignoring an unreadable frame from the broker (%d bytes): %s",
                              len(raw), str(e)[:2000])
                continue
            if isinstance(frame, TasksFrame):
                if frame.tasks:
                    self._moved += len(frame.tasks)
                    self._last_activity = self._loop.time() if self._loop else 0.0
                    if self.on_task_states is not None:
                        self._states([(t.task_id, "received") for t in frame.tasks])
                if intake.take(frame.tasks, frame.functions):
                    self._kick()  # the skipped tasks' credit goes back to the broker
            elif isinstance(frame, ResultsAck):
                self._moved += len(frame.task_ids)
                self._outbox.acked(frame.task_ids)
                assert self._changed is not None
                self._changed.set()
            elif isinstance(frame, CancelFrame):
                await self._on_cancel(frame.task_ids)
            elif isinstance(frame, StartUserEndpoint):
                self._on_start_user_endpoint(frame)
            elif isinstance(frame, ErrorFrame):
                log.error("broker: %s", frame.message)

    def _on_start_user_endpoint(self, frame: StartUserEndpoint) -> None:
        if self.on_start_user_endpoint is None:
            log.warning("ignoring the broker's request to start user endpoint %s: this endpoint "
                        "is not a multi-user endpoint (multi_user: true)", frame.endpoint_id)
            return
        try:
            self.on_start_user_endpoint(frame)
        except Exception:
            log.exception("starting user endpoint %s failed", frame.endpoint_id)

    def _states(self, states: list[tuple[str, str]]) -> None:
        if self.on_task_states is None or not states:
            return
        try:
            self.on_task_states(states)
        except Exception:
            log.exception("task state callback failed")

    async def _on_cancel(self, task_ids: list[str]) -> None:
        """Stop the tasks the engine still runs; a finished one's result stands (the broker
        ignores it). The engine answers each with a failed result through ``on_done``."""
        running = [t for t in task_ids if t in self._intake.running]
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

    # --------------------------------------------- engine callbacks (any thread)

    def _on_done(self, result: ResultMessage) -> None:
        # Encoded here, once, off the loop; a result too big for any frame fails at once.
        if self.on_task_states is not None:
            self._state_q.append((result.task_id, str(result.state)))
        self._done_q.append((result.task_id, self._outbox.encode(result)))
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
        started, running = self._start_q, self._intake.running
        reports = self._outbox.running_reports
        audit = self.on_task_states is not None
        states: list[tuple[str, str]] = []
        while started:
            task_id, at = started.popleft()
            if task_id in running:
                reports[task_id] = at
            if audit:
                states.append((task_id, "running"))
        if states:
            self._states(states)

    def _take_engine_events(self) -> None:
        self._wake_pending = False
        self._take_starts()
        done, running = self._done_q, self._intake.running
        finished: list[tuple[str, bytes]] = []
        while done:
            item = done.popleft()
            running.discard(item[0])
            finished.append(item)
        # Each result carries its started_at: its running report, if not sent yet, is dropped.
        self._outbox.put(finished)
        self._moved += len(finished)
        state_q = self._state_q
        if state_q:
            self._states([state_q.popleft() for _ in range(len(state_q))])
        if self._journal is not None and finished:
            self._journal.finished([task_id for task_id, _ in finished])
        assert self._changed is not None
        self._changed.set()
        self._kick()

    # ---------------------------------------------------------------- sending

    def _kick(self) -> None:
        if self._kick_event is not None:
            self._kick_event.set()

    async def _sender(self, ws: ClientConnection) -> None:
        assert self._kick_event is not None and self._loop is not None
        kick, loop, outbox, intake = self._kick_event, self._loop, self._outbox, self._intake

        async def send(frame: bytes) -> None:
            await ws.send(frame, text=True)

        while True:
            if not await _wait_event(kick, RUNNING_REPORT_PERIOD):
                self._take_starts()
                if outbox.running_reports:
                    await outbox.flush(send, intake.owed_credit)
                continue
            # Under load, at most one flush per `linger`, so results travel in batches; when
            # nothing is running no more results are coming, so waiting would only add latency.
            while True:
                wait = self._last_flush + self.linger - loop.time()
                if wait <= 0 or not intake.running or outbox.queued >= self.max_batch:
                    break
                kick.clear()
                if not await _wait_event(kick, wait):
                    break
            kick.clear()
            self._last_flush = loop.time()
            await outbox.flush(send, intake.owed_credit)

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
            "stopping": self._intake.stopping,
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
            held_results=self._outbox.held,
            display_name=self.display_name,
            stopping=self._intake.stopping,
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


def _grant_key(welcome_key: str) -> bytes:
    """The grant key a ``Welcome`` carries, decoded (empty if it carries none or garbage)."""
    try:
        return base64.urlsafe_b64decode(welcome_key.encode("ascii"))
    except (ValueError, UnicodeEncodeError):
        return b""
