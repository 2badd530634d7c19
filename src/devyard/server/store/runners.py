"""Runner database functions: registration (create, exchange), heartbeats, changes and removal.

Called by ``api.runners`` and the liveness loop.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import select, update

from devyard.server import auth, policy
from devyard.server.auth import Principal
from devyard.server.database.tables import CredentialRow, ResourceRow
from devyard.server.store import resources
from devyard.server.store.conditions import get_condition, set_condition
from devyard.server.store.errors import Conflict, Forbidden, Unauthenticated
from devyard.wire.runners import RunnerCreate, RunnerPatch, RunnerPhase, RunnerSpec, RunnerStatusWrite

__all__ = ["create", "delete", "exchange", "mark_environments", "new_exchange_token", "patch", "write_status"]

KIND = "Runner"


async def create(
    tx: resources.Tx, principal: Principal, body: RunnerCreate, exchange_ttl: float
) -> tuple[ResourceRow, str, datetime]:
    org_id = policy.creation_organization(principal, body.metadata.organization_id)
    policy.check_create(principal, KIND, org_id)
    row = resources.new_row(
        KIND,
        name=body.metadata.name,
        organization_id=org_id,
        creator_id=principal.id,
        spec=body.spec.model_dump(mode="json"),
        status={"phase": RunnerPhase.PENDING.value},
        labels=body.metadata.labels,
    )
    tx.create(row)
    secret, expires_at = _exchange_token(tx, row, exchange_ttl)
    return row, secret, expires_at


def _exchange_token(tx: resources.Tx, row: ResourceRow, ttl: float) -> tuple[str, datetime]:
    expires_at = resources.utcnow() + timedelta(seconds=ttl)
    secret, credential = auth.new_credential("exchange", token_id=row.id, subject_id=row.id, expires_at=expires_at)
    tx.add_after(credential)
    return secret, expires_at


async def new_exchange_token(
    tx: resources.Tx, principal: Principal, runner_id: str, ttl: float
) -> tuple[ResourceRow, str, datetime]:
    """A fresh exchange token for an existing runner (a reinstalled host); earlier ones stop working."""
    row = await policy.changeable(tx.session, principal, KIND, runner_id)
    await tx.session.execute(
        update(CredentialRow)
        .where(CredentialRow.token_id == row.id, CredentialRow.principal_type == "exchange")
        .where(CredentialRow.revoked_at.is_(None))
        .values(revoked_at=resources.utcnow())
    )
    secret, expires_at = _exchange_token(tx, row, ttl)
    tx.audit("new_exchange_token", row)
    return row, secret, expires_at


async def exchange(tx: resources.Tx, secret: str, proposed: str | None = None) -> tuple[ResourceRow, str]:
    """Trade a one-time exchange token for the runner's long-lived credential: ``proposed`` (the runner's own,
    random), or a new one."""
    session = tx.session
    credential = await session.get(CredentialRow, auth.hash_secret(secret))
    now = resources.utcnow()
    if credential is None or credential.principal_type != "exchange":
        raise Unauthenticated("the exchange token is not valid: ask an admin for a new one (devyard runner create)")
    if credential.revoked_at is not None:
        raise Unauthenticated("the exchange token was already used: ask an admin for a new one")
    if credential.expires_at is not None and credential.expires_at <= now:
        raise Unauthenticated("the exchange token expired: ask an admin for a new one")
    row = await resources.get(session, KIND, credential.subject_id)
    if row is None:
        raise Unauthenticated("the exchange token's runner no longer exists")
    credential.revoked_at = now
    # A runner has one credential: an exchange replaces what it had before.
    await session.execute(
        update(CredentialRow)
        .where(CredentialRow.token_id == row.id, CredentialRow.principal_type == "runner")
        .where(CredentialRow.revoked_at.is_(None))
        .values(revoked_at=now)
    )
    if proposed is not None and await session.get(CredentialRow, auth.hash_secret(proposed)) is not None:
        raise Conflict("that credential is taken: propose another")
    runner_secret = auth.issue_credential(
        session, "runner", token_id=row.id, subject_id=row.id, expires_at=None, secret=proposed
    )
    tx.audit("exchange", row, {"runner": row.name})
    return row, runner_secret


async def patch(tx: resources.Tx, principal: Principal, runner_id: str, body: RunnerPatch) -> ResourceRow:
    row = await policy.changeable(tx.session, principal, KIND, runner_id)
    resources.check_version(row, body.resource_version)
    spec_changed = resources.merge_spec(row, body.spec, RunnerSpec)
    labels_changed = resources.merge_metadata(row, body.metadata)
    tx.modify(row, spec_changed=spec_changed, labels_changed=labels_changed)
    return row


async def delete(tx: resources.Tx, principal: Principal, runner_id: str) -> ResourceRow:
    row = await policy.changeable(tx.session, principal, KIND, runner_id)
    assigned = await resources.count(tx.session, "Environment", resources.Query(runner_id=row.id))
    if assigned:
        raise Conflict(f"runner {row.name} still has {assigned} environments: delete them first")
    tx.remove(row)
    return row


async def write_status(tx: resources.Tx, principal: Principal, runner_id: str, body: RunnerStatusWrite) -> ResourceRow:
    """A runner's heartbeat: what it reports, plus the time the server heard it and phase online."""
    row = await policy.visible(tx.session, principal, KIND, runner_id)
    if not principal.is_runner or principal.id != runner_id:
        raise Forbidden(f"only runner {row.name} itself reports its status")
    resources.check_version(row, body.resource_version)
    old_phase = row.status.get("phase")
    status = body.status.model_dump(mode="json")
    status["phase"] = RunnerPhase.ONLINE.value
    status["last_heartbeat_at"] = resources.utcnow().isoformat()
    status["observed_generation"] = min(status.get("observed_generation", 0), row.generation)
    row.status = status
    came_online = old_phase != RunnerPhase.ONLINE.value
    tx.modify(row, action="online" if came_online else None)
    if came_online:
        await mark_environments(tx, row, available=True)
    return row


async def mark_environments(tx: resources.Tx, runner: ResourceRow, *, available: bool) -> None:
    """Set the RunnerAvailable condition of the runner's environments."""
    envs = (
        await tx.session.scalars(
            select(ResourceRow).where(ResourceRow.kind == "Environment", ResourceRow.runner_id == runner.id)
        )
    ).all()
    value = "True" if available else "False"
    reason = "RunnerOnline" if available else "RunnerUnavailable"
    message = "" if available else f"runner {runner.name} is offline; the environment is as it last reported"
    for env in envs:
        current = get_condition(env.status, "RunnerAvailable")
        if current is not None and current["status"] == value:
            continue
        if current is None and available:
            continue
        env.status = set_condition(env.status, "RunnerAvailable", value, reason, message, env.generation)
        tx.modify(env, action=None)
