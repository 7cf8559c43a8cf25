"""The owner a manager run by an ordinary account serves: asked of the broker once, then kept."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from farcall import Client
from farcall.broker.embedded import EmbeddedBroker
from farcall.endpoint.multiuser.errors import OwnerUnknown
from farcall.endpoint.multiuser.owner import (
    OWNER_FILE,
    Owner,
    learn_owner,
    load_owner,
    resolve_owner,
    save_owner,
)
from farcall.endpoint.registration import register_endpoint


@pytest.fixture(scope="module")
def broker() -> Iterator[EmbeddedBroker]:
    with EmbeddedBroker() as b:
        yield b


@pytest.fixture
def no_token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FARCALL_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("FARCALL_TOKEN", raising=False)


def test_the_owner_is_kept_for_its_endpoint_only(tmp_path: Path) -> None:
    owner = Owner("ep-1", "user-1", "ada")
    save_owner(tmp_path, owner)
    assert stat.S_IMODE((tmp_path / OWNER_FILE).stat().st_mode) == 0o600
    assert load_owner(tmp_path, "ep-1") == owner
    assert load_owner(tmp_path, "ep-2") is None  # registered again: asked again
    (tmp_path / OWNER_FILE).write_text("{not json")
    assert load_owner(tmp_path, "ep-1") is None


def test_the_broker_says_who_owns_the_manager_and_no_one_else_passes(
        broker: EmbeddedBroker, tmp_path: Path, no_token: None,
        monkeypatch: pytest.MonkeyPatch) -> None:
    ada, bob = broker.create_user("owner-ada"), broker.create_user("shared-bob")
    endpoint_id = register_endpoint(broker.url, ada, "site").endpoint_id
    with Client(broker_url=broker.url, token=ada) as client:
        with pytest.warns(UserWarning, match="single-user endpoint"):  # no manager connected yet
            client.share_endpoint(endpoint_id, "shared-bob")
        ada_id = client.whoami()["identity_id"]
    assert learn_owner(broker.url, endpoint_id, ada, "site") == Owner(endpoint_id, ada_id,
                                                                      "owner-ada")
    with pytest.raises(OwnerUnknown, match=r"user 'shared-bob''s, who does not own endpoint .* "
                                           r"\(shared\): start it with its owner's token"):
        learn_owner(broker.url, endpoint_id, bob, "site")

    monkeypatch.setenv("FARCALL_TOKEN", ada)
    assert resolve_owner(tmp_path, broker.url, endpoint_id, "site").username == "owner-ada"
    monkeypatch.delenv("FARCALL_TOKEN")
    assert resolve_owner(tmp_path, broker.url, endpoint_id, "site").user_id == ada_id  # kept


def test_without_a_token_or_a_kept_owner_the_start_says_what_to_run(
        tmp_path: Path, no_token: None) -> None:
    with pytest.raises(OwnerUnknown) as raised:
        resolve_owner(tmp_path, "http://127.0.0.1:9", "ep-1", "site")
    message = str(raised.value)
    assert "FARCALL_TOKEN=... farcall-endpoint start site" in message
    assert str(tmp_path / OWNER_FILE) in message and "as root with an identity mapping" in message
    assert not os.path.exists(tmp_path / OWNER_FILE)
