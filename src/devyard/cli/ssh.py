"""``devyard env ssh ENV [-- CMD]``, ``devyard env ssh-config [ENV]`` and ``devyard env open ENV --editor E``:
OpenSSH, and editors that speak it, into an environment.

A running environment's ``status.ssh`` says where its runner's SSH gateway listens (host, port, and the user
name, which is the environment's id). ``env ssh`` runs the user's own ``ssh`` with it (so their keys, agent and
options work as always); ``env ssh-config`` prints Host entries that OpenSSH and VS Code Remote-SSH use as they
are. Host keys are kept in devyard's own known-hosts file beside the config file (first use accepted, a change
refused), so that a runner's key never lands in, or clashes with, the user's ``~/.ssh/known_hosts``.

``env open`` writes the Host entries to a file of devyard's own (``~/.ssh/devyard/config``), adds one ``Include``
of it to the top of ``~/.ssh/config`` (once; the rest of the user's file is kept as it is, and the file is
replaced atomically), then prints the URI that opens the environment's ``status.workspace_folder`` in VS Code,
Cursor or JetBrains Gateway through that Host alias, and hands it to ``xdg-open`` when there is a display. The
editors run the user's OpenSSH (or read its config) with that alias, as Coder's ``config-ssh`` and Gitpod's
ssh-config arrange. Registered on the ``env`` group by ``cli.environments``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Any

import click

from devyard.cli import _config
from devyard.cli._invocation import Invocation, api_command

__all__ = [
    "EDITORS",
    "editor_uri",
    "ensure_include",
    "host_alias",
    "known_hosts_path",
    "open_environment",
    "ssh",
    "ssh_config",
    "ssh_options",
    "write_host_entries",
]

#: The editors ``env open`` knows, by the name ``--editor`` takes.
EDITORS = ("vscode", "cursor", "jetbrains")


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


def host_alias(environment_id: str) -> str:
    """The Host alias of an environment in the entries devyard writes: its id, which no rename changes."""
    return f"{environment_id}.devyard"


def _host_entry(environment: dict[str, Any]) -> dict[str, Any]:
    endpoint = environment["status"]["ssh"]
    metadata = environment["metadata"]
    aliases = [host_alias(metadata["id"])]
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


@click.command("open")
@click.argument("environment")
@click.option("--editor", type=click.Choice(EDITORS), default="vscode", show_default=True, help="The editor.")
@click.option("--print", "print_only", is_flag=True, help="Print the URI only; do not hand it to xdg-open.")
@api_command
def open_environment(invocation: Invocation, environment: str, editor: str, print_only: bool) -> None:
    """Open ENVIRONMENT in an editor over SSH: writes its Host entry to ~/.ssh/devyard/config, includes that file
    from ~/.ssh/config (once), and prints the URI that opens the environment's workspace folder; with a display
    and without --print, opens it with xdg-open."""
    from devyard.cli._references import resolve_id

    client = invocation.client()
    environment_id = resolve_id(client, "environments", "Environment", environment)
    found = client.get(f"/api/v1/environments/{environment_id}")
    endpoint = _endpoint(found)
    running, _ = client.list_all("/api/v1/environments", {"phase": "running"})
    others = [
        item for item in running if item["metadata"]["id"] != environment_id and (item.get("status") or {}).get("ssh")
    ]
    home = Path.home()
    entries = write_host_entries(home, [found, *others])
    ensure_include(home, entries)
    folder = (found.get("status") or {}).get("workspace_folder")
    if not folder:
        click.echo(f"devyard: {environment_id} reports no workspace folder; the editor opens its home", err=True)
    uri = editor_uri(editor, host_alias(environment_id), endpoint, folder)
    if invocation.json:
        invocation.emit({"environment_id": environment_id, "editor": editor, "uri": uri}, lambda data: data)
    else:
        click.echo(uri)
    import subprocess

    opener = shutil.which("xdg-open")
    if not print_only and opener is not None and (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        # Detached: the editor outlives this command.
        subprocess.Popen(
            [opener, uri],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )


def editor_uri(editor: str, alias: str, endpoint: dict[str, Any], folder: str | None) -> str:
    """The URI that opens ``folder`` on the SSH host ``alias`` in ``editor`` (one of ``EDITORS``).

    VS Code and Cursor (a fork of it, with its own scheme): ``vscode://vscode-remote/ssh-remote+ALIAS/FOLDER``,
    the Remote-SSH extension's URI, which connects through the user's ssh and its config. JetBrains Gateway:
    ``jetbrains-gateway://connect#type=ssh&...``, its SSH connection link (host, port, user, projectPath; with
    ``deploy=false`` Gateway asks which IDE backend to use).
    """
    from urllib.parse import quote, urlencode

    path = folder if folder and folder.startswith("/") else "/"
    if editor in ("vscode", "cursor"):
        return f"{editor}://vscode-remote/ssh-remote+{quote(alias, safe='')}{quote(path, safe='/')}"
    if editor == "jetbrains":
        parameters = {
            "type": "ssh",
            "deploy": "false",
            "host": alias,
            "port": str(endpoint["port"]),
            "user": str(endpoint["user"]),
            "projectPath": path,
        }
        return "jetbrains-gateway://connect#" + urlencode(parameters, quote_via=quote)
    raise ValueError(f"unknown editor {editor!r}: expected one of {', '.join(EDITORS)}")


def _entries_path(home: Path) -> Path:
    return home / ".ssh" / "devyard" / "config"


def write_host_entries(home: Path, environments: list[dict[str, Any]]) -> Path:
    """Write the Host entries of ``environments`` (those with an SSH endpoint) to devyard's own file under
    ``home``, replacing it whole: it is devyard's, nobody else writes there. Returns its path."""
    path = _entries_path(home)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    text = "# Written by `devyard env open`; rewritten each time. Included from ~/.ssh/config.\n\n"
    text += "\n".join(_host_entry(item)["text"] for item in environments if (item.get("status") or {}).get("ssh"))
    _replace(path, text, 0o600)
    return path


def ensure_include(home: Path, entries: Path) -> bool:
    """Add ``Include ENTRIES`` as the first line of ``home``'s ~/.ssh/config unless a line includes it already;
    the rest of the file stays byte for byte. At the top, because an Include below a ``Host`` or ``Match`` line
    would apply only inside that block. Returns whether the file changed."""
    config = home / ".ssh" / "config"
    # A config that is a link (a dotfiles repository's) is changed where it points, and stays a link.
    target = Path(os.path.realpath(config))
    try:
        existing = target.read_text()
        mode = target.stat().st_mode & 0o777
    except FileNotFoundError:
        existing, mode = "", 0o600
    for line in existing.splitlines():
        words = line.split(None, 1)
        if len(words) == 2 and words[0].lower() == "include" and str(entries) in words[1].split():
            return False
    include = f"# Added by devyard: the Host entries of `devyard env open`.\nInclude {entries}\n"
    target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    _replace(target, include + ("\n" + existing if existing else ""), mode)
    return True


def _replace(path: Path, text: str, mode: int) -> None:
    """Write ``text`` to ``path`` through a temporary file beside it, renamed over it: a reader (ssh started
    meanwhile) sees the old file or the new one, never half of one."""
    import tempfile

    descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(descriptor, "w") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temporary, mode)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
