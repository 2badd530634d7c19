"""Authorization: who may see and change what. The organization is the tenancy boundary.

- Users see their organizations, the users and memberships in them, its classes, projects and shared secrets;
  members see and change only their own environments, tokens, SSH keys and user secrets; admins see and change
  everything in their organizations.
- A runner sees itself, the classes and projects of its organization, and only the environments assigned to
  it; it writes only its own status and theirs.

A resource that a principal may not see answers 404 (its existence is not revealed); one it may see but not
change answers 403. Called by every route; the store functions trust their callers.
"""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncSession

from devyard.server.auth import Principal
from devyard.server.database.tables import ResourceRow
from devyard.server.store import resources
from devyard.server.store.errors import Forbidden, Invalid, NotFound
from devyard.server.store.resources import Query

__all__ = [
    "changeable",
    "check_create",
    "check_write",
    "creation_organization",
    "list_scope",
    "readable",
    "visible",
    "writable",
]

#: Kinds any member of an organization may read.
_ORGANIZATION_READABLE = frozenset({"User", "Membership", "EnvironmentClass", "Project"})
#: Kinds a runner may read in its organization.
_RUNNER_READABLE = frozenset({"EnvironmentClass", "Project"})
#: Kinds that belong to their creator (members manage their own).
_OWNED = frozenset({"Environment", "Token", "SSHKey"})


def readable(principal: Principal, row: ResourceRow) -> bool:
    kind, org = row.kind, row.organization_id
    if principal.is_runner:
        if kind == "Runner":
            return row.id == principal.id
        if kind == "Environment":
            return row.runner_id == principal.id
        if kind == "Organization":  # its policy (the default image, timeouts) shapes the environments
            return row.id == principal.organization_id
        return org == principal.organization_id and kind in _RUNNER_READABLE
    if kind == "Organization":
        return principal.is_member_of(row.id)
    if kind == "User":
        return row.id == principal.id or _shares_organization(principal, row)
    if principal.is_admin_of(org):
        return True
    if kind in _OWNED:
        return principal.id in (row.creator_id, row.user_id)
    if kind == "Secret":
        scope = row.spec.get("scope")
        return row.creator_id == principal.id if scope == "user" else principal.is_member_of(org)
    return kind in _ORGANIZATION_READABLE and principal.is_member_of(org)


def _shares_organization(principal: Principal, user: ResourceRow) -> bool:
    # A user row lists its organizations in status (kept by the membership functions).
    organizations = user.status.get("organization_ids", [])
    return any(org in principal.roles for org in organizations)


def writable(principal: Principal, row: ResourceRow) -> bool:
    kind, org = row.kind, row.organization_id
    if principal.is_runner:
        return False
    if kind == "Organization":
        return principal.is_admin_of(row.id)
    if kind == "User":
        return row.id == principal.id or any(principal.is_admin_of(o) for o in row.status.get("organization_ids", []))
    if principal.is_admin_of(org):
        return True
    if kind in _OWNED:
        return principal.id in (row.creator_id, row.user_id)
    if kind == "Secret":
        return row.spec.get("scope") == "user" and row.creator_id == principal.id
    return False


async def visible(session: AsyncSession, principal: Principal, kind: str, resource_id: str) -> ResourceRow:
    """The resource, if the principal may see it; NotFound otherwise (its existence is not revealed)."""
    row = await resources.get(session, kind, resource_id)
    if row is None or not readable(principal, row):
        raise NotFound(f"{kind} {resource_id} not found")
    return row


async def changeable(session: AsyncSession, principal: Principal, kind: str, resource_id: str) -> ResourceRow:
    """The resource, if the principal may change it: NotFound when it may not see it, Forbidden when it may
    see it but not change it."""
    row = await visible(session, principal, kind, resource_id)
    check_write(principal, row)
    return row


def check_write(principal: Principal, row: ResourceRow) -> None:
    if not writable(principal, row):
        who = "a runner" if principal.is_runner else "you"
        raise Forbidden(f"{who} may not change {row.kind} {row.id}")


def creation_organization(principal: Principal, requested: str | None) -> str:
    """The organization a new resource goes into: the one asked for, else the caller's only one."""
    if requested is not None:
        if requested not in principal.organization_ids:
            raise NotFound(f"Organization {requested} not found")
        return requested
    organizations = principal.organization_ids
    if len(organizations) == 1:
        return organizations[0]
    if not organizations:
        raise Forbidden("you belong to no organization")
    raise Invalid("you belong to several organizations: name one in metadata.organization_id")


def check_create(principal: Principal, kind: str, organization_id: str) -> None:
    """May the principal create a resource of ``kind`` in the organization?"""
    if principal.is_runner:
        raise Forbidden(f"a runner may not create a {kind}")
    if kind in ("Environment", "Token", "SSHKey", "Secret"):
        if not principal.is_member_of(organization_id):
            raise NotFound(f"Organization {organization_id} not found")
        return
    if not principal.is_admin_of(organization_id):
        if principal.is_member_of(organization_id):
            raise Forbidden(f"only an organization admin may create a {kind}")
        raise NotFound(f"Organization {organization_id} not found")


def list_scope(principal: Principal, kind: str, requested_org: str | None) -> Query:
    """The part of a kind a principal may list, as a query to narrow further."""
    if requested_org is not None and requested_org not in principal.organization_ids:
        raise NotFound(f"Organization {requested_org} not found")
    if principal.is_runner:
        if kind == "Environment":
            return Query(runner_id=principal.id)
        if kind == "Runner":
            return Query(ids=[principal.id])
        if kind in _RUNNER_READABLE:
            return Query(organization_ids=principal.organization_ids)
        raise Forbidden(f"a runner may not list {kind} resources")
    organizations = [requested_org] if requested_org else principal.organization_ids
    if kind == "Organization":
        return Query(ids=organizations)
    admin_of = [org for org in organizations if principal.is_admin_of(org)]
    if kind in ("Runner", "AuditEvent") and not admin_of:
        raise Forbidden(f"only an organization admin may list {kind} resources")
    if kind in ("Runner", "AuditEvent"):
        return Query(organization_ids=admin_of)
    if kind in _OWNED or kind == "Secret":
        # Admins see all of their organizations'; members their own (and, for secrets, the shared ones).
        if admin_of == organizations:
            return Query(organization_ids=organizations)
        # A member's view (also for a user with mixed roles: naming an organization shows an admin all of it).
        if kind == "Secret":
            return Query(organization_ids=organizations, own_or_shared=principal.id)
        if kind in ("Token", "SSHKey"):
            return Query(organization_ids=organizations, user_id=principal.id)
        return Query(organization_ids=organizations, creator_id=principal.id)
    return Query(organization_ids=organizations)
