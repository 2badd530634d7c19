"""Fixtures of the CLI's tests: the real ``devyard`` command in a subprocess, in a home of its own.

- ``cli``: runs ``devyard ARGS...`` with HOME, XDG_CONFIG_HOME and XDG_STATE_HOME in the test's temporary
  directory and no DEVYARD_* variables from the developer's shell; returns the finished process.
- ``server_settings`` is overridden so that the live ``server`` (tests/conftest.py) runs on SQLite only: the
  CLI is a client, the database kind is the server tests' business.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from devyard.server.settings import ServerSettings
from support import host, live_server

#: The console script of this venv, as users run it; ``python -m devyard`` where it is not installed.
_SCRIPT = Path(sys.executable).with_name("devyard")
DEVYARD = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "devyard"]
_TIMEOUT = 120


@dataclass(frozen=True)
class Result:
    args: list[str]
    returncode: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        return json.loads(self.stdout)

    def __str__(self) -> str:
        return f"devyard {' '.join(self.args)} -> {self.returncode}\nstdout:\n{self.stdout}\nstderr:\n{self.stderr}"


Cli = Callable[..., Result]


@pytest.fixture(autouse=True)
def one_command_line_test_at_a_time() -> Iterator[None]:
    """Under pytest-xdist, two local daemons (`devyard up`) of two workers at once broke each other's containers
    (a container re-made under a running test): the command-line tests take turns."""
    with host.one_at_a_time("cli"):
        yield


@pytest.fixture
def home(tmp_path: Path) -> Path:
    path = tmp_path / "home"
    path.mkdir()
    return path


@pytest.fixture
def cli_env(home: Path) -> dict[str, str]:
    """The environment the command runs in: a private home, nothing of the developer's devyard settings."""
    environment = {key: value for key, value in os.environ.items() if not key.startswith(("DEVYARD_", "XDG_"))}
    environment.update(
        HOME=str(home),
        XDG_CONFIG_HOME=str(home / ".config"),
        XDG_STATE_HOME=str(home / ".local" / "state"),
        COLUMNS="200",
    )
    return environment


@pytest.fixture
def cli(cli_env: dict[str, str]) -> Cli:
    """``cli("env", "list", "-o", "json", env={...}, input="...", ok=True)``: run devyard and return how it went.

    ``ok=True`` (the default) fails the test unless the exit status is 0; ``ok=False`` unless it is not 0 and
    stderr holds no traceback; ``ok=None`` checks nothing.
    ``env`` adds variables; a value of None removes one.
    """

    def run(
        *args: str, env: Mapping[str, str | None] | None = None, input: str | None = None, ok: bool | None = True
    ) -> Result:
        environment = dict(cli_env)
        for key, value in (env or {}).items():
            if value is None:
                environment.pop(key, None)
            else:
                environment[key] = value
        process = subprocess.run(
            [*DEVYARD, *args],
            env=environment,
            input=input if input is not None else "",
            capture_output=True,
            text=True,
            timeout=_TIMEOUT,
        )
        result = Result(list(args), process.returncode, process.stdout, process.stderr)
        if ok:
            assert result.returncode == 0, str(result)
        elif ok is False:
            assert result.returncode != 0, str(result)
            assert "Traceback" not in result.stderr, str(result)
        return result

    return run


@pytest.fixture
def server_settings(tmp_path: Path) -> ServerSettings:
    return live_server.settings_for(tmp_path / "server")


@pytest.fixture
def admin_env(server: live_server.LiveServer) -> dict[str, str]:
    """Variables that point the command at the live server as its admin."""
    return {"DEVYARD_SERVER": server.url, "DEVYARD_TOKEN": server.admin_token}


def ssh_public_key(directory: Path) -> str:
    """A fresh ed25519 public key line, made with ssh-keygen (the test is skipped without it)."""
    if shutil.which("ssh-keygen") is None:
        pytest.skip("ssh-keygen is not installed")
    key = directory / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "test@devyard", "-f", str(key)], check=True)
    return (directory / "id_ed25519.pub").read_text().strip()
