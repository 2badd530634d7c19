"""The runner's gateway: where users reach their environments, with tickets the management plane issued.

The agent starts one ``Gateway`` once it has its credential and its gateway key
(``GET /api/v1/runners/{id}/gateway-key``), and reports ``Gateway.url`` in its heartbeat
(``status.gateway.http_url``). The management plane never connects here; users do, with a ticket from
``POST /api/v1/environments/{id}/access`` (``devyard.wire.access``). It serves one WebSocket endpoint, exec; the
SSH gateway (``ssh_gateway``) and the port proxy (``ports``) are listeners of their own beside it, sharing the
runtime and the environments' ``Activity``.

Exec: ``GET /v1/environments/{id}/exec`` upgraded to a WebSocket, with ``Authorization: Bearer <ticket>``.
Before the upgrade the ticket is checked: its signature (this runner's key), its expiry, its scope, that it
names this environment and this runner, that it was not used before, and that the environment is assigned to
this runner (the agent's informer cache). A missing, malformed, forged or expired ticket answers 401; a valid
ticket for something else, or a used one, 403; an unknown path 404. The body says why, in plain text.

After the upgrade, the protocol:

- The client's first message is a text frame, ``ExecStart`` as JSON:
  ``{"argv": [...], "env": {...}, "tty": bool, "size": [rows, cols], "cwd": str, "user": str}``
  (all but ``argv`` optional).
- Binary frames carry data: the first byte names the stream (0 stdin, from the client; 1 stdout and 2 stderr,
  from the gateway), the rest is the data. With a TTY all output comes as stdout.
- Text frames carry control messages, JSON objects. From the client: ``{"resize": [rows, cols]}``,
  ``{"close_stdin": true}`` (end of input; with a TTY the terminal's end-of-file character is sent instead,
  as a terminal's ^D would), ``{"signal": N}``. From the gateway: ``{"exit": code}`` once the process exited
  and its output was sent (the exit code is 128 + N when signal N killed it), then a normal close (1000); or
  ``{"error": message}`` when the process could not be started or the protocol was broken, then a close
  with code 1011 (or 1008 for a protocol error).
- The client closing the connection kills the process (SIGHUP, then SIGKILL after a few seconds).

Backpressure: output is read from the process only as fast as the WebSocket takes it (each send waits until
the socket's write buffer drains below its limit), and stdin frames are read only as fast as the process takes
them; nothing is buffered without bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final

import pydantic
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from devyard.runner.activity import Activity
from devyard.runner.errors import RunnerError
from devyard.runner.runtime import ExecProcess, ExecRequest, Runtime
from devyard.wire.access import ExecStart, TicketClaims, TicketError, verify_ticket
from devyard.wire.environments import Environment

__all__ = ["STDERR", "STDIN", "STDOUT", "Gateway", "TicketCheck", "gateway_url", "parse_listen", "serve_listener"]

log = logging.getLogger(__name__)

STDIN, STDOUT, STDERR = 0, 1, 2
_EXEC_PATH: Final = "/v1/environments/"
_EXEC_SUFFIX: Final = "/exec"
#: How long a client has to send its ``ExecStart`` after the upgrade.
_START_TIMEOUT: Final = 10.0
#: After the process exited, how long output still held open by its children may keep coming.
_OUTPUT_GRACE: Final = 2.0
#: Between SIGHUP and SIGKILL for a process whose client went away.
_KILL_GRACE: Final = 5.0
_READ_CHUNK: Final = 32 * 1024
#: The terminal's end-of-file character (^D): what ``close_stdin`` sends with a TTY.
_TERMINAL_EOF: Final = b"\x04"


def parse_listen(listen: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6) as a host and a port; port 0 picks a free one."""
    host, separator, port = listen.rpartition(":")
    if not separator or not port.isdigit():
        raise ValueError(f"gateway_listen {listen!r} is not HOST:PORT")
    return host.strip("[]") or "0.0.0.0", int(port)


def gateway_url(configured: str | None, host: str, port: int, hostname: str) -> str:
    """The URL users reach the gateway at: the configured one, else the listening address (the host's name
    when it listens on every address)."""
    if configured:
        return configured.rstrip("/")
    if host in ("0.0.0.0", "::", ""):
        host = hostname
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


async def serve_listener(
    start: Callable[[], Awaitable[None]],
    close: Callable[[], Awaitable[None]],
    *,
    what: str,
    retry_delay: float,
    on_listening: Callable[[], None] | None,
) -> None:
    """Listen with ``start`` (retrying, loudly, an address that cannot be bound: ``OSError``), call
    ``on_listening`` once it listens, and serve until cancelled; then ``close``. ``what`` names the listener and its
    address in the log."""
    while True:
        try:
            await start()
            if on_listening is not None:
                on_listening()
            break
        except OSError as exc:
            log.error("the %s cannot listen, retrying: %s", what, exc)
        await asyncio.sleep(retry_delay)
    try:
        await asyncio.Event().wait()
    finally:
        await close()


@dataclass(frozen=True)
class TicketCheck:
    """Admission: a ticket is good for one runner's environments, those the agent holds as assigned to it."""

    runner_id: str
    key: bytes
    #: The environment as the agent's informer holds it, or None.
    environment: Callable[[str], Environment | None]
    now: Callable[[], float] = time.time

    def admit(self, environment_id: str, ticket: str, used: dict[str, int]) -> tuple[int, str] | TicketClaims:
        """The claims of a good ticket, else the HTTP status and the reason to refuse it. ``used`` maps the
        nonces of admitted, unexpired tickets to their expiry: a ticket opens one connection."""
        now = self.now()
        try:
            claims = verify_ticket(ticket, self.key, now=now)
        except TicketError as exc:
            return 401, str(exc)
        if claims.runner_id != self.runner_id:
            return 403, f"the ticket is for runner {claims.runner_id}, not this one ({self.runner_id})"
        if claims.environment_id != environment_id:
            return 403, f"the ticket is for environment {claims.environment_id}, not {environment_id}"
        environment = self.environment(environment_id)
        if environment is None or environment.status.runner_id != self.runner_id:
            return 403, f"environment {environment_id} is not on this runner"
        for nonce in [nonce for nonce, expiry in used.items() if expiry <= now]:
            del used[nonce]
        if claims.nonce in used:
            return 403, "the ticket was used already: ask the management plane for a new one"
        used[claims.nonce] = claims.exp
        return claims


class Gateway:
    """The gateway's listeners; ``start`` binds them, ``close`` stops them and ends every session."""

    def __init__(
        self,
        runtime: Runtime,
        check: TicketCheck,
        *,
        listen: str,
        url: str | None,
        hostname: str,
        activity: Activity | None = None,
    ) -> None:
        self._runtime = runtime
        self._activity = activity or Activity()
        self._check = check
        self._host, self._port = parse_listen(listen)
        self._configured_url = url
        self._hostname = hostname
        self._server: Server | None = None
        self._admitted: dict[ServerConnection, TicketClaims] = {}
        self._used_nonces: dict[str, int] = {}
        #: The URL users reach the gateway at; set by ``start``.
        self.url: str | None = None
        #: The port it listens on; set by ``start``.
        self.port: int | None = None

    async def start(self) -> None:
        """Listen; ``OSError`` when the address cannot be bound."""
        self._server = await serve(
            self._session,
            self._host,
            self._port,
            process_request=self._admit,
            compression=None,
            max_size=1024 * 1024,
            logger=log,
        )
        self.port = int(next(iter(self._server.sockets)).getsockname()[1])
        self.url = gateway_url(self._configured_url, self._host, self.port, self._hostname)
        log.info("gateway listening on %s:%d, reached at %s", self._host, self.port, self.url)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    # Before the upgrade.

    def _admit(self, connection: ServerConnection, request: Request) -> Response | None:
        path = request.path.split("?", 1)[0]
        if not (path.startswith(_EXEC_PATH) and path.endswith(_EXEC_SUFFIX)):
            return _refuse(connection, 404, f"no such endpoint: {path}")
        environment_id = path[len(_EXEC_PATH) : -len(_EXEC_SUFFIX)]
        if not environment_id or "/" in environment_id:
            return _refuse(connection, 404, f"no such endpoint: {path}")
        header = request.headers.get("Authorization", "")
        scheme, _, ticket = header.partition(" ")
        if scheme.lower() != "bearer" or not ticket.strip():
            return _refuse(
                connection,
                401,
                "no ticket: send 'Authorization: Bearer <ticket>' with a ticket from "
                f"POST /api/v1/environments/{environment_id}/access",
            )
        admitted = self._check.admit(environment_id, ticket.strip(), self._used_nonces)
        if isinstance(admitted, tuple):
            status, reason = admitted
            log.info("gateway refused %s for %s: %s", status, environment_id, reason)
            return _refuse(connection, status, reason)
        self._admitted[connection] = admitted
        return None

    # After the upgrade.

    async def _session(self, connection: ServerConnection) -> None:
        claims = self._admitted.pop(connection, None)
        if claims is None:  # cannot happen: the upgrade passed _admit
            await connection.close(1008, "not admitted")
            return
        try:
            start = await self._receive_start(connection)
        except _ProtocolError as exc:
            await _fail(connection, str(exc), 1008)
            return
        except (ConnectionClosed, TimeoutError):
            return
        request = ExecRequest(
            argv=start.argv, env=start.env, tty=start.tty, size=start.size, cwd=start.cwd, user=start.user
        )
        try:
            process = await self._runtime.open_exec(claims.environment_id, request)
        except RunnerError as exc:
            await _fail(connection, f"cannot start {start.argv[0]!r} in {claims.environment_id}: {exc}", 1011)
            return
        log.info("exec in %s for %s: %s (tty=%s)", claims.environment_id, claims.user_id, start.argv[0], start.tty)
        touch = functools.partial(self._activity.touch, claims.environment_id)
        await _Session(connection, process, tty=start.tty, touch=touch).run()

    async def _receive_start(self, connection: ServerConnection) -> ExecStart:
        async with asyncio.timeout(_START_TIMEOUT):
            message = await connection.recv()
        if not isinstance(message, str):
            raise _ProtocolError("the first message must be a text frame: the command to run, as JSON")
        try:
            return ExecStart.model_validate_json(message)
        except pydantic.ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:5])
            raise _ProtocolError(f"the command to run is not valid: {problems}") from None


class _ProtocolError(Exception):
    pass


class _Session:
    """One exec: pumps between a WebSocket and a process until the process exited and its output was sent."""

    def __init__(
        self, connection: ServerConnection, process: ExecProcess, *, tty: bool, touch: Callable[[], None]
    ) -> None:
        self._connection = connection
        #: Records the environment's activity (idle timeouts): called as data passes either way.
        self._touch = touch
        self._process = process
        self._tty = tty
        self._stdin_open = True

    async def run(self) -> None:
        process, connection = self._process, self._connection
        outputs = [asyncio.create_task(self._pump_output(process.stdout, STDOUT))]
        if process.stderr is not None:
            outputs.append(asyncio.create_task(self._pump_output(process.stderr, STDERR)))
        inputs = asyncio.create_task(self._pump_input())
        exited = asyncio.create_task(process.wait())
        try:
            await asyncio.wait({exited, inputs}, return_when=asyncio.FIRST_COMPLETED)
            if not exited.done():
                # The client went away (or broke the protocol) first: the process has no one to talk to.
                await self._end_process(exited)
                return
            # Output its children still hold open may come a little longer; then the session ends.
            _, pending = await asyncio.wait(outputs, timeout=_OUTPUT_GRACE)
            for task in pending:
                task.cancel()
            await asyncio.gather(*outputs, return_exceptions=True)
            code = exited.result()
            with contextlib.suppress(ConnectionClosed):
                await connection.send(json.dumps({"exit": code}))
                await connection.close(1000)
        finally:
            tasks: list[asyncio.Task[Any]] = [*outputs, inputs, exited]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._close_stdin(hard=True)

    async def _end_process(self, exited: asyncio.Task[int]) -> None:
        await self._process.signal(signal.SIGHUP)
        _, pending = await asyncio.wait({exited}, timeout=_KILL_GRACE)
        if pending:
            await self._process.signal(signal.SIGKILL)
            await asyncio.wait({exited}, timeout=_KILL_GRACE)

    async def _pump_output(self, stream: asyncio.StreamReader, number: int) -> None:
        prefix = bytes([number])
        while True:
            data = await stream.read(_READ_CHUNK)
            if not data:
                return
            self._touch()
            try:
                await self._connection.send(prefix + data)
            except ConnectionClosed:
                return

    async def _pump_input(self) -> None:
        """Until the client closes (or breaks the protocol): stdin data and control messages."""
        connection = self._connection
        try:
            async for message in connection:
                self._touch()
                if isinstance(message, bytes):
                    if not message or message[0] != STDIN:
                        await _fail(connection, "data frames from the client must be stdin (stream 0)", 1008)
                        return
                    await self._write_stdin(message[1:])
                else:
                    if not await self._control(message):
                        return
        except ConnectionClosed:
            return

    async def _control(self, message: str) -> bool:
        try:
            control: Any = json.loads(message)
        except ValueError:
            control = None
        if not isinstance(control, dict):
            await _fail(self._connection, "a control message is a JSON object", 1008)
            return False
        if "resize" in control:
            size = control["resize"]
            if not _is_size(size):
                await _fail(self._connection, "resize takes [rows, columns]", 1008)
                return False
            await self._process.resize(int(size[0]), int(size[1]))
        if control.get("close_stdin"):
            if self._tty:
                await self._write_stdin(_TERMINAL_EOF)
            else:
                self._close_stdin(hard=False)
        if "signal" in control:
            number = control["signal"]
            if not isinstance(number, int) or isinstance(number, bool) or not 0 < number < 65:
                await _fail(self._connection, "signal takes a signal number", 1008)
                return False
            await self._process.signal(number)
        return True

    async def _write_stdin(self, data: bytes) -> None:
        if not self._stdin_open or not data:
            return
        stdin = self._process.stdin
        try:
            stdin.write(data)
            await stdin.drain()
        except (BrokenPipeError, ConnectionResetError, RuntimeError):
            # The process closed its input or exited: later input has nowhere to go.
            self._stdin_open = False

    def _close_stdin(self, *, hard: bool) -> None:
        if not self._stdin_open and not hard:
            return
        self._stdin_open = False
        stdin = self._process.stdin
        with contextlib.suppress(OSError, RuntimeError):
            if stdin.can_write_eof() and not hard:
                stdin.write_eof()
            else:
                stdin.close()


def _is_size(value: Any) -> bool:
    return (
        isinstance(value, list)
        and len(value) == 2
        and all(isinstance(n, int) and not isinstance(n, bool) and 0 < n < 65536 for n in value)
    )


def _refuse(connection: ServerConnection, status: int, reason: str) -> Response:
    response = connection.respond(status, reason + "\n")
    if status == 401:
        response.headers["WWW-Authenticate"] = "Bearer"
    return response


async def _fail(connection: ServerConnection, message: str, code: int) -> None:
    with contextlib.suppress(ConnectionClosed):
        await connection.send(json.dumps({"error": message}))
        await connection.close(code, message[:120])
