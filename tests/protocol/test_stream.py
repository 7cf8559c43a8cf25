"""The client stream: results pushed to the SDK, batches submitted on the same socket."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from farcall.protocol.channel import ResultMessage
from farcall.protocol.common import Attempt, TaskState, Versions
from farcall.protocol.rest import BatchSubmission, BatchSubmitted, TaskSpec
from farcall.protocol.stream import (
    RequestFailedFrame,
    ResultStreamFrame,
    SubmitFrame,
    SubmittedFrame,
    TaskResult,
    parse_stream_frame,
)

WORKER = Versions(python="3.11.9", dill="0.4.1", cloudpickle="3.1.3", farcall="0.1.0")


def test_each_frame_the_broker_pushes_reads_by_its_type() -> None:
    results = ResultStreamFrame(results=[TaskResult(task_id="t1", state=TaskState.SUCCESS, data="11\nSwQu")])
    submitted = SubmittedFrame(request_id=4, task_group_id="g", task_ids=["t1"])
    failed = RequestFailedFrame(request_id=5, status=429, error="rate_limited", message="wait",
                                retry_after=0.25)
    for frame in (results, submitted, failed):
        assert parse_stream_frame(frame.model_dump_json()) == frame


def test_a_submitted_frame_answers_as_post_tasks_does() -> None:
    assert isinstance(SubmittedFrame(request_id=1, task_group_id="g", task_ids=[]), BatchSubmitted)


def test_a_client_frame_is_not_read_as_a_broker_frame() -> None:
    batch = BatchSubmission(endpoint_id="e", tasks=[TaskSpec(function_id="f", args="11\n")])
    submit = SubmitFrame(request_id=1, batch=batch).model_dump_json()
    assert SubmitFrame.model_validate_json(submit).batch == batch
    with pytest.raises(ValidationError, match="does not match any of the expected tags"):
        parse_stream_frame(submit)


def test_a_stored_result_is_what_the_client_sees() -> None:
    result = ResultMessage(task_id="t1", state=TaskState.FAILED, data="20\nAAAA", error="boom",
                           worker=WORKER, attempts=[Attempt(at=1.0, error="WorkerLost")])
    seen = TaskResult.stored(result, completed_at=2.5)
    assert seen == TaskResult(task_id="t1", state=TaskState.FAILED, data="20\nAAAA", error="boom",
                              completed_at=2.5, worker=WORKER, attempts=[Attempt(at=1.0, error="WorkerLost")])
    again = TaskResult.stored(result.model_copy(update={"attempts": []}), completed_at=2.5)
    assert again.attempts is None, "no attempts: left out of the frame, not an empty list"
    assert parse_stream_frame(ResultStreamFrame(results=[seen]).model_dump_json()) == \
        ResultStreamFrame(results=[seen])


def test_a_task_the_broker_ended_has_no_data_and_no_worker() -> None:
    ended = TaskResult.ended_by_broker("t1", TaskState.CANCELLED, "cancelled by its owner", 3.0)
    assert ended == TaskResult(task_id="t1", state=TaskState.CANCELLED, error="cancelled by its owner",
                               completed_at=3.0)
