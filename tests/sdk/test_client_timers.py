"""Client timers: what the calls send, what they refuse before sending, and a timer's runs on the
embedded broker and a thread-pool endpoint."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest

from farcall import Client
from farcall.errors import NotFound
from farcall.serialize import deserialize
from harness.procs import free_port, wait_until
from tests.helpers import StubHTTP
from tests.sdk.helpers import Stack, wait_batch


def test_create_timer_sends_the_schedule_and_the_packed_arguments() -> None:
    broker = StubHTTP((200, {"timer_id": "t1"}), (200, {"timer_id": "t2"}))
    client = Client(broker_url=broker.url, token="fcu_t", retry_seconds=0)
    try:
        start = datetime(2030, 1, 1, tzinfo=UTC)
        assert client.create_timer("e", "f", (1, 2), {"k": 3}, interval=60, start=start,
                                   stop_after_runs=5, name="sweep") == "t1"
        assert client.create_timer("e", "f", cron="0 2 * * *", stop_at=1_900_000_000) == "t2"
        bodies = [(m, p, json.loads(b)) for m, p, _, b in broker.requests]
        (m1, p1, first), (_, _, second) = bodies
        assert (m1, p1) == ("POST", "/v1/timers")
        assert deserialize(first.pop("args")) == ((1, 2), {"k": 3})
        assert first.pop("submitter")["python"]
        assert first == {"endpoint_id": "e", "function_id": "f", "interval": 60.0,
                         "start": start.timestamp(), "stop_after_runs": 5, "name": "sweep"}
        assert deserialize(second["args"]) == ((), {})
        assert (second["cron"], second["stop_at"]) == ("0 2 * * *", 1_900_000_000.0)
        assert "interval" not in second and "start" not in second
    finally:
        broker.close()


@pytest.mark.parametrize(("options", "message"), [
    ({}, "give exactly one of interval= .* or cron="),
    ({"interval": 60, "cron": "* * * * *"}, "give exactly one of interval="),
    ({"interval": 0.5}, "interval: Input should be greater than or equal to 1"),
    ({"cron": "0 2 * *"}, "has 4 fields; give 5"),
    ({"interval": 60, "start": "tomorrow"}, "start must be a datetime or seconds since the epoch"),
    ({"interval": 60, "stop_after_runs": 0}, "stop_after_runs: Input should be greater"),
    ({"interval": 60, "start": 2000, "stop_at": 1000}, "stop_at is not after start"),
])
def test_a_bad_schedule_fails_before_any_request(options: dict[str, Any], message: str) -> None:
    # Nothing listens there: a request would fail with BrokerError, not ValueError.
    client = Client(broker_url=f"http://127.0.0.1:{free_port()}", token="fcu_t", retry_seconds=0)
    with pytest.raises(ValueError, match=f"create_timer: .*{message}"):
        client.create_timer("e", "f", **options)


def test_a_timer_runs_its_function_and_lists_its_runs(client: Client, stack: Stack) -> None:
    def scale(x: int, factor: int = 1) -> int:
        return x * factor

    function_id = client.register_function(scale)
    timer_id = client.create_timer(stack.endpoint_id, function_id, (7,), {"factor": 6},
                                   interval=1, stop_after_runs=2, name="twice")
    assert [t["timer_id"] for t in client.list_timers() if t["name"] == "twice"] == [timer_id]

    def finished() -> dict[str, Any] | None:
        timer = client.get_timer(timer_id)  # a run's task id is null while it is submitted
        settled = all(r["task_id"] or r["error"] for r in timer["runs"])
        return timer if timer["state"] == "finished" and settled else None

    timer = wait_until(finished, 15, "two runs of the timer")
    assert timer["run_count"] == 2 and [r["number"] for r in timer["runs"]] == [1, 2]
    assert timer["runs"][1]["at"] - timer["runs"][0]["at"] == pytest.approx(1, abs=0.5)
    task_ids = [run["task_id"] for run in timer["runs"]]
    results = wait_batch(client, task_ids)
    assert [results[t]["result"] for t in task_ids] == [42, 42]

    other = client.create_timer(stack.endpoint_id, function_id, (1,), cron="0 2 * * *")
    assert client.pause_timer(other)["state"] == "paused"
    resumed = client.resume_timer(other)
    assert resumed["state"] == "active" and resumed["next_run"] % 86400 == 7200
    assert client.delete_timer(other) == {"timer_id": other, "deleted": True}
    with pytest.raises(NotFound, match="GET /v1/timers"):
        client.get_timer(other)
