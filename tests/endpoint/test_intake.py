"""The intake: tasks frames in, tasks to the engine out, credit kept; tasks it holds, refuses
or cannot read never reach the engine.

The unit tests drive an ``Intake`` alone, with an engine that only records; the ones with
a fake broker check the same through a running agent.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Callable, Collection
from typing import Any

import pytest

from farcall.blobs import task_grant
from farcall.endpoint.embedded import BackgroundAgent
from farcall.endpoint.engines.base import Engine, EngineStatus, OnDone, OnStart
from farcall.endpoint.engines.threads import ThreadPoolEngine
from farcall.endpoint.errors import ProtocolError
from farcall.endpoint.intake import Intake
from farcall.endpoint.outbox import Outbox
from farcall.errors import FunctionNotAllowed
from farcall.protocol.channel import (
    DataAccess,
    ResultMessage,
    ResultsFrame,
    TaskMessage,
    parse_endpoint_frame,
)
from farcall.protocol.common import MAX_SPEC_DEPTH, TaskState
from tests.endpoint.fake_broker import ENDPOINT_ID, FakeBroker
from tests.endpoint.helpers import make_task, value_of

CAPACITY = 2 * 50


def double(x: int) -> int:
    return 2 * x


class SubmitOnly(Engine):
    """Records what it is handed and runs nothing; ``pending`` is what ``cancel_pending`` gives."""

    def __init__(self, capacity: int = 10) -> None:
        self.submitted: list[TaskMessage] = []
        self.pending: list[str] = []
        self._capacity = capacity

    def start(self) -> None:
        pass

    def submit(self, task: TaskMessage, on_done: OnDone, on_start: OnStart | None = None) -> None:
        self.submitted.append(task)

    def status(self) -> EngineStatus:
        return EngineStatus()

    @property
    def capacity(self) -> int:
        return self._capacity

    def cancel(self, task_ids: Collection[str], reason: BaseException) -> None:
        raise NotImplementedError

    def cancel_pending(self) -> list[str]:
        return self.pending

    def shutdown(self, wait: bool = True, timeout: float | None = None) -> None:
        pass


def intake_with(engine: Engine, **options: Any) -> Intake:
    return Intake(engine, Outbox(), lambda r: None, lambda t, at: None, **options)


def answers(intake: Intake) -> dict[str, ResultMessage]:
    """The results the intake left in its outbox (tasks it answered without running)."""
    sent: list[bytes] = []

    async def send(frame: bytes) -> None:
        sent.append(frame)

    asyncio.run(intake.outbox.flush(send, lambda: 0))
    frames = [parse_endpoint_frame(raw) for raw in sent]
    return {r.task_id: r for f in frames if isinstance(f, ResultsFrame) for r in f.results}


def test_a_task_already_held_is_dropped_and_its_credit_comes_back() -> None:
    engine = SubmitOnly(capacity=10)
    intake = intake_with(engine)
    assert intake.open_session() == 10
    running, finished, acked = make_task(double, 1), make_task(double, 2), make_task(double, 3)
    assert not intake.take([running, finished, acked], {})
    assert intake.owed_credit() == 0  # three running, seven granted and not delivered
    for task in (finished, acked):  # their results came back; one was acknowledged since
        intake.running.discard(task.task_id)
        done = ResultMessage(task_id=task.task_id, state=TaskState.SUCCESS)
        intake.outbox.put([(task.task_id, intake.outbox.encode(done))])
    intake.outbox.acked([acked.task_id])
    again = [running.model_copy(), finished.model_copy(), acked.model_copy()]
    assert intake.take(again, {})  # True: credit is owed at once
    assert [t.task_id for t in engine.submitted] == [running.task_id, finished.task_id,
                                                     acked.task_id]
    assert intake.running == {running.task_id}
    assert intake.owed_credit() == 10 - 1 - (10 - 6)  # capacity - running - undelivered
    assert answers(intake).keys() == {finished.task_id}  # its own result; the drops add none


def test_a_function_outside_allowed_functions_is_refused_and_never_reaches_the_engine() -> None:
    engine = SubmitOnly()
    intake = intake_with(engine, allowed_functions=frozenset({"allowed"}), endpoint_name="lab-ep")
    intake.open_session()
    ok, refused = make_task(double, 1), make_task(double, 2)
    ok.function_id = "allowed"
    assert intake.take([ok, refused], {})
    assert [t.task_id for t in engine.submitted] == [ok.task_id]
    assert intake.running == {ok.task_id}
    (answer,) = answers(intake).values()
    assert answer.task_id == refused.task_id and answer.state == TaskState.FAILED
    with pytest.raises(FunctionNotAllowed, match=rf"endpoint lab-ep does not run function "
                                                 rf"{refused.function_id}: .*allowed_functions"):
        value_of(answer)
    assert intake.outbox.holds(refused.task_id)  # delivered again, it is not run either


def test_a_task_without_its_body_takes_it_from_the_cache_or_fails_alone() -> None:
    engine = SubmitOnly()
    intake = intake_with(engine)
    intake.open_session()
    first, second, orphan = make_task(double, 1), make_task(double, 2), make_task(double, 3)
    body = first.function
    for task in (first, second, orphan):
        task.function = ""
    orphan.function_id = "never-sent"
    assert not intake.take([first], {first.function_id: body})
    assert intake.take([second, orphan], {})
    assert [t.function for t in engine.submitted] == [body, body]
    (answer,) = answers(intake).values()
    with pytest.raises(ProtocolError, match=f"task {orphan.task_id} without the body of function "
                                            "never-sent"):
        value_of(answer)


def test_credit_tops_the_engine_back_up_to_its_capacity_and_stops_with_the_intake() -> None:
    engine = SubmitOnly(capacity=4)
    intake = intake_with(engine)
    intake.running.add("held-over")  # still running from the last session
    assert intake.open_session() == 3
    assert intake.owed_credit() == 0
    tasks = [make_task(double, i) for i in range(3)]
    intake.take(tasks, {})
    intake.running.discard(tasks[0].task_id)  # its result came back
    assert intake.owed_credit() == 1
    assert intake.owed_credit() == 0  # counted as granted when owed
    engine.pending = [tasks[1].task_id]  # queued in the engine, not started
    intake.stop()
    assert intake.stopping and intake.running == {"held-over", tasks[2].task_id}
    intake.running.clear()
    assert intake.owed_credit() == 0 and intake.open_session() == 0
    late = make_task(double, 9)
    assert intake.take([late], {}) and late.task_id not in {t.task_id for t in engine.submitted}


def test_every_task_carries_the_sessions_data_access_with_its_own_grant() -> None:
    engine = SubmitOnly()
    intake = intake_with(engine)
    data = DataAccess(url="http://broker", max_task_bytes=1 << 20)
    intake.set_data(data, "ep", b"k" * 32)
    tasks = [make_task(double, 1), make_task(double, 2)]
    intake.take(tasks, {})
    for task in engine.submitted:
        assert task.data is not None
        assert task.data.grant == task_grant("ep", b"k" * 32, task.task_id)
        assert task.data.model_copy(update={"grant": ""}) == data
    assert "k" * 8 not in str(engine.submitted[0].data), "the key itself never reaches a worker"


def test_an_unparsed_tasks_frame_is_read_task_by_task() -> None:
    engine = SubmitOnly()
    intake = intake_with(engine)
    intake.open_session()
    good = make_task(double, 1)
    bad = make_task(double, 2).model_dump(mode="json")
    bad["walltime"] = "soon"
    frame = {"type": "tasks", "tasks": [good.model_dump(mode="json"), bad, 42], "functions": {}}
    assert intake.take_unreadable(json.dumps(frame))
    assert [t.task_id for t in engine.submitted] == [good.task_id]
    (answer,) = answers(intake).values()
    with pytest.raises(ValueError, match=rf"could not read task {bad['task_id']}: walltime: "):
        value_of(answer)
    assert intake.owed_credit() == 2  # the unread ones' credit comes back at once...
    intake.running.clear()
    assert intake.owed_credit() == 1  # ...the good one's when it finished
    assert not intake.take_unreadable('{"type": "ack", "task_ids": [1]}')
    assert not intake.take_unreadable("not json")


# ------------------------------------------------------------------ through the agent


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


class TaskKeepingEngine(ThreadPoolEngine):
    """Runs tasks as a ThreadPoolEngine does, keeping each task as the agent handed it over."""

    def __init__(self) -> None:
        super().__init__(max_workers=2)
        self.tasks: list[TaskMessage] = []

    def submit(self, task: TaskMessage, on_done: Any, on_start: Any = None) -> None:
        self.tasks.append(task)
        super().submit(task, on_done, on_start)


@pytest.mark.parametrize("grant", ["Z3JhbnQta2V5LWdyYW50LWtleQ==", ""],
                         ids=["data-plane", "old-broker"])
def test_every_task_carries_the_data_plane_access_of_the_welcome(
    broker: FakeBroker, start_agent: Callable[..., BackgroundAgent], grant: str
) -> None:
    broker.upload_grant, broker.max_task_bytes = grant, 8 << 20
    engine = TaskKeepingEngine()
    start_agent(engine=engine, data_retry_seconds=7.5)  # the endpoint's data_retry_seconds
    tasks = [make_task(double, 1), make_task(double, 2)]
    broker.send_tasks(tasks)
    broker.wait(lambda: broker.result_ids() >= {t.task_id for t in tasks}, 10, "results")
    first, second = engine.tasks
    if not grant:
        assert first.data is None and second.data is None  # results travel inline, as before
        return
    key = base64.urlsafe_b64decode(grant)
    for task in (first, second):
        assert task.data == DataAccess(url=broker.url,
                                       grant=task_grant(ENDPOINT_ID, key, task.task_id),
                                       max_task_bytes=8 << 20, retry_seconds=7.5)
    assert first.data != second.data, "each task its own grant"
