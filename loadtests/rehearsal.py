"""The cutover rehearsal: simulated users running the client kit follow the flag.

    python -m loadtests.rehearsal                 # 1,000 users, 50 events/s, one node then two, on Redis
    python -m loadtests.rehearsal --short         # the in-suite size (a few dozen users, seconds per step)

Each user is the kit's core (clients/js/dist) in one Node process, as in a browser
tab. Events are ingested continuously (task, project, user and system routes, all
also on `global`), each carrying `payload.seq`, while an admin steps the flag
0 % -> 10 % -> 50 % -> 100 % -> `channels` -> `legacy`; one node is restarted in
the middle. After every step it prints the users on each protocol, the handovers
done, events lost, duplicated and out of order (all must be 0), the handover time
p50/p99 and the peak number of connections a user held. Exit 1 on any failure.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from loadtests.measure_core import percentile
from shim.core.cutover import ClientProtocol, CutoverState
from tests.jsclient import node_binary
from tests.multinode import ClusterKeys, NodeProcess, spawn_node
from tests.redis_server import RedisServer

REPO = Path(__file__).resolve().parent.parent
# Where the simulated users' stderr goes (debug output of the kit), if anywhere.
STDERR = Path(os.environ["REHEARSAL_STDERR"]) if os.environ.get("REHEARSAL_STDERR") else None
USERS_SCRIPT = REPO / "clients" / "js" / "tools" / "rehearsal-users.mjs"

STEPS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("0%", {"channels_percent": 0}),
    ("10%", {"channels_percent": 10}),
    ("50%", {"channels_percent": 50}),
    ("100%", {"channels_percent": 100}),
    ("channels", {"mode": "channels", "drain_seconds": 30}),
    ("legacy", {"mode": "legacy"}),
)
RESTART_STEP = "50%"
# The global channel's history must span a node restart (clients recover what was
# published while they reconnected): 100 publications (the default) last 2 s at 50/s;
# 10,000 cover a restart of over a minute with 1,000 clients reconnecting to that node.
# `global` has no `:`, so its options are the default namespace's (""), not those of
# a namespace named "global" (which is for channels `global:...`).
_NAMESPACES = {name: {} for name in ("task", "quest", "project", "user", "system")}
_NAMESPACES[""] = {"history_size": 10000, "history_ttl_seconds": 600}
NODE_SETTINGS = {"namespaces": json.dumps(_NAMESPACES)}


@dataclass(slots=True)
class Plan:
    users: int = 1000
    rate: float = 50.0
    hold_seconds: float = 5.0
    settle_timeout: float = 90.0
    notice_jitter_ms: int = 3000


@dataclass(slots=True)
class StepResult:
    name: str
    legacy: int
    channels: int
    expected_channels: int
    switches: int
    expected_switches: int
    lost: int
    duplicated: int
    out_of_order: int
    switch_ms: list[float] = field(default_factory=list)
    peak_connections: int = 0
    # What the kits reported: positions no connection could provide, and reconnects.
    gaps: int = 0
    reconnects: int = 0
    settled: bool = True
    restarted: bool = False

    @property
    def ok(self) -> bool:
        return (
            self.settled
            and self.lost == 0
            and self.duplicated == 0
            and self.out_of_order == 0
            and self.channels == self.expected_channels
            and self.switches == self.expected_switches
        )


def quantile_ms(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    return percentile(sorted(round(v) for v in values), q)


def render(title: str, results: Sequence[StepResult]) -> str:
    head = (
        f"{'step':<9} {'legacy':>6} {'channels':>8} {'switches':>9} {'lost':>5} {'dup':>4} "
        f"{'ooo':>4} {'p50 ms':>7} {'p99 ms':>7} {'peak/user':>9} {'gaps':>5} {'reconn':>6}  verdict"
    )
    lines = [title, head]
    for r in results:
        p50, p99 = quantile_ms(r.switch_ms, 0.5), quantile_ms(r.switch_ms, 0.99)
        note = "ok" if r.ok else "FAIL"
        if r.restarted:
            note += " (node restarted)"
        lines.append(
            f"{r.name:<9} {r.legacy:>6} {r.channels:>8} "
            f"{f'{r.switches}/{r.expected_switches}':>9} {r.lost:>5} {r.duplicated:>4} "
            f"{r.out_of_order:>4} {'-' if p50 is None else p50:>7} {'-' if p99 is None else p99:>7} "
            f"{r.peak_connections:>9} {r.gaps:>5} {r.reconnects:>6}  {note}"
        )
    return "\n".join(lines)


class Users:
    """The Node process holding every simulated user (line protocol, see the script)."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self._seq = 0

    async def call(self, cmd: str, **params: Any) -> Any:
        assert self.process.stdin is not None and self.process.stdout is not None
        self._seq += 1
        self.process.stdin.write(
            json.dumps({"seq": self._seq, "cmd": cmd, **params}).encode() + b"\n"
        )
        await self.process.stdin.drain()
        while True:
            line = await asyncio.wait_for(self.process.stdout.readline(), 60)
            if not line:
                raise RuntimeError("the simulated users' process exited")
            answer = json.loads(line)
            if answer.get("seq") == self._seq:
                if not answer["ok"]:
                    raise RuntimeError(f"users: {cmd}: {answer['error']}")
                return answer["result"]


@contextlib.asynccontextmanager
async def simulated_users() -> AsyncIterator[Users]:
    node = node_binary()
    if node is None or not (REPO / "clients" / "js" / "dist" / "index.js").is_file():
        raise RuntimeError("needs node and the built kit: make kit")
    process = await asyncio.create_subprocess_exec(
        node,
        str(USERS_SCRIPT),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL if STDERR is None else STDERR.open("ab"),
        limit=16 * 1024 * 1024,
    )
    try:
        yield Users(process)
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()


class Producer:
    """Ingests one event after another at `rate` per second, each with the next seq,
    to the nodes in turn (skipping one that is down); only accepted events count."""

    def __init__(self, nodes: list[NodeProcess], api_key: str, rate: float, users: Sequence[str]):
        self.nodes = nodes
        self.api_key = api_key
        self.rate = rate
        self.users = users
        self.accepted = 0
        self._task: asyncio.Task[None] | None = None

    def event(self, seq: int) -> dict[str, Any]:
        kind = seq % 4
        if kind == 0:
            return {"type": "task.updated", "payload": {"task_id": f"t{seq % 7}", "seq": seq}}
        if kind == 1:
            return {"type": "project.updated", "payload": {"project_id": f"p{seq % 3}", "seq": seq}}
        if kind == 2:
            user = self.users[seq % len(self.users)]
            payload = {"user_id": user, "session_id": f"s{seq}", "reason": "rehearsal", "seq": seq}
            return {"type": "approval.required", "payload": payload}
        return {"type": "rehearsal.tick", "payload": {"seq": seq}}  # default route: system

    async def _run(self) -> None:
        period = 1.0 / self.rate
        async with httpx.AsyncClient(timeout=5) as http:
            next_at = time.monotonic()
            turn = 0
            while True:
                seq = self.accepted + 1
                body = self.event(seq)
                for attempt in range(len(self.nodes)):
                    node = self.nodes[(turn + attempt) % len(self.nodes)]
                    with contextlib.suppress(httpx.HTTPError):
                        response = await http.post(
                            f"{node.url}/api/v1/broadcast",
                            json=body,
                            headers={"X-API-Key": self.api_key},
                        )
                        if response.status_code == 200 and response.json()["accepted"] == 1:
                            self.accepted = seq
                            break
                else:
                    await asyncio.sleep(0.1)  # every node down: try again shortly
                    continue
                turn += 1
                next_at += period
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


async def wait_for(condition: Any, timeout: float, interval: float = 0.25) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await condition():
            return True
        await asyncio.sleep(interval)
    return False


async def restart(
    node: NodeProcess, workdir: Path, redis_urls: Sequence[str], state: CutoverState
) -> NodeProcess:
    """SIGTERM the node, start it again on the same port (clients reconnect there),
    with the current flag in its settings as an operator would keep it (a node on
    the memory engine does not remember runtime changes)."""
    await node.stop()
    await node.http.aclose()
    settings = {
        **NODE_SETTINGS,
        "port": str(node.port),
        "cutover_mode": state.mode.value,
        "cutover_channels_percent": str(state.channels_percent),
    }
    fresh = await spawn_node(
        node.name, node.keys, workdir, redis_urls=redis_urls, settings=settings
    )
    await fresh.wait_ready(timeout=60)
    return fresh


async def rehearse(node_count: int, plan: Plan, *, log: Any = print) -> list[StepResult]:
    keys = ClusterKeys.generate()
    names = [f"user-{i:04d}" for i in range(plan.users)]
    _totals.update({"lost": 0, "duplicated": 0, "outOfOrder": 0})
    # Redis for one node too: a restarted node on the memory engine loses its history
    # (a new epoch), and with it what was published while clients reconnected.
    results: list[StepResult] = []
    async with RedisServer() as redis:
        with tempfile.TemporaryDirectory(prefix="dex-rehearsal-") as tmp:
            await _rehearse_on(redis, node_count, plan, keys, names, Path(tmp), results, log)
    return results


async def _rehearse_on(
    redis: RedisServer,
    node_count: int,
    plan: Plan,
    keys: ClusterKeys,
    names: list[str],
    tmp: Path,
    results: list[StepResult],
    log: Any,
) -> None:
    nodes: list[NodeProcess] = []
    try:
        redis_urls = [redis.url]
        for index in range(node_count):
            node = await spawn_node(
                f"node-{index}",
                keys,
                tmp / f"node-{index}",
                redis_urls=redis_urls,
                settings=NODE_SETTINGS,
            )
            nodes.append(node)
        for node in nodes:
            await node.wait_ready()
        producer = Producer(nodes, keys.api_key, plan.rate, names)
        async with simulated_users() as users:
            specs = [
                {"name": name, "baseUrl": nodes[i % node_count].url, "token": keys.token(name)}
                for i, name in enumerate(names)
            ]
            options = {
                "noticeJitterMs": plan.notice_jitter_ms,
                "configPollMs": 60_000,
                "minReconnectDelayMs": 300,
                "maxReconnectDelayMs": 3000,
            }
            await users.call("start", users=specs, options=options)
            state = CutoverState()

            async def all_on_legacy() -> bool:
                status = await users.call("status")
                return bool(status["protocols"]["legacy"] == len(names))

            if not await wait_for(all_on_legacy, plan.settle_timeout):
                raise RuntimeError("the users did not all connect")
            producer.start()
            try:
                previous: dict[str, str] = {name: "legacy" for name in names}
                for name, change in STEPS:
                    state = state.updated(change)
                    expected = {u: state.protocol_for(u).value for u in names}
                    result = await run_step(
                        name, change, expected, previous, nodes, users, producer, plan, keys
                    )
                    if name == RESTART_STEP:
                        index = 0
                        nodes[index] = await restart(
                            nodes[index], tmp / f"node-{index}", redis_urls, state
                        )
                        result.restarted = True
                        await finish_step(result, expected, users, producer, plan)
                    previous = expected
                    results.append(result)
                    log(render("", [result]).splitlines()[-1])
            finally:
                await producer.stop()
                with contextlib.suppress(Exception):
                    await users.call("stop")
    finally:
        for node in nodes:
            with contextlib.suppress(Exception):
                await node.stop()
                await node.http.aclose()


async def run_step(
    name: str,
    change: dict[str, Any],
    expected: dict[str, str],
    previous: dict[str, str],
    nodes: list[NodeProcess],
    users: Users,
    producer: Producer,
    plan: Plan,
    keys: ClusterKeys,
) -> StepResult:
    async with httpx.AsyncClient(timeout=10) as http:
        response = await http.post(
            f"{nodes[-1].url}/api/v1/admin/cutover",
            json=change,
            headers={"X-Admin-Key": keys.admin_key},
        )
        response.raise_for_status()
    moved = sum(1 for u, p in expected.items() if previous[u] != p)
    result = StepResult(
        name=name,
        legacy=0,
        channels=0,
        expected_channels=sum(1 for p in expected.values() if p == ClientProtocol.CENTRIFUGE.value),
        switches=0,
        expected_switches=moved,
        lost=0,
        duplicated=0,
        out_of_order=0,
    )
    await finish_step(result, expected, users, producer, plan)
    return result


async def finish_step(
    result: StepResult,
    expected: dict[str, str],
    users: Users,
    producer: Producer,
    plan: Plan,
) -> None:
    """Wait until every user settled where the flag puts it, keep events flowing for
    the hold time, then wait for delivery to catch up and count."""

    async def settled() -> bool:
        status = await users.call("status")
        return bool(status["protocols"]["switching"] == 0 and status["perUser"] == expected)

    result.settled = await wait_for(settled, plan.settle_timeout) and result.settled
    if not result.settled:
        status = await users.call("status")
        stuck = [u for u, p in status["perUser"].items() if p != expected[u]][:2]
        for name in stuck + status["switching"][:2]:
            print(
                "  unsettled:", json.dumps(await users.call("inspect", name=name)), file=sys.stderr
            )
    await asyncio.sleep(plan.hold_seconds)
    up_to = producer.accepted

    async def caught_up() -> bool:
        return bool((await users.call("check", upTo=up_to))["behind"] == 0)

    await wait_for(caught_up, 30)
    check = await users.call("check", upTo=up_to)
    if check["lost"] > _totals["lost"]:
        print("  missing (user, first seqs):", json.dumps(check["examples"]), file=sys.stderr)
    status = await users.call("status")
    metrics = await users.call("metrics")
    # Loss and the counters are cumulative in the users' process: report this step's share.
    result.lost += check["lost"] - _totals["lost"]
    result.duplicated += check["duplicated"] - _totals["duplicated"]
    result.out_of_order += check["outOfOrder"] - _totals["outOfOrder"]
    _totals.update({k: check[k] for k in _totals})
    result.legacy = status["protocols"]["legacy"]
    result.channels = status["protocols"]["channels"]
    result.switches += metrics["switches"]
    result.switch_ms += metrics["switchMs"]
    result.peak_connections = max(result.peak_connections, metrics["peakConnectionsPerUser"])
    result.gaps += metrics["gaps"]
    result.reconnects += metrics["reconnects"]


_totals: dict[str, int] = {"lost": 0, "duplicated": 0, "outOfOrder": 0}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=50.0, help="events per second")
    parser.add_argument("--hold", type=float, default=5.0, help="seconds per step after settling")
    parser.add_argument("--nodes", choices=("1", "2", "both"), default="both")
    parser.add_argument("--short", action="store_true", help="the in-suite size")
    args = parser.parse_args(argv)
    plan = Plan(users=args.users, rate=args.rate, hold_seconds=args.hold)
    if args.short:
        plan = Plan(
            users=40, rate=20.0, hold_seconds=1.0, settle_timeout=30.0, notice_jitter_ms=300
        )
    runs = (1, 2) if args.nodes == "both" else (int(args.nodes),)
    failed = False
    for count in runs:
        title = (
            f"== {count} node{'s' if count > 1 else ''} on Redis: "
            f"{plan.users} users, {plan.rate:g} events/s, node-0 restarted during {RESTART_STEP}"
        )
        print(title, flush=True)
        results = asyncio.run(rehearse(count, plan, log=lambda line: print(line, flush=True)))
        print(render(title, results), flush=True)
        failed = failed or not all(r.ok for r in results)
    print("REHEARSAL", "FAIL" if failed else "PASS", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
