"""Secrets: values encrypted at rest, never read back through the API, handed to the runner of an
environment that may use them. Called by ``api.secrets`` and ``api.environments``."""

from __future__ import annotations

from typing import Protocol

from sqlalchemy import or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from devyard.server import policy
from devyard.server.auth import Principal
from devyard.server.database.tables import ResourceRow, SecretValueRow
from devyard.server.store import resources
from devyard.server.store.errors import Forbidden, Invalid
from devyard.wire.secrets import SecretCreate, SecretPatch, SecretScope, SecretType

__all__ = ["Sealer", "create", "delete", "patch", "values_for_environment"]


class Sealer(Protocol):
    def seal(self, value: str) -> str: ...

    def open(self, ciphertext: str) -> str: ...


async def create(tx: resources.Tx, principal: Principal, body: SecretCreate, box: Sealer) -> ResourceRow:
    org_id = policy.creation_organization(principal, body.metadata.organization_id)
    policy.check_create(principal, "Secret", org_id)
    spec = body.spec
    if spec.scope != SecretScope.USER and not principal.is_admin_of(org_id):
        raise Forbidden(f"only an organization admin may create {spec.scope.value}-scoped secrets")
    if spec.project_id is not None:
        project = await resources.get(tx.session, "Project", spec.project_id)
        if project is None or project.organization_id != org_id:
            raise Invalid(f"project {spec.project_id} does not exist in this organization")
    name = body.metadata.name or resources.name_from(spec.target)
    row = resources.new_row(
        "Secret",
        name=name,
        organization_id=org_id,
        creator_id=principal.id,
        spec=spec.model_dump(mode="json", exclude={"value"}),
        labels=body.metadata.labels,
    )
    if spec.scope == SecretScope.USER:
        row.scope = principal.id  # user secrets' names are unique per user
    tx.create(row)
    tx.add_after(SecretValueRow(secret_id=row.id, ciphertext=box.seal(spec.value)))
    return row


async def patch(tx: resources.Tx, principal: Principal, secret_id: str, body: SecretPatch, box: Sealer) -> ResourceRow:
    row = await policy.changeable(tx.session, principal, "Secret", secret_id)
    resources.check_version(row, body.resource_version)
    if row.spec.get("type") == SecretType.REGISTRY_CREDENTIAL and ":" not in body.value:
        raise Invalid("a registry credential's value is USERNAME:PASSWORD")
    value = await tx.session.get(SecretValueRow, row.id)
    if value is None:
        tx.add_after(SecretValueRow(secret_id=row.id, ciphertext=box.seal(body.value)))
    else:
        value.ciphertext = box.seal(body.value)
    tx.modify(row, action="update_value", spec_changed=True)
    return row


async def delete(tx: resources.Tx, principal: Principal, secret_id: str) -> ResourceRow:
    row = await policy.changeable(tx.session, principal, "Secret", secret_id)
    tx.remove(row)
    return row


async def values_for_environment(session: AsyncSession, env: ResourceRow, box: Sealer) -> list[dict[str, str]]:
    """The decrypted secrets an environment gets: its organization's, its project's, its owner's, and the
    ones its spec names."""
    conditions = [ResourceRow.spec["scope"].as_string() == "organization"]
    if env.project_id:
        conditions.append(ResourceRow.project_id == env.project_id)
    if env.creator_id:
        conditions.append(ResourceRow.user_id == env.creator_id)
    named = list(env.spec.get("secrets", []))
    if named:
        conditions.append(ResourceRow.id.in_(named))
    rows = (
        await session.scalars(
            select(ResourceRow)
            .where(ResourceRow.kind == "Secret", ResourceRow.organization_id == env.organization_id)
            .where(or_(*conditions))
            .order_by(ResourceRow.id)
        )
    ).all()
    out = []
    for row in rows:
        value = await session.get(SecretValueRow, row.id)
        if value is None:
            continue
        out.append(
            {
                "id": row.id,
                "name": row.name,
                "type": row.spec["type"],
                "target": row.spec["target"],
                "value": box.open(value.ciphertext),
            }
        )
    return out
