"""``/api/v1/organizations``, ``/users``, ``/memberships`` and ``/whoami``."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends
from sqlalchemy import select

from devyard.server import policy
from devyard.server.api.context import Context, context
from devyard.server.api.lists import ListParams, list_params, list_response, narrow
from devyard.server.api.responses import ERRORS, JSONResponse, resource
from devyard.server.database.tables import ResourceRow
from devyard.server.store import organizations, resources
from devyard.wire.meta import ListResponse
from devyard.wire.organizations import (
    Membership,
    MembershipCreate,
    MembershipPatch,
    Organization,
    OrganizationCreate,
    OrganizationPatch,
    User,
    UserCreate,
    UserPatch,
    Whoami,
)

router = APIRouter(prefix="/api/v1", tags=["organizations"], responses=ERRORS)


@router.get("/whoami", response_model=Whoami)
async def whoami(ctx: Context = Depends(context)) -> Any:
    principal = ctx.principal
    memberships: list[dict[str, Any]] = []
    if principal.is_user:
        async with ctx.state.database.read() as session:
            rows = await session.scalars(
                select(ResourceRow).where(ResourceRow.kind == "Membership", ResourceRow.user_id == principal.id)
            )
            memberships = [resources.render(row) for row in rows]
    return JSONResponse(
        {
            "principal": principal.type,
            "id": principal.id,
            "name": principal.name,
            "organization_id": principal.organization_id,
            "memberships": memberships,
        }
    )


@router.get("/organizations", response_model=ListResponse[Organization])
async def list_organizations(params: ListParams = Depends(list_params), ctx: Context = Depends(context)) -> Any:
    query = policy.list_scope(ctx.principal, "Organization", params.organization_id)
    return await list_response(ctx, "Organization", query, params)


@router.post("/organizations", status_code=201, response_model=Organization)
async def create_organization(body: OrganizationCreate, ctx: Context = Depends(context)) -> Any:
    row = await ctx.transact(lambda tx: organizations.create_organization(tx, ctx.principal, body), retry=False)
    ctx.state.credentials.forget_subject(ctx.principal.id)
    return resource(row, 201)


@router.get("/organizations/{organization_id}", response_model=Organization)
async def get_organization(organization_id: str, ctx: Context = Depends(context)) -> Any:
    async with ctx.state.database.read() as session:
        row = await policy.visible(session, ctx.principal, "Organization", organization_id)
    return resource(row)


@router.patch("/organizations/{organization_id}", response_model=Organization)
async def patch_organization(organization_id: str, body: OrganizationPatch, ctx: Context = Depends(context)) -> Any:
    row = await ctx.transact(
        lambda tx: organizations.patch_organization(tx, ctx.principal, organization_id, body),
        retry=body.resource_version is None,
    )
    return resource(row)


@router.delete("/organizations/{organization_id}", response_model=Organization)
async def delete_organization(organization_id: str, ctx: Context = Depends(context)) -> Any:
    row = await ctx.transact(lambda tx: organizations.delete_organization(tx, ctx.principal, organization_id))
    ctx.state.credentials.clear()
    return resource(row)


@router.get("/users", response_model=ListResponse[User])
async def list_users(params: ListParams = Depends(list_params), ctx: Context = Depends(context)) -> Any:
    # Users belong to no organization: list those in the caller's organizations through their memberships.
    scope = policy.list_scope(ctx.principal, "Membership", params.organization_id)
    async with ctx.state.database.read() as session:
        members = await session.scalars(
            scope.apply(select(ResourceRow.user_id).where(ResourceRow.kind == "Membership"))
        )
        user_ids = sorted({m for m in members if m} | ({ctx.principal.id} if ctx.principal.is_user else set()))
    return await list_response(ctx, "User", resources.Query(ids=user_ids), params)


@router.post("/users", status_code=201, response_model=User)
async def create_user(body: UserCreate, ctx: Context = Depends(context)) -> Any:
    user, _ = await ctx.transact(lambda tx: organizations.create_user(tx, ctx.principal, body), retry=False)
    return resource(user, 201)


@router.get("/users/{user_id}", response_model=User)
async def get_user(user_id: str, ctx: Context = Depends(context)) -> Any:
    async with ctx.state.database.read() as session:
        row = await policy.visible(session, ctx.principal, "User", user_id)
    return resource(row)


@router.patch("/users/{user_id}", response_model=User)
async def patch_user(user_id: str, body: UserPatch, ctx: Context = Depends(context)) -> Any:
    row = await ctx.transact(
        lambda tx: organizations.patch_user(tx, ctx.principal, user_id, body), retry=body.resource_version is None
    )
    ctx.state.credentials.forget_subject(user_id)
    return resource(row)


@router.get("/memberships", response_model=ListResponse[Membership])
async def list_memberships(
    params: ListParams = Depends(list_params), user_id: str | None = None, ctx: Context = Depends(context)
) -> Any:
    query = policy.list_scope(ctx.principal, "Membership", params.organization_id)
    narrow(query, user_id=user_id)
    return await list_response(ctx, "Membership", query, params)


@router.post("/memberships", status_code=201, response_model=Membership)
async def create_membership(body: MembershipCreate, ctx: Context = Depends(context)) -> Any:
    row = await ctx.transact(lambda tx: organizations.create_membership(tx, ctx.principal, body), retry=False)
    ctx.state.credentials.forget_subject(body.spec.user_id)
    return resource(row, 201)


@router.patch("/memberships/{membership_id}", response_model=Membership)
async def patch_membership(membership_id: str, body: MembershipPatch, ctx: Context = Depends(context)) -> Any:
    row = await ctx.transact(
        lambda tx: organizations.patch_membership(tx, ctx.principal, membership_id, body),
        retry=body.resource_version is None,
    )
    ctx.state.credentials.forget_subject(row.user_id or "")
    return resource(row)


@router.delete("/memberships/{membership_id}", response_model=Membership)
async def delete_membership(membership_id: str, ctx: Context = Depends(context)) -> Any:
    row = await ctx.transact(lambda tx: organizations.delete_membership(tx, ctx.principal, membership_id))
    ctx.state.credentials.forget_subject(row.user_id or "")
    return resource(row)
