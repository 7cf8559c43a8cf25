"""Big arguments and results on the real broker and endpoint: the data plane end to end, and
the size errors (a task or a result over ``FARCALL_MAX_TASK_BYTES``) failing only their task."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

from farcall import Client, Executor
from farcall.endpoint.errors import ResultTooLarge
from farcall.errors import TaskPending, TaskTooLarge
from farcall.serialize import INLINE_BYTES, is_ref, pack
from harness.procs import wait_until
from tests.integration.helpers import Broker, Endpoint, own_broker

MB = 1 << 20
LIMIT = 8 * MB


@dataclass
class Stage:
    client: Client
    endpoint_id: str


@pytest.fixture(scope="module")
def big(make_module_endpoint: Callable[..., Endpoint], broker: Broker, token: str) -> Iterator[Stage]:
    """An endpoint on the session's broker (its limit: the default 1 GiB)."""
    with Client(broker_url=broker.url, token=token) as client:
        ep = make_module_endpoint("big-data")
        yield Stage(client, ep.start(client))


@pytest.fixture(scope="module")
def limited(service_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stage]:
    """A broker of its own taking at most 8 MiB per task, with a one-worker endpoint."""
    logs = tmp_path_factory.mktemp("big-data-limited")
    with own_broker(service_env, logs, "limited-data",
                    settings={"FARCALL_MAX_TASK_BYTES": str(LIMIT)}) as b:
        token = b.create_user(f"data-{uuid.uuid4().hex[:6]}")
        ep = Endpoint("limited", dict(b.env, FARCALL_HOME=str(logs / "home"),
                                      FARCALL_BROKER_URL=b.url, FARCALL_TOKEN=token))
        ep.configure("ProcessPoolEngine", 1, b.url)
        with Client(broker_url=b.url, token=token) as client:
            try:
                yield Stage(client, ep.start(client))
            finally:
                ep.stop()


def _result(client: Client, task_id: str, timeout: float = 60) -> Any:
    def done() -> tuple[Any] | None:
        try:
            return (client.get_result(task_id),)
        except TaskPending:
            return None

    return wait_until(done, timeout, f"the result of {task_id}")[0]


def test_a_50_mb_array_goes_and_comes_back_through_the_executor(big: Stage) -> None:
    def double(a: Any) -> Any:
        return a * 2

    array = np.random.default_rng(11).random(50 * MB // 8)
    with Executor(endpoint_id=big.endpoint_id, client=big.client) as ex:
        future = ex.submit(double, array)
        small = ex.submit(double, 21)
        back = future.result(timeout=120)
        assert small.result(timeout=60) == 42
    assert back.shape == array.shape and np.array_equal(back, array * 2)
    record = big.client.get_task(str(future.task_id))
    assert is_ref(record["data"]) and len(record["data"]) < 200  # the record stays small


def test_client_run_and_get_result_with_a_big_result(big: Stage) -> None:
    def ramp(n: int, step: float = 1.0) -> Any:
        import numpy

        return numpy.arange(n) * step

    function_id = big.client.register_function(ramp)
    n = 5_000_000  # 40 MB
    task_id = big.client.run(n, endpoint_id=big.endpoint_id, function_id=function_id, step=0.5)
    np.testing.assert_array_equal(_result(big.client, task_id), np.arange(n) * 0.5)
    entry = big.client.get_batch_result([task_id])[task_id]
    np.testing.assert_array_equal(entry["result"], np.arange(n) * 0.5)

    arg = np.ones(3 * MB // 8)  # arguments over INLINE_BYTES go as a blob through run too
    task_id = big.client.run(len(arg), endpoint_id=big.endpoint_id, function_id=function_id,
                             step=float(arg.sum()))
    assert _result(big.client, task_id).shape == (len(arg),)


def test_an_over_limit_task_fails_alone_and_the_rest_of_the_batch_runs(limited: Stage) -> None:
    def total(a: Any) -> float:
        return float(a.sum()) if hasattr(a, "sum") else float(a)

    too_big = np.ones(10 * MB // 8)
    size = pack(((too_big,), {})).nbytes
    with Executor(endpoint_id=limited.endpoint_id, client=limited.client, batch_size=64) as ex:
        futures = [ex.submit(total, i) for i in range(10)]
        blob = ex.submit(total, np.ones(3 * MB // 8))  # over INLINE_BYTES, under the limit
        refused = ex.submit(total, too_big)
        futures += [ex.submit(total, i) for i in range(10, 20)]
        with pytest.raises(TaskTooLarge) as caught:
            refused.result(timeout=60)
        assert [f.result(timeout=60) for f in futures] == [float(i) for i in range(20)]
        assert blob.result(timeout=60) == float(3 * MB // 8)
    error = caught.value
    assert (error.size, error.limit) == (size, LIMIT) and refused.task_id is None
    message = str(error)
    assert f"{size:,} bytes" in message and f"{LIMIT:,} bytes" in message
    assert "raise FARCALL_MAX_TASK_BYTES on the broker" in message
    assert "fewer tasks" not in message


def test_an_over_limit_result_fails_its_task_and_the_endpoint_carries_on(limited: Stage) -> None:
    def payload(n: int) -> bytes:
        return b"r" * n

    with Executor(endpoint_id=limited.endpoint_id, client=limited.client) as ex:
        with pytest.raises(ResultTooLarge) as caught:
            ex.submit(payload, 10 * MB).result(timeout=60)
        message = str(caught.value)
        assert f"{LIMIT:,} bytes" in message and "10,485," in message
        assert "raise FARCALL_MAX_TASK_BYTES on the broker" in message
        assert ex.submit(payload, 5).result(timeout=60) == b"rrrrr"
        assert ex.submit(payload, 2 * INLINE_BYTES).result(timeout=60) == b"r" * (2 * INLINE_BYTES)


def test_a_small_result_stays_in_the_task_record(big: Stage) -> None:
    """A result under INLINE_BYTES stays in the task record, as before the data plane."""
    def echo(x: Any) -> Any:
        return x

    with Executor(endpoint_id=big.endpoint_id, client=big.client) as ex:
        future = ex.submit(echo, b"s" * 1000)
        assert future.result(timeout=60) == b"s" * 1000
    assert not is_ref(big.client.get_task(str(future.task_id))["data"])
