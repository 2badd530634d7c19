"""``devyard project``: repositories and how to make environments for them."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import click

from devyard.cli import _render
from devyard.cli._invocation import Invocation, api_command
from devyard.cli._param_types import KEY_VALUE

if TYPE_CHECKING:
    from rich.console import RenderableType

__all__ = ["project"]


@click.group()
def project() -> None:
    """Manage projects: a repository and how to make environments for it."""


@project.command("create")
@click.argument("repository")
@click.option("--name", help="A name; default: generated.")
@click.option("--ref", help="The branch, tag or commit environments start from.")
@click.option("--devcontainer-path", help="The devcontainer.json, relative to the repository.")
@click.option("--automations-path", help="The automations file, relative to the repository.")
@click.option("--class", "class_ref", metavar="CLASS", help="The environment class (id or name).")
@click.option("--env", "variables", type=KEY_VALUE, multiple=True, metavar="KEY=VALUE", help="A variable (repeatable).")
@api_command
def create_project(
    invocation: Invocation,
    repository: str,
    name: str | None,
    ref: str | None,
    devcontainer_path: str | None,
    automations_path: str | None,
    class_ref: str | None,
    variables: tuple[tuple[str, str], ...],
) -> None:
    """Create a project for the git REPOSITORY."""
    from devyard.cli._references import resolve_id
    from devyard.wire.meta import MetadataWrite
    from devyard.wire.projects import ProjectCreate, ProjectSpec

    client = invocation.client()
    spec: dict[str, Any] = {
        key: value
        for key, value in (
            ("repository", repository),
            ("ref", ref),
            ("devcontainer_path", devcontainer_path),
            ("automations_path", automations_path),
        )
        if value is not None
    }
    if class_ref is not None:
        spec["class_id"] = resolve_id(client, "environment-classes", "EnvironmentClass", class_ref)
    if variables:
        spec["env"] = dict(variables)
    body = ProjectCreate(metadata=MetadataWrite(name=name) if name else MetadataWrite(), spec=ProjectSpec(**spec))
    created = client.post("/api/v1/projects", body.model_dump(mode="json", exclude_unset=True))
    invocation.emit(created, lambda data: _render.plain(f"Created project {data['metadata']['id']}."))


@project.command("list")
@api_command
def list_projects(invocation: Invocation) -> None:
    """List projects."""
    items, version = invocation.client().list_all("/api/v1/projects")
    invocation.emit({"items": items, "resource_version": version}, _project_table)


@project.command("delete")
@click.argument("project_ref", metavar="PROJECT")
@api_command
def delete_project(invocation: Invocation, project_ref: str) -> None:
    """Delete a project (id or name)."""
    from devyard.cli._references import resolve_id

    client = invocation.client()
    project_id = resolve_id(client, "projects", "Project", project_ref)
    answer = client.delete(f"/api/v1/projects/{project_id}")
    invocation.emit(answer, lambda _: _render.plain(f"Deleted project {project_id}."))


def _project_table(data: dict[str, Any]) -> RenderableType:
    from devyard.wire.projects import Project

    projects = [Project.model_validate(item) for item in data["items"]]
    return _render.table(
        ["ID", "NAME", "REPOSITORY", "REF", "CLASS", "AGE"],
        (
            (
                p.metadata.id,
                p.metadata.name,
                p.spec.repository,
                p.spec.ref or "",
                p.spec.class_id or "",
                _render.age(p.metadata.created_at),
            )
            for p in projects
        ),
        empty="No projects. Create one with `devyard project create REPOSITORY`.",
    )
