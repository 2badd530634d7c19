"""The client side of the runner gateway's exec protocol (``devyard.runner.gateway``), for ``devyard env exec`` and
``devyard env create ... -- CMD``.

``run_session`` connects to the gateway with a ticket, sends the command, and attaches this process's terminal
or streams to it until the command exits; it returns the command's exit code. With a TTY the local terminal is
put in raw mode (restored on every way out) and window size changes (SIGWINCH) are sent as resizes.

It speaks through ``devyard.client``'s own blocking WebSocket client (``_connections.open_websocket``, a plain
socket) with a thread per input (stdin, resizes) beside the main thread, which receives: neither asyncio, the
``websockets`` package nor the pydantic wire models are imported, because these commands must start fast (they
cost them about 0.15 s together). The messages are plain JSON, as the gateway's module docstring describes them
(``ExecStart`` in ``devyard.wire.access`` is their schema).
"""

from __future__ import annotations

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
from types import FrameType
from typing import Any, Final

import click

from devyard.client import _connections
from devyard.client._connections import WebSocket, WebSocketClosed

__all__ = ["GatewayAccess", "GatewayFailure", "SessionOptions", "exec_url", "run_session", "wants_tty"]

_STDIN, _STDOUT, _STDERR = 0, 1, 2
_READ_CHUNK: Final = 32 * 1024
#: How long the gateway may take to accept the connection and the upgrade.
_OPEN_TIMEOUT: Final = 30.0
#: After the exit code, how long to wait for the gateway's close before closing anyway.
_CLOSE_TIMEOUT: Final = 2.0


class GatewayFailure(click.ClickException):
    """The session failed on the gateway's side (refused, could not start the command, or was cut): exit 255,
    as ssh does, so that it is told apart from the command's own exit codes."""

    exit_code = 255


@dataclass(frozen=True)
class GatewayAccess:
    """What a session needs of the management plane's answer to ``POST /api/v1/environments/{id}/access``
    (``EnvironmentAccess`` on the wire): where the gateway is, and the ticket to show it."""

    gateway_url: str
    environment_id: str
    ticket: str

    @classmethod
    def from_answer(cls, answer: Any) -> GatewayAccess:
        try:
            return cls(str(answer["gateway_url"]), str(answer["environment_id"]), str(answer["ticket"]))
        except (KeyError, TypeError):
            raise GatewayFailure(f"the management plane's access answer lacks the gateway: {answer!r:.300}") from None


@dataclass(frozen=True)
class SessionOptions:
    argv: Sequence[str]
    tty: bool
    env: Mapping[str, str]
    cwd: str | None = None
    user: str | None = None


def wants_tty(choice: str | None) -> bool:
    """``-t`` (``"yes"``), ``-T`` (``"no"``), or by default: a terminal when stdin and stdout are terminals."""
    if choice is not None:
        return choice == "yes"
    return os.isatty(sys.stdin.fileno()) and os.isatty(sys.stdout.fileno())


def exec_url(access: GatewayAccess) -> str:
    base = access.gateway_url.rstrip("/")
    if base.startswith("https://"):
        base = "wss://" + base.removeprefix("https://")
    elif base.startswith("http://"):
        base = "ws://" + base.removeprefix("http://")
    return f"{base}/v1/environments/{access.environment_id}/exec"


def run_session(
    access: GatewayAccess, options: SessionOptions, *, stdin_fd: int | None = None, stdout_fd: int | None = None
) -> int:
    """Run the command through the gateway; its exit code, or ``GatewayFailure``. Input is read from
    ``stdin_fd`` and the terminal's size from ``stdout_fd`` (default: this process's); output goes to
    ``sys.stdout`` and ``sys.stderr``. Resizes are followed only when called from the main thread (signals)."""
    stdin_fd = sys.stdin.fileno() if stdin_fd is None else stdin_fd
    stdout_fd = sys.stdout.fileno() if stdout_fd is None else stdout_fd
    raw = options.tty and os.isatty(stdin_fd)
    with _raw_terminal(stdin_fd) if raw else contextlib.nullcontext():
        return _session(access, options, stdin_fd, stdout_fd)


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


def _session(access: GatewayAccess, options: SessionOptions, stdin_fd: int, stdout_fd: int) -> int:
    env = dict(options.env)
    if options.tty and "TERM" in os.environ:
        env.setdefault("TERM", os.environ["TERM"])
    size = _terminal_size(stdout_fd) if options.tty else None
    start = {
        "argv": list(options.argv),
        "env": env,
        "tty": options.tty,
        "size": None if size is None else list(size),
        "cwd": options.cwd,
        "user": options.user,
    }
    connection = _connect(access)
    resizing = size is not None and threading.current_thread() is threading.main_thread()
    with connection:
        try:
            connection.send_text(json.dumps(start))
        except WebSocketClosed:
            raise GatewayFailure("the gateway closed the session before the command started") from None
        threading.Thread(
            target=_send_stdin, args=(connection, stdin_fd), name="devyard-exec-stdin", daemon=True
        ).start()
        with _resizes_sent(connection, stdout_fd) if resizing else contextlib.nullcontext():
            return _receive(connection)


def _connect(access: GatewayAccess) -> WebSocket:
    try:
        return _connections.open_websocket(
            exec_url(access),
            {"Authorization": f"Bearer {access.ticket}"},
            timeout=_OPEN_TIMEOUT,
            max_size=1024 * 1024,
        )
    except _connections.WebSocketRefused as exc:
        raise GatewayFailure(f"the gateway refused the session ({exc.status}): {exc.body or exc.reason}") from None
    except (_connections.NoAnswer, ValueError) as exc:
        raise GatewayFailure(f"cannot reach the gateway at {access.gateway_url}: {exc}") from None


@contextlib.contextmanager
def _resizes_sent(connection: WebSocket, fd: int) -> Iterator[None]:
    """Send the terminal's size on every SIGWINCH. The handler only writes a byte to a pipe: it runs in the main
    thread, which may be inside the connection's ``recv`` at the time; a thread of its own does the sending."""
    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_write, False)

    def on_resize(_signal: int, _frame: FrameType | None) -> None:
        with contextlib.suppress(OSError):  # a full pipe already holds a wake-up
            os.write(wake_write, b"\0")

    def send_resizes() -> None:
        try:
            while os.read(wake_read, 64):  # empty once the session closed the write end
                size = _terminal_size(fd)
                if size is not None:
                    with contextlib.suppress(WebSocketClosed):
                        connection.send_text(json.dumps({"resize": list(size)}))
        finally:
            os.close(wake_read)

    previous = signal.signal(signal.SIGWINCH, on_resize)
    threading.Thread(target=send_resizes, name="devyard-exec-resize", daemon=True).start()
    try:
        yield
    finally:
        signal.signal(signal.SIGWINCH, previous)
        os.close(wake_write)


def _receive(connection: WebSocket) -> int:
    stdout, stderr = sys.stdout.buffer, sys.stderr.buffer
    try:
        while True:
            message = connection.receive()
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
                code = int(control["exit"])
                # The gateway closes right after the exit code; answering its close lets it end cleanly.
                with contextlib.suppress(WebSocketClosed):
                    connection.receive(timeout=_CLOSE_TIMEOUT)
                return code
            if "error" in control:
                raise GatewayFailure(str(control["error"]))
    except WebSocketClosed as exc:
        detail = f" ({exc.code}{': ' + exc.reason if exc.reason else ''})" if exc.code != 1000 else ""
        raise GatewayFailure(f"the gateway closed the session before the command exited{detail}") from None
    except ValueError as exc:  # a control message that is not JSON
        raise GatewayFailure(f"the gateway sent a message this client does not understand: {exc}") from None


def _send_stdin(connection: WebSocket, fd: int) -> None:
    """Stream stdin as it comes; at its end, tell the gateway. Runs in a thread of its own (stdin may be a
    terminal, a pipe or a file); each chunk is sent before the next is read, so no more is read than is sent."""
    try:
        while True:
            try:
                data = os.read(fd, _READ_CHUNK)
            except OSError:
                data = b""
            if not data:
                connection.send_text(json.dumps({"close_stdin": True}))
                return
            connection.send_binary(bytes([_STDIN]) + data)
    except WebSocketClosed:
        return  # the session ended
