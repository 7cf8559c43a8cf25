"""The ``engine:`` section of a Parsl endpoint, checked against Parsl's own classes.

Provider and launcher ``type`` names are Parsl's class names; their other keys
are the classes' constructor arguments, and any engine key farcall does not
own must be an argument of the executor. All of it is checked when the config
is read, before anything starts, with errors that name the key and the choices.
"""

from __future__ import annotations

import importlib
import inspect
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from pydantic import ConfigDict, Field, model_validator

from farcall.endpoint.engines.containers import ContainerOptions
from farcall.endpoint.errors import EndpointConfigError

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
ENGINE_OWN = {"provider", "label", "address", "interchange_launch_cmd"}
"""Executor arguments the engine sets itself (or takes from its own options)."""


def signature_keys(cls: type) -> list[str]:
    """The keyword arguments ``cls`` accepts, in order (the valid keys of its config section)."""
    return [
        name
        for name, p in inspect.signature(cls).parameters.items()
        if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]


def component(kind: str, spec: Any, choices: tuple[str, ...], module: str) -> tuple[type, dict[str, Any]]:
    """The Parsl class a ``{type: ..., ...}`` section names and its checked options.

    Errors name the config key (``engine.provider.partiton``) and the valid choices.
    """
    where = "engine.provider.launcher" if kind == "launcher" else f"engine.{kind}"
    if not isinstance(spec, Mapping):
        raise EndpointConfigError(f"{where}: expected a mapping with a 'type' key, got {spec!r}")
    options = dict(spec)
    type_name = options.pop("type", None)
    if type_name not in choices:
        raise EndpointConfigError(
            f"{where}.type: {type_name!r} is not a Parsl {kind}; valid choices: {', '.join(choices)}"
        )
    if type_name == "KubernetesProvider":
        try:
            import kubernetes  # noqa: F401
        except ImportError:
            raise EndpointConfigError(
                f"{where}.type: KubernetesProvider needs the kubernetes package: "
                "pip install 'farcall[kubernetes]'"
            ) from None
    cls: type = getattr(importlib.import_module(module), type_name)
    valid = signature_keys(cls)
    for key in options:
        if key not in valid:
            raise EndpointConfigError(
                f"{where}.{key}: not an option of {type_name}; valid options: {', '.join(valid)}"
            )
    if "launcher" in options:
        options["launcher"] = component("launcher", options["launcher"], LAUNCHERS, "parsl.launchers")
    return cls, options


def _build(kind: str, cls: type, options: dict[str, Any]) -> Any:
    args = dict(options)
    if isinstance(args.get("launcher"), tuple):
        args["launcher"] = _build("launcher", *args["launcher"])
    try:
        return cls(**args)
    except Exception as e:  # noqa: BLE001 - Parsl raises many kinds for bad values
        raise EndpointConfigError(f"engine.{kind}: {cls.__name__}({args}) failed: {e}") from None


def build_provider(spec: Mapping[str, Any]) -> Any:
    """The provider (with its launcher) an ``engine.provider`` section describes.

    Without a ``worker_init`` of its own, the job puts this interpreter's bin/ first
    on PATH, where HTEX looks for its worker pool.
    """
    cls, options = component("provider", spec, PROVIDERS, "parsl.providers")
    if "worker_init" in signature_keys(cls) and "worker_init" not in options:
        options["worker_init"] = f"export PATH={Path(sys.executable).parent}:$PATH"
    return _build("provider", cls, options)


def interchange_cmd() -> list[str]:
    """Parsl's interchange from this interpreter's bin/, even when that is not on PATH."""
    here = Path(sys.executable).parent / "interchange.py"
    return [sys.executable, str(here)] if here.is_file() else ["interchange.py"]


def executor_class(name: str) -> type:
    """``HighThroughputExecutor`` or ``MPIExecutor``, imported only when an engine needs it."""
    from parsl.executors import HighThroughputExecutor, MPIExecutor

    return {"HighThroughputExecutor": HighThroughputExecutor, "MPIExecutor": MPIExecutor}[name]


class ParslOptions(ContainerOptions):
    """``engine:`` keys for ``type: ParslEngine``. Any other key must be an executor argument."""

    model_config = ConfigDict(extra="allow")
    EXECUTOR: ClassVar[str] = "HighThroughputExecutor"

    provider: dict[str, Any] = Field(default_factory=lambda: {"type": "LocalProvider"})
    address: str = Field(default="127.0.0.1", description="where the interchange listens for workers")
    strategy: str = "htex_auto_scale"
    strategy_period: float = Field(default=1.0, gt=0)
    max_idletime: float = Field(default=120.0, ge=0)
    run_dir: str | None = None
    max_chunk: int = Field(default=64, ge=1, description="most short tasks run as one Parsl task")

    @model_validator(mode="after")
    def _check_parsl_keys(self) -> ParslOptions:
        valid = [k for k in signature_keys(executor_class(self.EXECUTOR)) if k not in ENGINE_OWN]
        for key in self.model_extra or {}:
            if key not in valid:
                own = ", ".join(["type", *type(self).model_fields])
                raise EndpointConfigError(
                    f"engine.{key}: unknown key; valid keys: {own}, and the {self.EXECUTOR} "
                    f"arguments {', '.join(valid)}"
                )
        component("provider", self.provider, PROVIDERS, "parsl.providers")
        return self


class MPIOptions(ParslOptions):
    """``type: MPIEngine``: Parsl's MPIExecutor; tasks set ``num_nodes``/``ranks_per_node``."""

    EXECUTOR: ClassVar[str] = "MPIExecutor"

    provider: dict[str, Any] = Field(
        default_factory=lambda: {"type": "LocalProvider", "launcher": {"type": "SimpleLauncher"}}
    )
