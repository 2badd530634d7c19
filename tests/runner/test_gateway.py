"""``devyard env exec`` end to end: the real management plane issues tickets, a real agent on the fake runtime runs
its gateway on 127.0.0.1, and clients speak the exec protocol to it: the ``websockets`` client in this process,
and the ``devyard`` command as a subprocess, with pipes and with a real pseudo-terminal.

The fake runtime runs commands as host processes (``fake_runtime``), so ``tty`` and ``stty size`` see a real
terminal. Tickets that must be refused are made here with the runner's own key (fetched with its credential),
so that only the one thing under test is wrong with each.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import pty
import secrets
import select
import struct
import subprocess
import sys
import termios
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus

from devyard.client import AsyncClient
from devyard.runner import credentials
from devyard.runner.agent import Agent
from devyard.wire.access import EnvironmentAccess, GatewayKey, TicketClaims, decode_key, sign_ticket
from devyard.wire.environments import Environment, EnvironmentPhase
from devyard.wire.runners import Runner, RunnerCreated
from support.live_server import LiveServer

from .conftest import FAST_RETRY, fast_settings, running
from .test_agent_e2e import wait_for_environment

_SCRIPT = Path(sys.executable).with_name("devyard")
DEVYARD = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "devyard"]


@dataclass
class Setup:
    server: LiveServer
    admin: AsyncClient
    agent: Agent
    runner_id: str
    env_id: str
    state_dir: Path

    async def access(self, client: AsyncClient | None = None) -> EnvironmentAccess:
        answer = await (client or self.admin).post(f"/api/v1/environments/{self.env_id}/access")
        return EnvironmentAccess.model_validate(answer)

    async def runner_key(self) -> bytes:
        credential = credentials.load(self.state_dir / "credential.json")
        assert credential is not None
        async with AsyncClient(self.server.url, credential.token) as runner:
            answer = await runner.get(f"/api/v1/runners/{self.runner_id}/gateway-key")
        return decode_key(GatewayKey.model_validate(answer).key)

    def url(self, env_id: str | None = None) -> str:
        assert self.agent.gateway is not None and self.agent.gateway.url is not None
        base = self.agent.gateway.url.replace("http://", "ws://")
        return f"{base}/v1/environments/{env_id or self.env_id}/exec"


@pytest.fixture
async def setup(server: LiveServer, tmp_path: Path) -> AsyncIterator[Setup]:
    async with AsyncClient(server.url, server.admin_token, retry=FAST_RETRY) as admin:
        created = RunnerCreated.model_validate(await admin.post("/api/v1/runners", {"metadata": {"name": "gw"}}))
        runner_id = created.runner.metadata.id
        await admin.post("/api/v1/environment-classes", {"metadata": {"name": "c"}, "spec": {"default": True}})
        state_dir = tmp_path / "runner"
        settings = fast_settings(
            state_dir, server=server.url, token=created.exchange_token, gateway_listen="127.0.0.1:0"
        )
        agent = Agent(settings, retry=FAST_RETRY, stop_grace=5)
        async with running(agent):
            await asyncio.wait_for(agent.wait_synced(), timeout=20)
            env_id = Environment.model_validate(await admin.post("/api/v1/environments", {"spec": {}})).metadata.id
            await wait_for_environment(admin, env_id, EnvironmentPhase.RUNNING)
            deadline = time.monotonic() + 20
            while True:
                runner = Runner.model_validate(await admin.get(f"/api/v1/runners/{runner_id}"))
                if runner.status.gateway and runner.status.gateway.http_url:
                    break
                assert time.monotonic() < deadline, "the runner never reported its gateway"
                await asyncio.sleep(0.05)
            assert agent.gateway is not None
            assert runner.status.gateway.http_url == f"http://127.0.0.1:{agent.gateway.port}"
            yield Setup(server, admin, agent, runner_id, env_id, state_dir)


@dataclass
class Outcome:
    stdout: bytes
    stderr: bytes
    exit: int | None
    error: str | None


async def start(url: str, ticket: str, **command: Any) -> ClientConnection:
    connection = await connect(url, additional_headers={"Authorization": f"Bearer {ticket}"})
    await connection.send(json.dumps(command))
    return connection


async def collect(connection: ClientConnection, *, until: bytes | None = None) -> Outcome:
    """Read frames until the exit (or, with ``until``, until stdout contains it)."""
    stdout, stderr = bytearray(), bytearray()
    async with asyncio.timeout(20):
        async for message in connection:
            if isinstance(message, bytes):
                (stdout if message[0] == 1 else stderr).extend(message[1:])
                if until is not None and until in stdout:
                    break
            else:
                control = json.loads(message)
                if "exit" in control or "error" in control:
                    return Outcome(bytes(stdout), bytes(stderr), control.get("exit"), control.get("error"))
    return Outcome(bytes(stdout), bytes(stderr), None, None)


async def test_output_goes_to_the_right_streams_and_the_exit_code_comes_back(setup: Setup) -> None:
    access = await setup.access()
    assert access.gateway_url == setup.agent.gateway.url if setup.agent.gateway else False
    connection = await start(setup.url(), access.ticket, argv=["sh", "-c", "echo out; echo err >&2; exit 7"])
    outcome = await collect(connection)
    assert (outcome.stdout, outcome.stderr, outcome.exit) == (b"out\n", b"err\n", 7)


async def test_stdin_is_streamed_and_closing_it_ends_the_input(setup: Setup) -> None:
    connection = await start(setup.url(), (await setup.access()).ticket, argv=["cat"])
    await connection.send(b"\x00first line\n")
    assert (await collect(connection, until=b"first line\n")).stdout == b"first line\n"  # before stdin ends
    await connection.send(b"\x00second\n")
    await connection.send(json.dumps({"close_stdin": True}))
    outcome = await collect(connection)
    assert (outcome.stdout, outcome.exit) == (b"second\n", 0)


async def test_a_terminal_session_sees_a_pty_and_its_resizes(setup: Setup) -> None:
    script = "tty; stty size; read line; stty size; exit 3"
    connection = await start(
        setup.url(), (await setup.access()).ticket, argv=["sh", "-c", script], tty=True, size=[24, 80]
    )
    first = await collect(connection, until=b"24 80")
    assert first.stdout.startswith(b"/dev/pts/"), first.stdout
    await connection.send(json.dumps({"resize": [40, 132]}))
    await connection.send(b"\x00go\r")
    rest = await collect(connection)
    assert b"40 132" in rest.stdout, rest.stdout
    assert (rest.stderr, rest.exit) == (b"", 3)


async def test_a_signal_ends_the_process_with_128_plus_its_number(setup: Setup) -> None:
    connection = await start(setup.url(), (await setup.access()).ticket, argv=["sh", "-c", "echo ready; exec sleep 30"])
    await collect(connection, until=b"ready\n")
    await connection.send(json.dumps({"signal": 15}))
    assert (await collect(connection)).exit == 128 + 15


async def test_a_command_that_cannot_start_is_an_error_message(setup: Setup) -> None:
    connection = await start(setup.url(), (await setup.access()).ticket, argv=["/nonexistent/program"])
    outcome = await collect(connection)
    assert outcome.exit is None and outcome.error is not None and "/nonexistent/program" in outcome.error


def claims(setup: Setup, **changes: Any) -> TicketClaims:
    values: dict[str, Any] = {
        "environment_id": setup.env_id,
        "user_id": "usr_test",
        "runner_id": setup.runner_id,
        "scope": "exec",
        "exp": int(time.time()) + 60,
        "nonce": secrets.token_urlsafe(12),
        **changes,
    }
    return TicketClaims(**values)


async def refused(url: str, headers: dict[str, str]) -> tuple[int, str]:
    with pytest.raises(InvalidStatus) as caught:
        await connect(url, additional_headers=headers)
    response = caught.value.response
    return response.status_code, response.body.decode()


async def test_bad_tickets_are_refused_before_the_upgrade_with_a_reason(setup: Setup) -> None:
    key = await setup.runner_key()
    good = sign_ticket(claims(setup), key)
    payload, _, signature = good.partition(".")
    forged = f"{payload}.{signature[:-2]}{'AA' if not signature.endswith('AA') else 'BB'}"
    other_key = sign_ticket(claims(setup), b"\x01" * 32)
    expired = sign_ticket(claims(setup, exp=int(time.time()) - 1), key)
    other_env = sign_ticket(claims(setup, environment_id="env_00000000000000000000000000"), key)
    other_runner = sign_ticket(claims(setup, runner_id="run_00000000000000000000000000"), key)
    cases = [
        ({}, 401, "no ticket"),
        ({"Authorization": "Basic abc"}, 401, "no ticket"),
        ({"Authorization": f"Bearer {forged}"}, 401, "signature"),
        ({"Authorization": f"Bearer {other_key}"}, 401, "signature"),
        ({"Authorization": "Bearer not-a-ticket"}, 401, "malformed"),
        ({"Authorization": f"Bearer {expired}"}, 401, "expired"),
        ({"Authorization": f"Bearer {other_env}"}, 403, "not " + setup.env_id),
        ({"Authorization": f"Bearer {other_runner}"}, 403, "not this one"),
    ]
    for headers, status, reason in cases:
        got_status, body = await refused(setup.url(), headers)
        assert (got_status, reason in body) == (status, True), (headers, got_status, body)
    # A good ticket, for an environment that is not on this runner.
    status, body = await refused(setup.url("env_00000000000000000000000000"), {"Authorization": f"Bearer {other_env}"})
    assert status == 403 and "not on this runner" in body, body
    # A good ticket opens one session, once.
    connection = await start(setup.url(), good, argv=["true"])
    assert (await collect(connection)).exit == 0
    status, body = await refused(setup.url(), {"Authorization": f"Bearer {good}"})
    assert status == 403 and "used already" in body, body


async def test_a_ticket_for_another_runner_is_worthless_here(setup: Setup) -> None:
    """Keys are per runner: a ticket the server signed for another runner fails this one's signature check."""
    created = RunnerCreated.model_validate(await setup.admin.post("/api/v1/runners", {"metadata": {"name": "gw2"}}))
    async with AsyncClient(setup.server.url) as anonymous:
        credential = await anonymous.post("/api/v1/runners/exchange", {"exchange_token": created.exchange_token})
    async with AsyncClient(setup.server.url, credential["token"]) as other:
        answer = await other.get(f"/api/v1/runners/{created.runner.metadata.id}/gateway-key")
    other_key = decode_key(GatewayKey.model_validate(answer).key)
    assert other_key != await setup.runner_key()
    ticket = sign_ticket(claims(setup), other_key)
    status, body = await refused(setup.url(), {"Authorization": f"Bearer {ticket}"})
    assert status == 401 and "signature" in body, body


# The command line, as a subprocess.


def cli_environment(setup: Setup, home: Path) -> dict[str, str]:
    environment = {key: value for key, value in os.environ.items() if not key.startswith(("DEVYARD_", "XDG_"))}
    environment.update(
        HOME=str(home),
        XDG_CONFIG_HOME=str(home / ".config"),
        XDG_STATE_HOME=str(home / ".state"),
        DEVYARD_SERVER=setup.server.url,
        DEVYARD_TOKEN=setup.server.admin_token,
    )
    return environment


async def test_the_cli_without_a_terminal_passes_streams_and_the_exit_code(setup: Setup, tmp_path: Path) -> None:
    process = await asyncio.create_subprocess_exec(
        *DEVYARD,
        "env",
        "exec",
        setup.env_id,
        "--",
        "sh",
        "-c",
        "cat; echo err >&2; exit 5",
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=cli_environment(setup, tmp_path),
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(b"piped input\n"), timeout=60)
    assert (process.returncode, stdout, stderr) == (5, b"piped input\n", b"err\n")


async def test_the_cli_tells_a_stranger_why_there_is_no_session(setup: Setup, tmp_path: Path) -> None:
    environment = cli_environment(setup, tmp_path)
    org = (await setup.admin.get("/api/v1/organizations"))["items"][0]["metadata"]["id"]
    user = await setup.admin.post("/api/v1/users", {"metadata": {"name": "eve", "organization_id": org}})
    token = await setup.admin.post(
        "/api/v1/tokens", {"metadata": {"organization_id": org}, "spec": {"user_id": user["metadata"]["id"]}}
    )
    environment["DEVYARD_TOKEN"] = token["secret"]
    process = await asyncio.create_subprocess_exec(
        *DEVYARD,
        "env",
        "exec",
        setup.env_id,
        "--",
        "true",
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=environment,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode == 1 and stdout == b""
    assert f"Environment {setup.env_id} not found" in stderr.decode(), stderr


@pytest.fixture
def terminal() -> Iterator[tuple[int, int]]:
    master, slave = pty.openpty()
    try:
        yield master, slave
    finally:
        for fd in (master, slave):
            with contextlib.suppress(OSError):
                os.close(fd)


async def test_the_cli_in_a_terminal_gives_the_command_one(
    setup: Setup, tmp_path: Path, terminal: tuple[int, int]
) -> None:
    master, slave = terminal
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
    before = termios.tcgetattr(slave)
    process = await asyncio.create_subprocess_exec(
        *DEVYARD,
        "env",
        "exec",
        setup.env_id,
        "--",
        "sh",
        "-c",
        "tty; stty size; exit 4",
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env=cli_environment(setup, tmp_path),
        start_new_session=True,
    )
    try:
        output = await asyncio.wait_for(asyncio.to_thread(_read_until_closed, master, process.pid), timeout=60)
    finally:
        if process.returncode is None:
            process.kill()
        code = await process.wait()
    text = output.decode(errors="replace")
    assert code == 4, text
    assert "/dev/pts/" in text and "30 100" in text, text
    assert termios.tcgetattr(slave) == before, "the CLI left the terminal in raw mode"


def _read_until_closed(master: int, pid: int) -> bytes:
    """Everything the CLI writes to its terminal, until it exited and all it wrote was read."""
    output = bytearray()
    while True:
        exited = _exited(pid)
        ready, _, _ = select.select([master], [], [], 0 if exited else 0.2)
        if ready:
            try:
                output.extend(os.read(master, 4096))
            except OSError:
                return bytes(output)
        elif exited:
            return bytes(output)


def _exited(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True
