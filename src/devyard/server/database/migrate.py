"""Schema migrations with Alembic, run by the server on start and by tests on both databases.

Several server replicas may start at once on one PostgreSQL: the upgrade holds an advisory lock so that one
migrates while the others wait.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import text
from sqlalchemy.engine import Connection

from devyard.server.database.engine import Database

__all__ = ["alembic_config", "current_revision", "downgrade", "head_revision", "upgrade"]

_MIGRATIONS = Path(__file__).parent / "migrations"
_LOCK_KEY = 0x64657679  # "devy"


def alembic_config(connection: Connection | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(_MIGRATIONS))
    config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head


def _upgrade(connection: Connection, target: str) -> None:
    if connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": _LOCK_KEY})
        connection.commit()
    try:
        command.upgrade(alembic_config(connection), target)
        connection.commit()
    finally:
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": _LOCK_KEY})
            connection.commit()


def _current(connection: Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


async def upgrade(database: Database, target: str = "head") -> None:
    async with database.engine.connect() as connection:
        await connection.run_sync(_upgrade, target)


def _downgrade(connection: Connection, target: str) -> None:
    command.downgrade(alembic_config(connection), target)
    connection.commit()


async def downgrade(database: Database, target: str) -> None:
    """Undo migrations down to ``target`` (``base``: an empty database). For operators and tests."""
    async with database.engine.connect() as connection:
        await connection.run_sync(_downgrade, target)


async def current_revision(database: Database) -> str | None:
    async with database.engine.connect() as connection:
        return await connection.run_sync(_current)
