"""Personal access tokens: made with their secret shown once, listed, revoked. Called by ``api.tokens``."""

from __future__ import annotations

from datetime import UTC

from sqlalchemy import update

from devyard.server import auth, policy
from devyard.server.auth import Principal
from devyard.server.database.tables import CredentialRow, ResourceRow
from devyard.server.store import resources
from devyard.server.store.errors import Invalid, NotFound
from devyard.wire import ids
from devyard.wire.tokens import TokenCreate

__all__ = ["create", "revoke"]

KIND = "Token"


async def create(tx: resources.Tx, principal: Principal, body: TokenCreate) -> tuple[ResourceRow, str]:
    org_id = policy.creation_organization(principal, body.metadata.organization_id)
    policy.check_create(principal, KIND, org_id)
    user_id = body.spec.user_id or principal.id
    if user_id != principal.id:
        if not principal.is_admin_of(org_id):
            raise NotFound(f"User {user_id} not found")
        user = await resources.get(tx.session, "User", user_id)
        if user is None or org_id not in user.status.get("organization_ids", []):
            raise NotFound(f"User {user_id} not found")
    if body.spec.expires_at is not None:
        if body.spec.expires_at.tzinfo is None:
            raise Invalid("expires_at needs a time zone (e.g. 2030-01-01T00:00:00Z)")
        try:
            expires_at = body.spec.expires_at.astimezone(UTC)
        except OverflowError:
            raise Invalid("expires_at is out of range once in UTC") from None
        if expires_at <= resources.utcnow():
            raise Invalid("expires_at is in the past")
    token_id = ids.new_id(KIND)
    secret, credential = auth.new_credential(
        "user", token_id=token_id, subject_id=user_id, expires_at=body.spec.expires_at
    )
    spec = body.spec.model_dump(mode="json")
    spec["user_id"] = user_id
    row = resources.new_row(
        KIND,
        name=body.metadata.name,
        organization_id=org_id,
        creator_id=principal.id,
        spec=spec,
        status={"prefix": secret[:10]},
        labels=body.metadata.labels,
        resource_id=token_id,
    )
    row.scope = user_id  # token names are unique per user
    tx.create(row, details={"user_id": user_id})
    tx.add_after(credential)
    return row, secret


async def revoke(tx: resources.Tx, principal: Principal, token_id: str) -> ResourceRow:
    row = await policy.changeable(tx.session, principal, KIND, token_id)
    if row.status.get("revoked_at") is None:
        now = resources.utcnow()
        row.status = {**row.status, "revoked_at": now.isoformat()}
        await tx.session.execute(update(CredentialRow).where(CredentialRow.token_id == row.id).values(revoked_at=now))
        tx.modify(row, action="revoke")
    return row
