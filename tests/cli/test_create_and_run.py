"""``devyard env create --image REF -- CMD``: create, wait until Running and run CMD in one process, against the
local daemon of ``devyard up`` (fake runtime: the command runs as a host process behind the runner's gateway).

One daemon serves the whole module; each test makes its own environments (named after the test) and looks at
what the command printed, its exit code, the terminal it left, and what became of the environment.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pty
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import DEVYARD, Cli

HELLO = Path(__file__).resolve().parents[2] / "examples" / "hello"
IMAGE = "busybox:latest"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A local daemon on the fake runtime; the variables that point the command at it."""
    home = tmp_path_factory.mktemp("daemon-home")
    state = home / "state"
    environment = {key: value for key, value in os.environ.items() if not key.startswith(("DEVYARD_", "XDG_"))}
    environment.update(HOME=str(home), XDG_CONFIG_HOME=str(home / ".config"), XDG_STATE_HOME=str(home / ".state"))
    up = subprocess.run(
        [*DEVYARD, "up", str(HELLO), "--state-dir", str(state), "--runtime", "fake", "-o", "json"],
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert up.returncode == 0, up.stderr
    profile = json.loads((home / ".config" / "devyard" / "config.json").read_text())["profiles"]["local"]
    try:
        yield {"DEVYARD_SERVER": profile["server"], "DEVYARD_TOKEN": profile["token"]}
    finally:
        subprocess.run([*DEVYARD, "down", "--state-dir", str(state)], env=environment, capture_output=True, timeout=60)
        pid = (state / "daemon.pid").read_text().strip() if (state / "daemon.pid").exists() else ""
        if pid.isdigit():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)


def _environment(cli: Cli, daemon: dict[str, str], name: str) -> dict[str, object] | None:
    """The environment named ``name`` as the server lists it, or None."""
    listed = cli("env", "list", "-o", "json", env=daemon).json()["items"]
    found = [item for item in listed if item["metadata"]["name"] == name]
    return found[0] if found else None


def test_the_command_gets_stdin_and_gives_its_streams_and_exit_code(cli: Cli, daemon: dict[str, str]) -> None:
    ran = cli(
        "env", "create", "--image", IMAGE, "--name", "streams", "--env", "GREETING=hi", "--",
        "sh", "-c", 'cat; echo "$GREETING to stderr" >&2; exit 3',
        env=daemon, input="from stdin\n", ok=None,
    )  # fmt: skip
    assert (ran.returncode, ran.stdout, ran.stderr) == (3, "from stdin\n", "hi to stderr\n"), str(ran)
    environment = _environment(cli, daemon, "streams")
    assert environment is not None, "the environment stays after the command"
    assert environment["status"]["phase"] == "running"  # type: ignore[index]


def test_the_words_after_the_dashes_are_the_command_even_when_they_look_like_options(
    cli: Cli, daemon: dict[str, str], tmp_path: Path
) -> None:
    ran = cli(
        "env", "create", str(tmp_path), "--image", IMAGE, "--name", "dashes", "-T", "--",
        "sh", "-c", 'echo "$@"', "sh", "--name", "-o", "json", "--",
        env=daemon,
    )  # fmt: skip
    assert ran.stdout == "--name -o json --\n", str(ran)
    environment = _environment(cli, daemon, "dashes")
    assert environment is not None
    assert environment["spec"]["content"]["local_path"] == str(tmp_path)  # type: ignore[index]


def test_rm_deletes_the_environment_after_the_command(cli: Cli, daemon: dict[str, str]) -> None:
    ran = cli(
        "env", "create", "--image", IMAGE, "--name", "removed", "--rm", "--", "sh", "-c", "exit 5", env=daemon, ok=None
    )
    assert (ran.returncode, ran.stdout, ran.stderr) == (5, "", ""), str(ran)
    environment = _environment(cli, daemon, "removed")
    assert environment is None or environment["spec"]["desired_phase"] == "deleted", environment  # type: ignore[index]


def test_rm_deletes_the_environment_when_the_wait_fails(cli: Cli, daemon: dict[str, str]) -> None:
    ran = cli(
        "env", "create", "--image", IMAGE, "--name", "late", "--rm", "--wait-timeout", "0", "--", "true",
        env=daemon, ok=False,
    )  # fmt: skip
    assert ran.returncode == 1, str(ran)
    assert "is not running after 0s: phase pending" in ran.stderr, str(ran)
    environment = _environment(cli, daemon, "late")
    assert environment is None or environment["spec"]["desired_phase"] == "deleted", environment  # type: ignore[index]


def test_a_command_that_cannot_start_is_a_session_failure(cli: Cli, daemon: dict[str, str]) -> None:
    missing = cli(
        "env", "create", "--image", IMAGE, "--name", "missing", "--", "/nonexistent/program", env=daemon, ok=False
    )
    assert missing.returncode == 255, str(missing)
    assert "/nonexistent/program" in missing.stderr and "Traceback" not in missing.stderr, str(missing)
    assert _environment(cli, daemon, "missing") is not None, "without --rm the environment stays"
    stranger = cli("env", "create", "--image", IMAGE, "--rm", "-u", "no-such-user", "--", "true", env=daemon, ok=False)
    assert stranger.returncode == 255 and "no-such-user" in stranger.stderr, str(stranger)


def test_workdir_is_where_the_command_runs(cli: Cli, daemon: dict[str, str]) -> None:
    script = 'test "$(pwd -P)" = "$(cd "$HOME" && pwd -P)" && echo "at home"'
    ran = cli("env", "create", "--image", IMAGE, "--rm", "-w", "/", "--", "sh", "-c", script, env=daemon)
    assert ran.stdout == "at home\n", str(ran)
    nowhere = cli("env", "create", "--image", IMAGE, "--rm", "-w", "/no/such/dir", "--", "pwd", env=daemon, ok=False)
    assert nowhere.returncode == 255 and "/no/such/dir" in nowhere.stderr, str(nowhere)


@pytest.mark.parametrize(
    ("arguments", "complaint"),
    [
        (["--image", IMAGE, "--"], "give the command to run after --"),
        (["--image", IMAGE, "-o", "json", "--", "true"], "-o json does not apply with a COMMAND"),
        (["--image", IMAGE, "--rm"], "--rm applies with a COMMAND only"),
        (["--image", IMAGE, "-T", "-w", "/"], "-t/-T, -w apply with a COMMAND only"),
        (["--", "true"], "give a CONTEXT"),
    ],
)
def test_misuse_is_refused_before_anything_is_created(
    cli: Cli, daemon: dict[str, str], arguments: list[str], complaint: str
) -> None:
    before = cli("env", "list", "-o", "json", env=daemon).json()["items"]
    refused = cli("env", "create", *arguments, env=daemon, ok=False)
    assert refused.returncode == 2 and complaint in refused.stderr, str(refused)
    assert len(cli("env", "list", "-o", "json", env=daemon).json()["items"]) == len(before)


def test_an_unreachable_server_is_one_line(cli: Cli) -> None:
    refused = cli(
        "env", "create", "--image", IMAGE, "--", "true", env={"DEVYARD_SERVER": "http://127.0.0.1:9"}, ok=False
    )
    assert refused.returncode == 1, str(refused)
    assert refused.stderr.startswith("Error: cannot reach server http://127.0.0.1:9"), str(refused)


def test_in_a_terminal_the_command_gets_one(cli_env: dict[str, str], daemon: dict[str, str]) -> None:
    master, slave = pty.openpty()
    try:
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
        before = termios.tcgetattr(slave)
        process = subprocess.Popen(
            [
                *DEVYARD,
                "env",
                "create",
                "--image",
                IMAGE,
                "--name",
                "terminal",
                "--",
                "sh",
                "-c",
                "tty; stty size; exit 4",
            ],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env={**cli_env, **daemon},
            start_new_session=True,
        )
        try:
            output = _read_until_exited(master, process)
        finally:
            if process.poll() is None:
                process.kill()
            code = process.wait()
        text = output.decode(errors="replace")
        assert code == 4, text
        assert "/dev/pts/" in text and "30 100" in text, text
        assert "Environment terminal (env_" in text and "it stays" in text, text
        assert termios.tcgetattr(slave) == before, "the command left the terminal in raw mode"
    finally:
        for fd in (master, slave):
            with contextlib.suppress(OSError):
                os.close(fd)


def _read_until_exited(master: int, process: subprocess.Popen[bytes], timeout: float = 60) -> bytes:
    """Everything the command writes to its terminal, until it exited and all it wrote was read."""
    output = bytearray()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        exited = process.poll() is not None
        ready, _, _ = select.select([master], [], [], 0 if exited else 0.2)
        if ready:
            try:
                output.extend(os.read(master, 4096))
            except OSError:
                break
        elif exited:
            break
    return bytes(output)


def test_the_one_command_imports_nothing_it_does_not_need(cli_env: dict[str, str], daemon: dict[str, str]) -> None:
    """What makes it start fast: no websockets, no http.client or email, no pydantic, rich or asyncio."""
    ran = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "devyard", "env", "create", "--image", IMAGE, "--rm", "--", "true"],
        env={**cli_env, **daemon},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ran.returncode == 0, ran.stderr
    imported = {line.rsplit("|", 1)[1].strip() for line in ran.stderr.splitlines() if line.startswith("import time:")}
    assert "devyard.cli._exec_session" in imported, "the import trace is read as it should be"
    heavy = {"websockets", "http.client", "email", "pydantic", "rich", "asyncio", "httpx", "ssl"}
    assert sorted(heavy & imported) == []
