"""A stand-in for the broker's endpoint channel, on 127.0.0.1, for the agent's unit tests.

It speaks the protocol's frames (answers Hello with Welcome, acks results when
``auto_ack``), records every frame the agent sends with the number of the
connection it came on, and lets the test send tasks, ack, cancel, drop the
connection or take the whole server down and up again on the same port.

Faults on demand: ``close_after_welcome`` drops every session right after its
welcome (a broker whose queue is down); ``max_size`` closes the connection with
1009 on a frame bigger than that, whatever ``max_frame_bytes`` the welcome says.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from farcall.protocol.channel import (
    CancelFrame,
    Credit,
    HeartbeatFrame,
    Hello,
    ResultMessage,
    ResultsAck,
    ResultsFrame,
    RunningFrame,
    TaskMessage,
    TasksFrame,
    Welcome,
    parse_endpoint_frame,
)
from farcall.protocol.rest import Health

ENDPOINT_ID = "ep-test"
CREDENTIAL = "fce_test-credential"
BROKER_ID = "broker-test"


class FakeBroker:
    def __init__(self, credential: str = CREDENTIAL, auto_ack: bool = True,
                 max_frame_bytes: int = 0, max_size: int | None = None) -> None:
        self.credential = credential
        self.auto_ack = auto_ack
        self.max_frame_bytes = max_frame_bytes
        """Said in every Welcome (0: not said)."""
        self.max_size = max_size
        """Frames bigger than this close the connection with 1009 (takes effect on start_server)."""
        self.close_after_welcome = False
        self.upload_grant = ""
        self.max_task_bytes = 0
        """Said in every Welcome: the data plane's grant and limit ("" / 0: no data plane)."""
        self.broker_id = BROKER_ID
        """Said in every Welcome and at ``GET /v1/health`` ("": a broker from before broker ids,
        whose health route is unknown: 404)."""
        self.port = 0
        self.frames: list[tuple[int, Any]] = []
        self.sizes: list[tuple[int, str, int]] = []
        """(connection, frame type, bytes) of every frame received."""
        self.connected_at: list[float] = []
        """time.monotonic() of each connection's start."""
        self.connections = 0
        self.rejected = 0
        self._ws: ServerConnection | None = None
        self._server: Server | None = None
        self._cond = threading.Condition()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self.start_server()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # ------------------------------------------------------------ server control

    def _call(self, coro: Any, timeout: float = 10) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def start_server(self) -> None:
        async def start() -> Server:
            return await serve(self._handle, "127.0.0.1", self.port,
                               process_request=self._check_request, compression=None,
                               max_size=self.max_size)

        self._server = self._call(start())
        self.port = self._server.sockets[0].getsockname()[1]

    def stop_server(self) -> None:
        """Close the listening socket and every connection (the broker went away)."""
        async def stop() -> None:
            assert self._server is not None
            self._server.close()
            await self._server.wait_closed()

        self._call(stop())
        self._ws = None

    def close(self) -> None:
        try:
            self.stop_server()
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)

    def _check_request(self, connection: ServerConnection, request: Any) -> Any:
        if request.path == "/v1/health" and self.broker_id:
            return connection.respond(HTTPStatus.OK, Health(
                status="ok", version="test", broker_id=self.broker_id).model_dump_json())
        if request.path != f"/v1/endpoints/{ENDPOINT_ID}/connect":
            return connection.respond(HTTPStatus.NOT_FOUND, "no such endpoint\n")
        if request.headers.get("Authorization") != f"Bearer {self.credential}":
            with self._cond:
                self.rejected += 1
                self._cond.notify_all()
            return connection.respond(HTTPStatus.UNAUTHORIZED, "bad credential\n")
        return None

    async def _handle(self, ws: ServerConnection) -> None:
        with self._cond:
            self.connections += 1
            self.connected_at.append(time.monotonic())
            number = self.connections
            self._cond.notify_all()
        self._ws = ws
        try:
            await self._serve_frames(ws, number)
        except ConnectionClosed:
            pass

    async def _serve_frames(self, ws: ServerConnection, number: int) -> None:
        async for raw in ws:
            frame = parse_endpoint_frame(raw)
            size = len(raw.encode() if isinstance(raw, str) else raw)
            with self._cond:
                self.frames.append((number, frame))
                self.sizes.append((number, frame.type, size))
                self._cond.notify_all()
            if isinstance(frame, Hello):
                welcome = Welcome(endpoint_id=ENDPOINT_ID, max_frame_bytes=self.max_frame_bytes,
                                  upload_grant=self.upload_grant, max_task_bytes=self.max_task_bytes,
                                  broker_id=self.broker_id)
                await ws.send(welcome.model_dump_json())
                if self.close_after_welcome:
                    await ws.close(1011, "broker error: queue unavailable")
                    return
            elif isinstance(frame, ResultsFrame) and self.auto_ack and frame.results:
                ack = ResultsAck(task_ids=[r.task_id for r in frame.results])
                await ws.send(ack.model_dump_json())

    # ------------------------------------------------------------ acting

    def _send(self, text: str) -> None:
        async def send() -> None:
            assert self._ws is not None, "no endpoint connected"
            await self._ws.send(text)

        self._call(send())

    def send_tasks(self, tasks: list[TaskMessage], functions: dict[str, str] | None = None) -> None:
        self._send(TasksFrame(tasks=tasks, functions=functions or {}).model_dump_json())

    def send_raw(self, text: str) -> None:
        """Send any text as a frame (a malformed one, say)."""
        self._send(text)

    def cancel(self, task_ids: list[str]) -> None:
        self._send(CancelFrame(task_ids=task_ids).model_dump_json())

    def ack(self, task_ids: list[str]) -> None:
        self._send(ResultsAck(task_ids=task_ids).model_dump_json())

    def drop(self) -> None:
        """Close the current connection; the server keeps listening."""
        async def drop() -> None:
            if self._ws is not None:
                await self._ws.close()

        self._call(drop())

    # ------------------------------------------------------------ observing

    def wait(self, condition: Callable[[], Any], timeout: float, what: str) -> Any:
        """Wait for a condition on what the broker received (re-checked on every frame)."""
        with self._cond:
            value = self._cond.wait_for(condition, timeout)
        if not value:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}; "
                                 f"frames: {[(n, f.type) for n, f in self.frames][-20:]}")
        return value

    def of(self, kind: type, connection: int | None = None) -> list[Any]:
        with self._cond:
            return [f for n, f in self.frames
                    if isinstance(f, kind) and (connection is None or n == connection)]

    def hello(self, connection: int) -> Hello | None:
        found = self.of(Hello, connection)
        return found[0] if found else None

    def results(self, connection: int | None = None) -> list[ResultMessage]:
        return [r for f in self.of(ResultsFrame, connection) for r in f.results]

    def result_ids(self, connection: int | None = None) -> set[str]:
        return {r.task_id for r in self.results(connection)}

    def credit(self, connection: int) -> int:
        """All credit granted on one connection: Hello + Credit + ResultsFrame credit."""
        hello = self.hello(connection)
        total = hello.credit if hello else 0
        total += sum(f.n for f in self.of(Credit, connection))
        total += sum(f.credit for f in self.of(ResultsFrame, connection))
        return total

    def started_ids(self) -> set[str]:
        return {t for f in self.of(RunningFrame) for t in f.started}

    def heartbeats(self) -> list[HeartbeatFrame]:
        return self.of(HeartbeatFrame)
