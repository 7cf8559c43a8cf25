"""Where the SDK finds the broker URL and token (argument, environment, then $FARCALL_HOME/config)
and its retry budget (argument, then ``FARCALL_RETRY_SECONDS``, then 30 s)."""

from __future__ import annotations

from pathlib import Path

import pytest

from farcall import Client, config
from farcall.errors import ConfigurationError, InvalidSetting


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("FARCALL_HOME", str(tmp_path))
    monkeypatch.delenv("FARCALL_BROKER_URL", raising=False)
    monkeypatch.delenv("FARCALL_TOKEN", raising=False)
    monkeypatch.delenv("FARCALL_RETRY_SECONDS", raising=False)
    return tmp_path


@pytest.mark.filterwarnings("ignore::farcall.tls.InsecureBrokerWarning")  # http://arg:3 on purpose
def test_argument_then_environment_then_file(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (home / "config").write_text('broker_url = "http://file:1/"\ntoken = "fcu_file"\n')
    assert config.broker_url() == "http://file:1"
    assert config.token() == "fcu_file"
    monkeypatch.setenv("FARCALL_BROKER_URL", "https://env:2")
    monkeypatch.setenv("FARCALL_TOKEN", "fcu_env")
    assert (config.broker_url(), config.token()) == ("https://env:2", "fcu_env")
    c = Client(broker_url="http://arg:3", token="fcu_arg")
    assert (c.broker_url, c.token) == ("http://arg:3", "fcu_arg")
    assert c.websocket_url("/x") == "ws://arg:3/v1/x"
    c.close()


def test_missing_settings_say_what_to_set(home: Path) -> None:
    with pytest.raises(ConfigurationError, match="FARCALL_BROKER_URL"):
        Client()
    with pytest.raises(ConfigurationError, match="FARCALL_TOKEN"):
        config.token()
    with pytest.raises(ConfigurationError, match="http://"):
        config.broker_url("broker.example.org")


def test_bad_config_file_names_the_file(home: Path) -> None:
    (home / "config").write_text("broker_url = [unclosed")
    with pytest.raises(ConfigurationError, match="not valid TOML"):
        config.broker_url()


def test_retry_seconds_argument_then_environment_then_30(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with Client(broker_url="https://b", token="fcu_t") as c:
        assert c.retry_seconds == config.RETRY_SECONDS == 30
    monkeypatch.setenv("FARCALL_RETRY_SECONDS", " 900 ")  # a long campaign rides out a long outage
    with Client(broker_url="https://b", token="fcu_t") as c:
        assert c.retry_seconds == 900
    with Client(broker_url="https://b", token="fcu_t", retry_seconds=0) as c:
        assert c.retry_seconds == 0  # the argument wins, 0 included
    monkeypatch.setenv("FARCALL_RETRY_SECONDS", "")
    assert config.retry_seconds() == 30


@pytest.mark.parametrize("raw", ["soon", "-1", "inf", "nan", "1e400"])
def test_a_bad_farcall_retry_seconds_says_which_variable_and_what_it_takes(
    home: Path, monkeypatch: pytest.MonkeyPatch, raw: str
) -> None:
    monkeypatch.setenv("FARCALL_RETRY_SECONDS", raw)
    with pytest.raises(InvalidSetting) as caught:
        Client(broker_url="https://b", token="fcu_t")
    message = str(caught.value)
    assert f"FARCALL_RETRY_SECONDS={raw!r}" in message and "number of seconds, 0 or more" in message
    assert isinstance(caught.value, ValueError) and isinstance(caught.value, ConfigurationError)


@pytest.mark.parametrize("bad", [-0.5, float("inf"), True, "30"])
def test_a_bad_retry_seconds_argument_is_refused(home: Path, bad: object) -> None:
    with pytest.raises(InvalidSetting, match=r"retry_seconds=.* number of seconds, 0 or more"):
        Client(broker_url="https://b", token="fcu_t", retry_seconds=bad)  # type: ignore[arg-type]
