"""User endpoint templates: the schema, the sandbox, YAML-safe values, reserved names, fixed keys."""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from farcall.endpoint.config import MANAGER_KEYS, EndpointConfig
from farcall.endpoint.errors import EndpointConfigError
from farcall.endpoint.multiuser.identity import LocalUser
from farcall.endpoint.multiuser.templates import (
    FIXED_KEYS,
    RESERVED_NAMES,
    UserConfigError,
    check_user_config,
    load_user_config_schema,
    render_user_config,
    shell_escape,
    yaml_value,
)
from farcall.protocol.common import RESERVED_USER_CONFIG_NAMES

USER = LocalUser("alice", 1234, 1234, "/home/alice", "/bin/bash")
PARENT = EndpointConfig(multi_user=True, display_name="site")
TEMPLATE = """\
display_name: {{ account }}
endpoint_setup: {{ "echo " ~ (account | shell_escape) }}
engine:
  type: ProcessPoolEngine
  max_workers: {{ max_workers | default(1) }}
"""
ENGINE = "engine: {type: ThreadPoolEngine}\n"


def site(tmp_path: Path, template: str = TEMPLATE, schema: dict[str, Any] | None = None) -> Path:
    (tmp_path / "user_config_template.yaml.j2").write_text(template)
    if schema is not None:
        (tmp_path / "user_config_schema.json").write_text(json.dumps(schema))
    return tmp_path


def render(directory: Path, values: dict[str, Any]) -> tuple[str, EndpointConfig]:
    return render_user_config(directory, values, USER, PARENT)


# ------------------------------------------------------------------ values cannot inject YAML

NASTY = [
    "x\nmulti_user: true",
    "x\n  - y\nbroker_url: http://evil",
    "{a: b}",
    "[1, 2]",
    "*alias",
    "&anchor x",
    "!!python/object/apply:os.system ['id']",
    "!!binary aGVsbG8=",
    "'single' \"double\" \\back",
    "# not a comment",
    "---\n...\n%YAML 1.1",
    "tab\there, cr\rthere",
    "\x00\x07\x1b\x7f\x85\u2028\u2029\ufeff\ufffe",
    "caf\u00e9 \u65e5\u672c \U0001f600",
    "\ud800 lone surrogate",
    "{{ 7*7 }}",
    "{% raw %}",
    "",
    "null",
    "true",
    "0x10",
]


@pytest.mark.parametrize("value", NASTY)
def test_every_string_reads_back_as_itself(value: str) -> None:
    text = f"key: {yaml_value(value)}\nnested: {yaml_value({'k': [value, {value: value}]})}\n"
    assert text.isascii() and text.count("\n") == 2
    assert yaml.safe_load(text) == {"key": value, "nested": {"k": [value, {value: value}]}}


@pytest.mark.parametrize("value", [0, -7, 10**30, 1.5, 1e20, -2.5e-9, float("inf"), True, False, None,
                                   [], {}, [1, "a", None], {"a": {"b": [True]}}])
def test_other_json_values_read_back_as_themselves(value: Any) -> None:
    assert yaml.safe_load(f"key: {yaml_value(value)}") == {"key": value}


# "" is no display name, and pydantic refuses a lone surrogate in a str field: both fail safely
@pytest.mark.parametrize("value", [s for s in NASTY if s and "\ud800" not in s])
def test_a_rendered_value_is_data_never_structure(tmp_path: Path, value: str) -> None:
    text, config = render(site(tmp_path), {"account": value})
    assert config.display_name == value
    assert config.multi_user is False and config.broker_url is None
    assert shlex.split(config.endpoint_setup or "") == ["echo", value]
    assert set(yaml.safe_load(text)) == {"display_name", "endpoint_setup", "engine"}


def test_a_value_that_looks_like_jinja_is_written_literally(tmp_path: Path) -> None:
    _, config = render(site(tmp_path), {"account": "{{ 7*7 }}{{ ''.__class__ }}"})
    assert config.display_name == "{{ 7*7 }}{{ ''.__class__ }}"


def test_values_inside_a_quoted_string_fail_with_a_hint(tmp_path: Path) -> None:
    directory = site(tmp_path, 'display_name: "user {{ account }}"\n')
    with pytest.raises(UserConfigError, match=r"(?s)rendered invalid YAML.*\{\{ \"text \" ~ value \}\}"):
        render(directory, {"account": "abc"})
    directory = site(tmp_path, 'display_name: {{ "user " ~ account }}\n' + ENGINE)
    assert render(directory, {"account": "abc"})[1].display_name == "user abc"


def test_shell_escape() -> None:
    assert shell_escape("a b; rm -rf ~") == "'a b; rm -rf ~'"
    assert shell_escape(["x", "$HOME", 3]) == "x '$HOME' 3"
    with pytest.raises(TypeError, match="shell_escape takes"):
        shell_escape({"a": 1})


# ------------------------------------------------------------------ the sandbox


@pytest.mark.parametrize("expression", [
    "{{ ''.__class__.__mro__ }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__ }}",
    "{{ lipsum.__globals__['os'] }}",
    "{{ self._TemplateReference__context }}",
    "{{ account.__class__ }}",
    "{{ parent_config.update({'multi_user': True}) }}",
    "{{ parent_config.__setitem__('x', 1) }}",
])
def test_sandbox_escapes_in_the_template_are_errors(tmp_path: Path, expression: str) -> None:
    directory = site(tmp_path, f"display_name: x\nendpoint_setup: {expression}\n")
    with pytest.raises(UserConfigError) as e:
        render(directory, {"account": "a"})
    assert "user_config_template.yaml.j2, line 2" in str(e.value)
    assert "unsafe" in str(e.value) or "undefined" in str(e.value)


def test_an_undefined_variable_is_an_error_naming_it(tmp_path: Path) -> None:
    directory = site(tmp_path, "display_name: x\n\nendpoint_setup: {{ partition }}\n")
    with pytest.raises(UserConfigError, match=r"line 3: 'partition' is undefined.*default"):
        render(directory, {})
    directory = site(tmp_path, "endpoint_setup: {{ 'x ' ~ (partition | shell_escape) }}\n")
    with pytest.raises(UserConfigError, match="'partition' is undefined"):
        render(directory, {})


def test_a_template_syntax_error_names_the_line(tmp_path: Path) -> None:
    with pytest.raises(UserConfigError, match=r"user_config_template.yaml.j2, line 2: "):
        render(site(tmp_path, "display_name: x\nengine: {{ account \n"), {"account": "a"})


def test_a_missing_template_says_where_to_write_it(tmp_path: Path) -> None:
    with pytest.raises(UserConfigError, match="user_config_template.yaml.j2 does not exist"):
        render(tmp_path, {})


# ------------------------------------------------------------------ the manager's names and keys


def test_the_manager_gives_the_local_account_and_its_own_config(tmp_path: Path) -> None:
    directory = site(
        tmp_path, "display_name: {{ parent_config.display_name ~ ':' ~ local_user }}\n"
                  "endpoint_setup: {{ 'cd ' ~ local_home ~ ' ' ~ local_uid ~ ' ' ~ local_gid }}\n"
                  + ENGINE)
    _, config = render(directory, {})
    assert config.display_name == "site:alice"
    assert config.endpoint_setup == "cd /home/alice 1234 1234"


def test_the_broker_refuses_the_same_reserved_names() -> None:
    """What the manager reserves, the SDK and the broker refuse at submission."""
    assert set(RESERVED_NAMES) == set(RESERVED_USER_CONFIG_NAMES)


@pytest.mark.parametrize("name", sorted(RESERVED_NAMES))
def test_a_user_value_with_a_reserved_name_is_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(UserConfigError) as e:
        render(site(tmp_path), {"account": "a", name: "root"})
    assert f"user_endpoint_config.{name}: '{name}' is a reserved name" in str(e.value)


@pytest.mark.parametrize("key", FIXED_KEYS)
def test_a_template_may_not_set_what_the_manager_sets(tmp_path: Path, key: str) -> None:
    value = {"broker_url": "http://127.0.0.1:1", "multi_user": "true"}.get(key, "1")
    with pytest.raises(UserConfigError, match=f"sets {key}, which the multi-user endpoint's manager sets"):
        render(site(tmp_path, TEMPLATE + f"{key}: {value}\n"), {"account": "a"})


@pytest.mark.parametrize("key", sorted(set(MANAGER_KEYS) - set(FIXED_KEYS)))
def test_a_template_may_not_set_the_managers_own_keys(tmp_path: Path, key: str) -> None:
    value = {"pam": "{enable: false}", "public": "true", "force_mu_allow_same_user": "true"}.get(
        key, "'1'")
    with pytest.raises(UserConfigError, match=f"sets {key}, which apply to the multi-user "
                                              "endpoint's manager only"):
        render(site(tmp_path, TEMPLATE + f"{key}: {value}\n"), {"account": "a"})


def test_a_template_without_an_engine_is_refused_with_every_other_problem(tmp_path: Path) -> None:
    """Without an engine a config is a manager's (as in Globus Compute); a user endpoint needs
    one, so the template must say which instead of getting a process pool silently."""
    with pytest.raises(UserConfigError) as e:
        render(site(tmp_path, "display_nme: {{ account }}\n"), {"account": "a"})
    message = str(e.value)
    assert "engine: missing" in message and "`engine: {type: ProcessPoolEngine}`" in message
    assert "display_nme: unknown key" in message


def test_the_template_and_schema_are_read_where_the_managers_config_says(tmp_path: Path) -> None:
    elsewhere = tmp_path / "site-files"
    elsewhere.mkdir()
    (elsewhere / "uep.yaml.j2").write_text(TEMPLATE.replace("{{ account }}", '{{ "x-" ~ account }}'))
    (elsewhere / "uep.schema.json").write_text(json.dumps(SCHEMA))
    directory = tmp_path / "manager"
    directory.mkdir()
    (directory / "user_config_template.yaml.j2").write_text("not: {{ used")
    parent = EndpointConfig(user_config_template_path=str(elsewhere / "uep.yaml.j2"),
                            user_config_schema_path="../site-files/uep.schema.json")
    _, config = render_user_config(directory, {"account": "abc"}, USER, parent)
    assert config.display_name == "x-abc"
    with pytest.raises(UserConfigError, match="'account' is a required property"):
        render_user_config(directory, {}, USER, parent)  # the schema over there applies
    assert load_user_config_schema(directory, parent) == SCHEMA
    gone = EndpointConfig(user_config_template_path="nowhere.j2",
                          user_config_schema_path="nowhere.json")
    with pytest.raises(EndpointConfigError, match=r"user_config_schema_path: .*nowhere.json does "
                                                  "not exist"):
        load_user_config_schema(directory, gone)
    with pytest.raises(UserConfigError, match=r"user_config_template_path: .*nowhere.j2 does not "
                                              "exist"):
        render_user_config(directory, {}, USER, gone.model_copy(update={
            "user_config_schema_path": None}))


@pytest.mark.parametrize(("template", "says"), [
    ("[1, 2]\n", "must render a mapping"),
    ("display_nme: x\n", "display_nme: unknown key"),
    ("engine:\n  type: NoSuchEngine\n", "NoSuchEngine"),
    ("engine:\n  type: ProcessPoolEngine\n  max_workers: {{ max_workers }}\n", "max_workers"),
    ("x: !!python/object/apply:os.system ['true']\n", "rendered invalid YAML"),
])
def test_an_invalid_rendered_config_is_refused(tmp_path: Path, template: str, says: str) -> None:
    with pytest.raises(UserConfigError, match="user_config_template.yaml.j2") as e:
        render(site(tmp_path, template), {"max_workers": "many"})
    assert says in str(e.value)


# ------------------------------------------------------------------ the schema

SCHEMA = {
    "type": "object",
    "properties": {
        "account": {"type": "string", "pattern": "^[a-z0-9]+$"},
        "max_workers": {"type": "integer", "minimum": 1},
        "tags": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["account"],
    "additionalProperties": False,
}


@pytest.mark.parametrize(("values", "message"), [
    ({"account": "abc", "max_workers": 0},
     "user_endpoint_config.max_workers: 0 is less than the minimum of 1"),
    ({"account": "abc", "tags": ["a", 2]}, "user_endpoint_config.tags[1]: 2 is not of type 'string'"),
    ({}, "user_endpoint_config: 'account' is a required property"),
    ({"account": "abc", "acount": "x"}, "Additional properties are not allowed ('acount' was unexpected)"),
    ({"account": "a\nmulti_user: true"},
     "user_endpoint_config.account: 'a\\nmulti_user: true' does not match"),
])
def test_values_that_break_the_schema_get_its_own_message(
        tmp_path: Path, values: dict[str, Any], message: str) -> None:
    directory = site(tmp_path, schema=SCHEMA)
    with pytest.raises(UserConfigError) as e:
        render(directory, values)
    assert message in str(e.value)
    with pytest.raises(UserConfigError):
        check_user_config(load_user_config_schema(directory), values)


def test_values_that_pass_the_schema_render(tmp_path: Path) -> None:
    _, config = render(site(tmp_path, schema=SCHEMA), {"account": "abc", "max_workers": 3})
    assert config.engine["max_workers"] == 3


def test_no_schema_file_means_no_schema_but_still_no_reserved_names(tmp_path: Path) -> None:
    assert load_user_config_schema(tmp_path) is None
    check_user_config(None, {"anything": [1, 2]})
    with pytest.raises(UserConfigError, match="reserved"):
        check_user_config(None, {"local_uid": 0})
    with pytest.raises(UserConfigError, match="must be a mapping"):
        check_user_config(None, ["a"])  # type: ignore[arg-type]
    with pytest.raises(UserConfigError, match="names must be strings"):
        check_user_config(None, {1: "a"})  # type: ignore[dict-item]


@pytest.mark.parametrize(("text", "says"), [
    ("{", "not valid JSON"),
    ("true", "must be a JSON object"),
    ('{"type": "nonsense"}', "not a valid JSON Schema"),
    ('{"properties": {"n": {"minimum": "one"}}}', "not a valid JSON Schema"),
])
def test_an_invalid_schema_file_is_an_error_naming_it(tmp_path: Path, text: str, says: str) -> None:
    (tmp_path / "user_config_schema.json").write_text(text)
    with pytest.raises(EndpointConfigError) as e:
        load_user_config_schema(tmp_path)
    assert str(tmp_path / "user_config_schema.json") in str(e.value) and says in str(e.value)


def test_the_schema_s_own_draft_is_used(tmp_path: Path) -> None:
    """``exclusiveMinimum: true`` is draft 4's form: valid there, an error under 2020-12."""
    draft4 = {"$schema": "http://json-schema.org/draft-04/schema#",
              "properties": {"n": {"minimum": 1, "exclusiveMinimum": True}}}
    (tmp_path / "user_config_schema.json").write_text(json.dumps(draft4))
    schema = load_user_config_schema(tmp_path)
    with pytest.raises(UserConfigError, match="less than or equal to the minimum of 1"):
        check_user_config(schema, {"n": 1})
    check_user_config(schema, {"n": 2})
    (tmp_path / "user_config_schema.json").write_text(json.dumps({**draft4, "$schema": None} | {
        "$schema": "https://json-schema.org/draft/2020-12/schema"}))
    with pytest.raises(EndpointConfigError, match="not a valid JSON Schema"):
        load_user_config_schema(tmp_path)


def test_a_globus_compute_template_s_gc_variables_render(tmp_path: Path) -> None:
    """A Globus Compute template reads the account through ``_GC.mapped_identity`` (or its
    older top-level name) and the manager's config through ``_GC.parent_config``: it renders
    unchanged, with the same facts as farcall's own names."""
    root = LocalUser("root", 0, 0, "/root", "/bin/sh")
    directory = site(tmp_path, """\
display_name: {{ _GC.mapped_identity.local.uname ~ "@" ~ _GC.parent_config.display_name }}
endpoint_setup: {{ "cd " ~ mapped_identity.local.dir ~ " && id -u " ~ _GC.mapped_identity.local.uid }}
engine:
  type: ProcessPoolEngine
  max_workers: {{ _GC.mapped_identity.local.groups | length }}
  worker_env:
    WHO: {{ _GC.mapped_identity.globus.id }}
    SHELL_OF_USER: {{ _GC.mapped_identity.local.shell }}
    RUNTIME: {{ _GC.user_runtime.python_version | default("unknown") }}
""")
    _, config = render_user_config(directory, {}, root, PARENT, identity="user-7")
    assert config.display_name == "root@site"
    assert config.endpoint_setup == "cd /root && id -u 0"
    assert config.engine["max_workers"] >= 1  # root's groups, from the password database
    assert config.engine["worker_env"] == {"WHO": "user-7", "SHELL_OF_USER": "/bin/sh",
                                           "RUNTIME": "unknown"}
