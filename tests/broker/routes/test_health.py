"""``GET /v1/health`` (farcall.broker.routes.health): 200 with the real services, 503 saying
which is down. What the check asks: tests/broker/test_health.py."""

from __future__ import annotations

from tests.broker.conftest import MakeApi
from tests.broker.test_health import ALL_OK, closed_amqp, closed_redis, settings_on


def test_route_answers_200_with_real_services(services: None, real_prefix: str,
                                              make_api: MakeApi) -> None:
    r = make_api(settings_on(real_prefix)).client.get("/v1/health")
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "ok"
    assert r.json()["services"] == ALL_OK
    assert r.json()["broker_id"]


def test_route_answers_503_when_redis_and_rabbitmq_are_closed(real_prefix: str,
                                                              make_api: MakeApi) -> None:
    api = make_api(settings_on(real_prefix, redis_url=closed_redis(), amqp_url=closed_amqp()))
    r = api.client.get("/v1/health")
    assert r.status_code == 503, r.text
    body = r.json()
    assert body["status"] == "unavailable"
    assert set(body["services"]) == {"store", "queue", "blobs"}  # blobs in Redis too: all three down
    assert all(v.startswith("not answering: ") for v in body["services"].values()), body
    assert body["broker_id"] == ""  # its store never answered: it cannot know
