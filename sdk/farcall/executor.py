"""``Executor``: a ``concurrent.futures.Executor`` whose tasks run on a farcall endpoint.

``submit`` serializes the call in the caller's thread (so an unpicklable
argument fails at once), returns a future and queues the task. A submitter
thread sends queued tasks in batches (one ``POST /v1/tasks`` per batch; a
function is registered once per Executor). A result thread holds one WebSocket
on the Executor's task group and resolves futures as results are pushed; after
any reconnect, and whenever the stream has been quiet for a while, it asks for
the outstanding tasks' states in one request, so no result is missed.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import itertools
import logging
import queue
import random
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError
from websockets.exceptions import InvalidStatus, WebSocketException
from websockets.sync.client import ClientConnection, connect

from farcall.client import SUBMITTER, Client, broker_error, outcome, result_outcome, split_batch
from farcall.errors import ExecutorShutdown, FarcallError
from farcall.messages import (
    BatchSubmission,
    BatchSubmitted,
    RequestFailedFrame,
    ResultStreamFrame,
    SubmitFrame,
    SubmittedFrame,
    TaskResult,
    TaskSpec,
    TaskState,
    parse_stream_frame,
    version_mismatch,
)
from farcall.serialize import pack_args, serialize_function

log = logging.getLogger(__name__)

QUIET_SECONDS = 15.0
"""With tasks outstanding and no pushed result for this long, poll their states once."""
CONNECT_WAIT = 10.0
"""How long the first batch waits for the result stream before it is sent anyway."""
SUBMIT_TIMEOUT = 120.0
"""How long a batch sent on the stream waits for its answer before it goes by HTTP instead."""


class TaskFuture(concurrent.futures.Future[Any]):
    """A future with the broker's ``task_id`` (set once the task has been submitted)."""

    task_id: str | None = None


@dataclass(slots=True)
class _Reply:
    event: threading.Event
    frame: SubmittedFrame | RequestFailedFrame | None = None


@dataclass(slots=True)
class _Call:
    future: TaskFuture
    args: str
    function_id: str | None = None
    payload: str | None = None
    digest: str = ""
    name: str = ""


class Executor(concurrent.futures.Executor):
    """Run Python calls on the endpoint ``endpoint_id``; results come back as futures.

    ``batch_size`` caps the tasks sent per request (more accumulate while a
    request is in flight); ``resource_specification`` goes with every task (for
    the Parsl engine: ``num_nodes``, ``ranks_per_node``, ...). Without
    ``client`` a :class:`Client` is built from ``FARCALL_BROKER_URL`` /
    ``FARCALL_TOKEN``.
    """

    def __init__(
        self,
        endpoint_id: str | None = None,
        client: Client | None = None,
        batch_size: int = 128,
        resource_specification: dict[str, Any] | None = None,
        task_group_id: str | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.endpoint_id = endpoint_id
        self.client = client or Client()
        self._own_client = client is None
        self.batch_size = batch_size
        self.resource_specification = resource_specification
        self.task_group_id = task_group_id

        self._queue: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._outstanding: dict[str, TaskFuture] = {}
        self._early: dict[str, TaskResult] = {}
        self._posting = 0
        self._unsent = 0
        self._payloads: weakref.WeakKeyDictionary[Any, tuple[str, str]] = weakref.WeakKeyDictionary()
        self._function_ids: dict[str, str] = {}
        self._replies: dict[int, _Reply] = {}
        self._request_ids = itertools.count(1)
        self._shutdown = False
        self._version_checked = False
        self._closing = False
        self._connected = threading.Event()
        self._closed = threading.Event()
        self._ws: ClientConnection | None = None
        self._submitter = threading.Thread(target=self._submit_loop, name="farcall-submit", daemon=True)
        self._stream: threading.Thread | None = None
        self._start_lock = threading.Lock()

    def __repr__(self) -> str:
        return (
            f"Executor(endpoint_id={self.endpoint_id!r}, broker={self.client.broker_url!r}, "
            f"task_group_id={self.task_group_id!r})"
        )

    # ------------------------------------------------------------ public API

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> TaskFuture:
        """Queue ``fn(*args, **kwargs)`` for the endpoint; returns at once."""
        self._check_open()
        payload, digest = self._function_payload(fn)
        call = _Call(TaskFuture(), pack_args(args, kwargs), payload=payload, digest=digest,
                     name=getattr(fn, "__name__", ""))
        return self._enqueue(call)

    def submit_to_registered_function(
        self,
        function_id: str,
        args: tuple[Any, ...] | list[Any] | None = None,
        kwargs: dict[str, Any] | None = None,
    ) -> TaskFuture:
        """Queue a call of a function registered with ``Client.register_function``."""
        self._check_open()
        return self._enqueue(_Call(TaskFuture(), pack_args(tuple(args or ()), dict(kwargs or {})),
                                   function_id=function_id))

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
        self._close_stream()
        if self._own_client:
            self.client.close()

    # ------------------------------------------------------------ submission

    def _check_open(self) -> None:
        if self._shutdown:
            raise ExecutorShutdown("this Executor was shut down; create a new one to submit more")
        if not self.endpoint_id:
            raise ValueError(
                "no endpoint: create the Executor with endpoint_id=... (see Client.get_endpoints())"
            )

    def _function_payload(self, fn: Callable[..., Any]) -> tuple[str, str]:
        try:
            cached = self._payloads.get(fn)
        except TypeError:  # not weakly referenceable: serialize every time, registered once
            cached = None
        if cached is not None:
            return cached
        payload = serialize_function(fn)
        entry = (payload, hashlib.sha256(payload.encode()).hexdigest())
        try:
            self._payloads[fn] = entry
        except TypeError:
            pass
        return entry

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
            if not live:
                return
            self._ensure_stream()
            specs = [
                TaskSpec.model_construct(
                    function_id=self._function_id(c),
                    args=c.args,
                    resource_specification=self.resource_specification,
                )
                for c in live
            ]
            assert self.endpoint_id is not None
            for chunk in split_batch(specs, max_tasks=self.batch_size):
                answer = self._submit(chunk)
                self._record(live[sent : sent + len(chunk)], answer.task_ids)
                sent += len(chunk)
        except BaseException as e:  # noqa: BLE001 - every future of the batch must hear of it
            log.warning("submitting %d task(s) failed: %s", len(live) - sent, e)
            for c in live[sent:]:
                c.future.set_exception(e)
        finally:
            with self._lock:
                self._posting -= 1
                if not self._posting:
                    self._early.clear()

    def _submit(self, chunk: list[TaskSpec]) -> BatchSubmitted:
        """On the result stream when it is up (no HTTP request per batch), else by POST."""
        assert self.endpoint_id is not None
        ws = self._ws
        if ws is not None:
            answer = self._submit_on_stream(ws, chunk)
            if answer is not None:
                return answer
        return self.client.submit_tasks(self.endpoint_id, chunk, self.task_group_id)

    def _submit_on_stream(self, ws: ClientConnection, chunk: list[TaskSpec]) -> BatchSubmitted | None:
        """The broker's answer, or None when the stream dropped before it came.

        A batch whose answer was lost may have been taken: sending it again by HTTP
        can run its tasks twice, never lose them (at-least-once).
        """
        assert self.endpoint_id is not None
        request_id = next(self._request_ids)
        reply = _Reply(threading.Event())
        with self._lock:
            self._replies[request_id] = reply
        batch = BatchSubmission.model_construct(
            endpoint_id=self.endpoint_id, tasks=chunk, task_group_id=self.task_group_id,
            submitter=SUBMITTER,
        )
        try:
            ws.send(SubmitFrame(request_id=request_id, batch=batch).model_dump_json())
            reply.event.wait(SUBMIT_TIMEOUT)
        except (OSError, WebSocketException) as e:
            log.info("submitting on the result stream failed (%s); using HTTP", e)
        finally:
            with self._lock:
                self._replies.pop(request_id, None)
        frame = reply.frame
        if frame is None or (isinstance(frame, RequestFailedFrame) and frame.status == 503):
            return None  # by HTTP, which retries while the broker's store or queue is down
        if isinstance(frame, RequestFailedFrame):
            raise broker_error(frame.status, frame.message, frame.error)
        return BatchSubmitted(task_group_id=frame.task_group_id, task_ids=frame.task_ids)

    def _function_id(self, call: _Call) -> str:
        if call.function_id is not None:
            return call.function_id
        found = self._function_ids.get(call.digest)
        if found is None:
            assert call.payload is not None
            found = self.client.register_function_payload(call.payload, call.name)
            self._function_ids[call.digest] = found
        return found

    def _record(self, calls: list[_Call], task_ids: list[str]) -> None:
        early: list[tuple[TaskFuture, TaskResult]] = []
        with self._lock:
            for call, task_id in zip(calls, task_ids, strict=True):
                call.future.task_id = task_id
                result = self._early.pop(task_id, None)
                if result is None:
                    self._outstanding[task_id] = call.future
                else:
                    early.append((call.future, result))
        for future, result in early:
            _settle(future, *_pushed_outcome(result))

    # ------------------------------------------------------------ results

    def _ensure_stream(self) -> None:
        if self._stream is not None:
            return
        if self.task_group_id is None:
            self.task_group_id = self.client.create_task_group()
        self._stream = threading.Thread(target=self._stream_loop, name="farcall-results", daemon=True)
        self._stream.start()
        if not self._connected.wait(CONNECT_WAIT):
            log.warning("result stream not connected after %.0f s; results will be polled meanwhile",
                        CONNECT_WAIT)

    def _stream_loop(self) -> None:
        url = self.client.websocket_url(f"/task_groups/{self.task_group_id}/results")
        headers = {"Authorization": f"Bearer {self.client.token}"}
        attempt = 0
        while not self._closing and not self._finished():
            try:
                with connect(url, additional_headers=headers, max_size=None, compression=None,
                             open_timeout=30, close_timeout=2) as ws:
                    self._ws = ws
                    attempt = 0
                    self._connected.set()
                    self._catch_up()
                    self._receive(ws)
            except InvalidStatus as e:
                status = e.response.status_code
                if status in (401, 403, 404):
                    self._fail_outstanding(FarcallError(
                        f"the broker refused the result stream of task group {self.task_group_id} "
                        f"({status}); the token may have been revoked. Results can still be "
                        "fetched with Client.get_batch_result."))
                    return
                log.warning("result stream: broker answered %s", status)
            except (OSError, TimeoutError, WebSocketException) as e:
                if self._closing:
                    return
                log.log(logging.WARNING if attempt == 0 else logging.DEBUG,
                        "result stream lost (%s); reconnecting", str(e) or type(e).__name__)
            finally:
                self._ws = None
                self._abandon_replies()
            if self._closing or self._finished():
                return
            self._catch_up()
            attempt += 1
            self._closed.wait(min(5.0, 0.1 * 2**attempt) * random.uniform(0.5, 1.0))

    def _receive(self, ws: ClientConnection) -> None:
        while not self._finished():
            try:
                raw = ws.recv(timeout=QUIET_SECONDS)
            except TimeoutError:
                self._catch_up()
                continue
            try:
                frame = parse_stream_frame(raw)
            except ValidationError as e:
                log.error("ignoring an unreadable result frame: %s", e)
                continue
            if isinstance(frame, ResultStreamFrame):
                self._deliver(frame.results)
            else:
                with self._lock:
                    reply = self._replies.get(frame.request_id)
                if reply is not None:
                    reply.frame = frame
                    reply.event.set()

    def _abandon_replies(self) -> None:
        """The stream is gone: batches waiting for an answer on it go by HTTP instead."""
        with self._lock:
            waiting = list(self._replies.values())
        for reply in waiting:
            reply.event.set()

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
            _settle(future, *_pushed_outcome(result))
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
            _settle(future, *outcome(record))

    def _finished(self) -> bool:
        """Shut down, everything sent, every result in: the stream has nothing left to do."""
        with self._lock:
            return self._shutdown and not self._unsent and not self._posting and not self._outstanding

    def _maybe_finish(self) -> None:
        if self._finished():
            self._close_stream()

    def _close_stream(self) -> None:
        self._closing = True
        self._closed.set()
        ws = self._ws
        if ws is not None:
            try:
                ws.close()
            except Exception:  # noqa: BLE001 - already closing
                pass
        if self._stream is not None and self._stream is not threading.current_thread():
            self._stream.join(10)

    def _fail_outstanding(self, error: BaseException) -> None:
        with self._lock:
            futures = list(self._outstanding.values())
            self._outstanding.clear()
        for f in futures:
            f.set_exception(error)


def _pushed_outcome(r: TaskResult) -> tuple[bool, Any]:
    return result_outcome(r.task_id, r.state, r.data, r.error, r.worker)


def _settle(future: TaskFuture, ok: bool, value: Any) -> None:
    """Resolve a future from ``outcome``: its return value, or the exception to raise."""
    if ok:
        future.set_result(value)
    else:
        future.set_exception(value)
