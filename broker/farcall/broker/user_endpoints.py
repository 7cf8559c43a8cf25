"""Starting user endpoints: where a multi-user endpoint's tasks go, and how its manager hears
that one of its user endpoints is wanted.

A manager (an agent whose hello says ``multi_user``) runs no task itself. A batch submitted to
it is checked against the JSON Schema the manager published (422 with the schema's own
message), then goes to the **user endpoint** for (manager, submitter, configuration): an
ordinary endpoint record with its own queue, owned by the manager's owner and shared with the
submitter alone. Its id is a UUID5 of those three, so every replica finds the same one without
asking another; its credential is derived from the manager's (``derive_credential``), so every
start of it carries the same one until the manager's credential is rotated.

While tasks wait for a user endpoint that has no session, its manager's session (on whichever
replica) is told, once per ``Settings.user_endpoint_start_seconds`` however many batches and
replicas ask (``EndpointStore.claim_start``): by ``UserEndpointWanted`` on the manager's control
channel when tasks arrive, and by the manager's session itself at its hello and at each
heartbeat for every user endpoint with open work (a start lost while the manager was offline,
a user endpoint that crashed).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import jsonschema
import jsonschema.exceptions
import jsonschema.protocols
import jsonschema.validators

from farcall.broker import auth
from farcall.broker.errors import MAX_DETAILS, ObjectNotFound, Unprocessable, clip
from farcall.broker.records import EndpointRecord
from farcall.protocol.channel import StartUserEndpoint
from farcall.protocol.common import now
from farcall.protocol.control import CredentialRotated, UserEndpointWanted

if TYPE_CHECKING:
    from farcall.broker.services import Services

log = logging.getLogger(__name__)

NAMESPACE = uuid.UUID("7d0c5b52-3f4e-4b8a-9c61-2e8f0a6d1b37")
"""The UUID5 namespace of user endpoint ids (fixed: ids must not change across releases)."""


def config_hash(config: dict[str, Any]) -> str:
    """The SHA-256 (hex) of ``config`` as canonical JSON: what names a configuration."""
    text = json.dumps(config, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def user_endpoint_id(manager_id: str, user_id: str, digest: str) -> str:
    """The id of the manager's user endpoint for ``user_id`` with the configuration ``digest``."""
    return str(uuid.uuid5(NAMESPACE, f"{manager_id}:{user_id}:{digest}"))


def derive_credential(secret: bytes, endpoint_id: str, manager_credential_hash: str) -> str:
    """The user endpoint's credential: an HMAC under the deployment's secret (the blob store's,
    shared by every replica) of its id and its manager's credential hash. Only the broker can
    make it; a new manager credential makes new ones (and the old ones stop working)."""
    mac = hmac.new(secret, f"user-endpoint:{endpoint_id}:{manager_credential_hash}".encode(),
                   hashlib.sha256).digest()
    return auth.ENDPOINT_PREFIX + base64.urlsafe_b64encode(mac).rstrip(b"=").decode()


def schema_problem(schema: dict[str, Any] | None) -> str:
    """Why ``schema`` is not a JSON Schema the broker can check values with ("" when it is)."""
    if schema is None:
        return ""
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.exceptions.SchemaError as e:
        return f"{e.message} (at {'/'.join(str(p) for p in e.absolute_path) or 'the top'})"
    return ""


@dataclass(frozen=True)
class Manager:
    """What routing a batch to a manager's user endpoints needs, cached per replica
    (``Services.managers``)."""

    record: EndpointRecord
    validator: jsonschema.protocols.Validator | None

    @classmethod
    def of(cls, record: EndpointRecord) -> Manager:
        schema = record.user_config_schema
        if schema is None or schema_problem(schema):
            return cls(record, None)  # a bad one never gets past the hello
        return cls(record, jsonschema.validators.validator_for(schema)(schema))

    def check(self, config: dict[str, Any]) -> None:
        """Raise ``Unprocessable`` with the schema's own messages when ``config`` breaks it."""
        if self.validator is None:
            return
        errors = sorted(self.validator.iter_errors(config), key=jsonschema.exceptions.relevance)
        if not errors:
            return
        best = jsonschema.exceptions.best_match(errors)
        assert best is not None
        where = "/".join(str(p) for p in best.absolute_path)
        raise Unprocessable(
            f"user_endpoint_config does not fit the schema of multi-user endpoint "
            f"{self.record.endpoint_id}: {clip(best.message, 200)}"
            f"{f' (at {clip(where)})' if where else ''}; fix the value and submit again",
            detail=[{"type": "user_endpoint_config",
                     "loc": ["body", "user_endpoint_config",
                             *[p if isinstance(p, int) else clip(p) for p in e.absolute_path]],
                     "msg": clip(e.message, 200)} for e in errors[:MAX_DETAILS]])


async def manager(svc: Services, manager_id: str) -> Manager:
    """The manager's record and schema (from the replica's cache when it has them)."""
    found = svc.managers.get(manager_id)
    if found is None:
        record = await svc.store.endpoints.get(manager_id)
        if record is None:
            raise ObjectNotFound(f"endpoint {clip(manager_id)} not found; list yours (and those "
                                 "shared with you) with GET /v1/endpoints")
        found = Manager.of(record)
        svc.managers.put(manager_id, found)
    return found


async def route(svc: Services, user: str, manager_id: str, config: dict[str, Any]) -> str:
    """The id of the user endpoint that runs ``user``'s tasks sent to ``manager_id`` with
    ``config``, made if it is new: ``Unprocessable`` when ``config`` breaks the manager's schema.
    A replica that made (or saw) it lately asks the store nothing."""
    found = await manager(svc, manager_id)
    found.check(config)
    digest = config_hash(config)
    child_id = user_endpoint_id(manager_id, user, digest)
    if svc.user_endpoints.get(child_id) is not None:
        return child_id
    ep = found.record
    manager_hash = await svc.store.endpoints.credential_hash(manager_id) or ""
    credential = derive_credential(await svc.blobs.secret(), child_id, manager_hash)
    child = EndpointRecord(
        endpoint_id=child_id, user_id=ep.user_id, name=f"{ep.name}.{child_id[:8]}",
        description=f"user endpoint of {ep.name} ({manager_id})", created_at=now(),
        parent_id=manager_id, for_user=user, user_endpoint_config=config, config_hash=digest)
    await svc.queue.declare(child_id)
    if not await svc.store.endpoints.ensure_user_endpoint(child, auth.token_hash(credential)):
        svc.managers.pop(manager_id)
        raise ObjectNotFound(f"endpoint {clip(manager_id)} not found; it was deleted")
    svc.user_endpoints.put(child_id, manager_id)
    return child_id


async def want(svc: Services, manager_id: str, child_id: str) -> None:
    """Tasks wait for the user endpoint: unless it is connected or its manager was asked lately,
    ask its manager (its session, on whichever replica) to start it."""
    if await svc.store.endpoints.claim_start(child_id, svc.settings.user_endpoint_start_seconds):
        await svc.store.pubsub.publish_control(manager_id, UserEndpointWanted(user_endpoint_id=child_id))


async def start_frame(svc: Services, manager_id: str, manager_credential_hash: str,
                      child_id: str) -> StartUserEndpoint | None:
    """What the manager needs to start its user endpoint ``child_id`` (None when it is not one
    of its own, or is gone). The credential in it is made current in the store first: after the
    manager's credential was rotated, the user endpoint's old credential stops working and its
    sessions opened with it end."""
    child = await svc.store.endpoints.get(child_id)
    if child is None or child.parent_id != manager_id:
        return None
    user = await svc.store.users.get(child.for_user)
    credential = derive_credential(await svc.blobs.secret(), child_id, manager_credential_hash
                                   or await svc.store.endpoints.credential_hash(manager_id) or "")
    digest = auth.token_hash(credential)
    if await svc.store.endpoints.credential_hash(child_id) != digest:
        old = await svc.store.endpoints.rotate_credential(child_id, digest)
        if old is None:
            return None
        if old:
            await svc.store.pubsub.publish_control(child_id, CredentialRotated(old_hash=old))
    name = user.name if user is not None else ""
    return StartUserEndpoint(
        endpoint_id=child_id, credential=credential, user_id=child.for_user, username=name,
        identities=[{"id": child.for_user, "sub": child.for_user, "username": name}],
        user_endpoint_config=child.user_endpoint_config, config_hash=child.config_hash)


async def resend_starts(svc: Services, manager_id: str, manager_credential_hash: str,
                        send: Callable[[StartUserEndpoint], Awaitable[None]]) -> int:
    """Ask again for each of the manager's user endpoints that has open work (queued or in
    flight) and no session, once per start period; how many starts were sent."""
    sent = 0
    for child in await svc.store.endpoints.children(manager_id):
        if child.connected or not (child.queued_tasks or child.inflight_tasks):
            continue
        if not await svc.store.endpoints.claim_start(child.endpoint_id,
                                                     svc.settings.user_endpoint_start_seconds):
            continue
        frame = await start_frame(svc, manager_id, manager_credential_hash, child.endpoint_id)
        if frame is not None:
            await send(frame)
            sent += 1
    return sent


def forget(svc: Services, endpoint_id: str) -> None:
    """Drop what this replica cached of a manager or user endpoint (it changed, or is gone)."""
    svc.managers.pop(endpoint_id)
    svc.user_endpoints.pop(endpoint_id)
