"""EmbeddedBroker: a whole broker on a free loopback port in a background thread."""

from __future__ import annotations

import httpx
import pytest

from farcall.broker.embedded import EmbeddedBroker


def test_serves_creates_users_and_stops() -> None:
    with EmbeddedBroker() as broker:
        assert broker.url.startswith("http://127.0.0.1:")
        assert httpx.get(f"{broker.url}/v1/health", timeout=5).json()["status"] == "ok"
        token = broker.create_user("demo")
        headers = {"Authorization": f"Bearer {token}"}
        r = httpx.post(
            f"{broker.url}/v1/endpoints", json={"name": "laptop"}, headers=headers, timeout=5
        )
        assert r.status_code == 200
        listed = httpx.get(f"{broker.url}/v1/endpoints", headers=headers, timeout=5).json()
        assert [e["name"] for e in listed["endpoints"]] == ["laptop"]
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{broker.url}/v1/health", timeout=2)


def test_two_embedded_brokers_are_independent() -> None:
    with EmbeddedBroker() as a, EmbeddedBroker() as b:
        assert a.port != b.port
        token = a.create_user("x")
        r = httpx.get(
            f"{b.url}/v1/endpoints", headers={"Authorization": f"Bearer {token}"}, timeout=5
        )
        assert r.status_code == 401
