"""Globus Compute's top-level config.yaml keys: each works, or loads with one warning saying what
farcall does instead, or (``executors``) is refused saying what to write; docs carry the table."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from farcall.endpoint.compat import TOP_LEVEL_KEYS, markdown_table
from farcall.endpoint.config import EndpointConfig, parse_config
from farcall.endpoint.problems import ConfigProblems

ROOT = Path(__file__).resolve().parents[2]

# The keys of Globus Compute's BaseConfig and UserEndpointConfig (endpoint/config/config.py),
# and the ones older releases took (detach_endpoint until 2026, executors before engine).
GLOBUS_TOP_LEVEL = {
    "high_assurance", "display_name", "allowed_functions", "authentication_policy",
    "subscription_id", "amqp_port", "heartbeat_period", "environment", "local_compute_services",
    "debug", "admins", "engine", "heartbeat_threshold", "idle_heartbeats_soft",
    "idle_heartbeats_hard", "endpoint_setup", "endpoint_teardown", "log_dir", "stdout", "stderr",
    "detach_endpoint", "executors", "multi_user",
}
UUID = "2b8e0d4a-3f51-4c8e-9d2a-6a1f0b7c9e11"
# A value each warned key might hold in a real Globus Compute config.yaml.
SET = {"amqp_port": 443, "environment": "production", "local_compute_services": True,
       "authentication_policy": UUID, "subscription_id": UUID, "admins": [UUID],
       "high_assurance": True, "detach_endpoint": True}


def by_fate(fate: str) -> list[str]:
    return [k.key for k in TOP_LEVEL_KEYS if k.fate == fate]


def test_the_table_covers_every_globus_compute_top_level_key_once() -> None:
    keys = [k.key for k in TOP_LEVEL_KEYS]
    assert len(keys) == len(set(keys))
    assert set(keys) == GLOBUS_TOP_LEVEL
    assert set(SET) == set(by_fate("warns"))


def test_every_key_that_works_is_a_farcall_setting_of_the_same_name() -> None:
    for key in by_fate("works"):
        assert key in EndpointConfig.model_fields, key


@pytest.mark.parametrize("key", sorted(SET))
def test_a_warned_key_loads_with_exactly_one_warning_saying_what_farcall_does(key: str) -> None:
    config = parse_config(yaml.safe_dump({key: SET[key], "engine": {"type": "ThreadPoolEngine"}}))
    assert [w.key for w in config.warnings] == [key]
    message = config.warnings[0].message
    assert message.startswith("ignored: ") and len(message) > 60
    note = next(k for k in TOP_LEVEL_KEYS if k.key == key)
    for setting in note.farcall.replace("`", "").split(", "):
        if setting != "-":
            assert setting.split(" ")[0].split(".")[-1] in message, (key, setting, message)


@pytest.mark.parametrize("value", [None, False, [], ""])
def test_a_warned_key_that_asks_nothing_loads_without_a_warning(value: object) -> None:
    text = yaml.safe_dump({"amqp_port": value, "high_assurance": value, "admins": value})
    assert parse_config(text).warnings == []


def test_executors_is_refused_saying_to_write_an_engine_section() -> None:
    with pytest.raises(ConfigProblems) as caught:
        parse_config("executors:\n  - type: HighThroughputExecutor\n")
    [problem] = caught.value.problems
    assert problem.key == "executors" and "write one engine section instead" in problem.message
    assert "HighThroughputExecutor" in problem.message  # what was found


def test_a_globus_compute_config_with_every_key_loads() -> None:
    """Every top-level key a task-processing Globus Compute endpoint may hold, at once."""
    text = f"""\
display_name: Debug queue at site ABC
high_assurance: false
allowed_functions: ["{UUID}"]
authentication_policy: {UUID}
subscription_id: {UUID}
amqp_port: 443
heartbeat_period: 30
environment: production
local_compute_services: false
debug: true
admins: ["{UUID}"]
heartbeat_threshold: 120
idle_heartbeats_soft: 10
idle_heartbeats_hard: 5760
endpoint_setup: module load python
endpoint_teardown: echo bye
log_dir: logs
stdout: ./endpoint.log
stderr: ./endpoint.err
engine:
  type: ThreadPoolEngine
  max_workers: 2
"""
    config = parse_config(text)
    assert (config.heartbeat_threshold, config.idle_heartbeats_soft, config.idle_heartbeats_hard,
            config.debug, config.log_dir, config.stderr) == (120, 10, 5760, True, "logs",
                                                              "./endpoint.err")
    assert config.allowed_functions == [UUID]
    # In the file's order, one per key that asks for something farcall does not do.
    assert [w.key for w in config.warnings] == [
        "authentication_policy", "subscription_id", "amqp_port", "environment", "admins"]


def test_docs_carry_the_table() -> None:
    page = (ROOT / "docs" / "migrating.md").read_text()
    assert markdown_table() in page, "run: python -c 'from farcall.endpoint.compat import " \
                                     "markdown_table; print(markdown_table())' and paste it"
