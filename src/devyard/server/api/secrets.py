"""``/api/v1/secrets``: values go in, never come back out (only runners receive them, per environment)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends

from devyard.server import policy
from devyard.server.api.context import Context, context
from devyard.server.api.lists import ListParams, list_params, list_response, narrow
from devyard.server.api.responses import ERRORS, resource
from devyard.server.store import secrets
from devyard.wire.meta import ListResponse
from devyard.wire.secrets import Secret, SecretCreate, SecretPatch

router = APIRouter(prefix="/api/v1/secrets", tags=["secrets"], responses=ERRORS)
KIND = "Secret"


@router.get("", response_model=ListResponse[Secret])
async def list_secrets(
    params: ListParams = Depends(list_params), project_id: str | None = None, ctx: Context = Depends(context)
) -> Any:
    query = policy.list_scope(ctx.principal, KIND, params.organization_id)
    narrow(query, project_id=project_id)
    return await list_response(ctx, KIND, query, params)


@router.post("", status_code=201, response_model=Secret)
async def create_secret(body: SecretCreate, ctx: Context = Depends(context)) -> Any:
    row = await ctx.transact(lambda tx: secrets.create(tx, ctx.principal, body, ctx.state.secrets), retry=False)
    return resource(row, 201)


@router.get("/{secret_id}", response_model=Secret)
async def get_secret(secret_id: str, ctx: Context = Depends(context)) -> Any:
    async with ctx.state.database.read() as session:
        row = await policy.visible(session, ctx.principal, KIND, secret_id)
    return resource(row)


@router.patch("/{secret_id}", response_model=Secret)
async def patch_secret(secret_id: str, body: SecretPatch, ctx: Context = Depends(context)) -> Any:
    return resource(
        await ctx.transact(
            lambda tx: secrets.patch(tx, ctx.principal, secret_id, body, ctx.state.secrets),
            retry=body.resource_version is None,
        )
    )


@router.delete("/{secret_id}", response_model=Secret)
async def delete_secret(secret_id: str, ctx: Context = Depends(context)) -> Any:
    return resource(await ctx.transact(lambda tx: secrets.delete(tx, ctx.principal, secret_id)))
