"""``farcall-endpoint check NAME``: every problem of an endpoint's configuration at once, or
what the configuration builds.

``start`` runs the same check before it registers or connects, so a bad key, a provider's
missing package or a missing Kubernetes config is reported before anything starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from farcall.endpoint import problems
from farcall.endpoint.config import CONFIG_FILE, EndpointConfig, endpoint_dir, load_config
from farcall.endpoint.errors import EndpointConfigError

__all__ = ["CheckReport", "check_config", "check_endpoint"]


@dataclass
class CheckReport:
    """What a valid configuration builds, and its warnings."""

    name: str
    path: Path
    built: dict[str, str]
    """``engine`` and, where they apply, ``executor``, ``provider``, ``launcher`` (class names);
    a multi-user manager says what its user endpoints are made from."""
    warnings: list[problems.Problem] = field(default_factory=list)

    def lines(self) -> list[str]:
        """The report as ``farcall-endpoint check`` prints it."""
        out = [f"{self.path}: OK"]
        out += [f"  {key}: {value}" for key, value in self.built.items()]
        out += [f"WARNING {w}" for w in self.warnings]
        return out


def check_endpoint(name: str) -> CheckReport:
    """Load ``endpoints/NAME/config.yaml`` and build what it describes, starting nothing.

    Raises :class:`~farcall.endpoint.problems.ConfigProblems` (an ``EndpointConfigError``)
    naming every problem of the file.
    """
    return check_config(name, load_config(name), endpoint_dir(name))


def check_config(name: str, config: EndpointConfig, directory: Path) -> CheckReport:
    """Build what ``config`` describes without starting or connecting anything."""
    source = str(directory / CONFIG_FILE)
    with problems.collecting(problems.Report()) as report:
        built: dict[str, str] = {}
        try:
            if config.multi_user:
                from farcall.endpoint.multiuser.manager import check_manager

                built = check_manager(name, directory, config)
            else:
                from farcall.endpoint.engines import build_engine

                spec = config.engine_spec(directory)
                built = build_engine(spec).prepare()
                named = str(spec.get("type", built.get("engine")))
                if named != built.get("engine"):  # an alias: GlobusComputeEngine is ParslEngine
                    built["engine"] = f"{named} (farcall's {built['engine']})"
        except EndpointConfigError as e:
            report.errors.extend(getattr(e, "problems", None) or [problems.Problem("", str(e))])
    report.raise_if_errors(source)
    warnings = list(config.warnings)
    warnings += [w for w in report.warnings if w not in warnings]
    return CheckReport(name, Path(source), built, warnings)
