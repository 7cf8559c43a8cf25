"""config.yaml: the template loads back; bad files fail naming the file and the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from farcall.endpoint.config import configure, endpoint_dir, load_config, parse_config
from farcall.endpoint.errors import EndpointConfigError


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
