"""Client: the REST API as calls, against an embedded broker and a thread-pool endpoint."""

from __future__ import annotations

import json
from concurrent.futures import CancelledError
from pathlib import Path
from typing import Any

import pytest

from farcall import Client, Executor
from farcall.client import split_batch
from farcall.errors import AuthenticationError, BrokerError, NotFound, TaskPending
from farcall.protocol.rest import TaskSpec
from harness.procs import wait_until
from tests.helpers import StubHTTP
from tests.sdk.helpers import Stack, wait_batch


def _result(client: Client, task_id: str) -> Any:
    def done() -> tuple[Any] | None:
        try:
            return (client.get_result(task_id),)
        except TaskPending:
            return None

    return wait_until(done, 30, f"result of {task_id}")[0]


def test_register_run_and_get_result(client: Client, stack: Stack) -> None:
    def power(base: int, exp: int = 2) -> int:
        return int(base**exp)

    function_id = client.register_function(power, description="powers")
    record = client.get_function(function_id)
    assert record["function_name"] == "power" and record["description"] == "powers"
    task_id = client.run(3, endpoint_id=stack.endpoint_id, function_id=function_id, exp=4)
    assert _result(client, task_id) == 81
    task = client.get_task(task_id)
    assert task["state"] == "success" and task["worker"]["python"]
    assert client.delete_function(function_id)["deleted"] is True
    with pytest.raises(NotFound, match="register it first"):
        client.get_function(function_id)


def test_get_result_pending_then_remote_exception(client: Client, stack: Stack, tmp_path: Path) -> None:
    gate = tmp_path / "gate"

    def wait_then_fail(path: str) -> None:
        import os
        import time

        deadline = time.time() + 30
        while not os.path.exists(path) and time.time() < deadline:
            time.sleep(0.01)
        raise KeyError("missing key")

    function_id = client.register_function(wait_then_fail)
    task_id = client.run(str(gate), endpoint_id=stack.endpoint_id, function_id=function_id)
    with pytest.raises(TaskPending) as pending:
        client.get_result(task_id)
    assert pending.value.task_id == task_id
    assert pending.value.state in ("waiting-for-endpoint", "running")
    gate.touch()
    wait_until(lambda: client.get_task(task_id)["state"] == "failed", 30, "task failed")
    with pytest.raises(KeyError, match="missing key"):
        client.get_result(task_id)


def test_batch_run_and_get_batch_result(client: Client, stack: Stack) -> None:
    def invert(x: float) -> float:
        return 1 / x

    function_id = client.register_function(invert)
    batch = client.create_batch()
    for x in (1, 2, 0, 4):
        batch.add(function_id, args=(x,))
    submitted = client.batch_run(stack.endpoint_id, batch)
    task_ids = submitted["task_ids"]
    assert submitted["tasks"] == {function_id: task_ids}
    assert client.get_task_group(submitted["task_group_id"]) == task_ids

    results = wait_batch(client, task_ids)
    assert [results[t].get("result") for t in task_ids] == [1.0, 0.5, None, 0.25]
    assert isinstance(results[task_ids[2]]["exception"], ZeroDivisionError)
    assert results[task_ids[0]]["status"] == "success" and results[task_ids[0]]["completion_t"]
    with pytest.raises(ValueError, match="empty"):
        client.batch_run(stack.endpoint_id, client.create_batch())
    with pytest.raises(TypeError, match="register the function first"):
        batch.add(invert, args=(1,))  # type: ignore[arg-type]


def test_large_batches_are_split_into_requests_of_one_group(client: Client, stack: Stack) -> None:
    def size(blob: bytes) -> int:
        return len(blob)

    function_id = client.register_function(size)
    batch = client.create_batch()
    n, nbytes = 40, 240_000  # each under INLINE_BYTES, so inline: 40 x 320 KB of base64
    for i in range(n):
        batch.add(function_id, args=(bytes(nbytes + i),))
    posts = []
    submit = client.submit_tasks

    def counting(*args: Any, **kwargs: Any) -> Any:
        posts.append(len(args[1]))
        return submit(*args, **kwargs)

    client.submit_tasks = counting  # type: ignore[method-assign]
    submitted = client.batch_run(stack.endpoint_id, batch)
    assert len(posts) >= 3 and sum(posts) == n
    assert client.get_task_group(submitted["task_group_id"]) == submitted["task_ids"]
    results = wait_batch(client, submitted["task_ids"], 60)
    assert [results[t]["result"] for t in submitted["task_ids"]] == [nbytes + i for i in range(n)]


def test_split_batch_bounds_count_and_bytes() -> None:
    specs = [TaskSpec(function_id="f", args="x" * 1000) for _ in range(10)]
    assert [len(c) for c in split_batch(specs, max_tasks=4)] == [4, 4, 2]
    assert [len(c) for c in split_batch(specs, max_tasks=100, max_bytes=2500)] == [2] * 5
    assert [len(c) for c in split_batch(specs[:1], max_tasks=100, max_bytes=10)] == [1]


def test_endpoints_and_their_status(client: Client, stack: Stack) -> None:
    listed = {e["endpoint_id"]: e for e in client.get_endpoints()}
    assert listed[stack.endpoint_id]["status"] == "online"
    status = client.get_endpoint_status(stack.endpoint_id)
    assert status["status"] == "online" and status["workers"] == 4 and status["engine"] == "ThreadPoolEngine"
    with pytest.raises(NotFound):
        client.get_endpoint_status("00000000-0000-0000-0000-000000000000")


def test_wrong_token_is_an_authentication_error(stack: Stack) -> None:
    bad = Client(broker_url=stack.broker.url, token="fcu_wrong")
    with pytest.raises(AuthenticationError) as info:
        bad.get_endpoints()
    assert info.value.status == 401 and "token" in str(info.value)


def test_requests_are_retried_through_a_503() -> None:
    broker = StubHTTP((503, {"error": "unavailable", "message": "later"}), (200, {"endpoints": []}))
    try:
        c = Client(broker_url=broker.url, token="fcu_t", retry_seconds=10)
        assert c.get_endpoints() == []
        assert [(m, p, h["Authorization"]) for m, p, h, _ in broker.requests] == [
            ("GET", "/v1/endpoints", "Bearer fcu_t")
        ] * 2
    finally:
        broker.close()


def test_a_submission_sent_again_after_a_503_keeps_its_request_id() -> None:
    """The broker may have created the tasks before its answer was lost: the retry names the
    same request, so the broker answers with those tasks instead of creating more."""
    answer = {"task_group_id": "g1", "task_ids": ["t1"]}
    broker = StubHTTP((503, {"error": "unavailable", "message": "later"}), (200, answer),
                      (200, answer))
    try:
        c = Client(broker_url=broker.url, token="fcu_t", retry_seconds=10)
        spec = TaskSpec(function_id="f1", args="A")
        assert c.submit_tasks("e1", [spec]).task_ids == ["t1"]
        c.submit_tasks("e1", [spec])
        first, again, next_one = (json.loads(b)["request_id"] for _, _, _, b in broker.requests)
        assert first == again and len(first) >= 16
        assert next_one != first, "a new submission is a new request"
    finally:
        broker.close()


def test_unreachable_broker_is_a_clear_error() -> None:
    from harness.procs import free_port

    c = Client(broker_url=f"http://127.0.0.1:{free_port()}", token="fcu_t", retry_seconds=0)
    with pytest.raises(BrokerError, match="cannot reach the broker"):
        c.get_endpoints()



def _stub_client(*replies: tuple[int, Any]) -> tuple[Client, StubHTTP]:
    broker = StubHTTP(*replies)
    return Client(broker_url=broker.url, token="fcu_t", retry_seconds=0), broker


def _bodies(broker: StubHTTP) -> list[tuple[str, str, Any]]:
    return [(m, p, json.loads(b) if b else None) for m, p, _, b in broker.requests]


def test_cancel_sends_the_ids_and_returns_the_answer() -> None:
    answer = {"cancelled": ["a"], "unchanged": {"b": "success", "c": "not_found"}}
    client, broker = _stub_client((200, answer), (200, {"cancelled": [], "unchanged": {"d": "running"}}),
                                  (200, answer))
    try:
        assert client.cancel(["a", "b", "c", "a"]) == answer
        assert client.cancel("d", only_queued=True) == {"cancelled": [], "unchanged": {"d": "running"}}
        assert client.cancel([]) == {"cancelled": [], "unchanged": {}}
        assert _bodies(broker) == [
            ("POST", "/v1/tasks/cancel", {"task_ids": ["a", "b", "c"]}),
            ("POST", "/v1/tasks/cancel", {"task_ids": ["d"], "only_queued": True}),
        ]
    finally:
        broker.close()


def test_cancel_goes_in_requests_of_ten_thousand_ids() -> None:
    ids = [f"t{i}" for i in range(10_001)]
    client, broker = _stub_client(
        (200, {"cancelled": ids[:10_000], "unchanged": {}}),
        (200, {"cancelled": [], "unchanged": {"t10000": "failed"}}),
    )
    try:
        assert client.cancel(ids) == {"cancelled": ids[:10_000], "unchanged": {"t10000": "failed"}}
        assert [len(body["task_ids"]) for _, _, body in _bodies(broker)] == [10_000, 1]
    finally:
        broker.close()


def test_a_cancelled_task_raises_cancelled_error_naming_it() -> None:
    record = {"task_id": "t9", "task_group_id": "g", "endpoint_id": "e", "function_id": "f",
              "state": "cancelled", "transitions": {"cancelled": 2.0}, "completed_at": 2.0,
              "submitter": None, "worker": None, "data": None, "error": "cancelled by its owner",
              "attempts": [{"at": 1.0, "error": "WorkerLost"}], "warnings": None}
    client, broker = _stub_client((200, record), (200, {"tasks": {"t9": record}}))
    try:
        with pytest.raises(CancelledError, match="task t9 was cancelled"):
            client.get_result("t9")
        entry = client.get_batch_result(["t9"])["t9"]
        assert entry["pending"] is False and entry["status"] == "cancelled"
        assert isinstance(entry["exception"], CancelledError) and "t9" in str(entry["exception"])
    finally:
        broker.close()


def test_walltime_and_max_retries_go_with_run_and_batch_run() -> None:
    submitted = {"task_group_id": "g", "task_ids": ["t1"]}
    client, broker = _stub_client((200, submitted), (200, {"task_group_id": "g", "task_ids": ["t2", "t3"]}))
    try:
        client.run(1, endpoint_id="e", function_id="f", walltime=5, max_retries=2, b=3)
        batch = client.create_batch(walltime=1.5, max_retries=1)
        batch.add("f", (1,))
        batch.add("f", (2,), walltime=9, max_retries=0)
        client.batch_run("e", batch)
        tasks = [t for _, _, body in _bodies(broker) for t in body["tasks"]]
        assert [(t["walltime"], t["max_retries"]) for t in tasks] == [(5.0, 2), (1.5, 1), (9.0, 0)]
    finally:
        broker.close()


@pytest.mark.parametrize("options, message", [
    ({"walltime": 0}, "walltime must be a number of seconds above 0"),
    ({"walltime": -1.0}, "walltime must be"),
    ({"walltime": float("nan")}, "walltime must be"),
    ({"walltime": "60"}, "walltime must be"),
    ({"walltime": 10**9}, "at most"),
    ({"max_retries": -1}, "max_retries must be a whole number from 0"),
    ({"max_retries": 1.5}, "max_retries must be"),
    ({"max_retries": 1000}, "max_retries must be"),
])
def test_bad_walltime_or_max_retries_fail_at_once(options: dict[str, Any], message: str) -> None:
    from harness.procs import free_port

    # Nothing listens there: a request would fail with BrokerError, not ValueError.
    client = Client(broker_url=f"http://127.0.0.1:{free_port()}", token="fcu_t", retry_seconds=0)
    with pytest.raises(ValueError, match=message):
        client.create_batch(**options)
    with pytest.raises(ValueError, match=message):
        client.create_batch().add("f", (1,), **options)
    with pytest.raises(ValueError, match=message):
        client.run(1, endpoint_id="e", function_id="f", **options)
    with pytest.raises(ValueError, match=message):
        Executor(endpoint_id="e", client=client, **options)
