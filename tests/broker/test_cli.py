"""``farcall-broker``: user and token commands on Redis and embedded ``serve``, as real processes."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from farcall.broker import auth
from farcall.broker.store.redis import RedisStore
from harness.procs import free_port, wait_until
from harness.services import REDIS_URL, drop_redis_prefix


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FARCALL_")}
    env.update(extra)
    return env


@pytest.mark.usefixtures("services")
def test_users_create_prints_the_token_last(real_prefix: str) -> None:
    prefix = f"{real_prefix}:"
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "farcall.broker",
            "users",
            "create",
            "alice",
            "--redis-url",
            REDIS_URL,
        ],
        env=_env(FARCALL_REDIS_PREFIX=prefix),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    token = out.strip().splitlines()[-1]
    assert token.startswith("fcu_")

    async def check() -> None:
        store = RedisStore(REDIS_URL, prefix)
        try:
            principal = await auth.authenticate(store.users, token)
            assert principal is not None and principal.kind == "user"
            assert not [k async for k in store.db.r.scan_iter(match="*" + token + "*")]
        finally:
            await store.close()
            drop_redis_prefix(prefix)

    asyncio.run(check())


@pytest.mark.parametrize("command", [["users", "create", "x"], ["users", "token", "x"],
                                     ["tokens", "list"], ["tokens", "revoke", "some-id"]])
def test_user_and_token_commands_need_redis(command: list[str]) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "farcall.broker", *command],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and "--redis-url" in r.stderr


def test_users_create_refuses_a_bad_name() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "farcall.broker", "users", "create", "no spaces", "--redis-url",
         REDIS_URL], env=_env(), capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "cannot be a user name" in r.stderr


def test_serve_needs_both_certificate_and_key(tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "farcall.broker", "serve", "--ssl-certfile", str(tmp_path / "c")],
        env=_env(), capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--ssl-keyfile" in r.stderr


def test_a_bad_setting_stops_serve_with_one_line_naming_the_variable() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "farcall.broker", "serve", "--port", str(free_port())],
        env=_env(FARCALL_RATE_LIMIT="abc"), capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr == "farcall-broker: FARCALL_RATE_LIMIT='abc' is not a number; unset it or give one\n"


def test_serve_embedded_prints_a_demo_token(tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "broker.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "farcall.broker", "serve", "--port", str(port)],
            env=_env(PYTHONUNBUFFERED="1"),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until(
            lambda: httpx.get(f"{url}/v1/health", timeout=2).status_code == 200,
            30,
            f"broker health\n{log.read_text()}",
        )
        line = next(x for x in log.read_text().splitlines() if x.startswith("demo user token: "))
        token = line.split(": ", 1)[1]
        r = httpx.get(
            f"{url}/v1/endpoints", headers={"Authorization": f"Bearer {token}"}, timeout=5
        )
        assert r.status_code == 200 and r.json() == {"endpoints": []}
    finally:
        proc.terminate()  # uvicorn shuts down gracefully, then re-raises SIGTERM
        proc.wait(30)
    assert "Application shutdown complete" in log.read_text()
