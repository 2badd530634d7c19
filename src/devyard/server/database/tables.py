"""The tables. Resources of every kind share one table: the change feed, paging, optimistic concurrency and
authorization filters are then written once, and a kind's specifics live in its ``spec``/``status`` JSON and
in the few indexed columns that queries filter on.

Columns use types that work on SQLite and PostgreSQL alike; constraint names follow ``NAMING_CONVENTION`` so
migrations can name them on both.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

__all__ = [
    "GLOBAL_SCOPE",
    "NAMING_CONVENTION",
    "AuditRow",
    "Base",
    "ChangeRow",
    "CredentialRow",
    "EnvironmentLogRow",
    "LabelRow",
    "LeaseRow",
    "ResourceRow",
    "RevisionRow",
    "SecretValueRow",
    "ServerFactRow",
    "UTCDateTime",
]

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

#: The name scope of kinds that belong to no organization (users, organizations).
GLOBAL_SCOPE = "global"

ID = String(40)


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp that comes back timezone-aware in UTC on SQLite (which keeps no zone) as on PostgreSQL."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: JSON()}


class ResourceRow(Base):
    __tablename__ = "resources"

    id: Mapped[str] = mapped_column(ID, primary_key=True)
    kind: Mapped[str] = mapped_column(String(32))
    organization_id: Mapped[str | None] = mapped_column(ID, ForeignKey("resources.id", ondelete="CASCADE"))
    #: The organization's id, or GLOBAL_SCOPE: names are unique within a kind and scope.
    scope: Mapped[str] = mapped_column(ID)
    name: Mapped[str] = mapped_column(String(100))
    creator_id: Mapped[str | None] = mapped_column(ID)
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]
    labels: Mapped[dict[str, Any]]
    generation: Mapped[int] = mapped_column(Integer)
    resource_version: Mapped[int] = mapped_column(BigInteger)
    spec: Mapped[dict[str, Any]]
    status: Mapped[dict[str, Any]]
    # Copies of spec and status fields that queries filter on.
    runner_id: Mapped[str | None] = mapped_column(ID)
    user_id: Mapped[str | None] = mapped_column(ID)
    project_id: Mapped[str | None] = mapped_column(ID)
    phase: Mapped[str | None] = mapped_column(String(20))
    desired_phase: Mapped[str | None] = mapped_column(String(20))

    __table_args__ = (
        UniqueConstraint("kind", "scope", "name"),
        Index(None, "kind", "organization_id", "id"),
        Index(None, "kind", "runner_id"),
        Index(None, "kind", "user_id"),
        Index(None, "kind", "phase"),
    )
    # Optimistic concurrency: every UPDATE says WHERE resource_version = <the version read>.
    __mapper_args__ = {"version_id_col": resource_version, "version_id_generator": False}


class LabelRow(Base):
    __tablename__ = "resource_labels"

    resource_id: Mapped[str] = mapped_column(ID, ForeignKey("resources.id", ondelete="CASCADE"), primary_key=True)
    key: Mapped[str] = mapped_column(String(100), primary_key=True)
    value: Mapped[str] = mapped_column(String(255))

    __table_args__ = (Index(None, "key", "value"),)


class CredentialRow(Base):
    """A bearer credential, by the SHA-256 of its secret: user tokens, runner credentials, exchange tokens."""

    __tablename__ = "credentials"

    hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    #: "user" (a Token resource), "runner" (a runner's credential) or "exchange" (one-time runner exchange).
    principal_type: Mapped[str] = mapped_column(String(16))
    #: The Token resource's id for user tokens; the runner's id otherwise.
    token_id: Mapped[str] = mapped_column(ID, ForeignKey("resources.id", ondelete="CASCADE"))
    #: The user or runner the credential authenticates.
    subject_id: Mapped[str] = mapped_column(ID)
    created_at: Mapped[datetime]
    expires_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]

    __table_args__ = (Index(None, "token_id"), Index(None, "subject_id"))


class SecretValueRow(Base):
    __tablename__ = "secret_values"

    secret_id: Mapped[str] = mapped_column(ID, ForeignKey("resources.id", ondelete="CASCADE"), primary_key=True)
    ciphertext: Mapped[str] = mapped_column(Text)


class ChangeRow(Base):
    """The change feed that watches read: one row per write, keyed by the global revision."""

    __tablename__ = "changes"

    revision: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    kind: Mapped[str] = mapped_column(String(32))
    resource_id: Mapped[str] = mapped_column(ID)
    organization_id: Mapped[str | None] = mapped_column(ID)
    runner_id: Mapped[str | None] = mapped_column(ID)
    creator_id: Mapped[str | None] = mapped_column(ID)
    user_id: Mapped[str | None] = mapped_column(ID)
    type: Mapped[str] = mapped_column(String(10))
    object: Mapped[dict[str, Any]]
    created_at: Mapped[datetime]

    __table_args__ = (Index(None, "kind", "revision"),)


class RevisionRow(Base):
    """One row: the last revision handed out. Bumping it serializes the commit order of writers, so the change
    feed never shows revision N+1 before N is visible."""

    __tablename__ = "revision"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    value: Mapped[int] = mapped_column(BigInteger)
    #: The oldest revision the change feed still holds; watches from before it get 410.
    compacted: Mapped[int] = mapped_column(BigInteger)


class AuditRow(Base):
    __tablename__ = "audit_events"

    id: Mapped[str] = mapped_column(ID, primary_key=True)
    organization_id: Mapped[str | None] = mapped_column(ID)
    created_at: Mapped[datetime]
    actor_type: Mapped[str] = mapped_column(String(16))
    actor_id: Mapped[str | None] = mapped_column(ID)
    action: Mapped[str] = mapped_column(String(64))
    target_kind: Mapped[str] = mapped_column(String(32))
    target_id: Mapped[str | None] = mapped_column(ID)
    source_ip: Mapped[str | None] = mapped_column(String(64))
    user_agent: Mapped[str | None] = mapped_column(String(255))
    details: Mapped[dict[str, Any]]

    __table_args__ = (Index(None, "organization_id", "id"), Index(None, "target_id"))


class LeaseRow(Base):
    """Which server replica runs a control loop: a lease it renews, taken over when it lapses."""

    __tablename__ = "leases"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    holder: Mapped[str] = mapped_column(String(64))
    expires_at: Mapped[datetime]


class ServerFactRow(Base):
    """What every replica must agree on (the secret key's fingerprint): checked on start."""

    __tablename__ = "server_facts"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(String(255))


class EnvironmentLogRow(Base):
    """A chunk of an environment's log stream as its runner shipped it (``store.logs``); goes with the environment.

    ``seq`` orders an environment's chunks as they were received. ``retained`` is the running total of bytes
    stored for the stream up to and including this chunk: retention deletes the chunks a fixed amount behind the
    newest without summing. The unique key makes a retried chunk a duplicate even when two requests race.
    """

    __tablename__ = "environment_logs"

    # INTEGER on SQLite: only that is an alias of its rowid, and so numbered by the database.
    seq: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    environment_id: Mapped[str] = mapped_column(ID, ForeignKey("resources.id", ondelete="CASCADE"))
    stream: Mapped[str] = mapped_column(String(200))
    epoch: Mapped[int] = mapped_column(Integer)
    byte_offset: Mapped[int] = mapped_column(BigInteger)
    #: The bytes of the runner's file this chunk covers.
    size: Mapped[int] = mapped_column(Integer)
    retained: Mapped[int] = mapped_column(BigInteger)
    data: Mapped[str] = mapped_column(Text)
    received_at: Mapped[datetime]

    __table_args__ = (
        UniqueConstraint("environment_id", "stream", "epoch", "byte_offset"),
        Index(None, "environment_id", "seq"),
        Index(None, "environment_id", "stream", "seq"),
    )
