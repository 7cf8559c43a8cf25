"""``farcall.broker.cache``: entries expire after the ttl and the cache stays bounded, on a fake clock."""

from __future__ import annotations

import pytest

from farcall.broker import cache
from farcall.broker.cache import TTLCache
from tests.helpers import FakeClock


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    return FakeClock.install(monkeypatch, cache)


def test_a_value_lives_for_the_ttl_then_is_gone(clock: FakeClock) -> None:
    c = TTLCache[str, str](ttl=5.0)
    assert c.get("token") is None
    c.put("token", "alice")
    clock.now += 4.9
    assert c.get("token") == "alice"
    clock.now += 0.2  # a token revoked through another replica is refused here from now on
    assert c.get("token") is None


def test_putting_again_starts_the_ttl_again(clock: FakeClock) -> None:
    c = TTLCache[str, str](ttl=5.0)
    c.put("k", "old")
    clock.now += 4
    c.put("k", "new")
    clock.now += 4
    assert c.get("k") == "new"


def test_pop_and_clear_forget_at_once(clock: FakeClock) -> None:
    c = TTLCache[str, int](ttl=60)
    c.put("a", 1)
    c.put("b", 2)
    c.pop("a")
    c.pop("never there")  # no error
    assert (c.get("a"), c.get("b")) == (None, 2)
    c.clear()
    assert c.get("b") is None


def test_the_least_recently_used_entry_goes_past_max_entries(clock: FakeClock) -> None:
    c = TTLCache[str, int](ttl=60, max_entries=2)
    c.put("a", 1)
    c.put("b", 2)
    assert c.get("a") == 1  # "b" is now the least recently used
    c.put("c", 3)
    assert (c.get("a"), c.get("b"), c.get("c")) == (1, None, 3)
