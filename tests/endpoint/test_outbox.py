"""The outbox: results held until acked, in frames capped by count and bytes, resent after a
reconnect; a result too big for any frame fails alone with ``ResultTooLarge``.

The unit tests drive an ``Outbox`` alone; the ones with a fake broker check the same
limits through a running agent, against a broker that closes with 1009.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from farcall.endpoint import outbox as outbox_module
from farcall.endpoint.embedded import BackgroundAgent
from farcall.endpoint.errors import ResultTooLarge
from farcall.endpoint.outbox import (
    DEFAULT_MAX_FRAME_BYTES,
    MIN_FRAME_BYTES,
    Outbox,
    results_frame,
)
from farcall.endpoint.outcomes import failed_result
from farcall.protocol.channel import (
    Credit,
    ResultMessage,
    ResultsFrame,
    RunningFrame,
    TaskMessage,
    parse_endpoint_frame,
)
from farcall.protocol.common import TaskState
from tests.endpoint.fake_broker import FakeBroker
from tests.endpoint.helpers import make_task, value_of

MiB = 1 << 20

Frame = Credit | RunningFrame | ResultsFrame


def blob(n: int, seed: int = 0) -> str:
    """Task body: a string of ``n`` characters."""
    return chr(97 + seed % 26) * n


def result(task_id: str, size: int = 10) -> ResultMessage:
    return ResultMessage(task_id=task_id, state=TaskState.SUCCESS, data="x" * size,
                         started_at=1.0, finished_at=2.0)


def put(outbox: Outbox, *results: ResultMessage) -> None:
    outbox.put([(r.task_id, outbox.encode(r)) for r in results])


def flush(outbox: Outbox, credit: int = 0) -> list[tuple[int, Frame]]:
    """What one flush sends: (bytes, frame) each; ``credit`` is owed once."""
    sent: list[bytes] = []
    owed = iter([credit])

    async def send(frame: bytes) -> None:
        sent.append(frame)

    asyncio.run(outbox.flush(send, lambda: next(owed, 0)))
    frames = []
    for raw in sent:
        frame = parse_endpoint_frame(raw)
        assert isinstance(frame, Credit | RunningFrame | ResultsFrame)
        frames.append((len(raw), frame))
    return frames


def results_of(frames: list[tuple[int, Frame]]) -> list[ResultMessage]:
    return [r for _, f in frames if isinstance(f, ResultsFrame) for r in f.results]


def test_a_hand_built_results_frame_is_a_results_frame() -> None:
    results = [failed_result("t1", ValueError("x")), failed_result("t2", KeyError("y"))]
    frame = results_frame([r.model_dump_json().encode() for r in results], 7)
    assert parse_endpoint_frame(frame) == ResultsFrame(results=results, credit=7)
    assert parse_endpoint_frame(results_frame([], 3)) == ResultsFrame(results=[], credit=3)


def test_a_tiny_frame_limit_splits_results_and_fails_one_too_big_for_any_frame() -> None:
    outbox = Outbox()
    outbox.open_session(4096)
    small = [result(f"s{i}", 900) for i in range(8)]
    big = result("big", 5000)
    put(outbox, small[0], big, *small[1:])
    frames = flush(outbox, credit=5)
    assert len(frames) >= 3 and all(size <= 4096 for size, _ in frames)
    sent = results_of(frames)
    assert [r.task_id for r in sent] == ["s0", "big", *(f"s{i}" for i in range(1, 8))]
    assert sent[0] == small[0]
    with pytest.raises(ResultTooLarge, match=r"task big is \d+ bytes .* over the limit of 4096 bytes"):
        value_of(sent[1])
    assert (sent[1].started_at, sent[1].finished_at) == (1.0, 2.0)
    credits = [f.credit for _, f in frames if isinstance(f, ResultsFrame)]
    assert credits == [0] * (len(frames) - 1) + [5]  # the credit rides on the last frame
    assert outbox.held == 9 and outbox.queued == 0


def test_frames_are_capped_by_count_too() -> None:
    outbox = Outbox(max_batch=3)
    outbox.open_session(0)
    assert outbox.frame_limit == DEFAULT_MAX_FRAME_BYTES
    put(outbox, *(result(f"t{i}") for i in range(7)))
    frames = flush(outbox)
    assert [len(f.results) for _, f in frames if isinstance(f, ResultsFrame)] == [3, 3, 1]


def test_without_results_the_credit_owed_goes_alone_and_nothing_goes_without_credit() -> None:
    outbox = Outbox()
    assert [f for _, f in flush(outbox, credit=4)] == [Credit(n=4)]
    assert flush(outbox) == []


def test_held_results_are_resent_on_a_new_session_until_acked() -> None:
    outbox = Outbox()
    outbox.open_session(0)
    put(outbox, result("a"), result("b"), result("c"))
    assert [r.task_id for r in results_of(flush(outbox))] == ["a", "b", "c"]
    assert flush(outbox) == []  # sent once per session
    outbox.acked(["b", "never-sent"])
    assert outbox.open_session(0) == 2
    assert sorted(outbox.held_ids()) == ["a", "c"]
    assert [r.task_id for r in results_of(flush(outbox))] == ["a", "c"]
    assert all(outbox.holds(t) for t in "abc")  # b: acked, remembered
    assert not outbox.holds("d")


def test_acked_ids_are_remembered_up_to_recent_ids(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(outbox_module, "RECENT_IDS", 3)
    outbox = Outbox()
    put(outbox, *(result(f"t{i}") for i in range(5)))
    outbox.acked([f"t{i}" for i in range(5)])
    assert outbox.held == 0
    assert [outbox.holds(f"t{i}") for i in range(5)] == [False, False, True, True, True]


def test_after_a_1009_close_frames_halve_and_a_result_that_no_longer_fits_fails() -> None:
    outbox = Outbox()
    outbox.open_session(0)
    put(outbox, *(result(f"t{i}", 100_000) for i in range(3)))
    (first,) = flush(outbox)  # 300 kB in one frame, refused by the broker
    outbox.shrink()
    outbox.open_session(0)  # the broker says nothing: the cap stays
    assert outbox.frame_limit == first[0] // 2
    frames = flush(outbox)
    assert len(frames) == 3 and all(size <= first[0] // 2 for size, _ in frames)
    assert [r.data for r in results_of(frames)] == ["x" * 100_000] * 3

    outbox.shrink()  # refused again: halved, but never under MIN_FRAME_BYTES
    outbox.open_session(8 * MiB)
    assert outbox.frame_limit == MIN_FRAME_BYTES
    frames = flush(outbox)
    assert all(size <= MIN_FRAME_BYTES for size, _ in frames)
    for sent in results_of(frames):  # each held result refit as its failure
        with pytest.raises(ResultTooLarge, match=rf"task {sent.task_id} is \d+ bytes"):
            value_of(sent)


def test_running_reports_go_first_split_under_the_limit_and_a_result_drops_its_own() -> None:
    outbox = Outbox()
    outbox.open_session(4096)
    ids = [f"{i:04d}".ljust(32, "x") for i in range(200)]  # about 9 kB of reports
    outbox.running_reports.update({task_id: 1000.0 + i for i, task_id in enumerate(ids)})
    put(outbox, result(ids[0]))  # finished before its report went: the result says it
    frames = flush(outbox)
    running = [f for _, f in frames if isinstance(f, RunningFrame)]
    assert len(running) >= 3 and all(size <= 4096 for size, f in frames)
    assert isinstance(frames[-1][1], ResultsFrame) and len(running) == len(frames) - 1
    reported = {k: v for f in running for k, v in f.started.items()}
    assert reported == {task_id: 1000.0 + i for i, task_id in enumerate(ids) if i}
    assert outbox.running_reports == {}


def test_an_answer_is_held_as_a_failed_result() -> None:
    outbox = Outbox()
    outbox.answer("t1", ValueError("no such thing"))
    assert outbox.holds("t1") and outbox.held == 1
    (sent,) = results_of(flush(outbox))
    with pytest.raises(ValueError, match="no such thing"):
        value_of(sent)


# ------------------------------------------------------------------ through the agent


def enforce(broker: FakeBroker, max_size: int | None) -> None:
    """Make the broker close with 1009 on any frame over ``max_size`` bytes (restarts it)."""
    broker.stop_server()
    broker.max_size = max_size
    broker.start_server()


def result_sizes(broker: FakeBroker, connection: int | None = None) -> list[int]:
    return [size for n, kind, size in broker.sizes
            if kind == "results" and (connection is None or n == connection)]


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
