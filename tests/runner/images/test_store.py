"""The store's bookkeeping: holders, names, removal, garbage collection, imports, and a full disk."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from devyard.runner.errors import PermanentError, TemporaryError
from devyard.runner.images.store import ImageInUse, ImageStore
from support import host, images
from support.images import Entry, tar_layer
from support.registry import RegistryServer

from .conftest import ID_RANGE


def _files(store: ImageStore) -> tuple[set[str], set[str]]:
    return {entry.name for entry in store.blobs.iterdir()}, {entry.name for entry in store.layers.iterdir()}


async def test_holders_names_removal_and_gc(
    store: ImageStore, busybox_image: str, registry: RegistryServer, tmp_path: Path
) -> None:
    other = images.push(images.whiteout_layout(tmp_path / "layout"), registry.host, "test/whiteouts:gc")
    busybox = (await store.prepare(busybox_image, holder="env_a")).image
    await store.prepare(busybox_image, holder="env_b")
    whiteouts = (await store.prepare(other, holder="env_c")).image
    listed = {stored.digest: stored for stored in store.images()}
    assert listed[busybox.digest].holders == ("env_a", "env_b")
    assert listed[busybox.digest].references == (busybox_image,)
    assert listed[busybox.digest].size == busybox.size > 0

    with pytest.raises(ImageInUse, match="held by 2 environment"):
        await store.remove(busybox_image)
    await store.release("env_a")
    await store.release("env_a")  # idempotent
    await store.release("env_b")
    assert await store.remove(busybox_image) == [busybox_image]
    blobs, layers = _files(store)
    assert busybox.layers[0].name not in layers
    assert busybox.digest.removeprefix("sha256:") not in blobs
    assert {layer.name for layer in whiteouts.layers} <= layers

    # Unnamed but held: kept by gc; released: collected.
    with pytest.raises(ImageInUse):
        await store.remove(other)
    assert await store.remove(other, force=True) == [other]
    assert store.holders() == {}
    assert store.images() == []
    assert _files(store) == (set(), set())


async def test_gc_removes_crash_leftovers_and_keeps_named_images(store: ImageStore, busybox_image: str) -> None:
    image = (await store.prepare(busybox_image, holder="env_a")).image
    await store.release("env_a")
    (store.blobs / ".tmp-deadbeef-1234").write_bytes(b"partial")
    (store.layers / ".tmp-cafe-5678").mkdir()
    (store.layers / ".tmp-cafe-5678" / "half").write_bytes(b"x")
    (store.blobs / ("f" * 64)).write_bytes(b"orphan")
    report = await store.gc()
    assert (report.images, report.blobs, report.temporary) == (0, 1, 2)
    assert image.layers[0].is_dir()
    blobs, layers = _files(store)
    assert not any(name.startswith(".tmp-") for name in blobs | layers)


async def test_import_oci_layout_directory_and_tar(store: ImageStore, tmp_path: Path) -> None:
    layout = images.busybox_layout(tmp_path / "layout")
    from_directory = await store.import_archive(layout, "devyard.local/busybox:dir")
    archive = tmp_path / "layout.tar"
    with tarfile.open(archive, "w") as writer:
        writer.add(layout, arcname=".")
    from_tar = await store.import_archive(archive, "devyard.local/busybox:tar")
    assert from_directory.digest == from_tar.digest
    assert from_tar.config.cmd == ("sh",)
    assert (from_tar.layers[0] / "bin" / "busybox").stat().st_uid == ID_RANGE.start
    # devyard.local images come from the store, never a registry.
    prepared = await store.prepare("devyard.local/busybox:tar", holder="env_a")
    assert prepared.timings == {"pull": 0.0, "unpack": 0.0}


async def test_import_docker_save_archive(store: ImageStore, tmp_path: Path) -> None:
    host.require("skopeo")
    layout = images.busybox_layout(tmp_path / "layout")
    archive = tmp_path / "saved.tar"
    process = await asyncio.create_subprocess_exec(
        "skopeo",
        "copy",
        f"oci:{layout}:latest",
        f"docker-archive:{archive}:test/busybox:1",
        stderr=asyncio.subprocess.PIPE,
    )
    _, stderr = await process.communicate()
    assert process.returncode == 0, stderr.decode()
    image = await store.import_archive(archive, "devyard.local/busybox:saved")
    assert image.config.cmd == ("sh",)
    assert (image.layers[0] / "etc" / "passwd").read_text().startswith("root:x:0:0")


async def test_import_root_filesystem_tarball(store: ImageStore, tmp_path: Path) -> None:
    tarball = tmp_path / "rootfs.tar.gz"
    tarball.write_bytes(tar_layer([Entry("bin", "dir", mode=0o755), Entry("bin/sh", data=b"#!", mode=0o755)]))
    image = await store.import_archive(tarball, "devyard.local/rootfs:1")
    assert image.config.cmd == ("/bin/sh",)
    assert (image.layers[0] / "bin" / "sh").read_bytes() == b"#!"
    assert [stored.references for stored in store.images()] == [("devyard.local/rootfs:1",)]


async def test_a_local_image_missing_is_permanent(store: ImageStore) -> None:
    from devyard.runner.errors import PermanentError

    with pytest.raises(PermanentError, match="never pulled"):
        await store.prepare("devyard.local/nothing:1", holder="env_a")


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs: too small for the busybox image (2 MB unpacked)."""
    host.require("mount", "umount")
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)], check=True)
    yield mount_point
    subprocess.run(["umount", str(mount_point)], check=False)


async def test_a_full_disk_is_temporary_and_leaves_nothing_under_a_final_name(
    small_disk: Path, registry: RegistryServer, busybox_image: str
) -> None:
    full = ImageStore(small_disk / "store", id_range=ID_RANGE, insecure={registry.host})
    try:
        with pytest.raises(TemporaryError, match="ran out of disk space"):
            await full.prepare(busybox_image, holder="env_a")
        assert full.holders() == {}
        assert full.images() == []
        assert [entry.name for entry in full.layers.iterdir()] == []
        await full.gc()
        blobs, layers = _files(full)
        assert not any(name.startswith(".tmp-") for name in blobs | layers)
    finally:
        full.close()


async def test_the_local_debian_image_is_built_once_on_first_use(
    store: ImageStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``devyard.local/debian:SUITE`` is bootstrapped by ``prepare`` when missing, once for concurrent callers.
    mmdebstrap is stood in for by a script with its command line that writes a small root tarball (the real one
    runs in ``test_cli.py::test_bootstrap_builds_a_debian_image``)."""
    host.require()
    root = tmp_path / "root"
    (root / "bin").mkdir(parents=True)
    shutil.copy("/usr/bin/busybox", root / "bin" / "busybox")
    (root / "bin" / "sh").symlink_to("busybox")
    calls = tmp_path / "calls"
    fake = tmp_path / "bin" / "mmdebstrap"
    fake.parent.mkdir()
    # mmdebstrap [options] SUITE TARGET MIRROR: the target is the second to last argument.
    fake.write_text(
        f"#!{sys.executable}\n"
        "import subprocess, sys, time\n"
        f"open({str(calls)!r}, 'a').write(' '.join(sys.argv[1:]) + '\\n')\n"
        "time.sleep(0.5)\n"
        f"subprocess.run(['tar', '-C', {str(root)!r}, '-cf', sys.argv[-2], '.'], check=True)\n"
    )
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:{os.environ['PATH']}")

    prepared = await asyncio.gather(
        *(store.prepare("devyard.local/debian:trixie", holder=f"env_{n}") for n in range(3))
    )
    assert len({each.image.digest for each in prepared}) == 1
    assert len(calls.read_text().splitlines()) == 1
    assert "trixie" in calls.read_text().split()
    assert (prepared[0].image.layers[0] / "bin" / "busybox").is_file()
    again = await store.prepare("devyard.local/debian:trixie", holder="env_9")
    # The stored image again, without building it again (no wall-clock figures asserted: only what happened).
    assert again.image.digest == prepared[0].image.digest
    assert len(calls.read_text().splitlines()) == 1
    with pytest.raises(PermanentError, match="never pulled"):
        await store.prepare("devyard.local/debian:hamm", holder="env_a")  # not a suite it builds


async def test_prune_keeps_the_newest_builds_and_those_held(store: ImageStore, tmp_path: Path) -> None:
    references = []
    for index in range(4):
        tarball = tmp_path / f"rootfs-{index}.tar.gz"
        tarball.write_bytes(tar_layer([Entry("marker", data=str(index).encode())]))
        reference = f"devyard.local/build:{index}"
        await store.import_archive(tarball, reference)
        references.append(reference)
        await asyncio.sleep(0.01)  # created times apart
    other = tmp_path / "other.tar.gz"
    other.write_bytes(tar_layer([Entry("marker", data=b"not a build")]))
    await store.import_archive(other, "devyard.local/debian:old")
    await store.prepare(references[0], holder="env_a")

    assert sorted(await store.prune("devyard.local/build", keep=2)) == [references[1]]
    kept = {reference for stored in store.images() for reference in stored.references}
    assert kept == {references[0], references[2], references[3], "devyard.local/debian:old"}
    assert len(store.images()) == 4, "the pruned image's files went with its name"
    await store.release("env_a")
    assert await store.prune("devyard.local/build", keep=2) == [references[0]]
    assert await store.prune("devyard.local/build", keep=2) == []
