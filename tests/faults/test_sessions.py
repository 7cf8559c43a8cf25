"""The endpoint's connection: a silent drop followed by an agent restart, and an imposter session.

One live session per endpoint: a new session with the endpoint's credential
replaces the old one at once, so a stale session (or a second client holding
the credential) cannot strand tasks while the real agent is online.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.faults import Imposter, TcpProxy, run_scenario
from harness.procs import wait_until
from tests.faults.helpers import Deployment, agent_sessions, kill_agent

pytestmark = pytest.mark.integration


def test_silent_drop_then_agent_restart(shared: Deployment, tmp_path: Path) -> None:
    """agent -> proxy -> broker; the agent's connection goes silent, the agent dies, a new one starts.

    The new agent reconnects through the same proxy address (a new connection,
    relayed normally), as after a VPN switch. The broker cannot tell the old
    session is dead until its keepalive gives up (tens of seconds); the new
    session must replace it at once, so every task resolves well within the
    deadline (``after_fault`` in the report: from the restart to the last result).
    """
    with TcpProxy("127.0.0.1", shared.broker.port) as proxy:
        ep = shared.endpoint("silent-drop", broker_url=proxy.url)
        eid = shared.start_endpoint(ep)

        def fault() -> None:
            assert proxy.freeze() >= 1, "the agent's connection should go through the proxy"
            kill_agent(ep)
            ep.spawn()

        report = run_scenario("silent drop + agent restart", shared.broker.url, shared.token, eid, fault,
                              tmp_path, extra=lambda: {"agent_sessions": agent_sessions(ep),
                                                       "proxied_connections": proxy.connections})
    report.assert_ok()


def test_silent_drop_while_idle_then_agent_restart(shared: Deployment, tmp_path: Path) -> None:
    """The same drop on an idle endpoint, the new agent connected before any task arrives.

    The stale session still has all its credit, so unless the new session
    replaced it, it competes for the queued tasks and sends its share into the
    dead connection (issue 8: 256 tasks stuck while the endpoint was online).
    """
    with TcpProxy("127.0.0.1", shared.broker.port) as proxy:
        ep = shared.endpoint("silent-drop-idle", broker_url=proxy.url)
        eid = shared.start_endpoint(ep)

        def fault() -> None:
            assert proxy.freeze() >= 1, "the agent's connection should go through the proxy"
            kill_agent(ep)
            # Counted from here: the first agent may not have logged its welcome before the
            # freeze (the broker shows a session online before the agent reads its Welcome).
            before = agent_sessions(ep)
            ep.spawn()
            try:
                wait_until(lambda: agent_sessions(ep) > before, 60, "the new agent to connect")
            except TimeoutError as e:  # keep what both sides said
                assert ep.proc is not None
                raise AssertionError(f"{e}\n--- agent log:\n{ep.proc.output(4000)}\n--- broker log:\n"
                                     f"{shared.broker.proc.output(4000)}") from None

        report = run_scenario("silent drop while idle + agent restart", shared.broker.url, shared.token,
                              eid, fault, tmp_path, fault_when=0,
                              extra=lambda: {"agent_sessions": agent_sessions(ep),
                                             "proxied_connections": proxy.connections})
    report.assert_ok()


def test_second_session_with_the_endpoint_credential(shared: Deployment, tmp_path: Path) -> None:
    """An imposter says hello with the endpoint's credential mid-run and then sits on what it gets.

    The imposter's session replaces the agent's; the agent reconnects and its
    session replaces the imposter's, whose tasks are handed out again. Half the
    tasks are submitted after the imposter opened, so some are dispatched while
    it is there (queued ones were already taken by the agent's session).
    """
    ep = shared.endpoint("imposter")
    eid = shared.start_endpoint(ep)
    imposter = Imposter.for_endpoint(shared.broker.url, ep.dir)

    def fault() -> None:
        imposter.start()

    try:
        report = run_scenario("second session (imposter)", shared.broker.url, shared.token, eid,
                              fault, tmp_path, submit_after_fault=0.5,
                              extra=lambda: {**imposter.figures(), "agent_sessions": agent_sessions(ep)})
    finally:
        imposter.close()
    report.assert_ok()
