"""``devyard up`` offers the user's SSH key and prints how to ssh in; ``devyard env ssh`` and ``devyard env
ssh-config`` reach the environment with Debian's real OpenSSH client, through the runner's SSH gateway (the
local daemon over the fake runtime, whose sessions run on this host)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import Cli

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("ssh") is None or shutil.which("ssh-agent") is None, reason="needs OpenSSH"),
]


@pytest.fixture
def state_dir(tmp_path: Path, cli: Cli) -> Iterator[Path]:
    path = tmp_path / "state"
    yield path
    cli("down", "--state-dir", str(path), ok=None)


@pytest.fixture
def agent(home: Path) -> Iterator[dict[str, str]]:
    """An ssh-agent holding the user's new key (``ssh`` finds keys through it whatever its idea of home is)."""
    (home / ".ssh").mkdir(mode=0o700, exist_ok=True)
    key = home / ".ssh" / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    socket = home / "agent.sock"
    process = subprocess.Popen(["ssh-agent", "-D", "-a", str(socket)], stdout=subprocess.DEVNULL)
    try:
        for _ in range(100):
            if socket.exists():
                break
            subprocess.run(["sleep", "0.05"], check=True)
        env = {"SSH_AUTH_SOCK": str(socket)}
        subprocess.run(["ssh-add", "-q", str(key)], env={**os.environ, **env}, check=True)
        yield env
    finally:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        process.wait(10)


def test_up_offers_the_key_and_ssh_reaches_the_environment(
    cli: Cli, state_dir: Path, agent: dict[str, str], tmp_path: Path
) -> None:
    project = tmp_path / "project"
    project.mkdir()
    (project / "marker.txt").write_text("from the project\n")
    up = cli("up", str(project), "--state-dir", str(state_dir), "--runtime", "fake", env=agent)
    assert "Added your SSH key" in up.stdout
    assert "devyard env ssh env_" in up.stdout
    environment_id = next(word for word in up.stdout.split() if word.startswith("env_"))
    assert len(cli("ssh-key", "list", "-o", "json").json()["items"]) == 1

    ran = cli("env", "ssh", environment_id, "--", "cat", "marker.txt", "&&", "exit", "3", env=agent, ok=None)
    assert (ran.returncode, ran.stdout) == (3, "from the project\n"), ran

    config = tmp_path / "ssh_config"
    config.write_text(cli("env", "ssh-config", environment_id).stdout)
    assert f"{environment_id}.devyard" in config.read_text().splitlines()[0]
    through_config = subprocess.run(
        ["ssh", "-F", str(config), "-o", "BatchMode=yes", f"{environment_id}.devyard", "echo", "via-config"],
        capture_output=True,
        text=True,
        env={**os.environ, **agent},
        timeout=60,
        check=False,
    )
    assert (through_config.returncode, through_config.stdout) == (0, "via-config\n"), through_config.stderr

    cli("env", "stop", environment_id, "--wait")
    refused = cli("env", "ssh", environment_id, "--", "true", env=agent, ok=False)
    assert "not running" in refused.stderr and "devyard env start" in refused.stderr
