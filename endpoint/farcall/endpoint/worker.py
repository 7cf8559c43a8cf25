"""What runs inside a worker (thread, process, or Parsl worker): one task in, one result out.

This is the hot path. It imports only the SDK's serialization and message
modules, keeps deserialized functions in a small per-process LRU keyed by
``function_id``, and never raises: every failure becomes a failed result.
"""

from __future__ import annotations

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


def run_task(task_json: str | bytes) -> str:
    """Run one task given as ``TaskMessage`` JSON; answer ``ResultMessage`` JSON.

    The string-in, string-out signature lets any engine ship it across process
    boundaries (a process pool, Parsl's HTEX) without pickling pydantic objects.
    """
    started = time.time()
    try:
        task = TaskMessage.model_validate_json(task_json)
    except Exception as e:  # noqa: BLE001 - a malformed task still gets an answer if it has an id
        task_id = _task_id_of(task_json)
        return failed_result(task_id, e, started_at=started).model_dump_json()
    return execute(task, started).model_dump_json()


def run_task_buffer(buffer: bytes) -> str:
    """Task executor for Parsl HTEX's ``submit_payload``: the buffer is the task JSON as bytes."""
    return run_task(buffer)


def run_tasks(task_jsons: list[str]) -> list[str]:
    """Run a chunk of tasks in order; used by engines that batch to cut per-task IPC."""
    return [run_task(t) for t in task_jsons]


def run_tasks_buffer(buffer: bytes) -> str:
    """Parsl task executor for a chunk: a JSON array of tasks in, a JSON array of results out."""
    return dump_result_batch([execute(task) for task in parse_task_batch(buffer)])


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


def _task_id_of(task_json: str | bytes) -> str:
    try:
        import json

        return str(json.loads(task_json).get("task_id", ""))
    except Exception:  # noqa: BLE001
        return ""


def serve_pipe(fd: int) -> None:
    """Body of a process-pool worker: run chunks of task JSON arriving on ``fd`` until told to stop.

    A reader thread keeps draining the pipe while tasks run, so the agent's send
    of the next chunk never blocks against this worker's send of results (no
    deadlock with large payloads), and the worker exits when the agent goes away.
    """
    import multiprocessing.connection
    import queue
    import signal
    import threading

    # Ctrl-C in the agent's terminal, or a service manager signalling the whole group,
    # must not kill running tasks: the agent decides when its workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    conn = multiprocessing.connection.Connection(fd)
    inbox: queue.SimpleQueue[list[str] | None] = queue.SimpleQueue()

    def read() -> None:
        try:
            while (chunk := conn.recv()) is not None:
                inbox.put(chunk)
        except (EOFError, OSError):
            pass
        inbox.put(None)

    threading.Thread(target=read, name="farcall-worker-reader", daemon=True).start()
    while (chunk := inbox.get()) is not None:
        conn.send(run_tasks(chunk))


if __name__ == "__main__":
    import sys

    serve_pipe(int(sys.argv[1]))
