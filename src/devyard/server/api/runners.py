"""``/api/v1/runners``: admins register runners; runners trade exchange tokens and heartbeat."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from fastapi import APIRouter, Depends

from devyard.server import policy
from devyard.server.api.context import Anonymous, Context, anonymous, context
from devyard.server.api.lists import ListParams, list_params, list_response
from devyard.server.api.responses import ERRORS, JSONResponse, resource
from devyard.server.database.tables import ResourceRow
from devyard.server.store import access, resources, runners
from devyard.server.store.resources import Tx
from devyard.wire.access import GatewayKey
from devyard.wire.meta import ListResponse
from devyard.wire.runners import (
    Runner,
    RunnerCreate,
    RunnerCreated,
    RunnerCredential,
    RunnerExchange,
    RunnerPatch,
    RunnerStatusWrite,
)

router = APIRouter(prefix="/api/v1/runners", tags=["runners"], responses=ERRORS)
KIND = "Runner"


@router.get("", response_model=ListResponse[Runner])
async def list_runners(params: ListParams = Depends(list_params), ctx: Context = Depends(context)) -> Any:
    return await list_response(ctx, KIND, policy.list_scope(ctx.principal, KIND, params.organization_id), params)


@router.post("", status_code=201, response_model=RunnerCreated)
async def create_runner(body: RunnerCreate, ctx: Context = Depends(context)) -> Any:
    row, secret, expires_at = await ctx.transact(
        lambda tx: runners.create(tx, ctx.principal, body, ctx.state.settings.exchange_token_ttl), retry=False
    )
    return _created(row, secret, expires_at)


@router.post("/exchange", response_model=RunnerCredential)
async def exchange(body: RunnerExchange, anon: Anonymous = Depends(anonymous)) -> Any:
    """Trade a one-time exchange token for the runner's credential. Needs no other authentication."""
    async with anon.state.database.write() as session:
        tx = Tx(session, anon.actor)
        row, secret = await runners.exchange(tx, body.exchange_token, body.credential)
        await tx.commit()
    anon.state.credentials.forget_subject(row.id)
    return JSONResponse({"runner_id": row.id, "organization_id": row.organization_id, "token": secret})


@router.get("/{runner_id}", response_model=Runner)
async def get_runner(runner_id: str, ctx: Context = Depends(context)) -> Any:
    async with ctx.state.database.read() as session:
        row = await policy.visible(session, ctx.principal, KIND, runner_id)
    return resource(row)


@router.patch("/{runner_id}", response_model=Runner)
async def patch_runner(runner_id: str, body: RunnerPatch, ctx: Context = Depends(context)) -> Any:
    row = await ctx.transact(
        lambda tx: runners.patch(tx, ctx.principal, runner_id, body), retry=body.resource_version is None
    )
    return resource(row)


@router.delete("/{runner_id}", response_model=Runner)
async def delete_runner(runner_id: str, ctx: Context = Depends(context)) -> Any:
    row = await ctx.transact(lambda tx: runners.delete(tx, ctx.principal, runner_id))
    ctx.state.credentials.forget_subject(runner_id)
    return resource(row)


@router.post("/{runner_id}/exchange-token", status_code=201, response_model=RunnerCreated)
async def new_exchange_token(runner_id: str, ctx: Context = Depends(context)) -> Any:
    """A fresh exchange token for a runner whose host was reinstalled; earlier ones stop working."""
    row, secret, expires_at = await ctx.transact(
        lambda tx: runners.new_exchange_token(tx, ctx.principal, runner_id, ctx.state.settings.exchange_token_ttl)
    )
    return _created(row, secret, expires_at)


@router.put("/{runner_id}/status", response_model=Runner)
async def write_runner_status(runner_id: str, body: RunnerStatusWrite, ctx: Context = Depends(context)) -> Any:
    """The runner's heartbeat and report."""
    row = await ctx.transact(
        lambda tx: runners.write_status(tx, ctx.principal, runner_id, body), retry=body.resource_version is None
    )
    return resource(row)


@router.get("/{runner_id}/gateway-key", response_model=GatewayKey)
async def runner_gateway_key(runner_id: str, ctx: Context = Depends(context)) -> Any:
    """The key this runner's gateway checks access tickets with; for the runner itself only."""
    async with ctx.state.database.read() as session:
        key = await access.gateway_key(session, ctx.principal, runner_id, ctx.state.secrets)
    return JSONResponse(key.model_dump(mode="json"))


def _created(row: ResourceRow, secret: str, expires_at: datetime) -> JSONResponse:
    """A runner with its exchange token, which is shown here only."""
    return JSONResponse(
        {"runner": resources.render(row), "exchange_token": secret, "exchange_token_expires_at": expires_at},
        status_code=201,
    )
