"""Engines by name, as the config's ``engine: {type: ...}`` names them.

Engine modules are imported only when named, so a thread-pool endpoint never
pays for importing Parsl.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from farcall.endpoint.engines.base import Engine, EngineOptions, EngineStatus
from farcall.endpoint.errors import EndpointConfigError, format_validation_error

__all__ = ["ENGINES", "Engine", "EngineStatus", "build_engine", "engine_class", "validate_engine"]

ENGINES: dict[str, str] = {
    "ThreadPoolEngine": "farcall.endpoint.engines.threads:ThreadPoolEngine",
    "ProcessPoolEngine": "farcall.endpoint.engines.processes:ProcessPoolEngine",
    "ParslEngine": "farcall.endpoint.engines.parsl:ParslEngine",
    "MPIEngine": "farcall.endpoint.engines.parsl:MPIEngine",
    "GlobusComputeEngine": "farcall.endpoint.engines.parsl:ParslEngine",
    "GlobusMPIEngine": "farcall.endpoint.engines.parsl:MPIEngine",
}
"""Engine type name -> ``module:class``. The ``Globus*`` names are aliases, so Globus Compute
endpoint configs carry over."""


def engine_class(type_name: str) -> type[Engine]:
    """The engine class called ``type_name``; a clear error naming the valid choices otherwise."""
    target = ENGINES.get(type_name)
    if target is None:
        raise EndpointConfigError(
            f"engine.type: unknown engine {type_name!r}; valid choices: {', '.join(ENGINES)}"
        )
    module, _, attr = target.partition(":")
    cls: type[Engine] = getattr(importlib.import_module(module), attr)
    return cls


def validate_engine(spec: Mapping[str, Any]) -> tuple[type[Engine], EngineOptions]:
    """Check an ``engine`` section without starting anything; errors name the bad key."""
    if not isinstance(spec, Mapping):
        raise EndpointConfigError(
            f"engine: expected a mapping like {{type: ProcessPoolEngine}}, got {spec!r}"
        )
    options = dict(spec)
    type_name = options.pop("type", "ProcessPoolEngine")
    cls = engine_class(str(type_name))
    try:
        return cls, cls.Options.model_validate(options)
    except ValidationError as e:
        raise EndpointConfigError(
            f"engine ({type_name}): "
            + format_validation_error(e, "engine.", ["type", *cls.Options.model_fields])
        ) from None


def build_engine(spec: Mapping[str, Any]) -> Engine:
    """A new, not yet started engine from the config's ``engine`` section."""
    cls, options = validate_engine(spec)
    return cls.from_options(options)
