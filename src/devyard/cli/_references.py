"""Turn what a user typed to name a resource, its id or its name, into its id."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from devyard.wire.ids import kind_of

if TYPE_CHECKING:
    from devyard.client import Client

__all__ = ["resolve_id"]


def resolve_id(client: Client, collection: str, kind: str, reference: str) -> str:
    """The id of the ``kind`` resource (listed at ``/api/v1/<collection>``) whose id or name is ``reference``."""
    if kind_of(reference) == kind:
        return reference
    items, _ = client.list_all(f"/api/v1/{collection}")
    matches = [item["metadata"]["id"] for item in items if item["metadata"].get("name") == reference]
    noun = _NOUNS.get(kind, kind)
    if not matches:
        raise click.ClickException(f"there is no {noun} with the id or name {reference!r}")
    if len(matches) > 1:
        raise click.ClickException(f"several {noun}s are named {reference!r}; use an id: {', '.join(matches)}")
    return str(matches[0])


_NOUNS = {
    "Environment": "environment",
    "EnvironmentClass": "environment class",
    "Project": "project",
    "Runner": "runner",
    "Organization": "organization",
    "User": "user",
    "Token": "token",
    "SSHKey": "SSH key",
    "Secret": "secret",
}
