"""``devyard env logs`` end to end: the real command in a subprocess against a live server, with chunks shipped
by a registered runner through the API as its log shipper would."""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from devyard.client import Client
from support.live_server import LiveServer
from support.world import RegisteredRunner, eventually, register_runner

from .conftest import DEVYARD, Cli


@dataclass
class Shipped:
    runner: RegisteredRunner
    environment_id: str
    name: str

    def ship(self, stream: str, offset: int, data: str, epoch: int = 0) -> None:
        chunk = {"stream": stream, "epoch": epoch, "offset": offset, "data": data}
        self.runner.client.post(f"/api/v1/environments/{self.environment_id}/logs", {"chunks": [chunk]})


@pytest.fixture
def shipped(server: LiveServer) -> Iterator[Shipped]:
    admin = server.client()
    runner = register_runner(admin, "r1")
    runner.heartbeat()
    admin.post("/api/v1/environment-classes", {"metadata": {"name": "one"}, "spec": {"runner_ids": [runner.id]}})
    created = admin.post("/api/v1/environments", {"metadata": {"name": "web"}, "spec": {"image": "debian:bookworm"}})
    environment_id = created["metadata"]["id"]
    eventually(lambda: admin.get(f"/api/v1/environments/{environment_id}")["status"].get("runner_id") == runner.id)
    yield Shipped(runner, environment_id, "web")
    admin.close()
    runner.client.close()


def test_logs_print_streams_in_the_order_received(cli: Cli, admin_env: dict[str, str], shipped: Shipped) -> None:
    shipped.ship("build", 0, "pulling\nunpack")
    shipped.ship("lifecycle", 0, "onCreate\n")
    shipped.ship("build", 14, "ing\n")

    everything = cli("env", "logs", "web", env=admin_env)
    assert everything.stdout == "build | pulling\nlifecycle | onCreate\nbuild | unpacking\n"

    build = cli("env", "logs", shipped.environment_id, "--stream", "build", env=admin_env)
    assert build.stdout == "pulling\nunpacking\n"

    as_json = cli("env", "logs", "web", "-o", "json", env=admin_env).json()
    assert [(item["stream"], item["data"]) for item in as_json["items"]] == [
        ("build", "pulling\nunpack"),
        ("lifecycle", "onCreate\n"),
        ("build", "ing\n"),
    ]
    assert as_json["next_after"] == as_json["items"][-1]["seq"]

    # A restarted file is said so on stderr; its new text follows.
    shipped.ship("build", 0, "again\n", epoch=1)
    restarted = cli("env", "logs", "web", "--stream", "build", env=admin_env)
    assert restarted.stdout == "pulling\nunpacking\nagain\n"
    assert "build restarted" in restarted.stderr

    missing = cli("env", "logs", "nothing-here", env=admin_env, ok=False)
    assert "no environment" in missing.stderr


def test_follow_prints_new_output_until_the_environment_is_deleted(
    admin_env: dict[str, str], cli_env: dict[str, str], shipped: Shipped, server: LiveServer
) -> None:
    shipped.ship("build", 0, "before\n")
    follower = subprocess.Popen(
        [*DEVYARD, "env", "logs", "web", "--follow"],
        env={**cli_env, **admin_env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert follower.stdout is not None
        assert follower.stdout.readline() == "before\n"
        shipped.ship("build", 7, "after\n")
        assert follower.stdout.readline() == "after\n"
        # A second stream: from then on each line says which it is.
        shipped.ship("automations/web", 0, "listening on :8080\n")
        assert follower.stdout.readline() == "automations/web | listening on :8080\n"

        with Client(server.url, server.admin_token) as admin:
            admin.delete(f"/api/v1/environments/{shipped.environment_id}")
        shipped.runner.report(shipped.environment_id, phase="deleted", observed_generation=2)
        stdout, stderr = follower.communicate(timeout=60)
    finally:
        follower.kill()
        follower.wait()
    assert follower.returncode == 0, stderr
    assert stdout == ""
    assert f"environment {shipped.environment_id} was deleted" in stderr


def test_ctrl_c_ends_a_follow_quietly(admin_env: dict[str, str], cli_env: dict[str, str], shipped: Shipped) -> None:
    shipped.ship("build", 0, "line\n")
    follower = subprocess.Popen(
        [*DEVYARD, "env", "logs", "web", "-f"],
        env={**cli_env, **admin_env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert follower.stdout is not None
        assert follower.stdout.readline() == "line\n"
        follower.send_signal(signal.SIGINT)
        _, stderr = follower.communicate(timeout=60)
    finally:
        follower.kill()
        follower.wait()
    assert follower.returncode == 130
    assert "Traceback" not in stderr
