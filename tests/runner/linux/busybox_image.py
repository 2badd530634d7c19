"""A directory-based ``ImageSource`` for the linux runtime's tests: a busybox-static root as one lower layer.

Made by hand instead of pulled, so the runtime's tests need no registry and no image store: ``/usr/bin/busybox``
copied in with a symlink per applet, ``/etc/passwd`` and ``/etc/group`` with ``root`` and ``dev`` (uid 1000),
every file chowned into the ``IdRange`` as the image store would shift it. References name configurations
(``IMAGES``), all over the same layer. Holders are kept in memory: ``release`` of one another process made
does nothing, as ``release`` of an unknown holder must.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path

from devyard.runner.errors import PermanentError
from devyard.runner.images.image import IdRange, Image, ImageConfig, Prepared, ProgressCallback

__all__ = ["IMAGES", "BusyboxImages", "build_busybox_layer"]

_ENV = ("PATH=/usr/sbin:/usr/bin:/sbin:/bin", "IMAGE_VAR=from-image")

IMAGES: Mapping[str, ImageConfig] = {
    # A shell as its command: the runtime runs its keep-alive instead.
    "busybox": ImageConfig(cmd=("/bin/sh",), env=_ENV),
    # Runs as the dev user in its home.
    "busybox-dev": ImageConfig(cmd=("sh",), env=_ENV, user="dev", working_dir="/home/dev"),
    # Its own service that ignores SIGTERM: stop must kill it after the timeout.
    "busybox-stubborn": ImageConfig(cmd=("/bin/sh", "-c", "trap '' TERM; while :; do sleep 1; done"), env=_ENV),
}


def build_busybox_layer(directory: Path, id_range: IdRange) -> Path:
    """Make the layer at ``directory`` (which must not exist) and return it."""
    directory.mkdir(parents=True)
    for name in ("bin", "etc", "tmp", "root", "home/dev", "proc", "sys", "dev", "usr/bin", "usr/sbin", "sbin"):
        (directory / name).mkdir(parents=True, exist_ok=True)
    shutil.copy2("/usr/bin/busybox", directory / "bin" / "busybox")
    applets = subprocess.run(["/usr/bin/busybox", "--list"], check=True, capture_output=True, text=True).stdout
    for applet in applets.split():
        if applet != "busybox":
            (directory / "bin" / applet).symlink_to("busybox")
    (directory / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\ndev:x:1000:1000:dev:/home/dev:/bin/sh\n")
    (directory / "etc" / "group").write_text("root:x:0:\ndev:x:1000:\nusers:x:100:dev\n")
    root = id_range.host_id(0)
    for path in [directory, *directory.rglob("*")]:
        os.lchown(path, root, root)
    os.lchown(directory / "home" / "dev", id_range.host_id(1000), id_range.host_id(1000))
    os.chmod(directory / "tmp", 0o1777)
    os.chmod(directory, 0o755)
    return directory


class BusyboxImages:
    """``ImageSource`` over one hand-made layer."""

    def __init__(self, layer: Path, id_range: IdRange) -> None:
        self.layer = layer
        self._id_range = id_range
        self.holders: dict[str, str] = {}

    @property
    def id_range(self) -> IdRange:
        return self._id_range

    async def prepare(
        self,
        reference: str,
        *,
        holder: str,
        progress: ProgressCallback | None = None,
        credentials: Mapping[str, tuple[str, str]] | None = None,
    ) -> Prepared:
        try:
            config = IMAGES[reference]
        except KeyError:
            raise PermanentError(f"no image {reference!r} here") from None
        self.holders[holder] = reference
        image = Image(
            reference=reference, digest=f"sha256:{reference.encode().hex():0<64}", config=config, layers=(self.layer,)
        )
        return Prepared(image=image, timings={"pull": 0.0, "unpack": 0.0})

    async def release(self, holder: str) -> None:
        self.holders.pop(holder, None)
