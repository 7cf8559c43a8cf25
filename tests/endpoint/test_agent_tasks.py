"""Tasks the agent cannot read fail alone; cancelled tasks are handed to the engine to stop."""

from __future__ import annotations

import concurrent.futures
import json
import threading
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import pytest

from farcall.endpoint.embedded import BackgroundAgent
from farcall.endpoint.engines.threads import ThreadPoolEngine
from farcall.protocol.channel import DataAccess, TaskMessage
from farcall.protocol.common import MAX_SPEC_DEPTH
from tests.endpoint.fake_broker import ENDPOINT_ID, FakeBroker
from tests.endpoint.helpers import make_task, value_of

CAPACITY = 2 * 50


def double(x: int) -> int:
    return 2 * x


def hold(gate: str) -> str:
    """Task body: wait for ``gate`` to exist (bounded)."""
    import os
    import time

    deadline = time.time() + 60
    while not os.path.exists(gate) and time.time() < deadline:
        time.sleep(0.005)
    return "done"


def nested(depth: int) -> dict[str, Any]:
    spec: dict[str, Any] = {}
    for _ in range(depth):
        spec = {"level": spec}
    return spec


@pytest.mark.parametrize("depth", [MAX_SPEC_DEPTH + 4, 300], ids=["over-the-limit", "over-pydantic"])
def test_one_malformed_task_fails_alone_and_every_credit_comes_back(
    broker: FakeBroker, start_agent: Callable[..., BackgroundAgent], depth: int
) -> None:
    """At 300 levels pydantic's JSON parser refuses the whole frame; Python's reads it."""
    start_agent()
    broker.wait(lambda: broker.hello(1), 10, "hello")
    first, deep, second = make_task(double, 1), make_task(double, 2), make_task(double, 3)
    bad = deep.model_dump(mode="json")
    bad["resource_specification"] = nested(depth)
    frame = {
        "type": "tasks",
        "tasks": [first.model_dump(mode="json"), bad, {"no": "task id"},
                  second.model_dump(mode="json")],
        "functions": {},
    }
    broker.send_raw(json.dumps(frame))
    ids = {first.task_id, deep.task_id, second.task_id}
    broker.wait(lambda: broker.result_ids() >= ids, 30, "three results")
    results = {r.task_id: r for r in broker.results()}
    assert value_of(results[first.task_id]) == 2 and value_of(results[second.task_id]) == 6
    with pytest.raises(ValueError, match=rf"could not read task {deep.task_id}: .*nested deeper "
                                         rf"than {MAX_SPEC_DEPTH} levels"):
        value_of(results[deep.task_id])
    # all four elements' credit is back: the window is full again
    broker.wait(lambda: broker.credit(1) == CAPACITY + 4, 10, "credit returned")
    assert broker.connections == 1


def test_a_frame_too_deep_for_any_parser_is_dropped_and_the_agent_keeps_serving(
    broker: FakeBroker, start_agent: Callable[..., BackgroundAgent]
) -> None:
    start_agent()
    broker.wait(lambda: broker.hello(1), 10, "hello")
    absurd = make_task(double, 1).model_dump(mode="json")
    text = json.dumps(absurd)
    depth = 100_000  # past Python's recursion limit: json.loads raises RecursionError
    text = text[:-1] + ', "resource_specification": ' + '{"a":' * depth + "1" + "}" * depth + "}"
    broker.send_raw('{"type":"tasks","functions":{},"tasks":[' + text + "]}")
    later = make_task(double, 21)
    broker.send_tasks([later])
    broker.wait(lambda: later.task_id in broker.result_ids(), 30, "the next task's result")
    assert value_of(broker.results()[-1]) == 42
    assert broker.connections == 1


class RecordingEngine(ThreadPoolEngine):
    """A thread pool whose ``cancel`` records its calls (or raises, like an engine without it)."""

    def __init__(self, can_cancel: bool = True) -> None:
        super().__init__(max_workers=2, prefetch=50)
        self.can_cancel = can_cancel
        self.cancelled: list[tuple[list[str], BaseException]] = []
        self.called = threading.Event()

    def cancel(self, task_ids: Collection[str], reason: BaseException) -> None:
        self.cancelled.append((list(task_ids), reason))
        self.called.set()
        if not self.can_cancel:
            raise NotImplementedError(f"{self.name} cannot cancel tasks")


def test_cancel_stops_only_what_the_engine_still_runs(
    broker: FakeBroker, start_agent: Callable[..., BackgroundAgent], tmp_path: Path
) -> None:
    broker.auto_ack = False
    engine = RecordingEngine()
    start_agent(engine=engine)
    gate = tmp_path / "gate"
    running, finished = make_task(hold, str(gate)), make_task(double, 4)
    broker.send_tasks([running, finished])
    broker.wait(lambda: running.task_id in broker.started_ids()
                and finished.task_id in broker.result_ids(), 10, "one running, one finished")
    broker.cancel([running.task_id, finished.task_id, "never-heard-of"])
    assert engine.called.wait(10), "engine.cancel was not called"
    ((ids, reason),) = engine.cancelled
    assert ids == [running.task_id]  # a finished task's result stands; unknown ids are ignored
    assert isinstance(reason, concurrent.futures.CancelledError)
    assert "cancelled at the user's request" in str(reason)
    gate.touch()
    broker.wait(lambda: running.task_id in broker.result_ids(), 10, "the held task's result")
    broker.ack([running.task_id, finished.task_id])


def test_an_engine_that_cannot_cancel_does_not_end_the_session(
    broker: FakeBroker, start_agent: Callable[..., BackgroundAgent], tmp_path: Path
) -> None:
    engine = RecordingEngine(can_cancel=False)
    start_agent(engine=engine)
    gate = tmp_path / "gate"
    running = make_task(hold, str(gate))
    broker.send_tasks([running])
    broker.wait(lambda: running.task_id in broker.started_ids(), 10, "task running")
    broker.cancel([running.task_id])
    assert engine.called.wait(10), "engine.cancel was not called"
    later = make_task(double, 5)
    broker.send_tasks([later])
    broker.wait(lambda: later.task_id in broker.result_ids(), 10, "a later task's result")
    gate.touch()
    broker.wait(lambda: running.task_id in broker.result_ids(), 10, "the uncancelled result")
    assert broker.connections == 1


class TaskKeepingEngine(ThreadPoolEngine):
    """Runs tasks as a ThreadPoolEngine does, keeping each task as the agent handed it over."""

    def __init__(self) -> None:
        super().__init__(max_workers=2)
        self.tasks: list[TaskMessage] = []

    def submit(self, task: TaskMessage, on_done: Any, on_start: Any = None) -> None:
        self.tasks.append(task)
        super().submit(task, on_done, on_start)


@pytest.mark.parametrize("grant", ["g-123", ""], ids=["data-plane", "old-broker"])
def test_every_task_carries_the_data_plane_access_of_the_welcome(
    broker: FakeBroker, start_agent: Callable[..., BackgroundAgent], grant: str
) -> None:
    broker.upload_grant, broker.max_task_bytes = grant, 8 << 20
    engine = TaskKeepingEngine()
    start_agent(engine=engine)
    tasks = [make_task(double, 1), make_task(double, 2)]
    broker.send_tasks(tasks)
    broker.wait(lambda: broker.result_ids() >= {t.task_id for t in tasks}, 10, "results")
    first, second = engine.tasks
    if not grant:
        assert first.data is None and second.data is None  # results travel inline, as before
        return
    assert first.data == DataAccess(url=broker.url, grant=f"{ENDPOINT_ID}:{grant}",
                                    max_task_bytes=8 << 20)
    assert second.data is first.data  # one object for the session, not one per task
