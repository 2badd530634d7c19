"""Port detection: the listening sockets of a network namespace as sock_diag and ``/proc/net/tcp`` tell them (this
process's, and a namespace of its own that a child listens in), the fake runtime's ports (its exec'd processes'
listening sockets, and nothing else of the host), the dev container's declared ports, and ``status.ports``."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from devyard.devcontainer.config import ForwardPort
from devyard.runner import port_detection
from devyard.runner.errors import ContainerNotRunning
from devyard.runner.fake_runtime import FakeRuntime
from devyard.runner.runtime import ContainerSpec, ExecRequest, ListeningPort
from devyard.wire.environments import Admission, Environment, PortProtocol

#: A python program that listens on an ephemeral loopback port, prints it, and answers each connection "hi".
LISTENER = (
    "import socket,sys\n"
    "s=socket.socket(); s.bind(('127.0.0.1',0)); s.listen(); print(s.getsockname()[1], flush=True)\n"
    "while True:\n"
    "    c,_=s.accept(); c.sendall(b'hi'); c.close()\n"
)

#: A python program that listens on 127.0.0.1, ::1, 0.0.0.0 and :: (ephemeral ports), connects to the first (an
#: established connection, not a listening socket), prints "ADDRESS PORT" lines then "ready", and waits for the end
#: of its input.
NAMESPACE_LISTENER = (
    "import socket,sys\n"
    "made=[]\n"
    "for address in ('127.0.0.1','::1','0.0.0.0','::'):\n"
    "    s=socket.socket(socket.AF_INET6 if ':' in address else socket.AF_INET); s.bind((address,0)); s.listen()\n"
    "    made.append(s); print(address, s.getsockname()[1])\n"
    "c=socket.create_connection(('127.0.0.1',made[0].getsockname()[1]))\n"
    "print('ready', flush=True)\n"
    "sys.stdin.read()\n"
)

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="a network namespace of its own needs root")


@contextlib.contextmanager
def listening_in_a_namespace(*, as_nobody: bool = False) -> Iterator[tuple[int, set[ListeningPort]]]:
    """A child in a network namespace of its own (gone with it) that listens as ``NAMESPACE_LISTENER`` says, as
    root or as nobody: its pid and what listens there."""
    python = f"setpriv --reuid=65534 --regid=65534 --clear-groups {sys.executable}" if as_nobody else sys.executable
    child = subprocess.Popen(
        ["unshare", "--net", "sh", "-c", f'ip link set lo up && exec {python} -c "$0"', NAMESPACE_LISTENER],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdin is not None and child.stdout is not None
    try:
        listening = set()
        for line in child.stdout:
            if line.strip() == "ready":
                break
            address, port = line.split()
            listening.add(ListeningPort(int(port), address, ipv6=":" in address))
        assert len(listening) == 4, "the listener in its own namespace did not start"
        yield child.pid, listening
    finally:
        child.stdin.close()
        child.wait(20)
        child.stdout.close()


@pytest.fixture
def namespace_listener() -> Iterator[tuple[int, set[ListeningPort]]]:
    with listening_in_a_namespace() as listener:
        yield listener


def inode(sock: socket.socket) -> int:
    return os.fstat(sock.fileno()).st_ino


@pytest.fixture
async def runtime(tmp_path: Path) -> AsyncIterator[FakeRuntime]:
    runtime = FakeRuntime(state_file=tmp_path / "fake-runtime.json")
    await runtime.create(ContainerSpec(environment_id="env_a", image="debian"))
    await runtime.start("env_a")
    try:
        yield runtime
    finally:
        await runtime.close()


def test_reads_the_kernels_listening_sockets_with_their_addresses() -> None:
    with socket.socket() as v4, socket.socket(socket.AF_INET6) as v6, socket.socket() as connected_only:
        v4.bind(("127.0.0.1", 0))
        v4.listen()
        v6.bind(("::", 0))
        v6.listen()
        connected_only.bind(("127.0.0.1", 0))  # bound, not listening: not a port anyone can reach
        found = port_detection.read_listening(Path("/proc/self/net"))
        assert ListeningPort(v4.getsockname()[1], "127.0.0.1") in found
        assert ListeningPort(v6.getsockname()[1], "::", ipv6=True) in found
        assert all(port.port != connected_only.getsockname()[1] for port in found)


def test_sock_diag_tells_this_namespaces_listening_sockets_as_proc_does() -> None:
    addresses = ["127.0.0.1", "::1", "0.0.0.0", "::"]
    sockets = [socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET) for address in addresses]
    try:
        for sock, address in zip(sockets, addresses, strict=True):
            sock.bind((address, 0))
            sock.listen()
        connected = socket.create_connection(("127.0.0.1", sockets[0].getsockname()[1]))
        sockets.append(connected)
        bound_only = socket.socket()
        sockets.append(bound_only)
        bound_only.bind(("127.0.0.1", 0))
        ours = {inode(sock) for sock in sockets}  # the namespace is the host's: others listen in it too
        expected = sorted(
            ListeningPort(sock.getsockname()[1], address, ipv6=":" in address)
            for sock, address in zip(sockets, addresses, strict=False)
        )
        assert port_detection.listening_in(None, inodes=ours) == expected
        assert port_detection.listening_in(os.getpid(), inodes=ours) == expected
        assert port_detection.read_listening(Path("/proc/self/net"), inodes=ours) == expected
        everything = port_detection.listening_in(None)
        assert set(expected) <= set(everything) and everything == sorted(set(everything))
    finally:
        for sock in sockets:
            sock.close()


@needs_root
def test_sock_diag_tells_the_listening_sockets_of_another_namespace_and_only_those(
    namespace_listener: tuple[int, set[ListeningPort]],
) -> None:
    pid, listening = namespace_listener
    with socket.socket() as host_service:  # in this process's namespace: not the child's
        host_service.bind(("127.0.0.1", 0))
        host_service.listen()
        found = port_detection.listening_in(pid)
        assert found == sorted(listening)
        assert port_detection.read_listening(Path(f"/proc/{pid}/net")) == found
        assert ListeningPort(host_service.getsockname()[1], "127.0.0.1") in port_detection.listening_in(None)
        # The calling thread went back to its own namespace.
        assert port_detection.listening_in(None, inodes={inode(host_service)}) == [
            ListeningPort(host_service.getsockname()[1], "127.0.0.1")
        ]


@needs_root
async def test_listening_ports_of_a_process_that_exited_is_an_os_error(
    namespace_listener: tuple[int, set[ListeningPort]],
) -> None:
    pid, listening = namespace_listener
    assert await port_detection.listening_ports_of(pid) == sorted(listening)
    child = await asyncio.create_subprocess_exec(sys.executable, "-c", "pass")
    await child.wait()  # reaped: its pid names no process
    with pytest.raises(OSError, match=f"process {child.pid} is gone"):
        await port_detection.listening_ports_of(child.pid)


@needs_root
@pytest.mark.parametrize(
    ("listener_as_nobody", "refusal"),
    [(False, "open /proc/PID/ns/net: EACCES"), (True, "setns: EPERM")],
)
def test_without_the_right_to_enter_the_namespace_it_reads_proc(listener_as_nobody: bool, refusal: str) -> None:
    # nobody may not open the namespace of root's process, nor enter one of its own without CAP_SYS_ADMIN; both
    # are refusals, so /proc/PID/net/tcp (readable to all) answers instead.
    with listening_in_a_namespace(as_nobody=listener_as_nobody) as (pid, listening):
        program = f"from devyard.runner import port_detection; print(port_detection.listening_in({pid}))"
        answer = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c", program],
            capture_output=True,
            text=True,
            timeout=60,
            env={"PATH": os.environ.get("PATH", os.defpath), "PYTHONDONTWRITEBYTECODE": "1"},
        )
        assert answer.returncode == 0, f"{refusal}: {answer.stderr}"
        assert answer.stdout.strip() == repr(sorted(listening))


async def test_the_fake_runtime_sees_and_reaches_only_its_own_processes_ports(runtime: FakeRuntime) -> None:
    assert await runtime.listening_ports("env_a") == []
    process = await runtime.open_exec("env_a", ExecRequest(argv=[sys.executable, "-c", LISTENER]))
    port = int(await asyncio.wait_for(process.stdout.readline(), 10))
    assert await runtime.listening_ports("env_a") == [ListeningPort(port, "127.0.0.1")]

    sock = await runtime.connect("env_a", "localhost", port)
    reader, writer = await asyncio.open_connection(sock=sock)
    assert await reader.read() == b"hi"
    writer.close()

    with socket.socket() as host_service:  # the runner host's own, not the environment's
        host_service.bind(("127.0.0.1", 0))
        host_service.listen()
        with pytest.raises(ConnectionRefusedError):
            await runtime.connect("env_a", "127.0.0.1", host_service.getsockname()[1])
        assert [p.port for p in await runtime.listening_ports("env_a")] == [port]

    await runtime.stop("env_a")
    assert await runtime.listening_ports("env_a") == []
    with pytest.raises(ContainerNotRunning):
        await runtime.connect("env_a", "localhost", port)


def test_declared_ports_come_from_forward_ports_app_port_and_ports_attributes(tmp_path: Path) -> None:
    port_detection.keep_declared(
        tmp_path,
        forward_ports=[ForwardPort(3000), ForwardPort(5432, host="db")],
        app_ports=["8080:80"],
        ports_attributes={
            "3000": {"label": "web", "onAutoForward": "openBrowser"},
            "9000-9001": {"label": "api", "protocol": "https"},
            "python": {"label": "by process: not applied"},
        },
    )
    declared = port_detection.load_declared(tmp_path)
    assert sorted(declared) == [80, 3000, 9000, 9001]
    assert declared[3000] == port_detection.DeclaredPort(3000, "web", None, "openBrowser", forwarded=True)
    assert declared[9001] == port_detection.DeclaredPort(9001, "api", "https", None, forwarded=False)
    assert port_detection.load_declared(tmp_path / "missing") == {}


def test_status_ports_list_listening_forwarded_and_shared_ports() -> None:
    environment = Environment.model_validate(
        {
            "metadata": {
                "id": "env_01abc",
                "name": "e",
                "generation": 1,
                "resource_version": "1",
                "created_at": "2026-01-01T00:00:00Z",
                "updated_at": "2026-01-01T00:00:00Z",
            },
            "spec": {"ports": [{"port": 8443, "name": "admin", "admission": "organization", "protocol": "https"}]},
            "status": {},
        }
    )
    declared = {
        3000: port_detection.DeclaredPort(3000, "web", None, "notify"),
        9000: port_detection.DeclaredPort(9000, "api", "https", None, forwarded=False),
    }
    listening = [ListeningPort(9000, "0.0.0.0"), ListeningPort(9000, "::", ipv6=True)]
    statuses = port_detection.port_statuses(environment, listening, declared, lambda e, p: f"http://{p}-{e}.x/")
    assert [(s.port, s.name, s.admission, s.protocol, s.listening) for s in statuses] == [
        (3000, "web", Admission.OWNER, PortProtocol.HTTP, False),
        (8443, "admin", Admission.ORGANIZATION, PortProtocol.HTTPS, False),
        (9000, "api", Admission.OWNER, PortProtocol.HTTPS, True),
    ]
    assert statuses[0].url == "http://3000-env_01abc.x/" and statuses[0].on_auto_forward == "notify"
