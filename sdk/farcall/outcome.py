"""``Outcome``: what a finished task came to, decoded here and nowhere else.

A result reaches the SDK two ways, pushed on the result stream
(:class:`~farcall.protocol.stream.TaskResult`) or polled as a REST task record (a
dict); both decode through :func:`outcome_of`, so a return value, a remote
exception, a cancelled task and a result that cannot be loaded here read the
same either way. :func:`cancel_future` is the one way a future is put in the
cancelled state, whether the user cancelled it or the broker says so.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from concurrent.futures import CancelledError, Future, InvalidStateError
from concurrent.futures._base import CANCELLED, CANCELLED_AND_NOTIFIED, FINISHED, RUNNING
from typing import Any, NamedTuple

from farcall.errors import DeserializationError
from farcall.protocol.common import SAME_VERSIONS, TaskState, versions_text
from farcall.protocol.stream import TaskResult
from farcall.serialize import deserialize, is_ref, rebuild_exception, unpack_blob
from farcall.version import local_versions

log = logging.getLogger(__name__)

Fetch = Callable[[str], bytes | bytearray | memoryview]
"""Downloads the blob a reference payload names (``Client.download_blob``)."""


class Outcome(NamedTuple):
    """``ok`` and the task's return value, or not ``ok`` and the exception it stands for.

    ``cancelled``: the task was cancelled (``value`` is a ``CancelledError`` naming it), as
    opposed to a task that failed by raising ``CancelledError`` itself.
    """

    ok: bool
    value: Any
    cancelled: bool = False

    def unwrap(self) -> Any:
        """The return value; raises the exception instead when the task failed or was cancelled."""
        if self.ok:
            return self.value
        raise self.value

    def settle(self, future: Future[Any]) -> None:
        """Resolve ``future`` with the return value or the exception, or cancel it.

        A future that is already done (cancelled by its user while the result was on its
        way) is left as it is.
        """
        if self.cancelled:
            cancel_future(future, reason=str(self.value))
            return
        try:
            if self.ok:
                future.set_result(self.value)
            else:
                future.set_exception(self.value)
        except InvalidStateError:
            log.debug("a result came for a future already done (%r); ignored", future)


def cancel_future(future: Future[Any], *, running: bool = True, reason: str = "") -> bool:
    """Put ``future`` in the cancelled state at once; True if it is cancelled (now or before).

    Unlike ``Future.cancel`` this also cancels a RUNNING future (unless ``running`` is
    False): for a farcall future, RUNNING means sent to the broker, which may still cancel
    the task. The state is CANCELLED_AND_NOTIFIED, the one ``concurrent.futures.wait`` and
    ``as_completed`` count as done, and their waiters hear of it now, as an executor's
    ``set_running_or_notify_cancel`` would tell them; ``result()`` raises
    ``CancelledError`` and done-callbacks run (once), in the caller's thread. A future with a
    ``cancel_reason`` (the Executor's ``TaskFuture``) keeps ``reason``, the broker's word on why,
    for the ``CancelledError`` it raises.
    """
    with future._condition:
        state = future._state
        if state == FINISHED or (state == RUNNING and not running):
            return False
        if state == CANCELLED_AND_NOTIFIED:
            return True
        if reason and hasattr(future, "cancel_reason"):
            future.cancel_reason = reason
        future._state = CANCELLED_AND_NOTIFIED
        for waiter in future._waiters:
            waiter.add_cancelled(future)
        future._condition.notify_all()
    if state != CANCELLED:  # a CANCELLED future already ran its callbacks
        future._invoke_callbacks()  # type: ignore[attr-defined]
    return True


def outcome_of(result: TaskResult | Mapping[str, Any], fetch: Fetch | None = None) -> Outcome:
    """The outcome of a finished task, pushed or polled (keys ``task_id``, ``state``, ``data``, ...).

    A result too big to travel inline is a reference (``serialize.is_ref``): ``fetch`` gets
    its blob (a download, so callers keep it off threads that must not block); an error it
    raises (the blob expired...) is the outcome. Fields this version does not use
    (``attempts``, ``transitions``, ...) are ignored.
    """
    if isinstance(result, TaskResult):
        task_id, state, data = result.task_id, result.state, result.data
        error, worker = result.error, result.worker
    else:
        task_id, state, data = result.get("task_id", ""), result["state"], result.get("data") or ""
        error, worker = result.get("error") or "", result.get("worker")
    if state == TaskState.SUCCESS and is_ref(data):
        return _referenced(task_id, worker, data, fetch)
    if state == TaskState.SUCCESS:
        try:
            return Outcome(True, deserialize(data))
        except Exception as e:  # noqa: BLE001 - whatever dill raises, say which versions differ
            return Outcome(False, _undecodable(task_id, worker, e))
    if state == TaskState.CANCELLED:
        return Outcome(False, _cancelled(task_id, error), cancelled=True)
    return Outcome(False, rebuild_exception(data, error, task_id))


def needs_fetch(result: TaskResult | Mapping[str, Any]) -> bool:
    """True for a successful result that is a reference: ``outcome_of`` will download it."""
    if isinstance(result, TaskResult):
        return result.state == TaskState.SUCCESS and is_ref(result.data)
    return result.get("state") == TaskState.SUCCESS and is_ref(result.get("data") or "")


def _referenced(task_id: str, worker: Any, ref: str, fetch: Fetch | None) -> Outcome:
    if fetch is None:
        return Outcome(False, DeserializationError(
            f"the result of task {task_id} is a data-plane reference and nothing was given to "
            "download it; read it with Client.get_result or an Executor"))
    try:
        blob = fetch(ref)
    except Exception as e:  # noqa: BLE001 - expired, unreachable...: the task's outcome says so
        return Outcome(False, e)
    try:
        return Outcome(True, unpack_blob(blob))
    except Exception as e:  # noqa: BLE001 - whatever unpickling raises, say which versions differ
        return Outcome(False, _undecodable(task_id, worker, e))


def _cancelled(task_id: str, error: str) -> CancelledError:
    why = error.strip().splitlines()[-1] if error.strip() else ""
    return CancelledError(f"task {task_id} was cancelled" + (f" ({why})" if why else ""))


def _undecodable(task_id: str, worker: Any, cause: BaseException) -> DeserializationError:
    err = DeserializationError(
        f"the result of task {task_id} cannot be loaded here ({type(cause).__name__}: {cause}). "
        f"{versions_text(local_versions(), worker)} (this side is the submitter); {SAME_VERSIONS}, "
        "and make every module the result's types come from importable here."
    )
    err.__cause__ = cause
    return err
