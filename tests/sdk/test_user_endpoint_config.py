"""``user_endpoint_config`` in the SDK, against a broker faked at the SDK's seams: the Executor
sends each task with the value it had when the task was submitted and never mixes values in one
submission (by HTTP and on the result stream); ``Client.run`` and batches send it; values that
cannot be one are refused before anything is sent. The broker's side (schema checks, user
endpoints): tests/broker/test_user_endpoints.py, tests/integration/test_multi_user_broker.py."""

from __future__ import annotations

from typing import Any

import pytest

from farcall import Executor
from farcall.serialize import unpack_args
from harness.procs import wait_until
from tests.sdk.fake_broker import FakeBroker


def ident(x: int) -> int:
    return x


def sent_configs(fake: FakeBroker) -> list[tuple[Any, list[int]]]:
    """Each submission's ``user_endpoint_config`` and the argument of each of its tasks."""
    return [(body.get("user_endpoint_config"), [unpack_args(t["args"])[0][0] for t in body["tasks"]])
            for body in fake.calls("/tasks")]


@pytest.mark.parametrize("on_stream", [False, True])
def test_the_executor_sends_each_task_with_its_own_config_never_mixed(
    fake: FakeBroker, on_stream: bool
) -> None:
    fake.stream_submits = on_stream
    fake.hold.clear()
    config = {"account": "abc", "nodes": 1}
    ex = Executor(endpoint_id="site", client=fake.client(), user_endpoint_config=config)
    first = ex.submit(ident, 0)
    assert fake.posting.wait(10)  # the first batch is held: the rest accumulate behind it
    config["nodes"] = 2  # changed in place: only what is submitted from now on sees it
    futures = [ex.submit(ident, 1)]
    ex.user_endpoint_config = {"account": "xyz"}
    futures.append(ex.submit(ident, 2))
    ex.user_endpoint_config = None
    futures.append(ex.submit(ident, 3))
    ex.user_endpoint_config = {"nodes": 2, "account": "abc"}  # the same values as task 1's
    futures.append(ex.submit_to_registered_function("function-9", (4,)))
    fake.hold.set()
    wait_until(lambda: all(f.task_id for f in [first, *futures]), 10, "every task sent")

    assert sent_configs(fake) == [
        ({"account": "abc", "nodes": 1}, [0]),
        ({"account": "abc", "nodes": 2}, [1, 4]),
        ({"account": "xyz"}, [2]),
        (None, [3]),
    ]
    ex.shutdown(wait=False, cancel_futures=True)


def test_the_executors_config_is_checked_when_set(fake: FakeBroker) -> None:
    ex = Executor(endpoint_id="site", client=fake.client())
    assert ex.user_endpoint_config is None
    with pytest.raises(TypeError, match="user_endpoint_config must be a dict"):
        ex.user_endpoint_config = "account=abc"  # type: ignore[assignment]
    with pytest.raises(ValueError, match="only JSON values"):
        ex.user_endpoint_config = {"when": object()}
    with pytest.raises(ValueError, match="user_endpoint_config is nested deeper than 16 levels"):
        Executor(endpoint_id="site", client=fake.client(),
                 user_endpoint_config=_nested(20))
    with pytest.raises(ValueError, match="may not set local_uid, local_home: the multi-user"):
        ex.user_endpoint_config = {"account": "abc", "local_uid": 0, "local_home": "/root"}
    assert fake.calls("/tasks") == []
    ex.shutdown(wait=False)


def _nested(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for _ in range(depth):
        value = {"a": value}
    return value


def test_run_and_batches_send_the_config(fake: FakeBroker) -> None:
    client = fake.client()
    client.run(5, endpoint_id="site", function_id="f1", user_endpoint_config={"account": "abc"})
    batch = client.create_batch(user_endpoint_config={"partition": "debug"})
    batch.add("f1", (6,))
    batch.add("f1", (7,))
    client.batch_run("site", batch)
    client.run(8, endpoint_id="site", function_id="f1")
    assert sent_configs(fake) == [
        ({"account": "abc"}, [5]),
        ({"partition": "debug"}, [6, 7]),
        (None, [8]),
    ]
    with pytest.raises(TypeError, match="must be a dict"):
        client.create_batch(user_endpoint_config=["account"])  # type: ignore[arg-type]
