"""Environment database functions: create, change, delete, and the owning runner's status writes.

Called by ``api.environments`` and by the scheduler and liveness loops. The management plane owns
``status.runner_id`` and the conditions in ``SERVER_CONDITIONS``; a runner's status write keeps them.
"""

from __future__ import annotations

import re
import secrets as random_secrets
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from devyard.server import policy
from devyard.server.auth import Principal
from devyard.server.database.tables import ResourceRow
from devyard.server.store import resources
from devyard.server.store.conditions import get_condition, set_condition
from devyard.server.store.errors import Conflict, Forbidden, Invalid
from devyard.wire.environments import (
    Admission,
    DesiredPhase,
    EnvironmentCreate,
    EnvironmentPatch,
    EnvironmentPhase,
    EnvironmentSpec,
    EnvironmentStatusWrite,
    GitContent,
    PortSpec,
)

__all__ = [
    "SERVER_CONDITIONS",
    "create",
    "delete",
    "patch",
    "prepare_create",
    "require_owning_runner",
    "write_status",
]

#: Conditions that only the management plane sets.
SERVER_CONDITIONS = frozenset({"Scheduled", "RunnerAvailable"})

KIND = "Environment"


def _default_name(spec: EnvironmentSpec) -> str:
    base = "env"
    if spec.content is not None:
        source = spec.content.git.url if spec.content.git else spec.content.local_path or ""
        tail = source.rstrip("/").rsplit("/", 1)[-1].removesuffix(".git")
        base = re.sub(r"[^a-z0-9-]+", "-", tail.lower()).strip("-")[:40] or "env"
    elif spec.image:
        tail = spec.image.rsplit("/", 1)[-1].split(":", 1)[0].split("@", 1)[0]
        base = re.sub(r"[^a-z0-9-]+", "-", tail.lower()).strip("-")[:40] or "env"
    return f"{base}-{random_secrets.token_hex(3)}"


async def _check_references(session: AsyncSession, principal: Principal, org: str, spec: EnvironmentSpec) -> None:
    if spec.class_id is not None:
        cls = await resources.get(session, "EnvironmentClass", spec.class_id)
        if cls is None or cls.organization_id != org:
            raise Invalid(f"environment class {spec.class_id} does not exist in this organization")
        if not cls.spec.get("enabled", True):
            raise Invalid(f"environment class {spec.class_id} ({cls.name}) is disabled")
    if spec.project_id is not None:
        project = await resources.get(session, "Project", spec.project_id)
        if project is None or project.organization_id != org:
            raise Invalid(f"project {spec.project_id} does not exist in this organization")
    for secret_id in spec.secrets:
        secret = await resources.get(session, "Secret", secret_id)
        if secret is None or secret.organization_id != org or not policy.readable(principal, secret):
            raise Invalid(f"secret {secret_id} does not exist or is not yours to use")


def _check_public_ports(organization: ResourceRow, ports: list[PortSpec]) -> None:
    """Refuse ports shared with everyone when the organization's policy does not allow public ports."""
    public = [entry.port for entry in ports if entry.admission is Admission.EVERYONE]
    if public and not organization.spec.get("policy", {}).get("allow_public_ports", True):
        listed = ", ".join(map(str, public))
        raise Forbidden(
            f"organization {organization.name} does not allow public ports (policy allow_public_ports: false): "
            f"share port {listed} with admission 'organization' or 'owner' instead of 'everyone'"
        )


async def create(tx: resources.Tx, principal: Principal, body: EnvironmentCreate) -> ResourceRow:
    row, _ = await prepare_create(tx.session, principal, body)
    tx.create(row)
    return row


async def prepare_create(
    session: AsyncSession, principal: Principal, body: EnvironmentCreate
) -> tuple[ResourceRow, bool]:
    """Check a new environment and make its row, reading only: the write may then join a group commit.

    The flag says the check must be repeated in the writing transaction: a per-user limit counts what exists.
    """
    org_id = policy.creation_organization(principal, body.metadata.organization_id)
    policy.check_create(principal, KIND, org_id)
    spec = body.spec
    if spec.desired_phase == DesiredPhase.DELETED:
        raise Invalid("a new environment cannot have desired_phase 'deleted'")
    organization = await resources.require(session, "Organization", org_id)
    _check_public_ports(organization, spec.ports)
    if spec.project_id is not None:
        project = await resources.get(session, "Project", spec.project_id)
        if project is not None and project.organization_id == org_id:
            spec = _with_project_defaults(spec, project)
    if spec.class_id is None:
        default = await session.scalar(
            select(ResourceRow.id)
            .where(ResourceRow.kind == "EnvironmentClass", ResourceRow.organization_id == org_id)
            .where(ResourceRow.spec["default"].as_boolean().is_(True))
            .limit(1)
        )
        if default is not None:
            spec = spec.model_copy(update={"class_id": default})
    if "dotfiles" not in spec.model_fields_set:
        # The creator's own dotfiles, as their settings say now: later changes to them leave it alone.
        user = await resources.get(session, "User", principal.id)
        if user is not None and user.spec.get("dotfiles"):
            spec = spec.model_copy(update={"dotfiles": GitContent.model_validate(user.spec["dotfiles"])})
    await _check_references(session, principal, org_id, spec)
    limit = organization.spec.get("policy", {}).get("max_environments_per_user")
    if limit is not None:
        mine = await resources.count(session, KIND, resources.Query(organization_ids=[org_id], creator_id=principal.id))
        if mine >= limit:
            raise Conflict(f"the organization allows {limit} environments per user; delete one first")
    row = resources.new_row(
        KIND,
        name=body.metadata.name or _default_name(spec),
        organization_id=org_id,
        creator_id=principal.id,
        spec=spec.model_dump(mode="json"),
        status={"phase": EnvironmentPhase.PENDING.value, "observed_generation": 0, "conditions": []},
        labels=body.metadata.labels,
    )
    return row, limit is not None


def _with_project_defaults(spec: EnvironmentSpec, project: ResourceRow) -> EnvironmentSpec:
    from devyard.wire.environments import ContentSpec, GitContent

    update: dict[str, Any] = {}
    if spec.content is None:
        update["content"] = ContentSpec(git=GitContent(url=project.spec["repository"], ref=project.spec.get("ref")))
    if spec.class_id is None and project.spec.get("class_id"):
        update["class_id"] = project.spec["class_id"]
    if spec.devcontainer_path is None and project.spec.get("devcontainer_path"):
        update["devcontainer_path"] = project.spec["devcontainer_path"]
    if spec.automations_path is None and project.spec.get("automations_path"):
        update["automations_path"] = project.spec["automations_path"]
    if project.spec.get("env"):
        update["env"] = {**project.spec["env"], **spec.env}
    return spec.model_copy(update=update) if update else spec


async def patch(tx: resources.Tx, principal: Principal, env_id: str, body: EnvironmentPatch) -> ResourceRow:
    row = await policy.changeable(tx.session, principal, KIND, env_id)
    resources.check_version(row, body.resource_version)
    deleting = row.spec.get("desired_phase") == DesiredPhase.DELETED
    if deleting and body.spec is not None and body.spec.desired_phase not in (None, DesiredPhase.DELETED):
        raise Conflict(f"environment {env_id} is being deleted; it cannot be started or stopped")
    changes_class = body.spec is not None and body.spec.class_id not in (None, row.spec.get("class_id"))
    if changes_class and row.runner_id is not None:
        raise Invalid("the class of an environment that has a runner cannot change")
    if body.spec is not None and body.spec.ports is not None:
        organization = await resources.require(tx.session, "Organization", row.organization_id or "")
        _check_public_ports(organization, body.spec.ports)
    spec_changed = resources.merge_spec(row, body.spec, EnvironmentSpec)
    retry = (
        not spec_changed
        and body.spec is not None
        and body.spec.desired_phase is not None
        and body.spec.desired_phase != DesiredPhase.DELETED
        and row.status.get("phase") == EnvironmentPhase.FAILED
    )
    if retry:
        # Asking a failed environment for the phase it already wants is a retry: a new generation makes the
        # runner, which leaves a failed generation alone, try again.
        spec_changed = True
    if spec_changed:
        await _check_references(tx.session, principal, row.organization_id or "", EnvironmentSpec(**row.spec))
    stopped_idle = get_condition(row.status, "IdleTimeout") or {}
    if spec_changed and row.spec["desired_phase"] == DesiredPhase.RUNNING and stopped_idle.get("status") == "True":
        # Started again: the idle stop is history.
        row.status = set_condition(row.status, "IdleTimeout", "False", "Started", "", row.generation + 1)
    labels_changed = resources.merge_metadata(row, body.metadata)
    if spec_changed or labels_changed or body.metadata is not None:
        action = "update"
        if body.spec is not None and body.spec.model_fields_set == {"desired_phase"}:
            action = {"running": "start", "stopped": "stop", "deleted": "delete"}[row.spec["desired_phase"]]
            action = "retry" if retry else action
        tx.modify(
            row,
            action=action,
            spec_changed=spec_changed,
            labels_changed=labels_changed,
            details={"fields": sorted(body.spec.model_fields_set) if body.spec else []},
        )
        if spec_changed and row.spec["desired_phase"] == DesiredPhase.DELETED and row.runner_id is None:
            tx.remove(row, action=None)
    return row


async def delete(tx: resources.Tx, principal: Principal, env_id: str, resource_version: str | None) -> ResourceRow:
    """Ask for deletion; the record goes when its runner confirms (at once when it never had one)."""
    row = await policy.changeable(tx.session, principal, KIND, env_id)
    resources.check_version(row, resource_version)
    if row.spec.get("desired_phase") != DesiredPhase.DELETED:
        row.spec = {**row.spec, "desired_phase": DesiredPhase.DELETED.value}
        tx.modify(row, action="delete", spec_changed=True)
        if row.runner_id is None:
            row.status = {**row.status, "phase": EnvironmentPhase.DELETED.value}
            tx.remove(row, action=None)
    return row


def require_owning_runner(principal: Principal, row: ResourceRow) -> None:
    """Only the runner an environment is assigned to writes its status and receives its secrets."""
    if not principal.is_runner or row.runner_id != principal.id:
        raise Forbidden(f"only the runner that {KIND} {row.id} is assigned to may do this")


async def write_status(
    tx: resources.Tx, principal: Principal, env_id: str, body: EnvironmentStatusWrite
) -> ResourceRow | None:
    """The owning runner reports what it observes. Returns None when that report completed a deletion."""
    row = await policy.visible(tx.session, principal, KIND, env_id)
    require_owning_runner(principal, row)
    resources.check_version(row, body.resource_version)
    reported = body.status.model_dump(mode="json")
    kept = [c for c in row.status.get("conditions", []) if c.get("type") in SERVER_CONDITIONS]
    reported["conditions"] = kept + [c for c in reported["conditions"] if c.get("type") not in SERVER_CONDITIONS]
    reported["runner_id"] = row.runner_id
    # Timings accumulate: a report that omits a phase (a later pass found the work done) keeps its figure.
    reported["timings"] = {**row.status.get("timings", {}), **reported["timings"]}
    if reported["observed_generation"] > row.generation:
        raise Invalid(
            f"observed_generation {reported['observed_generation']} is newer than the spec's {row.generation}"
        )
    if reported == row.status:
        return row
    old_phase = row.status.get("phase")
    row.status = reported
    phase_changed = reported["phase"] != old_phase
    if reported["phase"] == EnvironmentPhase.DELETED and row.spec.get("desired_phase") == DesiredPhase.DELETED:
        tx.remove(row, action="delete_confirmed")
        return None
    tx.modify(
        row,
        action="update_status" if phase_changed else None,
        details={"phase": reported["phase"], "from": old_phase} if phase_changed else None,
    )
    return row
