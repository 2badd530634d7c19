"""The whole system on the linux runtime, through the command line: a live management plane, `devyard runner
--runtime linux` as a process of its own, an image from a real registry on 127.0.0.1, and `devyard env ...`.

create (from an image, no content) -> running with start timings; exec streams output and passes the exit code;
stop, then start: a file written before the stop is still there; two environments cannot reach each other nor
169.254.169.254, but reach their own gateway's DNS settings; delete leaves nothing of them on the host: no
mount, no runc container, no cgroup, no network namespace, no veth, no directory.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from devyard.client import Client
from devyard.runner.linux import cgroups
from devyard.runner.linux.network import Network
from devyard.runner.settings import RunnerSettings
from support import host
from support.live_server import LiveServer
from support.registry import USERS, RegistryServer

from .test_network import unused_subnet

pytestmark = pytest.mark.slow


@dataclass
class System:
    server: LiveServer
    admin: Client
    base: Path
    state_dir: Path
    bridge: str
    runner_id: str
    cli_env: dict[str, str]

    def cli(self, *args: str, ok: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [sys.executable, "-m", "devyard", *args],
            env=self.cli_env,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
        if ok:
            assert result.returncode == 0, f"devyard {' '.join(args)}: {result.stderr}"
        return result

    def json(self, *args: str) -> Any:
        return json.loads(self.cli(*args, "-o", "json").stdout)

    def exec(self, environment: str, command: str) -> subprocess.CompletedProcess[str]:
        return self.cli("env", "exec", environment, "--", "sh", "-c", command, ok=False)

    def host_traces(self, environment_id: str) -> list[str]:
        """What of the environment is on the host; empty once it is deleted."""
        traces = [line for line in Path("/proc/self/mountinfo").read_text().splitlines() if environment_id in line]
        runc_root = self.state_dir / "runc"
        if runc_root.exists():
            listed = subprocess.run(
                ["runc", "--root", str(runc_root), "list", "-q"], capture_output=True, text=True, check=True
            )
            traces += [f"runc {name}" for name in listed.stdout.split() if name == environment_id]
        traces += [f"cgroup {path}" for path in cgroups.hierarchies() for path in path.glob(f"*/{environment_id}")]
        traces += [f"file {path}" for path in self.state_dir.rglob(f"*{environment_id}*")]
        traces += [f"netns {path}" for path in Path("/run/devyard").rglob(environment_id)]
        links = json.loads(subprocess.run(["ip", "-j", "link"], capture_output=True, text=True, check=True).stdout)
        traces += [f"veth {link['ifname']}" for link in links if link.get("master") == self.bridge]
        return traces


@pytest.fixture
def system(
    server: LiveServer, admin_client: Client, registry: RegistryServer, busybox_image: str, tmp_path: Path
) -> Iterator[System]:
    host.require("runc", "ip", "nft", "mount", "umount")
    token = secrets.token_hex(3)
    # runc reaches the bundles as an unprivileged id: every directory above them must be searchable.
    base = Path(f"/var/tmp/devyard-system-{token}")
    base.mkdir(mode=0o711)
    bridge = f"dys{token}"
    created = admin_client.post("/api/v1/runners", {"metadata": {"name": f"linux-{token}"}})
    runner_id = created["runner"]["metadata"]["id"]
    admin_client.post(
        "/api/v1/environment-classes",
        {
            "metadata": {"name": f"small-{token}"},
            "spec": {"cpu": 1, "memory_mib": 256, "default": True, "runner_ids": [runner_id]},
        },
    )
    home = tmp_path / "home"
    home.mkdir()
    cli_env = {
        "PATH": os.environ["PATH"],
        "HOME": str(home),
        "DEVYARD_SERVER": server.url,
        "DEVYARD_TOKEN": server.admin_token,
    }
    runner_env = {
        "PATH": os.environ["PATH"],
        "HOME": str(home),
        "DEVYARD_RUNNER_BRIDGE": bridge,
        "DEVYARD_RUNNER_NETWORK_SUBNET": str(unused_subnet("10.232.0.0/15", 24)),
        "DEVYARD_RUNNER_HEARTBEAT_INTERVAL": "0.5",
        "DEVYARD_RUNNER_RESYNC_INTERVAL": "2",
        "DEVYARD_RUNNER_STOP_TIMEOUT": "3",
    }
    state_dir = base / "runner"
    log = (base / "runner.log").open("wb")
    runner = subprocess.Popen(
        [
            *(sys.executable, "-m", "devyard", "runner"),
            *("--server", server.url, "--token", created["exchange_token"], "--state-dir", str(state_dir)),
            *("--runtime", "linux", "--insecure-registry", registry.host, "--gateway-listen", "127.0.0.1:0"),
        ],
        env=runner_env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    system = System(server, admin_client, base, state_dir, bridge, runner_id, cli_env)
    try:
        yield system
    finally:
        for environment in admin_client.list_all("/api/v1/environments")[0]:
            if environment["status"].get("runner_id") == runner_id:
                admin_client.delete(f"/api/v1/environments/{environment['metadata']['id']}")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and any(
            e["status"].get("runner_id") == runner_id for e in admin_client.list_all("/api/v1/environments")[0]
        ):
            time.sleep(0.2)
        os.killpg(runner.pid, signal.SIGTERM)
        try:
            runner.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(runner.pid, signal.SIGKILL)
            runner.wait()
        log.close()
        if sys.exc_info()[0] is not None or runner.returncode not in (0, -signal.SIGTERM):
            print((base / "runner.log").read_text(errors="replace")[-5000:])
        # The runner leaves its bridge, table and namespace directory for its next start; this one has none.
        network = Network.from_settings(RunnerSettings(state_dir=state_dir, bridge=bridge, runtime="linux"))
        asyncio.run(network.teardown())
        shutil.rmtree(base, ignore_errors=True)


def test_an_environment_from_an_image_lives_its_whole_life(system: System, busybox_image: str) -> None:
    created = system.json("env", "create", "--image", busybox_image, "--name", "box", "--wait")
    environment_id = created["metadata"]["id"]
    assert created["status"]["phase"] == "running", created["status"]
    assert {"schedule", "pull", "unpack", "create", "start"} <= set(created["status"]["timings"])
    shown = system.cli("env", "get", environment_id).stdout
    assert "pull" in shown and "start" in shown

    answer = system.exec("box", "echo out; echo err >&2; id -u; hostname; exit 7")
    assert answer.returncode == 7
    assert answer.stdout.split() == ["out", "0", "box"]
    assert answer.stderr.strip() == "err"
    # Root inside is nobody outside: the uid map sends 0 to the runner's range.
    assert system.exec("box", "cat /proc/self/uid_map").stdout.split() == ["0", "1000000", "65536"]
    # The class's limits are the container's.
    limit = system.exec("box", "cat /sys/fs/cgroup/memory/memory.limit_in_bytes /sys/fs/cgroup/memory.max")
    assert str(256 * 1024 * 1024) in limit.stdout

    assert system.exec("box", "echo kept > /root/note; sync").returncode == 0
    stopped = system.json("env", "stop", "box", "--wait")
    assert stopped["status"]["phase"] == "stopped"
    assert system.exec("box", "true").returncode != 0  # nothing runs while stopped
    started = system.json("env", "start", "box", "--wait")
    assert started["status"]["phase"] == "running"
    assert system.exec("box", "cat /root/note").stdout == "kept\n"

    system.cli("env", "delete", "box", "--wait")
    assert system.host_traces(environment_id) == []


def test_environments_cannot_reach_each_other_nor_the_metadata_address(system: System, busybox_image: str) -> None:
    first = system.json("env", "create", "--image", busybox_image, "--name", "one", "--wait")
    second = system.json("env", "create", "--image", busybox_image, "--name", "two", "--wait")
    assert first["status"]["phase"] == second["status"]["phase"] == "running"

    def address(name: str) -> str:
        shown = system.exec(name, "ip -4 -o addr show eth0").stdout.split()
        return shown[shown.index("inet") + 1].split("/")[0]

    two = address("two")
    listening = subprocess.Popen(
        [sys.executable, "-m", "devyard", "env", "exec", "two", "--", "sh", "-c", "nc -l -p 8080 -e echo hello"],
        env=system.cli_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        time.sleep(1)
        # Its own address answers from inside "two": the listener is up, so a refusal from "one" means isolation.
        assert system.exec("two", f"nc -w 2 {two} 8080 </dev/null").stdout.strip() == "hello"
        reached = system.exec("one", f"nc -w 2 {two} 8080 </dev/null")
        assert "hello" not in reached.stdout
        assert system.exec("one", f"ping -c 1 -W 1 {two}").returncode != 0
        assert system.exec("one", "nc -w 2 169.254.169.254 80 </dev/null").returncode != 0
    finally:
        listening.kill()
        listening.wait()
    resolv = system.exec("one", "cat /etc/resolv.conf").stdout
    assert "nameserver" in resolv
    assert "one" in system.exec("one", "cat /etc/hosts").stdout
    for name in ("one", "two"):
        system.cli("env", "delete", name, "--wait")
    assert system.host_traces(first["metadata"]["id"]) == system.host_traces(second["metadata"]["id"]) == []


def test_a_missing_image_or_a_refused_password_fails_the_environment_with_the_reason(
    system: System, registry: RegistryServer, basic_registry: RegistryServer, basic_image: str
) -> None:
    missing = system.json("env", "create", "--image", f"{registry.host}/test/nothing:1", "--name", "missing")
    failed = wait_for_phase(system, missing["metadata"]["id"], "failed")
    assert "not found" in failed["status"]["message"], failed["status"]

    # Without a registry credential the private image is refused; with the user's secret it runs.
    refused = system.json("env", "create", "--image", basic_image, "--name", "refused")
    failed = wait_for_phase(system, refused["metadata"]["id"], "failed")
    assert "needs credentials" in failed["status"]["message"], failed["status"]
    secret = ("secret", "create", "alice-registry", "--type", "registry_credential", "--target", basic_registry.host)
    system.cli(*secret, "--value", f"alice:{USERS['alice']}")
    private = system.json("env", "create", "--image", basic_image, "--name", "private", "--wait")
    assert private["status"]["phase"] == "running", private["status"]
    assert system.exec("private", "echo inside").stdout == "inside\n"

    # A wrong password is refused, even though the image is on the runner already.
    (stored,) = [s for s in system.admin.list_all("/api/v1/secrets")[0] if s["metadata"]["name"] == "alice-registry"]
    system.admin.patch(f"/api/v1/secrets/{stored['metadata']['id']}", {"value": "alice:wrong"})
    wrong = system.json("env", "create", "--image", basic_image, "--name", "wrong")
    failed = wait_for_phase(system, wrong["metadata"]["id"], "failed")
    assert "refused the credentials" in failed["status"]["message"], failed["status"]


def wait_for_phase(system: System, environment_id: str, phase: str, timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        environment = system.admin.get(f"/api/v1/environments/{environment_id}")
        if environment["status"].get("phase") == phase:
            return environment
        assert time.monotonic() < deadline, f"{environment_id} is not {phase}: {environment['status']}"
        time.sleep(0.1)
