"""A broker faked at the SDK's two seams, for Executor and Client unit tests.

REST goes through the Client's transport (the one place the SDK sends an HTTP
request), so ``FakeClient`` is a real :class:`Client` whose ``FakeTransport``
answers from memory, statuses and error bodies included (its retries, 429 waits
and error classes are the real ones); the result stream is replaced by
``FakeStream``, through which a test pushes results when it chooses, and which
can take submissions as the real stream does (``FakeBroker.stream_submits``).
No network, no threads of its own: each test decides when a task is sent,
starts, finishes or is cancelled. The embedded broker (tests/sdk/conftest.py)
covers the same paths for real.
"""

from __future__ import annotations

import itertools
import json
import re
import threading
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ValidationError

from farcall import Client
from farcall.errors import FarcallError
from farcall.protocol.common import TaskState
from farcall.protocol.rest import (
    BatchSubmission,
    BatchSubmitted,
    EndpointLeft,
    EndpointSharing,
    FunctionLeft,
    FunctionSharing,
    Limits,
    ShareRequest,
    TokenCreated,
    TokenInfo,
    TokenList,
    TokenRequest,
    TokenRevoked,
)
from farcall.protocol.stream import RequestFailedFrame, SubmitFrame, SubmittedFrame, TaskResult
from farcall.serialize import INLINE_BYTES, serialize
from farcall.stream import TaskGroupStream
from farcall.transport import Response

Request = tuple[str, str, Any]
"""``(method, path, JSON body)`` of one REST call."""
Reply = tuple[int, Any]
"""``(HTTP status, JSON body)`` of one answer."""


class Refusal(Exception):
    """Raised by a route of the fake broker: answered as the real broker's error body."""

    def __init__(self, status: int, error: str, message: str) -> None:
        super().__init__(message)
        self.reply: Reply = (status, {"error": error, "message": message})


class FakeBroker:
    """Task records in memory and the answers the real broker gives about them.

    ``hold`` (set by default) gates ``POST /tasks``: clear it to keep a batch in flight;
    ``posting`` is set once a batch reached the gate. ``cancel_error`` makes
    ``POST /tasks/cancel`` fail with it. Like the real broker, a task cancelled is
    also pushed on the result stream as a ``cancelled`` result (unless
    ``push_cancelled`` is False). ``script`` queues error answers for a route (a 429,
    a 403...) before it answers normally.

    Tokens and sharing as the caller (the owner of every endpoint and function
    except those in ``foreign``, which it may see but not share: 403) sees them;
    ``users`` are the names that can be shared with (others: 404).
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: list[Request] = []
        self.submitted: dict[str, dict[str, Any]] = {}
        """Task id -> the task as the SDK sent it (``TaskSpec`` JSON)."""
        self.records: dict[str, dict[str, Any]] = {}
        """Task id -> the record ``POST /tasks/status`` answers."""
        self.streams: list[FakeStream] = []
        self.hold = threading.Event()
        self.hold.set()
        self.posting = threading.Event()
        self.cancel_error: Exception | None = None
        self.push_cancelled = True
        self.stream_submits = False
        """Whether batches are submitted on the result stream (as the real one does) or by HTTP."""
        self.stream_requests: list[Any] = []
        """The batches (JSON) sent on a result stream (they are in ``requests`` too)."""
        self.scripts: dict[tuple[str, str], list[Reply]] = {}
        self.forever: dict[tuple[str, str], Reply] = {}
        self.tokens: dict[str, dict[str, Any]] = {}
        self.users = {"alice", "bob"}
        self.foreign: set[str] = set()
        self.endpoint_sharing: dict[str, list[str]] = {}
        self.function_sharing: dict[str, tuple[list[str], bool]] = {}
        self.limits = Limits(max_task_bytes=1024**3, max_payload_bytes=10 * 1024**2,
                             inline_bytes=INLINE_BYTES)
        self.blobs: dict[str, bytes] = {}
        """The data plane: blob id -> the bytes uploaded (``FakeTransport.send_parts``)."""
        self._ids = itertools.count(1)

    # ------------------------------------------------------------ for tests

    def client(self, retry_seconds: float = 0) -> FakeClient:
        return FakeClient(self, retry_seconds)

    def stream(self, client: Client, task_group_id: str, **callbacks: Any) -> FakeStream:
        """Stands in for ``TaskGroupStream(client, task_group_id, on_results=..., ...)``."""
        stream = FakeStream(self, client, task_group_id, **callbacks)
        self.streams.append(stream)
        return stream

    def script(self, method: str, path: str, status: int, body: Any, times: int | None = 1) -> None:
        """Answer the next ``times`` requests to ``path`` with ``(status, body)`` (None: all of them)."""
        with self.lock:
            if times is None:
                self.forever[(method, path)] = (status, body)
            else:
                self.scripts.setdefault((method, path), []).extend([(status, body)] * times)

    def calls(self, path: str) -> list[Any]:
        """The JSON bodies of every request to ``path``, in order."""
        with self.lock:
            return [body for _, p, body in self.requests if p == path]

    def start(self, task_id: str) -> None:
        """The task is now running on a worker."""
        with self.lock:
            self.records[task_id]["state"] = TaskState.RUNNING.value

    def finish(self, task_id: str, value: Any, *, push: bool = True) -> None:
        """The task succeeded with ``value``; its result is pushed on the stream if ``push``."""
        self._end(task_id, TaskState.SUCCESS, serialize(value), "", push)

    def _end(self, task_id: str, state: TaskState, data: str, error: str, push: bool) -> None:
        with self.lock:
            record = self.records[task_id]
            record.update(state=state.value, data=data, error=error, completed_at=1.0)
        if push:
            result = TaskResult(task_id=task_id, state=state, data=data, error=error, completed_at=1.0)
            for stream in list(self.streams):
                stream.push([result])

    # ------------------------------------------------------------ REST

    def answer(self, method: str, path: str, body: Any) -> Reply:
        """``(status, JSON body)`` for one request: a scripted answer first, else the route's."""
        with self.lock:
            self.requests.append((method, path, body))
            queued = self.scripts.get((method, path))
            scripted = queued.pop(0) if queued else self.forever.get((method, path))
        if scripted is not None:
            return scripted
        routes: list[tuple[str, str, Callable[..., Any]]] = [
            ("POST", "/task_groups", lambda _: {"task_group_id": "group-1"}),
            ("GET", "/limits", lambda _: _json(self.limits)),
            ("POST", "/functions", lambda _: {"function_id": f"function-{next(self._ids)}"}),
            ("POST", "/tasks", self._submit),
            ("POST", "/tasks/status", self._status),
            ("GET", "/tasks/([^/]+)", self._task),
            ("POST", "/tasks/cancel", self._cancel),
            ("GET", "/tokens", self._list_tokens),
            ("POST", "/tokens", self._create_token),
            ("DELETE", "/tokens/([^/]+)", self._revoke_token),
            ("POST", "/endpoints/([^/]+)/(share|unshare)", self._share_endpoint),
            ("GET", "/endpoints/([^/]+)/sharing", self._endpoint_sharing),
            ("POST", "/functions/([^/]+)/(share|unshare)", self._share_function),
            ("GET", "/functions/([^/]+)/sharing", self._function_sharing),
            ("POST", "/endpoints/([^/]+)/leave",
             lambda _, eid: _json(EndpointLeft(endpoint_id=eid, left=True))),
            ("POST", "/functions/([^/]+)/leave",
             lambda _, fid: _json(FunctionLeft(function_id=fid, left=True))),
        ]
        for route_method, pattern, handler in routes:
            match = re.fullmatch(pattern, path)
            if route_method == method and match:
                try:
                    return 200, handler(body, *match.groups())
                except Refusal as e:
                    return e.reply
                except ValidationError as e:  # as the real broker refuses a body it cannot take
                    return 422, {"error": "invalid_request", "message": str(e)[:200]}
        raise AssertionError(f"the fake broker has no route {method} {path}")

    def _submit(self, body: dict[str, Any]) -> dict[str, Any]:
        self.posting.set()
        assert self.hold.wait(30), "the test never released the held batch"
        batch = BatchSubmission.model_validate(body)  # what the real broker would refuse, refused
        ids: list[str] = []
        with self.lock:
            for task in body["tasks"]:
                task_id = f"task-{next(self._ids)}"
                ids.append(task_id)
                self.submitted[task_id] = task
                self.records[task_id] = {
                    "task_id": task_id, "task_group_id": batch.task_group_id or "group-1",
                    "endpoint_id": batch.endpoint_id, "function_id": task["function_id"],
                    "state": TaskState.WAITING.value, "transitions": {"received": 0.5},
                    "completed_at": None, "submitter": None, "worker": None, "data": None,
                    "error": None, "attempts": None,
                }
        return {"task_group_id": batch.task_group_id or "group-1", "task_ids": ids}

    def _list_tokens(self, _: None) -> dict[str, Any]:
        with self.lock:
            infos = [TokenInfo.model_validate(t) for t in self.tokens.values()]
        return _json(TokenList(tokens=infos))

    def _create_token(self, body: dict[str, Any] | None) -> dict[str, Any]:
        request = TokenRequest.model_validate(body or {})
        n = next(self._ids)
        created = TokenCreated(token_id=f"token-{n}", token=f"fcu_secret{n}", name=request.name,
                               created_at=float(n))
        with self.lock:
            self.tokens[created.token_id] = _json(TokenInfo.model_validate(created.model_dump()))
        return _json(created)

    def _revoke_token(self, _: None, token_id: str) -> dict[str, Any]:
        with self.lock:
            if self.tokens.pop(token_id, None) is None:
                raise Refusal(404, "not_found", f"you have no token {token_id}")
        return _json(TokenRevoked(token_id=token_id, revoked=True))

    def _owned(self, kind: str, object_id: str) -> None:
        if object_id in self.foreign:
            raise Refusal(403, "forbidden", f"only the owner of {kind} {object_id} may do this")

    def _user(self, request: ShareRequest) -> str | None:
        if request.username is not None and request.username not in self.users:
            raise Refusal(404, "not_found", f"no user is named {request.username}")
        return request.username

    def _share_endpoint(self, body: dict[str, Any], endpoint_id: str, verb: str) -> dict[str, Any]:
        self._owned("endpoint", endpoint_id)
        username = self._user(ShareRequest.model_validate(body))
        if username is None:
            raise Refusal(422, "invalid_request", "an endpoint is shared with a username")
        with self.lock:
            shared = self.endpoint_sharing.setdefault(endpoint_id, [])
            if verb == "share" and username not in shared:
                shared.append(username)
            if verb == "unshare" and username in shared:
                shared.remove(username)
        return self._endpoint_sharing(None, endpoint_id)

    def _endpoint_sharing(self, _: None, endpoint_id: str) -> dict[str, Any]:
        self._owned("endpoint", endpoint_id)
        with self.lock:
            shared = list(self.endpoint_sharing.get(endpoint_id, []))
        warning = (f"endpoint {endpoint_id} is a single-user endpoint: it runs every task as its "
                   "owner's Unix account" if shared else None)
        return _json(EndpointSharing(endpoint_id=endpoint_id, shared_with=shared, warning=warning))

    def _share_function(self, body: dict[str, Any], function_id: str, verb: str) -> dict[str, Any]:
        self._owned("function", function_id)
        request = ShareRequest.model_validate(body)
        username = self._user(request)
        with self.lock:
            shared, public = self.function_sharing.get(function_id, ([], False))
            if username is not None:
                shared = [u for u in shared if u != username] + ([username] if verb == "share" else [])
            if request.public:
                public = verb == "share"
            self.function_sharing[function_id] = (shared, public)
        return self._function_sharing(None, function_id)

    def _function_sharing(self, _: None, function_id: str) -> dict[str, Any]:
        self._owned("function", function_id)
        with self.lock:
            shared, public = self.function_sharing.get(function_id, ([], False))
        return _json(FunctionSharing(function_id=function_id, shared_with=list(shared), public=public))

    def _status(self, body: dict[str, Any]) -> dict[str, Any]:
        with self.lock:
            return {"tasks": {t: dict(self.records[t]) for t in body["task_ids"] if t in self.records}}

    def _task(self, _: None, task_id: str) -> dict[str, Any]:
        with self.lock:
            if task_id not in self.records:
                raise Refusal(404, "not_found", f"no task {task_id}")
            return dict(self.records[task_id])

    def _cancel(self, body: dict[str, Any]) -> dict[str, Any]:
        if self.cancel_error is not None:
            raise self.cancel_error
        cancelled: list[str] = []
        unchanged: dict[str, str] = {}
        with self.lock:
            for task_id in body["task_ids"]:
                record = self.records.get(task_id)
                if record is None:
                    unchanged[task_id] = "not_found"
                elif TaskState(record["state"]).terminal:
                    unchanged[task_id] = record["state"]
                elif record["state"] == TaskState.RUNNING and body.get("only_queued"):
                    unchanged[task_id] = TaskState.RUNNING.value
                else:
                    cancelled.append(task_id)
        for task_id in cancelled:
            self._end(task_id, TaskState.CANCELLED, "", "cancelled by its owner", self.push_cancelled)
        return {"cancelled": cancelled, "unchanged": unchanged}


def _json(model: BaseModel) -> dict[str, Any]:
    return model.model_dump(mode="json")


class FakeTransport:
    """Stands in for ``farcall.transport.Transport``: each request answered by a :class:`FakeBroker`."""

    def __init__(self, broker: FakeBroker) -> None:
        self.broker = broker

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> Response:
        status, answer = self.broker.answer(method, path, json.loads(body) if body else None)
        return Response(status, "fake", json.dumps(answer).encode())

    def send_parts(self, method: str, path: str, parts: list[memoryview],
                   headers: dict[str, str] | None = None) -> Response:
        """A blob upload (``POST /blobs``): kept in ``FakeBroker.blobs``, over the limit 413."""
        assert (method, path) == ("POST", "/blobs")
        body = b"".join(parts)
        broker = self.broker
        with broker.lock:
            broker.requests.append((method, path, len(body)))
            if len(body) > broker.limits.max_task_bytes:
                return Response(413, "fake", json.dumps({
                    "error": "payload_too_large", "message": f"{len(body)} bytes is over the limit "
                    f"of {broker.limits.max_task_bytes} bytes (FARCALL_MAX_TASK_BYTES)"}).encode())
            blob_id = f"blob-{next(broker._ids)}"
            broker.blobs[blob_id] = body
        return Response(201, "fake", json.dumps({"blob_id": blob_id, "size": len(body)}).encode())

    def read_into(self, method: str, path: str, headers: dict[str, str] | None = None,
                  size: int | None = None) -> Response:
        """A blob download (``GET /blobs/{id}``); 404 for one not in ``FakeBroker.blobs``."""
        blob_id = path.removeprefix("/blobs/")
        with self.broker.lock:
            self.broker.requests.append((method, path, None))
            body = self.broker.blobs.get(blob_id)
        if body is None:
            return Response(404, "fake", b'{"error": "not_found", "message": "no such blob"}')
        return Response(200, "fake", memoryview(bytearray(body)))

    def close(self) -> None:
        pass


class FakeClient(Client):
    """A real ``Client`` whose every REST call is answered by a :class:`FakeBroker`."""

    def __init__(self, broker: FakeBroker, retry_seconds: float = 0) -> None:
        super().__init__(broker_url="http://127.0.0.1:9", token="fcu_fake", retry_seconds=retry_seconds)
        self.broker = broker
        self._http = FakeTransport(broker)  # type: ignore[assignment]


class FakeSocket:
    """Stands in for the result stream's WebSocket: each ``SubmitFrame`` sent is answered at
    once by the fake broker, with the frame the real broker sends for that answer."""

    def __init__(self, broker: FakeBroker, stream: TaskGroupStream) -> None:
        self.broker, self.stream = broker, stream

    def send(self, raw: str) -> None:
        frame = SubmitFrame.model_validate_json(raw)
        with self.broker.lock:
            self.broker.stream_requests.append(frame.batch.model_dump(mode="json"))
        status, body = self.broker.answer("POST", "/tasks", frame.batch.model_dump(mode="json"))
        if status == 200:
            answer: BaseModel = SubmittedFrame(request_id=frame.request_id, **body)
        else:
            answer = RequestFailedFrame(request_id=frame.request_id, status=status,
                                        error=body.get("error", ""), message=body.get("message", ""),
                                        retry_after=body.get("retry_after"))
        self.stream._dispatch(answer.model_dump_json())


class FakeStream:
    """Stands in for ``farcall.stream.TaskGroupStream``: connected at once, and delivers what
    the test (or the fake broker) pushes. Batches go by HTTP, or with ``broker.stream_submits``
    through the real ``TaskGroupStream.submit`` over a :class:`FakeSocket`."""

    def __init__(
        self,
        broker: FakeBroker,
        client: Client,
        task_group_id: str,
        *,
        on_results: Callable[[list[TaskResult]], None],
        poll: Callable[[], None],
        on_refused: Callable[[FarcallError], None],
        done: Callable[[], bool],
    ) -> None:
        self.broker = broker
        self.task_group_id = task_group_id
        self.push = on_results
        self.poll = poll
        self.refuse = on_refused
        self.real = TaskGroupStream(client, task_group_id, on_results=on_results, poll=poll,
                                    on_refused=on_refused, done=done)  # never started
        self.real._ws = FakeSocket(broker, self.real)  # type: ignore[assignment]

    def start(self) -> None:
        pass

    def wait_connected(self, timeout: float) -> bool:
        return True

    def submit(self, batch: BatchSubmission) -> BatchSubmitted | None:
        if self.broker.stream_submits:
            return self.real.submit(batch)
        return None  # the batch goes by POST /tasks, where the fake broker sees it

    def in_stream_thread(self) -> bool:
        return False

    def close(self) -> None:
        pass
