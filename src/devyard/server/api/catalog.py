"""``/api/v1/environment-classes`` and ``/api/v1/projects``."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends

from devyard.server import policy
from devyard.server.api.context import Context, context
from devyard.server.api.lists import ListParams, list_params, list_response
from devyard.server.api.responses import ERRORS, resource
from devyard.server.store import catalog, resources
from devyard.wire.environment_classes import EnvironmentClass, EnvironmentClassCreate, EnvironmentClassPatch
from devyard.wire.meta import ListResponse
from devyard.wire.projects import Project, ProjectCreate, ProjectPatch

router = APIRouter(prefix="/api/v1", responses=ERRORS)


@router.get("/environment-classes", response_model=ListResponse[EnvironmentClass], tags=["environment-classes"])
async def list_classes(
    params: ListParams = Depends(list_params), runner_id: str | None = None, ctx: Context = Depends(context)
) -> Any:
    query = policy.list_scope(ctx.principal, "EnvironmentClass", params.organization_id)
    if runner_id is not None or ctx.principal.is_runner:
        # The classes a runner offers: those naming it, and those naming no runner.
        wanted = runner_id or ctx.principal.id
        async with ctx.state.database.read() as session:
            rows = await resources.list_page(session, "EnvironmentClass", query, page_size=1000, page_token=None)
        query.ids = [r.id for r in rows.rows if not r.spec.get("runner_ids") or wanted in r.spec["runner_ids"]]
    return await list_response(ctx, "EnvironmentClass", query, params)


@router.post("/environment-classes", status_code=201, response_model=EnvironmentClass, tags=["environment-classes"])
async def create_class(body: EnvironmentClassCreate, ctx: Context = Depends(context)) -> Any:
    return resource(await ctx.transact(lambda tx: catalog.create_class(tx, ctx.principal, body), retry=False), 201)


@router.get("/environment-classes/{class_id}", response_model=EnvironmentClass, tags=["environment-classes"])
async def get_class(class_id: str, ctx: Context = Depends(context)) -> Any:
    async with ctx.state.database.read() as session:
        row = await policy.visible(session, ctx.principal, "EnvironmentClass", class_id)
    return resource(row)


@router.patch("/environment-classes/{class_id}", response_model=EnvironmentClass, tags=["environment-classes"])
async def patch_class(class_id: str, body: EnvironmentClassPatch, ctx: Context = Depends(context)) -> Any:
    return resource(
        await ctx.transact(
            lambda tx: catalog.patch_class(tx, ctx.principal, class_id, body), retry=body.resource_version is None
        )
    )


@router.delete("/environment-classes/{class_id}", response_model=EnvironmentClass, tags=["environment-classes"])
async def delete_class(class_id: str, ctx: Context = Depends(context)) -> Any:
    return resource(await ctx.transact(lambda tx: catalog.delete_class(tx, ctx.principal, class_id)))


@router.get("/projects", response_model=ListResponse[Project], tags=["projects"])
async def list_projects(params: ListParams = Depends(list_params), ctx: Context = Depends(context)) -> Any:
    return await list_response(
        ctx, "Project", policy.list_scope(ctx.principal, "Project", params.organization_id), params
    )


@router.post("/projects", status_code=201, response_model=Project, tags=["projects"])
async def create_project(body: ProjectCreate, ctx: Context = Depends(context)) -> Any:
    return resource(await ctx.transact(lambda tx: catalog.create_project(tx, ctx.principal, body), retry=False), 201)


@router.get("/projects/{project_id}", response_model=Project, tags=["projects"])
async def get_project(project_id: str, ctx: Context = Depends(context)) -> Any:
    async with ctx.state.database.read() as session:
        row = await policy.visible(session, ctx.principal, "Project", project_id)
    return resource(row)


@router.patch("/projects/{project_id}", response_model=Project, tags=["projects"])
async def patch_project(project_id: str, body: ProjectPatch, ctx: Context = Depends(context)) -> Any:
    return resource(
        await ctx.transact(
            lambda tx: catalog.patch_project(tx, ctx.principal, project_id, body), retry=body.resource_version is None
        )
    )


@router.delete("/projects/{project_id}", response_model=Project, tags=["projects"])
async def delete_project(project_id: str, ctx: Context = Depends(context)) -> Any:
    return resource(await ctx.transact(lambda tx: catalog.delete_project(tx, ctx.principal, project_id)))
