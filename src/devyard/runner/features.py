"""Dev Container Features brought to this host: the runner's ``FeatureSource`` for ``devcontainer.features``.

Called by the environment reconciler when an environment's devcontainer.json has ``features``: it opens a
``FeatureCache`` (with the image store's insecure registries and the credentials an image pull would use) and
hands it to ``devcontainer.features.resolve_features``. Three kinds of reference:
- OCI (``REGISTRY/NAMESPACE/ID:TAG``): the manifest through the image store's ``RegistryClient`` (so the same
  https rule, insecure list, tokens and credentials), which must have one layer of
  ``application/vnd.devcontainers.layer.v1+tar``; the layer is downloaded verified against its digest.
- tarball URLs: downloaded with httpx; their ``sha256:`` is the Feature's digest.
- local folders: copied, so that the build reads a snapshot rather than the live workspace.

Each Feature is unpacked once into ``<root>/<hex digest>/`` (the layer's, the tarball's, or the copied tree's),
by ``images.unpack.unpack_layer``, which refuses hostile tar members, and under a temporary name renamed into
place when complete: a folder under its final name is always whole. The manifest is asked for on every fetch:
that request is also what checks an environment's access to a private Feature already in the cache.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import secrets
import shutil
import stat
from collections.abc import Collection
from pathlib import Path

import httpx

from devyard.devcontainer import features as devcontainer_features
from devyard.runner.errors import PermanentError, TemporaryError
from devyard.runner.images import reference as image_reference
from devyard.runner.images import registry as image_registry
from devyard.runner.images import unpack
from devyard.runner.images.image import IdRange
from devyard.runner.images.store import ImageStore

__all__ = ["MAX_FEATURE_SIZE", "FeatureCache", "features_root"]

#: A Feature is scripts and small files; a bigger download is not one.
MAX_FEATURE_SIZE = 256 << 20
#: Features are unpacked with their owners as the tarball says (they are copied into a build as root).
_HOST_IDS = IdRange(start=0, size=65536)
_CHUNK = 1 << 20


def _hex(digest: str) -> str:
    return digest.partition(":")[2]


def features_root(state_dir: Path) -> Path:
    """Where the runner keeps fetched Features: ``<state_dir>/features``."""
    return state_dir / "features"


class FeatureCache:
    """Features fetched into ``root``; implements ``devcontainer.features.FeatureSource``. Use ``async with``.

    ``insecure`` and ``credentials`` are the image store's (``ImageStore.insecure``, its credentials merged with
    the environment's registry secrets, the environment's first, as the store does for image pulls).
    """

    def __init__(
        self,
        root: Path,
        *,
        insecure: Collection[str] = (),
        credentials: image_registry.Credentials | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        max_size: int = MAX_FEATURE_SIZE,
    ) -> None:
        self.root = root
        self.max_size = max_size
        root.mkdir(parents=True, exist_ok=True)
        self._registry = image_registry.RegistryClient(insecure=insecure, credentials=credentials, transport=transport)
        self._http = httpx.AsyncClient(
            verify=image_registry.tls_context(),
            timeout=httpx.Timeout(60.0, connect=10.0),
            follow_redirects=True,
            transport=transport,
        )

    @classmethod
    def for_store(
        cls, store: ImageStore, root: Path, *, credentials: image_registry.Credentials | None = None
    ) -> FeatureCache:
        """A cache that reaches registries as ``store`` pulls images: its insecure registries, and its
        credentials under the environment's ``credentials``."""
        return cls(root, insecure=store.insecure, credentials={**store.credentials, **(credentials or {})})

    async def __aenter__(self) -> FeatureCache:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._registry.aclose()
        await self._http.aclose()

    async def fetch(self, reference: devcontainer_features.FeatureReference) -> devcontainer_features.FetchedFeature:
        """The Feature's folder in the cache and its digest; ``PermanentError`` for what retrying cannot fix,
        ``TemporaryError`` for unreachable servers."""
        if isinstance(reference, devcontainer_features.OciReference):
            return await self._fetch_oci(reference)
        if isinstance(reference, devcontainer_features.TarballReference):
            return await self._fetch_tarball(reference)
        return await asyncio.to_thread(self._copy_local, reference)

    def _temporary(self, name: str) -> Path:
        return self.root / f"{unpack.TEMPORARY_PREFIX}{name}-{secrets.token_hex(4)}"

    # --- OCI ---------------------------------------------------------------------------------------------------

    async def _fetch_oci(self, reference: devcontainer_features.OciReference) -> devcontainer_features.FetchedFeature:
        image = image_reference.parse_reference(reference.image_reference)
        manifest = await self._registry.resolve(image)
        layers = [layer.media_type for layer in manifest.layers]
        if layers != [devcontainer_features.FEATURE_LAYER_MEDIA_TYPE]:
            raise PermanentError(
                f"{reference} is not a Dev Container Feature: its manifest must have one layer of "
                f"{devcontainer_features.FEATURE_LAYER_MEDIA_TYPE}, it has {layers or 'none'}"
            )
        layer = manifest.layers[0]
        if layer.size > self.max_size:
            raise PermanentError(f"the Feature {reference} is {layer.size} bytes, more than {self.max_size}")
        folder = self.root / _hex(layer.digest)
        if not folder.is_dir():
            blob = self._temporary(_hex(layer.digest) + ".tar")
            try:
                await self._registry.fetch_blob(image, layer, blob)
                await asyncio.to_thread(self._unpack, blob, folder, str(reference))
            finally:
                blob.unlink(missing_ok=True)
        return devcontainer_features.FetchedFeature(folder=folder, digest=manifest.digest)

    # --- tarballs ----------------------------------------------------------------------------------------------

    async def _fetch_tarball(
        self, reference: devcontainer_features.TarballReference
    ) -> devcontainer_features.FetchedFeature:
        blob = self._temporary("download.tgz")
        try:
            digest = await self._download(reference.url, blob)
            folder = self.root / _hex(digest)
            if not folder.is_dir():
                await asyncio.to_thread(self._unpack, blob, folder, reference.url)
        finally:
            blob.unlink(missing_ok=True)
        return devcontainer_features.FetchedFeature(folder=folder, digest=digest)

    async def _download(self, url: str, destination: Path) -> str:
        hasher = hashlib.sha256()
        size = 0
        try:
            async with self._http.stream("GET", url) as response:
                status = response.status_code
                if status in (408, 429) or status >= 500:
                    raise TemporaryError(f"{url} answered {status} for the Feature tarball")
                if status != 200:
                    raise PermanentError(
                        f"the Feature tarball {url} cannot be downloaded: the server answered {status}"
                    )
                with destination.open("wb") as output:
                    async for chunk in response.aiter_bytes(_CHUNK):
                        size += len(chunk)
                        if size > self.max_size:
                            raise PermanentError(f"the Feature tarball {url} is larger than {self.max_size} bytes")
                        hasher.update(chunk)
                        output.write(chunk)
        except httpx.TransportError as exc:
            raise TemporaryError(f"cannot download the Feature tarball {url}: {exc!r}") from exc
        return "sha256:" + hasher.hexdigest()

    # --- unpacking and local copies ----------------------------------------------------------------------------

    def _unpack(self, blob: Path, folder: Path, what: str) -> None:
        try:
            unpack.unpack_layer(blob, folder, _HOST_IDS)
        except unpack.UnsafeLayer as exc:
            raise PermanentError(f"the Feature {what} is refused: {exc}") from exc
        except OSError as exc:
            # Another fetch of the same Feature finished first: its folder is as good as ours.
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY) or not folder.is_dir():
                raise
            return
        try:
            self._check_folder(folder, what)
        except PermanentError:
            shutil.rmtree(folder, ignore_errors=True)
            raise

    def _check_folder(self, folder: Path, what: str) -> None:
        for name in (devcontainer_features.DEFINITION_FILE, "install.sh"):
            found = folder / name
            if found.is_symlink() or not found.is_file():
                raise PermanentError(f"the Feature {what} has no {name} at its top (a regular file)")

    def _copy_local(self, reference: devcontainer_features.LocalReference) -> devcontainer_features.FetchedFeature:
        source = devcontainer_features.checked_local_folder(reference)
        work = self._temporary("local")
        try:
            # Symlinks are copied as links, never followed: the copy holds only what the folder holds.
            shutil.copytree(source, work, symlinks=True)
            self._check_folder(work, reference.path)
            digest = _tree_digest(work)
            folder = self.root / _hex(digest)
            try:
                os.rename(work, folder)
            except OSError as exc:
                if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY) or not folder.is_dir():
                    raise
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return devcontainer_features.FetchedFeature(folder=folder, digest=digest)


def _tree_digest(root: Path) -> str:
    """A ``sha256:`` of a folder's names, kinds, modes, link targets and contents, in a stable order."""
    hasher = hashlib.sha256()
    for directory, subdirectories, files in os.walk(root):
        subdirectories.sort()
        for name in sorted([*subdirectories, *files]):
            path = os.path.join(directory, name)
            found = os.lstat(path)
            relative = os.path.relpath(path, root)
            hasher.update(
                f"{relative}\0{stat.S_IFMT(found.st_mode)}\0{stat.S_IMODE(found.st_mode)}\0{found.st_size}\0".encode()
            )
            if stat.S_ISLNK(found.st_mode):
                hasher.update(os.readlink(path).encode() + b"\0")
            elif stat.S_ISREG(found.st_mode):
                with open(path, "rb") as content:
                    while chunk := content.read(_CHUNK):
                        hasher.update(chunk)
                hasher.update(b"\0")
    return "sha256:" + hasher.hexdigest()
