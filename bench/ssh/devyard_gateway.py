"""devyard's side: a management plane, a runner on the linux runtime with its SSH gateway on 127.0.0.1, and one
running environment that the benchmark's key may enter.

``running_environment`` starts the server (``bench.api.server.running_server``, SQLite), registers the key as the
admin's, starts ``devyard runner --runtime linux`` as its own process (its own state directory, bridge and subnet,
``DEVYARD_RUNNER_SSH_LISTEN`` on a free port of 127.0.0.1), creates an environment of the image and waits until
it runs; it yields the environment's ``status.ssh`` (host, port, user) and the runner's pid. At the end it
deletes the environment, stops the runner, removes its bridge and nftables table and unmounts what is left.
Called by ``bench.ssh.__main__``.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from bench.api.server import running_server
from bench.start import commands
from support import network

__all__ = ["Endpoint", "running_environment"]

#: The first start pulls and unpacks the image.
_START_TIMEOUT = 180.0
_STOP_TIMEOUT = 60.0
_DELETE_TIMEOUT = 120.0


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int
    user: str
    runner_pid: int
    server_pid: int


def _devyard_command() -> list[str]:
    script = Path(sys.executable).with_name("devyard")
    return [str(script)] if script.exists() else [sys.executable, "-m", "devyard"]


@contextmanager
def running_environment(work: Path, image: str, registry_host: str, public_key: str) -> Iterator[Endpoint]:
    from devyard.cli._waiting import DELETED, wait_for_environment
    from devyard.client import Client

    with ExitStack() as stack:
        work.mkdir(parents=True, exist_ok=True)
        server = stack.enter_context(running_server(work / "server", None, work / "server.log"))
        client = stack.enter_context(Client(server.url, server.admin_token))
        client.post("/api/v1/ssh-keys", {"spec": {"public_key": public_key}})
        runner = stack.enter_context(_running_runner(server.url, server.admin_token, work / "runner", registry_host))
        created = client.post("/api/v1/environments", {"spec": {"image": image}})
        environment_id = created["metadata"]["id"]

        def delete() -> None:
            client.delete(f"/api/v1/environments/{environment_id}")
            wait_for_environment(client, environment_id, DELETED, timeout=_DELETE_TIMEOUT)

        stack.callback(delete)
        try:
            found = wait_for_environment(client, environment_id, "running", timeout=_START_TIMEOUT, written=created)
        except Exception as exc:
            tail = (work / "runner" / "runner.log").read_text(errors="replace")[-1500:]
            raise RuntimeError(f"{environment_id} did not start: {exc}; runner log:\n{tail}") from None
        ssh = (found or {}).get("status", {}).get("ssh")
        if not ssh:
            raise RuntimeError(f"{environment_id} runs but reports no SSH endpoint (status.ssh)")
        yield Endpoint(str(ssh["host"]), int(ssh["port"]), str(ssh["user"]), runner.pid, server.pid)


@contextmanager
def _running_runner(
    server_url: str, admin_token: str, work: Path, registry_host: str
) -> Iterator[subprocess.Popen[bytes]]:
    work.mkdir(parents=True, exist_ok=True)
    env = {"DEVYARD_SERVER": server_url, "DEVYARD_TOKEN": admin_token, "XDG_CONFIG_HOME": str(work / "config")}
    created = json.loads(
        commands.run([*_devyard_command(), "runner", "create", "--output", "json"], timeout=60, env=env)
    )
    suffix = os.getpid() % 10000
    names = {"bridge": f"dyssh{suffix}", "network_subnet": f"10.{150 + suffix % 50}.0.0/16"}
    runner_env = {
        **{key: value for key, value in os.environ.items() if not key.startswith("DEVYARD_")},
        **{f"DEVYARD_RUNNER_{key.upper()}": value for key, value in names.items()},
        "DEVYARD_RUNNER_LOG_LEVEL": "WARNING",
        "DEVYARD_RUNNER_SSH_LISTEN": f"127.0.0.1:{network.free_port()}",
    }
    argv = [
        *_devyard_command(), "runner", "--server", server_url, "--token", created["exchange_token"],
        "--state-dir", str(work / "state"), "--runtime", "linux", "--insecure-registry", registry_host,
        "--gateway-listen", f"127.0.0.1:{network.free_port()}",
    ]  # fmt: skip
    log = (work / "runner.log").open("ab")
    process = subprocess.Popen(argv, env=runner_env, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    log.close()
    try:
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        _remove_network(work / "state", names)
        commands.unmount_under(work)


def _remove_network(state_dir: Path, names: dict[str, str]) -> None:
    """The bridge and the nftables table the runner made (a runner keeps them when it stops)."""
    from devyard.runner.linux.network import Network
    from devyard.runner.settings import RunnerSettings

    settings = RunnerSettings(state_dir=state_dir, runtime="linux", **names)  # type: ignore[arg-type]
    asyncio.run(Network.from_settings(settings).teardown())
