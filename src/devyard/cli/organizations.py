"""``devyard org``: organizations, the tenancy boundary."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import click

from devyard.cli import _render
from devyard.cli._invocation import Invocation, api_command

if TYPE_CHECKING:
    from rich.console import RenderableType

__all__ = ["org"]


@click.group()
def org() -> None:
    """Manage organizations."""


@org.command("create")
@click.argument("name")
@click.option("--display-name", help="A name for people.")
@api_command
def create_org(invocation: Invocation, name: str, display_name: str | None) -> None:
    """Create an organization called NAME; you become its admin."""
    from devyard.wire.meta import MetadataWrite
    from devyard.wire.organizations import OrganizationCreate, OrganizationSpec

    spec = OrganizationSpec(display_name=display_name) if display_name else OrganizationSpec()
    body = OrganizationCreate(metadata=MetadataWrite(name=name), spec=spec)
    created = invocation.client().post("/api/v1/organizations", body.model_dump(mode="json", exclude_unset=True))
    invocation.emit(created, lambda data: _render.plain(f"Created organization {data['metadata']['id']}."))


@org.command("list")
@api_command
def list_orgs(invocation: Invocation) -> None:
    """List your organizations."""
    items, version = invocation.client().list_all("/api/v1/organizations")
    invocation.emit({"items": items, "resource_version": version}, _org_table)


def _org_table(data: dict[str, Any]) -> RenderableType:
    from devyard.wire.organizations import Organization

    organizations = [Organization.model_validate(item) for item in data["items"]]
    return _render.table(
        ["ID", "NAME", "DISPLAY NAME", "DEFAULT TIMEOUT", "AGE"],
        (
            (
                o.metadata.id,
                o.metadata.name,
                o.spec.display_name,
                f"{o.spec.policy.default_timeout}s" if o.spec.policy.default_timeout else "never",
                _render.age(o.metadata.created_at),
            )
            for o in organizations
        ),
        empty="No organizations.",
    )
