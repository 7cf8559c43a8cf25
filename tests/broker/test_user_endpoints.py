"""Multi-user endpoints on the broker (farcall.broker.user_endpoints, and what submission and
endpoint control do for them), on a memory store and queue: a batch to a manager is checked
against its schema and goes to the submitter's user endpoint for its configuration, whose
manager is asked (once per period) to start it; the start frame carries the user endpoint's
derived credential; deleting or unsharing a manager reaches its user endpoints. The same on the
real services with a real channel session: tests/integration/test_multi_user_broker.py."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from farcall.broker import access, auth, endpoint_control, user_endpoints
from farcall.broker.errors import InvalidRequest, ObjectNotFound, Unprocessable
from farcall.broker.queue.base import QueueMissing
from farcall.broker.services import Services
from farcall.broker.settings import Settings
from farcall.broker.store.base import Subscription
from farcall.broker.submission import submit_batch
from farcall.protocol.channel import StartUserEndpoint, parse_task_batch
from farcall.protocol.common import TaskState, now
from farcall.protocol.control import (
    AnyControl,
    CredentialRotated,
    EndpointRemoved,
    UserEndpointWanted,
    parse_control,
)
from farcall.protocol.rest import BatchSubmission
from tests.broker.helpers import FakeSession, batch, next_frame
from tests.broker.records import endpoint_record, function_record, token_record, user_record

pytestmark = pytest.mark.anyio

OWNER, BOB, CAROL = "owner-id", "bob-id", "carol-id"
SCHEMA = {"type": "object", "properties": {"account": {"type": "string", "pattern": "^[a-z0-9]+$"},
                                           "nodes": {"type": "integer", "minimum": 1}},
          "required": ["account"], "additionalProperties": False}


async def site(svc: Services, schema: dict[str, Any] | None = SCHEMA) -> tuple[str, str]:
    """A manager of OWNER's that said hello as one (with ``schema``), shared with BOB, and a
    function of BOB's."""
    manager, fid = str(uuid.uuid4()), str(uuid.uuid4())
    for uid, name in ((OWNER, "owner"), (BOB, "bob"), (CAROL, "carol")):
        await svc.store.users.create(user_record(uid, name), token_record(f"t-{uid}", uid, now()))
    await svc.store.endpoints.put(endpoint_record(manager, OWNER, name="site"), "manager-hash")
    await svc.store.endpoints.share(manager, BOB, True)
    await svc.store.endpoints.set_multi_user(manager, True, schema)
    await svc.store.functions.put(function_record(fid, BOB, function="FN"))
    await svc.queue.declare(manager)
    return manager, fid


def configured(manager: str, fid: str, n: int, config: dict[str, Any] | None) -> BatchSubmission:
    body = batch(manager, fid, n)
    body.user_endpoint_config = config
    return body


async def heard(control: Subscription) -> AnyControl:
    return parse_control(await next_frame(control))


async def queued_ids(svc: Services, endpoint_id: str) -> list[str]:
    return [t.task_id for body in await svc.queue.drain(endpoint_id)
            for t in parse_task_batch(body)]


async def test_values_that_break_the_schema_are_refused_with_its_message(svc: Services) -> None:
    manager, fid = await site(svc)
    with pytest.raises(Unprocessable) as refused:
        await submit_batch(svc, BOB, configured(manager, fid, 1, {"account": "ABC!"}))
    assert refused.value.status == 422
    assert "'ABC!' does not match '^[a-z0-9]+$'" in refused.value.message
    assert "(at account)" in refused.value.message and manager in refused.value.message
    assert refused.value.extra()["detail"][0]["loc"] == ["body", "user_endpoint_config", "account"]
    with pytest.raises(Unprocessable, match="'account' is a required property"):
        await submit_batch(svc, BOB, configured(manager, fid, 1, None))  # {}: the schema's call
    assert await svc.store.endpoints.children(manager) == [], "nothing made"


async def test_tasks_go_to_the_users_own_endpoint_for_their_values(svc: Services) -> None:
    manager, fid = await site(svc)
    control = await svc.store.pubsub.subscribe_control(manager)
    config = {"account": "abc123", "nodes": 2}

    first = await submit_batch(svc, BOB, configured(manager, fid, 2, config))

    child_id = user_endpoints.user_endpoint_id(manager, BOB, user_endpoints.config_hash(config))
    assert await heard(control) == UserEndpointWanted(user_endpoint_id=child_id)
    records = await svc.store.tasks.get_many(first.task_ids)
    assert {r.endpoint_id for r in records if r is not None} == {child_id}
    assert await queued_ids(svc, child_id) == first.task_ids
    assert await queued_ids(svc, manager) == [], "a manager runs nothing itself"
    child = await svc.store.endpoints.get(child_id)
    assert child is not None
    assert (child.user_id, child.parent_id, child.for_user) == (OWNER, manager, BOB)
    assert child.user_endpoint_config == config and child.shared_with == [BOB]
    assert child.config_hash == user_endpoints.config_hash({"nodes": 2, "account": "abc123"})

    again = await submit_batch(svc, BOB, configured(manager, fid, 1, {"nodes": 2, "account": "abc123"}))
    other = await submit_batch(svc, BOB, configured(manager, fid, 1, {"account": "xyz"}))
    (same,) = await svc.store.tasks.get_many(again.task_ids)
    (elsewhere,) = await svc.store.tasks.get_many(other.task_ids)
    assert same is not None and same.endpoint_id == child_id, "the same values: the same one"
    assert elsewhere is not None and elsewhere.endpoint_id not in (child_id, manager)
    assert await heard(control) == UserEndpointWanted(user_endpoint_id=elsewhere.endpoint_id), (
        "the first one was asked for already (debounced); the new one is asked for")
    assert len(await svc.store.endpoints.children(manager)) == 2
    await control.close()


async def test_no_start_is_asked_for_a_user_endpoint_connected_here(svc: Services) -> None:
    manager, fid = await site(svc)
    config = {"account": "abc"}
    child_id = await user_endpoints.route(svc, BOB, manager, config)
    session = FakeSession(credit=5)
    await svc.store.endpoints.connect_session(child_id, session.session_id, None, now())
    svc.sessions.take_over(child_id, session)
    control = await svc.store.pubsub.subscribe_control(manager)

    answer = await submit_batch(svc, BOB, configured(manager, fid, 2, config))

    ((tasks, _),) = session.sent
    assert [t[0] for t in tasks] == answer.task_ids, "sent straight to the user endpoint"
    assert await svc.store.endpoints.claim_start(child_id, 60) is False
    await svc.store.pubsub.publish_control(manager, EndpointRemoved())  # a marker: nothing before
    assert await heard(control) == EndpointRemoved()
    await control.close()


async def test_values_for_an_ordinary_endpoint_are_refused(svc: Services) -> None:
    manager, fid = await site(svc)
    await svc.store.endpoints.set_multi_user(manager, False, None)
    with pytest.raises(Unprocessable, match="is not a multi-user endpoint"):
        await submit_batch(svc, BOB, configured(manager, fid, 1, {"account": "abc"}))


async def test_a_user_endpoint_takes_tasks_only_through_its_manager(svc: Services) -> None:
    manager, fid = await site(svc)
    child_id = await user_endpoints.route(svc, BOB, manager, {"account": "abc"})
    with pytest.raises(InvalidRequest, match=f"submit to {manager}"):
        await submit_batch(svc, BOB, batch(child_id, fid, 1))


async def test_a_manager_without_a_schema_takes_any_values_and_none(svc: Services) -> None:
    manager, fid = await site(svc, schema=None)
    answer = await submit_batch(svc, BOB, batch(manager, fid, 1))
    (record,) = await svc.store.tasks.get_many(answer.task_ids)
    assert record is not None
    assert record.endpoint_id == user_endpoints.user_endpoint_id(
        manager, BOB, user_endpoints.config_hash({}))


async def test_only_users_it_is_shared_with_reach_a_manager(svc: Services) -> None:
    manager, _ = await site(svc)
    fid = str(uuid.uuid4())
    await svc.store.functions.put(function_record(fid, CAROL, function="FN"))
    with pytest.raises(ObjectNotFound):
        await submit_batch(svc, CAROL, configured(manager, fid, 1, {"account": "abc"}))


async def test_the_start_carries_the_user_and_a_derived_credential(svc: Services) -> None:
    manager, _ = await site(svc)
    config = {"account": "abc"}
    child_id = await user_endpoints.route(svc, BOB, manager, config)

    frame = await user_endpoints.start_frame(svc, manager, "manager-hash", child_id)

    assert frame == StartUserEndpoint(
        endpoint_id=child_id, credential=frame.credential if frame else "", user_id=BOB,
        username="bob", identities=[{"id": BOB, "sub": BOB, "username": "bob"}],
        user_endpoint_config=config, config_hash=user_endpoints.config_hash(config))
    assert frame is not None and frame.credential.startswith(auth.ENDPOINT_PREFIX)
    principal = await auth.authenticate(svc.store.users, frame.credential)
    assert principal is not None and principal.id == child_id, "it connects as the user endpoint"
    again = await user_endpoints.start_frame(svc, manager, "manager-hash", child_id)
    assert again is not None and again.credential == frame.credential, "the same every start"
    assert await user_endpoints.start_frame(svc, "another", "manager-hash", child_id) is None


async def test_a_new_manager_credential_replaces_the_user_endpoints(svc: Services) -> None:
    manager, _ = await site(svc)
    child_id = await user_endpoints.route(svc, BOB, manager, {"account": "abc"})
    old = await user_endpoints.start_frame(svc, manager, "manager-hash", child_id)
    control = await svc.store.pubsub.subscribe_control(child_id)

    new = await user_endpoints.start_frame(svc, manager, "rotated-hash", child_id)

    assert old is not None and new is not None and new.credential != old.credential
    assert await heard(control) == CredentialRotated(old_hash=auth.token_hash(old.credential))
    assert await auth.authenticate(svc.store.users, old.credential) is None
    assert await auth.authenticate(svc.store.users, new.credential) is not None
    await control.close()


async def test_the_manager_is_asked_again_for_user_endpoints_with_work() -> None:
    svc = Services.build(Settings(user_endpoint_start_seconds=60))
    await svc.start()
    try:
        manager, fid = await site(svc)
        busy = await submit_batch(svc, BOB, configured(manager, fid, 1, {"account": "busy"}))
        idle = await user_endpoints.route(svc, BOB, manager, {"account": "idle"})
        (record,) = await svc.store.tasks.get_many(busy.task_ids)
        assert record is not None
        sent: list[StartUserEndpoint] = []

        async def send(frame: StartUserEndpoint) -> None:
            sent.append(frame)

        assert await user_endpoints.resend_starts(svc, manager, "manager-hash", send) == 0, (
            "asked at submission: not again within the period")
        await svc.store.endpoints.release_start(record.endpoint_id)  # the period is over
        assert await user_endpoints.resend_starts(svc, manager, "manager-hash", send) == 1
        assert [f.endpoint_id for f in sent] == [record.endpoint_id], f"not {idle}: no work"
        assert await user_endpoints.resend_starts(svc, manager, "manager-hash", send) == 0
        await svc.store.endpoints.release_start(record.endpoint_id)
        await svc.store.endpoints.connect_session(record.endpoint_id, "s", None, now())
        assert await user_endpoints.resend_starts(svc, manager, "manager-hash", send) == 0, (
            "connected: nothing to start")
    finally:
        await svc.close()


async def test_deleting_a_manager_deletes_its_user_endpoints_and_their_tasks(svc: Services) -> None:
    manager, fid = await site(svc)
    answer = await submit_batch(svc, BOB, configured(manager, fid, 2, {"account": "abc"}))
    (record,) = await svc.store.tasks.get_many(answer.task_ids[:1])
    assert record is not None
    child_id = record.endpoint_id
    control = await svc.store.pubsub.subscribe_control(child_id)

    await endpoint_control.delete_endpoint(svc, manager)

    assert await heard(control) == EndpointRemoved()
    assert await svc.store.endpoints.get(child_id) is None
    assert await svc.store.endpoints.get(manager) is None
    records = await svc.store.tasks.get_many(answer.task_ids)
    assert {r.state for r in records if r is not None} == {TaskState.FAILED}
    with pytest.raises(QueueMissing):
        await svc.queue.publish(child_id, [b"[]"])
    await control.close()


async def test_unsharing_a_manager_cancels_the_users_tasks_on_their_endpoints(svc: Services) -> None:
    manager, fid = await site(svc)
    answer = await submit_batch(svc, BOB, configured(manager, fid, 2, {"account": "abc"}))
    await svc.store.endpoints.share(manager, BOB, False)

    done = await access.withdraw(svc, BOB, manager, access.unshared_task(manager))

    assert sorted(r.task_id for _, _, r in done.results) == sorted(answer.task_ids)
    with pytest.raises(ObjectNotFound):
        await submit_batch(svc, BOB, configured(manager, fid, 1, {"account": "abc"}))
