"""The agent's reconnects: a broker that drops every session after its welcome is not stormed."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import pytest

from farcall.endpoint import agent as agent_module
from farcall.endpoint.embedded import BackgroundAgent
from farcall.protocol.channel import HeartbeatFrame
from tests.endpoint.fake_broker import FakeBroker


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
