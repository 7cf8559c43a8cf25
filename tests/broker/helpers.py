"""Helpers shared by the broker tests: queues under test, an app under a test client, a
scripted endpoint, the broker's loop."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi.testclient import TestClient

from farcall.broker import auth
from farcall.broker.queue.base import TaskQueue
from farcall.broker.services import Services
from farcall.broker.store.base import Store, Subscription
from farcall.protocol.channel import Hello, TaskMessage, TasksFrame, Welcome, parse_broker_frame
from farcall.protocol.rest import BatchSubmission, TaskSpec
from farcall.urls import websocket_url
from harness.services import drop_rabbitmq_queues
from tests.broker.records import endpoint_record, function_record


def drop_queues(queue: TaskQueue, endpoint_ids: list[str]) -> None:
    """Delete the RabbitMQ queues ``queue`` made for these endpoints."""
    drop_rabbitmq_queues([queue.queue_name(eid) for eid in endpoint_ids])


class Queues:
    """A queue under test plus the endpoint ids it used, so their queues can be deleted."""

    def __init__(self, queue: TaskQueue) -> None:
        self.queue = queue
        self.used: list[str] = []

    def endpoint(self) -> str:
        eid = uuid.uuid4().hex
        self.used.append(eid)
        return eid


T = TypeVar("T")


@dataclass
class Api:
    """A broker app under a ``TestClient`` (the ``make_api`` and ``api`` fixtures), with
    shortcuts for the users and objects a test starts from."""

    client: TestClient
    services: Services

    @property
    def store(self) -> Store:
        return self.services.store

    @property
    def queue(self) -> TaskQueue:
        return self.services.queue

    def call(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Run ``fn(*args)`` on the app's loop (to read or change its store directly)."""
        assert self.client.portal is not None, "the client's app is not running"
        return self.client.portal.call(fn, *args)

    def new_user(self, name: str) -> tuple[str, dict[str, str]]:
        """A new user's id and the headers that carry a token of theirs."""
        user_id, token = self.call(auth.create_user, self.store.users, name)
        return user_id, {"Authorization": f"Bearer {token}"}

    def user(self, name: str) -> dict[str, str]:
        """The headers of a new user's token."""
        return self.new_user(name)[1]

    def function(self, headers: dict[str, str], payload: str = "FN") -> str:
        """A new function's id, registered by the user of ``headers``."""
        r = self.client.post(
            "/v1/functions", json={"function": payload, "function_name": "f"}, headers=headers)
        assert r.status_code == 200, r.text
        return str(r.json()["function_id"])

    def endpoint(self, headers: dict[str, str]) -> dict[str, str]:
        """A new endpoint's registration answer (``endpoint_id``, ``name``, ``credential``)."""
        r = self.client.post("/v1/endpoints", json={"name": "ep"}, headers=headers)
        assert r.status_code == 200, r.text
        return dict(r.json())


class FakeSession:
    """An endpoint's live session as submission and endpoint control see it
    (``sessions.LiveSession``): it takes up to ``credit`` tasks and records what it is asked."""

    def __init__(self, session_id: str = "s1", credit: int = 0) -> None:
        self.session_id = session_id
        self.credit = credit
        self.sent: list[tuple[list[tuple[str, str, str]], dict[str, str]]] = []
        """``(tasks, functions)`` of each ``send_direct``."""
        self.ended = False
        self.fail_sends = False

    def can_take(self, n: int) -> bool:
        return not self.ended and self.credit >= n

    async def send_direct(self, tasks: list[tuple[str, str, str]], functions: dict[str, str]) -> None:
        if self.fail_sends:
            raise ConnectionError("the socket is gone")
        self.sent.append((tasks, functions))
        self.credit -= len(tasks)

    async def replaced(self) -> None:
        self.ended = True


async def endpoint_and_function(svc: Services, user: str) -> tuple[str, str]:
    """A new endpoint (its queue declared) and function of ``user``'s, put in the store directly."""
    endpoint_id, function_id = str(uuid.uuid4()), str(uuid.uuid4())
    await svc.store.endpoints.put(endpoint_record(endpoint_id, user), "h")
    await svc.store.functions.put(function_record(function_id, user, function="FN"))
    await svc.queue.declare(endpoint_id)
    return endpoint_id, function_id


def batch(endpoint_id: str, function_id: str, n: int, group: str | None = None) -> BatchSubmission:
    """A submission of ``n`` tasks calling ``function_id`` (arguments ``A0``, ``A1``, ...)."""
    return BatchSubmission(endpoint_id=endpoint_id, task_group_id=group, tasks=[
        TaskSpec(function_id=function_id, args=f"A{i}") for i in range(n)])


async def next_frame(subscription: Subscription, timeout: float = 5) -> str:
    """The next frame published on ``subscription``'s channel."""
    async with asyncio.timeout(timeout):
        async for frame in subscription:
            return frame
    raise AssertionError("the subscription ended")


def on_loop(broker: Any, coro: Any, timeout: float = 10) -> Any:
    """Run a coroutine on an EmbeddedBroker's loop (to look at its store); return its result."""
    return asyncio.run_coroutine_threadsafe(coro, broker.app.state.loop).result(timeout)


class FakeEndpoint:
    """The endpoint side of the channel, driven frame by frame by a test."""

    def __init__(self, broker_url: str, endpoint_id: str, credential: str) -> None:
        from websockets.sync.client import connect

        url = websocket_url(broker_url, f"/endpoints/{endpoint_id}/connect")
        self.ws = connect(
            url,
            additional_headers={"Authorization": f"Bearer {credential}"},
            open_timeout=10,
            max_size=None,
            legacy=True,
        )
        self.functions: dict[str, str] = {}

    def send(self, frame: Any) -> None:
        self.ws.send(frame.model_dump_json())

    def recv(self, timeout: float = 10) -> Any:
        return parse_broker_frame(self.ws.recv(timeout=timeout))

    def hello(self, credit: int, held: list[str] | None = None,
              crashed: list[str] | None = None) -> Welcome:
        self.send(Hello(credit=credit, held_task_ids=held or [], crashed_task_ids=crashed or []))
        frame = self.recv()
        assert isinstance(frame, Welcome), frame
        return frame

    def tasks(self, n: int, timeout: float = 10) -> list[TaskMessage]:
        """Receive exactly n tasks (over one or more TasksFrames), function bodies filled in."""
        got: list[TaskMessage] = []
        deadline = time.monotonic() + timeout
        while len(got) < n:
            frame = self.recv(max(0.01, deadline - time.monotonic()))
            assert isinstance(frame, TasksFrame), frame
            assert not set(frame.functions) & set(self.functions), "a function body sent twice"
            self.functions.update(frame.functions)
            for task in frame.tasks:
                task.function = task.function or self.functions[task.function_id]
            got += frame.tasks
        assert len(got) == n, f"got {len(got)} tasks, expected {n}"
        return got

    def silent_for(self, seconds: float) -> None:
        """Assert the broker sends nothing for ``seconds``."""
        try:
            frame = self.ws.recv(timeout=seconds)
        except TimeoutError:
            return
        raise AssertionError(f"expected no frame, got {frame!r}")

    def close(self) -> None:
        self.ws.close()
