"""The verbs and options a Globus Compute operator types: an endpoint named by its id,
``version``, ``check``, ``delete --force``, ``render-user-config -e/-o``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from farcall.endpoint.registration import Registration, save_registration
from farcall.version import __version__

ENDPOINT_ID = "6f1c5d9e-2b7a-4c1e-9a55-0d3f7e2b8c41"


def cli(env: dict[str, str], *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "farcall.endpoint", *args], env=env,
                          capture_output=True, text=True, timeout=90, input=stdin)


def test_version(env: dict[str, str]) -> None:
    done = cli(env, "version")
    assert done.returncode == 0 and done.stdout.strip() == f"farcall-endpoint {__version__}"


def test_an_endpoint_is_named_by_its_id(env: dict[str, str]) -> None:
    assert cli(env, "configure", "ep", "--broker-url", "http://127.0.0.1:9").returncode == 0
    directory = Path(env["FARCALL_HOME"]) / "endpoints" / "ep"
    save_registration(directory, Registration(ENDPOINT_ID, "fce_x", "ep", "http://127.0.0.1:9"))
    status = cli(env, "status", ENDPOINT_ID, "--json")
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["name"] == "ep"
    checked = cli(env, "check", ENDPOINT_ID)
    assert checked.returncode == 0 and "ProcessPoolEngine" in checked.stdout, checked.stderr
    unknown = cli(env, "status", "00000000-0000-0000-0000-000000000000")
    assert unknown.returncode == 1 and "not configured" in unknown.stderr


def test_check_reports_every_problem_at_once(env: dict[str, str]) -> None:
    directory = Path(env["FARCALL_HOME"]) / "endpoints" / "bad"
    directory.mkdir(parents=True)
    (directory / "config.yaml").write_text(
        "heartbeat_period: -1\nstop_timeout: soon\nengine:\n  type: ProcessPoolEngine\n"
        "  max_workers: 0\n")
    done = cli(env, "check", "bad")
    assert done.returncode == 1
    for key in ("heartbeat_period:", "stop_timeout:", "engine.max_workers:"):
        assert key in done.stderr, done.stderr
    assert "3 problems" in done.stderr


def test_delete_force_removes_the_files_when_the_broker_cannot_be_told(env: dict[str, str]) -> None:
    assert cli(env, "configure", "gone", "--broker-url", "http://127.0.0.1:9").returncode == 0
    directory = Path(env["FARCALL_HOME"]) / "endpoints" / "gone"
    save_registration(directory, Registration(ENDPOINT_ID, "fce_x", "gone", "http://127.0.0.1:9"))
    env = {**env, "FARCALL_TOKEN": "fct_nobody"}
    refused = cli(env, "delete", ENDPOINT_ID, "--yes")
    assert refused.returncode == 1 and "--local-only" in refused.stderr and directory.exists()
    done = cli(env, "delete", ENDPOINT_ID, "--yes", "--force")
    assert done.returncode == 0, done.stderr
    assert not directory.exists()


def test_render_user_config_takes_globus_compute_options(env: dict[str, str]) -> None:
    assert cli(env, "configure", "site", "--multi-user").returncode == 0
    by_file = Path(env["FARCALL_HOME"]) / "values.json"
    by_file.write_text('{"max_workers": 3}')
    done = cli(env, "render-user-config", "-e", "site", "-o", str(by_file), "--user", "root")
    assert done.returncode == 0, done.stderr
    assert "max_workers: 3" in done.stdout
    piped = cli(env, "render-user-config", "site", "-o", "-", "--user", "root",
                stdin='{"max_workers": 5}')
    assert piped.returncode == 0 and "max_workers: 5" in piped.stdout, piped.stderr
    both = cli(env, "render-user-config", "site", "-o", str(by_file), "--user-config", "{}")
    assert both.returncode == 1 and "give the values once" in both.stderr
