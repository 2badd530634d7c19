"""The peer's side: ``devcontainer up --workspace-folder DIR`` (the Dev Containers reference CLI) on Docker Engine.

The engine is the one ``bench.start`` starts for a run (``docker_engine.running_engine``: Debian's ``dockerd``
with its own data root and socket, no bridge, no firewall rules); the CLI is the one ``bench/start/setup``
installs into the benchmark's cache (``peers.devcontainer_cli``). ``devcontainer up`` builds the Dockerfile,
then an image with the Feature on top, creates and starts the container, and runs the lifecycle commands
(the postCreateCommand among them) before it answers: the figure runs from starting the command to its exit.

- ``measure_cold``: before each run the container is removed and every image and all build cache too
  (``docker rmi`` of every image, ``docker builder prune -af``): the base image is pulled again from the
  registry on 127.0.0.1, inside the figure, as devyard's cold start pulls it.
- ``measure_warm``: a first ``up`` (not timed) fills the build cache; before each run only the container is
  removed, so ``up`` makes a new one from the cached images.

Called by ``bench.devcontainer.__main__``.
"""

from __future__ import annotations

import time
from pathlib import Path

from bench.start import commands
from bench.start.docker_engine import DockerEngine

__all__ = ["measure_cold", "measure_warm"]

_TIMEOUT = 600.0


def _up(engine: DockerEngine, cli: Path, folder: Path) -> float:
    argv: list[str | Path] = [
        cli, "up", "--workspace-folder", folder, "--docker-path", engine.cli, "--log-level", "info",
    ]  # fmt: skip
    started = time.perf_counter()
    output = commands.run(argv, timeout=_TIMEOUT, env=engine.env)
    seconds = time.perf_counter() - started
    if '"outcome":"success"' not in output.replace(" ", ""):
        raise commands.CommandFailed(f"devcontainer up did not report success: {output[-2000:]}")
    return seconds


def _remove_containers(engine: DockerEngine, folder: Path) -> None:
    """The containers ``up`` made for ``folder`` (found by the label it puts on them)."""
    label = f"label=devcontainer.local_folder={folder}"
    for container in engine.docker("ps", "--all", "--quiet", "--filter", label).split():
        engine.docker("rm", "--force", container)


def _empty_caches(engine: DockerEngine) -> None:
    """Every image (the base, the intermediate ones of the classic builder, the Feature's) and the build cache.
    ``image prune`` removes children before their parents, which one ``rmi`` of every id does not."""
    engine.docker("image", "prune", "--all", "--force", timeout=_TIMEOUT)
    engine.docker("builder", "prune", "--all", "--force", timeout=_TIMEOUT)
    left = engine.docker("images", "--all", "--quiet").split()
    if left:
        raise RuntimeError(f"docker still has images after pruning (a container uses them?): {' '.join(left)}")


def measure_cold(engine: DockerEngine, cli: Path, folder: Path, runs: int) -> list[float]:
    samples = []
    for _ in range(runs):
        _remove_containers(engine, folder)
        _empty_caches(engine)
        try:
            samples.append(_up(engine, cli, folder))
        finally:
            _remove_containers(engine, folder)
    return samples


def measure_warm(engine: DockerEngine, cli: Path, folder: Path, runs: int) -> list[float]:
    samples = []
    try:
        _up(engine, cli, folder)
        for _ in range(runs):
            _remove_containers(engine, folder)
            samples.append(_up(engine, cli, folder))
    finally:
        _remove_containers(engine, folder)
    return samples
