"""What runs inside a worker (thread, process, or Parsl worker): tasks in, results out.

This is the hot path. It imports only the SDK's serialization and message
modules, keeps deserialized functions in a small per-process LRU keyed by
``function_id``, and never raises: every failure becomes a failed result.
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from farcall.errors import DeserializationError
from farcall.messages import (
    SAME_VERSIONS,
    ResultMessage,
    TaskMessage,
    TaskState,
    Versions,
    dump_result_batch,
    parse_task_batch,
    versions_text,
)
from farcall.serialize import deserialize_function, serialize, serialize_exception, unpack_args
from farcall.version import local_versions

FUNCTION_CACHE_SIZE = 256

WORKER_VERSIONS = Versions(**local_versions())
_functions: OrderedDict[str, Callable[..., Any]] = OrderedDict()


def run_batch(payload: bytes | str) -> str:
    """Run a JSON array of ``TaskMessage`` in order; answer a JSON array of ``ResultMessage``.

    The one entry point for crossing a process boundary (the process pool's pipe,
    Parsl's ``submit_payload``): bytes in, a string out, nothing for the other side
    to pickle. Every element gets a result in its place, so results line up with
    tasks; a malformed one fails under its ``task_id`` when it has one.
    """
    try:
        tasks = parse_task_batch(payload)
    except Exception:  # noqa: BLE001 - answer element by element, below
        return dump_result_batch(_run_malformed(payload))
    return dump_result_batch([execute(task) for task in tasks])


def execute(task: TaskMessage, started: float | None = None) -> ResultMessage:
    """Run ``task`` in this thread and return its result; never raises."""
    if started is None:
        started = time.time()
    try:
        fn = _load_function(task)
        args, kwargs = unpack_args(task.args)
    except Exception as e:  # noqa: BLE001 - any loading failure is reported, with versions
        return failed_result(task.task_id, _deserialization_error(task, e), started_at=started)
    try:
        value = fn(*args, **kwargs)
    except (Exception, SystemExit) as e:
        # Drop this frame so the remote traceback starts in the user's function.
        tb = e.__traceback__
        return failed_result(
            task.task_id, e.with_traceback(tb.tb_next if tb else None), started_at=started
        )
    try:
        data = serialize(value)
    except Exception as e:  # noqa: BLE001 - an unpicklable return value fails the task clearly
        return failed_result(task.task_id, e, started_at=started)
    return ResultMessage(
        task_id=task.task_id,
        state=TaskState.SUCCESS,
        data=data,
        started_at=started,
        finished_at=time.time(),
        worker=WORKER_VERSIONS,
    )


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


def _load_function(task: TaskMessage) -> Callable[..., Any]:
    fn = _functions.get(task.function_id)
    if fn is not None:
        _functions.move_to_end(task.function_id)
        return fn
    fn = deserialize_function(task.function)
    _functions[task.function_id] = fn
    if len(_functions) > FUNCTION_CACHE_SIZE:
        _functions.popitem(last=False)
    return fn


def _deserialization_error(task: TaskMessage, cause: BaseException) -> DeserializationError:
    err = DeserializationError(
        f"the worker could not load the function or arguments of task {task.task_id}: "
        f"{type(cause).__name__}: {cause}. {versions_text(task.submitter, WORKER_VERSIONS)}; "
        f"{SAME_VERSIONS}, or serialize the function with the 'source' strategy and "
        "pass only plain-Python arguments."
    )
    err.__cause__ = cause
    return err


def _run_malformed(payload: bytes | str) -> list[ResultMessage]:
    """The slow path of ``run_batch``: validate each element alone, run the good ones."""
    started = time.time()
    try:
        found = json.loads(payload)
    except ValueError as e:
        return [failed_result("", e, started_at=started)]
    results = []
    for item in found if isinstance(found, list) else [found]:
        try:
            task = TaskMessage.model_validate(item)
        except Exception as e:  # noqa: BLE001 - a malformed task still gets an answer
            task_id = item.get("task_id", "") if isinstance(item, dict) else ""
            results.append(failed_result(str(task_id), e, started_at=started))
            continue
        results.append(execute(task))
    return results
