"""``devyard secret``: values given to environments, encrypted at rest and never read back."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

import click

from devyard.cli import _render
from devyard.cli._invocation import Invocation, api_command

if TYPE_CHECKING:
    from rich.console import RenderableType

__all__ = ["secret"]


@click.group()
def secret() -> None:
    """Manage secrets: environment variables, files and credentials given to environments."""


@secret.command("create")
@click.argument("name")
@click.option(
    "--target", required=True, help="The variable's name, the file's absolute path, or the git/registry host."
)
@click.option(
    "--type",
    "secret_type",
    type=click.Choice(["environment_variable", "file", "git_credential", "registry_credential"]),
    default="environment_variable",
    show_default=True,
)
@click.option("--scope", type=click.Choice(["user", "project", "organization"]), default="user", show_default=True)
@click.option("--project", "project_ref", metavar="PROJECT", help="The project (id or name), for --scope project.")
@click.option("--value", help="The value; without it (and --from-file) the value is read from stdin.")
@click.option("--from-file", type=click.File("r"), help="Read the value from this file.")
@api_command
def create_secret(
    invocation: Invocation,
    name: str,
    target: str,
    secret_type: str,
    scope: str,
    project_ref: str | None,
    value: str | None,
    from_file: Any,
) -> None:
    """Create the secret NAME. Its value is never shown again."""
    from devyard.cli._references import resolve_id
    from devyard.wire.meta import MetadataWrite
    from devyard.wire.secrets import SecretCreate, SecretScope, SecretSpec, SecretType

    if value is not None and from_file is not None:
        raise click.UsageError("give --value or --from-file, not both")
    if value is None:
        if from_file is None and sys.stdin.isatty():
            value = click.prompt("Value", hide_input=True)
        else:
            value = (from_file or sys.stdin).read()
    client = invocation.client()
    project_id = resolve_id(client, "projects", "Project", project_ref) if project_ref is not None else None
    spec = SecretSpec(
        scope=SecretScope(scope), project_id=project_id, type=SecretType(secret_type), target=target, value=value or ""
    )
    body = SecretCreate(metadata=MetadataWrite(name=name), spec=spec)
    created = client.post("/api/v1/secrets", body.model_dump(mode="json", exclude_unset=True))
    invocation.emit(created, lambda data: _render.plain(f"Created secret {data['metadata']['id']}."))


@secret.command("list")
@api_command
def list_secrets(invocation: Invocation) -> None:
    """List the secrets you can see (never their values)."""
    items, version = invocation.client().list_all("/api/v1/secrets")
    invocation.emit({"items": items, "resource_version": version}, _secret_table)


@secret.command("rm")
@click.argument("secret_ref", metavar="SECRET")
@api_command
def remove_secret(invocation: Invocation, secret_ref: str) -> None:
    """Delete a secret (id or name)."""
    from devyard.cli._references import resolve_id

    client = invocation.client()
    secret_id = resolve_id(client, "secrets", "Secret", secret_ref)
    answer = client.delete(f"/api/v1/secrets/{secret_id}")
    invocation.emit(answer, lambda _: _render.plain(f"Deleted secret {secret_id}."))


def _secret_table(data: dict[str, Any]) -> RenderableType:
    from devyard.wire.secrets import Secret

    secrets = [Secret.model_validate(item) for item in data["items"]]
    return _render.table(
        ["ID", "NAME", "SCOPE", "TYPE", "TARGET", "AGE"],
        (
            (
                s.metadata.id,
                s.metadata.name,
                s.spec.scope.value + (f" {s.spec.project_id}" if s.spec.project_id else ""),
                s.spec.type.value,
                s.spec.target,
                _render.age(s.metadata.created_at),
            )
            for s in secrets
        ),
        empty="No secrets.",
    )
