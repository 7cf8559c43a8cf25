"""Timers on real processes: broker processes on real Redis and RabbitMQ, and an endpoint agent.

Two broker replicas share one Redis prefix and one queue prefix (``replicas``): each run of a
timer fires once however many replicas look for due timers, a timer survives the replicas'
restart, and the runs missed while none was up fire once when they are back. The rest (sharing,
pause, a deleted function) needs no agent and runs on the session's broker.
"""

from __future__ import annotations

import math
import signal
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from farcall import Client
from farcall.errors import NotFound
from harness.procs import wait_until
from tests.integration.helpers import Broker, Endpoint, own_broker

pytestmark = pytest.mark.integration


def _register_mark(client: Client) -> str:
    """What each run calls: one line per call in ``path``, so a run that fired twice shows.
    (Defined in here, it travels by value: the agent cannot import this test module.)"""

    def mark(path: str, label: str) -> str:
        with open(path, "a") as f:
            f.write(label + "\n")
        return label

    return client.register_function(mark)


@dataclass
class Stage:
    replicas: tuple[Broker, Broker]
    client: Client
    endpoint_id: str
    function_id: str


@pytest.fixture(scope="module")
def stage(service_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stage]:
    logs = tmp_path_factory.mktemp("timers")
    with own_broker(service_env, logs, "timers") as first:
        second = Broker(first.env, logs / "second.log", name="timers broker 2").start()
        token = first.create_user(f"timers-{uuid.uuid4().hex[:6]}")
        client = Client(broker_url=first.url, token=token)
        ep = Endpoint("timers", dict(first.env, FARCALL_HOME=str(logs / "home"),
                                     FARCALL_BROKER_URL=first.url, FARCALL_TOKEN=token))
        ep.configure("ThreadPoolEngine", 2, first.url)
        try:
            endpoint_id = ep.start(client)
            yield Stage((first, second), client, endpoint_id, _register_mark(client))
        finally:
            ep.stop()
            client.close()
            second.stop()


def _finished(client: Client, timer_id: str, timeout: float) -> dict[str, Any]:
    """The timer once it finished and each of its runs was submitted (a run's task id is null
    while it is being submitted, which may be after the last run marked the timer finished)."""

    def done() -> dict[str, Any] | None:
        timer = client.get_timer(timer_id)
        settled = all(r["task_id"] or r["error"] for r in timer["runs"])
        return timer if timer["state"] == "finished" and settled else None

    return wait_until(done, timeout, f"timer {timer_id} to finish")


def _results(client: Client, task_ids: list[str], timeout: float = 30) -> list[Any]:
    def done() -> dict[str, dict[str, Any]] | None:
        found = client.get_batch_result(task_ids)
        return None if len(found) < len(task_ids) or any(
            r["pending"] for r in found.values()) else found

    found = wait_until(done, timeout, f"results of {task_ids}")
    return [found[t].get("result", found[t].get("exception")) for t in task_ids]


def test_two_replicas_fire_each_run_once(stage: Stage, tmp_path: Path) -> None:
    marks = tmp_path / "marks"
    timer_id = stage.client.create_timer(stage.endpoint_id, stage.function_id,
                                         (str(marks), "run"), interval=1, stop_after_runs=3)
    timer = _finished(stage.client, timer_id, 20)
    task_ids = [r["task_id"] for r in timer["runs"]]
    assert timer["run_count"] == 3 and [r["number"] for r in timer["runs"]] == [1, 2, 3]
    assert len(set(task_ids)) == 3 and all(task_ids), timer["runs"]
    assert _results(stage.client, task_ids) == ["run"] * 3
    assert marks.read_text().splitlines() == ["run"] * 3, "no run may reach the endpoint twice"


def test_a_timer_survives_a_restart_and_fires_missed_runs_once(stage: Stage, tmp_path: Path) -> None:
    client = stage.client
    timer_id = client.create_timer(stage.endpoint_id, stage.function_id,
                                   (str(tmp_path / "marks"), "run"), interval=1, stop_after_runs=4)
    wait_until(lambda: client.get_timer(timer_id)["run_count"] >= 1, 10, "the first run")
    for broker in stage.replicas:  # killed, as a crash would; the first run is just done
        broker.proc.stop(timeout=10, sig=signal.SIGKILL)
    down = time.time()
    wait_until(lambda: time.time() > down + 2.5, 5, "two runs' times to pass with no broker up")
    up = time.time()
    for broker in stage.replicas:
        broker.start()  # the same port, as a supervisor would

    timer = _finished(client, timer_id, 20)
    runs = timer["runs"]
    # A first run that fired late (a busy machine) may be followed at once by the second, before
    # the kill: one or two runs come before it, and none while no broker is up.
    before = [r for r in runs if r["at"] < down]
    after = [r for r in runs if r["at"] >= up]
    assert 1 <= len(before) <= 2 and len(before) + len(after) == 4, runs
    missed, last = after[0], after[1]
    grid = timer["schedule"]["start"] + math.ceil(missed["at"] - timer["schedule"]["start"])
    assert last["at"] >= grid - 0.01, (
        "the runs missed while no broker was up fire once; the next keeps to the schedule")
    task_ids = [r["task_id"] for r in runs]
    assert _results(client, task_ids) == ["run"] * 4
    assert (tmp_path / "marks").read_text().splitlines() == ["run"] * 4


# ---- on the session's broker, without an agent (runs only queue tasks)


@pytest.fixture
def target(client: Client) -> tuple[str, str]:
    """An endpoint (no agent: tasks wait in its queue) and a function of the test user."""
    return client.register_endpoint("timers")["endpoint_id"], _register_mark(client)


def test_a_timer_whose_function_is_deleted_stops_saying_so(client: Client,
                                                            target: tuple[str, str]) -> None:
    endpoint_id, function_id = target
    timer_id = client.create_timer(endpoint_id, function_id, ("/dev/null", "x"), interval=1)
    wait_until(lambda: client.get_timer(timer_id)["run_count"] >= 1, 10, "the first run")
    client.delete_function(function_id)

    def stopped() -> dict[str, Any] | None:
        timer = client.get_timer(timer_id)
        return timer if timer["state"] == "stopped" else None

    timer = wait_until(stopped, 15, "the timer to stop")
    assert f"function {function_id} was deleted" in timer["reason"]
    assert timer["next_run"] is None and timer["runs"][-1]["error"] == timer["reason"]


def test_a_timer_is_its_creators_alone(broker: Broker, client: Client,
                                       target: tuple[str, str]) -> None:
    endpoint_id, function_id = target
    timer_id = client.create_timer(endpoint_id, function_id, cron="0 2 * * *")
    stranger = Client(broker_url=broker.url, token=broker.create_user(f"eve-{uuid.uuid4().hex[:6]}"))
    try:
        assert stranger.list_timers() == []
        for call in (stranger.get_timer, stranger.pause_timer, stranger.resume_timer,
                     stranger.delete_timer):
            with pytest.raises(NotFound, match=f"timer {timer_id} not found"):
                call(timer_id)
        with pytest.raises(NotFound, match=f"endpoint {endpoint_id} not found"):
            stranger.create_timer(endpoint_id, function_id, cron="0 2 * * *")
        assert client.get_timer(timer_id)["state"] == "active"
    finally:
        stranger.close()
        client.delete_timer(timer_id)


def test_a_paused_timer_does_not_run_until_resumed(client: Client,
                                                    target: tuple[str, str]) -> None:
    endpoint_id, function_id = target
    timer_id = client.create_timer(endpoint_id, function_id, ("/dev/null", "x"), interval=1)
    wait_until(lambda: client.get_timer(timer_id)["run_count"] >= 1, 10, "the first run")
    paused = client.pause_timer(timer_id)
    assert paused["state"] == "paused" and paused["next_run"] is None
    since = time.time()
    wait_until(lambda: time.time() > since + 2.2, 5, "two runs' times to pass while paused")
    assert client.get_timer(timer_id)["run_count"] == paused["run_count"]
    resumed = client.resume_timer(timer_id)
    assert resumed["state"] == "active" and resumed["next_run"] >= since + 2.2
    wait_until(lambda: client.get_timer(timer_id)["run_count"] > paused["run_count"], 10,
               "a run after resuming")
    client.delete_timer(timer_id)
