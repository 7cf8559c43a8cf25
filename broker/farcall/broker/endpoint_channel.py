"""One endpoint's WebSocket session: hello/reconcile, credit-based dispatch, results, heartbeats.

A queued message holds a whole submitted batch. Messages move from the
endpoint's queue to the session: their tasks are recorded in the in-flight set,
the deliveries acked, and the tasks sent as far as the endpoint's credit goes;
the rest wait in the session until credit comes back. A task is never held
unacked in RabbitMQ while it runs; if the connection dies, the next hello
reconciles the in-flight set and queues the lost (sent or waiting) tasks again.

An endpoint has one live session, on whichever replica: a new hello with the
endpoint's credential makes its session the live one at once and retires the
old one (closed; on another replica through the endpoint's control channel).
Only the live session can put tasks in flight (the store checks), so a
connection that dropped silently costs the seconds until the agent reconnects,
not the tasks the old session would have sent into a dead socket.

The control channel (pub/sub group ``endpoint:<id>``) also carries cancels to
whichever replica holds the session, and the endpoint's deletion; ``endpoint_control``
sends them, and ``results`` stores and publishes what the endpoint sends back.

A multi-user endpoint's manager (its hello says ``multi_user``) runs no tasks (tasks for it go
to its user endpoints; it gets only those queued before its first hello, and fails them): its
session turns ``UserEndpointWanted`` into ``StartUserEndpoint`` frames, and at its hello and each
heartbeat asks again for user endpoints with open work and no session (``user_endpoints``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import uuid

from fastapi import WebSocket
from pydantic import ValidationError
from starlette.websockets import WebSocketDisconnect, WebSocketState

from farcall.backoff import Backoff
from farcall.broker import auth, endpoint_control, grants, user_endpoints
from farcall.broker.asgi import over_limit
from farcall.broker.errors import (
    BACKEND_ERRORS,
    ApiError,
    Forbidden,
    Unavailable,
    clip,
    deny_websocket,
    error_summary,
)
from farcall.broker.queue.base import Consumer, Delivery
from farcall.broker.queued import read_queued
from farcall.broker.results import publish_results, store_results
from farcall.broker.services import Services
from farcall.broker.store.base import Subscription
from farcall.errors import DeserializationError
from farcall.protocol.channel import (
    CancelFrame,
    Credit,
    ErrorFrame,
    HeartbeatFrame,
    Hello,
    ResultMessage,
    ResultsAck,
    ResultsFrame,
    RunningFrame,
    StartUserEndpoint,
    Welcome,
    join_task_batch,
    parse_endpoint_frame,
    tasks_frame_json,
)
from farcall.protocol.common import PROTOCOL_VERSION, TaskState, now
from farcall.protocol.control import (
    STOPPED_CLOSE_CODE,
    AccessRevoked,
    CancelTasks,
    CredentialRotated,
    EndpointRefused,
    EndpointRemoved,
    EndpointStopRequested,
    SessionReplaced,
    UserEndpointWanted,
    parse_control,
)
from farcall.recent import RecentIds
from farcall.serialize import BLOB_REF, is_ref, parse_ref

log = logging.getLogger(__name__)

_DOWN: tuple[type[Exception], ...] = (Unavailable, *BACKEND_ERRORS)
"""What a backing service that is not answering raises."""

HELLO_TIMEOUT = 30.0
MAX_BATCH = 1000
"""Most tasks in one frame to the endpoint."""
RECENT_DONE = 50_000
"""Finished task ids a session remembers, to drop late queued copies without a store lookup."""
PREFETCH = 32
"""Queued messages (each a submitted batch) a session may hold unacked."""
PARK_AFTER = 10.0
"""With no credit for this long, stop consuming so no delivery stays unacked (consumer timeout)."""
TOUCH_EVERY = 1.0
RETIRE_WAIT = 5.0
"""How long a new session waits for the one it replaces (on this replica) to finish closing."""
STOP_AGAIN = 0.2
"""How often a session's loops are cancelled again while one runs on after a cancel."""
REPLACED = 4000
"""Close code for a session that a newer session of the same endpoint replaced."""
DELETED = 4004
"""Close code for a session whose endpoint was deleted."""
ROTATED = 4005
"""Close code for a session opened with a credential the endpoint's owner has since replaced."""
_ROTATED_WHY = "ended: the endpoint's credential was rotated; connect with the new one"
REFUSED = 4003
"""Close code for a session whose credential is refused now (its owner was disabled)."""


async def serve(ws: WebSocket, svc: Services, endpoint_id: str) -> None:
    """Authenticate the endpoint credential, then run the session until either side closes."""
    address = ws.client.host if ws.client else ""
    try:
        principal = await svc.authenticate(
            auth.bearer(ws.headers.get("authorization")), address, kind="endpoint")
        if principal.id != endpoint_id:
            raise Forbidden(f"this credential may not connect as endpoint {clip(endpoint_id)}")
    except ApiError as refused:
        await deny_websocket(ws, refused)
        return
    await ws.accept()
    await EndpointSession(ws, svc, endpoint_id, principal.token_hash).run()


class EndpointSession:
    def __init__(self, ws: WebSocket, svc: Services, endpoint_id: str,
                 credential_hash: str = "") -> None:
        self.ws, self.svc, self.endpoint_id = ws, svc, endpoint_id
        self.credential_hash = credential_hash
        """The SHA-256 of the credential this session opened with: its grant key is derived from
        it, and a ``CredentialRotated`` naming it ends the session."""
        self.store, self.queue = svc.store, svc.queue
        self.session_id = uuid.uuid4().hex
        self.credit = 0
        self.credit_changed = asyncio.Event()
        self.held: set[str] = set()  # taken by this session (waiting or sent), no result yet
        self.done_ids = RecentIds(RECENT_DONE)
        """Tasks finished through this session, the most recent ``RECENT_DONE``."""
        # (task id, function id, TaskMessage JSON) taken by this session, waiting for credit
        self.waiting: collections.deque[tuple[str, str, str]] = collections.deque()
        self.sent_functions: set[str] = set()  # function bodies the endpoint got in this session
        self.arg_blobs: dict[str, str] = {}
        """Task id -> the blob holding its arguments, for the held tasks whose arguments travel
        as a blob: freed when the task's result comes (``_free_arg_blobs``)."""
        self.consumer: Consumer | None = None
        self._send_lock = asyncio.Lock()
        self._last_touch = 0.0
        self.retired = False
        """Set once a newer session replaced this one (or the endpoint was deleted)."""
        self._ended = asyncio.Event()
        self._control: Subscription | None = None
        self._loops: list[asyncio.Task[None]] = []
        self._closing: asyncio.Task[None] | None = None
        self.multi_user = False
        """A multi-user endpoint's manager: it takes no tasks, and is told to start user endpoints."""

    async def run(self) -> None:
        try:
            hello = await self._hello()
        except WebSocketDisconnect:
            return
        except TimeoutError:
            await self._error_and_close(f"no hello within {HELLO_TIMEOUT:.0f} s")
            return
        if hello is None:
            self._ended.set()
            return
        try:
            self._control = await self.store.pubsub.subscribe_control(self.endpoint_id)
            if self.credential_hash and await self._credential_replaced():
                await self._end_early(None, ROTATED, _ROTATED_WHY)
                return
            previous = await self.store.endpoints.connect_session(
                self.endpoint_id, self.session_id, hello.heartbeat_period, now())
        except BaseException as e:
            await self._end_early(e)
            raise
        log.info(
            "endpoint %s connected (session %s, credit %d, holds %d%s)",
            self.endpoint_id,
            self.session_id,
            hello.credit,
            len(hello.held_task_ids),
            f", replaces session {previous}" if previous else "",
        )
        try:
            await endpoint_control.replace_session(self.svc, self.endpoint_id, self, previous)
            await self._say_multi_user(hello)
            await self.store.endpoints.set_heartbeat(self.endpoint_id, hello.heartbeat, now())
            await self.queue.declare(self.endpoint_id)  # RabbitMQ may have lost it
            await self._reconcile(set(hello.held_task_ids), set(hello.crashed_task_ids))
            await self.send(Welcome(
                endpoint_id=self.endpoint_id, max_frame_bytes=self.svc.settings.max_frame_bytes,
                upload_grant=await grants.welcome_key(
                    self.svc, self.endpoint_id, self.credential_hash),
                max_task_bytes=self.svc.settings.max_task_bytes,
                broker_id=await self.svc.broker_id()).model_dump_json())
            await self._add_credit(hello.credit)
            await self._resend_starts()
            await self._run_loops()
        except WebSocketDisconnect:
            pass
        except _DOWN as e:
            log.warning("endpoint %s session ended: a backing service failed: %r", self.endpoint_id, e)
            await self._close(1011, "broker's store or queue is not answering; reconnect later")
        except Exception as e:
            log.exception("endpoint %s session failed", self.endpoint_id)
            await self._close(1011, f"broker error: {type(e).__name__}")
        finally:
            await asyncio.shield(self._cleanup())

    async def _say_multi_user(self, hello: Hello) -> None:
        """Record whether the endpoint is a multi-user endpoint's manager, and its schema; every
        replica reads them anew (a manager's schema may have changed with its restart)."""
        self.multi_user = hello.multi_user
        changed = await self.store.endpoints.set_multi_user(
            self.endpoint_id, hello.multi_user, hello.user_config_schema)
        if changed or hello.multi_user:
            self.svc.endpoint_access.pop(self.endpoint_id)
            user_endpoints.forget(self.svc, self.endpoint_id)
            await self.store.pubsub.publish_revocation(
                AccessRevoked(type="access", endpoint_id=self.endpoint_id))

    async def _resend_starts(self) -> None:
        """A manager: ask again for its user endpoints with work waiting and no session."""
        if not self.multi_user:
            return
        sent = await user_endpoints.resend_starts(
            self.svc, self.endpoint_id, self.credential_hash, self._send_start)
        if sent:
            log.info("endpoint %s: asked again to start %d user endpoints", self.endpoint_id, sent)

    async def _send_start(self, frame: StartUserEndpoint) -> None:
        await self.send(frame.model_dump_json())

    async def _start_user_endpoint(self, child_id: str) -> None:
        """A manager: tell its agent to start the user endpoint ``child_id``; if that fails, the
        start claim is given up, so the next heartbeat asks again."""
        frame = await user_endpoints.start_frame(self.svc, self.endpoint_id, self.credential_hash,
                                                 child_id)
        if frame is None:
            log.warning("endpoint %s: asked to start %s, not one of its user endpoints",
                        self.endpoint_id, clip(child_id))
            return
        try:
            await self._send_start(frame)
        except BaseException:
            with contextlib.suppress(Exception):
                await self.store.endpoints.release_start(child_id)
            raise
        log.info("endpoint %s: asked to start user endpoint %s for user %s", self.endpoint_id,
                 child_id, frame.user_id)

    async def _end_early(self, error: BaseException | None, code: int = 1011,
                         why: str = "broker's store is not answering; reconnect later") -> None:
        if error is not None:
            log.warning("endpoint %s: could not start a session: %r", self.endpoint_id, error)
        else:
            log.info("endpoint %s: session refused: %s", self.endpoint_id, why)
        if self._control is not None:
            with contextlib.suppress(Exception):
                await self._control.close()
        await self._close(code, why)
        self._ended.set()

    async def _credential_replaced(self) -> bool:
        """Whether the credential this session opened with was rotated away since it was checked
        (a rotation published before this session listened would not reach it)."""
        found = await self.store.users.resolve_token(self.credential_hash)
        return found is None or found.id != self.endpoint_id

    async def replaced(self, code: int = REPLACED, why: str = "replaced by a newer session") -> None:
        """End this session from outside (another took its place); returns once it has ended."""
        self.end(code, why)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(RETIRE_WAIT):
                await self._ended.wait()

    def end(self, code: int = REPLACED, why: str = "replaced by a newer session") -> None:
        """Stop this session's loops and close its socket (in the background: a silently
        dropped peer must not hold anyone up)."""
        if self.retired:
            return
        self.retired = True
        log.info("endpoint %s: session %s %s", self.endpoint_id, self.session_id, why)
        for t in self._loops:
            t.cancel()
        self._closing = asyncio.create_task(self._close(code, why))

    async def _hello(self) -> Hello | None:
        raw = await asyncio.wait_for(self._receive(), HELLO_TIMEOUT)
        try:
            frame = parse_endpoint_frame(raw) if raw is not None else None
        except ValidationError as e:
            frame = None
            log.warning("endpoint %s: bad first frame: %s", self.endpoint_id,
                        error_summary(e.errors(), 3))
        if not isinstance(frame, Hello):
            await self._error_and_close("the first frame must be a hello")
            return None
        if frame.protocol != PROTOCOL_VERSION:
            await self._error_and_close(
                f"protocol {frame.protocol} is not spoken here (broker speaks {PROTOCOL_VERSION}); "
                "upgrade farcall on the endpoint or the broker"
            )
            return None
        problem = user_endpoints.schema_problem(frame.user_config_schema)
        if problem:
            await self._error_and_close(
                f"user_config_schema is not a valid JSON Schema: {problem}; fix the endpoint's "
                "user_config_schema.json")
            return None
        return frame

    async def _cleanup(self) -> None:
        self.retired = True
        self.svc.sessions.remove(self.endpoint_id, self)
        for closing in (self.consumer, self._control):
            if closing is not None:
                with contextlib.suppress(Exception):
                    await closing.close()
        try:
            await self.store.endpoints.disconnect_session(self.endpoint_id, self.session_id, now())
        except Exception as e:  # noqa: BLE001 - the store may be the reason we are closing
            log.warning("endpoint %s: could not record disconnect: %r", self.endpoint_id, e)
        log.info("endpoint %s disconnected (session %s)", self.endpoint_id, self.session_id)
        self._ended.set()

    async def _run_loops(self) -> None:
        if self.retired:  # replaced before the loops began
            return
        tasks = [asyncio.create_task(self._read_loop()), asyncio.create_task(self._dispatch_loop()),
                 asyncio.create_task(self._control_loop())]
        self._loops = tasks
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            await stop_tasks(tasks)
        for t in done:
            if not t.cancelled():
                t.result()

    # ------------------------------------------------------------ sending

    async def send(self, text: str) -> None:
        async with self._send_lock:
            await self.ws.send_text(text)

    async def _close(self, code: int, reason: str) -> None:
        if self.ws.application_state == WebSocketState.CONNECTED:
            with contextlib.suppress(Exception):
                await self.ws.close(code, reason[:120])

    async def _error_and_close(self, message: str) -> None:
        with contextlib.suppress(Exception):
            await self.send(ErrorFrame(message=message).model_dump_json())
        await self._close(1008, message)

    # ------------------------------------------------------------ reconcile

    async def _reconcile(self, held: set[str], crashed: set[str]) -> None:
        """Queue again the in-flight tasks the endpoint no longer holds and are not finished;
        fail those that were running at too many deaths of the agent (``crashed``)."""
        found = await self.store.inflight.reconcile(
            self.endpoint_id, held, crashed, self.svc.settings.max_endpoint_losses, now())
        again = list(found.again)
        if again:
            # Queued before they leave the in-flight set: a failure in between loses nothing.
            await self.queue.publish(self.endpoint_id, [join_task_batch(list(found.again.values()))])
            await self.store.endpoints.count_queued(self.endpoint_id, len(again))
            await self.store.inflight.remove(self.endpoint_id, again)
        await publish_results(self.svc, found.failed)
        if again or found.failed or found.dropped:
            log.info(
                "endpoint %s: reconciled lost in-flight tasks: %d queued again, %d failed after "
                "%d agent crashes, %d already finished",
                self.endpoint_id, len(again), len(found.failed),
                self.svc.settings.max_endpoint_losses, found.dropped,
            )

    # ------------------------------------------------------------ endpoint -> broker

    async def _receive(self) -> str | bytes | None:
        """The next frame, unread (None if empty); one over ``max_frame_bytes`` ends the session
        (close 1009) before it is parsed."""
        message = await self.ws.receive()
        if message["type"] == "websocket.disconnect":
            raise WebSocketDisconnect(message.get("code", 1000))
        raw: str | bytes | None = message.get("text") or message.get("bytes") or None
        limit = self.svc.settings.max_frame_bytes
        if raw is not None and over_limit(raw, limit):
            log.warning("endpoint %s sent a frame over the limit of %d bytes; closing its session",
                        self.endpoint_id, limit)
            await self._close(1009, f"frame over the limit of {limit} bytes; send smaller frames")
            raise WebSocketDisconnect(1009)
        return raw

    async def _read_loop(self) -> None:
        while True:
            raw = await self._receive()
            if raw is None:
                continue
            try:
                frame = parse_endpoint_frame(raw)
            except ValidationError as e:
                problem = error_summary(e.errors(), 3)
                log.warning("endpoint %s sent a bad frame: %s", self.endpoint_id, problem)
                await self.send(
                    ErrorFrame(message=f"bad frame ignored: {problem}").model_dump_json()
                )
                continue
            at = now()
            if isinstance(frame, HeartbeatFrame):
                await self.store.endpoints.set_heartbeat(self.endpoint_id, frame.heartbeat, at)
                self._last_touch = at
                # A replacement announced while pub/sub was down is noticed here at the latest.
                if await self.store.endpoints.live_session(self.endpoint_id) != self.session_id:
                    self.end()
                    return
                await self._resend_starts()
                continue
            if at - self._last_touch > TOUCH_EVERY:
                self._last_touch = at
                await self.store.endpoints.touch(self.endpoint_id, at)
            if isinstance(frame, Credit):
                await self._add_credit(frame.n)
            elif isinstance(frame, RunningFrame):
                await self.store.tasks.mark_running(self.endpoint_id, frame.started)
            elif isinstance(frame, ResultsFrame):
                await self._results(frame)
            elif isinstance(frame, Hello):
                await self.send(
                    ErrorFrame(message="hello was already received; ignored").model_dump_json()
                )

    async def _results(self, frame: ResultsFrame) -> None:
        if frame.results:
            await self._store_results(frame.results)
            await self.send(ResultsAck(task_ids=[r.task_id for r in frame.results]).model_dump_json())
        await self._add_credit(frame.credit)

    async def _store_results(self, results: list[ResultMessage]) -> None:
        """Store results (first one per task wins) and push the new ones to their streams."""
        await store_results(self.svc, self.endpoint_id, results)
        ids = [r.task_id for r in results]
        self.held.difference_update(ids)
        self._remember_done(ids)
        if self.arg_blobs:
            await self._free_arg_blobs([b for t in ids if (b := self.arg_blobs.pop(t, None))])

    async def _free_arg_blobs(self, blob_ids: list[str]) -> None:
        """Delete the argument blobs of tasks that ended: nothing reads them again, and they
        count against their owner's quota until freed (else until ``FARCALL_RESULT_TTL``)."""
        if not blob_ids:
            return
        try:
            await self.svc.blobs.delete(blob_ids)
        except Exception as e:  # noqa: BLE001 - they expire anyway
            log.warning("endpoint %s: could not free %d argument blobs: %r",
                        self.endpoint_id, len(blob_ids), e)

    async def _add_credit(self, n: int) -> None:
        if n > 0:  # a manager gets only tasks queued before the broker knew it is one
            self.credit += n
            self.credit_changed.set()
            if self.waiting:
                # Tasks sent directly may wait here while the dispatch loop waits on the queue.
                await self._send_waiting()

    # ------------------------------------------------------------ broker -> endpoint

    async def _dispatch_loop(self) -> None:
        backoff = Backoff(cap=5.0, base=0.2)
        while not self.retired:
            if self.credit <= 0:
                self.credit_changed.clear()
                try:
                    # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a
                    # cancel that comes as the event is set, leaving the loop running.
                    async with asyncio.timeout(PARK_AFTER if self.consumer is not None else None):
                        await self.credit_changed.wait()
                except TimeoutError:
                    await self._park()
                continue
            if not self.waiting:
                try:
                    if self.consumer is None:
                        self.consumer = await self.queue.consume(self.endpoint_id, PREFETCH)
                    # At least one task per message: `credit` messages cover the credit.
                    deliveries = await self.consumer.get_batch(min(self.credit, PREFETCH))
                except _DOWN as e:
                    # The queue is down (a RabbitMQ restart): keep the session, which still
                    # takes results and directly sent tasks, and consume again once it is back.
                    await self._park()
                    delay = backoff.next_delay()
                    log.log(logging.WARNING if backoff.attempt == 1 else logging.DEBUG,
                            "endpoint %s: cannot consume its queue (%r); retrying in %.1f s",
                            self.endpoint_id, e, delay)
                    await asyncio.sleep(delay)
                    continue
                backoff.reset()
                if not await self._take(deliveries):
                    return
            await self._send_waiting()

    async def _control_loop(self) -> None:
        """Act on the endpoint's control messages (cancels, replacement, deletion)."""
        backoff = Backoff(cap=5.0)
        while not self.retired:
            if self._control is None:
                try:
                    self._control = await self.store.pubsub.subscribe_control(self.endpoint_id)
                except _DOWN as e:
                    log.debug("endpoint %s: control channel unavailable: %r", self.endpoint_id, e)
                    await asyncio.sleep(backoff.next_delay())
                    continue
            async for raw in self._control:
                backoff.reset()
                try:
                    message = parse_control(raw)
                except ValidationError:
                    log.warning("endpoint %s: unreadable control message %.200r", self.endpoint_id, raw)
                    continue
                if isinstance(message, CancelTasks):
                    await self.cancel(message.task_ids)
                elif isinstance(message, SessionReplaced):
                    if message.session_id != self.session_id:
                        self.end()
                        return
                elif isinstance(message, EndpointRemoved):
                    self.end(DELETED, "ended: the endpoint was deleted")
                    return
                elif isinstance(message, CredentialRotated):
                    if message.old_hash == self.credential_hash:
                        self.end(ROTATED, _ROTATED_WHY)
                        return
                elif isinstance(message, EndpointRefused):
                    self.end(REFUSED, f"ended: {message.reason}")
                    return
                elif isinstance(message, EndpointStopRequested):
                    self.end(STOPPED_CLOSE_CODE, "ended: the endpoint's owner asked it to stop")
                    return
                elif isinstance(message, UserEndpointWanted) and self.multi_user:
                    await self._start_user_endpoint(message.user_endpoint_id)
            # The subscription ended (pub/sub reconnecting); a missed message is caught by the
            # liveness check at the next heartbeat.
            self._control = None

    async def cancel(self, task_ids: list[str]) -> None:
        """Drop cancelled tasks still waiting here; tell the endpoint to stop the ones it has."""
        ids = {t for t in task_ids if t in self.held}
        if not ids:
            return
        waiting = [t for t in self.waiting if t[0] in ids]
        if waiting:
            self.waiting = collections.deque(t for t in self.waiting if t[0] not in ids)
            self.held.difference_update(t for t, _, _ in waiting)
            ids.difference_update(t for t, _, _ in waiting)
        if ids:
            await self.send(CancelFrame(task_ids=sorted(ids)).model_dump_json())

    async def _park(self) -> None:
        """Give prefetched deliveries back to the queue while the endpoint has no room."""
        if self.consumer is not None:
            consumer, self.consumer = self.consumer, None
            await consumer.close()
            log.debug(
                "endpoint %s: no credit for %.0f s; stopped consuming", self.endpoint_id, PARK_AFTER
            )

    def _remember_done(self, task_ids: list[str]) -> None:
        self.done_ids.add(task_ids)

    async def _take(self, deliveries: list[Delivery]) -> bool:
        """Record the tasks of ``deliveries`` in flight, ack them, and line them up to send.

        Copies of tasks this session sent directly (held, or finished here) are dropped
        without asking the store; they were never counted as queued. A task that cannot be
        read fails alone. False when this session was replaced meanwhile: the deliveries
        go back to the queue for the live session.
        """
        assert self.consumer is not None
        tasks: dict[str, str] = {}
        function_of: dict[str, str] = {}
        unreadable: dict[str, str] = {}
        refs: dict[str, str] = {}
        taken = 0
        for d in deliveries:
            batch, bad = read_queued(d.body)
            unreadable.update(bad)
            for task in batch:
                if task.task_id not in self.held and task.task_id not in self.done_ids:
                    taken += 1
                    tasks[task.task_id] = task.model_dump_json()
                    function_of[task.task_id] = task.function_id
                    if is_ref(task.args):
                        refs[task.task_id] = task.args
        accepted = await self.store.inflight.add(
            self.endpoint_id, self.session_id, tasks, taken + len(unreadable))
        if accepted is None:
            await self._park()
            self.end()
            return False
        await self.consumer.ack(deliveries)
        if unreadable:
            for task_id, error in unreadable.items():
                await publish_results(self.svc, await self.store.tasks.fail([task_id], error, now()))
        if len(accepted) < taken:
            log.debug("endpoint %s: dropped %d finished or repeated tasks",
                      self.endpoint_id, taken - len(accepted))
        if refs:
            kept = set(accepted)
            self._note_arg_blobs({t: args for t, args in refs.items() if t in kept})
            # Cancelled (or failed) before they left the queue: nothing will read them.
            await self._free_arg_blobs([_blob_of(args) for t, args in refs.items()
                                        if t not in kept and _blob_of(args)])
        self.held.update(accepted)
        self.waiting.extend((t, function_of[t], tasks[t]) for t in accepted)
        return True

    def _note_arg_blobs(self, args_of: dict[str, str]) -> None:
        """Remember the argument blobs of held tasks whose ``args`` are references."""
        for task_id, args in args_of.items():
            if blob_id := _blob_of(args):
                self.arg_blobs[task_id] = blob_id

    def can_take(self, n: int) -> bool:
        """Whether ``n`` new tasks would go out at once (credit to spare, nothing waiting)."""
        return not self.retired and not self.waiting and self.credit >= n

    async def send_direct(
        self, tasks: list[tuple[str, str, str]], functions: dict[str, str]
    ) -> None:
        """Send tasks just submitted through this replica, without the trip through the queue.

        ``tasks`` are ``(task id, function id, TaskMessage JSON)``, ``functions`` their
        function bodies by id. The caller has recorded them in flight; their queued copies
        are dropped on arrival (held here, or finished by then). Tasks beyond the credit
        wait here.
        """
        fresh = [t for t in tasks if t[0] not in self.held]
        self.held.update(t[0] for t in fresh)
        self._note_arg_blobs({t: args for t, _, body in fresh if _REF_ARGS in body
                              and (args := json.loads(body).get("args", ""))})
        self.waiting.extend(fresh)
        await self._send_waiting(functions)

    async def _send_waiting(self, known: dict[str, str] | None = None) -> None:
        """Send waiting tasks as far as the credit goes, with the bodies of functions new to
        this session (from ``known``, else from the store)."""
        n = min(self.credit, len(self.waiting), MAX_BATCH)
        if n <= 0:
            return
        batch = [self.waiting.popleft() for _ in range(n)]
        self.credit -= n
        new = {f for _, f, _ in batch if f not in self.sent_functions}
        bodies = {f: known[f] for f in new if known and f in known}
        if len(bodies) < len(new):
            bodies.update(await self._function_bodies(new - set(bodies)))
        if len(bodies) < len(new):
            batch = await self._fail_orphans(batch, bodies)
        # No await from here to the send: frames go out in the order functions are marked sent.
        functions = {f: body for f, body in bodies.items() if f not in self.sent_functions}
        self.sent_functions.update(functions)
        if batch:
            await self.send(tasks_frame_json([body for _, _, body in batch], functions))

    async def _function_bodies(self, function_ids: set[str]) -> dict[str, str]:
        cache = self.svc.functions
        found = {f: rec.function for f in function_ids if (rec := cache.get(f))}
        missing = [f for f in function_ids if f not in found]
        if missing:
            for f, rec in (await self.store.functions.get_many(missing)).items():
                cache.put(f, rec)
                found[f] = rec.function
        return found

    async def _fail_orphans(
        self, batch: list[tuple[str, str, str]], bodies: dict[str, str]
    ) -> list[tuple[str, str, str]]:
        """Fail the tasks whose function was deleted before they could be sent; keep the rest."""
        orphans = [t for t in batch if t[1] not in bodies and t[1] not in self.sent_functions]
        if orphans:
            results = [
                ResultMessage(
                    task_id=t, state=TaskState.FAILED,
                    error=f"function {f} was deleted before this task ran; register it again "
                    "and resubmit the task",
                )
                for t, f, _ in orphans
            ]
            self.credit += len(orphans)
            await self._store_results(results)
        gone = {t for t, _, _ in orphans}
        return [t for t in batch if t[0] not in gone]


async def stop_tasks(tasks: list[asyncio.Task[None]]) -> None:
    """Cancel ``tasks`` and wait until every one has ended, cancelling again any that runs on.

    One cancel is not always enough: on Python 3.11, ``asyncio.wait_for`` (redis-py sends every
    command through one) swallows a cancel that arrives as its inner future finishes, and the
    loop goes on. A read loop that did so kept a session open with its dispatch loop gone (a
    Redis restart ended it): the endpoint stayed connected and no task went out again.
    """
    pending = [t for t in tasks if not t.done()]
    while pending:
        for t in pending:
            t.cancel()
        try:
            await asyncio.wait(pending, timeout=STOP_AGAIN)
        except asyncio.CancelledError:  # the caller is cancelled: the tasks are, once more
            for t in pending:
                t.cancel()
            raise
        pending = [t for t in pending if not t.done()]
    for t in tasks:
        if not t.cancelled():
            t.exception()  # retrieved: the caller re-raises the one that ended the session


_REF_ARGS = '"args":"' + BLOB_REF + "\\n"
"""How reference ``args`` start in a task's JSON: a cheap test before parsing it."""


def _blob_of(args: str) -> str:
    """The blob id of a reference payload ("" for anything else)."""
    if not is_ref(args):
        return ""
    try:
        return parse_ref(args)[0]
    except DeserializationError:
        return ""
