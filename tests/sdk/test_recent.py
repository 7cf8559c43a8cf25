"""RecentIds: the bounded set of recently finished task ids (broker session, agent outbox)."""

from __future__ import annotations

import pytest

from farcall.recent import RecentIds


def test_holds_the_last_ids_added_and_forgets_the_oldest_first() -> None:
    recent = RecentIds(3)
    recent.add(["a", "b"])
    recent.add(["c", "d"])
    assert "a" not in recent
    assert [t in recent for t in "bcd"] == [True, True, True]
    assert len(recent) == 3


def test_adding_an_id_again_does_not_make_it_newer() -> None:
    """First in, first out: a late duplicate must not keep an old id alive for ever."""
    recent = RecentIds(2)
    recent.add(["a", "b"])
    recent.add(["a", "c"])
    assert "a" not in recent and "b" in recent and "c" in recent


def test_a_batch_bigger_than_the_set_keeps_its_newest_ids() -> None:
    recent = RecentIds(2)
    recent.add([str(i) for i in range(5)])
    assert len(recent) == 2 and "3" in recent and "4" in recent and "2" not in recent


def test_a_set_without_room_is_refused() -> None:
    with pytest.raises(ValueError, match="at least one"):
        RecentIds(0)
