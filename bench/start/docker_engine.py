"""A Docker Engine (Debian's ``docker.io``) of the benchmark's own, for the ``docker`` and ``devcontainer`` peers.

``running_engine`` starts ``dockerd`` with everything under one temporary directory (data root, exec root,
pid file, its unix socket, an empty daemon.json), without a bridge and without touching the host's firewall
(``--iptables=false``: other tests on the machine use nftables), so containers run with ``--network none``.
It stops the engine at the end and unmounts whatever it left. Called by ``bench.start.__main__``.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from bench.start import commands

__all__ = ["DockerEngine", "running_engine"]

_START_TIMEOUT = 60.0
_STOP_TIMEOUT = 30.0
#: Debian's docker CLI, rather than another one that may come first on PATH.
_DOCKER_CLI = "/usr/bin/docker"


@dataclass(frozen=True)
class DockerEngine:
    cli: str
    #: Environment variables pointing the docker CLI (and what runs it) at this engine.
    env: dict[str, str]
    pid: int
    version: str

    def docker(self, *arguments: str | Path, timeout: float = 60.0) -> str:
        return commands.run([self.cli, *arguments], timeout=timeout, env=self.env)


@contextmanager
def running_engine(work: Path) -> Iterator[DockerEngine]:
    """Start ``dockerd`` under ``work`` and wait until it answers; stop it and clean up on exit."""
    dockerd = commands.find("dockerd", "/usr/sbin/dockerd")
    cli = commands.find("docker", _DOCKER_CLI)
    if dockerd is None or cli is None:
        raise RuntimeError("dockerd or docker is missing: bench/start/setup installs Debian's docker.io")
    work.mkdir(parents=True, exist_ok=True)
    socket = work / "docker.sock"
    (work / "daemon.json").write_text("{}")
    (work / "cli").mkdir(exist_ok=True)
    env = {"DOCKER_HOST": f"unix://{socket}", "DOCKER_CONFIG": str(work / "cli")}
    argv = [
        dockerd,
        "--config-file", work / "daemon.json",
        "--data-root", work / "data",
        "--exec-root", work / "exec",
        "--pidfile", work / "dockerd.pid",
        "--host", f"unix://{socket}",
        "--iptables=false", "--ip6tables=false", "--ip-masq=false", "--bridge=none",
        "--log-level=warn",
    ]  # fmt: skip
    log = (work / "dockerd.log").open("ab")
    process = subprocess.Popen(
        [str(part) for part in argv], stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
    )
    log.close()
    try:
        version = _wait_ready(cli, env, process, work / "dockerd.log")
        yield DockerEngine(cli, env, process.pid, version)
    finally:
        _stop(process)
        commands.unmount_under(work)
        shutil.rmtree(work / "data", ignore_errors=True)
        shutil.rmtree(work / "exec", ignore_errors=True)


def _wait_ready(cli: str, env: dict[str, str], process: subprocess.Popen[bytes], log: Path) -> str:
    deadline = time.monotonic() + _START_TIMEOUT
    while True:
        try:
            return commands.run([cli, "version", "--format", "{{.Server.Version}}"], timeout=10, env=env).strip()
        except commands.CommandFailed:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            tail = log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"dockerd did not start (exit status {process.poll()}):\n{tail}")
        time.sleep(0.1)


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=_STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        # Its managed containerd and shims are in its session: end them with it.
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
