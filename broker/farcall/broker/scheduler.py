"""``TimerScheduler``: fires the runs of timers that are due, each once across broker replicas.

Every replica runs one (a ``periodic.Periodic``). A few times a second it asks the store for the
timers due (one cheap call when none is), claims each due run (``TimerStore.claim``, a compare
and set: of the replicas that saw the run due, one gets it) and submits the run's task through
``submission.submit_batch``, as ``POST /v1/tasks`` does for the timer's creator, so the same
access checks apply at every run. The submission's ``request_id`` names the run
(``timer:<timer id>:<number>``), so it creates the run's task once however often it is sent: a
replica that dies between claiming a run and attaching its task leaves the run among the
store's ``unsubmitted``, and a replica's sweep (after ``FARCALL_REQUEUE_AFTER``) submits it again
and attaches the task, whether the first submission got through or not. A run never shows "no
task" for a task that ran, and never fires twice.

Runs missed while no broker was up fire once when one is back; the next is the first time of the
schedule after that (``schedule.next_run``), so there is no burst. A timer whose endpoint or
function is gone (deleted, or no longer shared with its creator) is stopped, saying which.

A timer acts for its owner, so it runs only while they could: a timer whose owner was disabled,
or has no valid token left (every one revoked), is paused with a reason that says so instead of
firing (the owner resumes it once they can act again). Each run counts against its owner's rate
limit (``FARCALL_RATE_LIMIT``) on the replica that fires it, as a request would; a run over the
limit is recorded with an error saying so, and the next one keeps to the schedule (a delayed run
would pile up behind the limit it is over).
"""

from __future__ import annotations

import logging

from farcall.broker import access, schedule
from farcall.broker.cache import TTLCache
from farcall.broker.errors import ApiError
from farcall.broker.periodic import Periodic
from farcall.broker.records import TimerRecord
from farcall.broker.services import Services
from farcall.broker.submission import NotUsable, submit_batch
from farcall.protocol.rest import BatchSubmission, TaskSpec
from farcall.protocol.timers import TimerRun

log = logging.getLogger(__name__)

POLL_PERIOD = 0.25
"""Seconds between looks for due timers: how late a run may fire."""
BATCH = 100
"""Due timers fired per look; with more due, the next look follows at once."""
SWEEP_EVERY = 5.0
"""Most seconds between looks for claimed runs left without their task."""
STANDING_SECONDS = 1.0
"""How long a replica trusts what it read of a timer owner's standing (disabled? any token
left?): a user's thousand timers cost one look a second, not one a run."""


class TimerScheduler(Periodic):
    """The loop of one broker process: ``start`` it once the services are up, ``stop`` it
    before they close (a run being fired gets its task first)."""

    name = "timer-scheduler"

    def __init__(self, svc: Services, period: float = POLL_PERIOD, batch: int = BATCH) -> None:
        super().__init__(period, log)
        self.svc, self.batch = svc, batch
        self._next_sweep = 0.0
        self._standing = TTLCache[str, str](STANDING_SECONDS)
        """User id -> why their timers may not run (``""``: they may), asked once a second."""

    async def step(self, at: float) -> bool:
        due = await self.tick(at)
        if at >= self._next_sweep:
            self._next_sweep = at + min(SWEEP_EVERY, self.svc.settings.requeue_after / 2)
            await self.resubmit(at)
        return due >= self.batch

    async def tick(self, at: float) -> int:
        """Fire the timers due at ``at`` (up to ``batch``); how many were due. Raises when
        the store does not answer."""
        timers = await self.svc.store.timers.due(at, self.batch)
        failed: Exception | None = None
        for timer in timers:
            if self.stopping:
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
        replica claimed it (or the timer changed meanwhile), or when the timer's owner may not
        act now (disabled, or no valid token left): the timer is paused saying so instead."""
        store = self.svc.store.timers
        assert timer.next_run is not None, "due timers are active, with a next run"
        why = self._standing.get(timer.user_id)
        if why is None:
            why = await access.timer_owner_standing(self.svc.store, timer.user_id)
            self._standing.put(timer.user_id, why)
        if why:
            if await store.pause(timer.timer_id, why):
                log.info("timer %s paused: %s", timer.timer_id, why)
            return None
        run = await store.claim(timer.timer_id, timer.next_run,
                                schedule.next_run(timer.schedule, at), at,
                                timer.schedule.stop_after_runs)
        if run is None:
            return None
        if self.svc.charge_user(timer.user_id):
            run.error = (f"this run was skipped: its owner is over the broker's limit of "
                         f"{self.svc.settings.rate_limit:g} requests per second (FARCALL_RATE_LIMIT, "
                         "which timers' runs count against); the next run keeps to the schedule")
            await store.attach(timer.timer_id, run)
            return run
        return await self._submit(timer, run)

    async def resubmit(self, at: float) -> int:
        """Submit (again) the task of each run claimed more than ``FARCALL_REQUEUE_AFTER`` ago
        and still without it; how many there were."""
        store = self.svc.store.timers
        found = await store.unsubmitted(at - self.svc.settings.requeue_after, at, self.batch)
        for timer_id, number in found:
            timer = await store.get(timer_id)
            run = next((r for r in timer.runs if r.number == number), None) if timer else None
            if timer is None or run is None or run.task_id or run.error:
                # Gone, or attached meanwhile: only its place among the unsubmitted goes.
                await store.attach(timer_id, run or TimerRun(number=number, at=at))
                continue
            log.info("timer %s run %d was claimed but not submitted; submitting it", timer_id,
                     number)
            await self._submit(timer, run)
        return len(found)

    async def _submit(self, timer: TimerRecord, run: TimerRun) -> TimerRun:
        """Submit the run's task under the run's request id and attach it (or why not)."""
        store = self.svc.store.timers
        batch = BatchSubmission(
            endpoint_id=timer.endpoint_id, submitter=timer.submitter,
            request_id=f"timer:{timer.timer_id}:{run.number}",
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
        except Exception as e:  # noqa: BLE001 - the store failed: the sweep sends it again
            log.warning("timer %s run %d: cannot submit its task now (%s: %s); it is sent again "
                        "in %g s", timer.timer_id, run.number, type(e).__name__, e,
                        self.svc.settings.requeue_after)
            return run
        else:
            run.task_id = answer.task_ids[0]
        await store.attach(timer.timer_id, run)
        return run
