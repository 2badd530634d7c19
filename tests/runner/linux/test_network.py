"""Environment networks for real: namespaces, veths, a bridge and an nftables table on this host (as root).

Each test has its own bridge, subnet, nftables table, state and namespace directories, so tests run alongside
others. "Environments" are plain processes in the attached namespaces (``nsenter --net=PATH``). The outside
world is a namespace of our own ("outside", behind a veth with 198.18.N.0/30 addresses) whose server tells the
client the address it saw; a policy rule that applies only to packets from the test's bridge routes
169.254.169.254 there, so the metadata test could fail without touching the host's own route to it. Traffic
only ever goes to 127.0.0.0/8, the test's subnets and namespaces.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
import random
import secrets
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from devyard.runner import errors
from devyard.runner.linux import network as network_module
from devyard.runner.linux.network import Attachment, Network
from devyard.runner.settings import RunnerSettings
from support import host
from support.network import free_port

PROGRAMS = ("ip", "nft", "bridge", "nsenter", "unshare", "umount", "sysctl", "setpriv")

# Connects, and prints what the server said (the address it saw us from), or why it could not.
PROBE = r"""
import socket, sys
host, port, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
try:
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.settimeout(timeout)
        print("connected", s.recv(100).decode().strip())
except socket.timeout:
    print("timeout")
except ConnectionRefusedError:
    print("refused")
except OSError as e:
    print("error", e.strerror)
"""

# Tells every client the address it came from.
SERVE = r"""
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(16)
print("ready", flush=True)
while True:
    c, peer = s.accept()
    c.sendall(peer[0].encode() + b"\n")
    c.close()
"""

BLOCKED_PROBE_TIMEOUT = 1.0


def run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=check)


def host_routes() -> list[ipaddress.IPv4Network]:
    routes = json.loads(run("ip", "-j", "-4", "route", "show", "table", "all").stdout)
    found = []
    for route in routes:
        with contextlib.suppress(ValueError):
            found.append(ipaddress.IPv4Network(route["dst"], strict=False))
    return found


def unused_subnet(prefix: str, prefixlen: int) -> ipaddress.IPv4Network:
    """A random subnet of ``prefix`` that no route on the host overlaps (other tests' bridges included)."""
    routes = host_routes()
    candidates = list(ipaddress.IPv4Network(prefix).subnets(new_prefix=prefixlen))
    for _ in range(100):
        subnet = random.choice(candidates)
        if not any(subnet.overlaps(route) for route in routes if route.prefixlen > 0):
            return subnet
    raise RuntimeError(f"no free subnet in {prefix}")


@dataclass(frozen=True)
class Names:
    suffix: str
    bridge: str
    subnet: ipaddress.IPv4Network
    tmp: Path

    def environment(self, name: str) -> str:
        return f"env_{self.suffix}_{name}"


@pytest.fixture
def names(tmp_path: Path) -> Names:
    host.require(*PROGRAMS)
    suffix = secrets.token_hex(3)
    return Names(suffix, f"dyt{suffix}", unused_subnet("10.230.0.0/15", 24), tmp_path)


def make_network(names: Names, **options: object) -> Network:
    return Network(
        names.tmp / "state",
        subnet=str(names.subnet),
        bridge=names.bridge,
        netns_dir=names.tmp / "netns",
        **options,  # type: ignore[arg-type]
    )


def scrub(names: Names) -> None:
    """Remove whatever a test of ``names`` may have left, whatever ``teardown`` did or did not do."""
    for link in json.loads(run("ip", "-j", "link", "show", "type", "veth").stdout or "[]"):
        if link.get("master") == names.bridge or (link.get("ifalias") or "").startswith(f"{names.bridge}/"):
            run("ip", "link", "del", link["ifname"], check=False)
    run("ip", "link", "del", names.bridge, check=False)
    run("nft", "delete", "table", "inet", network_module.table_name(names.bridge), check=False)
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        mount_point = line.split()[4]
        if mount_point.startswith(str(names.tmp)):
            run("umount", "-l", mount_point, check=False)


@pytest.fixture
async def network(names: Names) -> AsyncIterator[Network]:
    net = make_network(names)
    try:
        await net.setup()
        yield net
    finally:
        try:
            await net.teardown()
        finally:
            scrub(names)


async def probe(netns: Path | None, address: object, port: int, timeout: float = BLOCKED_PROBE_TIMEOUT) -> str:
    """Connect from ``netns`` (the host if None) and return ``connected <address the server saw>`` or the
    failure: ``timeout`` (dropped), ``refused``, ``error ...``."""
    prefix = ("nsenter", f"--net={netns}") if netns is not None else ()
    process = await asyncio.create_subprocess_exec(
        *prefix, sys.executable, "-c", PROBE, str(address), str(port), str(timeout),
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    stdout, _ = await process.communicate()
    return stdout.decode().strip()


@contextlib.asynccontextmanager
async def serving(netns: Path, address: object, port: int) -> AsyncIterator[None]:
    """A server in ``netns`` on ``address:port`` that tells each client the address it came from."""
    process = await asyncio.create_subprocess_exec(
        "nsenter", f"--net={netns}", sys.executable, "-c", SERVE, str(address), str(port),
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), 10)
        assert line == b"ready\n", f"the server in {netns} did not start"
        yield
    finally:
        process.kill()
        await process.wait()


@contextlib.asynccontextmanager
async def host_server(address: object) -> AsyncIterator[int]:
    """A server on the host at ``address`` (a free port; yields it) that tells each client its address."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(f"{writer.get_extra_info('peername')[0]}\n".encode())
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, str(address), 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


@dataclass(frozen=True)
class Outside:
    netns: Path
    #: The host's end of the link to the outside, and the outside's.
    host_address: ipaddress.IPv4Address
    address: ipaddress.IPv4Address


@pytest.fixture
def outside(names: Names) -> Iterator[Outside]:
    """A namespace standing for the internet, routed from the host; 169.254.169.254 lives there too, for
    packets that come from the test's bridge."""
    link = unused_subnet("198.18.0.0/16", 30)
    host_address, outside_address = list(link.hosts())
    netns = names.tmp / "outside"
    host_end = f"out{names.suffix}"
    table = str(random.randint(20000, 29999))
    netns.touch()
    try:
        run("unshare", f"--net={netns}", "true")
        run("ip", "link", "add", host_end, "type", "veth", "peer", "name", "eth0", "netns", str(netns))
        run("ip", "address", "add", f"{host_address}/30", "dev", host_end)
        run("ip", "link", "set", host_end, "up")
        inside = ("nsenter", f"--net={netns}", "ip")
        run(*inside, "address", "add", f"{outside_address}/30", "dev", "eth0")
        run(*inside, "address", "add", "169.254.169.254/32", "dev", "lo")
        run(*inside, "link", "set", "lo", "up")
        run(*inside, "link", "set", "eth0", "up")
        run(*inside, "route", "add", "default", "via", str(host_address))
        run("ip", "route", "add", "169.254.169.254/32", "via", str(outside_address), "table", table)
        run("ip", "rule", "add", "iif", names.bridge, "lookup", table, "priority", table)
        yield Outside(netns, host_address, outside_address)
    finally:
        run("ip", "rule", "del", "iif", names.bridge, "lookup", table, "priority", table, check=False)
        run("ip", "route", "flush", "table", table, check=False)
        run("ip", "link", "del", host_end, check=False)
        run("umount", str(netns), check=False)


def inside_links(attachment: Attachment) -> dict[str, dict[str, object]]:
    out = run("nsenter", f"--net={attachment.netns_path}", "ip", "-j", "address", "show").stdout
    return {link["ifname"]: link for link in json.loads(out)}


def host_link(name: str) -> dict[str, object] | None:
    result = run("ip", "-d", "-j", "link", "show", "dev", name, check=False)
    return json.loads(result.stdout)[0] if result.returncode == 0 else None


# Reads of /proc, /sys and tmp_path: as quick as a system call, so no thread for them.
def is_mount(path: Path) -> bool:
    return os.path.ismount(path)


def read(path: Path) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        return ""


def wait_until_in_namespace(pid: int, netns: Path) -> None:
    """Wait (briefly: nsenter joins at once) until process ``pid`` is in the namespace mounted at ``netns``."""
    for _ in range(1000):
        if os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat(netns).st_ino:
            return
        time.sleep(0.005)
    raise AssertionError(f"process {pid} did not join {netns}")


def allocation_files(names: Names) -> list[str]:
    directory = names.tmp / "state" / "network" / "addresses"
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


# -- attach and detach


async def test_attach_gives_the_namespace_an_address_a_route_and_an_isolated_port(
    network: Network, names: Names
) -> None:
    attachment = await network.attach(names.environment("a"), hostname="alpha")

    assert is_mount(attachment.netns_path)
    assert attachment.netns_path == names.tmp / "netns" / names.environment("a")
    assert attachment.address in names.subnet
    assert attachment.gateway == next(names.subnet.hosts())
    assert attachment.address != attachment.gateway
    links = inside_links(attachment)
    assert set(links) == {"lo", "eth0"}
    assert "UP" in links["lo"]["flags"]  # type: ignore[operator]
    assert {a["local"] for a in links["lo"]["addr_info"]} == {"127.0.0.1", "::1"}  # type: ignore[attr-defined]
    eth0 = links["eth0"]
    assert [(a["family"], a["local"], a["prefixlen"]) for a in eth0["addr_info"]] == [  # type: ignore[attr-defined]
        ("inet", str(attachment.address), names.subnet.prefixlen)
    ]  # no IPv6, not even link-local
    bridge_mtu = int(read(Path(f"/sys/class/net/{names.bridge}/mtu")))
    assert eth0["mtu"] == bridge_mtu
    routes = json.loads(run("nsenter", f"--net={attachment.netns_path}", "ip", "-j", "route", "show").stdout)
    assert {"dst": "default", "gateway": str(attachment.gateway), "dev": "eth0"}.items() <= routes[0].items()

    port = host_link(attachment.host_interface)
    assert port is not None
    assert attachment.host_interface.startswith("dy") and len(attachment.host_interface) == 12
    assert port["master"] == names.bridge
    assert port["mtu"] == bridge_mtu
    assert port["linkinfo"]["info_slave_data"]["isolated"] is True  # type: ignore[index]

    assert attachment.hosts == (
        f"127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n{attachment.address}\talpha\n"
    )
    assert attachment.resolv_conf == network.resolv_conf()
    assert attachment.resolv_conf.startswith("nameserver ")
    assert await network.attachments() == [attachment]

    # An unprivileged user (as root in a container is, in the host's user namespace that owns this network
    # namespace) may bind a low port.
    bind_low_port = "import socket; socket.socket().bind(('0.0.0.0', 80)); print('bound')"
    unprivileged = ("setpriv", "--reuid", "1000", "--regid", "1000", "--clear-groups")
    result = run("nsenter", f"--net={attachment.netns_path}", *unprivileged, sys.executable, "-c", bind_low_port)
    assert result.stdout == "bound\n"


async def test_attach_and_detach_are_idempotent(network: Network, names: Names) -> None:
    environment_id = names.environment("a")
    first = await network.attach(environment_id, hostname="alpha")
    again = await network.attach(environment_id, hostname="alpha")
    assert again == first
    assert len(json.loads(run("ip", "-j", "link", "show", "master", names.bridge).stdout)) == 1
    renamed = await network.attach(environment_id, hostname="beta")
    assert renamed.address == first.address
    assert renamed.hosts.endswith(f"{first.address}\tbeta\n")
    assert [a.hostname for a in await network.attachments()] == ["beta"]

    await network.detach(environment_id)
    await network.detach(environment_id)

    assert not first.netns_path.exists()
    assert host_link(first.host_interface) is None
    assert allocation_files(names) == []
    assert await network.attachments() == []
    assert await network.orphans() == []
    # The address is free again.
    assert (await network.attach(names.environment("b"), hostname="b")).address == first.address


async def test_an_environment_id_that_cannot_name_a_namespace_is_refused(network: Network) -> None:
    for bad in ("../etc", "", ".hidden", "a/b"):
        with pytest.raises(errors.PermanentError):
            await network.attach(bad, hostname="x")


async def test_concurrent_attaches_get_distinct_addresses(network: Network, names: Names) -> None:
    # A second Network over the same state stands for a second runner process taking addresses meanwhile.
    other = make_network(names)
    ours = [names.environment(f"ours{n}") for n in range(6)]
    theirs = [names.environment(f"theirs{n}") for n in range(6)]
    attachments = await asyncio.gather(
        # Each of ours twice at once: one environment, one address, whatever the concurrency.
        *(network.attach(environment_id, hostname="x") for environment_id in ours * 2),
        *(other.attach(environment_id, hostname="x") for environment_id in theirs),
    )
    addresses = {a.environment_id: a.address for a in attachments}
    assert len(addresses) == 12
    assert len(set(addresses.values())) == 12
    assert all(a.address == addresses[a.environment_id] for a in attachments)
    assert len(allocation_files(names)) == 12
    assert await network.orphans() == []


# -- isolation and egress


async def test_environments_cannot_reach_each_other(network: Network, names: Names) -> None:
    a = await network.attach(names.environment("a"), hostname="a")
    b = await network.attach(names.environment("b"), hostname="b")
    async with serving(b.netns_path, b.address, 8080):
        assert await probe(None, b.address, 8080) == f"connected {b.gateway}"  # the server is there
        assert not (await probe(a.netns_path, b.address, 8080)).startswith("connected")

        # Each layer holds alone. The isolated ports: without the table, a still cannot reach b ...
        run("nft", "delete", "table", "inet", network.table)
        assert not (await probe(a.netns_path, b.address, 8080)).startswith("connected")
        # ... and without both, a reaches b: the test can fail.
        for attachment in (a, b):
            run("bridge", "link", "set", "dev", attachment.host_interface, "isolated", "off")
        run("nsenter", f"--net={a.netns_path}", "ip", "neigh", "flush", "all")  # forget the failed lookups
        assert await probe(a.netns_path, b.address, 8080, timeout=5) == f"connected {a.address}"
        # A repair sees the ports as half-done and isolates them again.
        assert len(await network.orphans()) == 2
        assert len(await network.repair()) == 2
        assert not (await probe(a.netns_path, b.address, 8080)).startswith("connected")
        # The table (on hosts where bridged traffic passes nftables, br_netfilter) is the second layer; with
        # it back and the ports open, a must still not reach b there.
        await network.setup()
        if read(Path("/proc/sys/net/bridge/bridge-nf-call-iptables")).strip() == "1":
            for attachment in (a, b):
                run("bridge", "link", "set", "dev", attachment.host_interface, "isolated", "off")
            run("nsenter", f"--net={a.netns_path}", "ip", "neigh", "flush", "all")
            assert not (await probe(a.netns_path, b.address, 8080)).startswith("connected")


async def test_egress_is_masqueraded_and_the_host_and_metadata_are_unreachable(
    network: Network, names: Names, outside: Outside
) -> None:
    env = await network.attach(names.environment("a"), hostname="a")
    async with (
        serving(outside.netns, "0.0.0.0", 8080),
        host_server(env.gateway) as gateway_port,
        host_server(outside.host_address) as host_port,
        host_server("127.0.0.1") as loopback_port,
    ):
        internet, metadata, gateway, host_address, loopback = await asyncio.gather(
            probe(env.netns_path, outside.address, 8080),
            probe(env.netns_path, "169.254.169.254", 8080),
            probe(env.netns_path, env.gateway, gateway_port),
            probe(env.netns_path, outside.host_address, host_port),
            probe(env.netns_path, "127.0.0.1", loopback_port),
        )
        # The outside sees the host's address, not the environment's: masquerade.
        assert internet == f"connected {outside.host_address}"
        assert metadata == "timeout"
        assert gateway == "timeout"
        assert host_address == "timeout"
        # 127.0.0.1 inside is the namespace's own loopback; the host's listener stays out of reach.
        assert loopback == "refused"
        assert await probe(None, "127.0.0.1", loopback_port) == "connected 127.0.0.1"

        # The table is what stops them: without it, the metadata address and the host answer.
        run("nft", "delete", "table", "inet", network.table)
        metadata, gateway = await asyncio.gather(
            probe(env.netns_path, "169.254.169.254", 8080, timeout=5),
            probe(env.netns_path, env.gateway, gateway_port, timeout=5),
        )
        assert metadata == f"connected {env.address}"
        assert gateway == f"connected {env.address}"
        await network.setup()
        assert await probe(env.netns_path, env.gateway, gateway_port) == "timeout"


async def test_allowed_host_ports_are_reachable_on_the_gateway(names: Names) -> None:
    allowed = free_port()
    network = make_network(names, allowed_host_ports=[allowed])
    try:
        env = await network.attach(names.environment("a"), hostname="a")
        server = await asyncio.start_server(lambda r, w: w.close(), str(env.gateway), allowed)
        async with server, host_server(env.gateway) as other_port:
            assert (await probe(env.netns_path, env.gateway, allowed)).startswith("connected")
            assert await probe(env.netns_path, env.gateway, other_port) == "timeout"
    finally:
        try:
            await network.teardown()
        finally:
            scrub(names)


# -- DNS


def resolver_network(tmp_path: Path, host: str | None, upstream: str | None, **options: object) -> Network:
    host_file, upstream_file = tmp_path / "resolv.conf", tmp_path / "upstream.conf"
    for path, text in ((host_file, host), (upstream_file, upstream)):
        if text is not None:
            path.write_text(text)
    return Network(
        tmp_path / "state",
        host_resolv_conf=host_file,
        upstream_resolv_conf=upstream_file,
        **options,  # type: ignore[arg-type]
    )


def test_resolv_conf_uses_the_hosts_resolvers_when_an_environment_can_reach_them(tmp_path: Path) -> None:
    text = (
        "# comment\nnameserver 192.0.2.53\nnameserver 2001:db8::53\nnameserver 169.254.169.253\nsearch corp.example\n"
    )
    network = resolver_network(tmp_path, text, "nameserver 192.0.2.99\n")
    # IPv6 (environments have none) and link-local (blocked) resolvers are left out.
    assert network.resolv_conf() == "nameserver 192.0.2.53\nsearch corp.example\n"


def test_resolv_conf_uses_systemd_resolveds_upstream_when_the_host_resolves_on_loopback(tmp_path: Path) -> None:
    network = resolver_network(
        tmp_path,
        "nameserver 127.0.0.53\noptions edns0 trust-ad\nsearch lan\n",
        "nameserver 192.0.2.1\nnameserver 192.0.2.2\nsearch lan\n",
    )
    assert network.resolv_conf() == "nameserver 192.0.2.1\nnameserver 192.0.2.2\nsearch lan\n"


def test_resolv_conf_falls_back_to_the_configured_resolvers(tmp_path: Path) -> None:
    network = resolver_network(
        tmp_path,
        "nameserver 127.0.0.53\n",
        None,
        fallback_nameservers=["192.0.2.7"],
        blocked_ranges=["192.0.2.0/24"],
    )
    assert network.resolv_conf() == "nameserver 192.0.2.7\n"
    # A resolver in a range the operator blocked is unreachable too.
    blocked = resolver_network(tmp_path, "nameserver 10.1.2.3\n", None, blocked_ranges=["10.0.0.0/8"])
    assert blocked.resolv_conf() == "nameserver 8.8.8.8\nnameserver 8.8.4.4\n"


# -- crashes, repair, teardown


async def test_repair_finishes_or_undoes_what_a_crash_left(network: Network, names: Names) -> None:
    veth_lost = await network.attach(names.environment("veth_lost"), hostname="x")
    netns_lost = await network.attach(names.environment("netns_lost"), hostname="x")
    address_lost = await network.attach(names.environment("address_lost"), hostname="x")
    held = await network.attach(names.environment("held"), hostname="x")
    intact = await network.attach(names.environment("intact"), hostname="x")

    # The veth only.
    run("ip", "link", "del", veth_lost.host_interface)
    # The namespace only (its veth goes with it, once the kernel's cleanup of the namespace, which runs
    # asynchronously, has come to it).
    run("umount", str(netns_lost.netns_path))
    netns_lost.netns_path.unlink()
    deadline = time.monotonic() + 30
    while host_link(netns_lost.host_interface) is not None:
        assert time.monotonic() < deadline, f"{netns_lost.host_interface} outlived its namespace"
        await asyncio.sleep(0.05)
    # The address only.
    (names.tmp / "state" / "network" / "addresses" / str(address_lost.address)).unlink()
    # A namespace a process still holds, unmounted: its veth stays, without a namespace we know.
    holder = await asyncio.create_subprocess_exec("nsenter", f"--net={held.netns_path}", "sleep", "60")
    try:
        wait_until_in_namespace(holder.pid, held.netns_path)
        run("umount", str(held.netns_path))
        held.netns_path.unlink()
        assert host_link(held.host_interface) is not None
        # A stale allocation, a pending file of a dead process, and a namespace file a crash left unmounted.
        addresses = names.tmp / "state" / "network" / "addresses"
        stale = next(a for a in names.subnet.hosts() if str(a) not in allocation_files(names) and a != held.gateway)
        (addresses / str(stale)).write_text(json.dumps({"environment_id": names.environment("gone"), "hostname": ""}))
        (addresses / ".pending-999999999-abc").write_text("{}")
        (names.tmp / "netns" / names.environment("unmounted")).touch()

        before = await network.orphans()
        assert len(before) == 7, before
        assert allocation_files(names) == sorted(
            [
                ".pending-999999999-abc",
                str(stale),
                str(veth_lost.address),
                str(netns_lost.address),
                str(held.address),
                str(intact.address),
            ]
        )  # fmt: skip — orphans changed nothing

        done = await network.repair()
        assert sorted(done) == sorted(before)
    finally:
        holder.kill()
        await holder.wait()

    assert await network.orphans() == []
    ids = [a.environment_id for a in await network.attachments()]
    assert ids == sorted([veth_lost.environment_id, intact.environment_id])
    assert allocation_files(names) == sorted([str(veth_lost.address), str(intact.address)])
    assert host_link(held.host_interface) is None
    assert not address_lost.netns_path.exists()
    assert not (names.tmp / "netns" / names.environment("unmounted")).exists()
    # The finished one works again: its veth is back, on the bridge, isolated, and its address answers.
    port = host_link(veth_lost.host_interface)
    assert port is not None and port["linkinfo"]["info_slave_data"]["isolated"] is True  # type: ignore[index]
    async with serving(veth_lost.netns_path, veth_lost.address, 8080):
        assert await probe(None, veth_lost.address, 8080, timeout=5) == f"connected {veth_lost.gateway}"


async def test_repair_finishes_a_veth_a_crash_left_unconfigured(network: Network, names: Names) -> None:
    attachment = await network.attach(names.environment("a"), hostname="a")
    # As if the runner died after making the veth and before configuring the inside and raising the port.
    run("ip", "link", "set", "dev", attachment.host_interface, "down")
    run("nsenter", f"--net={attachment.netns_path}", "ip", "address", "flush", "dev", "eth0")
    assert await network.orphans() == [
        f"finish the network of {attachment.environment_id}: re-wire its veth {attachment.host_interface}"
    ]
    await network.repair()
    assert await network.orphans() == []
    assert [a["local"] for a in inside_links(attachment)["eth0"]["addr_info"]] == [str(attachment.address)]  # type: ignore[attr-defined]
    async with serving(attachment.netns_path, attachment.address, 8080):
        assert await probe(None, attachment.address, 8080, timeout=5) == f"connected {attachment.gateway}"


async def test_repair_removes_the_environments_not_wanted(network: Network, names: Names) -> None:
    keep = await network.attach(names.environment("keep"), hostname="x")
    drop = await network.attach(names.environment("drop"), hostname="x")
    assert await network.orphans(wanted=[keep.environment_id]) == [
        f"remove the network of {drop.environment_id}, which is not wanted"
    ]
    await network.repair(wanted=[keep.environment_id])
    assert await network.attachments() == [keep]
    assert host_link(drop.host_interface) is None and not drop.netns_path.exists()


async def test_attach_finishes_a_namespace_left_unmounted(network: Network, names: Names) -> None:
    environment_id = names.environment("a")
    (names.tmp / "netns").mkdir(exist_ok=True)
    (names.tmp / "netns" / environment_id).touch()
    attachment = await network.attach(environment_id, hostname="a")
    assert is_mount(attachment.netns_path)
    assert await network.orphans() == []


async def test_teardown_leaves_no_interfaces_table_or_mounts(names: Names) -> None:
    network = make_network(names)
    try:
        await network.setup()
        attachments = [await network.attach(names.environment(n), hostname=n) for n in ("a", "b")]
        await network.teardown()

        assert host_link(names.bridge) is None
        for attachment in attachments:
            assert host_link(attachment.host_interface) is None
        assert run("nft", "list", "table", "inet", network.table, check=False).returncode != 0
        assert str(names.tmp) not in read(Path("/proc/self/mountinfo"))
        assert not (names.tmp / "netns").exists()
        assert allocation_files(names) == []
        await network.teardown()  # and again: nothing to do
    finally:
        scrub(names)


def test_the_runner_settings_describe_the_network(tmp_path: Path) -> None:
    settings = RunnerSettings(
        state_dir=tmp_path,
        runtime="fake",
        bridge="dyx0",
        network_subnet="10.77.0.0/24",
        network_blocked_ranges=["192.168.0.0/16"],
        network_allowed_host_ports=[53],
        network_nameservers=["192.0.2.9"],
    )
    network = Network.from_settings(settings)
    assert (network.bridge, network.table, str(network.subnet)) == ("dyx0", "devyard_dyx0", "10.77.0.0/24")
    assert ipaddress.IPv4Network("192.168.0.0/16") in network.blocked_ranges
    assert network.allowed_host_ports == (53,)
    assert network.fallback_nameservers == ("192.0.2.9",)
    assert Network.from_settings(RunnerSettings(state_dir=tmp_path, runtime="fake")).table == "devyard"
