"""The runner's SSH gateway: one SSH server (asyncssh) for all the runner's environments.

Users connect with the tools they have: ``ssh ENV_ID@RUNNER_HOST -p PORT``, ``scp``, ``sftp``, VS Code
Remote-SSH. The agent starts one ``SshGateway`` beside the exec gateway when ``ssh_listen`` is set; sessions and
forwards touch the agent's ``Activity`` (idle timeouts) as their bytes pass.

Admission. The user name is the environment's id. Only public-key authentication is offered; a key is accepted
when the management plane lists it for that environment (``GET /api/v1/environments/{id}/authorized-keys``, asked
per connection and cached for ``KEY_CACHE_SECONDS`` at most, so a removed key stops working within seconds). An
unknown environment, one that is not on this runner, or one that is not running, is refused with an SSH banner
saying why and then "Permission denied": the banner is the only text an SSH client shows before authentication
succeeds, and refusing at authentication means nobody learns more than the banner tells (which is only about the
environment named, never about its keys or owner).

Sessions. A shell (``-l``, the remote user's login shell from the container's ``/etc/passwd``) or a command runs
inside the environment through ``Runtime.open_exec``, as the dev container's remote user with its remoteEnv, with a
terminal when the client asked for one (window changes resize it; signals are passed on). Of the variables the
client sends (``SendEnv``/``SetEnv``) only locale and terminal ones pass (``LANG``, ``LC_*``, ``TERM``...; never
``PATH`` or ``LD_*``). The exit status goes back to the client, or the signal when one killed the command. When
the client goes away first, the command and everything it started in its session are killed (SIGHUP, then
SIGKILL), so nothing is left running inside.

SFTP (and ``scp``, which speaks SFTP) is served by a ``container_files`` worker inside the container's user and
mount namespaces, as the remote user. Local and dynamic forwarding (``ssh -L``, ``ssh -D``) connect through
``Runtime.connect``, from inside the container's network namespace, so services bound to 127.0.0.1 inside are
reachable. Agent forwarding (``ssh -A``) gives the session a socket inside the environment (``SSH_AUTH_SOCK``),
owned by the session's user, relayed to the client's agent and removed with the session. SFTP and agent
forwarding need the linux runtime.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import secrets
import signal
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import asyncssh

from devyard.client import ApiError, AsyncClient, TransportError
from devyard.runner import container_files
from devyard.runner.activity import Activity
from devyard.runner.errors import RunnerError
from devyard.runner.gateway import parse_listen, serve_listener
from devyard.runner.host_process import start_host_process
from devyard.runner.runtime import ExecProcess, ExecRequest, Runtime
from devyard.wire.environments import Environment, EnvironmentPhase
from devyard.wire.ssh_keys import AuthorizedKeys

__all__ = ["KEY_CACHE_SECONDS", "SshAccess", "SshGateway", "accepted_env", "host_key", "server_authorized_keys"]

log = logging.getLogger(__name__)

#: How long the keys the management plane listed for an environment are used before it is asked again.
KEY_CACHE_SECONDS: Final = 3.0
#: Connections not yet authenticated, from one client address and in all (sshd's MaxStartups): more are closed
#: at once, so a flood from one address cannot take the gateway from everyone else.
UNAUTHENTICATED_PER_ADDRESS: Final = 64
UNAUTHENTICATED_TOTAL: Final = 512
#: Between SIGHUP and SIGKILL for a session whose client went away.
_KILL_GRACE: Final = 2.0
#: After the command exited, how long output still held open by its children may keep coming.
_OUTPUT_GRACE: Final = 2.0
_READ_CHUNK: Final = 32 * 1024
#: Input chunks held for a command that has not read them, before reading from the client pauses.
_INPUT_QUEUE: Final = 16
#: Variables a client may set (``SendEnv``/``SetEnv``): locale and terminal ones, as Debian's sshd accepts.
_ACCEPTED_ENV: Final = re.compile(r"^(LANG|LANGUAGE|LC_[A-Z_]+|TZ|TERM|COLORTERM|TERM_PROGRAM(_VERSION)?)$")
#: Finds the remote user's login shell and runs it as a login shell, or with ``-c`` the command ($1), as sshd does.
_LAUNCH: Final = (
    "me=$(id -u); shell=/bin/sh; while IFS=: read -r _n _p uid _g _c _h login; do "
    'if [ "$uid" = "$me" ]; then [ -x "$login" ] && shell=$login; break; fi; done < /etc/passwd 2>/dev/null; '
    'export SHELL="$shell"; if [ $# -eq 0 ]; then exec "$shell" -l; else exec "$shell" -c "$1"; fi'
)
#: Exit codes 128 + N reported as "killed by signal N" (the signals a shell would not exit with on purpose).
_FATAL_SIGNALS: Final[dict[int, str]] = {
    signal.SIGHUP: "HUP",
    signal.SIGINT: "INT",
    signal.SIGQUIT: "QUIT",
    signal.SIGILL: "ILL",
    signal.SIGABRT: "ABRT",
    signal.SIGFPE: "FPE",
    signal.SIGKILL: "KILL",
    signal.SIGSEGV: "SEGV",
    signal.SIGPIPE: "PIPE",
    signal.SIGALRM: "ALRM",
    signal.SIGTERM: "TERM",
}
_SIGNAL_NUMBERS: Final = {name: number for number, name in _FATAL_SIGNALS.items()} | {
    "USR1": int(signal.SIGUSR1),
    "USR2": int(signal.SIGUSR2),
}


def accepted_env(sent: Mapping[str, str]) -> dict[str, str]:
    """The variables of those a client sent that a session gets."""
    return {name: value for name, value in sent.items() if _ACCEPTED_ENV.match(name)}


def host_key(path: Path) -> asyncssh.SSHKey:
    """The gateway's host key at ``path``, made once (ed25519, mode 0600) and kept, so clients' known_hosts stay
    right across restarts."""
    try:
        return asyncssh.read_private_key(path)
    except FileNotFoundError:
        pass
    key = asyncssh.generate_private_key("ssh-ed25519")
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(descriptor, "wb") as file:
        file.write(key.export_private_key())
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)
    return key


async def server_authorized_keys(client: AsyncClient, environment_id: str) -> list[str]:
    """The public keys the management plane lists for ``environment_id`` (OpenSSH lines)."""
    answer = AuthorizedKeys.model_validate(await client.get(f"/api/v1/environments/{environment_id}/authorized-keys"))
    return [key.public_key for key in answer.keys]


@dataclass(frozen=True)
class SshAccess:
    """Who may enter which environment: this runner's, as the agent's informer holds them, with the keys the
    management plane lists for each."""

    runner_id: str
    #: The environment as the agent holds it, or None.
    environment: Callable[[str], Environment | None]
    #: The public keys that may enter an environment; raises ``ApiError`` or ``TransportError``.
    authorized_keys: Callable[[str], Awaitable[list[str]]]

    def refusal(self, environment_id: str) -> str | None:
        """Why ``environment_id`` cannot be entered now, or None."""
        environment = self.environment(environment_id)
        if environment is None or environment.status.runner_id != self.runner_id:
            return f"devyard: no environment {environment_id!r} on this runner (the user name is the environment's id)"
        phase = environment.status.phase
        if phase is not EnvironmentPhase.RUNNING:
            return f"devyard: environment {environment_id} is {phase.value}, not running" + (
                f"; start it with `devyard env start {environment_id}`" if phase is EnvironmentPhase.STOPPED else ""
            )
        return None


class SshGateway:
    """The SSH listener; ``start`` binds it, ``close`` stops it and ends every session."""

    def __init__(
        self,
        runtime: Runtime,
        access: SshAccess,
        *,
        listen: str,
        host_key_path: Path,
        activity: Activity | None = None,
    ) -> None:
        self._runtime = runtime
        self._access = access
        self._host, self._port = parse_listen(listen)
        self._host_key_path = host_key_path
        self._server: asyncssh.SSHAcceptor | None = None
        self._keys: dict[str, tuple[float, frozenset[bytes]]] = {}
        self._key_lookups: dict[str, asyncio.Future[frozenset[bytes]]] = {}
        self._sessions: set[_Session] = set()
        self.activity = activity or Activity()
        #: Client address -> its connections that have not authenticated yet.
        self._unauthenticated: dict[str, int] = {}
        #: The port it listens on; set by ``start``.
        self.port: int | None = None

    async def start(self) -> None:
        """Listen; ``OSError`` when the address cannot be bound."""
        key = host_key(self._host_key_path)
        self._server = await asyncssh.create_server(
            lambda: _Connection(self),
            self._host,
            self._port,
            server_host_keys=[key],
            # Sessions and forwards carry bytes, as they come.
            encoding=None,
            # Passwords, keyboard-interactive and host-based logins are never offered.
            password_auth=False,
            kbdint_auth=False,
            gss_host=None,
            x509_trusted_certs=None,
            allow_scp=False,
            # asyncssh then also listens in a private directory of the runner's host; sessions use their own socket
            # inside the environment instead (``_AgentSocket``).
            agent_forwarding=True,
            x11_forwarding=False,
            login_timeout=30,
            keepalive_interval=30,
            keepalive_count_max=4,
        )
        self.port = int(self._server.sockets[0].getsockname()[1])
        log.info("ssh gateway listening on %s:%d", self._host, self.port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        await asyncio.gather(*(session.end() for session in list(self._sessions)), return_exceptions=True)

    async def serve(self, *, retry_delay: float = 5.0, on_listening: Callable[[], None] | None = None) -> None:
        """Listen (retrying an address that cannot be bound, loudly) and serve until cancelled; ``on_listening``
        is called once the port is known."""
        what = f"ssh gateway on {self._host}:{self._port}"
        await serve_listener(self.start, self.close, what=what, retry_delay=retry_delay, on_listening=on_listening)

    # For connections and sessions.

    @property
    def runtime(self) -> Runtime:
        return self._runtime

    @property
    def access(self) -> SshAccess:
        return self._access

    def touch(self, environment_id: str) -> None:
        self.activity.touch(environment_id)

    def admit_connection(self, address: str) -> bool:
        """Count a new connection from ``address`` until ``authenticated``; False (and not counted) when the
        address, or everyone together, has too many connections that have not authenticated."""
        if self._unauthenticated.get(address, 0) >= UNAUTHENTICATED_PER_ADDRESS:
            return False
        if sum(self._unauthenticated.values()) >= UNAUTHENTICATED_TOTAL:
            return False
        self._unauthenticated[address] = self._unauthenticated.get(address, 0) + 1
        return True

    def authenticated(self, address: str) -> None:
        """A connection ``admit_connection`` counted authenticated, or went away before it did."""
        left = self._unauthenticated.get(address, 0) - 1
        if left > 0:
            self._unauthenticated[address] = left
        else:
            self._unauthenticated.pop(address, None)

    def track(self, session: _Session, open_: bool) -> None:
        if open_:
            self._sessions.add(session)
        else:
            self._sessions.discard(session)

    async def accepts(self, environment_id: str, key: asyncssh.SSHKey) -> bool:
        try:
            keys = await self._authorized(environment_id)
        except (ApiError, TransportError) as exc:
            log.warning("cannot list the keys of %s: %s", environment_id, exc)
            return False
        return key.public_data in keys

    async def _authorized(self, environment_id: str) -> frozenset[bytes]:
        now = time.monotonic()
        cached = self._keys.get(environment_id)
        if cached is not None and cached[0] > now:
            return cached[1]
        # Connections arriving together share one question to the management plane.
        pending = self._key_lookups.get(environment_id)
        if pending is None:
            pending = asyncio.ensure_future(self._ask(environment_id))
            self._key_lookups[environment_id] = pending
            pending.add_done_callback(lambda _: self._key_lookups.pop(environment_id, None))
        return await asyncio.shield(pending)

    async def _ask(self, environment_id: str) -> frozenset[bytes]:
        blobs = set()
        for line in await self._access.authorized_keys(environment_id):
            try:
                blobs.add(asyncssh.import_public_key(line).public_data)
            except (asyncssh.KeyImportError, ValueError):
                log.warning("the management plane listed a key for %s that is not readable", environment_id)
        keys = frozenset(blobs)
        self._keys[environment_id] = (time.monotonic() + KEY_CACHE_SECONDS, keys)
        return keys


class _Connection(asyncssh.SSHServer):
    """One client connection: its admission, then its sessions and forwards."""

    def __init__(self, gateway: SshGateway) -> None:
        self._gateway = gateway
        self._connection: asyncssh.SSHServerConnection | None = None
        self._environment_id = ""
        self._refused = False
        #: The client's address while it counts among the gateway's unauthenticated connections.
        self._counted: str | None = None

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self._connection = conn
        address = str((conn.get_extra_info("peername") or ("",))[0])
        if not self._gateway.admit_connection(address):
            log.warning("ssh connection from %s closed: too many from it (or in all) not yet logged in", address)
            conn.abort()
            return
        self._counted = address

    def connection_lost(self, exc: Exception | None) -> None:
        self._uncount()

    def _uncount(self) -> None:
        if self._counted is not None:
            self._gateway.authenticated(self._counted)
            self._counted = None

    async def begin_auth(self, username: str) -> bool:
        assert self._connection is not None
        self._environment_id = username
        refusal = self._gateway.access.refusal(username)
        if refusal is not None:
            self._refused = True
            log.info("ssh refused for %s: %s", username, refusal)
            self._connection.send_auth_banner(refusal + "\r\n")
        return True

    def public_key_auth_supported(self) -> bool:
        return True

    async def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        if self._refused or username != self._environment_id:
            return False
        return await self._gateway.accepts(username, key)

    def auth_completed(self) -> None:
        self._uncount()
        log.info("ssh session for %s from %s", self._environment_id, self._peer())
        self._gateway.touch(self._environment_id)

    def session_requested(self) -> _Session:
        return _Session(self._gateway, self._environment_id, self._peer(), self._local())

    def connection_requested(self, dest_host: str, dest_port: int, orig_host: str, orig_port: int) -> Any:
        environment_id = self._environment_id

        async def forward(reader: asyncssh.SSHReader[bytes], writer: asyncssh.SSHWriter[bytes]) -> None:
            await _forward(self._gateway, environment_id, dest_host, dest_port, reader, writer)

        return forward

    def server_requested(self, listen_host: str, listen_port: int) -> bool:
        return False

    def _peer(self) -> tuple[str, int]:
        assert self._connection is not None
        address = self._connection.get_extra_info("peername") or ("", 0)
        return str(address[0]), int(address[1])

    def _local(self) -> tuple[str, int]:
        assert self._connection is not None
        address = self._connection.get_extra_info("sockname") or ("", 0)
        return str(address[0]), int(address[1])


class _Session(asyncssh.SSHServerSession[bytes]):
    """A shell, a command or SFTP, relayed between an SSH channel and a process inside the environment."""

    def __init__(self, gateway: SshGateway, environment_id: str, peer: tuple[str, int], local: tuple[str, int]) -> None:
        self._gateway = gateway
        self._environment_id = environment_id
        self._peer = peer
        self._local = local
        self._channel: asyncssh.SSHServerChannel[bytes] | None = None
        self._terminal: tuple[str, tuple[int, int]] | None = None
        self._command: str | None = None
        self._sftp = False
        self._process: ExecProcess | None = None
        self._input: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._writable = asyncio.Event()
        self._writable.set()
        self._gone = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._steps: set[asyncio.Future[None]] = set()
        self._agent: _AgentSocket | None = None

    # asyncssh's callbacks.

    def connection_made(self, chan: asyncssh.SSHServerChannel[bytes]) -> None:
        self._channel = chan

    def pty_requested(self, term_type: str, term_size: tuple[int, int, int, int], term_modes: Any) -> bool:
        columns, rows = term_size[0] or 80, term_size[1] or 24
        self._terminal = (term_type or "xterm", (rows, columns))
        return True

    def shell_requested(self) -> bool:
        return True

    def exec_requested(self, command: str) -> bool:
        self._command = command
        return True

    def subsystem_requested(self, subsystem: str) -> bool:
        self._sftp = subsystem == "sftp"
        return self._sftp

    def session_started(self) -> None:
        self._gateway.track(self, True)
        self._task = asyncio.create_task(self._run(), name=f"ssh-session-{self._environment_id}")

    def data_received(self, data: bytes, datatype: int | None) -> None:
        self._gateway.touch(self._environment_id)
        self._input.put_nowait(data)
        if self._input.qsize() >= _INPUT_QUEUE and self._channel is not None:
            self._channel.pause_reading()

    def eof_received(self) -> bool:
        self._input.put_nowait(None)
        return True  # keep our side open: output and the exit status still come

    def signal_received(self, signal_name: str) -> None:
        number = _SIGNAL_NUMBERS.get(signal_name)
        if number is not None and self._process is not None:
            self._later(self._process.signal(number))

    def terminal_size_changed(self, width: int, height: int, pixwidth: int, pixheight: int) -> None:
        if self._process is not None and width and height:
            self._later(self._process.resize(height, width))

    def _later(self, step: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(step)
        self._steps.add(task)
        task.add_done_callback(self._steps.discard)

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self._gone.set()
        self._writable.set()

    async def end(self) -> None:
        """End the session now (the gateway closes)."""
        self._gone.set()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)

    # The relay.

    async def _run(self) -> None:
        channel = self._channel
        assert channel is not None
        try:
            try:
                self._process = await self._start()
            except (RunnerError, OSError) as exc:
                channel.write_stderr(f"devyard: cannot start the session in {self._environment_id}: {exc}\r\n".encode())
                channel.exit(255)
                return
            await self._relay(self._process)
        except Exception:
            log.exception("ssh session in %s failed", self._environment_id)
            with contextlib.suppress(Exception):
                channel.exit(255)
        finally:
            self._gateway.track(self, False)
            if self._agent is not None:
                self._agent.close()

    async def _start(self) -> ExecProcess:
        runtime, environment_id = self._gateway.runtime, self._environment_id
        if self._sftp:
            pid, user = await _container_entry(runtime, environment_id)
            return await start_host_process(container_files.worker_argv(pid, user), tty=False)
        env = accepted_env(self._channel.get_environment() if self._channel is not None else {})
        env["SSH_CONNECTION"] = f"{self._peer[0]} {self._peer[1]} {self._local[0]} {self._local[1]}"
        env["SSH_CLIENT"] = f"{self._peer[0]} {self._peer[1]} {self._local[1]}"
        connection = self._channel.get_connection() if self._channel is not None else None
        if isinstance(connection, asyncssh.SSHServerConnection) and connection.get_agent_path() is not None:
            self._agent = await _AgentSocket.open(runtime, environment_id, connection)
            if self._agent is not None:
                env["SSH_AUTH_SOCK"] = self._agent.path
        argv = ["/bin/sh", "-c", _LAUNCH, "sh"] + ([self._command] if self._command is not None else [])
        size = None
        if self._terminal is not None:
            env["TERM"] = self._terminal[0]
            size = self._terminal[1]
        request = ExecRequest(argv=argv, env=env, tty=self._terminal is not None, size=size)
        return await runtime.open_exec(environment_id, request)

    async def _relay(self, process: ExecProcess) -> None:
        channel = self._channel
        assert channel is not None
        outputs = [asyncio.create_task(self._pump_output(process.stdout, None))]
        if process.stderr is not None:
            outputs.append(asyncio.create_task(self._pump_output(process.stderr, asyncssh.EXTENDED_DATA_STDERR)))
        inputs = asyncio.create_task(self._pump_input(process))
        exited = asyncio.create_task(process.wait())
        gone = asyncio.create_task(self._gone.wait())
        try:
            await asyncio.wait({exited, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not exited.done():
                # The client went away first: nobody is left to talk to what runs for it.
                await _end_process(process, exited)
                return
            _, pending = await asyncio.wait(outputs, timeout=_OUTPUT_GRACE)
            for task in pending:
                task.cancel()
            code = exited.result()
            name = _FATAL_SIGNALS.get(code - 128) if code > 128 and not self._sftp else None
            if name is not None:
                channel.exit_with_signal(name)
            else:
                channel.exit(code)
        finally:
            tasks: list[asyncio.Task[Any]] = [*outputs, inputs, exited, gone]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            with contextlib.suppress(Exception):
                process.stdin.close()

    async def _pump_output(self, stream: asyncio.StreamReader, datatype: int | None) -> None:
        channel = self._channel
        assert channel is not None
        while True:
            data = await stream.read(_READ_CHUNK)
            if not data or self._gone.is_set():
                return
            self._gateway.touch(self._environment_id)
            await self._writable.wait()
            if self._gone.is_set():
                return
            channel.write(data, datatype)

    async def _pump_input(self, process: ExecProcess) -> None:
        while True:
            data = await self._input.get()
            if self._input.qsize() < _INPUT_QUEUE // 2 and self._channel is not None:
                self._channel.resume_reading()
            try:
                if data is None:
                    if process.stdin.can_write_eof():
                        process.stdin.write_eof()
                    return
                process.stdin.write(data)
                await process.stdin.drain()
            except (ConnectionError, RuntimeError):
                return  # the process closed its input


async def _end_process(process: ExecProcess, exited: asyncio.Task[int]) -> None:
    """SIGHUP what a session runs, then SIGKILL it and every process of its sessions inside the container."""
    pid = getattr(process, "pid", None)
    # Who belongs to the session is known only while its leader lives: SIGHUP may end it and orphan the rest.
    members = _session_members(pid) if isinstance(pid, int) else None
    await process.signal(signal.SIGHUP)
    _, pending = await asyncio.wait({exited}, timeout=_KILL_GRACE)
    if members is not None:
        _kill_members(*members)
    if pending:
        await process.signal(signal.SIGKILL)
        await asyncio.wait({exited}, timeout=_KILL_GRACE)


def _session_members(root: int) -> tuple[set[int], set[int], set[int]]:
    """What ``root`` (``runc exec``) started: its descendants, and their process groups and sessions (a
    terminal's session and its jobs), which hold what they start later even once orphaned."""
    table = _process_table()
    pids = {root} if root in table else set()
    size = -1
    while size != len(pids):
        size = len(pids)
        pids |= {pid for pid, (ppid, _, _) in table.items() if ppid in pids}
    own = {0, 1, os.getpgrp(), os.getsid(0)}
    groups = ({table[pid][1] for pid in pids} | {root}) - own
    sessions = {table[pid][2] for pid in pids} - own
    return pids, groups, sessions


def _kill_members(pids: set[int], groups: set[int], sessions: set[int]) -> None:
    """SIGKILL the processes of ``_session_members`` and their descendants, again until none is left, as a
    process may fork while we look."""
    for _ in range(5):
        table = _process_table()
        doomed = {pid for pid, (_, pgid, sid) in table.items() if pid in pids or pgid in groups or sid in sessions}
        size = -1
        while size != len(doomed):
            size = len(doomed)
            doomed |= {pid for pid, (ppid, _, _) in table.items() if ppid in doomed}
        doomed -= {os.getpid(), 1}
        if not doomed:
            return
        for pid in doomed:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        pids = set()  # numbers of processes already killed may be reused: from now on only groups and sessions


def _process_table() -> dict[int, tuple[int, int, int]]:
    """Every process on the host: pid -> (parent, process group, session)."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as file:
                fields = file.read().rpartition(b")")[2].split()
        except OSError:
            continue
        table[int(entry)] = (int(fields[1]), int(fields[2]), int(fields[3]))
    return table


class _AgentSocket:
    """A socket inside the environment that the session's ``SSH_AUTH_SOCK`` names: each connection to it is relayed
    to the client's agent over the SSH connection. It lives in a directory of its own under the container's /tmp
    (0700, the session user's; made from outside through ``/proc/PID/root`` without following symlinks) and is
    removed when the session ends."""

    def __init__(self, server: asyncio.AbstractServer, tmp: int, directory: int, name: str) -> None:
        self._server = server
        self._tmp = tmp
        self._directory = directory
        self._name = name
        self.path = f"/tmp/{name}/agent.sock"

    @classmethod
    async def open(
        cls, runtime: Runtime, environment_id: str, connection: asyncssh.SSHServerConnection
    ) -> _AgentSocket | None:
        try:
            pid, user = await _container_entry(runtime, environment_id)
            uid, gid = container_files.host_ids(pid, user)
        except OSError as exc:
            log.info("no agent forwarding in %s: %s", environment_id, exc)
            return None
        name = f"ssh-devyard-{secrets.token_hex(8)}"
        root = os.open(f"/proc/{pid}/root", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            tmp = os.open("tmp", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=root)
        except OSError as exc:
            log.info("no agent forwarding in %s: no /tmp: %s", environment_id, exc)
            return None
        finally:
            os.close(root)
        directory = -1
        try:
            os.mkdir(name, 0o700, dir_fd=tmp)
            directory = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=tmp)

            async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                await _relay_agent(connection, reader, writer)

            server = await asyncio.start_unix_server(relay, path=f"/proc/self/fd/{directory}/agent.sock")
            os.chown("agent.sock", uid, gid, dir_fd=directory, follow_symlinks=False)
            os.fchown(directory, uid, gid)
        except OSError as exc:
            log.info("no agent forwarding in %s: %s", environment_id, exc)
            if directory >= 0:
                os.close(directory)
            with contextlib.suppress(OSError):
                os.rmdir(name, dir_fd=tmp)
            os.close(tmp)
            return None
        return cls(server, tmp, directory, name)

    def close(self) -> None:
        self._server.close()
        # Without following links: the user owns the directory and may have put anything there.
        with contextlib.suppress(OSError):
            os.unlink("agent.sock", dir_fd=self._directory)
        with contextlib.suppress(OSError):
            os.rmdir(self._name, dir_fd=self._tmp)
        os.close(self._directory)
        os.close(self._tmp)


async def _relay_agent(
    connection: asyncssh.SSHServerConnection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    try:
        agent_reader, agent_writer = await connection.open_agent_connection()
    except (asyncssh.Error, OSError):
        writer.close()
        return

    async def inward() -> None:
        while data := await reader.read(_READ_CHUNK):
            agent_writer.write(data)
            await agent_writer.drain()
        agent_writer.write_eof()

    async def outward() -> None:
        while data := await agent_reader.read(_READ_CHUNK):
            writer.write(data)
            await writer.drain()

    try:
        await asyncio.gather(inward(), outward())
    except (ConnectionError, asyncssh.Error, OSError):
        pass
    finally:
        agent_writer.close()
        writer.close()


async def _container_entry(runtime: Runtime, environment_id: str) -> tuple[int, str]:
    """The host pid of the container's PID 1 and the user sessions run as, for acting inside it from outside."""
    from devyard.runner.linux.runtime import LinuxRuntime

    if not isinstance(runtime, LinuxRuntime):
        raise OSError(f"the {runtime.name} runtime cannot serve files or forward agents; the linux runtime can")
    try:
        return await runtime.container_entry(environment_id)
    except RunnerError as exc:
        raise OSError(str(exc)) from exc


async def _forward(
    gateway: SshGateway,
    environment_id: str,
    host: str,
    port: int,
    reader: asyncssh.SSHReader[bytes],
    writer: asyncssh.SSHWriter[bytes],
) -> None:
    """Relay one ``direct-tcpip`` channel to ``host:port`` as seen from inside the environment."""
    try:
        sock = await gateway.runtime.connect(environment_id, host, port)
    except (RunnerError, OSError) as exc:
        log.info("ssh forward in %s to %s:%d failed: %s", environment_id, host, port, exc)
        writer.close()
        return
    gateway.touch(environment_id)
    inside_reader, inside_writer = await asyncio.open_connection(sock=sock)

    async def outward() -> None:
        while data := await inside_reader.read(_READ_CHUNK):
            gateway.touch(environment_id)
            writer.write(data)
            await writer.drain()
        writer.write_eof()

    async def inward() -> None:
        while data := await reader.read(_READ_CHUNK):
            gateway.touch(environment_id)
            inside_writer.write(data)
            await inside_writer.drain()
        if inside_writer.can_write_eof():
            inside_writer.write_eof()

    try:
        await asyncio.gather(outward(), inward())
    except (ConnectionError, asyncssh.Error, OSError):
        pass
    finally:
        inside_writer.close()
        writer.close()
