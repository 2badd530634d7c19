"""The images the benchmark starts and pulls, from the test suite's builders (``support.images``).

- busybox: ``support.images.busybox_layout``, the image every contender starts; ``busybox_rootfs`` unpacks it
  with umoci into the plain directory that runc's bundle uses as its root.
- debian: the test suite's Debian root (mmdebstrap minbase with bash, git and sudo, about 150 MB unpacked,
  cached by ``support.images.debian_rootfs``), as one gzip layer (cached beside it), for the cold pull: a
  registry serves compressed layers, so the pull includes decompressing, as it would in use.

Called by ``bench.start.__main__``.
"""

from __future__ import annotations

import gzip
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from bench.start import commands
from support import images

__all__ = ["Layout", "busybox", "busybox_rootfs", "debian"]

_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True)
class Layout:
    """An OCI image layout holding one image, tagged ``latest``."""

    path: Path
    #: The bytes of its layers as stored (compressed or not).
    size: int

    @property
    def reference(self) -> str:
        """The layout as skopeo and umoci name it."""
        return f"oci:{self.path}:latest"


def _layers_size(layout: Path) -> int:
    index = json.loads((layout / "index.json").read_text())
    digest = index["manifests"][0]["digest"].removeprefix("sha256:")
    manifest = json.loads((layout / "blobs" / "sha256" / digest).read_text())
    return sum(int(layer["size"]) for layer in manifest["layers"])


def busybox(path: Path) -> Layout:
    return Layout(images.busybox_layout(path), _layers_size(path))


def busybox_rootfs(layout: Layout, bundle: Path) -> Path:
    """The image unpacked (by ``umoci unpack``) into ``bundle/rootfs``; returns that directory."""
    commands.run(["umoci", "unpack", "--image", f"{layout.path}:latest", bundle], timeout=60)
    return bundle / "rootfs"


def debian(path: Path) -> Layout:
    """The Debian image as a layout with one gzip layer; building it the first time takes minutes."""
    tarball = images.debian_rootfs()
    compressed = tarball.with_name(tarball.name + ".gz")
    if not compressed.exists():
        partial = compressed.with_name(compressed.name + ".partial")
        with tarball.open("rb") as source, gzip.open(partial, "wb", compresslevel=6) as target:
            shutil.copyfileobj(source, target, 1 << 20)
        partial.rename(compressed)
    images.write_layout(path, [compressed.read_bytes()], {"Cmd": ["/bin/bash"], "Env": [_PATH]})
    return Layout(path, _layers_size(path))
