"""Unpack one layer tar (gzip, zstd, xz, bzip2 or plain) into a new directory, ready to be an overlayfs lower dir.

Called by the image store, once per layer (``unpack_layer``), in a worker thread. What it does to the entries:
- OCI whiteouts become overlayfs ones: ``.wh.NAME`` a 0/0 character device ``NAME``; ``.wh..wh..opq`` the xattr
  ``trusted.overlay.opaque=y`` on its directory.
- Owners are shifted into the runner's ``IdRange``; modes, symlinks, hard links (within the layer), device
  nodes, fifos, mtimes and ``user.*`` xattrs are kept; a ``security.capability`` is rewritten as a namespaced
  (v3) one whose root is the range's root, so file capabilities work inside the user namespace. Other xattrs
  (``trusted.*`` above all: ``trusted.overlay.*`` would steer overlayfs) are dropped.
- Hostile tars cannot write outside the directory: a ``..`` component refuses the layer, a leading ``/`` is
  dropped, and every parent directory is checked to be a real directory made by this unpack before anything
  is created under it (so a symlink entry cannot redirect later entries); a hard link must point inside.

Speed: the compressed blob is first decompressed (and hashed, to check its diff id) into a plain tar next to
the destination; then each file's bytes go from that tar to their file with ``copy_file_range``, never through
Python. The directory is built under a temporary name and renamed into place when complete.
"""

from __future__ import annotations

import bz2
import errno
import hashlib
import lzma
import os
import secrets
import shutil
import stat
import tarfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

import zstandard

from devyard.runner.errors import PermanentError
from devyard.runner.images.image import IdRange

__all__ = ["TEMPORARY_PREFIX", "UnpackedLayer", "UnsafeLayer", "decompress", "unpack_layer"]

#: Names under construction start with this; a crash leaves them behind for garbage collection.
TEMPORARY_PREFIX = ".tmp-"
_CHUNK = 1 << 20
_OPAQUE = ".wh..wh..opq"
_WHITEOUT = ".wh."
_ALLOWED_XATTR_PREFIXES = ("user.",)
_CAPABILITY = "security.capability"
_VFS_CAP_REVISION_2 = 0x02000000
_VFS_CAP_REVISION_3 = 0x03000000
_VFS_CAP_REVISION_MASK = 0xFF000000


class UnsafeLayer(PermanentError):
    """A layer tar that tries to write outside its directory, or is not a tar at all."""


@dataclass(frozen=True)
class UnpackedLayer:
    #: ``sha256:`` of the uncompressed tar.
    diff_id: str
    #: Bytes of the regular files in it.
    size: int


class _Decompressor(Protocol):
    @property
    def eof(self) -> bool: ...

    @property
    def unused_data(self) -> bytes: ...

    def decompress(self, data: bytes) -> bytes: ...


def _decompressor_for(head: bytes) -> Callable[[], _Decompressor] | None:
    if head.startswith(b"\x1f\x8b"):
        return lambda: zlib.decompressobj(wbits=31)
    if head.startswith(b"\x28\xb5\x2f\xfd"):
        return lambda: zstandard.ZstdDecompressor().decompressobj()
    if head.startswith(b"\xfd7zXZ\x00"):
        return lzma.LZMADecompressor
    if head.startswith(b"BZh"):
        return bz2.BZ2Decompressor
    return None


def decompress(source: Path, output: BinaryIO) -> str | None:
    """Write ``source`` uncompressed to ``output`` and return its ``sha256:`` digest; ``None`` (and nothing
    written) when ``source`` is not compressed."""
    with source.open("rb") as compressed:
        factory = _decompressor_for(compressed.read(8))
        if factory is None:
            return None
        compressed.seek(0)
        hasher = hashlib.sha256()
        decompressor = factory()
        while chunk := compressed.read(_CHUNK):
            while chunk:
                data = decompressor.decompress(chunk)
                if data:
                    hasher.update(data)
                    output.write(data)
                chunk = b""
                if decompressor.eof:
                    # Concatenated streams (pigz, multi-frame zstd): go on with a fresh decompressor; trailing
                    # zero padding is no stream.
                    chunk = decompressor.unused_data
                    if chunk.strip(b"\x00"):
                        decompressor = factory()
                    else:
                        chunk = b""
        return "sha256:" + hasher.hexdigest()


def _sha256_file(path: Path) -> str:
    hasher = hashlib.sha256()
    with path.open("rb") as source:
        while chunk := source.read(_CHUNK):
            hasher.update(chunk)
    return "sha256:" + hasher.hexdigest()


def unpack_layer(blob: Path, destination: Path, id_range: IdRange, *, diff_id: str | None = None) -> UnpackedLayer:
    """Unpack the layer ``blob`` into ``destination`` (which must not exist), atomically.

    ``diff_id``, when given, is checked against the uncompressed tar (``PermanentError`` if it differs).
    The work happens under temporary names in ``destination``'s parent, removed on failure.
    """
    parent = destination.parent
    token = secrets.token_hex(4)
    work = parent / f"{TEMPORARY_PREFIX}{destination.name}-{token}"
    plain_tar = parent / f"{TEMPORARY_PREFIX}{destination.name}-{token}.tar"
    try:
        with plain_tar.open("wb") as output:
            found = decompress(blob, output)
        if found is None:
            plain_tar.unlink()
            tar_path = blob
            found = _sha256_file(blob)
        else:
            tar_path = plain_tar
        if diff_id is not None and found != diff_id:
            raise PermanentError(f"layer {blob.name}: its uncompressed content is {found}, not the diff id {diff_id}")
        os.mkdir(work, 0o755)
        size = _Extraction(work, id_range).run(tar_path)
        os.rename(work, destination)
        return UnpackedLayer(found, size)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    finally:
        plain_tar.unlink(missing_ok=True)


def _clean_name(name: str) -> str:
    """A tar entry's path relative to the layer's root; refuses ``..``."""
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise UnsafeLayer(f"the layer's entry {name!r} goes up out of its directory ('..')")
    return "/".join(parts)


def _namespaced_capability(value: bytes, root: int) -> bytes | None:
    """A v2 or v3 ``security.capability`` value rewritten as v3 with ``root`` as the namespace's root."""
    if len(value) < 20:
        return None
    magic = int.from_bytes(value[:4], "little")
    if magic & _VFS_CAP_REVISION_MASK not in (_VFS_CAP_REVISION_2, _VFS_CAP_REVISION_3):
        return None
    flags = magic & ~_VFS_CAP_REVISION_MASK
    return (_VFS_CAP_REVISION_3 | flags).to_bytes(4, "little") + value[4:20] + root.to_bytes(4, "little")


class _Extraction:
    """One layer's entries written under ``root``; ``run`` returns the bytes of regular files."""

    def __init__(self, root: Path, id_range: IdRange) -> None:
        self.root = str(root)
        self.id_range = id_range
        self.root_id = id_range.host_id(0)
        #: Relative paths known to be real directories made (or checked) by this extraction; "" is the root.
        self.directories: set[str] = {""}
        #: Directories whose mtime is set at the end (making children changes a directory's mtime).
        self.directory_times: list[tuple[str, float]] = []
        os.chown(self.root, self.root_id, self.root_id)

    def run(self, tar_path: Path) -> int:
        size = 0
        with tar_path.open("rb") as raw:
            try:
                archive = tarfile.open(fileobj=raw, mode="r:")  # noqa: SIM115 (closed by the with below)
            except tarfile.TarError as exc:
                raise UnsafeLayer(f"the layer is not a tar archive: {exc}") from exc
            with archive:
                source = raw.fileno()
                try:
                    for member in archive:
                        size += self.entry(archive, member, source)
                except tarfile.TarError as exc:
                    raise UnsafeLayer(f"the layer's tar is damaged: {exc}") from exc
        for path, mtime in reversed(self.directory_times):
            os.utime(path, (mtime, mtime), follow_symlinks=False)
        return size

    def path(self, relative: str) -> str:
        return f"{self.root}/{relative}" if relative else self.root

    def ensure_directory(self, relative: str, entry: str) -> None:
        """Make sure every component of ``relative`` is a real directory (made here with root's ownership if
        missing); refuse a layer that routes an entry through a symlink or a file."""
        if relative in self.directories:
            return
        prefix = ""
        for component in relative.split("/"):
            prefix = f"{prefix}/{component}" if prefix else component
            if prefix in self.directories:
                continue
            full = self.path(prefix)
            try:
                found = os.lstat(full)
            except FileNotFoundError:
                os.mkdir(full, 0o755)
                os.lchown(full, self.root_id, self.root_id)
            else:
                if not stat.S_ISDIR(found.st_mode):
                    raise UnsafeLayer(
                        f"the layer's entry {entry!r} goes through {prefix!r}, which is not a directory in the "
                        "layer (a symlink?)"
                    )
            self.directories.add(prefix)

    def clear(self, relative: str, full: str, keep_directory: bool) -> None:
        """Remove what is at ``full`` so that a later entry replaces an earlier one (tar's rule)."""
        try:
            found = os.lstat(full)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(found.st_mode):
            if keep_directory:
                return
            shutil.rmtree(full)
            below = relative + "/"
            self.directories = {name for name in self.directories if name != relative and not name.startswith(below)}
        else:
            os.unlink(full)

    def entry(self, archive: tarfile.TarFile, member: tarfile.TarInfo, source: int) -> int:
        relative = _clean_name(member.name)
        parent, _, base = relative.rpartition("/")
        if relative:
            self.ensure_directory(parent, member.name)
        full = self.path(relative)
        if base.startswith(_WHITEOUT):
            self.whiteout(parent, base, member.name)
            return 0
        uid = self.id_range.host_id(member.uid)
        gid = self.id_range.host_id(member.gid)
        mode = member.mode & 0o7777
        if member.isdir():
            if relative:
                self.clear(relative, full, keep_directory=True)
                if relative not in self.directories:
                    os.mkdir(full, 0o700)
                    self.directories.add(relative)
            os.lchown(full, uid, gid)
            os.chmod(full, mode)
            self.xattrs(full, member, uid)
            self.directory_times.append((full, member.mtime))
            return 0
        if not relative:
            raise UnsafeLayer(f"the layer's entry {member.name!r} would replace the layer's root")
        self.clear(relative, full, keep_directory=False)
        if member.isreg():
            self.regular(archive, member, source, full, uid, gid, mode)
            return member.size
        if member.issym():
            os.symlink(member.linkname, full)
            os.lchown(full, uid, gid)
            os.utime(full, (member.mtime, member.mtime), follow_symlinks=False)
            return 0
        if member.islnk():
            target = _clean_name(member.linkname)
            target_parent = target.rpartition("/")[0]
            if not target or target_parent not in self.directories:
                raise UnsafeLayer(f"the layer's hard link {member.name!r} points outside it: {member.linkname!r}")
            try:
                os.link(self.path(target), full, follow_symlinks=False)
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise
                raise UnsafeLayer(
                    f"the layer's hard link {member.name!r} points to {member.linkname!r}, which it does not hold "
                    f"as a file ({exc.strerror})"
                ) from exc
            return 0
        if member.ischr() or member.isblk() or member.isfifo():
            kind = stat.S_IFCHR if member.ischr() else stat.S_IFBLK if member.isblk() else stat.S_IFIFO
            device = os.makedev(member.devmajor, member.devminor) if kind != stat.S_IFIFO else 0
            os.mknod(full, kind | 0o600, device)
            os.lchown(full, uid, gid)
            os.chmod(full, mode)
            os.utime(full, (member.mtime, member.mtime), follow_symlinks=False)
            return 0
        # Other types (GNU volume headers and the like) carry nothing a root filesystem needs.
        return 0

    def regular(
        self,
        archive: tarfile.TarFile,
        member: tarfile.TarInfo,
        source: int,
        full: str,
        uid: int,
        gid: int,
        mode: int,
    ) -> None:
        descriptor = os.open(full, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            if member.sparse is not None:
                extracted = archive.extractfile(member)
                assert extracted is not None
                with extracted, os.fdopen(os.dup(descriptor), "wb") as output:
                    shutil.copyfileobj(extracted, output, _CHUNK)
            else:
                _copy_range(source, descriptor, member.offset_data, member.size)
            os.fchown(descriptor, uid, gid)
            os.fchmod(descriptor, mode)
            self.xattrs(descriptor, member, uid)
            os.utime(descriptor, (member.mtime, member.mtime))
        finally:
            os.close(descriptor)

    def xattrs(self, target: str | int, member: tarfile.TarInfo, uid: int) -> None:
        if not member.pax_headers:
            return
        for key, text in member.pax_headers.items():
            if not key.startswith("SCHILY.xattr."):
                continue
            name = key[len("SCHILY.xattr.") :]
            value = text.encode("utf-8", "surrogateescape")
            if name == _CAPABILITY:
                converted = _namespaced_capability(value, self.root_id)
                if converted is None:
                    continue
                value = converted
            elif not name.startswith(_ALLOWED_XATTR_PREFIXES):
                continue
            try:
                os.setxattr(target, name, value)
            except OSError as exc:
                # A file system without user xattrs loses them, as tar itself would; a full disk does not pass.
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise

    def whiteout(self, parent: str, base: str, entry: str) -> None:
        if base == _OPAQUE:
            os.setxattr(self.path(parent), "trusted.overlay.opaque", b"y")
            return
        hidden = base[len(_WHITEOUT) :]
        if hidden in ("", ".", ".."):
            raise UnsafeLayer(f"the layer's whiteout {entry!r} names nothing")
        full = self.path(f"{parent}/{hidden}" if parent else hidden)
        if os.path.lexists(full):
            # The layer holds the name itself too: its own content wins over hiding the lower one.
            return
        os.mknod(full, stat.S_IFCHR | 0o600, os.makedev(0, 0))
        os.lchown(full, self.root_id, self.root_id)


def _copy_range(source: int, destination: int, offset: int, size: int) -> None:
    copied = 0
    while copied < size:
        done = os.copy_file_range(source, destination, size - copied, offset + copied)
        if done == 0:
            raise UnsafeLayer("the layer's tar ends in the middle of a file")
        copied += done
