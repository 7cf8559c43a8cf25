"""Globus Compute's idle stop (``idle_heartbeats_soft``/``_hard``) as a rule, and in the agent
against the fake broker; ``heartbeat_threshold`` as the agent's connection liveness."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from farcall.endpoint.embedded import BackgroundAgent
from farcall.endpoint.idle import IdleHeartbeats
from harness.faults import TcpProxy
from harness.procs import wait_until
from tests.endpoint.fake_broker import FakeBroker
from tests.endpoint.helpers import Agents, make_task, value_of

PERIOD = 0.2
"""The agents' heartbeat period here (``Agents.start``'s default)."""


def double(x: int) -> int:
    return 2 * x


def hold(gate: str) -> str:
    """Task body: wait for ``gate`` to exist (a minute at most)."""
    import os
    import time

    deadline = time.time() + 60
    while not os.path.exists(gate) and time.time() < deadline:
        time.sleep(0.005)
    return "done"


# ------------------------------------------------------------------ the rule


def ticks(rule: IdleHeartbeats, n: int, *, moved: bool = False, worked: bool = True,
          outstanding: bool = False) -> list[str | None]:
    return [rule.tick(moved=moved, worked=worked, outstanding=outstanding) for _ in range(n)]


def test_soft_zero_never_stops_whatever_happens() -> None:
    rule = IdleHeartbeats(0, 3)
    assert not rule.enabled
    assert set(ticks(rule, 50)) == {None}
    assert set(ticks(rule, 50, outstanding=True)) == {None}


def test_soft_stops_after_that_many_idle_periods_once_some_work_was_done() -> None:
    rule = IdleHeartbeats(3, 5760)
    assert ticks(rule, 3) == [None, None, "soft"]
    rule = IdleHeartbeats(3, 5760)
    assert ticks(rule, 10, worked=False) == [None] * 10  # no task yet: the soft rule waits


def test_movement_starts_both_counts_again() -> None:
    rule = IdleHeartbeats(3, 6)
    assert ticks(rule, 2) == [None, None]
    assert ticks(rule, 1, moved=True) == [None]
    assert (rule.soft_count, rule.hard_count) == (0, 0)
    assert ticks(rule, 3) == [None, None, "soft"]


def test_hard_stops_with_tasks_outstanding_and_before_any_work() -> None:
    rule = IdleHeartbeats(2, 5)
    assert ticks(rule, 5, outstanding=True) == [None] * 4 + ["hard"]
    rule = IdleHeartbeats(2, 5)
    assert ticks(rule, 5, worked=False) == [None] * 4 + ["hard"]


def test_hard_is_never_shorter_than_soft() -> None:
    rule = IdleHeartbeats(4, 1)  # as Globus Compute: the hard limit is at least soft + 1
    assert rule.hard == 5
    assert ticks(rule, 5, outstanding=True) == [None] * 4 + ["hard"]
    assert IdleHeartbeats(-3, 10).enabled is False


# ------------------------------------------------------------------ in the agent


def test_soft_stops_an_agent_after_a_task_and_not_before(
    broker: FakeBroker, start_agent: Callable[..., BackgroundAgent]
) -> None:
    runner = start_agent(idle_heartbeats_soft=2, idle_heartbeats_hard=1000)
    # No task yet: many periods pass and the agent keeps going.
    wait_until(lambda: len(broker.heartbeats()) >= 6, 10, "six heartbeats")
    assert runner.alive and not runner.agent.idle_stopped
    task = make_task(double, 21)
    broker.send_tasks([task])
    broker.wait(lambda: broker.result_ids() == {task.task_id}, 10, "the result")
    acked_at = time.monotonic()
    wait_until(lambda: not runner.alive, 10, "the idle agent to stop by itself")
    assert time.monotonic() - acked_at >= PERIOD  # at least one full idle period
    assert runner.agent.idle_stopped and runner.error is None
    assert value_of(broker.results()[0]) == 42


def test_a_running_task_keeps_soft_away_and_hard_stops_the_agent_cleanly(
    broker: FakeBroker, start_agent: Callable[..., BackgroundAgent], tmp_path: Path
) -> None:
    """A task that never finishes (a worker gone missing): the soft rule waits for it, the hard
    one stops the agent; the stop is the graceful one, and the task is left to the broker."""
    runner = start_agent(idle_heartbeats_soft=1, idle_heartbeats_hard=8, stop_timeout=0.2)
    task = make_task(hold, str(tmp_path / "never"))
    broker.send_tasks([task])
    broker.wait(lambda: task.task_id in broker.started_ids(), 10, "the task running")
    started = time.monotonic()
    wait_until(lambda: not runner.alive, 20, "the hard idle stop")
    assert time.monotonic() - started >= 7 * PERIOD
    assert runner.agent.idle_stopped and runner.error is None
    assert broker.result_ids() == set()  # nothing answered for it: the broker hands it out again


def test_hard_stops_an_agent_that_never_got_a_task(
    broker: FakeBroker, start_agent: Callable[..., BackgroundAgent]
) -> None:
    runner = start_agent(idle_heartbeats_soft=1, idle_heartbeats_hard=4)
    wait_until(lambda: not runner.alive, 10, "the hard idle stop")
    assert runner.agent.idle_stopped


@pytest.mark.slow
def test_arriving_tasks_keep_the_agent_running(
    broker: FakeBroker, start_agent: Callable[..., BackgroundAgent]
) -> None:
    runner = start_agent(idle_heartbeats_soft=10, idle_heartbeats_hard=11)
    sent: list[str] = []
    began = time.monotonic()
    while time.monotonic() - began < 30 * PERIOD:  # a task every half period, for 30 periods
        task = make_task(double, len(sent))
        sent.append(task.task_id)
        broker.send_tasks([task])
        broker.wait(lambda: set(sent) <= broker.result_ids(), 10, "a result")
        wait_until(lambda: time.monotonic() - began > PERIOD / 2 * len(sent), 5, "the next send")
    assert runner.alive and not runner.agent.idle_stopped
    wait_until(lambda: not runner.alive, 10, "the idle stop once tasks stop coming")


# ------------------------------------------------------------------ heartbeat_threshold


def test_heartbeat_threshold_finds_a_silent_broker_and_reconnects(broker: FakeBroker) -> None:
    """agent -> proxy -> broker; the proxy goes silent with the connection open (no FIN): the
    agent deems it lost within heartbeat_threshold and reconnects. Without the setting the
    WebSocket pings would take 40 s to notice."""
    threshold = 1.0
    with TcpProxy("127.0.0.1", broker.port) as proxy:
        agents = Agents(proxy.url)
        try:
            runner = agents.start(heartbeat_threshold=threshold, heartbeat_period=60)
            broker.wait(lambda: broker.hello(1), 10, "the first session")
            assert proxy.freeze() == 1
            frozen_at = time.monotonic()
            broker.wait(lambda: broker.hello(2), 15, "a new session after the silence")
            took = time.monotonic() - frozen_at
            assert runner.agent.connections == 2 or wait_until(
                lambda: runner.agent.connections == 2, 5, "the agent's welcome")
            # Lost within the threshold, then up to 2 s for a close handshake that cannot come
            # (the agent's close_timeout) and the reconnect's backoff (at most 0.3 s here).
            # Far under the 40 s the pings' defaults take: the setting is what found it (the
            # margin is for a loaded machine).
            assert took < threshold + 2.0 + 8.0, took
        finally:
            agents.stop_all()
