"""Fixtures every test tree may use."""

from __future__ import annotations

import pytest

from harness.services import ensure_services


@pytest.fixture(scope="session")
def services() -> None:
    """Redis and RabbitMQ answer on loopback: started (or installed and started) when they do not.

    A test that needs them fails when they cannot be brought up; it never skips.
    """
    ensure_services()
