"""``farcall-endpoint configure NAME --from ~/.globus_compute/GCNAME``: a Globus Compute
endpoint's configuration, copied into a farcall endpoint's directory and checked first.

What a caller may rely on:

- Only configuration is copied: ``config.yaml``, and where present the user config template
  (``user_config_template.yaml.j2`` or ``.yaml``), ``user_config_schema.json``,
  ``user_environment.yaml`` and the identity mapping (the file ``identity_mapping_config_path``
  names, else ``example_identity_mapping_config.json``), each under farcall's own name beside
  ``config.yaml``; a path key naming a copied file is commented out, so the copy is used.
  Globus Compute's registration (``endpoint.json``), credentials, logs and pid files never
  are: the endpoint registers anew with farcall's broker at its first start.
- The copy is checked as ``farcall-endpoint check`` would (every problem at once) in a
  staging directory first: if it does not load, nothing is written and
  :class:`~farcall.endpoint.problems.ConfigProblems` names every problem, in the source file.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from farcall.endpoint import problems
from farcall.endpoint.check import check_config
from farcall.endpoint.config import (
    CONFIG_FILE,
    IDENTITY_MAPPING,
    USER_CONFIG_SCHEMA,
    USER_CONFIG_TEMPLATE,
    USER_ENVIRONMENT,
    endpoint_dir,
    parse_config,
)
from farcall.endpoint.errors import EndpointConfigError

__all__ = ["Imported", "configure_from"]

GLOBUS_REGISTRATION = ("endpoint.json", "credentials", "storage.db")
"""Globus Compute's registration and credentials: never copied."""


@dataclass(frozen=True)
class _Source:
    """One file farcall copies: its farcall name, Globus Compute's default names for it, and
    the config key that may name it elsewhere."""

    farcall_name: str
    globus_names: tuple[str, ...]
    path_key: str | None
    mode: int
    """As ``configure --multi-user`` writes it: what may say more about the site than users
    need to know is 0600."""


SOURCES = (
    _Source(USER_CONFIG_TEMPLATE, ("user_config_template.yaml.j2", "user_config_template.yaml"),
            "user_config_template_path", 0o644),
    _Source(USER_CONFIG_SCHEMA, ("user_config_schema.json",), "user_config_schema_path", 0o644),
    _Source(USER_ENVIRONMENT, ("user_environment.yaml",), None, 0o600),
    _Source(IDENTITY_MAPPING, ("example_identity_mapping_config.json",),
            "identity_mapping_config_path", 0o600),
)
CONFIG_MODE = 0o644


@dataclass
class Imported:
    """What ``configure --from`` wrote, and what it says about it."""

    directory: Path
    copied: dict[str, Path] = field(default_factory=dict)
    """farcall file name → the Globus Compute file it came from."""
    left: list[str] = field(default_factory=list)
    """Files of the Globus Compute directory not copied (registration, logs, run directories)."""
    warnings: list[problems.Problem] = field(default_factory=list)
    built: dict[str, str] = field(default_factory=dict)


def configure_from(name: str, source: Path, *, display_name: str | None = None,
                   broker_url: str | None = None, force: bool = False) -> Imported:
    """Copy the Globus Compute endpoint directory ``source`` into farcall endpoint ``name``.

    ``display_name`` and ``broker_url``, if given, are set in the copied ``config.yaml``.
    Raises ``EndpointConfigError`` (nothing written) if ``source`` is not such a directory, if
    ``name`` is configured already and ``force`` is not set, or if the copy does not load.
    """
    source = source.expanduser()
    config_path = source / CONFIG_FILE
    if not config_path.is_file():
        python = " (a config.py: farcall reads only config.yaml; write its settings there)" if (
            source / "config.py").is_file() else ""
        raise EndpointConfigError(
            f"{source} is not a Globus Compute endpoint directory: it has no {CONFIG_FILE}{python}."
            " Give the endpoint's directory, for example --from ~/.globus_compute/NAME")
    target = endpoint_dir(name)
    if (target / CONFIG_FILE).exists() and not force:
        raise EndpointConfigError(
            f"endpoint {name!r} is already configured ({target / CONFIG_FILE}); pick another "
            "name, or pass --force to overwrite its configuration files")
    text = config_path.read_text()
    files: dict[str, tuple[bytes, int]] = {}
    copied: dict[str, Path] = {CONFIG_FILE: config_path}
    for item in SOURCES:
        found, text = _find(item, source, text)
        if found is not None:
            files[item.farcall_name] = found.read_bytes(), item.mode
            copied[item.farcall_name] = found
    if display_name is not None:
        text = set_top_level(text, "display_name", display_name)
    if broker_url is not None:
        text = set_top_level(text, "broker_url", broker_url)
    files[CONFIG_FILE] = text.encode(), CONFIG_MODE

    imported = Imported(target, copied)
    with tempfile.TemporaryDirectory(prefix=f"farcall-{name}-from-") as staging:
        stage = Path(staging)
        for file_name, (data, mode) in files.items():
            _write(stage / file_name, data, mode)
        try:
            report = check_config(name, parse_config(text, str(config_path)), stage)
        except EndpointConfigError as e:
            listed = [_unstaged(p, stage, copied)
                      for p in getattr(e, "problems", None) or [problems.Problem("", str(e))]]
            raise problems.ConfigProblems(
                f"{config_path} (nothing was written to {target}; fix the file and run "
                "configure again)", listed) from None
        imported.warnings, imported.built = report.warnings, report.built
        target.mkdir(parents=True, exist_ok=True, mode=0o700)
        for file_name, (data, mode) in files.items():
            _write(target / file_name, data, mode)
    used = {p.resolve() for p in copied.values()}
    imported.left = sorted(p.name for p in source.iterdir() if p.resolve() not in used)
    return imported


def _unstaged(problem: problems.Problem, stage: Path, copied: dict[str, Path]) -> problems.Problem:
    """``problem`` naming the Globus Compute files rather than their staged copies."""
    message = problem.message
    for file_name, origin in copied.items():
        message = message.replace(str(stage / file_name), str(origin))
    return problems.Problem(problem.key, message)


def _write(path: Path, data: bytes, mode: int) -> None:
    path.unlink(missing_ok=True)  # a file that exists keeps its mode through os.open
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as out:
        out.write(data)


def _find(item: _Source, source: Path, text: str) -> tuple[Path | None, str]:
    """The file to copy for ``item`` and the config text with its path key commented out."""
    named = top_level_value(text, item.path_key) if item.path_key else None
    if named:
        path = Path(named).expanduser()
        path = path if path.is_absolute() else source / path
        if not path.is_file():
            raise EndpointConfigError(
                f"{source / CONFIG_FILE}: {item.path_key}: {named!r} names no file (looked at "
                f"{path}); fix the path, or remove the key to use {item.globus_names[0]} beside "
                "config.yaml. Nothing was written")
        note = f"copied to {item.farcall_name} beside this file by farcall-endpoint configure --from"
        return path, comment_out(text, str(item.path_key), note)
    for candidate in item.globus_names:
        if (source / candidate).is_file():
            return source / candidate, text
    return None, text


def _line(key: str) -> re.Pattern[str]:
    return re.compile(rf"^{re.escape(key)}[ \t]*:(?P<value>[^\n]*)$", re.MULTILINE)


def top_level_value(text: str, key: str) -> str | None:
    """The value of top-level ``key`` in YAML ``text`` (a plain scalar on its line), or None."""
    import yaml

    match = _line(key).search(text)
    if match is None:
        return None
    value = yaml.safe_load(match.group("value").strip() or "null")
    return None if value is None else str(value)


def comment_out(text: str, key: str, note: str) -> str:
    """``text`` with top-level ``key``'s line commented out, saying why."""
    return _line(key).sub(lambda m: f"# {m.group(0)}  # {note}", text, count=1)


def set_top_level(text: str, key: str, value: str) -> str:
    """``text`` with top-level ``key`` set to the string ``value``; comments are kept."""
    line = f"{key}: {json.dumps(value)}"  # a JSON string is a YAML double-quoted scalar
    if _line(key).search(text):
        return _line(key).sub(lambda _: line, text, count=1)
    return f"{line}\n{text}"
