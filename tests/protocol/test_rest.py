"""The REST bodies' limits: what the broker refuses before it looks anything up."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from farcall.protocol.common import MAX_RETRIES, MAX_WALLTIME
from farcall.protocol.rest import (
    BatchSubmission,
    CancelRequest,
    EndpointRegistration,
    ShareRequest,
    TaskIds,
    TaskSpec,
)


@pytest.mark.parametrize(("fields", "says"), [
    ({"walltime": 0}, "greater than 0"),
    ({"walltime": MAX_WALLTIME + 1}, "less than or equal to"),
    ({"max_retries": MAX_RETRIES + 1}, "less than or equal to"),
    ({"result_format": "yaml"}, "'pickle' or 'json'"),
    ({"function_id": "f" * 65}, "at most 64 characters"),
    ({"function_id": ""}, "at least 1 character"),
])
def test_a_task_out_of_bounds_is_refused(fields: dict[str, Any], says: str) -> None:
    with pytest.raises(ValidationError, match=says):
        TaskSpec(**{"function_id": "f", "args": "11\nAAAA", **fields})


def test_a_batch_may_not_set_what_a_multi_user_endpoint_sets() -> None:
    """The broker answers 422 (before a user endpoint could refuse the task later)."""
    task = {"function_id": "f", "args": "11\nAAAA"}
    with pytest.raises(ValidationError, match="may not set local_user: the multi-user endpoint"):
        BatchSubmission.model_validate({"endpoint_id": "e", "tasks": [task],
                                        "user_endpoint_config": {"local_user": "root"}})


def test_a_batch_holds_at_least_one_task() -> None:
    with pytest.raises(ValidationError, match="at least 1 item"):
        BatchSubmission(endpoint_id="e", tasks=[])


def test_task_id_lists_are_bounded() -> None:
    assert len(TaskIds(task_ids=["t"] * 10_000).task_ids) == 10_000
    for model in (TaskIds, CancelRequest):
        with pytest.raises(ValidationError, match="at most 10000 items"):
            model(task_ids=["t"] * 10_001)
        with pytest.raises(ValidationError, match="at least 1 item"):
            model(task_ids=[])


def test_names_are_checked() -> None:
    assert ShareRequest(username="grace.hopper@example.org").username == "grace.hopper@example.org"
    with pytest.raises(ValidationError, match="should match pattern"):
        ShareRequest(username="grace hopper")
    with pytest.raises(ValidationError, match="at least 1 character"):
        EndpointRegistration(name="")
