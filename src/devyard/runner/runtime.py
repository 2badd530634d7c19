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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

__all__ = [
    "ContainerSpec",
    "ContainerState",
    "ContainerStatus",
    "ExecProcess",
    "ExecRequest",
    "ExecResult",
    "Runtime",
]


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
        )


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

    async def delete(self, environment_id: str) -> None:
        """Remove the container and its disk, stopping it first if it runs; nothing if it does not exist."""
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
