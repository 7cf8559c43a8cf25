"""``TimerScheduler``: fires the runs of timers that are due, each once across broker replicas.

Every replica runs one. A few times a second it asks the store for the timers due (one cheap
call when none is), claims each due run (``TimerStore.claim``, a compare and set: of the
replicas that saw the run due, one gets it) and submits the run's task through
``submission.submit_batch``, as ``POST /v1/tasks`` does for the timer's creator, so the same
access checks apply at every run. The claim comes first: a replica that dies between claim and
submission loses that run (its entry shows no task) rather than ever firing it twice.

Runs missed while no broker was up fire once when one is back; the next is the first time of the
schedule after that (``schedule.next_run``), so there is no burst. A timer whose endpoint or
function is gone (deleted, or no longer shared with its creator) is stopped, saying which. The
loop outlives store and queue outages: it logs, backs off and tries again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from farcall.backoff import Backoff
from farcall.broker import schedule
from farcall.broker.errors import ApiError
from farcall.broker.records import TimerRecord
from farcall.broker.services import Services
from farcall.broker.submission import NotUsable, submit_batch
from farcall.protocol.common import now
from farcall.protocol.rest import BatchSubmission, TaskSpec
from farcall.protocol.timers import TimerRun
from farcall.quietlog import QuietLog

log = logging.getLogger(__name__)

POLL_PERIOD = 0.25
"""Seconds between looks for due timers: how late a run may fire."""
BATCH = 100
"""Due timers fired per look; with more due, the next look follows at once."""
TROUBLE_LOG_EVERY = 30.0
"""A failing look (the store down) is logged at WARNING at most this often."""
STOP_GRACE = 5.0
"""Seconds ``stop`` lets the runs being fired finish before it cancels them."""


class TimerScheduler:
    """The loop of one broker process: ``start`` it once the services are up, ``stop`` it
    before they close."""

    def __init__(self, svc: Services, period: float = POLL_PERIOD, batch: int = BATCH) -> None:
        self.svc, self.period, self.batch = svc, period, batch
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._trouble = QuietLog(log, TROUBLE_LOG_EVERY, logging.WARNING)

    def start(self) -> None:
        self._stopping = asyncio.Event()  # of this loop: an app may be started again on another
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="timer-scheduler")

    async def stop(self) -> None:
        """Stop after the runs being fired are submitted (cancelled past ``STOP_GRACE``), so a
        graceful shutdown never leaves a claimed run without its task."""
        task, self._task = self._task, None
        if task is None:
            return
        self._stopping.set()
        try:
            await asyncio.wait_for(asyncio.shield(task), STOP_GRACE)
        except TimeoutError:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _loop(self) -> None:
        backoff = Backoff(cap=5.0)
        while not self._stopping.is_set():
            try:
                due = await self.tick(now())
            except Exception as e:  # noqa: BLE001 - the store may be down: try again later
                self._trouble("timers: cannot fire due timers (%r); trying again", e)
                await self._pause(max(self.period, backoff.next_delay()))
                continue
            backoff.reset()
            if due < self.batch:
                await self._pause(self.period)

    async def _pause(self, seconds: float) -> None:
        """Wait ``seconds``, or less if ``stop`` is called."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    async def tick(self, at: float) -> int:
        """Fire the timers due at ``at`` (up to ``batch``); how many were due. Raises when
        the store does not answer."""
        timers = await self.svc.store.timers.due(at, self.batch)
        failed: Exception | None = None
        for timer in timers:
            if self._stopping.is_set():
                break
            try:
                await self.fire(timer, at)
            except Exception as e:  # noqa: BLE001 - one timer's trouble must not stop the others
                failed = e
        if failed is not None:
            raise failed
        return len(timers)

    async def fire(self, timer: TimerRecord, at: float) -> TimerRun | None:
        """Claim the timer's due run and submit its task; the run, or None when another
        replica claimed it (or the timer changed meanwhile)."""
        store = self.svc.store.timers
        assert timer.next_run is not None, "due timers are active, with a next run"
        run = await store.claim(timer.timer_id, timer.next_run,
                                schedule.next_run(timer.schedule, at), at,
                                timer.schedule.stop_after_runs)
        if run is None:
            return None
        batch = BatchSubmission(
            endpoint_id=timer.endpoint_id, submitter=timer.submitter,
            tasks=[TaskSpec(function_id=timer.function_id, args=timer.args)])
        try:
            answer = await submit_batch(self.svc, timer.user_id, batch)
        except NotUsable as e:
            run.error = (f"{e.what} was deleted or is no longer shared with you; the timer cannot "
                         "run it. Create a new timer")
            await store.attach(timer.timer_id, run)
            await store.stop(timer.timer_id, run.error)
            log.info("timer %s stopped at run %d: %s", timer.timer_id, run.number, run.error)
            return run
        except ApiError as e:  # the open-task quota: this run is lost, the next ones may go
            run.error = e.message
        except Exception as e:  # noqa: BLE001 - the queue or store failed: this run is lost
            run.error = f"the broker could not submit this run's task ({type(e).__name__}: {e})"
            log.warning("timer %s run %d: %s", timer.timer_id, run.number, run.error)
        else:
            run.task_id = answer.task_ids[0]
        await store.attach(timer.timer_id, run)
        return run
