"""``devyard up`` and ``devyard down`` end to end: the real daemon in the background, over the fake runtime,
in a temporary state directory and home."""

from __future__ import annotations

import json
import os
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from support.repositories import make_repository

from .conftest import Cli

HELLO = Path(__file__).resolve().parents[2] / "examples" / "hello"

pytestmark = pytest.mark.slow


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


@pytest.fixture
def state_dir(tmp_path: Path, cli: Cli) -> Iterator[Path]:
    """The daemon's state directory; whatever daemon a test leaves there is stopped."""
    path = tmp_path / "state"
    yield path
    pid_file = path / "daemon.pid"
    if pid_file.exists():
        cli("down", "--state-dir", str(path), ok=None)
    text = pid_file.read_text().strip() if pid_file.exists() else ""
    if text.isdigit() and _alive(int(text)):
        os.kill(int(text), signal.SIGKILL)


def test_up_runs_the_example_and_down_stops_everything(cli: Cli, state_dir: Path, home: Path) -> None:
    up = cli("up", str(HELLO), "--state-dir", str(state_dir), "--runtime", "fake")
    environments = cli("env", "list", "-o", "json").json()["items"]
    (environment,) = environments
    environment_id = environment["metadata"]["id"]
    assert environment_id in up.stdout
    assert f"devyard env get {environment_id}" in up.stdout
    assert environment["status"]["phase"] == "running"
    assert environment["spec"]["content"]["local_path"] == str(HELLO)

    # up saved the daemon as the config's local profile, and made it current (there was no config).
    config = json.loads((home / ".config" / "devyard" / "config.json").read_text())
    assert config["current_profile"] == "local"
    info = json.loads((state_dir / "daemon.json").read_text())
    assert config["profiles"]["local"]["server"] == info["url"]
    assert info["url"].startswith("http://127.0.0.1:")

    stopped = cli("env", "stop", environment_id, "--wait", "-o", "json").json()
    assert stopped["status"]["phase"] == "stopped"
    started = cli("env", "start", environment_id, "--wait", "-o", "json").json()
    assert started["status"]["phase"] == "running"
    cli("env", "delete", environment_id, "--wait")
    assert cli("env", "list", "-o", "json").json()["items"] == []

    pid = info["pid"]
    assert _alive(pid)
    down = cli("down", "--state-dir", str(state_dir), "-o", "json").json()
    assert down == {"stopped": True, "pid": pid, "state_dir": str(state_dir)}
    assert not _alive(pid)
    assert not (state_dir / "daemon.pid").exists()
    assert "No local daemon is running" in cli("down", "--state-dir", str(state_dir)).stdout
    assert "Traceback" not in (state_dir / "daemon.log").read_text()


def test_up_again_reuses_the_daemon_and_the_environment(cli: Cli, state_dir: Path) -> None:
    first = cli("up", str(HELLO), "--state-dir", str(state_dir), "--runtime", "fake", "-o", "json").json()
    assert first["daemon"]["started"] is True
    second = cli("up", str(HELLO), "--state-dir", str(state_dir), "--runtime", "fake", "-o", "json").json()
    assert second["daemon"]["started"] is False
    assert second["daemon"]["pid"] == first["daemon"]["pid"]
    assert second["environment"]["metadata"]["id"] == first["environment"]["metadata"]["id"]

    # A stopped daemon comes back on the same port with the same runner, and resumes the environment.
    cli("down", "--state-dir", str(state_dir))
    third = cli("up", str(HELLO), "--state-dir", str(state_dir), "--runtime", "fake", "-o", "json").json()
    assert third["daemon"]["started"] is True
    assert third["daemon"]["url"] == first["daemon"]["url"]
    assert third["daemon"]["runner_id"] == first["daemon"]["runner_id"]
    assert third["environment"]["metadata"]["id"] == first["environment"]["metadata"]["id"]
    assert third["environment"]["status"]["phase"] == "running"

    # Another folder, or a git repository, gets an environment of its own.
    other = cli("up", str(state_dir.parent), "--state-dir", str(state_dir), "--runtime", "fake", "-o", "json").json()
    assert other["environment"]["metadata"]["id"] != first["environment"]["metadata"]["id"]
    # A git repository: on this desktop runner a file:// URL is content too (nothing leaves the machine).
    url = make_repository(state_dir.parent / "app")
    repository = cli(
        "up", url, "--ref", "main", "--state-dir", str(state_dir), "--runtime", "fake", "-o", "json"
    ).json()
    git_content = repository["environment"]["spec"]["content"]["git"]
    assert git_content == {"url": url, "ref": "main", "depth": None, "filter": None}
    assert repository["environment"]["status"]["phase"] == "running"
    assert len(cli("env", "list", "-o", "json").json()["items"]) == 3


def test_up_keeps_an_existing_profile_current(cli: Cli, state_dir: Path, home: Path) -> None:
    path = home / ".config" / "devyard" / "config.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"current_profile": "work", "profiles": {"work": {"server": "https://w.example"}}}))
    up = cli("up", str(HELLO), "--state-dir", str(state_dir), "--runtime", "fake")
    assert "--profile local" in up.stdout
    config = json.loads(path.read_text())
    assert config["current_profile"] == "work"
    assert set(config["profiles"]) == {"work", "local"}
    assert len(cli("env", "list", "--profile", "local", "-o", "json").json()["items"]) == 1


def test_a_daemon_that_cannot_start_points_at_its_log(cli: Cli, state_dir: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = cli(
            "up", str(HELLO), "--state-dir", str(state_dir), "--runtime", "fake", "--port", str(port), ok=False
        )
    assert "the local daemon exited with code 1 while starting" in result.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert str(state_dir / "daemon.log") in result.stderr
    assert result.stderr.count("\n") == 1


def test_up_of_something_that_is_neither_folder_nor_url(cli: Cli, state_dir: Path) -> None:
    result = cli("up", str(state_dir / "absent"), "--state-dir", str(state_dir), "--runtime", "fake", ok=False)
    assert "neither a folder nor a git URL" in result.stderr
    assert not (state_dir / "daemon.pid").exists()
