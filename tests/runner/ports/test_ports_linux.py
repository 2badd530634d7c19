"""A whole ``devyard runner --runtime linux`` process with its port proxy on (``DEVYARD_RUNNER_PORTS_LISTEN``), the
real server in this process, a busybox environment running ``httpd`` inside its own network namespace: the port is
detected and reported with its URL, curl reaches it through the proxy as the owner and not as another member (until
the port is shared with the organization), a port nothing listens on answers 502, and a stopped environment 503.
"""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Iterator
from typing import Any

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

pytestmark = [pytest.mark.slow, pytest.mark.skipif(os.geteuid() != 0, reason="the linux runtime needs root")]


@pytest.fixture
def admin(server: live_server.LiveServer) -> Iterator[Client]:
    with server.client() as client:
        yield client


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def curl(url: str, token: str | None = None) -> tuple[int, str]:
    headers = ["-H", f"Authorization: Bearer {token}"] if token else []
    done = subprocess.run(
        ["curl", "-sS", "--max-time", "20", "-w", "\n%{http_code}", *headers, url],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    body, _, status = done.stdout.rpartition("\n")
    return int(status), body


def reported_port(admin: Client, environment_id: str, port: int) -> dict[str, Any] | None:
    ports = admin.get(f"/api/v1/environments/{environment_id}")["status"].get("ports", [])
    return next((p for p in ports if p["port"] == port and p["listening"] and p.get("url")), None)


def test_a_service_inside_is_detected_and_served_to_those_it_is_shared_with(
    runner_host: RunnerHost,
    admin: Client,
    busybox_image: str,
    server: live_server.LiveServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    proxy_port = free_port()
    monkeypatch.setenv("DEVYARD_RUNNER_PORTS_LISTEN", f"127.0.0.1:{proxy_port}")
    org = admin.get("/api/v1/organizations")["items"][0]["metadata"]["id"]
    member = admin.post("/api/v1/users", {"metadata": {"name": "member", "organization_id": org}})
    body = {"metadata": {"organization_id": org}, "spec": {"user_id": member["metadata"]["id"]}}
    member_token = admin.post("/api/v1/tokens", body)["secret"]
    owner_token = server.admin_token

    runner = runner_host.start()
    try:
        environment_id = str(admin.post("/api/v1/environments", {"spec": {"image": busybox_image}})["metadata"]["id"])
        wait_for(lambda: environment_phase(admin, environment_id), lambda p: p == "running", what="running")
        started = runner_host.exec(
            environment_id,
            "mkdir -p /tmp/www && echo inside > /tmp/www/index.html && httpd -p 127.0.0.1:8080 -h /tmp/www",
        )
        assert started.returncode == 0, started.stderr

        entry = wait_for(
            lambda: reported_port(admin, environment_id, 8080), lambda found: found is not None, what="port 8080"
        )
        assert entry["url"] == f"http://127.0.0.1:{proxy_port}/ports/{environment_id}/8080/"
        runners = admin.get("/api/v1/runners")["items"]
        assert f"http://127.0.0.1:{proxy_port}" in {
            (r["status"].get("gateway") or {}).get("ports_url") for r in runners
        }
        assert curl(entry["url"], owner_token) == (200, "inside\n")
        assert curl(entry["url"])[0] == 401
        assert curl(entry["url"], member_token)[0] == 403
        admin.patch(
            f"/api/v1/environments/{environment_id}",
            {"spec": {"ports": [{"port": 8080, "admission": "organization"}]}},
        )
        wait_for(lambda: curl(entry["url"], member_token), lambda answer: answer == (200, "inside\n"), what="member in")
        nothing = curl(f"http://127.0.0.1:{proxy_port}/ports/{environment_id}/9/", owner_token)
        assert nothing[0] == 502 and "nothing listens on port 9" in nothing[1]

        admin.patch(f"/api/v1/environments/{environment_id}", {"spec": {"desired_phase": "stopped"}})
        wait_for(lambda: environment_phase(admin, environment_id), lambda p: p == "stopped", what="stopped")
        stopped = wait_for(lambda: curl(entry["url"], owner_token), lambda answer: answer[0] == 503, what="503")
        assert f"devyard env start {environment_id}" in stopped[1]
        assert admin.get(f"/api/v1/environments/{environment_id}")["status"].get("ports") == []
    finally:
        runner.stop()
