"""The endpoint channel sessions live on this replica, by endpoint id, and what the rest of the
broker may ask of one.

``submission`` sends a batch straight to a session with credit to spare, and
``endpoint_control`` ends a session a newer one replaced; both see a session only through
``LiveSession``, so they are tested with a fake one and never import the channel itself.
"""

from __future__ import annotations

from typing import Protocol


class LiveSession(Protocol):
    """An endpoint's channel session, as submission and endpoint control see it."""

    @property
    def session_id(self) -> str:
        """The id the store knows the session by (its ``connect_session``)."""
        ...

    def can_take(self, n: int) -> bool:
        """Whether ``n`` new tasks would go out at once (credit to spare, nothing waiting)."""
        ...

    async def send_direct(self, tasks: list[tuple[str, str, str]], functions: dict[str, str]) -> None:
        """Send tasks the caller recorded in flight for this session: ``(task id, function id,
        TaskMessage JSON)``, with ``functions`` their bodies by id."""
        ...

    async def replaced(self) -> None:
        """End the session because a newer one of its endpoint took over; returns once ended
        (or after a bounded wait)."""
        ...


class Sessions:
    """Endpoint id -> its live channel session on this replica (at most one per endpoint)."""

    def __init__(self) -> None:
        self._live: dict[str, LiveSession] = {}

    def get(self, endpoint_id: str) -> LiveSession | None:
        return self._live.get(endpoint_id)

    def take_over(self, endpoint_id: str, session: LiveSession) -> LiveSession | None:
        """Make ``session`` the endpoint's live one here; the one it displaced, if any."""
        previous = self._live.get(endpoint_id)
        self._live[endpoint_id] = session
        return previous

    def remove(self, endpoint_id: str, session: LiveSession) -> None:
        """Forget ``session`` as it ends; a newer session of the endpoint stays."""
        if self._live.get(endpoint_id) is session:
            del self._live[endpoint_id]

    def __len__(self) -> int:
        return len(self._live)
