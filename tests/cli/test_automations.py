"""``devyard automations list|start|stop|logs`` end to end: a repository folder with an automations file, the
local daemon over the fake runtime (its exec runs real processes), a service started by the environment's start,
tasks run by hand in dependency order, a service stopped by hand, and the output read back through the server."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from .conftest import Cli

pytestmark = pytest.mark.slow

AUTOMATIONS = """\
services:
  idle:
    name: Idle
    triggeredBy: [postEnvironmentStart]
    commands:
      start: echo idle started; exec sleep 300
      ready: "true"
tasks:
  prepare:
    command: echo prepared > prepared.txt
    triggeredBy: [manual]
  build:
    command: cat prepared.txt; echo built
    dependsOn: [prepare]
    triggeredBy: [manual]
"""


@pytest.fixture
def repository(tmp_path: Path) -> Path:
    folder = tmp_path / "project"
    (folder / ".devyard").mkdir(parents=True)
    (folder / ".devyard" / "automations.yaml").write_text(AUTOMATIONS)
    return folder


@pytest.fixture
def state_dir(tmp_path: Path, cli: Cli) -> Iterator[Path]:
    path = tmp_path / "state"
    yield path
    cli("down", "--state-dir", str(path), ok=None)
    pid_file = path / "daemon.pid"
    text = pid_file.read_text().strip() if pid_file.exists() else ""
    if text.isdigit():
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(text), signal.SIGKILL)


def wait_for(read: Callable[[], Any], done: Callable[[Any], bool], what: str, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = read()
        if done(value):
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}; last: {value!r}"
        time.sleep(0.2)


def test_automations_run_by_the_start_and_by_hand(cli: Cli, state_dir: Path, repository: Path) -> None:
    up = cli("up", str(repository), "--state-dir", str(state_dir), "--runtime", "fake", "-o", "json").json()
    environment_id = up["environment"]["metadata"]["id"]

    def phases() -> dict[str, str]:
        items = cli("automations", "list", environment_id, "-o", "json").json()["items"]
        return {item["id"]: item["phase"] for item in items}

    assert wait_for(phases, lambda p: p.get("idle") == "ready", "the service ready") == {
        "idle": "ready",
        "prepare": "pending",
        "build": "pending",
    }
    table = cli("automations", "list", environment_id).stdout
    assert "Idle" in table and "ready" in table

    cli("automations", "start", environment_id, "build")
    wait_for(phases, lambda p: p["build"] == "succeeded" and p["prepare"] == "succeeded", "the tasks run")
    logs = wait_for(
        lambda: cli("automations", "logs", environment_id, "build").stdout,
        lambda text: "built" in text,
        "the task's output through the server",
    )
    assert "prepared\nbuilt" in logs  # it ran after the task it depends on

    cli("automations", "stop", environment_id, "idle")
    wait_for(phases, lambda p: p["idle"] == "stopped", "the service stopped")

    unknown = cli("automations", "start", environment_id, "nope", ok=False)
    assert "no automation 'nope'" in unknown.stderr
    assert "build" in unknown.stderr  # it says which there are


def test_rebuild_makes_the_container_again_and_keeps_the_workspace(cli: Cli, state_dir: Path, repository: Path) -> None:
    (repository / ".devcontainer").mkdir()
    (repository / ".devcontainer" / "devcontainer.json").write_text(
        '{"image": "busybox", "onCreateCommand": "echo created >> created.txt", "postStartCommand": "echo started"}'
    )
    up = cli("up", str(repository), "--state-dir", str(state_dir), "--runtime", "fake", "-o", "json").json()
    environment_id = up["environment"]["metadata"]["id"]
    cli("env", "exec", environment_id, "--", "sh", "-c", "echo mine > notes.txt")

    def created() -> str:
        return cli("env", "exec", environment_id, "--", "cat", "created.txt", ok=None).stdout

    wait_for(created, lambda text: text == "created\n", "the first onCreateCommand")
    before = cli("env", "get", environment_id, "-o", "json").json()

    rebuilt = cli("env", "rebuild", environment_id, "--wait", "-o", "json").json()
    assert rebuilt["status"]["phase"] == "running"
    assert rebuilt["status"]["observed_generation"] > before["status"]["observed_generation"]
    # The hooks of a new container ran again, in the same workspace, whose files are all still there.
    wait_for(created, lambda text: text == "created\ncreated\n", "onCreateCommand again after the rebuild")
    assert cli("env", "exec", environment_id, "--", "cat", "notes.txt").stdout == "mine\n"
