"""The manager's decisions without root: privileges, mapping and rendering outcomes, the
owner-only manager of an ordinary account, the refusing user endpoint, the state file behind
``status``/``list``.

Starting user endpoints as real accounts is tests/integration/test_multi_user.py's.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from farcall.endpoint import cli
from farcall.endpoint.check import CheckReport, check_config
from farcall.endpoint.config import EndpointConfig
from farcall.endpoint.errors import EndpointError
from farcall.endpoint.multiuser import manager as manager_module
from farcall.endpoint.multiuser import privileges
from farcall.endpoint.multiuser.manager import (
    ManagerEngine,
    RefusingEngine,
    UserEndpointManager,
    check_privileges,
    own_account,
)
from farcall.endpoint.multiuser.owner import Owner
from farcall.endpoint.multiuser.state import write_user_endpoints
from farcall.endpoint.problems import ConfigProblems, Problem
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


OWNER = Owner("mgr-0001", "id-ada", "ada")


def make_manager(directory: Path, url: str = "http://127.0.0.1:9", privileged: bool = True,
                 **config: object) -> UserEndpointManager:
    parsed = EndpointConfig.model_validate({"multi_user": True, **config})
    return UserEndpointManager("site", directory, parsed, url, privileged=privileged,
                               owner=None if privileged else OWNER)


def test_root_or_both_capabilities_change_user_an_ordinary_account_does_not(
        monkeypatch: pytest.MonkeyPatch) -> None:
    setuid, setgid = 1 << privileges.CAP_SETUID, 1 << privileges.CAP_SETGID
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    for caps, privileged in ((0, False), (setuid | setgid, True), (1 << 21, False)):
        monkeypatch.setattr(privileges, "effective_capabilities", lambda c=caps: c)
        assert check_privileges() is privileged
    for caps, has, lacks in ((setuid, "CAP_SETUID", "CAP_SETGID"),
                             (setgid, "CAP_SETGID", "CAP_SETUID")):
        monkeypatch.setattr(privileges, "effective_capabilities", lambda c=caps: c)
        with pytest.raises(EndpointError, match=f"has {has} but not {lacks}.*both"):
            check_privileges()
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(privileges, "effective_capabilities", lambda: 0)
    assert check_privileges() is True


def test_an_ordinary_accounts_manager_runs_its_owner_as_itself_without_mapping(site: Path) -> None:
    (site / "identity_mapping.json").write_text("not even JSON")  # never read
    manager = make_manager(site, privileged=False)
    manager.begin()
    try:
        prepared = manager.prepare(frame("ada", {"workers": 2}))
        assert prepared.user == own_account()
        assert yaml.safe_load(prepared.config)["display_name"] == f"for {own_account().name}"
    finally:
        manager.shutdown(5)


def test_an_ordinary_accounts_manager_refuses_everyone_but_its_owner(site: Path) -> None:
    with pytest.raises(UserEndpointError) as raised:
        make_manager(site, privileged=False).prepare(frame("bob"))
    message = str(raised.value)
    me = own_account().name
    assert f"runs as the ordinary account {me}" in message and "its owner ada" in message
    assert "bob (id-bob) cannot use it" in message and "as root with an identity mapping" in message
    unknown = UserEndpointManager("site", site, EndpointConfig(), "http://127.0.0.1:9",
                                  privileged=False)
    with pytest.raises(UserEndpointError, match="cannot use it"):
        unknown.prepare(frame("ada"))  # no owner known: no one is served


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
                                     heartbeat_period=0.2), broker.url, python="/bin/false",
        privileged=True)
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


# ------------------------------------------------------------------ farcall-endpoint check


def check(directory: Path, privileged: bool, monkeypatch: pytest.MonkeyPatch,
          **config: object) -> CheckReport:
    monkeypatch.setattr(manager_module, "check_privileges", lambda: privileged)
    return check_config("site", EndpointConfig.model_validate(config), directory)


def test_check_renders_the_template_with_the_schemas_defaults_and_builds_its_engine(
        site: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    schema = json.loads((site / "user_config_schema.json").read_text())
    schema["properties"]["workers"]["default"] = 3
    (site / "user_config_schema.json").write_text(json.dumps(schema))
    report = check(site, True, monkeypatch)
    assert report.built["engine"] == "MultiUserManager" and report.built["schema"] == "yes"
    assert report.built["identity mapping"] == str(site / "identity_mapping.json")
    assert report.built["user endpoints"].endswith(
        f'(engine ThreadPoolEngine, for {own_account().name} with {{"workers": 3}})')
    assert report.warnings == []


def test_check_says_when_the_template_needs_values_the_schema_requires(
        site: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    schema = json.loads((site / "user_config_schema.json").read_text())
    schema["required"] = ["workers"]
    (site / "user_config_schema.json").write_text(json.dumps(schema))
    report = check(site, True, monkeypatch)
    assert "not rendered here: with no values sent" in report.built["user endpoints"]
    assert "'workers' is a required property" in report.built["user endpoints"]


def test_check_reports_every_problem_of_a_manager_at_once(
        site: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (site / "identity_mapping.json").write_text("[{}]")
    (site / "user_environment.yaml").write_text("- a list\n")
    (site / "user_config_template.yaml.j2").write_text("engine: {type: NoSuchEngine}\n")
    (site / "other.json").write_text('{"type": "nonsense"}')
    with pytest.raises(ConfigProblems) as raised:
        check(site, True, monkeypatch, user_config_schema_path="other.json")
    found = {p.key: p.message for p in raised.value.problems}
    assert list(found) == ["identity_mapping_config_path", "user_config_schema_path",
                           "user_environment.yaml", "user_config_template_path"]
    assert "DATA_TYPE" in found["identity_mapping_config_path"]
    assert "not a valid JSON Schema" in found["user_config_schema_path"]
    assert "expected a mapping" in found["user_environment.yaml"]
    assert "NoSuchEngine" in found["user_config_template_path"]


def test_check_of_an_ordinary_accounts_manager_warns_that_the_mapping_is_not_read(
        site: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    report = check(site, False, monkeypatch, identity_mapping_config_path="/nowhere/map.json")
    me = own_account()
    assert report.built["runs user endpoints as"] == f"{me.name} (uid {me.uid}), for its owner only"
    [warning] = report.warnings
    assert warning.key == "identity_mapping_config_path" and "/nowhere/map.json is not read" in (
        warning.message)
    with pytest.raises(ConfigProblems, match="/nowhere/map.json does not exist"):
        check(site, True, monkeypatch, identity_mapping_config_path="/nowhere/map.json")


def test_a_rendered_configs_warnings_are_the_checks_naming_the_template(
        site: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    render = manager_module.render_user_config

    def warned(*args: Any, **kwargs: Any) -> tuple[str, EndpointConfig]:
        text, config = render(*args, **kwargs)
        config._warnings = [Problem("engine.some_key", "farcall does this instead")]
        return text, config

    monkeypatch.setattr(manager_module, "render_user_config", warned)
    report = check(site, True, monkeypatch)
    assert [str(w) for w in report.warnings] == [
        "user_config_template.yaml.j2: engine.some_key: farcall does this instead"]


def test_an_account_without_a_password_entry_is_named_by_its_uid(
        monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(uid: int) -> None:
        raise KeyError(uid)

    monkeypatch.setattr(manager_module.pwd, "getpwuid", missing)
    monkeypatch.setenv("HOME", "/work/home")
    me = own_account()
    assert (me.name, me.uid, me.gid, me.home) == (str(os.getuid()), os.getuid(), os.getgid(),
                                                  "/work/home")
