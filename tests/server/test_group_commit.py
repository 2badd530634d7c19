"""Group commit of creates: a burst is committed in fewer transactions than requests, every create is
answered as if alone (its own 201 or 409), and the audit log has one event per create."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx

from devyard.server.app import create_app
from devyard.server.settings import ServerSettings
from support.live_server import LiveServer


async def _burst(url: str, token: str, bodies: list[dict[str, Any]]) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60) as http:
        return await asyncio.gather(*(http.post("/api/v1/environments", json=body) for body in bodies))


def test_a_burst_with_a_taken_name_fails_only_that_create(server: LiveServer) -> None:
    bodies = [{"metadata": {"name": f"e{n}"}, "spec": {"image": "i"}} for n in range(30)]
    bodies.insert(15, {"metadata": {"name": "e3"}, "spec": {"image": "i"}})
    answers = asyncio.run(_burst(server.url, server.admin_token, bodies))
    statuses = [a.status_code for a in answers]
    assert sorted(statuses) == [201] * 30 + [409]
    assert answers[statuses.index(409)].json()["error"]["code"] == "conflict"
    with server.client() as client:
        items, _ = client.list_all("/api/v1/environments")
        assert sorted(e["metadata"]["name"] for e in items) == sorted(f"e{n}" for n in range(30))
        versions = [int(e["metadata"]["resource_version"]) for e in items]
        assert len(set(versions)) == len(versions), "each create has its own resource_version"
        events = client.get("/api/v1/audit-events", {"action": "environment.create", "page_size": 100})["items"]
        assert len(events) == 30


async def test_a_burst_takes_fewer_transactions_than_creates(tmp_path: Path) -> None:
    app = create_app(ServerSettings(state_dir=tmp_path, run_loops=False))
    async with app.router.lifespan_context(app):
        token = (tmp_path / "admin-token").read_text().strip()
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://devyard", headers={"Authorization": f"Bearer {token}"}
        ) as http:
            answers = await asyncio.gather(
                *(http.post("/api/v1/environments", json={"spec": {"image": "i"}}) for _ in range(40))
            )
        assert [a.status_code for a in answers] == [201] * 40
        group = app.state.devyard.group_commit
        assert group.jobs == 40
        assert group.batches < 40
