"""A whole ``devyard runner --runtime linux`` process with its SSH gateway on (``DEVYARD_RUNNER_SSH_LISTEN``), the
real server in this process, an environment from the real registry's busybox image: the owner's key enters it
with OpenSSH's ``ssh``, another user's does not, and once the environment is stopped the refusal says so.
"""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from devyard.client import Client
from support import live_server

from ..linux.runner_host import (  # noqa: F401 - fixtures
    RunnerHost,
    environment_phase,
    runner_host_fixture,
    sqlite_server_fixture,
    wait_for,
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the linux runtime needs root")


@pytest.fixture
def admin(server: live_server.LiveServer) -> Iterator[Client]:
    with server.client() as client:
        yield client


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def ssh(key: Path, port: int, environment_id: str, command: str) -> subprocess.CompletedProcess[str]:
    argv = [
        "ssh",
        "-F",
        "/dev/null",
        "-i",
        str(key),
        "-o",
        "IdentitiesOnly=yes",
        "-o",
        "BatchMode=yes",
        "-o",
        "StrictHostKeyChecking=no",
        "-o",
        "UserKnownHostsFile=/dev/null",
        "-p",
        str(port),
        f"{environment_id}@127.0.0.1",
        command,
    ]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)


def keypair(directory: Path, name: str) -> tuple[Path, str]:
    path = directory / name
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f", str(path)], check=True)
    return path, path.with_suffix(".pub").read_text().strip()


@pytest.mark.slow
def test_the_runners_ssh_gateway_lets_the_owner_in_and_says_why_not_once_stopped(
    runner_host: RunnerHost,
    admin: Client,
    busybox_image: str,
    server: live_server.LiveServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    port = free_port()
    monkeypatch.setenv("DEVYARD_RUNNER_SSH_LISTEN", f"127.0.0.1:{port}")
    owner_key, owner_public = keypair(tmp_path, "owner")
    other_key, other_public = keypair(tmp_path, "other")
    admin.post("/api/v1/ssh-keys", {"spec": {"public_key": owner_public}})
    org = admin.get("/api/v1/organizations")["items"][0]["metadata"]["id"]
    other = admin.post("/api/v1/users", {"metadata": {"name": "other", "organization_id": org}})
    body = {"metadata": {"organization_id": org}, "spec": {"user_id": other["metadata"]["id"]}}
    with Client(server.url, admin.post("/api/v1/tokens", body)["secret"]) as other_client:
        other_client.post("/api/v1/ssh-keys", {"spec": {"public_key": other_public}})

    runner = runner_host.start()
    try:
        environment_id = str(admin.post("/api/v1/environments", {"spec": {"image": busybox_image}})["metadata"]["id"])
        wait_for(lambda: environment_phase(admin, environment_id), lambda p: p == "running", what="running")
        # The gateway may still be binding when the environment runs.
        wait_for(lambda: ssh(owner_key, port, environment_id, "true").returncode, lambda code: code == 0, what="ssh")
        answer = ssh(owner_key, port, environment_id, "echo in-$((40+2)); exit 5")
        assert (answer.returncode, answer.stdout) == (5, "in-42\n"), answer.stderr
        refused = ssh(other_key, port, environment_id, "true")
        assert refused.returncode == 255 and "Permission denied" in refused.stderr

        admin.patch(f"/api/v1/environments/{environment_id}", {"spec": {"desired_phase": "stopped"}})
        wait_for(lambda: environment_phase(admin, environment_id), lambda p: p == "stopped", what="stopped")
        stopped = ssh(owner_key, port, environment_id, "true")
        assert stopped.returncode == 255 and f"environment {environment_id} is stopped" in stopped.stderr, stopped
        assert (runner_host.state_dir / "ssh_host_ed25519_key").stat().st_mode & 0o777 == 0o600
    finally:
        runner.stop()
