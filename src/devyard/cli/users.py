"""``devyard user``: the users of an organization and their roles (admin or member)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import click

from devyard.cli import _render
from devyard.cli._invocation import Invocation, api_command

if TYPE_CHECKING:
    from rich.console import RenderableType

__all__ = ["user"]

_ROLES = click.Choice(["admin", "member"])


@click.group()
def user() -> None:
    """Manage users and their roles."""


@user.command("create")
@click.argument("name")
@click.option("--email", help="The user's email address.")
@click.option("--display-name", help="A name for people.")
@click.option("--role", type=_ROLES, default="member", show_default=True, help="Their role in the organization.")
@click.option("--org", "org_ref", metavar="ORG", help="The organization (id or name); default: yours.")
@click.option(
    "--with-token",
    is_flag=True,
    help="Also make an access token for them and print its secret once (JSON: {user, token}).",
)
@api_command
def create_user(
    invocation: Invocation,
    name: str,
    email: str | None,
    display_name: str | None,
    role: str,
    org_ref: str | None,
    with_token: bool,
) -> None:
    """Create the user NAME as a member (or admin) of an organization."""
    from devyard.cli._references import resolve_id
    from devyard.cli.tokens import create_token_for, render_secret
    from devyard.wire.meta import MetadataWrite
    from devyard.wire.organizations import Role, UserCreate, UserSpec

    client = invocation.client()
    metadata = MetadataWrite(name=name)
    if org_ref is not None:
        metadata.organization_id = resolve_id(client, "organizations", "Organization", org_ref)
    spec = {key: value for key, value in (("email", email), ("display_name", display_name)) if value is not None}
    body = UserCreate(metadata=metadata, spec=UserSpec(**spec), role=Role(role))
    created: dict[str, Any] = client.post("/api/v1/users", body.model_dump(mode="json", exclude_unset=True))
    user_id = created["metadata"]["id"]
    message = f"Created user {user_id} ({name}), {role}."
    if not with_token:
        invocation.emit(created, lambda _: _render.plain(message))
        return
    secret = create_token_for(client, user_id=user_id, description=f"made with the user {name}")

    def render(_: Any) -> RenderableType:
        from rich.console import Group

        return Group(_render.plain(message), render_secret(secret))

    invocation.emit({"user": created, "token": secret}, render)


@user.command("list")
@api_command
def list_users(invocation: Invocation) -> None:
    """List the users of your organizations, with their roles."""
    client = invocation.client()
    items, version = client.list_all("/api/v1/users")
    if invocation.json:
        invocation.emit({"items": items, "resource_version": version}, lambda _: "")
        return
    memberships, _ = client.list_all("/api/v1/memberships")
    roles: dict[str, list[str]] = {}
    for membership in memberships:
        spec = membership["spec"]
        org_id = membership["metadata"].get("organization_id") or ""
        roles.setdefault(spec["user_id"], []).append(f"{spec['role']} of {org_id}")
    invocation.emit({"items": items}, lambda data: _user_table(data, roles))


@user.command("set-role")
@click.argument("user_ref", metavar="USER")
@click.argument("role", type=_ROLES)
@click.option("--org", "org_ref", metavar="ORG", help="The organization (id or name); default: your only one.")
@api_command
def set_role(invocation: Invocation, user_ref: str, role: str, org_ref: str | None) -> None:
    """Make USER (id or name) an admin or a member of an organization they belong to."""
    from devyard.cli._references import resolve_id

    client = invocation.client()
    user_id = resolve_id(client, "users", "User", user_ref)
    params = {"user_id": user_id}
    if org_ref is not None:
        params["organization_id"] = resolve_id(client, "organizations", "Organization", org_ref)
    memberships, _ = client.list_all("/api/v1/memberships", params)
    if not memberships:
        raise click.ClickException(f"user {user_id} is not a member of that organization")
    if len(memberships) > 1:
        raise click.ClickException(f"user {user_id} belongs to several organizations: name one with --org")
    membership_id = memberships[0]["metadata"]["id"]
    changed = client.patch(f"/api/v1/memberships/{membership_id}", {"spec": {"role": role}})
    invocation.emit(changed, lambda _: _render.plain(f"User {user_id} is now {role}."))


@user.command("dotfiles")
@click.argument("url", required=False)
@click.option("--ref", help="A branch, tag or commit of the repository; default: its default branch.")
@click.option("--clear", is_flag=True, help="Install no dotfiles in new environments.")
@api_command
def dotfiles(invocation: Invocation, url: str | None, ref: str | None, clear: bool) -> None:
    """Show or set your dotfiles repository: each environment you create clones it and, on its first start,
    runs its install script (install.sh, bootstrap.sh, setup.sh...) or links its dotfiles into your home."""
    from devyard.wire.git_context import parse_git_context

    if clear and (url or ref):
        raise click.UsageError("--clear takes no URL or --ref")
    if ref and not url:
        raise click.UsageError("--ref needs a URL")
    client = invocation.client()
    me = client.get("/api/v1/whoami")
    if me.get("principal") != "user":
        raise click.ClickException("only a user has dotfiles; this credential is a runner's")
    if url is None and not clear:
        current = client.get(f"/api/v1/users/{me['id']}")
        invocation.emit(current["spec"].get("dotfiles"), _dotfiles_line)
        return
    repository: dict[str, Any] | None = None
    if url is not None:
        try:
            # A local path works on a desktop runner (devyard up), whose host is yours.
            pasted = parse_git_context(url, allow_local=True)
        except ValueError as exc:
            raise click.UsageError(str(exc)) from None
        repository = {"url": pasted.url, "ref": ref or pasted.ref}
    changed = client.patch(f"/api/v1/users/{me['id']}", {"spec": {"dotfiles": repository}})
    invocation.emit(changed["spec"].get("dotfiles"), _dotfiles_line)


def _dotfiles_line(repository: dict[str, Any] | None) -> RenderableType:
    if not repository:
        return _render.plain("No dotfiles: new environments get none.")
    at = f" at {repository['ref']}" if repository.get("ref") else ""
    return _render.plain(f"Dotfiles: {repository['url']}{at}; new environments install them on their first start.")


def _user_table(data: dict[str, Any], roles: dict[str, list[str]]) -> RenderableType:
    from devyard.wire.organizations import User

    users = [User.model_validate(item) for item in data["items"]]
    return _render.table(
        ["ID", "NAME", "EMAIL", "ROLES", "STATE", "AGE"],
        (
            (
                u.metadata.id,
                u.metadata.name,
                u.spec.email or "",
                ", ".join(roles.get(u.metadata.id, [])),
                _render.phase("suspended") if u.status.suspended else "active",
                _render.age(u.metadata.created_at),
            )
            for u in users
        ),
        empty="No users.",
    )
