"""Watch after compaction: a resource_version older than the change feed keeps answers 410, and a relist
recovers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from devyard.client import ApiError, Client
from devyard.server.settings import ServerSettings
from support import live_server
from support.world import eventually


def create_env(client: Client) -> dict[str, Any]:
    result: dict[str, Any] = client.post("/api/v1/environments", {"spec": {"image": "i"}})
    return result


def collect(client: Client, rv: str, seconds: float) -> list[dict[str, Any]]:
    return [
        {"type": e.type.value, "object": e.object} for e in client.watch("/api/v1/environments", rv, timeout=seconds)
    ]


@pytest.fixture
def server_settings(database_url: str, tmp_path: Path) -> ServerSettings:
    # Short retention so that compaction makes old versions too old (410).
    return live_server.settings_for(
        tmp_path / "server", database_url, watch_retention_seconds=0.3, compaction_interval=0.2
    )


def test_too_old_a_version_is_gone_and_a_relist_recovers(admin_client: Client) -> None:
    _, old = admin_client.list_all("/api/v1/environments")
    create_env(admin_client)

    def compacted() -> bool:
        create_env(admin_client)
        try:
            collect(admin_client, old, 0.1)
        except ApiError as exc:
            assert exc.status == 410 and exc.code == "gone"
            return True
        return False

    eventually(compacted, timeout=20, interval=0.3)
    _, fresh = admin_client.list_all("/api/v1/environments")
    newest = create_env(admin_client)
    added = [e for e in collect(admin_client, fresh, 0.5) if e["type"] == "ADDED"]
    assert [e["object"]["metadata"]["id"] for e in added] == [newest["metadata"]["id"]]
