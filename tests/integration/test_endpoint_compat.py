"""Globus Compute's endpoint keys on the real broker: ``idle_heartbeats_soft``/``_hard`` stop an
idle endpoint by itself (cleanly: what it held runs again at its next start), and
``heartbeat_threshold`` finds a silent connection and reconnects.

Functions are defined inside the tests so dill sends them by value.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from farcall import Client, Executor
from harness.faults import TcpProxy
from harness.procs import wait_until
from tests.integration.helpers import Endpoint

pytestmark = pytest.mark.integration

PERIOD = 0.5
"""The endpoints' heartbeat period here, in seconds."""


def exited(ep: Endpoint, timeout: float, what: str) -> int:
    """Wait (with a deadline) for the endpoint process to exit by itself; its exit code."""
    proc = ep.proc
    assert proc is not None and proc.popen is not None
    wait_until(lambda: not proc.alive(), timeout, f"{what}\n{proc.output(3000)}")
    return int(proc.popen.returncode)


def test_idle_heartbeats_soft_stops_the_endpoint_after_its_work(
    make_endpoint: Callable[..., Endpoint], client: Client
) -> None:
    ep = make_endpoint("soft", config={"idle_heartbeats_soft": 1, "heartbeat_period": PERIOD})
    eid = ep.start(client)
    # Without a task the soft rule waits (the hard one is 5760 periods away).
    began = time.monotonic()
    wait_until(lambda: time.monotonic() - began > 6 * PERIOD, 10, "six idle periods")
    assert ep.proc is not None and ep.proc.alive()

    def add(a: int, b: int) -> int:
        return a + b

    with Executor(endpoint_id=eid, client=client) as ex:
        assert ex.submit(add, 2, 3).result(timeout=60) == 5
    done_at = time.monotonic()
    assert exited(ep, 30, "the endpoint to stop by itself") == 0
    assert time.monotonic() - done_at < 15
    assert "(idle_heartbeats_soft): stopping" in ep.proc.output()
    wait_until(lambda: client.get_endpoint_status(eid)["status"] == "offline", 30,
               "the broker to show the endpoint offline")


def test_idle_heartbeats_hard_stops_an_endpoint_whose_task_never_ends_and_the_task_runs_again(
    make_endpoint: Callable[..., Endpoint], client: Client, tmp_path: Path
) -> None:
    """A task that hangs (as with a worker gone missing): nothing moves for idle_heartbeats_hard
    periods, so the endpoint stops; the stop is clean, the task stays the broker's, and the next
    start of the endpoint runs it again to its result."""
    marker = tmp_path / "first-run"
    ep = make_endpoint("hard", config={"idle_heartbeats_soft": 1, "idle_heartbeats_hard": 4,
                                       "heartbeat_period": PERIOD, "stop_timeout": 1})
    eid = ep.start(client)

    def hangs_the_first_time(path: str) -> str:
        import os
        import time

        if not os.path.exists(path):
            open(path, "w").close()
            time.sleep(120)
            return "first run"
        return "second run"

    with Executor(endpoint_id=eid, client=client) as ex:
        future = ex.submit(hangs_the_first_time, str(marker))
        wait_until(marker.exists, 60, "the task to start")
        assert exited(ep, 30, "the hard idle stop") == 0
        assert "(idle_heartbeats_hard) with 1 task(s)" in ep.proc.output()  # type: ignore[union-attr]
        assert not future.done()
        ep.spawn()  # the same endpoint again: its hello hands the task back to the queue
        assert future.result(timeout=60) == "second run"


def test_heartbeat_threshold_reconnects_after_a_silent_connection(
    make_endpoint: Callable[..., Endpoint], client: Client, broker: Any
) -> None:
    """endpoint -> proxy -> broker; the proxy goes silent with the connection open. With
    heartbeat_threshold: 2 the endpoint reconnects within seconds (WebSocket pings would take
    40 s without it) and runs tasks again."""
    with TcpProxy("127.0.0.1", broker.port) as proxy:
        ep = make_endpoint("threshold", config={"heartbeat_threshold": 2})
        path = ep.dir / "config.yaml"
        path.write_text(path.read_text().replace(broker.url, proxy.url))
        eid = ep.start(client)

        def connections() -> int:
            try:
                return int(json.loads((ep.dir / "status.json").read_text())["connections"])
            except (OSError, ValueError, KeyError):
                return 0

        wait_until(lambda: connections() == 1, 10, "the first session in status.json")
        assert proxy.freeze() >= 1
        frozen_at = time.monotonic()
        wait_until(lambda: connections() == 2, 15, "the endpoint to reconnect")
        took = time.monotonic() - frozen_at
        assert took < 2 + 2 + 2, took  # threshold, close handshake timeout, backoff

        def square(x: int) -> int:
            return x * x

        with Executor(endpoint_id=eid, client=client) as ex:
            assert ex.submit(square, 9).result(timeout=60) == 81
