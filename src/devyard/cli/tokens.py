"""``devyard token``: personal access tokens. A token's secret is shown once, when it is made."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import click

from devyard.cli import _render
from devyard.cli._invocation import Invocation, api_command
from devyard.cli._param_types import DURATION

if TYPE_CHECKING:
    from rich.console import RenderableType

    from devyard.client import Client

__all__ = ["create_token_for", "render_secret", "token"]


@click.group()
def token() -> None:
    """Manage access tokens."""


@token.command("create")
@click.option("--description", help="What the token is for.")
@click.option("--expires-in", type=DURATION, help="Expire after this long (e.g. 30d); default: never.")
@click.option("--user", "user_ref", metavar="USER", help="Make it for another user of your organization (admins).")
@click.option("--name", help="A name; default: generated.")
@api_command
def create_token(
    invocation: Invocation,
    description: str | None,
    expires_in: float | None,
    user_ref: str | None,
    name: str | None,
) -> None:
    """Create an access token and print its secret, once."""
    from devyard.cli._references import resolve_id

    client = invocation.client()
    user_id = resolve_id(client, "users", "User", user_ref) if user_ref is not None else None
    created = create_token_for(client, user_id=user_id, description=description, expires_in=expires_in, name=name)
    invocation.emit(created, render_secret)


@token.command("list")
@api_command
def list_tokens(invocation: Invocation) -> None:
    """List tokens (never their secrets)."""
    items, version = invocation.client().list_all("/api/v1/tokens")
    invocation.emit({"items": items, "resource_version": version}, _token_table)


@token.command("revoke")
@click.argument("token_id", metavar="TOKEN")
@api_command
def revoke_token(invocation: Invocation, token_id: str) -> None:
    """Revoke a token (id or name): it stops working at once."""
    from devyard.cli._references import resolve_id

    client = invocation.client()
    token_id = resolve_id(client, "tokens", "Token", token_id)
    answer = client.delete(f"/api/v1/tokens/{token_id}")
    invocation.emit(answer, lambda _: _render.plain(f"Revoked token {token_id}."))


def create_token_for(
    client: Client,
    *,
    user_id: str | None = None,
    description: str | None = None,
    expires_in: float | None = None,
    name: str | None = None,
) -> dict[str, Any]:
    """POST a token; the answer (``TokenCreated``) holds the secret."""
    from devyard.wire.meta import MetadataWrite
    from devyard.wire.tokens import TokenCreate, TokenSpec

    spec: dict[str, Any] = {}
    if description is not None:
        spec["description"] = description
    if expires_in is not None:
        spec["expires_at"] = datetime.now(UTC) + timedelta(seconds=expires_in)
    if user_id is not None:
        spec["user_id"] = user_id
    body = TokenCreate(metadata=MetadataWrite(name=name) if name else MetadataWrite(), spec=TokenSpec(**spec))
    created: dict[str, Any] = client.post("/api/v1/tokens", body.model_dump(mode="json", exclude_unset=True))
    return created


def render_secret(data: dict[str, Any]) -> RenderableType:
    from rich.console import Group
    from rich.text import Text

    from devyard.wire.tokens import TokenCreated

    created = TokenCreated.model_validate(data)
    owner = f" for user {created.token.spec.user_id}" if created.token.spec.user_id else ""
    return Group(
        Text(f"Created token {created.token.metadata.id}{owner}. Its secret, shown only this once:"),
        Text(""),
        Text("  " + created.secret, style="bold cyan", no_wrap=True, overflow="ignore"),
    )


def _token_table(data: dict[str, Any]) -> RenderableType:
    from devyard.wire.tokens import Token

    tokens = [Token.model_validate(item) for item in data["items"]]
    return _render.table(
        ["ID", "NAME", "PREFIX", "USER", "DESCRIPTION", "LAST USED", "EXPIRES", "STATE"],
        (
            (
                t.metadata.id,
                t.metadata.name,
                t.status.prefix,
                t.spec.user_id or t.metadata.creator_id or "",
                t.spec.description,
                _render.age(t.status.last_used_at) + " ago" if t.status.last_used_at else "never",
                f"{t.spec.expires_at:%Y-%m-%d}" if t.spec.expires_at else "never",
                _render.phase("revoked") if t.status.revoked_at else _render.phase("active"),
            )
            for t in tokens
        ),
        empty="No tokens.",
    )
