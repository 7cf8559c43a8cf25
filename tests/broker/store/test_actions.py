"""``ActionStore``: actions of the Action Provider API, on the in-process store and the real Redis."""

from __future__ import annotations

import asyncio
import time

import pytest

from farcall.broker.store.base import Store
from tests.broker.records import action_record

pytestmark = pytest.mark.anyio


async def _gone(store: Store, action_id: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while await store.actions.get(action_id) is not None:
        assert time.monotonic() < deadline, f"action {action_id} did not expire"
        await asyncio.sleep(0.05)


async def test_a_request_id_makes_one_action_per_user(store: Store) -> None:
    first = action_record(monitor_by=["urn:x"])
    assert await store.actions.create(first, 60) == first
    again = await store.actions.create(action_record(request_digest="d2"), 60)
    assert again == first, "the same user and request id must give back the first action"
    other_user = action_record(user="u2")
    assert await store.actions.create(other_user, 60) == other_user
    other_request = action_record(request_id="r2")
    assert await store.actions.create(other_request, 60) == other_request
    assert await store.actions.get(first.action_id) == first
    assert await store.actions.get("unknown") is None


async def test_update_replaces_the_record_while_it_exists(store: Store) -> None:
    action = await store.actions.create(action_record(), 60)
    action.task_ids, action.task_group_id = ["t1", "t2"], "g1"
    action.status, action.details = "SUCCEEDED", {"results": [{"output": None}]}
    assert await store.actions.update(action, 60)
    assert await store.actions.get(action.action_id) == action
    assert await store.actions.release(action)
    assert not await store.actions.release(action), "a second release finds nothing"
    assert not await store.actions.update(action, 60), "an update must not bring back a release"
    assert await store.actions.get(action.action_id) is None


async def test_a_released_request_id_starts_a_new_action(store: Store) -> None:
    first = await store.actions.create(action_record(), 60)
    await store.actions.release(first)
    second = action_record()
    assert await store.actions.create(second, 60) == second


async def test_records_expire_with_their_request_id(store: Store) -> None:
    short = await store.actions.create(action_record(), 0.3)
    await _gone(store, short.action_id)
    fresh = action_record()
    assert await store.actions.create(fresh, 60) == fresh, "the expired request id is free again"
    fresh.status = "FAILED"
    assert await store.actions.update(fresh, 0.3), "update sets the new lifetime"
    await _gone(store, fresh.action_id)
    assert not await store.actions.update(fresh, 60)


async def test_concurrent_creates_with_one_request_id_make_one_action(store: Store) -> None:
    made = await asyncio.gather(*(store.actions.create(action_record(), 60) for _ in range(20)))
    assert len({a.action_id for a in made}) == 1
