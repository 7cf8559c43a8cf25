"""The broker's WebSocket URLs, as the SDK and the endpoint agent build them."""

from __future__ import annotations

import pytest

from farcall import Client
from farcall.urls import websocket_url


@pytest.mark.parametrize(
    ("broker_url", "expected"),
    [
        ("http://h:8000", "ws://h:8000/v1/endpoints/e/connect"),
        ("https://h", "wss://h/v1/endpoints/e/connect"),
        ("https://h:8443/fc", "wss://h:8443/fc/v1/endpoints/e/connect"),
        ("https://h/fc/", "wss://h/fc/v1/endpoints/e/connect"),
        ("http://h/", "ws://h/v1/endpoints/e/connect"),
        ("http://h/a/b?x=1#top", "ws://h/a/b/v1/endpoints/e/connect"),
    ],
)
def test_scheme_port_and_prefix_are_kept(broker_url: str, expected: str) -> None:
    assert websocket_url(broker_url, "/endpoints/e/connect") == expected


def test_client_builds_its_stream_urls_the_same_way() -> None:
    with Client(broker_url="https://broker.example.org/farcall/", token="fcu_t") as c:
        assert c.websocket_url("/task_groups/g/results") == (
            "wss://broker.example.org/farcall/v1/task_groups/g/results"
        )
