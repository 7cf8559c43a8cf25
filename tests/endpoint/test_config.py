"""config.yaml: the template loads back; bad files fail naming the file and the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from farcall.endpoint.config import configure, endpoint_dir, load_config, parse_config
from farcall.endpoint.errors import EndpointConfigError
from farcall.endpoint.problems import ConfigProblems


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("FARCALL_HOME", str(tmp_path))
    for var in ("FARCALL_BROKER_URL", "FARCALL_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path


@pytest.mark.parametrize("engine", ["ProcessPoolEngine", "ThreadPoolEngine"])
def test_configure_writes_a_commented_template_that_loads(home: Path, engine: str) -> None:
    path = configure("laptop", engine, "http://127.0.0.1:8000", 3)
    assert path == home / "endpoints" / "laptop" / "config.yaml"
    text = path.read_text()
    assert text.count("\n#") >= 5
    config = load_config("laptop")
    assert config.engine["type"] == engine and config.engine["max_workers"] == 3
    assert config.resolved_broker_url() == "http://127.0.0.1:8000"
    assert config.heartbeat_period == 10 and config.display_name == "laptop"
    assert config.data_retry_seconds == 120 and "\ndata_retry_seconds: 120\n" in text


def test_configure_refuses_to_overwrite_and_unknown_engines(home: Path) -> None:
    configure("a")
    with pytest.raises(EndpointConfigError, match="already configured.*--force"):
        configure("a")
    configure("a", force=True)
    with pytest.raises(EndpointConfigError, match="valid choices: ThreadPoolEngine"):
        configure("b", engine="Nope")
    with pytest.raises(EndpointConfigError, match="invalid endpoint name"):
        configure("../evil")


def test_data_retry_seconds_is_read_from_the_file() -> None:
    assert parse_config("data_retry_seconds: 600").data_retry_seconds == 600
    assert parse_config("data_retry_seconds: 0").data_retry_seconds == 0  # one attempt


def test_broker_url_falls_back_to_env_then_operator_config(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = parse_config("engine: {type: ThreadPoolEngine}")
    with pytest.raises(EndpointConfigError, match="FARCALL_BROKER_URL"):
        config.resolved_broker_url()
    (home / "config").write_text('broker_url = "http://from-file:1"\ntoken = "fcu_x"\n')
    assert config.resolved_broker_url() == "http://from-file:1"
    monkeypatch.setenv("FARCALL_BROKER_URL", "http://from-env:2/")
    assert config.resolved_broker_url() == "http://from-env:2"


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ("heartbeat_perod: 5", r"heartbeat_perod: unknown key \(valid keys: .*heartbeat_period"),
        ("heartbeat_period: soon", r"heartbeat_period: Input should be a valid number"),
        ("heartbeat_period: 0", r"heartbeat_period: Input should be greater than 0"),
        ("engine: {type: Nope}", r"engine.type: unknown engine 'Nope'; valid choices"),
        ("engine: {type: ProcessPoolEngine, max_workers: -1}", r"engine.max_workers"),
        ("engine: {type: ThreadPoolEngine, provider: {}}", r"engine.provider: unknown key"),
        ("broker_url: ftp://x", r"broker_url: must start with http"),
        ("data_retry_seconds: -5", r"data_retry_seconds: Input should be greater than or equal to 0"),
        ("data_retry_seconds: .inf", r"data_retry_seconds: Input should be a finite number"),
        ("data_retry_seconds: soon", r"data_retry_seconds: Input should be a valid number"),
        ("data_retry_seconds: yes", r"data_retry_seconds: must be a number of seconds"),
        ("- just\n- a list", r"expected a mapping"),
        ("key: [unclosed", r"not valid YAML"),
    ],
)
def test_bad_config_names_file_and_key(home: Path, text: str, pattern: str) -> None:
    directory = endpoint_dir("ep")
    directory.mkdir(parents=True)
    (directory / "config.yaml").write_text(text)
    with pytest.raises(EndpointConfigError, match=pattern) as caught:
        load_config("ep")
    assert str(directory / "config.yaml") in str(caught.value)


def test_missing_config_says_how_to_create_it() -> None:
    with pytest.raises(EndpointConfigError, match="farcall-endpoint configure ghost"):
        load_config("ghost")


# ------------------------------------------------------------------ Globus Compute's keys


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ("idle_heartbeats_soft: -1", r"idle_heartbeats_soft: Input should be greater than or equal to 0"),
        ("idle_heartbeats_soft: 2.5", r"idle_heartbeats_soft: Input should be a valid integer"),
        ("idle_heartbeats_hard: yes", r"idle_heartbeats_hard: must be a number .*not true or false"),
        ("heartbeat_threshold: 0", r"heartbeat_threshold: Input should be greater than 0"),
        ("heartbeat_threshold: true", r"heartbeat_threshold: must be a number"),
        ("debug: 3", r"debug: Input should be a valid boolean"),
        ("stdout: [a]", r"stdout: Input should be a valid string"),
    ],
)
def test_bad_globus_compute_values_name_the_key(text: str, pattern: str) -> None:
    with pytest.raises(EndpointConfigError, match=pattern):
        parse_config(text)


def test_every_bad_top_level_key_is_reported_at_once_in_the_files_order() -> None:
    text = """\
display_name: ok
heartbeat_period: -1
amqp_port: 5671
idle_heartbeats_soft: x
heartbeat_perod: 5
engine: {type: Nope}
executors: [{type: HighThroughputExecutor}]
broker_url: ftp://x
heartbeat_threshold: 0
"""
    with pytest.raises(ConfigProblems) as caught:
        parse_config(text, "gc/config.yaml")
    found = caught.value.problems
    assert [p.key or str(p).split(":")[0] for p in found] == [
        "heartbeat_period", "idle_heartbeats_soft", "heartbeat_perod", "engine.type", "executors",
        "broker_url", "heartbeat_threshold"]
    message = str(caught.value)
    assert message.startswith("gc/config.yaml: 7 problems:")
    for part in ("(got -1)", "(got 'x')", "valid keys:", "unknown engine 'Nope'; valid choices",
                 "write one engine section instead", "must start with http", "(got 0)"):
        assert part in message, part
    assert "amqp_port" not in message  # a warning, not a problem


def test_globus_compute_values_load_as_globus_compute_reads_them() -> None:
    config = parse_config("display_name: None\nidle_heartbeats_soft: 3\nheartbeat_threshold: 90\n"
                          "debug: true\nlog_dir: /var/log/ep\nstdout: out.log")
    assert config.display_name is None  # Globus Compute once wrote the text None for "unset"
    assert (config.idle_heartbeats_soft, config.idle_heartbeats_hard) == (3, 5760)
    assert (config.heartbeat_threshold, config.debug) == (90, True)
    assert (config.log_dir, config.stdout, config.stderr) == ("/var/log/ep", "out.log", None)
    assert config.warnings == []
    default = parse_config("")
    assert (default.heartbeat_threshold, default.idle_heartbeats_soft, default.debug) == (None, 0, False)


def test_idle_heartbeats_hard_without_soft_warns_it_does_nothing() -> None:
    [warning] = parse_config("idle_heartbeats_hard: 100").warnings
    assert warning.key == "idle_heartbeats_hard"
    assert "no effect while idle_heartbeats_soft is 0" in warning.message
    assert "set idle_heartbeats_soft" in warning.message
    assert parse_config("idle_heartbeats_hard: 100\nidle_heartbeats_soft: 1").warnings == []


def test_configure_sets_the_display_name(home: Path) -> None:
    configure("lab", display_name="Lab server: GPUs")
    assert load_config("lab").display_name == "Lab server: GPUs"
    assert load_config("lab").warnings == []
