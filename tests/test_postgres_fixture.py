"""The database fixtures themselves: each test gets a fresh, empty, working database of each kind."""

from __future__ import annotations

import sqlite3

import asyncpg
import pytest

from support.postgres import PostgresServer


async def _tables(database_url: str) -> list[str]:
    if database_url.startswith("sqlite:///"):
        with sqlite3.connect(database_url.removeprefix("sqlite:///")) as connection:
            rows = connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
        return [row[0] for row in rows]
    connection = await asyncpg.connect(database_url)
    try:
        rows = await connection.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        return [row["tablename"] for row in rows]
    finally:
        await connection.close()


async def _create_table(database_url: str) -> None:
    if database_url.startswith("sqlite:///"):
        with sqlite3.connect(database_url.removeprefix("sqlite:///")) as connection:
            connection.execute("CREATE TABLE leftover (id INTEGER PRIMARY KEY)")
        return
    connection = await asyncpg.connect(database_url)
    try:
        assert await connection.fetchval("SELECT 1") == 1
        await connection.execute("CREATE TABLE leftover (id INTEGER PRIMARY KEY)")
    finally:
        await connection.close()


# Twice, so that the second run would see the first one's table if databases were shared between tests.
@pytest.mark.parametrize("attempt", [1, 2])
async def test_each_test_gets_a_fresh_database(database_url: str, attempt: int) -> None:
    assert await _tables(database_url) == []
    await _create_table(database_url)
    assert await _tables(database_url) == ["leftover"]


@pytest.mark.postgres
async def test_postgres_server_is_usable_and_tuned_for_tests(postgres_server: PostgresServer) -> None:
    connection = await asyncpg.connect(postgres_server.url())
    try:
        assert await connection.fetchval("SELECT current_user") == "postgres"
        assert await connection.fetchval("SHOW fsync") == "off"
        assert await connection.fetchval("SHOW synchronous_commit") == "off"
        assert await connection.fetchval("SHOW server_encoding") == "UTF8"
    finally:
        await connection.close()
    assert (postgres_server.socket_dir / f".s.PGSQL.{postgres_server.port}").is_socket()


@pytest.mark.postgres
def test_dropped_databases_are_gone(postgres_server: PostgresServer) -> None:
    with postgres_server.database() as url:
        name = url.rsplit("/", 1)[1]
        assert name in postgres_server.sql("SELECT datname FROM pg_database").split()
    assert name not in postgres_server.sql("SELECT datname FROM pg_database").split()
