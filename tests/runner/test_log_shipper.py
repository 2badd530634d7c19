"""The log shipper against the real management plane (in this process, SQLite and PostgreSQL): files written,
appended to, cut mid-line and mid-character, truncated and replaced; the server stopped and started again; a
restarted shipper that goes on where it stopped; an environment deleted.

Requests are counted by a real HTTP transport that counts what it sends, to tell "nothing sent" from "sent and
deduplicated by the server".
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from devyard.client import AsyncClient, Client
from devyard.runner.backoff import BackoffPolicy
from devyard.runner.log_shipper import STATE_FILE, LogShipper, text_of
from support.live_server import LiveServer
from support.world import RegisteredRunner, eventually, make_user, register_runner

from .conftest import FAST_RETRY
from .conftest import eventually as eventually_async


class CountingTransport(httpx.AsyncHTTPTransport):
    """httpx's own transport, counting the log batches it sends."""

    def __init__(self) -> None:
        super().__init__()
        self.batches = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.method == "POST" and request.url.path.endswith("/logs"):
            self.batches += 1
        return await super().handle_async_request(request)


@dataclass
class World:
    server: LiveServer
    owner: Client
    runner: RegisteredRunner
    environment_id: str
    root: Path

    @property
    def directory(self) -> Path:
        return self.root / self.environment_id

    def stored(self, stream: str | None = None) -> list[dict[str, Any]]:
        params: dict[str, Any] = {"limit": 5000}
        if stream is not None:
            params["stream"] = stream
        items: list[dict[str, Any]] = self.owner.get(f"/api/v1/environments/{self.environment_id}/logs", params)[
            "items"
        ]
        return items

    def text(self, stream: str) -> str:
        return "".join(item["data"] for item in self.stored(stream))

    def shipper(self, transport: CountingTransport, **options: Any) -> tuple[LogShipper, AsyncClient]:
        client = AsyncClient(self.server.url, self.runner.credential, retry=FAST_RETRY, transport=transport)
        options.setdefault("poll_interval", 0.02)
        options.setdefault("backoff", BackoffPolicy(base=0.02, cap=0.1))
        return LogShipper(client, self.root, **options), client


@pytest.fixture
def world(server: LiveServer, tmp_path: Path) -> Iterator[World]:
    admin = server.client()
    runner = register_runner(admin, "r1")
    runner.heartbeat()
    class_id = admin.post(
        "/api/v1/environment-classes", {"metadata": {"name": "one"}, "spec": {"runner_ids": [runner.id]}}
    )["metadata"]["id"]
    owner = make_user(admin, "alice")
    created = owner.post("/api/v1/environments", {"spec": {"image": "debian:bookworm", "class_id": class_id}})
    environment_id = created["metadata"]["id"]
    eventually(lambda: admin.get(f"/api/v1/environments/{environment_id}")["status"].get("runner_id") == runner.id)
    root = tmp_path / "logs"
    (root / environment_id / "automations").mkdir(parents=True)
    yield World(server, owner, runner, environment_id, root)
    for client in (admin, owner, runner.client):
        client.close()


@contextlib.asynccontextmanager
async def shipping(shipper: LogShipper, client: AsyncClient) -> AsyncIterator[None]:
    task = asyncio.create_task(shipper.run())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await client.aclose()


def append(path: Path, data: bytes) -> None:
    with path.open("ab") as file:
        file.write(data)


async def until(world: World, stream: str, text: str) -> None:
    await eventually_async(lambda: world.text(stream) == text, timeout=20, what=f"{stream} to read {text!r}")


async def test_the_shipper_ships_what_is_written_across_truncation_and_a_server_outage(world: World) -> None:
    build = world.directory / "build.log"
    web = world.directory / "automations" / "web.log"
    lifecycle = world.directory / "lifecycle.log"
    build.write_bytes(b"line 1\n")
    web.write_bytes(b"serving\n")
    # Not UTF-8, a NUL: each byte becomes one '?', so that offsets stay byte offsets.
    lifecycle.write_bytes(b"caf\xc3\xa9 \x00 \xff end\n")
    transport = CountingTransport()
    shipper, client = world.shipper(transport, max_request_bytes=16)
    async with shipping(shipper, client):
        await until(world, "build", "line 1\n")
        await until(world, "automations/web", "serving\n")
        await until(world, "lifecycle", "café ? ? end\n")

        # A line written in two parts; long text without newlines cut at the request cap, never inside a character.
        append(build, b"partial")
        await until(world, "build", "line 1\npartial")
        append(build, b" done\n")
        append(web, "é".encode() * 20 + b"\n")
        await until(world, "build", "line 1\npartial done\n")
        await until(world, "automations/web", "serving\n" + "é" * 20 + "\n")

        # Truncated below what was shipped: shipped again from its start, in a new epoch.
        build.write_bytes(b"fresh\n")
        await eventually_async(lambda: any(i["epoch"] == 1 for i in world.stored("build")), timeout=20)
        assert [(i["epoch"], i["offset"], i["data"]) for i in world.stored("build") if i["epoch"] == 1] == [
            (1, 0, "fresh\n")
        ]
        # Replaced by another file (as a rotation does), even one as large: a new epoch too.
        replacement = world.directory / "build.log.new"
        replacement.write_bytes(b"rotated\n")
        os.replace(replacement, build)
        await eventually_async(lambda: any(i["epoch"] == 2 for i in world.stored("build")), timeout=20)

        world.server.stop()
        append(web, b"while the server was away\n")
        await asyncio.sleep(0.3)  # a few failed passes
        world.server.start()
        await until(world, "automations/web", "serving\n" + "é" * 20 + "\nwhile the server was away\n")

    assert (world.root / STATE_FILE).is_file()
    # A new shipper (a restarted runner) goes on where the last one stopped. The last one may have been cancelled
    # after the server stored its last batch and before it heard so: that batch (at most) is sent again, and the
    # server stores nothing twice.
    stored = world.stored("automations/web")
    again = CountingTransport()
    restarted, client = world.shipper(again)
    await restarted.ship_pending()
    assert again.batches <= 1
    assert world.stored("automations/web") == stored
    resent = again.batches
    append(web, b"after the restart\n")
    await restarted.ship_pending()
    assert again.batches == resent + 1
    await client.aclose()
    assert world.text("automations/web").endswith("while the server was away\nafter the restart\n")
    assert [i["data"] for i in world.stored("build") if i["epoch"] == 2] == ["rotated\n"]


async def test_a_deleted_environment_is_no_longer_shipped(world: World) -> None:
    build = world.directory / "build.log"
    build.write_bytes(b"hello\n")
    transport = CountingTransport()
    shipper, client = world.shipper(transport)
    await shipper.ship_pending()
    assert world.text("build") == "hello\n"
    world.owner.delete(f"/api/v1/environments/{world.environment_id}")
    world.runner.report(world.environment_id, phase="deleted", observed_generation=2)

    append(build, b"after deletion\n")
    await shipper.ship_pending()
    refused = transport.batches  # the one the server answered 404
    append(build, b"more\n")
    await shipper.ship_pending()
    await shipper.ship_pending()
    assert transport.batches == refused
    await client.aclose()
    # Once its directory goes, the shipper forgets it.
    for path in sorted(world.directory.rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    world.directory.rmdir()
    await shipper.ship_pending()
    assert world.environment_id not in (world.root / STATE_FILE).read_text()


def test_text_keeps_byte_counts() -> None:
    for raw in (b"plain\n", "naïve ☃ 🐍".encode(), b"\xff\xfe\x00\xc3", b"\xed\xa0\x80"):
        assert len(text_of(raw).encode()) == len(raw)
