"""The peers devyard's start is measured against: ``runc`` (the floor), ``docker run`` and ``devcontainer up``.

Each ``measure_*`` starts a container of the busybox image ``runs`` times and returns the seconds each start
took, from the first command to the answer of the first command inside ("started and answered"):

- runc: ``runc run -d`` (the container's process sleeps) then ``runc exec ID true``; the bundle's root is the
  busybox directory itself, read-only, so there is no image and no copy: the floor.
- docker: ``docker run -d --network none IMAGE sleep 3600`` then ``docker exec ID true``.
- devcontainer: ``devcontainer up`` on a workspace whose devcontainer.json names the image (already loaded,
  so nothing is pulled). It answers only after it has run its own commands in the container (it probes the
  user's environment with a login shell), so its answer is a first command answered.

For runc and docker, ``measure_*_one_shot`` also times the plain one-shot form (``runc run`` /
``docker run --rm`` of ``true``: create, start, run, exit, remove), the form the issue's figures were quoted in.
Removing a container is never timed (except within the one-shot forms, where it is part of the command).
Called by ``bench.start.__main__``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from bench.start import commands
from bench.start.docker_engine import DockerEngine

__all__ = [
    "devcontainer_cli",
    "measure_devcontainer",
    "measure_docker",
    "measure_docker_one_shot",
    "measure_runc",
    "measure_runc_one_shot",
]

_TIMEOUT = 60.0


def _bundle(rootfs: Path, bundle: Path, args: list[str]) -> Path:
    """An OCI bundle running ``args`` on ``rootfs`` (read-only), from ``runc spec``'s defaults."""
    bundle.mkdir(parents=True)
    commands.run(["runc", "spec", "--bundle", bundle], timeout=_TIMEOUT)
    config = json.loads((bundle / "config.json").read_text())
    config["process"]["args"] = args
    config["process"]["terminal"] = False
    config["root"] = {"path": str(rootfs.resolve()), "readonly": True}
    config["hostname"] = "bench"
    (bundle / "config.json").write_text(json.dumps(config))
    return bundle


def measure_runc(rootfs: Path, work: Path, runs: int) -> list[float]:
    """``runc run -d`` + ``runc exec ID true``, ``runs`` times; each container deleted after (not timed)."""
    bundle = _bundle(rootfs, work / "bundle-sleep", ["sleep", "3600"])
    runc: list[str | Path] = [
        "runc",
        "--root",
        work / "runc-state",
    ]  # our own runc root: nothing else sees these containers
    samples = []
    for number in range(runs):
        container = f"bench-start-{work.name}-{number}"
        started = time.perf_counter()
        try:
            commands.run([*runc, "run", "-d", "--bundle", bundle, container], timeout=_TIMEOUT, leaves_process=True)
            commands.run([*runc, "exec", container, "true"], timeout=_TIMEOUT)
            samples.append(time.perf_counter() - started)
        finally:
            commands.run([*runc, "delete", "--force", container], timeout=_TIMEOUT)
    return samples


def measure_runc_one_shot(rootfs: Path, work: Path, runs: int) -> list[float]:
    """``runc run`` of ``true`` in the foreground (runc deletes the container when it exits), ``runs`` times."""
    bundle = _bundle(rootfs, work / "bundle-true", ["true"])
    runc: list[str | Path] = ["runc", "--root", work / "runc-state"]
    samples = []
    for number in range(runs):
        container = f"bench-start-{work.name}-once-{number}"
        started = time.perf_counter()
        try:
            commands.run([*runc, "run", "--bundle", bundle, container], timeout=_TIMEOUT)
            samples.append(time.perf_counter() - started)
        finally:
            commands.run([*runc, "delete", "--force", container], timeout=_TIMEOUT)
    return samples


def measure_docker(engine: DockerEngine, image: str, runs: int) -> list[float]:
    """``docker run -d`` + ``docker exec ID true``, ``runs`` times; each container removed after (not timed)."""
    samples = []
    for number in range(runs):
        name = f"bench-start-{number}"
        started = time.perf_counter()
        try:
            engine.docker("run", "-d", "--name", name, "--network", "none", image, "sleep", "3600")
            engine.docker("exec", name, "true")
            samples.append(time.perf_counter() - started)
        finally:
            engine.docker("rm", "--force", name)
    return samples


def measure_docker_one_shot(engine: DockerEngine, image: str, runs: int) -> list[float]:
    """``docker run --rm --network none IMAGE true``, ``runs`` times."""
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        engine.docker("run", "--rm", "--network", "none", image, "true")
        samples.append(time.perf_counter() - started)
    return samples


def devcontainer_cli(prefix: Path) -> Path | None:
    """The ``devcontainer`` program that ``npm install --prefix PREFIX @devcontainers/cli`` installed, if any."""
    program = prefix / "node_modules" / ".bin" / "devcontainer"
    return program if program.exists() else None


def measure_devcontainer(engine: DockerEngine, cli: Path, image: str, work: Path, runs: int) -> list[float]:
    """``devcontainer up`` of a workspace naming ``image``, ``runs`` times; its container removed after each
    (by the label the CLI puts on it, not timed)."""
    workspace = work / "workspace"
    (workspace / ".devcontainer").mkdir(parents=True)
    config = {"name": "bench", "image": image, "runArgs": ["--network", "none"]}
    (workspace / ".devcontainer" / "devcontainer.json").write_text(json.dumps(config))
    argv: list[str | Path] = [
        cli,
        "up",
        "--workspace-folder",
        workspace,
        "--docker-path",
        engine.cli,
        "--log-level",
        "info",
    ]
    label = f"label=devcontainer.local_folder={workspace}"
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        try:
            output = commands.run(argv, timeout=_TIMEOUT * 2, env=engine.env)
            samples.append(time.perf_counter() - started)
        finally:
            for container in engine.docker("ps", "--all", "--quiet", "--filter", label).split():
                engine.docker("rm", "--force", container)
        if '"outcome":"success"' not in output.replace(" ", ""):
            raise commands.CommandFailed(f"devcontainer up did not report success: {output[-2000:]}")
    return samples
