"""Control messages between broker replicas on pub/sub."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from farcall.protocol.control import (
    AnyControl,
    CancelTasks,
    CredentialRotated,
    EndpointRemoved,
    SessionReplaced,
    TokenRevocation,
    parse_control,
)


@pytest.mark.parametrize("message", [
    CancelTasks(task_ids=["t1", "t2"]),
    SessionReplaced(session_id="s2"),
    EndpointRemoved(),
    CredentialRotated(old_hash="ab" * 32),
])
def test_each_control_message_reads_back_as_itself(message: AnyControl) -> None:
    assert parse_control(message.model_dump_json()) == message
    assert parse_control(message.model_dump_json().encode()) == message


@pytest.mark.parametrize(("raw", "says"), [
    ('{"type": "reboot"}', "does not match any of the expected tags"),
    ('{"task_ids": ["t1"]}', "Unable to extract tag using discriminator"),
    ('{"type": "cancel"}', "task_ids"),
])
def test_a_control_message_it_cannot_read_is_refused(raw: str, says: str) -> None:
    with pytest.raises(ValidationError, match=says):
        parse_control(raw)


def test_a_token_revocation_is_not_an_endpoint_control_message() -> None:
    revocation = TokenRevocation(token_id="k1", token_hash="ab" * 32)
    assert TokenRevocation.model_validate_json(revocation.model_dump_json()) == revocation
    with pytest.raises(ValidationError):
        parse_control(revocation.model_dump_json())
