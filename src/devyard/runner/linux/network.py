"""Environment networks: one network namespace per environment, a veth pair to the runner's bridge, addresses
from the runner's subnet, NAT egress and isolation with nftables, and the environment's resolv.conf and hosts.

Called by ``linux.runtime.LinuxRuntime``: ``setup`` once, ``attach`` before a container is created (the container
joins ``Attachment.netns_path``), ``detach`` when it is deleted; ``attachments`` lists what the host has, for
adoption; ``repair`` (at start) and ``orphans`` (``devyard runner doctor``) find what a killed runner left.

What is where:
- namespaces: a bind mount of each environment's network namespace at ``<netns_dir>/<environment id>``
  (``/run/devyard/netns`` by default; ``ip netns`` only knows /run/netns, so ``unshare --net=PATH`` makes them).
- addresses: one file per allocation, ``<state_dir>/network/addresses/<address>`` holding the environment id and
  its host name. A file is written under a temporary name and hard-linked into place, so an address is taken
  atomically (two attaches never get the same one) and a file, once visible, is complete.
- the veth: host end ``dy`` + 10 hex digits of a hash of the bridge and the environment id, its ``ifalias``
  ``<bridge>/<environment id>``, a port of the bridge with ``isolated on``; the other end is ``eth0`` in the
  namespace, made there directly (``peer ... netns PATH``), so it never shows up on the host.
- nftables: the table ``inet devyard`` (``inet devyard_<bridge>`` for another bridge), replaced as a whole and
  atomically by ``setup``; no other table is touched (Docker and the operator keep theirs).

Isolation: bridge ports are isolated (no frame goes from one environment to another), and the table drops what
an environment sends to the host itself (except ``allowed_host_ports`` on the gateway address), to link-local
addresses (cloud metadata), to the subnet (belt and braces) and to ``blocked_ranges``; IPv6 is off in the
namespaces (but for ::1) and dropped from the bridge. New connections from outside into the subnet are dropped;
replies pass. Everyone may bind low ports and ping inside a namespace: root in a container has no network
capabilities there, since the namespace belongs to the host's user namespace.
Egress is masqueraded; that needs ``net.ipv4.ip_forward=1``, which ``setup`` sets (and logs). A host whose
forward chain drops by default in another table (Docker's does) must accept the bridge's traffic there too.

DNS: an environment cannot reach the host, so its resolv.conf lists resolvers it can reach: the IPv4 name
servers of the host's /etc/resolv.conf that are neither loopback nor blocked; if none (systemd-resolved's
127.0.0.53), those of /run/systemd/resolve/resolv.conf (the upstream list); if none, ``fallback_nameservers``.

Crash safety: ``attach`` takes an address, then makes the namespace, then the veth; ``detach`` undoes them in the
reverse order. Whatever a kill leaves, ``repair`` finishes (a namespace with an address gets its veth back) or
undoes (an address without a namespace, a veth without a namespace, a namespace without an address).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import json
import logging
import os
import re
import uuid
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from devyard.runner import container_files, errors

if TYPE_CHECKING:
    from devyard.runner.settings import RunnerSettings

__all__ = ["NETNS_DIR", "Attachment", "Network", "table_name", "veth_name"]

log = logging.getLogger(__name__)

#: Where the namespaces of the environments are bind-mounted unless a ``Network`` is told otherwise.
NETNS_DIR = Path("/run/devyard/netns")
#: Link-local addresses, where clouds serve instance metadata (169.254.169.254) and credentials.
LINK_LOCAL = ipaddress.IPv4Network("169.254.0.0/16")
#: What Docker falls back to as well when the host has no resolver an environment can reach.
DEFAULT_FALLBACK_NAMESERVERS = ("8.8.8.8", "8.8.4.4")

_ENVIRONMENT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_PENDING_PREFIX = ".pending-"
# The name of the interface inside every namespace.
_INSIDE = "eth0"
#: Set in each environment's namespace. IPv4 only: no IPv6 addresses inside, not even link-local ones, set before
#: eth0 exists, except ::1, which dev servers bind for "localhost" (the hosts file names it). The namespace
#: belongs to the host's user namespace, so root inside a container has no network capabilities in it: let
#: everyone bind low ports (a dev server on :80) and ping, as Docker does for its containers.
_NAMESPACE_SYSCTLS = {
    "net.ipv6.conf.all.disable_ipv6": "1",
    "net.ipv6.conf.default.disable_ipv6": "1",
    "net.ipv6.conf.lo.disable_ipv6": "0",
    "net.ipv4.ip_unprivileged_port_start": "0",
    "net.ipv4.ping_group_range": "0 2147483647",
}


@dataclass(frozen=True)
class Attachment:
    """One environment's place on the runner's network."""

    environment_id: str
    #: A bind mount of the namespace (``/run/devyard/netns/<id>``): the container's ``network`` namespace path.
    netns_path: Path
    address: ipaddress.IPv4Address
    gateway: ipaddress.IPv4Address
    #: The host-side end of the veth pair.
    host_interface: str
    #: The contents of the environment's /etc/resolv.conf and /etc/hosts.
    resolv_conf: str
    hosts: str
    #: The host name in ``hosts``.
    hostname: str = ""


def veth_name(bridge: str, environment_id: str) -> str:
    """The host end of an environment's veth: ``dy`` and 10 hex digits (interface names have at most 15)."""
    return "dy" + hashlib.sha256(f"{bridge}/{environment_id}".encode()).hexdigest()[:10]


def table_name(bridge: str) -> str:
    """The nftables table (family ``inet``) of a bridge: ``devyard`` for ``devyard0``, else ``devyard_<bridge>``."""
    if bridge == "devyard0":
        return "devyard"
    return "devyard_" + re.sub(r"[^A-Za-z0-9_]", "_", bridge)


@dataclass(frozen=True)
class _Allocation:
    environment_id: str
    hostname: str
    address: ipaddress.IPv4Address
    path: Path


@dataclass(frozen=True)
class _Veth:
    name: str
    master: str | None
    isolated: bool
    up: bool


@dataclass(frozen=True)
class _Survey:
    """What the host shows of this network at one moment."""

    allocations: dict[str, _Allocation]
    #: Allocation files to remove: unreadable, second addresses of one environment, pending files of dead
    #: processes.
    stray_files: list[Path]
    #: Environment id -> whether its namespace file is a mount (False: a file a crash left unmounted).
    namespaces: dict[str, bool]
    veths: dict[str, _Veth]
    #: Veths on this bridge (or named for it) that belong to no environment we can name.
    stray_veths: list[str]


@dataclass(frozen=True)
class _Step:
    description: str
    environment_id: str | None
    action: Callable[[], Awaitable[None]]


@dataclass(frozen=True)
class _Completed:
    returncode: int
    stdout: str
    stderr: str


class Network:
    """The runner's bridge and the environments attached to it."""

    def __init__(
        self,
        state_dir: Path,
        *,
        subnet: str = "10.89.0.0/16",
        bridge: str = "devyard0",
        netns_dir: Path | None = None,
        table: str | None = None,
        blocked_ranges: Sequence[str] = (),
        allowed_host_ports: Collection[int] = (),
        fallback_nameservers: Sequence[str] = DEFAULT_FALLBACK_NAMESERVERS,
        mtu: int | None = None,
        host_resolv_conf: Path = Path("/etc/resolv.conf"),
        upstream_resolv_conf: Path = Path("/run/systemd/resolve/resolv.conf"),
    ) -> None:
        self.state_dir = state_dir
        self.subnet = ipaddress.IPv4Network(subnet)
        if self.subnet.num_addresses < 4:
            raise ValueError(f"the subnet {subnet} is too small for a gateway and an environment")
        self.bridge = bridge
        if not 1 <= len(bridge) <= 15 or not re.fullmatch(r"[A-Za-z0-9_.-]+", bridge):
            raise ValueError(f"{bridge!r} is not a valid interface name")
        self.gateway = next(self.subnet.hosts())
        self.netns_dir = netns_dir if netns_dir is not None else NETNS_DIR
        self.table = table if table is not None else table_name(bridge)
        #: Where an environment may not send to, besides the host: link-local, the subnet, the operator's ranges.
        self.blocked_ranges = (LINK_LOCAL, self.subnet, *(ipaddress.IPv4Network(r) for r in blocked_ranges))
        self.allowed_host_ports = tuple(sorted(set(allowed_host_ports)))
        self.fallback_nameservers = tuple(str(ipaddress.IPv4Address(s)) for s in fallback_nameservers)
        self.mtu = mtu
        self.host_resolv_conf = host_resolv_conf
        self.upstream_resolv_conf = upstream_resolv_conf
        self._addresses_dir = state_dir / "network" / "addresses"
        self._locks: dict[str, asyncio.Lock] = {}
        self._setup_lock = asyncio.Lock()
        self._ready = False

    @classmethod
    def from_settings(cls, settings: RunnerSettings) -> Network:
        """The runner's network as its settings describe it (``network_*``, ``bridge``, ``state_dir``)."""
        return cls(
            settings.state_dir,
            subnet=settings.network_subnet,
            bridge=settings.bridge,
            # Runners on one host have a bridge each; their namespaces must not look like each other's orphans.
            netns_dir=NETNS_DIR if settings.bridge == "devyard0" else NETNS_DIR.parent / f"netns-{settings.bridge}",
            blocked_ranges=[str(r) for r in settings.network_blocked_ranges],
            allowed_host_ports=settings.network_allowed_host_ports,
            fallback_nameservers=[str(s) for s in settings.network_nameservers] or DEFAULT_FALLBACK_NAMESERVERS,
        )

    # -- the bridge and the table

    async def setup(self) -> None:
        """Make the bridge if missing and (re)write the nftables table; idempotent. ``attach`` calls it first if
        this object has not yet."""
        async with self._setup_lock:
            await self._setup()

    async def _setup(self) -> None:
        self._addresses_dir.mkdir(parents=True, exist_ok=True)
        self.netns_dir.mkdir(parents=True, exist_ok=True)
        self._enable_forwarding()
        bridge_dir = Path("/sys/class/net") / self.bridge
        if not bridge_dir.exists():
            await _run("ip", "link", "add", self.bridge, "type", "bridge", tolerate=("File exists",))
        if not (bridge_dir / "bridge").is_dir():
            raise errors.PermanentError(f"the interface {self.bridge} exists and is not a bridge")
        # The host has no IPv6 address on the bridge, so nothing on the host listens there over IPv6.
        _write_sysctl(Path("/proc/sys/net/ipv6/conf") / self.bridge / "disable_ipv6", "1")
        mtu = self.mtu if self.mtu is not None else await _default_route_mtu()
        prefix = f"{self.gateway}/{self.subnet.prefixlen}"
        await _run("ip", "address", "replace", prefix, "dev", self.bridge)
        await _run("ip", "link", "set", "dev", self.bridge, "mtu", str(mtu), "up")
        await _run("nft", "-f", "-", input=self._ruleset().encode())
        self._ready = True

    def _enable_forwarding(self) -> None:
        path = Path("/proc/sys/net/ipv4/ip_forward")
        if path.read_text().strip() != "1":
            path.write_text("1\n")
            log.warning("set net.ipv4.ip_forward=1: environments reach the outside through this host (NAT)")

    def _ruleset(self) -> str:
        """The whole table, replaced in one transaction (``add`` first so that ``delete`` cannot fail)."""
        bridge = json.dumps(self.bridge)
        blocked = ", ".join(str(r) for r in self.blocked_ranges)
        ports = ", ".join(str(p) for p in self.allowed_host_ports)
        port_elements = f"\n\t\telements = {{ {ports} }}" if ports else ""
        return f"""add table inet {self.table}
delete table inet {self.table}
table inet {self.table} {{
\tset blocked {{
\t\ttype ipv4_addr
\t\tflags interval
\t\tauto-merge
\t\telements = {{ {blocked} }}
\t}}
\tset allowed_host_ports {{
\t\ttype inet_service{port_elements}
\t}}
\tchain input {{
\t\ttype filter hook input priority filter; policy accept;
\t\tiifname {bridge} ct state established,related accept
\t\tiifname {bridge} ip daddr {self.gateway} meta l4proto {{ tcp, udp }} th dport @allowed_host_ports accept
\t\tiifname {bridge} drop
\t}}
\tchain forward {{
\t\ttype filter hook forward priority filter; policy accept;
\t\tiifname {bridge} meta nfproto ipv6 drop
\t\tiifname {bridge} ip daddr @blocked drop
\t\toifname {bridge} ct state established,related accept
\t\toifname {bridge} drop
\t}}
\tchain postrouting {{
\t\ttype nat hook postrouting priority srcnat; policy accept;
\t\tip saddr {self.subnet} oifname != {bridge} masquerade
\t}}
}}
"""

    async def teardown(self) -> None:
        """Remove every attachment, the bridge and the table (tests, ``doctor --purge``); idempotent."""
        await self.repair(wanted=())
        await _run("ip", "link", "del", self.bridge, tolerate=("Cannot find device",))
        await _run("nft", "delete", "table", "inet", self.table, tolerate=("No such file or directory",))
        for directory in (self._addresses_dir, self._addresses_dir.parent, self.netns_dir):
            with contextlib.suppress(OSError):  # not empty: another network's, or the operator's
                directory.rmdir()
        self._ready = False

    # -- environments

    async def attach(self, environment_id: str, *, hostname: str) -> Attachment:
        """The environment's network namespace, veth and address, made if missing; idempotent."""
        _check_id(environment_id)
        async with self._setup_lock:
            if not self._ready:
                await self._setup()
        async with self._lock(environment_id):
            allocation = self._allocations().get(environment_id)
            if allocation is None:
                allocation = self._allocate(environment_id, hostname)
            elif allocation.hostname != hostname:
                allocation = self._rewrite(allocation, hostname)
            await self._ensure_namespace(environment_id)
            await self._wire(allocation)
            return self._attachment(allocation)

    async def detach(self, environment_id: str) -> None:
        """Remove the environment's namespace, veth, address and rules; nothing if it has none."""
        _check_id(environment_id)
        async with self._lock(environment_id):
            await self._undo(environment_id)

    async def attachments(self) -> list[Attachment]:
        """Every environment attached on this host, as the host shows it: an address and a mounted namespace.

        Half-done ones (a missing veth, a lone namespace) are not here but in ``orphans``."""
        survey = await self._survey()
        return [
            self._attachment(allocation)
            for environment_id, allocation in sorted(survey.allocations.items())
            if survey.namespaces.get(environment_id)
        ]

    async def orphans(self, wanted: Collection[str] | None = None) -> list[str]:
        """What ``repair(wanted)`` would do, without doing it (for ``devyard runner doctor``)."""
        return [step.description for step in self._plan(await self._survey(), wanted)]

    async def repair(self, wanted: Collection[str] | None = None) -> list[str]:
        """Finish or undo half-done attaches and remove strays; with ``wanted``, also remove the attachments of
        environments not in it. Returns what it did. Each environment is looked at again under its lock, so an
        attach running meanwhile is not mistaken for a half-done one."""
        done: list[str] = []
        failures: list[str] = []
        for step in self._plan(await self._survey(), wanted):
            try:
                if step.environment_id is None:
                    await step.action()
                    done.append(step.description)
                    continue
                async with self._lock(step.environment_id):
                    # Plan this environment again now that nothing else works on it.
                    fresh = self._plan(await self._survey(), wanted, only=step.environment_id)
                    for again in fresh:
                        await again.action()
                        done.append(again.description)
            except (errors.RunnerError, OSError) as exc:
                failures.append(f"{step.description}: {exc}")
        for description in done:
            log.info("network repair: %s", description)
        if failures:
            raise errors.TemporaryError("network repair failed: " + "; ".join(failures))
        return done

    # -- the plan of a repair

    def _plan(self, survey: _Survey, wanted: Collection[str] | None, only: str | None = None) -> list[_Step]:
        steps: list[_Step] = []
        if only is None:
            for path in survey.stray_files:
                steps.append(_Step(f"remove the stray allocation file {path}", None, _unlinker(path)))
            for name in survey.stray_veths:
                steps.append(_Step(f"remove the veth {name}, which belongs to no environment", None, _deleter(name)))
        environment_ids = sorted(set(survey.allocations) | set(survey.namespaces) | set(survey.veths))
        for environment_id in environment_ids:
            if only is not None and environment_id != only:
                continue
            allocation = survey.allocations.get(environment_id)
            mounted = survey.namespaces.get(environment_id)
            veth = survey.veths.get(environment_id)

            def undo(environment_id: str = environment_id) -> Awaitable[None]:
                return self._undo(environment_id)

            if wanted is not None and environment_id not in wanted:
                steps.append(
                    _Step(f"remove the network of {environment_id}, which is not wanted", environment_id, undo)
                )
            elif allocation is not None and mounted:
                healthy = veth is not None and veth.master == self.bridge and veth.isolated and veth.up
                if not healthy:

                    def finish(allocation: _Allocation = allocation) -> Awaitable[None]:
                        return self._wire(allocation)

                    what = "re-make its veth" if veth is None else f"re-wire its veth {veth.name}"
                    steps.append(_Step(f"finish the network of {environment_id}: {what}", environment_id, finish))
            else:
                pieces = [
                    *([f"address {allocation.address}"] if allocation is not None else []),
                    *(["namespace"] if mounted else ["unmounted namespace file"] if mounted is False else []),
                    *([f"veth {veth.name}"] if veth is not None else []),
                ]
                missing = "address" if allocation is None else "namespace"
                steps.append(
                    _Step(
                        f"undo the half-made network of {environment_id} ({', '.join(pieces)}; no {missing})",
                        environment_id,
                        undo,
                    )
                )
        return steps

    async def _survey(self) -> _Survey:
        allocations: dict[str, _Allocation] = {}
        stray_files: list[Path] = []
        for path, allocation in self._allocation_files():
            if allocation is None or allocation.environment_id in allocations:
                stray_files.append(path)
            else:
                allocations[allocation.environment_id] = allocation
        namespaces: dict[str, bool] = {}
        if self.netns_dir.is_dir():
            for entry in self.netns_dir.iterdir():
                if _ENVIRONMENT_ID.fullmatch(entry.name):
                    namespaces[entry.name] = _is_mount(entry)
        expected = {veth_name(self.bridge, e): e for e in set(allocations) | set(namespaces)}
        veths: dict[str, _Veth] = {}
        stray_veths: list[str] = []
        listing = json.loads((await _run("ip", "-d", "-j", "link", "show", "type", "veth")).stdout or "[]")
        for link in listing:
            name = link.get("ifname", "")
            alias = link.get("ifalias", "") or ""
            master = link.get("master")
            slave_data = link.get("linkinfo", {}).get("info_slave_data", {})
            veth = _Veth(name, master, bool(slave_data.get("isolated")), "UP" in link.get("flags", []))
            prefix = f"{self.bridge}/"
            environment_id = expected.get(name)
            if (
                environment_id is None
                and alias.startswith(prefix)
                and veth_name(self.bridge, alias[len(prefix) :]) == name
            ):
                environment_id = alias[len(prefix) :]
            if environment_id is not None:
                veths[environment_id] = veth
            elif master == self.bridge or alias.startswith(prefix):
                stray_veths.append(name)
        return _Survey(allocations, stray_files, namespaces, veths, stray_veths)

    # -- addresses

    def _allocation_files(self) -> list[tuple[Path, _Allocation | None]]:
        """Every file in the addresses directory and what it holds (None: remove it)."""
        found: list[tuple[Path, _Allocation | None]] = []
        if not self._addresses_dir.is_dir():
            return found
        for path in sorted(self._addresses_dir.iterdir(), key=lambda p: p.name):
            if path.name.startswith(_PENDING_PREFIX):
                # Pending files of live processes are being written right now.
                pid = path.name[len(_PENDING_PREFIX) :].split("-", 1)[0]
                if not (pid.isdigit() and (int(pid) == os.getpid() or Path(f"/proc/{pid}").exists())):
                    found.append((path, None))
                continue
            found.append((path, self._read_allocation(path)))
        return found

    def _read_allocation(self, path: Path) -> _Allocation | None:
        try:
            address = ipaddress.IPv4Address(path.name)
            content = json.loads(path.read_text())
            environment_id, hostname = content["environment_id"], content["hostname"]
        except (ValueError, KeyError, TypeError, OSError):
            return None
        if address not in self.subnet or not isinstance(environment_id, str) or not isinstance(hostname, str):
            return None
        return _Allocation(environment_id, hostname, address, path)

    def _allocations(self) -> dict[str, _Allocation]:
        allocations: dict[str, _Allocation] = {}
        for _, allocation in self._allocation_files():
            if allocation is not None:
                allocations.setdefault(allocation.environment_id, allocation)
        return allocations

    def _pending(self, environment_id: str, hostname: str) -> Path:
        pending = self._addresses_dir / f"{_PENDING_PREFIX}{os.getpid()}-{uuid.uuid4().hex}"
        with open(pending, "x") as file:
            json.dump({"environment_id": environment_id, "hostname": hostname}, file)
            file.flush()
            os.fsync(file.fileno())
        return pending

    def _allocate(self, environment_id: str, hostname: str) -> _Allocation:
        """Take the lowest free address: a hard link fails if the name exists, so no two callers share one."""
        self._addresses_dir.mkdir(parents=True, exist_ok=True)
        taken = {path.name for path in self._addresses_dir.iterdir()}
        pending = self._pending(environment_id, hostname)
        try:
            for address in self.subnet.hosts():
                if address == self.gateway or str(address) in taken:
                    continue
                path = self._addresses_dir / str(address)
                try:
                    os.link(pending, path)
                except FileExistsError:
                    continue
                return _Allocation(environment_id, hostname, address, path)
        finally:
            pending.unlink(missing_ok=True)
        raise errors.TemporaryError(f"no free address left in {self.subnet} for {environment_id}")

    def _rewrite(self, allocation: _Allocation, hostname: str) -> _Allocation:
        pending = self._pending(allocation.environment_id, hostname)
        os.replace(pending, allocation.path)
        return _Allocation(allocation.environment_id, hostname, allocation.address, allocation.path)

    # -- namespaces and veths

    def _netns_path(self, environment_id: str) -> Path:
        return self.netns_dir / environment_id

    async def _ensure_namespace(self, environment_id: str) -> None:
        path = self._netns_path(environment_id)
        if _is_mount(path):
            return
        self.netns_dir.mkdir(parents=True, exist_ok=True)
        path.touch()
        # unshare bind-mounts its new namespace onto the file and exits; the mount keeps the namespace alive.
        await _run("unshare", f"--net={path}", "true")

    async def _wire(self, allocation: _Allocation) -> None:
        """Make the veth and configure both ends; each command is a no-op when already so."""
        environment_id = allocation.environment_id
        netns = self._netns_path(environment_id)
        name = veth_name(self.bridge, environment_id)
        mtu = (Path("/sys/class/net") / self.bridge / "mtu").read_text().strip()
        inside = ("nsenter", f"--net={netns}")
        await asyncio.to_thread(_write_sysctls_inside, netns, _NAMESPACE_SYSCTLS)
        alias = f"{self.bridge}/{environment_id}"
        wanted_address = f"{allocation.address}/{self.subnet.prefixlen}"
        configure = [
            "link set lo up",
            f"address flush dev {_INSIDE}",
            f"address add {wanted_address} dev {_INSIDE}",
            f"link set {_INSIDE} up",
            f"route replace default via {self.gateway} dev {_INSIDE}",
        ]
        host_dir = Path("/sys/class/net") / name
        if not host_dir.exists():
            # The usual case, a new namespace: no host end, so no veth of ours inside either (its two ends live
            # and die together). The steps below in three commands instead of seven; anything in the way (an
            # eth0 something else made inside) fails the batch, and the careful way below takes over.
            made = [
                f"link add {name} mtu {mtu} type veth peer name {_INSIDE} mtu {mtu} netns {netns}",
                f"link set dev {name} alias {alias} master {self.bridge} mtu {mtu}",
                f"link set dev {name} type bridge_slave isolated on",
            ]
            try:
                await _run("ip", "-batch", "-", input="\n".join(made).encode() + b"\n")
                await _run(*inside, "ip", "-batch", "-", input="\n".join(configure).encode() + b"\n")
                await _run("ip", "link", "set", "dev", name, "up")
                return
            except errors.TemporaryError as exc:
                log.info("wiring %s the quick way failed (%s); checking each step", environment_id, exc)
        interfaces = json.loads((await _run(*inside, "ip", "-j", "address", "show")).stdout or "[]")
        eth0: dict[str, Any] | None = next((i for i in interfaces if i.get("ifname") == _INSIDE), None)
        paired = (
            eth0 is not None
            and host_dir.exists()
            and eth0.get("link_index") == int((host_dir / "ifindex").read_text())
            and int((host_dir / "iflink").read_text()) == eth0.get("ifindex")
        )
        if not paired:
            # A veth whose other end is elsewhere (a namespace made again) cannot be fixed, only replaced.
            await _run("ip", "link", "del", name, tolerate=("Cannot find device",))
            if eth0 is not None:
                await _run(*inside, "ip", "link", "del", _INSIDE, tolerate=("Cannot find device",))
            await _run(
                "ip", "link", "add", name, "mtu", mtu, "type", "veth", "peer", "name", _INSIDE, "mtu", mtu,
                "netns", str(netns),
            )  # fmt: skip
            eth0 = None
        # The port goes up last: isolated before any frame can pass, and "up" marks a finished attach (repair
        # finishes a veth that is down).
        await _run("ip", "link", "set", "dev", name, "alias", alias, "master", self.bridge, "mtu", mtu)
        await _run("bridge", "link", "set", "dev", name, "isolated", "on")
        present = {
            f"{a.get('local')}/{a.get('prefixlen')}"
            for a in (eth0 or {}).get("addr_info", [])
            if a.get("family") == "inet"
        }
        if present == {wanted_address}:
            configure = [step for step in configure if not step.startswith("address ")]
        await _run(*inside, "ip", "-batch", "-", input="\n".join(configure).encode() + b"\n")
        await _run("ip", "link", "set", "dev", name, "up")

    async def _undo(self, environment_id: str) -> None:
        """Remove what an environment has, in the reverse order of ``attach``."""
        await _run("ip", "link", "del", veth_name(self.bridge, environment_id), tolerate=("Cannot find device",))
        netns = self._netns_path(environment_id)
        if _is_mount(netns):
            await _run("umount", str(netns), tolerate=("not mounted",))
        netns.unlink(missing_ok=True)
        for path, allocation in self._allocation_files():
            if allocation is not None and allocation.environment_id == environment_id:
                path.unlink(missing_ok=True)

    def _attachment(self, allocation: _Allocation) -> Attachment:
        return Attachment(
            environment_id=allocation.environment_id,
            netns_path=self._netns_path(allocation.environment_id),
            address=allocation.address,
            gateway=self.gateway,
            host_interface=veth_name(self.bridge, allocation.environment_id),
            resolv_conf=self.resolv_conf(),
            hosts=hosts_file(allocation.address, allocation.hostname),
            hostname=allocation.hostname,
        )

    def _lock(self, environment_id: str) -> asyncio.Lock:
        return self._locks.setdefault(environment_id, asyncio.Lock())

    # -- DNS

    def resolv_conf(self) -> str:
        """An environment's /etc/resolv.conf: name servers it can reach (see the module's docstring)."""
        for source in (self.host_resolv_conf, self.upstream_resolv_conf):
            nameservers, search = _parse_resolv_conf(source)
            usable = [s for s in nameservers if self._reachable_nameserver(s)]
            if usable:
                return _format_resolv_conf(usable, search)
        return _format_resolv_conf(list(self.fallback_nameservers), [])

    def _reachable_nameserver(self, address: ipaddress.IPv4Address) -> bool:
        return not address.is_loopback and not any(address in r for r in self.blocked_ranges)


def hosts_file(address: ipaddress.IPv4Address, hostname: str) -> str:
    lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback"]
    if hostname:
        lines.append(f"{address}\t{hostname}")
    return "\n".join(lines) + "\n"


def _parse_resolv_conf(path: Path) -> tuple[list[ipaddress.IPv4Address], list[str]]:
    try:
        text = path.read_text()
    except OSError:
        return [], []
    nameservers: list[ipaddress.IPv4Address] = []
    search: list[str] = []
    for line in text.splitlines():
        words = line.split("#", 1)[0].split()
        if len(words) >= 2 and words[0] == "nameserver":
            with contextlib.suppress(ValueError):  # IPv6 (environments have none) or garbage
                nameservers.append(ipaddress.IPv4Address(words[1]))
        elif words and words[0] in ("search", "domain"):
            search = words[1:]
    return nameservers, search


def _format_resolv_conf(nameservers: Sequence[object], search: Sequence[str]) -> str:
    lines = [f"nameserver {s}" for s in nameservers[:3]]  # the resolver reads three at most
    if search:
        lines.append("search " + " ".join(search))
    return "\n".join(lines) + "\n"


def _check_id(environment_id: str) -> None:
    if not _ENVIRONMENT_ID.fullmatch(environment_id):
        raise errors.PermanentError(f"{environment_id!r} cannot name a network namespace")


# Files under /run and the state directory, and /proc and /sys: local, and as quick as a system call gets, so
# the event loop does not hand them to a thread.
def _is_mount(path: Path) -> bool:
    return os.path.ismount(path)


def _remove(path: Path) -> None:
    path.unlink(missing_ok=True)


def _write_sysctls_inside(netns: Path, values: Mapping[str, str]) -> None:
    """Set the namespace's own sysctls (``sysctl -e -w`` inside it, without a process): in a thread, which enters
    the namespace (``setns`` moves the calling thread only; ``/proc/sys/net`` shows the caller's namespace) and
    goes back to the host's before it returns. A key the kernel lacks (no IPv6) is skipped."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        target = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
        try:
            container_files.setns(target, container_files.CLONE_NEWNET)
            try:
                for key, value in values.items():
                    _write_sysctl(Path("/proc/sys", *key.split(".")), value)
            finally:
                container_files.setns(own, container_files.CLONE_NEWNET)
        finally:
            os.close(target)
    finally:
        os.close(own)


def _write_sysctl(path: Path, value: str) -> None:
    with contextlib.suppress(FileNotFoundError):  # no IPv6 on this host: nothing to turn off
        path.write_text(value + "\n")


async def _default_route_mtu() -> int:
    """The MTU of the interface of the host's default route (a cloud VM's is often below 1500), else 1500."""
    routes = json.loads((await _run("ip", "-j", "-4", "route", "show", "default")).stdout or "[]")
    for route in routes:
        try:
            return int((Path("/sys/class/net") / route["dev"] / "mtu").read_text())
        except (KeyError, OSError, ValueError):
            continue
    return 1500


def _unlinker(path: Path) -> Callable[[], Awaitable[None]]:
    async def unlink() -> None:
        _remove(path)

    return unlink


def _deleter(interface: str) -> Callable[[], Awaitable[None]]:
    async def delete() -> None:
        await _run("ip", "link", "del", interface, tolerate=("Cannot find device",))

    return delete


async def _run(*argv: str, input: bytes | None = None, tolerate: Sequence[str] = ()) -> _Completed:
    """Run a program; a failure whose message contains one of ``tolerate`` counts as success (it is done)."""
    try:
        process = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE if input is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "LC_ALL": "C"},
        )
    except FileNotFoundError as exc:
        raise errors.PermanentError(f"{argv[0]} is not installed (scripts/setup installs it)") from exc
    stdout, stderr = await process.communicate(input)
    completed = _Completed(process.returncode or 0, stdout.decode(errors="replace"), stderr.decode(errors="replace"))
    if completed.returncode != 0 and not any(t in completed.stderr for t in tolerate):
        raise errors.TemporaryError(
            f"{' '.join(argv)} failed with exit code {completed.returncode}: {completed.stderr.strip()}"
        )
    return completed
