"""Outcome: a pushed result and a polled task record decode the same way."""

from __future__ import annotations

from concurrent.futures import Future
from typing import Any

import pytest

from farcall.errors import DeserializationError
from farcall.messages import TaskResult, TaskState, Versions
from farcall.outcome import Outcome, outcome_of
from farcall.serialize import serialize, serialize_exception


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
    for ok, error in _both("t", TaskState.SUCCESS, "10\nbm90IGRpbGw=", worker=worker):
        assert not ok and isinstance(error, DeserializationError)
        text = str(error)
        assert "task t " in text and "3.99.0" in text and "dill 9.9" in text
        assert "submitter: Python 3." in text and "same Python and dill versions" in text
        assert error.__cause__ is not None
