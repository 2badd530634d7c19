"""Port detection: ``/proc/net/tcp`` as the kernel writes it, the fake runtime's ports (its exec'd processes'
listening sockets, and nothing else of the host), the dev container's declared ports, and ``status.ports``."""

from __future__ import annotations

import asyncio
import socket
import sys
from collections.abc import AsyncIterator
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
