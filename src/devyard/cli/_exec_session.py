"""The client side of the runner gateway's exec protocol (``devyard.runner.gateway``), for ``devyard env exec``.

``run_session`` connects to the gateway with a ticket, sends the command, and attaches this process's terminal
or streams to it until the command exits; it returns the command's exit code. With a TTY the local terminal is
put in raw mode (restored on every way out) and window size changes (SIGWINCH) are sent as resizes. Imported only
by that command: it pulls in ``websockets``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import termios
import threading
import tty as terminal_modes
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import click
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from devyard.wire.access import EnvironmentAccess, ExecStart

__all__ = ["GatewayFailure", "SessionOptions", "exec_url", "run_session"]

_STDIN, _STDOUT, _STDERR = 0, 1, 2
_READ_CHUNK: Final = 32 * 1024


class GatewayFailure(click.ClickException):
    """The session failed on the gateway's side (refused, could not start the command, or was cut): exit 255,
    as ssh does, so that it is told apart from the command's own exit codes."""

    exit_code = 255


@dataclass(frozen=True)
class SessionOptions:
    argv: Sequence[str]
    tty: bool
    env: Mapping[str, str]
    cwd: str | None = None
    user: str | None = None


def exec_url(access: EnvironmentAccess) -> str:
    base = access.gateway_url.rstrip("/")
    if base.startswith("https://"):
        base = "wss://" + base.removeprefix("https://")
    elif base.startswith("http://"):
        base = "ws://" + base.removeprefix("http://")
    return f"{base}/v1/environments/{access.environment_id}/exec"


def run_session(access: EnvironmentAccess, options: SessionOptions) -> int:
    """Run the command through the gateway; its exit code, or ``GatewayFailure``."""
    stdin_fd, stdout_fd = sys.stdin.fileno(), sys.stdout.fileno()
    raw = options.tty and os.isatty(stdin_fd)
    with _raw_terminal(stdin_fd) if raw else contextlib.nullcontext():
        return asyncio.run(_session(access, options, stdin_fd, stdout_fd))


@contextlib.contextmanager
def _raw_terminal(fd: int) -> Iterator[None]:
    saved = termios.tcgetattr(fd)
    try:
        terminal_modes.setraw(fd)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _terminal_size(fd: int) -> tuple[int, int] | None:
    try:
        size = os.get_terminal_size(fd)
    except OSError:
        return None
    return size.lines, size.columns


async def _session(access: EnvironmentAccess, options: SessionOptions, stdin_fd: int, stdout_fd: int) -> int:
    url = exec_url(access)
    env = dict(options.env)
    if options.tty and "TERM" in os.environ:
        env.setdefault("TERM", os.environ["TERM"])
    start = ExecStart(
        argv=list(options.argv),
        env=env,
        tty=options.tty,
        size=_terminal_size(stdout_fd) if options.tty else None,
        cwd=options.cwd,
        user=options.user,
    )
    try:
        connection = await connect(
            url,
            additional_headers={"Authorization": f"Bearer {access.ticket}"},
            compression=None,
            max_size=1024 * 1024,
            open_timeout=30,
        )
    except InvalidStatus as exc:
        reason = exc.response.body.decode(errors="replace").strip() if exc.response.body else ""
        raise GatewayFailure(f"the gateway refused the session ({exc.response.status_code}): {reason}") from None
    except (OSError, InvalidHandshake, TimeoutError) as exc:
        raise GatewayFailure(f"cannot reach the gateway at {access.gateway_url}: {exc}") from None
    loop = asyncio.get_running_loop()
    resizing = options.tty and _terminal_size(stdout_fd) is not None
    async with connection:
        await connection.send(start.model_dump_json())
        sender = asyncio.create_task(_send_stdin(connection, stdin_fd))
        if resizing:
            loop.add_signal_handler(signal.SIGWINCH, _on_resize, connection, stdout_fd)
        try:
            return await _receive(connection)
        finally:
            if resizing:
                loop.remove_signal_handler(signal.SIGWINCH)
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)


#: Resizes being sent (the loop keeps only weak references to tasks).
_resizes: set[asyncio.Task[None]] = set()


def _on_resize(connection: ClientConnection, fd: int) -> None:
    size = _terminal_size(fd)
    if size is not None:
        task = asyncio.ensure_future(_send_quietly(connection, json.dumps({"resize": list(size)})))
        _resizes.add(task)
        task.add_done_callback(_resizes.discard)


async def _send_quietly(connection: ClientConnection, message: str | bytes) -> None:
    with contextlib.suppress(ConnectionClosed):
        await connection.send(message)


async def _receive(connection: ClientConnection) -> int:
    stdout, stderr = sys.stdout.buffer, sys.stderr.buffer
    try:
        async for message in connection:
            if isinstance(message, bytes):
                if not message:
                    continue
                target = stdout if message[0] == _STDOUT else stderr if message[0] == _STDERR else None
                if target is not None:
                    target.write(message[1:])
                    target.flush()
                continue
            control: Any = json.loads(message)
            if "exit" in control:
                return int(control["exit"])
            if "error" in control:
                raise GatewayFailure(str(control["error"]))
    except ConnectionClosed:
        pass
    raise GatewayFailure("the gateway closed the session before the command exited")


async def _send_stdin(connection: ClientConnection, fd: int) -> None:
    """Stream stdin as it comes; at its end, tell the gateway. Reading happens in a thread (stdin may be a
    terminal, a pipe or a file), handing chunks over through a small queue: no more is read than is sent."""
    loop = asyncio.get_running_loop()
    chunks: asyncio.Queue[bytes] = asyncio.Queue(maxsize=4)

    def read() -> None:
        while True:
            try:
                data = os.read(fd, _READ_CHUNK)
            except OSError:
                data = b""
            try:
                asyncio.run_coroutine_threadsafe(chunks.put(data), loop).result()
            except (RuntimeError, asyncio.CancelledError):
                return  # the session ended and its loop with it
            if not data:
                return

    threading.Thread(target=read, name="devyard-exec-stdin", daemon=True).start()
    try:
        while True:
            data = await chunks.get()
            if not data:
                await connection.send(json.dumps({"close_stdin": True}))
                return
            await connection.send(bytes([_STDIN]) + data)
    except ConnectionClosed:
        return
