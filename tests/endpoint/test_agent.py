"""The agent against a fake broker: credit, batching, acks, reconnects, redelivery, stop."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from farcall.endpoint.agent import ProtocolError
from farcall.endpoint.embedded import BackgroundAgent
from farcall.endpoint.errors import EndpointError, EndpointRejected
from farcall.protocol.channel import Credit, Hello, ResultsFrame
from harness.procs import wait_until
from tests.endpoint.fake_broker import FakeBroker
from tests.endpoint.helpers import make_task, value_of

CAPACITY = 2 * 50


def hold(marker: str, gate: str) -> str:
    """Task body: append a line to ``marker`` (counts runs), wait for ``gate`` to exist."""
    import os
    import time

    with open(marker, "a") as f:
        f.write("ran\n")
    deadline = time.time() + 60
    while not os.path.exists(gate) and time.time() < deadline:
        time.sleep(0.005)
    return "done"


def runs(marker: Path) -> int:
    return marker.read_text().count("ran") if marker.exists() else 0


def test_hello_credit_tasks_run_results_batched_credit_returned(
    broker: FakeBroker, start_agent: Callable[..., BackgroundAgent]
) -> None:
    start_agent()
    hello = broker.wait(lambda: broker.hello(1), 10, "hello")
    assert hello.credit == CAPACITY and hello.held_task_ids == []
    assert hello.heartbeat_period == 0.2  # the broker calls the endpoint offline by it
    assert hello.heartbeat.workers == 2 and hello.heartbeat.engine == "ThreadPoolEngine"

    def square(x: int) -> int:
        return x * x

    tasks = [make_task(square, i) for i in range(CAPACITY)]
    for i in range(0, CAPACITY, 25):
        broker.send_tasks(tasks[i : i + 25])
    broker.wait(lambda: len(broker.result_ids()) == CAPACITY, 30, "all results")
    results = {r.task_id: r for r in broker.results()}
    assert [value_of(results[t.task_id]) for t in tasks] == [i * i for i in range(CAPACITY)]
    frames = broker.of(ResultsFrame)
    assert len(frames) < CAPACITY / 4, f"{len(frames)} result frames for {CAPACITY} results"
    assert len(broker.results()) == CAPACITY  # each result sent once
    # A start is reported in a running frame only while the task runs; a result carries its own.
    assert all(r.started_at for r in broker.results())
    assert broker.started_ids() <= {t.task_id for t in tasks}
    # every finished task gave its credit back: the window is full again
    broker.wait(lambda: broker.credit(1) == 2 * CAPACITY, 10, "credit returned")


def test_heartbeats_report_engine_status(
    broker: FakeBroker, start_agent: Callable[..., BackgroundAgent]
) -> None:
    start_agent()
    broker.wait(lambda: len(broker.heartbeats()) >= 2, 10, "two heartbeats")
    beat = broker.heartbeats()[-1].heartbeat
    assert (beat.workers, beat.idle_workers, beat.running_tasks) == (2, 2, 0)
    assert beat.versions is not None and beat.details["capacity"] == CAPACITY


def test_results_are_resent_after_reconnect_until_acked(
    broker: FakeBroker, start_agent: Callable[..., BackgroundAgent]
) -> None:
    broker.auto_ack = False
    start_agent()

    def triple(x: int) -> int:
        return 3 * x

    tasks = [make_task(triple, i) for i in range(3)]
    ids = {t.task_id for t in tasks}
    broker.send_tasks(tasks)
    broker.wait(lambda: broker.result_ids(1) == ids, 10, "results on connection 1")

    broker.drop()
    hello = broker.wait(lambda: broker.hello(2), 10, "hello on connection 2")
    assert set(hello.held_task_ids) == ids
    assert hello.credit == CAPACITY  # nothing is running
    broker.wait(lambda: broker.result_ids(2) == ids, 10, "results resent on connection 2")
    assert {value_of(r) for r in broker.results(2)} == {0, 3, 6}

    broker.ack(sorted(ids))
    broker.wait(lambda: any(f.heartbeat.details["held_results"] == 0
                            for f in broker.heartbeats()[-1:]), 10, "acks taken")
    broker.drop()
    hello = broker.wait(lambda: broker.hello(3), 10, "hello on connection 3")
    assert hello.held_task_ids == []
    broker.wait(lambda: len(broker.heartbeats()) > 0 and broker.of(type(broker.heartbeats()[0]), 3),
                10, "a heartbeat on connection 3")
    assert broker.result_ids(3) == set()


def test_redelivered_task_is_not_run_twice(
    broker: FakeBroker, start_agent: Callable[..., BackgroundAgent], tmp_path: Path
) -> None:
    broker.auto_ack = False
    start_agent()
    marker, gate = tmp_path / "runs", tmp_path / "gate"
    task = make_task(hold, str(marker), str(gate))
    broker.send_tasks([task])
    broker.wait(lambda: task.task_id in broker.started_ids(), 10, "task running")
    broker.send_tasks([task])  # redelivered while running, same connection
    broker.drop()
    hello = broker.wait(lambda: broker.hello(2), 10, "hello on connection 2")
    assert hello.held_task_ids == [task.task_id]
    assert hello.credit == CAPACITY - 1  # the running task still takes its slot
    broker.send_tasks([task])  # redelivered after the reconnect
    gate.touch()
    broker.wait(lambda: task.task_id in broker.result_ids(2), 10, "result on connection 2")
    broker.send_tasks([task])  # redelivered while its result is unacknowledged
    broker.ack([task.task_id])
    broker.send_tasks([task])  # redelivered after the ack
    # the redeliveries' credit comes back, which also proves the agent saw all of them
    broker.wait(lambda: broker.credit(2) == CAPACITY + 3, 10, "credit for redeliveries")
    assert runs(marker) == 1
    assert len(broker.results()) == 1


def test_running_task_survives_broker_outage(
    broker: FakeBroker, start_agent: Callable[..., BackgroundAgent], tmp_path: Path
) -> None:
    runner = start_agent()
    marker, gate = tmp_path / "runs", tmp_path / "gate"
    task = make_task(hold, str(marker), str(gate))
    broker.send_tasks([task])
    broker.wait(lambda: task.task_id in broker.started_ids(), 10, "task running")
    broker.stop_server()
    wait_until(lambda: not runner.agent.connected.is_set(), 10, "agent notices", interval=0.01)
    gate.touch()  # the task finishes while the broker is away
    broker.start_server()
    hello = broker.wait(lambda: broker.hello(2), 20, "reconnect after the outage")
    assert hello.held_task_ids == [task.task_id]
    broker.wait(lambda: task.task_id in broker.result_ids(2), 10, "result after reconnect")
    assert value_of(broker.results(2)[0]) == "done"
    assert runs(marker) == 1


def test_graceful_stop_finishes_running_tasks_and_takes_no_new_ones(
    broker: FakeBroker, start_agent: Callable[..., BackgroundAgent], tmp_path: Path
) -> None:
    runner = start_agent()
    marker, gate = tmp_path / "runs", tmp_path / "gate"
    task = make_task(hold, str(marker), str(gate))
    broker.send_tasks([task])
    broker.wait(lambda: task.task_id in broker.started_ids(), 10, "task running")
    runner.agent.request_stop()
    broker.wait(lambda: any(f.heartbeat.details["stopping"] for f in broker.heartbeats()), 10,
                "agent stopping")
    late = make_task(hold, str(tmp_path / "late"), str(gate))
    broker.send_tasks([late])
    assert runner.alive
    gate.touch()
    broker.wait(lambda: task.task_id in broker.result_ids(), 10, "result of the running task")
    runner.stop(timeout=20)
    assert not runner.alive and runner.error is None
    assert not (tmp_path / "late").exists()
    assert late.task_id not in broker.result_ids()
    assert sum(f.n for f in broker.of(Credit)) == 0
    assert all(f.credit == 0 for f in broker.of(ResultsFrame))


def test_refused_credential_stops_the_agent_with_a_clear_error(
    broker: FakeBroker, start_agent: Callable[..., BackgroundAgent]
) -> None:
    runner = start_agent(credential="fce_wrong", connect=False)
    with pytest.raises(EndpointError, match="deleted or its credential revoked"):
        runner.wait_connected(10)
    assert isinstance(runner.error, EndpointRejected)
    assert broker.rejected == 1 and not broker.of(Hello)


def test_function_bodies_come_once_and_are_reused(
    broker: FakeBroker, start_agent: Callable[..., BackgroundAgent]
) -> None:
    start_agent()

    def halve(x: int) -> float:
        return x / 2

    first, second = make_task(halve, 8), make_task(halve, 3)
    body = first.function
    for task in (first, second):
        task.function = ""  # the body travels in the frame, once
    broker.wait(lambda: broker.hello(1), 10, "hello")
    broker.send_tasks([first], functions={first.function_id: body})
    broker.send_tasks([second])  # no body: the endpoint has it from the first frame
    unknown = make_task(halve, 1)
    unknown.function = ""
    unknown.function_id = "never-sent"
    broker.send_tasks([unknown])
    ids = [first.task_id, second.task_id, unknown.task_id]
    broker.wait(lambda: broker.result_ids() >= set(ids), 30, "results")
    results = {r.task_id: r for r in broker.results()}
    assert value_of(results[first.task_id]) == 4.0 and value_of(results[second.task_id]) == 1.5
    with pytest.raises(ProtocolError, match="without the body of function never-sent"):
        value_of(results[unknown.task_id])
