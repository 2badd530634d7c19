"""Environment logs through the real API on both databases: who may write and read them, a retried batch stored
once, a restarted file and a gap shown, retention per stream, the runner's byte budget (429 with Retry-After),
and following: a chunk written after the follower started arrives, and the stream ends when the environment goes.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from devyard.client import ApiError, Client, RetryPolicy
from devyard.server.api.logs import LogBell
from devyard.server.database.engine import Database
from devyard.server.settings import ServerSettings
from devyard.wire.watch_events import WatchEvent
from support import live_server
from support.world import RegisteredRunner, eventually, make_user, register_runner

NO_RETRY = RetryPolicy(attempts=1)


@dataclass
class Setting:
    admin: Client
    owner: Client
    other_member: Client
    runner: RegisteredRunner
    other_runner: RegisteredRunner
    environment_id: str

    @property
    def path(self) -> str:
        return f"/api/v1/environments/{self.environment_id}/logs"

    def ship(self, *chunks: dict[str, Any]) -> dict[str, Any]:
        answer: dict[str, Any] = self.runner.client.post(self.path, {"chunks": list(chunks)})
        return answer

    def read(self, client: Client | None = None, **params: Any) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        after = 0
        while True:
            page = (client or self.owner).get(self.path, {"after": after, **params})
            items.extend(page["items"])
            after = page["next_after"]
            if not page["more"]:
                return items


@pytest.fixture
def setting(server: live_server.LiveServer) -> Iterator[Setting]:
    admin = server.client()
    runner = register_runner(admin, "r1")
    other_runner = register_runner(admin, "r2")
    runner.heartbeat()
    other_runner.heartbeat()
    class_body = {"metadata": {"name": "one"}, "spec": {"runner_ids": [runner.id]}}
    class_id = admin.post("/api/v1/environment-classes", class_body)["metadata"]["id"]
    owner = make_user(admin, "alice")
    other_member = make_user(admin, "bob")
    created = owner.post("/api/v1/environments", {"spec": {"image": "debian:bookworm", "class_id": class_id}})
    environment_id = created["metadata"]["id"]
    eventually(lambda: admin.get(f"/api/v1/environments/{environment_id}")["status"].get("runner_id") == runner.id)
    yield Setting(admin, owner, other_member, runner, other_runner, environment_id)
    for client in (admin, owner, other_member, runner.client, other_runner.client):
        client.close()


def _status(client: Client, method: str, path: str, body: Any = None) -> int:
    try:
        client.request(method, path, json=body)
    except ApiError as exc:
        return exc.status
    return 200


def test_only_the_owning_runner_writes_and_only_readers_of_the_environment_read(
    setting: Setting, server: live_server.LiveServer
) -> None:
    batch = {"chunks": [{"stream": "build", "offset": 0, "data": "step 1\n"}]}
    anonymous = Client(server.url, retry=NO_RETRY)
    writers = {
        "owner": setting.owner,
        "admin": setting.admin,
        "other member": setting.other_member,
        "other runner": setting.other_runner.client,
        "anonymous": anonymous,
        "runner": setting.runner.client,
    }
    written = {name: _status(client, "POST", setting.path, batch) for name, client in writers.items()}
    assert written == {
        "owner": 403,
        "admin": 403,
        "other member": 404,
        "other runner": 404,
        "anonymous": 401,
        "runner": 200,
    }
    readers = {name: _status(client, "GET", setting.path) for name, client in writers.items()}
    assert readers == {
        "owner": 200,
        "admin": 200,
        "other member": 404,
        "other runner": 404,
        "anonymous": 401,
        "runner": 200,
    }
    assert [item["data"] for item in setting.read(setting.admin)] == ["step 1\n"]
    # No audit event per write: the runner's batches are not a person's mutations.
    before = setting.admin.list_all("/api/v1/audit-events")[0]
    setting.ship({"stream": "build", "offset": 7, "data": "step 2\n"})
    assert setting.admin.list_all("/api/v1/audit-events")[0] == before
    anonymous.close()


def test_a_retried_batch_is_stored_once_and_restarts_and_gaps_show(setting: Setting) -> None:
    batch = (
        {"stream": "build", "offset": 0, "data": "pulling\n"},
        {"stream": "lifecycle", "offset": 0, "data": "onCreate: ok\n"},
        {"stream": "build", "offset": 8, "data": "unpacking é\n"},
    )
    first = setting.ship(*batch)
    assert (first["stored"], first["stored_bytes"]) == (3, 8 + 13 + 13)
    again = setting.ship(*batch)
    assert (again["stored"], again["stored_bytes"]) == (0, 0)
    assert {(p["stream"], p["epoch"], p["end"]) for p in again["positions"]} == {("build", 0, 21), ("lifecycle", 0, 13)}

    # A resend that reaches further than what was stored keeps only the new part.
    longer = setting.ship({"stream": "build", "offset": 8, "data": "unpacking é\ndone\n"})
    assert (longer["stored"], longer["stored_bytes"]) == (1, 5)
    # A gap stays visible in the offsets; a restarted file (a newer epoch) starts again at 0.
    setting.ship({"stream": "build", "offset": 100, "data": "after a gap\n"})
    setting.ship({"stream": "build", "epoch": 1, "offset": 0, "data": "again\n"})
    # A chunk from before the restart is old news.
    assert setting.ship({"stream": "build", "offset": 112, "data": "late\n"})["stored"] == 0

    items = setting.read()
    assert [(i["stream"], i["epoch"], i["offset"], i["data"]) for i in items] == [
        ("build", 0, 0, "pulling\n"),
        ("lifecycle", 0, 0, "onCreate: ok\n"),
        ("build", 0, 8, "unpacking é\n"),
        ("build", 0, 21, "done\n"),
        ("build", 0, 100, "after a gap\n"),
        ("build", 1, 0, "again\n"),
    ]
    assert [i["seq"] for i in items] == sorted(i["seq"] for i in items)
    assert [i["data"] for i in setting.read(stream="lifecycle")] == ["onCreate: ok\n"]
    # Paging: after and limit walk the same chunks in the same order.
    page = setting.owner.get(setting.path, {"limit": 2})
    assert page["more"] is True and [i["seq"] for i in page["items"]] == [i["seq"] for i in items[:2]]
    rest = setting.owner.get(setting.path, {"after": page["next_after"]})
    assert [i["seq"] for i in rest["items"]] == [i["seq"] for i in items[2:]]


def test_retention_keeps_the_newest_bytes_of_each_stream_and_a_fast_runner_gets_429(
    setting: Setting, server: live_server.LiveServer
) -> None:
    chunk_size = 200 * 1024
    setting.ship({"stream": "lifecycle", "offset": 0, "data": "kept\n"})
    offset = 0
    for batch in range(8):  # 4.8 MiB into one stream
        chunks = []
        for _ in range(3):
            chunks.append({"stream": "build", "offset": offset, "data": f"{batch}".ljust(chunk_size - 1, "x") + "\n"})
            offset += chunk_size
        setting.ship(*chunks)
    build = setting.read(stream="build")
    kept = sum(len(item["data"]) for item in build)
    assert 4 * 1024 * 1024 - chunk_size < kept <= 4 * 1024 * 1024
    assert build[-1]["offset"] == offset - chunk_size
    assert build[0]["offset"] == offset - kept  # the oldest went, nothing in between
    assert [i["data"] for i in setting.read(stream="lifecycle")] == ["kept\n"]

    # Past its budget a runner is told to wait, and how long.
    impatient = Client(server.url, setting.runner.credential, retry=NO_RETRY)
    refusal = None
    for _ in range(300):
        chunks = []
        for _ in range(3):
            chunks.append({"stream": "automations/web", "offset": offset, "data": "y" * (chunk_size - 1) + "\n"})
            offset += chunk_size
        try:
            impatient.post(setting.path, {"chunks": chunks})
        except ApiError as exc:
            refusal = exc
            break
    impatient.close()
    assert refusal is not None and refusal.status == 429, refusal
    assert refusal.code == "too_many_requests"
    assert refusal.details["retry_after"] >= 1


def test_bodies_are_bounded(setting: Setting) -> None:
    too_long = {"stream": "build", "offset": 0, "data": "x" * (256 * 1024 + 1)}
    assert _status(setting.runner.client, "POST", setting.path, {"chunks": [too_long]}) == 422
    escaping = {"stream": "../etc", "offset": 0, "data": "x"}
    assert _status(setting.runner.client, "POST", setting.path, {"chunks": [escaping]}) == 422
    many = [{"stream": "build", "offset": i, "data": "x"} for i in range(257)]
    assert _status(setting.runner.client, "POST", setting.path, {"chunks": many}) == 422


def test_a_follower_gets_new_chunks_and_ends_when_the_environment_is_deleted(
    setting: Setting, server: live_server.LiveServer
) -> None:
    setting.ship({"stream": "build", "offset": 0, "data": "before\n"})
    events: queue.Queue[WatchEvent | BaseException | None] = queue.Queue()

    def follow() -> None:
        try:
            # The client's watch reads the NDJSON stream; follow and after are the endpoint's own parameters.
            params = {"follow": "true", "after": 0, "bookmark_seconds": 0.2}
            for event in setting.owner.watch(setting.path, "0", params):
                events.put(event)
        except BaseException as exc:
            events.put(exc)
        events.put(None)

    thread = threading.Thread(target=follow, daemon=True)
    thread.start()

    def next_event() -> WatchEvent:
        item = events.get(timeout=30)
        assert isinstance(item, WatchEvent), item
        return item

    def next_chunk() -> dict[str, Any]:
        while True:
            event = next_event()
            if event.type == "ADDED":
                return event.object
            assert event.type == "BOOKMARK", event

    assert next_chunk()["data"] == "before\n"
    # Caught up: the follower says so with a bookmark before anything new is written.
    assert next_event().type == "BOOKMARK"
    setting.ship({"stream": "build", "offset": 7, "data": "after\n"})
    assert next_chunk()["data"] == "after\n"

    setting.owner.delete(f"/api/v1/environments/{setting.environment_id}")
    setting.runner.report(setting.environment_id, phase="deleted", observed_generation=2)
    while (event := next_event()).type != "DELETED":
        assert event.type == "BOOKMARK", event
    assert event.object["metadata"]["id"] == setting.environment_id
    assert events.get(timeout=30) is None  # the stream ended
    thread.join(timeout=30)
    # The logs went with the environment.
    assert _status(setting.admin, "GET", setting.path) == 404


async def test_followers_in_one_process_wake_on_another_process_s_notify(
    database_kind: str, database_url: str, tmp_path: Path
) -> None:
    """On PostgreSQL a log write in any server process NOTIFYs ``devyard_logs``: the bell of every other process
    rings for that environment while someone follows there, without waiting for the poll."""
    if database_kind != "postgresql":
        pytest.skip("SQLite has no NOTIFY: followers of other processes find new chunks by polling")
    database = Database(ServerSettings(state_dir=tmp_path, database=database_url).database_url())
    bell = LogBell(database)
    try:
        async with bell.following():
            woken = bell.event("env_1")
            other = bell.event("env_2")
            async with database.engine.connect() as connection:
                for _ in range(200):  # until the LISTEN connection stands: a NOTIFY before it is lost
                    await connection.execute(text("SELECT pg_notify('devyard_logs', 'env_1')"))
                    await connection.commit()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(asyncio.shield(woken.wait()), 0.1)
                    if woken.is_set():
                        break
            assert woken.is_set()
            assert not other.is_set()
    finally:
        await database.dispose()
