"""``FakeRuntime``: an in-memory runtime for tests, ``devyard up`` without containers, and the scale benchmark.

Selected with ``devyard runner --runtime fake``. It runs nothing: it keeps a record per container and moves
it between created, running and stopped as the ``Runtime`` protocol says, taking a configurable time per
operation (through the clock it is given) and failing when told to:

- ``fail_next(operation, times, permanent=...)`` fails the next calls of an operation;
- ``FakeRuntimeConfig.failure_rate`` fails any of ``failing_operations`` with that probability.

``exec`` is canned: it runs nothing and answers exit code 0 with the command line, shell-quoted, followed by a
newline, as its stdout (like ``echo``). Tests and demos may rely on exactly that.

``open_exec`` (what the runner's gateway calls for ``devyard env exec``) is not canned: it runs the command as a
host subprocess (``host_process``), as the runner's own user, in a scratch directory of the fake container (its
working directory; ``cwd`` relative to it, except that a path under a workspace mount's target is in
``workspace``), with a pseudo-terminal when ``tty``; the spec's ``remote_env`` and ``workdir`` apply, its
``remote_user`` does not (there is only the runner's user). Those processes belong to the fake container: ``stop``
and ``delete`` kill them (their process groups), and so does ``close``, so that no test or ``devyard down`` leaves
programs of a fake environment running on the host. It is a test double, and
``devyard up`` uses it only when not root, so it grants nothing the user does not already have; a ``user`` other
than the runner's own is refused. The scratch directories live beside the state file (else in a temporary
directory, removed by ``close``) and go with their container's ``delete``.

With a ``state_file``, every change is written to that JSON file (atomically) and read back on start, so a
restarted runner finds, and adopts, the containers of the previous process, as it would on a real host.
Containers recorded as running stay running across that restart, as runc containers outlive their runner.
The file is rewritten whole on each change: fine for a desktop's handful of environments; the benchmark
runs without one.

Ports: the processes ``open_exec`` started are the fake container's, so ``listening_ports`` answers the TCP ports
that they (and what they started in their sessions) listen on: the listening sockets of the runner's own network
namespace (``port_detection.listening_ports_of``) among their sockets' inodes; ``connect`` reaches one of those
ports on the host's loopback, and refuses every other port and host, so that a port proxy in front of a fake
environment never reaches the runner host's services.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import dataclasses
import json
import os
import random
import shlex
import shutil
import signal
import socket
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from devyard.runner import port_detection
from devyard.runner.atomic_file import write_atomically
from devyard.runner.clock import Clock, SystemClock
from devyard.runner.errors import ContainerNotFound, ContainerNotRunning, PermanentError, TemporaryError
from devyard.runner.host_process import HostProcess, start_host_process
from devyard.runner.runtime import (
    ContainerSpec,
    ContainerState,
    ContainerStatus,
    ExecRequest,
    ExecResult,
    ListeningPort,
    MountKind,
)

__all__ = ["OPERATIONS", "FakeRuntime", "FakeRuntimeConfig"]

#: The operations that take time and can fail; ``pull`` happens inside ``create``, once per image.
OPERATIONS: Final = ("pull", "create", "start", "stop", "delete", "exec", "inspect", "list")
_FORMAT_VERSION: Final = 1


@dataclass(frozen=True)
class FakeRuntimeConfig:
    #: Seconds each operation takes, by name (see ``OPERATIONS``); absent ones take no time.
    delays: Mapping[str, float] = field(default_factory=dict)
    #: The probability that a call of one of ``failing_operations`` fails.
    failure_rate: float = 0.0
    #: Whether those random failures are permanent (else temporary).
    failure_permanent: bool = False
    failing_operations: frozenset[str] = frozenset({"pull", "create", "start", "stop", "delete"})
    seed: int | None = None

    def __post_init__(self) -> None:
        unknown = (set(self.delays) | set(self.failing_operations)) - set(OPERATIONS)
        if unknown:
            raise ValueError(f"unknown fake runtime operations: {sorted(unknown)}")
        if not 0 <= self.failure_rate <= 1:
            raise ValueError("failure_rate must be between 0 and 1")
        if any(delay < 0 for delay in self.delays.values()):
            raise ValueError("delays must not be negative")


@dataclass
class _Injected:
    remaining: int
    permanent: bool
    message: str


class FakeRuntime:
    name = "fake"

    def __init__(
        self,
        config: FakeRuntimeConfig | None = None,
        *,
        clock: Clock | None = None,
        state_file: Path | None = None,
    ) -> None:
        self.config = config or FakeRuntimeConfig()
        self._clock = clock or SystemClock()
        self._state_file = state_file
        self._rng = random.Random(self.config.seed)
        self._delays = dict(self.config.delays)
        self._injected: dict[str, list[_Injected]] = {}
        self._containers: dict[str, ContainerStatus] = {}
        self._images: set[str] = set()
        #: Where the containers' scratch directories go; made on the first ``open_exec``.
        self._scratch_root = state_file.parent / "fake-containers" if state_file is not None else None
        self._scratch_is_temporary = False
        #: Environment id -> when its create began, while it runs.
        self._creating: dict[str, float] = {}
        #: The processes ``open_exec`` started, by environment, killed with their container.
        self._processes: dict[str, list[HostProcess]] = {}
        #: Image reference -> its labels, as ``image_labels`` answers (none for images not here).
        self.labels_of_images: dict[str, dict[str, str]] = {}
        #: How many times each operation was called; for benchmarks, not for assertions on call order.
        self.calls: dict[str, int] = dict.fromkeys(OPERATIONS, 0)
        if state_file is not None and state_file.exists():
            self._load(state_file)

    # Knobs for tests and demos.

    def fail_next(self, operation: str, times: int = 1, *, permanent: bool = False, message: str | None = None) -> None:
        """Make the next ``times`` calls of ``operation`` fail."""
        if operation not in OPERATIONS:
            raise ValueError(f"unknown operation {operation!r}")
        if times < 1:
            raise ValueError("times must be at least 1")
        text = message or f"injected {'permanent' if permanent else 'temporary'} failure of {operation}"
        self._injected.setdefault(operation, []).append(_Injected(times, permanent, text))

    def set_delay(self, operation: str, seconds: float) -> None:
        if operation not in OPERATIONS:
            raise ValueError(f"unknown operation {operation!r}")
        self._delays[operation] = seconds

    def simulate_exit(self, environment_id: str, exit_code: int = 137) -> None:
        """The container's process exits by itself (a crash, an OOM kill), as seen from outside."""
        current = self._get(environment_id)
        if current.state is ContainerState.RUNNING:
            self._put(
                dataclasses.replace(current, state=ContainerState.STOPPED, finished_at=_now(), exit_code=exit_code)
            )

    # The Runtime protocol.

    async def create(self, spec: ContainerSpec) -> ContainerStatus:
        existing = self._containers.get(spec.environment_id)
        if existing is not None:
            return existing
        timings: dict[str, float] = {}
        self._creating[spec.environment_id] = self._clock.now()
        try:
            if spec.image not in self._images:
                timings["pull"] = await self._operation("pull")
                self._images.add(spec.image)
            timings["create"] = await self._operation("create")
        finally:
            self._creating.pop(spec.environment_id, None)
        existing = self._containers.get(spec.environment_id)
        if existing is not None:  # made while we waited
            return existing
        status = ContainerStatus(
            environment_id=spec.environment_id,
            state=ContainerState.CREATED,
            spec=spec,
            created_at=_now(),
            timings=timings,
        )
        self._put(status)
        return status

    async def start(self, environment_id: str) -> ContainerStatus:
        await self._operation("start")
        current = self._get(environment_id)
        if current.state is ContainerState.RUNNING:
            return current
        return self._put(
            dataclasses.replace(
                current, state=ContainerState.RUNNING, started_at=_now(), finished_at=None, exit_code=None
            )
        )

    async def stop(self, environment_id: str, *, timeout: float = 10.0) -> ContainerStatus:
        await self._operation("stop")
        current = self._get(environment_id)
        if current.state is not ContainerState.RUNNING:
            return current
        self._kill_processes(environment_id)
        return self._put(dataclasses.replace(current, state=ContainerState.STOPPED, finished_at=_now(), exit_code=0))

    async def delete(self, environment_id: str, *, keep_workspace: bool = False) -> None:
        await self._operation("delete")
        self._kill_processes(environment_id)
        if self._containers.pop(environment_id, None) is not None:
            self._save()
        if self._scratch_root is None:
            return
        scratch = self._scratch_root / environment_id
        if not keep_workspace:
            shutil.rmtree(scratch, ignore_errors=True)
            return
        for entry in scratch.iterdir() if scratch.is_dir() else ():
            if entry.name in ("workspace", "volumes"):
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink()

    async def exec(
        self,
        environment_id: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> ExecResult:
        await self._operation("exec")
        current = self._get(environment_id)
        if current.state is not ContainerState.RUNNING:
            raise ContainerNotRunning(f"container of {environment_id} is {current.state}, not running")
        return ExecResult(exit_code=0, stdout=(shlex.join(argv) + "\n").encode())

    async def image_labels(
        self, environment_id: str, image: str, *, credentials: Mapping[str, tuple[str, str]] | None = None
    ) -> Mapping[str, str]:
        if image not in self._images:
            await self._operation("pull")
            self._images.add(image)
        return dict(self.labels_of_images.get(image, {}))

    def workspace(self, environment_id: str) -> Path:
        directory = self._scratch(environment_id) / "workspace"
        directory.mkdir(exist_ok=True)
        return directory

    def volume(self, environment_id: str, name: str) -> Path:
        directory = self._scratch(environment_id) / "volumes" / name
        directory.mkdir(parents=True, exist_ok=True)
        return directory

    def progress(self, environment_id: str) -> str | None:
        started = self._creating.get(environment_id)
        if started is None:
            return None
        return f"creating the container ({self._clock.now() - started:.0f} s)"

    async def open_exec(self, environment_id: str, request: ExecRequest) -> HostProcess:
        await self._operation("exec")
        current = self._get(environment_id)
        if current.state is not ContainerState.RUNNING:
            raise ContainerNotRunning(f"container of {environment_id} is {current.state}, not running")
        if request.user is not None and request.user not in _own_user_names():
            raise PermanentError(
                f"the fake runtime runs commands as the runner's own user; it cannot run them as {request.user!r}"
            )
        scratch = self._scratch(environment_id)
        wanted = request.cwd or current.spec.workdir
        cwd = self._host_path(environment_id, current.spec, wanted) if wanted else scratch
        if not cwd.is_dir():
            raise PermanentError(f"the working directory {wanted!r} does not exist in {environment_id}")
        env = {
            "PATH": os.environ.get("PATH", os.defpath),
            "HOME": str(scratch),
            **current.spec.env,
            **current.spec.remote_env,
            **request.env,
        }
        if request.tty:
            env.setdefault("TERM", "xterm-256color")
        process = await start_host_process(request.argv, env=env, cwd=cwd, tty=request.tty, size=request.size)
        running = [p for p in self._processes.get(environment_id, []) if not p.exited]
        self._processes[environment_id] = [*running, process]
        return process

    async def listening_ports(self, environment_id: str) -> builtins.list[ListeningPort]:
        current = self._containers.get(environment_id)
        if current is None or current.state is not ContainerState.RUNNING:
            return []
        inodes = _socket_inodes(self._sessions(environment_id))
        if not inodes:
            return []
        try:
            return await port_detection.listening_ports_of(None, inodes=inodes)
        except OSError:
            return []

    async def connect(self, environment_id: str, host: str, port: int) -> socket.socket:
        current = self._get(environment_id)
        if current.state is not ContainerState.RUNNING:
            raise ContainerNotRunning(f"container of {environment_id} is {current.state}, not running")
        if host not in ("localhost", "127.0.0.1", "::1", ""):
            raise OSError(f"the fake runtime connects to its environments' own ports on the loopback only, not {host}")
        # Only what the environment's own processes listen on: never another program of the runner's host.
        ours = [found for found in await self.listening_ports(environment_id) if found.port == port]
        if not ours:
            raise ConnectionRefusedError(f"nothing listens on port {port} in {environment_id}")
        ipv6 = all(found.ipv6 for found in ours)
        sock = socket.socket(socket.AF_INET6 if ipv6 else socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, ("::1" if ipv6 else "127.0.0.1", port))
        except BaseException:
            sock.close()
            raise
        return sock

    def _sessions(self, environment_id: str) -> set[int]:
        """The sessions of the environment's processes: each ``open_exec`` starts one (its pid), and what it starts
        stays in it unless it makes its own."""
        return {process.pid for process in self._processes.get(environment_id, []) if not process.exited}

    async def inspect(self, environment_id: str) -> ContainerStatus | None:
        await self._operation("inspect")
        return self._containers.get(environment_id)

    async def list(self) -> list[ContainerStatus]:
        await self._operation("list")
        return list(self._containers.values())

    async def repair(self) -> builtins.list[str]:
        return []  # every change is one atomic write of the state file: nothing is ever half-done

    async def close(self) -> None:
        for environment_id in list(self._processes):
            self._kill_processes(environment_id)
        self._save()
        if self._scratch_is_temporary and self._scratch_root is not None:
            shutil.rmtree(self._scratch_root, ignore_errors=True)
            self._scratch_root, self._scratch_is_temporary = None, False

    # Inside.

    async def _operation(self, name: str) -> float:
        """Take the operation's time, then fail if told to; return the seconds taken."""
        self.calls[name] += 1
        started = self._clock.now()
        delay = self._delays.get(name, 0.0)
        if delay > 0:
            await self._clock.sleep(delay)
        self._maybe_fail(name)
        return self._clock.now() - started

    def _maybe_fail(self, name: str) -> None:
        queue = self._injected.get(name)
        if queue:
            injected = queue[0]
            injected.remaining -= 1
            if injected.remaining <= 0:
                queue.pop(0)
            raise (PermanentError if injected.permanent else TemporaryError)(injected.message)
        rate = self.config.failure_rate
        if rate > 0 and name in self.config.failing_operations and self._rng.random() < rate:
            kind = "permanent" if self.config.failure_permanent else "temporary"
            message = f"random {kind} failure of {name}"
            raise (PermanentError if self.config.failure_permanent else TemporaryError)(message)

    def _kill_processes(self, environment_id: str) -> None:
        for process in self._processes.pop(environment_id, []):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)

    def _host_path(self, environment_id: str, spec: ContainerSpec, path: str) -> Path:
        """Where a path inside the fake container is: in the workspace under a workspace mount's target, else
        in the scratch directory."""
        for mount in spec.mounts:
            target = mount.target.rstrip("/")
            if mount.kind is MountKind.WORKSPACE and (path == target or path.startswith(target + "/")):
                return self.workspace(environment_id) / path[len(target) :].lstrip("/")
        return self._scratch(environment_id) / path.lstrip("/")

    def _scratch(self, environment_id: str) -> Path:
        if self._scratch_root is None:
            self._scratch_root = Path(tempfile.mkdtemp(prefix="devyard-fake-containers-"))
            self._scratch_is_temporary = True
        directory = self._scratch_root / environment_id
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        return directory

    def _get(self, environment_id: str) -> ContainerStatus:
        try:
            return self._containers[environment_id]
        except KeyError:
            raise ContainerNotFound(f"no container for {environment_id}") from None

    def _put(self, status: ContainerStatus) -> ContainerStatus:
        self._containers[status.environment_id] = status
        self._save()
        return status

    def _save(self) -> None:
        if self._state_file is None:
            return
        document = {
            "version": _FORMAT_VERSION,
            "images": sorted(self._images),
            "containers": [_encode(status) for status in self._containers.values()],
        }
        write_atomically(self._state_file, json.dumps(document).encode())

    def _load(self, path: Path) -> None:
        try:
            document = json.loads(path.read_text())
            if document.get("version") != _FORMAT_VERSION:
                raise ValueError(f"unknown format version {document.get('version')!r}")
            self._images = set(document["images"])
            for item in document["containers"]:
                status = _decode(item)
                self._containers[status.environment_id] = status
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise PermanentError(f"cannot read the fake runtime's state from {path}: {exc}") from exc


def _socket_inodes(sessions: set[int]) -> set[int]:
    """The inodes of the sockets that processes of ``sessions`` hold open."""
    inodes: set[int] = set()
    if not sessions:
        return inodes
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as file:
                fields = file.read().rpartition(b")")[2].split()
            if int(fields[3]) not in sessions:
                continue
            for descriptor in os.listdir(f"/proc/{entry}/fd"):
                target = os.readlink(f"/proc/{entry}/fd/{descriptor}")
                if target.startswith("socket:["):
                    inodes.add(int(target[8:-1]))
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile, or not ours to look at
    return inodes


def _own_user_names() -> set[str]:
    """What names the runner's own user: its uid, ``uid:gid``, and its login name where there is one."""
    uid, gid = os.getuid(), os.getgid()
    names = {str(uid), f"{uid}:{gid}"}
    try:
        import pwd

        names.add(pwd.getpwuid(uid).pw_name)
    except (ImportError, KeyError):
        pass
    return names


def _now() -> datetime:
    return datetime.now(UTC)


def _encode(status: ContainerStatus) -> dict[str, Any]:
    return {
        "environment_id": status.environment_id,
        "state": status.state.value,
        "spec": status.spec.to_json(),
        "created_at": status.created_at.isoformat(),
        "started_at": status.started_at.isoformat() if status.started_at else None,
        "finished_at": status.finished_at.isoformat() if status.finished_at else None,
        "exit_code": status.exit_code,
        "timings": dict(status.timings),
    }


def _decode(item: dict[str, Any]) -> ContainerStatus:
    def timestamp(value: str | None) -> datetime | None:
        return datetime.fromisoformat(value) if value else None

    created_at = timestamp(item["created_at"])
    if created_at is None:
        raise ValueError("a container without created_at")
    return ContainerStatus(
        environment_id=item["environment_id"],
        state=ContainerState(item["state"]),
        spec=ContainerSpec.from_json(item["spec"]),
        created_at=created_at,
        started_at=timestamp(item["started_at"]),
        finished_at=timestamp(item["finished_at"]),
        exit_code=item["exit_code"],
        timings=dict(item["timings"]),
    )
