"""``/api/v1/audit-events``: the append-only log of mutations, for organization admins."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Query
from sqlalchemy import select

from devyard.server import policy
from devyard.server.api.context import Context, context
from devyard.server.api.responses import ERRORS, JSONResponse
from devyard.server.database.tables import AuditRow
from devyard.server.store import resources
from devyard.server.store.errors import Invalid
from devyard.wire import ids
from devyard.wire.audit import AuditEvent
from devyard.wire.meta import ListResponse

router = APIRouter(prefix="/api/v1/audit-events", tags=["audit"], responses=ERRORS)


def render(row: AuditRow) -> dict[str, Any]:
    at = row.created_at.isoformat()
    return {
        "kind": "AuditEvent",
        "metadata": {
            "id": row.id,
            "name": row.id.replace("_", "-"),
            "organization_id": row.organization_id,
            "creator_id": row.actor_id,
            "created_at": at,
            "updated_at": at,
            "labels": {},
            "generation": 1,
            "resource_version": "0",
        },
        "spec": {
            "actor_type": row.actor_type,
            "actor_id": row.actor_id,
            "action": row.action,
            "target_kind": row.target_kind,
            "target_id": row.target_id,
            "source_ip": row.source_ip,
            "user_agent": row.user_agent,
            "details": row.details,
        },
        "status": {},
    }


@router.get("", response_model=ListResponse[AuditEvent])
async def list_audit_events(
    organization_id: str | None = None,
    actor_id: str | None = None,
    target_id: str | None = None,
    action: str | None = Query(None, max_length=64),
    page_size: int = Query(100, ge=1, le=1000),
    page_token: str | None = Query(None, max_length=60),
    ctx: Context = Depends(context),
) -> Any:
    """Newest first."""
    scope = policy.list_scope(ctx.principal, "AuditEvent", organization_id)
    statement = select(AuditRow).where(AuditRow.organization_id.in_(list(scope.organization_ids or [])))
    if actor_id:
        statement = statement.where(AuditRow.actor_id == actor_id)
    if target_id:
        statement = statement.where(AuditRow.target_id == target_id)
    if action:
        statement = statement.where(AuditRow.action == action)
    if page_token:
        if ids.kind_of(page_token) != "AuditEvent":
            raise Invalid("page_token is not one this server issued")
        statement = statement.where(AuditRow.id < page_token)
    async with ctx.state.database.read() as session:
        revision, _ = await resources.current_revision(session)
        rows = list((await session.scalars(statement.order_by(AuditRow.id.desc()).limit(page_size + 1))).all())
    next_token = rows[page_size - 1].id if len(rows) > page_size else None
    return JSONResponse(
        {
            "items": [render(r) for r in rows[:page_size]],
            "resource_version": str(revision),
            "next_page_token": next_token,
        }
    )
