"""A task's failure as a result: the one shape shared by workers, engines and the agent.

Whoever answers a task without a value (the worker when the function raises, an engine
when a worker is lost or a walltime passes, the agent when it refuses a task) builds the
answer here, so every failed result carries the error the same way. Light to import:
worker processes load it.
"""

from __future__ import annotations

import time

from farcall.errors import TaskTimeout
from farcall.protocol.channel import ResultMessage
from farcall.protocol.common import TaskState, Versions
from farcall.serialize import serialize_exception
from farcall.version import local_versions

WORKER_VERSIONS = Versions(**local_versions())
"""This process's Python and serializer versions, carried by every result it makes."""


def failed_result(
    task_id: str,
    exc: BaseException,
    started_at: float | None = None,
    finished_at: float | None = None,
) -> ResultMessage:
    """A failed ``ResultMessage`` carrying ``exc`` (rebuildable by the caller) and its text."""
    data, text = serialize_exception(exc)
    return ResultMessage(
        task_id=task_id,
        state=TaskState.FAILED,
        data=data,
        error=text,
        started_at=started_at,
        finished_at=finished_at if finished_at is not None else time.time(),
        worker=WORKER_VERSIONS,
    )


def walltime_exceeded(task_id: str, walltime: float) -> TaskTimeout:
    """The error of a task stopped at its walltime, the same from the worker and the engine."""
    return TaskTimeout(
        f"task {task_id} ran past its walltime of {walltime:g} s and was stopped; "
        "raise walltime= or make the task shorter"
    )
