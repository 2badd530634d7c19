"""Migrations on both databases: upgrading an empty database gives exactly the schema the tables declare
(no drift between ``database/tables.py`` and ``database/migrations``), downgrading removes it, and upgrading
again is a no-op."""

from __future__ import annotations

from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect
from sqlalchemy.engine import Connection

from devyard.server.database import migrate
from devyard.server.database.engine import Database
from devyard.server.database.tables import Base
from devyard.server.settings import ServerSettings


def _drift(connection: Connection) -> list[object]:
    context = MigrationContext.configure(connection, opts={"compare_type": True})
    return list(compare_metadata(context, Base.metadata))


def _tables(connection: Connection) -> set[str]:
    return set(inspect(connection).get_table_names())


async def test_migrations_match_the_tables_and_go_both_ways(database_url: str, tmp_path: Path) -> None:
    database = Database(ServerSettings(state_dir=tmp_path, database=database_url).database_url())
    try:
        await migrate.upgrade(database)
        assert await migrate.current_revision(database) == migrate.head_revision()
        async with database.engine.connect() as connection:
            assert await connection.run_sync(_drift) == []
        await migrate.upgrade(database)  # again: nothing to do
        await migrate.downgrade(database, "base")
        async with database.engine.connect() as connection:
            assert await connection.run_sync(_tables) == {"alembic_version"}
        await migrate.upgrade(database)
        async with database.engine.connect() as connection:
            assert await connection.run_sync(_drift) == []
    finally:
        await database.dispose()
