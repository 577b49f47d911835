"""Ingest cost per event in process: the ASGI app (Quart, parse, route, publish,
response) fed POST /api/v1/broadcast bodies directly, without hypercorn or sockets.

The same bodies as bench/ingest.py (arrays of 200 over 1,000 channels, no
subscribers). Prints CPU microseconds per event; steady enough on a busy machine to
compare two trees run alternately, and small enough to count instructions:

    python bench/ingest_inproc.py [--requests 200] [--rounds 5]
    valgrind --tool=callgrind --callgrind-out-file=/dev/null \
        python bench/ingest_inproc.py --requests 20 --rounds 1

It imports `shim` from the interpreter's environment (not from this tree), so
another checkout's venv python can run it against that checkout's code.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import secrets
import sys
import tempfile
import time
from typing import Any

BATCH = 200
CHANNELS = 1000


def bodies(requests: int, start: int = 0) -> list[bytes]:
    """As bench/ingest.py's, with sequence numbers from `start`."""
    out = []
    seq = start
    for _ in range(requests):
        items = []
        for _ in range(BATCH):
            items.append(
                {
                    "type": "task.updated",
                    "payload": {"task_id": f"b{seq % CHANNELS}", "seq": seq, "pad": "x" * 96},
                }
            )
            seq += 1
        out.append(json.dumps(items, separators=(",", ":")).encode())
    return out


async def post(app: Any, api_key: bytes, body: bytes) -> tuple[int, bytes]:
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/api/v1/broadcast",
        "raw_path": b"/api/v1/broadcast",
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"host", b"127.0.0.1"),
            (b"x-api-key", api_key),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
        "extensions": {},
    }
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    status = 0
    chunks: list[bytes] = []

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    await app(scope, receive, send)
    return status, b"".join(chunks)


async def run(requests: int, rounds: int) -> list[float]:
    from shim.app.asgi import create_app
    from shim.app.runtime import Runtime
    from shim.core.config import load_settings

    api_key = secrets.token_urlsafe(24)
    env = {
        "DEX_SHIM_API_KEY": api_key,
        "DEX_SHIM_TOKEN_ALGORITHM": "HS256",
        "DEX_SHIM_TOKEN_KEY": secrets.token_urlsafe(32),
        "DEX_SHIM_ADMIN_API_KEY": secrets.token_urlsafe(24),
        "DEX_SHIM_LOG_LEVEL": "warning",
        "DEX_SHIM_DEV_DIR": tempfile.mkdtemp(prefix="dex-inproc-"),
    }
    settings = load_settings(None, env=env)
    runtime = Runtime(settings)
    app = create_app(runtime)
    await runtime.start()
    # As shim.app.server.run does before serving.
    gc.collect()
    gc.freeze()
    gc.set_threshold(5_000, 10, 100)
    key = api_key.encode()
    per_event = []
    try:
        for status, _ in [await post(app, key, b) for b in bodies(5)]:
            assert status == 200, status
        seq = 5 * BATCH
        for _ in range(rounds):
            payloads = bodies(requests, seq)
            seq += requests * BATCH
            cpu0 = time.process_time()
            for body in payloads:
                status, response = await post(app, key, body)
                assert status == 200, (status, response[:200])
            per_event.append(1e6 * (time.process_time() - cpu0) / (requests * BATCH))
    finally:
        await runtime.close()
    return per_event


def _tree() -> str:
    import shim

    return os.path.basename(os.path.dirname(os.path.dirname(shim.__file__)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=200, help=f"POSTs of {BATCH} events")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    try:
        import uvloop
    except ImportError:
        result = asyncio.run(run(args.requests, args.rounds))
    else:
        result = uvloop.run(run(args.requests, args.rounds))
    print(
        f"{_tree()} us/event per round: "
        + " ".join(f"{r:.2f}" for r in result)
        + f" min {min(result):.2f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
