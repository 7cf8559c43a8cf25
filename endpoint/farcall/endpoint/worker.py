"""What runs inside a worker (thread, process, or Parsl worker): tasks in, results out.

This is the hot path. It imports only the SDK's serialization and message
modules, keeps deserialized functions in a small per-process LRU keyed by
``function_id``, and never raises: every failure becomes a failed result.

Arguments and results bigger than ``INLINE_BYTES`` travel through the broker's data
plane (``dataplane.py``): fetched before the function runs, uploaded after; a result
over the broker's per-task limit fails its task with ``ResultTooLarge``, nothing more.

A task's ``walltime`` is enforced here too, in worker processes only (``run_batch``
in a main thread): ``TaskTimeout`` is raised inside the function when it is due, so
the traceback shows where the task was and the worker is free for the next task.
The engine's own deadline (``engines/watchdog.py``) stays the guarantee.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

from cachetools import LRUCache

from farcall.endpoint import dataplane
from farcall.endpoint.outcomes import WORKER_VERSIONS, failed_result, walltime_exceeded
from farcall.errors import DeserializationError, SerializationError, TaskTimeout
from farcall.protocol.channel import ResultMessage, TaskMessage, dump_result_batch, parse_task_batch
from farcall.protocol.common import SAME_VERSIONS, TaskState, versions_text
from farcall.serialize import (
    deserialize_function,
    is_ref,
    serialize_json,
    unpack_args,
    unpack_blob,
)

FUNCTION_CACHE_SIZE = 256
EXIT_GRACE = 10.0
"""Seconds past its walltime a task that ignores ``TaskTimeout`` may keep a worker that
cannot be stopped from outside (``run_batch(..., exit_past_walltime=True)``, Parsl's)."""
EXIT_PAST_WALLTIME = 124
"""Exit code of a worker process that ended itself for a task past its walltime (as timeout(1))."""

log = logging.getLogger(__name__)

_functions: LRUCache[str, Callable[..., Any]] = LRUCache(FUNCTION_CACHE_SIZE)
"""Deserialized functions by ``function_id``: a chunk of tasks of one function loads it once."""
_functions_lock = threading.Lock()
"""The cache is not thread-safe, and a thread pool's workers share it."""


def run_batch(payload: bytes | str, exit_past_walltime: bool = False) -> str:
    """Run a JSON array of ``TaskMessage`` in order; answer a JSON array of ``ResultMessage``.

    The one entry point for crossing a process boundary (the process pool's pipe,
    Parsl's ``submit_payload``): bytes in, a string out, nothing for the other side
    to pickle. Every element gets a result in its place, so results line up with
    tasks; a malformed one fails under its ``task_id`` when it has one.

    In a main thread, a task with a ``walltime`` gets ``TaskTimeout`` raised inside it
    when due. ``exit_past_walltime`` is for workers no engine can stop (Parsl's): when
    a task is still running ``EXIT_GRACE`` seconds past its walltime (it caught
    ``TaskTimeout``, or is stuck in native code), this process exits, so its worker
    slot comes back.
    """
    try:
        tasks = parse_task_batch(payload)
    except Exception:  # noqa: BLE001 - answer element by element, below
        return dump_result_batch(_run_malformed(payload))
    soft = threading.current_thread() is threading.main_thread()
    return dump_result_batch([
        execute(task, soft_limit=soft) if task.walltime is None or not exit_past_walltime
        else _execute_or_exit(task, soft)
        for task in tasks
    ])


def execute(task: TaskMessage, started: float | None = None, *,
            soft_limit: bool = False) -> ResultMessage:
    """Run ``task`` in this thread and return its result; never raises.

    ``soft_limit`` (main thread only: it uses SIGALRM) raises ``TaskTimeout`` inside the
    function when the task's ``walltime`` is up; the task fails with it even if the
    function catches it and returns.
    """
    if started is None:
        started = time.time()
    try:
        blob = dataplane.fetch_arguments(task) if is_ref(task.args) else None
    except Exception as e:  # noqa: BLE001 - expired, unreachable...: the task fails saying so
        return failed_result(task.task_id, e, started_at=started)
    try:
        fn = _load_function(task)
        args, kwargs = unpack_args(task.args) if blob is None else unpack_blob(blob)
    except Exception as e:  # noqa: BLE001 - any loading failure is reported, with versions
        return failed_result(task.task_id, _deserialization_error(task, e), started_at=started)
    alarm = None
    try:
        if soft_limit and task.walltime is not None:
            alarm = _Alarm(task.task_id, task.walltime, task.walltime - (time.time() - started))
            with alarm:
                value = fn(*args, **kwargs)
        else:
            value = fn(*args, **kwargs)
    except (Exception, SystemExit) as e:
        if alarm is not None and alarm.rang and not isinstance(e, TaskTimeout):
            timeout = walltime_exceeded(task.task_id, alarm.walltime)
            timeout.add_note(f"after catching TaskTimeout the task raised {type(e).__name__}: {e}")
            return failed_result(task.task_id, timeout, started_at=started)
        # Drop this frame so the remote traceback starts in the user's function.
        tb = e.__traceback__
        return failed_result(
            task.task_id, e.with_traceback(tb.tb_next if tb else None), started_at=started
        )
    if alarm is not None and alarm.rang:  # it caught TaskTimeout and returned late
        return failed_result(task.task_id, walltime_exceeded(task.task_id, alarm.walltime),
                             started_at=started)
    try:
        data = (serialize_json(value) if task.result_format == "json"
                else dataplane.result_payload(task, value))
    except Exception as e:  # noqa: BLE001 - an unserializable or too big value fails the task
        return failed_result(task.task_id, _unserializable(task, e), started_at=started)
    return ResultMessage(
        task_id=task.task_id,
        state=TaskState.SUCCESS,
        data=data,
        started_at=started,
        finished_at=time.time(),
        worker=WORKER_VERSIONS,
    )


class _Alarm:
    """In a ``with`` block: ``TaskTimeout`` raised in the main thread by SIGALRM when the
    task's time is up. A one-shot timer, so it rings at most once. A timer already set in
    this process (``ITIMER_REAL``) is set again afterwards, less the time spent."""

    __slots__ = ("task_id", "walltime", "seconds", "rang", "previous", "outer", "entered")

    def __init__(self, task_id: str, walltime: float, seconds: float) -> None:
        self.task_id = task_id
        self.walltime = walltime
        self.seconds = max(seconds, 1e-3)
        self.rang = False
        self.previous: Any = None
        self.outer = (0.0, 0.0)
        self.entered = 0.0

    def _ring(self, signum: int, frame: FrameType | None) -> None:
        self.rang = True
        raise walltime_exceeded(self.task_id, self.walltime)

    def __enter__(self) -> None:
        self.previous = signal.signal(signal.SIGALRM, self._ring)
        self.entered = time.monotonic()
        self.outer = signal.setitimer(signal.ITIMER_REAL, self.seconds)

    def __exit__(self, *exc: object) -> None:
        try:
            signal.setitimer(signal.ITIMER_REAL, 0)
        finally:
            signal.signal(signal.SIGALRM, self.previous)
            delay, interval = self.outer
            if delay:
                left = delay - (time.monotonic() - self.entered)
                signal.setitimer(signal.ITIMER_REAL, max(left, 1e-6), interval)


def _execute_or_exit(task: TaskMessage, soft_limit: bool) -> ResultMessage:
    """``execute``, ending this process if the task is still running ``EXIT_GRACE`` s past
    its walltime: the only way to free a worker that nothing outside can stop."""
    assert task.walltime is not None
    timer = threading.Timer(task.walltime + EXIT_GRACE, _exit_past_walltime,
                            (task.task_id, task.walltime))
    timer.daemon = True
    timer.start()
    try:
        return execute(task, soft_limit=soft_limit)
    finally:
        timer.cancel()


def _exit_past_walltime(task_id: str, walltime: float) -> None:
    log.error("task %s is still running %g s past its walltime of %g s (it caught TaskTimeout, "
              "or is stuck in native code): ending this worker process so its slot comes back",
              task_id, EXIT_GRACE, walltime)
    logging.shutdown()
    os._exit(EXIT_PAST_WALLTIME)


def _load_function(task: TaskMessage) -> Callable[..., Any]:
    key = task.function_id
    try:
        with _functions_lock:
            return _functions[key]
    except KeyError:
        pass
    fn = deserialize_function(task.function)  # unlocked: it may take a while
    with _functions_lock:
        _functions[key] = fn
    return fn


def _unserializable(task: TaskMessage, cause: Exception) -> Exception:
    """The error of a task whose return value its ``result_format`` cannot carry."""
    if task.result_format != "json":
        return cause
    err = SerializationError(
        f"task {task.task_id} returned a value that is not JSON, and the action provider needs a "
        f"JSON-serializable return value ({cause}); return plain data: dicts with string keys, "
        "lists, strings, numbers, booleans, None (str() a path, .tolist() an array)")
    err.__cause__ = cause
    return err


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
