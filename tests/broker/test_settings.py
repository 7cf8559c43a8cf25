"""Settings come from FARCALL_* variables with the documented defaults."""

from __future__ import annotations

import pytest

from farcall.broker.settings import Settings


def test_defaults_are_embedded() -> None:
    s = Settings.from_env({})
    assert s.embedded and s.redis_url is None and s.amqp_url is None
    assert (s.redis_prefix, s.queue_prefix) == ("farcall:", "farcall.")
    assert s.max_payload_bytes == 10 * 1024 * 1024
    assert s.result_ttl == 7 * 24 * 3600 and s.endpoint_timeout == 30.0


def test_environment_overrides() -> None:
    s = Settings.from_env(
        {
            "FARCALL_REDIS_URL": "redis://r:6379/1",
            "FARCALL_AMQP_URL": "amqp://q/",
            "FARCALL_REDIS_PREFIX": "x:",
            "FARCALL_QUEUE_PREFIX": "x.",
            "FARCALL_MAX_PAYLOAD_BYTES": "1000",
            "FARCALL_RESULT_TTL": "60",
            "FARCALL_ENDPOINT_TIMEOUT": "2.5",
            "FARCALL_MAX_ENDPOINT_LOSSES": "5",
        }
    )
    assert not s.embedded
    assert (s.redis_url, s.amqp_url, s.redis_prefix, s.queue_prefix) == (
        "redis://r:6379/1",
        "amqp://q/",
        "x:",
        "x.",
    )
    assert (s.max_payload_bytes, s.result_ttl, s.endpoint_timeout) == (1000, 60, 2.5)
    assert s.max_endpoint_losses == 5


def test_a_bad_number_names_the_variable() -> None:
    with pytest.raises(ValueError, match="FARCALL_RESULT_TTL"):
        Settings.from_env({"FARCALL_RESULT_TTL": "a week"})


def test_data_plane_settings_and_a_task_limit_below_the_inline_size_is_refused() -> None:
    from farcall.serialize import INLINE_BYTES

    s = Settings.from_env({"FARCALL_MAX_TASK_BYTES": str(8 << 20), "FARCALL_BLOB_DIR": "/srv/b"})
    assert (s.max_task_bytes, s.blob_dir) == (8 << 20, "/srv/b")
    assert Settings.from_env({}).max_task_bytes == 1 << 30
    with pytest.raises(ValueError, match="FARCALL_MAX_TASK_BYTES=1000 is below"):
        Settings.from_env({"FARCALL_MAX_TASK_BYTES": "1000"})
    assert Settings(max_task_bytes=INLINE_BYTES).max_task_bytes == INLINE_BYTES
