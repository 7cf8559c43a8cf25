"""A manager's config.yaml (no engine section, as in Globus Compute) and its Globus Compute keys;
configure --multi-user writes files that work together; render-user-config tries them offline;
Globus Compute's own default manager files (tests/endpoint/gc_configs/default) check and render."""

from __future__ import annotations

import json
import os
import pwd
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from farcall.endpoint import cli as endpoint_cli
from farcall.endpoint.config import MANAGER_KEYS, configure, load_config, parse_config
from farcall.endpoint.errors import EndpointConfigError
from farcall.endpoint.multiuser import manager as manager_module
from farcall.endpoint.multiuser.environment import load_user_environment
from farcall.endpoint.multiuser.identity import IdentityMapper, local_user
from farcall.endpoint.multiuser.templates import load_user_config_schema, render_user_config
from farcall.endpoint.problems import ConfigProblems

GC_DEFAULT = Path(__file__).parent / "gc_configs" / "default"
FILES = {"config.yaml": 0o644, "identity_mapping.json": 0o600, "user_config_template.yaml.j2": 0o644,
         "user_config_schema.json": 0o644, "user_environment.yaml": 0o600}


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("FARCALL_HOME", str(tmp_path / "home"))
    for var in ("FARCALL_BROKER_URL", "FARCALL_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path / "home"


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "farcall.endpoint", *args], env=env,
                          capture_output=True, text=True, timeout=90)


def test_configure_multi_user_writes_the_manager_and_its_files(home: Path) -> None:
    path = configure("site", broker_url="http://127.0.0.1:8000", multi_user=True)
    directory = path.parent
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    for name, mode in FILES.items():
        assert stat.S_IMODE((directory / name).stat().st_mode) == mode, name
    config = load_config("site")
    assert config.multi_user and "engine" not in yaml.safe_load(path.read_text())
    assert config.resolved_broker_url() == "http://127.0.0.1:8000"

    mapper = IdentityMapper(directory / "identity_mapping.json")
    assert mapper.map_identity([{"id": "u", "sub": "u", "username": "alice"}]) == "alice"
    assert load_user_environment(directory) == {}
    schema = load_user_config_schema(directory)
    assert schema is not None and schema["additionalProperties"] is False
    for values in ({}, {"max_workers": 4}, {"max_workers": 1, "account": "abc123", "partition": "gpu",
                                            "nodes": 2}):
        _, user_config = render_user_config(directory, values, local_user("root"), config)
        assert user_config.engine["type"] == "ProcessPoolEngine"
        assert user_config.engine["max_workers"] == values.get("max_workers", 2)
        assert user_config.display_name == "site (root)" and not user_config.multi_user


def test_the_commented_slurm_example_renders_too(home: Path) -> None:
    """The template's second engine section (a Jinja comment) is valid once an admin swaps it in."""
    directory = configure("site", multi_user=True).parent
    template = directory / "user_config_template.yaml.j2"
    text = template.read_text()
    slurm = re.search(r"\{#\n  On a Slurm cluster.*?\n\n(engine:\n.*?)#\}\n", text, flags=re.S)
    assert slurm is not None
    head = text[:text.index("engine:\n")]
    template.write_text(head + slurm.group(1))
    values = {"account": "abc123", "partition": "gpu", "nodes": 2, "max_workers": 4}
    _, config = render_user_config(directory, values, local_user("root"), load_config("site"))
    provider = config.engine["provider"]
    assert config.engine["type"] == "ParslEngine" and config.engine["max_workers_per_node"] == 4
    assert (provider["account"], provider["partition"], provider["nodes_per_block"]) == ("abc123", "gpu", 2)
    assert provider["worker_init"] == "cd /root"


def test_configure_multi_user_refuses_engine_options_and_overwriting(home: Path) -> None:
    with pytest.raises(EndpointConfigError, match="--engine, --provider and --max-workers do not apply"):
        configure("site", engine="ParslEngine", multi_user=True)
    configure("site", multi_user=True)
    with pytest.raises(EndpointConfigError, match="already configured.*identity_mapping.json.*--force"):
        configure("site", multi_user=True)
    (home / "endpoints" / "site" / "identity_mapping.json").chmod(0o666)
    configure("site", multi_user=True, force=True)
    assert stat.S_IMODE((home / "endpoints" / "site" / "identity_mapping.json").stat().st_mode) == 0o600


def test_render_user_config_from_the_command_line(env: dict[str, str]) -> None:
    done = cli(env, "configure", "site", "--multi-user")
    assert done.returncode == 0, done.stderr
    assert "render-user-config site" in done.stdout

    done = cli(env, "render-user-config", "site", "--user-config", '{"max_workers": 3}', "--user", "root")
    assert done.returncode == 0, done.stderr
    rendered = yaml.safe_load(done.stdout)
    assert rendered["engine"] == {"type": "ProcessPoolEngine", "max_workers": 3, "prefetch": 16}
    assert "for local user root (uid 0)" in done.stderr

    me = pwd.getpwuid(os.getuid()).pw_name
    done = cli(env, "render-user-config", "site")
    assert done.returncode == 0, done.stderr
    assert yaml.safe_load(done.stdout)["display_name"] == f"site ({me})"


@pytest.mark.parametrize(("args", "says"), [
    (["--user-config", "{bad"], "--user-config is not valid JSON"),
    (["--user-config", '{"max_workers": 0}'],
     "user_endpoint_config.max_workers: 0 is less than the minimum of 1"),
    (["--user-config", '{"acount": "x"}'], "('acount' was unexpected)"),
    (["--user-config", '{"local_user": "root"}'], "'local_user' is a reserved name"),
    (["--user", "no-such-account-here"], "no local account named 'no-such-account-here'"),
])
def test_render_user_config_says_what_is_wrong(env: dict[str, str], args: list[str], says: str) -> None:
    assert cli(env, "configure", "site", "--multi-user").returncode == 0
    done = cli(env, "render-user-config", "site", *args)
    assert done.returncode == 1 and done.stdout == ""
    assert says in done.stderr


def test_render_user_config_needs_a_multi_user_endpoint(env: dict[str, str]) -> None:
    assert cli(env, "configure", "laptop").returncode == 0
    done = cli(env, "render-user-config", "laptop", "--user-config", json.dumps({}))
    assert done.returncode == 1 and "not a multi-user endpoint" in done.stderr
    done = cli(env, "configure", "other", "--multi-user", "--engine", "ThreadPoolEngine")
    assert done.returncode == 1 and "do not apply" in done.stderr


# ------------------------------------------------------------------ no engine: a manager


@pytest.mark.parametrize("text", ["", "display_name: null\n", "multi_user: true\n",
                                  "display_name: site\nheartbeat_period: 30\n"])
def test_a_config_without_an_engine_section_is_a_manager(text: str) -> None:
    config = parse_config(text)
    assert config.multi_user is True and config.engine == {} and config.warnings == []


def test_an_engine_section_makes_an_endpoint_that_runs_tasks_itself() -> None:
    for text in ("engine: {type: ThreadPoolEngine}", "multi_user: false\nengine: {type: ThreadPoolEngine}"):
        config = parse_config(text)
        assert config.multi_user is False and config.engine == {"type": "ThreadPoolEngine"}


def test_multi_user_false_without_an_engine_says_to_add_one_with_every_other_problem() -> None:
    with pytest.raises(ConfigProblems) as raised:
        parse_config("multi_user: false\nheartbeat_period: 0\n", "ep/config.yaml")
    found = {p.key: str(p) for p in raised.value.problems}
    assert list(found) == ["heartbeat_period", "engine"]  # the file's order; engine is not in it
    message = found["engine"]
    assert "engine: missing" in message and "multi_user: false" in message
    assert "`engine: {type: ProcessPoolEngine}`" in message


def test_manager_keys_beside_an_engine_are_each_an_error() -> None:
    text = "engine: {type: ThreadPoolEngine}\npublic: true\nuser_config_template_path: t.j2\n"
    with pytest.raises(ConfigProblems) as raised:
        parse_config(text)
    assert [p.key for p in raised.value.problems] == ["public", "user_config_template_path"]
    for problem in raised.value.problems:
        assert "applies only to a multi-user endpoint's manager" in problem.message
        assert f"remove {problem.key}" in problem.message
    assert set(MANAGER_KEYS) >= {"public", "pam", "email", "mu_child_ep_grace_period_s",
                                 "force_mu_allow_same_user", "user_config_schema_path"}


GLOBUS_MANAGER_KEYS = """\
public: true
pam: {enable: true, service_name: compute-site}
mu_child_ep_grace_period_s: 45
email: support@example.org
force_mu_allow_same_user: true
"""


def test_globus_manager_keys_farcall_does_not_act_on_warn_once_each_saying_what_it_does() -> None:
    config = parse_config(GLOBUS_MANAGER_KEYS + "display_name: site\n")
    said = {w.key: w.message for w in config.warnings}
    assert list(said) == ["public", "pam", "mu_child_ep_grace_period_s", "email",
                          "force_mu_allow_same_user"]
    assert "Client.share_endpoint" in said["public"]
    assert "'compute-site'" in said["pam"] and "setresgid" in said["pam"]
    assert "the broker asks the manager again" in said["mu_child_ep_grace_period_s"]
    assert "display_name" in said["email"]
    assert "UserEndpointError" in said["force_mu_allow_same_user"]
    assert config.pam is not None and config.pam.service_name == "compute-site"
    quiet = parse_config("public: false\npam: {enable: false}\nforce_mu_allow_same_user: false\n")
    assert quiet.warnings == []


@pytest.mark.parametrize(("text", "key"), [
    ("pam: {enable: true, servce_name: x}", "pam.servce_name"),
    ("pam: yes", "pam"),
    ("mu_child_ep_grace_period_s: -1", "mu_child_ep_grace_period_s"),
    ("public: maybe", "public"),
    ("user_config_schema_path: ''", "user_config_schema_path"),
])
def test_bad_globus_manager_keys_are_errors_naming_them(text: str, key: str) -> None:
    with pytest.raises(ConfigProblems) as raised:
        parse_config(text)
    assert [p.key for p in raised.value.problems] == [key]


# ------------------------------------------------------------------ Globus Compute's default files


def _gc_default(home: Path, config: str | None = None) -> Path:
    directory = home / "endpoints" / "default"
    directory.mkdir(parents=True)
    for path in GC_DEFAULT.iterdir():
        (directory / path.name).write_text(path.read_text())
    if config is not None:
        (directory / "config.yaml").write_text(config)
    return directory


def test_globus_computes_default_manager_files_pass_check(env: dict[str, str]) -> None:
    """As whichever account runs the tests: root loads the identity mapping, an ordinary
    account says it is not read; either way the template renders and its engine is built."""
    _gc_default(Path(env["FARCALL_HOME"]))
    done = cli(env, "check", "default")
    assert done.returncode == 0, done.stderr
    assert "config.yaml: OK" in done.stdout and "engine: MultiUserManager" in done.stdout
    assert "WARNING public:" in done.stdout and "WARNING email:" in done.stdout
    assert re.search(r"user endpoints: rendered from .*user_config_template.yaml.j2 \(engine "
                     r"ParslEngine.*with no values\)", done.stdout), done.stdout


@pytest.mark.parametrize("privileged", [True, False])
def test_check_of_the_default_files_as_root_and_as_an_ordinary_account(
        home: Path, privileged: bool, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    directory = _gc_default(home)
    monkeypatch.setattr(manager_module, "check_privileges", lambda: privileged)
    assert endpoint_cli.main(["check", "default"]) == 0
    out = capsys.readouterr().out
    mapping = directory / "example_identity_mapping_config.json"
    if privileged:
        assert f"identity mapping: {mapping}" in out and "WARNING identity_mapping" not in out
    else:
        me = pwd.getpwuid(os.getuid()).pw_name
        assert f"runs user endpoints as: {me} (uid {os.getuid()}), for its owner only" in out
        assert f"WARNING identity_mapping_config_path: this manager runs as the ordinary account " \
               f"{me}, not as root, so it maps no identity and {mapping} is not read" in out


def test_an_ordinary_accounts_default_config_checks_without_a_warning(
        home: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    _gc_default(home, config="display_name: null\n")
    monkeypatch.setattr(manager_module, "check_privileges", lambda: False)
    assert endpoint_cli.main(["check", "default"]) == 0
    assert "WARNING" not in capsys.readouterr().out


def test_globus_computes_default_template_renders_with_and_without_values(
        env: dict[str, str]) -> None:
    _gc_default(Path(env["FARCALL_HOME"]))
    done = cli(env, "render-user-config", "default")
    assert done.returncode == 0, done.stderr
    rendered = yaml.safe_load(done.stdout)
    assert rendered["engine"]["type"] == "GlobusComputeEngine"
    assert (rendered["idle_heartbeats_soft"], rendered["idle_heartbeats_hard"]) == (10, 5760)
    assert rendered["engine"]["provider"] == {"type": "LocalProvider", "min_blocks": 0,
                                              "max_blocks": 1, "init_blocks": 1, "worker_init": ""}
    values = Path(env["FARCALL_HOME"]) / "values.json"
    values.write_text(json.dumps({"worker_init": "module load python; cd ~", "endpoint_setup": "true"}))
    done = cli(env, "render-user-config", "default", "-o", str(values))
    assert done.returncode == 0, done.stderr
    rendered = yaml.safe_load(done.stdout)
    assert rendered["engine"]["provider"]["worker_init"] == "module load python; cd ~"
    assert rendered["endpoint_setup"] == "true"
    done = cli(env, "render-user-config", "default", "--user-config", '{"worker_init": 5}')
    assert done.returncode == 1 and "user_endpoint_config.worker_init: 5 is not of type" in done.stderr
