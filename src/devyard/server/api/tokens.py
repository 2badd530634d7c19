"""``/api/v1/tokens``: personal access tokens."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends

from devyard.server import policy
from devyard.server.api.context import Context, context
from devyard.server.api.lists import ListParams, list_params, list_response, narrow
from devyard.server.api.responses import ERRORS, JSONResponse, resource
from devyard.server.store import resources, tokens
from devyard.wire.meta import ListResponse
from devyard.wire.tokens import Token, TokenCreate, TokenCreated

router = APIRouter(prefix="/api/v1/tokens", tags=["tokens"], responses=ERRORS)
KIND = "Token"


@router.get("", response_model=ListResponse[Token])
async def list_tokens(
    params: ListParams = Depends(list_params), user_id: str | None = None, ctx: Context = Depends(context)
) -> Any:
    query = policy.list_scope(ctx.principal, KIND, params.organization_id)
    narrow(query, user_id=user_id)
    return await list_response(ctx, KIND, query, params)


@router.post("", status_code=201, response_model=TokenCreated)
async def create_token(body: TokenCreate, ctx: Context = Depends(context)) -> Any:
    row, secret = await ctx.transact(lambda tx: tokens.create(tx, ctx.principal, body), retry=False)
    return JSONResponse({"token": resources.render(row), "secret": secret}, status_code=201)


@router.get("/{token_id}", response_model=Token)
async def get_token(token_id: str, ctx: Context = Depends(context)) -> Any:
    async with ctx.state.database.read() as session:
        row = await policy.visible(session, ctx.principal, KIND, token_id)
    return resource(row)


@router.delete("/{token_id}", response_model=Token)
async def revoke_token(token_id: str, ctx: Context = Depends(context)) -> Any:
    """Revoke: the token stops working at once on this server, within seconds on the others."""
    row = await ctx.transact(lambda tx: tokens.revoke(tx, ctx.principal, token_id))
    ctx.state.credentials.forget_subject(token_id)
    return resource(row)
