"""``Outcome``: what a finished task came to, decoded here and nowhere else.

A result reaches the SDK two ways, pushed on the result stream
(:class:`~farcall.messages.TaskResult`) or polled as a REST task record (a
dict); both decode through :func:`outcome_of`, so a return value, a remote
exception and a result that cannot be loaded here read the same either way.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

from farcall.errors import DeserializationError
from farcall.messages import SAME_VERSIONS, TaskResult, TaskState, versions_text
from farcall.serialize import deserialize, rebuild_exception
from farcall.version import local_versions

if TYPE_CHECKING:
    from concurrent.futures import Future


class Outcome(NamedTuple):
    """``ok`` and the task's return value, or not ``ok`` and the exception it stands for."""

    ok: bool
    value: Any

    def unwrap(self) -> Any:
        """The return value; raises the exception instead when the task failed."""
        if self.ok:
            return self.value
        raise self.value

    def settle(self, future: Future[Any]) -> None:
        """Resolve ``future`` with the return value or the exception."""
        if self.ok:
            future.set_result(self.value)
        else:
            future.set_exception(self.value)


def outcome_of(result: TaskResult | Mapping[str, Any]) -> Outcome:
    """The outcome of a finished task, pushed or polled (keys ``task_id``, ``state``, ``data``, ...)."""
    if isinstance(result, TaskResult):
        task_id, state, data = result.task_id, result.state, result.data
        error, worker = result.error, result.worker
    else:
        task_id, state, data = result.get("task_id", ""), result["state"], result.get("data", "")
        error, worker = result.get("error", ""), result.get("worker")
    if state == TaskState.SUCCESS:
        try:
            return Outcome(True, deserialize(data))
        except Exception as e:  # noqa: BLE001 - whatever dill raises, say which versions differ
            return Outcome(False, _undecodable(task_id, worker, e))
    return Outcome(False, rebuild_exception(data, error, task_id))


def _undecodable(task_id: str, worker: Any, cause: BaseException) -> DeserializationError:
    err = DeserializationError(
        f"the result of task {task_id} cannot be loaded here ({type(cause).__name__}: {cause}). "
        f"{versions_text(local_versions(), worker)} (this side is the submitter); {SAME_VERSIONS}, "
        "and make every module the result's types come from importable here."
    )
    err.__cause__ = cause
    return err
