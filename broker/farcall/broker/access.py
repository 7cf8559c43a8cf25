"""Taking access away, and everything that goes with it: a user an administrator disables
(``farcall-broker users disable``), a user who loses an endpoint (its owner unshared it, or they
left it), a timer whose owner can no longer act.

Each change is made in the store first, then told to every replica on the revocations channel
(``TokenRevocation``, ``AccessRevoked``) so their caches forget it at once, and what the user
left running is ended: their tasks are cancelled with an error that says why (their futures
raise ``CancelledError`` with it), their timers paused with a reason.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from farcall.broker.endpoint_control import cancel_in, cancel_tasks
from farcall.broker.records import UserRecord
from farcall.broker.services import Services
from farcall.broker.store.base import Cancelled, Store
from farcall.protocol.control import AccessRevoked, EndpointRefused, TokenRevocation

log = logging.getLogger(__name__)

DISABLED_TASK = ("the task was cancelled because its submitter was disabled by the broker's "
                 "administrator")
DISABLED_TIMER = ("its owner was disabled by the broker's administrator; once enabled again, "
                  "resume it")
DISABLED_ENDPOINT = "the endpoint's owner was disabled by the broker's administrator"
NO_TOKEN_TIMER = ("its owner has no valid token left (every one was revoked); with a new token "
                  "from the broker's operator, resume it")


def unshared_task(endpoint_id: str) -> str:
    """The error of a task cancelled because its owner unshared the endpoint with its submitter."""
    return (f"the task was cancelled because the owner of endpoint {endpoint_id} stopped sharing "
            "it with you (unshare)")


def left_task(endpoint_id: str) -> str:
    """The error of a task cancelled because its submitter left the endpoint."""
    return f"the task was cancelled because you left endpoint {endpoint_id}"


@dataclass(frozen=True)
class Disabled:
    """What ``disable`` did, in numbers."""

    tokens: int
    endpoints: int
    timers: int
    tasks: int


async def disable(store: Store, user: UserRecord) -> Disabled:
    """Disable ``user``: their tokens and the credentials of the endpoints they own are refused
    on every replica at once (result streams opened with the tokens close, the endpoints' live
    sessions end, so their agents stop), their active timers are paused saying why, and their
    tasks still waiting or running are cancelled.

    Tokens, endpoints and timers are kept: ``set_disabled(..., False)`` makes the tokens and
    credentials work again; the timers stay paused until their owner resumes them, and the
    agents must be started again. Tasks other users queued on the user's endpoints wait, as
    they would for an endpoint that is offline. Running it again finishes what a first run
    that failed midway left.
    """
    uid = user.user_id
    await store.users.set_disabled(uid, True)
    paused = 0
    for timer in await store.timers.by_user(uid):
        if timer.state == "active" and await store.timers.pause(timer.timer_id, DISABLED_TIMER):
            paused += 1
    # Cancelled before the tokens' revocations are broadcast: the cancellations reach the user's
    # open result streams (pub/sub keeps one publisher's order), so their futures say why.
    cancelled = len((await cancel_in(store, None, await store.tasks.open_task_ids(uid),
                                     error=DISABLED_TASK)).results)
    tokens = await store.users.list_tokens(uid)
    for t in tokens:
        await store.pubsub.publish_revocation(
            TokenRevocation(token_id=t.token_id, token_hash=t.token_hash))
    owned = [e.endpoint_id for e in await store.endpoints.list(uid) if e.user_id == uid]
    for endpoint_id in owned:
        await store.pubsub.publish_control(endpoint_id, EndpointRefused(reason=DISABLED_ENDPOINT))
    # Submitted meanwhile with a token a replica still had cached (for a few milliseconds):
    cancelled += len((await cancel_in(store, None, await store.tasks.open_task_ids(uid),
                                      error=DISABLED_TASK)).results)
    log.info("user %s disabled: %d tokens, %d endpoints refused, %d timers paused, %d tasks "
             "cancelled", uid, len(tokens), len(owned), paused, cancelled)
    return Disabled(len(tokens), len(owned), paused, cancelled)


async def withdraw(svc: Services, user: str, endpoint_id: str, why: str) -> Cancelled:
    """``user`` may no longer use ``endpoint_id`` (call it after the store's change): every
    replica forgets who may use it, so their next submission is refused, and the tasks ``user``
    has waiting or running there are cancelled, saying ``why``.

    A submission another replica accepted in the same instant may still land: the one task the
    withdrawal cannot see (its owner can cancel it, ``POST /v1/tasks/cancel``). For a
    multi-user endpoint, the user's tasks on its user endpoints are cancelled too.
    """
    await svc.store.pubsub.publish_revocation(AccessRevoked(type="access", endpoint_id=endpoint_id))
    svc.endpoint_access.pop(endpoint_id)
    places = {endpoint_id} | {c.endpoint_id for c in await svc.store.endpoints.children(endpoint_id)
                              if c.for_user == user}
    open_ids = await svc.store.tasks.open_task_ids(user)
    there = [r.task_id for r in await svc.store.tasks.summaries(open_ids)
             if r is not None and r.endpoint_id in places]
    return await cancel_tasks(svc, None, there, error=why)


async def timer_owner_standing(store: Store, user_id: str) -> str:
    """Why ``user_id``'s timers may not run now (disabled, or no valid token left), or ``""``."""
    user = await store.users.get(user_id)
    if user is not None and user.disabled:
        return DISABLED_TIMER
    if await store.users.token_count(user_id) == 0:
        return NO_TOKEN_TIMER
    return ""
