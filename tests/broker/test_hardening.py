"""What strangers can send cannot stall, flood or echo: size checked before parsing, short error
answers, quiet refusals, and 429 answers that say when to come back."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from starlette.websockets import WebSocketDisconnect
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from farcall.broker import client_stream, endpoint_channel, errors
from farcall.broker.asgi import over_limit
from farcall.broker.embedded import EmbeddedBroker
from farcall.broker.errors import TooManyRequests, clip, error_details, error_summary
from farcall.broker.settings import MB, Settings
from farcall.protocol.channel import Hello, Welcome, parse_broker_frame
from farcall.protocol.rest import ErrorBody
from farcall.protocol.stream import RequestFailedFrame, parse_stream_frame
from farcall.quietlog import QuietLog
from tests.broker.conftest import MakeApi
from tests.broker.helpers import Api

LIMIT = 64 * 1024
SMALL = 4096
"""An error answer to a huge request stays under this many bytes."""


class SmallFrames(Settings):
    """Settings with a small endpoint frame limit, so a test need not send 64 MB."""

    @property
    def max_frame_bytes(self) -> int:
        return LIMIT


@dataclass
class Env(Api):
    headers: dict[str, str]
    """Alice's."""

    def group(self) -> str:
        r = self.client.post("/v1/task_groups", headers=self.headers)
        assert r.status_code == 200, r.text
        return str(r.json()["task_group_id"])


def make_env(make_api: MakeApi, settings: Settings) -> Env:
    api = make_api(settings)
    return Env(api.client, api.services, api.user("alice"))


@pytest.fixture
def env(make_api: MakeApi) -> Env:
    return make_env(make_api, SmallFrames(max_payload_bytes=LIMIT))


@pytest.fixture
def big_env(make_api: MakeApi) -> Env:
    """The default payload limit (10 MB), for requests of several megabytes."""
    return make_env(make_api, Settings())


def failed(raw: str) -> RequestFailedFrame:
    frame = parse_stream_frame(raw)
    assert isinstance(frame, RequestFailedFrame), frame
    return frame


def never_parse_over(monkeypatch: pytest.MonkeyPatch, limit: int) -> list[int]:
    """Fail the test if ``json.loads`` or a pydantic JSON parse sees a message over ``limit``;
    returns the sizes that were parsed."""
    seen: list[int] = []
    loads = json.loads

    def guarded_loads(s: Any, *args: Any, **kw: Any) -> Any:
        assert len(s) <= limit, f"json.loads of {len(s)} bytes"
        return loads(s, *args, **kw)

    class Guarded:
        def __init__(self, model: Any) -> None:
            self.model = model

        def model_validate_json(self, raw: str | bytes) -> Any:
            seen.append(len(raw))
            assert len(raw) <= limit, f"parsed a message of {len(raw)} bytes"
            return self.model.model_validate_json(raw)

    parse = endpoint_channel.parse_endpoint_frame

    def guarded_parse(raw: str | bytes) -> Any:
        seen.append(len(raw))
        assert len(raw) <= limit, f"parsed a frame of {len(raw)} bytes"
        return parse(raw)

    monkeypatch.setattr(json, "loads", guarded_loads)
    monkeypatch.setattr(client_stream, "SubmitFrame", Guarded(client_stream.SubmitFrame))
    monkeypatch.setattr(endpoint_channel, "parse_endpoint_frame", guarded_parse)
    return seen


# ------------------------------------------------------------------ sizes before parsing


def test_an_oversized_submission_on_the_stream_answers_413_without_being_parsed(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    parsed = never_parse_over(monkeypatch, LIMIT)
    # Valid JSON only at its start: any attempt to parse it would answer 422, not 413.
    too_big = '{"type": "submit", "request_id": 7, "batch": ' + "x" * (LIMIT + 1)
    with env.client.websocket_connect(
        f"/v1/task_groups/{env.group()}/results", headers=env.headers
    ) as ws:
        ws.send_text(too_big)
        answer = failed(ws.receive_text())
        ws.send_bytes(too_big.encode())
        again = failed(ws.receive_text())
    for a in (answer, again):
        assert (a.status, a.error, a.request_id) == (413, "payload_too_large", 7)
        assert "FARCALL_MAX_PAYLOAD_BYTES" in a.message
    assert parsed == []


def test_a_bad_submission_on_the_stream_gets_a_short_answer(env: Env) -> None:
    huge = "k" * (LIMIT // 5)
    frame = {"type": "submit", "request_id": 3, "batch": {
        "endpoint_id": huge, "task_group_id": huge, "tasks": [{"function_id": huge, "args": 1}]}}
    with env.client.websocket_connect(
        f"/v1/task_groups/{env.group()}/results", headers=env.headers
    ) as ws:
        ws.send_text(json.dumps(frame))
        raw = ws.receive_text()
    answer = failed(raw)
    assert (answer.status, answer.request_id) == (422, 3)
    assert "endpoint_id" in answer.message and "(and 1 more)" in answer.message
    assert len(raw) < SMALL and "kkkkkkkkkk" not in raw


def test_the_request_id_of_a_rejected_message_is_read_from_its_start_only() -> None:
    assert client_stream._request_id('{"type":"submit","request_id": 42, "batch": nonsense') == 42
    assert client_stream._request_id(b'{"request_id":-5}') == -5
    late = '{"type": "submit", "batch": {"pad": "' + "p" * 500 + '"}, "request_id": 9}'
    assert client_stream._request_id(late) == 0
    assert client_stream._request_id("not json at all") == 0


@contextlib.contextmanager
def _endpoint_session(env: Env) -> Iterator[Any]:
    """A new endpoint's channel, connected with its credential."""
    ep = env.client.post("/v1/endpoints", json={"name": "e"}, headers=env.headers).json()
    with env.client.websocket_connect(
        f"/v1/endpoints/{ep['endpoint_id']}/connect",
        headers={"Authorization": f"Bearer {ep['credential']}"},
    ) as ws:
        yield ws


def test_an_oversized_endpoint_frame_closes_the_session_1009_unparsed(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    parsed = never_parse_over(monkeypatch, LIMIT)
    with _endpoint_session(env) as ws:
        ws.send_text(Hello(credit=0).model_dump_json())
        assert isinstance(parse_broker_frame(ws.receive_text()), Welcome)
        ws.send_bytes(b'{"type": "credit", "n": 1, "pad": "' + b"x" * LIMIT + b'"}')
        with pytest.raises(WebSocketDisconnect) as closed:
            ws.receive_text()
    assert closed.value.code == 1009
    assert parsed and max(parsed) <= LIMIT


def test_an_oversized_hello_is_refused_before_it_is_parsed(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    parsed = never_parse_over(monkeypatch, LIMIT)
    with _endpoint_session(env) as ws:
        # Fewer characters than the limit, more bytes: 2 each.
        ws.send_text('{"type": "hello", "pad": "' + "é" * (LIMIT // 2 + 10) + '"}')
        with pytest.raises(WebSocketDisconnect) as closed:
            ws.receive_text()
    assert closed.value.code == 1009 and parsed == []


def test_over_limit_counts_utf8_bytes() -> None:
    assert not over_limit("a" * 10, 10) and over_limit("a" * 11, 10)
    assert over_limit("é" * 6, 10) and not over_limit("é" * 5, 10)
    assert over_limit(b"a" * 11, 10) and not over_limit(b"a" * 10, 10)
    assert not over_limit("é" * 2, 10)  # surely under: not encoded


# ------------------------------------------------------------------ short error answers


def test_a_huge_bad_field_or_key_answers_a_small_422(big_env: Env) -> None:
    huge = "x" * (9 * MB)
    for body in ({"endpoint_id": huge, "tasks": [{"function_id": "f", "args": 5}]},
                 {"endpoint_id": "e", "tasks": [{huge: 1}]}):
        r = big_env.client.post("/v1/tasks", headers=big_env.headers, json=body)
        assert r.status_code == 422 and len(r.content) < SMALL, len(r.content)
        answer = ErrorBody.model_validate(r.json())
        assert answer.error == "invalid_request" and answer.detail
        assert all(set(d) == {"type", "loc", "msg"} for d in answer.detail)
    assert (answer.detail or [{}])[0]["loc"] == ["body", "tasks", 0, "function_id"]


def test_a_huge_body_that_is_not_json_answers_a_small_422(big_env: Env) -> None:
    r = big_env.client.post(
        "/v1/tasks", headers={**big_env.headers, "Content-Type": "application/json"},
        content=b'{"endpoint_id": "' + b"y" * (9 * MB))
    assert r.status_code == 422 and len(r.content) < SMALL, len(r.content)
    assert b"yyyyyyyyyy" not in r.content


def test_a_422_lists_at_most_ten_problems(env: Env) -> None:
    tasks = [{"function_id": "", "args": i} for i in range(50)]
    r = env.client.post("/v1/tasks", headers=env.headers, json={"endpoint_id": "", "tasks": tasks})
    assert r.status_code == 422
    assert len(r.json()["detail"]) == errors.MAX_DETAILS
    assert "more)" in r.json()["message"]


def test_a_long_id_in_a_path_is_not_echoed_whole(env: Env) -> None:
    long_id = "z" * 10_000
    for path in (f"/v1/endpoints/{long_id}", f"/v1/functions/{long_id}",
                 f"/v1/tasks/{long_id}", f"/v1/task_groups/{long_id}"):
        r = env.client.get(path, headers=env.headers)
        assert r.status_code in (404, 422) and len(r.content) < SMALL, (path, len(r.content))


def test_error_details_clip_keys_and_drop_input() -> None:
    key = "K" * (9 * MB)
    raw = [{"type": "int_parsing", "loc": ("body", "tasks", 0, key), "msg": "M" * 10_000,
            "input": key, "ctx": {"error": key}, "url": "https://errors.pydantic.dev"}] * 25
    details = error_details(raw)
    assert len(details) == errors.MAX_DETAILS
    assert len(json.dumps(details)) < 10 * SMALL
    first = details[0]
    assert set(first) == {"type", "loc", "msg"}
    assert first["loc"][:3] == ["body", "tasks", 0] and len(first["loc"][3]) == errors.CLIP
    assert first["loc"][3].endswith("\N{HORIZONTAL ELLIPSIS}")
    summary = error_summary(raw, 3)
    assert len(summary) < 1000 and summary.endswith("(and 22 more)")
    assert clip("short") == "short" and len(clip("x" * 100)) == errors.CLIP
    assert error_details([{"loc": tuple(range(100)), "msg": "deep", "type": "t"}])[0]["loc"][-1] \
        == "\N{HORIZONTAL ELLIPSIS}"


# ------------------------------------------------------------------ 429


def test_too_many_requests_says_when_to_come_back() -> None:
    r = TooManyRequests("slow down; send bigger batches", 2.2).response()
    assert r.status_code == 429 and r.headers["Retry-After"] == "3"
    body = ErrorBody.model_validate_json(bytes(r.body))
    assert (body.error, body.retry_after, body.message) == (
        "rate_limited", 2.2, "slow down; send bigger batches")
    quota = TooManyRequests("too many open tasks", 0.2, code="quota_exceeded").response()
    assert quota.headers["Retry-After"] == "1"
    assert json.loads(bytes(quota.body))["error"] == "quota_exceeded"
    assert errors.CODES[429] == "rate_limited"
    assert (errors.QuotaExceeded.status, errors.QuotaExceeded.code) == (403, "quota_exceeded")


def test_submissions_on_the_stream_are_rate_limited(make_api: MakeApi) -> None:
    e = make_env(make_api, Settings(max_payload_bytes=LIMIT, rate_limit=0.01, rate_burst=5))
    group = e.group()
    with e.client.websocket_connect(
        f"/v1/task_groups/{group}/results", headers=e.headers
    ) as ws:
        answers = []
        for i in range(10):
            ws.send_text(json.dumps({"type": "submit", "request_id": i, "batch": {}}))
            answers.append(failed(ws.receive_text()))
    limited = [a for a in answers if a.status == 429]
    assert limited, answers
    assert limited[0].error == "rate_limited" and (limited[0].retry_after or 0) > 0
    assert [a.request_id for a in answers] == list(range(10))


# ------------------------------------------------------------------ quiet refusals


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_refused_websockets_log_one_info_line_and_no_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(errors, "refusals", QuietLog(errors.log, every=60))
    got = Collect()
    with EmbeddedBroker(Settings(auth_failure_rate=0), log_level="info") as broker:
        watched = [logging.getLogger(n) for n in ("uvicorn", "farcall", "websockets")]
        levels = [w.level for w in watched]
        for w in watched:
            w.addHandler(got)
        logging.getLogger("farcall").setLevel(logging.INFO)
        try:
            ws_url = broker.url.replace("http://", "ws://")
            for i in range(100):
                path = "/v1/task_groups/g/results" if i % 2 else "/v1/endpoints/e/connect"
                with pytest.raises(InvalidStatus) as refused:
                    connect(ws_url + path, additional_headers={"Authorization": "Bearer nope"},
                            open_timeout=10)
                assert refused.value.response.status_code == 401
        finally:
            for w, level in zip(watched, levels, strict=True):
                w.removeHandler(got)
                w.setLevel(level)
    ours = [r for r in got.records if r.name.startswith("farcall")]
    loud = [r for r in got.records if r.levelno >= logging.WARNING]
    assert not loud, [r.getMessage() for r in loud]
    assert len(ours) == 1 and ours[0].levelno == logging.INFO, [r.getMessage() for r in ours]
    assert "refused a WebSocket" in ours[0].getMessage()
