"""configure --multi-user writes files that work together; render-user-config tries them offline."""

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

from farcall.endpoint.config import configure, load_config
from farcall.endpoint.errors import EndpointConfigError
from farcall.endpoint.multiuser.environment import load_user_environment
from farcall.endpoint.multiuser.identity import IdentityMapper, local_user
from farcall.endpoint.multiuser.templates import load_user_config_schema, render_user_config

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
