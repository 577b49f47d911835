"""Starting and stopping the systems under test, each on a free 127.0.0.1 port.

Every system is a set of processes (servers whose RSS and CPU count, plus helpers
whose CPU counts, like Redis) and the URLs the load generator needs.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from adapters.auth.jwt import generate_signing_key, mint_token
from bench.report import BASELINE_SUFFIX

ROOT = Path(__file__).resolve().parent.parent
ALGORITHM = "EdDSA"
START_TIMEOUT_SECONDS = 30.0
_READY = re.compile(
    rb"(?:dex-shim listening on http://[^:]+:|peer listening on 127\.0\.0\.1:)(\d+)"
)


@dataclass(slots=True, frozen=True)
class Keys:
    """One key pair and API key for the whole run; tokens of distinct users."""

    verification_key: str
    api_key: str
    tokens: tuple[str, ...]


def make_keys(count: int) -> Keys:
    signing, verification = generate_signing_key(ALGORITHM)
    tokens = tuple(
        mint_token(signing, ALGORITHM, user=f"bench-{i}", ttl_seconds=4 * 3600)
        for i in range(count)
    )
    return Keys(verification, secrets.token_urlsafe(24), tokens)


@dataclass(slots=True)
class Running:
    """What the load generator is pointed at."""

    sub_urls: list[str]
    pub_url: str
    api_key: str = ""
    server_pids: list[int] = field(default_factory=list)
    extra_cpu_pids: list[int] = field(default_factory=list)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_port(proc: subprocess.Popen[bytes], log: Path) -> int:
    assert proc.stdout is not None
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    os.set_blocking(proc.stdout.fileno(), False)
    buffered = b""
    while time.monotonic() < deadline:
        chunk = proc.stdout.read()
        if chunk:
            buffered += chunk
            match = _READY.search(buffered)
            if match:
                return int(match.group(1))
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
    raise RuntimeError(f"{proc.args!r} did not start:\n{tail}")


def _spawn(
    command: list[str], env: dict[str, str], log: Path, cwd: Path = ROOT
) -> tuple[subprocess.Popen[bytes], int]:
    with log.open("ab") as err:
        proc = subprocess.Popen(
            command,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=err,
        )
    try:
        return proc, _wait_port(proc, log)
    except BaseException:
        _stop(proc)
        raise


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as handle:
        return [int(p) for p in handle.read().split()]


def _shim_env(keys: Keys, workdir: Path, extra: dict[str, str], tree: Path) -> dict[str, str]:
    # The operator's own DEX_SHIM_* settings would make runs incomparable.
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEX_SHIM_")}
    # The checkout's own code first (see _shim_command); `--workers` children inherit it.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (str(tree), env.get("PYTHONPATH"))))
    env.update(
        {
            "DEX_SHIM_HOST": "127.0.0.1",
            "DEX_SHIM_PORT": "0",
            "DEX_SHIM_TOKEN_ALGORITHM": ALGORITHM,
            "DEX_SHIM_TOKEN_KEY": keys.verification_key,
            "DEX_SHIM_API_KEY": keys.api_key,
            "DEX_SHIM_LOG_LEVEL": "warning",
            "DEX_SHIM_DEV_DIR": str(workdir / ".dex-shim"),
        }
    )
    env.update(extra)
    return env


def _shim_command() -> list[str]:
    # `-m` from the checkout's directory with it on PYTHONPATH: that checkout's code.
    # The venv's `dex-shim` script would import whichever tree the venv's editable
    # install points at, which is not this one in a second worktree sharing the venv.
    return [sys.executable, "-m", "shim.app.cli", "serve"]


CENTRIFUGE_DIR = ROOT / "bench" / "peers" / "centrifuge_go"


def go_env(**extra: str) -> dict[str, str]:
    """Offline Go builds: no module proxy, Debian's toolchain, caches in the temp dir."""
    tmp = Path(tempfile.gettempdir())
    env = dict(
        os.environ,
        GOPROXY="off",
        GOTOOLCHAIN="local",
        GOCACHE=os.environ.get("GOCACHE", str(tmp / "dex-bench-gocache")),
    )
    env.update(extra)
    return env


@functools.cache
def build_centrifuge() -> Path:
    """Build the Go Centrifuge anchor in GOPATH mode against Debian's packages under
    /usr/share/gocode (golang-github-centrifugal-centrifuge-dev and its dependencies)."""
    binary = Path(tempfile.gettempdir()) / "dex-bench-centrifuge"
    env = go_env(GO111MODULE="off", GOPATH="/usr/share/gocode", GOFLAGS="")
    subprocess.run(["go", "build", "-o", str(binary), "."], cwd=CENTRIFUGE_DIR, env=env, check=True)
    return binary


def _start_redis(workdir: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = _free_port()
    proc = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(workdir),
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1) as s:
            s.sendall(b"PING\r\n")
            if s.recv(16).startswith(b"+PONG"):
                return proc, port
        time.sleep(0.05)
    _stop(proc)
    raise RuntimeError("redis-server did not start")


@contextlib.contextmanager
def running(
    system: str, keys: Keys, workdir: Path, baseline: Path | None = None
) -> Iterator[Running]:
    """Start `system`, yield where it listens, stop everything on exit. A shim
    system "<name>@base" is <name> running the code of the checkout `baseline`."""
    procs: list[subprocess.Popen[bytes]] = []
    log = workdir / f"{system}.log"
    tree = ROOT
    if system.endswith(BASELINE_SUFFIX):
        if baseline is None:
            raise ValueError(f"{system!r} needs a baseline checkout")
        system, tree = system.removesuffix(BASELINE_SUFFIX), baseline
    try:
        yield _start(system, keys, workdir, log, procs, tree)
    finally:
        for proc in reversed(procs):
            _stop(proc)


def _start(
    system: str,
    keys: Keys,
    workdir: Path,
    log: Path,
    procs: list[subprocess.Popen[bytes]],
    tree: Path = ROOT,
) -> Running:
    def shim_env(extra: dict[str, str]) -> dict[str, str]:
        return _shim_env(keys, workdir, extra, tree)

    def spawn(command: list[str], env: dict[str, str]) -> tuple[subprocess.Popen[bytes], int]:
        return _spawn(command, env, log, tree)

    if system in ("channel", "legacy"):
        proc, port = spawn(_shim_command(), shim_env({}))
        procs.append(proc)
        path = "/connection/websocket" if system == "channel" else "/api/v1/ws"
        return Running(
            [f"ws://127.0.0.1:{port}{path}"],
            f"http://127.0.0.1:{port}/api/v1/broadcast",
            keys.api_key,
            [proc.pid],
        )
    if system == "delay10":
        extra = {"DEX_SHIM_CLIENT_WRITE_DELAY_SECONDS": "0.01"}
        proc, port = spawn(_shim_command(), shim_env(extra))
        procs.append(proc)
        return Running(
            [f"ws://127.0.0.1:{port}/connection/websocket"],
            f"http://127.0.0.1:{port}/api/v1/broadcast",
            keys.api_key,
            [proc.pid],
        )
    if system == "workers2":
        redis, redis_port = _start_redis(workdir)
        procs.append(redis)
        extra = {"DEX_SHIM_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0"}
        proc, port = spawn([*_shim_command(), "--workers", "2"], shim_env(extra))
        procs.append(proc)
        return Running(
            [f"ws://127.0.0.1:{port}/connection/websocket"],
            f"http://127.0.0.1:{port}/api/v1/broadcast",
            keys.api_key,
            [proc.pid, *_children(proc.pid)],
            [redis.pid],
        )
    if system in ("redis1", "redis2"):
        redis, redis_port = _start_redis(workdir)
        procs.append(redis)
        extra = {
            "DEX_SHIM_ENGINE": "redis",
            "DEX_SHIM_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
        }
        ports = []
        for _ in range(int(system[-1])):
            proc, port = spawn(_shim_command(), shim_env(extra))
            procs.append(proc)
            ports.append(port)
        return Running(
            [f"ws://127.0.0.1:{p}/connection/websocket" for p in ports],
            f"http://127.0.0.1:{ports[0]}/api/v1/broadcast",
            keys.api_key,
            [p.pid for p in procs[1:]],
            [redis.pid],
        )
    if system == "centrifuge":
        env = dict(os.environ, DEX_BENCH_API_KEY=keys.api_key)
        proc, port = _spawn([str(build_centrifuge())], env, log)
        procs.append(proc)
        return Running(
            [f"ws://127.0.0.1:{port}/connection/websocket"],
            f"http://127.0.0.1:{port}/api/v1/broadcast",
            keys.api_key,
            [proc.pid],
        )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    if system == "socketio":
        proc, port = _spawn([sys.executable, "-m", "bench.peers.socketio_peer"], env, log)
        procs.append(proc)
        return Running(
            [f"ws://127.0.0.1:{port}/socket.io/?EIO=4&transport=websocket"],
            f"http://127.0.0.1:{port}/api/v1/broadcast",
            server_pids=[proc.pid],
        )
    if system == "ws":
        proc, port = _spawn([sys.executable, "-m", "bench.peers.ws_peer"], env, log)
        procs.append(proc)
        return Running(
            [f"ws://127.0.0.1:{port}/sub"], f"ws://127.0.0.1:{port}/pub", server_pids=[proc.pid]
        )
    raise ValueError(f"unknown system {system!r}")
