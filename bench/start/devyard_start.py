"""devyard's warm start and idle density, on a real server and a runner on the linux runtime.

``measure`` starts the management plane (``bench.api.server.running_server``, SQLite) and one runner
(``devyard runner --runtime linux``, its own state directory, bridge and subnet, its gateway on 127.0.0.1), starts
one environment of the busybox image first so that the image is cached (not timed), then:

- CLI: ``devyard env create --image REF -- true``, the one command that creates, waits until Running and runs
  a command inside, timed from its start to its exit: what a user waits for, as with ``docker run IMAGE CMD``.
  Beside it, on the line of its parts, the same in two commands (``devyard env create --image REF --wait``,
  then ``devyard env exec ENV -- true``), and what a CLI process making one small request costs;
- API: the one command's requests made in this process by the CLI's own code (``devyard.client.Client``,
  ``cli._waiting.wait_for_environment`` from the create's answer, the gateway session of ``cli._exec_session``),
  so the difference to the CLI figure is what starting a Python process costs;
- density: N idle environments at once; the runner process's RSS and PSS before and with all running, and how
  long an exec in one of them takes meanwhile (the host stays responsive).

Every environment is deleted after (not timed). Called by ``bench.start.__main__``.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import importlib.util
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from bench.api.server import running_server
from bench.start import commands, report
from support import network

__all__ = ["image_store_available", "linux_runtime_available", "measure", "running_runner"]

#: ``__main__``'s way to run a part: ``attempt(record_failure, action)`` returns what ``action`` returns, or
#: None after passing the failure's message to ``record_failure``.
Attempt = Callable[..., Any]

#: A first start pulls and unpacks the image: it may take a while.
_FIRST_START_TIMEOUT = 180.0
_START_TIMEOUT = 60.0
_DELETE_TIMEOUT = 120.0
_STOP_TIMEOUT = 60.0
#: How long a wait for an environment goes without checking on the runner process.
_WAIT_SLICE = 3.0


def image_store_available() -> bool:
    return importlib.util.find_spec("devyard.runner.images.store") is not None


def linux_runtime_available() -> bool:
    return importlib.util.find_spec("devyard.runner.linux.runtime") is not None


def _devyard_command() -> list[str]:
    script = Path(sys.executable).with_name("devyard")
    return [str(script)] if script.exists() else [sys.executable, "-m", "devyard"]


@contextmanager
def running_runner(
    server_url: str,
    admin_token: str,
    work: Path,
    registry_host: str,
    runtime: str,
    settings: Mapping[str, str] | None = None,
) -> Iterator[subprocess.Popen[bytes]]:
    """``devyard runner --runtime linux`` as its own process, on its own bridge and subnet (so it meets no other
    runner on the host), its gateway on a free port of 127.0.0.1; stopped with SIGTERM on exit. ``settings``:
    more of ``RunnerSettings`` by field name (``{"desktop": "true"}``), given as its environment variables.
    Also used by ``bench.devcontainer``."""
    work.mkdir(parents=True, exist_ok=True)
    env = {"DEVYARD_SERVER": server_url, "DEVYARD_TOKEN": admin_token, "XDG_CONFIG_HOME": str(work / "config")}
    created = json.loads(
        commands.run([*_devyard_command(), "runner", "create", "--output", "json"], timeout=60, env=env)
    )
    suffix = os.getpid() % 10000
    runner_network = {"bridge": f"dybench{suffix}", "network_subnet": f"10.{200 + suffix % 50}.0.0/16"}
    runner_env = {
        **{key: value for key, value in os.environ.items() if not key.startswith("DEVYARD_")},
        **{f"DEVYARD_RUNNER_{key.upper()}": value for key, value in runner_network.items()},
        "DEVYARD_RUNNER_LOG_LEVEL": "WARNING",
        **{f"DEVYARD_RUNNER_{key.upper()}": value for key, value in (settings or {}).items()},
    }
    argv = [
        *_devyard_command(), "runner", "--server", server_url, "--token", created["exchange_token"],
        "--state-dir", str(work / "state"), "--runtime", runtime, "--insecure-registry", registry_host,
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
        if runtime == "linux":
            _remove_network(work / "state", runner_network)
        commands.unmount_under(work)


def _remove_network(state_dir: Path, names: dict[str, str]) -> None:
    """Remove the bridge and the nftables table the runner made (a runner keeps them when it stops)."""
    from devyard.runner.linux.network import Network
    from devyard.runner.settings import RunnerSettings

    settings = RunnerSettings(state_dir=state_dir, runtime="linux", **names)  # type: ignore[arg-type]
    asyncio.run(Network.from_settings(settings).teardown())


class _Environments:
    """The environments this benchmark made, through the same client code as the CLI; deletes them all at
    the end. Its waits give up early, saying why, when the runner process has died or the environment failed."""

    def __init__(self, server_url: str, token: str, image: str, runner: subprocess.Popen[bytes], log: Path) -> None:
        from devyard.client import Client

        self.client = Client(server_url, token)
        self.runner = runner
        self.runner_log = log
        self.image = image
        self.made: list[str] = []

    def create(self) -> dict[str, Any]:
        """The new environment as the create answered it."""
        # An environment of the image alone, no content: what ``docker run IMAGE`` starts (a server's runner
        # takes no local folder, and a git clone would be another benchmark).
        body = {"spec": {"image": self.image}}
        created: dict[str, Any] = self.client.post("/api/v1/environments", body)
        self.made.append(created["metadata"]["id"])
        return created

    def wait_running(self, environment_id: str, timeout: float, written: dict[str, Any] | None = None) -> None:
        """What ``--wait`` does (``cli._waiting``), in slices, between which it checks on the runner; from the
        create's answer (``written``) as ``env create -- CMD`` does, when given."""
        from devyard.cli._waiting import WaitFailed, wait_for_environment

        deadline = time.monotonic() + timeout
        while True:
            try:
                wait_for_environment(self.client, environment_id, "running", timeout=_WAIT_SLICE, written=written)
                return
            except WaitFailed:
                written = None
                status = self.client.get(f"/api/v1/environments/{environment_id}").get("status") or {}
                if status.get("phase") == "failed" or time.monotonic() > deadline:
                    tail = self.runner_log.read_text(errors="replace")[-1500:]
                    message = (
                        f"{environment_id} did not start within {timeout:g} s: phase {status.get('phase')}, "
                        f"{status.get('message') or 'no message'}; runner log:\n{tail}"
                    )
                    raise RuntimeError(message) from None
            if self.runner.poll() is not None:
                log = self.runner_log.read_text(errors="replace")
                last = ([line for line in log.splitlines() if line.strip()] or ["(empty log)"])[-1].strip()
                raise RuntimeError(
                    f"the runner exited with status {self.runner.returncode} ({last}); log:\n{log[-1500:]}"
                )

    def exec_true(self, environment_id: str) -> int:
        from devyard.cli import _exec_session

        answer = self.client.post(f"/api/v1/environments/{environment_id}/access")
        access = _exec_session.GatewayAccess.from_answer(answer)
        options = _exec_session.SessionOptions(argv=("true",), tty=False, env={})
        # The CLI's session, with /dev/null for its streams: this process's own stdin stays untouched.
        null = os.open(os.devnull, os.O_RDWR)
        try:
            return _exec_session.run_session(access, options, stdin_fd=null, stdout_fd=null)
        finally:
            os.close(null)

    def adopt(self, name: str) -> None:
        """Count the environment named ``name`` (made by a CLI process) among this benchmark's, if it exists."""
        listed = self.client.get("/api/v1/environments", {"page_size": 500})["items"]
        self.made.extend(item["metadata"]["id"] for item in listed if item["metadata"]["name"] == name)

    def delete(self, environment_id: str) -> None:
        from devyard.cli._waiting import DELETED, wait_for_environment

        self.client.delete(f"/api/v1/environments/{environment_id}")
        wait_for_environment(self.client, environment_id, DELETED, timeout=_DELETE_TIMEOUT)
        self.made.remove(environment_id)

    def delete_all(self) -> None:
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(self.delete, list(self.made)))

    def close(self) -> None:
        self.client.close()


def _cli_environment(env: dict[str, str]) -> dict[str, str]:
    """The CLI's variables: ``env``, and bytecode written and read as an installed devyard has it (a harness that
    sets PYTHONDONTWRITEBYTECODE would make every CLI process compile devyard's modules from source)."""
    return {**env, "PYTHONDONTWRITEBYTECODE": ""}


def _cli_start(
    environments: _Environments, env: dict[str, str], steps: dict[str, list[float]], names: Iterator[str]
) -> float:
    """The one command, timed; then, not in its figure, the two-command form and a one-request command."""
    devyard = _devyard_command()
    env = _cli_environment(env)
    name = next(names)
    one = [*devyard, "env", "create", "--image", environments.image, "--name", name, "--", "true"]
    started = time.perf_counter()
    # Its id is known only from the server: the name finds it for the delete, even when the command failed.
    try:
        commands.run(one, timeout=_START_TIMEOUT, env=env)
    finally:
        environments.adopt(name)
    answered = time.perf_counter()
    environments.delete_all()

    create = [*devyard, "env", "create", "--image", environments.image, "--wait", "--output", "json"]
    two_started = time.perf_counter()
    created = json.loads(commands.run(create, timeout=_START_TIMEOUT, env=env))
    running = time.perf_counter()
    environment_id = created["metadata"]["id"]
    environments.made.append(environment_id)
    commands.run([*devyard, "env", "exec", environment_id, "--", "true"], timeout=_START_TIMEOUT, env=env)
    two_answered = time.perf_counter()
    environments.delete(environment_id)
    # The two-command form's parts first, as the report has always shown them; the total is not in the figure.
    steps.setdefault("env create --wait", []).append(running - two_started)
    steps.setdefault("env exec", []).append(two_answered - running)
    steps.setdefault("the two commands (not in the total)", []).append(two_answered - two_started)
    # A CLI process that makes one small request: what any command costs before its real work.
    listed = time.perf_counter()
    commands.run([*devyard, "env", "list", "--output", "json"], timeout=_START_TIMEOUT, env=env)
    steps.setdefault("devyard env list (not in the total)", []).append(time.perf_counter() - listed)
    return answered - started


def _warm_cli(environments: _Environments, env: dict[str, str], names: Iterator[str]) -> None:
    """One untimed run of each CLI form: the first writes the modules' bytecode and fills the page cache."""
    _cli_start(environments, env, {}, names)


def _api_start(environments: _Environments, steps: dict[str, list[float]]) -> float:
    started = time.perf_counter()
    created = environments.create()
    environment_id = created["metadata"]["id"]
    environments.wait_running(environment_id, _START_TIMEOUT, written=created)
    running = time.perf_counter()
    exit_code = environments.exec_true(environment_id)
    answered = time.perf_counter()
    environments.delete(environment_id)
    if exit_code != 0:
        raise RuntimeError(f"exec true in {environment_id} exited {exit_code}")
    steps.setdefault("create to running", []).append(running - started)
    steps.setdefault("exec (access ticket + gateway)", []).append(answered - running)
    return answered - started


def _repeat(start: Callable[[], float], runs: int) -> list[float]:
    return [start() for _ in range(runs)]


def _memory_kib(pid: int) -> dict[str, int]:
    """The process's resident set and proportional set size (shared pages split among their users), KiB."""
    values: dict[str, int] = {}
    for name, key in (("status", "VmRSS:"), ("smaps_rollup", "Pss:")):
        try:
            for line in Path(f"/proc/{pid}/{name}").read_text().splitlines():
                if line.startswith(key):
                    values["RSS" if key == "VmRSS:" else "PSS"] = int(line.split()[1])
                    break
        except OSError:
            pass
    return values


def _host_used_kib() -> int:
    """Memory the host uses (MemTotal - MemAvailable), KiB: the containers' processes and page cache included."""
    fields = {line.split(":")[0]: int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()}
    return fields["MemTotal"] - fields["MemAvailable"]


def _density(environments: _Environments, runner_pid: int, count: int) -> report.Density:
    density = report.Density(environments=count)
    time.sleep(1.0)  # let the runner's warm-up garbage settle before the first reading
    density.before_kib = {**_memory_kib(runner_pid), "host (all processes)": _host_used_kib()}
    with ThreadPoolExecutor(8) as pool:
        ids = list(pool.map(lambda _: str(environments.create()["metadata"]["id"]), range(count)))
        deadline = _START_TIMEOUT + 2 * count
        list(pool.map(lambda environment_id: environments.wait_running(environment_id, deadline), ids))
    time.sleep(1.0)
    density.after_kib = {**_memory_kib(runner_pid), "host (all processes)": _host_used_kib()}
    for _ in range(5):
        started = time.perf_counter()
        if environments.exec_true(ids[0]) != 0:
            raise RuntimeError(f"exec true in {ids[0]} failed while {count} environments ran")
        density.probe.append(time.perf_counter() - started)
    environments.delete_all()
    return density


def measure(
    run: report.Run,
    options: argparse.Namespace,
    work: Path,
    image: str,
    registry_host: str,
    attempt: Attempt,
) -> None:
    """Measure devyard's starts (unless ``devyard`` is skipped) and the density (unless ``density`` is) into
    ``run``; a part that fails is recorded there (through ``attempt``) and the rest still runs."""
    starts = run.starts
    wanted = {"devyard", "density"} - options.skip
    run.versions["devyard runtime"] = options.devyard_runtime
    if options.devyard_runtime != "linux":
        run.notes.append(f"devyard ran on the {options.devyard_runtime} runtime: no container, not the issue's figure")
    if "devyard" not in wanted:
        starts.missing[report.DEVYARD_CLI] = "skipped (--skip)"
    if "density" not in wanted or options.density == 0:
        run.density = None
    if options.devyard_runtime == "linux" and not linux_runtime_available():
        reason = "NOT MEASURED: the linux runtime (devyard.runner.linux.runtime) has not landed"
        if "devyard" in wanted:
            starts.missing[report.DEVYARD_CLI] = reason
        if "density" in wanted:
            run.density = report.Density(environments=options.density, missing=reason)
        return

    def record(reason: str) -> None:
        for key in (report.DEVYARD_CLI, report.DEVYARD_API):
            starts.missing.setdefault(key, reason)
        if run.density is None and "density" in wanted:
            run.density = report.Density(environments=options.density, missing=reason)

    attempt(record, lambda: _measure(run, options, work, image, registry_host, wanted, attempt))


def _measure(
    run: report.Run,
    options: argparse.Namespace,
    work: Path,
    image: str,
    registry_host: str,
    wanted: set[str],
    attempt: Attempt,
) -> None:
    starts = run.starts
    with ExitStack() as stack:
        work.mkdir(parents=True, exist_ok=True)
        server = stack.enter_context(running_server(work / "server", None, work / "server.log"))
        runner = stack.enter_context(
            running_runner(server.url, server.admin_token, work / "runner", registry_host, options.devyard_runtime)
        )
        environments = _Environments(server.url, server.admin_token, image, runner, work / "runner" / "runner.log")
        stack.callback(environments.close)
        stack.callback(environments.delete_all)
        # The first start pulls and unpacks the image: the runs after it find it cached.
        first = environments.create()["metadata"]["id"]
        environments.wait_running(first, _FIRST_START_TIMEOUT)
        environments.delete(first)

        if "devyard" in wanted:
            cli_env = {"DEVYARD_SERVER": server.url, "DEVYARD_TOKEN": server.admin_token}
            cli_env["XDG_CONFIG_HOME"] = str(work / "config")
            names = (f"bench-{number}" for number in itertools.count())
            _warm_cli(environments, cli_env, names)
            starters: dict[str, Callable[[], float]] = {
                report.DEVYARD_CLI: functools.partial(
                    _cli_start, environments, cli_env, starts.steps.setdefault(report.DEVYARD_CLI, {}), names
                ),
                report.DEVYARD_API: functools.partial(
                    _api_start, environments, starts.steps.setdefault(report.DEVYARD_API, {})
                ),
            }
            for key, start in starters.items():
                samples = attempt(
                    functools.partial(starts.missing.__setitem__, key),
                    functools.partial(_repeat, start, options.runs),
                )
                if samples is not None:
                    starts.samples[key] = samples
        if "density" in wanted and options.density > 0:
            density = attempt(
                lambda reason: setattr(run, "density", report.Density(missing=reason)),
                lambda: _density(environments, runner.pid, options.density),
            )
            if density is not None:
                run.density = density
