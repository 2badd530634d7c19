"""Unpacking layers: overlayfs whiteouts (checked through a real overlay mount), ownership, file kinds, and
hostile tars."""

from __future__ import annotations

import asyncio
import io
import os
import stat
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import zstandard

from devyard.runner.errors import PermanentError
from devyard.runner.images.store import ImageStore
from devyard.runner.images.unpack import UnsafeLayer, unpack_layer
from support import host, images
from support.images import Entry, tar_layer
from support.registry import RegistryServer

from .conftest import ID_RANGE


@pytest.fixture
def rooted() -> None:
    host.require()


def _unpack(tmp_path: Path, entries: list[Entry], *, compress: bool = True, name: str = "layer") -> Path:
    blob = tmp_path / f"{name}.blob"
    blob.write_bytes(tar_layer(entries, compress=compress))
    destination = tmp_path / name
    unpack_layer(blob, destination, ID_RANGE)
    return destination


@pytest.fixture
def overlay(tmp_path: Path) -> Iterator[Path]:
    """A mount point for an overlay; unmounted after the test."""
    host.require("mount", "umount")
    merged = tmp_path / "merged"
    merged.mkdir()
    yield merged
    subprocess.run(["umount", str(merged)], capture_output=True, check=False)


async def test_whiteouts_and_opaque_dirs_give_the_right_overlay(
    store: ImageStore, registry: RegistryServer, tmp_path: Path, overlay: Path
) -> None:
    reference = images.push(images.whiteout_layout(tmp_path / "layout"), registry.host, "test/whiteouts:1")
    image = (await store.prepare(reference, holder="env_a")).image
    second, third = image.layers[1], image.layers[2]
    whiteout = os.lstat(second / "etc" / "removed")
    assert stat.S_ISCHR(whiteout.st_mode) and whiteout.st_rdev == os.makedev(0, 0)
    assert os.getxattr(third / "data" / "dir", "trusted.overlay.opaque") == b"y"

    upper, work = tmp_path / "upper", tmp_path / "work"
    upper.mkdir()
    work.mkdir()
    lower = ":".join(str(layer) for layer in reversed(image.layers))
    await asyncio.to_thread(
        subprocess.run,
        ["mount", "-t", "overlay", "overlay", "-o", f"lowerdir={lower},upperdir={upper},workdir={work}", str(overlay)],
        check=True,
        capture_output=True,
    )
    assert sorted(os.listdir(overlay / "etc")) == ["kept"]
    assert sorted(os.listdir(overlay / "data" / "dir")) == ["c"]
    assert (overlay / "data" / "other").read_text() == "other\n"


def test_ownership_modes_and_kinds(rooted: None, tmp_path: Path) -> None:
    layer = _unpack(
        tmp_path,
        [
            Entry("home", "dir", mode=0o755),
            Entry("home/dev", "dir", mode=0o750, uid=1000, gid=1000),
            Entry("home/dev/script", data=b"#!/bin/sh\n", mode=0o4755, uid=1000, gid=100),
            Entry("home/dev/same", "hardlink", target="home/dev/script"),
            Entry("home/dev/link", "symlink", target="/etc/passwd", uid=1000, gid=1000),
            Entry("home/dev/attr", data=b"x", xattrs={"user.note": "hello", "trusted.overlay.redirect": "/evil"}),
            Entry("dev", "dir", mode=0o755),
            Entry("dev/null", "char", mode=0o666, device=(1, 3)),
            Entry("dev/pipe", "fifo", mode=0o600),
            Entry("far", data=b"x", uid=70000, gid=70000),
            Entry("implicit/parent/file", data=b"y"),
        ],
    )
    script = os.lstat(layer / "home/dev/script")
    assert (script.st_uid, script.st_gid) == (ID_RANGE.start + 1000, ID_RANGE.start + 100)
    assert stat.S_IMODE(script.st_mode) == 0o4755
    assert script.st_mtime == 1_700_000_000
    assert os.lstat(layer / "home/dev").st_uid == ID_RANGE.start + 1000
    assert stat.S_IMODE(os.lstat(layer / "home/dev").st_mode) == 0o750
    assert os.lstat(layer / "home/dev").st_mtime == 1_700_000_000
    assert os.lstat(layer / "home/dev/same").st_ino == script.st_ino
    link = os.lstat(layer / "home/dev/link")
    assert stat.S_ISLNK(link.st_mode) and os.readlink(layer / "home/dev/link") == "/etc/passwd"
    assert link.st_uid == ID_RANGE.start + 1000
    assert os.getxattr(layer / "home/dev/attr", "user.note") == b"hello"
    assert "trusted.overlay.redirect" not in os.listxattr(layer / "home/dev/attr")
    null = os.lstat(layer / "dev/null")
    assert stat.S_ISCHR(null.st_mode) and null.st_rdev == os.makedev(1, 3)
    assert stat.S_ISFIFO(os.lstat(layer / "dev/pipe").st_mode)
    # Ids beyond the range become its nobody.
    assert os.lstat(layer / "far").st_uid == ID_RANGE.host_id(65534)
    assert os.lstat(layer / "implicit/parent").st_uid == ID_RANGE.start
    assert os.lstat(layer).st_uid == ID_RANGE.start


def test_file_capabilities_become_namespaced(rooted: None, tmp_path: Path) -> None:
    # cap_net_raw+ep as getcap writes it (revision 2).
    v2 = (0x02000001).to_bytes(4, "little") + (1 << 13).to_bytes(4, "little") + bytes(12)
    # The value is raw bytes; tarfile keeps them through surrogate escapes.
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        info = tarfile.TarInfo("ping")
        info.size = 1
        info.mode = 0o755
        info.pax_headers = {"SCHILY.xattr.security.capability": v2.decode("utf-8", "surrogateescape")}
        archive.addfile(info, io.BytesIO(b"x"))
    blob = tmp_path / "caps.tar"
    blob.write_bytes(buffer.getvalue())
    unpack_layer(blob, tmp_path / "caps", ID_RANGE)
    value = os.getxattr(tmp_path / "caps" / "ping", "security.capability")
    assert int.from_bytes(value[:4], "little") == 0x03000001
    assert int.from_bytes(value[20:24], "little") == ID_RANGE.start


def test_zstd_and_uncompressed_layers(rooted: None, tmp_path: Path) -> None:
    plain = tar_layer([Entry("a", data=b"plain")], compress=False)
    (tmp_path / "plain.blob").write_bytes(plain)
    unpack_layer(tmp_path / "plain.blob", tmp_path / "plain", ID_RANGE)
    assert (tmp_path / "plain" / "a").read_bytes() == b"plain"
    (tmp_path / "z.blob").write_bytes(
        zstandard.ZstdCompressor().compress(tar_layer([Entry("z", data=b"zstd")], compress=False))
    )
    unpack_layer(tmp_path / "z.blob", tmp_path / "z", ID_RANGE)
    assert (tmp_path / "z" / "z").read_bytes() == b"zstd"


def test_a_wrong_diff_id_is_refused(rooted: None, tmp_path: Path) -> None:
    (tmp_path / "blob").write_bytes(tar_layer([Entry("a", data=b"a")]))
    with pytest.raises(PermanentError, match="not the diff id"):
        unpack_layer(tmp_path / "blob", tmp_path / "out", ID_RANGE, diff_id="sha256:" + "0" * 64)
    assert not (tmp_path / "out").exists()
    assert [entry.name for entry in tmp_path.iterdir()] == ["blob"]


@pytest.mark.parametrize(
    ("entries", "complaint"),
    [
        ([Entry("../escape", data=b"x")], "goes up out of its directory"),
        ([Entry("a/../../escape", data=b"x")], "goes up out of its directory"),
        ([Entry("link", "symlink", target="/tmp"), Entry("link/escape", data=b"x")], "not a directory in the layer"),
        ([Entry("link", "symlink", target=".."), Entry("link/escape", data=b"x")], "not a directory in the layer"),
        ([Entry("file", data=b"x"), Entry("file/escape", data=b"x")], "not a directory in the layer"),
        ([Entry("hard", "hardlink", target="../../etc/passwd")], "goes up out of its directory"),
        ([Entry("hard", "hardlink", target="/etc/passwd")], "points outside it"),
    ],
)
def test_hostile_tars_are_refused(rooted: None, tmp_path: Path, entries: list[Entry], complaint: str) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    blob = tmp_path / "blob"
    blob.write_bytes(tar_layer(entries))
    before = sorted(os.listdir("/tmp"))
    with pytest.raises(UnsafeLayer, match=complaint):
        unpack_layer(blob, tmp_path / "layer", ID_RANGE)
    assert not (tmp_path / "layer").exists()
    assert sorted(entry.name for entry in tmp_path.iterdir()) == ["blob", "outside"]
    assert "escape" not in os.listdir("/tmp") or "escape" in before


def test_an_absolute_name_stays_inside(rooted: None, tmp_path: Path) -> None:
    layer = _unpack(tmp_path, [Entry("/etc/hostname", data=b"inside")])
    assert (layer / "etc" / "hostname").read_bytes() == b"inside"


def test_later_entries_replace_earlier_ones(rooted: None, tmp_path: Path) -> None:
    layer = _unpack(
        tmp_path,
        [
            Entry("x", "dir"),
            Entry("x/inner", data=b"1"),
            Entry("x", "symlink", target="elsewhere"),
            Entry("f", data=b"old"),
            Entry("f", data=b"new"),
        ],
    )
    assert os.readlink(layer / "x") == "elsewhere"
    assert (layer / "f").read_bytes() == b"new"
