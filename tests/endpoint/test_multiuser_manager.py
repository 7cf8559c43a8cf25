"""The manager's decisions without root: privileges, mapping and rendering outcomes, the
refusing user endpoint, the state file behind ``status``/``list``.

Starting user endpoints as real accounts is tests/integration/test_multi_user.py's.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import yaml

from farcall.endpoint import cli
from farcall.endpoint.config import EndpointConfig
from farcall.endpoint.errors import EndpointError
from farcall.endpoint.multiuser import manager as manager_module
from farcall.endpoint.multiuser.manager import (
    ManagerEngine,
    RefusingEngine,
    UserEndpointManager,
    check_privileges,
)
from farcall.endpoint.multiuser.state import write_user_endpoints
from farcall.errors import IdentityMappingError, UserEndpointError
from farcall.protocol.channel import ResultMessage, StartUserEndpoint
from harness.procs import wait_until
from tests.endpoint.fake_broker import CREDENTIAL, ENDPOINT_ID, FakeBroker
from tests.endpoint.helpers import make_task, value_of

TEMPLATE = """\
display_name: {{ "for " ~ local_user }}
engine:
  type: ThreadPoolEngine
  max_workers: {{ workers | default(1) }}
"""


def frame(username: str, config: dict[str, object] | None = None,
          endpoint_id: str = "ue-0001-0000") -> StartUserEndpoint:
    return StartUserEndpoint(endpoint_id=endpoint_id, credential="fce_child", user_id=f"id-{username}",
                             username=username,
                             identities=[{"id": f"id-{username}", "sub": f"id-{username}",
                                          "username": username}],
                             user_endpoint_config=config or {}, config_hash="ab" * 32)


@pytest.fixture
def site(tmp_path: Path) -> Path:
    directory = tmp_path / "site"
    directory.mkdir()
    (directory / "identity_mapping.json").write_text(json.dumps([{
        "DATA_TYPE": "expression_identity_mapping#1.0.0",
        "mappings": [{"source": "{username}", "match": "ada", "output": "nobody"},
                     {"source": "{username}", "match": "rooty", "output": "root"},
                     {"source": "{username}", "match": "ghost", "output": "no-such-account-42"}]}]))
    (directory / "user_config_template.yaml.j2").write_text(TEMPLATE)
    (directory / "user_config_schema.json").write_text(json.dumps({
        "type": "object", "additionalProperties": False,
        "properties": {"workers": {"type": "integer", "minimum": 1, "maximum": 4}}}))
    (directory / "user_environment.yaml").write_text("SITE_SCRATCH: /scratch\n")
    return directory


def make_manager(directory: Path, url: str = "http://127.0.0.1:9", **config: object
                 ) -> UserEndpointManager:
    parsed = EndpointConfig.model_validate({"multi_user": True, **config})
    return UserEndpointManager("site", directory, parsed, url)


def test_the_manager_needs_root_or_the_capabilities(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setattr(manager_module, "_effective_capabilities", lambda: 0)
    with pytest.raises(EndpointError, match="must run as root .*CAP_SETUID"):
        check_privileges()
    monkeypatch.setattr(manager_module, "_effective_capabilities",
                        lambda: (1 << manager_module.CAP_SETUID) | (1 << manager_module.CAP_SETGID))
    check_privileges()


def test_a_mapped_user_gets_the_rendered_config_with_what_the_manager_fixes(site: Path) -> None:
    prepared = make_manager(site, user_endpoint_idle_seconds=42).prepare(frame("ada", {"workers": 2}))
    assert prepared.user.name == "nobody" and prepared.environment == {"SITE_SCRATCH": "/scratch"}
    config = yaml.safe_load(prepared.config)
    assert config["broker_url"] == "http://127.0.0.1:9" and config["idle_shutdown_seconds"] == 42
    assert config["display_name"] == "for nobody" and config["engine"]["max_workers"] == 2
    assert "multi_user" not in config


def test_the_users_environment_reaches_process_workers(site: Path) -> None:
    (site / "user_config_template.yaml.j2").write_text(
        "engine:\n  type: ProcessPoolEngine\n  worker_env_passthrough: [LANG]\n")
    config = yaml.safe_load(make_manager(site).prepare(frame("ada")).config)
    assert config["engine"]["worker_env_passthrough"] == ["LANG", "SITE_SCRATCH"]


def test_an_unmapped_user_is_refused_naming_them_and_the_file(site: Path) -> None:
    with pytest.raises(IdentityMappingError) as raised:
        make_manager(site).prepare(frame("zed"))
    message = str(raised.value)
    assert "zed (id-zed)" in message and "add a rule" in message
    assert str(site / "identity_mapping.json") in message


def test_a_name_without_an_account_says_to_create_it(site: Path) -> None:
    with pytest.raises(IdentityMappingError, match="ghost .*no-such-account-42.*useradd"):
        make_manager(site).prepare(frame("ghost"))


def test_root_and_the_managers_own_account_are_refused(site: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(UserEndpointError, match="never runs a user endpoint as root"):
        make_manager(site).prepare(frame("rooty"))
    monkeypatch.setattr(os, "getuid", lambda: 65534)  # a manager running as nobody
    with pytest.raises(UserEndpointError, match=r"nobody \(uid 65534\)"):
        make_manager(site).prepare(frame("ada"))


def test_values_the_template_refuses_name_the_value(site: Path) -> None:
    with pytest.raises(UserEndpointError, match="workers"):
        make_manager(site).prepare(frame("ada", {"workers": 99}))
    (site / "user_config_template.yaml.j2").write_text("broker_url: http://elsewhere\n")
    with pytest.raises(UserEndpointError, match="broker_url"):
        make_manager(site).prepare(frame("ada"))


def test_a_fixed_mapping_takes_effect_on_the_next_start(site: Path) -> None:
    manager = make_manager(site)
    with pytest.raises(IdentityMappingError):
        manager.prepare(frame("zed"))
    path = site / "identity_mapping.json"
    mapping = json.loads(path.read_text())
    mapping[0]["mappings"].append({"source": "{username}", "match": "zed", "output": "nobody"})
    tmp = path.with_suffix(".new")
    tmp.write_text(json.dumps(mapping))
    os.replace(tmp, path)
    assert manager.prepare(frame("zed")).user.name == "nobody"


def test_engines_answer_every_task_at_once() -> None:
    results: list[ResultMessage] = []
    error = IdentityMappingError("user zed has no local account")
    RefusingEngine(error).submit(make_task(abs, -1), results.append)
    ManagerEngine().submit(make_task(abs, -1), results.append)
    with pytest.raises(IdentityMappingError, match="user zed"):
        value_of(results[0])
    with pytest.raises(UserEndpointError, match="user_endpoint_config"):
        value_of(results[1])
    assert ManagerEngine().capacity > 0 and RefusingEngine(error).capacity > 0


def test_the_manager_answers_for_a_user_it_cannot_map_then_lets_go(site: Path) -> None:
    broker = FakeBroker()
    manager = make_manager(site, broker.url, user_endpoint_idle_seconds=2, heartbeat_period=0.2)
    try:
        manager.begin()
        start = frame("zed", endpoint_id=ENDPOINT_ID).model_copy(update={"credential": CREDENTIAL})
        manager.request_start(start)
        broker.wait(lambda: broker.hello(1), 10, "the refusing user endpoint's hello")
        assert [e.state for e in manager.user_endpoints()] == ["failed"]
        state = json.loads((site / "user_endpoints.json").read_text())
        wait_until(lambda: json.loads((site / "user_endpoints.json").read_text())
                   ["user_endpoints"], 5, "the state file")
        task = make_task(abs, -3)
        broker.send_tasks([task])
        broker.wait(lambda: task.task_id in broker.result_ids(), 10, "the refusal")
        with pytest.raises(IdentityMappingError, match="zed"):
            value_of(broker.results()[0])
        wait_until(lambda: not manager.user_endpoints(), 10, "the idle refusal to be forgotten")
        wait_until(lambda: not json.loads((site / "user_endpoints.json").read_text())
                   ["user_endpoints"], 5, "the state file to forget it")
        assert state["pid"] == os.getpid()
    finally:
        manager.shutdown(5)
        broker.close()


def test_status_and_list_show_the_user_endpoints(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("FARCALL_HOME", str(tmp_path))
    directory = tmp_path / "endpoints" / "site"
    directory.mkdir(parents=True)
    (directory / "config.yaml").write_text("multi_user: true\n")
    (directory / "endpoint.pid").write_text(f"{os.getpid()}\n")  # "the manager runs"
    write_user_endpoints(directory, [
        {"endpoint_id": "ue-1", "local_user": "alice", "uid": 1001, "config_hash": "c0ffee" * 8,
         "state": "running", "pid": 4242, "last_activity": time.time() - 30, "reason": ""},
        {"endpoint_id": "ue-2", "local_user": "", "uid": None, "config_hash": "beef" * 16,
         "state": "failed", "pid": None, "last_activity": 0,
         "reason": "user zed has no local account"}])
    assert cli.main(["status", "site"]) == 0
    shown = capsys.readouterr().out
    assert "user endpoints: 2" in shown and "alice" in shown and "1001" in shown
    assert "c0ffeec0ffee" in shown and "ue-2: user zed has no local account" in shown
    assert cli.main(["status", "site", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["user_endpoints"]
    assert [r["local_user"] for r in rows] == ["alice", ""] and rows[0]["idle_seconds"] > 0
    assert cli.main(["list"]) == 0
    listed = capsys.readouterr().out
    assert "site > alice" in listed and "ue-1" in listed and "failed" in listed
    (directory / "endpoint.pid").unlink()  # stopped: the file is stale
    assert cli.main(["status", "site", "--json"]) == 0
    assert "user_endpoints" not in json.loads(capsys.readouterr().out)


def test_a_user_endpoint_that_dies_before_connecting_is_reported_on_the_next_start(
    site: Path
) -> None:
    broker = FakeBroker()
    manager = UserEndpointManager(
        "site", site, EndpointConfig(multi_user=True, user_endpoint_idle_seconds=2,
                                     heartbeat_period=0.2), broker.url, python="/bin/false")
    start = frame("ada", endpoint_id=ENDPOINT_ID).model_copy(update={"credential": CREDENTIAL})
    try:
        manager.begin()
        manager.request_start(start)  # the "launch" exits 1 at once
        wait_until(lambda: manager._failed_starts, 10, "the failed start to be seen")
        manager.request_start(start)  # the broker asks again: now its tasks learn why
        broker.wait(lambda: broker.hello(1), 10, "the refusing user endpoint's hello")
        task = make_task(abs, -3)
        broker.send_tasks([task])
        broker.wait(lambda: task.task_id in broker.result_ids(), 10, "the refusal")
        with pytest.raises(UserEndpointError, match=r"exited before it connected \(exit code 1\)"):
            value_of(broker.results()[0])
    finally:
        manager.shutdown(5)
        broker.close()
