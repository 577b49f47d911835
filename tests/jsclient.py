"""Drive the official centrifuge-js SDK from pytest through tests/js/driver.mjs.

    async with JsClient(url, token, name="t1") as js:
        await js.call("connect")
        await js.wait_event("connected")
        await js.call("newSubscription", channel="news", options={"recoverable": True})
        await js.call("subscribe", channel="news", wait=True)
        pub = await js.wait_event(lambda e: e["event"] == "sub.publication")

The node process is killed when the block exits, whatever happens inside it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

from tests.pyclient import current_codec

JS_DIR = Path(__file__).resolve().parent / "js"
DRIVER = JS_DIR / "driver.mjs"

Event = dict[str, Any]
Match = str | Callable[[Event], bool]

_STDERR_KEEP = 64 * 1024  # bytes of node's stderr kept for error messages


def node_binary() -> str | None:
    """The node executable ($NODE_BIN, else the one on PATH), or None."""
    return os.environ.get("NODE_BIN") or shutil.which("node")


def js_available() -> bool:
    """True when node and the npm packages the driver imports are installed."""
    modules = JS_DIR / "node_modules"
    return (
        node_binary() is not None
        and (modules / "centrifuge" / "package.json").is_file()
        and (modules / "ws" / "package.json").is_file()
    )


class JsError(Exception):
    """A command answered ok:false. code is the SDK/server code, -1 for driver-side failures."""

    def __init__(self, code: int, message: str, cmd: str = "") -> None:
        super().__init__(f"{cmd}: [{code}] {message}" if cmd else f"[{code}] {message}")
        self.code = code
        self.message = message
        self.cmd = cmd


class DriverExited(RuntimeError):
    """The node process ended while something was still waiting for it."""


def _matcher(match: Match) -> Callable[[Event], bool]:
    if isinstance(match, str):
        name = match
        return lambda event: event.get("event") == name
    return match


class JsClient:
    """One centrifuge-js client in its own node process.

    opts are startup options passed to the driver as-is (camelCase, as the SDK spells them):
    name, minReconnectDelay, maxReconnectDelay, timeout (ms), maxServerPingDelay, data, debug,
    getToken (False: install no getToken callback, e.g. for anonymous connections).
    The codec comes from tests.pyclient.use_codec (protobuf: the SDK's protobuf build).
    """

    def __init__(
        self,
        url: str,
        token: str = "",
        *,
        startup_timeout: float = 15.0,
        **opts: Any,
    ) -> None:
        opts.setdefault("protobuf", current_codec() == "protobuf")
        self._options: dict[str, Any] = {"url": url, "token": token, **opts}
        self._startup_timeout = startup_timeout
        self._proc: asyncio.subprocess.Process | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._seq = 0
        self._changed = asyncio.Event()
        self._consumed: set[int] = set()
        self._stderr = bytearray()
        self._exited = False
        self.events: list[Event] = []
        """Every event seen, in arrival order (includes driver.ready / driver.error)."""
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        """The same events as a stream, for tests that want to consume them one by one."""

    # -- lifecycle ---------------------------------------------------------------------------

    async def __aenter__(self) -> JsClient:
        node = node_binary()
        # Not a skip: `make test` installs both, so a missing one is a broken setup.
        if node is None or not js_available():
            raise RuntimeError(
                "centrifuge-js tests need Node 20 and tests/js/node_modules "
                "(`make test` runs `npm ci --prefix tests/js`)"
            )
        self._proc = await asyncio.create_subprocess_exec(
            node,
            str(DRIVER),
            json.dumps(self._options),
            cwd=JS_DIR,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        self._tasks = [
            asyncio.create_task(self._read_stdout()),
            asyncio.create_task(self._read_stderr()),
        ]
        try:
            await self.wait_event("driver.ready", timeout=self._startup_timeout)
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Ask the driver to exit, kill it if it lingers, and reap it. Safe to call twice."""
        proc = self._proc
        if proc is None:
            return
        try:
            if proc.returncode is None and not self._exited:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self.call("exit"), timeout=2.0)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(proc.wait(), timeout=2.0)
        finally:
            # Runs even when the test is being cancelled: no node process may outlive us.
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
            if proc.stdin is not None:
                proc.stdin.close()
            await asyncio.shield(self._reap(proc))

    async def _reap(self, proc: asyncio.subprocess.Process) -> None:
        await proc.wait()
        # The readers end at EOF once the process is gone; awaiting them closes the pipes.
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if proc.stdin is not None:
            with contextlib.suppress(Exception):
                await proc.stdin.wait_closed()

    @property
    def returncode(self) -> int | None:
        return None if self._proc is None else self._proc.returncode

    @property
    def stderr_text(self) -> str:
        """What node wrote to stderr so far (tail only)."""
        return self._stderr.decode("utf-8", "replace")

    # -- commands ----------------------------------------------------------------------------

    async def call(self, cmd: str, /, *, reply_timeout: float = 15.0, **params: Any) -> Any:
        """Send a command, return its result; raise JsError when the driver answers ok:false.

        params are the command's fields (channel=..., data=..., options={...}, timeout=ms, ...).
        """
        proc = self._proc
        if proc is None or proc.stdin is None:
            raise RuntimeError("JsClient is not started; use `async with`")
        if self._exited:
            raise DriverExited(self._exit_message())
        self._seq += 1
        seq = self._seq
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[seq] = future
        line = json.dumps({**params, "seq": seq, "cmd": cmd}) + "\n"
        try:
            proc.stdin.write(line.encode())
            await proc.stdin.drain()
            answer = await asyncio.wait_for(future, timeout=reply_timeout)
        except TimeoutError:
            raise TimeoutError(f"no answer to {cmd} within {reply_timeout}s") from None
        except (BrokenPipeError, ConnectionResetError):
            raise DriverExited(self._exit_message()) from None
        finally:
            self._pending.pop(seq, None)
        if answer.get("ok"):
            return answer.get("result")
        error = answer.get("error") or {}
        raise JsError(int(error.get("code", -1)), str(error.get("message", "")), cmd)

    # -- events ------------------------------------------------------------------------------

    def mark(self) -> int:
        """An index to pass as since= so a wait only looks at events arriving after now."""
        return len(self.events)

    def find_events(self, match: Match, since: int = 0) -> list[Event]:
        """All events seen so far (from index since) that match, consumed or not."""
        matches = _matcher(match)
        return [event for event in self.events[since:] if matches(event)]

    # timeout= is part of this helper's agreed API (tests read better than asyncio.timeout blocks).
    async def wait_event(
        self,
        match: Match,
        timeout: float = 10.0,
        since: int = 0,
    ) -> Event:
        """Return the earliest matching event not returned by an earlier wait_event.

        match is an event name or a predicate. Events that arrived before the call count, so
        there is no race between triggering something and waiting for its event; waiting for
        the same name twice returns the first and then the second occurrence.
        """
        matches = _matcher(match)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        index = since
        while True:
            while index < len(self.events):
                if index not in self._consumed and matches(self.events[index]):
                    self._consumed.add(index)
                    return self.events[index]
                index += 1
            if self._exited:
                raise DriverExited(f"while waiting for {match!r}: {self._exit_message()}")
            remaining = deadline - loop.time()
            if remaining <= 0:
                seen = [event.get("event") for event in self.events[since:]]
                raise TimeoutError(f"no event {match!r} within {timeout}s; seen: {seen}")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout=remaining)

    async def expect_no_event(self, match: Match, within: float, since: int | None = None) -> None:
        """Fail if a matching event arrives (from index since, default now) within the delay."""
        start = self.mark() if since is None else since
        await asyncio.sleep(within)
        found = self.find_events(match, start)
        if found:
            raise AssertionError(f"unexpected event(s): {found}")

    async def next_event(self, timeout: float = 10.0) -> Event:
        """Pop the next event from the stream (independent of wait_event's bookkeeping)."""
        return await asyncio.wait_for(self.queue.get(), timeout=timeout)

    # -- readers -----------------------------------------------------------------------------

    async def _read_stdout(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        stdout = self._proc.stdout
        try:
            while True:
                raw = await stdout.readline()
                if not raw:
                    break
                self._dispatch(raw)
        finally:
            self._exited = True
            self._changed.set()
            error = DriverExited(self._exit_message())
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(error)

    def _dispatch(self, raw: bytes) -> None:
        try:
            message = json.loads(raw)
        except ValueError:
            message = {"event": "driver.garbage", "line": raw.decode("utf-8", "replace")}
        if not isinstance(message, dict):
            message = {"event": "driver.garbage", "line": raw.decode("utf-8", "replace")}
        if "event" in message:
            self.events.append(message)
            self.queue.put_nowait(message)
            self._changed.set()
            return
        future = self._pending.get(message.get("seq", -1))
        if future is not None and not future.done():
            future.set_result(message)

    async def _read_stderr(self) -> None:
        assert self._proc is not None and self._proc.stderr is not None
        stderr = self._proc.stderr
        while chunk := await stderr.read(4096):
            self._stderr += chunk
            # Keep only the tail so a chatty debug run cannot grow memory without bound.
            if len(self._stderr) > _STDERR_KEEP:
                del self._stderr[: len(self._stderr) - _STDERR_KEEP]

    def _exit_message(self) -> str:
        tail = self.stderr_text[-2000:].strip()
        return f"node driver exited (code {self.returncode}); stderr tail:\n{tail}"
