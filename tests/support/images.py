"""Test images built as OCI image layouts, without any registry, and pushed to a test registry.

- ``busybox_layout(path)``: the static busybox as ``/bin/busybox`` with its applets as symlinks, ``/etc/passwd``
  and ``group`` (root and ``dev``, uid 1000), ``/tmp``; config ``Cmd ["sh"]`` and a ``PATH``.
- ``whiteout_layout(path)``: three layers: files; one deleted by a whiteout; a directory made opaque.
- ``multi_platform_layout(path)``: an image index of a linux/amd64 and a linux/arm64 image; each config has the
  label ``platform`` saying which it is.
- ``debian_layout(path, packages)``: a Debian bookworm root from mmdebstrap, as one layer; the tarball is cached
  under ``DEVYARD_TEST_CACHE`` (default ``/var/cache/devyard-tests``) keyed by its inputs.
- ``write_layout(path, layers, config)``: any image from layer tars (``tar_layer`` builds one from entries).
- ``push(layout, registry, name)``: push with devyard's own registry client; returns the reference.

Used by the image store's tests, the linux runtime's and the benchmark (through the ``busybox_image`` fixture).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import gzip
import hashlib
import io
import json
import os
import platform
import shutil
import subprocess
import tarfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from devyard.runner.images.reference import parse_reference
from devyard.runner.images.registry import Credentials, RegistryClient, host_platform

__all__ = [
    "Entry",
    "busybox_layout",
    "debian_layout",
    "debian_rootfs",
    "multi_platform_layout",
    "push",
    "tar_layer",
    "whiteout_layout",
    "write_layout",
]

OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_MTIME = 1_700_000_000


@dataclass(frozen=True)
class Entry:
    """One tar entry: ``kind`` is ``file``, ``dir``, ``symlink``, ``hardlink``, ``char`` or ``fifo``."""

    name: str
    kind: str = "file"
    data: bytes = b""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    #: The target of a symlink or hard link.
    target: str = ""
    device: tuple[int, int] = (0, 0)
    xattrs: dict[str, str] = field(default_factory=dict)


_KINDS = {
    "file": tarfile.REGTYPE,
    "dir": tarfile.DIRTYPE,
    "symlink": tarfile.SYMTYPE,
    "hardlink": tarfile.LNKTYPE,
    "char": tarfile.CHRTYPE,
    "fifo": tarfile.FIFOTYPE,
}


def tar_layer(entries: Iterable[Entry], *, compress: bool = True) -> bytes:
    """A layer tar (gzip by default) holding ``entries`` in order, with a fixed mtime."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for entry in entries:
            info = tarfile.TarInfo(entry.name)
            info.type = _KINDS[entry.kind]
            info.mode = entry.mode
            info.uid, info.gid = entry.uid, entry.gid
            info.mtime = _MTIME
            info.linkname = entry.target
            info.devmajor, info.devminor = entry.device
            if entry.xattrs:
                info.pax_headers = {f"SCHILY.xattr.{key}": value for key, value in entry.xattrs.items()}
            if entry.kind == "file":
                info.size = len(entry.data)
                archive.addfile(info, io.BytesIO(entry.data))
            else:
                archive.addfile(info)
    data = buffer.getvalue()
    return gzip.compress(data, compresslevel=1, mtime=0) if compress else data


def _write_blob(layout: Path, data: bytes) -> dict[str, Any]:
    digest = hashlib.sha256(data).hexdigest()
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    (blobs / digest).write_bytes(data)
    return {"digest": f"sha256:{digest}", "size": len(data)}


def _image_manifest(
    layout: Path, layers: Sequence[bytes], settings: dict[str, Any], architecture: str, variant: str = ""
) -> dict[str, Any]:
    diff_ids = []
    layer_descriptors = []
    for layer in layers:
        compressed = layer[:2] == b"\x1f\x8b"
        plain = gzip.decompress(layer) if compressed else layer
        diff_ids.append("sha256:" + hashlib.sha256(plain).hexdigest())
        layer_descriptors.append(
            {"mediaType": OCI_LAYER_GZIP if compressed else OCI_LAYER, **_write_blob(layout, layer)}
        )
    config = {
        "architecture": architecture,
        "os": "linux",
        **({"variant": variant} if variant else {}),
        "config": settings,
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            **_write_blob(layout, json.dumps(config).encode()),
        },
        "layers": layer_descriptors,
    }
    descriptor = {"mediaType": manifest["mediaType"], **_write_blob(layout, json.dumps(manifest).encode())}
    return descriptor


def _finish_layout(layout: Path, top: dict[str, Any]) -> Path:
    (layout / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": [top]}
    (layout / "index.json").write_text(json.dumps(index))
    return layout


def write_layout(path: Path, layers: Sequence[bytes], settings: dict[str, Any] | None = None) -> Path:
    """An OCI layout at ``path`` of one image for this host's platform; ``settings`` is the config's ``config``."""
    path.mkdir(parents=True, exist_ok=True)
    wanted = host_platform()
    top = _image_manifest(
        path, layers, settings or {"Cmd": ["sh"], "Env": [_PATH]}, wanted.architecture, wanted.variant
    )
    top["annotations"] = {"org.opencontainers.image.ref.name": "latest"}
    return _finish_layout(path, top)


def _busybox_entries() -> list[Entry]:
    binary = Path("/bin/busybox").read_bytes()
    applets = subprocess.run(["/bin/busybox", "--list"], capture_output=True, text=True, check=True).stdout.split()
    entries = [
        Entry("bin", "dir", mode=0o755),
        Entry("bin/busybox", data=binary, mode=0o755),
        *(Entry(f"bin/{applet}", "symlink", target="busybox") for applet in applets if applet != "busybox"),
        Entry("etc", "dir", mode=0o755),
        Entry("etc/passwd", data=b"root:x:0:0:root:/root:/bin/sh\ndev:x:1000:1000:dev:/home/dev:/bin/sh\n"),
        Entry("etc/group", data=b"root:x:0:\ndev:x:1000:\n"),
        Entry("root", "dir", mode=0o700),
        Entry("home", "dir", mode=0o755),
        Entry("home/dev", "dir", mode=0o755, uid=1000, gid=1000),
        Entry("tmp", "dir", mode=0o1777),
    ]
    return entries


def busybox_layout(path: Path) -> Path:
    """The busybox test image (see the module's docstring) as an OCI layout at ``path``."""
    return write_layout(path, [tar_layer(_busybox_entries())], {"Cmd": ["sh"], "Env": [_PATH]})


def whiteout_layout(path: Path) -> Path:
    """Three layers: (1) ``etc/removed``, ``etc/kept``, ``data/dir/{a,b}``, ``data/other``; (2) a whiteout of
    ``etc/removed``; (3) ``data/dir`` opaque with only ``c``. Merged: ``etc/kept``, ``data/dir/c``,
    ``data/other``."""
    first = tar_layer(
        [
            Entry("etc", "dir", mode=0o755),
            Entry("etc/removed", data=b"gone\n"),
            Entry("etc/kept", data=b"kept\n"),
            Entry("data", "dir", mode=0o755),
            Entry("data/dir", "dir", mode=0o755),
            Entry("data/dir/a", data=b"a\n"),
            Entry("data/dir/b", data=b"b\n"),
            Entry("data/other", data=b"other\n"),
        ]
    )
    second = tar_layer([Entry("etc", "dir", mode=0o755), Entry("etc/.wh.removed")])
    third = tar_layer(
        [
            Entry("data", "dir", mode=0o755),
            Entry("data/dir", "dir", mode=0o755),
            Entry("data/dir/.wh..wh..opq"),
            Entry("data/dir/c", data=b"c\n"),
        ]
    )
    return write_layout(path, [first, second, third], {"Cmd": ["sh"]})


def multi_platform_layout(path: Path) -> Path:
    """An index of a linux/amd64 and a linux/arm64/v8 image, each labelled ``platform=<its architecture>``."""
    path.mkdir(parents=True, exist_ok=True)
    entries = []
    for architecture, variant in (("amd64", ""), ("arm64", "v8")):
        layer = tar_layer([Entry("arch", data=f"{architecture}\n".encode())])
        descriptor = _image_manifest(
            path, [layer], {"Cmd": ["sh"], "Labels": {"platform": architecture}}, architecture, variant
        )
        descriptor["platform"] = {
            "os": "linux",
            "architecture": architecture,
            **({"variant": variant} if variant else {}),
        }
        entries.append(descriptor)
    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": entries}
    top = {"mediaType": index["mediaType"], **_write_blob(path, json.dumps(index).encode())}
    return _finish_layout(path, top)


def _cache_dir() -> Path:
    return Path(os.environ.get("DEVYARD_TEST_CACHE", "/var/cache/devyard-tests"))


def debian_rootfs(packages: Sequence[str] = ("bash", "git", "sudo"), *, suite: str = "bookworm") -> Path:
    """A Debian root filesystem tarball from mmdebstrap (minbase + ``packages``), built once per inputs."""
    key = hashlib.sha256(json.dumps([suite, sorted(packages), platform.machine()]).encode()).hexdigest()[:16]
    cached = _cache_dir() / f"debian-{suite}-{key}.tar"
    if cached.exists():
        return cached
    cached.parent.mkdir(parents=True, exist_ok=True)
    # mmdebstrap picks its output format from the name: keep ".tar" at the end.
    partial = cached.with_name(f".partial-{os.getpid()}-{cached.name}")
    command = [
        "mmdebstrap",
        "--quiet",
        "--format=tar",
        "--variant=minbase",
        f"--include={','.join(packages)}",
        suite,
        str(partial),
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        partial.unlink(missing_ok=True)
        raise RuntimeError(f"mmdebstrap failed ({result.returncode}): {result.stderr[-2000:]}")
    os.rename(partial, cached)
    return cached


def debian_layout(path: Path, packages: Sequence[str] = ("bash", "git", "sudo")) -> Path:
    """The Debian image as an OCI layout at ``path``: one uncompressed layer, ``Cmd ["/bin/bash"]``."""
    tarball = debian_rootfs(packages)
    path.mkdir(parents=True, exist_ok=True)
    blobs = path / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    hasher = hashlib.sha256()
    with tarball.open("rb") as reader:
        while chunk := reader.read(1 << 20):
            hasher.update(chunk)
    digest = hasher.hexdigest()
    if not (blobs / digest).exists():
        shutil.copyfile(tarball, blobs / digest)
    wanted = host_platform()
    config = {
        "architecture": wanted.architecture,
        "os": "linux",
        "config": {"Cmd": ["/bin/bash"], "Env": [_PATH]},
        "rootfs": {"type": "layers", "diff_ids": [f"sha256:{digest}"]},
    }
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            **_write_blob(path, json.dumps(config).encode()),
        },
        "layers": [{"mediaType": OCI_LAYER, "digest": f"sha256:{digest}", "size": tarball.stat().st_size}],
    }
    top = {"mediaType": manifest["mediaType"], **_write_blob(path, json.dumps(manifest).encode())}
    return _finish_layout(path, top)


def push(layout: Path, registry: str, name: str, *, credentials: Credentials | None = None) -> str:
    """Push ``layout`` to ``registry`` (``127.0.0.1:PORT``, plain http) as ``name`` (``repo:tag``); returns the
    reference ``registry/name``."""
    reference = parse_reference(f"{registry}/{name}")

    async def upload() -> None:
        async with RegistryClient(insecure={reference.registry}, credentials=credentials) as client:
            await client.push_layout(layout, reference)

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        asyncio.run(upload())
    else:
        # Called from async code: its loop is busy running the caller, so push from a thread of our own.
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pool.submit(asyncio.run, upload()).result()
    return str(reference)
