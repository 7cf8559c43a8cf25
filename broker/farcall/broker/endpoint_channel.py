"""One endpoint's WebSocket session: hello/reconcile, credit-based dispatch, results, heartbeats.

A queued message holds a whole submitted batch. Messages move from the
endpoint's queue to the session: their tasks are recorded in the in-flight set,
the deliveries acked, and the tasks sent as far as the endpoint's credit goes;
the rest wait in the session until credit comes back. A task is never held
unacked in RabbitMQ while it runs; if the connection dies, the next hello
reconciles the in-flight set and queues the lost (sent or waiting) tasks again.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import uuid
from collections import defaultdict

from fastapi import WebSocket
from pydantic import ValidationError
from starlette.websockets import WebSocketDisconnect, WebSocketState

from farcall.broker import auth
from farcall.broker.errors import Forbidden, Unauthorized, deny_websocket
from farcall.broker.queue.base import Consumer, Delivery
from farcall.broker.services import Services
from farcall.messages import (
    PROTOCOL_VERSION,
    Credit,
    ErrorFrame,
    HeartbeatFrame,
    Hello,
    ResultMessage,
    ResultsAck,
    ResultsFrame,
    ResultStreamFrame,
    RunningFrame,
    TaskResult,
    TaskState,
    Welcome,
    join_task_batch,
    now,
    parse_endpoint_frame,
    parse_task_batch,
    tasks_frame_json,
)

log = logging.getLogger(__name__)

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


async def serve(ws: WebSocket, svc: Services, endpoint_id: str) -> None:
    """Authenticate the endpoint credential, then run the session until either side closes."""
    principal = await auth.authenticate(svc.store.users, auth.bearer(ws.headers.get("authorization")))
    if principal is None:
        await deny_websocket(ws, Unauthorized("the endpoint credential is unknown or revoked"))
        return
    if principal.kind != "endpoint" or principal.id != endpoint_id:
        await deny_websocket(
            ws, Forbidden(f"this credential may not connect as endpoint {endpoint_id}")
        )
        return
    await ws.accept()
    await EndpointSession(ws, svc, endpoint_id).run()


class EndpointSession:
    def __init__(self, ws: WebSocket, svc: Services, endpoint_id: str) -> None:
        self.ws, self.svc, self.endpoint_id = ws, svc, endpoint_id
        self.store, self.queue = svc.store, svc.queue
        self.session_id = uuid.uuid4().hex
        self.credit = 0
        self.credit_changed = asyncio.Event()
        self.held: set[str] = set()  # taken by this session (waiting or sent), no result yet
        self.done_ids: set[str] = set()  # finished through this session, most recent RECENT_DONE
        self.done_order: collections.deque[str] = collections.deque()
        # (task id, function id, TaskMessage JSON) taken by this session, waiting for credit
        self.waiting: collections.deque[tuple[str, str, str]] = collections.deque()
        self.sent_functions: set[str] = set()  # function bodies the endpoint got in this session
        self.consumer: Consumer | None = None
        self._send_lock = asyncio.Lock()
        self._last_touch = 0.0

    async def run(self) -> None:
        try:
            hello = await self._hello()
        except WebSocketDisconnect:
            return
        except TimeoutError:
            await self._error_and_close(f"no hello within {HELLO_TIMEOUT:.0f} s")
            return
        if hello is None:
            return
        await self.store.endpoints.set_connected(self.endpoint_id, self.session_id, True, now())
        log.info(
            "endpoint %s connected (session %s, credit %d, holds %d)",
            self.endpoint_id,
            self.session_id,
            hello.credit,
            len(hello.held_task_ids),
        )
        try:
            await self.store.endpoints.set_heartbeat(self.endpoint_id, hello.heartbeat, now())
            await self._reconcile(set(hello.held_task_ids))
            await self.send(Welcome(endpoint_id=self.endpoint_id).model_dump_json())
            self.svc.sessions[self.endpoint_id] = self
            await self._add_credit(hello.credit)
            await self._run_loops()
        except WebSocketDisconnect:
            pass
        except Exception as e:
            log.exception("endpoint %s session failed", self.endpoint_id)
            await self._close(1011, f"broker error: {type(e).__name__}")
        finally:
            await asyncio.shield(self._cleanup())

    async def _hello(self) -> Hello | None:
        raw = await asyncio.wait_for(self._receive(), HELLO_TIMEOUT)
        try:
            frame = parse_endpoint_frame(raw) if raw is not None else None
        except ValidationError as e:
            frame = None
            log.warning("endpoint %s: bad first frame: %s", self.endpoint_id, e)
        if not isinstance(frame, Hello):
            await self._error_and_close("the first frame must be a hello")
            return None
        if frame.protocol != PROTOCOL_VERSION:
            await self._error_and_close(
                f"protocol {frame.protocol} is not spoken here (broker speaks {PROTOCOL_VERSION}); "
                "upgrade farcall on the endpoint or the broker"
            )
            return None
        return frame

    async def _cleanup(self) -> None:
        if self.svc.sessions.get(self.endpoint_id) is self:
            del self.svc.sessions[self.endpoint_id]
        if self.consumer is not None:
            with contextlib.suppress(Exception):
                await self.consumer.close()
        try:
            await self.store.endpoints.set_connected(self.endpoint_id, self.session_id, False, now())
        except Exception as e:  # noqa: BLE001 - the store may be the reason we are closing
            log.warning("endpoint %s: could not record disconnect: %r", self.endpoint_id, e)
        log.info("endpoint %s disconnected (session %s)", self.endpoint_id, self.session_id)

    async def _run_loops(self) -> None:
        tasks = [asyncio.create_task(self._read_loop()), asyncio.create_task(self._dispatch_loop())]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for t in done:
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

    async def _reconcile(self, held: set[str]) -> None:
        """Queue again the in-flight tasks the endpoint no longer holds and are not finished."""
        inflight = await self.store.inflight.get(self.endpoint_id)
        lost = [t for t in inflight if t not in held]
        if not lost:
            return
        records = await self.store.tasks.get_many(lost)
        again = [
            t for t, rec in zip(lost, records, strict=True) if rec and not rec.state.terminal
        ]
        if again:
            await self.queue.publish(self.endpoint_id, [join_task_batch([inflight[t] for t in again])])
            await self.store.endpoints.count_queued(self.endpoint_id, len(again))
        await self.store.inflight.remove(self.endpoint_id, lost)
        log.info(
            "endpoint %s: reconciled %d lost in-flight tasks (%d queued again)",
            self.endpoint_id,
            len(lost),
            len(again),
        )

    # ------------------------------------------------------------ endpoint -> broker

    async def _receive(self) -> str | None:
        message = await self.ws.receive()
        if message["type"] == "websocket.disconnect":
            raise WebSocketDisconnect(message.get("code", 1000))
        return message.get("text") or (message.get("bytes") or b"").decode() or None

    async def _read_loop(self) -> None:
        while True:
            raw = await self._receive()
            if raw is None:
                continue
            try:
                frame = parse_endpoint_frame(raw)
            except ValidationError as e:
                log.warning("endpoint %s sent a bad frame: %s", self.endpoint_id, e)
                await self.send(
                    ErrorFrame(message=f"bad frame ignored: {e.errors()[:3]}").model_dump_json()
                )
                continue
            at = now()
            if isinstance(frame, HeartbeatFrame):
                await self.store.endpoints.set_heartbeat(self.endpoint_id, frame.heartbeat, at)
                self._last_touch = at
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
        done = await self.store.tasks.complete(self.endpoint_id, results, now())
        by_group: dict[str, list[TaskResult]] = defaultdict(list)
        for group, result in done:
            by_group[group].append(result)
        for group, stored in by_group.items():
            await self.store.pubsub.publish(group, ResultStreamFrame(results=stored).model_dump_json())
        ids = [r.task_id for r in results]
        self.held.difference_update(ids)
        self._remember_done(ids)

    async def _add_credit(self, n: int) -> None:
        if n > 0:
            self.credit += n
            self.credit_changed.set()
            if self.waiting:
                # Tasks sent directly may wait here while the dispatch loop waits on the queue.
                await self._send_waiting()

    # ------------------------------------------------------------ broker -> endpoint

    async def _dispatch_loop(self) -> None:
        while True:
            if self.credit <= 0:
                self.credit_changed.clear()
                try:
                    timeout = PARK_AFTER if self.consumer is not None else None
                    await asyncio.wait_for(self.credit_changed.wait(), timeout)
                except TimeoutError:
                    await self._park()
                continue
            if not self.waiting:
                if self.consumer is None:
                    self.consumer = await self.queue.consume(self.endpoint_id, PREFETCH)
                # At least one task per message: `credit` messages cover the credit.
                await self._take(await self.consumer.get_batch(min(self.credit, PREFETCH)))
            await self._send_waiting()

    async def _park(self) -> None:
        """Give prefetched deliveries back to the queue while the endpoint has no room."""
        if self.consumer is not None:
            consumer, self.consumer = self.consumer, None
            await consumer.close()
            log.debug(
                "endpoint %s: no credit for %.0f s; stopped consuming", self.endpoint_id, PARK_AFTER
            )

    def _remember_done(self, task_ids: list[str]) -> None:
        self.done_ids.update(task_ids)
        self.done_order.extend(task_ids)
        while len(self.done_order) > RECENT_DONE:
            self.done_ids.discard(self.done_order.popleft())

    async def _take(self, deliveries: list[Delivery]) -> None:
        """Record the tasks of ``deliveries`` in flight, ack them, and line them up to send.

        Copies of tasks this session sent directly (held, or finished here) are dropped
        without asking the store; they were never counted as queued.
        """
        assert self.consumer is not None
        tasks: dict[str, str] = {}
        function_of: dict[str, str] = {}
        taken = 0
        for d in deliveries:
            try:
                batch = parse_task_batch(d.body)
            except ValidationError as e:
                log.error("endpoint %s: dropping a queued body that is not tasks: %s",
                          self.endpoint_id, e)
                continue
            for task in batch:
                if task.task_id not in self.held and task.task_id not in self.done_ids:
                    taken += 1
                    tasks[task.task_id] = task.model_dump_json()
                    function_of[task.task_id] = task.function_id
        accepted = await self.store.inflight.add(self.endpoint_id, tasks, taken) if tasks else []
        await self.consumer.ack(deliveries)
        if len(accepted) < taken:
            log.debug("endpoint %s: dropped %d finished or repeated tasks",
                      self.endpoint_id, taken - len(accepted))
        self.held.update(accepted)
        self.waiting.extend((t, function_of[t], tasks[t]) for t in accepted)

    def can_take(self, n: int) -> bool:
        """Whether ``n`` new tasks would go out at once (credit to spare, nothing waiting)."""
        return not self.waiting and self.credit >= n

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
