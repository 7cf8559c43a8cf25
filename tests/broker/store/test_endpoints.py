"""``EndpointStore``: endpoints, their sessions, heartbeats, queued counts and sharing, on the
in-process store and the real Redis."""

from __future__ import annotations

import time

import anyio
import pytest

from farcall.broker.records import EndpointRecord
from farcall.broker.store.base import Store
from farcall.protocol.channel import Heartbeat
from farcall.protocol.common import now
from tests.broker.records import endpoint_record, function_record, new_id, new_tasks, submitted

pytestmark = pytest.mark.anyio


async def _listed(store: Store, user_id: str) -> list[str]:
    return [e.endpoint_id for e in await store.endpoints.list(user_id)]


async def test_endpoints_status_and_credential_revocation(store: Store) -> None:
    eid = new_id()
    await store.endpoints.put(endpoint_record(eid), "cred-hash")
    principal = await store.users.resolve_token("cred-hash")
    assert principal is not None and principal.kind == "endpoint" and principal.id == eid
    ep = await store.endpoints.get(eid)
    assert ep is not None and ep.connected is False and ep.last_heartbeat is None
    assert await store.endpoints.connect_session(eid, "s1", None, now()) is None
    assert await store.endpoints.connect_session(eid, "s2", None, now()) == "s1"
    await store.endpoints.disconnect_session(eid, "s1", now())
    assert await store.endpoints.live_session(eid) == "s2"  # the old one ending changes nothing
    await store.endpoints.set_heartbeat(eid, Heartbeat(workers=4, details={"a": 1}), 123.5)
    ep = await store.endpoints.get(eid)
    assert ep is not None and ep.connected is True
    assert ep.heartbeat == Heartbeat(workers=4, details={"a": 1}) and ep.last_heartbeat == 123.5
    seen = ep.last_seen
    assert seen is not None
    assert ep.online(30, at=seen + 1) and not ep.online(30, at=seen + 31)
    await store.endpoints.disconnect_session(eid, "s2", now())
    assert await store.endpoints.live_session(eid) is None
    ep = await store.endpoints.get(eid)
    assert ep is not None and ep.connected is False
    assert [e.endpoint_id for e in await store.endpoints.list("u1")] == [eid]
    assert await store.endpoints.list("u2") == []
    await store.endpoints.delete(eid)
    assert await store.endpoints.get(eid) is None
    assert await store.users.resolve_token("cred-hash") is None
    assert await store.endpoints.list("u1") == []


async def test_offline_timeout_follows_the_heartbeat_period(store: Store) -> None:
    """A 60 s endpoint stays online through a quiet minute; a 1 s one is offline in seconds."""
    for eid, period in (("slow", 60.0), ("fast", 1.0)):
        await store.endpoints.put(endpoint_record(eid), f"cred-{eid}")
        await store.endpoints.connect_session(eid, "s", period, 1000.0)
    slow, fast = await store.endpoints.get("slow"), await store.endpoints.get("fast")
    assert slow is not None and fast is not None
    assert slow.heartbeat_period == 60.0 and fast.heartbeat_period == 1.0
    assert slow.online(30, at=1000.0 + 90) and not slow.online(30, at=1000.0 + 200)
    assert fast.online(30, at=1000.0 + 5) and not fast.online(30, at=1000.0 + 9)


async def test_queued_count_follows_submission_dispatch_and_requeue(store: Store) -> None:
    await store.endpoints.put(endpoint_record(), "cred")

    async def queued() -> int:
        ep = await store.endpoints.get("ep1")
        assert ep is not None
        return ep.queued_tasks

    assert await queued() == 0
    _, ids = await submitted(store, 4)
    assert await queued() == 4
    await store.endpoints.connect_session("ep1", "s", None, now())
    await store.inflight.add("ep1", "s", {t: "body" for t in ids[:3]}, taken=3)
    assert await queued() == 1
    await store.endpoints.count_queued("ep1", 2)  # two lost tasks queued again
    assert await queued() == 3


async def test_endpoint_records_handed_out_are_copies(store: Store) -> None:
    """Changing an endpoint record a store returned must not change what the store holds."""
    await store.endpoints.put(endpoint_record(), "cred")
    ep = await store.endpoints.get("ep1")
    assert ep is not None
    ep.heartbeat.details["bogus"] = 1
    again = await store.endpoints.get("ep1")
    assert again is not None and "bogus" not in again.heartbeat.details


async def test_endpoint_sharing_lists_and_delete_cleanup(store: Store) -> None:
    await store.endpoints.put(endpoint_record("b", "u2"), "cred-b")
    await store.endpoints.put(endpoint_record("a", "u1"), "cred-a")
    await store.endpoints.put(endpoint_record("c", "u2"), "cred-c")
    await store.endpoints.share("a", "u2", True)
    await store.endpoints.share("a", "u3", True)
    ep = await store.endpoints.get("a")
    assert ep is not None and ep.shared_with == ["u2", "u3"]
    assert ep.usable_by("u3") and not ep.usable_by("u4")
    assert await _listed(store, "u2") == ["a", "b", "c"]
    listed = {e.endpoint_id: e for e in await store.endpoints.list("u2")}
    assert listed["a"].shared_with == ["u2", "u3"] and listed["b"].shared_with == []
    assert await _listed(store, "u1") == ["a"]
    assert await _listed(store, "u4") == []

    await store.endpoints.share("a", "u2", False)
    assert await _listed(store, "u2") == ["b", "c"]
    ep = await store.endpoints.get("a")
    assert ep is not None and ep.shared_with == ["u3"]
    await store.endpoints.share("gone", "u2", True)
    assert await store.endpoints.get("gone") is None and await _listed(store, "u2") == ["b", "c"]

    await store.endpoints.delete("a")
    assert await _listed(store, "u3") == [] and await _listed(store, "u1") == []
    await store.endpoints.put(endpoint_record("a", "u1"), "cred-a2")  # the id again: no old shares
    ep = await store.endpoints.get("a")
    assert ep is not None and ep.shared_with == [] and await _listed(store, "u3") == []


# ---- multi-user endpoints: a manager and its user endpoints


async def test_a_manager_says_it_is_one_at_hello_with_its_schema(store: Store) -> None:
    await store.endpoints.put(endpoint_record("m"), "cred-m")
    schema = {"type": "object", "properties": {"account": {"type": "string"}}}
    assert await store.endpoints.set_multi_user("m", True, schema) is True
    assert await store.endpoints.set_multi_user("m", True, schema) is False, "no change"
    ep = await store.endpoints.get("m")
    assert ep is not None and ep.multi_user and ep.user_config_schema == schema
    assert ep.isolates_users
    ctx = await store.tasks.submission_context("m", [], None)
    assert ctx.endpoint_multi_user and ctx.endpoint_parent == ""
    assert await store.endpoints.set_multi_user("m", False, None) is True
    ep = await store.endpoints.get("m")
    assert ep is not None and not ep.multi_user and ep.user_config_schema is None
    assert not ep.isolates_users
    assert await store.endpoints.set_multi_user("gone", True, None) is False
    assert await store.endpoints.get("gone") is None, "nothing made for an unknown endpoint"


def _child(child_id: str, parent: str = "m", for_user: str = "u2") -> EndpointRecord:
    return endpoint_record(child_id, "u1", parent_id=parent, for_user=for_user,
                           user_endpoint_config={"account": "abc", "nodes": 2},
                           config_hash="h" * 64)


async def test_a_user_endpoint_is_made_once_listed_under_its_manager_and_shared(store: Store) -> None:
    await store.endpoints.put(endpoint_record("m"), "cred-m")
    assert await store.endpoints.ensure_user_endpoint(_child("c1"), "cred-c1") is True
    assert await store.endpoints.ensure_user_endpoint(_child("c1"), "other") is True, "idempotent"
    assert await store.endpoints.credential_hash("c1") == "cred-c1", "the first one stays"
    assert await store.users.resolve_token("other") is None
    principal = await store.users.resolve_token("cred-c1")
    assert principal is not None and (principal.kind, principal.id) == ("endpoint", "c1")
    child = await store.endpoints.get("c1")
    assert child is not None
    assert (child.user_id, child.parent_id, child.for_user) == ("u1", "m", "u2")
    assert child.user_endpoint_config == {"account": "abc", "nodes": 2}
    assert child.config_hash == "h" * 64 and child.shared_with == ["u2"] and child.isolates_users
    ctx = await store.tasks.submission_context("c1", [], None)
    assert ctx.endpoint_parent == "m" and not ctx.endpoint_multi_user
    assert await _listed(store, "u2") == ["c1"], "its user sees it"
    # the manager's owner submitting to their own manager: not shared with themselves
    assert await store.endpoints.ensure_user_endpoint(_child("c2", for_user="u1"), "cred-c2")
    c2 = await store.endpoints.get("c2")
    assert c2 is not None and c2.shared_with == []
    assert [c.endpoint_id for c in await store.endpoints.children("m")] == ["c1", "c2"]
    assert await store.endpoints.children("c1") == []


async def test_no_user_endpoint_for_a_manager_that_is_gone(store: Store) -> None:
    assert await store.endpoints.ensure_user_endpoint(_child("c1", parent="gone"), "cred") is False
    assert await store.endpoints.get("c1") is None
    assert await store.users.resolve_token("cred") is None


async def test_children_carry_their_open_work(store: Store) -> None:
    await store.endpoints.put(endpoint_record("m"), "cred-m")
    await store.endpoints.ensure_user_endpoint(_child("c1"), "cred-c1")
    await store.functions.put(function_record())
    await store.tasks.create(new_tasks(3, endpoint="c1", user="u2"))
    (child,) = await store.endpoints.children("m")
    assert (child.queued_tasks, child.inflight_tasks, child.connected) == (3, 0, False)
    await store.endpoints.connect_session("c1", "s", None, now())
    ids = (await store.tasks.recent_groups("u2", 1))[0].task_group_id
    task_ids = await store.tasks.group_tasks(ids)
    await store.inflight.add("c1", "s", {t: "body" for t in task_ids[:2]}, taken=2)
    (child,) = await store.endpoints.children("m")
    assert (child.queued_tasks, child.inflight_tasks, child.connected) == (1, 2, True)


async def test_a_start_is_claimed_once_per_period_and_never_while_connected(store: Store) -> None:
    await store.endpoints.put(endpoint_record("m"), "cred-m")
    await store.endpoints.ensure_user_endpoint(_child("c1"), "cred-c1")
    assert await store.endpoints.claim_start("c1", 60) is True
    assert await store.endpoints.claim_start("c1", 60) is False, "debounced"
    await store.endpoints.release_start("c1")
    assert await store.endpoints.claim_start("c1", 0.2) is True, "released when asked"
    deadline = time.monotonic() + 5
    while not await store.endpoints.claim_start("c1", 60):
        assert time.monotonic() < deadline, "the claim never expired"
        await anyio.sleep(0.05)
    await store.endpoints.connect_session("c1", "s", None, now())
    await store.endpoints.release_start("c1")
    assert await store.endpoints.claim_start("c1", 60) is False, "connected: nothing to start"
    await store.endpoints.disconnect_session("c1", "s", now())
    assert await store.endpoints.claim_start("c1", 60) is True, "the connect ended the claim"


async def test_deleting_user_endpoints_and_their_manager_cleans_up(store: Store) -> None:
    await store.endpoints.put(endpoint_record("m"), "cred-m")
    await store.endpoints.ensure_user_endpoint(_child("c1"), "cred-c1")
    await store.endpoints.ensure_user_endpoint(_child("c2"), "cred-c2")
    await store.endpoints.claim_start("c1", 60)
    await store.endpoints.delete("c1")
    assert [c.endpoint_id for c in await store.endpoints.children("m")] == ["c2"]
    assert await store.users.resolve_token("cred-c1") is None
    await store.endpoints.ensure_user_endpoint(_child("c1"), "cred-c1")
    assert await store.endpoints.claim_start("c1", 60) is True, "no claim left behind"
    await store.endpoints.delete("m")
    assert await store.endpoints.children("m") == []
