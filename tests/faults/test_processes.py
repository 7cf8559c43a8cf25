"""``kill -9`` of the agent, of one of its workers, and of the broker, with 2,000 tasks in flight.

Each asserts the promise of docs/reliability.md: every future resolves (a
result, or a failure with a clear error), none is lost; a task may run twice
only because it was in flight at the fault (counted, not asserted).
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from harness.faults import kill_worker, run_scenario
from tests.faults.helpers import Deployment, agent_sessions, kill_agent

pytestmark = pytest.mark.integration


def test_kill_agent_then_restart(shared: Deployment, tmp_path: Path) -> None:
    ep = shared.endpoint("agent-kill")
    eid = shared.start_endpoint(ep)

    def fault() -> None:
        kill_agent(ep)
        ep.spawn()  # as systemd would

    report = run_scenario("kill -9 agent", shared.broker.url, shared.token, eid, fault, tmp_path,
                          extra=lambda: {"agent_sessions": agent_sessions(ep)})
    report.assert_ok()


def test_kill_worker(shared: Deployment, tmp_path: Path) -> None:
    ep = shared.endpoint("worker-kill")
    eid = shared.start_endpoint(ep)
    killed: list[int] = []

    def fault() -> None:
        assert ep.proc is not None
        killed.append(kill_worker(ep.proc.pid))

    report = run_scenario("kill -9 worker", shared.broker.url, shared.token, eid, fault, tmp_path,
                          extra=lambda: {"worker_killed": killed})
    report.assert_ok()
    assert ep.proc is not None and ep.proc.alive(), "the agent must survive a worker's death"


def test_kill_broker_then_restart(deployment: Callable[..., Deployment], tmp_path: Path) -> None:
    dep = deployment(name="broker-kill").start()
    ep = dep.endpoint("broker-kill")
    eid = dep.start_endpoint(ep)

    def fault() -> None:
        dep.broker.proc.stop(timeout=10, sig=signal.SIGKILL)
        dep.broker.start()  # the same port, as a supervisor would

    report = run_scenario("kill -9 broker", dep.broker.url, dep.token, eid, fault, tmp_path,
                          extra=lambda: {"agent_sessions": agent_sessions(ep)})
    report.assert_ok()
