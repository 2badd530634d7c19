"""``devyard up`` and ``devyard down``: everything on this machine, in one background daemon.

``up`` starts the local daemon (server and runner over SQLite, ``devyard.local``) or reuses the one already
running in the state directory, saves its URL and admin token as the config file's ``local`` profile (the
current profile too, when there was none), then creates an environment for the folder or git URL (or reuses
the one it made before for the same content), waits until it runs, and says how to reach it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import click

from devyard.cli import _config, _render
from devyard.cli._invocation import Invocation, output_option, translated_errors
from devyard.cli._param_types import DURATION

if TYPE_CHECKING:
    from rich.console import RenderableType

    from devyard.local.state_dir import DaemonInfo, StateDir

__all__ = ["LOCAL_PROFILE", "down", "up"]

#: The config file's profile that ``up`` writes.
LOCAL_PROFILE: Final = "local"

_state_dir_option = click.option(
    "--state-dir",
    type=click.Path(file_okay=False, path_type=Path),
    envvar="DEVYARD_STATE_DIR",
    help="The daemon's state [env DEVYARD_STATE_DIR; default: $XDG_STATE_HOME/devyard, ~/.local/state/devyard].",
)


@click.command()
@click.argument("context", default=".", required=False)
@_state_dir_option
@click.option("--port", type=click.IntRange(0, 65535), default=0, help="The daemon's port; 0: the last one, or any.")
@click.option("--name", help="The environment's name, when a new one is made.")
@click.option("--image", help="Use this image instead of the dev container's.")
@click.option("--ref", help="The git branch, tag or commit (git URLs only).")
@click.option("--wait-timeout", type=DURATION, default=600.0, show_default="10m", help="How long to wait for it.")
@click.option(
    "--runtime",
    type=click.Choice(["linux", "fake"]),
    help="The local runner's runtime, when this starts the daemon [default: linux as root, else fake].",
)
@output_option
def up(
    context: str,
    state_dir: Path | None,
    port: int,
    name: str | None,
    image: str | None,
    ref: str | None,
    wait_timeout: float,
    runtime: str | None,
    output: str,
) -> None:
    """Run an environment for CONTEXT (a folder, default `.`, or a git URL) on this machine.

    Starts the local daemon (server and runner, SQLite) in the background unless it runs already, and saves
    it as the config file's `local` profile; `devyard down` stops it.
    """
    from devyard.cli.environments import content_from_context
    from devyard.local import lifecycle
    from devyard.local.state_dir import StateDir, default_state_dir

    content = content_from_context(context, ref)
    state = StateDir((state_dir or default_state_dir()).expanduser().resolve())
    quiet = Invocation(server=None, token=None, profile=LOCAL_PROFILE, output=output)
    with quiet.progress("Starting the local daemon") as update:
        try:
            info, started = lifecycle.ensure_daemon(state, port=port, runtime=runtime, on_progress=update)
        except lifecycle.DaemonError as exc:
            raise click.ClickException(str(exc)) from None
    token = state.read_admin_token()
    if token is None:
        raise click.ClickException(f"the local daemon has no admin token in {state.server_dir}")
    is_current = _save_profile(info.url, token)

    invocation = Invocation(server=info.url, token=token, profile=LOCAL_PROFILE, output=output)
    try:
        with translated_errors(invocation):
            environment, reused = _find_or_create(
                invocation, content.model_dump(mode="json", exclude_none=True), name, image
            )
            final = _wait_running(invocation, environment, wait_timeout)
            key_note = _offer_ssh_key(invocation)
    finally:
        invocation.close()
    daemon = _daemon_json(state, info, started)
    state_flag = "" if state.root == default_state_dir().expanduser().resolve() else f" --state-dir {state.root}"
    invocation.emit(
        {"daemon": daemon, "environment": final},
        lambda data: _up_summary(data["environment"], daemon, reused, is_current, state_flag, key_note),
    )


#: The public keys ``up`` offers the server when the user has none there yet, most preferred first.
_DEFAULT_KEYS = ("id_ed25519.pub", "id_ecdsa.pub", "id_rsa.pub")


def _offer_ssh_key(invocation: Invocation) -> str:
    """Add the user's default public key (``~/.ssh/id_ed25519.pub``...) to the local server when it knows none of
    theirs, so that ssh works at once; a line on what was done, or what to do."""
    client = invocation.client()
    items, _ = client.list_all("/api/v1/ssh-keys")
    if items:
        return ""
    for name in _DEFAULT_KEYS:
        path = Path.home() / ".ssh" / name
        if path.is_file():
            public_key = path.read_text().strip()
            client.post("/api/v1/ssh-keys", {"metadata": {}, "spec": {"public_key": public_key}})
            return f"Added your SSH key {path} to the local server."
    return "No SSH key: add one with `devyard ssh-key add ~/.ssh/id_ed25519.pub` (ssh-keygen -t ed25519 makes one)."


@click.command()
@_state_dir_option
@output_option
def down(state_dir: Path | None, output: str) -> None:
    """Stop the local daemon. Environments stay as they are and resume with the next `devyard up`."""
    from devyard.local import lifecycle
    from devyard.local.state_dir import StateDir, default_state_dir

    state = StateDir((state_dir or default_state_dir()).expanduser().resolve())
    try:
        pid = lifecycle.stop_daemon(state)
    except lifecycle.DaemonError as exc:
        raise click.ClickException(str(exc)) from None
    invocation = Invocation(server=None, token=None, profile=LOCAL_PROFILE, output=output)
    message = f"Stopped the local daemon (pid {pid})." if pid else f"No local daemon is running in {state.root}."
    invocation.emit(
        {"stopped": pid is not None, "pid": pid, "state_dir": str(state.root)}, lambda _: _render.plain(message)
    )


def _save_profile(url: str, token: str) -> bool:
    """Save the daemon as the ``local`` profile; whether it is the current profile."""
    config = _config.load()
    config.profiles[LOCAL_PROFILE] = _config.Profile(server=url, token=token)
    if config.current_profile is None or config.current_profile not in config.profiles:
        config.current_profile = LOCAL_PROFILE
    _config.save(config)
    return config.current_profile == LOCAL_PROFILE


def _find_or_create(
    invocation: Invocation, content: dict[str, Any], name: str | None, image: str | None
) -> tuple[dict[str, Any], bool]:
    """The environment ``up`` made before for ``content`` (started again if stopped), or a new one."""
    from devyard.wire.environments import EnvironmentCreate, EnvironmentSpec
    from devyard.wire.meta import MetadataWrite

    client = invocation.client()
    items, _ = client.list_all("/api/v1/environments")
    for item in items:
        spec, status = item.get("spec") or {}, item.get("status") or {}
        same = _comparable(spec.get("content")) == _comparable(content)
        if same and spec.get("desired_phase") != "deleted" and status.get("phase") not in ("failed", "deleting"):
            if spec.get("desired_phase") != "running":
                item = client.patch(
                    f"/api/v1/environments/{item['metadata']['id']}", {"spec": {"desired_phase": "running"}}
                )
            return item, True
    spec_values: dict[str, Any] = {"content": content}
    if image is not None:
        spec_values["image"] = image
    body = EnvironmentCreate(
        metadata=MetadataWrite(name=name) if name else MetadataWrite(), spec=EnvironmentSpec(**spec_values)
    )
    return client.post("/api/v1/environments", body.model_dump(mode="json", exclude_unset=True)), False


def _comparable(content: Any) -> Any:
    """Content without the nulls that a server may or may not send back."""
    if isinstance(content, dict):
        return {key: _comparable(value) for key, value in content.items() if value is not None}
    return content


def _wait_running(invocation: Invocation, environment: dict[str, Any], timeout: float) -> dict[str, Any]:
    from devyard.cli._waiting import wait_for_environment

    environment_id = environment["metadata"]["id"]

    with invocation.progress(f"Starting {environment_id}") as update:

        def on_change(current: dict[str, Any]) -> None:
            status = current.get("status") or {}
            update(f"{environment_id}: {status.get('phase', 'pending')} {status.get('message') or ''}".rstrip())

        final = wait_for_environment(
            invocation.client(), environment_id, "running", timeout=timeout, on_change=on_change
        )
    assert final is not None
    return final


def _daemon_json(state: StateDir, info: DaemonInfo, started: bool) -> dict[str, Any]:
    return {
        "url": info.url,
        "pid": info.pid,
        "runner_id": info.runner_id,
        "runtime": info.runtime,
        "started": started,
        "state_dir": str(state.root),
        "log": str(state.log_file),
    }


def _up_summary(
    environment: dict[str, Any],
    daemon: dict[str, Any],
    reused: bool,
    is_current: bool,
    state_flag: str,
    key_note: str = "",
) -> RenderableType:
    from rich.console import Group
    from rich.text import Text

    from devyard.cli.environments import render_environment

    environment_id = environment["metadata"]["id"]
    profile = "" if is_current else f" --profile {LOCAL_PROFILE}"
    verb = "started" if daemon["started"] else "already running"
    return Group(
        Text(f"Environment {environment_id} is running" + (" (reused)." if reused else "."), style="bold green"),
        "",
        render_environment(environment),
        "",
        Text(f"Local daemon {verb} at {daemon['url']} (pid {daemon['pid']}); log: {daemon['log']}", style="dim"),
        *(
            [
                Text(
                    "The local runner uses the fake runtime (not root, or --runtime fake): the environment is "
                    "tracked and driven like a real one, but commands run on this host as you.",
                    style="yellow",
                )
            ]
            if daemon.get("runtime") == "fake"
            else []
        ),
        *([Text(key_note, style="dim")] if key_note else []),
        Text("Next:", style="bold"),
        *_ssh_lines(environment, profile),
        Text(f"  devyard env exec {environment_id}{profile} -- bash      a shell inside"),
        Text(f"  devyard env get {environment_id}{profile}      show it"),
        Text(f"  devyard env stop {environment_id} --wait{profile}"),
        Text(f"  devyard down{state_flag}      stop the daemon"),
    )


def _ssh_lines(environment: dict[str, Any], profile: str) -> list[RenderableType]:
    """How to reach the environment with OpenSSH, when its runner offers SSH."""
    from rich.text import Text

    from devyard.cli.ssh import ssh_options

    endpoint = (environment.get("status") or {}).get("ssh")
    if not endpoint:
        return []
    raw = " ".join(["ssh", *ssh_options(), "-p", str(endpoint["port"]), f"{endpoint['user']}@{endpoint['host']}"])
    return [
        Text(f"  devyard env ssh {environment['metadata']['id']}{profile}      ssh into it (your keys and agent)"),
        Text(f"  {raw}", style="dim"),
    ]
