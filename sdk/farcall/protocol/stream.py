"""The client stream: the WebSocket on which the broker pushes a task group's results to the SDK,
and the SDK submits batches (``SubmitFrame``, answered by ``SubmittedFrame`` or
``RequestFailedFrame``)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from farcall.protocol.channel import ResultMessage
from farcall.protocol.common import Attempt, Message, TaskState, Versions, as_bytes
from farcall.protocol.rest import BatchSubmission, BatchSubmitted


class TaskResult(Message):
    """A finished task as the client sees it (pushed on the result stream)."""

    task_id: str
    state: TaskState
    data: str = ""
    error: str = ""
    completed_at: float | None = None
    worker: Versions | None = None
    attempts: list[Attempt] | None = None

    @classmethod
    def ended_by_broker(cls, task_id: str, state: TaskState, error: str, at: float) -> TaskResult:
        """A task the broker itself ended (failed or cancelled): no data, no worker."""
        return cls.model_construct(task_id=task_id, state=state, data="", error=error,
                                   completed_at=at, worker=None, attempts=None)

    @classmethod
    def stored(cls, result: ResultMessage, completed_at: float) -> TaskResult:
        """What the client sees of ``result`` once the broker stored it at ``completed_at``."""
        return cls.model_construct(
            task_id=result.task_id,
            state=TaskState(result.state),
            data=result.data,
            error=result.error,
            completed_at=completed_at,
            worker=result.worker,
            attempts=result.attempts or None,
        )


class ResultStreamFrame(Message):
    type: Literal["results"] = "results"
    results: list[TaskResult]


class SubmitFrame(Message):
    """Client -> broker on the result stream: a batch, as ``POST /v1/tasks`` takes it.

    Saves an HTTP request per batch; the answer is a ``SubmittedFrame`` or a
    ``RequestFailedFrame`` with the same ``request_id``.
    """

    type: Literal["submit"] = "submit"
    request_id: int
    batch: BatchSubmission


class SubmittedFrame(BatchSubmitted):
    type: Literal["submitted"] = "submitted"
    request_id: int


class RequestFailedFrame(Message):
    """The broker refused a ``SubmitFrame``: the HTTP status and error body it would have sent."""

    type: Literal["failed"] = "failed"
    request_id: int
    status: int
    error: str
    message: str
    retry_after: float | None = Field(
        default=None, description="with status 429: seconds to wait before sending it again")


StreamFrame = Annotated[
    ResultStreamFrame | SubmittedFrame | RequestFailedFrame, Field(discriminator="type")
]


class _StreamFrameBox(Message):
    frame: StreamFrame


def parse_stream_frame(raw: str | bytes) -> ResultStreamFrame | SubmittedFrame | RequestFailedFrame:
    """Parse a frame the broker sends on a result stream."""
    return _StreamFrameBox.model_validate_json(b'{"frame":' + as_bytes(raw) + b"}").frame
