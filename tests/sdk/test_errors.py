"""The error names Globus Compute programs catch, and remote exceptions that are both their own
type and ``TaskExecutionFailed`` (``errors.as_task_failure``)."""

from __future__ import annotations

import pickle
import traceback

import pytest

from farcall import errors
from farcall.errors import (
    ComputeError,
    DeserializationError,
    FarcallError,
    MaxResultSizeExceeded,
    SerdeError,
    SerializationError,
    TaskExecutionFailed,
    TaskPending,
    VersionMismatch,
    as_task_failure,
)


def raised(exc: BaseException) -> BaseException:
    try:
        raise exc
    except BaseException as e:  # noqa: BLE001 - the test wants it with a traceback
        return e


class WithFields(Exception):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def test_globus_compute_names_are_farcalls_nearest() -> None:
    assert ComputeError is FarcallError and SerdeError is SerializationError
    assert issubclass(DeserializationError, SerdeError)
    assert issubclass(VersionMismatch, ComputeError) and issubclass(TaskPending, ComputeError)
    assert VersionMismatch("the broker runs 2.0").version_message == "the broker runs 2.0"
    assert TaskPending("t1", "running").reason == "running"
    assert SerializationError("cannot").reason == "cannot"
    assert set(errors.__dict__) >= {"ComputeError", "TaskExecutionFailed", "MaxResultSizeExceeded",
                                    "SerdeError", "SerializationError", "DeserializationError",
                                    "TaskPending", "VersionMismatch"}


def test_the_endpoints_result_too_large_is_max_result_size_exceeded() -> None:
    from farcall.endpoint.errors import ResultTooLarge

    assert issubclass(ResultTooLarge, MaxResultSizeExceeded)


@pytest.mark.parametrize("exc", [
    ValueError("plain"), KeyError("key"), FileNotFoundError(2, "No such file", "/no/such"),
    WithFields("with a field", 7), UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"),
    StopIteration(3), errors.TaskTimeout("past its walltime"),
])
def test_a_remote_exception_is_its_own_type_and_task_execution_failed(exc: Exception) -> None:
    original = raised(exc)
    both = as_task_failure(original, "Traceback ...\nValueError: plain\n", "task-1")
    assert isinstance(both, type(exc)) and isinstance(both, TaskExecutionFailed)
    assert (type(both).__name__, type(both).__module__) == (type(exc).__name__, type(exc).__module__)
    assert (str(both), repr(both), both.args) == (str(original), repr(original), original.args)
    assert traceback.format_exception(both) == traceback.format_exception(original)
    assert (both.remote_data, both.task_id) == ("Traceback ...\nValueError: plain\n", "task-1")
    assert vars(original).items() <= vars(both).items()  # its own fields are kept
    back = pickle.loads(pickle.dumps(both)) if not isinstance(exc, WithFields) else None
    if back is not None:
        assert type(back) is type(exc) and str(back) == str(original)
        assert not hasattr(back, "remote_traceback") or isinstance(exc, TaskExecutionFailed)


def test_catching_by_either_name() -> None:
    both = as_task_failure(raised(ZeroDivisionError("division by zero")), "tb", "t")
    with pytest.raises(ZeroDivisionError):
        raise both
    with pytest.raises(TaskExecutionFailed):
        raise both


def test_what_is_left_as_it_is() -> None:
    for exc in (SystemExit(2), KeyboardInterrupt(), TaskExecutionFailed("text only", "tb", "t")):
        assert as_task_failure(exc) is exc


def test_reraise_raises_the_exception_itself() -> None:
    failed = TaskExecutionFailed("boom", "Traceback: boom", "t9")
    with pytest.raises(TaskExecutionFailed) as info:
        failed.reraise()
    assert info.value is failed and failed.remote_data == "Traceback: boom"
