"""The agent's outbox: results held until the broker acknowledges them, sent in frames it reads.

What the agent may rely on:

- A result is held from ``put`` (or ``answer``) until ``acked``; after that its task id
  is remembered for ``RECENT_IDS`` more acks, so ``holds`` still says yes to a late
  redelivery of a finished task.
- ``flush`` sends the running reports, then the results not sent yet on this session,
  in order, in frames capped by count (``max_batch``) and by bytes (the session's frame
  limit); the last frame carries the credit owed.
- ``open_session`` queues every held result again: after a reconnect all are resent.
- No frame is over the limit: a result too big for any frame fails its task with
  ``ResultTooLarge`` (when encoded, or when sent if the limit shrank since), and after
  the broker closed with 1009 (``shrink``) frames stay under half the largest sent.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable

from pydantic import TypeAdapter

from farcall.endpoint.errors import ResultTooLarge
from farcall.endpoint.outcomes import failed_result
from farcall.protocol.channel import Credit, ResultMessage, RunningFrame
from farcall.recent import RecentIds

log = logging.getLogger(__name__)

RECENT_IDS = 10_000
"""Acknowledged task ids remembered, so a late redelivery of a finished task is not run again."""
DEFAULT_MAX_FRAME_BYTES = 16 * 1024 * 1024
"""Frame limit when the broker's ``Welcome`` does not say (``max_frame_bytes`` 0)."""
MIN_FRAME_BYTES = 64 * 1024
"""The outbox never shrinks its frame limit below this after a 1009 close (a failed result fits)."""
FRAME_OVERHEAD = 64
"""Bytes of a results frame around its results: ``{"type":"results","credit":N,"results":[]}``."""

_RESULT: TypeAdapter[ResultMessage] = TypeAdapter(ResultMessage)

Send = Callable[[bytes], Awaitable[None]]
"""Sends one frame (JSON, as a text message) on the session."""


def results_frame(parts: list[bytes], credit: int) -> bytes:
    """A ``ResultsFrame`` from results already in ``ResultMessage`` JSON (each encoded once)."""
    return b'{"type":"results","credit":%d,"results":[%b]}' % (credit, b",".join(parts))


def _size(n: int) -> str:
    return f"{n} bytes ({n / 2**20:.1f} MiB)"


class Outbox:
    """Results and running reports on their way to the broker (this module's docstring).

    ``encode`` may be called from any thread; everything else from the agent's event loop.
    """

    def __init__(self, max_batch: int = 1000) -> None:
        self.max_batch = max_batch
        """Most results in one frame."""
        self.running_reports: dict[str, float] = {}
        """Tasks started and still running, with their start times, for the next flush; a
        task's result drops its entry (the result carries ``started_at``)."""
        self._unacked: dict[str, bytes] = {}
        """Results not acknowledged yet, by task id, as ``ResultMessage`` JSON (encoded once)."""
        self._queue: list[str] = []
        """Ids of results to send on this session, in order."""
        self._recent = RecentIds(RECENT_IDS)
        self._frame_limit = DEFAULT_MAX_FRAME_BYTES
        """Largest frame to send on this session (read by engine threads too)."""
        self._frame_cap: int | None = None
        """Set when the broker closed with 1009: the outbox then stays under it for good."""
        self._largest_sent = 0

    @property
    def frame_limit(self) -> int:
        """The largest frame this session sends."""
        return self._frame_limit

    @property
    def held(self) -> int:
        """Results not acknowledged yet."""
        return len(self._unacked)

    def held_ids(self) -> list[str]:
        """Task ids of the results not acknowledged yet, for a ``Hello``."""
        return list(self._unacked)

    @property
    def queued(self) -> int:
        """Results waiting to be sent on this session."""
        return len(self._queue)

    def holds(self, task_id: str) -> bool:
        """The task's result is held, or was acknowledged recently: it must not run again."""
        return task_id in self._unacked or task_id in self._recent

    # ------------------------------------------------------------- results in

    def encode(self, result: ResultMessage) -> bytes:
        """``result`` as JSON, or its ``ResultTooLarge`` failure if it fits no frame. Any thread."""
        encoded = _RESULT.dump_json(result)
        limit = self._frame_limit
        if len(encoded) > limit - FRAME_OVERHEAD:
            encoded = _RESULT.dump_json(_too_large(result, len(encoded), limit))
        return encoded

    def put(self, results: Iterable[tuple[str, bytes]]) -> None:
        """Hold these ``(task_id, encode(result))`` and queue them to send."""
        unacked, queue, reports = self._unacked, self._queue, self.running_reports
        for task_id, encoded in results:
            unacked[task_id] = encoded
            queue.append(task_id)
            reports.pop(task_id, None)

    def answer(self, task_id: str, error: BaseException) -> None:
        """Hold the failed result of a task answered with ``error`` without running it."""
        self._unacked[task_id] = _RESULT.dump_json(failed_result(task_id, error))
        self._queue.append(task_id)

    def acked(self, task_ids: Iterable[str]) -> None:
        """The broker has these results: drop them, and remember their ids a while."""
        unacked = self._unacked
        self._recent.add([t for t in task_ids if unacked.pop(t, None) is not None])

    # ------------------------------------------------------------- sessions

    def open_session(self, max_frame_bytes: int) -> int:
        """A new session, whose broker reads frames up to ``max_frame_bytes`` (0: it does not
        say): every held result is queued again. Returns how many."""
        limit = max_frame_bytes or DEFAULT_MAX_FRAME_BYTES
        self._frame_limit = limit if self._frame_cap is None else min(limit, self._frame_cap)
        self._largest_sent = 0
        self._queue = list(self._unacked)
        return len(self._queue)

    def shrink(self) -> None:
        """The broker closed with 1009: a frame was too big for it, whatever it said.

        Halving the largest frame sent puts the refused one over the new limit, so its
        results go in smaller frames, and a result refused alone fails with
        ``ResultTooLarge`` instead of being sent again for ever. The cap stays for the
        process: the broker has shown what it reads.
        """
        largest = min(self._largest_sent or self._frame_limit, self._frame_limit)
        cap = max(MIN_FRAME_BYTES, largest // 2)
        if self._frame_cap is not None and cap >= self._frame_cap:
            log.error("the broker refused a frame of %s as too big (close code 1009) although "
                      "frames are already capped at %s; check the broker's WebSocket size limit",
                      _size(largest), _size(self._frame_cap))
        else:
            log.warning("the broker refused a frame of %s as too big (close code 1009); frames "
                        "from this endpoint are now capped at %s", _size(largest), _size(cap))
        self._frame_cap = cap if self._frame_cap is None else min(cap, self._frame_cap)
        self._frame_limit = min(self._frame_limit, self._frame_cap)

    # ------------------------------------------------------------- sending

    async def flush(self, send: Send, owed_credit: Callable[[], int]) -> None:
        """Send what is due: running reports, then queued results in frames capped by count
        and bytes, the last with ``owed_credit()``; a bare ``Credit`` if no result went."""
        if self.running_reports:
            started, self.running_reports = self.running_reports, {}
            try:
                for frame in self._running_frames(started):
                    await self._send(send, frame)
            except BaseException:
                started.update(self.running_reports)
                self.running_reports = started
                raise
        sent_results = False
        unacked = self._unacked
        while self._queue:
            queue, limit = self._queue, self._frame_limit
            parts: list[bytes] = []
            size, taken = FRAME_OVERHEAD, 0
            for task_id in queue:
                part = unacked.get(task_id)
                if part is not None:
                    if len(part) > limit - FRAME_OVERHEAD:  # the limit shrank since it came
                        part = unacked[task_id] = _refit(part, limit)
                    if parts and (size + len(part) + 1 > limit or len(parts) >= self.max_batch):
                        break
                    parts.append(part)
                    size += len(part) + 1
                taken += 1
            del queue[:taken]
            credit = 0 if queue else owed_credit()
            if parts or credit:
                await self._send(send, results_frame(parts, credit))
                sent_results = True
        if not sent_results:
            n = owed_credit()
            if n:
                await send(Credit(n=n).model_dump_json().encode())

    async def _send(self, send: Send, frame: bytes) -> None:
        self._largest_sent = max(self._largest_sent, len(frame))
        await send(frame)

    def _running_frames(self, started: dict[str, float]) -> list[bytes]:
        """``started`` as running reports, split in halves until each is under the frame limit."""
        frame = RunningFrame(started=started).model_dump_json().encode()
        if len(frame) <= self._frame_limit or len(started) < 2:
            return [frame]
        items = list(started.items())
        half = len(items) // 2
        return self._running_frames(dict(items[:half])) + self._running_frames(dict(items[half:]))


def _refit(part: bytes, limit: int) -> bytes:
    """A held result that no longer fits a frame, replaced by its failure (rare: parsed)."""
    return _RESULT.dump_json(_too_large(_RESULT.validate_json(part), len(part), limit))


def _too_large(result: ResultMessage, size: int, limit: int) -> ResultMessage:
    """The failed result that stands for ``result`` when it is too big to send."""
    error = ResultTooLarge(
        f"the result of task {result.task_id} is {_size(size)} as JSON, over the limit of "
        f"{_size(limit)} for a frame from the endpoint to the broker; return less data, or "
        "write it to shared storage and return its path")
    log.warning("task %s: %s", result.task_id, error)
    failed = failed_result(result.task_id, error, started_at=result.started_at,
                           finished_at=result.finished_at)
    failed.attempts = result.attempts
    return failed
