"""Where an endpoint is told to cancel, to give way to a newer session, that it was deleted, that
its credential was replaced, or to stop.

Each is a typed message (``farcall.protocol.control``) on the endpoint's pub/sub control
channel, so it reaches the live channel session on whichever replica holds it. Cancelling
and deleting change the store first (the tasks are final before any endpoint hears of it),
and publish the results the broker decided. Token revocation, the other control message,
is ``auth.revoke_token``.
"""

from __future__ import annotations

from farcall.broker import auth
from farcall.broker.queued import queued_task_ids
from farcall.broker.results import publish_final, publish_results
from farcall.broker.services import Services
from farcall.broker.sessions import LiveSession
from farcall.broker.store.base import CANCELLED_ERROR, Cancelled, Store
from farcall.protocol.common import now
from farcall.protocol.control import (
    CancelTasks,
    ControlMessage,
    CredentialRotated,
    EndpointRemoved,
    EndpointStopRequested,
    SessionReplaced,
)


async def send_control(svc: Services, endpoint_id: str, message: ControlMessage) -> None:
    """Tell the endpoint's live session, on whichever replica."""
    await svc.store.pubsub.publish_control(endpoint_id, message)


async def cancel_tasks(svc: Services, user: str | None, task_ids: list[str],
                       only_queued: bool = False, error: str = CANCELLED_ERROR) -> Cancelled:
    """Cancel the tasks among ``task_ids`` that ``user`` submitted or that wait or run on an
    endpoint ``user`` owns (any, with ``user`` None), and are not final (with ``only_queued``:
    not running either); what was cancelled and why the others were not.

    The one way the broker cancels (``POST /v1/tasks/cancel``, an action's cancel, an unshare,
    a disabled user): a cancelled task is final at once, its result stream hears of it (its
    future raises ``CancelledError`` saying ``error``), and each endpoint holding some of them
    is told to drop or stop them.
    """
    return await cancel_in(svc.store, user, task_ids, only_queued, error)


async def cancel_in(store: Store, user: str | None, task_ids: list[str],
                    only_queued: bool = False, error: str = CANCELLED_ERROR) -> Cancelled:
    """``cancel_tasks`` for callers that hold only the store (``farcall-broker users``)."""
    done = await store.tasks.cancel(user, task_ids, only_queued, now(), error)
    await publish_final(store.pubsub, [(group, result) for group, _, result in done.results])
    by_endpoint: dict[str, list[str]] = {}
    for _, endpoint_id, result in done.results:
        by_endpoint.setdefault(endpoint_id, []).append(result.task_id)
    for endpoint_id, ids in by_endpoint.items():
        await store.pubsub.publish_control(endpoint_id, CancelTasks(task_ids=ids))
    return done


async def replace_session(
    svc: Services, endpoint_id: str, session: LiveSession, previous: str | None
) -> None:
    """Make ``session`` the one this replica sends the endpoint's new tasks to, and end
    ``previous`` (the session the store had as live before ``session`` connected): here at
    once, else through the control channel, on whichever replica holds it."""
    old = svc.sessions.take_over(endpoint_id, session)
    if not previous or previous == session.session_id:
        return
    if old is not None and old.session_id == previous:
        await old.replaced()
    else:  # on another replica, or already gone
        await send_control(svc, endpoint_id, SessionReplaced(session_id=session.session_id))


async def delete_endpoint(svc: Services, endpoint_id: str) -> None:
    """Delete the endpoint: its credential stops working, its session ends, every task still
    waiting for it (queued or in flight) fails saying why, and its queue goes. A multi-user
    endpoint's user endpoints go first, each the same way."""
    for child in await svc.store.endpoints.children(endpoint_id):
        await delete_endpoint(svc, child.endpoint_id)
    waiting = queued_task_ids(await svc.queue.drain(endpoint_id))  # 503 here changes nothing yet
    waiting += list(await svc.store.inflight.get(endpoint_id))
    await svc.store.endpoints.delete(endpoint_id)
    svc.endpoint_access.pop(endpoint_id)
    svc.managers.pop(endpoint_id)
    svc.user_endpoints.pop(endpoint_id)
    await send_control(svc, endpoint_id, EndpointRemoved())
    waiting += queued_task_ids(await svc.queue.drain(endpoint_id))  # queued while we deleted
    error = (f"endpoint {endpoint_id} was deleted before this task finished; submit it to "
             "another endpoint")
    await publish_results(svc, await svc.store.tasks.fail(waiting, error, now()))
    await svc.queue.delete(endpoint_id)


async def stop_endpoint(svc: Services, endpoint_id: str) -> None:
    """Ask the endpoint's agent to stop: its session ends (``STOPPED_CLOSE_CODE``) on whichever
    replica holds it, and the agent finishes its running tasks, sends their results and exits.
    Its queue stays: tasks submitted meanwhile wait for its next start."""
    await send_control(svc, endpoint_id, EndpointStopRequested())


async def rotate_credential(svc: Services, endpoint_id: str) -> str | None:
    """Give the endpoint a new credential and return it (None: no such endpoint). The old one is
    refused from the store's swap on, on every replica (endpoint credentials are never cached),
    and the sessions opened with it end (``CredentialRotated``), so a copy of it is worth
    nothing; the agent whose ``endpoint.json`` holds the new one reconnects with it."""
    credential = auth.new_token(auth.ENDPOINT_PREFIX)
    old = await svc.store.endpoints.rotate_credential(endpoint_id, auth.token_hash(credential))
    if old is None:
        return None
    await send_control(svc, endpoint_id, CredentialRotated(old_hash=old))
    return credential
