"""The Action Provider API on real broker, Redis, RabbitMQ and endpoint processes, driven as a
flow engine drives it (run -> poll status -> release), every answer judged by the published
globus-action-provider-tools (tests/ap_judge.py). The thumbnail flow of docs/flows.md runs
here with the function and the flow definition read from that page, so the page cannot rot.

Functions are defined inside the tests so dill sends them by value (the endpoint's workers
cannot import this module).
"""

from __future__ import annotations

import importlib.util
import json
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from farcall import Client
from farcall.broker.actions import identity_urn
from harness import REPO
from harness.procs import wait_until
from tests.ap_judge import Judge
from tests.integration.helpers import Broker, Endpoint

pytestmark = pytest.mark.integration

FLOWS_PAGE = REPO / "docs" / "flows.md"
TERMINAL = ("SUCCEEDED", "FAILED")


@pytest.fixture(scope="module")
def judge() -> Iterator[Judge]:
    j = Judge()
    yield j
    j.close()


@pytest.fixture(scope="module")
def ap_endpoint(broker: Broker, token: str,
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[Endpoint]:
    """One endpoint (a process pool of 2) for the whole module: the tests only read their own
    actions, so they can share it, and the module saves an endpoint start per test."""
    home = tmp_path_factory.mktemp("ap-endpoint")
    env = dict(broker.env, FARCALL_HOME=str(home), FARCALL_BROKER_URL=broker.url,
               FARCALL_TOKEN=token)
    ep = Endpoint("ap", env)
    ep.configure("ProcessPoolEngine", 2, broker.url)
    with Client(broker_url=broker.url, token=token) as client:
        ep.start(client)
    yield ep
    ep.stop()


class Engine:
    """What a flow engine does with the API, as one user; every answer goes to the judge."""

    def __init__(self, broker: Broker, token: str, judge: Judge) -> None:
        self.http = httpx.Client(base_url=f"{broker.url}/action-provider", timeout=30,
                                 headers={"Authorization": f"Bearer {token}"})
        self.judge = judge

    def run(self, body: dict[str, Any], expect: int = 202, path: str = "/run",
            **request: Any) -> dict[str, Any]:
        doc = self.judge.request({"request_id": str(uuid.uuid4()), "body": body, **request})
        answer = self.http.post(path, json=doc)
        assert answer.status_code == expect, answer.text
        status: dict[str, Any] = self.judge.status(answer.json())
        return status

    def status(self, action_id: str, style: str = "old") -> dict[str, Any]:
        answer = self.http.get(f"/{action_id}/status" if style == "old" else f"/actions/{action_id}")
        assert answer.status_code == 200, answer.text
        status: dict[str, Any] = self.judge.status(answer.json())
        return status

    def poll(self, action_id: str, timeout: float = 60, style: str = "old") -> dict[str, Any]:
        """The status once the action has ended, polled as an engine polls."""
        def ended() -> dict[str, Any] | None:
            status = self.status(action_id, style)
            return status if status["status"] in TERMINAL else None

        found: dict[str, Any] = wait_until(ended, timeout, f"action {action_id} to end")
        return found

    def release(self, action_id: str, style: str = "old") -> dict[str, Any]:
        answer = (self.http.post(f"/{action_id}/release") if style == "old"
                  else self.http.delete(f"/actions/{action_id}"))
        assert answer.status_code == 200, answer.text
        status: dict[str, Any] = self.judge.status(answer.json())
        return status

    def refused(self, method: str, path: str, status: int, code: str) -> None:
        answer = self.http.request(method, path)
        assert answer.status_code == status, f"{method} {path}: {answer.status_code} {answer.text}"
        assert answer.json()["code"] == code and answer.json()["description"]

    def close(self) -> None:
        self.http.close()


@pytest.fixture
def engine(broker: Broker, token: str, judge: Judge) -> Iterator[Engine]:
    e = Engine(broker, token, judge)
    yield e
    e.close()


def _outputs(status: dict[str, Any]) -> list[Any]:
    assert all(r["status"] == "success" for r in status["details"]["results"]), status
    return [r["output"] for r in status["details"]["results"]]


def test_a_flow_engine_runs_polls_and_releases(ap_endpoint: Endpoint, client: Client,
                                               engine: Engine, judge: Judge) -> None:
    def stats(values: list[float], scale: float = 1.0) -> dict[str, Any]:
        return {"n": len(values), "sum": sum(values) * scale, "max": max(values, default=None)}

    fid = client.register_function(stats)
    judge.description(engine.http.get("/").json())
    for style, path in (("old", "/run"), ("new", "/actions")):
        started = engine.run({"endpoint_id": ap_endpoint.endpoint_id, "tasks": [
            {"function_id": fid, "args": [[1, 2, 3.5]]},
            {"function_id": fid, "args": [[]], "kwargs": {"scale": 2}},
            {"function_id": fid, "kwargs": {"values": [4], "scale": 0.5}},
        ]}, path=path, label=f"stats, {style} routes")
        assert started["status"] == "ACTIVE" and started["details"]["total"] == 3
        assert started["creator_id"] == identity_urn(client.whoami()["identity_id"])
        done = engine.poll(started["action_id"], style=style)
        assert done["status"] == "SUCCEEDED" and done["display_status"] == "3/3 tasks done"
        assert _outputs(done) == [{"n": 3, "sum": 6.5, "max": 3.5},
                                  {"n": 0, "sum": 0.0, "max": None},
                                  {"n": 1, "sum": 2.0, "max": 4}]
        assert done["details"]["result"] == _outputs(done)
        task_ids = [r["task_id"] for r in done["details"]["results"]]
        assert client.get_task_group(done["details"]["task_group_id"]) == task_ids
        log = engine.http.get(f"/{started['action_id']}/log" if style == "old"
                              else f"/actions/{started['action_id']}/log")
        codes = [e["code"] for e in judge.log(log.json())["entries"]]
        assert codes.count("TaskRunning") == 3 and codes[-1] == "ActionSucceeded"
        assert engine.release(started["action_id"], style) == done
        engine.refused("GET", f"/{started['action_id']}/status", 404, "ActionNotFound")
        engine.refused("DELETE", f"/actions/{started['action_id']}", 404, "ActionNotFound")


def test_the_earlier_input_form(ap_endpoint: Endpoint, client: Client, engine: Engine) -> None:
    def greet(*names: str, greeting: str = "hello") -> str:
        return f"{greeting} {' and '.join(names)}"

    fid = client.register_function(greet)
    ep = ap_endpoint.endpoint_id
    started = engine.run({"endpoint": ep, "function": fid, "args": "ada", "payload": {
        "greeting": "hi"}, "tasks": [
            {"endpoint": ep, "function": fid, "args": ["bo", "cy"], "payload": {}},
            {"function": fid, "args": [], "kwargs": {"greeting": "bye"}}]})
    assert _outputs(engine.poll(started["action_id"])) == ["hi ada", "hello bo and cy", "bye "]


def test_a_failing_function_fails_the_action_with_its_error(
    ap_endpoint: Endpoint, client: Client, engine: Engine
) -> None:
    def check_frame(frame: int) -> Any:
        if frame == 7:
            raise ValueError(f"frame {frame} is corrupt")
        if frame == 8:
            return {frame}  # a set: not JSON
        return frame

    fid = client.register_function(check_frame)
    started = engine.run({"endpoint_id": ap_endpoint.endpoint_id, "tasks": [
        {"function_id": fid, "args": [n]} for n in (6, 7, 8)]})
    done = engine.poll(started["action_id"])
    assert done["status"] == "FAILED" and done["display_status"] == "2 of 3 tasks failed"
    ok, corrupt, not_json = done["details"]["results"]
    assert ok["status"] == "success" and ok["output"] == 6
    assert corrupt["status"] == "failed"
    assert "ValueError: frame 7 is corrupt" in corrupt["exception"]
    assert "check_frame" in corrupt["exception"], "the remote traceback comes with it"
    assert not_json["status"] == "failed"
    assert "the action provider needs a JSON-serializable return value" in not_json["exception"]
    assert done["details"]["code"] == "TaskFailed"
    assert "frame 7 is corrupt" in done["details"]["description"]
    engine.release(started["action_id"])


def test_cancel_stops_the_tasks(ap_endpoint: Endpoint, client: Client, engine: Engine) -> None:
    def slow(seconds: float) -> str:
        import time

        time.sleep(seconds)
        return "finished"

    fid = client.register_function(slow)
    started = engine.run({"endpoint_id": ap_endpoint.endpoint_id, "tasks": [
        {"function_id": fid, "args": [120]}]})
    action = started["action_id"]
    wait_until(lambda: engine.status(action)["details"]["results"][0]["status"] == "running",
               30, "the task to start")
    engine.refused("POST", f"/{action}/release", 409, "ActionConflict")
    answer = engine.http.post(f"/actions/{action}/cancel")
    cancelled = engine.judge.status(answer.json())
    assert answer.status_code == 200 and cancelled["status"] == "FAILED"
    assert cancelled["details"]["code"] == "ActionCancelled"
    (entry,) = cancelled["details"]["results"]
    assert entry["status"] == "cancelled"
    assert client.get_task(entry["task_id"])["state"] == "cancelled"
    assert engine.release(action)["status"] == "FAILED"


def test_a_request_id_runs_once(ap_endpoint: Endpoint, client: Client, engine: Engine) -> None:
    def one() -> int:
        return 1

    request = {"request_id": f"flow-{uuid.uuid4()}", "body": {
        "endpoint_id": ap_endpoint.endpoint_id, "tasks": [{"function_id": client.register_function(one)}]}}
    engine.judge.request(request)
    first = engine.http.post("/run", json=request)
    again = engine.http.post("/actions", json=request)
    assert (first.status_code, again.status_code) == (202, 200)
    action = engine.judge.status(first.json())["action_id"]
    assert engine.judge.status(again.json())["action_id"] == action
    done = engine.poll(action)
    assert len(client.get_task_group(done["details"]["task_group_id"])) == 1
    after = engine.http.post("/run", json=request)
    assert after.status_code == 200 and engine.judge.status(after.json()) == done
    different = engine.http.post("/run", json={**request, "label": "another"})
    assert different.status_code == 409 and different.json()["code"] == "ActionConflict"
    engine.release(action)


def test_others_see_only_what_manage_by_and_monitor_by_grant(
    ap_endpoint: Endpoint, client: Client, engine: Engine, broker: Broker, judge: Judge,
    tmp_path: Path,
) -> None:
    def wait_for(flag: str) -> str:
        import time
        from pathlib import Path

        deadline = time.monotonic() + 60
        while not Path(flag).exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        return "released" if Path(flag).exists() else "timed out"

    tag = uuid.uuid4().hex[:6]
    tokens = {role: broker.create_user(f"{role}-{tag}") for role in ("monitor", "manager",
                                                                     "stranger")}
    urns = {}
    for role, user_token in tokens.items():
        with Client(broker_url=broker.url, token=user_token) as theirs:
            me = theirs.whoami()
        assert me["username"] == f"{role}-{tag}"
        urns[role] = identity_urn(me["identity_id"])
    others = {role: Engine(broker, user_token, judge) for role, user_token in tokens.items()}
    flag = tmp_path / "go"
    try:
        started = engine.run({"endpoint_id": ap_endpoint.endpoint_id, "tasks": [
            {"function_id": client.register_function(wait_for), "args": [str(flag)]}]},
            monitor_by=[urns["monitor"]], manage_by=[urns["manager"]])
        action = started["action_id"]
        assert started["monitor_by"] == [urns["monitor"]]
        stranger, monitor, manager = others["stranger"], others["monitor"], others["manager"]
        for method, path in (("GET", f"/{action}/status"), ("GET", f"/actions/{action}"),
                             ("GET", f"/{action}/log"), ("POST", f"/{action}/cancel"),
                             ("POST", f"/{action}/release"), ("DELETE", f"/actions/{action}")):
            stranger.refused(method, path, 404, "ActionNotFound")
        assert monitor.status(action)["status"] == "ACTIVE"
        monitor.refused("POST", f"/{action}/cancel", 403, "Forbidden")
        monitor.refused("DELETE", f"/actions/{action}", 403, "Forbidden")
        flag.touch()
        assert _outputs(manager.poll(action)) == ["released"]
        assert monitor.status(action)["status"] == "SUCCEEDED"
        assert manager.release(action)["status"] == "SUCCEEDED"
        engine.refused("GET", f"/{action}/status", 404, "ActionNotFound")
    finally:
        flag.touch()
        for other in others.values():
            other.close()


# -------------------------------------------------------------- the page's thumbnail flow


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", FLOWS_PAGE.read_text(), flags=re.S)


def _at(state: Any, path: str) -> Any:
    """The value at a JSONPath of the simple kind flows use (``$.a.b[0].c``)."""
    assert path.startswith("$"), path
    for name, index in re.findall(r"\.([A-Za-z_][A-Za-z0-9_]*)|\[(\d+)\]", path[1:]):
        state = state[name] if name else state[int(index)]
    return state


def _parameters(template: Any, state: Any) -> Any:
    """A state's ``Parameters`` filled in from the flow's state, as the engine does (keys that
    end in ``.$`` take the value at their JSONPath)."""
    if isinstance(template, dict):
        return {(k[:-2] if k.endswith(".$") else k): (_at(state, v) if k.endswith(".$")
                                                    else _parameters(v, state))
                for k, v in template.items()}
    if isinstance(template, list):
        return [_parameters(v, state) for v in template]
    return template


def _make_images(directory: Path) -> dict[str, tuple[int, int]]:
    from PIL import Image

    directory.mkdir()
    sizes = {"wide.png": (640, 480), "tall.jpg": (300, 1000), "tiny.png": (50, 50)}
    for name, size in sizes.items():
        mode = "L" if name == "tiny.png" else "RGB"
        Image.new(mode, size, color=128).save(directory / name)
    (directory / "notes.txt").write_text("not an image: the thumbnails skip it\n")
    return sizes


def test_the_thumbnail_flow_of_the_docs(ap_endpoint: Endpoint, client: Client, engine: Engine,
                                        tmp_path: Path, judge: Judge) -> None:
    from PIL import Image

    docs = [json.loads(block) for block in _blocks("json")]  # every JSON example must parse
    definition = next(d for d in docs if "StartAt" in d)
    flow_input = next(d for d in docs if set(d) == {"input"})
    judge.request(next(d for d in docs if "request_id" in d))
    (source,) = [b for b in _blocks("python") if "def make_thumbnails" in b]
    module = tmp_path / "flows_page.py"
    module.write_text(source)
    spec = importlib.util.spec_from_file_location("flows_page", module)
    assert spec is not None and spec.loader is not None
    page = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(page)

    # The transfer's work: the run's images arrive in the cluster's directory.
    run_dir = tmp_path / "run-0042"
    sizes = _make_images(run_dir)
    state: dict[str, Any] = json.loads(json.dumps(flow_input))
    state["input"].update(cluster_path=str(run_dir), farcall_endpoint=ap_endpoint.endpoint_id,
                          thumbnail_function=client.register_function(page.make_thumbnails,
                                                                      strategy="source"))
    name, step = next((n, s) for n, s in definition["States"].items()
                      if s.get("ActionUrl", "").endswith("/action-provider"))
    body = _parameters(step["Parameters"], state)
    judge.body(engine.http.get("/").json()["input_schema"], body)
    started = engine.run(body, label="thumbnails of run 42")
    done = engine.poll(started["action_id"], timeout=90)
    assert done["status"] == "SUCCEEDED", json.dumps(done["details"], indent=2)
    state[step["ResultPath"][2:]] = done
    engine.release(started["action_id"])

    (made,) = _outputs(done)
    assert made["count"] == len(sizes) and made["directory"] == str(run_dir / "thumbnails")
    for path in made["thumbnails"]:
        with Image.open(path) as thumbnail:
            assert thumbnail.size == (200, 200), path
    assert sorted(Path(p).stem for p in made["thumbnails"]) == sorted(Path(n).stem for n in sizes)
    publish = definition["States"][step["Next"]]
    assert _parameters(publish["Parameters"], state) == {
        "thumbnails": made["thumbnails"], "count": len(sizes)}, f"{name} -> {step['Next']}"
