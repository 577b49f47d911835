"""A throwaway Redis Cluster: three masters and three replicas, each a redis-server
on a free loopback port, joined by `redis-cli --cluster create`. No persistence.

    with RedisClusterProcesses() as cluster:
        broker = RedisBroker(cluster.seed_urls, cluster=True)
        cluster.failover(master_port)      # CLUSTER FAILOVER on one of its replicas
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

REDIS_SERVER = "/usr/bin/redis-server"
REDIS_CLI = shutil.which("redis-cli") or "/usr/bin/redis-cli"
START_TIMEOUT_SECONDS = 30.0
# Short, so a killed master is replaced within a few seconds.
NODE_TIMEOUT_MS = 1500


def _free_ports(count: int) -> list[int]:
    """Ports free now whose +10000 bus port is free too."""
    ports: list[int] = []
    while len(ports) < count:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port + 10000 > 65535 or port in ports:
            continue
        with socket.socket() as bus:
            try:
                bus.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        ports.append(port)
    return ports


class RedisClusterProcesses:
    def __init__(self, masters: int = 3, replicas_per_master: int = 1) -> None:
        self.size = masters * (1 + replicas_per_master)
        self.replicas_per_master = replicas_per_master
        self.ports = _free_ports(self.size)
        self._dir = tempfile.TemporaryDirectory(prefix="dex-redis-cluster-")
        self._procs: dict[int, subprocess.Popen[bytes]] = {}

    @property
    def seed_urls(self) -> list[str]:
        return [f"redis://127.0.0.1:{port}/0" for port in self.ports[:3]]

    def cli(self, port: int, *args: str, timeout: float = 10.0) -> str:
        done = subprocess.run(
            [REDIS_CLI, "-h", "127.0.0.1", "-p", str(port), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        return done.stdout

    def _spawn(self, port: int) -> None:
        workdir = Path(self._dir.name) / str(port)
        workdir.mkdir(exist_ok=True)
        self._procs[port] = subprocess.Popen(
            [
                REDIS_SERVER,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                str(NODE_TIMEOUT_MS),
                "--repl-diskless-sync-delay",
                "0",
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

    def start(self) -> None:
        for port in self.ports:
            self._spawn(port)
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        for port in self.ports:
            while self.cli(port, "PING").strip() != "PONG":
                if time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server on {port} did not start")
                time.sleep(0.05)
        done = subprocess.run(
            [
                REDIS_CLI,
                "--cluster",
                "create",
                *(f"127.0.0.1:{port}" for port in self.ports),
                "--cluster-replicas",
                str(self.replicas_per_master),
                "--cluster-yes",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed:\n{done.stdout}{done.stderr}")
        self.wait_ok(deadline)
        # Replicas that have synced (a failover needs one).
        while any(
            "role:slave" in info and "master_link_status:up" not in info
            for info in (self.cli(p, "INFO", "replication") for p in self.ports)
        ):
            if time.monotonic() > deadline:
                raise RuntimeError("redis cluster replicas did not sync in time")
            time.sleep(0.1)

    def wait_ok(self, deadline: float | None = None) -> None:
        """Until every live node reports cluster_state:ok and sees all slots."""
        deadline = deadline or time.monotonic() + START_TIMEOUT_SECONDS
        while True:
            live = [p for p, proc in self._procs.items() if proc.poll() is None]
            if all("cluster_state:ok" in self.cli(p, "CLUSTER", "INFO") for p in live):
                return
            if time.monotonic() > deadline:
                raise RuntimeError("redis cluster not ok in time")
            time.sleep(0.1)

    def masters(self) -> list[int]:
        """Ports of the live masters, as the cluster itself sees them."""
        out: list[int] = []
        for port, proc in self._procs.items():
            if proc.poll() is None and "role:master" in self.cli(port, "INFO", "replication"):
                out.append(port)
        return sorted(out)

    def replicas_of(self, master: int) -> list[int]:
        out = []
        for port, proc in self._procs.items():
            if proc.poll() is not None or port == master:
                continue
            info = self.cli(port, "INFO", "replication")
            if "role:slave" in info and f"master_port:{master}" in info:
                out.append(port)
        return out

    def master_of_key(self, key: str) -> int:
        """Port of the master that owns `key`'s slot (per CLUSTER NODES)."""
        live = self.masters()
        slot = int(self.cli(live[0], "CLUSTER", "KEYSLOT", key).strip())
        for line in self.cli(live[0], "CLUSTER", "NODES").splitlines():
            fields = line.split()
            if len(fields) < 8 or "master" not in fields[2] or "fail" in fields[2]:
                continue
            port = int(fields[1].split("@")[0].rsplit(":", 1)[1])
            for span in fields[8:]:
                if span.startswith("["):
                    continue  # a slot being migrated
                low, _, high = span.partition("-")
                if int(low) <= slot <= int(high or low):
                    return port
        raise RuntimeError(f"slot {slot} not covered")

    def failover(self, master: int) -> int:
        """A planned failover (what a managed Redis does for maintenance): one of the
        master's replicas takes over once it has caught up. Returns its port."""
        replica = self.replicas_of(master)[0]
        self.cli(replica, "CLUSTER", "FAILOVER")
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while "role:master" not in self.cli(replica, "INFO", "replication"):
            if time.monotonic() > deadline:
                raise RuntimeError(f"replica {replica} did not take over from {master}")
            time.sleep(0.05)
        return replica

    def kill(self, port: int) -> None:
        proc = self._procs[port]
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()

    def stop(self) -> None:
        for proc in self._procs.values():
            if proc.poll() is None:
                proc.kill()
        for proc in self._procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        self._dir.cleanup()

    def __enter__(self) -> RedisClusterProcesses:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
