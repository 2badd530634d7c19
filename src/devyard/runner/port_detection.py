"""Which ports an environment has: those something listens on inside, those its dev container declares, those
its spec shares; and the ``status.ports`` the reconciler reports of them.

- ``read_listening``: the listening TCP sockets of ``/proc/<pid>/net/tcp`` and ``tcp6`` (state ``0A``). Those
  files show the network namespace of ``pid``, so the runtimes read a container's from outside, without entering
  it (``LinuxRuntime.listening_ports``), and the fake runtime the host's (``FakeRuntime.listening_ports``).
- ``keep_declared`` / ``load_declared``: devcontainer.json's ``forwardPorts``, ``appPort`` and ``portsAttributes``
  (as merged with the image's and the Features' metadata), kept as ``ports.json`` in the runner's directory of
  the environment (``DevContainers.directory``) when the dev container is resolved, read at every report.
- ``port_statuses``: the reconciler's ``_report`` calls it for a running environment.
- ``PortWatch``: the agent's loop that looks at the running environments every ``interval`` seconds and queues a
  reconcile of one whose listening ports changed, so a server started inside shows up within seconds.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import socket
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from devyard.runner.atomic_file import write_atomically
from devyard.runner.errors import RunnerError
from devyard.runner.runtime import ListeningPort, Runtime
from devyard.wire.environments import Admission, Environment, PortProtocol, PortStatus

__all__ = [
    "DeclaredPort",
    "PortWatch",
    "keep_declared",
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
