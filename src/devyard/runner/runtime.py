"""The runtime interface: what a runner needs from whatever runs its environments' containers.

The environment reconciler calls it; ``fake_runtime.FakeRuntime`` implements it in memory, and the linux
(runc) and docker runtimes will implement it later. One container per environment, named by the
environment's id.

Contract for implementations:
- Every operation is idempotent where that makes sense: ``create`` of an existing container returns it as it
  is, ``start`` of a running one and ``stop`` of a stopped one do nothing, ``delete`` of a missing one does
  nothing. The reconciler relies on this to repeat a step after a crash.
- ``stop`` keeps the container's disk (its upper layer and workspace); only ``delete`` removes it.
- Failures are ``errors.TemporaryError`` (may pass by itself) or ``errors.PermanentError`` (will not); a
  missing container is ``errors.ContainerNotFound``.
- Containers outlive the runner process: after a restart, ``list`` shows what the previous process left, and
  the runner adopts it.
"""

from __future__ import annotations

import asyncio
import builtins
import enum
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

__all__ = [
    "ContainerSpec",
    "ContainerState",
    "ContainerStatus",
    "ExecProcess",
    "ExecRequest",
    "ExecResult",
    "ListeningPort",
    "Mount",
    "MountKind",
    "Runtime",
]


class MountKind(enum.StrEnum):
    #: The environment's workspace (``Runtime.workspace``), where its content lives; part of its disk.
    WORKSPACE = "workspace"
    #: A named directory kept with the environment's disk, across stop and start, removed with it.
    VOLUME = "volume"
    #: Memory, empty at every start.
    TMPFS = "tmpfs"


@dataclass(frozen=True)
class Mount:
    """A mount a container gets besides its image's root. There are no host paths here on purpose: what an
    environment sees of the host is only what its runtime owns for it."""

    kind: MountKind
    #: The absolute path inside the container.
    target: str
    #: A volume's name; unused for the other kinds.
    source: str = ""
    read_only: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind.value, "target": self.target, "source": self.source, "read_only": self.read_only}

    @classmethod
    def from_json(cls, document: Mapping[str, Any]) -> Mount:
        return cls(
            kind=MountKind(document["kind"]),
            target=str(document["target"]),
            source=str(document["source"]),
            read_only=bool(document["read_only"]),
        )


@dataclass(frozen=True)
class ContainerSpec:
    """What to run for one environment."""

    environment_id: str
    image: str
    env: Mapping[str, str] = field(default_factory=dict)
    #: CPUs (fractions allowed); None: no limit.
    cpu: float | None = None
    memory_mib: int | None = None
    disk_gib: int | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    #: The environment's ``metadata.generation`` this container was made for.
    generation: int = 0
    #: Registry host -> (username, password), from the environment's registry-credential secrets. Used to pull
    #: the image; never written to disk, logged or compared.
    registry_credentials: Mapping[str, tuple[str, str]] = field(default_factory=dict, repr=False, compare=False)
    mounts: tuple[Mount, ...] = ()
    #: The user PID 1 runs as (``user``, ``uid``, ``user:group``); None: the image's.
    user: str | None = None
    #: Run the keep-alive process as PID 1 instead of the image's command (devcontainer.json's
    #: ``overrideCommand``).
    override_command: bool = False
    #: Capabilities besides the default set (``SYS_PTRACE``); within the user namespace, like the rest.
    capabilities: tuple[str, ...] = ()
    #: Every capability (within the user namespace: root inside is still nobody outside).
    privileged: bool = False
    #: What ``open_exec`` uses when the request does not say: the user (devcontainer.json's ``remoteUser``),
    #: extra environment variables (``remoteEnv``) and the working directory (``workspaceFolder``).
    remote_user: str | None = None
    remote_env: Mapping[str, str] = field(default_factory=dict)
    workdir: str | None = None
    #: The user (as in ``user``) the workspace's files are given to once, when the container is made; None: the
    #: remote user, else the user of PID 1.
    workspace_owner: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The spec as a runtime keeps it on disk: everything but the credentials."""
        return {
            "environment_id": self.environment_id,
            "image": self.image,
            "env": dict(self.env),
            "cpu": self.cpu,
            "memory_mib": self.memory_mib,
            "disk_gib": self.disk_gib,
            "labels": dict(self.labels),
            "generation": self.generation,
            "mounts": [mount.to_json() for mount in self.mounts],
            "user": self.user,
            "override_command": self.override_command,
            "capabilities": list(self.capabilities),
            "privileged": self.privileged,
            "remote_user": self.remote_user,
            "remote_env": dict(self.remote_env),
            "workdir": self.workdir,
            "workspace_owner": self.workspace_owner,
        }

    @classmethod
    def from_json(cls, document: Mapping[str, Any]) -> ContainerSpec:
        """The spec ``to_json`` wrote; raises ``KeyError``, ``TypeError`` or ``ValueError`` on another document."""
        return cls(
            environment_id=str(document["environment_id"]),
            image=str(document["image"]),
            env={str(k): str(v) for k, v in document["env"].items()},
            cpu=None if document["cpu"] is None else float(document["cpu"]),
            memory_mib=None if document["memory_mib"] is None else int(document["memory_mib"]),
            disk_gib=None if document["disk_gib"] is None else int(document["disk_gib"]),
            labels={str(k): str(v) for k, v in document["labels"].items()},
            generation=int(document["generation"]),
            # Absent from what runners before mounts wrote.
            mounts=tuple(Mount.from_json(mount) for mount in document.get("mounts", ())),
            user=_optional_str(document.get("user")),
            override_command=bool(document.get("override_command", False)),
            capabilities=tuple(str(c) for c in document.get("capabilities", ())),
            privileged=bool(document.get("privileged", False)),
            remote_user=_optional_str(document.get("remote_user")),
            remote_env={str(k): str(v) for k, v in document.get("remote_env", {}).items()},
            workdir=_optional_str(document.get("workdir")),
            workspace_owner=_optional_str(document.get("workspace_owner")),
        )


def _optional_str(value: Any) -> str | None:
    return None if value is None else str(value)


class ContainerState(enum.StrEnum):
    CREATED = "created"
    RUNNING = "running"
    #: It ran and exited, or was stopped; its disk is kept.
    STOPPED = "stopped"


@dataclass(frozen=True)
class ContainerStatus:
    """What the runtime observes of one container; a container that does not exist has no status."""

    environment_id: str
    state: ContainerState
    spec: ContainerSpec
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    exit_code: int | None = None
    #: Seconds the runtime spent making this container, by step (such as ``pull``, ``create``).
    timings: Mapping[str, float] = field(default_factory=dict)

    @property
    def running(self) -> bool:
        return self.state is ContainerState.RUNNING


@dataclass(frozen=True)
class ExecResult:
    exit_code: int
    stdout: bytes = b""
    stderr: bytes = b""


@dataclass(frozen=True)
class ExecRequest:
    """A process to start inside a running container, with its streams attached (``Runtime.open_exec``)."""

    argv: Sequence[str]
    #: Added to (and overriding) the container's environment variables.
    env: Mapping[str, str] = field(default_factory=dict)
    #: Give the process a terminal: stdout and stderr become one stream, and ``resize`` works.
    tty: bool = False
    #: The terminal's size, ``(rows, columns)``, when ``tty``.
    size: tuple[int, int] | None = None
    #: The working directory; None: the container's.
    cwd: str | None = None
    #: ``user``, ``uid`` or ``uid:gid`` inside; None: the container's user.
    user: str | None = None


@dataclass(frozen=True, order=True)
class ListeningPort:
    """A TCP port something inside an environment listens on (``Runtime.listening_ports``)."""

    port: int
    #: The address it is bound to inside: ``0.0.0.0``, ``::``, ``127.0.0.1``...
    address: str
    ipv6: bool = False


class ExecProcess(Protocol):
    """A process running inside a container, as ``Runtime.open_exec`` started it.

    The caller writes ``stdin`` (closing it sends end of file), reads ``stdout`` and ``stderr`` until end of
    file, and ``wait``s for the exit code. With a TTY, ``stderr`` is None: everything comes on ``stdout``.
    """

    stdin: asyncio.StreamWriter
    stdout: asyncio.StreamReader
    stderr: asyncio.StreamReader | None

    async def resize(self, rows: int, columns: int) -> None:
        """Set the terminal's size; nothing without a TTY."""
        ...

    async def signal(self, number: int) -> None:
        """Send signal ``number`` to the process; nothing if it has exited."""
        ...

    async def wait(self) -> int:
        """The exit code once the process exits: its status, or 128 + N when signal N killed it."""
        ...


class Runtime(Protocol):
    """Runs the containers of one runner's environments."""

    #: Reported in the runner's status: ``fake``, ``linux``, ``docker``.
    name: str

    async def create(self, spec: ContainerSpec) -> ContainerStatus:
        """Make the container (pulling its image as needed), not started; return it if it exists."""
        ...

    async def start(self, environment_id: str) -> ContainerStatus: ...

    async def stop(self, environment_id: str, *, timeout: float = 10.0) -> ContainerStatus:
        """Stop the container, killing it after ``timeout`` seconds; its disk is kept."""
        ...

    async def delete(self, environment_id: str, *, keep_workspace: bool = False) -> None:
        """Remove the container and its disk, stopping it first if it runs; nothing if it does not exist.
        ``keep_workspace``: all but the workspace and the volumes (a rebuild makes the container again around
        them)."""
        ...

    async def exec(
        self,
        environment_id: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> ExecResult:
        """Run ``argv`` inside the running container and wait for it."""
        ...

    async def open_exec(self, environment_id: str, request: ExecRequest) -> ExecProcess:
        """Start ``request`` inside the running container and return it with its streams; the caller waits.
        Raises ``errors.ContainerNotRunning`` when the container is not running."""
        ...

    async def connect(self, environment_id: str, host: str, port: int) -> socket.socket:
        """A non-blocking TCP socket connected to ``host:port`` as seen from inside the running container
        (``localhost`` is its loopback), for the gateways to relay. Raises ``ContainerNotRunning`` when it is not
        running, ``OSError`` (``ConnectionRefusedError`` when nothing listens) when the connection fails."""
        ...

    async def listening_ports(self, environment_id: str) -> builtins.list[ListeningPort]:
        """The TCP ports something listens on inside the running container, sorted; empty when it is not
        running."""
        ...

    async def image_labels(
        self, environment_id: str, image: str, *, credentials: Mapping[str, tuple[str, str]] | None = None
    ) -> Mapping[str, str]:
        """The labels of ``image`` (its ``devcontainer.metadata`` among them), pulling it now if this host does not
        have it, held for the environment as ``create`` would; ``create`` then finds it here."""
        ...

    def workspace(self, environment_id: str) -> Path:
        """The host directory of the environment's workspace (made if missing, kept across stop and start,
        removed by ``delete``), where the runner puts its content before ``create``; a ``Mount`` of kind
        ``workspace`` shows it inside."""
        ...

    def volume(self, environment_id: str, name: str) -> Path:
        """The host directory of the environment's volume ``name`` (made if missing, kept across stop and start,
        removed by ``delete``), for the runner to fill before ``create``; a ``Mount`` of kind ``volume`` with that
        source shows it inside."""
        ...

    def progress(self, environment_id: str) -> str | None:
        """A line on how far a slow ``create`` of the container has come (``pulling busybox: 3.1 of 5.0 MB``),
        or None; the reconciler reports it in the environment's status message while it waits."""
        ...

    async def inspect(self, environment_id: str) -> ContainerStatus | None:
        """The container's status, or None if there is none."""
        ...

    async def list(self) -> list[ContainerStatus]:
        """Every container this runtime holds, including those a previous runner process made."""
        ...

    async def repair(self) -> builtins.list[str]:
        """Finish or undo what a runner killed in the middle of an operation left on the host (a half-made
        container, a mount without one); return a line for each thing done. The agent calls it on start."""
        ...

    async def close(self) -> None:
        """Release what the runtime holds open; containers keep running."""
        ...
