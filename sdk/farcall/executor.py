"""``Executor``: a ``concurrent.futures.Executor`` whose tasks run on a farcall endpoint.

``submit`` serializes the call in the caller's thread (so an unpicklable
argument fails at once), returns a future and queues the task. A submitter
thread sends queued tasks in batches (a function is registered once per
Executor) on the task group's result stream (:mod:`farcall.stream`), or by
``POST /v1/tasks`` while it is down. Results pushed on the stream resolve the
futures; after any reconnect, and whenever the stream has been quiet for a
while, the outstanding tasks' states are asked for in one request, so no
result is missed. ``TaskFuture.cancel`` drops a task not yet sent, and asks the
broker to cancel one that is sent but has not started on a worker. Arguments bigger
than ``INLINE_BYTES`` are uploaded to the broker's data plane by the submitter thread
(a task over the broker's limit fails alone, ``TaskTooLarge``), and big results are
downloaded by a small pool, never on the result stream's thread.
"""

from __future__ import annotations

import concurrent.futures
import copy
import hashlib
import json
import logging
import queue
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Generator, Iterable
from concurrent.futures._base import CANCELLED_AND_NOTIFIED
from dataclasses import dataclass
from typing import Any, TypeVar

from farcall import compat
from farcall.client import (
    SUBMITTER,
    Client,
    check_task_options,
    new_request_id,
    pack_call,
    split_batch,
)
from farcall.compat import Unused, accept, warn_once
from farcall.errors import ExecutorShutdown
from farcall.outcome import Outcome, cancel_future, needs_fetch, outcome_of
from farcall.protocol.common import (
    TaskState,
    check_resource_specification,
    check_user_endpoint_config,
    version_mismatch,
)
from farcall.protocol.rest import BatchSubmission, BatchSubmitted, TaskSpec
from farcall.protocol.stream import TaskResult
from farcall.serialize import Frames, serialize_function
from farcall.strategies import ComputeSerializer, check_serializer
from farcall.stream import TaskGroupStream

log = logging.getLogger(__name__)

T = TypeVar("T")

CONNECT_WAIT = 10.0
"""How long the first batch waits for the result stream before it is sent anyway."""
DOWNLOADS = 2
"""Big results downloaded at once per Executor (each is held whole in memory once loaded)."""
CANCEL_WAIT = 60.0
"""How long ``TaskFuture.cancel`` waits for a task being sent to get its id (then gives up)."""
_PARAMETERS = ("endpoint_id", "client", "task_group_id", "resource_specification",
               "user_endpoint_config", "label", "batch_size", "walltime", "max_retries",
               "amqp_port", "api_burst_limit", "api_burst_window_s", "serializer",
               "result_serializers", "funcx_client", "batch_interval", "batch_enabled",
               "container_id")


class TaskFuture(concurrent.futures.Future[Any]):
    """A future with the broker's ``task_id`` (set once the task has been submitted).

    ``cancel()`` works until the task starts on a worker, not only until it is sent (as
    ``concurrent.futures`` futures do): see :meth:`cancel`.
    """

    task_id: str | None = None
    cancel_reason: str = ""
    """What the ``CancelledError`` of a task the broker cancelled says (who cancelled it, why)."""

    def __init__(self, executor: Executor | None = None) -> None:
        super().__init__()
        self._executor = executor

    def result(self, timeout: float | None = None) -> Any:
        try:
            return super().result(timeout)
        except concurrent.futures.CancelledError:
            raise self._cancelled() from None

    def exception(self, timeout: float | None = None) -> BaseException | None:
        try:
            return super().exception(timeout)
        except concurrent.futures.CancelledError:
            raise self._cancelled() from None

    def _cancelled(self) -> concurrent.futures.CancelledError:
        return concurrent.futures.CancelledError(*([self.cancel_reason] if self.cancel_reason
                                                   else []))

    def cancel(self) -> bool:
        """Cancel the task; True if it will never run (and ``cancelled()`` is then True).

        A task not yet sent to the broker is dropped here. A sent one is cancelled by
        the broker if it is still queued (one request); once it has started on a worker,
        or finished, this returns False and the task runs to its end (``Client.cancel``
        stops running tasks too). Never raises: if the broker cannot be asked, the error
        is logged and the answer is False.
        """
        if cancel_future(self, running=False):
            return True
        if self._executor is None or not self.running():
            return False
        return self._executor._cancel_sent(self)

    def set_running_or_notify_cancel(self) -> bool:
        """As ``Future``'s, and also False for a future :meth:`cancel` already settled."""
        with self._condition:
            if self._state == CANCELLED_AND_NOTIFIED:
                return False
            return super().set_running_or_notify_cancel()


ComputeFuture = TaskFuture
"""Globus Compute's name for the Executor's futures."""


@dataclass(slots=True)
class _Function:
    """A function as this Executor sends it; ``payload`` is needed only until ``function_id`` is known."""

    payload: str
    name: str
    function_id: str | None = None


class _Functions:
    """Each function is serialized and registered once per Executor.

    Found by the function object while it lives (held weakly), else by its
    payload's digest: a function that cannot be weakly referenced, or an equal
    one made anew (a lambda per call), is serialized again but shares one
    registration.
    """

    def __init__(self) -> None:
        self._by_object: weakref.WeakKeyDictionary[Any, _Function] = weakref.WeakKeyDictionary()
        self._by_digest: dict[str, _Function] = {}

    def get(self, fn: Callable[..., Any], strategy: str = "auto") -> _Function:
        try:
            found = self._by_object.get(fn)
        except TypeError:  # not weakly referenceable
            found = None
        if found is not None:
            return found
        payload = serialize_function(fn, strategy)
        digest = hashlib.sha256(payload.encode()).hexdigest()
        found = self._by_digest.setdefault(digest, _Function(payload, getattr(fn, "__name__", "")))
        try:
            self._by_object[fn] = found
        except TypeError:
            pass
        return found


@dataclass(slots=True)
class _Call:
    future: TaskFuture
    args: str
    function: _Function | None = None
    function_id: str | None = None
    frames: Frames | None = None
    """Arguments too big to travel inline: uploaded as a blob by the submitter thread."""
    config: str | None = None
    """The Executor's ``user_endpoint_config`` when the call was submitted, as canonical JSON."""
    spec: dict[str, Any] | None = None
    """The Executor's ``resource_specification`` when the call was submitted."""

    @classmethod
    def packed(cls, future: TaskFuture, args: tuple[Any, ...], kwargs: dict[str, Any],
               **target: Any) -> _Call:
        """The call with its arguments pickled once (inline, or kept for upload)."""
        payload, frames, _ = pack_call(args, kwargs)
        return cls(future, payload, frames=frames, **target)


class Executor(concurrent.futures.Executor):
    """Run Python calls on the endpoint ``endpoint_id``; results come back as futures.

    ``batch_size`` caps the tasks sent per request (more accumulate while a
    request is in flight); ``resource_specification`` goes with every task (for
    the Parsl engine: ``num_nodes``, ``ranks_per_node``, ...), as do
    ``walltime`` (seconds a task may run on a worker; past it the task fails with
    :class:`~farcall.errors.TaskTimeout`) and ``max_retries`` (times a task is run
    again after a system failure such as a lost worker cut it short). Without
    ``client`` a :class:`Client` is built from ``FARCALL_BROKER_URL`` /
    ``FARCALL_TOKEN``. A batch the broker refuses with 429 (rate limited, or
    the open-task quota reached) is sent again when the broker says, within
    the client's ``retry_seconds``; past that its futures fail with
    :class:`~farcall.errors.RateLimited`.

    ``user_endpoint_config`` (also an attribute, to change between submissions): for a
    multi-user endpoint, the values of the configuration your tasks' user endpoint is made
    with (account, partition, image...); each task takes the value set when it was submitted.
    """

    amqp_port = Unused("Executor", compat.EXECUTOR)
    api_burst_limit = Unused("Executor", compat.EXECUTOR)
    api_burst_window_s = Unused("Executor", compat.EXECUTOR)
    result_serializers = Unused("Executor", compat.EXECUTOR)
    container_id = Unused("Executor", compat.EXECUTOR)

    def __init__(
        self,
        endpoint_id: str | uuid.UUID | None = None,
        client: Client | None = None,
        task_group_id: str | uuid.UUID | None = None,
        resource_specification: dict[str, Any] | None = None,
        user_endpoint_config: dict[str, Any] | None = None,
        label: str = "",
        batch_size: int = 128,
        amqp_port: int | None = None,
        api_burst_limit: int | None = None,
        api_burst_window_s: int | None = None,
        serializer: ComputeSerializer | None = None,
        result_serializers: Any = None,
        *,
        walltime: float | None = None,
        max_retries: int = 0,
        funcx_client: Client | None = None,
        **kwargs: Any,
    ) -> None:
        """The arguments and their order are Globus Compute's (``walltime`` and ``max_retries``
        are farcall's own); those farcall has no use for are accepted with a
        :class:`~farcall.errors.CompatibilityWarning` (see :mod:`farcall.compat`)."""
        unknown = sorted(set(kwargs) - {"batch_interval", "batch_enabled", "container_id"})
        if unknown:
            raise TypeError(f"Executor got unexpected keyword argument(s) {', '.join(unknown)}; "
                            f"it takes: {', '.join(_PARAMETERS)}")
        accept("Executor", compat.EXECUTOR, {k: v for k, v in kwargs.items() if k != "container_id"})
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a whole number of at least 1, got {batch_size!r}")
        if funcx_client is not None:
            warn_once("Executor(funcx_client=)", "Executor(funcx_client=...) is Globus Compute's "
                      "old name of client=...: it is used as the client")
        self.walltime, self.max_retries = check_task_options(walltime, max_retries)
        self.resource_specification = resource_specification
        self.user_endpoint_config = user_endpoint_config
        self.endpoint_id = endpoint_id  # a UUID is kept as its text
        self.client = client or funcx_client or Client()
        self._own_client = client is None and funcx_client is None
        self.batch_size = batch_size
        self.task_group_id = task_group_id
        self.label = label
        """A name for this Executor in its ``repr`` and log lines (Globus Compute's ``label``)."""
        self.amqp_port = amqp_port
        self.api_burst_limit, self.api_burst_window_s = api_burst_limit, api_burst_window_s
        self.result_serializers = result_serializers
        self.container_id = kwargs.get("container_id")
        self._serializer: ComputeSerializer | None = None
        if serializer is not None:
            self.serializer = serializer
        self.task_count_submitted = 0
        """Tasks the broker has taken from this Executor (each future then has its task_id)."""

        self._queue: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._sent = threading.Condition(self._lock)
        """Notified when a batch got its task ids, or failed to be sent (a cancel may wait)."""
        self._outstanding: dict[str, TaskFuture] = {}
        self._early: dict[str, TaskResult] = {}
        self._posting = 0
        self._unsent = 0
        self._functions = _Functions()
        self._shutdown = False
        self._version_checked = False
        self._downloads: concurrent.futures.ThreadPoolExecutor | None = None
        """Downloads big results (data-plane references) off the result stream's thread."""
        self._submitter = threading.Thread(target=self._submit_loop, name="farcall-submit", daemon=True)
        self._stream: TaskGroupStream | None = None
        self._start_lock = threading.Lock()

    def __repr__(self) -> str:
        label = f"label={self.label!r}, " if self.label else ""
        return (
            f"Executor({label}endpoint_id={self.endpoint_id!r}, broker={self.client.broker_url!r}, "
            f"task_group_id={self.task_group_id!r})"
        )

    @property
    def endpoint_id(self) -> str | None:
        """Where tasks submitted from now on run (a UUID given is kept as its text)."""
        return self._endpoint_id

    @endpoint_id.setter
    def endpoint_id(self, endpoint_id: str | uuid.UUID | None) -> None:
        self._endpoint_id = None if endpoint_id is None else str(endpoint_id)

    @property
    def task_group_id(self) -> str | None:
        """The task group of this Executor's tasks (made at the first submission if None)."""
        return self._task_group_id

    @task_group_id.setter
    def task_group_id(self, task_group_id: str | uuid.UUID | None) -> None:
        self._task_group_id = None if task_group_id is None else str(task_group_id)

    @property
    def resource_specification(self) -> dict[str, Any] | None:
        """What each task submitted from now on asks of the endpoint's engine (``num_nodes``,
        ``ranks_per_node``... on an MPIEngine); each task keeps the value set at its submission."""
        return self._resource_specification

    @resource_specification.setter
    def resource_specification(self, spec: dict[str, Any] | None) -> None:
        self._resource_specification = check_resource_specification(spec)

    @property
    def serializer(self) -> ComputeSerializer | None:
        """How functions are serialized (``farcall.serialize.ComputeSerializer``; None: farcall's
        choice, cloudpickle then dill then source). Only its code strategy is used."""
        return self._serializer

    @serializer.setter
    def serializer(self, serializer: ComputeSerializer | None) -> None:
        if serializer is not None:
            serializer = check_serializer(serializer)
        self._serializer = serializer

    @property
    def user_endpoint_config(self) -> dict[str, Any] | None:
        """For a multi-user endpoint: the values of the user endpoint's configuration that the
        tasks submitted from now on run with (None: the endpoint's defaults)."""
        return self._user_endpoint_config

    @user_endpoint_config.setter
    def user_endpoint_config(self, config: dict[str, Any] | None) -> None:
        self._user_endpoint_config = check_user_endpoint_config(config)

    # ------------------------------------------------------------ public API

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> TaskFuture:
        """Queue ``fn(*args, **kwargs)`` for the endpoint; returns at once.

        Arguments are pickled here, once. Bigger than ``INLINE_BYTES`` they are uploaded to
        the broker by the submitter thread, from the objects themselves (a numpy array is
        not copied): change such an array in place only once the future is running.
        """
        self._check_open()
        function = self._functions.get(fn, self._code_strategy())
        return self._enqueue(_Call.packed(TaskFuture(self), args, kwargs, function=function,
                                          **self._options_now()))

    def submit_to_registered_function(
        self,
        function_id: str,
        args: tuple[Any, ...] | list[Any] | None = None,
        kwargs: dict[str, Any] | None = None,
    ) -> TaskFuture:
        """Queue a call of a function registered with ``Client.register_function``."""
        self._check_open()
        return self._enqueue(_Call.packed(TaskFuture(self), tuple(args or ()), dict(kwargs or {}),
                                          function_id=str(function_id), **self._options_now()))

    def register_function(self, fn: Callable[..., Any], function_id: str | None = None,
                          **register_kwargs: Any) -> str:
        """Register ``fn`` now (``submit`` does it at its first use) and return its id.

        With ``function_id``, ``fn`` is taken to be that registered function and nothing is
        sent. ``register_kwargs`` go to :meth:`Client.register_function` (``description``,
        ``public``...). A function already registered by this Executor keeps its id.
        """
        self._check_open(need_endpoint=False)
        function = self._functions.get(fn, self._code_strategy())
        if function_id is not None:
            function.function_id, function.payload = str(function_id), ""
        elif function.function_id is None:
            register_kwargs.setdefault("strategy", self._code_strategy())
            function.function_id = self.client.register_function(fn, **register_kwargs)
            function.payload = ""
        return function.function_id

    def register_source_code(self, source: str, function_name: str, **register_kwargs: Any) -> str:
        """Register the function ``function_name`` defined in the Python ``source`` text
        (:meth:`Client.register_source_code`); its id, for :meth:`submit_to_registered_function`."""
        self._check_open(need_endpoint=False)
        return self.client.register_source_code(source, function_name, **register_kwargs)

    def get_worker_hardware_details(self) -> str:
        """A report of the machine a worker of the endpoint runs on (host, CPUs, memory,
        accelerators), run there as a task; waits for it."""
        from farcall.hardware import hardware_report

        return str(self.submit(hardware_report).result())

    def map(
        self,
        fn: Callable[..., T],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int = 1,
        progress: bool = False,
    ) -> Generator[T, None, None]:
        """As ``concurrent.futures.Executor.map``: results in order, ``TimeoutError`` past ``timeout``.

        When the iteration stops early (a timeout, an exception, the iterator dropped), the
        calls not yet done are cancelled in one request, not one request each. ``progress``
        shows a bar (:mod:`farcall.progress`) counting calls as they finish, in any order,
        and the failed ones; it is closed when the iteration ends.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        futures = [self.submit(fn, *args) for args in zip(*iterables, strict=False)]
        bar = None
        if progress:
            from farcall.progress import Progress

            bar = Progress(len(futures), desc=getattr(fn, "__name__", None))
            bar.watch(futures)

        def results() -> Generator[T, None, None]:
            try:
                futures.reverse()  # the next result is popped from the end
                while futures:
                    value = futures[-1].result(None if deadline is None else deadline - time.monotonic())
                    futures.pop()
                    yield value
            finally:
                if bar is not None:
                    bar.close()  # before cancelling the rest: a stop is not a failure
                self._cancel_many(futures)

        return results()

    def reload_tasks(self, task_group_id: str | uuid.UUID | None = None) -> list[TaskFuture]:
        """Futures for every task of this Executor's ``task_group_id``, in submission order.

        For coming back later: a new process (after a kernel restart, say) recovers what an
        earlier one submitted, finished or not. The futures resolve as fresh ones do (result,
        remote exception, ``cancel``); those already finished resolve at once. Raises
        :class:`~farcall.errors.NotFound` when the broker knows no such group of yours.
        """
        from farcall.errors import NotFound

        if task_group_id is not None:
            self.task_group_id = task_group_id
        if self.task_group_id is None:
            raise ValueError("reload_tasks needs the task group: create the Executor with "
                             "task_group_id=... (the earlier Executor's .task_group_id)")
        if self._shutdown:
            raise ExecutorShutdown("this Executor was shut down; create a new one to reload tasks")
        try:
            task_ids = self.client.get_task_group(self.task_group_id)
        except NotFound as e:
            raise NotFound(e.status, (
                f"task group {self.task_group_id} is not known to the broker at "
                f"{self.client.broker_url}: check the id (it must be one of yours; 'farcall groups' "
                "lists them), or it expired with its results (FARCALL_RESULT_TTL)"),
                e.error, e.body) from None
        futures: list[TaskFuture] = []
        with self._lock:
            for task_id in task_ids:
                future = self._outstanding.get(task_id)
                if future is None:
                    future = TaskFuture(self)
                    future.task_id = task_id
                    future.set_running_or_notify_cancel()  # sent: cancel asks the broker
                    self._outstanding[task_id] = future
                futures.append(future)
        if futures:
            self._ensure_stream()
            self._catch_up()  # the stream polls too once connected; this settles finished ones now
        return futures

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop taking tasks. ``wait``: return once every submitted task has its result.

        ``cancel_futures`` cancels tasks not yet sent to the broker. Without
        ``wait``, queued tasks are still sent and their futures still resolve.
        """
        with self._lock:
            already = self._shutdown
            self._shutdown = True
        if cancel_futures:
            self._cancel_queued()
        if not already:
            self._queue.put(None)
        self._start_submitter()  # a never-used Executor still drains its queue and ends
        if not wait:
            return
        self._submitter.join()
        with self._lock:
            futures = list(self._outstanding.values())
        concurrent.futures.wait(futures)
        if self._downloads is not None:
            self._downloads.shutdown(wait=True)
        self._close_stream()
        if self._own_client:
            self.client.close()

    # ------------------------------------------------------------ submission

    def _check_open(self, need_endpoint: bool = True) -> None:
        if self._shutdown:
            raise ExecutorShutdown("this Executor was shut down; create a new one to submit more")
        if need_endpoint and not self.endpoint_id:
            raise ValueError(
                "no endpoint: create the Executor with endpoint_id=... (see Client.get_endpoints())"
            )

    def _options_now(self) -> dict[str, Any]:
        """The ``user_endpoint_config`` (canonical JSON) and ``resource_specification`` as they
        are now: a later change, or a change of the dicts in place, does not reach calls already
        submitted."""
        config, spec = self._user_endpoint_config, self._resource_specification
        return {"config": None if config is None else json.dumps(config, sort_keys=True),
                "spec": None if spec is None else copy.deepcopy(spec)}

    def _code_strategy(self) -> str:
        """The serializer's code strategy, else the client's (``Client(code_serialization_strategy=)``)."""
        if self._serializer is not None:
            return self._serializer.code_strategy
        return str(getattr(self.client, "code_strategy", "auto"))

    def _enqueue(self, call: _Call) -> TaskFuture:
        with self._lock:
            if self._shutdown:
                raise ExecutorShutdown("this Executor was shut down; create a new one to submit more")
            self._unsent += 1
        self._queue.put(call)
        self._start_submitter()
        return call.future

    def _start_submitter(self) -> None:
        if self._submitter.ident is None:
            with self._start_lock:
                if self._submitter.ident is None:
                    self._submitter.start()

    def _cancel_queued(self) -> None:
        kept: list[_Call | None] = []
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                kept.append(item)
            else:
                item.future.cancel()
                with self._lock:
                    self._unsent -= 1
        for item in kept:
            self._queue.put(item)

    def _submit_loop(self) -> None:
        stop = False
        while not stop:
            first = self._queue.get()
            if first is None:
                break
            batch = [first]
            while len(batch) < self.batch_size:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                    break
                batch.append(item)
            self._send(batch)
        self._maybe_finish()

    def _send(self, batch: list[_Call]) -> None:
        live = [c for c in batch if c.future.set_running_or_notify_cancel()]
        with self._lock:
            self._unsent -= len(batch)
            self._posting += 1
        sent = 0
        try:
            live = self._within_limits(live)
            if not live:
                return
            self._ensure_stream()
            by_config: dict[str | None, list[_Call]] = {}
            for c in live:  # one submission never mixes configurations
                by_config.setdefault(c.config, []).append(c)
            live = [c for calls in by_config.values() for c in calls]
            assert self.endpoint_id is not None
            for config, calls in by_config.items():
                specs = [
                    TaskSpec.model_construct(
                        function_id=self._function_id(c),
                        args=c.args,
                        resource_specification=c.spec,
                        walltime=self.walltime,
                        max_retries=self.max_retries,
                    )
                    for c in calls
                ]
                values = None if config is None else json.loads(config)
                for chunk in split_batch(specs, max_tasks=self.batch_size):
                    answer = self._submit(chunk, values)
                    self._record(live[sent : sent + len(chunk)], answer.task_ids)
                    sent += len(chunk)
        except BaseException as e:  # noqa: BLE001 - every future of the batch must hear of it
            log.warning("submitting %d task(s) failed: %s", len(live) - sent, e)
            for c in live[sent:]:
                Outcome(False, e).settle(c.future)
            with self._sent:
                self._sent.notify_all()
        finally:
            with self._lock:
                self._posting -= 1
                if not self._posting:
                    self._early.clear()

    def _within_limits(self, calls: list[_Call]) -> list[_Call]:
        """``calls`` whose size the broker takes, with their big arguments uploaded as blobs.

        A call over ``Limits.max_task_bytes``, or whose upload fails, fails its own future
        only (``TaskTooLarge``...): the rest of the batch is sent. Inline arguments are under
        any limit (the broker takes at least ``INLINE_BYTES``), so a batch of small calls
        needs no look at the limits.
        """
        if all(c.frames is None for c in calls):
            return calls
        ready: list[_Call] = []
        for call in calls:
            if call.frames is None:
                ready.append(call)
                continue
            name = call.function.name if call.function is not None else call.function_id
            try:
                call.args = self.client.upload_blob(call.frames, f"this call of {name}")
                call.frames = None
            except Exception as e:  # noqa: BLE001 - the call's own future hears of it
                log.warning("not sending a call of %s: %s", name, e)
                Outcome(False, e).settle(call.future)
                continue
            ready.append(call)
        if len(ready) < len(calls):
            with self._sent:
                self._sent.notify_all()
        return ready

    def _submit(self, chunk: list[TaskSpec], config: dict[str, Any] | None = None
                ) -> BatchSubmitted:
        """On the result stream when it is up (no HTTP request per batch), else by POST."""
        assert self.endpoint_id is not None
        request_id = new_request_id()  # the same on the stream and by HTTP: taken once
        stream = self._stream
        if stream is not None:
            answer = stream.submit(BatchSubmission.model_construct(
                endpoint_id=self.endpoint_id, tasks=chunk, task_group_id=self.task_group_id,
                submitter=SUBMITTER, request_id=request_id, user_endpoint_config=config,
            ))
            if answer is not None:
                return answer
        return self.client.submit_tasks(self.endpoint_id, chunk, self.task_group_id, request_id,
                                        user_endpoint_config=config)

    def _function_id(self, call: _Call) -> str:
        if call.function_id is not None:
            return call.function_id
        function = call.function
        assert function is not None
        if function.function_id is None:
            function.function_id = self.client.register_function_payload(
                function.payload, function.name
            )
            function.payload = ""
        return function.function_id

    def _record(self, calls: list[_Call], task_ids: list[str]) -> None:
        early: list[tuple[TaskFuture, TaskResult]] = []
        with self._lock:
            self.task_count_submitted += len(calls)
            for call, task_id in zip(calls, task_ids, strict=True):
                call.future.task_id = task_id
                result = self._early.pop(task_id, None)
                if result is None:
                    self._outstanding[task_id] = call.future
                else:
                    early.append((call.future, result))
            self._sent.notify_all()
        for future, result in early:
            self._settle(future, result)

    # ------------------------------------------------------------ results

    def _ensure_stream(self) -> None:
        if self._stream is not None:
            return
        with self._start_lock:  # the submitter thread and reload_tasks may both come first
            if self._stream is not None:
                return
            if self.task_group_id is None:
                self.task_group_id = self.client.create_task_group()
            stream = TaskGroupStream(
                self.client,
                self.task_group_id,
                on_results=self._deliver,
                poll=self._catch_up,
                on_refused=self._fail_outstanding,
                done=self._finished,
            )
            self._stream = stream
            stream.start()
        if not stream.wait_connected(CONNECT_WAIT):
            log.warning("result stream not connected after %.0f s; results will be polled meanwhile",
                        CONNECT_WAIT)

    def _deliver(self, results: list[TaskResult]) -> None:
        ready: list[tuple[TaskFuture, TaskResult]] = []
        with self._lock:
            for result in results:
                future = self._outstanding.pop(result.task_id, None)
                if future is not None:
                    ready.append((future, result))
                elif self._posting:
                    self._early[result.task_id] = result
        for future, result in ready:
            self._settle(future, result)
        if not self._version_checked and results and results[0].worker is not None:
            self._version_checked = True
            mismatch = version_mismatch(SUBMITTER, results[0].worker)
            if mismatch:
                log.warning("endpoint %s: %s", self.endpoint_id, mismatch)

    def _catch_up(self) -> None:
        """Resolve every outstanding task that already finished (one request per 10,000)."""
        with self._lock:
            ids = list(self._outstanding)
        if not ids:
            return
        try:
            records = self.client.get_tasks(ids)
        except Exception as e:  # noqa: BLE001 - the stream keeps trying; the next catch-up retries
            log.warning("could not poll %d outstanding task(s): %s", len(ids), e)
            return
        ready: list[tuple[TaskFuture, dict[str, Any]]] = []
        with self._lock:
            for task_id, record in records.items():
                if TaskState(record["state"]).terminal:
                    future = self._outstanding.pop(task_id, None)
                    if future is not None:
                        ready.append((future, record))
        for future, record in ready:
            self._settle(future, record)

    def _settle(self, future: TaskFuture, result: TaskResult | dict[str, Any]) -> None:
        """Resolve ``future`` with its task's outcome. A big result (a data-plane reference) is
        downloaded and loaded on the download pool, so the calling thread (the result stream's)
        keeps delivering other results meanwhile."""
        if not needs_fetch(result):
            outcome_of(result).settle(future)
            return
        with self._lock:
            if self._downloads is None:
                self._downloads = concurrent.futures.ThreadPoolExecutor(
                    DOWNLOADS, thread_name_prefix="farcall-download")
            pool = self._downloads
        try:
            pool.submit(self._fetch, future, result)
        except RuntimeError:  # the pool is shut down (interpreter exit): download here
            self._fetch(future, result)

    def _fetch(self, future: TaskFuture, result: TaskResult | dict[str, Any]) -> None:
        if not future.done():
            outcome_of(result, self.client.download_blob).settle(future)

    def _finished(self) -> bool:
        """Shut down, everything sent, every result in: the stream has nothing left to do."""
        with self._lock:
            return self._shutdown and not self._unsent and not self._posting and not self._outstanding

    def _maybe_finish(self) -> None:
        if self._finished():
            self._close_stream()

    def _close_stream(self) -> None:
        if self._stream is not None:
            self._stream.close()

    def _fail_outstanding(self, error: BaseException) -> None:
        with self._lock:
            futures = list(self._outstanding.values())
            self._outstanding.clear()
        for f in futures:
            Outcome(False, error).settle(f)

    # ------------------------------------------------------------ cancel

    def _cancel_sent(self, future: TaskFuture) -> bool:
        """``future.cancel()`` of a task handed to the broker: cancel it there if still queued."""
        task_id = self._wait_task_id(future, self._send_wait())
        if task_id is None:
            if future.running():
                log.warning("cannot cancel a task still being sent to the broker; try again later")
            return future.cancelled()
        self._cancel_at_broker({task_id: future})
        return future.cancelled()

    def _cancel_many(self, futures: list[TaskFuture]) -> None:
        """Cancel what can be of ``futures``: unsent ones here, sent ones in one request."""
        sent: dict[str, TaskFuture] = {}
        deadline = time.monotonic() + self._send_wait()
        for future in futures:
            if cancel_future(future, running=False) or not future.running():
                continue
            task_id = self._wait_task_id(future, max(0.0, deadline - time.monotonic()))
            if task_id is not None:
                sent[task_id] = future
        if sent:
            self._cancel_at_broker(sent)

    def _wait_task_id(self, future: TaskFuture, timeout: float) -> str | None:
        """The task id once the task is sent; None if sending failed or took over ``timeout``.

        Not on the future's own condition: ``Future.result`` takes any wake-up there for
        the end of the task.
        """
        with self._sent:
            self._sent.wait_for(lambda: future.task_id is not None or not future.running(), timeout)
            return future.task_id

    def _send_wait(self) -> float:
        """How long a cancel waits for a task being sent to get its id.

        Not at all on the submitter or stream thread (from a done-callback): the send
        it would wait for cannot finish meanwhile.
        """
        if threading.current_thread() is self._submitter:
            return 0.0
        if self._stream is not None and self._stream.in_stream_thread():
            return 0.0
        return CANCEL_WAIT

    def _cancel_at_broker(self, futures: dict[str, TaskFuture]) -> None:
        """Ask the broker to cancel these sent tasks if queued; cancel the futures of those it did.

        A broker error is logged, never raised: those futures simply stay as they are.
        """
        try:
            answer = self.client.cancel(list(futures), only_queued=True)
        except Exception as e:  # noqa: BLE001 - cancel() answers, never raises
            log.warning("could not cancel %d task(s) (%s); they run as submitted", len(futures), e)
            return
        done = [t for t, why in answer["unchanged"].items() if why == TaskState.CANCELLED]
        cancelled = [futures[t] for t in (*answer["cancelled"], *done) if t in futures]
        with self._lock:
            for future in cancelled:
                self._outstanding.pop(str(future.task_id), None)
        for future in cancelled:
            cancel_future(future)
        if len(cancelled) < len(futures):
            log.debug("%d task(s) not cancelled (started or finished)", len(futures) - len(cancelled))

