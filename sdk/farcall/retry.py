"""``Retry`` and ``exchange``: the one policy for an HTTP request the broker may not answer now.

The SDK's REST calls (``Client.exchange``), its data-plane transfers and a worker's
(``farcall.blobs``, ``farcall.endpoint.dataplane``) all go through :func:`exchange`: while
the broker cannot be reached, or answers a status that can change, it backs off with jitter
(:class:`~farcall.backoff.Backoff`) and sends again; a 429 waits what the broker asks; all
within one budget of seconds counted from the first failure, so a broker restart costs a
wait, not a failed task. Standard library and the SDK's own small modules only: a worker
imports it.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import Any

from farcall.backoff import Backoff
from farcall.errors import FarcallError, RateLimited, seconds_or_none
from farcall.quietlog import QuietLog
from farcall.transport import Response, TransportError

log = logging.getLogger(__name__)

DEFAULT_RETRY_AFTER = 1.0
"""Seconds to wait after a 429 whose body does not say (the broker normally does)."""
MIN_RETRY_AFTER = 0.05
"""A 429 is never resent sooner than this, whatever the broker says, so the client cannot spin."""
RATE_WARNING_EVERY = 60.0
"""A caller says it is being rate limited at WARNING at most this often (else at DEBUG)."""
RETRY_WARNING_EVERY = 10.0
"""A caller says it is retrying at WARNING at most this often (else at DEBUG)."""
BACKOFF_CAP = 5.0
"""The longest wait between two attempts while the broker is unreachable or unavailable."""

Say = Callable[..., None]
"""Where a retry's log lines go: ``say(message, *args)``, usually a :class:`QuietLog`."""


def unavailable(status: int) -> bool:
    """The statuses a REST call is sent again after: 503 (the broker's store or queue is away;
    it took nothing)."""
    return status == 503


def server_error(status: int) -> bool:
    """The statuses a data-plane transfer is sent again after: every 5xx (a restarting broker,
    a proxy in front of it). A transfer may be repeated: an upload makes a new blob each time."""
    return 500 <= status < 600


class Retry:
    """One request's retry budget of ``seconds``, counted from its first failure.

    While the broker cannot be reached or answers a status that can change it backs off
    with jitter (:meth:`wait`); a 429 waits what the broker asks (:meth:`wait_rate_limited`).
    Both spend the same budget, so no request retries much longer than ``seconds`` after
    it first failed. ``say`` and ``rate_warning`` take the log lines (a :class:`QuietLog`
    a caller shares among its requests keeps many retrying at once from filling a log).
    """

    def __init__(self, seconds: float, rate_warning: Say | None = None, say: Say | None = None) -> None:
        self.seconds = seconds
        self.started: float | None = None
        """When the first failure was seen (``time.monotonic``); None while none was."""
        self.attempts = 0
        """Waits so far: attempts made again."""
        self._backoff = Backoff(cap=BACKOFF_CAP)
        self._say = say or QuietLog(log, RETRY_WARNING_EVERY, logging.WARNING, rest=logging.DEBUG)
        self._rate_warning = rate_warning or QuietLog(log, RATE_WARNING_EVERY, logging.WARNING,
                                                      rest=logging.DEBUG)

    def _affords(self, delay: float) -> bool:
        now = time.monotonic()
        if self.started is None:
            self.started = now
        return now + delay <= self.started + self.seconds

    def wait(self, why: str, url: str) -> bool:
        """Sleep before the next attempt; False when the time is up."""
        delay = self._backoff.next_delay()
        if not self._affords(delay):
            return False
        self.attempts += 1
        self._say("broker at %s: %s; retrying for up to %g s", url, why, self.seconds)
        time.sleep(delay)
        return True

    def wait_rate_limited(self, error: str, retry_after: float | None, url: str) -> bool:
        """After a 429: sleep the ``retry_after`` seconds the broker asked (a little more, so
        clients told the same do not come back together); False when that passes the budget."""
        delay = DEFAULT_RETRY_AFTER if retry_after is None else max(MIN_RETRY_AFTER, retry_after)
        delay *= random.uniform(1.0, 1.1)
        if not self._affords(delay):
            return False
        self.attempts += 1
        why = ("the open-task quota is reached" if error == "quota_exceeded"
               else "the broker is rate limiting this token")
        self._rate_warning("broker at %s: %s; waiting %.1f s before sending again "
                           "(for up to %g s in all)", url, why, delay, self.seconds)
        time.sleep(delay)
        return True

    def rate_limited(self, error: str, message: str, retry_after: float | None,
                     body: Any = None) -> RateLimited:
        """The error to raise once :meth:`wait_rate_limited` gave up."""
        waited = 0.0 if self.started is None else time.monotonic() - self.started
        then = "" if retry_after is None else f" (it asks to wait {retry_after:g} s more)"
        if error == "quota_exceeded":
            said = f" ({message})" if message else ""
            text = (f"your quota of open tasks is reached{said}; waited {waited:.1f} s"
                    f"{then}. Wait for tasks to finish (or cancel some), or ask the broker's "
                    "operator to raise FARCALL_MAX_OPEN_TASKS")
        else:
            text = (f"the broker rate limited this token for {waited:.1f} s{then}; send "
                    "requests less often (bigger batches), or ask the broker's operator to "
                    "raise FARCALL_RATE_LIMIT")
        return RateLimited(429, text, error, body, retry_after)


def exchange(
    send: Callable[[], Response],
    retry: Retry,
    url: str,
    unreachable: Callable[[TransportError], FarcallError],
    transient: Callable[[int], bool] = unavailable,
) -> Response:
    """The answer of ``send`` (one HTTP request), made again within ``retry``'s budget while
    the broker cannot be reached (``TransportError``: refused, reset, timed out, cut off), answers
    a ``transient`` status, or rate limits (429). Past the budget: ``unreachable(error)`` is
    raised, a 429 raises ``RateLimited``, any other answer is returned as it is."""
    while True:
        try:
            answer = send()
        except TransportError as e:
            if retry.wait(f"{type(e).__name__}: {e}", url):
                continue
            raise unreachable(e) from None
        if transient(answer.status) and retry.wait(f"{answer.status} {answer.reason}", url):
            continue
        if answer.status == 429:
            error, message, retry_after, refusal = rate_limit_of(answer)
            if retry.wait_rate_limited(error, retry_after, url):
                continue
            raise retry.rate_limited(error, message, retry_after, refusal)
        if retry.attempts:
            log.info("broker at %s answered %s after %d retries in %.1f s", url, answer.status,
                     retry.attempts, time.monotonic() - (retry.started or 0.0))
        return answer


def rate_limit_of(answer: Response) -> tuple[str, str, float | None, Any]:
    """``(error, message, retry_after, body)`` of a 429 answer.

    The wait is read from the body's ``retry_after`` (the broker sends it there as well
    as in the ``Retry-After`` header); None when the body has none.
    """
    try:
        body = answer.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        return "rate_limited", answer.text[:200], None, body
    error = str(body.get("error") or "rate_limited")
    return error, str(body.get("message", "")), seconds_or_none(body.get("retry_after")), body
