"""The ``engine:`` section of a Parsl endpoint, in farcall's words and in Globus Compute's.

farcall's own keys are fields here; any other key must be an argument of the executor
(``HighThroughputExecutor``, or ``MPIExecutor`` for ``MPIEngine``), passed on as it is.
A Globus Compute section loads as it is written: its ``address`` mappings
(``engines/addresses.py``), ``strategy`` as a string or as ``{type: SimpleStrategy, ...}``,
``job_status_kwargs``, ``label``, ``worker_ports`` of older Parsl, and the keys farcall takes
without acting on them (one warning each, saying what farcall does instead).

Every problem of the section is recorded (``problems.error``, with its dotted key) and checking
goes on, so one ``farcall-endpoint check`` names them all. Providers and launchers are checked
in ``parsl_components``.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from pydantic import ConfigDict, Field, field_validator, model_validator

from farcall.endpoint import problems
from farcall.endpoint.engines import addresses
from farcall.endpoint.engines.base import GLOBUS_KEYS
from farcall.endpoint.engines.containers import ContainerOptions
from farcall.endpoint.engines.parsl_components import check_component, signature_keys
from farcall.endpoint.engines.policy import PolicyOptions

ENGINE_OWN = {"provider", "label", "address", "interchange_launch_cmd"}
"""Executor arguments the engine sets itself (or takes from its own options)."""
STRATEGIES = ("htex_auto_scale", "simple", "none")
"""Parsl's scaling strategies (``parsl.jobs.strategy.Strategy``)."""
STRATEGY_TYPES = {"SimpleStrategy": "simple"}
"""Globus Compute's strategy classes, written ``strategy: {type: ..., max_idletime: N}``."""
STRATEGY_KEYS = {"max_idletime": "max_idletime", "interval": "strategy_period"}
"""Keys of that mapping -> farcall's keys."""
JOB_STATUS_KEYS = ("strategy", "max_idletime", "strategy_period")
"""``job_status_kwargs`` keys (Parsl's ``JobStatusPoller`` arguments): farcall's keys too."""
RENAMED = {"max_workers": "max_workers_per_node"}
"""Executor arguments older Parsl (and Globus Compute configs written for it) used -> today's."""
PORT_RANGES = ("worker_port_range", "interchange_port_range")
GLOBUS_PARSL_KEYS = {
    "executor": "farcall builds the executor itself from this section's keys: write the "
                "executor's arguments here instead",
}
"""Globus Compute engine keys that are errors here, with what to write instead."""


def executor_class(name: str) -> type:
    """``HighThroughputExecutor`` or ``MPIExecutor``, imported only when an engine needs it."""
    from parsl.executors import HighThroughputExecutor, MPIExecutor

    return {"HighThroughputExecutor": HighThroughputExecutor, "MPIExecutor": MPIExecutor}[name]


def interchange_cmd() -> list[str]:
    """Parsl's interchange from this interpreter's bin/, even when that is not on PATH."""
    here = Path(sys.executable).parent / "interchange.py"
    return [sys.executable, str(here)] if here.is_file() else ["interchange.py"]


class ParslOptions(ContainerOptions, PolicyOptions):
    """``engine:`` keys for ``type: ParslEngine`` (``GlobusComputeEngine``). Any other key must
    be an argument of the executor."""

    model_config = ConfigDict(extra="allow")
    EXECUTOR: ClassVar[str] = "HighThroughputExecutor"
    OTHER: ClassVar[tuple[str, str]] = ("MPIEngine", "GlobusMPIEngine")
    """The other Parsl engine, for keys that belong to it."""

    provider: dict[str, Any] = Field(default_factory=lambda: {"type": "LocalProvider"})
    address: str | dict[str, Any] = Field(
        default="127.0.0.1", description="where workers reach the interchange: a string or "
                                         "{type: address_by_interface, ifname: ...} and the like")
    label: str = Field(default="farcall", min_length=1, max_length=100,
                       description="names the executor, its batch jobs and its run directories")
    strategy: str = "htex_auto_scale"
    strategy_period: float = Field(default=1.0, gt=0)
    max_idletime: float = Field(default=120.0, ge=0)
    run_dir: str | None = None
    max_chunk: int = Field(default=64, ge=1, description="most short tasks run as one Parsl task")

    @field_validator("label")
    @classmethod
    def _check_label(cls, value: str) -> str:
        if "/" in value or "\0" in value:
            raise ValueError("names directories and batch jobs: write it without '/'")
        return value

    @model_validator(mode="before")
    @classmethod
    def _adopt(cls, data: Any) -> Any:
        """Globus Compute's shapes -> farcall's keys; the provider and executor keys checked."""
        if not isinstance(data, Mapping):
            return data
        data = dict(data)
        _adopt_strategy(data)
        _adopt_job_status(data)
        if "address" in data and not addresses.check_address(data["address"]):
            del data["address"]
        cls._adopt_executor_keys(data)
        if "provider" in data and isinstance(data["provider"], Mapping):
            check_component("provider", data["provider"])
        return data

    @classmethod
    def _adopt_executor_keys(cls, data: dict[str, Any]) -> None:
        """Check every key that is not farcall's against the executor's arguments, mapping the
        names older Parsl and Globus Compute used."""
        executor = executor_class(cls.EXECUTOR)
        ignored = {**GLOBUS_KEYS, **cls.globus_keys}
        valid = [k for k in signature_keys(executor) if k not in ENGINE_OWN and k not in ignored]
        for old, new in RENAMED.items():
            if old in data and old not in valid and new in valid:
                if new in data:
                    problems.error(f"engine.{old}", f"set both {old} and {new}: keep {new} only")
                else:
                    data[new] = data[old]
                    problems.warn(f"engine.{old}", f"the installed Parsl's {cls.EXECUTOR} calls "
                                                   f"it {new}: farcall sets {new}: {data[old]!r}")
                del data[old]
        if "worker_ports" in data and "worker_port" in valid:
            ports = data.pop("worker_ports")
            if "worker_port" in data:
                problems.error("engine.worker_ports", "set both worker_ports and worker_port: "
                                                      "keep worker_port only")
            elif isinstance(ports, (list, tuple)) and ports and all(isinstance(p, int) for p in ports):
                data["worker_port"] = ports[0]
                problems.warn("engine.worker_ports", f"the installed Parsl's {cls.EXECUTOR} "
                              f"listens for workers on one port (worker_port): farcall uses "
                              f"worker_port: {ports[0]}" + (f"; port {ports[1:]} is not used"
                                                            if len(ports) > 1 else ""))
            else:
                problems.error("engine.worker_ports", f"expected a pair of port numbers, got "
                                                      f"{ports!r}; write worker_port: PORT")
        for key in PORT_RANGES:
            if isinstance(data.get(key), list):
                data[key] = tuple(data[key])
        for key in list(data):
            if key in cls.model_fields or key in ignored or key in valid:
                continue
            if key in GLOBUS_PARSL_KEYS:
                problems.error(f"engine.{key}", GLOBUS_PARSL_KEYS[key])
            elif (hint := cls._misplaced(key, data[key])) is not None:
                if hint:
                    problems.error(f"engine.{key}", hint)
            else:
                own = ", ".join(["type", *cls.model_fields])
                problems.error(f"engine.{key}", f"unknown key; valid keys: {own}, and the "
                               f"{cls.EXECUTOR} arguments {', '.join(valid)}")
            del data[key]

    @classmethod
    def _misplaced(cls, key: str, value: Any) -> str | None:
        """What to write for a key of the other Parsl engine ("" when it is only a warning,
        None when the key is simply unknown)."""
        if key in ("enable_mpi_mode", "mpi_launcher", "max_workers_per_block"):
            return (f"{key} is for MPI tasks: write type: {cls.OTHER[1]} (farcall's "
                    f"{cls.OTHER[0]}), which runs Parsl's MPIExecutor; as in Globus Compute, "
                    "this engine runs no MPI mode")
        return None


class MPIOptions(ParslOptions):
    """``type: MPIEngine`` (``GlobusMPIEngine``): Parsl's MPIExecutor; tasks set ``num_nodes``
    and ``ranks_per_node``."""

    EXECUTOR: ClassVar[str] = "MPIExecutor"
    OTHER: ClassVar[tuple[str, str]] = ("ParslEngine", "GlobusComputeEngine")

    provider: dict[str, Any] = Field(
        default_factory=lambda: {"type": "LocalProvider", "launcher": {"type": "SimpleLauncher"}}
    )

    @classmethod
    def _misplaced(cls, key: str, value: Any) -> str | None:
        if key == "enable_mpi_mode":
            if value:
                problems.warn("engine.enable_mpi_mode", "MPIEngine always runs Parsl's MPI mode "
                                                        "(MPIExecutor); the key is not needed")
                return ""
            return ("MPIEngine always runs MPI mode: remove enable_mpi_mode, or write type: "
                    "GlobusComputeEngine for tasks without MPI")
        if key in ("max_workers_per_node", "max_workers", "available_accelerators",
                   "cores_per_worker", "mem_per_worker", "cpu_affinity"):
            return (f"{key} is a HighThroughputExecutor argument; MPIExecutor runs "
                    "max_workers_per_block MPI tasks at once per block (each on num_nodes "
                    "of its nodes): write max_workers_per_block, or type: GlobusComputeEngine")
        return None


def _adopt_strategy(data: dict[str, Any]) -> None:
    """``strategy``: Parsl's name, None (the default), or ``{type: SimpleStrategy, ...}``."""
    if "strategy" in data:
        _set_strategy(data, data.pop("strategy"), "strategy")


def _set_strategy(data: dict[str, Any], value: Any, key: str) -> None:
    """Set farcall's ``strategy`` (and what a strategy mapping holds) from ``value``, found
    at ``engine.KEY``."""
    if value is None:
        return
    if isinstance(value, Mapping):
        args = dict(value)
        kind = args.pop("type", None)
        if kind not in STRATEGY_TYPES and kind not in STRATEGIES:
            problems.error(f"engine.{key}.type", f"{kind!r} is not a strategy; write "
                           f"{{type: SimpleStrategy, max_idletime: SECONDS}} or one of Parsl's "
                           f"names: {', '.join(STRATEGIES)}")
            return
        for name, val in args.items():
            if name not in STRATEGY_KEYS:
                problems.error(f"engine.{key}.{name}", f"not an option of {kind} (its options: "
                                                       f"{', '.join(STRATEGY_KEYS)})")
            else:
                _move(data, f"{key}.{name}", STRATEGY_KEYS[name], val)
        _move(data, key, "strategy", STRATEGY_TYPES.get(str(kind), str(kind)))
        return
    if value not in STRATEGIES:
        problems.error(f"engine.{key}", f"{value!r} is not one of Parsl's strategies; valid "
                       f"choices: {', '.join(STRATEGIES)} (or {{type: SimpleStrategy, "
                       "max_idletime: SECONDS})")
        return
    _move(data, key, "strategy", value)


def _adopt_job_status(data: dict[str, Any]) -> None:
    """``job_status_kwargs``: Parsl's JobStatusPoller arguments, which are farcall's own keys."""
    if "job_status_kwargs" not in data:
        return
    value = data.pop("job_status_kwargs")
    if value is None:
        return
    if not isinstance(value, Mapping):
        problems.error("engine.job_status_kwargs", f"expected a mapping of "
                       f"{', '.join(JOB_STATUS_KEYS)}, got {value!r}")
        return
    for key, val in value.items():
        if key not in JOB_STATUS_KEYS:
            problems.error(f"engine.job_status_kwargs.{key}", f"not a JobStatusPoller option "
                           f"farcall takes; valid: {', '.join(JOB_STATUS_KEYS)}")
        elif key == "strategy":
            _set_strategy(data, val, "job_status_kwargs.strategy")
        else:
            _move(data, f"job_status_kwargs.{key}", key, val)


def _move(data: dict[str, Any], source: str, key: str, value: Any) -> None:
    """Set farcall's ``key`` from a nested Globus Compute key, unless the section sets it twice."""
    if key in data and data[key] != value:
        problems.error(f"engine.{source}", f"sets {key} to {value!r}, but engine.{key} sets it to "
                                           f"{data[key]!r}: keep one of them")
        return
    data[key] = value
