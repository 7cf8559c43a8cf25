"""A broker faked at the SDK's two seams, for Executor and Client unit tests.

REST goes through ``Client.request`` (the one place the SDK calls the broker), so
``FakeClient`` answers there from memory; the result stream is replaced by
``FakeStream``, through which a test pushes results when it chooses. No
network, no threads of its own: each test decides when a task is sent, starts,
finishes or is cancelled. The embedded broker (tests/sdk/conftest.py) covers the
same paths for real.
"""

from __future__ import annotations

import itertools
import json
import threading
from collections.abc import Callable
from typing import Any

from farcall import Client
from farcall.errors import FarcallError
from farcall.messages import BatchSubmission, BatchSubmitted, TaskResult, TaskState
from farcall.serialize import serialize

Request = tuple[str, str, Any]
"""``(method, path, JSON body)`` of one REST call."""


class FakeBroker:
    """Task records in memory and the answers the real broker gives about them.

    ``hold`` (set by default) gates ``POST /tasks``: clear it to keep a batch in flight;
    ``posting`` is set once a batch reached the gate. ``cancel_error`` makes
    ``POST /tasks/cancel`` fail with it. Like the real broker, a task cancelled is
    also pushed on the result stream as a ``cancelled`` result (unless
    ``push_cancelled`` is False).
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
        self._ids = itertools.count(1)

    # ------------------------------------------------------------ for tests

    def client(self) -> FakeClient:
        return FakeClient(self)

    def stream(self, client: Client, task_group_id: str, **callbacks: Any) -> FakeStream:
        """Stands in for ``TaskGroupStream(client, task_group_id, on_results=..., ...)``."""
        stream = FakeStream(task_group_id, **callbacks)
        self.streams.append(stream)
        return stream

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

    def answer(self, method: str, path: str, body: Any) -> Any:
        with self.lock:
            self.requests.append((method, path, body))
        route: dict[tuple[str, str], Callable[[Any], Any]] = {
            ("POST", "/task_groups"): lambda _: {"task_group_id": "group-1"},
            ("POST", "/functions"): lambda _: {"function_id": f"function-{next(self._ids)}"},
            ("POST", "/tasks"): self._submit,
            ("POST", "/tasks/status"): self._status,
            ("POST", "/tasks/cancel"): self._cancel,
        }
        handler = route.get((method, path))
        if handler is None:
            raise AssertionError(f"the fake broker has no route {method} {path}")
        return handler(body)

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

    def _status(self, body: dict[str, Any]) -> dict[str, Any]:
        with self.lock:
            return {"tasks": {t: dict(self.records[t]) for t in body["task_ids"] if t in self.records}}

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


class FakeClient(Client):
    """A ``Client`` whose every REST call is answered by a :class:`FakeBroker`."""

    def __init__(self, broker: FakeBroker) -> None:
        super().__init__(broker_url="http://127.0.0.1:9", token="fcu_fake", retry_seconds=0)
        self.broker = broker

    def request(self, method: str, path: str, body: Any = None, content: bytes | None = None) -> Any:
        if body is None and content is not None:
            body = json.loads(content)
        return self.broker.answer(method, path, body)


class FakeStream:
    """Stands in for ``farcall.stream.TaskGroupStream``: connected at once, submits by HTTP,
    and delivers what the test (or the fake broker) pushes."""

    def __init__(
        self,
        task_group_id: str,
        *,
        on_results: Callable[[list[TaskResult]], None],
        poll: Callable[[], None],
        on_refused: Callable[[FarcallError], None],
        done: Callable[[], bool],
    ) -> None:
        self.task_group_id = task_group_id
        self.push = on_results
        self.poll = poll
        self.refuse = on_refused

    def start(self) -> None:
        pass

    def wait_connected(self, timeout: float) -> bool:
        return True

    def submit(self, batch: BatchSubmission) -> BatchSubmitted | None:
        return None  # the batch goes by POST /tasks, where the fake broker sees it

    def in_stream_thread(self) -> bool:
        return False

    def close(self) -> None:
        pass
