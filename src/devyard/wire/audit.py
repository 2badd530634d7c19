"""AuditEvent: an append-only record of a mutation: who did what to which resource, when and from where."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from devyard.wire.meta import ReadModel, Resource

__all__ = ["AuditEvent", "AuditEventSpec", "AuditEventStatus"]


class AuditEventSpec(ReadModel):
    actor_type: str  # "user" | "runner" | "system" | "anonymous"
    actor_id: str | None = None
    #: ``<kind>.<verb>``, such as ``environment.create``.
    action: str
    target_kind: str
    target_id: str | None = None
    source_ip: str | None = None
    user_agent: str | None = None
    details: dict[str, Any] = Field(default_factory=dict)


class AuditEventStatus(ReadModel):
    pass


class AuditEvent(Resource[AuditEventSpec, AuditEventStatus]):
    kind: str = "AuditEvent"
