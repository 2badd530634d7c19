"""``devyard login`` saves a server and a token in the config file once the server accepts them;
``devyard whoami`` shows who a credential belongs to."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

import click

from devyard.cli import _config, _render
from devyard.cli._invocation import Invocation, api_command, output_option, translated_errors

if TYPE_CHECKING:
    from rich.console import RenderableType

__all__ = ["login", "whoami"]


@click.command()
@click.option("--server", envvar="DEVYARD_SERVER", metavar="URL", help="The server [env DEVYARD_SERVER].")
@click.option(
    "--token",
    envvar="DEVYARD_TOKEN",
    metavar="TOKEN",
    help="The access token [env DEVYARD_TOKEN]; default: read from stdin, or asked for.",
)
@click.option(
    "--profile",
    envvar="DEVYARD_PROFILE",
    metavar="NAME",
    help="Save under this profile and make it current [default: the current one].",
)
@output_option
def login(server: str | None, token: str | None, profile: str | None, output: str) -> None:
    """Check a server and token with the server, then save them in the config file.

    The token is read from --token, DEVYARD_TOKEN, stdin (`devyard login --server URL < token.txt`), or
    asked for at the terminal. The file is ~/.config/devyard/config.json, readable only by you.
    """
    config = _config.load()
    name = profile or config.current_profile or _config.DEFAULT_PROFILE
    saved = config.profiles.get(name, _config.Profile())
    server = (server or saved.server or "").rstrip("/")
    if not server:
        raise click.UsageError("--server is required (there is no server in the config file yet)")
    if not token:
        token = _read_token()
    invocation = Invocation(server=server, token=token, profile=name, output=output)
    try:
        with translated_errors(invocation):
            identity: dict[str, Any] = invocation.client().get("/api/v1/whoami")
    finally:
        invocation.close()
    if identity.get("principal") != "user":
        raise click.ClickException(
            f"that credential belongs to a {identity.get('principal')}, not a user: log in with a user's token"
        )
    config.profiles[name] = _config.Profile(server=server, token=token)
    config.current_profile = name
    path = _config.save(config)
    invocation.emit(
        identity,
        lambda data: _render.plain(
            f"Logged in to {server} as {data.get('name')} ({data.get('id')}); saved as profile {name!r} in {path}."
        ),
    )


@click.command()
@api_command
def whoami(invocation: Invocation) -> None:
    """Show who the configured credential belongs to, and its organizations."""
    identity = invocation.client().get("/api/v1/whoami")
    invocation.emit(identity, lambda data: _identity(data, invocation))


def _read_token() -> str:
    interactive = sys.stdin.isatty()
    token = str(click.prompt("Token", hide_input=True)) if interactive else sys.stdin.readline()
    token = token.strip()
    if not token:
        raise click.UsageError("no token given: pass --token, set DEVYARD_TOKEN, or pipe it on stdin")
    return token


def _identity(data: dict[str, Any], invocation: Invocation) -> RenderableType:
    from devyard.wire.organizations import Whoami

    identity = Whoami.model_validate(data)
    roles = ", ".join(f"{m.spec.role.value} of {m.metadata.organization_id}" for m in identity.memberships)
    return _render.fields(
        f"{identity.principal.capitalize()} {identity.name}",
        [
            ("id", identity.id),
            ("roles", roles),
            ("server", invocation.server),
            ("profile", invocation.profile),
        ],
    )
