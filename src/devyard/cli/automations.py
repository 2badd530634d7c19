"""``devyard automations list|start|stop|logs ENV [ID]``: an environment's services and tasks.

The runner reports where each automation stands in the environment's ``status.automations``; starting or stopping
one by hand is a request in the environment's spec (``spec.automation_requests[ID]``, with a new request id each
time), which the runner acts on once. ``logs`` reads the automations' streams (``automations/ID``) from the
server, as ``devyard env logs`` does.
"""

from __future__ import annotations

import secrets
from typing import TYPE_CHECKING, Any, Final

import click

from devyard.cli import _render
from devyard.cli._invocation import Invocation, api_command

if TYPE_CHECKING:
    from rich.console import RenderableType

    from devyard.client import Client

__all__ = ["automations"]

#: Attempts at a request when another write raced ours (409).
_ATTEMPTS: Final = 5


@click.group("automations")
def automations() -> None:
    """List, start and stop an environment's services and tasks, and read their output."""


@automations.command("list")
@click.argument("environment")
@api_command
def list_automations(invocation: Invocation, environment: str) -> None:
    """List the services and tasks of ENVIRONMENT and where each stands."""
    client = invocation.client()
    data = client.get(_path(client, environment))
    invocation.emit({"items": data["status"].get("automations", [])}, _table)


@automations.command("start")
@click.argument("environment")
@click.argument("automation")
@api_command
def start_automation(invocation: Invocation, environment: str, automation: str) -> None:
    """Start a service, or run a task (again), in ENVIRONMENT."""
    _request(invocation, environment, automation, "start")


@automations.command("stop")
@click.argument("environment")
@click.argument("automation")
@api_command
def stop_automation(invocation: Invocation, environment: str, automation: str) -> None:
    """Stop a service, or a running task, in ENVIRONMENT."""
    _request(invocation, environment, automation, "stop")


@automations.command("logs")
@click.argument("environment")
@click.argument("automation", required=False)
@click.option("-f", "--follow", is_flag=True, help="Keep printing new output until the environment is deleted.")
@api_command
def automation_logs(invocation: Invocation, environment: str, automation: str | None, follow: bool) -> None:
    """Print the output of one automation of ENVIRONMENT, or of all of them."""
    from devyard.cli.logs import print_logs

    print_logs(invocation, environment, f"automations/{automation}" if automation else "automations/", follow)


def _request(invocation: Invocation, environment: str, automation: str, action: str) -> None:
    from devyard.client import ApiError

    client = invocation.client()
    path = _path(client, environment)
    for attempt in range(_ATTEMPTS):
        current = client.get(path)
        known = {entry["id"] for entry in current["status"].get("automations", [])}
        if known and automation not in known:
            raise click.BadParameter(
                f"{current['metadata']['id']} has no automation {automation!r} (it has: {', '.join(sorted(known))})",
                param_hint="AUTOMATION",
            )
        requests = dict(current["spec"].get("automation_requests") or {})
        requests[automation] = {"action": action, "request_id": secrets.token_hex(8)}
        try:
            answer = client.patch(
                path,
                {
                    "spec": {"automation_requests": requests},
                    "resource_version": current["metadata"]["resource_version"],
                },
            )
            break
        except ApiError as exc:
            if exc.status != 409 or attempt == _ATTEMPTS - 1:
                raise
    verb = "start" if action == "start" else "stop"
    invocation.emit(
        answer,
        lambda _: _render.plain(
            f"Asked the runner to {verb} {automation} in {answer['metadata']['id']}; "
            f"`devyard automations list {answer['metadata']['id']}` shows where it stands."
        ),
    )


def _path(client: Client, environment: str) -> str:
    from devyard.cli._references import resolve_id

    return f"/api/v1/environments/{resolve_id(client, 'environments', 'Environment', environment)}"


def _table(data: dict[str, Any]) -> RenderableType:
    return _render.table(
        ["ID", "KIND", "NAME", "PHASE", "MESSAGE"],
        (
            (entry["id"], entry["kind"], entry.get("name", ""), _render.phase(entry["phase"]), entry.get("message", ""))
            for entry in data["items"]
        ),
        empty="No automations (yet): the runner lists them once the environment runs.",
    )
