"""This replica's live endpoint sessions (farcall.broker.sessions): one per endpoint, the newest
wins, and an ending session never removes the one that replaced it."""

from __future__ import annotations

from farcall.broker.sessions import Sessions
from tests.broker.helpers import FakeSession


def test_the_newest_session_of_an_endpoint_is_the_live_one() -> None:
    sessions = Sessions()
    old, new = FakeSession("old"), FakeSession("new")
    assert sessions.take_over("ep", old) is None
    assert sessions.take_over("ep", new) is old
    assert sessions.get("ep") is new and sessions.get("other") is None
    assert len(sessions) == 1


def test_an_ending_session_leaves_its_successor_in_place() -> None:
    sessions = Sessions()
    old, new = FakeSession("old"), FakeSession("new")
    sessions.take_over("ep", old)
    sessions.take_over("ep", new)
    sessions.remove("ep", old)
    assert sessions.get("ep") is new
    sessions.remove("ep", new)
    assert sessions.get("ep") is None and len(sessions) == 0
    sessions.remove("ep", new)  # twice: nothing left to remove, no error

