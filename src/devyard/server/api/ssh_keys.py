"""``/api/v1/ssh-keys``: users' public keys; runners read those of their environments' owners."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends

from devyard.server import policy
from devyard.server.api.context import Context, context
from devyard.server.api.lists import ListParams, list_params, list_response, narrow
from devyard.server.api.responses import ERRORS, resource
from devyard.server.store import resources, ssh_keys
from devyard.server.store.errors import Forbidden
from devyard.wire.meta import ListResponse
from devyard.wire.ssh_keys import SSHKey, SSHKeyCreate

router = APIRouter(prefix="/api/v1/ssh-keys", tags=["ssh-keys"], responses=ERRORS)
KIND = "SSHKey"


@router.get("", response_model=ListResponse[SSHKey])
async def list_ssh_keys(
    params: ListParams = Depends(list_params), user_id: str | None = None, ctx: Context = Depends(context)
) -> Any:
    if ctx.principal.is_runner:
        if user_id is None:
            raise Forbidden("a runner lists the keys of one user at a time (user_id)")
        async with ctx.state.database.read() as session:
            allowed = await ssh_keys.runner_may_read_keys_of(session, ctx.principal.id, user_id)
        query = resources.Query(user_id=user_id) if allowed else resources.Query(ids=[])
        return await list_response(ctx, KIND, query, params)
    query = policy.list_scope(ctx.principal, KIND, params.organization_id)
    narrow(query, user_id=user_id)
    return await list_response(ctx, KIND, query, params)


@router.post("", status_code=201, response_model=SSHKey)
async def add_ssh_key(body: SSHKeyCreate, ctx: Context = Depends(context)) -> Any:
    row = await ctx.transact(lambda tx: ssh_keys.create(tx, ctx.principal, body), retry=False)
    return resource(row, 201)


@router.get("/{key_id}", response_model=SSHKey)
async def get_ssh_key(key_id: str, ctx: Context = Depends(context)) -> Any:
    async with ctx.state.database.read() as session:
        row = await policy.visible(session, ctx.principal, KIND, key_id)
    return resource(row)


@router.delete("/{key_id}", response_model=SSHKey)
async def remove_ssh_key(key_id: str, ctx: Context = Depends(context)) -> Any:
    return resource(await ctx.transact(lambda tx: ssh_keys.delete(tx, ctx.principal, key_id)))
