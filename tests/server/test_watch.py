"""Watch: list then watch from a resource_version, resume, bookmarks, 410 and relist, filters, the change
feed's catch-up from the table, and delivery across server processes sharing one PostgreSQL."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
from cryptography.fernet import Fernet

from devyard.client import ApiError, Client
from devyard.server.database import migrate
from devyard.server.database.engine import Database
from devyard.server.settings import ServerSettings
from devyard.server.store import resources
from devyard.server.watch import ChangeFeed, watch_events
from support import live_server, postgres
from support.world import eventually, make_user, register_runner


def create_env(client: Client, **spec: Any) -> dict[str, Any]:
    result: dict[str, Any] = client.post("/api/v1/environments", {"spec": {"image": "i", **spec}})
    return result


def collect(client: Client, path: str, rv: str, seconds: float, **params: Any) -> list[dict[str, Any]]:
    return [{"type": e.type.value, "object": e.object} for e in client.watch(path, rv, params, timeout=seconds)]


def test_watch_from_a_list_sees_every_later_change_in_order(admin_client: Client) -> None:
    before = create_env(admin_client)["metadata"]["id"]
    _, rv = admin_client.list_all("/api/v1/environments")
    first = create_env(admin_client)
    admin_client.patch(f"/api/v1/environments/{first['metadata']['id']}", {"spec": {"desired_phase": "stopped"}})
    admin_client.delete(f"/api/v1/environments/{first['metadata']['id']}")
    events = [
        e
        for e in collect(admin_client, "/api/v1/environments", rv, 1.0, bookmark_seconds=30)
        if e["type"] != "BOOKMARK"
    ]
    assert before not in {e["object"]["metadata"]["id"] for e in events if e["type"] == "ADDED"}
    mine = [e for e in events if e["object"]["metadata"]["id"] == first["metadata"]["id"]]
    types = [e["type"] for e in mine]
    assert types[0] == "ADDED" and types[-1] == "DELETED" and set(types[1:-1]) == {"MODIFIED"}
    phases = [e["object"]["spec"]["desired_phase"] for e in mine]
    assert [p for n, p in enumerate(phases) if n == 0 or phases[n - 1] != p] == ["running", "stopped", "deleted"]
    versions = [int(e["object"]["metadata"]["resource_version"]) for e in events]
    assert versions == sorted(versions) and all(v > int(rv) for v in versions)


def test_resume_from_the_last_seen_version_skips_what_was_seen(admin_client: Client) -> None:
    _, rv = admin_client.list_all("/api/v1/environments")
    a = create_env(admin_client)
    seen = [e for e in collect(admin_client, "/api/v1/environments", rv, 0.5) if e["type"] == "ADDED"]
    assert [e["object"]["metadata"]["id"] for e in seen] == [a["metadata"]["id"]]
    b, c = create_env(admin_client), create_env(admin_client)
    resumed = [
        e
        for e in collect(admin_client, "/api/v1/environments", seen[-1]["object"]["metadata"]["resource_version"], 0.5)
        if e["type"] == "ADDED"
    ]
    assert [e["object"]["metadata"]["id"] for e in resumed] == [b["metadata"]["id"], c["metadata"]["id"]]


def test_bookmarks_come_while_nothing_matches_and_advance(admin_client: Client) -> None:
    _, rv = admin_client.list_all("/api/v1/environments")
    got: list[dict[str, Any]] = []

    def watch() -> None:
        got.extend(collect(admin_client, "/api/v1/environments", rv, 1.5, bookmark_seconds=0.2))

    thread = threading.Thread(target=watch)
    thread.start()
    register_runner(admin_client, "unrelated")  # changes of another kind move the revision on
    thread.join(10)
    bookmarks = [int(e["object"]["metadata"]["resource_version"]) for e in got if e["type"] == "BOOKMARK"]
    assert len(bookmarks) >= 3 and all(e["type"] == "BOOKMARK" for e in got)
    assert bookmarks == sorted(bookmarks) and bookmarks[-1] > int(rv)
    # Resuming from a bookmark misses nothing.
    env = create_env(admin_client)
    added = [e for e in collect(admin_client, "/api/v1/environments", str(bookmarks[-1]), 0.5) if e["type"] == "ADDED"]
    assert [e["object"]["metadata"]["id"] for e in added] == [env["metadata"]["id"]]


def test_watch_needs_a_resource_version(admin_client: Client) -> None:
    with pytest.raises(ApiError) as exc:
        admin_client.get("/api/v1/environments", {"watch": "true"})
    assert exc.value.status == 400 and "resource_version" in exc.value.message


def test_watch_filters_like_the_list(admin_client: Client) -> None:
    alice = make_user(admin_client, "alice")
    runner = register_runner(admin_client, "r1")
    _, rv = admin_client.list_all("/api/v1/environments")
    mine = create_env(alice)["metadata"]["id"]
    create_env(admin_client, desired_phase="stopped")
    runner.heartbeat()
    eventually(lambda: all(e["status"].get("runner_id") for e in admin_client.get("/api/v1/environments")["items"]))
    alice_saw = {
        e["object"]["metadata"]["id"]
        for e in collect(alice, "/api/v1/environments", rv, 0.5)
        if e["type"] != "BOOKMARK"
    }
    assert alice_saw == {mine}
    runner_saw = [
        e
        for e in collect(runner.client, "/api/v1/environments", rv, 0.5, runner_id=runner.id)
        if e["type"] != "BOOKMARK"
    ]
    assert {e["object"]["status"].get("runner_id") for e in runner_saw} == {runner.id}
    stopped = [
        e
        for e in collect(admin_client, "/api/v1/environments", rv, 0.5, desired_phase="stopped")
        if e["type"] != "BOOKMARK"
    ]
    assert {e["object"]["spec"]["desired_phase"] for e in stopped} == {"stopped"}


async def test_a_watcher_behind_the_window_catches_up_from_the_table(database_url: str, tmp_path: Path) -> None:
    database = Database(ServerSettings(state_dir=tmp_path, database=database_url).database_url())
    await migrate.upgrade(database)
    feed = ChangeFeed(database, window=3)
    await feed.start()
    start = feed.head
    ids = []
    for n in range(10):
        async with database.write() as session:
            tx = resources.Tx(session)
            row = resources.new_row(
                "Environment", name=f"e{n}", organization_id=None, creator_id=None, spec={"desired_phase": "running"}
            )
            tx.create(row, action=None)
            ids.append(row.id)
            if n == 4:
                other = resources.new_row("Runner", name="noise", organization_id=None, creator_id=None, spec={})
                tx.create(other, action=None)
            await tx.commit()
        await feed.poll()
    assert feed.floor > start, "the window holds only the newest changes"
    seen = []
    async for event in watch_events(feed, "Environment", start, lambda change: True, bookmark_interval=60, timeout=0.2):
        if event["type"] != "BOOKMARK":
            seen.append(event["object"]["metadata"]["id"])
    assert seen == ids
    await database.dispose()


@pytest.mark.postgres
def test_a_change_through_one_server_reaches_a_watcher_on_another(
    postgres_server: postgres.PostgresServer, tmp_path: Path
) -> None:
    # The backstop poll is slower than the test's patience: only NOTIFY can deliver in time.
    # Replicas share the key that encrypts secrets, as a real deployment must.
    common = {"watch_poll_interval": 120.0, "loop_interval": 0.2, "secret_key": Fernet.generate_key().decode()}
    with (
        postgres_server.database() as database_url,
        live_server.serve_in_process(live_server.settings_for(tmp_path / "a", database_url, **common)) as a,
        live_server.serve_in_process(live_server.settings_for(tmp_path / "b", database_url, **common)) as b,
    ):
        token = a.admin_token
        writer, reader = Client(a.url, token), Client(b.url, token)
        _, rv = reader.list_all("/api/v1/environments")
        got: list[Any] = []

        def watch() -> None:
            for event in reader.watch("/api/v1/environments", rv, {"bookmark_seconds": 60}, timeout=15):
                if event.type == "ADDED":
                    got.append(event.object["metadata"]["id"])
                    return

        thread = threading.Thread(target=watch)
        thread.start()
        created = writer.post("/api/v1/environments", {"spec": {"image": "i"}})
        thread.join(20)
        assert got == [created["metadata"]["id"]]
