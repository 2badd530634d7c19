"""Pulling from registries: real ones (open, basic auth, tokens) and a faulty one (drops, corrupt blobs)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from devyard.runner.errors import PermanentError, TemporaryError
from devyard.runner.images.image import Progress
from devyard.runner.images.registry import host_platform
from devyard.runner.images.store import ImageStore
from support import host, images
from support.registry import USERS, RegistryServer, TokenServer

from .conftest import ID_RANGE, FaultyRegistry, serve_faulty


def _leftovers(store: ImageStore) -> list[str]:
    return sorted(
        entry.name
        for directory in (store.blobs, store.layers)
        for entry in directory.iterdir()
        if entry.name.startswith(".tmp-")
    )


async def test_pull_by_tag_then_by_digest(store: ImageStore, busybox_image: str) -> None:
    seen: list[Progress] = []
    prepared = await store.prepare(busybox_image, holder="env_a", progress=seen.append)
    image = prepared.image
    assert image.reference == busybox_image
    assert image.config.cmd == ("sh",)
    assert (image.layers[0] / "bin" / "busybox").stat().st_uid == ID_RANGE.start
    assert (image.layers[0] / "bin" / "ls").readlink() == Path("busybox")
    assert prepared.timings["pull"] > 0 and prepared.timings["unpack"] > 0
    assert seen[-1].step == "done" and seen[-1].fetched == seen[-1].total > 0

    by_digest = f"{busybox_image.rsplit(':', 1)[0]}@{image.digest}"
    again = await store.prepare(by_digest, holder="env_b")
    assert again.image.digest == image.digest
    assert again.image.layers == image.layers
    # Blobs and layers were here: only the manifest was asked for.
    assert again.timings["unpack"] == 0

    cached = await store.prepare(busybox_image, holder="env_c")
    assert cached.timings == {"pull": 0.0, "unpack": 0.0}
    assert store.holders() == {"env_a": image.digest, "env_b": image.digest, "env_c": image.digest}


async def test_an_index_resolves_to_the_host_platform(
    store: ImageStore, registry: RegistryServer, tmp_path: Path
) -> None:
    reference = images.push(images.multi_platform_layout(tmp_path / "layout"), registry.host, "test/multi:1")
    prepared = await store.prepare(reference, holder="env_a")
    assert prepared.image.config.labels["platform"] == host_platform().architecture
    assert (prepared.image.layers[0] / "arch").read_text().strip() == host_platform().architecture


async def test_a_missing_image_is_a_permanent_error(store: ImageStore, registry: RegistryServer) -> None:
    with pytest.raises(PermanentError, match=f"not found in registry {registry.host}"):
        await store.prepare(f"{registry.host}/test/nothing-here:1", holder="env_a")
    assert store.holders() == {}


async def test_a_bad_reference_is_a_permanent_error(store: ImageStore) -> None:
    with pytest.raises(PermanentError, match="invalid image reference"):
        await store.prepare("Not/A/Reference", holder="env_a")


async def test_an_unreachable_registry_is_a_temporary_error(tmp_path: Path) -> None:
    host.require()
    from support.registry import free_port

    address = f"127.0.0.1:{free_port()}"
    image_store = ImageStore(tmp_path / "store", id_range=ID_RANGE, insecure={address})
    try:
        with pytest.raises(TemporaryError, match=f"cannot reach registry {address}"):
            await image_store.prepare(f"{address}/a:1", holder="env_a")
    finally:
        image_store.close()


async def test_basic_auth(basic_registry: RegistryServer, basic_image: str, tmp_path: Path) -> None:
    host.require()
    right = ImageStore(
        tmp_path / "right",
        id_range=ID_RANGE,
        insecure={basic_registry.host},
        credentials={basic_registry.host: ("alice", USERS["alice"])},
    )
    wrong = ImageStore(
        tmp_path / "wrong",
        id_range=ID_RANGE,
        insecure={basic_registry.host},
        credentials={basic_registry.host: ("alice", "nope")},
    )
    anonymous = ImageStore(tmp_path / "none", id_range=ID_RANGE, insecure={basic_registry.host})
    try:
        assert (await right.prepare(basic_image, holder="env_a")).image.config.cmd == ("sh",)
        with pytest.raises(
            PermanentError, match=f"registry {basic_registry.host} refused the credentials of user 'alice'"
        ):
            await wrong.prepare(basic_image, holder="env_a")
        with pytest.raises(PermanentError, match="needs credentials"):
            await anonymous.prepare(basic_image, holder="env_a")
        # An environment's own registry credentials (its secrets) serve for its pull, and come first.
        given = {basic_registry.host: ("alice", USERS["alice"])}
        assert (await anonymous.prepare(basic_image, holder="env_b", credentials=given)).image.config.cmd == ("sh",)
        assert (await wrong.prepare(basic_image, holder="env_c", credentials=given)).image.config.cmd == ("sh",)
        # The copy env_b's credentials brought is not everyone's: another environment must show its own.
        with pytest.raises(PermanentError, match="needs credentials"):
            await anonymous.prepare(basic_image, holder="env_d")
        with pytest.raises(PermanentError, match="refused the credentials"):
            await anonymous.prepare(basic_image, holder="env_e", credentials={basic_registry.host: ("alice", "no")})
        assert set(anonymous.holders()) == {"env_b"}
        again = await anonymous.prepare(basic_image, holder="env_f", credentials=given)
        assert again.timings == {"pull": 0.0, "unpack": 0.0}  # with the right ones, the copy here serves
    finally:
        for each in (right, wrong, anonymous):
            each.close()


async def test_bearer_tokens(token_registry: tuple[RegistryServer, TokenServer], tmp_path: Path) -> None:
    host.require()
    server, tokens = token_registry
    credentials = {server.host: ("alice", USERS["alice"])}
    layout = images.busybox_layout(tmp_path / "layout")
    private = await asyncio.to_thread(images.push, layout, server.host, "private/busybox:1", credentials=credentials)
    public = await asyncio.to_thread(images.push, layout, server.host, "public/busybox:1", credentials=credentials)

    stores = {
        name: ImageStore(tmp_path / name, id_range=ID_RANGE, insecure={server.host}, credentials=given)
        for name, given in (
            ("alice", credentials),
            ("anonymous", None),
            ("wrong", {server.host: ("alice", "nope")}),
        )
    }
    try:
        issued = tokens.issued
        assert (await stores["alice"].prepare(private, holder="env_a")).image.config.cmd == ("sh",)
        assert tokens.issued > issued
        # Anonymous tokens get pull on public/* only.
        assert (await stores["anonymous"].prepare(public, holder="env_a")).image.config.cmd == ("sh",)
        with pytest.raises(PermanentError, match=r"not found in registry .* or it needs credentials"):
            await stores["anonymous"].prepare(private, holder="env_b")
        with pytest.raises(PermanentError, match="refused the credentials of user 'alice'"):
            await stores["wrong"].prepare(private, holder="env_a")
    finally:
        for each in stores.values():
            each.close()


@pytest.fixture
def faulty(tmp_path: Path) -> Iterator[FaultyRegistry]:
    yield from serve_faulty(images.busybox_layout(tmp_path / "layout"))


def _layer_digest(layout: Path) -> tuple[str, int]:
    index = json.loads((layout / "index.json").read_bytes())
    manifest_digest = index["manifests"][0]["digest"].removeprefix("sha256:")
    manifest = json.loads((layout / "blobs" / "sha256" / manifest_digest).read_bytes())
    return manifest["layers"][0]["digest"], manifest["layers"][0]["size"]


@pytest.fixture
def faulty_store(tmp_path: Path, faulty: FaultyRegistry) -> Iterator[ImageStore]:
    host.require()
    image_store = ImageStore(tmp_path / "store", id_range=ID_RANGE, insecure={faulty.host})
    yield image_store
    image_store.close()


async def test_a_dropped_blob_download_resumes_with_a_range(faulty: FaultyRegistry, faulty_store: ImageStore) -> None:
    digest, size = _layer_digest(faulty.layout)
    faulty.drop_after[digest] = size // 3
    faulty.drop_times[digest] = 2
    prepared = await faulty_store.prepare(f"{faulty.host}/test/busybox:1", holder="env_a")
    assert (prepared.image.layers[0] / "bin" / "busybox").exists()
    assert faulty.blob_requests(digest) == ["", f"bytes={size // 3}-", f"bytes={2 * (size // 3)}-"]


async def test_a_registry_ignoring_range_restarts_the_blob(faulty: FaultyRegistry, faulty_store: ImageStore) -> None:
    digest, size = _layer_digest(faulty.layout)
    faulty.drop_after[digest] = size // 2
    faulty.drop_times[digest] = 1
    faulty.honour_range = False
    prepared = await faulty_store.prepare(f"{faulty.host}/test/busybox:1", holder="env_a")
    assert (prepared.image.layers[0] / "bin" / "busybox").exists()
    assert len(faulty.blob_requests(digest)) == 2


async def test_a_blob_that_keeps_dropping_is_a_temporary_error_and_leaves_nothing(
    faulty: FaultyRegistry, faulty_store: ImageStore
) -> None:
    digest, _ = _layer_digest(faulty.layout)
    faulty.drop_after[digest] = 0
    faulty.drop_times[digest] = 1000
    with pytest.raises(TemporaryError, match=rf"downloading blob {digest} .* failed 5 times"):
        await faulty_store.prepare(f"{faulty.host}/test/busybox:1", holder="env_a")
    assert not (faulty_store.blobs / digest.removeprefix("sha256:")).exists()
    assert _leftovers(faulty_store) == []
    assert list(faulty_store.layers.iterdir()) == []
    assert faulty_store.holders() == {}


async def test_a_corrupt_blob_is_retried_then_refused(faulty: FaultyRegistry, faulty_store: ImageStore) -> None:
    digest, _ = _layer_digest(faulty.layout)
    faulty.corrupt.add(digest)
    with pytest.raises(PermanentError, match=rf"blob {digest} .* is corrupt"):
        await faulty_store.prepare(f"{faulty.host}/test/busybox:1", holder="env_a")
    assert len(faulty.blob_requests(digest)) == 2
    assert not (faulty_store.blobs / digest.removeprefix("sha256:")).exists()
    assert _leftovers(faulty_store) == []
    assert list(faulty_store.layers.iterdir()) == []


async def test_concurrent_prepares_share_one_download(faulty: FaultyRegistry, faulty_store: ImageStore) -> None:
    digest, _ = _layer_digest(faulty.layout)
    faulty.delay = 0.2
    reference = f"{faulty.host}/test/busybox:1"
    results = await asyncio.gather(*(faulty_store.prepare(reference, holder=f"env_{n}") for n in range(4)))
    assert {result.image.digest for result in results} == {results[0].image.digest}
    assert len(faulty.blob_requests(digest)) == 1
    assert len(faulty_store.holders()) == 4


async def test_two_stores_in_one_root_share_downloads_through_file_locks(
    faulty: FaultyRegistry, faulty_store: ImageStore, tmp_path: Path
) -> None:
    # A second store object on the same root stands for another process (the CLI beside the runner).
    digest, _ = _layer_digest(faulty.layout)
    faulty.delay = 0.2
    other = ImageStore(faulty_store.root, id_range=ID_RANGE, insecure={faulty.host})
    try:
        reference = f"{faulty.host}/test/busybox:1"
        first, second = await asyncio.gather(
            faulty_store.prepare(reference, holder="env_a"), other.prepare(reference, holder="env_b")
        )
    finally:
        other.close()
    assert first.image.layers == second.image.layers
    assert len(faulty.blob_requests(digest)) == 1


@pytest.mark.slow
async def test_the_debian_test_image(store: ImageStore, registry: RegistryServer, tmp_path: Path) -> None:
    layout = await asyncio.to_thread(images.debian_layout, tmp_path / "layout")
    reference = await asyncio.to_thread(images.push, layout, registry.host, "test/debian:bookworm")
    image = (await store.prepare(reference, holder="env_a")).image
    assert (image.layers[0] / "usr" / "bin" / "git").exists()
    assert (image.layers[0] / "usr" / "bin" / "sudo").stat().st_mode & 0o4000
    assert (image.layers[0] / "usr" / "bin" / "sudo").stat().st_uid == ID_RANGE.start
