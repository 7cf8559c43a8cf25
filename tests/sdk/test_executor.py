"""Executor: futures, batching, one registration per function, shutdown, a lost result stream."""

from __future__ import annotations

import threading
from concurrent.futures import FIRST_EXCEPTION, as_completed, wait
from pathlib import Path
from typing import Any

import pytest
from websockets.sync.client import ClientConnection

import farcall.stream
from farcall import Client, Executor
from farcall.errors import ExecutorShutdown, NotFound, SerializationError
from harness.procs import wait_until
from tests.sdk.fake_broker import FakeBroker
from tests.sdk.helpers import Stack


class CountingClient(Client):
    """Records registrations and HTTP submissions; ``hold`` blocks submissions until set."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.registered = 0
        self.posts: list[int] = []  # batch sizes, however they were sent
        self.http_posts = 0
        self.hold = threading.Event()
        self.hold.set()
        self.posting = threading.Event()

    def register_function_payload(self, *args: Any, **kwargs: Any) -> str:
        self.registered += 1
        return super().register_function_payload(*args, **kwargs)

    def submit_tasks(self, endpoint_id: str, tasks: Any, task_group_id: str | None = None,
                     request_id: str | None = None,
                     user_endpoint_config: dict[str, Any] | None = None) -> Any:
        self.http_posts += 1
        return super().submit_tasks(endpoint_id, tasks, task_group_id, request_id,
                                    user_endpoint_config)


class CountingExecutor(Executor):
    """Sends every batch through the CountingClient's gate."""

    client: CountingClient

    def _submit(self, chunk: Any, config: dict[str, Any] | None = None) -> Any:
        self.client.posting.set()
        assert self.client.hold.wait(30)
        self.client.posts.append(len(chunk))
        return super()._submit(chunk, config)


def stream_connection(ex: Executor) -> ClientConnection:
    """The WebSocket the Executor's result stream holds now."""
    assert ex._stream is not None
    ws = ex._stream._ws
    assert ws is not None, "the result stream is not connected"
    return ws


@pytest.fixture
def counting(stack: Stack) -> CountingClient:
    return CountingClient(broker_url=stack.broker.url, token=stack.token)


def test_submit_wait_and_as_completed(stack: Stack, client: Client) -> None:
    def cube(x: int) -> int:
        return x**3

    with Executor(endpoint_id=stack.endpoint_id, client=client) as ex:
        futures = [ex.submit(cube, i) for i in range(100)]
        done, not_done = wait(futures, timeout=30, return_when=FIRST_EXCEPTION)
        assert not not_done
        values = sorted(f.result() for f in as_completed(futures, timeout=30))
        assert values == sorted(i**3 for i in range(100))
        ids = {f.task_id for f in futures}
        assert None not in ids
        assert ex.task_group_id and set(client.get_task_group(ex.task_group_id)) == ids


def test_batches_and_registers_each_function_once(stack: Stack, counting: CountingClient) -> None:
    def inc(x: int) -> int:
        return x + 1

    counting.hold.clear()
    with CountingExecutor(endpoint_id=stack.endpoint_id, client=counting, batch_size=50) as ex:
        futures = [ex.submit(inc, 0)]
        assert counting.posting.wait(10)  # the first batch is in flight and held
        futures += [ex.submit(inc, i) for i in range(1, 200)]
        counting.hold.set()
        assert [f.result(timeout=30) for f in futures] == [1] + [i + 1 for i in range(1, 200)]
    assert counting.posts == [1, 50, 50, 50, 49]
    assert counting.registered == 1
    assert counting.http_posts == 0  # every batch went on the result stream


def test_map_preserves_order_and_registered_functions_run(stack: Stack, client: Client) -> None:
    def pair(a: int, b: str) -> str:
        return f"{b}{a}"

    with Executor(endpoint_id=stack.endpoint_id, client=client, batch_size=7) as ex:
        assert list(ex.map(pair, range(30), "abc" * 10, timeout=30)) == [
            f"{'abc'[i % 3]}{i}" for i in range(30)
        ]
        function_id = client.register_function(pair)
        future = ex.submit_to_registered_function(function_id, args=(5,), kwargs={"b": "z"})
        assert future.result(timeout=30) == "z5"


def test_remote_exception_reraised_with_remote_frame(stack: Stack, client: Client) -> None:
    import traceback

    def fail_here(n: int) -> None:
        raise ArithmeticError(f"failed on {n}")

    with Executor(endpoint_id=stack.endpoint_id, client=client) as ex:
        with pytest.raises(ArithmeticError, match="failed on 3") as info:
            ex.submit(fail_here, 3).result(timeout=30)
    assert "fail_here" in "".join(traceback.format_exception(info.value))


def test_bad_input_fails_clearly(stack: Stack, client: Client) -> None:
    ex = Executor(endpoint_id=stack.endpoint_id, client=client)
    with pytest.raises(SerializationError, match="picklable"):
        ex.submit(print, (i for i in range(3)))
    with pytest.raises(ValueError, match="endpoint_id"):
        Executor(client=client).submit(print, 1)
    with pytest.raises(ValueError, match="batch_size"):
        Executor(endpoint_id=stack.endpoint_id, client=client, batch_size=0)
    ex.shutdown()
    with pytest.raises(ExecutorShutdown, match="shut down"):
        ex.submit(print, 1)

    nowhere = Executor(endpoint_id="00000000-0000-0000-0000-000000000000", client=client)
    error = nowhere.submit(print, 1).exception(timeout=30)
    assert isinstance(error, NotFound) and "endpoint" in str(error)
    nowhere.shutdown()


def test_shutdown_cancel_futures_cancels_unsent_tasks(stack: Stack, counting: CountingClient) -> None:
    def ident(x: int) -> int:
        return x

    counting.hold.clear()
    ex = CountingExecutor(endpoint_id=stack.endpoint_id, client=counting)
    first = ex.submit(ident, 1)
    assert counting.posting.wait(10)
    rest = [ex.submit(ident, i) for i in range(10)]
    ex.shutdown(wait=False, cancel_futures=True)
    assert all(f.cancelled() for f in rest)
    counting.hold.set()
    assert first.result(timeout=30) == 1
    assert counting.posts == [1]


def test_results_are_polled_when_the_stream_is_lost(
    stack: Stack, client: Client, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = tmp_path / "gate"

    def after_gate(path: str) -> str:
        import os
        import time

        deadline = time.time() + 30
        while not os.path.exists(path) and time.time() < deadline:
            time.sleep(0.01)
        return "polled"

    with Executor(endpoint_id=stack.endpoint_id, client=client) as ex:
        future = ex.submit(after_gate, str(gate))
        wait_until(lambda: future.task_id and client.get_task(future.task_id)["state"] == "running",
                   30, "running")
        # From now on the stream cannot reconnect: the result can only come from polling.
        def unreachable(*args: Any, **kwargs: Any) -> ClientConnection:
            raise ConnectionRefusedError("the broker cannot be reached in this test")

        monkeypatch.setattr(farcall.stream, "connect", unreachable)
        stream_connection(ex).close()
        gate.touch()
        assert future.result(timeout=30) == "polled"


def test_executor_reads_its_settings_from_the_environment(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FARCALL_BROKER_URL", stack.broker.url)
    monkeypatch.setenv("FARCALL_TOKEN", stack.token)
    with Executor(endpoint_id=stack.endpoint_id) as ex:
        assert ex.submit(pow, 2, 10).result(timeout=30) == 1024


def test_a_batch_whose_stream_answer_is_lost_goes_by_http(
    stack: Stack, counting: CountingClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    def twice(x: int) -> int:
        return 2 * x

    with Executor(endpoint_id=stack.endpoint_id, client=counting) as ex:
        assert ex.submit(twice, 1).result(timeout=30) == 2
        assert counting.http_posts == 0
        ws = stream_connection(ex)

        def drop(message: Any, *args: Any, **kwargs: Any) -> None:
            ws.close()  # the stream drops with the batch unanswered

        monkeypatch.setattr(ws, "send", drop)
        futures = [ex.submit(twice, i) for i in range(5)]
        assert [f.result(timeout=30) for f in futures] == [0, 2, 4, 6, 8]
    assert counting.http_posts >= 1


@pytest.mark.parametrize("options, sent", [
    ({}, (None, 0)),
    ({"walltime": 2.5, "max_retries": 3}, (2.5, 3)),
    ({"walltime": 60}, (60.0, 0)),
])
def test_walltime_and_max_retries_go_with_every_task(
    fake: FakeBroker, options: dict[str, Any], sent: tuple[float | None, int]
) -> None:
    with Executor(endpoint_id="endpoint-1", client=fake.client(), **options) as ex:
        futures = [ex.submit(pow, 2, i) for i in range(3)]
        wait_until(lambda: all(f.task_id for f in futures), 10, "tasks sent")
        for f in futures:
            fake.finish(str(f.task_id), "done")
    tasks = [t for body in fake.calls("/tasks") for t in body["tasks"]]
    assert [(t["walltime"], t["max_retries"]) for t in tasks] == [sent] * 3


def test_bad_options_fail_when_the_executor_is_made(fake: FakeBroker) -> None:
    client = fake.client()
    with pytest.raises(ValueError, match="walltime must be a number of seconds above 0"):
        Executor(endpoint_id="endpoint-1", client=client, walltime=0)
    with pytest.raises(ValueError, match="max_retries must be a whole number from 0"):
        Executor(endpoint_id="endpoint-1", client=client, max_retries=-1)
    deep: dict[str, Any] = {}
    for _ in range(40):
        deep = {"nested": deep}
    with pytest.raises(ValueError, match="nested deeper than"):
        Executor(endpoint_id="endpoint-1", client=client, resource_specification=deep)
    assert fake.requests == []
