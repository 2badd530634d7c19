"""File access inside a running container, for the SSH gateway's SFTP: a small SFTP (version 3) server that runs as
a worker process of its own, inside the container's user and mount namespaces, as the container's remote user.

``ssh_gateway`` starts one worker per SFTP session (``worker_argv``) and relays the session's bytes to its stdin
and from its stdout. The worker, run as a script by the runner's Python, does in order:

1. opens ``/proc/PID/ns/user``, ``/proc/PID/ns/mnt`` and ``/proc/PID/root`` of the container's PID 1;
2. enters the user namespace, then the mount namespace (``setns``; a freshly started process has one thread, as
   entering a user namespace requires), and makes the container's root its own (``fchdir`` + ``chroot``);
3. looks the user up in the container's ``/etc/passwd`` and ``/etc/group``, and becomes it (groups, gid, uid):
   files it makes belong to that user inside (uid 1000 inside is 1,001,000 on the host);
4. serves SFTP on stdin and stdout until end of input.

Every path is resolved by the kernel inside the container's mount namespace and root: a symlink to ``/etc``
means the container's ``/etc``, never the host's, and the user's permissions apply as they would to a process
inside. The module uses the standard library only, all imported before step 2: the host's Python files are not
visible from inside.

``setns`` is also what ``ssh_gateway`` uses to open sockets inside a container's network namespace, and
``host_ids`` gives it the host's ids of a user inside, for the agent socket it makes there.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import struct
import sys
import time
from collections.abc import Callable
from typing import BinaryIO, Final

__all__ = ["CLONE_NEWNET", "host_ids", "setns", "worker_argv"]

CLONE_NEWNS: Final = 0x00020000
CLONE_NEWUSER: Final = 0x10000000
CLONE_NEWNET: Final = 0x40000000

_libc = ctypes.CDLL(None, use_errno=True)


def setns(descriptor: int, kind: int) -> None:
    """Move the calling thread into the namespace ``descriptor`` refers to (``os.setns`` from Python 3.12)."""
    if _libc.setns(descriptor, kind) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"setns: {os.strerror(code)}")


def worker_argv(pid: int, user: str) -> list[str]:
    """The command line of a worker serving the files of the container whose PID 1 is ``pid`` (on the host), as
    ``user`` (``name``, ``uid``, ``name:group`` or ``uid:gid``, as in the container's passwd and group files)."""
    # -I: nothing from the environment or the current directory; the module runs as a file, not from the
    # package, so the worker imports the standard library only.
    return [sys.executable, "-I", __file__, str(pid), user]


# The SFTP protocol (draft-ietf-secsh-filexfer-02, which OpenSSH speaks).

_INIT, _VERSION = 1, 2
_OPEN, _CLOSE, _READ, _WRITE, _LSTAT, _FSTAT, _SETSTAT, _FSETSTAT = 3, 4, 5, 6, 7, 8, 9, 10
_OPENDIR, _READDIR, _REMOVE, _MKDIR, _RMDIR, _REALPATH, _STAT, _RENAME = 11, 12, 13, 14, 15, 16, 17, 18
_READLINK, _SYMLINK = 19, 20
_STATUS, _HANDLE, _DATA, _NAME, _ATTRS = 101, 102, 103, 104, 105
_EXTENDED, _EXTENDED_REPLY = 200, 201

_OK, _EOF, _NO_SUCH_FILE, _PERMISSION_DENIED, _FAILURE, _BAD_MESSAGE, _UNSUPPORTED = 0, 1, 2, 3, 4, 5, 8

_READ_FLAG, _WRITE_FLAG, _APPEND, _CREAT, _TRUNC, _EXCL = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
_ATTR_SIZE, _ATTR_UIDGID, _ATTR_PERMISSIONS, _ATTR_TIMES, _ATTR_EXTENDED = 0x1, 0x2, 0x4, 0x8, 0x80000000

_MAX_PACKET: Final = 256 * 1024
_MAX_READ: Final = 64 * 1024
_DIRECTORY_BATCH: Final = 100


class _Failure(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class _Packet:
    def __init__(self, data: bytes) -> None:
        self._data = data
        self._offset = 0

    def uint32(self) -> int:
        value: int = struct.unpack_from(">I", self._data, self._offset)[0]
        self._offset += 4
        return value

    def uint64(self) -> int:
        value: int = struct.unpack_from(">Q", self._data, self._offset)[0]
        self._offset += 8
        return value

    def string(self) -> bytes:
        length = self.uint32()
        value = self._data[self._offset : self._offset + length]
        if len(value) != length:
            raise _Failure(_BAD_MESSAGE, "truncated packet")
        self._offset += length
        return value

    def attributes(self) -> dict[str, int]:
        flags = self.uint32()
        found: dict[str, int] = {}
        if flags & _ATTR_SIZE:
            found["size"] = self.uint64()
        if flags & _ATTR_UIDGID:
            found["uid"], found["gid"] = self.uint32(), self.uint32()
        if flags & _ATTR_PERMISSIONS:
            found["mode"] = self.uint32()
        if flags & _ATTR_TIMES:
            found["atime"], found["mtime"] = self.uint32(), self.uint32()
        if flags & _ATTR_EXTENDED:
            for _ in range(self.uint32()):
                self.string()
                self.string()
        return found


def _string(value: bytes) -> bytes:
    return struct.pack(">I", len(value)) + value


def _encode_attributes(info: os.stat_result) -> bytes:
    flags = _ATTR_SIZE | _ATTR_UIDGID | _ATTR_PERMISSIONS | _ATTR_TIMES
    return struct.pack(
        ">IQIIIII",
        flags,
        info.st_size,
        info.st_uid,
        info.st_gid,
        info.st_mode,
        int(info.st_atime) & 0xFFFFFFFF,
        int(info.st_mtime) & 0xFFFFFFFF,
    )


def _long_name(name: bytes, info: os.stat_result) -> bytes:
    """A line as ``ls -l`` prints it, which ``sftp``'s ``ls -l`` shows."""
    when = time.strftime("%b %d %H:%M", time.localtime(info.st_mtime))
    owners = f"{info.st_uid:<8d} {info.st_gid:<8d}"
    line = f"{stat.filemode(info.st_mode)} {info.st_nlink:3d} {owners} {info.st_size:8d} {when} "
    return line.encode() + name


def _status_of(error: OSError) -> tuple[int, str]:
    if error.errno == errno.ENOENT:
        return _NO_SUCH_FILE, "No such file or directory"
    if error.errno in (errno.EACCES, errno.EPERM):
        return _PERMISSION_DENIED, "Permission denied"
    return _FAILURE, error.strerror or str(error)


class _Server:
    """Serves one SFTP session on two file objects; every path as this process sees them."""

    def __init__(self, source: BinaryIO, sink: BinaryIO) -> None:
        self._source = source
        self._sink = sink
        self._files: dict[bytes, int] = {}
        self._directories: dict[bytes, tuple[bytes, list[bytes]]] = {}
        self._next_handle = 0
        self._handlers: dict[int, Callable[[int, _Packet], bytes]] = {
            _OPEN: self._open,
            _CLOSE: self._close,
            _READ: self._read,
            _WRITE: self._write,
            _LSTAT: lambda request, packet: self._stat(request, packet, follow=False),
            _STAT: lambda request, packet: self._stat(request, packet, follow=True),
            _FSTAT: self._fstat,
            _SETSTAT: self._setstat,
            _FSETSTAT: self._fsetstat,
            _OPENDIR: self._opendir,
            _READDIR: self._readdir,
            _REMOVE: self._remove,
            _MKDIR: self._mkdir,
            _RMDIR: self._rmdir,
            _REALPATH: self._realpath,
            _RENAME: self._rename,
            _READLINK: self._readlink,
            _SYMLINK: self._symlink,
            _EXTENDED: self._extended,
        }

    def serve(self) -> None:
        while True:
            header = self._receive(4)
            if header is None:
                return
            (length,) = struct.unpack(">I", header)
            if not 1 <= length <= _MAX_PACKET:
                return
            body = self._receive(length)
            if body is None:
                return
            kind, packet = body[0], _Packet(body[1:])
            if kind == _INIT:
                extensions = [(b"posix-rename@openssh.com", b"1"), (b"fsync@openssh.com", b"1")]
                reply = struct.pack(">BI", _VERSION, 3) + b"".join(_string(n) + _string(v) for n, v in extensions)
                self._send(reply)
                continue
            request = packet.uint32()
            handler = self._handlers.get(kind)
            try:
                if handler is None:
                    raise _Failure(_UNSUPPORTED, f"operation {kind} is not supported")
                self._send(handler(request, packet))
            except _Failure as failure:
                self._send(self._status(request, failure.code, str(failure)))
            except OSError as error:
                self._send(self._status(request, *_status_of(error)))
            except (struct.error, ValueError) as error:
                self._send(self._status(request, _BAD_MESSAGE, str(error)))
        # Open descriptors close with the process.

    def _receive(self, size: int) -> bytes | None:
        data = b""
        while len(data) < size:
            chunk = self._source.read(size - len(data))
            if not chunk:
                return None
            data += chunk
        return data

    def _send(self, payload: bytes) -> None:
        self._sink.write(struct.pack(">I", len(payload)) + payload)
        self._sink.flush()

    @staticmethod
    def _status(request: int, code: int, message: str = "") -> bytes:
        return struct.pack(">BII", _STATUS, request, code) + _string(message.encode()) + _string(b"en")

    def _ok(self, request: int) -> bytes:
        return self._status(request, _OK, "Success")

    def _new_handle(self) -> bytes:
        self._next_handle += 1
        return str(self._next_handle).encode()

    def _file(self, handle: bytes) -> int:
        if handle not in self._files:
            raise _Failure(_FAILURE, "no such file handle")
        return self._files[handle]

    @staticmethod
    def _names(request: int, entries: list[tuple[bytes, bytes, bytes]]) -> bytes:
        body = b"".join(_string(name) + _string(long) + attributes for name, long, attributes in entries)
        return struct.pack(">BII", _NAME, request, len(entries)) + body

    @staticmethod
    def _apply(path: bytes | int, attributes: dict[str, int]) -> None:
        if "size" in attributes:
            os.truncate(path, attributes["size"])
        if "uid" in attributes:
            os.chown(path, attributes["uid"], attributes["gid"])
        if "mode" in attributes:
            os.chmod(path, stat.S_IMODE(attributes["mode"]))
        if "mtime" in attributes:
            os.utime(path, (attributes["atime"], attributes["mtime"]))

    # Requests.

    def _open(self, request: int, packet: _Packet) -> bytes:
        path, pflags, attributes = packet.string(), packet.uint32(), packet.attributes()
        flags = os.O_CLOEXEC
        if pflags & _READ_FLAG and pflags & _WRITE_FLAG:
            flags |= os.O_RDWR
        elif pflags & _WRITE_FLAG:
            flags |= os.O_WRONLY
        if pflags & _APPEND:
            flags |= os.O_APPEND
        if pflags & _CREAT:
            flags |= os.O_CREAT
        if pflags & _TRUNC:
            flags |= os.O_TRUNC
        if pflags & _EXCL:
            flags |= os.O_EXCL
        descriptor = os.open(path, flags, stat.S_IMODE(attributes.get("mode", 0o666)))
        handle = self._new_handle()
        self._files[handle] = descriptor
        return struct.pack(">BI", _HANDLE, request) + _string(handle)

    def _close(self, request: int, packet: _Packet) -> bytes:
        handle = packet.string()
        if handle in self._directories:
            del self._directories[handle]
            return self._ok(request)
        os.close(self._file(handle))
        del self._files[handle]
        return self._ok(request)

    def _read(self, request: int, packet: _Packet) -> bytes:
        descriptor, offset, length = self._file(packet.string()), packet.uint64(), packet.uint32()
        data = os.pread(descriptor, min(length, _MAX_READ), offset)
        if not data:
            return self._status(request, _EOF, "End of file")
        return struct.pack(">BI", _DATA, request) + _string(data)

    def _write(self, request: int, packet: _Packet) -> bytes:
        descriptor, offset, data = self._file(packet.string()), packet.uint64(), packet.string()
        while data:
            written = os.pwrite(descriptor, data, offset)
            data, offset = data[written:], offset + written
        return self._ok(request)

    def _stat(self, request: int, packet: _Packet, *, follow: bool) -> bytes:
        info = os.stat(packet.string(), follow_symlinks=follow)
        return struct.pack(">BI", _ATTRS, request) + _encode_attributes(info)

    def _fstat(self, request: int, packet: _Packet) -> bytes:
        info = os.fstat(self._file(packet.string()))
        return struct.pack(">BI", _ATTRS, request) + _encode_attributes(info)

    def _setstat(self, request: int, packet: _Packet) -> bytes:
        self._apply(packet.string(), packet.attributes())
        return self._ok(request)

    def _fsetstat(self, request: int, packet: _Packet) -> bytes:
        self._apply(self._file(packet.string()), packet.attributes())
        return self._ok(request)

    def _opendir(self, request: int, packet: _Packet) -> bytes:
        path = packet.string()
        names = [b".", b"..", *sorted(os.listdir(path))]
        handle = self._new_handle()
        self._directories[handle] = (path, names)
        return struct.pack(">BI", _HANDLE, request) + _string(handle)

    def _readdir(self, request: int, packet: _Packet) -> bytes:
        handle = packet.string()
        if handle not in self._directories:
            raise _Failure(_FAILURE, "no such directory handle")
        path, names = self._directories[handle]
        if not names:
            return self._status(request, _EOF, "End of directory")
        batch, names[:] = names[:_DIRECTORY_BATCH], names[_DIRECTORY_BATCH:]
        entries = []
        for name in batch:
            try:
                info = os.lstat(os.path.join(path, name))
            except OSError:
                continue  # removed since the listing
            entries.append((name, _long_name(name, info), _encode_attributes(info)))
        return self._names(request, entries)

    def _remove(self, request: int, packet: _Packet) -> bytes:
        os.unlink(packet.string())
        return self._ok(request)

    def _mkdir(self, request: int, packet: _Packet) -> bytes:
        path, attributes = packet.string(), packet.attributes()
        os.mkdir(path, stat.S_IMODE(attributes.get("mode", 0o777)))
        return self._ok(request)

    def _rmdir(self, request: int, packet: _Packet) -> bytes:
        os.rmdir(packet.string())
        return self._ok(request)

    def _realpath(self, request: int, packet: _Packet) -> bytes:
        path = packet.string() or b"."
        resolved = os.path.realpath(path)
        return self._names(request, [(resolved, resolved, struct.pack(">I", 0))])

    def _rename(self, request: int, packet: _Packet) -> bytes:
        old, new = packet.string(), packet.string()
        # SFTP's rename fails on an existing target (posix-rename@openssh.com replaces it).
        if os.path.lexists(new):
            raise _Failure(_FAILURE, "the target exists")
        os.rename(old, new)
        return self._ok(request)

    def _readlink(self, request: int, packet: _Packet) -> bytes:
        target = os.readlink(packet.string())
        return self._names(request, [(target, target, struct.pack(">I", 0))])

    def _symlink(self, request: int, packet: _Packet) -> bytes:
        # OpenSSH sends the target first, then the link (the reverse of the draft); so do its clients.
        target, link = packet.string(), packet.string()
        os.symlink(target, link)
        return self._ok(request)

    def _extended(self, request: int, packet: _Packet) -> bytes:
        name = packet.string()
        if name == b"posix-rename@openssh.com":
            old, new = packet.string(), packet.string()
            os.rename(old, new)
            return self._ok(request)
        if name == b"fsync@openssh.com":
            os.fsync(self._file(packet.string()))
            return self._ok(request)
        raise _Failure(_UNSUPPORTED, f"extension {name.decode(errors='replace')} is not supported")


# The worker.


def _lookup_user(user: str, root: str = "") -> tuple[int, int, list[int], bytes]:
    """(uid, gid, supplementary groups, home) of ``user`` from the passwd and group files under ``root``."""
    name, _, group = user.partition(":")
    uid: int | None = None
    gid, home, login = 0, b"/", ""

    def rows(path: str) -> list[list[str]]:
        try:
            with open(root + path, encoding="utf-8", errors="replace") as file:
                return [line.rstrip("\n").split(":") for line in file]
        except OSError:
            return []

    for fields in rows("/etc/passwd"):
        if not (len(fields) >= 6 and fields[2].isdigit() and fields[3].isdigit()):
            continue
        if fields[0] == name or (name.isdigit() and int(fields[2]) == int(name)):
            uid, gid, home, login = int(fields[2]), int(fields[3]), fields[5].encode(), fields[0]
            break
    if uid is None:
        if not name.isdigit():
            raise OSError(f"no user {name!r} in the container's /etc/passwd")
        uid = int(name)
    groups = rows("/etc/group")
    if group:
        matches = [int(f[2]) for f in groups if len(f) >= 3 and f[2].isdigit() and group in (f[0], f[2])]
        if not matches and not group.isdigit():
            raise OSError(f"no group {group!r} in the container's /etc/group")
        gid = matches[0] if matches else int(group)
    supplementary = sorted(
        {int(f[2]) for f in groups if len(f) >= 4 and f[2].isdigit() and login and login in f[3].split(",")} - {gid}
    )
    return uid, gid, supplementary, home


def host_ids(pid: int, user: str) -> tuple[int, int]:
    """The host's uid and gid of ``user`` (as ``worker_argv`` takes it) in the container whose PID 1 is ``pid``:
    for files the runner makes inside from outside, such as the SSH agent's socket."""
    uid, gid, _, _ = _lookup_user(user or _pid1_user(pid), f"/proc/{pid}/root")
    return _to_host(pid, "uid_map", uid), _to_host(pid, "gid_map", gid)


def _to_host(pid: int, map_name: str, inside: int) -> int:
    with open(f"/proc/{pid}/{map_name}") as mapping:
        for line in mapping:
            first, lower, count = (int(field) for field in line.split())
            if first <= inside < first + count:
                return lower + inside - first
    raise OSError(f"id {inside} is not mapped in the user namespace of pid {pid}")


def _pid1_user(pid: int) -> str:
    """``uid:gid`` of ``pid`` inside its user namespace: the user a session runs as when none is configured."""
    ids = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(("Uid:", "Gid:")):
                ids[line[:3]] = int(line.split()[1])
    inside = []
    for kind, map_name in (("Uid", "uid_map"), ("Gid", "gid_map")):
        with open(f"/proc/{pid}/{map_name}") as mapping:
            for line in mapping:
                first, lower, count = (int(field) for field in line.split())
                if lower <= ids[kind] < lower + count:
                    inside.append(first + ids[kind] - lower)
                    break
            else:
                raise OSError(f"{kind.lower()} {ids[kind]} of pid {pid} is not mapped in its user namespace")
    return f"{inside[0]}:{inside[1]}"


def _enter(pid: int, user: str) -> bytes:
    """Enter the container of ``pid`` as ``user`` (empty: as its PID 1); return the user's home."""
    user = user or _pid1_user(pid)
    user_ns = os.open(f"/proc/{pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    mount_ns = os.open(f"/proc/{pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
    root = os.open(f"/proc/{pid}/root", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    # The host's /proc: inside, /proc is the container's, where this process has no entry.
    proc_self = os.open("/proc/self", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    setns(user_ns, CLONE_NEWUSER)
    setns(mount_ns, CLONE_NEWNS)
    os.fchdir(root)
    os.chroot(".")
    for descriptor in (user_ns, mount_ns, root):
        os.close(descriptor)
    # Become root of the container first: ids the kernel counts as root there, so that the change to the user
    # below clears every capability (from the host's uid 0, unmapped inside, it would keep them all).
    os.setresgid(0, 0, 0)
    os.setresuid(0, 0, 0)
    uid, gid, groups, home = _lookup_user(user)
    os.setgroups(groups)
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    if uid != 0 and _effective_capabilities(proc_self) != 0:
        raise OSError(errno.EPERM, "the worker kept capabilities after becoming the user")
    os.close(proc_self)
    os.umask(0o022)
    try:
        os.chdir(home)
    except OSError:
        os.chdir("/")
    return home


def _effective_capabilities(proc_self: int) -> int:
    descriptor = os.open("status", os.O_RDONLY | os.O_CLOEXEC, dir_fd=proc_self)
    with os.fdopen(descriptor) as status:
        for line in status:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    return 0


def _main(argv: list[str]) -> int:
    if len(argv) != 2 or not argv[0].isdigit():
        print("usage: container_files.py PID USER", file=sys.stderr)
        return 2
    try:
        _enter(int(argv[0]), argv[1])
    except OSError as error:
        print(f"cannot enter the container of pid {argv[0]}: {error}", file=sys.stderr)
        return 1
    _Server(sys.stdin.buffer, sys.stdout.buffer).serve()
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
