"""The nodes a scenario runs against, from a gevent process: started here (one node on
the memory engine, or several on a throwaway redis-server) or already running
(`--host`). Also what the scenario reads from them besides WebSocket traffic: each
node's session counts (admin API) and, for local processes, their VmRSS.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import gevent  # type: ignore[import-untyped]
import httpx

from loadtests.measure_core import parse_vmrss_kib
from tests.multinode import ClusterKeys, node_env
from tests.redis_server import REDIS_SERVER

START_TIMEOUT_SECONDS = 30.0
STOP_TIMEOUT_SECONDS = 15.0
_READY_RE = re.compile(r"dex-shim listening on http://[^:]+:(\d+)")
# /proc/net/tcp: local address (hex ip:port) and state 0A = LISTEN.
_LISTEN_RE = re.compile(r"^\s*\d+:\s+[0-9A-F]+:([0-9A-F]{4})\s+\S+\s+0A\s+(?:\S+\s+){5}(\d+)", re.M)


@dataclass(slots=True)
class Node:
    http_url: str
    # Local process id when known (RSS is read from /proc), else None.
    pid: int | None = None

    @property
    def ws_base(self) -> str:
        parts = urlsplit(self.http_url)
        scheme = "wss" if parts.scheme == "https" else "ws"
        return f"{scheme}://{parts.netloc}"

    def cpu_seconds(self) -> float | None:
        """User + system CPU time the process used so far."""
        if self.pid is None:
            return None
        try:
            return parse_cpu_seconds(Path(f"/proc/{self.pid}/stat").read_text())
        except (OSError, ValueError, IndexError):
            return None

    def rss_kib(self) -> int | None:
        if self.pid is None:
            return None
        try:
            return parse_vmrss_kib(Path(f"/proc/{self.pid}/status").read_text())
        except (OSError, ValueError):
            return None


@dataclass(slots=True)
class Cluster:
    nodes: list[Node]
    api_key: str
    signing_key: str
    token_algorithm: str
    # Empty: the admin API is not asked (no cut-off times).
    admin_key: str
    http: httpx.Client = field(default_factory=lambda: httpx.Client(timeout=5.0))

    def rss_kib(self) -> int | None:
        """Sum of the nodes' VmRSS, or None unless every node's is known."""
        values = [node.rss_kib() for node in self.nodes]
        if any(value is None for value in values):
            return None
        return sum(value for value in values if value is not None)

    def cpu_seconds(self) -> float | None:
        values = [node.cpu_seconds() for node in self.nodes]
        if any(value is None for value in values):
            return None
        return sum(value for value in values if value is not None)

    def sessions(self) -> dict[str, int] | None:
        """Open sessions per protocol ("legacy", "channels") over all nodes."""
        if not self.admin_key:
            return None
        totals = {"legacy": 0, "channels": 0}
        for node in self.nodes:
            try:
                response = self.http.get(
                    f"{node.http_url}/api/v1/admin/cutover",
                    headers={"X-Admin-Key": self.admin_key},
                )
            except httpx.HTTPError:
                return None
            if response.status_code != 200:
                return None
            counts = response.json().get("connections", {})
            for protocol in totals:
                totals[protocol] += int(counts.get(protocol, 0))
        return totals


def parse_cpu_seconds(stat_text: str) -> float:
    """utime + stime in seconds from the text of /proc/<pid>/stat."""
    # The command name (field 2) may hold spaces; the fields after it are fixed.
    fields = stat_text[stat_text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# --- already running nodes ----------------------------------------------------------


def listening_inode(proc_net_tcp: str, port: int) -> int | None:
    """Inode of the socket listening on `port`, from the text of /proc/net/tcp."""
    for match in _LISTEN_RE.finditer(proc_net_tcp):
        if int(match.group(1), 16) == port:
            return int(match.group(2))
    return None


def local_pid(http_url: str) -> int | None:
    """The pid of this user's process listening on the URL's loopback port, if any."""
    parts = urlsplit(http_url)
    if parts.hostname not in {"127.0.0.1", "localhost"} or parts.port is None:
        return None
    try:
        inode = listening_inode(Path("/proc/net/tcp").read_text(), parts.port)
    except OSError:
        return None
    if inode is None:
        return None
    target = f"socket:[{inode}]"
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in os.scandir(f"/proc/{entry.name}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(fd.path) == target:
                        return int(entry.name)
    return None


def attach_cluster(
    hosts: Sequence[str], *, api_key: str, signing_key: str, token_algorithm: str, admin_key: str
) -> Cluster:
    nodes = [Node(host.rstrip("/"), local_pid(host)) for host in hosts]
    return Cluster(nodes, api_key, signing_key, token_algorithm, admin_key)


# --- nodes started here ---------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(STOP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _start_redis(workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = _free_port()
    command = [REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    command += ["--appendonly", "no", "--dir", str(workdir)]
    process = subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    with gevent.Timeout(START_TIMEOUT_SECONDS, RuntimeError("redis-server did not start")):
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port)) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    break
            gevent.sleep(0.05)
    return process, f"redis://127.0.0.1:{port}/0"


def _start_node(
    name: str,
    keys: ClusterKeys,
    workdir: Path,
    redis_urls: Sequence[str],
    settings: Mapping[str, str],
) -> tuple[subprocess.Popen[bytes], Node]:
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / "node.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "shim.app.cli", "serve"],
            cwd=workdir,
            env=node_env(keys, workdir, redis_urls=redis_urls, settings=settings),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log,
        )
    assert process.stdout is not None
    try:
        with gevent.Timeout(START_TIMEOUT_SECONDS, RuntimeError(f"{name} did not start")):
            while True:
                line = process.stdout.readline().decode(errors="replace")
                if not line:
                    raise RuntimeError(f"{name} exited:\n{log_path.read_text(errors='replace')}")
                match = _READY_RE.search(line)
                if match:
                    break
    except BaseException:
        _stop(process)
        raise
    # Keep reading stdout so a chatty node never blocks on a full pipe.
    gevent.spawn(_drain, process.stdout)
    return process, Node(f"http://127.0.0.1:{match.group(1)}", process.pid)


def _drain(stream: object) -> None:
    read = getattr(stream, "read1", None)
    while read is not None and read(65536):
        pass


@contextlib.contextmanager
def started_cluster(count: int, settings: Mapping[str, str]) -> Iterator[Cluster]:
    """`count` fresh `dex-shim serve` processes sharing fresh keys (on a throwaway
    redis-server when count > 1); stopped on exit."""
    keys = ClusterKeys.generate()
    processes: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory(prefix="dex-slow-clients-") as tmp:
        try:
            redis_urls: list[str] = []
            if count > 1:
                redis, url = _start_redis(Path(tmp))
                processes.append(redis)
                redis_urls.append(url)
            nodes = []
            for index in range(count):
                process, node = _start_node(
                    f"node-{index}", keys, Path(tmp) / f"node-{index}", redis_urls, settings
                )
                processes.append(process)
                nodes.append(node)
            cluster = Cluster(nodes, keys.api_key, keys.signing_key, "EdDSA", keys.admin_key)
            try:
                yield cluster
            finally:
                cluster.http.close()
        finally:
            # Nodes first, Redis last.
            for process in reversed(processes):
                _stop(process)
