"""Engines and sessions: ``Database.read()`` and ``Database.write()`` open the two kinds of transaction.

Called by the routes, the control loops and the watch feed; nothing else opens sessions.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
from sqlalchemy import event
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

__all__ = ["Database"]

_SQLITE_BUSY_TIMEOUT_MS = 30_000
#: JSON columns (spec, status, the change feed) through orjson: reading a page of resources is mostly this.
_JSON_CODEC: dict[str, Any] = {
    "json_serializer": lambda value: orjson.dumps(value).decode(),
    "json_deserializer": orjson.loads,
}


class Database:
    """One database: an engine for reads and writes and, on SQLite, the lock that orders writers."""

    def __init__(self, url: str, *, pool_size: int = 10) -> None:
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        if self.is_sqlite:
            # Two engines on one file: reads begin deferred, writes begin immediate.
            self.engine: AsyncEngine = _sqlite_engine(url, immediate=True)
            self._read_engine = _sqlite_engine(url, immediate=False)
        else:
            self.engine = create_async_engine(
                url, pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=True, **_JSON_CODEC
            )
            self._read_engine = self.engine
        self._sessions = async_sessionmaker(self.engine, expire_on_commit=False, autoflush=False)
        self._read_sessions = async_sessionmaker(self._read_engine, expire_on_commit=False, autoflush=False)
        # SQLite allows one writer; queueing writers here is cheaper than in SQLite's busy loop.
        self._write_lock = asyncio.Lock() if self.is_sqlite else None

    @asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncSession]:
        """A read-only transaction."""
        # Closing (not rolling back) ends the transaction without expiring what was read, so rows stay usable.
        async with self._read_sessions() as session:
            yield session

    @asynccontextmanager
    async def write(self) -> AsyncIterator[AsyncSession]:
        """A write transaction: committed when the block ends, rolled back when it raises."""
        if self._write_lock is not None:
            async with self._write_lock, self._sessions() as session, session.begin():
                yield session
        else:
            async with self._sessions() as session, session.begin():
                yield session

    async def ping(self) -> None:
        from sqlalchemy import text

        async with self.engine.connect() as connection:
            await connection.execute(text("SELECT 1"))

    async def dispose(self) -> None:
        await self.engine.dispose()
        if self._read_engine is not self.engine:
            await self._read_engine.dispose()


def _sqlite_engine(url: str, *, immediate: bool) -> AsyncEngine:
    engine = create_async_engine(
        url, connect_args={"timeout": _SQLITE_BUSY_TIMEOUT_MS / 1000}, pool_size=5, **_JSON_CODEC
    )
    event.listen(engine.sync_engine, "connect", _sqlite_on_connect)
    begin = "BEGIN IMMEDIATE" if immediate else "BEGIN"

    def on_begin(connection: Connection) -> None:
        # A write transaction takes the write lock at BEGIN, so it never fails later on a lock upgrade
        # (SQLITE_BUSY that busy_timeout cannot resolve).
        connection.exec_driver_sql(begin)

    event.listen(engine.sync_engine, "begin", on_begin)
    return engine


def _sqlite_on_connect(dbapi_connection: Any, _record: Any) -> None:
    # Take over transaction control from pysqlite so that "begin" below decides how a transaction starts.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute(f"PRAGMA busy_timeout={_SQLITE_BUSY_TIMEOUT_MS}")
    cursor.close()
