"""Where the SDK finds the broker URL and token: argument, environment, then $FARCALL_HOME/config."""

from __future__ import annotations

from pathlib import Path

import pytest

from farcall import Client, config
from farcall.errors import ConfigurationError


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("FARCALL_HOME", str(tmp_path))
    monkeypatch.delenv("FARCALL_BROKER_URL", raising=False)
    monkeypatch.delenv("FARCALL_TOKEN", raising=False)
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
