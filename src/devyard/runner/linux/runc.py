"""The runc command line as asyncio calls, with devyard's own state root (``runc --root``).

Called by ``runtime.LinuxRuntime``. Every call but ``exec_argv`` (a command line, which the runtime starts with
``host_process.start_host_process``) runs the binary with ``asyncio.create_subprocess_exec`` and turns a
failure into an error that carries runc's stderr: ``ContainerNotFound`` when runc says the container does not
exist, ``TemporaryError`` otherwise (runc's failures are mostly the host's: a busy mount, a cgroup being
removed, a full disk); callers raise ``PermanentError`` where they know better.

Containers made by ``create`` are detached: runc forks the container's init, which calls setsid, and exits;
the init is reparented to the host's init (or a subreaper), so the runner may die and the container lives on.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import json
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from devyard.runner.errors import ContainerNotFound, TemporaryError

__all__ = ["ContainerInfo", "Runc", "RuncError", "read_state"]

_NOT_FOUND_MARKERS: Final = ("does not exist", "not exist", "container not found")


class RuncError(TemporaryError):
    """runc failed; the message has its arguments and stderr."""


@dataclass(frozen=True)
class ContainerInfo:
    """What ``runc state`` and ``runc list`` say of a container."""

    id: str
    #: ``creating``, ``created``, ``running``, ``paused`` or ``stopped``.
    status: str
    #: The host pid of the container's init; 0 once stopped.
    pid: int
    bundle: Path

    @classmethod
    def from_json(cls, item: Mapping[str, Any]) -> ContainerInfo:
        return cls(id=item["id"], status=item["status"], pid=int(item.get("pid") or 0), bundle=Path(item["bundle"]))


class Runc:
    """One runc binary over one state root."""

    def __init__(self, root: Path, *, binary: str = "runc") -> None:
        self.root = root
        self.binary = binary

    def _argv(self, *arguments: str) -> list[str]:
        return [self.binary, "--root", str(self.root), *arguments]

    async def _run(self, *arguments: str, stdin: int | None = asyncio.subprocess.DEVNULL) -> bytes:
        process = await asyncio.create_subprocess_exec(
            *self._argv(*arguments),
            stdin=stdin,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        stdout, stderr = await process.communicate()
        if process.returncode != 0:
            raise _error(arguments, process.returncode, stderr.decode(errors="replace"))
        return stdout

    async def create(self, container_id: str, bundle: Path, *, pid_file: Path, console_log: Path) -> None:
        """``runc create``: the container's init waits for ``start``. Its stdout and stderr (and runc's own
        messages, which runc writes to the same stderr) are appended to ``console_log``; stdin is /dev/null."""
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        # runc writes the pid file under a temporary name first, exclusively: one a killed create left behind
        # would fail every later create.
        for stale in (pid_file, pid_file.with_name(f".{pid_file.name}")):
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
        descriptor = os.open(console_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        offset = os.fstat(descriptor).st_size
        try:
            process = await asyncio.create_subprocess_exec(
                *self._argv("create", "--bundle", str(bundle), "--pid-file", str(pid_file), container_id),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=descriptor,
                stderr=descriptor,
            )
        finally:
            os.close(descriptor)
        await process.wait()
        if process.returncode != 0:
            with console_log.open("rb") as log:
                log.seek(offset)
                output = log.read(8192).decode(errors="replace")
            raise _error(("create", container_id), process.returncode, output)

    async def start(self, container_id: str) -> None:
        await self._run("start", container_id)

    async def state(self, container_id: str) -> ContainerInfo | None:
        """The container as runc knows it, or None if runc has no such container.

        Read from runc's own state file the way ``runc state`` decides (``read_state``): a runner asks this
        several times per start and per exec, and each ``runc state`` process costs 7-10 ms here. When the file
        is not what ``read_state`` understands, ``runc state`` answers."""
        try:
            return read_state(self.root, container_id)
        except _UnknownState:
            pass
        try:
            output = await self._run("state", container_id)
        except ContainerNotFound:
            return None
        return ContainerInfo.from_json(json.loads(output))

    async def kill(self, container_id: str, signal: int, *, all_processes: bool = False) -> None:
        arguments = ["kill", *(["--all"] if all_processes else []), container_id, str(signal)]
        await self._run(*arguments)

    async def delete(self, container_id: str, *, force: bool = False) -> None:
        """``runc delete`` (``--force``: kill a running container first); nothing if there is no such container."""
        with contextlib.suppress(ContainerNotFound):
            await self._run("delete", *(["--force"] if force else []), container_id)

    async def list(self) -> list[ContainerInfo]:
        if not self.root.exists():
            return []
        output = await self._run("list", "--format", "json")
        items = json.loads(output) or []
        return [ContainerInfo.from_json(item) for item in items]

    def incomplete(self) -> builtins.list[str]:
        """Containers whose ``runc create`` was killed before it wrote their state: runc's own commands say
        they do not exist, yet refuse a new container of the same id."""
        if not self.root.is_dir():
            return []
        return sorted(
            entry.name for entry in self.root.iterdir() if entry.is_dir() and not (entry / "state.json").exists()
        )

    def discard_incomplete(self, container_id: str) -> bool:
        """Remove what a killed ``runc create`` left of ``container_id`` in the state root; True if it did.
        Its init process, if any, is in the container's cgroup: the caller kills it there."""
        directory = self.root / container_id
        if directory.is_dir() and not (directory / "state.json").exists():
            shutil.rmtree(directory)
            return True
        return False

    def exec_argv(
        self,
        container_id: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        user: tuple[int, int] | None = None,
        additional_gids: Sequence[int] = (),
        tty: bool = False,
    ) -> builtins.list[str]:
        """The command line of ``runc exec``, for ``host_process.start_host_process`` to run: ``env`` is the
        process's (added to the container's), given as flags, not runc's own environment.

        runc relays its stdio to the process and forwards the signals it gets; it exits with the process's
        status, or 128 + N when signal N killed the process. With ``tty``, runc makes a terminal inside the
        container and proxies it to its own stdio, which should then be a raw terminal (the one inside does the
        echo and line editing); on SIGWINCH runc copies that terminal's size to the container's."""
        arguments = ["exec"]
        if tty:
            arguments.append("--tty")
        for key, value in (env or {}).items():
            arguments += ["--env", f"{key}={value}"]
        if cwd is not None:
            arguments += ["--cwd", cwd]
        if user is not None:
            arguments += ["--user", f"{user[0]}:{user[1]}"]
        for gid in additional_gids:
            arguments += ["--additional-gids", str(gid)]
        return self._argv(*arguments, container_id, *argv)


class _UnknownState(Exception):
    """runc's state file is not in the form ``read_state`` knows: ask runc."""


def read_state(root: Path, container_id: str) -> ContainerInfo | None:
    """What ``runc --root ROOT state ID`` would say, from ``ROOT/ID/state.json`` without running runc; None when
    there is no such container (no state file: never created, or a ``runc create`` still writing it).

    runc 1.x decides the status so (libcontainer's ``refreshState``): frozen by the cgroup freezer: ``paused``;
    the init process gone, a zombie, or another process now under its pid (its start time differs):
    ``stopped``; else ``created`` while the ``exec.fifo`` that ``runc start`` opens is there, ``running``
    after. The file is replaced by a rename, so it is read whole or not at all. Raises ``_UnknownState`` if it
    lacks what that needs."""
    directory = root / container_id
    try:
        document = json.loads((directory / "state.json").read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise _UnknownState(str(exc)) from exc
    try:
        pid = int(document["init_process_pid"])
        start_time = int(document["init_process_start"])
        labels = document["config"].get("labels") or []
        cgroup_paths = document.get("cgroup_paths") or {}
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise _UnknownState(f"state.json of {container_id}: {exc}") from exc
    bundle = next((label.removeprefix("bundle=") for label in labels if label.startswith("bundle=")), "")
    if _frozen(cgroup_paths):
        status = "paused"
    elif not _same_process(pid, start_time):
        status = "stopped"
    elif (directory / "exec.fifo").exists():
        status = "created"
    else:
        status = "running"
    return ContainerInfo(id=container_id, status=status, pid=0 if status == "stopped" else pid, bundle=Path(bundle))


def _same_process(pid: int, start_time: int) -> bool:
    """Whether ``pid`` is a live (not zombie, not dead) process that started at ``start_time`` (clock ticks
    after boot, field 22 of ``/proc/PID/stat``)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return False
    # The command name (field 2) is in parentheses and may hold spaces or parentheses: split after the last one.
    fields = stat[stat.rfind(b")") + 2 :].split()
    return fields[0] not in (b"Z", b"X", b"x") and int(fields[19]) == start_time


def _frozen(cgroup_paths: Mapping[str, str]) -> bool:
    """Whether the container's cgroup is frozen: the v1 freezer's ``freezer.state``, or v2's ``cgroup.freeze``."""
    with contextlib.suppress(OSError):
        if "freezer" in cgroup_paths:
            return Path(cgroup_paths["freezer"], "freezer.state").read_text().strip() == "FROZEN"
        if "" in cgroup_paths:
            return Path(cgroup_paths[""], "cgroup.freeze").read_text().strip() == "1"
    return False


def _error(arguments: Sequence[str], returncode: int | None, stderr: str) -> TemporaryError:
    message = f"runc {' '.join(arguments)} failed (exit {returncode}): {stderr.strip() or 'no output'}"
    if any(marker in stderr for marker in _NOT_FOUND_MARKERS):
        return ContainerNotFound(message)
    return RuncError(message)
