"""Broker WebSocket URLs, built one way for the SDK and the endpoint agent.

A broker may be served under a path prefix (``https://host/farcall``); its
WebSocket routes then live under that prefix too.
"""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit


def websocket_url(broker_url: str, path: str) -> str:
    """``http(s)://host[:port][/prefix]`` and ``path`` -> ``ws(s)://host[:port][/prefix]/v1{path}``.

    The prefix is kept (with or without a trailing slash); a query or fragment
    on ``broker_url`` is dropped, since the broker's routes take none.
    """
    parts = urlsplit(broker_url)
    scheme = "wss" if parts.scheme == "https" else "ws"
    return urlunsplit((scheme, parts.netloc, f"{parts.path.rstrip('/')}/v1{path}", "", ""))
