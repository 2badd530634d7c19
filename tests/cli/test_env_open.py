"""``devyard env open ENV --editor E``: the editor's URI for the environment's workspace folder, through a Host
alias in devyard's own file that one ``Include`` line of ``~/.ssh/config`` brings in; and the real OpenSSH
client, pointed at that config, reaches the environment through the alias.

The environment is the local daemon's (``devyard up``, the fake runtime, whose SSH sessions run on this host),
in a home of the test's own (``HOME``); the user's key is offered by ``up``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs

import pytest

from .conftest import Cli

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("ssh") is None or shutil.which("ssh-keygen") is None, reason="needs OpenSSH"),
]

USERS_CONFIG = "# mine\nHost work\n  HostName work.example.invalid\n  User me\n\nHost *\n  ServerAliveInterval 30\n"


@pytest.fixture
def environment(cli: Cli, home: Path, tmp_path: Path) -> Iterator[tuple[str, str]]:
    """A running environment of ``devyard up`` that the home's key may enter: its id and workspace folder."""
    (home / ".ssh").mkdir(mode=0o700)
    key = home / ".ssh" / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    project = tmp_path / "project"
    project.mkdir()
    (project / "marker.txt").write_text("from the project\n")
    state = tmp_path / "state"
    try:
        up = cli("up", str(project), "--state-dir", str(state), "--runtime", "fake")
        assert "Added your SSH key" in up.stdout, up
        environment_id = next(word for word in up.stdout.split() if word.startswith("env_"))
        found = cli("env", "get", environment_id, "-o", "json").json()
        yield environment_id, found["status"]["workspace_folder"]
    finally:
        cli("down", "--state-dir", str(state), ok=None)


def test_each_editor_gets_its_uri_for_the_workspace_folder(cli: Cli, environment: tuple[str, str]) -> None:
    environment_id, folder = environment
    assert folder.startswith("/"), folder
    alias = f"{environment_id}.devyard"
    vscode = cli("env", "open", environment_id, "--editor", "vscode", "--print").stdout.strip()
    assert vscode == f"vscode://vscode-remote/ssh-remote+{alias}{folder}"
    cursor = cli("env", "open", environment_id, "--editor", "cursor", "--print").stdout.strip()
    assert cursor == f"cursor://vscode-remote/ssh-remote+{alias}{folder}"
    jetbrains = cli("env", "open", environment_id, "--editor", "jetbrains", "--print").stdout.strip()
    scheme, _, fragment = jetbrains.partition("#")
    assert scheme == "jetbrains-gateway://connect"
    endpoint = cli("env", "get", environment_id, "-o", "json").json()["status"]["ssh"]
    assert {name: values[0] for name, values in parse_qs(fragment, strict_parsing=True).items()} == {
        "type": "ssh",
        "deploy": "false",
        "host": alias,
        "port": str(endpoint["port"]),
        "user": environment_id,
        "projectPath": folder,
    }
    as_json = cli("env", "open", environment_id, "--print", "-o", "json").json()
    assert as_json == {"environment_id": environment_id, "editor": "vscode", "uri": vscode}


def test_the_include_is_added_once_the_users_lines_are_kept_and_ssh_connects_through_the_alias(
    cli: Cli, environment: tuple[str, str], home: Path
) -> None:
    environment_id, _ = environment
    config = home / ".ssh" / "config"
    config.write_text(USERS_CONFIG)
    config.chmod(0o644)
    cli("env", "open", environment_id, "--print")
    entries = home / ".ssh" / "devyard" / "config"
    text = config.read_text()
    assert text.endswith("\n" + USERS_CONFIG), text
    include_lines = [line for line in text.splitlines() if line.startswith("Include")]
    assert include_lines == [f"Include {entries}"]
    # Above every Host line, so it is not read as part of one.
    assert text.index("Include") < text.index("Host work")
    assert config.stat().st_mode & 0o777 == 0o644
    hosts = [line.split()[1:] for line in entries.read_text().splitlines() if line.startswith("Host ")]
    assert any(f"{environment_id}.devyard" in aliases for aliases in hosts), hosts
    assert entries.stat().st_mode & 0o777 == 0o600

    before = config.stat()
    cli("env", "open", environment_id, "--editor", "cursor", "--print")
    after = config.stat()
    assert config.read_text() == text
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)

    # The user's OpenSSH, given nothing but that config (HOME is the test's), reaches the environment by alias.
    ssh = subprocess.run(
        ["ssh", "-F", str(config), "-i", str(home / ".ssh" / "id_ed25519"), "-o", "IdentitiesOnly=yes",
         "-o", "BatchMode=yes", f"{environment_id}.devyard", "cat marker.txt"],
        capture_output=True, text=True, env={**os.environ, "HOME": str(home)}, timeout=60, check=False,
    )  # fmt: skip
    assert (ssh.returncode, ssh.stdout) == (0, "from the project\n"), ssh.stderr


def test_a_config_that_is_a_link_stays_one_and_a_new_one_is_private(
    cli: Cli, environment: tuple[str, str], home: Path, tmp_path: Path
) -> None:
    environment_id, _ = environment
    dotfiles = tmp_path / "dotfiles"
    dotfiles.mkdir()
    (dotfiles / "ssh_config").write_text(USERS_CONFIG)
    config = home / ".ssh" / "config"
    config.symlink_to(dotfiles / "ssh_config")
    cli("env", "open", environment_id, "--print")
    assert config.is_symlink()
    assert (dotfiles / "ssh_config").read_text().endswith("\n" + USERS_CONFIG)
    assert "Include" in (dotfiles / "ssh_config").read_text()

    config.unlink()
    cli("env", "open", environment_id, "--print")
    assert config.read_text().startswith("# Added by devyard")
    assert config.stat().st_mode & 0o777 == 0o600


def test_an_environment_that_is_not_running_is_refused_with_what_to_do(
    cli: Cli, environment: tuple[str, str], home: Path
) -> None:
    environment_id, _ = environment
    cli("env", "stop", environment_id, "--wait")
    refused = cli("env", "open", environment_id, "--print", ok=False)
    assert f"{environment_id} is stopped, not running" in refused.stderr, refused
    assert "devyard env start" in refused.stderr
    assert not (home / ".ssh" / "config").exists()
