"""``devyard ssh-key``: the public keys that the runners' SSH gateways accept for your environments."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

import click

from devyard.cli import _render
from devyard.cli._invocation import Invocation, api_command

if TYPE_CHECKING:
    from rich.console import RenderableType

__all__ = ["ssh_key"]


@click.group("ssh-key")
def ssh_key() -> None:
    """Manage your SSH public keys."""


@ssh_key.command("add")
@click.argument("key_file", metavar="FILE|-", type=click.File("r"))
@click.option("--name", help="A name; default: generated.")
@api_command
def add_key(invocation: Invocation, key_file: Any, name: str | None) -> None:
    """Add the public key in FILE (such as ~/.ssh/id_ed25519.pub), or on stdin with `-`."""
    from devyard.wire.meta import MetadataWrite
    from devyard.wire.ssh_keys import SSHKeyCreate, SSHKeySpec

    if key_file is sys.stdin and sys.stdin.isatty():
        invocation.note("Paste the public key, then Ctrl-D:")
    public_key = key_file.read().strip()
    if not public_key:
        raise click.BadParameter("the file holds no key", param_hint="FILE")
    if "PRIVATE KEY" in public_key:
        raise click.BadParameter("that is a private key; give the public one (the .pub file)", param_hint="FILE")
    body = SSHKeyCreate(
        metadata=MetadataWrite(name=name) if name else MetadataWrite(), spec=SSHKeySpec(public_key=public_key)
    )
    created = invocation.client().post("/api/v1/ssh-keys", body.model_dump(mode="json", exclude_unset=True))
    invocation.emit(
        created,
        lambda data: _render.plain(
            f"Added SSH key {data['metadata']['id']} {data.get('status', {}).get('fingerprint', '')}".rstrip() + "."
        ),
    )


@ssh_key.command("list")
@api_command
def list_keys(invocation: Invocation) -> None:
    """List your SSH keys."""
    items, version = invocation.client().list_all("/api/v1/ssh-keys")
    invocation.emit({"items": items, "resource_version": version}, _key_table)


@ssh_key.command("rm")
@click.argument("key_ref", metavar="KEY")
@api_command
def remove_key(invocation: Invocation, key_ref: str) -> None:
    """Remove an SSH key (id or name)."""
    from devyard.cli._references import resolve_id

    client = invocation.client()
    key_id = resolve_id(client, "ssh-keys", "SSHKey", key_ref)
    answer = client.delete(f"/api/v1/ssh-keys/{key_id}")
    invocation.emit(answer, lambda _: _render.plain(f"Removed SSH key {key_id}."))


def _key_table(data: dict[str, Any]) -> RenderableType:
    from devyard.wire.ssh_keys import SSHKey

    keys = [SSHKey.model_validate(item) for item in data["items"]]
    return _render.table(
        ["ID", "NAME", "TYPE", "FINGERPRINT", "AGE"],
        (
            (
                k.metadata.id,
                k.metadata.name,
                k.status.key_type,
                k.status.fingerprint,
                _render.age(k.metadata.created_at),
            )
            for k in keys
        ),
        empty="No SSH keys. Add one with `devyard ssh-key add ~/.ssh/id_ed25519.pub`.",
    )
