"""``farcall-broker``: run the broker (``serve``), manage users and their tokens.

``users create NAME`` and ``users token NAME`` print a token (last line); ``users list``,
``users disable NAME`` and ``users enable NAME`` manage users; ``tokens list [--user NAME]`` and
``tokens revoke TOKEN_ID`` manage tokens. The
management commands talk to the broker's Redis directly (:mod:`.admin`).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from farcall.broker.settings import Settings, SettingsError

log = logging.getLogger(__name__)

_REDIS_HELP = "Redis URL (default: $FARCALL_REDIS_URL)"


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
    serve.add_argument("--ssl-certfile", metavar="PEM",
                       help="serve HTTPS and WSS with this certificate (chain) file")
    serve.add_argument("--ssl-keyfile", metavar="PEM", help="the certificate's private key")
    serve.add_argument(
        "--forwarded-allow-ips", metavar="IPS",
        help="comma-separated addresses of reverse proxies whose X-Forwarded-For/-Proto headers "
        "are trusted, so limits see the client's address (default: none; name a proxy on this "
        "host too, e.g. 127.0.0.1)")
    serve.add_argument("--log-level", default="info")

    users = sub.add_parser("users", help="manage users").add_subparsers(
        dest="users_command", required=True
    )
    create = users.add_parser("create", help="create a user and print its token (last line)")
    create.add_argument("name")
    create.add_argument("--redis-url", help=_REDIS_HELP)
    token = users.add_parser("token", help="give an existing user a new token; prints it (last line)")
    token.add_argument("name")
    token.add_argument("--token-name", default="", help="a name to tell the token apart by")
    token.add_argument("--redis-url", help=_REDIS_HELP)
    listed = users.add_parser("list", help="every user: name, id, whether disabled, token count")
    listed.add_argument("--redis-url", help=_REDIS_HELP)
    disable = users.add_parser(
        "disable", help="refuse all the user's tokens and endpoint credentials on every broker "
        "at once, pause their timers and cancel their waiting or running tasks")
    disable.add_argument("name")
    disable.add_argument("--redis-url", help=_REDIS_HELP)
    enable = users.add_parser(
        "enable", help="accept a disabled user's tokens and endpoint credentials again (their "
        "timers stay paused until they resume them)")
    enable.add_argument("name")
    enable.add_argument("--redis-url", help=_REDIS_HELP)

    tokens = sub.add_parser("tokens", help="list and revoke users' tokens").add_subparsers(
        dest="tokens_command", required=True
    )
    listing = tokens.add_parser("list", help="every token (id, user, name, created), or one user's")
    listing.add_argument("--user", metavar="NAME", help="only this user's tokens")
    listing.add_argument("--redis-url", help=_REDIS_HELP)
    revoke = tokens.add_parser(
        "revoke", help="revoke a token: refused within a second, its open streams closed")
    revoke.add_argument("token_id")
    revoke.add_argument("--redis-url", help=_REDIS_HELP)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = Settings.from_env()
    except SettingsError as e:
        print(f"farcall-broker: {e}", file=sys.stderr)
        return 2
    if args.redis_url:
        settings = settings.model_copy(update={"redis_url": args.redis_url})
    if args.command == "serve":
        if args.amqp_url:
            settings = settings.model_copy(update={"amqp_url": args.amqp_url})
        if (args.ssl_certfile is None) != (args.ssl_keyfile is None):
            print("farcall-broker serve: give both --ssl-certfile and --ssl-keyfile, or neither",
                  file=sys.stderr)
            return 2
        return serve(settings, args.host, args.port, args.log_level,
                     ssl_certfile=args.ssl_certfile, ssl_keyfile=args.ssl_keyfile,
                     forwarded_allow_ips=args.forwarded_allow_ips)
    from farcall.broker import admin

    if args.command == "users":
        command = args.users_command
        if command == "create":
            return admin.run(settings, admin.create_user, args.name)
        if command == "list":
            return admin.run(settings, admin.list_users)
        if command in ("disable", "enable"):
            return admin.run(settings, admin.disable_user if command == "disable"
                             else admin.enable_user, args.name)
        return admin.run(settings, admin.new_token, args.name, args.token_name,
                         settings.max_tokens)
    if args.tokens_command == "list":
        return admin.run(settings, admin.list_tokens, args.user)
    return admin.run(settings, admin.revoke_token, args.token_id)


def serve(settings: Settings, host: str, port: int, log_level: str = "info", *,
          ssl_certfile: str | None = None, ssl_keyfile: str | None = None,
          forwarded_allow_ips: str | None = None) -> int:
    import uvicorn

    from farcall.broker import auth
    from farcall.broker.app import create_app
    from farcall.broker.asgi import WebSocketProtocol, redact_access_log
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
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        ws=WebSocketProtocol,
        ws_max_size=ws_max_size(settings),
        timeout_graceful_shutdown=10,
        ssl_certfile=ssl_certfile,
        ssl_keyfile=ssl_keyfile,
        # No proxy is trusted unless named: uvicorn's own default trusts 127.0.0.1 (and
        # $FORWARDED_ALLOW_IPS), which would let anything on this host pick its address.
        proxy_headers=bool(forwarded_allow_ips),
        forwarded_allow_ips=forwarded_allow_ips or "",
    )
    redact_access_log()  # after Config: it configures uvicorn's loggers
    uvicorn.Server(config).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
