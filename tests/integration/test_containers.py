"""Workers in containers, on real podman (issue 21): a broker on real Redis and RabbitMQ, endpoint
processes whose engine section names a container, and a Debian image built on this machine
(``tests/containers.py``). A task shows it ran in the image; no container outlives its worker
or the endpoint."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from farcall import Client, Executor
from farcall.errors import TaskTimeout
from harness.procs import wait_until
from tests.containers import IMAGE_VERSION, MARKER, docker_shim, ensure_image, ensure_podman, podman
from tests.integration.helpers import Broker, Endpoint

pytestmark = pytest.mark.integration

PREFIX = "farcall-worker-"


@pytest.fixture(scope="module")
def image() -> tuple[str, dict[str, str]]:
    """The test image and podman's environment (installed, configured and built if need be)."""
    started = time.monotonic()
    env = ensure_podman()
    name = ensure_image(env)
    print(f"podman and the test image ready in {time.monotonic() - started:.1f} s")
    return name, env


def workers_running(env: dict[str, str]) -> dict[str, str]:
    """Running worker containers: full id -> name."""
    out = podman(env, "ps", "--no-trunc", "--format", "{{.ID}} {{.Names}}").stdout
    pairs = (line.split() for line in out.splitlines() if line.strip())
    return {cid: name for cid, name in pairs if name.startswith(PREFIX)}


def probe() -> Callable[[], dict[str, Any]]:
    """A task function (made here: a function of this module would travel by reference) that
    reports what it sees of its container: podman's marker file, the image's own file, the
    container id in its cgroup, and its Parsl block."""

    def where_am_i() -> dict[str, Any]:
        import os
        import re

        cgroup = open("/proc/self/cgroup").read()
        found = re.search(r"libpod-([0-9a-f]{64})", cgroup)
        image = "/etc/farcall-test-image"
        return {"containerenv": os.path.exists("/run/.containerenv"),
                "image": open(image).read().strip() if os.path.exists(image) else None,
                "id": found.group(1) if found else None,
                "parsl_block": os.environ.get("PARSL_WORKER_BLOCK_ID")}

    return where_am_i


def _start(make_endpoint: Callable[..., Endpoint], client: Client, name: str,
           env: dict[str, str], engine: dict[str, Any], extra_env: dict[str, str] | None = None,
           ) -> tuple[Endpoint, str]:
    ep = make_endpoint(name, engine=engine["type"], engine_spec=engine,
                       extra_env={**env, **(extra_env or {})})
    return ep, ep.start(client, timeout=60)


def test_process_workers_run_in_podman_and_leave_no_container(
    image: tuple[str, dict[str, str]], make_endpoint: Callable[..., Endpoint], client: Client
) -> None:
    uri, env = image
    before = workers_running(env)
    ep, eid = _start(make_endpoint, client, "podman", env, {
        "type": "ProcessPoolEngine", "max_workers": 2,
        "container_type": "podman", "container_uri": uri})
    with Executor(endpoint_id=eid, client=client) as ex:
        seen = [f.result(timeout=60) for f in [ex.submit(probe()) for _ in range(4)]]
    assert MARKER == "/etc/farcall-test-image"
    assert all(s["containerenv"] and s["image"] == IMAGE_VERSION for s in seen), seen
    running = workers_running(env)
    assert {s["id"] for s in seen} <= set(running) - set(before), (seen, running)
    ep.stop()
    assert set(workers_running(env)) <= set(before), "stopping the engine leaves no container"


def test_a_worker_killed_for_its_walltime_takes_its_container_with_it(
    image: tuple[str, dict[str, str]], make_endpoint: Callable[..., Endpoint], client: Client
) -> None:
    """The engine kills a worker whose task ignores ``TaskTimeout``: that kills the ``podman run``
    client, so the engine must remove the container itself."""
    uri, env = image
    ep, eid = _start(make_endpoint, client, "walltime", env, {
        "type": "ProcessPoolEngine", "max_workers": 1,
        "container_type": "podman", "container_uri": uri})

    def stubborn(where: Callable[[], dict[str, Any]]) -> None:
        import time

        from farcall.errors import TaskTimeout

        print(where()["id"], flush=True)
        while True:
            try:
                time.sleep(600)
            except TaskTimeout:
                pass

    with Executor(endpoint_id=eid, client=client) as ex:
        first = ex.submit(probe()).result(timeout=60)["id"]
        assert first in workers_running(env)
        with Executor(endpoint_id=eid, client=client, walltime=1) as timed:
            with pytest.raises(TaskTimeout):
                timed.submit(stubborn, probe()).result(timeout=60)
        wait_until(lambda: first not in workers_running(env), 15, "the killed worker's container gone")
        second = ex.submit(probe()).result(timeout=60)
    assert second["id"] != first and second["image"] == IMAGE_VERSION
    ep.stop()
    assert second["id"] not in workers_running(env)


def test_docker_runs_the_workers_through_the_docker_command(
    image: tuple[str, dict[str, str]], make_endpoint: Callable[..., Endpoint], client: Client,
    broker: Broker, tmp_path: Path
) -> None:
    """``container_type: docker`` runs ``docker``: here a ``docker`` on PATH that runs podman
    (this machine's docker client has no daemon)."""
    uri, env = image
    shim = docker_shim(tmp_path / "shim")
    ep, eid = _start(make_endpoint, client, "docker", env, {
        "type": "ProcessPoolEngine", "max_workers": 1, "container_type": "docker",
        "container_uri": uri, "container_cmd_options": "--pull never"},
        extra_env={"PATH": f"{shim.parent}:{broker.env['PATH']}"})
    with Executor(endpoint_id=eid, client=client) as ex:
        seen = ex.submit(probe()).result(timeout=60)
    assert seen["containerenv"] and seen["image"] == IMAGE_VERSION
    assert seen["id"] in workers_running(env)
    ep.stop()
    assert seen["id"] not in workers_running(env)
    # The agent stops its engine at once (its tasks are drained first): the worker's `docker run`
    # is killed, and its container killed and removed through the docker command.
    assert (shim.parent / "calls").read_text().split() == ["run", "kill", "rm"]


def test_a_parsl_block_runs_its_worker_pool_in_podman(
    image: tuple[str, dict[str, str]], make_endpoint: Callable[..., Endpoint], client: Client
) -> None:
    uri, env = image
    ep, eid = _start(make_endpoint, client, "parsl", env, {
        "type": "ParslEngine", "max_workers_per_node": 1, "strategy_period": 0.5,
        "heartbeat_period": 1, "heartbeat_threshold": 5, "address": "127.0.0.1",
        "container_type": "podman", "container_uri": uri,
        "provider": {"type": "LocalProvider", "init_blocks": 1, "min_blocks": 0, "max_blocks": 1}})
    with Executor(endpoint_id=eid, client=client) as ex:
        seen = [f.result(timeout=90) for f in [ex.submit(probe()) for _ in range(3)]]
    assert all(s["containerenv"] and s["image"] == IMAGE_VERSION and s["parsl_block"] == "0"
               for s in seen), seen
    pool = seen[0]["id"]
    assert workers_running(env).get(pool, "").startswith(PREFIX)
    ep.stop()
    # The block is stopped with SIGTERM to its job, whose wrapper then removes the container.
    wait_until(lambda: pool not in workers_running(env), 20, "the block's container gone")
