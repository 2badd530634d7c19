"""``devyard runner doctor`` as operators run it (a process, with the runner's settings in DEVYARD_RUNNER_*):
orphans made by hand (a mount under the state directory, a runc container with no record, a veth and a network
namespace with no environment, a container the server no longer assigns) are reported with exit status 1, and
``--fix`` removes them, leaving the wanted environment running; then doctor exits 0. ``--fix`` refuses while the
runner runs, and without the server it touches no container.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from devyard.client import Client
from devyard.runner.linux.network import veth_name
from support import live_server

from .runner_host import (  # noqa: F401 - fixtures
    RunnerHost,
    environment_phase,
    runner_host_fixture,
    sqlite_server_fixture,
    wait_for,
)
from .test_runner_crash import converged, create, online


@pytest.fixture
def admin(server: live_server.LiveServer) -> Iterator[Client]:
    with server.client() as client:
        yield client


def run_doctor(where: RunnerHost, *options: str) -> tuple[int, dict[str, Any]]:
    answer = subprocess.run(
        [
            sys.executable,
            "-m",
            "devyard",
            "runner",
            "doctor",
            "--state-dir",
            str(where.state_dir),
            "-o",
            "json",
            *options,
        ],
        capture_output=True,
        text=True,
        env={**os.environ, **where.environment()},
        timeout=120,
        check=False,
    )
    assert answer.returncode in (0, 1), answer.stderr
    return answer.returncode, json.loads(answer.stdout)


def make_stray_container(where: RunnerHost, model: str, stray: str) -> None:
    """A runc container that no record explains: the bundle of ``model`` under another name and cgroup."""
    bundle = where.base / "stray-bundle"
    bundle.mkdir()
    config = json.loads((where.state_dir / "environments" / model / "config.json").read_text())
    config["linux"]["cgroupsPath"] = config["linux"]["cgroupsPath"].replace(model, stray)
    (bundle / "config.json").write_text(json.dumps(config))
    # Not captured: a detached container keeps the stdio it was given, so a pipe would never close.
    errors = where.base / "stray-runc.log"
    with errors.open("wb") as log:
        code = subprocess.call(
            ["runc", "--root", str(where.state_dir / "runc"), "run", "--detach", "--bundle", str(bundle), stray],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
    assert code == 0, errors.read_text()


def test_doctor_reports_hand_made_orphans_and_fix_removes_them(
    runner_host: RunnerHost, admin: Client, busybox_image: str
) -> None:
    where = runner_host
    runner = online(where, admin)
    kept, unassigned = create(admin, busybox_image), create(admin, busybox_image)
    converged(where, admin, kept, "running")
    converged(where, admin, unassigned, "running")
    assert runner.stop() == 0

    # The server forgets one environment while the runner is down (its runner reported it deleted).
    credential = json.loads((where.state_dir / "credential.json").read_text())
    admin.delete(f"/api/v1/environments/{unassigned}")
    with Client(where.server_url, credential["token"]) as as_runner:
        as_runner.put(f"/api/v1/environments/{unassigned}/status", {"status": {"phase": "deleted"}})
    wait_for(lambda: environment_phase(admin, unassigned), lambda phase: phase is None, what="the server to forget")

    # Orphans by hand.
    stray_mount = where.state_dir / "environments" / "env_nobody" / "rootfs"
    stray_mount.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(stray_mount)], check=True)
    make_stray_container(where, kept, "env_stray")
    ghost = veth_name(where.bridge, "env_ghost")
    subprocess.run(["ip", "link", "add", ghost, "type", "veth", "peer", "name", f"{ghost}p"], check=True)
    subprocess.run(["ip", "link", "set", ghost, "alias", f"{where.bridge}/env_ghost"], check=True)
    where.netns_dir.mkdir(parents=True, exist_ok=True)
    (where.netns_dir / "env_lonely").touch()
    subprocess.run(["unshare", f"--net={where.netns_dir / 'env_lonely'}", "true"], check=True)

    code, report = run_doctor(where)
    assert code == 1
    differences = {(f["what"], f["where"], f["status"]) for f in report["findings"] if f["status"] != "ok"}
    assert ("mount", str(stray_mount), "orphan") in differences
    assert ("directory", str(stray_mount.parent), "orphan") in differences
    assert ("runc", "env_stray", "orphan") in differences
    assert ("container", unassigned, "drift") in differences
    network = " ".join(f["detail"] for f in report["findings"] if f["what"] == "network")
    assert "env_ghost" in network and "env_lonely" in network
    assert ("environment", kept, "ok") in {(f["what"], f["where"], f["status"]) for f in report["findings"]}

    code, fixed = run_doctor(where, "--fix")
    assert code == 0, fixed
    assert all(f["fix"] == "fixed" for f in fixed["findings"] if f["status"] != "ok"), fixed
    code, after = run_doctor(where)
    assert code == 0 and after["clean"], after
    assert where.runc_containers() == [kept]
    assert set(where.mounts()) == {str(where.state_dir / "environments" / kept / "rootfs"), str(where.netns_dir / kept)}
    assert ghost not in where.veths() and where.namespaces() == [kept]
    assert not (where.state_dir / "environments" / unassigned).exists()
    answer = where.exec(kept, "echo still")
    assert answer.stdout == "still\n", answer.stderr


def test_fix_refuses_while_the_runner_runs_and_touches_no_container_without_the_server(
    runner_host: RunnerHost, admin: Client, busybox_image: str
) -> None:
    where = runner_host
    runner = online(where, admin)
    environment_id = create(admin, busybox_image)
    converged(where, admin, environment_id, "running")

    refused = subprocess.run(
        [sys.executable, "-m", "devyard", "runner", "doctor", "--state-dir", str(where.state_dir), "--fix"],
        capture_output=True,
        text=True,
        env={**os.environ, **where.environment()},
        timeout=120,
        check=False,
    )
    assert refused.returncode == 2 and f"pid {runner.process.pid}" in refused.stderr, refused.stderr
    code, report = run_doctor(where)
    assert code == 0 and report["runner_pid"] == runner.process.pid, report
    assert runner.stop() == 0

    # The server forgot it, but doctor cannot know that without the server: it reports, and keeps the container.
    code, report = run_doctor(where, "--fix", "--server", "http://127.0.0.1:9")
    assert code == 0 and not report["server_reachable"], report
    assert [(f["where"], f["status"]) for f in report["findings"]] == [(environment_id, "unknown")]
    assert where.runc_containers() == [environment_id]
