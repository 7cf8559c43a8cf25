"""farcall-endpoint configure NAME --from GC_DIR: a Globus Compute endpoint's configuration copied
and checked first (never its registration); a copy that does not load writes nothing."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from farcall.endpoint.config import parse_config

UUID = "2b8e0d4a-3f51-4c8e-9d2a-6a1f0b7c9e11"

GC_CONFIG = f"""\
# My cluster endpoint (a comment that must survive the copy)
display_name: Bebop debug queue
amqp_port: 443
subscription_id: {UUID}
heartbeat_period: 15
idle_heartbeats_soft: 10
engine:
  type: ThreadPoolEngine
  max_workers: 2
"""


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "farcall.endpoint", *args], env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=90)


def globus_dir(root: Path, config: str = GC_CONFIG, name: str = "bebop") -> Path:
    """A Globus Compute endpoint directory as ``globus-compute-endpoint configure`` and a few
    starts leave it: its config, its registration, a log and a pid file."""
    gc = root / ".globus_compute" / name
    gc.mkdir(parents=True)
    (gc / "config.yaml").write_text(config)
    (gc / "endpoint.json").write_text(json.dumps({"endpoint_id": UUID}))
    (gc / "endpoint.log").write_text("old log\n")
    (gc / "daemon.pid").write_text("12345\n")
    return gc


def farcall_dir(env: dict[str, str], name: str) -> Path:
    return Path(env["FARCALL_HOME"]) / "endpoints" / name


def test_configure_from_copies_the_config_checks_it_and_leaves_the_registration(
    env: dict[str, str], tmp_path: Path
) -> None:
    gc = globus_dir(tmp_path)
    done = cli(env, "configure", "bebop", "--from", str(gc))
    assert done.returncode == 0, done.stderr
    target = farcall_dir(env, "bebop")
    assert sorted(p.name for p in target.iterdir()) == ["config.yaml"]
    assert (target / "config.yaml").read_text() == GC_CONFIG  # comments and all
    out = done.stdout
    assert f"copied {gc / 'config.yaml'} -> {target / 'config.yaml'}" in out
    assert "WARNING amqp_port: ignored" in out and "WARNING subscription_id: ignored" in out
    assert "engine: ThreadPoolEngine" in out  # what the check built
    assert "not copied: endpoint.json (Globus Compute's registration: never)" in out
    assert "not copied: daemon.pid, endpoint.log" in out
    assert "registers anew with farcall's broker" in out and "farcall-endpoint start bebop" in out
    checked = cli(env, "check", "bebop")
    assert checked.returncode == 0, checked.stderr


def test_configure_from_sets_the_display_name_and_broker_url(
    env: dict[str, str], tmp_path: Path
) -> None:
    gc = globus_dir(tmp_path)
    done = cli(env, "configure", "b2", "--from", str(gc), "--display-name", "Bebop: debug",
               "--broker-url", "https://broker.example.org")
    assert done.returncode == 0, done.stderr
    text = (farcall_dir(env, "b2") / "config.yaml").read_text()
    config = parse_config(text)
    assert config.display_name == "Bebop: debug"
    assert config.broker_url == "https://broker.example.org"
    assert "# My cluster endpoint" in text


def test_a_config_that_does_not_load_writes_nothing_and_lists_every_problem(
    env: dict[str, str], tmp_path: Path
) -> None:
    gc = globus_dir(tmp_path, config="""\
display_name: broken
heartbeat_period: -5
idle_heartbeats_soft: soon
executors: [{type: HighThroughputExecutor}]
engine: {type: NoSuchEngine}
""")
    done = cli(env, "configure", "broken", "--from", str(gc))
    assert done.returncode == 1
    err = done.stderr
    assert f"{gc / 'config.yaml'} (nothing was written" in err and "4 problems" in err, err
    for part in ("heartbeat_period: Input should be greater than 0 (got -5)",
                 "idle_heartbeats_soft: Input should be a valid integer",
                 "executors: the executors list", "engine.type: unknown engine 'NoSuchEngine'"):
        assert part in err, (part, err)
    assert err.index("heartbeat_period") < err.index("idle_heartbeats_soft") < err.index(
        "executors:") < err.index("engine.type")  # the file's order
    assert not farcall_dir(env, "broken").exists()


def test_the_user_endpoint_files_and_the_identity_mapping_are_copied_under_farcalls_names(
    env: dict[str, str], tmp_path: Path
) -> None:
    elsewhere = tmp_path / "site"
    elsewhere.mkdir()
    (elsewhere / "idmap.json").write_text('[{"DATA_TYPE": "expression_identity_mapping#1.0.0"}]')
    gc = globus_dir(tmp_path, config=GC_CONFIG + f"identity_mapping_config_path: "
                                                 f"{elsewhere / 'idmap.json'}\n")
    (gc / "user_config_template.yaml").write_text("engine:\n  type: {{ engine_type }}\n")
    (gc / "user_config_schema.json").write_text('{"type": "object"}')
    (gc / "user_environment.yaml").write_text("SITE: abc\n")
    done = cli(env, "configure", "tc", "--from", str(gc))
    assert done.returncode == 0, done.stderr
    target = farcall_dir(env, "tc")
    expected = {"config.yaml": 0o644, "identity_mapping.json": 0o600,
                "user_config_template.yaml.j2": 0o644, "user_config_schema.json": 0o644,
                "user_environment.yaml": 0o600}
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in target.iterdir()} == expected
    assert (target / "user_config_template.yaml.j2").read_text().endswith("{{ engine_type }}\n")
    assert (target / "identity_mapping.json").read_text().startswith('[{"DATA_TYPE"')
    text = (target / "config.yaml").read_text()
    assert f"# identity_mapping_config_path: {elsewhere / 'idmap.json'}  # copied to " \
           "identity_mapping.json beside this file" in text
    assert parse_config(text).identity_mapping_config_path is None  # the copy beside it is used


def test_configure_from_refuses_what_is_not_a_globus_compute_endpoint_directory(
    env: dict[str, str], tmp_path: Path
) -> None:
    empty = tmp_path / "nothing"
    empty.mkdir()
    (empty / "config.py").write_text("config = None\n")
    done = cli(env, "configure", "x", "--from", str(empty))
    assert done.returncode == 1
    assert "has no config.yaml" in done.stderr and "farcall reads only config.yaml" in done.stderr
    gc = globus_dir(tmp_path, config=GC_CONFIG + "identity_mapping_config_path: gone.json\n")
    done = cli(env, "configure", "x", "--from", str(gc))
    assert done.returncode == 1
    assert "identity_mapping_config_path: 'gone.json' names no file" in done.stderr
    assert "Nothing was written" in done.stderr
    assert not farcall_dir(env, "x").exists()
    done = cli(env, "configure", "x", "--from", str(gc), "--engine", "ParslEngine")
    assert done.returncode == 2 and "--engine cannot go with --from" in done.stderr


def test_configure_from_keeps_an_existing_endpoint_unless_forced(
    env: dict[str, str], tmp_path: Path
) -> None:
    assert cli(env, "configure", "ep").returncode == 0
    target = farcall_dir(env, "ep")
    (target / "endpoint.json").write_text("{}")  # farcall's own registration
    before = (target / "config.yaml").read_text()
    gc = globus_dir(tmp_path)
    done = cli(env, "configure", "ep", "--from", str(gc))
    assert done.returncode == 1 and "already configured" in done.stderr and "--force" in done.stderr
    assert (target / "config.yaml").read_text() == before
    done = cli(env, "configure", "ep", "--from", str(gc), "--force")
    assert done.returncode == 0, done.stderr
    assert (target / "config.yaml").read_text() == GC_CONFIG
    assert (target / "endpoint.json").read_text() == "{}"


@pytest.mark.parametrize("multi_user", [False, True])
def test_configure_takes_a_display_name(env: dict[str, str], multi_user: bool) -> None:
    done = cli(env, "configure", "named", "--display-name", "Lab: GPUs",
               *(["--multi-user"] if multi_user else []))
    assert done.returncode == 0, done.stderr
    config = parse_config((farcall_dir(env, "named") / "config.yaml").read_text())
    assert config.display_name == "Lab: GPUs"
