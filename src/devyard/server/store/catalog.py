"""Environment classes and projects: what an organization's admins offer its members.

Called by ``api.environment_classes`` and ``api.projects``.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from devyard.server import policy
from devyard.server.auth import Principal
from devyard.server.database.tables import ResourceRow
from devyard.server.store import resources
from devyard.server.store.errors import Conflict, Invalid
from devyard.wire.environment_classes import (
    EnvironmentClassCreate,
    EnvironmentClassPatch,
    EnvironmentClassSpec,
)
from devyard.wire.projects import ProjectCreate, ProjectPatch, ProjectSpec

__all__ = ["create_class", "create_project", "delete_class", "delete_project", "patch_class", "patch_project"]


async def _check_runners(session: AsyncSession, org_id: str, runner_ids: list[str]) -> None:
    for runner_id in runner_ids:
        runner = await resources.get(session, "Runner", runner_id)
        if runner is None or runner.organization_id != org_id:
            raise Invalid(f"runner {runner_id} does not exist in this organization")


async def _clear_other_defaults(tx: resources.Tx, org_id: str, keep: str) -> None:
    others = await tx.session.scalars(
        select(ResourceRow).where(
            ResourceRow.kind == "EnvironmentClass", ResourceRow.organization_id == org_id, ResourceRow.id != keep
        )
    )
    for other in others:
        if other.spec.get("default"):
            other.spec = {**other.spec, "default": False}
            tx.modify(other, action=None, spec_changed=True)


async def create_class(tx: resources.Tx, principal: Principal, body: EnvironmentClassCreate) -> ResourceRow:
    org_id = policy.creation_organization(principal, body.metadata.organization_id)
    policy.check_create(principal, "EnvironmentClass", org_id)
    await _check_runners(tx.session, org_id, body.spec.runner_ids)
    row = resources.new_row(
        "EnvironmentClass",
        name=body.metadata.name,
        organization_id=org_id,
        creator_id=principal.id,
        spec=body.spec.model_dump(mode="json"),
        labels=body.metadata.labels,
    )
    tx.create(row)
    if body.spec.default:
        await _clear_other_defaults(tx, org_id, row.id)
    return row


async def patch_class(
    tx: resources.Tx, principal: Principal, class_id: str, body: EnvironmentClassPatch
) -> ResourceRow:
    row = await policy.changeable(tx.session, principal, "EnvironmentClass", class_id)
    resources.check_version(row, body.resource_version)
    spec_changed = resources.merge_spec(row, body.spec, EnvironmentClassSpec)
    await _check_runners(tx.session, row.organization_id or "", row.spec.get("runner_ids", []))
    labels_changed = resources.merge_metadata(row, body.metadata)
    tx.modify(row, spec_changed=spec_changed, labels_changed=labels_changed)
    if spec_changed and row.spec.get("default"):
        await _clear_other_defaults(tx, row.organization_id or "", row.id)
    return row


async def delete_class(tx: resources.Tx, principal: Principal, class_id: str) -> ResourceRow:
    row = await policy.changeable(tx.session, principal, "EnvironmentClass", class_id)
    users = await tx.session.scalar(
        select(ResourceRow.id)
        .where(ResourceRow.kind == "Environment", ResourceRow.spec["class_id"].as_string() == class_id)
        .limit(1)
    )
    if users is not None:
        raise Conflict(f"environments still use class {row.name}: disable it instead, or delete them first")
    tx.remove(row)
    return row


async def _check_class(session: AsyncSession, org_id: str, class_id: str | None) -> None:
    if class_id is not None:
        cls = await resources.get(session, "EnvironmentClass", class_id)
        if cls is None or cls.organization_id != org_id:
            raise Invalid(f"environment class {class_id} does not exist in this organization")


async def create_project(tx: resources.Tx, principal: Principal, body: ProjectCreate) -> ResourceRow:
    org_id = policy.creation_organization(principal, body.metadata.organization_id)
    policy.check_create(principal, "Project", org_id)
    await _check_class(tx.session, org_id, body.spec.class_id)
    await _check_class(tx.session, org_id, body.spec.prebuild.class_id)
    name = body.metadata.name or resources.name_from(
        body.spec.repository.rstrip("/").rsplit("/", 1)[-1].removesuffix(".git")
    )
    row = resources.new_row(
        "Project",
        name=name,
        organization_id=org_id,
        creator_id=principal.id,
        spec=body.spec.model_dump(mode="json"),
        labels=body.metadata.labels,
    )
    tx.create(row)
    return row


async def patch_project(tx: resources.Tx, principal: Principal, project_id: str, body: ProjectPatch) -> ResourceRow:
    row = await policy.changeable(tx.session, principal, "Project", project_id)
    resources.check_version(row, body.resource_version)
    spec_changed = resources.merge_spec(row, body.spec, ProjectSpec)
    await _check_class(tx.session, row.organization_id or "", row.spec.get("class_id"))
    labels_changed = resources.merge_metadata(row, body.metadata)
    tx.modify(row, spec_changed=spec_changed, labels_changed=labels_changed)
    return row


async def delete_project(tx: resources.Tx, principal: Principal, project_id: str) -> ResourceRow:
    row = await policy.changeable(tx.session, principal, "Project", project_id)
    tx.remove(row)
    return row
