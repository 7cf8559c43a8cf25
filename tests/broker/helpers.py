"""Helpers shared by the broker tests: queues under test, a scripted endpoint, the broker's loop."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

from farcall.broker.queue.base import TaskQueue
from farcall.protocol.channel import Hello, TaskMessage, TasksFrame, Welcome, parse_broker_frame
from farcall.urls import websocket_url
from harness.services import drop_rabbitmq_queues


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
