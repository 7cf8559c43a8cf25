"""Limits on a real broker process: 429 with Retry-After under a burst, quotas per user.

Each test starts its own broker with small limits (the ``FARCALL_*`` variables an
operator sets), on the run's Redis and RabbitMQ.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest

from farcall import Client
from tests.integration.helpers import Broker, own_broker

StartBroker = Callable[..., Broker]


@pytest.fixture
def limited_broker(service_env: dict[str, str], tmp_path: Path) -> Iterator[StartBroker]:
    with ExitStack() as brokers:
        yield lambda **limits: brokers.enter_context(
            own_broker(service_env, tmp_path, "limited", settings=limits))


def _user(broker: Broker) -> dict[str, str]:
    return {"Authorization": f"Bearer {broker.create_user(f'lim-{uuid.uuid4().hex[:6]}')}"}


def test_a_burst_over_the_token_rate_is_answered_429_with_retry_after(
    limited_broker: StartBroker,
) -> None:
    broker = limited_broker(FARCALL_RATE_LIMIT="2", FARCALL_RATE_BURST="10")
    alice, bob = _user(broker), _user(broker)
    with httpx.Client(base_url=broker.url, timeout=10) as http:
        answers = [http.get("/v1/endpoints", headers=alice) for _ in range(30)]
        statuses = [a.status_code for a in answers]
        assert statuses[:10] == [200] * 10  # the burst
        limited = [a for a in answers if a.status_code == 429]
        assert len(limited) >= 15, statuses
        first = limited[0]
        assert int(first.headers["Retry-After"]) >= 1
        body = first.json()
        assert body["error"] == "rate_limited" and "requests per second" in body["message"]
        assert body["retry_after"] > 0
        # Per user: another user is not slowed down by alice.
        assert http.get("/v1/endpoints", headers=bob).status_code == 200


def test_failed_authentication_is_limited_per_address_but_good_tokens_still_pass(
    limited_broker: StartBroker,
) -> None:
    broker = limited_broker(FARCALL_AUTH_FAILURE_RATE="0.1", FARCALL_AUTH_FAILURE_BURST="5")
    good = _user(broker)
    bad = {"Authorization": "Bearer fcu_guess"}
    with httpx.Client(base_url=broker.url, timeout=10) as http:
        statuses = [http.get("/v1/endpoints", headers=bad).status_code for _ in range(20)]
        assert statuses[:5] == [401] * 5 and set(statuses[5:]) == {429}, statuses
        refused = http.get("/v1/endpoints", headers=bad)
        assert refused.status_code == 429 and int(refused.headers["Retry-After"]) >= 1
        assert http.get("/v1/endpoints").status_code == 429  # no token counts as a failure too
        assert http.get("/v1/endpoints", headers=good).status_code == 200


def test_quotas_on_endpoints_functions_and_open_tasks(limited_broker: StartBroker) -> None:
    broker = limited_broker(FARCALL_MAX_ENDPOINTS="2", FARCALL_MAX_FUNCTIONS="2",
                            FARCALL_MAX_OPEN_TASKS="5")
    token = _user(broker)["Authorization"].split()[1]
    with Client(broker_url=broker.url, token=token, retry_seconds=0) as c:
        endpoint_id = c.register_endpoint("one")["endpoint_id"]
        c.register_endpoint("two")
        with pytest.raises(Exception, match="FARCALL_MAX_ENDPOINTS") as refused:
            c.register_endpoint("three")
        assert getattr(refused.value, "status", None) == 403

        function_id = c.register_function(abs)
        c.register_function(round)
        with pytest.raises(Exception, match="FARCALL_MAX_FUNCTIONS") as refused:
            c.register_function(max)
        assert getattr(refused.value, "status", None) == 403

        # The endpoint never connects: tasks stay open (waiting) until cancelled.
        batch = c.create_batch()
        for i in range(6):
            batch.add(function_id, (-i,))
        with pytest.raises(Exception, match="FARCALL_MAX_OPEN_TASKS") as refused:
            c.batch_run(endpoint_id, batch)
        assert getattr(refused.value, "status", None) == 429
        assert c.get_endpoint_status(endpoint_id)["queued_tasks"] == 0  # nothing half-made

        first = [c.run(-i, endpoint_id=endpoint_id, function_id=function_id) for i in range(5)]
        with pytest.raises(Exception, match="FARCALL_MAX_OPEN_TASKS"):
            c.run(-9, endpoint_id=endpoint_id, function_id=function_id)
        assert c.cancel(first[:2])["cancelled"] == first[:2]
        c.run(-7, endpoint_id=endpoint_id, function_id=function_id)  # room again
        c.run(-8, endpoint_id=endpoint_id, function_id=function_id)
        with pytest.raises(Exception, match="FARCALL_MAX_OPEN_TASKS"):
            c.run(-9, endpoint_id=endpoint_id, function_id=function_id)
