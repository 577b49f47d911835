"""`dex-shim`: serve, and mint development tokens."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from adapters.auth.jwt import mint_token
from shim.config import ConfigError, describe_settings, load_settings
from shim.logs import configure_logging
from shim.runtime import dev_signing_key


def _serve(args: argparse.Namespace) -> int:
    from shim.server import run

    overrides = {}
    if args.host:
        overrides["host"] = args.host
    if args.port is not None:
        overrides["port"] = args.port
    settings = load_settings(args.config, **overrides)
    redactor = configure_logging(
        level=settings.log_level,
        json=settings.log_format == "json",
        secrets=[settings.api_key, settings.admin_api_key, settings.token_key],
    )

    def ready(port: int) -> None:
        print(
            f"dex-shim listening on http://{settings.host}:{port} "
            f"(engine {settings.engine}; Centrifuge at ws://{settings.host}:{port}/connection/websocket)",
            flush=True,
        )

    run(settings, on_ready=ready, redactor=redactor)
    return 0


def _token(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    if settings.token_signing_key_file:
        with open(settings.token_signing_key_file) as handle:
            signing_key = handle.read()
    elif settings.token_key or settings.token_key_file:
        print(
            "a verification key is configured but no token_signing_key_file: "
            "cannot mint tokens it would accept",
            file=sys.stderr,
        )
        return 2
    else:
        signing_key, _ = dev_signing_key(settings.token_algorithm)
    extra: dict[str, object] = {}
    if args.channels:
        extra["channels"] = args.channels
    ttl = None if args.ttl <= 0 else args.ttl
    print(
        mint_token(
            signing_key, settings.token_algorithm, user=args.user, ttl_seconds=ttl, extra=extra
        )
    )
    return 0


def _checkconfig(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    for name, default, doc in describe_settings():
        print(f"{name} = {getattr(settings, name)!r}    # default {default}; {doc}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dex-shim", description=__doc__)
    parser.add_argument("--config", help="TOML settings file (also DEX_SHIM_CONFIG)")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the service")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.set_defaults(func=_serve)

    token = commands.add_parser("token", help="mint a development token")
    token.add_argument("--user", default="dev-user")
    token.add_argument("--ttl", type=int, default=3600, help="seconds; 0 = no exp claim")
    token.add_argument("--channels", nargs="*", help="server-side channels claim")
    token.set_defaults(func=_token)

    check = commands.add_parser("checkconfig", help="print the effective settings and their docs")
    check.set_defaults(func=_checkconfig)

    args = parser.parse_args(argv)
    if args.command != "serve":
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
