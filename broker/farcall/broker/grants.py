"""Data-plane grants: what lets an endpoint's workers move one task's blobs without the
endpoint's credential.

A worker runs user code, so it holds neither the credential nor anything that outlives its
task. The endpoint's ``Welcome`` carries a grant *key*: HMAC-SHA256 of
``grant-key:<endpoint id>:<credential hash>`` under the blob store's secret (shared by every
replica), so replacing the credential (or deleting the endpoint) voids every grant made with
it. The agent derives each task's grant from it (:func:`farcall.blobs.task_grant`:
``<endpoint id>:<task id>:<HMAC(key, task id)>``) and hands the worker only that.

A grant is honoured only while its task is in flight on its endpoint and not finished
(cancelled, failed, done): it uploads blobs charged to the task's submitter, and downloads
the task's own argument blob, nothing else. Sent as ``X-Farcall-Grant``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from dataclasses import dataclass

from farcall.blobs import task_grant
from farcall.broker.errors import Forbidden, TooManyRequests, Unauthorized, clip
from farcall.broker.services import Services
from farcall.errors import DeserializationError
from farcall.serialize import is_ref, parse_ref

HEADER = "X-Farcall-Grant"


@dataclass(frozen=True)
class Grant:
    """A grant found valid: the task it was made for."""

    endpoint_id: str
    task_id: str
    user_id: str
    """The task's submitter: what an upload with the grant is charged to."""
    args_blob: str
    """The blob holding the task's arguments ("" when they travel inline): all it may read."""


def grant_key(secret: bytes, endpoint_id: str, credential_hash: str) -> bytes:
    """The key the agent of ``endpoint_id`` derives its tasks' grants from."""
    return hmac.new(secret, f"grant-key:{endpoint_id}:{credential_hash}".encode(),
                    hashlib.sha256).digest()


async def welcome_key(svc: Services, endpoint_id: str, credential_hash: str) -> str:
    """The grant key the endpoint's ``Welcome`` carries (urlsafe base64), for the credential
    its session authenticated with."""
    key = grant_key(await svc.blobs.secret(), endpoint_id, credential_hash)
    return base64.urlsafe_b64encode(key).decode("ascii")


async def check(svc: Services, value: str, address: str) -> Grant:
    """The task whose grant ``value`` is. ``Unauthorized`` if it is forged, malformed or made
    with a credential the endpoint no longer has (``TooManyRequests`` after too many failures
    from ``address``, as for tokens); ``Forbidden`` if its task is not in flight any more."""
    parts = value.strip().split(":")
    if len(parts) == 3 and all(parts):
        endpoint_id, task_id, given = parts
        credential = await svc.store.endpoints.credential_hash(endpoint_id)
        if credential is None:
            why = f"the endpoint of this {HEADER} was deleted; its workers may not use blobs"
        else:
            key = grant_key(await svc.blobs.secret(), endpoint_id, credential)
            if hmac.compare_digest(task_grant(endpoint_id, key, task_id).encode(),
                                   value.strip().encode()):
                return await _in_flight(svc, endpoint_id, task_id)
            why = (f"the {HEADER} header is not a grant this broker gave, or the endpoint's "
                   "credential was replaced since; the endpoint must reconnect")
    else:
        why = (f"the {HEADER} header must be '<endpoint id>:<task id>:<grant>', made by the "
               "endpoint's agent for the task (an agent older than the broker sends "
               "another form: upgrade it)")
    wait = svc.auth_failures.take(address)
    if wait:
        raise TooManyRequests(
            "too many requests with a wrong token or grant from this address; wait, and check "
            "the credentials", wait)
    raise Unauthorized(why)


async def _in_flight(svc: Services, endpoint_id: str, task_id: str) -> Grant:
    body = await svc.store.inflight.task(endpoint_id, task_id)
    record = (await svc.store.tasks.get_many([task_id]))[0] if body is not None else None
    if body is None or record is None or record.endpoint_id != endpoint_id \
            or record.state.terminal:
        raise Forbidden(f"task {clip(task_id)} is not running on endpoint {clip(endpoint_id)} "
                        "any more (it finished or was cancelled); its grant ended with it")
    return Grant(endpoint_id, task_id, record.user_id, _args_blob(body))


def _args_blob(task_json: str) -> str:
    try:
        args = json.loads(task_json).get("args", "")
        return parse_ref(args)[0] if isinstance(args, str) and is_ref(args) else ""
    except (ValueError, AttributeError, DeserializationError):
        return ""
