"""Organizations, users and memberships: the tenancy boundary and who is in it.

A user's ``status.organization_ids`` mirrors its memberships, so that authorization can tell who shares an
organization without a query; the membership functions here keep it right.
"""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from devyard.server import policy
from devyard.server.auth import Principal
from devyard.server.database.tables import ResourceRow
from devyard.server.store import resources
from devyard.server.store.errors import Conflict, Forbidden, Invalid, NotFound
from devyard.wire.organizations import (
    MembershipCreate,
    MembershipPatch,
    OrganizationCreate,
    OrganizationPatch,
    OrganizationSpec,
    Role,
    UserCreate,
    UserPatch,
    UserSpec,
)

__all__ = [
    "add_membership",
    "create_membership",
    "create_organization",
    "create_user",
    "delete_membership",
    "delete_organization",
    "patch_membership",
    "patch_organization",
    "patch_user",
]


def new_organization(name: str, spec: OrganizationSpec, creator_id: str | None) -> ResourceRow:
    row = resources.new_row(
        "Organization", name=name, organization_id=None, creator_id=creator_id, spec=spec.model_dump(mode="json")
    )
    return row


def add_membership(tx: resources.Tx, user: ResourceRow, org_id: str, role: Role, creator_id: str | None) -> ResourceRow:
    membership = resources.new_row(
        "Membership",
        name=f"{user.name}",
        organization_id=org_id,
        creator_id=creator_id,
        spec={"user_id": user.id, "role": role.value},
    )
    tx.create(membership, details={"user_id": user.id, "role": role.value})
    organizations = sorted({*user.status.get("organization_ids", []), org_id})
    if organizations != user.status.get("organization_ids"):
        user.status = {**user.status, "organization_ids": organizations}
        if user in tx.session:
            tx.modify(user, action=None)
    return membership


async def create_organization(tx: resources.Tx, principal: Principal, body: OrganizationCreate) -> ResourceRow:
    if not principal.is_user:
        raise Forbidden("only users create organizations")
    if body.metadata.organization_id is not None:
        raise Invalid("an organization belongs to no organization: leave metadata.organization_id out")
    if not body.metadata.name:
        raise Invalid("an organization needs metadata.name")
    org = new_organization(body.metadata.name, body.spec, principal.id)
    org.labels = dict(body.metadata.labels)
    tx.create(org)
    user = await resources.require(tx.session, "User", principal.id)
    add_membership(tx, user, org.id, Role.ADMIN, principal.id)
    return org


async def patch_organization(
    tx: resources.Tx, principal: Principal, org_id: str, body: OrganizationPatch
) -> ResourceRow:
    row = await policy.changeable(tx.session, principal, "Organization", org_id)
    resources.check_version(row, body.resource_version)
    spec_changed = resources.merge_spec(row, body.spec, OrganizationSpec)
    labels_changed = resources.merge_metadata(row, body.metadata)
    tx.modify(row, spec_changed=spec_changed, labels_changed=labels_changed)
    return row


async def delete_organization(tx: resources.Tx, principal: Principal, org_id: str) -> ResourceRow:
    row = await policy.changeable(tx.session, principal, "Organization", org_id)
    for kind in ("Environment", "Runner"):
        left = await resources.count(tx.session, kind, resources.Query(organization_ids=[org_id]))
        if left:
            raise Conflict(f"organization {row.name} still has {left} {kind.lower()}s: delete them first")
    members = (
        await tx.session.scalars(
            select(ResourceRow).where(ResourceRow.kind == "Membership", ResourceRow.organization_id == org_id)
        )
    ).all()
    for membership in members:
        user = await resources.get(tx.session, "User", membership.user_id or "")
        if user is not None:
            _drop_organization(tx, user, org_id)
    rest = (await tx.session.scalars(select(ResourceRow).where(ResourceRow.organization_id == org_id))).all()
    for child in rest:
        tx.remove(child, action=None)
    tx.remove(row)
    return row


def _drop_organization(tx: resources.Tx, user: ResourceRow, org_id: str) -> None:
    organizations = [o for o in user.status.get("organization_ids", []) if o != org_id]
    user.status = {**user.status, "organization_ids": organizations}
    tx.modify(user, action=None)


async def create_user(tx: resources.Tx, principal: Principal, body: UserCreate) -> tuple[ResourceRow, ResourceRow]:
    org_id = policy.creation_organization(principal, body.metadata.organization_id)
    policy.check_create(principal, "User", org_id)
    if not body.metadata.name:
        raise Invalid("a user needs metadata.name (their login)")
    user = resources.new_row(
        "User",
        name=body.metadata.name,
        organization_id=None,
        creator_id=principal.id,
        spec=body.spec.model_dump(mode="json"),
        status={"organization_ids": [org_id]},
        labels=body.metadata.labels,
    )
    tx.create(user, details={"organization_id": org_id})
    membership = add_membership(tx, user, org_id, body.role, principal.id)
    return user, membership


async def patch_user(tx: resources.Tx, principal: Principal, user_id: str, body: UserPatch) -> ResourceRow:
    row = await policy.changeable(tx.session, principal, "User", user_id)
    resources.check_version(row, body.resource_version)
    spec_patch = body.spec
    suspended = None
    if spec_patch is not None and "suspended" in spec_patch.model_fields_set:
        suspended = spec_patch.suspended
        if not any(principal.is_admin_of(o) for o in row.status.get("organization_ids", [])):
            raise Forbidden("only an admin of the user's organization may suspend or restore a user")
        if row.id == principal.id:
            raise Forbidden("you may not suspend yourself")
        spec_patch = spec_patch.model_copy()
        spec_patch.model_fields_set.discard("suspended")
    spec_changed = resources.merge_spec(row, spec_patch, UserSpec)
    if suspended is not None and bool(row.status.get("suspended")) != suspended:
        row.status = {**row.status, "suspended": suspended}
        tx.audit("suspend" if suspended else "restore", row)
    labels_changed = resources.merge_metadata(row, body.metadata)
    tx.modify(row, spec_changed=spec_changed, labels_changed=labels_changed)
    return row


async def _admins(session: AsyncSession, org_id: str) -> int:
    statement = (
        select(func.count())
        .select_from(ResourceRow)
        .where(
            ResourceRow.kind == "Membership",
            ResourceRow.organization_id == org_id,
            ResourceRow.spec["role"].as_string() == Role.ADMIN.value,
        )
    )
    return int((await session.execute(statement)).scalar_one())


async def create_membership(tx: resources.Tx, principal: Principal, body: MembershipCreate) -> ResourceRow:
    org_id = policy.creation_organization(principal, body.metadata.organization_id)
    policy.check_create(principal, "Membership", org_id)
    user = await resources.get(tx.session, "User", body.spec.user_id)
    if user is None:
        raise NotFound(f"User {body.spec.user_id} not found")
    if org_id in user.status.get("organization_ids", []):
        raise Conflict(f"user {user.name} is a member already")
    return add_membership(tx, user, org_id, body.spec.role, principal.id)


async def patch_membership(
    tx: resources.Tx, principal: Principal, membership_id: str, body: MembershipPatch
) -> ResourceRow:
    row = await policy.changeable(tx.session, principal, "Membership", membership_id)
    resources.check_version(row, body.resource_version)
    if body.spec.role is not None and body.spec.role.value != row.spec["role"]:
        if row.spec["role"] == Role.ADMIN.value and await _admins(tx.session, row.organization_id or "") <= 1:
            raise Conflict("this is the organization's last admin: make another admin first")
        row.spec = {**row.spec, "role": body.spec.role.value}
        tx.modify(row, spec_changed=True, details={"role": body.spec.role.value})
    return row


async def delete_membership(tx: resources.Tx, principal: Principal, membership_id: str) -> ResourceRow:
    row = await policy.changeable(tx.session, principal, "Membership", membership_id)
    if row.spec["role"] == Role.ADMIN.value and await _admins(tx.session, row.organization_id or "") <= 1:
        raise Conflict("this is the organization's last admin: make another admin first")
    tx.remove(row)
    user = await resources.get(tx.session, "User", row.user_id or "")
    if user is not None:
        _drop_organization(tx, user, row.organization_id or "")
    return row
