"""What VS Code Remote-SSH does when it connects, done with the real OpenSSH client against the gateway.

Remote-SSH runs ``ssh -T HOST bash`` and feeds its install script on stdin: the script prints markers that the
extension looks for, checks the platform (``uname -s``, ``uname -m``), writes the server under ``$HOME``, starts
it in the background and prints the port it listens on; the script's session then ends while the server keeps
running. The editor then reaches that server through a forward held open for the whole session (``ssh -N -L``,
or ``ssh -D`` with ``remote.SSH.useLocalServer``). These tests do the same with a busybox ``httpd`` as the server
(the test image has no bash: its ``sh`` reads the script, the gateway's path is the same) and assert what the
extension relies on: the markers and exit status, the machine, the file, bytes intact through each forward over
several connections and seconds, and no session's process left inside once the clients are gone.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator

import pytest

from support import host

from .test_ssh_gateway import World, free_port, processes_in, wait_for

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the linux runtime needs root")

#: The server's port inside the environment, as the script picks it.
SERVER_PORT = 8731
SCRIPT = f"""
echo "3f6a9c: start"
echo "platform==$(uname -s)=="
echo "arch==$(uname -m)=="
mkdir -p "$HOME/.vscode-server/bin" "$HOME/.vscode-server/www" || exit 11
echo "server-build-42" > "$HOME/.vscode-server/bin/version" || exit 12
head -c 262144 /dev/urandom > "$HOME/.vscode-server/www/blob" || exit 13
echo ok > "$HOME/.vscode-server/www/index.html"
# busybox httpd puts itself in the background, as Remote-SSH's launcher does with its server.
httpd -p 127.0.0.1:{SERVER_PORT} -h "$HOME/.vscode-server/www" || exit 14
echo "blob==$(md5sum "$HOME/.vscode-server/www/blob" | cut -d' ' -f1)=="
echo "listeningOn=={SERVER_PORT}=="
echo "3f6a9c: end"
"""


def _markers(output: str) -> dict[str, str]:
    found = {}
    for line in output.splitlines():
        if line.count("==") == 2:
            name, value, _ = line.split("==")
            found[name] = value
    return found


def _install(world: World, key: os.PathLike[str], env_id: str) -> dict[str, str]:
    answer = world.ssh(key, env_id, "sh", options=("-T",), stdin=SCRIPT)  # type: ignore[arg-type]
    assert answer.returncode == 0, answer
    lines = answer.stdout.splitlines()
    assert lines[0] == "3f6a9c: start" and lines[-1] == "3f6a9c: end", answer
    return _markers(answer.stdout)


@contextlib.contextmanager
def _held_open(argv: list[str]) -> Iterator[subprocess.Popen[bytes]]:
    client = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        yield client
    finally:
        client.terminate()
        client.wait(10)


def _fetch(url: str) -> bytes | None:
    with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=5) as response:
        return bytes(response.read())
    return None


def _left_behind(world: World, env_id: str, before: list[str]) -> list[str]:
    """What runs inside that did not before the sessions (PID 1, its keep-alive), besides the server the script
    left in the background on purpose."""
    now = [p for p in processes_in(world.pid1(env_id)) if "httpd" not in p]
    for process in before:
        if process in now:
            now.remove(process)
    return now


def test_the_install_script_on_stdin_then_a_long_lived_local_forward(world: World) -> None:
    _, key, _ = world.user("alice")
    env_id = world.environment(world.users["alice"][0])
    before = processes_in(world.pid1(env_id))
    markers = _install(world, key, env_id)
    assert markers["platform"] == "Linux"
    assert markers["arch"] == platform.machine()
    assert markers["listeningOn"] == str(SERVER_PORT)
    on_host = f"/proc/{world.pid1(env_id)}/root/home/dev/.vscode-server"
    with open(f"{on_host}/bin/version") as version:
        assert version.read() == "server-build-42\n"
    # The script's session is over; the server it started in the background keeps running, as Remote-SSH needs.
    assert any(f"httpd -p 127.0.0.1:{SERVER_PORT}" in p for p in processes_in(world.pid1(env_id)))

    port = free_port()
    argv = [*world.ssh_argv(key, env_id, "-N", "-L", f"{port}:127.0.0.1:{SERVER_PORT}"), f"{env_id}@127.0.0.1"]
    with _held_open(argv) as tunnel:
        wait_for(lambda: _fetch(f"http://127.0.0.1:{port}/index.html") == b"ok\n", "the forward")
        # Connections come and go through the one forward for as long as the editor is open.
        for _ in range(6):
            blob = _fetch(f"http://127.0.0.1:{port}/blob")
            assert blob is not None and hashlib.md5(blob).hexdigest() == markers["blob"]
            assert tunnel.poll() is None
            time.sleep(0.5)
    # The forward's client is gone: no session's process is left inside (the forward itself never had one).
    wait_for(lambda: _left_behind(world, env_id, before) == [], "no session's process left inside")


def test_dynamic_forwarding_reaches_the_server_by_name_through_socks(world: World) -> None:
    host.require("curl")
    _, key, _ = world.user("alice")
    env_id = world.environment(world.users["alice"][0])
    before = processes_in(world.pid1(env_id))
    markers = _install(world, key, env_id)
    port = free_port()
    argv = [*world.ssh_argv(key, env_id, "-N", "-D", f"127.0.0.1:{port}"), f"{env_id}@127.0.0.1"]
    curl = shutil.which("curl") or "curl"

    def through_socks(path: str) -> subprocess.CompletedProcess[bytes]:
        # --socks5-hostname: the name is resolved at the far end, inside the environment, as the editor's is.
        url = f"http://localhost:{SERVER_PORT}/{path}"
        command = [curl, "-sS", "--max-time", "10", "--socks5-hostname", f"127.0.0.1:{port}", url]
        return subprocess.run(command, capture_output=True, timeout=30, check=False)

    with _held_open(argv) as tunnel:
        wait_for(lambda: through_socks("index.html").stdout == b"ok\n", "the SOCKS forward")
        for _ in range(4):
            answer = through_socks("blob")
            assert answer.returncode == 0, answer.stderr
            assert hashlib.md5(answer.stdout).hexdigest() == markers["blob"]
            time.sleep(0.5)
        # Nothing listens on this port inside: the client is told, and the forward stays up.
        refused = subprocess.run(
            [curl, "-sS", "--max-time", "10", "--socks5-hostname", f"127.0.0.1:{port}", "http://localhost:1/"],
            capture_output=True,
            timeout=30,
            check=False,
        )
        assert refused.returncode != 0
        assert through_socks("index.html").stdout == b"ok\n"
        assert tunnel.poll() is None
    wait_for(lambda: _left_behind(world, env_id, before) == [], "no session's process left inside")


def test_a_client_gone_in_the_middle_of_the_script_leaves_nothing_of_it_inside(world: World) -> None:
    _, key, _ = world.user("alice")
    env_id = world.environment(world.users["alice"][0])
    before = processes_in(world.pid1(env_id))
    argv = [*world.ssh_argv(key, env_id, "-T"), f"{env_id}@127.0.0.1", "sh"]
    client = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert client.stdin is not None and client.stdout is not None
    client.stdin.write(b'echo "3f6a9c: start"\nsleep 1004\necho never\n')
    client.stdin.flush()
    assert client.stdout.readline() == b"3f6a9c: start\n"
    wait_for(lambda: any("sleep 1004" in p for p in processes_in(world.pid1(env_id))), "the script to run")
    client.kill()
    client.wait(10)
    wait_for(lambda: _left_behind(world, env_id, before) == [], "the script's processes to go")
