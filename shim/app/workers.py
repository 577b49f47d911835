"""`dex-shim serve --workers N`: N node processes behind one port.

Each worker is a full node (`dex-shim serve` on a listening socket handed down by
this supervisor) with its own socket bound with SO_REUSEPORT, so the kernel spreads
new connections over the workers and none of them shares an event loop or a GIL.
The workers know each other only through the Redis engine, exactly as separate
hosts would: a publication accepted by one worker reaches subscribers on all of
them, and the cutover flag, presence and history are shared.

The supervisor owns no connections. It binds the port (so port 0 works), starts the
workers, prints one listening line once every worker is ready, restarts a worker
that dies, and forwards SIGTERM/SIGINT so that each worker drains as a lone node
does (see Runtime.shutdown).
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from shim.app.runtime import dev_api_key, dev_signing_key
from shim.core.config import Settings

log = logging.getLogger("shim.workers")

WORKER_START_TIMEOUT_SECONDS = 60.0
# A worker that keeps dying is restarted at most this often.
RESTART_DELAY_SECONDS = 1.0
# Past Runtime.shutdown's own grace period (and hypercorn's backstop), a worker that
# is still alive is killed.
STOP_MARGIN_SECONDS = 10.0


class WorkersError(RuntimeError):
    """`--workers` cannot run with these settings; the message says why."""


def check_workers(settings: Settings, workers: int) -> None:
    if workers < 1:
        raise WorkersError(f"--workers must be at least 1, got {workers}")
    if workers > 1 and settings.engine != "redis":
        raise WorkersError(
            f"--workers {workers} needs the Redis engine: on the memory engine each worker "
            "would be a separate node, and a client would miss every publication accepted "
            "by another worker. Set redis_url (DEX_SHIM_REDIS_URL) or run one worker."
        )


def reuseport_socket(host: str, port: int) -> socket.socket:
    """A listening socket in the port's SO_REUSEPORT group (the kernel balances new
    connections over every listening socket of the group)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(2048)
    return sock


def _ensure_shared_dev_keys(settings: Settings) -> None:
    """Development keys are made on first use: made here, once, so that workers
    starting together do not each write a different one."""
    if not (settings.token_key or settings.token_key_file):
        dev_signing_key(settings.token_algorithm)
    if not settings.api_key:
        dev_api_key()
    if not settings.admin_api_key:
        dev_api_key("admin-key")


@dataclass(slots=True)
class _Worker:
    index: int
    process: subprocess.Popen[bytes]
    ready_pipe: int  # read end; the worker writes one line when it listens
    ready: bool = False
    buffered: bytes = b""


@dataclass(slots=True)
class Supervisor:
    settings: Settings
    workers: int
    # The worker's command line: `dex-shim [--config FILE] serve ...`.
    worker_command: Sequence[str]
    on_ready: Callable[[int], None] | None = None
    port: int = 0
    _running: dict[int, _Worker] = field(default_factory=dict)
    _stopping: bool = False
    _selector: selectors.BaseSelector = field(default_factory=selectors.DefaultSelector)
    _wake_read: int = -1
    _wake_write: int = -1

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT; 0 when every worker stopped cleanly."""
        # The supervisor's own socket fixes the port (port 0 picks one) and keeps the
        # SO_REUSEPORT group alive while a worker is replaced; it never accepts, so it
        # does not listen and the kernel routes no connection to it.
        family = socket.AF_INET6 if ":" in self.settings.host else socket.AF_INET
        anchor = socket.socket(family, socket.SOCK_STREAM)
        anchor.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        anchor.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        anchor.bind((self.settings.host, self.settings.port))
        self.port = anchor.getsockname()[1]
        _ensure_shared_dev_keys(self.settings)
        self._wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_write, False)
        self._selector.register(self._wake_read, selectors.EVENT_READ)
        previous = {
            signum: signal.signal(signum, self._on_signal)
            for signum in (signal.SIGTERM, signal.SIGINT)
        }
        try:
            for index in range(self.workers):
                self._start(index)
            self._wait_ready()
            if self.on_ready is not None and not self._stopping:
                self.on_ready(self.port)
            return self._supervise()
        finally:
            self._stop_all()
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            self._selector.close()
            os.close(self._wake_read)
            os.close(self._wake_write)
            anchor.close()

    def _on_signal(self, signum: int, _frame: object) -> None:
        self._stopping = True
        for worker in self._running.values():
            with contextlib.suppress(ProcessLookupError):
                worker.process.send_signal(signal.SIGTERM)
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_write, b"x")

    def _start(self, index: int) -> None:
        sock = reuseport_socket(self.settings.host, self.port)
        ready_read, ready_write = os.pipe()
        try:
            process = subprocess.Popen(
                [
                    *self.worker_command,
                    "--worker-fd",
                    str(sock.fileno()),
                    "--worker-ready-fd",
                    str(ready_write),
                    "--worker-index",
                    str(index),
                ],
                pass_fds=(sock.fileno(), ready_write),
                stdin=subprocess.DEVNULL,
            )
        finally:
            # The worker holds its own copies; ours would keep a dead worker's queue.
            sock.close()
            os.close(ready_write)
        worker = _Worker(index, process, ready_read)
        self._running[index] = worker
        self._selector.register(ready_read, selectors.EVENT_READ, worker)
        log.info("worker %d started (pid %d)", index, process.pid)

    def _read_ready(self, worker: _Worker) -> None:
        chunk = os.read(worker.ready_pipe, 256)
        worker.buffered += chunk
        if b"\n" in worker.buffered:
            worker.ready = True
        if not chunk or worker.ready:
            self._selector.unregister(worker.ready_pipe)
            os.close(worker.ready_pipe)
            worker.ready_pipe = -1

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + WORKER_START_TIMEOUT_SECONDS
        while not self._stopping and not all(w.ready for w in self._running.values()):
            for worker in self._running.values():
                if worker.process.poll() is not None:
                    raise WorkersError(
                        f"worker {worker.index} exited with {worker.process.returncode} "
                        "before it listened (its log above says why)"
                    )
            left = deadline - time.monotonic()
            if left <= 0:
                raise WorkersError(f"workers not ready after {WORKER_START_TIMEOUT_SECONDS:.0f} s")
            self._poll(min(left, 0.2))

    def _poll(self, timeout: float) -> None:
        for key, _events in self._selector.select(timeout):
            if key.fd == self._wake_read:
                with contextlib.suppress(BlockingIOError):
                    os.read(self._wake_read, 64)
            elif isinstance(key.data, _Worker):
                self._read_ready(key.data)

    def _supervise(self) -> int:
        restart_at: dict[int, float] = {}
        while not self._stopping:
            self._poll(0.2)
            for index, worker in list(self._running.items()):
                code = worker.process.poll()
                if code is None or index in restart_at:
                    continue
                log.error(
                    "worker %d (pid %d) exited with %s: restarting it",
                    index,
                    worker.process.pid,
                    code,
                )
                restart_at[index] = time.monotonic() + RESTART_DELAY_SECONDS
            for index, when in list(restart_at.items()):
                if time.monotonic() >= when and not self._stopping:
                    self._close_pipe(self._running[index])
                    del restart_at[index]
                    self._start(index)
        return self._stop_all()

    def _close_pipe(self, worker: _Worker) -> None:
        if worker.ready_pipe >= 0:
            self._selector.unregister(worker.ready_pipe)
            os.close(worker.ready_pipe)
            worker.ready_pipe = -1

    def _stop_all(self) -> int:
        """SIGTERM every worker, wait for their drain, kill what outlives it; 0 if
        every worker exited cleanly."""
        deadline = time.monotonic() + self.settings.shutdown_grace_seconds + STOP_MARGIN_SECONDS
        for worker in self._running.values():
            if worker.process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    worker.process.send_signal(signal.SIGTERM)
        status = 0
        for worker in self._running.values():
            try:
                code = worker.process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("worker %d did not stop in time: killed", worker.index)
                worker.process.kill()
                code = worker.process.wait()
            if code not in (0, -signal.SIGTERM):
                status = 1
            self._close_pipe(worker)
        self._running.clear()
        return status


def worker_socket(fd: int) -> socket.socket:
    """The listening socket the supervisor handed down."""
    sock = socket.socket(fileno=fd)
    sock.set_inheritable(True)
    return sock


def announce_ready(fd: int) -> None:
    """Tell the supervisor this worker listens (one line on its pipe)."""
    with contextlib.suppress(OSError):
        os.write(fd, b"ready\n")
    with contextlib.suppress(OSError):
        os.close(fd)


def worker_command(config: str | None, host: str | None, port: int | None) -> list[str]:
    command = [sys.executable, "-m", "shim.app.cli"]
    if config:
        command += ["--config", config]
    command.append("serve")
    if host:
        command += ["--host", host]
    if port is not None:
        command += ["--port", str(port)]
    return command
