"""Errors of the multi-user manager's files and look-ups, each saying what to fix."""

from __future__ import annotations

from farcall.endpoint.errors import EndpointConfigError, EndpointError


class NoLocalAccount(EndpointError, LookupError):
    """A user's identity maps to a name that has no Unix account on this host.

    The message names the account and says what the administrator must do.
    """


class UserConfigError(EndpointConfigError):
    """A user endpoint's configuration could not be made from the user's values: a value breaks
    the schema or uses a reserved name, or the template fails or renders an invalid config.

    The message says which value (or which line of the template) and why.
    """


class OwnerUnknown(EndpointError):
    """A manager run by an ordinary account serves only its owner, and cannot learn who that
    is: no token to ask the broker with, the token is not the owner's, or the broker did not
    answer. The message says which, and what to run."""
