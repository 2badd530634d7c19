"""The dev container's lifecycle hooks, run inside a running environment by the runner.

The environment reconciler makes a ``LifecyclePlan`` when it makes the container (from devcontainer.json, its
Features and its image's metadata, in that merged order), keeps it with ``save_plan``, and after each start calls
``pending`` to learn what is left and ``run`` (in a task of its own: hooks take minutes) to run it.

Semantics, as the Dev Containers spec and its reference CLI have them:

- ``onCreateCommand``, ``updateContentCommand`` and ``postCreateCommand`` run once per container: after it is
  made (again after a rebuild), not after a stop and start;
- ``postStartCommand`` runs after every start; ``postAttachCommand`` after every start too (devyard has no
  attach of its own: it is the first "tool attached" moment it can observe);
- each hook may have several commands (the image's, then each Feature's, then devcontainer.json's), run in that
  order; a command is a shell string (``/bin/sh -c``), an argv list, or a mapping of name to either, whose
  entries run in parallel and must all succeed;
- a failing command stops the hooks that follow it; the failure is kept (so it is not retried by a runner
  restart) until the container is made again.

What has run is kept in ``lifecycle.json`` beside the plan, keyed by the container's ``created_at`` and
``started_at``, written after each hook, so a runner killed in the middle runs only what had not finished (the
hook it was in is run again). Output goes to one log file, each command under a header line.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Final

from devyard.runner.atomic_file import write_atomically
from devyard.runner.errors import ContainerNotRunning, RunnerError
from devyard.runner.runtime import ContainerStatus, ExecRequest, Runtime

__all__ = [
    "CREATE_HOOKS",
    "HOOKS",
    "START_HOOKS",
    "HookCommand",
    "LifecyclePlan",
    "Outcome",
    "load_plan",
    "pending",
    "run",
    "save_plan",
]

log = logging.getLogger(__name__)

CREATE_HOOKS: Final = ("onCreateCommand", "updateContentCommand", "postCreateCommand")
START_HOOKS: Final = ("postStartCommand", "postAttachCommand")
HOOKS: Final = (*CREATE_HOOKS, *START_HOOKS)
#: The last lines of a failed command's output that its failure message carries.
_TAIL_LINES: Final = 5

#: One command: a shell string, an argv, or named parallel commands of either kind.
Command = str | tuple[str, ...] | Mapping[str, str | tuple[str, ...]]


@dataclass(frozen=True)
class HookCommand:
    hook: str
    command: Command
    #: Where it comes from, for messages: ``devcontainer.json``, a Feature's id, ``image``.
    origin: str


@dataclass(frozen=True)
class LifecyclePlan:
    commands: tuple[HookCommand, ...] = ()
    #: The hook the environment counts as ready after (devcontainer.json's ``waitFor``).
    wait_for: str = "updateContentCommand"
    #: Who runs them, where, with what environment: the remote user, the workspace folder, remoteEnv.
    user: str | None = None
    cwd: str | None = None
    env: Mapping[str, str] = field(default_factory=dict)

    def of(self, hook: str) -> tuple[HookCommand, ...]:
        return tuple(c for c in self.commands if c.hook == hook)

    def to_json(self) -> dict[str, Any]:
        return {
            "commands": [
                {"hook": c.hook, "command": _command_json(c.command), "origin": c.origin} for c in self.commands
            ],
            "wait_for": self.wait_for,
            "user": self.user,
            "cwd": self.cwd,
            "env": dict(self.env),
        }

    @classmethod
    def from_json(cls, document: Mapping[str, Any]) -> LifecyclePlan:
        return cls(
            commands=tuple(
                HookCommand(str(c["hook"]), _command_from_json(c["command"]), str(c["origin"]))
                for c in document["commands"]
            ),
            wait_for=str(document["wait_for"]),
            user=document["user"],
            cwd=document["cwd"],
            env={str(k): str(v) for k, v in document["env"].items()},
        )


@dataclass(frozen=True)
class Outcome:
    """Where a container's hooks stand."""

    #: Hooks still to run, in order.
    remaining: tuple[str, ...]
    #: The hook that failed, with its message, if one did.
    failed_hook: str | None = None
    message: str = ""

    @property
    def done(self) -> bool:
        return not self.remaining and self.failed_hook is None

    def ready(self, wait_for: str) -> bool:
        """Whether every hook up to ``wait_for`` ran (or there was none)."""
        if self.failed_hook is not None and _index(self.failed_hook) <= _index(wait_for):
            return False
        return all(_index(hook) > _index(wait_for) for hook in self.remaining)


def save_plan(directory: Path, plan: LifecyclePlan) -> None:
    _write_json(directory / "lifecycle-plan.json", plan.to_json())


def load_plan(directory: Path) -> LifecyclePlan | None:
    """The plan kept for the container, or None (a container made without one, or by an older runner)."""
    try:
        return LifecyclePlan.from_json(json.loads((directory / "lifecycle-plan.json").read_text()))
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError) as exc:
        log.warning("ignoring the damaged lifecycle plan in %s: %s", directory, exc)
        return None


def pending(directory: Path, plan: LifecyclePlan, container: ContainerStatus) -> Outcome:
    """What is left to run in this container since its last start."""
    state = _read_state(directory, container)
    if state.get("failed"):
        failed = state["failed"]
        return Outcome(remaining=(), failed_hook=failed["hook"], message=failed["message"])
    done = set(state.get("done", ()))
    remaining = tuple(hook for hook in HOOKS if hook not in done and plan.of(hook))
    return Outcome(remaining=remaining)


async def run(
    runtime: Runtime,
    directory: Path,
    plan: LifecyclePlan,
    container: ContainerStatus,
    *,
    log_path: Path,
    on_hook: Callable[[str], None] | None = None,
) -> Outcome:
    """Run what is left of the hooks of ``container``; returns where they stand afterwards. Raises
    ``ContainerNotRunning`` if the container stops meanwhile (the next start runs what is left)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    outcome = pending(directory, plan, container)
    for hook in outcome.remaining:
        if on_hook is not None:
            on_hook(hook)
        for command in plan.of(hook):
            failure = await _run_command(runtime, container.environment_id, plan, command, log_path)
            if failure is not None:
                message = f"{hook} ({command.origin}) failed: {failure}"
                state = _read_state(directory, container)
                state["failed"] = {"hook": hook, "message": message}
                _write_json(directory / "lifecycle.json", state)
                return Outcome(remaining=(), failed_hook=hook, message=message)
        state = _read_state(directory, container)
        state["done"] = [*state.get("done", ()), hook]
        _write_json(directory / "lifecycle.json", state)
    return Outcome(remaining=())


async def _run_command(
    runtime: Runtime, environment_id: str, plan: LifecyclePlan, command: HookCommand, log_path: Path
) -> str | None:
    """Run one command (its parallel parts at once); None if it succeeded, else why it failed."""
    parts: list[tuple[str, tuple[str, ...]]]
    if isinstance(command.command, Mapping):
        parts = [(name, _argv(value)) for name, value in command.command.items()]
    else:
        parts = [("", _argv(command.command))]
    parts = [(name, argv) for name, argv in parts if argv]
    results = await asyncio.gather(
        *(_run_part(runtime, environment_id, plan, command, name, argv, log_path) for name, argv in parts)
    )
    failures = [failure for failure in results if failure is not None]
    return "; ".join(failures) if failures else None


async def _run_part(
    runtime: Runtime,
    environment_id: str,
    plan: LifecyclePlan,
    command: HookCommand,
    name: str,
    argv: tuple[str, ...],
    log_path: Path,
) -> str | None:
    label = f"{command.hook}{f' {name}' if name else ''} ({command.origin})"
    shown = argv[2] if argv[:2] == ("/bin/sh", "-c") else " ".join(argv)
    with log_path.open("ab") as output:
        output.write(f"\n[devyard] running {label}: {shown}\n".encode())
    request = ExecRequest(argv=argv, env=dict(plan.env), cwd=plan.cwd, user=plan.user)
    try:
        process = await runtime.open_exec(environment_id, request)
    except ContainerNotRunning:
        raise
    except RunnerError as exc:
        with log_path.open("ab") as output:
            output.write(f"[devyard] {label} could not start: {exc}\n".encode())
        return f"could not start: {exc}"
    process.stdin.close()
    tail: list[bytes] = []

    async def copy(stream: asyncio.StreamReader) -> None:
        with log_path.open("ab", buffering=0) as output:
            while line := await stream.readline():
                output.write(line)
                tail.append(line)
                del tail[:-_TAIL_LINES]

    streams = [process.stdout] + ([process.stderr] if process.stderr is not None else [])
    await asyncio.gather(*(copy(stream) for stream in streams))
    exit_code = await process.wait()
    with log_path.open("ab") as output:
        output.write(f"[devyard] {label} exited with {exit_code}\n".encode())
    if exit_code == 0:
        return None
    last = b"".join(tail).decode(errors="replace").strip()
    return f"exit code {exit_code}" + (f": {last}" if last else "")


def _argv(command: str | Sequence[str]) -> tuple[str, ...]:
    if isinstance(command, str):
        return ("/bin/sh", "-c", command) if command.strip() else ()
    return tuple(command)


def _index(hook: str) -> int:
    return HOOKS.index(hook) if hook in HOOKS else len(HOOKS)


def _read_state(directory: Path, container: ContainerStatus) -> dict[str, Any]:
    """The hooks' state for this container and start: a new container starts from nothing, a new start keeps
    only the once-per-container hooks."""
    created = _timestamp(container.created_at)
    started = _timestamp(container.started_at)
    try:
        state = json.loads((directory / "lifecycle.json").read_text())
    except (FileNotFoundError, ValueError):
        state = {}
    if not isinstance(state, dict) or state.get("container") != created:
        return {"container": created, "start": started, "done": []}
    if state.get("start") != started:
        failed = state.get("failed")
        kept_failure = failed if failed and failed.get("hook") in CREATE_HOOKS else None
        done = [hook for hook in state.get("done", ()) if hook in CREATE_HOOKS]
        state = {"container": created, "start": started, "done": done}
        if kept_failure:
            state["failed"] = kept_failure
    return state


def _timestamp(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def _command_json(command: Command) -> Any:
    if isinstance(command, Mapping):
        return {name: _command_json(value) for name, value in command.items()}
    return command if isinstance(command, str) else list(command)


def _command_from_json(value: Any) -> Command:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return tuple(str(part) for part in value)
    return {str(name): (part if isinstance(part, str) else tuple(part)) for name, part in value.items()}


def _write_json(path: Path, document: Any) -> None:
    write_atomically(path, json.dumps(document).encode())
