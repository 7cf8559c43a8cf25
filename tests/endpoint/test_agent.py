"""The agent against a fake broker: the connection (hello, credit, batching, acks,
reconnects and their backoff, redelivery, stop), cancelling, and the crash journal's
ids in the Hello.

Frames and result sizes are ``test_outbox.py``'s; reading tasks frames is ``test_intake.py``'s.
"""

from __future__ import annotations

import concurrent.futures
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Collection
from functools import partial
from pathlib import Path

import pytest

from farcall.endpoint import agent as agent_module
from farcall.endpoint import daemon
from farcall.endpoint.embedded import BackgroundAgent
from farcall.endpoint.engines.threads import ThreadPoolEngine
from farcall.endpoint.errors import EndpointError, EndpointRejected, ProtocolError
from farcall.endpoint.journal import read_crashed
from farcall.protocol.channel import (
    Credit,
    HeartbeatFrame,
    Hello,
    ResultsFrame,
    StartUserEndpoint,
    Welcome,
)
from harness.procs import wait_until
from tests.endpoint.fake_broker import BROKER_ID, CREDENTIAL, ENDPOINT_ID, FakeBroker
from tests.endpoint.helpers import Agents, ipv6_first, make_task, value_of

CAPACITY = 2 * 50
REPO = Path(__file__).resolve().parents[2]


def double(x: int) -> int:
    return 2 * x


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
    with pytest.raises(EndpointError,
                       match="deleted, its owner was disabled.*rotated.*rotate-credential.*again"):
        runner.wait_connected(10)
    assert isinstance(runner.error, EndpointRejected)
    assert broker.rejected == 1 and not broker.of(Hello)


def test_every_welcome_is_handed_to_on_welcome(
    broker: FakeBroker, start_agent: Callable[..., BackgroundAgent]
) -> None:
    """How a registration that does not record its broker's id learns it (cli.cmd_start)."""
    welcomes: list[Welcome] = []
    runner = start_agent(on_welcome=welcomes.append)
    assert [w.broker_id for w in welcomes] == [BROKER_ID]
    broker.drop()
    wait_until(lambda: runner.agent.connections == 2 and runner.agent.connected.is_set(), 10,
               "the agent to reconnect")
    assert [w.broker_id for w in welcomes] == [BROKER_ID, BROKER_ID]


def test_a_localhost_url_reaches_a_broker_on_127_0_0_1_when_ipv6_comes_first(
    broker: FakeBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An endpoint configured with ``http://localhost:P`` where localhost is ``::1`` first."""
    ipv6_first(monkeypatch)
    agents = Agents(broker.url.replace("127.0.0.1", "localhost"))
    try:
        agents.start()  # returns once connected
    finally:
        agents.stop_all()
    assert broker.hello(1) is not None


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


# ------------------------------------------------------------------ reconnect backoff


def test_sessions_dropped_right_after_their_welcome_are_retried_further_apart(
    broker: FakeBroker, start_agent: Callable[..., BackgroundAgent]
) -> None:
    broker.close_after_welcome = True
    start_agent(connect=False, max_backoff=60)
    broker.wait(lambda: broker.connections >= 6, 30, "six sessions")
    at = broker.connected_at
    # Five waits between six sessions. Growing from 0.1 s (each delay at least half its
    # nominal 0.1 * 2**n) they add up to at least 0.05 + 0.1 + 0.2 + 0.4 + 0.8 s; reset at
    # every welcome, as before, the six sessions came within 5 * 0.1 s plus connect time.
    assert at[5] - at[0] >= 1.5, f"sessions at {[round(t - at[0], 2) for t in at]}"
    assert all(b > a for a, b in zip(at, at[1:], strict=False))


def test_a_session_that_lasted_resets_the_backoff(
    broker: FakeBroker, start_agent: Callable[..., BackgroundAgent],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(agent_module, "HEALTHY_SESSION", 0.1)
    runner = start_agent(max_backoff=60)
    for n in range(1, 5):
        # a heartbeat comes heartbeat_period (0.2 s) into a session: it has lasted long enough
        broker.wait(partial(broker.of, HeartbeatFrame, n), 10, f"a heartbeat on session {n}")
        broker.drop()
        broker.wait(partial(broker.hello, n + 1), 10, f"session {n + 1}")
    # one delay since the last healthy session, not four growing ones
    assert runner.agent._backoff.attempt == 1


# ------------------------------------------------------------------ cancel


def wait_for(gate: str) -> str:
    """Task body: wait for ``gate`` to exist (bounded)."""
    import os
    import time

    deadline = time.time() + 60
    while not os.path.exists(gate) and time.time() < deadline:
        time.sleep(0.005)
    return "done"


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
    running, finished = make_task(wait_for, str(gate)), make_task(double, 4)
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
    running = make_task(wait_for, str(gate))
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


# ------------------------------------------------------------------ the crash journal


def exit_now(code: int) -> None:
    """Task body: end the whole process at once, as a crashing extension would."""
    import os

    os._exit(code)


def test_the_first_hello_carries_the_crashed_ids_once(
    broker: FakeBroker, start_agent: Callable[..., BackgroundAgent], tmp_path: Path
) -> None:
    path = tmp_path / daemon.JOURNAL_FILE
    path.write_bytes(b"+crashed-1\n+done\n-done\n+crashed-2\n")
    runner = start_agent(journal_path=path)
    hello = broker.wait(lambda: broker.hello(1), 10, "hello")
    assert hello.crashed_task_ids == ["crashed-1", "crashed-2"]
    assert read_crashed(path) == []
    task = make_task(double, 4)
    broker.send_tasks([task])
    broker.wait(lambda: task.task_id in broker.result_ids(), 10, "a result")
    lines = path.read_bytes().rstrip(b"\0").splitlines()  # the file's unused tail is zeros
    assert lines == [b"+" + task.task_id.encode(), b"-" + task.task_id.encode()]
    broker.drop()
    hello = broker.wait(lambda: broker.hello(2), 10, "hello on connection 2")
    assert hello.crashed_task_ids == []
    runner.stop(timeout=30)
    assert path.read_bytes() == b""


def test_without_a_journal_the_hello_says_no_crashes(
    broker: FakeBroker, start_agent: Callable[..., BackgroundAgent], tmp_path: Path
) -> None:
    start_agent()
    hello = broker.wait(lambda: broker.hello(1), 10, "hello")
    assert hello.crashed_task_ids == []
    assert list(tmp_path.iterdir()) == []


AGENT = """
import sys
from pathlib import Path
from farcall.endpoint import daemon
from farcall.endpoint.agent import Agent
from farcall.endpoint.engines import build_engine

url, endpoint_id, credential, directory = sys.argv[1:5]
engine = build_engine({"type": "ThreadPoolEngine", "max_workers": 2})
agent = Agent(url, endpoint_id, credential, engine, heartbeat_period=0.2, max_backoff=0.3)
daemon.run_agent(agent, Path(directory))
"""


def test_a_task_that_kills_the_agent_is_reported_by_the_next_agent(
    broker: FakeBroker, tmp_path: Path
) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-c", AGENT, broker.url, ENDPOINT_ID, CREDENTIAL, str(tmp_path)]
    first = subprocess.Popen(command, env=env, cwd=REPO)
    second: subprocess.Popen[bytes] | None = None
    try:
        broker.wait(lambda: broker.hello(1), 20, "the first agent's hello")
        killer = make_task(exit_now, 7)
        broker.send_tasks([killer])
        assert first.wait(20) == 7
        second = subprocess.Popen(command, env=env, cwd=REPO)
        hello = broker.wait(lambda: broker.hello(2), 20, "the second agent's hello")
        assert hello.crashed_task_ids == [killer.task_id]
        task = make_task(double, 5)
        broker.send_tasks([task])
        broker.wait(lambda: task.task_id in broker.result_ids(), 20, "the second agent serves")
        assert value_of(broker.results()[-1]) == 10
        second.terminate()  # SIGTERM: a graceful stop
        assert second.wait(30) == 0
        assert read_crashed(tmp_path / daemon.JOURNAL_FILE) == []
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(10)


# ------------------------------------------------------------------ idle stop, manager mode, task states


def test_an_idle_agent_stops_by_itself_but_not_while_a_task_runs(
    broker: FakeBroker, start_agent: Callable[..., BackgroundAgent], tmp_path: Path
) -> None:
    runner = start_agent(idle_shutdown_seconds=0.8)
    marker, gate = tmp_path / "runs", tmp_path / "gate"
    task = make_task(hold, str(marker), str(gate))
    broker.send_tasks([task])
    broker.wait(lambda: task.task_id in broker.started_ids(), 10, "task running")
    held_since = time.monotonic()
    # Three idle periods with a task running: the agent keeps going.
    wait_until(lambda: time.monotonic() - held_since > 2.4 or not runner.alive, 10, "a while")
    assert runner.alive and not runner.agent.idle_stopped
    gate.touch()
    broker.wait(lambda: task.task_id in broker.result_ids(), 10, "the task's result")
    done_at = time.monotonic()
    wait_until(lambda: not runner.alive, 10, "the idle agent to stop")
    assert time.monotonic() - done_at >= 0.8
    assert runner.agent.idle_stopped and runner.error is None
    assert value_of(broker.results()[0]) == "done"


def test_arriving_tasks_keep_an_agent_from_its_idle_stop(
    broker: FakeBroker, start_agent: Callable[..., BackgroundAgent]
) -> None:
    runner = start_agent(idle_shutdown_seconds=1.0)
    started = time.monotonic()
    sent: list[str] = []
    while time.monotonic() - started < 3.0:  # a quick task every 0.3 s for 3 idle periods
        task = make_task(double, len(sent))
        sent.append(task.task_id)
        broker.send_tasks([task])
        broker.wait(lambda: set(sent) <= broker.result_ids(), 10, "a result")
        wait_until(lambda: time.monotonic() - started > 0.3 * len(sent), 5, "the next tick")
    assert runner.alive
    wait_until(lambda: not runner.alive, 10, "the idle stop once tasks stop coming")
    assert broker.result_ids() == set(sent)


def test_a_manager_says_so_in_its_hello_and_gets_the_start_frames(
    broker: FakeBroker, start_agent: Callable[..., BackgroundAgent]
) -> None:
    schema = {"type": "object", "properties": {"account": {"type": "string"}}}
    starts: list[StartUserEndpoint] = []
    start_agent(multi_user=True, user_config_schema=schema, on_start_user_endpoint=starts.append)
    hello = broker.wait(lambda: broker.hello(1), 10, "hello")
    assert hello.multi_user is True and hello.user_config_schema == schema
    frame = StartUserEndpoint(endpoint_id="ue-1", credential="fce_child", user_id="u1",
                              username="ada", identities=[{"id": "u1", "username": "ada"}],
                              user_endpoint_config={"account": "abc"}, config_hash="f" * 64)
    broker.send_raw(frame.model_dump_json())
    wait_until(lambda: starts, 10, "the start frame")
    assert starts == [frame]


def test_an_ordinary_agent_ignores_start_frames_and_keeps_serving(
    broker: FakeBroker, start_agent: Callable[..., BackgroundAgent],
    caplog: pytest.LogCaptureFixture
) -> None:
    start_agent()
    hello = broker.wait(lambda: broker.hello(1), 10, "hello")
    assert hello.multi_user is False and hello.user_config_schema is None
    broker.send_raw(StartUserEndpoint(endpoint_id="ue-1", credential="c", user_id="u1",
                                      username="ada").model_dump_json())
    task = make_task(double, 21)
    broker.send_tasks([task])
    broker.wait(lambda: task.task_id in broker.result_ids(), 10, "a result")
    assert value_of(broker.results()[0]) == 42
    assert "not a multi-user endpoint" in caplog.text


def test_task_states_are_reported_in_batches(
    broker: FakeBroker, start_agent: Callable[..., BackgroundAgent]
) -> None:
    batches: list[list[tuple[str, str]]] = []
    start_agent(on_task_states=batches.append)
    wait_until(lambda: batches, 10, "the connected event")
    assert batches[0] == [("", "connected")]

    def fail() -> None:
        raise ValueError("no")

    tasks = [make_task(double, i) for i in range(20)] + [make_task(fail)]
    broker.send_tasks(tasks)
    broker.wait(lambda: len(broker.result_ids()) == len(tasks), 10, "results")
    wanted = {(t.task_id, "received") for t in tasks} | {(t.task_id, "success") for t in tasks[:-1]}
    wanted |= {(tasks[-1].task_id, "failed")}
    wait_until(lambda: wanted <= {s for b in batches for s in b}, 10, "every state")
    states = [s for b in batches for s in b]
    assert {s for _, s in states} <= {"connected", "received", "running", "success", "failed"}
    assert len(batches) < len(states) / 2, "states should come in batches"
    received = [i for i, (_, s) in enumerate(states) if s == "received"]
    finished = [i for i, (_, s) in enumerate(states) if s in ("success", "failed")]
    assert max(received) < min(finished)
