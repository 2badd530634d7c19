"""``devyard class``: the sizes of environment (cpu, memory, disk) that runners offer."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import click

from devyard.cli import _render
from devyard.cli._invocation import Invocation, api_command
from devyard.cli._param_types import SIZE_GIB, SIZE_MIB

if TYPE_CHECKING:
    from rich.console import RenderableType

__all__ = ["environment_class"]


@click.group("class")
def environment_class() -> None:
    """Manage environment classes: the sizes of environment that runners offer."""


@environment_class.command("create")
@click.argument("name", required=False)
@click.option("--display-name", help="A name for people.")
@click.option("--description", help="What the class is for.")
@click.option("--cpu", type=click.FloatRange(min=0, min_open=True), help="CPUs [default: 2].")
@click.option("--memory", type=SIZE_MIB, help="Memory, such as 4GiB or 4096 (MiB) [default: 4GiB].")
@click.option("--disk", type=SIZE_GIB, help="Disk, such as 30GiB or 30 (GiB) [default: 30GiB].")
@click.option(
    "--runner",
    "runner_refs",
    multiple=True,
    metavar="RUNNER",
    help="A runner that offers it (repeatable); default: every runner of the organization.",
)
@click.option("--default", "is_default", is_flag=True, help="Use it for environments that name no class.")
@click.option("--disabled", is_flag=True, help="Create it disabled: no new environments use it.")
@api_command
def create_class(
    invocation: Invocation,
    name: str | None,
    display_name: str | None,
    description: str | None,
    cpu: float | None,
    memory: int | None,
    disk: int | None,
    runner_refs: tuple[str, ...],
    is_default: bool,
    disabled: bool,
) -> None:
    """Create an environment class called NAME (default: a generated name)."""
    from devyard.cli._references import resolve_id
    from devyard.wire.environment_classes import EnvironmentClassCreate, EnvironmentClassSpec
    from devyard.wire.meta import MetadataWrite

    client = invocation.client()
    spec: dict[str, Any] = {
        key: value
        for key, value in (
            ("display_name", display_name),
            ("description", description),
            ("cpu", cpu),
            ("memory_mib", memory),
            ("disk_gib", disk),
        )
        if value is not None
    }
    if runner_refs:
        spec["runner_ids"] = [resolve_id(client, "runners", "Runner", ref) for ref in runner_refs]
    if is_default:
        spec["default"] = True
    if disabled:
        spec["enabled"] = False
    body = EnvironmentClassCreate(
        metadata=MetadataWrite(name=name) if name else MetadataWrite(), spec=EnvironmentClassSpec(**spec)
    )
    created = client.post("/api/v1/environment-classes", body.model_dump(mode="json", exclude_unset=True))
    invocation.emit(created, lambda data: _render.plain(f"Created environment class {data['metadata']['id']}."))


@environment_class.command("list")
@click.option("--runner", "runner_ref", metavar="RUNNER", help="Only the classes this runner offers.")
@api_command
def list_classes(invocation: Invocation, runner_ref: str | None) -> None:
    """List environment classes."""
    from devyard.cli._references import resolve_id

    client = invocation.client()
    params = {}
    if runner_ref is not None:
        params["runner_id"] = resolve_id(client, "runners", "Runner", runner_ref)
    items, version = client.list_all("/api/v1/environment-classes", params)
    invocation.emit({"items": items, "resource_version": version}, _class_table)


@environment_class.command("delete")
@click.argument("class_ref", metavar="CLASS")
@api_command
def delete_class(invocation: Invocation, class_ref: str) -> None:
    """Delete an environment class (id or name)."""
    from devyard.cli._references import resolve_id

    client = invocation.client()
    class_id = resolve_id(client, "environment-classes", "EnvironmentClass", class_ref)
    answer = client.delete(f"/api/v1/environment-classes/{class_id}")
    invocation.emit(answer, lambda _: _render.plain(f"Deleted environment class {class_id}."))


def _class_table(data: dict[str, Any]) -> RenderableType:
    from devyard.wire.environment_classes import EnvironmentClass

    classes = [EnvironmentClass.model_validate(item) for item in data["items"]]
    return _render.table(
        ["ID", "NAME", "CPU", "MEMORY", "DISK", "RUNNERS", "DEFAULT", "ENABLED"],
        (
            (
                c.metadata.id,
                c.metadata.name,
                f"{c.spec.cpu:g}",
                f"{c.spec.memory_mib / 1024:g} GiB",
                f"{c.spec.disk_gib} GiB",
                ", ".join(c.spec.runner_ids) or "all",
                "yes" if c.spec.default else "",
                "yes" if c.spec.enabled else "no",
            )
            for c in classes
        ),
        empty="No environment classes. Create one with `devyard class create`.",
    )
