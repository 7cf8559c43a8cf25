"""``TaskGroupStream``: the client side of a task group's result stream.

One WebSocket per task group, held by a thread of its own and reconnected
(with :class:`~farcall.backoff.Backoff`) until its owner is done. The broker
pushes the group's results on it, and batches may be submitted on it instead
of by ``POST /v1/tasks``, saving an HTTP request per batch. The stream knows
nothing of futures: its owner hears of results, of moments when it should poll
(a result may have been missed), and of a refusal, through callbacks.
"""

from __future__ import annotations

import itertools
import logging
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass

from pydantic import ValidationError
from websockets.exceptions import InvalidStatus, WebSocketException
from websockets.sync.client import ClientConnection, connect

from farcall import tls
from farcall.backoff import Backoff
from farcall.client import Client, broker_error
from farcall.errors import FarcallError
from farcall.protocol.rest import BatchSubmission, BatchSubmitted
from farcall.protocol.stream import (
    RequestFailedFrame,
    ResultStreamFrame,
    SubmitFrame,
    SubmittedFrame,
    TaskResult,
    parse_stream_frame,
)

log = logging.getLogger(__name__)

QUIET_SECONDS = 15.0
"""With no frame on the stream for this long, ``poll`` is called (a result may have been missed)."""
SUBMIT_TIMEOUT = 120.0
"""How long a batch sent on the stream waits for its answer before it goes by HTTP instead."""


@dataclass(slots=True)
class _Reply:
    event: threading.Event
    frame: SubmittedFrame | RequestFailedFrame | None = None


class TaskGroupStream:
    """The result stream of task group ``task_group_id``, kept up until ``done()`` or ``close()``.

    Called from the stream's thread: ``on_results`` with each pushed batch of
    results; ``poll`` after every (re)connect, every loss and every
    ``QUIET_SECONDS`` of silence, since results finished meanwhile are not
    pushed again; ``on_refused`` once, when the broker refuses the stream for
    good (401/403/404), with the error to report. ``done`` is asked between
    frames and attempts; once it is true the stream ends.
    """

    def __init__(
        self,
        client: Client,
        task_group_id: str,
        *,
        on_results: Callable[[list[TaskResult]], None],
        poll: Callable[[], None],
        on_refused: Callable[[FarcallError], None],
        done: Callable[[], bool],
    ) -> None:
        self.task_group_id = task_group_id
        self._url = client.websocket_url(f"/task_groups/{task_group_id}/results")
        self._headers = {"Authorization": f"Bearer {client.token}"}
        self._ssl = tls.client_context() if self._url.startswith("wss:") else None
        tls.warn_if_insecure(self._url)
        self._on_results, self._poll, self._on_refused, self._done = on_results, poll, on_refused, done
        self._retry = client.retry
        self._broker_url = client.broker_url
        self._lock = threading.Lock()
        self._replies: dict[int, _Reply] = {}
        self._request_ids = itertools.count(1)
        self._ws: ClientConnection | None = None
        self._connected = threading.Event()
        self._closed = threading.Event()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="farcall-results", daemon=True)

    def start(self) -> None:
        """Connect, in the stream's own thread; ``wait_connected`` tells when it first is."""
        self._thread.start()

    def wait_connected(self, timeout: float) -> bool:
        """True once the stream has been connected at least once; False after ``timeout`` seconds."""
        return self._connected.wait(timeout)

    def in_stream_thread(self) -> bool:
        """True when called from the stream's own thread (its callbacks run there)."""
        return threading.current_thread() is self._thread

    def submit(self, batch: BatchSubmission) -> BatchSubmitted | None:
        """The broker's answer; None when the batch should go by HTTP instead.

        That is when the stream is down, drops before the answer comes, or the
        broker answers 503 (HTTP retries while its store or queue is down). A
        batch whose answer was lost may have been taken: sent again by HTTP
        under its ``request_id``, the broker answers with the tasks it created
        and creates none. A 429
        (rate limited, or the open-task quota reached) is waited out and the
        batch sent again, within the client's ``retry_seconds``, then raises
        :class:`~farcall.errors.RateLimited`. Any other refusal raises its
        :class:`~farcall.errors.BrokerError`.
        """
        retry = self._retry()
        while True:
            frame = self._exchange(batch)
            if frame is None or (isinstance(frame, RequestFailedFrame) and frame.status == 503):
                return None
            if isinstance(frame, SubmittedFrame):
                return BatchSubmitted(task_group_id=frame.task_group_id, task_ids=frame.task_ids)
            if frame.status != 429:
                raise broker_error(frame.status, frame.message, frame.error)
            if not retry.wait_rate_limited(frame.error, frame.retry_after, self._broker_url):
                raise retry.rate_limited(frame.error, frame.message, frame.retry_after)

    def _exchange(self, batch: BatchSubmission) -> SubmittedFrame | RequestFailedFrame | None:
        """Send the batch and wait for the broker's answer; None if the stream is down or drops."""
        ws = self._ws
        if ws is None:
            return None
        request_id = next(self._request_ids)
        reply = _Reply(threading.Event())
        with self._lock:
            self._replies[request_id] = reply
        try:
            ws.send(SubmitFrame(request_id=request_id, batch=batch).model_dump_json())
            reply.event.wait(SUBMIT_TIMEOUT)
        except (OSError, WebSocketException) as e:
            log.info("submitting on the result stream failed (%s); using HTTP", e)
        finally:
            with self._lock:
                self._replies.pop(request_id, None)
        return reply.frame

    def close(self) -> None:
        """End the stream and wait (up to 10 s) for its thread; safe to call more than once."""
        self._closing = True
        self._closed.set()
        ws = self._ws
        if ws is not None:
            try:
                ws.close()
            except Exception:  # noqa: BLE001 - already closing
                pass
        if self._thread.ident is not None and self._thread is not threading.current_thread():
            self._thread.join(10)

    def _run(self) -> None:
        backoff = Backoff(cap=5.0, base=0.2)
        while not self._closing and not self._done():
            try:
                with connect(self._url, additional_headers=self._headers, max_size=None, compression=None,
                             open_timeout=30, close_timeout=2, ssl=self._ssl) as ws:
                    self._ws = ws
                    backoff.reset()
                    self._connected.set()
                    self._poll()
                    self._receive(ws)
            except InvalidStatus as e:
                status = e.response.status_code
                if status in (401, 403, 404):
                    self._on_refused(FarcallError(
                        f"the broker refused the result stream of task group {self.task_group_id} "
                        f"({status}); the token may have been revoked. Results can still be "
                        "fetched with Client.get_batch_result."))
                    return
                log.warning("result stream: broker answered %s", status)
            except ssl.SSLCertVerificationError as e:
                self._on_refused(tls.certificate_error(self._url, e))  # retrying cannot help
                return
            except (OSError, TimeoutError, WebSocketException) as e:
                if self._closing:
                    return
                log.log(logging.WARNING if backoff.attempt == 0 else logging.DEBUG,
                        "result stream lost (%s); reconnecting", str(e) or type(e).__name__)
            finally:
                self._ws = None
                self._abandon_replies()
            if self._closing or self._done():
                return
            self._poll()
            self._closed.wait(backoff.next_delay())

    def _receive(self, ws: ClientConnection) -> None:
        while not self._done():
            try:
                raw = ws.recv(timeout=QUIET_SECONDS)
            except TimeoutError:
                self._poll()
                continue
            self._dispatch(raw)

    def _dispatch(self, raw: str | bytes) -> None:
        try:
            frame = parse_stream_frame(raw)
        except ValidationError as e:
            log.error("ignoring an unreadable result frame: %s", e)
        else:
            if isinstance(frame, ResultStreamFrame):
                self._on_results(frame.results)
            else:
                self._answer(frame)

    def _answer(self, frame: SubmittedFrame | RequestFailedFrame) -> None:
        """Hand the broker's answer to the ``submit`` waiting for it, if one still is."""
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
