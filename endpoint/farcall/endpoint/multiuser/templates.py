"""A user endpoint's ``config.yaml``, made from the administrator's template and the user's values.

``user_config_schema.json`` (a JSON Schema) says which values a user may send; the broker
checks it at submission and the manager again here. ``user_config_template.yaml.j2`` is a
Jinja2 template rendered with those values (both files beside the manager's ``config.yaml``
unless ``user_config_schema_path`` / ``user_config_template_path`` say where), under these rules:

- Sandboxed (``ImmutableSandboxedEnvironment``): a template cannot reach Python internals
  (``''.__class__`` and the like is an error) nor change the values it is given.
- Every ``{{ ... }}`` is written as one YAML flow value: a string as a double-quoted scalar with
  every character outside printable ASCII escaped, a number as a number, a list or mapping as
  ``[...]`` / ``{...}``. So no value, whatever it holds (newlines, ``: ``, ``{``, ``*``,
  ``!!tags``, ``{{ }}``), can add a key or change the document's structure. To put a value inside
  a longer string, build the string in the expression: ``worker_init: {{ "module load " ~
  module }}``, not ``"module load {{ module }}"`` (that writes quotes inside quotes).
- ``shell_escape`` quotes a value for a shell (``shlex.quote``; a list becomes quoted words):
  ``{{ "module load " ~ (module | shell_escape) }}``.
- An undefined variable is an error naming it (``StrictUndefined``): give optional values a
  default, ``{{ partition | default("debug") }}``.
- The manager sets ``RESERVED_NAMES`` (the local account and its own config); a user value with
  one of these names is refused.
- The rendered file must be a valid single-user ``config.yaml``, with an ``engine`` section
  (without one a config is a manager's), that leaves ``FIXED_KEYS`` to the manager and
  ``MANAGER_KEYS`` to the manager's own config.
"""

from __future__ import annotations

import json
import os
import pwd
import shlex
import sys
from pathlib import Path
from types import TracebackType
from typing import Any

import jsonschema
import yaml
from jinja2 import (
    FileSystemLoader,
    StrictUndefined,
    TemplateNotFound,
    TemplateSyntaxError,
    Undefined,
    UndefinedError,
)
from jinja2.sandbox import ImmutableSandboxedEnvironment
from pydantic import ValidationError

from farcall.endpoint import problems
from farcall.endpoint.config import (
    MANAGER_KEYS,
    USER_CONFIG_SCHEMA,
    USER_CONFIG_TEMPLATE,
    EndpointConfig,
)
from farcall.endpoint.errors import EndpointConfigError, validation_problems
from farcall.endpoint.multiuser.errors import UserConfigError
from farcall.endpoint.multiuser.identity import LocalUser

__all__ = ["FIXED_KEYS", "RESERVED_NAMES", "UserConfigError", "check_user_config",
           "load_user_config_schema", "manager_file", "render_user_config", "schema_path",
           "shell_escape", "template_path", "yaml_value"]

RESERVED_NAMES = {
    "local_user": "the local account's name",
    "local_uid": "its uid",
    "local_gid": "its primary gid",
    "local_home": "its home directory",
    "parent_config": "the manager's own config.yaml, as a mapping",
    "_GC": "Globus Compute's names for the same: _GC.mapped_identity.local.uname, .uid, .gid, "
           ".dir, .shell, .gecos, .groups, _GC.mapped_identity.globus.id, _GC.parent_config, "
           "_GC.user_runtime",
    "mapped_identity": "Globus Compute's older name for _GC.mapped_identity",
    "user_runtime": "Globus Compute's older name for _GC.user_runtime (empty here)",
}
"""Template variables the manager sets; a user value may not have these names."""
FIXED_KEYS = ("broker_url", "multi_user", "identity_mapping_config_path", "audit_log_path",
              "user_endpoint_idle_seconds", "idle_shutdown_seconds")
"""``config.yaml`` keys the manager sets on every user endpoint; a template may not set them."""
MAX_RENDERED = 1 << 20
"""Bytes a rendered config may have."""
SCHEMA_ROOT = "user_endpoint_config"
"""How messages name the user's values (as the SDK's keyword argument does)."""


# ------------------------------------------------------------------ the schema


def manager_file(directory: Path, configured: str | None, default: str) -> Path:
    """Where a manager reads one of its files: the configured path (``~`` expanded; a relative
    one is taken from the endpoint's ``directory``), else ``default`` beside ``config.yaml``."""
    return Path(directory) / (Path(configured).expanduser() if configured else Path(default))


def template_path(directory: Path, config: EndpointConfig | None = None) -> Path:
    """The user config template: ``user_config_template_path``, else the file beside config.yaml."""
    return manager_file(directory, config.user_config_template_path if config else None,
                        USER_CONFIG_TEMPLATE)


def schema_path(directory: Path, config: EndpointConfig | None = None) -> Path:
    """The user config schema: ``user_config_schema_path``, else the file beside config.yaml."""
    return manager_file(directory, config.user_config_schema_path if config else None,
                        USER_CONFIG_SCHEMA)


def load_user_config_schema(directory: Path,
                            config: EndpointConfig | None = None) -> dict[str, Any] | None:
    """The manager's user config schema (``schema_path``), checked as a JSON Schema; None when
    the default file is absent. A ``user_config_schema_path`` that names no file, or an invalid
    schema, is an ``EndpointConfigError`` naming the file.

    The schema's ``$schema`` picks the draft (default 2020-12).
    """
    path = schema_path(directory, config)
    try:
        text = path.read_text()
    except FileNotFoundError:
        if config is not None and config.user_config_schema_path:
            raise EndpointConfigError(
                f"user_config_schema_path: {path} does not exist: write the JSON Schema of the "
                "values users may send there, or remove the key (then "
                f"{USER_CONFIG_SCHEMA} beside config.yaml is read, if present)") from None
        return None
    except OSError as e:
        raise EndpointConfigError(f"{path}: cannot be read: {e}") from None
    try:
        schema = json.loads(text)
    except ValueError as e:
        raise EndpointConfigError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(schema, dict):
        raise EndpointConfigError(f"{path}: a schema must be a JSON object, got {type(schema).__name__}")
    try:
        jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator) \
            .check_schema(schema)
    except jsonschema.SchemaError as e:
        where = "".join(f"[{p!r}]" for p in e.path)
        raise EndpointConfigError(f"{path}: not a valid JSON Schema: {e.message}"
                                  + (f" (at {where})" if where else "")) from None
    return schema


def _value_path(path: Any) -> str:
    text = SCHEMA_ROOT
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else f".{part}"
    return text


def check_user_config(schema: dict[str, Any] | None, values: dict[str, Any]) -> None:
    """Refuse ``values`` that break ``schema`` or use a reserved name (``UserConfigError``).

    Each message is the schema's own, after the path of the value at fault:
    ``user_endpoint_config.nodes: 0 is less than the minimum of 1``.
    """
    if not isinstance(values, dict):
        raise UserConfigError(f"{SCHEMA_ROOT} must be a mapping of names to values, "
                              f"got {type(values).__name__}")
    odd = [k for k in values if not isinstance(k, str)]
    if odd:
        raise UserConfigError(f"{SCHEMA_ROOT}: names must be strings, got {odd[0]!r}")
    reserved = sorted(set(values) & set(RESERVED_NAMES))
    if reserved:
        raise UserConfigError(
            f"{_value_path([reserved[0]])}: {reserved[0]!r} is a reserved name (the manager sets "
            f"it to {RESERVED_NAMES[reserved[0]]}); a user endpoint config may not use "
            f"{', '.join(RESERVED_NAMES)}")
    if schema is None:
        return
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    validator = cls(schema, format_checker=cls.FORMAT_CHECKER)
    errors = sorted(validator.iter_errors(values), key=lambda e: [str(p) for p in e.path])
    if errors:
        raise UserConfigError("; ".join(f"{_value_path(e.path)}: {e.message}" for e in errors[:5])
                              + (f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""))


# ------------------------------------------------------------------ writing values into YAML


def _quoted(text: str) -> str:
    out = ['"']
    for ch in text:
        code = ord(ch)
        if ch in '"\\':
            out.append("\\" + ch)
        elif 0x20 <= code < 0x7F:
            out.append(ch)
        elif code <= 0xFF:
            out.append(f"\\x{code:02x}")
        elif code <= 0xFFFF:
            out.append(f"\\u{code:04x}")
        else:
            out.append(f"\\U{code:08x}")
    out.append('"')
    return "".join(out)


def yaml_value(value: Any) -> str:
    """``value`` as one YAML flow value, all on one line and ASCII: what every ``{{ }}`` writes.

    Strings are double-quoted with escapes, so their content is never YAML syntax.
    """
    if isinstance(value, Undefined):
        str(value)  # StrictUndefined (and the sandbox's unsafe-attribute undefined) raise here
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(int(value))
    if isinstance(value, float):
        return yaml.safe_dump(value).split("\n", 1)[0]  # 1.0e+20, .inf: what PyYAML reads back
    if isinstance(value, str):
        return _quoted(str(value))
    if isinstance(value, list | tuple):
        return "[" + ", ".join(yaml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{yaml_value(k)}: {yaml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"a {type(value).__name__} cannot be written into the config: write strings, "
                    "numbers, booleans, lists or mappings")


def shell_escape(value: Any) -> str:
    """``value`` quoted as one shell word (a list: as quoted words), for commands in the config."""
    if isinstance(value, Undefined):
        str(value)  # an undefined variable is an error naming it, as in {{ }}
    if isinstance(value, list | tuple):
        return " ".join(shell_escape(v) for v in value)
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise TypeError(f"shell_escape takes a string, a number or a list of them, "
                        f"not a {type(value).__name__}")
    return shlex.quote(str(value))


# ------------------------------------------------------------------ rendering


def _environment(directory: Path) -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        loader=FileSystemLoader(str(directory)), undefined=StrictUndefined, finalize=yaml_value,
        autoescape=False, keep_trailing_newline=True, trim_blocks=True, lstrip_blocks=True,
        auto_reload=False)
    env.filters["shell_escape"] = shell_escape
    return env


def _template_line(tb: TracebackType | None, filename: str) -> int | None:
    line = None
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == filename:
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


def _template_variables(values: dict[str, Any], user: LocalUser, parent: EndpointConfig,
                        identity: str) -> dict[str, Any]:
    """The user's values and the manager's own variables; a Globus Compute template's ``_GC``
    namespace (and its older top-level names) holds the same facts under Globus Compute's
    names, so such a template renders unchanged. ``user_runtime`` is empty: the broker does not
    send the submitter's Python version."""
    parent_config = parent.model_dump(mode="json")
    try:
        record = pwd.getpwnam(user.name)
        gecos, groups = record.pw_gecos, os.getgrouplist(user.name, user.gid)
    except (KeyError, OSError):  # not in the password database (a test's made-up account)
        gecos, groups = "", [user.gid]
    mapped = {"local": {"uname": user.name, "uid": user.uid, "gid": user.gid, "dir": user.home,
                        "shell": user.shell, "gecos": gecos, "groups": groups},
              "globus": {"id": identity}}
    return {**values, "local_user": user.name, "local_uid": user.uid, "local_gid": user.gid,
            "local_home": user.home, "parent_config": parent_config,
            "_GC": {"mapped_identity": mapped, "parent_config": parent_config, "user_runtime": {}},
            "mapped_identity": mapped, "user_runtime": {}}


def render_user_config(directory: Path, values: dict[str, Any], user: LocalUser,
                       parent: EndpointConfig, *, values_checked: bool = False,
                       identity: str = "") -> tuple[str, EndpointConfig]:
    """The user endpoint's ``config.yaml`` text for ``user`` and ``values``, and its parsed
    config; ``UserConfigError`` says which value, or which line of the template, and why.

    The template and schema are the manager's (``parent``'s ``user_config_template_path`` and
    ``user_config_schema_path``, else the files in ``directory``); ``values`` are checked
    against the schema first (as the broker did), unless the caller did (``values_checked``).
    ``identity``: the submitter's identity on the broker (``_GC.mapped_identity.globus.id``).
    """
    directory = Path(directory)
    if not values_checked:
        check_user_config(load_user_config_schema(directory, parent), values)
    path = template_path(directory, parent)
    env = _environment(path.parent)
    try:
        template = env.get_template(path.name)
        text = template.render(_template_variables(values, user, parent, identity))
    except TemplateNotFound:
        where = ("user_config_template_path: " if parent.user_config_template_path else "")
        raise UserConfigError(f"{where}{path} does not exist: write the user endpoint's "
                              "config template there (see docs/multi-user.md)") from None
    except TemplateSyntaxError as e:
        raise UserConfigError(f"{e.filename or path}, line {e.lineno}: {e.message}") from None
    except Exception as e:  # the template's own code failed: name its line
        line = _template_line(sys.exc_info()[2], str(path))
        where = f"{path}" + (f", line {line}" if line else "")
        hint = ""
        if isinstance(e, UndefinedError) and "unsafe" not in str(e):
            hint = (": the template uses a value that was not sent; make the schema require it, "
                    "or give it a default in the template ({{ name | default(...) }})")
        raise UserConfigError(f"{where}: {e}{hint}") from None
    return text, parse_user_config(text, str(path))


def parse_user_config(text: str, source: str) -> EndpointConfig:
    """A rendered user endpoint config, validated; it must leave ``FIXED_KEYS`` to the manager."""
    if len(text.encode()) > MAX_RENDERED:
        raise UserConfigError(f"{source} rendered {len(text.encode())} bytes; at most "
                              f"{MAX_RENDERED} are allowed")
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        shown = ""
        if mark is not None:
            lines = text.splitlines()
            if 0 <= mark.line < len(lines):
                shown = f" (rendered line {mark.line + 1}: {lines[mark.line][:200]!r})"
        raise UserConfigError(
            f"{source} rendered invalid YAML{shown}: {e}. A {{{{ }}}} writes a complete YAML value "
            "(a string with its quotes): inside a longer string, build it in the expression, "
            "{{ \"text \" ~ value }}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserConfigError(f"{source} must render a mapping of config keys, got {type(raw).__name__}")
    fixed = [k for k in FIXED_KEYS if k in raw]
    if fixed:
        raise UserConfigError(
            f"{source} sets {', '.join(fixed)}, which the multi-user endpoint's manager sets on "
            "every user endpoint: remove it from the template (the manager's own config.yaml "
            "holds broker_url and the idle time)")
    manager_only = [k for k in MANAGER_KEYS if k in raw]
    if manager_only:
        raise UserConfigError(
            f"{source} sets {', '.join(manager_only)}, which apply to the multi-user endpoint's "
            "manager only: set them in the manager's config.yaml, not in the template")
    with problems.collecting(problems.Report()) as report:
        if "engine" not in raw:
            report.error("engine", (
                "missing: a user endpoint runs its user's tasks with an engine section (without "
                "one, a config.yaml is a manager's, as in Globus Compute); add one to the "
                "template, for example `engine: {type: ProcessPoolEngine}`"))
        config = None
        try:
            config = EndpointConfig.model_validate(raw)
        except ValidationError as e:
            valid = [k for k in EndpointConfig.model_fields
                     if k not in FIXED_KEYS and k not in MANAGER_KEYS]
            for problem in validation_problems(e, "", valid):
                report.error(problem.key, problem.message)
        except EndpointConfigError as e:
            report.error("", str(e))
    if report.errors:
        raise UserConfigError(f"{source} rendered an invalid config: "
                              + "; ".join(str(p) for p in report.errors))
    assert config is not None
    config._warnings = list(report.warnings)
    return config
