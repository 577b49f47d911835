"""`dex-shim`: serve; mint development tokens; check the configuration; publish a
legacy hub message or change the cutover flag on a running node."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from dataclasses import replace
from urllib.parse import urlsplit

import httpx
import orjson

from adapters.auth.jwt import mint_token
from shim.app.logs import configure_logging
from shim.app.runtime import dev_api_key, dev_signing_key
from shim.core.config import ConfigError, Settings, describe_settings, load_settings

# Settings whose values are secrets: checkconfig says whether they are set, never what.
SECRET_SETTINGS = frozenset({"api_key", "admin_api_key", "token_key"})
SHOWN_REDACTED = "set (redacted)"


def _redis_passwords(redis_url: str) -> list[str]:
    found = []
    for url in redis_url.split(","):
        try:
            password = urlsplit(url.strip()).password
        except ValueError:
            continue
        if password:
            found.append(password)
    return found


def log_secrets(settings: Settings) -> list[str]:
    """What `serve` tells the log redactor to remove before the runtime exists (the
    runtime then adds any development key it made, see Runtime.secrets)."""
    return [
        settings.api_key,
        settings.admin_api_key,
        settings.token_key,
        *_redis_passwords(settings.redis_url),
    ]


def _serve(args: argparse.Namespace) -> int:
    from shim.app.server import run
    from shim.app.workers import (
        Supervisor,
        WorkersError,
        announce_ready,
        check_workers,
        worker_command,
        worker_socket,
    )

    overrides = {}
    if args.host:
        overrides["host"] = args.host
    if args.port is not None:
        overrides["port"] = args.port
    settings = load_settings(args.config, **overrides)
    if args.worker_index is not None and settings.node_name:
        # Workers are nodes of their own: a configured name gets the worker's number.
        settings = replace(settings, node_name=f"{settings.node_name}-w{args.worker_index}")
    redactor = configure_logging(
        level=settings.log_level,
        json=settings.log_format == "json",
        secrets=log_secrets(settings),
    )
    try:
        check_workers(settings, args.workers)
    except WorkersError as exc:
        print(f"dex-shim serve: {exc}", file=sys.stderr)
        return 2

    def ready(port: int) -> None:
        workers = f"; {args.workers} workers" if args.workers > 1 else ""
        print(
            f"dex-shim listening on http://{settings.host}:{port} "
            f"(engine {settings.engine}{workers}; "
            f"Centrifuge at ws://{settings.host}:{port}/connection/websocket)",
            flush=True,
        )

    if args.worker_fd is not None:
        ready_fd = args.worker_ready_fd
        run(
            settings,
            on_ready=(lambda _port: announce_ready(ready_fd)) if ready_fd is not None else None,
            redactor=redactor,
            sock=worker_socket(args.worker_fd),
        )
        return 0
    if args.workers > 1:
        supervisor = Supervisor(
            settings,
            args.workers,
            worker_command(args.config, args.host, args.port),
            on_ready=ready,
        )
        try:
            return supervisor.run()
        except WorkersError as exc:
            print(f"dex-shim serve: {exc}", file=sys.stderr)
            return 1
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


def _node_url(args: argparse.Namespace) -> str:
    if args.url:
        return str(args.url).rstrip("/")
    settings = load_settings(args.config)
    return f"http://{settings.host}:{settings.port}"


def _key(configured: str, dev_name: str) -> str:
    """A configured key, or the development one `serve` made in this directory."""
    return configured or dev_api_key(dev_name)


def _publish(args: argparse.Namespace) -> int:
    """Send one legacy hub message, exactly as the backend would."""
    settings = load_settings(args.config)
    message: dict[str, object] = {"type": args.type, "payload": orjson.loads(args.payload)}
    if args.task_id:
        message["task_id"] = args.task_id
    response = httpx.post(
        f"{_node_url(args)}/api/v1/broadcast",
        content=orjson.dumps(message),
        headers={"X-API-Key": _key(settings.api_key, "api-key")},
        timeout=10,
    )
    print(response.text)
    return 0 if response.status_code == 200 else 1


def _cutover(args: argparse.Namespace) -> int:
    """Show the cutover flag of a running node, or change it."""
    settings = load_settings(args.config)
    headers = {"X-Admin-Key": _key(settings.admin_api_key, "admin-key")}
    changes: dict[str, object] = {}
    if args.mode:
        changes["mode"] = args.mode
    if args.percent is not None:
        changes["channels_percent"] = args.percent
    if args.allow is not None:
        changes["allow_users"] = [u for u in args.allow.split(",") if u]
    if args.deny is not None:
        changes["deny_users"] = [u for u in args.deny.split(",") if u]
    if args.drain_seconds is not None:
        changes["drain_seconds"] = args.drain_seconds
    url = f"{_node_url(args)}/api/v1/admin/cutover"
    if changes:
        response = httpx.post(url, content=orjson.dumps(changes), headers=headers, timeout=10)
    else:
        response = httpx.get(url, headers=headers, timeout=10)
    print(response.text)
    return 0 if response.status_code == 200 else 1


def shown_value(name: str, value: object) -> str:
    """A setting as checkconfig prints it: secrets only as set or not, and a Redis
    URL without its password (the output ends up in tickets and chat)."""
    if name in SECRET_SETTINGS:
        return SHOWN_REDACTED if value else repr(value)
    if name == "redis_url" and isinstance(value, str):
        for password in _redis_passwords(value):
            value = value.replace(f":{password}@", ":[redacted]@")
    return repr(value)


def _checkconfig(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    for name, default, doc in describe_settings():
        print(
            f"{name} = {shown_value(name, getattr(settings, name))}    # default {default}; {doc}"
        )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dex-shim", description=__doc__)
    parser.add_argument("--config", help="TOML settings file (also DEX_SHIM_CONFIG)")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the service")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument(
        "--workers",
        type=int,
        default=1,
        help="processes sharing the port (SO_REUSEPORT), one per core; needs the Redis engine",
    )
    # Set by the --workers supervisor for the processes it starts.
    serve.add_argument("--worker-fd", type=int, help=argparse.SUPPRESS)
    serve.add_argument("--worker-ready-fd", type=int, help=argparse.SUPPRESS)
    serve.add_argument("--worker-index", type=int, help=argparse.SUPPRESS)
    serve.set_defaults(func=_serve)

    token = commands.add_parser("token", help="mint a development token")
    token.add_argument("--user", default="dev-user")
    token.add_argument("--ttl", type=int, default=3600, help="seconds; 0 = no exp claim")
    token.add_argument("--channels", nargs="*", help="server-side channels claim")
    token.set_defaults(func=_token)

    check = commands.add_parser("checkconfig", help="print the effective settings and their docs")
    check.set_defaults(func=_checkconfig)

    publish = commands.add_parser("publish", help="send one legacy hub message to a running node")
    publish.add_argument("type", help="event type, e.g. task.updated")
    publish.add_argument("payload", help="payload as JSON text")
    publish.add_argument("--task-id", help="the legacy top-level task_id")
    publish.add_argument("--url", help="node base URL (default: from settings)")
    publish.set_defaults(func=_publish)

    cutover = commands.add_parser("cutover", help="show or change a running node's cutover flag")
    cutover.add_argument("--mode", choices=["legacy", "dual", "channels"])
    cutover.add_argument("--percent", type=float, help="share of users on channels (0-100)")
    cutover.add_argument("--allow", help="comma-separated users always on channels ('' clears)")
    cutover.add_argument("--deny", help="comma-separated users always on legacy ('' clears)")
    cutover.add_argument("--drain-seconds", type=float)
    cutover.add_argument("--url", help="node base URL (default: from settings)")
    cutover.set_defaults(func=_cutover)

    args = parser.parse_args(argv)
    if args.command != "serve":
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    except httpx.HTTPError as exc:
        print(f"cannot reach the node: {exc}", file=sys.stderr)
        return 2
    except orjson.JSONDecodeError:
        print("payload is not valid JSON", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
