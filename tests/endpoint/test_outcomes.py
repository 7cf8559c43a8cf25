"""A task's failure as a result: the same shape from the worker, the engines and the agent."""

from __future__ import annotations

import pytest

from farcall.endpoint.outcomes import WORKER_VERSIONS, failed_result, walltime_exceeded
from farcall.errors import TaskTimeout
from farcall.protocol.common import TaskState
from tests.endpoint.helpers import value_of


def test_a_failed_result_carries_the_error_its_text_and_the_versions() -> None:
    result = failed_result("t1", KeyError("missing"), started_at=5.0)
    assert result.task_id == "t1" and result.state == TaskState.FAILED
    assert result.started_at == 5.0 and result.finished_at is not None and result.finished_at > 5
    assert "KeyError" in result.error and "missing" in result.error
    assert result.worker == WORKER_VERSIONS
    with pytest.raises(KeyError, match="missing"):
        value_of(result)
    assert failed_result("t2", ValueError("x"), finished_at=7.0).finished_at == 7.0


def test_a_walltime_exceeded_names_the_task_the_walltime_and_what_to_do() -> None:
    error = walltime_exceeded("t1", 2.5)
    assert isinstance(error, TaskTimeout)
    assert str(error) == ("task t1 ran past its walltime of 2.5 s and was stopped; "
                          "raise walltime= or make the task shorter")
