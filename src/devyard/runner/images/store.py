"""The image store of one runner host: blobs by digest, each layer unpacked once, names, holders, garbage.

The linux runtime uses it as its ``ImageSource`` (``prepare`` when it creates an environment, ``release`` when
it deletes one); the ``devyard image`` commands use the rest (``pull``, ``images``, ``remove``,
``import_archive``, ``gc``, ``holders``), possibly while a runner uses the same store; the image builder
(``builder``) uses ``lookup``, ``prepare`` (a base image pulled alongside buildah's pull), ``export_layout`` (a
base image handed to buildah) and ``import_archive`` (its result, handed over: linked, not copied).

Layout under ``root``::

    store.db              sqlite (WAL): images (manifest digest -> record), names, holders, layers, meta
    store.lock            flock: shared by every pull, import and prepare; exclusive for garbage collection
    locks/<hex>           flock: one process at a time fetches a blob or unpacks a layer
    blobs/sha256/<hex>    verified blobs: manifests, configs, layers
    layers/<diff-id hex>/ unpacked layers (overlayfs lower dirs), owners shifted into ``id_range``

A blob or layer exists under its final name only once complete (written under ``.tmp-*``, then renamed); those
temporary names are what a crash leaves, and garbage collection, which holds the store lock exclusively,
removes them. In one process, concurrent pulls share each blob's download and each layer's unpack
(single-flight per digest); across processes the per-digest file lock does the same.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import secrets
import shutil
import sqlite3
import tarfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from devyard.runner.errors import PermanentError, TemporaryError
from devyard.runner.images.image import IdRange, Image, ImageConfig, Prepared, Progress, ProgressCallback
from devyard.runner.images.reference import Reference, parse_reference
from devyard.runner.images.registry import (
    INDEX_MEDIA_TYPES,
    Credentials,
    Descriptor,
    Manifest,
    RegistryClient,
    host_platform,
    parse_manifest,
    select_platform,
)
from devyard.runner.images.unpack import TEMPORARY_PREFIX, decompress, unpack_layer

__all__ = [
    "BOOTSTRAP_SUITES",
    "GarbageReport",
    "ImageInUse",
    "ImageStore",
    "StoredImage",
    "bootstrappable",
    "store_root",
    "stored_id_range",
]

_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
_OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
_OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
_DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_LOCK_POLL = 0.05
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS images (digest TEXT PRIMARY KEY, record TEXT NOT NULL, size INTEGER NOT NULL,
                                   created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS names (reference TEXT PRIMARY KEY, digest TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS holders (holder TEXT PRIMARY KEY, digest TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS layers (diff_id TEXT PRIMARY KEY, size INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS private_images (digest TEXT PRIMARY KEY);
"""

log = logging.getLogger(__name__)


class ImageInUse(PermanentError):
    """``remove`` of an image that environments hold, without ``force``."""


@dataclass(frozen=True)
class StoredImage:
    """One image in the store, as ``images()`` lists it."""

    digest: str
    references: tuple[str, ...]
    size: int
    holders: tuple[str, ...]
    created: float
    layers: int


@dataclass(frozen=True)
class GarbageReport:
    images: int = 0
    blobs: int = 0
    layers: int = 0
    temporary: int = 0


@dataclass
class _Pull:
    """Progress of one pull, reported through the caller's callback."""

    reference: str
    callback: ProgressCallback | None
    fetched: int = 0
    total: int = 0
    layers_done: int = 0
    layers_total: int = 0
    step: str = "resolve"

    def report(self, step: str | None = None) -> None:
        if step is not None:
            self.step = step
        if self.callback is not None:
            self.callback(
                Progress(self.reference, self.fetched, self.total, self.layers_done, self.layers_total, self.step)
            )

    def add_bytes(self, count: int) -> None:
        self.fetched += count
        self.report()


@dataclass(frozen=True)
class _LayerRecord:
    digest: str
    diff_id: str
    media_type: str
    size: int


@dataclass(frozen=True)
class _Record:
    config_digest: str
    config: ImageConfig
    layers: tuple[_LayerRecord, ...]

    def to_json(self) -> str:
        config = self.config
        return json.dumps(
            {
                "config_digest": self.config_digest,
                "config": {
                    "entrypoint": list(config.entrypoint),
                    "cmd": list(config.cmd),
                    "env": list(config.env),
                    "working_dir": config.working_dir,
                    "user": config.user,
                    "stop_signal": config.stop_signal,
                    "labels": dict(config.labels),
                },
                "layers": [layer.__dict__ for layer in self.layers],
            }
        )

    @classmethod
    def from_json(cls, text: str) -> _Record:
        data = json.loads(text)
        config = data["config"]
        return cls(
            config_digest=data["config_digest"],
            config=ImageConfig(
                entrypoint=tuple(config["entrypoint"]),
                cmd=tuple(config["cmd"]),
                env=tuple(config["env"]),
                working_dir=config["working_dir"],
                user=config["user"],
                stop_signal=config["stop_signal"],
                labels=dict(config["labels"]),
            ),
            layers=tuple(_LayerRecord(**layer) for layer in data["layers"]),
        )


def _hex(digest: str) -> str:
    return digest.partition(":")[2]


def _strings(value: Any) -> tuple[str, ...]:
    return tuple(str(item) for item in value) if isinstance(value, list) else ()


def _image_config(raw: bytes, context: str) -> tuple[ImageConfig, tuple[str, ...]]:
    """The container settings and the diff ids of an image config blob."""
    try:
        data = json.loads(raw)
        settings = data.get("config") or {}
        diff_ids = _strings((data.get("rootfs") or {}).get("diff_ids"))
    except (ValueError, AttributeError) as exc:
        raise PermanentError(f"{context}: the image config is not valid JSON") from exc
    labels = settings.get("Labels") or {}
    config = ImageConfig(
        entrypoint=_strings(settings.get("Entrypoint")),
        cmd=_strings(settings.get("Cmd")),
        env=_strings(settings.get("Env")),
        working_dir=str(settings.get("WorkingDir") or ""),
        user=str(settings.get("User") or ""),
        stop_signal=str(settings.get("StopSignal") or ""),
        labels={str(key): str(value) for key, value in labels.items()} if isinstance(labels, dict) else {},
    )
    return config, diff_ids


def _is_disk_full(exc: OSError) -> bool:
    return exc.errno in (errno.ENOSPC, errno.EDQUOT)


@contextlib.contextmanager
def _disk_errors(root: Path, what: str) -> Iterator[None]:
    """A full disk or quota is temporary (space may be freed); say so plainly."""
    try:
        yield
    except OSError as exc:
        if _is_disk_full(exc):
            raise TemporaryError(f"the image store {root} ran out of disk space (or quota) while {what}") from exc
        raise


def _open_database(root: Path) -> sqlite3.Connection:
    root.mkdir(parents=True, exist_ok=True)
    database = sqlite3.connect(root / "store.db", timeout=30.0, isolation_level=None, check_same_thread=False)
    database.execute("PRAGMA journal_mode=WAL")
    database.execute("PRAGMA synchronous=NORMAL")
    database.executescript(_SCHEMA)
    return database


def store_root(state_dir: Path) -> Path:
    """Where the image store of the runner whose state directory is ``state_dir`` lives."""
    return state_dir / "images"


def stored_id_range(root: Path) -> IdRange | None:
    """The id range the layers of the store at ``root`` were unpacked with; ``None`` for a new store."""
    if not (root / "store.db").exists():
        return None
    database = _open_database(root)
    try:
        row = database.execute("SELECT value FROM meta WHERE key = 'id_range'").fetchone()
    finally:
        database.close()
    if row is None:
        return None
    start, size = json.loads(row[0])
    return IdRange(start=int(start), size=int(size))


@contextlib.asynccontextmanager
async def _flock(path: Path, operation: int) -> AsyncIterator[None]:
    """Hold an flock on ``path``, polled so that waiting stays cancellable and never blocks the loop."""
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        while True:
            try:
                fcntl.flock(descriptor, operation | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                await asyncio.sleep(_LOCK_POLL)
        yield
    finally:
        os.close(descriptor)


#: The Debian suites that ``devyard.local/debian:SUITE`` is built for (with mmdebstrap) the first time it is
#: asked for, so that a runner that reaches no registry still has a base image.
BOOTSTRAP_SUITES = frozenset({"bookworm", "trixie", "bullseye", "stable", "testing", "unstable", "sid"})


def bootstrappable(reference: Reference) -> bool:
    """Whether ``prepare`` builds ``reference`` itself when it is missing: ``devyard.local/debian:SUITE``."""
    return reference.is_local and reference.repository == "debian" and reference.tag in BOOTSTRAP_SUITES


class ImageStore:
    """The image store under ``root``; implements ``image.ImageSource``. Call ``close`` when done."""

    def __init__(
        self,
        root: Path,
        *,
        id_range: IdRange,
        insecure: Collection[str] = (),
        credentials: Credentials | None = None,
        concurrency: int = 4,
    ) -> None:
        self.root = root
        self._id_range = id_range
        self.insecure = frozenset(insecure)
        self.credentials: Credentials = credentials or {}
        self.concurrency = concurrency
        self.blobs = root / "blobs" / "sha256"
        self.layers = root / "layers"
        self.locks = root / "locks"
        for directory in (self.blobs, self.layers, self.locks):
            directory.mkdir(parents=True, exist_ok=True)
        self._database = _open_database(root)
        self._check_id_range()
        self._inflight: dict[str, asyncio.Future[None]] = {}

    @property
    def id_range(self) -> IdRange:
        return self._id_range

    def close(self) -> None:
        self._database.close()

    def _check_id_range(self) -> None:
        wanted = json.dumps([self._id_range.start, self._id_range.size])
        with self._write() as database:
            row = database.execute("SELECT value FROM meta WHERE key = 'id_range'").fetchone()
            if row is None:
                database.execute("INSERT INTO meta (key, value) VALUES ('id_range', ?)", (wanted,))
            elif row[0] != wanted:
                raise PermanentError(
                    f"the image store {self.root} holds layers owned by the id range {row[0]} (start, size), but "
                    f"this runner uses {wanted}: give it another state directory, or remove {self.root}"
                )

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        database = self._database
        database.execute("BEGIN IMMEDIATE")
        try:
            yield database
        except BaseException:
            database.execute("ROLLBACK")
            raise
        database.execute("COMMIT")

    # --- ImageSource -------------------------------------------------------------------------------------------

    async def prepare(
        self,
        reference: str,
        *,
        holder: str,
        progress: ProgressCallback | None = None,
        credentials: Credentials | None = None,
    ) -> Prepared:
        parsed = parse_reference(reference)
        started = time.monotonic()
        if parsed.is_local and bootstrappable(parsed) and self._named_image(parsed) is None:
            await self._bootstrap_once(parsed, progress)
        built = time.monotonic() - started
        async with _flock(self.root / "store.lock", fcntl.LOCK_SH):
            cached = self._named_image(parsed)
            if cached is not None:
                if self._private(cached.digest):
                    await self._check_access(parsed, credentials)
                self._hold(holder, cached.digest)
                if progress is not None:
                    progress(Progress(str(parsed), 0, 0, len(cached.layers), len(cached.layers), "done"))
                return Prepared(cached, {"pull": round(built, 3), "unpack": 0.0})
            if parsed.is_local:
                raise PermanentError(
                    f"image {parsed} is not in the image store; images under {parsed.registry} are never pulled, "
                    "only made by `devyard image import` or `devyard image bootstrap`"
                )
            prepared = await self._pull(parsed, progress, credentials)
            self._hold(holder, prepared.image.digest)
            return prepared

    def _private(self, digest: str) -> bool:
        return self._database.execute("SELECT 1 FROM private_images WHERE digest = ?", (digest,)).fetchone() is not None

    async def _check_access(self, reference: Reference, credentials: Credentials | None) -> None:
        """An image pulled with credentials is not everyone's: before another environment uses the copy on this
        host, its registry must accept that environment's credentials for it (one manifest request). Raises
        ``PermanentError`` when it refuses them, ``TemporaryError`` when it cannot be asked."""
        async with RegistryClient(
            insecure=self.insecure, credentials={**self.credentials, **(credentials or {})}
        ) as client:
            await client.resolve(reference)

    async def _bootstrap_once(self, reference: Reference, progress: ProgressCallback | None) -> None:
        """Build ``devyard.local/debian:SUITE`` with mmdebstrap, once however many environments ask at a time."""
        key = f"bootstrap:{reference}"
        running = self._inflight.get(key)
        if running is not None:
            await asyncio.shield(running)
            return
        from devyard.runner.images.bootstrap import bootstrap_debian  # it imports this module

        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            if progress is not None:
                progress(Progress(str(reference), 0, 0, 0, 1, "bootstrap"))
            log.info("building %s from Debian's mirror with mmdebstrap (once; a minute or two)", reference)
            await bootstrap_debian(self, reference=str(reference), suite=reference.tag or "bookworm")
            future.set_result(None)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: the waiters re-raise it
            raise
        finally:
            del self._inflight[key]

    async def release(self, holder: str) -> None:
        with self._write() as database:
            database.execute("DELETE FROM holders WHERE holder = ?", (holder,))

    # --- what the CLI needs ------------------------------------------------------------------------------------

    async def pull(self, reference: str, progress: ProgressCallback | None = None) -> Prepared:
        """Resolve ``reference`` at its registry (even when a same-named image is here), fetch what is missing,
        and name the result ``reference``."""
        parsed = parse_reference(reference)
        if parsed.is_local:
            raise PermanentError(f"images under {parsed.registry} are never pulled; import or bootstrap them")
        async with _flock(self.root / "store.lock", fcntl.LOCK_SH):
            return await self._pull(parsed, progress)

    def images(self) -> list[StoredImage]:
        database = self._database
        names: dict[str, list[str]] = {}
        for reference, digest in database.execute("SELECT reference, digest FROM names ORDER BY reference"):
            names.setdefault(digest, []).append(reference)
        holders: dict[str, list[str]] = {}
        for holder, digest in database.execute("SELECT holder, digest FROM holders ORDER BY holder"):
            holders.setdefault(digest, []).append(holder)
        return [
            StoredImage(
                digest=digest,
                references=tuple(names.get(digest, ())),
                size=size,
                holders=tuple(holders.get(digest, ())),
                created=created,
                layers=len(_Record.from_json(record).layers),
            )
            for digest, record, size, created in database.execute(
                "SELECT digest, record, size, created FROM images ORDER BY created"
            )
        ]

    def holders(self) -> dict[str, str]:
        """Environment id -> the digest of the image it holds."""
        return dict(self._database.execute("SELECT holder, digest FROM holders ORDER BY holder").fetchall())

    def lookup(self, reference_or_digest: str) -> str | None:
        """The manifest digest a name (or a digest, or a unique hex prefix of 12 or more) refers to."""
        return self._target(reference_or_digest)[0]

    def _target(self, text: str) -> tuple[str | None, str | None]:
        """(digest, name): the image ``text`` refers to, and the normalized name when ``text`` is a name."""
        bare = text.removeprefix("sha256:")
        if len(bare) >= 12 and all(char in "0123456789abcdef" for char in bare):
            rows = self._database.execute("SELECT digest FROM images WHERE digest LIKE ?", (f"sha256:{bare}%",))
            found = [str(row[0]) for row in rows]
            if len(found) > 1:
                raise PermanentError(f"{text!r} is the start of {len(found)} image digests; give more of it")
            if found or text.startswith("sha256:"):
                return (found[0] if found else None), None
        name = str(parse_reference(text))
        row = self._database.execute("SELECT digest FROM names WHERE reference = ?", (name,)).fetchone()
        return (None if row is None else str(row[0])), name

    async def remove(self, reference_or_digest: str, *, force: bool = False) -> list[str]:
        """Remove a name, or with a digest the image and all its names; an image left without names is deleted
        (and garbage collected) unless environments hold it: then ``ImageInUse``, or with ``force`` their holds
        go too. Returns the names removed."""
        digest, name = self._target(reference_or_digest)
        if digest is None:
            raise PermanentError(f"no image {reference_or_digest!r} in the image store {self.root}")
        with self._write() as database:
            names = [row[0] for row in database.execute("SELECT reference FROM names WHERE digest = ?", (digest,))]
            removing = [name] if name is not None else names
            remaining = [other for other in names if other not in removing]
            holders = [row[0] for row in database.execute("SELECT holder FROM holders WHERE digest = ?", (digest,))]
            if not remaining and holders and not force:
                shown = ", ".join(holders[:5]) + (", ..." if len(holders) > 5 else "")
                raise ImageInUse(
                    f"image {reference_or_digest} is held by {len(holders)} environment(s) ({shown}); delete them "
                    "first, or force its removal"
                )
            database.executemany("DELETE FROM names WHERE reference = ?", [(each,) for each in removing])
            if not remaining:
                database.execute("DELETE FROM holders WHERE digest = ?", (digest,))
        if not remaining:
            await self.gc()
        return removing

    async def prune(self, repository: str, *, keep: int) -> list[str]:
        """Forget the names under ``repository`` (``devyard.local/build``: the build cache) of all but the ``keep``
        newest images, sparing those environments hold, then collect what nothing keeps; the names forgotten. A
        build whose image was pruned simply runs again."""
        prefix = f"{repository}:"
        with self._write() as database:
            named = [
                (str(reference), str(digest))
                for reference, digest in database.execute(
                    "SELECT names.reference, names.digest FROM names JOIN images ON images.digest = names.digest "
                    "ORDER BY images.created DESC, names.reference"
                )
                if str(reference).startswith(prefix)
            ]
            held = {str(row[0]) for row in database.execute("SELECT digest FROM holders")}
            newest = {digest for _, digest in named[:keep]}
            doomed = [reference for reference, digest in named if digest not in newest and digest not in held]
            database.executemany("DELETE FROM names WHERE reference = ?", [(each,) for each in doomed])
        if doomed:
            await self.gc()
        return doomed

    async def gc(self) -> GarbageReport:
        """Delete images neither named nor held, then blobs and layers no remaining image uses, and what crashed
        pulls and imports left behind. Waits for running pulls to finish (they hold the store lock)."""
        async with _flock(self.root / "store.lock", fcntl.LOCK_EX):
            with self._write() as database:
                doomed = database.execute(
                    "SELECT digest FROM images WHERE digest NOT IN (SELECT digest FROM names) "
                    "AND digest NOT IN (SELECT digest FROM holders)"
                ).fetchall()
                database.executemany("DELETE FROM images WHERE digest = ?", doomed)
                keep_blobs: set[str] = set()
                keep_layers: set[str] = set()
                for digest, text in database.execute("SELECT digest, record FROM images"):
                    record = _Record.from_json(text)
                    keep_blobs.update((_hex(digest), _hex(record.config_digest)))
                    keep_blobs.update(_hex(layer.digest) for layer in record.layers)
                    keep_layers.update(_hex(layer.diff_id) for layer in record.layers)
                database.execute(
                    f"DELETE FROM layers WHERE diff_id NOT IN ({','.join('?' * len(keep_layers))})",
                    [f"sha256:{name}" for name in keep_layers],
                )
            report = await asyncio.to_thread(self._sweep, keep_blobs, keep_layers)
        return GarbageReport(images=len(doomed), blobs=report[0], layers=report[1], temporary=report[2])

    def _sweep(self, keep_blobs: set[str], keep_layers: set[str]) -> tuple[int, int, int]:
        blobs = layers = temporary = 0
        for entry in self.blobs.iterdir():
            if entry.name not in keep_blobs:
                entry.unlink(missing_ok=True)
                if entry.name.startswith(TEMPORARY_PREFIX):
                    temporary += 1
                else:
                    blobs += 1
        for entry in self.layers.iterdir():
            if entry.name in keep_layers:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            if entry.name.startswith(TEMPORARY_PREFIX):
                temporary += 1
            else:
                layers += 1
        # No one holds a lock file while the store lock is held exclusively.
        for entry in self.locks.iterdir():
            entry.unlink(missing_ok=True)
        return blobs, layers, temporary

    async def import_archive(self, path: Path, reference: str, *, hand_over: bool = False) -> Image:
        """Import an OCI image layout (a directory or a tar of one), a ``docker save`` archive, or a plain root
        filesystem tarball (as a one-layer image running ``/bin/sh``), and name it ``reference``.

        ``hand_over``: the caller gives the files of the layout ``path`` to the store (the builder's result,
        removed after): they are hard-linked into the blobs where the file system allows, not copied (and still
        hashed), so the caller must neither change nor reuse them. Blobs the store has already are never read
        again, and layers it has unpacked already (by diff id) are not unpacked again."""
        parsed = parse_reference(reference)
        async with _flock(self.root / "store.lock", fcntl.LOCK_SH):
            scratch = self.root / f"{TEMPORARY_PREFIX}import-{secrets.token_hex(4)}"
            try:
                with _disk_errors(self.root, f"importing {path}"):
                    manifest = await asyncio.to_thread(self._ingest_archive, path, scratch, parsed, hand_over)
                    prepared = await self._complete(parsed, manifest, None, _Pull(str(parsed), None), time.monotonic())
            finally:
                await asyncio.to_thread(shutil.rmtree, scratch, True)
        return prepared.image

    async def export_layout(self, reference_or_digest: str, destination: Path) -> str:
        """Write the stored image as an OCI image layout in the new directory ``destination`` (blobs hard-linked
        where the file system allows, else copied), for builders that start from it; returns its digest."""
        async with _flock(self.root / "store.lock", fcntl.LOCK_SH):
            digest, name = self._target(reference_or_digest)
            row = (
                None
                if digest is None
                else self._database.execute("SELECT record FROM images WHERE digest = ?", (digest,)).fetchone()
            )
            if digest is None or row is None:
                raise PermanentError(f"no image {reference_or_digest!r} in the image store {self.root}")
            record = _Record.from_json(row[0])
            manifest = self._blob(digest)
            await asyncio.to_thread(
                _write_layout,
                destination,
                (manifest, self._blob(record.config_digest), *(self._blob(layer.digest) for layer in record.layers)),
                {
                    "mediaType": json.loads(manifest.read_bytes()).get("mediaType") or _OCI_MANIFEST,
                    "digest": digest,
                    "size": manifest.stat().st_size,
                    **({"annotations": {"org.opencontainers.image.ref.name": name}} if name else {}),
                },
            )
        return digest

    # --- pulling -----------------------------------------------------------------------------------------------

    def _named_image(self, reference: Reference) -> Image | None:
        row = self._database.execute("SELECT digest FROM names WHERE reference = ?", (str(reference),)).fetchone()
        return None if row is None else self._image(reference, str(row[0]))

    def _image(self, reference: Reference, digest: str) -> Image | None:
        """The image ``digest`` if its record and every layer directory are here."""
        row = self._database.execute("SELECT record, size FROM images WHERE digest = ?", (digest,)).fetchone()
        if row is None:
            return None
        record = _Record.from_json(row[0])
        layers = tuple(self.layers / _hex(layer.diff_id) for layer in record.layers)
        if not all(layer.is_dir() for layer in layers):
            return None
        return Image(reference=str(reference), digest=digest, config=record.config, layers=layers, size=int(row[1]))

    def _hold(self, holder: str, digest: str) -> None:
        with self._write() as database:
            database.execute("INSERT OR REPLACE INTO holders (holder, digest) VALUES (?, ?)", (holder, digest))

    async def _pull(
        self, reference: Reference, progress: ProgressCallback | None, credentials: Credentials | None = None
    ) -> Prepared:
        started = time.monotonic()
        state = _Pull(str(reference), progress)
        state.report("resolve")
        # The caller's credentials (an environment's registry secrets) come before the store's own.
        async with RegistryClient(
            insecure=self.insecure, credentials={**self.credentials, **(credentials or {})}
        ) as client:
            manifest = await client.resolve(reference)

            async def fetch(descriptor: Descriptor) -> None:
                await self._fetch_blob(client, reference, descriptor, state)

            with _disk_errors(self.root, f"pulling {reference}"):
                self._store_blob_bytes(manifest.digest, manifest.raw)
                prepared = await self._complete(reference, manifest, fetch, state, started)
        if reference.registry in (credentials or {}) or reference.registry in self.credentials:
            # Pulled with credentials: other environments must show theirs before they use this copy.
            with self._write() as database:
                database.execute("INSERT OR IGNORE INTO private_images (digest) VALUES (?)", (manifest.digest,))
        return prepared

    async def _complete(
        self,
        reference: Reference,
        manifest: Manifest,
        fetch: Callable[[Descriptor], Awaitable[None]] | None,
        state: _Pull,
        started: float,
    ) -> Prepared:
        """Fetch (``fetch``; ``None``: the blobs are here already) and unpack what is missing of ``manifest``,
        record the image and name it ``reference``."""
        context = f"image {reference}"
        existing = self._image(reference, manifest.digest)
        if existing is not None:
            self._name(reference, manifest.digest)
            state.layers_done = state.layers_total = len(existing.layers)
            state.report("done")
            return Prepared(existing, {"pull": time.monotonic() - started if fetch else 0.0, "unpack": 0.0})
        state.total = manifest.config.size + sum(layer.size for layer in manifest.layers)
        state.layers_total = len(manifest.layers)
        state.report("fetch")
        if fetch is not None:
            await fetch(manifest.config)
        config, diff_ids = _image_config(self._blob(manifest.config.digest).read_bytes(), context)
        if len(diff_ids) != len(manifest.layers):
            raise PermanentError(
                f"{context}: its config lists {len(diff_ids)} layers (diff ids) but its manifest {len(manifest.layers)}"
            )
        missing = [
            (layer, diff_id)
            for layer, diff_id in zip(manifest.layers, diff_ids, strict=True)
            if not (self.layers / _hex(diff_id)).is_dir()
        ]
        if fetch is not None:
            limit = asyncio.Semaphore(self.concurrency)

            async def bounded_fetch(descriptor: Descriptor) -> None:
                async with limit:
                    await fetch(descriptor)

            wanted = {layer.digest: layer for layer, _ in missing}
            state.add_bytes(sum(layer.size for layer in manifest.layers if layer.digest not in wanted))
            await _all(bounded_fetch(layer) for layer in wanted.values())
        pulled = time.monotonic()
        state.layers_done = state.layers_total - len(missing)
        state.report("unpack")
        limit = asyncio.Semaphore(max(1, min(self.concurrency, os.cpu_count() or 1)))

        async def bounded_unpack(layer: Descriptor, diff_id: str) -> None:
            async with limit:
                await self._unpack(layer, diff_id, context)
            state.layers_done += 1
            state.report()

        await _all(bounded_unpack(layer, diff_id) for layer, diff_id in missing)
        unpacked = time.monotonic()
        record = _Record(
            config_digest=manifest.config.digest,
            config=config,
            layers=tuple(
                _LayerRecord(layer.digest, diff_id, layer.media_type, layer.size)
                for layer, diff_id in zip(manifest.layers, diff_ids, strict=True)
            ),
        )
        with self._write() as database:
            sizes = dict(database.execute("SELECT diff_id, size FROM layers").fetchall())
            size = sum(int(sizes.get(diff_id, 0)) for diff_id in diff_ids)
            database.execute(
                "INSERT OR REPLACE INTO images (digest, record, size, created) VALUES (?, ?, ?, ?)",
                (manifest.digest, record.to_json(), size, time.time()),
            )
            database.execute(
                "INSERT OR REPLACE INTO names (reference, digest) VALUES (?, ?)", (str(reference), manifest.digest)
            )
        image = self._image(reference, manifest.digest)
        if image is None:
            raise TemporaryError(f"{context}: its layers vanished while it was recorded (a concurrent removal?)")
        state.report("done")
        timings = {"pull": pulled - started if fetch else 0.0, "unpack": unpacked - pulled}
        return Prepared(image, timings)

    def _name(self, reference: Reference, digest: str) -> None:
        with self._write() as database:
            database.execute("INSERT OR REPLACE INTO names (reference, digest) VALUES (?, ?)", (str(reference), digest))

    def _blob(self, digest: str) -> Path:
        return self.blobs / _hex(digest)

    def _temporary(self, directory: Path, name: str) -> Path:
        return directory / f"{TEMPORARY_PREFIX}{name}-{secrets.token_hex(4)}"

    def _store_blob_bytes(self, digest: str, data: bytes) -> None:
        final = self._blob(digest)
        if final.exists():
            return
        temporary = self._temporary(self.blobs, _hex(digest))
        try:
            temporary.write_bytes(data)
            os.rename(temporary, final)
        finally:
            temporary.unlink(missing_ok=True)

    async def _single_flight(self, key: str, work: Callable[[], Awaitable[None]]) -> None:
        """Run ``work`` once for concurrent callers with the same ``key`` in this process; all get its outcome."""
        running = self._inflight.get(key)
        if running is None:
            running = asyncio.ensure_future(work())
            self._inflight[key] = running

            def forget(done: asyncio.Future[None]) -> None:
                self._inflight.pop(key, None)
                if not done.cancelled():
                    done.exception()  # retrieved here too, in case every waiter was cancelled

            running.add_done_callback(forget)
        await asyncio.shield(running)

    async def _fetch_blob(
        self, client: RegistryClient, reference: Reference, descriptor: Descriptor, state: _Pull
    ) -> None:
        final = self._blob(descriptor.digest)
        if final.exists():
            state.add_bytes(descriptor.size)
            return

        async def work() -> None:
            async with _flock(self.locks / _hex(descriptor.digest), fcntl.LOCK_EX):
                if final.exists():
                    state.add_bytes(descriptor.size)
                    return
                temporary = self._temporary(self.blobs, _hex(descriptor.digest))
                try:
                    with _disk_errors(self.root, f"downloading {descriptor.digest} of {reference}"):
                        await client.fetch_blob(reference, descriptor, temporary, state.add_bytes)
                        os.rename(temporary, final)
                finally:
                    temporary.unlink(missing_ok=True)

        await self._single_flight(f"blob {descriptor.digest}", work)

    async def _unpack(self, layer: Descriptor, diff_id: str, context: str) -> None:
        destination = self.layers / _hex(diff_id)

        async def work() -> None:
            async with _flock(self.locks / _hex(diff_id), fcntl.LOCK_EX):
                if destination.is_dir():
                    return
                with _disk_errors(self.root, f"unpacking layer {layer.digest} of {context}"):
                    unpacked = await asyncio.to_thread(
                        unpack_layer, self._blob(layer.digest), destination, self._id_range, diff_id=diff_id
                    )
                with self._write() as database:
                    database.execute(
                        "INSERT OR REPLACE INTO layers (diff_id, size) VALUES (?, ?)", (diff_id, unpacked.size)
                    )

        await self._single_flight(f"layer {diff_id}", work)

    # --- importing ---------------------------------------------------------------------------------------------

    def _ingest_file(self, source: Path, expected: str | None = None, *, own: bool = False) -> tuple[str, int]:
        """Copy ``source`` into the blobs, hashing it; returns its digest and size. A blob the store has already
        (``expected``, verified when it came) is not read again. ``own``: the file is the store's to keep, so it
        is hard-linked when the file system allows (and hashed all the same) rather than copied."""
        if expected is not None and (existing := self._blob(expected)).exists():
            return expected, existing.stat().st_size
        temporary = self._temporary(self.blobs, "import")
        try:
            linked = False
            if own:
                with contextlib.suppress(OSError):  # another file system, or links refused: a copy
                    os.link(source, temporary)
                    linked = True
            hasher = hashlib.sha256()
            size = 0
            with (temporary if linked else source).open("rb") as reader:
                writer = None if linked else temporary.open("wb")
                try:
                    while chunk := reader.read(1 << 20):
                        hasher.update(chunk)
                        if writer is not None:
                            writer.write(chunk)
                        size += len(chunk)
                finally:
                    if writer is not None:
                        writer.close()
            digest = "sha256:" + hasher.hexdigest()
            if expected is not None and digest != expected:
                raise PermanentError(f"{source} is {digest}, not the {expected} its manifest names")
            final = self._blob(digest)
            if not final.exists():
                os.rename(temporary, final)
            return digest, size
        finally:
            temporary.unlink(missing_ok=True)

    def _store_json(self, data: Any) -> tuple[str, int, bytes]:
        raw = json.dumps(data, separators=(",", ":")).encode()
        digest = "sha256:" + hashlib.sha256(raw).hexdigest()
        self._store_blob_bytes(digest, raw)
        return digest, len(raw), raw

    def _ingest_archive(self, path: Path, scratch: Path, reference: Reference, hand_over: bool = False) -> Manifest:
        if not path.exists():
            raise PermanentError(f"there is no file or directory {path}")
        if path.is_dir():
            if not (path / "index.json").exists():
                raise PermanentError(f"{path} is a directory but no OCI image layout (it has no index.json)")
            return self._ingest_layout(path, reference, own=hand_over)
        try:
            with tarfile.open(path, "r:*") as archive:
                names = {name.removeprefix("./") for name in archive.getnames()}
        except tarfile.TarError as exc:
            raise PermanentError(
                f"{path} is neither an OCI layout, a docker save archive nor a tarball: {exc}"
            ) from exc
        if "index.json" in names and "oci-layout" in names:
            self._extract(path, scratch)
            return self._ingest_layout(scratch, reference, own=True)  # the scratch copy is the store's own
        if "manifest.json" in names:
            self._extract(path, scratch)
            return self._ingest_docker_save(scratch)
        return self._ingest_root_filesystem(path, scratch)

    def _extract(self, path: Path, scratch: Path) -> None:
        scratch.mkdir()
        with tarfile.open(path, "r:*") as archive:
            archive.extractall(scratch, filter="data")

    def _ingest_layout(self, layout: Path, reference: Reference, *, own: bool = False) -> Manifest:
        context = f"the OCI layout {layout}"
        entries = json.loads((layout / "index.json").read_bytes()).get("manifests") or []
        if not entries:
            raise PermanentError(f"{context} lists no manifests")
        chosen = entries[0]
        for entry in entries:
            annotations = entry.get("annotations") or {}
            if annotations.get("org.opencontainers.image.ref.name") in (reference.tag, str(reference)):
                chosen = entry
        descriptor = Descriptor.from_json(chosen, context)

        def blob(digest: str) -> Path:
            return layout / "blobs" / "sha256" / _hex(digest)

        raw = blob(descriptor.digest).read_bytes()
        media_type = str(json.loads(raw).get("mediaType") or descriptor.media_type)
        if media_type in INDEX_MEDIA_TYPES or b'"manifests"' in raw:
            descriptor = select_platform(raw, host_platform(), context)
            raw = blob(descriptor.digest).read_bytes()
            media_type = descriptor.media_type
        if "sha256:" + hashlib.sha256(raw).hexdigest() != descriptor.digest:
            raise PermanentError(f"{context}: the manifest blob {descriptor.digest} does not match its digest")
        manifest = parse_manifest(raw, descriptor.digest, media_type, context)
        for item in (manifest.config, *manifest.layers):
            self._ingest_file(blob(item.digest), expected=item.digest, own=own)
        self._store_blob_bytes(manifest.digest, raw)
        return manifest

    def _ingest_docker_save(self, directory: Path) -> Manifest:
        context = f"the docker save archive in {directory}"
        try:
            entry = json.loads((directory / "manifest.json").read_bytes())[0]
            config_path = directory / entry["Config"]
            layer_paths = [directory / layer for layer in entry["Layers"]]
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise PermanentError(f"{context}: malformed manifest.json") from exc
        config_digest, config_size = self._ingest_file(config_path)
        layers = []
        for layer_path in layer_paths:
            digest, size = self._ingest_file(layer_path)
            layers.append({"mediaType": _layer_media_type(layer_path), "digest": digest, "size": size})
        return self._manifest_of(config_digest, config_size, layers, context)

    def _ingest_root_filesystem(self, path: Path, scratch: Path) -> Manifest:
        scratch.mkdir()
        plain = scratch / "layer.tar"
        with plain.open("wb") as output:
            diff_id = decompress(path, output)
        layer_path = path if diff_id is None else plain
        digest, size = self._ingest_file(layer_path)
        platform = host_platform()
        config = {
            "architecture": platform.architecture,
            "os": platform.os,
            **({"variant": platform.variant} if platform.variant else {}),
            "config": {"Cmd": ["/bin/sh"], "Env": [_DEFAULT_PATH]},
            "rootfs": {"type": "layers", "diff_ids": [digest]},
        }
        config_digest, config_size, _ = self._store_json(config)
        layers = [{"mediaType": _OCI_LAYER, "digest": digest, "size": size}]
        return self._manifest_of(config_digest, config_size, layers, f"the root filesystem tarball {path}")

    def _manifest_of(
        self, config_digest: str, config_size: int, layers: list[dict[str, Any]], context: str
    ) -> Manifest:
        digest, _, raw = self._store_json(
            {
                "schemaVersion": 2,
                "mediaType": _OCI_MANIFEST,
                "config": {"mediaType": _OCI_CONFIG, "digest": config_digest, "size": config_size},
                "layers": layers,
            }
        )
        return parse_manifest(raw, digest, _OCI_MANIFEST, context)


def _write_layout(destination: Path, blobs: Collection[Path], descriptor: dict[str, Any]) -> None:
    directory = destination / "blobs" / "sha256"
    directory.mkdir(parents=True)
    for blob in blobs:
        try:
            os.link(blob, directory / blob.name)
        except FileExistsError:
            pass  # the same blob twice (two identical layers)
        except OSError:
            shutil.copyfile(blob, directory / blob.name)
    (destination / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": [descriptor]}
    (destination / "index.json").write_text(json.dumps(index))


def _layer_media_type(path: Path) -> str:
    with path.open("rb") as reader:
        head = reader.read(4)
    if head.startswith(b"\x1f\x8b"):
        return _OCI_LAYER + "+gzip"
    if head == b"\x28\xb5\x2f\xfd":
        return _OCI_LAYER + "+zstd"
    return _OCI_LAYER


async def _all(work: Iterator[Awaitable[None]] | Any) -> None:
    """Run the awaitables together; the first failure cancels the rest and is raised."""
    tasks = [asyncio.ensure_future(item) for item in work]
    if not tasks:
        return
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
