"""The change feed behind watches, shared by all watchers of one server process.

Writers append to the ``changes`` table in their transaction (``store.resources.Tx``). One task per process
(``ChangeFeed.run``) reads what is new into a bounded in-memory window and wakes the watchers; it is woken
by this process's own commits, by PostgreSQL NOTIFY from other replicas, and by a poll every second as a
backstop (SQLite shared by several processes, or a lost LISTEN connection). A watcher resuming from a
revision older than the window reads the table until it catches up; one older than the table's retention
gets 410 and relists.

The order is safe because the revision counter row is locked from the moment a writer takes its revisions
until it commits: a reader that sees the counter at V sees every change up to V.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import delete, select, update

from devyard.server.database.engine import Database
from devyard.server.database.tables import ChangeRow, RevisionRow
from devyard.server.store import resources
from devyard.server.store.errors import Gone

__all__ = ["Change", "ChangeFeed", "watch_events"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Change:
    revision: int
    kind: str
    resource_id: str
    organization_id: str | None
    runner_id: str | None
    creator_id: str | None
    user_id: str | None
    type: str
    object: dict[str, Any]

    @classmethod
    def from_row(cls, row: ChangeRow) -> Change:
        return cls(
            row.revision,
            row.kind,
            row.resource_id,
            row.organization_id,
            row.runner_id,
            row.creator_id,
            row.user_id,
            row.type,
            row.object,
        )


class ChangeFeed:
    def __init__(self, database: Database, *, window: int = 20_000, poll_interval: float = 1.0) -> None:
        self.database = database
        self.poll_interval = poll_interval
        self._window: deque[Change] = deque(maxlen=window)
        #: Every change up to ``head`` has been read; those after ``floor`` are in the window.
        self.head = 0
        self.floor = 0
        self.compacted = 0
        self._new = asyncio.Event()
        self._wake = asyncio.Event()
        self._started = asyncio.Event()
        self._listeners: list[Callable[[], None]] = []

    async def started(self) -> None:
        """Returns once ``start`` has read where the feed begins."""
        await self._started.wait()

    def wake(self) -> None:
        """Look for new changes now (a commit in this process, or a NOTIFY)."""
        self._wake.set()

    def subscribe(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (cheaply, in the loop) whenever new changes arrive."""
        self._listeners.append(callback)

    async def start(self) -> None:
        async with self.database.read() as session:
            self.head, self.compacted = await resources.current_revision(session)
        self.floor = self.head
        self._started.set()

    async def run(self) -> None:
        """Poll forever; started by the app's lifespan after ``start``."""
        listener = asyncio.create_task(self._listen()) if not self.database.is_sqlite else None
        try:
            while True:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.poll_interval)
                self._wake.clear()
                try:
                    await self.poll()
                except Exception:
                    log.exception("reading the change feed failed; retrying")
                    await asyncio.sleep(self.poll_interval)
        finally:
            if listener is not None:
                listener.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await listener

    async def poll(self) -> None:
        async with self.database.read() as session:
            value, compacted = await resources.current_revision(session)
            self.compacted = compacted
            if value <= self.head:
                return
            rows = (
                await session.scalars(
                    select(ChangeRow)
                    .where(ChangeRow.revision > self.head, ChangeRow.revision <= value)
                    .order_by(ChangeRow.revision)
                )
            ).all()
        window = self._window
        for row in rows:
            if len(window) == window.maxlen:
                self.floor = window[0].revision
            window.append(Change.from_row(row))
        self.head = value
        self._new.set()
        self._new = asyncio.Event()
        for callback in self._listeners:
            callback()

    def since(self, revision: int) -> list[Change] | None:
        """The window's changes after ``revision``; None when the window starts after it."""
        if revision < self.floor:
            return None
        window = self._window
        if not window or window[-1].revision <= revision:
            return []
        # The window is sorted by revision: find the first newer change from the right.
        index = len(window)
        while index > 0 and window[index - 1].revision > revision:
            index -= 1
        return [window[i] for i in range(index, len(window))]

    async def wait(self, timeout: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._new.wait(), timeout)

    async def _listen(self) -> None:
        """LISTEN for other replicas' commits on a connection of its own; reconnect when it breaks."""
        await listen_forever(self.database, resources.NOTIFY_CHANNEL, lambda _: self.wake(), "other replicas' commits")

    async def compact(self, retention: timedelta) -> int:
        """Drop changes older than ``retention``; returns how many went."""
        cutoff = resources.utcnow() - retention
        async with self.database.write() as session:
            newest_old = (
                await session.execute(
                    select(ChangeRow.revision)
                    .where(ChangeRow.created_at < cutoff)
                    .order_by(ChangeRow.revision.desc())
                    .limit(1)
                )
            ).scalar_one_or_none()
            if newest_old is None:
                return 0
            result = await session.execute(delete(ChangeRow).where(ChangeRow.revision <= newest_old))
            await session.execute(update(RevisionRow).where(RevisionRow.id == 1).values(compacted=newest_old))
        return int(result.rowcount or 0)  # type: ignore[attr-defined]


async def watch_events(
    feed: ChangeFeed,
    kind: str,
    revision: int,
    matches: Callable[[Change], bool],
    *,
    bookmark_interval: float,
    timeout: float | None = None,
) -> AsyncIterator[dict[str, Any]]:
    """The watch events (``{"type", "object"}``) of a kind after ``revision``, as long as the client listens.

    Raises ``Gone`` before the first event when ``revision`` is too old; later, yields an ERROR event instead.
    """
    await feed.started()
    if revision < feed.compacted:
        raise Gone(f"resource_version {revision} is too old (the oldest kept is {feed.compacted}): list again")
    cursor = revision
    deadline = time.monotonic() + timeout if timeout is not None else None
    last_sent = 0.0  # a bookmark goes out as soon as the watcher has caught up
    while True:
        window = feed.since(cursor)
        if window is None:
            # Behind the window: catch up from the table, a page at a time.
            try:
                changes, upto = await _read_changes(feed, kind, cursor)
            except Gone as exc:
                yield {"type": "ERROR", "object": {"error": {"code": "gone", "message": exc.message}}}
                return
        else:
            changes, upto = window, feed.head
        for change in changes:
            if change.kind == kind and matches(change):
                yield {"type": change.type, "object": change.object}
                last_sent = time.monotonic()
        cursor = max(cursor, upto)
        if window is None:
            continue
        now = time.monotonic()
        if now - last_sent >= bookmark_interval:
            yield {
                "type": "BOOKMARK",
                "object": {"kind": kind, "metadata": {"resource_version": str(cursor)}},
            }
            last_sent = now
        if deadline is not None and now >= deadline:
            return
        wait = bookmark_interval - (now - last_sent)
        if deadline is not None:
            wait = min(wait, deadline - now)
        if feed.head <= cursor:
            # Nothing newer is known yet (the watcher may even be ahead of this process's feed): wait.
            await feed.wait(max(wait, 0.01))


async def _read_changes(feed: ChangeFeed, kind: str, cursor: int, limit: int = 1000) -> tuple[list[Change], int]:
    """Changes of a kind after ``cursor`` from the table, up to the window's start; and how far they reach."""
    floor = feed.floor
    async with feed.database.read() as session:
        _, compacted = await resources.current_revision(session)
        if cursor < compacted:
            raise Gone(f"resource_version {cursor} is too old (the oldest kept is {compacted}): list again")
        rows = (
            await session.scalars(
                select(ChangeRow)
                .where(ChangeRow.kind == kind, ChangeRow.revision > cursor, ChangeRow.revision <= floor)
                .order_by(ChangeRow.revision)
                .limit(limit)
            )
        ).all()
    changes = [Change.from_row(row) for row in rows]
    return changes, changes[-1].revision if len(changes) == limit else floor


async def listen_forever(database: Database, channel: str, on_notify: Callable[[str], None], what: str) -> None:
    """LISTEN on ``channel`` (PostgreSQL) on a connection of its own, calling ``on_notify`` with each payload, and
    reconnect with a jittered, capped backoff when the connection breaks; runs until cancelled. The change feed and
    the log followers both wait this way; ``what`` names what is heard, for the log."""
    import asyncpg  # type: ignore[import-untyped]

    url = database.engine.url.set(drivername="postgresql")
    dsn = url.render_as_string(hide_password=False)
    delay = 0.5
    while True:
        connection = None
        try:
            connection = await asyncpg.connect(dsn)
            await connection.add_listener(channel, lambda *args: on_notify(str(args[-1])))
            delay = 0.5
            while not connection.is_closed():
                await asyncio.sleep(5)
                await connection.execute("SELECT 1")
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("LISTEN %s for %s lost (%s); polling until it is back", channel, what, exc)
        finally:
            if connection is not None and not connection.is_closed():
                with contextlib.suppress(Exception):
                    await connection.close()
        await asyncio.sleep(delay * random.uniform(0.5, 1.5))
        delay = min(delay * 2, 30)
