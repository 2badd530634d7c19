"""The management plane's settings, from the command line or ``DEVYARD_SERVER_*`` environment variables."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["ServerSettings"]


class ServerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DEVYARD_SERVER_", extra="forbid")

    listen: str = "127.0.0.1:7480"
    state_dir: Path = Path("/var/lib/devyard/server")
    #: SQLAlchemy URL; default: SQLite at ``<state_dir>/devyard.db``. ``postgresql://`` URLs use asyncpg.
    database: str | None = None
    #: The key that encrypts secrets at rest (urlsafe base64 of 32 bytes); default: made once and kept in
    #: ``<state_dir>/secret-key``.
    secret_key: str | None = None
    #: The URL runners and users reach this server at, for messages and ``devyard up``.
    public_url: str | None = None
    heartbeat_interval: float = Field(default=10.0, gt=0)
    #: A runner silent for this long goes offline.
    heartbeat_timeout: float = Field(default=30.0, gt=0)
    #: How often the control loops run.
    loop_interval: float = Field(default=1.0, gt=0)
    #: How often running environments are checked against their idle timeout.
    idle_check_interval: float = Field(default=30.0, gt=0)
    #: How long the change feed keeps changes that watchers may resume from.
    watch_retention_seconds: float = Field(default=3600.0, gt=0)
    #: How often the change feed is compacted (changes older than the retention dropped).
    compaction_interval: float = Field(default=60.0, gt=0)
    #: The change feed's backstop poll; commits in this process and NOTIFY from other replicas wake it sooner.
    watch_poll_interval: float = Field(default=1.0, gt=0)
    bookmark_interval: float = Field(default=10.0, gt=0)
    #: Exchange tokens expire after this long.
    exchange_token_ttl: float = Field(default=24 * 3600.0, gt=0)
    #: Run the control loops in this process (several replicas may; they take turns through the database).
    run_loops: bool = True
    #: Server processes on one port (PostgreSQL only): one process uses one core.
    workers: int = Field(default=1, ge=1, le=64)
    #: Bodies larger than this are refused with 413.
    max_body_bytes: int = 1024 * 1024

    def database_url(self) -> str:
        if self.database is None:
            return f"sqlite+aiosqlite:///{self.state_dir / 'devyard.db'}"
        url = self.database
        if url.startswith(("postgresql://", "postgres://")):
            url = "postgresql+asyncpg://" + url.split("://", 1)[1]
        elif url.startswith("sqlite:///"):
            url = "sqlite+aiosqlite:///" + url.removeprefix("sqlite:///")
        return url

    def is_sqlite(self) -> bool:
        return self.database_url().startswith("sqlite")

    def host_port(self) -> tuple[str, int]:
        host, _, port = self.listen.rpartition(":")
        return host.strip("[]") or "127.0.0.1", int(port)
