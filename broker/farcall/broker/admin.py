"""What ``farcall-broker users`` and ``tokens`` do: user and token management on the broker's Redis
(what disabling a user does is :mod:`.access`).

Each command opens the store, does one thing and prints the outcome; a token is
printed once, on the last line, so scripts can take it with ``tail -1``.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from farcall.broker import access, auth
from farcall.broker.records import UserRecord
from farcall.broker.settings import Settings
from farcall.broker.store.base import Store


class CommandFailed(Exception):
    """The command could not do what was asked; the message says why and what to do."""


def run(settings: Settings, command: Callable[..., Awaitable[None]], *args: Any) -> int:
    """Run ``command(store, *args)`` on the broker's Redis; the process exit status."""
    if not settings.redis_url:
        print("this command needs the broker's Redis: pass --redis-url or set FARCALL_REDIS_URL "
              "(an embedded broker prints its demo user's token at start)", file=sys.stderr)
        return 2
    from farcall.broker.store.redis import RedisStore

    async def go() -> None:
        store = RedisStore(settings.redis_url or "", settings.redis_prefix, settings.result_ttl)
        try:
            await command(store, *args)
        finally:
            await store.close()

    try:
        asyncio.run(go())
    except (CommandFailed, ValueError) as e:
        print(str(e), file=sys.stderr)
        return 1
    except Exception as e:  # noqa: BLE001 - a CLI reports, it does not dump a traceback
        print(f"failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    return 0


async def create_user(store: Store, name: str) -> None:
    user_id, token = await auth.create_user(store.users, name)
    print(f"created user {name!r} ({user_id}); its token (shown once):")
    print(token)


async def new_token(store: Store, name: str, token_name: str = "", max_tokens: int = 0) -> None:
    user = await _user(store, name)
    try:
        record, token = await auth.add_token(store.users, user.user_id, token_name, max_tokens)
    except auth.TooManyTokens:
        raise CommandFailed(
            f"user {name!r} holds {max_tokens} tokens, the most this broker allows "
            "(FARCALL_MAX_TOKENS); revoke one first (farcall-broker tokens list --user "
            f"{name}, then tokens revoke TOKEN_ID), or raise the limit") from None
    print(f"new token {record.token_id} for user {name!r} (shown once):")
    print(token)


async def list_users(store: Store) -> None:
    users = await store.users.all()
    counts = {u.user_id: 0 for u in users}
    for t in await store.users.list_tokens():
        if t.user_id in counts:
            counts[t.user_id] += 1
    print(f"{'NAME':20}  {'USER ID':36}  {'DISABLED':8}  TOKENS")
    for u in users:
        print(f"{u.name:20}  {u.user_id:36}  {'yes' if u.disabled else 'no':8}  {counts[u.user_id]}")


async def disable_user(store: Store, name: str) -> None:
    user = await _user(store, name)
    done = await access.disable(store, user)
    print(f"disabled user {name!r}: {done.tokens} tokens and the credentials of {done.endpoints} "
          f"endpoints refused on every broker, {done.timers} timers paused, {done.tasks} tasks "
          "cancelled")


async def enable_user(store: Store, name: str) -> None:
    user = await _user(store, name)
    await store.users.set_disabled(user.user_id, False)
    print(f"enabled user {name!r}: their tokens and endpoint credentials work again; their "
          "timers stay paused until they resume them, and their agents must be started again")


async def list_tokens(store: Store, username: str | None = None) -> None:
    user_id = (await _user(store, username)).user_id if username else None
    tokens = await store.users.list_tokens(user_id)
    names = {u.user_id: u.name for u in (await store.users.get_many(
        list({t.user_id for t in tokens}))).values()}
    print(f"{'TOKEN ID':36}  {'USER':20}  {'CREATED (UTC)':19}  NAME")
    for t in tokens:
        created = datetime.fromtimestamp(t.created_at, UTC).strftime("%Y-%m-%d %H:%M:%S")
        print(f"{t.token_id:36}  {names.get(t.user_id, t.user_id):20}  {created:19}  {t.name}")


async def revoke_token(store: Store, token_id: str) -> None:
    record = await auth.revoke_token(store, token_id)
    if record is None:
        raise CommandFailed(f"no token {token_id}; list them with 'farcall-broker tokens list'")
    print(f"revoked token {token_id}; every broker refuses it from now on")


async def _user(store: Store, name: str) -> UserRecord:
    user = await store.users.by_name(name)
    if user is None:
        raise CommandFailed(f"no user named {name!r}; create one with "
                            f"'farcall-broker users create {name}'")
    return user
