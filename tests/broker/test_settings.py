"""Settings come from FARCALL_* variables with the documented defaults; bad ones are named."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from farcall.broker.settings import Settings, SettingsError
from farcall.serialize import INLINE_BYTES

EVERY_VARIABLE = {
    "FARCALL_REDIS_URL": ("redis://r:6379/1", "redis_url", "redis://r:6379/1"),
    "FARCALL_AMQP_URL": ("amqp://q/", "amqp_url", "amqp://q/"),
    "FARCALL_REDIS_PREFIX": ("x:", "redis_prefix", "x:"),
    "FARCALL_QUEUE_PREFIX": ("x.", "queue_prefix", "x."),
    "FARCALL_MAX_PAYLOAD_BYTES": ("1000", "max_payload_bytes", 1000),
    "FARCALL_RESULT_TTL": ("60", "result_ttl", 60),
    "FARCALL_ENDPOINT_TIMEOUT": ("2.5", "endpoint_timeout", 2.5),
    "FARCALL_MAX_ENDPOINT_LOSSES": ("5", "max_endpoint_losses", 5),
    "FARCALL_RATE_LIMIT": ("0.5", "rate_limit", 0.5),
    "FARCALL_RATE_BURST": ("7", "rate_burst", 7),
    "FARCALL_AUTH_FAILURE_RATE": ("0", "auth_failure_rate", 0.0),
    "FARCALL_AUTH_FAILURE_BURST": ("3", "auth_failure_burst", 3),
    "FARCALL_MAX_ENDPOINTS": ("4", "max_endpoints", 4),
    "FARCALL_MAX_FUNCTIONS": ("6", "max_functions", 6),
    "FARCALL_MAX_OPEN_TASKS": ("8", "max_open_tasks", 8),
    "FARCALL_MAX_TIMERS": ("9", "max_timers", 9),
    "FARCALL_MAX_TOKENS": ("11", "max_tokens", 11),
    "FARCALL_MAX_TASK_BYTES": (str(8 << 20), "max_task_bytes", 8 << 20),
    "FARCALL_BLOB_DIR": ("/srv/b", "blob_dir", "/srv/b"),
    "FARCALL_REQUEUE_AFTER": ("2.5", "requeue_after", 2.5),
    "FARCALL_BODY_TIMEOUT": ("1.5", "body_timeout", 1.5),
    "FARCALL_MAX_UPLOADS_PER_USER": ("3", "max_uploads_per_user", 3),
    "FARCALL_MAX_BLOB_BYTES_PER_USER": (str(5 << 20), "max_blob_bytes_per_user", 5 << 20),
    "FARCALL_USER_ENDPOINT_START_SECONDS": ("0.5", "user_endpoint_start_seconds", 0.5),
}


def test_defaults_are_embedded() -> None:
    s = Settings.from_env({})
    assert s == Settings()
    assert s.embedded and s.redis_url is None and s.amqp_url is None and s.blob_dir is None
    assert (s.redis_prefix, s.queue_prefix) == ("farcall:", "farcall.")
    assert s.max_payload_bytes == 10 * 1024 * 1024 and s.max_task_bytes == 1 << 30
    assert s.result_ttl == 7 * 24 * 3600 and s.endpoint_timeout == 30.0


def test_every_variable_is_read() -> None:
    assert {field for _, field, _ in EVERY_VARIABLE.values()} == set(Settings.model_fields), (
        "a new setting needs a line in EVERY_VARIABLE (and in docs/deploy.md)")
    s = Settings.from_env({name: raw for name, (raw, _, _) in EVERY_VARIABLE.items()})
    assert not s.embedded
    assert {field: getattr(s, field) for _, field, _ in EVERY_VARIABLE.values()} == {
        field: value for _, field, value in EVERY_VARIABLE.values()}


def test_settings_built_by_hand_do_not_read_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FARCALL_RATE_LIMIT", "3")
    monkeypatch.setenv("FARCALL_REDIS_URL", "redis://elsewhere:6379/0")
    assert Settings().rate_limit == 500.0 and Settings().embedded
    assert Settings(redis_url="redis://r/0").rate_limit == 500.0
    assert Settings.from_env().rate_limit == 3.0  # the process's environment, by default
    assert Settings.from_env({}).rate_limit == 500.0


def test_an_empty_variable_counts_as_unset() -> None:
    s = Settings.from_env({"FARCALL_REDIS_URL": "", "FARCALL_AMQP_URL": "", "FARCALL_BLOB_DIR": "",
                           "FARCALL_RATE_LIMIT": "", "FARCALL_REDIS_PREFIX": ""})
    assert s == Settings() and s.embedded
    assert Settings(redis_url="", blob_dir="").embedded


@pytest.mark.parametrize(("name", "raw", "message"), [
    ("FARCALL_RATE_LIMIT", "abc", "FARCALL_RATE_LIMIT='abc' is not a number; unset it or give one"),
    ("FARCALL_RESULT_TTL", "a week", "FARCALL_RESULT_TTL='a week' is not a whole number"),
    ("FARCALL_MAX_OPEN_TASKS", "1.5", "FARCALL_MAX_OPEN_TASKS='1.5' is not a whole number"),
    ("FARCALL_ENDPOINT_TIMEOUT", "nan", "FARCALL_ENDPOINT_TIMEOUT='nan' is not a finite number"),
    ("FARCALL_AUTH_FAILURE_RATE", "inf", "FARCALL_AUTH_FAILURE_RATE='inf' is not a finite number"),
])
def test_a_bad_number_names_the_variable(name: str, raw: str, message: str) -> None:
    with pytest.raises(SettingsError) as caught:
        Settings.from_env({name: raw})
    assert str(caught.value).startswith(message)
    assert isinstance(caught.value, ValueError) and "validation error" not in str(caught.value)


@pytest.mark.parametrize(("name", "raw", "message"), [
    ("FARCALL_RATE_LIMIT", "-1", "FARCALL_RATE_LIMIT=-1 is below 0; set it to at least that"),
    ("FARCALL_RATE_BURST", "-1", "FARCALL_RATE_BURST=-1 is below 0"),
    ("FARCALL_AUTH_FAILURE_BURST", "-2", "FARCALL_AUTH_FAILURE_BURST=-2 is below 0"),
    ("FARCALL_MAX_ENDPOINTS", "-1", "FARCALL_MAX_ENDPOINTS=-1 is below 0"),
    ("FARCALL_MAX_FUNCTIONS", "-1", "FARCALL_MAX_FUNCTIONS=-1 is below 0"),
    ("FARCALL_MAX_TIMERS", "-1", "FARCALL_MAX_TIMERS=-1 is below 0"),
    ("FARCALL_MAX_PAYLOAD_BYTES", "0", "FARCALL_MAX_PAYLOAD_BYTES=0 is below 1"),
    ("FARCALL_RESULT_TTL", "0", "FARCALL_RESULT_TTL=0 is below 1"),
    ("FARCALL_MAX_ENDPOINT_LOSSES", "0", "FARCALL_MAX_ENDPOINT_LOSSES=0 is below 1"),
    ("FARCALL_ENDPOINT_TIMEOUT", "0", "FARCALL_ENDPOINT_TIMEOUT=0 must be more than 0"),
    ("FARCALL_MAX_TASK_BYTES", "1000", f"FARCALL_MAX_TASK_BYTES=1000 is below {INLINE_BYTES}, the size "
     "up to which arguments travel inside the task; set it to at least that"),
])
def test_a_value_out_of_range_is_refused(name: str, raw: str, message: str) -> None:
    with pytest.raises(SettingsError) as caught:
        Settings.from_env({name: raw})
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value)


def test_every_bad_variable_is_named_at_once() -> None:
    with pytest.raises(SettingsError) as caught:
        Settings.from_env({"FARCALL_RATE_LIMIT": "fast", "FARCALL_MAX_TIMERS": "-5"})
    assert str(caught.value).splitlines() == [
        "FARCALL_RATE_LIMIT='fast' is not a number; unset it or give one",
        "FARCALL_MAX_TIMERS=-5 is below 0; set it to at least that"]


def test_settings_built_by_hand_are_checked_too() -> None:
    with pytest.raises(ValidationError, match="max_task_bytes"):
        Settings(max_task_bytes=1000)
    with pytest.raises(ValidationError, match="rate_limt"):
        Settings(rate_limt=5)  # type: ignore[call-arg]  # mypy refuses a misspelt setting too
    assert Settings(max_task_bytes=INLINE_BYTES).max_task_bytes == INLINE_BYTES


def test_the_deploy_guide_names_every_variable_with_its_default() -> None:
    guide = (Path(__file__).parents[2] / "docs" / "deploy.md").read_text()
    for name in EVERY_VARIABLE:
        assert name in guide, f"docs/deploy.md does not mention {name}"
    defaults = Settings()
    for name, default in re.findall(r"^\| `(FARCALL_\w+)` \| `([^`]*)` \|", guide, re.MULTILINE):
        field = EVERY_VARIABLE[name][1]
        assert str(getattr(defaults, field)).removesuffix(".0") == default, (
            f"docs/deploy.md gives {name} the default {default}")
