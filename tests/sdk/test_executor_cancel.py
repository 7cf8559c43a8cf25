"""TaskFuture.cancel and cancelled tasks, against a broker faked at the SDK's seams.

The fake (tests/sdk/fake_broker.py) lets each test decide when a batch is sent,
when a task starts and what the broker answers to ``POST /v1/tasks/cancel``; the
last test goes through the embedded broker.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import CancelledError, Future, as_completed, wait
from typing import Any

import pytest

from farcall import Client, Executor, TaskFuture
from farcall.errors import BrokerError
from farcall.serialize import unpack_args
from harness.procs import wait_until
from tests.sdk.fake_broker import FakeBroker
from tests.sdk.helpers import Stack


def ident(x: int) -> int:
    return x


def sent(*futures: TaskFuture) -> list[str]:
    """The futures' task ids, once each task has been sent (fails at the deadline)."""
    wait_until(lambda: all(f.task_id for f in futures), 10, "tasks sent")
    return [str(f.task_id) for f in futures]


def executor(fake: FakeBroker, **kwargs: Any) -> Executor:
    return Executor(endpoint_id="endpoint-1", client=fake.client(), **kwargs)


def test_a_task_cancelled_before_it_is_sent_is_never_sent(fake: FakeBroker) -> None:
    fake.hold.clear()
    ex = executor(fake)
    first = ex.submit(ident, 1)
    assert fake.posting.wait(10)  # the first batch is in flight, held by the broker
    second, third = ex.submit(ident, 2), ex.submit(ident, 3)
    heard: list[Future[Any]] = []
    second.add_done_callback(heard.append)

    assert second.cancel() is True
    assert second.cancelled() and second.done() and heard == [second]
    assert wait([second], timeout=0).done == {second}  # done for wait() at once, not when skipped
    with pytest.raises(CancelledError):
        second.result(timeout=0)
    assert second.cancel() is True and heard == [second]  # again: same answer, callbacks once

    fake.hold.set()
    first_id, third_id = sent(first, third)
    assert [unpack_args(t["args"]) for t in fake.submitted.values()] == [((1,), {}), ((3,), {})]
    assert second.task_id is None and fake.calls("/tasks/cancel") == []
    fake.finish(first_id, 1)
    fake.finish(third_id, 3)
    ex.shutdown()
    assert (first.result(0), third.result(0)) == (1, 3)


@pytest.mark.parametrize("pushed", [True, False], ids=["result-pushed-too", "answer-only"])
def test_a_queued_task_is_cancelled_by_the_broker(fake: FakeBroker, pushed: bool) -> None:
    fake.push_cancelled = pushed
    ex = executor(fake)
    futures = [ex.submit(ident, i) for i in range(3)]
    ids = sent(*futures)
    heard: list[Future[Any]] = []
    futures[1].add_done_callback(heard.append)

    assert futures[1].cancel() is True
    assert fake.calls("/tasks/cancel") == [{"task_ids": [ids[1]], "only_queued": True}]
    assert futures[1].cancelled() and heard == [futures[1]]
    with pytest.raises(CancelledError):
        futures[1].result(timeout=0)
    assert not futures[0].done() and not futures[2].done()

    fake.finish(ids[0], 0)
    fake.finish(ids[2], 2)
    done, not_done = wait(futures, timeout=10)
    assert done == set(futures) and not not_done
    assert set(as_completed(futures, timeout=10)) == set(futures)
    fake.finish(ids[1], "late", push=True)  # a stray result for the cancelled task changes nothing
    assert futures[1].cancelled()
    ex.shutdown()  # nothing outstanding: returns


def test_a_started_task_is_not_cancelled(fake: FakeBroker) -> None:
    ex = executor(fake)
    future = ex.submit(ident, 7)
    (task_id,) = sent(future)
    fake.start(task_id)

    assert future.cancel() is False
    assert fake.calls("/tasks/cancel") == [{"task_ids": [task_id], "only_queued": True}]
    assert not future.cancelled() and future.running()
    fake.finish(task_id, 7)
    assert future.result(timeout=10) == 7
    assert future.cancel() is False  # finished: answered here, no request
    assert len(fake.calls("/tasks/cancel")) == 1
    ex.shutdown()


def test_a_finished_task_is_not_cancelled(fake: FakeBroker) -> None:
    ex = executor(fake)
    future = ex.submit(ident, 5)
    (task_id,) = sent(future)
    fake.finish(task_id, 5, push=False)  # finished at the broker; the result not here yet

    assert future.cancel() is False
    assert not future.done()
    fake.streams[0].poll()
    assert future.result(timeout=10) == 5
    ex.shutdown()


def test_cancel_never_raises_when_the_broker_fails(
    fake: FakeBroker, caplog: pytest.LogCaptureFixture
) -> None:
    fake.cancel_error = BrokerError(500, "the store is down")
    ex = executor(fake)
    future = ex.submit(ident, 1)
    (task_id,) = sent(future)

    with caplog.at_level(logging.WARNING, logger="farcall.executor"):
        assert future.cancel() is False
    assert "could not cancel 1 task(s)" in caplog.text and "the store is down" in caplog.text
    assert not future.done()
    fake.finish(task_id, 1)
    assert future.result(timeout=10) == 1
    ex.shutdown()


def test_cancel_of_a_task_being_sent_waits_for_its_id(fake: FakeBroker) -> None:
    fake.hold.clear()
    ex = executor(fake)
    future = ex.submit(ident, 1)
    assert fake.posting.wait(10) and future.running()  # handed to the broker, no id yet
    answers: list[bool] = []
    canceller = threading.Thread(target=lambda: answers.append(future.cancel()))
    canceller.start()
    fake.hold.set()
    canceller.join(30)

    assert answers == [True] and future.cancelled()
    assert fake.calls("/tasks/cancel") == [{"task_ids": [future.task_id], "only_queued": True}]
    ex.shutdown()


def test_tasks_cancelled_elsewhere_cancel_their_futures_pushed_or_polled(fake: FakeBroker) -> None:
    ex = executor(fake)
    futures = [ex.submit(ident, i) for i in range(4)]
    ids = sent(*futures)
    other = fake.client()

    assert other.cancel(ids[0]) == {"cancelled": [ids[0]], "unchanged": {}}  # result pushed
    fake.push_cancelled = False
    fake.start(ids[1])
    assert other.cancel([ids[1]]) == {"cancelled": [ids[1]], "unchanged": {}}  # running: stopped too
    assert not futures[1].done()
    fake.streams[0].poll()  # as after a reconnect: the cancelled record is polled
    fake.finish(ids[2], 2)
    fake.finish(ids[3], 3)

    assert set(as_completed(futures, timeout=10)) == set(futures)
    assert [f.cancelled() for f in futures] == [True, True, False, False]
    for f in futures[:2]:
        with pytest.raises(CancelledError):
            f.result(timeout=0)
    assert [f.result(0) for f in futures[2:]] == [2, 3]
    ex.shutdown()


def test_map_stopped_early_cancels_the_rest_in_one_request(fake: FakeBroker) -> None:
    ex = executor(fake)
    results = ex.map(ident, range(5))
    wait_until(lambda: len(ex._outstanding) == 5, 10, "the map's tasks sent")
    ids = list(fake.submitted)
    fake.finish(ids[0], 0)
    assert next(results) == 0
    fake.start(ids[1])

    results.close()  # the caller stops iterating: the calls not done are cancelled
    (body,) = fake.calls("/tasks/cancel")
    assert sorted(body["task_ids"]) == sorted(ids[1:]) and body["only_queued"] is True
    assert [fake.records[t]["state"] for t in ids] == ["success", "running"] + ["cancelled"] * 3
    fake.finish(ids[1], 1)
    ex.shutdown()  # the started task's result came; the cancelled ones are no longer awaited


def test_map_past_its_timeout_raises_and_cancels_every_call(fake: FakeBroker) -> None:
    ex = executor(fake)
    results = ex.map(ident, range(3), timeout=0)
    with pytest.raises(TimeoutError):
        next(results)
    # Each call was cancelled here (not sent yet) or by the broker (sent, still queued).
    assert all(r["state"] == "cancelled" for r in fake.records.values())
    assert not ex._outstanding
    ex.shutdown()
    assert len(fake.calls("/tasks/cancel")) <= 1


def test_cancel_through_the_embedded_broker(stack: Stack, client: Client) -> None:
    idle = client.register_endpoint("never-started")["endpoint_id"]  # its tasks stay queued
    try:
        with Executor(endpoint_id=idle, client=client) as ex:
            futures = [ex.submit(ident, i) for i in range(3)]
            ids = sent(*futures)
            assert futures[0].cancel() is True and futures[0].cancelled()
            answer = client.cancel(ids[1:])
            assert sorted(answer["cancelled"]) == sorted(ids[1:]) and answer["unchanged"] == {}
            assert set(as_completed(futures, timeout=30)) == set(futures)  # pushed on the stream
            assert all(f.cancelled() for f in futures)
        with pytest.raises(CancelledError, match=f"task {ids[0]} was cancelled"):
            client.get_result(ids[0])
        assert {e["status"] for e in client.get_batch_result(ids).values()} == {"cancelled"}
        assert client.cancel(ids[0]) == {"cancelled": [], "unchanged": {ids[0]: "cancelled"}}
        assert futures[1].cancel() is True  # already cancelled: no change
    finally:
        client.delete_endpoint(idle)
