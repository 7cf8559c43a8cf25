"""Outcome: a pushed result and a polled task record decode the same way; cancel_future."""

from __future__ import annotations

import json
import threading
from concurrent.futures import CancelledError, Future, as_completed, wait
from typing import Any

import pytest

from farcall.errors import DeserializationError, FarcallError, TaskTimeout
from farcall.outcome import Outcome, cancel_future, outcome_of
from farcall.protocol.common import TaskState, Versions
from farcall.protocol.stream import ResultStreamFrame, TaskResult, parse_stream_frame
from farcall.serialize import serialize, serialize_exception
from harness.procs import wait_until


def _both(task_id: str, state: TaskState, data: str, error: str = "", worker: Any = None) -> list[Outcome]:
    """The outcome of one finished task, pushed and polled."""
    record = {"task_id": task_id, "state": str(state), "data": data, "error": error, "worker": worker}
    pushed = TaskResult(task_id=task_id, state=state, data=data, error=error,
                        worker=Versions.model_validate(worker) if worker else None)
    return [outcome_of(pushed), outcome_of(record)]


def test_a_return_value_unwraps_and_settles() -> None:
    for outcome in _both("t1", TaskState.SUCCESS, serialize({"answer": 42})):
        assert outcome == Outcome(True, {"answer": 42})
        assert outcome.unwrap() == {"answer": 42}
        future: Future[Any] = Future()
        outcome.settle(future)
        assert future.result(0) == {"answer": 42}


def test_a_remote_exception_is_raised_and_set() -> None:
    try:
        raise LookupError("no such row")
    except LookupError as e:
        data, text = serialize_exception(e)
    for outcome in _both("t2", TaskState.FAILED, data, text):
        assert not outcome.ok and isinstance(outcome.value, LookupError)
        with pytest.raises(LookupError, match="no such row"):
            outcome.unwrap()
        future: Future[Any] = Future()
        outcome.settle(future)
        assert isinstance(future.exception(0), LookupError)


def test_undecodable_result_names_both_sides_versions() -> None:
    worker = {"python": "3.99.0", "dill": "9.9"}
    for ok, error, _ in _both("t", TaskState.SUCCESS, "10\nbm90IGRpbGw=", worker=worker):
        assert not ok and isinstance(error, DeserializationError)
        text = str(error)
        assert "task t " in text and "3.99.0" in text and "dill 9.9" in text
        assert "submitter: Python 3." in text and "same Python, dill and cloudpickle versions" in text
        assert error.__cause__ is not None


def test_a_cancelled_task_reads_as_cancelled_error() -> None:
    for outcome in _both("t3", TaskState.CANCELLED, "", "cancelled by its owner"):
        assert not outcome.ok and outcome.cancelled and isinstance(outcome.value, CancelledError)
        assert str(outcome.value) == "task t3 was cancelled (cancelled by its owner)"
        with pytest.raises(CancelledError, match="task t3"):
            outcome.unwrap()
        future: Future[Any] = Future()
        heard: list[Future[Any]] = []
        future.add_done_callback(heard.append)
        outcome.settle(future)
        assert future.cancelled() and heard == [future]
        with pytest.raises(CancelledError):
            future.result(0)
    polled = outcome_of({"task_id": "t4", "state": "cancelled", "data": None, "error": None})
    assert polled.cancelled and str(polled.value) == "task t4 was cancelled"


def test_a_task_that_raised_cancelled_error_failed_and_was_not_cancelled() -> None:
    data, text = serialize_exception(CancelledError("inner"))
    for outcome in _both("t5", TaskState.FAILED, data, text):
        assert not outcome.cancelled
        future: Future[Any] = Future()
        outcome.settle(future)
        assert not future.cancelled() and isinstance(future.exception(0), CancelledError)


def test_a_walltime_exceeded_round_trips_as_task_timeout() -> None:
    data, text = serialize_exception(TaskTimeout("task t6 ran past its walltime of 5 s"))
    for outcome in _both("t6", TaskState.FAILED, data, text):
        future: Future[Any] = Future()
        outcome.settle(future)
        error = future.exception(0)
        assert isinstance(error, TaskTimeout) and isinstance(error, TimeoutError)
        assert isinstance(error, FarcallError) and "walltime of 5 s" in str(error)
        with pytest.raises(TimeoutError, match="walltime"):
            future.result(0)


def test_fields_this_version_does_not_use_are_ignored() -> None:
    attempts = [{"at": 1.0, "error": "WorkerLost: the worker process died"}]
    frame = json.dumps({"type": "results", "results": [{
        "task_id": "t7", "state": "success", "data": serialize(7), "attempts": attempts,
        "from_the_future": {"x": 1}}]})
    parsed = parse_stream_frame(frame)
    assert isinstance(parsed, ResultStreamFrame)
    assert outcome_of(parsed.results[0]) == Outcome(True, 7)
    record = {"task_id": "t7", "state": "success", "data": serialize(7), "error": None,
              "attempts": attempts, "transitions": {"success": 2.0}, "warnings": None, "new": 1}
    assert outcome_of(record) == Outcome(True, 7)


def test_a_result_for_a_future_already_cancelled_is_ignored() -> None:
    future: Future[Any] = Future()
    assert future.cancel()
    Outcome(True, 1).settle(future)
    Outcome(False, KeyError("k")).settle(future)
    assert future.cancelled()


def test_cancel_future_makes_wait_and_as_completed_return() -> None:
    pending: Future[Any] = Future()
    running: Future[Any] = Future()
    assert running.set_running_or_notify_cancel()
    finished: Future[Any] = Future()
    finished.set_result(3)
    futures = [pending, running, finished]
    heard: list[Future[Any]] = []
    for f in futures:
        f.add_done_callback(heard.append)
    heard.clear()  # the finished future called back at once
    waited: list[Any] = []
    streamed: list[Future[Any]] = []
    waiter = threading.Thread(target=lambda: waited.append(wait(futures, timeout=30)))
    completer = threading.Thread(target=lambda: streamed.extend(as_completed(futures, timeout=30)))
    waiter.start()
    completer.start()
    wait_until(lambda: len(running._waiters) == 2, 10, "both waiters installed")

    assert cancel_future(running, running=False) is False and not running.done()
    assert cancel_future(pending) and cancel_future(running)
    assert not cancel_future(finished)
    waiter.join(30)
    completer.join(30)
    assert waited[0].done == set(futures) and not waited[0].not_done
    assert set(streamed) == set(futures)
    assert heard == [pending, running]
    assert cancel_future(pending) and heard == [pending, running]  # again: True, no second callback


def test_cancel_future_completes_a_future_cancelled_the_stdlib_way() -> None:
    future: Future[Any] = Future()
    heard: list[Future[Any]] = []
    future.add_done_callback(heard.append)
    assert future.cancel()  # CANCELLED: not yet done for wait()
    assert not wait([future], timeout=0).done
    assert cancel_future(future)
    assert wait([future], timeout=0).done == {future} and heard == [future]
