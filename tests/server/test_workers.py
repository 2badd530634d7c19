"""``devyard server --workers N``: several processes on one port over PostgreSQL, each with its own change
feed and loops, serving as one; SQLite refuses it with a clear message."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import pytest

from devyard.client import Client
from support import live_server, postgres


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(child) for child in (task / "children").read_text().split()]
    return found


@pytest.mark.postgres
def test_workers_share_the_port_and_see_each_others_writes(
    postgres_server: postgres.PostgresServer, tmp_path: Path
) -> None:
    with (
        postgres_server.database() as url,
        live_server.serve_in_process(live_server.settings_for(tmp_path / "s", url, workers=2)) as server,
    ):
        process = server._backend.process  # type: ignore[attr-defined]
        assert len(_children(process.pid)) >= 2, "uvicorn's supervisor runs two workers"
        # Fresh connections land on either worker; every write is seen by every watch.
        _, rv = Client(server.url, server.admin_token).list_all("/api/v1/environments")
        seen: list[str] = []

        def watch() -> None:
            with Client(server.url, server.admin_token) as watcher:
                for event in watcher.watch("/api/v1/environments", rv, {"bookmark_seconds": 60}, timeout=15):
                    if event.type == "ADDED":
                        seen.append(event.object["metadata"]["id"])
                        if len(seen) == 20:
                            return

        thread = threading.Thread(target=watch)
        thread.start()
        created = []
        for _ in range(20):
            with Client(server.url, server.admin_token) as client:  # a new connection each time
                created.append(client.post("/api/v1/environments", {"spec": {"image": "i"}})["metadata"]["id"])
        thread.join(20)
        assert seen == created


def test_workers_need_postgresql(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "devyard", "server", "--state-dir", str(tmp_path), "--workers", "2"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0
    assert "needs PostgreSQL" in result.stderr
    assert "Traceback" not in result.stderr
