"""``devyard env ssh ENV [-- CMD]`` and ``devyard env ssh-config [ENV]``: OpenSSH into an environment.

A running environment's ``status.ssh`` says where its runner's SSH gateway listens (host, port, and the user
name, which is the environment's id). ``env ssh`` runs the user's own ``ssh`` with it (so their keys, agent and
options work as always); ``env ssh-config`` prints Host entries that OpenSSH and VS Code Remote-SSH use as they
are. Host keys are kept in devyard's own known-hosts file beside the config file (first use accepted, a change
refused), so that a runner's key never lands in, or clashes with, the user's ``~/.ssh/known_hosts``. Registered on
the ``env`` group by ``cli.environments``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import click

from devyard.cli import _config
from devyard.cli._invocation import Invocation, api_command

__all__ = ["known_hosts_path", "ssh", "ssh_config", "ssh_options"]


def known_hosts_path() -> Path:
    return _config.config_path().parent / "known_hosts"


def ssh_options() -> list[str]:
    """The options every ssh to an environment gets."""
    return ["-o", f"UserKnownHostsFile={known_hosts_path()}", "-o", "StrictHostKeyChecking=accept-new"]


@click.command("ssh", context_settings={"ignore_unknown_options": True})
@click.argument("environment")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@api_command
def ssh(invocation: Invocation, environment: str, command: tuple[str, ...]) -> None:
    """Open a shell in ENVIRONMENT with OpenSSH, or run COMMAND there (after --): your keys, agent and ssh
    options apply. Your public key must be added first (`devyard ssh-key add ~/.ssh/id_ed25519.pub`)."""
    from devyard.cli._references import resolve_id

    client = invocation.client()
    environment_id = resolve_id(client, "environments", "Environment", environment)
    found = client.get(f"/api/v1/environments/{environment_id}")
    endpoint = _endpoint(found)
    program = shutil.which("ssh")
    if program is None:
        raise click.ClickException("ssh is not installed here (Debian: apt-get install openssh-client)")
    known_hosts_path().parent.mkdir(parents=True, exist_ok=True)
    argv = [program, *ssh_options(), "-p", str(endpoint["port"]), f"{endpoint['user']}@{endpoint['host']}"]
    if command:
        argv += ["--", *command]
    invocation.close()
    os.execv(program, argv)


@click.command("ssh-config")
@click.argument("environment", required=False)
@api_command
def ssh_config(invocation: Invocation, environment: str | None) -> None:
    """Print OpenSSH Host entries for ENVIRONMENT, or for every running environment you can see: add them to
    ~/.ssh/config (or `Include` a file holding them) and `ssh NAME.devyard` or VS Code's Remote-SSH reaches it."""
    from devyard.cli._references import resolve_id

    client = invocation.client()
    if environment is not None:
        environment_id = resolve_id(client, "environments", "Environment", environment)
        environments = [client.get(f"/api/v1/environments/{environment_id}")]
        _endpoint(environments[0])
    else:
        environments, _ = client.list_all("/api/v1/environments", {"phase": "running"})
    entries = [_host_entry(item) for item in environments if (item.get("status") or {}).get("ssh")]
    if invocation.json:
        invocation.emit({"items": entries}, lambda data: data)
    elif entries:
        # As it is, not through rich: a terminal's width must not wrap it.
        click.echo("\n".join(entry["text"] for entry in entries), nl=False)
    else:
        click.echo("No running environment offers SSH.", err=True)


def _endpoint(environment: dict[str, Any]) -> dict[str, Any]:
    status = environment.get("status") or {}
    endpoint = status.get("ssh")
    if endpoint is None:
        environment_id = environment["metadata"]["id"]
        if status.get("phase") != "running":
            raise click.ClickException(
                f"{environment_id} is {status.get('phase', 'pending')}, not running: start it with "
                f"`devyard env start {environment_id} --wait`"
            )
        raise click.ClickException(f"{environment_id}'s runner offers no SSH gateway")
    return dict(endpoint)


def _host_entry(environment: dict[str, Any]) -> dict[str, Any]:
    endpoint = environment["status"]["ssh"]
    metadata = environment["metadata"]
    aliases = [f"{metadata['id']}.devyard"]
    if metadata.get("name"):
        aliases.insert(0, f"{metadata['name']}.devyard")
    lines = [
        f"Host {' '.join(aliases)}",
        f"  HostName {endpoint['host']}",
        f"  Port {endpoint['port']}",
        f"  User {endpoint['user']}",
        f"  UserKnownHostsFile {known_hosts_path()}",
        "  StrictHostKeyChecking accept-new",
        "",
    ]
    return {"environment_id": metadata["id"], "hosts": aliases, **endpoint, "text": "\n".join(lines)}
