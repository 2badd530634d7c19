"""Fixtures of the tests that run a whole linux runner (``devyard runner --runtime linux``) as a process against
the real server: the test's corner of the host (state directory, bridge, subnet, and what the runner derives
from the bridge: its netns directory and cgroup parent), the process, and what the host shows of them.

Used by ``test_runner_crash`` and ``test_doctor``. The state directory lives under /var/tmp (runc reaches the
bundles as an unprivileged id; pytest's tmp_path is 0700). Everything the runner may leave (containers, mounts,
cgroups, namespaces, veths, the bridge, the nftables table) is removed after the test, however it ended.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from devyard.client import Client
from devyard.runner.linux import network as network_module
from devyard.runner.settings import RunnerSettings
from support import host, live_server

from .runtime_host import RuntimeHost
from .runtime_host import scrub as scrub_runtime
from .test_network import unused_subnet

__all__ = ["RunnerHost", "RunnerProcess", "pid1_start", "runner_host_fixture", "sqlite_server_fixture"]

PROGRAMS = ("runc", "mount", "umount", "ip", "nft", "nsenter", "unshare")


@dataclass
class RunnerProcess:
    process: subprocess.Popen[bytes]

    def kill(self) -> None:
        """SIGKILL the runner and what it was running (runc, mount...): its whole process group, as a crash or
        ``systemctl kill -s KILL`` would. The containers' own processes are in sessions of their own."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                return self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.process.returncode


@dataclass
class RunnerHost:
    """One test's runner: where it keeps its state, its network, and the server it talks to."""

    base: Path
    bridge: str
    subnet: str
    registry: str
    server_url: str = ""
    exchange_token: str = ""
    log: Path = field(default_factory=Path)
    processes: list[RunnerProcess] = field(default_factory=list)

    @property
    def state_dir(self) -> Path:
        return self.base / "state"

    @property
    def netns_dir(self) -> Path:
        return network_module.NETNS_DIR.parent / f"netns-{self.bridge}"

    @property
    def cgroup_parent(self) -> str:
        return f"devyard-{self.bridge}"

    def environment(self) -> dict[str, str]:
        """The runner's settings that have no option, as its environment variables."""
        return {
            "DEVYARD_RUNNER_BRIDGE": self.bridge,
            "DEVYARD_RUNNER_NETWORK_SUBNET": self.subnet,
            "DEVYARD_RUNNER_STOP_TIMEOUT": "3",
            "DEVYARD_RUNNER_HEARTBEAT_INTERVAL": "1",
            "DEVYARD_RUNNER_RECONNECT_BASE": "0.05",
            "DEVYARD_RUNNER_RECONNECT_MAX": "0.5",
            "DEVYARD_RUNNER_RETRY_BASE": "0.1",
            "DEVYARD_RUNNER_RETRY_MAX": "1",
        }

    def settings(self, **overrides: Any) -> RunnerSettings:
        """The settings the runner process has, for ``doctor.examine`` in the test's process."""
        return RunnerSettings(
            server=self.server_url,
            state_dir=self.state_dir,
            runtime="linux",
            bridge=self.bridge,
            network_subnet=self.subnet,
            insecure_registries=[self.registry],
            **overrides,
        )

    def start(self) -> RunnerProcess:
        argv = [
            sys.executable,
            "-m",
            "devyard",
            "runner",
            "--server",
            self.server_url,
            "--state-dir",
            str(self.state_dir),
            "--runtime",
            "linux",
            "--insecure-registry",
            self.registry,
            "--gateway-listen",
            "127.0.0.1:0",
        ]
        if not (self.state_dir / "credential.json").exists():
            argv += ["--token", self.exchange_token]
        with self.log.open("ab") as output:
            process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                env={**os.environ, **self.environment()},
                start_new_session=True,
            )
        runner = RunnerProcess(process)
        self.processes.append(runner)
        return runner

    # What the host shows.

    def runc(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["runc", "--root", str(self.state_dir / "runc"), *argv], capture_output=True, text=True, check=False
        )

    def runc_state(self, environment_id: str) -> dict[str, Any] | None:
        answer = self.runc("state", environment_id)
        return json.loads(answer.stdout) if answer.returncode == 0 else None

    def runc_containers(self) -> list[str]:
        if not (self.state_dir / "runc").is_dir():
            return []
        return self.runc("list", "-q").stdout.split()

    def exec(self, environment_id: str, script: str) -> subprocess.CompletedProcess[str]:
        return self.runc("exec", environment_id, "/bin/sh", "-c", script)

    def mounts(self) -> list[str]:
        """Mount points under the state directory or the netns directory."""
        found = []
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            mount_point = line.split(" ")[4]
            if mount_point.startswith((f"{self.base}/", f"{self.netns_dir}/")) or mount_point == str(self.netns_dir):
                found.append(mount_point)
        return found

    def namespaces(self) -> list[str]:
        return sorted(p.name for p in self.netns_dir.iterdir()) if self.netns_dir.is_dir() else []

    def veths(self) -> list[str]:
        links = json.loads(
            subprocess.run(
                ["ip", "-j", "link", "show", "type", "veth"], capture_output=True, text=True, check=True
            ).stdout
            or "[]"
        )
        return [
            link["ifname"]
            for link in links
            if link.get("master") == self.bridge or (link.get("ifalias") or "").startswith(f"{self.bridge}/")
        ]

    def cgroups(self) -> list[str]:
        from devyard.runner.linux import cgroups

        return [str(d) for ds in cgroups.leftover_cgroups(self.cgroup_parent).values() for d in ds]

    def leftovers(self) -> dict[str, list[str]]:
        """Everything of a container on the host: empty once every environment is deleted."""
        found = {
            "mounts": self.mounts(),
            "namespaces": self.namespaces(),
            "veths": self.veths(),
            "cgroups": self.cgroups(),
            "runc": self.runc_containers(),
        }
        return {kind: items for kind, items in found.items() if items}

    def scrub(self) -> None:
        for runner in self.processes:
            if runner.process.poll() is None:
                runner.kill()
        scrub_runtime(RuntimeHost(self.base, self.state_dir, self.cgroup_parent, Path("/nonexistent")))
        for mount_point in reversed(self.mounts()):
            subprocess.run(["umount", "--lazy", mount_point], check=False, capture_output=True)
        for name in self.veths():
            subprocess.run(["ip", "link", "del", name], check=False, capture_output=True)
        subprocess.run(["ip", "link", "del", self.bridge], check=False, capture_output=True)
        table = network_module.table_name(self.bridge)
        subprocess.run(["nft", "delete", "table", "inet", table], check=False, capture_output=True)
        shutil.rmtree(self.netns_dir, ignore_errors=True)
        shutil.rmtree(self.base, ignore_errors=True)


def pid1_start(pid: int) -> int:
    """When the process started, in clock ticks since boot (``/proc/PID/stat`` field 22): a restarted
    container's PID 1 has another, even should its pid be reused."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rpartition(")")[2].split()[19])


def wait_for(read: Callable[[], Any], done: Callable[[Any], bool], *, timeout: float = 30.0, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = read()
        if done(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}; last: {value!r}")
        time.sleep(0.05)


@pytest.fixture(name="server")
def sqlite_server_fixture(tmp_path: Path) -> Iterator[live_server.LiveServer]:
    """The real management plane over SQLite in a thread of this process (the runner's behaviour does not
    depend on the server's database, so these slow tests run once, not once per database kind)."""
    with live_server.serve_in_thread(live_server.settings_for(tmp_path / "server")) as live:
        yield live


@pytest.fixture(name="runner_host")
def runner_host_fixture(
    server: live_server.LiveServer, registry: Any, busybox_image: str, tmp_path: Path
) -> Iterator[RunnerHost]:
    host.require(*PROGRAMS)
    token = secrets.token_hex(3)
    base = Path(f"/var/tmp/devyard-runner-{token}")
    base.mkdir(mode=0o711)
    os.chmod(base, 0o711)
    where = RunnerHost(
        base=base,
        bridge=f"dyr{token}",
        subnet=str(unused_subnet("10.232.0.0/15", 24)),
        registry=registry.host,
        server_url=server.url,
        log=tmp_path / "runner.log",
    )
    with server.client() as admin:
        created = admin.post("/api/v1/runners", {"metadata": {"name": f"crash-{token}"}})
    where.exchange_token = created["exchange_token"]
    try:
        yield where
    finally:
        where.scrub()


def environment_phase(admin: Client, environment_id: str) -> str | None:
    """The environment's status phase, or None once the server has removed it."""
    from devyard.client import ApiError

    try:
        return str(admin.get(f"/api/v1/environments/{environment_id}")["status"]["phase"])
    except ApiError as exc:
        if exc.status == 404:
            return None
        raise
