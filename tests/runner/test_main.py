"""``run_runner`` as a process: it registers, runs environments, stops cleanly on SIGTERM and SIGINT (leaving
its containers as they are), comes back with its stored credential, and exits 2 when its token is refused.
Against the real server over SQLite, in a thread of the test process."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from support import live_server

T = TypeVar("T")

RUN = """
import sys
from devyard.runner.main import run_runner
from devyard.runner.settings import RunnerSettings
server, token, state_dir = sys.argv[1:]
run_runner(RunnerSettings(server=server, exchange_token=token or None, state_dir=state_dir, runtime="fake",
                          heartbeat_interval=0.3, reconnect_base=0.05, reconnect_max=0.5,
                          gateway_listen="127.0.0.1:0"))
"""


@pytest.fixture
def live(tmp_path: Path) -> Iterator[live_server.LiveServer]:
    with live_server.serve_in_thread(live_server.settings_for(tmp_path / "server")) as server:
        yield server


def start_runner(live: live_server.LiveServer, token: str, state_dir: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as output:
        return subprocess.Popen(
            [sys.executable, "-c", RUN, live.url, token, str(state_dir)],
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
        )


def poll(read: Callable[[], T], done: Callable[[T], bool], *, timeout: float = 30.0, what: str) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = read()
        if done(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}; last: {value!r}")
        time.sleep(0.05)


def stop(process: subprocess.Popen[bytes], number: signal.Signals, log: Path) -> int:
    process.send_signal(number)
    try:
        return process.wait(15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise AssertionError(f"the runner ignored {number.name}:\n{log.read_text()}") from None


def test_run_runner_stops_cleanly_and_restarts_with_its_credential(
    live: live_server.LiveServer, tmp_path: Path
) -> None:
    state_dir = tmp_path / "runner"
    log = tmp_path / "runner.log"
    with live.client() as admin:
        created = admin.post("/api/v1/runners", {"metadata": {"name": "proc"}})
        runner_id = created["runner"]["metadata"]["id"]

        def runner() -> dict[str, object]:
            return dict(admin.get(f"/api/v1/runners/{runner_id}")["status"])

        process = start_runner(live, created["exchange_token"], state_dir, log)
        try:
            first = poll(runner, lambda s: s["phase"] == "online", what="the runner online")
            env_id = admin.post("/api/v1/environments", {})["metadata"]["id"]
            poll(
                lambda: admin.get(f"/api/v1/environments/{env_id}")["status"]["phase"],
                lambda phase: phase == "running",
                what="the environment running",
            )
        finally:
            code = stop(process, signal.SIGTERM, log)
        assert code == 0, log.read_text()
        containers = json.loads((state_dir / "fake-runtime.json").read_text())["containers"]
        assert [(c["environment_id"], c["state"]) for c in containers] == [(env_id, "running")]
        assert (state_dir / "credential.json").stat().st_mode & 0o777 == 0o600

        # Again, without a token: the stored credential is enough. (The heartbeat to tell the new process by is
        # one after the last of the old one, not after its first.)
        first = runner()
        process = start_runner(live, "", state_dir, log)
        try:
            poll(
                runner,
                lambda s: s["last_heartbeat_at"] != first["last_heartbeat_at"] and s["phase"] == "online",
                what="a heartbeat from the restarted runner",
            )
        finally:
            code = stop(process, signal.SIGINT, log)
        assert code == 0, log.read_text()
        assert admin.get(f"/api/v1/environments/{env_id}")["status"]["phase"] == "running"
    assert "Traceback" not in log.read_text()


def test_run_runner_exits_2_when_the_token_is_refused(live: live_server.LiveServer, tmp_path: Path) -> None:
    log = tmp_path / "runner.log"
    process = start_runner(live, "not-a-token", tmp_path / "runner", log)
    try:
        code = process.wait(30)
    except subprocess.TimeoutExpired:
        code = stop(process, signal.SIGKILL, log)
    assert code == 2, log.read_text()
    assert "refused the exchange token" in log.read_text()
