"""The generic resource store: reading, listing and writing resources of any kind.

Every write goes through ``Tx``: it hands out revisions from the global counter (which also orders commits),
writes the change feed that watches read, the labels index and the audit log, all in the caller's
transaction. Kind modules (``environments``, ``runners``, ...) build on these functions.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from pydantic import BaseModel, ValidationError
from sqlalchemy import Select, delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm.exc import StaleDataError

from devyard.server.database.tables import (
    GLOBAL_SCOPE,
    AuditRow,
    ChangeRow,
    LabelRow,
    ResourceRow,
    RevisionRow,
)
from devyard.server.store.errors import Conflict, Invalid, NotFound, StaleWrite
from devyard.wire import ids
from devyard.wire.meta import MetadataPatch

__all__ = [
    "LABEL_KEY_MAX",
    "LABEL_VALUE_MAX",
    "NOTIFY_CHANNEL",
    "SYSTEM",
    "Actor",
    "ChangeLike",
    "ListPage",
    "Query",
    "Tx",
    "check_labels",
    "check_version",
    "count",
    "current_revision",
    "get",
    "list_page",
    "merge_metadata",
    "merge_spec",
    "name_from",
    "new_row",
    "parse_resource_version",
    "render",
    "require",
    "utcnow",
]

#: PostgreSQL NOTIFY channel on which writers announce new revisions to every server replica.
NOTIFY_CHANNEL = "devyard_changes"


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class Actor:
    """Who makes a write, for the audit log."""

    type: str  # "user" | "runner" | "system" | "anonymous"
    id: str | None = None
    source_ip: str | None = None
    user_agent: str | None = None


SYSTEM = Actor("system")


def render(row: ResourceRow) -> dict[str, Any]:
    """The wire form of a resource: ``{kind, metadata, spec, status}``."""
    return {
        "kind": row.kind,
        "metadata": {
            "id": row.id,
            "name": row.name,
            "organization_id": row.organization_id,
            "creator_id": row.creator_id,
            "created_at": row.created_at.isoformat(),
            "updated_at": row.updated_at.isoformat(),
            "labels": row.labels,
            "generation": row.generation,
            "resource_version": str(row.resource_version),
        },
        "spec": row.spec,
        "status": row.status,
    }


def parse_resource_version(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        version = int(value)
    except ValueError:
        raise Invalid(f"resource_version {value!r} is not one this server issued") from None
    if version < 0:
        raise Invalid(f"resource_version {value!r} is not one this server issued")
    return version


def name_from(text: str) -> str | None:
    """A name (``NAME_PATTERN``: lower-case letters, digits and ``-``, at most 63) made from free text, such as
    a repository's last path segment; None when nothing of it is left (``new_row`` then names by id)."""
    name = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:63].rstrip("-")
    return name or None


#: The widths of the label columns (``LabelRow``).
LABEL_KEY_MAX, LABEL_VALUE_MAX = 100, 255


def check_labels(labels: dict[str, str]) -> None:
    for key, value in labels.items():
        if not 0 < len(key) <= LABEL_KEY_MAX or len(value) > LABEL_VALUE_MAX:
            raise Invalid(
                f"label {key[:40]!r}: a label's key has 1 to {LABEL_KEY_MAX} characters, its value at most "
                f"{LABEL_VALUE_MAX}"
            )


def new_row(
    kind: str,
    *,
    name: str | None,
    organization_id: str | None,
    creator_id: str | None,
    spec: dict[str, Any],
    status: dict[str, Any] | None = None,
    labels: dict[str, str] | None = None,
    resource_id: str | None = None,
) -> ResourceRow:
    """A resource not yet written: pass it to ``Tx.create``."""
    resource_id = resource_id or ids.new_id(kind)
    now = utcnow()
    return ResourceRow(
        id=resource_id,
        kind=kind,
        organization_id=organization_id,
        scope=organization_id or GLOBAL_SCOPE,
        name=name or resource_id.replace("_", "-"),
        creator_id=creator_id,
        created_at=now,
        updated_at=now,
        labels=dict(labels or {}),
        generation=1,
        resource_version=0,
        spec=spec,
        status=status or {},
    )


async def get(session: AsyncSession, kind: str, resource_id: str) -> ResourceRow | None:
    row = await session.get(ResourceRow, resource_id)
    if row is None or row.kind != kind:
        return None
    return row


async def require(session: AsyncSession, kind: str, resource_id: str) -> ResourceRow:
    row = await get(session, kind, resource_id)
    if row is None:
        raise NotFound(f"{kind} {resource_id} not found")
    return row


async def current_revision(session: AsyncSession) -> tuple[int, int]:
    """The last revision handed out and committed, and the oldest the change feed still holds."""
    result = await session.execute(select(RevisionRow.value, RevisionRow.compacted).where(RevisionRow.id == 1))
    value, compacted = result.one()
    return int(value), int(compacted)


class ChangeLike(Protocol):
    """A change of the feed, as a row or as the feed's in-memory copy."""

    @property
    def resource_id(self) -> str: ...
    @property
    def organization_id(self) -> str | None: ...
    @property
    def runner_id(self) -> str | None: ...
    @property
    def creator_id(self) -> str | None: ...
    @property
    def user_id(self) -> str | None: ...
    @property
    def object(self) -> dict[str, Any]: ...


@dataclass
class Query:
    """What a list asks for, besides paging. Every field narrows; None means any."""

    organization_ids: Sequence[str] | None = None
    runner_id: str | None = None
    user_id: str | None = None
    creator_id: str | None = None
    project_id: str | None = None
    phase: str | None = None
    desired_phase: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    ids: Sequence[str] | None = None
    #: Rows that belong to this user (``user_id``) or to nobody in particular (shared).
    own_or_shared: str | None = None

    def apply(self, statement: Select[Any]) -> Select[Any]:
        if self.organization_ids is not None:
            statement = statement.where(ResourceRow.organization_id.in_(list(self.organization_ids)))
        for column, value in (
            (ResourceRow.runner_id, self.runner_id),
            (ResourceRow.user_id, self.user_id),
            (ResourceRow.creator_id, self.creator_id),
            (ResourceRow.project_id, self.project_id),
            (ResourceRow.phase, self.phase),
            (ResourceRow.desired_phase, self.desired_phase),
        ):
            if value is not None:
                statement = statement.where(column == value)
        if self.ids is not None:
            statement = statement.where(ResourceRow.id.in_(list(self.ids)))
        if self.own_or_shared is not None:
            statement = statement.where((ResourceRow.user_id == self.own_or_shared) | ResourceRow.user_id.is_(None))
        for key, value in self.labels.items():
            statement = statement.where(
                ResourceRow.id.in_(select(LabelRow.resource_id).where(LabelRow.key == key, LabelRow.value == value))
            )
        return statement

    def matches(self, change: ChangeLike) -> bool:
        """Whether a change concerns a resource this query selects, judged on the change's own copy."""
        if self.organization_ids is not None and change.organization_id not in self.organization_ids:
            return False
        if self.runner_id is not None and change.runner_id != self.runner_id:
            return False
        if self.user_id is not None and change.user_id != self.user_id:
            return False
        if self.creator_id is not None and change.creator_id != self.creator_id:
            return False
        if self.ids is not None and change.resource_id not in self.ids:
            return False
        if self.own_or_shared is not None and change.user_id not in (None, self.own_or_shared):
            return False
        obj = change.object
        spec, status, metadata = obj.get("spec", {}), obj.get("status", {}), obj.get("metadata", {})
        if self.project_id is not None and spec.get("project_id") != self.project_id:
            return False
        if self.phase is not None and status.get("phase") != self.phase:
            return False
        if self.desired_phase is not None and spec.get("desired_phase") != self.desired_phase:
            return False
        labels = metadata.get("labels", {})
        return all(labels.get(key) == value for key, value in self.labels.items())


@dataclass
class ListPage:
    rows: list[ResourceRow]
    resource_version: int
    next_page_token: str | None


def _encode_token(last_id: str) -> str:
    return base64.urlsafe_b64encode(last_id.encode()).decode().rstrip("=")


def _decode_token(token: str) -> str:
    try:
        value = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise Invalid("page_token is not one this server issued") from None
    if ids.kind_of(value) is None:
        raise Invalid("page_token is not one this server issued")
    return value


async def list_page(
    session: AsyncSession, kind: str, query: Query, *, page_size: int, page_token: str | None
) -> ListPage:
    """One page of a kind's resources, oldest first, and the revision to watch from."""
    revision, _ = await current_revision(session)
    statement = query.apply(select(ResourceRow).where(ResourceRow.kind == kind))
    if page_token:
        statement = statement.where(ResourceRow.id > _decode_token(page_token))
    statement = statement.order_by(ResourceRow.id).limit(page_size + 1)
    rows = list((await session.scalars(statement)).all())
    next_token = _encode_token(rows[page_size - 1].id) if len(rows) > page_size else None
    return ListPage(rows[:page_size], revision, next_token)


_SELECTOR_FIELDS = ("runner_id", "user_id", "project_id", "phase", "desired_phase")


@dataclass
class _Write:
    row: ResourceRow
    type: str  # ADDED | MODIFIED | DELETED
    labels_changed: bool


class Tx:
    """The writes of one transaction: call ``create``/``modify``/``remove``, then ``commit``.

    The revision counter is bumped at ``commit`` only, right before the rows are flushed, so that the lock it
    takes (which orders every writer's commit) is held as briefly as possible.
    """

    def __init__(self, session: AsyncSession, actor: Actor = SYSTEM) -> None:
        self.session = session
        self.actor = actor
        self._writes: list[_Write] = []
        self._audit: list[dict[str, Any]] = []
        self._later: list[object] = []
        self.last_revision: int | None = None
        #: The kinds this transaction changed (known after commit).
        self.kinds: frozenset[str] = frozenset()

    def absorb(self, other: Tx) -> None:
        """Take over another transaction's staged writes, audit rows and all (group commit)."""
        self._writes += other._writes
        self._audit += other._audit
        self._later += other._later
        other._writes, other._audit, other._later = [], [], []

    def add_after(self, obj: object) -> None:
        """Add a row that refers to resources of this transaction, after they are written."""
        self._later.append(obj)

    def create(self, row: ResourceRow, *, action: str | None = "create", details: dict[str, Any] | None = None) -> None:
        check_labels(row.labels)
        self._writes.append(_Write(row, "ADDED", bool(row.labels)))
        if action:
            self.audit(action, row, details)

    def modify(
        self,
        row: ResourceRow,
        *,
        action: str | None = "update",
        details: dict[str, Any] | None = None,
        spec_changed: bool = False,
        labels_changed: bool = False,
    ) -> None:
        """Record a change to a row read in this session (its fields already set). A row with no net change is
        not written, nor audited: a PATCH that changes nothing leaves no trace."""
        if not (spec_changed or labels_changed) and row in self.session and not self.session.is_modified(row):
            return
        if labels_changed:
            check_labels(row.labels)
        if spec_changed:
            row.generation += 1
        self._writes.append(_Write(row, "MODIFIED", labels_changed))
        if action:
            self.audit(action, row, details)

    def remove(self, row: ResourceRow, *, action: str | None = "delete", details: dict[str, Any] | None = None) -> None:
        self._writes.append(_Write(row, "DELETED", False))
        if action:
            self.audit(action, row, details)

    def audit(
        self,
        action: str,
        row: ResourceRow | None,
        details: dict[str, Any] | None = None,
        *,
        target_kind: str | None = None,
        target_id: str | None = None,
        organization_id: str | None = None,
    ) -> None:
        kind = target_kind or (row.kind if row is not None else "")
        organizations: list[str | None] = [
            organization_id
            or (row.organization_id if row is not None else None)
            or (row.id if row is not None and row.kind == "Organization" else None)
        ]
        if organizations == [None] and row is not None and row.kind == "User":
            # A user belongs to no organization: the event goes in the log of each of theirs, for its admins.
            organizations = list(row.status.get("organization_ids") or [None])
        for organization in organizations:
            self._audit_in(organization, kind, action, row, details, target_id)

    def _audit_in(
        self,
        organization_id: str | None,
        kind: str,
        action: str,
        row: ResourceRow | None,
        details: dict[str, Any] | None,
        target_id: str | None,
    ) -> None:
        self._audit.append(
            {
                "id": ids.new_id("AuditEvent"),
                "organization_id": organization_id,
                "created_at": utcnow(),
                "actor_type": self.actor.type,
                "actor_id": self.actor.id,
                "action": f"{_snake(kind)}.{action}" if "." not in action else action,
                "target_kind": kind,
                "target_id": target_id or (row.id if row is not None else None),
                "source_ip": self.actor.source_ip,
                "user_agent": (self.actor.user_agent or "")[:255] or None,
                "details": details or {},
            }
        )

    async def commit(self) -> int | None:
        """Write everything; returns the last revision handed out (None when nothing changed).

        What needs no revision (audit events, labels, dependent rows) is written first; the revision counter,
        whose row lock every writer queues on, is taken last and held only for the flush of the resources, the
        change feed rows and the commit. On PostgreSQL a trigger on the change feed sends the NOTIFY.
        """
        session = self.session
        now = utcnow()
        if self._audit:
            await session.execute(insert(AuditRow), self._audit)
            self._audit.clear()
        if not self._writes:
            if self._later:
                session.add_all(self._later)
                self._later.clear()
                await session.flush()
            return self.last_revision
        for write in self._writes:
            write.row.updated_at = now
            _copy_selectors(write.row)
        count = len(self._writes)
        result = await session.execute(
            update(RevisionRow)
            .where(RevisionRow.id == 1)
            .values(value=RevisionRow.value + count)
            .returning(RevisionRow.value)
        )
        last = int(result.scalar_one())
        first = last - count + 1
        for offset, write in enumerate(self._writes):
            write.row.resource_version = first + offset
            if write.type == "ADDED":
                session.add(write.row)
            elif write.type == "DELETED":
                await session.delete(write.row)
        try:
            await session.flush()
            if self._later:
                # After the resources they refer to: the unit of work does not order unrelated mappers.
                session.add_all(self._later)
                await session.flush()
        except StaleDataError:
            raise StaleWrite("the resource changed meanwhile; read it again and retry") from None
        except IntegrityError as exc:
            raise Conflict(_integrity_message(exc)) from None
        labelled = [w.row for w in self._writes if w.labels_changed and w.type != "DELETED"]
        if labelled:
            await session.execute(delete(LabelRow).where(LabelRow.resource_id.in_([r.id for r in labelled])))
            values = [{"resource_id": r.id, "key": k, "value": v} for r in labelled for k, v in r.labels.items()]
            if values:
                await session.execute(insert(LabelRow), values)
        await session.execute(
            insert(ChangeRow),
            [
                {
                    "revision": first + offset,
                    "kind": write.row.kind,
                    "resource_id": write.row.id,
                    "organization_id": write.row.organization_id,
                    "runner_id": write.row.runner_id,
                    "creator_id": write.row.creator_id,
                    "user_id": write.row.user_id,
                    "type": write.type,
                    "object": render(write.row),
                    "created_at": now,
                }
                for offset, write in enumerate(self._writes)
            ],
        )
        self.last_revision = last
        self.kinds = frozenset(w.row.kind for w in self._writes)
        self._later.clear()
        self._writes.clear()
        return self.last_revision


def merge_spec(row: ResourceRow, patch: BaseModel | None, model: type[BaseModel]) -> bool:
    """Apply a partial spec (only the fields it sets) to the row, validated as a whole; True if it changed."""
    if patch is None:
        return False
    merged = {**row.spec, **patch.model_dump(mode="json", include=patch.model_fields_set)}
    try:
        spec = model.model_validate(merged).model_dump(mode="json")
    except ValidationError as exc:
        raise Invalid(f"the changed spec is not valid: {exc.errors()[0]['msg']}", _errors(exc)) from None
    if spec == row.spec:
        return False
    row.spec = spec
    return True


def merge_metadata(row: ResourceRow, patch: MetadataPatch | None) -> bool:
    """Apply name and label changes; True if the labels changed."""
    if patch is None:
        return False
    if patch.name is not None:
        row.name = patch.name
    if patch.labels is not None and patch.labels != row.labels:
        row.labels = dict(patch.labels)
        return True
    return False


def check_version(row: ResourceRow, expected: str | None) -> None:
    """Refuse a write that carries a resource_version other than the current one."""
    version = parse_resource_version(expected)
    if version is not None and version != row.resource_version:
        raise Conflict(
            f"{row.kind} {row.id} is at resource_version {row.resource_version}, not {version}: "
            "read it again and retry",
            {"current_resource_version": str(row.resource_version)},
        )


def _errors(exc: ValidationError) -> list[dict[str, Any]]:
    return [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in exc.errors()]


def _copy_selectors(row: ResourceRow) -> None:
    spec, status = row.spec, row.status
    if row.kind == "Environment":
        row.runner_id = status.get("runner_id")
        row.phase = status.get("phase")
        row.desired_phase = spec.get("desired_phase")
        row.project_id = spec.get("project_id")
    elif row.kind in ("Runner",):
        row.phase = status.get("phase")
    elif row.kind in ("Membership", "Token"):
        row.user_id = spec.get("user_id")
    elif row.kind in ("SSHKey",):
        row.user_id = row.creator_id
    elif row.kind == "Secret":
        row.project_id = spec.get("project_id")
        row.user_id = row.creator_id if spec.get("scope") == "user" else None


def _snake(kind: str) -> str:
    out = []
    for index, char in enumerate(kind):
        if char.isupper() and index and not kind[index - 1].isupper():
            out.append("_")
        out.append(char.lower())
    return "".join(out)


def _integrity_message(exc: IntegrityError) -> str:
    text_ = str(exc.orig).lower()
    if "unique" in text_ or "duplicate" in text_:
        return "a resource of this kind with this name already exists"
    if "foreign key" in text_:
        return "the request refers to a resource that does not exist"
    return "the write conflicts with the database's constraints"


async def count(session: AsyncSession, kind: str, query: Query) -> int:
    statement = query.apply(select(func.count()).select_from(ResourceRow).where(ResourceRow.kind == kind))
    return int((await session.execute(statement)).scalar_one())
