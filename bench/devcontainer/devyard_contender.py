"""devyard's side: an environment of the project folder on a server and a desktop runner (linux runtime).

The platform is the one ``bench.start`` runs: the management plane (``bench.api.server.running_server``, SQLite)
and ``devyard runner --runtime linux`` (``bench.start.devyard_start.running_runner``) with ``desktop`` set, so
that an environment's content may be a local folder, as ``devyard up`` makes it (``content.local_path``).

A start is timed from the create request (``POST /api/v1/environments``) to the first status, seen through a
watch from the create's resource_version, with ``phase == running`` and the ``Hooks`` condition True: every
lifecycle hook ran, the postCreateCommand included. ``running`` alone comes after devcontainer.json's
``waitFor`` (updateContentCommand by default), before the postCreateCommand; ``devcontainer up`` answers only
after it has run all of them, so this is the same end point.

- ``measure_cold``: for each run a new server and a new runner with an empty state directory: no image in the
  store, no build cache, no Feature fetched. The runner is online before the clock starts.
- ``measure_warm``: one server and runner; a first environment (not timed) fills the caches; then each run is a
  new environment of the same folder.

Each environment is deleted after its run (not timed). Each run also returns ``status.timings`` (the seconds the
runner spent in each step), which show where the time goes. Called by ``bench.devcontainer.__main__``.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.api.server import running_server
from bench.start import commands, devyard_start

__all__ = ["Start", "measure_cold", "measure_warm"]

_START_TIMEOUT = 600.0
_ONLINE_TIMEOUT = 60.0
_DELETE_TIMEOUT = 120.0
#: How long a watch goes without checking on the runner process.
_WATCH_SLICE = 3


@dataclass(frozen=True)
class Start:
    """One start: seconds from the create request to running with every hook done, and ``status.timings``."""

    seconds: float
    timings: Mapping[str, float]


class _Platform:
    """A server and its one desktop runner, through the CLI's client."""

    def __init__(self, url: str, token: str, runner: subprocess.Popen[bytes], runner_log: Path) -> None:
        from devyard.client import Client

        self.client = Client(url, token)
        self.runner = runner
        self.runner_log = runner_log

    def wait_online(self) -> None:
        """Until the runner has registered and offers room (so the clock never includes its start)."""
        deadline = time.monotonic() + _ONLINE_TIMEOUT
        while time.monotonic() < deadline:
            self._check_runner()
            runners = self.client.get("/api/v1/runners")["items"]
            if any((r.get("status") or {}).get("phase") == "online" for r in runners):
                return
            time.sleep(0.1)
        raise RuntimeError(f"the runner did not come online within {_ONLINE_TIMEOUT:g} s; log:\n{self._log_tail()}")

    def start(self, folder: Path) -> Start:
        started = time.perf_counter()
        created = self.client.post("/api/v1/environments", {"spec": {"content": {"local_path": str(folder)}}})
        environment_id = str(created["metadata"]["id"])
        try:
            timings = self._wait_ready(environment_id, created)
            seconds = time.perf_counter() - started
        finally:
            self._delete(environment_id)
        return Start(seconds, timings)

    def _wait_ready(self, environment_id: str, created: dict[str, Any]) -> dict[str, float]:
        """``status.timings`` once the environment runs with every hook done; from the create's answer on."""
        from devyard.client import TransportError

        since = str(created["metadata"]["resource_version"])
        deadline = time.monotonic() + _START_TIMEOUT
        while time.monotonic() < deadline:
            try:
                for event in self.client.watch(
                    "/api/v1/environments", since, {"bookmark_seconds": 1}, timeout=_WATCH_SLICE
                ):
                    since = str(event.object.get("metadata", {}).get("resource_version") or since)
                    if event.object.get("metadata", {}).get("id") != environment_id or event.type == "BOOKMARK":
                        continue
                    status = event.object.get("status") or {}
                    if _ready(status):
                        return {step: float(seconds) for step, seconds in (status.get("timings") or {}).items()}
                    if status.get("phase") == "failed":
                        raise RuntimeError(
                            f"{environment_id} failed: {status.get('message')}; runner log:\n{self._log_tail()}"
                        )
            except TransportError:
                time.sleep(0.2)
            self._check_runner()
        status = self.client.get(f"/api/v1/environments/{environment_id}").get("status") or {}
        raise RuntimeError(
            f"{environment_id} was not running with its hooks done within {_START_TIMEOUT:g} s: phase "
            f"{status.get('phase')}, {status.get('message') or 'no message'}; runner log:\n{self._log_tail()}"
        )

    def _delete(self, environment_id: str) -> None:
        from devyard.cli._waiting import DELETED, wait_for_environment

        self.client.delete(f"/api/v1/environments/{environment_id}")
        wait_for_environment(self.client, environment_id, DELETED, timeout=_DELETE_TIMEOUT)

    def _check_runner(self) -> None:
        if self.runner.poll() is not None:
            raise RuntimeError(f"the runner exited with status {self.runner.returncode}; log:\n{self._log_tail()}")

    def _log_tail(self) -> str:
        return self.runner_log.read_text(errors="replace")[-2000:]

    def close(self) -> None:
        self.client.close()


def _ready(status: Mapping[str, Any]) -> bool:
    hooks = [c for c in status.get("conditions") or [] if c.get("type") == "Hooks"]
    # No Hooks condition: a dev container without hooks. This project has one, so it always shows.
    return status.get("phase") == "running" and all(c.get("status") == "True" for c in hooks)


@contextmanager
def _platform(work: Path, registry_host: str) -> Iterator[_Platform]:
    with ExitStack() as stack:
        work.mkdir(parents=True, exist_ok=True)
        server = stack.enter_context(running_server(work / "server", None, work / "server.log"))
        runner = stack.enter_context(
            devyard_start.running_runner(
                server.url,
                server.admin_token,
                work / "runner",
                registry_host,
                "linux",
                # INFO: the runner's log has each step's timings, for a look at where the time went.
                {"desktop": "true", "log_level": "INFO"},
            )
        )
        platform = _Platform(server.url, server.admin_token, runner, work / "runner" / "runner.log")
        stack.callback(platform.close)
        platform.wait_online()
        yield platform


def measure_cold(folder: Path, work: Path, registry_host: str, runs: int) -> list[Start]:
    """``runs`` starts, each on a new server and runner with an empty state directory (removed after)."""
    starts = []
    for number in range(runs):
        directory = work / f"cold-{number}"
        try:
            with _platform(directory, registry_host) as platform:
                starts.append(platform.start(folder))
        finally:
            commands.unmount_under(directory)
            if number + 1 < runs:  # the last one's log stays until the run's directory goes
                shutil.rmtree(directory, ignore_errors=True)
    return starts


def measure_warm(folder: Path, work: Path, registry_host: str, runs: int) -> list[Start]:
    """A first start (not timed) that fills the caches, then ``runs`` starts of new environments."""
    with _platform(work / "warm", registry_host) as platform:
        platform.start(folder)
        return [platform.start(folder) for _ in range(runs)]
