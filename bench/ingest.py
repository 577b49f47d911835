"""Ingest cost per event, no subscribers: the shim beside Go Centrifuge.

Each system gets the same POST /api/v1/broadcast bodies (arrays of 200 legacy hub
messages rotating over 1,000 task channels, about 200 bytes each), sent by a few
concurrent HTTP clients for a bounded number of requests; the server's own CPU time
(from /proc) per accepted event, and accepted events per second of wall time.

    .venv/bin/python bench/ingest.py [--requests 100] [--systems centrifuge,channel]
    .venv/bin/python bench/ingest.py --profile   # also py-spy the shim (own-time top)

127.0.0.1 only; every request has a timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.run import summarize_profile  # noqa: E402
from bench.servers import make_keys, running  # noqa: E402

BATCH = 200
CHANNELS = 1000
CONCURRENCY = 4
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    return total


def bodies(requests: int) -> list[bytes]:
    out = []
    seq = 0
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


async def drive(url: str, api_key: str, payloads: list[bytes]) -> int:
    accepted = 0
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    for body in payloads:
        queue.put_nowait(body)

    async def worker(http: httpx.AsyncClient) -> None:
        nonlocal accepted
        while not queue.empty():
            body = queue.get_nowait()
            response = await http.post(
                url,
                content=body,
                headers={"X-API-Key": api_key, "Content-Type": "application/json"},
            )
            response.raise_for_status()
            accepted += int(response.json()["accepted"])

    async with httpx.AsyncClient(timeout=60) as http:
        await asyncio.gather(*(worker(http) for _ in range(CONCURRENCY)))
    return accepted


def measure(system: str, requests: int, profile: Path | None) -> dict[str, Any]:
    keys = make_keys(1)
    with (
        tempfile.TemporaryDirectory(prefix="dex-ingest-") as tmp,
        running(system, keys, Path(tmp)) as target,
    ):
        warm = bodies(5)
        asyncio.run(drive(target.pub_url, target.api_key, warm))
        payloads = bodies(requests)
        spy = None
        if profile is not None:
            spy = subprocess.Popen(
                [
                    str(Path(sys.executable).with_name("py-spy")),
                    "record",
                    "--nonblocking",
                    "--format",
                    "raw",
                    "--rate",
                    "200",
                    "--output",
                    str(profile),
                    "--pid",
                    str(target.server_pids[0]),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            time.sleep(1)
        cpu0 = cpu_seconds(target.server_pids)
        start = time.monotonic()
        accepted = asyncio.run(drive(target.pub_url, target.api_key, payloads))
        wall = time.monotonic() - start
        cpu = cpu_seconds(target.server_pids) - cpu0
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            spy.wait(timeout=30)
    return {
        "system": system,
        "events": accepted,
        "wall_s": wall,
        "server_cpu_s": cpu,
        "cpu_us_per_event": 1e6 * cpu / accepted,
        "events_per_cpu_s": accepted / cpu if cpu else float("nan"),
        "events_per_s": accepted / wall,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=100, help=f"POSTs of {BATCH} events")
    parser.add_argument("--systems", default="centrifuge,channel")
    parser.add_argument("--profile", action="store_true", help="py-spy the shim's server")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    results = []
    for system in args.systems.split(","):
        raw = Path(tempfile.gettempdir()) / f"dex-ingest-{system}.txt"
        profile = raw if args.profile and system != "centrifuge" else None
        results.append(measure(system, args.requests, profile))
        if profile is not None and raw.exists():
            print(summarize_profile(raw.read_text(), top=20), file=sys.stderr)
    anchor = next((r for r in results if r["system"] == "centrifuge"), None)
    print("| system | events | server CPU us/event | events per CPU-second | events/s wall |")
    print("|---|---:|---:|---:|---:|")
    for r in results:
        ratio = ""
        if anchor is not None and r is not anchor:
            ratio = f" ({r['events_per_cpu_s'] / anchor['events_per_cpu_s']:.2f}x)"
        print(
            f"| {r['system']} | {r['events']:,} | {r['cpu_us_per_event']:.1f} | "
            f"{r['events_per_cpu_s']:,.0f}{ratio} | {r['events_per_s']:,.0f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
