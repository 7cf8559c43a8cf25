"""ParslEngine and MPIEngine on real Parsl: config checks, elastic blocks, lost workers, resources.

Schedulers (Slurm, PBS Pro, LSF) are exercised end to end in tests/integration; here the
provider is Parsl's LocalProvider, and KubernetesProvider talks to a stand-in API server.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from farcall.endpoint.engines import build_engine, validate_engine
from farcall.endpoint.engines.parsl import ParslEngine
from farcall.endpoint.errors import EndpointConfigError, WorkerLost
from farcall.protocol.channel import ResultMessage
from harness.procs import wait_until
from tests.endpoint.helpers import Collector, make_task, value_of
from tests.endpoint.kube_fake import FakeKubeAPI

FAST = {"strategy_period": 0.2, "heartbeat_period": 1, "heartbeat_threshold": 5}


@pytest.fixture
def make_engine(tmp_path: Path) -> Iterator[Callable[..., ParslEngine]]:
    started: list[ParslEngine] = []

    def make(**spec: Any) -> ParslEngine:
        spec = {"type": "ParslEngine", "run_dir": str(tmp_path / "runinfo"), **FAST, **spec}
        engine = build_engine(spec)
        assert isinstance(engine, ParslEngine)
        engine.start()
        started.append(engine)
        return engine

    yield make
    for engine in started:
        engine.shutdown(wait=False)


def _run(engine: ParslEngine, fn: Callable[..., Any], *args: Any, timeout: float = 60,
         resource_specification: dict[str, Any] | None = None, max_retries: int = 0) -> Any:
    got = Collector()
    task = make_task(fn, *args)
    task.resource_specification = resource_specification
    task.max_retries = max_retries
    engine.submit(task, got.on_done, got.on_start)
    (result,) = got.wait_results([task.task_id], timeout)
    return value_of(result)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"provider": {"type": "SlurmProvder"}}, "engine.provider.type: 'SlurmProvder' is not a Parsl "
                                                 "provider of the installed Parsl; valid choices: "
                                                 "LocalProvider, CondorProvider"),
        ({"provider": {"type": "SlurmProvider", "partiton": "x"}},
         "engine.provider.partiton: not an option of SlurmProvider; valid options: partition"),
        ({"provider": {"type": "SlurmProvider", "launcher": {"type": "Srun"}}},
         "engine.provider.launcher.type: 'Srun' is not a Parsl launcher of the installed Parsl; "
         "valid choices: SimpleLauncher"),
        ({"provider": {"type": "LocalProvider", "launcher": {"type": "SrunLauncher", "x": 1}}},
         "engine.provider.launcher.x: not an option of SrunLauncher"),
        ({"max_workers_per_nod": 2}, "engine.max_workers_per_nod: unknown key; valid keys: type"),
        ({"provider": "LocalProvider"}, "engine.provider: Input should be a valid dictionary"),
    ],
)
def test_config_errors_name_the_key_and_the_choices(spec: dict[str, Any], message: str) -> None:
    with pytest.raises(EndpointConfigError) as info:
        validate_engine({"type": "ParslEngine", **spec})
    assert message in str(info.value)


def test_globus_compute_names_are_aliases() -> None:
    cls, options = validate_engine({"type": "GlobusComputeEngine", "max_workers_per_node": 2,
                                    "provider": {"type": "SlurmProvider", "partition": "debug",
                                                 "launcher": {"type": "SrunLauncher"}}})
    assert cls is ParslEngine and options.model_dump()["max_workers_per_node"] == 2
    mpi_cls, _ = validate_engine({"type": "GlobusMPIEngine", "mpi_launcher": "srun"})
    assert mpi_cls.__name__ == "MPIEngine"


def test_local_blocks_scale_out_on_demand_and_back_to_zero(make_engine: Callable[..., ParslEngine]) -> None:
    engine = make_engine(
        provider={"type": "LocalProvider", "init_blocks": 0, "min_blocks": 0, "max_blocks": 1},
        max_workers_per_node=2,
        max_idletime=1,
    )
    def where_am_i() -> dict[str, Any]:
        import os

        return {"pid": os.getpid(), "block": os.environ.get("PARSL_WORKER_BLOCK_ID")}

    before = engine.status()
    assert before.workers == 0 and before.details and before.details["blocks_requested"] == 0

    got = Collector()
    tasks = [make_task(where_am_i) for _ in range(8)]
    for t in tasks:
        engine.submit(t, got.on_done, got.on_start)
    places = [value_of(r) for r in got.wait_results([t.task_id for t in tasks], 60)]
    assert {p["block"] for p in places} == {"0"}
    pids = {p["pid"] for p in places}
    assert os.getpid() not in pids
    for pid in pids:  # each worker is a process of the worker pool that the block started
        chain = [" ".join(p.cmdline()) for p in psutil.Process(pid).parents()]
        assert any("process_worker_pool" in c for c in chain), chain
    during = engine.status()
    assert during.workers == 2 and during.details
    assert during.details["blocks_running"] == 1 and during.details["provider"] == "LocalProvider"

    wait_until(lambda: engine.status().details["blocks_running"] == 0, 60, "scale in to 0 blocks")  # type: ignore[index]
    wait_until(lambda: not any(psutil.pid_exists(p) for p in pids), 30, "workers to exit")
    assert engine.status().workers == 0


def test_worker_death_fails_only_its_task_with_worker_lost(make_engine: Callable[..., ParslEngine]) -> None:
    engine = make_engine(provider={"type": "LocalProvider", "init_blocks": 1, "max_blocks": 1},
                         max_workers_per_node=1)

    def crash() -> None:
        import os

        os._exit(7)

    with pytest.raises(WorkerLost, match="lost with its Parsl worker"):
        _run(engine, crash)
    # The engine still runs tasks afterwards. Parsl may still be losing the dead worker's
    # manager when the next task arrives: that loss is a system failure, which a retry covers.
    assert _run(engine, pow, 3, 4, max_retries=2) == 81


def test_parsl_workers_start_with_the_worker_environment(
    make_engine: Callable[..., ParslEngine], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The block's job inherits the agent's environment; the pool and its workers do not."""
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "cloud-key")
    monkeypatch.setenv("LAB_SCRATCH", "/scratch/lab")
    engine = make_engine(provider={"type": "LocalProvider", "init_blocks": 1, "max_blocks": 1},
                         max_workers_per_node=1, worker_env={"OMP_NUM_THREADS": "3"},
                         worker_env_passthrough=["LAB_SCRATCH"])

    def environment() -> tuple[dict[str, str], bytes]:
        import os

        with open(f"/proc/{os.getppid()}/environ", "rb") as f:  # the worker pool's
            return dict(os.environ), f.read()

    env, pool = _run(engine, environment)
    assert env["OMP_NUM_THREADS"] == "3" and env["LAB_SCRATCH"] == "/scratch/lab"
    assert "AWS_SECRET_ACCESS_KEY" not in env and b"cloud-key" not in pool


def test_resource_specification_reaches_htex(make_engine: Callable[..., ParslEngine]) -> None:
    engine = make_engine(provider={"type": "LocalProvider", "init_blocks": 1, "max_blocks": 1},
                         max_workers_per_node=1)

    def priority() -> str | None:
        import os

        return os.environ.get("PARSL_PRIORITY")

    assert _run(engine, priority, resource_specification={"priority": 3}) == "3"
    with pytest.raises(ValueError, match="num_nodes.*refused by HighThroughputExecutor.*MPIEngine"):
        _run(engine, priority, resource_specification={"num_nodes": 2})


def test_short_tasks_share_parsl_tasks_and_a_crash_costs_only_its_own(
    make_engine: Callable[..., ParslEngine]
) -> None:
    engine = make_engine(provider={"type": "LocalProvider", "init_blocks": 1, "max_blocks": 1},
                         max_workers_per_node=2)
    submitted: list[int] = []
    real_submit = engine.htex.submit_payload

    def counting(context: dict[str, Any], payload: bytes) -> Any:
        submitted.append(len(payload))
        return real_submit(context, payload)

    engine.htex.submit_payload = counting

    def short(x: int) -> int:
        if x < 0:
            import os

            os._exit(3)
        return x + 1

    def run_all(args: list[int]) -> dict[int, ResultMessage]:
        got = Collector()
        tasks = [make_task(short, x) for x in args]
        for t in tasks:
            engine.submit(t, got.on_done)
        return dict(zip(args, got.wait_results([t.task_id for t in tasks], 60), strict=True))

    run_all(list(range(10)))  # the engine learns that these tasks are short
    submitted.clear()
    results = run_all(list(range(200)))
    assert [value_of(results[x]) for x in range(200)] == list(range(1, 201))
    assert len(submitted) < 200 / 4, f"{len(submitted)} Parsl tasks for 200 short tasks"

    mixed = run_all([*range(20), -1, *range(20, 40)])
    with pytest.raises(WorkerLost):
        value_of(mixed[-1])
    assert [value_of(mixed[x]) for x in range(40)] == list(range(1, 41))


# ------------------------------------------------------------------ Kubernetes


def test_kubernetes_provider_asks_for_the_configured_pod(
    make_engine: Callable[..., ParslEngine], kube_api: FakeKubeAPI
) -> None:
    engine = make_engine(provider={
        "type": "KubernetesProvider", "image": "python:3.11-slim", "namespace": "science",
        "init_blocks": 1, "min_blocks": 0, "max_blocks": 1, "init_cpu": 1, "max_cpu": 2,
        "init_mem": "1Gi", "max_mem": "2Gi", "worker_init": "pip install farcall",
    }, max_workers_per_node=2)
    wait_until(lambda: kube_api.created, 30, "a pod to be created")
    (pod,) = kube_api.created
    assert pod["metadata"]["namespace"] == "science"
    (container,) = pod["spec"]["containers"]
    assert container["image"] == "python:3.11-slim"
    assert container["resources"] == {"limits": {"cpu": "2", "memory": "2Gi"},
                                      "requests": {"cpu": "1", "memory": "1Gi"}}
    script = " ".join(container["args"])
    assert "pip install farcall" in script and "process_worker_pool.py" in script
    assert "--max_workers_per_node=2" in script
    engine.shutdown(wait=False)
    assert kube_api.deleted == [pod["metadata"]["name"]]
