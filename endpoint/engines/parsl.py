"""Run tasks on workers that Parsl's HighThroughputExecutor provisions through a provider.

This is the engine that matters at scale: the provider (Local, Slurm, PBS Pro,
LSF, Kubernetes, ...) gets blocks of nodes, a launcher starts Parsl's worker
pools on them, and Parsl's scaling strategy adds blocks while tasks wait and
releases them after ``max_idletime`` seconds idle.

Tasks go to HTEX as farcall's own task JSON through ``submit_payload`` with a
custom task executor (``farcall.endpoint.worker.run_task_buffer``), so Parsl never
pickles the user's function a second time; the worker answers result JSON.

Provider and launcher ``type`` names are Parsl's own class names; their other
keys are the classes' constructor arguments, checked against the signature at
``start`` time before anything is submitted.
"""

from __future__ import annotations

import inspect
import logging
import os
import sys
import threading
import time
import uuid
from collections.abc import Mapping
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from pydantic import ConfigDict, Field, model_validator

from farcall.endpoint.engines.base import Engine, EngineOptions, EngineStatus, OnDone, OnStart
from farcall.endpoint.errors import EndpointConfigError, WorkerLost
from farcall.endpoint.worker import failed_result
from farcall.messages import ResultMessage, TaskMessage

log = logging.getLogger(__name__)

PROVIDERS = (
    "LocalProvider",
    "SlurmProvider",
    "PBSProProvider",
    "LSFProvider",
    "KubernetesProvider",
    "TorqueProvider",
    "CondorProvider",
    "GridEngineProvider",
)
LAUNCHERS = (
    "SimpleLauncher",
    "SingleNodeLauncher",
    "SrunLauncher",
    "SrunMPILauncher",
    "AprunLauncher",
    "MpiExecLauncher",
    "MpiRunLauncher",
    "JsrunLauncher",
    "GnuParallelLauncher",
    "WrappedLauncher",
)
HTEX_OWN = {"provider", "label", "address", "launch_cmd", "interchange_launch_cmd"}
"""HTEX arguments the engine sets itself (or takes from its own options)."""


def _signature_keys(cls: type) -> list[str]:
    return [
        name
        for name, p in inspect.signature(cls).parameters.items()
        if name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]


def _resolve(kind: str, spec: Mapping[str, Any], choices: tuple[str, ...], module: str) -> Any:
    """Parsl class named by ``spec['type']`` built with the rest of ``spec``; errors name the key."""
    import importlib

    if not isinstance(spec, Mapping):
        raise EndpointConfigError(f"engine.{kind}: expected a mapping with a 'type' key, got {spec!r}")
    options = dict(spec)
    type_name = options.pop("type", None)
    if type_name not in choices:
        raise EndpointConfigError(
            f"engine.{kind}.type: {type_name!r} is not a Parsl {kind}; valid choices: {', '.join(choices)}"
        )
    try:
        cls = getattr(importlib.import_module(module), type_name)
    except (ImportError, AttributeError) as e:
        raise EndpointConfigError(
            f"engine.{kind}.type: {type_name} cannot be loaded ({e}); install what it needs "
            f"(for KubernetesProvider: pip install kubernetes)"
        ) from None
    valid = _signature_keys(cls)
    for key in options:
        if key not in valid and not (kind == "provider" and key == "launcher"):
            raise EndpointConfigError(
                f"engine.{kind}.{key}: not an option of {type_name}; valid options: {', '.join(valid)}"
            )
    if kind == "provider" and "launcher" in options:
        if "launcher" not in valid:
            raise EndpointConfigError(f"engine.provider.launcher: {type_name} takes no launcher")
        options["launcher"] = _resolve("launcher", options["launcher"], LAUNCHERS, "parsl.launchers")
    try:
        return cls(**options)
    except Exception as e:  # noqa: BLE001 - Parsl raises many kinds for bad values
        raise EndpointConfigError(f"engine.{kind}: {type_name}({options}) failed: {e}") from None


def _venv_worker_init() -> str:
    """Puts this interpreter's bin/ first on PATH in the job, where HTEX looks for its worker pool."""
    return f"export PATH={Path(sys.executable).parent}:$PATH"


class ParslOptions(EngineOptions):
    """``engine:`` keys for ``type: ParslEngine``. Any other key must be an HTEX argument."""

    model_config = ConfigDict(extra="allow")

    provider: dict[str, Any] = Field(default_factory=lambda: {"type": "LocalProvider"})
    address: str = Field(default="127.0.0.1", description="where the interchange listens for workers")
    strategy: str = "htex_auto_scale"
    strategy_period: float = Field(default=1.0, gt=0)
    max_idletime: float = Field(default=120.0, ge=0)
    run_dir: str | None = None

    @model_validator(mode="after")
    def _htex_keys(self) -> ParslOptions:
        from parsl.executors import HighThroughputExecutor

        valid = [k for k in _signature_keys(HighThroughputExecutor) if k not in HTEX_OWN]
        for key in self.model_extra or {}:
            if key not in valid:
                raise ValueError(
                    f"unknown key {key!r}: not a ParslEngine option nor a HighThroughputExecutor "
                    f"argument; valid HTEX arguments: {', '.join(valid)}"
                )
        if "type" not in self.provider:
            raise ValueError("provider needs a 'type', for example {type: SlurmProvider}")
        if self.provider["type"] not in PROVIDERS:
            raise ValueError(
                f"provider.type {self.provider['type']!r} is not a Parsl provider; valid choices: "
                + ", ".join(PROVIDERS)
            )
        return self


class ParslEngine(Engine):
    """HTEX on a Parsl provider, scaled by Parsl's own strategy."""

    Options = ParslOptions

    @classmethod
    def from_options(cls, options: EngineOptions) -> Engine:
        assert isinstance(options, ParslOptions)
        data = options.model_dump()
        return cls(**data)

    def __init__(
        self,
        provider: Mapping[str, Any] | None = None,
        address: str = "127.0.0.1",
        strategy: str = "htex_auto_scale",
        strategy_period: float = 1.0,
        max_idletime: float = 120.0,
        run_dir: str | None = None,
        prefetch: int = 4,
        **htex_options: Any,
    ) -> None:
        self.provider_spec = dict(provider or {"type": "LocalProvider"})
        self.address = address
        self.strategy = strategy
        self.strategy_period = strategy_period
        self.max_idletime = max_idletime
        self.run_dir = run_dir
        self.prefetch = prefetch
        self.htex_options = htex_options
        self.htex: Any = None
        self._poller: Any = None
        self._lock = threading.Lock()
        self._outstanding = 0
        self._workers = 0
        self._status_cache: tuple[float, EngineStatus] | None = None

    # ----------------------------------------------------------------- set-up

    def start(self) -> None:
        from parsl.executors import HighThroughputExecutor
        from parsl.jobs.job_status_poller import JobStatusPoller

        spec = dict(self.provider_spec)
        if spec.get("type") == "LocalProvider":
            spec.setdefault("worker_init", _venv_worker_init())
        elif "worker_init" not in spec and "worker_init" in _provider_keys(spec.get("type", "")):
            spec["worker_init"] = _venv_worker_init()
        provider = _resolve("provider", spec, PROVIDERS, "parsl.providers")
        options = dict(self.htex_options)
        options.setdefault("heartbeat_period", 5)
        options.setdefault("heartbeat_threshold", 20)
        options.setdefault("poll_period", 10)
        self.htex = HighThroughputExecutor(
            label="farcall", provider=provider, address=self.address, **options
        )
        run_dir = Path(self.run_dir or os.path.join(os.getcwd(), "parsl-runinfo"))
        run_dir = run_dir / f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        run_dir.mkdir(parents=True, exist_ok=True)
        self.htex.run_id = run_dir.name
        self.htex.run_dir = str(run_dir)
        if hasattr(provider, "script_dir"):
            provider.script_dir = str(run_dir / "submit_scripts")
            os.makedirs(provider.script_dir, exist_ok=True)
        self.htex.start()
        self._poller = JobStatusPoller(
            strategy=self.strategy, max_idletime=self.max_idletime, strategy_period=self.strategy_period
        )
        self._poller.add_executors([self.htex])
        log.info("ParslEngine started: %s, run dir %s", type(provider).__name__, run_dir)

    # -------------------------------------------------------------- tasks

    def submit(self, task: TaskMessage, on_done: OnDone, on_start: OnStart | None = None) -> None:
        spec = task.resource_specification or {}
        try:
            if spec:
                self.htex.validate_resource_spec(spec)
        except Exception as e:  # noqa: BLE001 - a bad spec fails this task, not the engine
            on_done(failed_result(task.task_id, ValueError(f"resource_specification: {e}")))
            return
        context: dict[str, Any] = {"task_executor": {"f": "farcall.endpoint.worker.run_task_buffer"}}
        if spec:
            context["resource_spec"] = spec
        with self._lock:
            self._outstanding += 1
        try:
            future = self.htex.submit_payload(context, task.model_dump_json().encode())
        except Exception as e:  # noqa: BLE001 - executor in a bad state: fail the task clearly
            with self._lock:
                self._outstanding -= 1
            on_done(failed_result(task.task_id, e))
            return
        future.add_done_callback(lambda f: self._done(task.task_id, f, on_done))

    def _done(self, task_id: str, future: Future[Any], on_done: OnDone) -> None:
        with self._lock:
            self._outstanding -= 1
        exc = future.exception()
        if exc is None:
            result = ResultMessage.model_validate_json(future.result())
        else:
            lost = WorkerLost(
                f"task {task_id} was lost with its Parsl worker or manager ({type(exc).__name__}: "
                f"{exc}); the function may have crashed the worker (segfault, os._exit, out of "
                "memory) or the block ended (walltime, scale-in). Submit it again to retry."
            )
            result = failed_result(task_id, lost)
        on_done(result)

    # -------------------------------------------------------------- status

    def status(self) -> EngineStatus:
        if self.htex is None:
            return EngineStatus()
        try:
            managers = self.htex.connected_managers()
        except Exception:  # noqa: BLE001 - the interchange may be busy; report what we know
            managers = []
        workers = sum(int(m.get("worker_count", 0)) for m in managers if m.get("active", True))
        busy = sum(int(m.get("tasks", 0)) for m in managers)
        blocks: dict[str, int] = {}
        for job in self.htex.status_facade.values():
            state = job.state.name.lower()
            blocks[state] = blocks.get(state, 0) + 1
        with self._lock:
            outstanding = self._outstanding
            self._workers = workers
        return EngineStatus(
            workers=workers,
            idle_workers=max(workers - busy, 0),
            pending_tasks=max(outstanding - busy, 0),
            running_tasks=min(busy, outstanding),
            details={
                "provider": type(self.htex.provider).__name__,
                "blocks": blocks,
                "blocks_requested": sum(blocks.values()),
                "blocks_running": blocks.get("running", 0),
                "managers": len(managers),
                "min_blocks": self.htex.provider.min_blocks,
                "max_blocks": self.htex.provider.max_blocks,
            },
        )

    @property
    def capacity(self) -> int:
        provider = self.htex.provider if self.htex is not None else None
        per_node = self.htex_options.get("max_workers_per_node") or os.cpu_count() or 1
        nodes = getattr(provider, "nodes_per_block", 1) * max(getattr(provider, "max_blocks", 1), 1)
        return max(self._workers, int(per_node) * nodes) * self.prefetch

    def shutdown(self, wait: bool = True, timeout: float | None = None) -> None:
        if self.htex is None:
            return
        if wait:
            deadline = time.monotonic() + (timeout if timeout is not None else 60)
            while self._outstanding and time.monotonic() < deadline:
                time.sleep(0.05)
        if self._poller is not None:
            self._poller.close()
        self.htex.shutdown()
        self.htex = None


def _provider_keys(type_name: str) -> list[str]:
    import importlib

    try:
        return _signature_keys(getattr(importlib.import_module("parsl.providers"), type_name))
    except (ImportError, AttributeError):
        return []
