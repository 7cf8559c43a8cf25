"""Size-safe results: frames stay under the broker's limit, a result too big fails alone."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from farcall.endpoint.agent import DEFAULT_MAX_FRAME_BYTES, ResultTooLarge, _results_frame
from farcall.endpoint.embedded import BackgroundAgent
from farcall.endpoint.worker import failed_result
from farcall.protocol.channel import ResultsFrame, TaskMessage, parse_endpoint_frame
from tests.endpoint.fake_broker import FakeBroker
from tests.endpoint.helpers import make_task, value_of

MiB = 1 << 20


def blob(n: int, seed: int = 0) -> str:
    """Task body: a string of ``n`` characters."""
    return chr(97 + seed % 26) * n


def enforce(broker: FakeBroker, max_size: int | None) -> None:
    """Make the broker close with 1009 on any frame over ``max_size`` bytes (restarts it)."""
    broker.stop_server()
    broker.max_size = max_size
    broker.start_server()


def result_sizes(broker: FakeBroker, connection: int | None = None) -> list[int]:
    return [size for n, kind, size in broker.sizes
            if kind == "results" and (connection is None or n == connection)]


def test_a_hand_built_results_frame_is_a_results_frame() -> None:
    results = [failed_result("t1", ValueError("x")), failed_result("t2", KeyError("y"))]
    frame = _results_frame([r.model_dump_json().encode() for r in results], 7)
    assert parse_endpoint_frame(frame) == ResultsFrame(results=results, credit=7)
    assert parse_endpoint_frame(_results_frame([], 3)) == ResultsFrame(results=[], credit=3)


def test_a_50_mib_result_fails_with_its_size_and_the_limit_and_the_next_task_runs(
    broker: FakeBroker, start_agent: Callable[..., BackgroundAgent]
) -> None:
    enforce(broker, DEFAULT_MAX_FRAME_BYTES)  # the broker says nothing, and reads 16 MiB
    start_agent()
    big, small = make_task(blob, 50 * MiB), make_task(blob, 10)
    broker.send_tasks([big])
    broker.send_tasks([small])
    broker.wait(lambda: broker.result_ids() >= {big.task_id, small.task_id}, 60, "both results")
    results = {r.task_id: r for r in broker.results()}
    assert value_of(results[small.task_id]) == "a" * 10
    with pytest.raises(ResultTooLarge) as caught:
        value_of(results[big.task_id])
    message = str(caught.value)
    assert f"task {big.task_id} is " in message
    size = int(message.split(" is ")[1].split(" bytes")[0])
    assert size > 50 * MiB
    assert f"over the limit of {DEFAULT_MAX_FRAME_BYTES} bytes (16.0 MiB)" in message
    assert "return less data, or write it to shared storage and return its path" in message
    assert results[big.task_id].started_at is not None
    assert broker.connections == 1  # never refused, never reconnected
    assert max(result_sizes(broker)) < DEFAULT_MAX_FRAME_BYTES


def test_results_are_packed_under_the_limit_the_broker_says(
    broker: FakeBroker, start_agent: Callable[..., BackgroundAgent]
) -> None:
    broker.max_frame_bytes = MiB
    enforce(broker, MiB)
    start_agent()
    tasks = [make_task(blob, 300_000, i) for i in range(12)]
    broker.send_tasks(tasks)
    broker.wait(lambda: len(broker.result_ids()) == 12, 60, "12 results")
    results = {r.task_id: r for r in broker.results()}
    assert [value_of(results[t.task_id]) for t in tasks] == [blob(300_000, i) for i in range(12)]
    assert broker.connections == 1
    assert max(result_sizes(broker)) <= MiB


def _twelve_unacked_results(
    broker: FakeBroker, start_agent: Callable[..., BackgroundAgent]
) -> tuple[list[TaskMessage], set[str]]:
    """An agent holding 12 results of 300 kB that the broker has received and not acked."""
    broker.auto_ack = False
    start_agent()
    tasks = [make_task(blob, 300_000, i) for i in range(12)]
    ids = {t.task_id for t in tasks}
    broker.send_tasks(tasks)
    broker.wait(lambda: broker.result_ids(1) == ids, 60, "12 results on connection 1")
    return tasks, ids


def test_unacked_results_are_resent_in_pieces_under_a_smaller_limit(
    broker: FakeBroker, start_agent: Callable[..., BackgroundAgent]
) -> None:
    tasks, ids = _twelve_unacked_results(broker, start_agent)
    broker.max_frame_bytes = MiB  # the broker restarts with a smaller limit
    broker.drop()
    broker.wait(lambda: broker.result_ids(2) == ids, 60, "12 results resent on connection 2")
    sizes = result_sizes(broker, 2)
    assert len(sizes) >= 5 and max(sizes) <= MiB, sizes  # 4.8 MB in frames of at most 1 MiB
    results = {r.task_id: r for r in broker.results(2)}
    assert [value_of(results[t.task_id]) for t in tasks] == [blob(300_000, i) for i in range(12)]
    broker.ack(sorted(ids))


def test_a_frame_refused_with_1009_is_not_sent_again_but_split(
    broker: FakeBroker, start_agent: Callable[..., BackgroundAgent]
) -> None:
    tasks, ids = _twelve_unacked_results(broker, start_agent)
    # The broker comes back reading 1 MiB at most but says nothing: the agent's first resend
    # (4.8 MB in one frame, under the 16 MiB default) is refused with 1009.
    broker.auto_ack = True
    enforce(broker, MiB)
    broker.wait(lambda: broker.connections >= 2 and broker.result_ids(broker.connections) == ids,
                60, "12 results resent on one connection")
    assert broker.connections <= 5, "each 1009 must at least halve the frames"
    assert max(result_sizes(broker, broker.connections)) <= MiB
    results = {r.task_id: r for r in broker.results(broker.connections)}
    assert [value_of(results[t.task_id]) for t in tasks] == [blob(300_000, i) for i in range(12)]


def test_a_result_refused_alone_with_1009_fails_and_the_next_task_runs(
    broker: FakeBroker, start_agent: Callable[..., BackgroundAgent]
) -> None:
    enforce(broker, MiB)  # the broker reads 1 MiB but says nothing
    start_agent()
    big = make_task(blob, 3 * MiB // 2)
    broker.send_tasks([big])
    broker.wait(lambda: big.task_id in broker.result_ids(), 30, "the big task's result")
    assert broker.connections == 2  # refused once, then failed instead of sent again
    with pytest.raises(ResultTooLarge, match=rf"task {big.task_id} is \d+ bytes .* over the limit"):
        value_of(broker.results()[0])
    small = make_task(blob, 10)
    broker.send_tasks([small])
    broker.wait(lambda: small.task_id in broker.result_ids(), 30, "the next result")
    assert value_of(broker.results()[-1]) == "a" * 10
    assert broker.connections == 2
