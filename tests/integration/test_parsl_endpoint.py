"""Endpoints on the Parsl engine, end to end: broker on real Redis and RabbitMQ, endpoint processes
started with ``farcall-endpoint start``, blocks from LocalProvider, a real single-node Slurm, and the
stand-in PBS Pro and LSF commands (scripts/fake_schedulers).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from farcall import Client, Executor
from harness.procs import wait_until
from tests.integration.helpers import Endpoint
from tests.schedulers import (
    SLURM_PARTITION,
    fake_cancel_all,
    fake_jobs,
    fake_scheduler_env,
    slurm_jobs,
    worker_init,
)

pytestmark = pytest.mark.integration

FAST = {"strategy_period": 0.5, "heartbeat_period": 1, "heartbeat_threshold": 5, "prefetch": 2}


def _details(client: Client, endpoint_id: str) -> dict[str, Any]:
    return dict(client.get_endpoint_status(endpoint_id)["details"])


def _job_env(names: list[str]) -> Callable[[], dict[str, str | None]]:
    def job_env() -> dict[str, str | None]:
        import os

        return {name: os.environ.get(name) for name in names}

    return job_env


def test_local_blocks_scale_with_load_and_show_in_status(
    make_endpoint: Callable[..., Endpoint], client: Client
) -> None:
    ep = make_endpoint("parsl-local", engine="ParslEngine", engine_spec={
        "type": "ParslEngine", "max_workers_per_node": 2, "max_idletime": 2, **FAST,
        "provider": {"type": "LocalProvider", "init_blocks": 0, "min_blocks": 0, "max_blocks": 1},
    })
    eid = ep.start(client)
    assert _details(client, eid)["blocks_running"] == 0

    def square(x: int) -> tuple[int, str | None]:
        import os

        return x * x, os.environ.get("PARSL_WORKER_BLOCK_ID")

    with Executor(endpoint_id=eid, client=client) as ex:
        assert [f.result(timeout=60) for f in [ex.submit(square, i) for i in range(20)]] == [
            (i * i, "0") for i in range(20)
        ]
    status = wait_until(lambda: (s := client.get_endpoint_status(eid))["workers"] == 2 and s, 30, "workers")
    assert status["engine"] == "ParslEngine"
    assert status["details"]["provider"] == "LocalProvider" and status["details"]["blocks_running"] == 1
    shown = json.loads(ep.cli("status", "parsl-local", "--json").stdout)
    assert shown["state"] == "running" and shown["heartbeat"]["details"]["provider"] == "LocalProvider"

    wait_until(lambda: _details(client, eid)["blocks_running"] == 0, 60, "scale in to zero blocks")
    assert client.get_endpoint_status(eid)["workers"] == 0
    ep.stop()


def test_slurm_endpoint_runs_tasks_in_jobs_it_cancels(
    make_endpoint: Callable[..., Endpoint], client: Client, slurm: dict[str, str]
) -> None:
    ep = make_endpoint("slurm", engine="ParslEngine", extra_env=slurm, engine_spec={
        "type": "ParslEngine", "max_workers_per_node": 1, "max_idletime": 2, **FAST,
        "provider": {"type": "SlurmProvider", "partition": SLURM_PARTITION, "nodes_per_block": 1,
                     "init_blocks": 0, "min_blocks": 0, "max_blocks": 1, "walltime": "00:10:00",
                     "exclusive": False, "cmd_timeout": 30, "worker_init": worker_init(),
                     "launcher": {"type": "SrunLauncher"}},
    })
    eid = ep.start(client)
    job_env = _job_env(["SLURM_JOB_ID", "SLURM_CONF"])
    with Executor(endpoint_id=eid, client=client) as ex:
        first = ex.submit(job_env).result(timeout=90)
        job = first["SLURM_JOB_ID"]
        assert job and first["SLURM_CONF"] == slurm["SLURM_CONF"], first
        assert slurm_jobs().get(job) == "R"
        assert _details(client, eid)["provider"] == "SlurmProvider"
        # idle: the endpoint scales in and Slurm cancels the block's job
        wait_until(lambda: job not in slurm_jobs(), 60, f"Slurm job {job} to end after scale-in")

        second = ex.submit(job_env).result(timeout=90)["SLURM_JOB_ID"]
        assert second and second != job
    ep.stop()  # stopping the endpoint cancels its live job
    wait_until(lambda: second not in slurm_jobs(), 30, f"Slurm job {second} to end after stop")


@pytest.fixture
def fake_sched(tmp_path: Path) -> Iterator[dict[str, str]]:
    env = fake_scheduler_env(tmp_path / "sched")
    yield env
    fake_cancel_all(env["FARCALL_FAKE_SCHED_DIR"])  # only matters after a failure


def _assert_cancelled(state_dir: str, job_id: str) -> None:
    job = wait_until(
        lambda: next((j for j in fake_jobs(state_dir) if j["id"] == job_id and j["state"] == "F"), None),
        30, f"stand-in job {job_id} to finish",
    )
    assert job["cancelled"], f"job {job_id} ended without being cancelled: {job}"


def test_pbs_mpi_endpoint_gives_tasks_their_ranks(
    make_endpoint: Callable[..., Endpoint], client: Client, fake_sched: dict[str, str]
) -> None:
    ep = make_endpoint("pbs", engine="MPIEngine", extra_env=fake_sched, engine_spec={
        "type": "MPIEngine", "max_workers_per_block": 1, "mpi_launcher": "mpiexec", **FAST,
        "provider": {"type": "PBSProProvider", "nodes_per_block": 1, "cpus_per_node": 1,
                     "init_blocks": 0, "min_blocks": 0, "max_blocks": 1, "walltime": "00:10:00",
                     "cmd_timeout": 30, "worker_init": worker_init(),
                     "launcher": {"type": "SimpleLauncher"}},
    })
    eid = ep.start(client)
    job_env = _job_env(["PBS_JOBID", "PARSL_NUM_RANKS", "PARSL_MPI_PREFIX"])
    spec = {"num_nodes": 1, "ranks_per_node": 2}
    with Executor(endpoint_id=eid, client=client, resource_specification=spec) as ex:
        env = ex.submit(job_env).result(timeout=90)
    assert env["PBS_JOBID"] and env["PARSL_NUM_RANKS"] == "2", env
    assert (env["PARSL_MPI_PREFIX"] or "").startswith("mpiexec -n 2 -ppn 2"), env
    with Executor(endpoint_id=eid, client=client) as ex, pytest.raises(ValueError, match="num_nodes"):
        ex.submit(job_env).result(timeout=60)  # an MPI endpoint refuses a task without resources
    ep.stop()
    _assert_cancelled(fake_sched["FARCALL_FAKE_SCHED_DIR"], env["PBS_JOBID"])


def test_lsf_endpoint_runs_tasks_in_a_job_it_cancels(
    make_endpoint: Callable[..., Endpoint], client: Client, fake_sched: dict[str, str]
) -> None:
    ep = make_endpoint("lsf", engine="ParslEngine", extra_env=fake_sched, engine_spec={
        "type": "ParslEngine", "max_workers_per_node": 1, **FAST,
        "provider": {"type": "LSFProvider", "nodes_per_block": 1, "init_blocks": 0, "min_blocks": 0,
                     "max_blocks": 1, "walltime": "00:10:00", "cmd_timeout": 30,
                     "worker_init": worker_init(), "launcher": {"type": "SingleNodeLauncher"}},
    })
    eid = ep.start(client)
    with Executor(endpoint_id=eid, client=client) as ex:
        env = ex.submit(_job_env(["LSB_JOBID"])).result(timeout=90)
    assert env["LSB_JOBID"], env
    assert [j["id"] for j in fake_jobs(fake_sched["FARCALL_FAKE_SCHED_DIR"])] == [env["LSB_JOBID"]]
    ep.stop()
    _assert_cancelled(fake_sched["FARCALL_FAKE_SCHED_DIR"], env["LSB_JOBID"])
