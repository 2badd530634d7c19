"""The runner's Feature fetch: OCI Features packed here and pushed to a real registry, tarballs served over http
on 127.0.0.1, local folders; hostile and corrupt ones refused; and a build context built by buildah, when it
is installed, to show that the Features' install.sh ran in order with their options.
"""

from __future__ import annotations

import asyncio
import hashlib
import http.server
import json
import re
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from devyard.devcontainer import features
from devyard.devcontainer.errors import ConfigError
from devyard.runner.errors import PermanentError
from devyard.runner.features import FeatureCache, features_root
from devyard.runner.images.image import IdRange
from devyard.runner.images.registry import Credentials
from devyard.runner.images.store import ImageStore
from support import images as images_support
from support.images import Entry, tar_layer
from support.registry import USERS, RegistryServer

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
CONFIG = Path("/nowhere/.devcontainer/devcontainer.json")


def feature_tar(feature_id: str, *, extra: list[Entry] | None = None, **definition: Any) -> bytes:
    data = {"id": feature_id, "version": "1.0.0", **definition}
    script = f'#!/bin/sh\nset -e\necho "{feature_id} $GREETING $_REMOTE_USER $_REMOTE_USER_HOME" >> /features.log\n'
    return tar_layer(
        [
            Entry("./devcontainer-feature.json", data=json.dumps(data).encode()),
            Entry("./install.sh", data=script.encode(), mode=0o755),
            *(extra or []),
        ]
    )


def _blob(layout: Path, data: bytes) -> dict[str, Any]:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    path = layout / "blobs" / "sha256" / digest.partition(":")[2]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return {"digest": digest, "size": len(data)}


def push_feature(
    registry: RegistryServer,
    tmp_path: Path,
    name: str,
    layer: bytes,
    *,
    media_type: str = features.FEATURE_LAYER_MEDIA_TYPE,
    credentials: Credentials | None = None,
) -> tuple[str, str, str]:
    """Pack ``layer`` as the spec's Feature artifact, push it as ``name``: (reference, manifest digest, layer
    digest)."""
    layout = tmp_path / f"layout-{name.replace('/', '-').replace(':', '-')}"
    layout.mkdir()
    config = {"mediaType": "application/vnd.devcontainers", **_blob(layout, b"")}
    layer_descriptor = {"mediaType": media_type, **_blob(layout, layer)}
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": config,
        "layers": [layer_descriptor],
        "annotations": {"dev.containers.metadata": "{}"},
    }
    top = {"mediaType": OCI_MANIFEST, **_blob(layout, json.dumps(manifest).encode())}
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [top]}))
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    reference = images_support.push(layout, registry.host, name, credentials=credentials)
    return reference, top["digest"], layer_descriptor["digest"]


def reference_of(text: str) -> features.FeatureReference:
    return features.parse_feature_reference(text, config_file=CONFIG)


async def test_an_oci_feature_is_fetched_verified_and_unpacked_once(registry: RegistryServer, tmp_path: Path) -> None:
    layer = feature_tar("hello", options={"greeting": {"type": "string", "default": "hey"}})
    text, manifest_digest, layer_digest = push_feature(registry, tmp_path, "features/hello:1", layer)
    cache_root = tmp_path / "cache"
    async with FeatureCache(cache_root, insecure={registry.host}) as cache:
        fetched = await cache.fetch(reference_of(text))
        assert fetched.digest == manifest_digest
        assert fetched.folder == cache_root / layer_digest.partition(":")[2]
        assert json.loads((fetched.folder / "devcontainer-feature.json").read_text())["id"] == "hello"
        assert (fetched.folder / "install.sh").stat().st_mode & 0o111
        marker = fetched.folder / "kept"
        marker.write_text("from the first fetch")
        again = await cache.fetch(reference_of(text))
        assert again == fetched
        assert marker.read_text() == "from the first fetch"
        # Nothing half-made is left behind.
        assert sorted(path.name for path in cache_root.iterdir()) == [fetched.folder.name]

        resolved = await features.resolve_features(
            {text: {"greeting": "hi"}, f"{registry.host}/features/hello@{manifest_digest}": {"greeting": "hi"}},
            config_file=CONFIG,
            source=cache,
        )
    # Tag and digest name the same manifest: with the same options it is one Feature.
    assert [(str(feature.reference), dict(feature.options)) for feature in resolved] == [(text, {"greeting": "hi"})]


async def test_concurrent_fetches_of_one_feature_share_its_folder(registry: RegistryServer, tmp_path: Path) -> None:
    text, _, layer_digest = push_feature(registry, tmp_path, "features/popular:1", feature_tar("popular"))
    cache_root = tmp_path / "cache"
    async with (
        FeatureCache(cache_root, insecure={registry.host}) as first,
        FeatureCache(cache_root, insecure={registry.host}) as second,
    ):
        results = await asyncio.gather(*(cache.fetch(reference_of(text)) for cache in (first, second, first)))
    assert len(set(results)) == 1
    assert sorted(path.name for path in cache_root.iterdir()) == [layer_digest.partition(":")[2]]
    assert (results[0].folder / "install.sh").is_file()


async def test_registry_credentials_are_those_of_image_pulls(basic_registry: RegistryServer, tmp_path: Path) -> None:
    alice = {basic_registry.host: ("alice", USERS["alice"])}
    layout_layer = feature_tar("private")
    text, manifest_digest, _ = push_feature(
        basic_registry, tmp_path, "private/features/private:1", layout_layer, credentials=alice
    )
    store = ImageStore(tmp_path / "images", id_range=IdRange(), insecure={basic_registry.host})
    try:
        async with FeatureCache.for_store(store, features_root(tmp_path / "state")) as cache:
            with pytest.raises(PermanentError, match="needs credentials"):
                await cache.fetch(reference_of(text))
        # The environment's credentials (its registry secrets) come on top of the store's.
        async with FeatureCache.for_store(store, features_root(tmp_path / "state"), credentials=alice) as cache:
            fetched = await cache.fetch(reference_of(text))
        assert fetched.digest == manifest_digest
        assert fetched.folder.parent == tmp_path / "state" / "features"
        # A Feature in the cache is not everyone's: the manifest is asked for, with the caller's credentials.
        async with FeatureCache.for_store(store, features_root(tmp_path / "state")) as cache:
            with pytest.raises(PermanentError, match="needs credentials"):
                await cache.fetch(reference_of(text))
    finally:
        store.close()


async def test_a_corrupt_blob_is_refused(registry: RegistryServer, tmp_path: Path) -> None:
    layer = feature_tar("corrupt", description="this layer is damaged in the registry's storage")
    text, _, layer_digest = push_feature(registry, tmp_path, "features/corrupt:1", layer)
    hex_digest = layer_digest.partition(":")[2]
    stored = registry.root / "storage" / "docker/registry/v2/blobs/sha256" / hex_digest[:2] / hex_digest / "data"
    damaged = bytearray(stored.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    stored.write_bytes(bytes(damaged))
    cache_root = tmp_path / "cache"
    async with FeatureCache(cache_root, insecure={registry.host}) as cache:
        with pytest.raises(PermanentError, match=f"blob {layer_digest} .* is corrupt: its content hashes to"):
            await cache.fetch(reference_of(text))
    assert list(cache_root.iterdir()) == []


async def test_an_artifact_that_is_not_a_feature_is_refused(registry: RegistryServer, tmp_path: Path) -> None:
    layer = feature_tar("image")
    text, _, _ = push_feature(
        registry, tmp_path, "features/image:1", layer, media_type="application/vnd.oci.image.layer.v1.tar+gzip"
    )
    async with FeatureCache(tmp_path / "cache", insecure={registry.host}) as cache:
        with pytest.raises(PermanentError, match="is not a Dev Container Feature: its manifest must have one layer"):
            await cache.fetch(reference_of(text))


async def test_a_missing_feature_is_a_permanent_error(registry: RegistryServer, tmp_path: Path) -> None:
    async with FeatureCache(tmp_path / "cache", insecure={registry.host}) as cache:
        with pytest.raises(PermanentError, match="not found"):
            await cache.fetch(reference_of(f"{registry.host}/features/nothing:1"))


@pytest.mark.parametrize(
    ("entries", "refusal"),
    [
        ([Entry("../escape", data=b"x")], "goes up out of its directory"),
        ([Entry("link", "symlink", target="/etc"), Entry("link/passwd", data=b"x")], "which is not a directory"),
        ([Entry("hard", "hardlink", target="/etc/passwd")], "points outside it"),
    ],
)
async def test_hostile_feature_tars_are_refused(
    registry: RegistryServer, tmp_path: Path, entries: list[Entry], refusal: str
) -> None:
    layer = feature_tar("hostile", extra=entries, description=refusal)
    tag = "-".join(refusal.split()[:3])
    text, _, _ = push_feature(registry, tmp_path, f"features/hostile:{tag}", layer)
    cache_root = tmp_path / "cache"
    async with FeatureCache(cache_root, insecure={registry.host}) as cache:
        with pytest.raises(PermanentError, match=refusal):
            await cache.fetch(reference_of(text))
    assert list(cache_root.iterdir()) == []
    assert not (tmp_path / "escape").exists()


@pytest.fixture
def web(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """An http server on 127.0.0.1 serving a folder: (its URL, the folder)."""
    served = tmp_path / "web"
    served.mkdir()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, directory=str(served), **kwargs)

        def log_message(self, *_: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", served
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


async def test_a_tarball_feature_is_downloaded_and_kept_by_digest(web: tuple[str, Path], tmp_path: Path) -> None:
    url, served = web
    tarball = feature_tar("tool")
    (served / "devcontainer-feature-tool.tgz").write_bytes(tarball)
    (served / "devcontainer-feature-bad.tgz").write_bytes(b"this is not a tar archive at all")
    digest = "sha256:" + hashlib.sha256(tarball).hexdigest()
    cache_root = tmp_path / "cache"
    async with FeatureCache(cache_root) as cache:
        fetched = await cache.fetch(reference_of(f"{url}/devcontainer-feature-tool.tgz"))
        assert fetched == features.FetchedFeature(cache_root / digest.partition(":")[2], digest)
        assert (fetched.folder / "install.sh").is_file()
        with pytest.raises(PermanentError, match="the server answered 404"):
            await cache.fetch(reference_of(f"{url}/devcontainer-feature-missing.tgz"))
        with pytest.raises(PermanentError, match="is refused: the layer is not a tar archive"):
            await cache.fetch(reference_of(f"{url}/devcontainer-feature-bad.tgz"))
    assert sorted(path.name for path in cache_root.iterdir()) == [fetched.folder.name]


async def test_tarballs_with_the_same_content_are_one_feature(web: tuple[str, Path], tmp_path: Path) -> None:
    url, served = web
    tarball = feature_tar("tool", options={"level": {"type": "string", "default": "1"}})
    for release in ("v1", "v2", "v3"):
        (served / release).mkdir()
        (served / release / "devcontainer-feature-tool.tgz").write_bytes(tarball)
    async with FeatureCache(tmp_path / "cache") as cache:
        resolved = await features.resolve_features(
            {
                f"{url}/v3/devcontainer-feature-tool.tgz": {"level": "2"},
                f"{url}/v1/devcontainer-feature-tool.tgz": {},
                # The same content with the default spelled out: the same Feature as v1's.
                f"{url}/v2/devcontainer-feature-tool.tgz": {"level": "1"},
            },
            config_file=CONFIG,
            source=cache,
        )
    assert [(str(feature.reference), dict(feature.options)) for feature in resolved] == [
        (f"{url}/v1/devcontainer-feature-tool.tgz", {"level": "1"}),
        (f"{url}/v3/devcontainer-feature-tool.tgz", {"level": "2"}),
    ]


async def test_a_local_feature_is_copied_as_a_snapshot(tmp_path: Path) -> None:
    dev_container = tmp_path / "project" / ".devcontainer"
    folder = dev_container / "mine"
    folder.mkdir(parents=True)
    (folder / "devcontainer-feature.json").write_text('{"id": "mine", "version": "1.0.0"}')
    (folder / "install.sh").write_text("#!/bin/sh\n")
    (folder / "link").symlink_to("/etc/passwd")
    config = dev_container / "devcontainer.json"
    reference = features.parse_feature_reference("./mine", config_file=config)
    async with FeatureCache(tmp_path / "cache") as cache:
        first = await cache.fetch(reference)
        assert (first.folder / "link").is_symlink()  # copied as a link, never followed
        assert await cache.fetch(reference) == first
        (folder / "install.sh").write_text("#!/bin/sh\necho changed\n")
        changed = await cache.fetch(reference)
        assert changed.digest != first.digest
        assert (first.folder / "install.sh").read_text() == "#!/bin/sh\n"
        (folder / "install.sh").unlink()
        with pytest.raises(PermanentError, match=re.escape("has no install.sh")):
            await cache.fetch(reference)
        outside = tmp_path / "outside"
        shutil.copytree(first.folder, outside, symlinks=True)
        (dev_container / "escape").symlink_to(outside)
        with pytest.raises(ConfigError, match=re.escape("outside the project's .devcontainer folder")):
            await cache.fetch(features.parse_feature_reference("./escape", config_file=config))


@pytest.mark.slow
async def test_buildah_installs_the_features_in_order(
    registry: RegistryServer, busybox_image: str, tmp_path: Path
) -> None:
    if shutil.which("buildah") is None:
        pytest.skip("buildah is not installed (Debian package buildah)")
    text, _, _ = push_feature(
        registry,
        tmp_path,
        "features/greeter:1",
        feature_tar(
            "greeter", options={"greeting": {"type": "string", "default": "hey"}}, containerEnv={"GREETER": "1"}
        ),
    )
    dev_container = tmp_path / "project" / ".devcontainer"
    local = dev_container / "after"
    local.mkdir(parents=True)
    (local / "devcontainer-feature.json").write_text(
        json.dumps({"id": "after", "version": "1.0.0", "installsAfter": [text.rsplit(":", 1)[0]]})
    )
    (local / "install.sh").write_text(
        '#!/bin/sh\nset -e\necho "after GREETER=$GREETER $_CONTAINER_USER_HOME" >> /features.log\n'
    )
    async with FeatureCache(tmp_path / "cache", insecure={registry.host}) as cache:
        resolved = await features.resolve_features(
            {"./after": {}, text: {"greeting": "hello there"}},
            config_file=dev_container / "devcontainer.json",
            source=cache,
        )
    context = tmp_path / "context"
    features.write_build_context(
        context, base_image=busybox_image, features=resolved, container_user="root", remote_user="dev"
    )
    storage = ["--root", str(tmp_path / "storage"), "--runroot", str(tmp_path / "run"), "--storage-driver", "vfs"]
    image = "localhost/devyard-test/features:1"

    def buildah(*arguments: str) -> str:
        done = subprocess.run(["buildah", *storage, *arguments], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr + done.stdout
        return done.stdout.strip()

    buildah("bud", "--isolation", "chroot", "--tls-verify=false", "-t", image, str(context))
    container = buildah("from", image)
    try:
        mounted = Path(buildah("mount", container))
        assert (mounted / "features.log").read_text() == ("greeter hello there dev /home/dev\nafter GREETER=1 /root\n")
    finally:
        buildah("rm", container)
        buildah("rmi", "--all", "--force")
