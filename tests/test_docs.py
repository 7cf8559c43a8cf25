"""The Python on the documentation pages runs as written, so the docs cannot rot."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from harness import REPO

RUNNABLE = ["quickstart.md", "functions.md", "timers.md"]


def python_blocks(page: str) -> str:
    text = (REPO / "docs" / page).read_text()
    return "\n\n".join(re.findall(r"```python\n(.*?)```", text, flags=re.S))


@pytest.mark.parametrize("page", RUNNABLE)
def test_page_runs(page: str) -> None:
    code = python_blocks(page)
    assert code.strip(), f"docs/{page} has no python blocks"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    if page == "quickstart.md":
        out = done.stdout
        assert "remote error: division by zero" in out
        assert "online" in out and "'success'" in out


def _documented_defaults() -> dict[str, str]:
    """``FARCALL_*`` variable -> the default docs/deploy.md's tables give it (as written)."""
    text = (REPO / "docs" / "deploy.md").read_text()
    found: dict[str, str] = {}
    for names, defaults in re.findall(r"^\| (`FARCALL_[^|]*?) \| ([^|]*?) \|", text, flags=re.M):
        for name, default in zip(names.split(" / "), defaults.split(" / "), strict=True):
            found[name.strip("` ")] = default.strip("` ")
    return found


def _compose_defaults() -> dict[str, str]:
    """The defaults the Compose file shows in its comments (``# FARCALL_X: "value"``)."""
    text = (REPO / "deploy" / "compose" / "docker-compose.yml").read_text()
    return dict(re.findall(r'^\s*# (FARCALL_[A-Z_]+): "([^"]*)"', text, flags=re.M))


@pytest.mark.parametrize("where", [_documented_defaults, _compose_defaults])
def test_the_documented_defaults_are_the_broker_s(where: Callable[[], dict[str, str]]) -> None:
    """Issue 20: the Compose file showed a rate limit of 200/s as the default, the code has 500."""
    from farcall.broker.settings import ENV_PREFIX, Settings

    documented = where()
    assert "FARCALL_RATE_LIMIT" in documented, "the defaults are not where they were"
    for name, default in documented.items():
        field = name.removeprefix(ENV_PREFIX).lower()
        assert field in Settings.model_fields, f"docs/deploy.md documents {name}, which is no setting"
        value = Settings.model_fields[field].get_default(call_default_factory=True)
        if isinstance(value, float) and value.is_integer():
            value = int(value)  # written 500, not 500.0
        assert default == str(value), f"{where.__name__}: {name} defaults to {value}, not {default}"


def test_deploy_md_says_what_every_setting_does() -> None:
    from farcall.broker.settings import ENV_PREFIX, Settings

    text = (REPO / "docs" / "deploy.md").read_text()
    missing = [f"{ENV_PREFIX}{f.upper()}" for f in Settings.model_fields
               if f"{ENV_PREFIX}{f.upper()}" not in text]
    assert not missing, f"docs/deploy.md does not say what {missing} do"


def _file_blocks(page: str) -> dict[str, str]:
    """The code blocks of a page whose info string names a file or output: ```json name.json"""
    text = (REPO / "docs" / page).read_text()
    return dict((name, body) for name, body in
                re.findall(r"^```\w+ ([\w.]+)\n(.*?)^```", text, flags=re.M | re.S))


def test_multi_user_md_per_user_image_renders_into_the_engine(tmp_path: Path) -> None:
    """docs/multi-user.md's per-user image: the user's pick lands in container_uri, an image the
    schema does not list is refused, and the result is a valid container engine section."""
    import os
    import pwd

    from farcall.endpoint.config import EndpointConfig
    from farcall.endpoint.engines import engine_class
    from farcall.endpoint.errors import EndpointConfigError
    from farcall.endpoint.multiuser.identity import local_user
    from farcall.endpoint.multiuser.templates import render_user_config

    blocks = _file_blocks("multi-user.md")
    (tmp_path / "user_config_template.yaml.j2").write_text(blocks["image_template.yaml.j2"])
    (tmp_path / "user_config_schema.json").write_text(blocks["image_schema.json"])
    user = local_user(pwd.getpwuid(os.getuid()).pw_name)
    parent = EndpointConfig(multi_user=True)
    _, config = render_user_config(tmp_path, {"image": "localhost/site/chem:2"}, user, parent)
    options = engine_class(config.engine["type"]).Options.model_validate(
        {k: v for k, v in config.engine.items() if k != "type"}).model_dump()
    assert (options["container_type"], options["container_uri"]) == ("podman", "localhost/site/chem:2")
    assert config.engine["container_cmd_options"] == f"-v {user.home}/scratch:/scratch"
    _, default = render_user_config(tmp_path, {}, user, parent)
    assert default.engine["container_uri"] == "localhost/site/python:3.11"
    with pytest.raises(EndpointConfigError, match="image"):
        render_user_config(tmp_path, {"image": "docker.io/evil/miner"}, user, parent)


def test_multi_user_md_example_files_render_as_shown(tmp_path: Path) -> None:
    """docs/multi-user.md's five files, put where configure --multi-user writes them, give the
    output the page shows through its own render-user-config command."""
    import os
    import pwd
    import shlex

    blocks = {name: body for name, body in _file_blocks("multi-user.md").items()
              if not name.startswith("image_")}
    files = ["config.yaml", "identity_mapping.json", "user_config_template.yaml.j2",
             "user_config_schema.json", "user_environment.yaml"]
    assert set(files) | {"output"} == set(blocks)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FARCALL_")}
    env["FARCALL_HOME"] = str(tmp_path)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "farcall.endpoint", *args], env=env,
                              capture_output=True, text=True, timeout=90)

    assert cli("configure", "hpc", "--multi-user").returncode == 0
    for name in files:
        (tmp_path / "endpoints" / "hpc" / name).write_text(blocks[name])
    text = (REPO / "docs" / "multi-user.md").read_text()
    command = re.search(r"^farcall-endpoint (render-user-config hpc --user alice .*)$", text, flags=re.M)
    assert command is not None
    me = pwd.getpwuid(os.getuid()).pw_name  # alice has no account here: render for this one
    args = [me if a == "alice" else a for a in shlex.split(command.group(1))]
    done = cli(*args)
    assert done.returncode == 0, done.stderr
    assert done.stdout == blocks["output"].replace("(alice)", f"({me})")

    from farcall.endpoint.multiuser.environment import load_user_environment
    from farcall.endpoint.multiuser.identity import IdentityMapper

    directory = tmp_path / "endpoints" / "hpc"
    assert load_user_environment(directory) == {"MODULEPATH": "/opt/modules/all", "OMP_NUM_THREADS": "1"}
    mapper = IdentityMapper(directory / "identity_mapping.json")
    assert mapper.map_identity([{"id": "u", "sub": "u", "username": "alice@example.org"}]) == "alice"
    assert mapper.map_identity([{"id": "u", "sub": "u", "username": "bob"}]) == "bob"

    refused = cli("render-user-config", "hpc", "--user", me, "--user-config",
                  '{"account": "x\\nmulti_user: true"}')
    assert refused.returncode == 1 and "user_endpoint_config.account" in refused.stderr
