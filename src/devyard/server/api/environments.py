"""``/api/v1/environments``: users create and drive environments; runners report their status."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Depends, Query

from devyard.server import policy
from devyard.server.api.context import Context, context
from devyard.server.api.lists import ListParams, list_params, list_response, narrow
from devyard.server.api.responses import ERRORS, JSONResponse, resource
from devyard.server.store import access, environments, secrets, ssh_keys
from devyard.wire.access import AccessRequest, EnvironmentAccess
from devyard.wire.environments import (
    DesiredPhase,
    Environment,
    EnvironmentCreate,
    EnvironmentPatch,
    EnvironmentPhase,
    EnvironmentStatusWrite,
)
from devyard.wire.meta import ListResponse
from devyard.wire.secrets import SecretValue
from devyard.wire.ssh_keys import AuthorizedKeys

router = APIRouter(prefix="/api/v1/environments", tags=["environments"], responses=ERRORS)
KIND = "Environment"


@router.get("", response_model=ListResponse[Environment])
async def list_environments(
    params: ListParams = Depends(list_params),
    runner_id: str | None = None,
    creator_id: str | None = None,
    project_id: str | None = None,
    phase: EnvironmentPhase | None = None,
    desired_phase: DesiredPhase | None = None,
    ctx: Context = Depends(context),
) -> Any:
    query = policy.list_scope(ctx.principal, KIND, params.organization_id)
    narrow(query, runner_id=runner_id, creator_id=creator_id, project_id=project_id)
    query.phase = phase.value if phase else None
    query.desired_phase = desired_phase.value if desired_phase else None
    return await list_response(ctx, KIND, query, params)


@router.post("", status_code=201, response_model=Environment)
async def create_environment(body: EnvironmentCreate, ctx: Context = Depends(context)) -> Any:
    async with ctx.state.database.read() as session:
        row, exact = await environments.prepare_create(session, ctx.principal, body)
    if exact:
        # A per-user limit counts what exists: check and create in one transaction.
        row = await ctx.transact(lambda tx: environments.create(tx, ctx.principal, body), retry=False)
    else:
        assert ctx.state.group_commit is not None, "started by the app's lifespan"
        await ctx.state.group_commit.submit(ctx.actor, lambda tx: tx.create(row))
    return resource(row, 201)


@router.get("/{environment_id}", response_model=Environment)
async def get_environment(environment_id: str, ctx: Context = Depends(context)) -> Any:
    async with ctx.state.database.read() as session:
        row = await policy.visible(session, ctx.principal, KIND, environment_id)
    return resource(row)


@router.patch("/{environment_id}", response_model=Environment)
async def patch_environment(environment_id: str, body: EnvironmentPatch, ctx: Context = Depends(context)) -> Any:
    row = await ctx.transact(
        lambda tx: environments.patch(tx, ctx.principal, environment_id, body), retry=body.resource_version is None
    )
    return resource(row)


@router.delete("/{environment_id}", status_code=202, response_model=Environment)
async def delete_environment(
    environment_id: str, resource_version: str | None = Query(None, max_length=30), ctx: Context = Depends(context)
) -> Any:
    row = await ctx.transact(
        lambda tx: environments.delete(tx, ctx.principal, environment_id, resource_version),
        retry=resource_version is None,
    )
    return resource(row, 202)


@router.put("/{environment_id}/status", response_model=Environment)
async def write_environment_status(
    environment_id: str, body: EnvironmentStatusWrite, ctx: Context = Depends(context)
) -> Any:
    row = await ctx.transact(
        lambda tx: environments.write_status(tx, ctx.principal, environment_id, body),
        retry=body.resource_version is None,
    )
    if row is None:
        return JSONResponse({"deleted": True, "id": environment_id}, status_code=200)
    return resource(row)


@router.get("/{environment_id}/secrets", response_model=list[SecretValue])
async def environment_secrets(environment_id: str, ctx: Context = Depends(context)) -> Any:
    """The decrypted secrets of an environment, for the runner it is assigned to only."""
    async with ctx.state.database.read() as session:
        row = await policy.visible(session, ctx.principal, KIND, environment_id)
        environments.require_owning_runner(ctx.principal, row)
        values = await secrets.values_for_environment(session, row, ctx.state.secrets)
    return JSONResponse(values)


@router.get("/{environment_id}/authorized-keys", response_model=AuthorizedKeys)
async def environment_authorized_keys(environment_id: str, ctx: Context = Depends(context)) -> Any:
    """The SSH public keys that may enter the environment, for the runner it is assigned to only (its gateway
    asks on every connection)."""
    async with ctx.state.database.read() as session:
        row = await policy.visible(session, ctx.principal, KIND, environment_id)
        environments.require_owning_runner(ctx.principal, row)
        answer = await ssh_keys.authorized_for_environment(session, row)
    return JSONResponse(answer.model_dump(mode="json"))


@router.post("/{environment_id}/access", response_model=EnvironmentAccess)
async def environment_access(
    environment_id: str, body: AccessRequest | None = None, ctx: Context = Depends(context)
) -> Any:
    """A short-lived ticket to exec in the running environment through its runner's gateway, or (scope ``port``)
    to reach its ports through its runner's port proxy."""
    scope = body.scope if body is not None else "exec"
    answer = await ctx.transact(
        lambda tx: access.issue(tx, ctx.principal, environment_id, ctx.state.secrets, now=time.time(), scope=scope)
    )
    return JSONResponse(answer.model_dump(mode="json"))
