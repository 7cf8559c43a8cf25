"""``farcall-broker``: run the broker (``serve``) and manage users (``users create``)."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import sys

from farcall.broker.settings import Settings

log = logging.getLogger(__name__)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="farcall-broker", description="farcall broker")
    sub = p.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the broker (embedded store and queue without URLs)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument(
        "--redis-url", help="Redis URL (default: $FARCALL_REDIS_URL; none = in-process)"
    )
    serve.add_argument(
        "--amqp-url", help="RabbitMQ URL (default: $FARCALL_AMQP_URL; none = in-process)"
    )
    serve.add_argument("--log-level", default="info")

    users = sub.add_parser("users", help="manage users").add_subparsers(
        dest="users_command", required=True
    )
    create = users.add_parser("create", help="create a user and print its token (last line)")
    create.add_argument("name")
    create.add_argument("--redis-url", help="Redis URL (default: $FARCALL_REDIS_URL)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    settings = Settings.from_env()
    if args.redis_url:
        settings = dataclasses.replace(settings, redis_url=args.redis_url)
    if args.command == "serve":
        if args.amqp_url:
            settings = dataclasses.replace(settings, amqp_url=args.amqp_url)
        return serve(settings, args.host, args.port, args.log_level)
    return create_user(settings, args.name)


def serve(settings: Settings, host: str, port: int, log_level: str = "info") -> int:
    import uvicorn

    from farcall.broker import auth
    from farcall.broker.app import create_app
    from farcall.broker.embedded import ws_max_size
    from farcall.broker.store.memory import MemoryStore

    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    store = None
    if settings.redis_url is None:
        store = MemoryStore()
        _, token = asyncio.run(auth.create_user(store.users, "demo"))
        log.warning("embedded store: nothing survives a restart; created user 'demo'")
        print(f"demo user token: {token}", flush=True)
    if (settings.redis_url is None) != (settings.amqp_url is None):
        log.warning("only one of Redis/RabbitMQ is configured; the other runs in-process")
    app = create_app(settings, store=store)
    uvicorn.run(
        app,
        host=host,
        port=port,
        log_level=log_level,
        ws_max_size=ws_max_size(settings),
        timeout_graceful_shutdown=10,
    )
    return 0


def create_user(settings: Settings, name: str) -> int:
    from farcall.broker import auth
    from farcall.broker.store.redis import RedisStore

    if not settings.redis_url:
        print(
            "farcall-broker users create needs --redis-url or FARCALL_REDIS_URL "
            "(an embedded broker prints its demo user's token at start)",
            file=sys.stderr,
        )
        return 2

    async def run() -> tuple[str, str]:
        store = RedisStore(settings.redis_url or "", settings.redis_prefix, settings.result_ttl)
        try:
            return await auth.create_user(store.users, name)
        finally:
            await store.close()

    try:
        user_id, token = asyncio.run(run())
    except Exception as e:  # noqa: BLE001 - a CLI reports, it does not dump a traceback
        print(f"could not create user {name!r}: {e}", file=sys.stderr)
        return 1
    print(f"created user {name!r} ({user_id}); its token (shown once):")
    print(token)
    return 0


if __name__ == "__main__":
    sys.exit(main())
