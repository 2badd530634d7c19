"""The SSH gateway with Debian's OpenSSH client (``ssh``, ``scp``, ``sftp``) against real containers.

Real parts: the management plane in a thread of this process (SQLite), a runner registered with it and the
environments assigned to that runner, users with their keys; the linux runtime running busybox containers (user
``dev``, uid 1000, as the dev container's remote user); the gateway in an event loop of its own thread, asking the
server for keys as the agent's would. Needs root, runc and openssh-client.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import select
import signal
import socket
import struct
import subprocess
import termios
import threading
import time
import urllib.request
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import pytest

from devyard.client import ApiError, AsyncClient, Client
from devyard.runner.linux.runtime import LinuxRuntime
from devyard.runner.runtime import ContainerSpec
from devyard.runner.ssh_gateway import UNAUTHENTICATED_PER_ADDRESS, SshAccess, SshGateway, server_authorized_keys
from devyard.wire.environments import Environment
from support import host, live_server

from ..linux.runtime_host import (  # noqa: F401 - fixtures
    RuntimeHost,
    busybox_layer_fixture,
    delete_all,
    make_runtime,
    runtime_host_fixture,
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the linux runtime needs root")

T = TypeVar("T")
#: uid 1000 inside is this on the host (the runtime's id range starts at 1,000,000).
DEV_ON_HOST = 1_001_000


class LoopThread:
    """An event loop in a thread of its own: the gateway serves while the test runs blocking clients."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: float = 120) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


def keypair(directory: Path, name: str) -> tuple[Path, str]:
    path = directory / name
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f", str(path)], check=True)
    return path, path.with_suffix(".pub").read_text().strip()


@dataclass
class World:
    server: live_server.LiveServer
    admin: Client
    runner: Client
    runner_id: str
    org: str
    keys: Path
    loop: LoopThread
    runtime: LinuxRuntime
    gateway: SshGateway
    users: dict[str, tuple[Client, Path, str]] = field(default_factory=dict)

    def user(self, name: str) -> tuple[Client, Path, str]:
        """A user with a registered key: their client, private key file, and the key's id."""
        user = self.admin.post("/api/v1/users", {"metadata": {"name": name, "organization_id": self.org}})
        body = {"metadata": {"organization_id": self.org}, "spec": {"user_id": user["metadata"]["id"]}}
        client = Client(self.server.url, self.admin.post("/api/v1/tokens", body)["secret"])
        private, public = keypair(self.keys, name)
        key_id = client.post("/api/v1/ssh-keys", {"spec": {"public_key": public}})["metadata"]["id"]
        self.users[name] = (client, private, key_id)
        return self.users[name]

    def environment(self, owner: Client, *, phase: str = "running", start: bool = True) -> str:
        """An environment of ``owner``'s assigned to the runner, reported in ``phase``, with its container."""
        env_id = str(owner.post("/api/v1/environments", {"spec": {"image": "busybox-dev"}})["metadata"]["id"])
        deadline = time.monotonic() + 20
        while owner.get(f"/api/v1/environments/{env_id}")["status"].get("runner_id") != self.runner_id:
            assert time.monotonic() < deadline, "the scheduler did not assign the environment"
            time.sleep(0.05)
        self.runner.put(f"/api/v1/environments/{env_id}/status", {"status": {"phase": phase}})
        if start:
            spec = ContainerSpec(environment_id=env_id, image="busybox-dev", remote_user="dev", workdir="/home/dev")
            self.loop.run(self.runtime.create(spec))
            self.loop.run(self.runtime.start(env_id))
        return env_id

    def cached(self, environment_id: str) -> Environment | None:
        """The environment as the runner sees it (what the agent's informer would hold)."""
        try:
            return Environment.model_validate(self.runner.get(f"/api/v1/environments/{environment_id}"))
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    def ssh_argv(self, key: Path, environment_id: str, *options: str, program: str = "ssh") -> list[str]:
        port_flag = "-P" if program in ("scp", "sftp") else "-p"
        return [
            program,
            "-F",
            "/dev/null",
            "-i",
            str(key),
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            port_flag,
            str(self.gateway.port),
            *options,
        ]

    def ssh(
        self,
        key: Path,
        environment_id: str,
        *command: str,
        options: tuple[str, ...] = (),
        stdin: str = "",
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        argv = [*self.ssh_argv(key, environment_id, *options), f"{environment_id}@127.0.0.1", *command]
        environment = {**os.environ, **(env or {})}
        return subprocess.run(
            argv, input=stdin, capture_output=True, text=True, timeout=60, check=False, env=environment
        )

    def pid1(self, environment_id: str) -> int:
        info = self.loop.run(self.runtime.runc.state(environment_id))
        assert info is not None
        return info.pid


@pytest.fixture
def world(runtime_host: RuntimeHost, tmp_path: Path) -> Iterator[World]:
    host.require("ssh", "scp", "sftp", "ssh-keygen")
    keys = tmp_path / "keys"
    keys.mkdir(mode=0o700)
    with live_server.serve_in_thread(live_server.settings_for(tmp_path / "server")) as server, server.client() as admin:
        org = admin.get("/api/v1/organizations")["items"][0]["metadata"]["id"]
        created = admin.post("/api/v1/runners", {"metadata": {"name": "ssh"}})
        runner_id = created["runner"]["metadata"]["id"]
        with Client(server.url) as anonymous:
            token = anonymous.post("/api/v1/runners/exchange", {"exchange_token": created["exchange_token"]})["token"]
        runner = Client(server.url, token)
        runner.put(f"/api/v1/runners/{runner_id}/status", {"status": {"capacity": 100, "runtime": "linux"}})
        admin.post("/api/v1/environment-classes", {"metadata": {"name": "c"}, "spec": {"runner_ids": [runner_id]}})
        loop = LoopThread()
        runtime = make_runtime(runtime_host)
        api = loop.run(_async_client(server.url, token))
        world = World(server, admin, runner, runner_id, org, keys, loop, runtime, None)  # type: ignore[arg-type]
        access = SshAccess(runner_id, world.cached, partial(server_authorized_keys, api))
        world.gateway = SshGateway(
            runtime, access, listen="127.0.0.1:0", host_key_path=runtime_host.state_dir / "ssh_host_ed25519_key"
        )
        loop.run(world.gateway.start())
        try:
            yield world
        finally:
            loop.run(world.gateway.close())
            loop.run(delete_all(runtime))
            loop.run(runtime.close())
            loop.run(api.aclose())
            loop.stop()
            runner.close()
            for client, _, _ in world.users.values():
                client.close()


async def _async_client(url: str, token: str) -> AsyncClient:
    return AsyncClient(url, token)


def wait_for(check: Callable[[], bool], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def processes_in(pid1: int) -> list[str]:
    """The command lines of the processes in the container's pid namespace (PID 1 included)."""
    namespace = os.readlink(f"/proc/{pid1}/ns/pid")
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{entry}/ns/pid") == namespace:
                found.append(Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip())
    return found


# Sessions.


def test_exec_passes_output_stderr_exit_status_and_runs_as_the_remote_user(world: World) -> None:
    _, key, _ = world.user("alice")
    env_id = world.environment(world.users["alice"][0])
    answer = world.ssh(key, env_id, "id -u; pwd; echo oops >&2; exit 3")
    assert answer.returncode == 3, answer.stderr
    assert answer.stdout.split() == ["1000", "/home/dev"], answer
    assert answer.stdout.split() == ["1000", "/home/dev"]
    assert "oops" in answer.stderr
    assert world.ssh(key, env_id, "true").returncode == 0
    # Killed by a signal: the client learns it (OpenSSH then exits 255), not a made-up status.
    killed = world.ssh(key, env_id, "kill -KILL $$")
    assert (killed.returncode, killed.stdout) == (255, ""), killed
    assert world.gateway.activity.last(env_id) is not None


def test_stdin_reaches_the_command_and_its_end_of_file_ends_it(world: World) -> None:
    _, key, _ = world.user("alice")
    env_id = world.environment(world.users["alice"][0])
    answer = world.ssh(key, env_id, "cat; echo done", stdin="line one\nline two\n")
    assert answer.stdout == "line one\nline two\ndone\n", answer.stderr


def test_a_terminal_has_the_clients_type_and_a_login_shell_runs_without_a_command(world: World) -> None:
    _, key, _ = world.user("alice")
    env_id = world.environment(world.users["alice"][0])
    # The terminal type comes with the request for a terminal, from the client's TERM.
    answer = world.ssh(key, env_id, "tty; echo $TERM", options=("-tt",), env={"TERM": "vt220"})
    lines = answer.stdout.replace("\r", "").split("\n")
    assert lines[0].startswith("/dev/pts/"), answer
    assert lines[1] == "vt220", answer
    shell = world.ssh(key, env_id, options=("-tt",), stdin="echo in-$((40+2))\nexit 7\n")
    assert "in-42" in shell.stdout.replace("\r", ""), shell
    assert shell.returncode == 7, shell


def test_only_locale_and_terminal_variables_pass(world: World) -> None:
    _, key, _ = world.user("alice")
    env_id = world.environment(world.users["alice"][0])
    options = ("-o", "SetEnv=LANG=C.UTF-8 LC_TIME=en_GB.UTF-8 LD_PRELOAD=/tmp/evil.so PATH=/evil FOO=bar")
    answer = world.ssh(key, env_id, 'echo "$LANG|$LC_TIME|${LD_PRELOAD-unset}|$PATH|${FOO-unset}"', options=options)
    lang, time_locale, preload, path, foo = answer.stdout.strip().split("|")
    assert (lang, time_locale, preload, foo) == ("C.UTF-8", "en_GB.UTF-8", "unset", "unset"), answer
    assert "/evil" not in path


# Admission.


def test_a_user_who_is_not_the_owner_is_refused(world: World) -> None:
    world.user("alice")
    _, bob_key, _ = world.user("bob")
    env_id = world.environment(world.users["alice"][0])
    answer = world.ssh(bob_key, env_id, "true")
    assert answer.returncode == 255 and "Permission denied" in answer.stderr, answer


def test_a_removed_key_is_refused_within_seconds(world: World) -> None:
    alice, key, key_id = world.user("alice")
    env_id = world.environment(alice)
    assert world.ssh(key, env_id, "true").returncode == 0
    alice.delete(f"/api/v1/ssh-keys/{key_id}")
    wait_for(lambda: world.ssh(key, env_id, "true").returncode == 255, "the removed key to be refused")


def test_unknown_and_stopped_environments_are_refused_with_the_reason(world: World) -> None:
    alice, key, _ = world.user("alice")
    unknown = world.ssh(key, "env_doesnotexist", "true")
    assert unknown.returncode == 255 and "no environment 'env_doesnotexist' on this runner" in unknown.stderr
    stopped = world.environment(alice, phase="stopped", start=False)
    answer = world.ssh(key, stopped, "true")
    assert answer.returncode == 255 and f"{stopped} is stopped" in answer.stderr, answer


# Files.


def test_scp_up_and_down_with_ownership_inside(world: World, tmp_path: Path) -> None:
    _, key, _ = world.user("alice")
    env_id = world.environment(world.users["alice"][0])
    local = tmp_path / "up.bin"
    local.write_bytes(os.urandom(300_000))
    up = subprocess.run(
        [*world.ssh_argv(key, env_id, program="scp"), str(local), f"{env_id}@127.0.0.1:/home/dev/up.bin"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert up.returncode == 0, up.stderr
    on_host = Path(f"/proc/{world.pid1(env_id)}/root/home/dev/up.bin")
    assert on_host.read_bytes() == local.read_bytes()
    assert (on_host.stat().st_uid, on_host.stat().st_gid) == (DEV_ON_HOST, DEV_ON_HOST)
    assert world.ssh(key, env_id, "stat -c %u:%g up.bin").stdout.strip() == "1000:1000"
    down = tmp_path / "down.bin"
    answer = subprocess.run(
        [*world.ssh_argv(key, env_id, program="scp"), f"{env_id}@127.0.0.1:up.bin", str(down)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert answer.returncode == 0, answer.stderr
    assert down.read_bytes() == local.read_bytes()


def test_sftp_works_inside_the_container_and_symlinks_do_not_reach_the_host(world: World, tmp_path: Path) -> None:
    _, key, _ = world.user("alice")
    env_id = world.environment(world.users["alice"][0])
    marker = Path(f"/tmp/devyard-host-only-{os.getpid()}")
    marker.write_text("the host's")
    try:
        (tmp_path / "a.txt").write_text("hello")
        assert world.ssh(key, env_id, f"ln -s /tmp /home/dev/link; echo inside > /tmp/{marker.name}").returncode == 0
        batch = tmp_path / "batch"
        batch.write_text(
            f"mkdir d\nput {tmp_path / 'a.txt'} d/a.txt\nrename d/a.txt d/b.txt\nls -l d\n"
            f"get link/{marker.name} {tmp_path / 'got.txt'}\nget /etc/passwd {tmp_path / 'passwd'}\n"
            "rm d/b.txt\nrmdir d\n"
        )
        answer = subprocess.run(
            [*world.ssh_argv(key, env_id, "-b", str(batch), program="sftp"), f"{env_id}@127.0.0.1"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert answer.returncode == 0, answer.stdout + answer.stderr
        assert "b.txt" in answer.stdout
        # The symlink to /tmp is the container's /tmp; /etc/passwd is the container's (it has the dev user).
        assert (tmp_path / "got.txt").read_text() == "inside\n"
        assert "dev:x:1000" in (tmp_path / "passwd").read_text()
        assert world.ssh(key, env_id, "ls d 2>&1 || echo gone").stdout.strip().endswith("gone")
        # The remote user's permissions apply: dev cannot write to /etc.
        denied = tmp_path / "denied"
        denied.write_text(f"put {tmp_path / 'a.txt'} /etc/a.txt\n")
        refused = subprocess.run(
            [*world.ssh_argv(key, env_id, "-b", str(denied), program="sftp"), f"{env_id}@127.0.0.1"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert refused.returncode != 0 and "Permission denied" in refused.stderr, refused
    finally:
        marker.unlink()


# Forwarding.


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_local_forwarding_reaches_a_service_bound_to_the_containers_loopback(world: World) -> None:
    _, key, _ = world.user("alice")
    env_id = world.environment(world.users["alice"][0])
    serve = "mkdir -p www && echo from-inside > www/index.html && httpd -p 127.0.0.1:8080 -h www"
    assert world.ssh(key, env_id, serve).returncode == 0
    port = free_port()
    argv = [*world.ssh_argv(key, env_id, "-N", "-L", f"{port}:127.0.0.1:8080"), f"{env_id}@127.0.0.1"]
    tunnel = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:

        def fetched() -> bool:
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(f"http://127.0.0.1:{port}/index.html", timeout=5) as response,
            ):
                return bool(response.read() == b"from-inside\n")
            assert tunnel.poll() is None, tunnel.stderr.read() if tunnel.stderr else b""
            return False

        wait_for(fetched, "the page through the tunnel")
    finally:
        tunnel.terminate()
        tunnel.wait(10)


# Robustness.


def test_a_client_that_goes_away_mid_command_leaves_no_process_inside(world: World) -> None:
    _, key, _ = world.user("alice")
    env_id = world.environment(world.users["alice"][0])
    pid1 = world.pid1(env_id)
    for options in ((), ("-tt",)):
        argv = [*world.ssh_argv(key, env_id, *options), f"{env_id}@127.0.0.1", "sleep 1001 & sleep 1002; echo never"]
        client = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: any("sleep 1002" in p for p in processes_in(pid1)), "the command to start")
        client.send_signal(signal.SIGKILL)
        client.wait(10)
        wait_for(lambda: not any("sleep 100" in p for p in processes_in(pid1)), f"the session's processes {options}")


def test_many_connections_at_once_leave_the_gateway_serving(world: World) -> None:
    _, key, _ = world.user("alice")
    _, bob_key, _ = world.user("bob")
    env_id = world.environment(world.users["alice"][0])

    def one(index: int) -> int:
        who = bob_key if index % 5 == 0 else key
        return world.ssh(who, env_id, f"echo {index}").returncode

    with ThreadPoolExecutor(24) as pool:
        codes = list(pool.map(one, range(48)))
    assert codes == [255 if i % 5 == 0 else 0 for i in range(48)]
    # Half-open connections that never speak SSH do not block anyone else.
    idle = [socket.create_connection(("127.0.0.1", world.gateway.port or 0)) for _ in range(20)]
    try:
        assert world.ssh(key, env_id, "echo still").stdout.strip() == "still"
    finally:
        for sock in idle:
            sock.close()


def test_a_flood_from_one_address_is_cut_off_and_others_still_get_in(world: World) -> None:
    _, key, _ = world.user("alice")
    env_id = world.environment(world.users["alice"][0])
    port = world.gateway.port or 0
    flood = [
        socket.create_connection(("127.0.0.1", port), source_address=("127.0.0.2", 0))
        for _ in range(UNAUTHENTICATED_PER_ADDRESS + 10)
    ]
    try:
        assert len(closed_within(flood, 3.0)) == 10, "past the address's limit, closed at once; the others kept"
        assert world.ssh(key, env_id, "echo still").stdout.strip() == "still"
    finally:
        for sock in flood:
            sock.close()
    # Once the flood is gone, that address is welcome again.
    again = socket.create_connection(("127.0.0.1", port), source_address=("127.0.0.2", 0))
    with again:
        assert not closed_within([again], 1.0)


def closed_within(sockets: list[socket.socket], seconds: float) -> list[socket.socket]:
    """Those of ``sockets`` the other side closes within ``seconds`` (whatever it sent before)."""
    closed: list[socket.socket] = []
    open_ = list(sockets)
    deadline = time.monotonic() + seconds
    while open_ and (left := deadline - time.monotonic()) > 0:
        readable, _, _ = select.select(open_, [], [], left)
        for sock in readable:
            try:
                data = sock.recv(4096)
            except ConnectionResetError:
                data = b""
            if not data:
                closed.append(sock)
                open_.remove(sock)
    return closed


def set_size(terminal: int, rows: int, columns: int) -> None:
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))


def read_until(terminal: int, wanted: bytes, timeout: float = 30) -> bytes:
    seen = b""
    deadline = time.monotonic() + timeout
    while wanted not in seen:
        assert time.monotonic() < deadline, f"timed out waiting for {wanted!r}; saw {seen!r}"
        ready, _, _ = select.select([terminal], [], [], 0.2)
        if ready:
            with contextlib.suppress(OSError):
                seen += os.read(terminal, 4096)
    return seen


def test_a_terminal_follows_the_clients_window_and_ctrl_c_interrupts(world: World) -> None:
    """``ssh -t`` run in a terminal of its own, as a user runs it: its window size reaches the session at the
    start and when it changes (SIGWINCH), and ^C typed there interrupts the command inside."""
    _, key, _ = world.user("alice")
    env_id = world.environment(world.users["alice"][0])
    master, slave = os.openpty()
    set_size(master, 30, 100)
    command = "stty size; read x; stty size; sleep 1003; echo after-sleep"
    argv = [*world.ssh_argv(key, env_id, "-t"), f"{env_id}@127.0.0.1", command]
    client = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, start_new_session=True)
    os.close(slave)
    try:
        read_until(master, b"30 100")
        set_size(master, 40, 120)
        client.send_signal(signal.SIGWINCH)
        time.sleep(0.5)  # the window change travels before the line that asks for the size
        os.write(master, b"go\r")
        read_until(master, b"40 120")
        pid1 = world.pid1(env_id)
        wait_for(lambda: any("sleep 1003" in p for p in processes_in(pid1)), "the sleep")
        os.write(master, b"\x03")
        client.wait(30)
        assert not any("sleep 1003" in p for p in processes_in(pid1))
    finally:
        if client.poll() is None:
            client.kill()
            client.wait(10)
        os.close(master)


def test_agent_forwarding_gives_the_session_a_socket_inside_that_reaches_the_clients_agent(
    world: World, tmp_path: Path
) -> None:
    _, key, _ = world.user("alice")
    env_id = world.environment(world.users["alice"][0])
    agent_dir = tmp_path / "agent"
    agent_dir.mkdir(mode=0o700)
    agent_socket = agent_dir / "agent.sock"
    agent = subprocess.Popen(["ssh-agent", "-D", "-a", str(agent_socket)], stdout=subprocess.DEVNULL)
    try:
        wait_for(agent_socket.exists, "ssh-agent")
        environment = {**os.environ, "SSH_AUTH_SOCK": str(agent_socket)}
        subprocess.run(["ssh-add", "-q", str(key)], env=environment, check=True, capture_output=True)
        argv = [*world.ssh_argv(key, env_id, "-A"), f"{env_id}@127.0.0.1", 'echo "$SSH_AUTH_SOCK"; read x']
        session = subprocess.Popen(
            argv, env=environment, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
        )
        assert session.stdout is not None and session.stdin is not None
        inside = session.stdout.readline().decode().strip()
        assert inside.startswith("/tmp/ssh-devyard-") and inside.endswith("/agent.sock"), inside
        on_host = Path(f"/proc/{world.pid1(env_id)}/root{inside}")
        assert (on_host.stat().st_uid, on_host.parent.stat().st_uid) == (DEV_ON_HOST, DEV_ON_HOST)
        assert on_host.parent.stat().st_mode & 0o777 == 0o700
        # The agent protocol through it: a request for identities gets the key added above.
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(str(on_host))
            client.sendall(struct.pack(">IB", 1, 11))  # SSH_AGENTC_REQUEST_IDENTITIES
            length = struct.unpack(">I", client.recv(4, socket.MSG_WAITALL))[0]
            reply = client.recv(length, socket.MSG_WAITALL)
        assert reply[0] == 12 and struct.unpack(">I", reply[1:5])[0] == 1  # SSH_AGENT_IDENTITIES_ANSWER, one key
        session.stdin.write(b"done\n")
        session.stdin.close()
        assert session.wait(30) == 0
        wait_for(lambda: not on_host.parent.exists(), "the socket to be removed with the session")
    finally:
        agent.terminate()
        agent.wait(10)
