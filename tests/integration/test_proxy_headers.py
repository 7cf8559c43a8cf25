"""Issue 20: ``X-Forwarded-For`` is believed only from the proxies ``--forwarded-allow-ips``
names. Before, a broker trusted it from 127.0.0.1 by default, so anything on the broker's host
(or a local proxy that passes the header through) could give each guess a new address and
dodge the limit on failed authentications per address.
"""

from __future__ import annotations

from pathlib import Path

import httpx

from tests.integration.helpers import own_broker

LIMITS = {"FARCALL_AUTH_FAILURE_RATE": "0.1", "FARCALL_AUTH_FAILURE_BURST": "3"}


def _guesses(url: str, n: int) -> list[int]:
    """``n`` wrong tokens, each claiming another client address."""
    with httpx.Client(base_url=url, timeout=10) as http:
        return [http.get("/v1/endpoints", headers={
            "Authorization": "Bearer fcu_guess", "X-Forwarded-For": f"203.0.113.{i}"}).status_code
            for i in range(n)]


def test_a_forwarded_address_is_not_believed_by_default(
    service_env: dict[str, str], tmp_path: Path
) -> None:
    with own_broker(service_env, tmp_path, "noproxy", settings=LIMITS) as broker:
        statuses = _guesses(broker.url, 8)
    assert statuses[:3] == [401] * 3 and set(statuses[3:]) == {429}, statuses


def test_a_named_proxy_is_believed(service_env: dict[str, str], tmp_path: Path) -> None:
    with own_broker(service_env, tmp_path, "proxy", settings=LIMITS,
                    serve_args=["--forwarded-allow-ips", "127.0.0.1"]) as broker:
        statuses = _guesses(broker.url, 8)
    assert statuses == [401] * 8, "each forwarded address has a limit of its own"
