"""Engines by name, as the config's ``engine: {type: ...}`` names them.

Engine modules are imported only when named, so a thread-pool endpoint never
pays for importing Parsl.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from farcall.endpoint import problems
from farcall.endpoint.engines.base import Engine, EngineOptions, EngineStatus
from farcall.endpoint.errors import EndpointConfigError, validation_problems

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
    """Check an ``engine`` section without starting anything.

    Every problem is found before this raises :class:`~farcall.endpoint.problems.ConfigProblems`
    (its ``problems`` each name their dotted key); warnings go to the report being collected
    (``problems.collecting``), or to the log.
    """
    report = problems.Report()
    with problems.collecting(report):
        found = _validate(spec)
    for warning in report.warnings:
        problems.warn(warning.key, warning.message)
    if report.errors or found is None:
        raise problems.ConfigProblems("engine section", report.errors)
    return found


def _validate(spec: Mapping[str, Any]) -> tuple[type[Engine], EngineOptions] | None:
    if not isinstance(spec, Mapping):
        problems.error("engine", f"expected a mapping like {{type: ProcessPoolEngine}}, got {spec!r}")
        return None
    options = dict(spec)
    type_name = str(options.pop("type", "ProcessPoolEngine"))
    if type_name not in ENGINES:
        problems.error("engine.type", f"unknown engine {type_name!r}; valid choices: "
                                      f"{', '.join(ENGINES)}")
        return None
    cls = engine_class(type_name)
    try:
        return cls, cls.Options.model_validate(options)
    except ValidationError as e:
        for problem in validation_problems(e, "engine.", ["type", *cls.Options.model_fields]):
            problems.error(problem.key, problem.message)
        return None


def build_engine(spec: Mapping[str, Any]) -> Engine:
    """A new, not yet started engine from the config's ``engine`` section.

    Its warnings were given when the config was read, so they are not repeated here.
    """
    with problems.collecting(problems.Report()):
        cls, options = validate_engine(spec)
    return cls.from_options(options)
