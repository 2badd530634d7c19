"""``devyard env port list|open|close|url``: an environment's ports, and who may reach them through its runner's
port proxy.

``list`` shows ``status.ports`` (what listens inside, what the dev container forwards, what is shared), with each
port's URL on the runner's port proxy. ``open`` adds or replaces the port's ``spec.ports`` entry (its admission:
owner, organization or everyone; its protocol; a name) and prints the URL; ``close`` removes the entry, so the port
is its owner's only again. ``url`` (and ``open --browser``) asks the management plane for a port ticket and prints
the proxy's login link with it, which a browser trades for a session cookie. Registered on the ``env`` group by
``cli.environments``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import urllib.parse
from typing import Any

import click

from devyard.cli._invocation import Invocation, api_command

__all__ = ["login_link", "port"]

ADMISSIONS = ("owner", "organization", "everyone")
PROTOCOLS = ("http", "https")


@click.group("port")
def port() -> None:
    """List an environment's ports, share them, and get their URLs."""


def _environment(invocation: Invocation, reference: str) -> dict[str, Any]:
    from devyard.cli._references import resolve_id

    client = invocation.client()
    environment_id = resolve_id(client, "environments", "Environment", reference)
    found: dict[str, Any] = client.get(f"/api/v1/environments/{environment_id}")
    return found


def _status_port(environment: dict[str, Any], number: int) -> dict[str, Any] | None:
    for entry in (environment.get("status") or {}).get("ports") or []:
        if entry.get("port") == number:
            return dict(entry)
    return None


@port.command("list")
@click.argument("environment")
@api_command
def list_ports(invocation: Invocation, environment: str) -> None:
    """The ports of ENVIRONMENT: listening inside, forwarded by its dev container, or shared; with their URLs."""
    found = _environment(invocation, environment)
    ports = (found.get("status") or {}).get("ports") or []

    def render(items: list[dict[str, Any]]) -> Any:
        from devyard.cli import _render

        rows = [
            (
                str(item["port"]),
                item.get("name") or "",
                item.get("admission", "owner"),
                item.get("protocol", "http"),
                "yes" if item.get("listening") else "no",
                item.get("url") or "",
            )
            for item in items
        ]
        empty = f"No ports in {found['metadata']['id']} (nothing listens inside, and none is forwarded or shared)."
        return _render.table(
            ("PORT", "NAME", "ADMISSION", "PROTOCOL", "LISTENING", "URL"), rows, empty=empty, whole=("URL",)
        )

    invocation.emit(ports, render)


@port.command("open")
@click.argument("environment")
@click.argument("number", metavar="PORT", type=click.IntRange(1, 65535))
@click.option(
    "--admission",
    type=click.Choice(ADMISSIONS),
    default="owner",
    show_default=True,
    help="Who may reach it: its owner, the organization's members, or everyone (no login).",
)
@click.option("--protocol", type=click.Choice(PROTOCOLS), default="http", show_default=True, help="What it speaks.")
@click.option("--name", default="", help="A name shown with it.")
@click.option("--browser", is_flag=True, help="Open it in a browser, logged in (a port ticket in the link).")
@api_command
def open_port(
    invocation: Invocation, environment: str, number: int, admission: str, protocol: str, name: str, browser: bool
) -> None:
    """Share PORT of ENVIRONMENT (or change how it is shared) and print its URL."""
    found = _environment(invocation, environment)
    environment_id = found["metadata"]["id"]
    entries = [e for e in found["spec"].get("ports") or [] if e.get("port") != number]
    entries.append({"port": number, "name": name, "admission": admission, "protocol": protocol})
    changed = _write_ports(invocation, found, sorted(entries, key=lambda e: int(e["port"])))
    shown = _status_port(changed, number) or {"port": number, "admission": admission, "protocol": protocol}
    if browser:
        link = login_link(invocation, environment_id, number)
        if link is not None:
            shown["login_url"] = link
            _open_browser(link)

    def render(data: dict[str, Any]) -> Any:
        from devyard.cli import _render

        url = data.get("login_url") or data.get("url")
        text = f"Port {number} of {environment_id} is shared with {_whom(admission)}"
        if url:
            return _render.plain(f"{text}: {url}")
        return _render.plain(
            f"{text}; its URL appears in `devyard env port list {environment_id}` once it is reported."
        )

    invocation.emit(shown, render)


@port.command("close")
@click.argument("environment")
@click.argument("number", metavar="PORT", type=click.IntRange(1, 65535))
@api_command
def close_port(invocation: Invocation, environment: str, number: int) -> None:
    """Stop sharing PORT of ENVIRONMENT: its owner alone may reach it again."""
    found = _environment(invocation, environment)
    environment_id = found["metadata"]["id"]
    entries = found["spec"].get("ports") or []
    kept = [e for e in entries if e.get("port") != number]
    if len(kept) == len(entries):
        invocation.note(f"Port {number} of {environment_id} was not shared; nothing changed.")
        invocation.emit({"port": number, "admission": "owner"}, lambda _: "")
        return
    _write_ports(invocation, found, kept)
    invocation.emit(
        {"port": number, "admission": "owner"},
        lambda _: f"Port {number} of {environment_id} is its owner's only again.",
    )


@port.command("url")
@click.argument("environment")
@click.argument("number", metavar="PORT", type=click.IntRange(1, 65535))
@api_command
def port_url(invocation: Invocation, environment: str, number: int) -> None:
    """Print a link that opens PORT of ENVIRONMENT in a browser, logged in as you (it works for a few minutes; the
    browser then keeps its session)."""
    found = _environment(invocation, environment)
    link = login_link(invocation, found["metadata"]["id"], number, status=found)
    if link is None:
        raise click.ClickException(
            f"port {number} of {found['metadata']['id']} has no URL: is the environment running, and does its runner "
            "have a port proxy (`devyard runner --ports-listen`)?"
        )
    invocation.emit({"port": number, "login_url": link}, lambda data: data["login_url"])


def login_link(
    invocation: Invocation, environment_id: str, number: int, *, status: dict[str, Any] | None = None
) -> str | None:
    """The proxy's login link for the port, with a port ticket: None when the port has no URL."""
    client = invocation.client()
    found = status or client.get(f"/api/v1/environments/{environment_id}")
    shown = _status_port(found, number)
    url = shown.get("url") if shown is not None else None
    if not url:
        return None
    access = client.post(f"/api/v1/environments/{environment_id}/access", {"scope": "port"})
    parts = urllib.parse.urlsplit(url)
    base_path = parts.path.rstrip("/")
    query = urllib.parse.urlencode({"ticket": access["ticket"], "next": base_path + "/"})
    return str(urllib.parse.urlunsplit((parts.scheme, parts.netloc, f"{base_path}/_devyard/login", query, "")))


def _write_ports(invocation: Invocation, found: dict[str, Any], entries: list[dict[str, Any]]) -> dict[str, Any]:
    """PATCH ``spec.ports``, guarded by the version read (a concurrent change is a clear error, not a lost one)."""
    from devyard.client import ApiError

    environment_id = found["metadata"]["id"]
    body = {"spec": {"ports": entries}, "resource_version": found["metadata"]["resource_version"]}
    try:
        changed: dict[str, Any] = invocation.client().patch(f"/api/v1/environments/{environment_id}", body)
    except ApiError as exc:
        if exc.status == 409:
            raise click.ClickException(f"{environment_id} changed meanwhile; run the command again") from None
        raise
    return changed


def _whom(admission: str) -> str:
    return {"owner": "its owner only", "organization": "the organization", "everyone": "everyone"}[admission]


def _open_browser(link: str) -> None:
    opener = shutil.which("xdg-open")
    if opener is not None and (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        subprocess.Popen([opener, link], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
