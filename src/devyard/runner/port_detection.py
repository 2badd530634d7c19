"""Which ports an environment has: those something listens on inside, those its dev container declares, those
its spec shares; and the ``status.ports`` the reconciler reports of them.

- ``listening_ports_of`` / ``listening_in``: the listening TCP sockets of the network namespace of a process (or
  of the caller's own), asked of the kernel through netlink ``sock_diag`` (``SOCK_DIAG_BY_FAMILY``, listening
  state only). The runtimes call it at every report and the ``PortWatch`` every few seconds for every running
  environment (``LinuxRuntime.listening_ports`` for a container's, ``FakeRuntime.listening_ports`` for the
  host's), so it must stay cheap: the kernel walks only its table of listening sockets, where reading
  ``/proc/<pid>/net/tcp`` walks the host's whole table of established connections, milliseconds per file.
  The netlink socket answers for the namespace it was made in, so it is made in a thread that enters the
  process's namespace for that moment (``setns``) and goes back.
- ``read_listening``: the same from ``/proc/<pid>/net/tcp`` and ``tcp6`` (state ``0A``), which show the
  network namespace of ``pid``; what ``listening_in`` falls back to when a kernel refuses ``sock_diag``.
- ``keep_declared`` / ``load_declared``: devcontainer.json's ``forwardPorts``, ``appPort`` and ``portsAttributes``
  (as merged with the image's and the Features' metadata), kept as ``ports.json`` in the runner's directory of
  the environment (``DevContainers.directory``) when the dev container is resolved, read at every report.
- ``port_statuses``: the reconciler's ``_report`` calls it for a running environment.
- ``PortWatch``: the agent's loop that looks at the running environments every ``interval`` seconds and queues a
  reconcile of one whose listening ports changed, so a server started inside shows up within seconds.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import random
import socket
import struct
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from devyard.runner import container_files
from devyard.runner.atomic_file import write_atomically
from devyard.runner.errors import RunnerError
from devyard.runner.runtime import ListeningPort, Runtime
from devyard.wire.environments import Admission, Environment, PortProtocol, PortStatus

__all__ = [
    "DeclaredPort",
    "PortWatch",
    "keep_declared",
    "listening_in",
    "listening_ports_of",
    "listening_sockets",
    "load_declared",
    "port_statuses",
    "read_listening",
]

log = logging.getLogger(__name__)

_LISTEN: Final = "0A"
_DECLARED_FILE: Final = "ports.json"


def listening_sockets(text: str, *, ipv6: bool) -> list[tuple[ListeningPort, int]]:
    """The listening sockets of one ``/proc/net/tcp`` (or ``tcp6``) text, with their inodes."""
    found = []
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 10 or fields[3] != _LISTEN:
            continue
        address_hex, _, port_hex = fields[1].partition(":")
        try:
            port, inode = int(port_hex, 16), int(fields[9])
            raw = bytes.fromhex(address_hex)
        except ValueError:
            continue
        # The kernel prints the address as 32-bit words in host order (little-endian here).
        words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
        try:
            address = socket.inet_ntop(socket.AF_INET6 if ipv6 else socket.AF_INET, words)
        except ValueError:
            continue
        found.append((ListeningPort(port=port, address=address, ipv6=ipv6), inode))
    return found


def read_listening(proc_net: Path, *, inodes: set[int] | None = None) -> list[ListeningPort]:
    """The listening TCP ports of ``proc_net`` (``/proc/<pid>/net``), each once per address, sorted; with
    ``inodes``, only the sockets among them. Raises ``OSError`` when the files cannot be read (the process
    exited)."""
    ports: set[ListeningPort] = set()
    for name, ipv6 in (("tcp", False), ("tcp6", True)):
        try:
            text = (proc_net / name).read_text()
        except FileNotFoundError:
            if ipv6:
                continue  # a kernel without IPv6
            raise
        ports.update(port for port, inode in listening_sockets(text, ipv6=ipv6) if inodes is None or inode in inodes)
    return sorted(ports)


# Netlink and sock_diag, as <linux/netlink.h>, <linux/sock_diag.h> and <linux/inet_diag.h> lay them out.
_NETLINK_SOCK_DIAG: Final = 4
_SOCK_DIAG_BY_FAMILY: Final = 20
_NLM_F_REQUEST: Final = 0x01
_NLM_F_DUMP: Final = 0x300
_NLMSG_ERROR: Final = 2
_NLMSG_DONE: Final = 3
_TCP_LISTEN: Final = 10
#: nlmsghdr: length, type, flags, sequence, port id.
_HEADER: Final = struct.Struct("=IHHII")
#: inet_diag_req_v2: family, protocol, extensions, pad, states, then a zeroed inet_diag_sockid (48 bytes).
_REQUEST: Final = struct.Struct("=BBBBI48x")
#: inet_diag_msg: family, state, timer, retransmits; sockid: source port, destination port (big-endian), source
#: and destination addresses (16 bytes each, network order), interface, cookie; then expires, receive and send
#: queues, uid and inode.
_MESSAGE: Final = struct.Struct("=BBBB2s2s16s16sI8sIIIII")
_ERROR_CODE: Final = struct.Struct("=i")
_RECEIVE_BUFFER: Final = 64 * 1024
#: Errors of a kernel (or a sandbox) that does not answer sock_diag, or a caller not allowed into the namespace:
#: ``listening_in`` then reads ``/proc`` instead.
_REFUSED: Final = frozenset(
    {
        errno.EPROTONOSUPPORT,
        errno.EAFNOSUPPORT,
        errno.ENOENT,
        errno.EACCES,
        errno.EPERM,
        errno.EINVAL,
        errno.EOPNOTSUPP,
    }
)


async def listening_ports_of(pid: int | None, *, inodes: set[int] | None = None) -> list[ListeningPort]:
    """``listening_in`` in one hop to a worker thread, for the event loop's callers."""
    return await asyncio.to_thread(listening_in, pid, inodes=inodes)


def listening_in(pid: int | None, *, inodes: set[int] | None = None) -> list[ListeningPort]:
    """The listening TCP ports (IPv4 and IPv6) of the network namespace of ``pid`` (None: the caller's), each once
    per address, sorted; with ``inodes``, only the sockets among them. Blocks (briefly): call it from a thread,
    as ``listening_ports_of`` does. Enters the namespace with ``setns`` in the calling thread and leaves it before
    it returns. Raises ``OSError`` when the process is gone; reads ``/proc/<pid>/net`` (``read_listening``)
    when the kernel refuses sock_diag or entering the namespace."""
    proc_net = Path("/proc/self/net" if pid is None else f"/proc/{pid}/net")
    try:
        # Held open, the namespace outlives the process for as long as it is asked.
        inside = None if pid is None else os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise FileNotFoundError(errno.ENOENT, f"process {pid} is gone") from None
    except PermissionError as exc:  # another user's process: /proc/PID/net may still be readable
        log.debug("cannot open the network namespace of %s (%s); reading %s", pid, exc, proc_net)
        return read_listening(proc_net, inodes=inodes)
    try:
        with _diag_socket(inside) as diag:
            found = _dump_listening(diag, socket.AF_INET)
            try:
                found += _dump_listening(diag, socket.AF_INET6)
            except OSError as exc:
                if exc.errno not in _REFUSED:
                    raise
                # A kernel without IPv6 has no handler for its family; /proc then has no tcp6 either.
    except OSError as exc:
        if exc.errno not in _REFUSED:
            raise
        log.debug("sock_diag refused (%s); reading %s", exc, proc_net)
        return read_listening(proc_net, inodes=inodes)
    finally:
        if inside is not None:
            os.close(inside)
    return sorted({port for port, inode in found if inodes is None or inode in inodes})


def _diag_socket(namespace: int | None) -> socket.socket:
    """A NETLINK_SOCK_DIAG socket of the network namespace ``namespace`` (a descriptor of ``/proc/PID/ns/net``;
    None: the calling thread's own). A netlink socket answers for the namespace it was made in, wherever it is used
    later; so the calling thread enters the namespace just to make it, and goes back."""
    if namespace is None:
        return _netlink_socket()
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        here, there = os.fstat(own), os.fstat(namespace)
        if (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino):
            return _netlink_socket()  # already there: no setns, which needs CAP_SYS_ADMIN
        container_files.setns(namespace, container_files.CLONE_NEWNET)
        try:
            return _netlink_socket()
        finally:
            container_files.setns(own, container_files.CLONE_NEWNET)
    finally:
        os.close(own)


def _netlink_socket() -> socket.socket:
    diag = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, _NETLINK_SOCK_DIAG)
    # The kernel answers a dump while it handles the request; a timeout only guards against the unexpected.
    diag.settimeout(5)
    return diag


def _dump_listening(diag: socket.socket, family: int) -> list[tuple[ListeningPort, int]]:
    """Ask ``diag`` for the TCP sockets of ``family`` in the listening state; their ports and inodes. Raises
    ``OSError`` with the kernel's error code when it answers with an error."""
    sequence = family  # one request of each family per socket: the family tells the answers apart
    request = _REQUEST.pack(family, socket.IPPROTO_TCP, 0, 0, 1 << _TCP_LISTEN)
    diag.send(
        _HEADER.pack(_HEADER.size + len(request), _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST | _NLM_F_DUMP, sequence, 0)
        + request
    )
    found: list[tuple[ListeningPort, int]] = []
    while True:
        data, _, flags, _ = diag.recvmsg(_RECEIVE_BUFFER)
        if flags & socket.MSG_TRUNC:
            raise OSError(errno.EMSGSIZE, "a sock_diag answer was larger than the receive buffer")
        offset = 0
        while offset + _HEADER.size <= len(data):
            length, kind, _, answer_to, _ = _HEADER.unpack_from(data, offset)
            if length < _HEADER.size or offset + length > len(data):
                raise OSError(errno.EBADMSG, f"a malformed netlink message of {length} bytes from sock_diag")
            body = offset + _HEADER.size
            if answer_to == sequence:
                if kind == _NLMSG_DONE:
                    return found
                if kind == _NLMSG_ERROR:
                    (code,) = _ERROR_CODE.unpack_from(data, body)
                    if code == 0:  # an acknowledgement, not an error
                        return found
                    raise OSError(-code, f"sock_diag: {os.strerror(-code)}")
                if kind == _SOCK_DIAG_BY_FAMILY and length - _HEADER.size >= _MESSAGE.size:
                    found.append(_listening_port(data, body))
            # Netlink messages are aligned to 4 bytes.
            offset += (length + 3) & ~3


def _listening_port(data: bytes, offset: int) -> tuple[ListeningPort, int]:
    family, _, _, _, port, _, source, _, _, _, _, _, _, _, inode = _MESSAGE.unpack_from(data, offset)
    ipv6 = family == socket.AF_INET6
    address = socket.inet_ntop(socket.AF_INET6, source) if ipv6 else socket.inet_ntop(socket.AF_INET, source[:4])
    return ListeningPort(port=int.from_bytes(port, "big"), address=address, ipv6=ipv6), inode


@dataclass(frozen=True)
class DeclaredPort:
    """A port the dev container names: in ``forwardPorts`` or ``appPort``, or only in ``portsAttributes``."""

    port: int
    #: ``portsAttributes``' label.
    label: str = ""
    #: ``portsAttributes``' protocol (``http`` or ``https``), if given.
    protocol: str | None = None
    #: ``portsAttributes``' onAutoForward (``notify``, ``openBrowser``, ``silent``, ``ignore``...), if given.
    on_auto_forward: str | None = None
    #: Listed in ``forwardPorts`` or ``appPort`` (not only described by ``portsAttributes``).
    forwarded: bool = True


def keep_declared(
    directory: Path,
    *,
    forward_ports: Iterable[Any],
    app_ports: Iterable[str],
    ports_attributes: Mapping[str, Any],
) -> None:
    """Write what a merged dev container config says of ports to ``directory``. ``forward_ports`` are
    ``ForwardPort``s (only those of the container itself count: ``"db:5432"`` names another host), ``app_ports``
    appPort as written (``"3000"``, ``"8080:80"``: the container's port is the last), ``ports_attributes`` by
    port number or range (``"3000"``, ``"8000-8010"``); other keys (process names, regular expressions) are kept
    as they are but do not apply."""
    forwarded: list[int] = []
    for entry in forward_ports:
        if getattr(entry, "host", None) in (None, "localhost", "127.0.0.1"):
            forwarded.append(int(entry.port))
    for text in app_ports:
        tail = str(text).rsplit(":", 1)[-1]
        if tail.isdigit():
            forwarded.append(int(tail))
    document = {"forwarded": sorted(set(forwarded)), "attributes": dict(ports_attributes)}
    write_atomically(directory / _DECLARED_FILE, json.dumps(document).encode())


def load_declared(directory: Path) -> dict[int, DeclaredPort]:
    """What ``keep_declared`` wrote: port -> what the dev container says of it (empty without a file)."""
    try:
        document = json.loads((directory / _DECLARED_FILE).read_text())
    except (FileNotFoundError, ValueError):
        return {}
    if not isinstance(document, dict):
        return {}
    forwarded = {int(p) for p in document.get("forwarded", []) if isinstance(p, int) and 0 < p < 65536}
    attributes = document.get("attributes", {})
    declared = {port: DeclaredPort(port) for port in forwarded}
    if isinstance(attributes, dict):
        for key, value in attributes.items():
            if not isinstance(value, dict):
                continue
            for port in _ports_of(str(key)):
                declared[port] = DeclaredPort(
                    port,
                    label=str(value.get("label", "")),
                    protocol=value.get("protocol") if value.get("protocol") in ("http", "https") else None,
                    on_auto_forward=str(value["onAutoForward"]) if "onAutoForward" in value else None,
                    forwarded=port in forwarded,
                )
    return declared


def _ports_of(key: str) -> range:
    """The ports a portsAttributes key names: ``3000`` or ``8000-8010``; none for the other forms."""
    first, separator, last = key.partition("-")
    if first.isdigit() and (not separator or last.isdigit()):
        low, high = int(first), int(last) if separator else int(first)
        if 0 < low <= high < 65536 and high - low < 1024:
            return range(low, high + 1)
    return range(0)


def port_statuses(
    environment: Environment,
    listening: Iterable[ListeningPort],
    declared: Mapping[int, DeclaredPort],
    url: Callable[[str, int], str | None],
) -> list[PortStatus]:
    """``status.ports`` of a running environment: every port listening inside, every forwarded one, every shared
    one; named by the spec, else by portsAttributes' label; shared as the spec says, else with its owner only.
    ``url(environment_id, port)`` is where the runner's port proxy serves it (None without a proxy)."""
    environment_id = environment.metadata.id
    shared = {entry.port: entry for entry in environment.spec.ports}
    up = {port.port for port in listening}
    ports = up | {p.port for p in declared.values() if p.forwarded} | set(shared)
    statuses = []
    for port in sorted(ports):
        spec, described = shared.get(port), declared.get(port)
        label = described.label if described is not None else ""
        protocol = PortProtocol.HTTP
        if spec is not None:
            protocol = spec.protocol
        elif described is not None and described.protocol is not None:
            protocol = PortProtocol(described.protocol)
        statuses.append(
            PortStatus(
                port=port,
                name=(spec.name if spec is not None else "") or label,
                admission=spec.admission if spec is not None else Admission.OWNER,
                protocol=protocol,
                url=url(environment_id, port),
                listening=port in up,
                label=label,
                on_auto_forward=described.on_auto_forward if described is not None else None,
            )
        )
    return statuses


class PortWatch:
    """Every ``interval`` seconds (jittered), reads the listening ports of each running environment and calls
    ``changed(environment_id)`` for one whose set differs from the last look (the agent queues a reconcile, whose
    report then shows them)."""

    def __init__(
        self,
        runtime: Runtime,
        running: Callable[[], Iterable[str]],
        changed: Callable[[str], None],
        *,
        interval: float = 2.0,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._runtime = runtime
        self._running = running
        self._changed = changed
        self._interval = interval
        self._sleep = sleep
        self._seen: dict[str, frozenset[ListeningPort]] = {}

    def last(self, environment_id: str) -> list[ListeningPort] | None:
        """The ports seen at the last look, or None if it was not looked at yet."""
        seen = self._seen.get(environment_id)
        return sorted(seen) if seen is not None else None

    async def look(self) -> None:
        """One look at every running environment."""
        running = set(self._running())
        for environment_id in list(self._seen):
            if environment_id not in running:
                del self._seen[environment_id]
        for environment_id in sorted(running):
            try:
                ports = frozenset(await self._runtime.listening_ports(environment_id))
            except (RunnerError, OSError) as exc:
                log.debug("cannot read the listening ports of %s: %s", environment_id, exc)
                continue
            before = self._seen.get(environment_id, frozenset())
            self._seen[environment_id] = ports
            if before != ports:
                self._changed(environment_id)

    async def run(self) -> None:
        while True:
            try:
                await self.look()
            except Exception:
                log.exception("looking for listening ports failed; looking again in %.0f s", self._interval)
            await self._sleep(self._interval * random.uniform(0.8, 1.2))
