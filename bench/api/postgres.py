"""A fresh PostgreSQL cluster for one benchmark run, configured for durability as in production.

It is the test fixture's server (``tests/support/postgres.py``) with the tuning overridden: the cluster keeps
PostgreSQL's durable defaults, written out so the report can show them: ``fsync``,
``synchronous_commit`` and ``full_page_writes`` on, so every commit waits for its WAL to reach the disk.
PostgreSQL refuses to run as root, so under root ``initdb`` and ``postgres`` run as the ``postgres`` OS user.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from support import postgres as test_postgres

__all__ = ["DURABLE_SETTINGS", "Cluster", "durable_cluster"]

_SUPERUSER = "postgres"
_DATABASE = "devyard"
_START_TIMEOUT = 60.0
_STOP_TIMEOUT = 30.0

#: What ``postgres`` is started with besides where to listen: durability as shipped, a little more memory.
DURABLE_SETTINGS: Mapping[str, str] = {
    "fsync": "on",
    "synchronous_commit": "on",
    "full_page_writes": "on",
    "shared_buffers": "256MB",
    "max_connections": "100",
    "log_min_messages": "warning",
}


@dataclass(frozen=True)
class Cluster:
    #: ``postgresql://postgres@127.0.0.1:PORT/devyard``, for ``ServerSettings.database``.
    url: str
    directory: Path
    #: The postmaster's pid: its backends are its children, which ``cpu`` counts with it.
    pid: int
    version: str


@contextmanager
def durable_cluster() -> Iterator[Cluster]:
    """A new server with ``DURABLE_SETTINGS`` (started by the test fixture's ``running_postgres``) and the
    ``devyard`` database; stopped and removed on exit."""
    with test_postgres.running_postgres(settings=dict(DURABLE_SETTINGS)) as server:
        server.sql(f"CREATE DATABASE {_DATABASE}")
        version = server.sql("SHOW server_version").strip()
        yield Cluster(server.url(_DATABASE), server.directory, server.pid, version)
