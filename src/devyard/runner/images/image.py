"""What the runner knows of an image once it is on the host, and the interface the runtime gets images through.

The store implements ``ImageSource``; the linux runtime calls ``prepare`` when it creates an environment's
container and ``release`` when it deletes it. Tests may give the runtime another ``ImageSource`` (a directory
made by hand) behind the same interface.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

__all__ = ["IdRange", "Image", "ImageConfig", "ImageSource", "Prepared", "Progress", "ProgressCallback"]


@dataclass(frozen=True)
class IdRange:
    """The host uids and gids that uid/gid 0..size-1 inside every environment map to.

    Layers are unpacked with their owners shifted into this range, so that the shared lower layers look right
    inside the user namespace while root inside is an unprivileged id outside.
    """

    start: int = 1_000_000
    size: int = 65536

    def host_id(self, inside: int) -> int:
        """The host id of ``inside``; ids outside the range become the range's ``nobody`` (65534, or the last)."""
        if not 0 <= inside < self.size:
            inside = min(65534, self.size - 1)
        return self.start + inside


@dataclass(frozen=True)
class ImageConfig:
    """The parts of an OCI image configuration a container needs (``config`` in the image config blob)."""

    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    #: ``KEY=value`` strings, as in the image.
    env: tuple[str, ...] = ()
    working_dir: str = ""
    #: ``user``, ``uid``, ``user:group`` or ``uid:gid``; empty: root.
    user: str = ""
    stop_signal: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Image:
    """An image whose layers are unpacked on this host."""

    #: The reference it was asked for, normalized (``registry/repository:tag`` or ``...@sha256:...``).
    reference: str
    #: The digest of its (platform) manifest, ``sha256:...``.
    digest: str
    config: ImageConfig
    #: The unpacked layer directories, lowest first: overlayfs lower dirs (reversed in ``lowerdir=``).
    #: Read-only and shared; never write into them.
    layers: tuple[Path, ...]
    #: Bytes of the unpacked layers.
    size: int = 0


@dataclass(frozen=True)
class Prepared:
    """What ``ImageSource.prepare`` did: the image, and the seconds spent on each step (``pull``, ``unpack``),
    zero for a step that was not needed because the host already had it."""

    image: Image
    timings: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Progress:
    """How far a pull has come: bytes of blobs fetched and expected, and layers unpacked of all."""

    reference: str
    fetched: int
    total: int
    layers_done: int
    layers_total: int
    #: ``resolve``, ``fetch``, ``unpack`` or ``done``.
    step: str


ProgressCallback = Callable[[Progress], None]


class ImageSource(Protocol):
    """Where the runtime gets images from."""

    @property
    def id_range(self) -> IdRange:
        """The ids the layers' owners are shifted into; the runtime maps user namespaces to the same range."""
        ...

    async def prepare(
        self,
        reference: str,
        *,
        holder: str,
        progress: ProgressCallback | None = None,
        credentials: Mapping[str, tuple[str, str]] | None = None,
    ) -> Prepared:
        """Pull ``reference`` if the host lacks it, unpack its layers, and record ``holder`` (an environment id)
        as one of its users, so garbage collection keeps it. Idempotent for the same holder. Concurrent calls for
        the same image share one download. ``credentials``: registry host -> (username, password) for this
        pull. Raises ``errors.TemporaryError`` (network, registry 5xx, full disk) or ``errors.PermanentError``
        (no such image, refused credentials, corrupt blob after retries)."""
        ...

    async def release(self, holder: str) -> None:
        """Forget ``holder``'s use of whatever image it held; nothing if it held none."""
        ...
