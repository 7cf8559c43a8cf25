"""Control messages between broker replicas, on pub/sub: they reach an endpoint's live channel
session on whichever replica holds it, and every replica's token cache.

An endpoint's control channel carries ``CancelTasks`` (stop these tasks), ``SessionReplaced``
(a newer session of the endpoint took over), ``EndpointRemoved`` (the endpoint was deleted),
``CredentialRotated`` (the endpoint has a new credential: sessions opened with the old one end),
``EndpointRefused`` (its owner was disabled), ``EndpointStopRequested`` (its owner asked it to
stop) and, to a multi-user endpoint's manager,
``UserEndpointWanted`` (tasks wait for one of its user endpoints); the revocations channel carries
``TokenRevocation`` and ``AccessRevoked``. Only the broker sends and reads them, but they
cross process boundaries like every other frame, so they are typed and pinned here too.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, TypeAdapter

from farcall.protocol.common import Message, as_bytes


class CancelTasks(Message):
    """These tasks were cancelled: the session drops the ones still waiting and tells its
    endpoint to stop the others (a ``CancelFrame``)."""

    type: Literal["cancel"] = "cancel"
    task_ids: list[str]


class SessionReplaced(Message):
    """Session ``session_id`` is the endpoint's live one now: any other session of it ends."""

    type: Literal["replaced"] = "replaced"
    session_id: str


class EndpointRemoved(Message):
    """The endpoint was deleted: its session ends (close code 4004)."""

    type: Literal["deleted"] = "deleted"


class CredentialRotated(Message):
    """The endpoint was given a new credential: every session opened with the old one
    (``old_hash``, its SHA-256) ends (close code 4005), so whoever held it is cut off at once."""

    type: Literal["rotated"] = "rotated"
    old_hash: str


class EndpointRefused(Message):
    """The endpoint's credential is refused from now on (its owner was disabled): its session
    ends (close code 4003), and its agent, refused at its next connect, stops."""

    type: Literal["refused"] = "refused"
    reason: str


STOPPED_CLOSE_CODE = 4006
"""The close code of a session whose endpoint's owner asked it to stop: its agent stops (it
does not reconnect to take more tasks)."""


class EndpointStopRequested(Message):
    """The endpoint's owner asked it to stop (``Client.stop_endpoint``): its session ends with
    ``STOPPED_CLOSE_CODE``, and its agent finishes what it runs and exits."""

    type: Literal["stop"] = "stop"


class UserEndpointWanted(Message):
    """Tasks wait for the manager's user endpoint ``user_endpoint_id``, which has no session: the
    manager's session (on whichever replica holds it) sends its agent a ``StartUserEndpoint``
    built from the user endpoint's record. The credential never crosses pub/sub."""

    type: Literal["user_endpoint_wanted"] = "user_endpoint_wanted"
    user_endpoint_id: str


AnyControl = (CancelTasks | SessionReplaced | EndpointRemoved | CredentialRotated | EndpointRefused
              | EndpointStopRequested | UserEndpointWanted)
"""Any message of an endpoint's control channel."""
ControlMessage = Annotated[AnyControl, Field(discriminator="type")]


class _ControlBox(Message):
    message: ControlMessage


def parse_control(raw: str | bytes) -> AnyControl:
    """Parse an endpoint control message (raises ``pydantic.ValidationError``)."""
    return _ControlBox.model_validate_json(b'{"message":' + as_bytes(raw) + b"}").message


class TokenRevocation(Message):
    """A user token was revoked: every replica drops it from its cache (``token_hash``) and closes
    the result streams opened with it (``token_id``)."""

    token_id: str
    token_hash: str


class AccessRevoked(Message):
    """A user lost access to an endpoint or a function (unshared, or they left it): every replica
    drops what it caches of who may use it, so the next submission is checked anew."""

    type: Literal["access"]
    endpoint_id: str = ""
    function_id: str = ""


_REVOCATION: TypeAdapter[TokenRevocation | AccessRevoked] = TypeAdapter(
    Annotated[TokenRevocation | AccessRevoked, Field(union_mode="left_to_right")])


def parse_revocation(raw: str | bytes) -> TokenRevocation | AccessRevoked:
    """Parse a frame of the revocations channel (raises ``pydantic.ValidationError``)."""
    return _REVOCATION.validate_json(raw)
