"""The database kinds the tests run on, and a fresh database of a kind.

Used by ``tests/conftest.py`` (``database_url``, a database per test) and by conftests that keep one database
for a whole module (``tests/server/conftest.py``), so that both honour ``--databases`` /
``DEVYARD_TEST_DATABASES`` and mark PostgreSQL the same way.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

__all__ = ["KINDS", "fresh_database", "params", "selected"]

KINDS = ("sqlite", "postgresql")


def selected(config: pytest.Config) -> list[str]:
    """The kinds ``--databases`` names, in ``KINDS`` order; a usage error for an unknown one."""
    kinds = [kind.strip() for kind in str(config.getoption("databases")).split(",") if kind.strip()]
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown or not kinds:
        raise pytest.UsageError(
            f"--databases / DEVYARD_TEST_DATABASES: expected some of {', '.join(KINDS)}, got {kinds}"
        )
    return [kind for kind in KINDS if kind in kinds]


def params(config: pytest.Config) -> list[Any]:
    """``pytest.param``s for ``metafunc.parametrize``: one per selected kind, PostgreSQL marked ``postgres``."""
    return [
        pytest.param(kind, id=kind, marks=[pytest.mark.postgres] if kind == "postgresql" else [])
        for kind in selected(config)
    ]


@contextmanager
def fresh_database(kind: str, request: pytest.FixtureRequest, directory: Path) -> Iterator[str]:
    """A new empty database's URL: SQLite in ``directory``, or a database on the session's PostgreSQL server
    (the ``postgres_server`` fixture, started now if it is not yet), dropped on exit."""
    if kind == "sqlite":
        yield f"sqlite:///{directory / 'devyard.db'}"
        return
    with request.getfixturevalue("postgres_server").database() as url:
        yield url
