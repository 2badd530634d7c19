"""``--wait`` follows the environment through the watch, not by polling, and ends with a reason."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import click
import httpx
import pytest

from devyard.cli._waiting import DELETED, WaitFailed, wait_for_environment
from devyard.client import Client
from support.live_server import LiveServer


class _Recording(httpx.HTTPTransport):
    def __init__(self) -> None:
        super().__init__()
        self.requests: list[httpx.Request] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return super().handle_request(request)


def _create(client: Client, folder: Path) -> str:
    created = client.post("/api/v1/environments", {"spec": {"content": {"local_path": str(folder)}}})
    return str(created["metadata"]["id"])


def test_a_change_ends_the_wait_through_the_watch(server: LiveServer, tmp_path: Path) -> None:
    transport = _Recording()
    with server.client(transport=transport) as client, server.client() as other:
        environment_id = _create(client, tmp_path)
        # Nobody runs it: it stays pending until someone deletes it, two seconds from now.
        timer = threading.Timer(2.0, lambda: other.delete(f"/api/v1/environments/{environment_id}"))
        timer.start()
        started = time.monotonic()
        try:
            assert wait_for_environment(client, environment_id, DELETED, timeout=30) is None
        finally:
            timer.cancel()
        assert time.monotonic() - started < 15
    watches = [r for r in transport.requests if r.url.params.get("watch") == "true"]
    assert len(watches) == 1
    assert len(transport.requests) <= 4  # list, get, watch (and the create): no polling


def test_the_timeout_names_the_phase_and_conditions(server: LiveServer, tmp_path: Path) -> None:
    with server.client() as client:
        environment_id = _create(client, tmp_path)
        with pytest.raises(WaitFailed, match=rf"environment {environment_id} is not running after 1s: phase pending"):
            wait_for_environment(client, environment_id, "running", timeout=1)


def test_a_changed_mind_ends_the_wait(server: LiveServer, tmp_path: Path) -> None:
    with server.client() as client:
        environment_id = _create(client, tmp_path)
        client.patch(f"/api/v1/environments/{environment_id}", {"spec": {"desired_phase": "stopped"}})
        with pytest.raises(click.ClickException, match="is now meant to be stopped, no longer running"):
            wait_for_environment(client, environment_id, "running", timeout=10)


def test_waiting_for_a_deleted_one_to_run(server: LiveServer, tmp_path: Path) -> None:
    with server.client() as client:
        environment_id = _create(client, tmp_path)
        client.delete(f"/api/v1/environments/{environment_id}")
        with pytest.raises(WaitFailed, match="was deleted while waiting for it to be running"):
            wait_for_environment(client, environment_id, "running", timeout=10)
