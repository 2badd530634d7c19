"""The live-server fixtures: the real management plane on a real port, over SQLite and PostgreSQL, in this
process and in its own; it can be stopped and started again with its state, as restart tests need."""

from __future__ import annotations

from pathlib import Path

import pytest

from devyard.client import ApiError, Client
from support import live_server


def test_admin_client_reaches_the_server_as_the_admin(admin_client: Client) -> None:
    assert admin_client.get("/healthz")["status"] == "ok"
    assert admin_client.get("/readyz") == {"status": "ready"}
    whoami = admin_client.get("/api/v1/whoami")
    assert (whoami["principal"], whoami["name"]) == ("user", "admin")


def test_a_restarted_server_keeps_its_port_state_and_data(server: live_server.LiveServer) -> None:
    with server.client() as client:
        before = client.get("/api/v1/whoami")
        server.restart()
        assert server.running
        assert client.get("/api/v1/whoami") == before
        server.kill()
        assert not server.running
        server.start()
        assert client.get("/api/v1/whoami") == before


def test_requests_without_the_token_are_refused(server: live_server.LiveServer) -> None:
    with server.client(token="") as anonymous, pytest.raises(ApiError) as raised:
        anonymous.get("/api/v1/whoami")
    assert raised.value.status == 401


@pytest.mark.slow
def test_replicas_in_their_own_processes_share_one_database(database_url: str, tmp_path: Path) -> None:
    settings = live_server.settings_for(tmp_path / "server", database_url)
    with live_server.serve_in_process(settings) as first:
        with live_server.serve_in_process(settings.model_copy(update={"listen": "127.0.0.1:0"})) as second:
            assert first.url != second.url
            assert second.admin_token == first.admin_token
            with first.client() as one, second.client() as two:
                assert one.get("/api/v1/whoami") == two.get("/api/v1/whoami")
        assert first.running
    assert not first.running
