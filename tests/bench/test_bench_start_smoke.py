"""``python -m bench.start --quick`` runs to the end and prints a figure for each contender it was asked for,
and leaves nothing behind (no temporary directory, no mount).

Smoke tests of the benchmark's machinery, not performance tests: they assert no timing. The docker and
devcontainer peers need ``bench/start/setup``; where they are missing the test of them is skipped, except in CI
(``CI=true``), where ``scripts/test`` runs that setup first and a missing peer fails the test.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from support import host

REPO = Path(__file__).resolve().parents[2]
_NUMBERS = r"\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+(\d+)\b"


def _bench(*arguments: str, timeout: float = 150) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "bench.start", "--quick", *arguments],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def _figures(output: str, label: str) -> tuple[float, float, float, int]:
    """The median, min, max and count on the row of ``label``; fails when the row has none."""
    match = re.search(rf"^\s*{re.escape(label)}{_NUMBERS}", output, re.MULTILINE)
    assert match is not None, f"no figures for {label!r} in:\n{output}"
    median, low, high, count = match.groups()
    assert float(low) <= float(median) <= float(high), output
    return float(median), float(low), float(high), int(count)


def _work_dirs() -> set[Path]:
    return set(Path(tempfile.gettempdir()).glob("devyard-bench-start-*"))


@contextlib.contextmanager
def _nothing_left() -> Iterator[None]:
    """The run removes its temporary directory (the default one: a unix socket's path must stay short, and an
    environment's unprivileged root must reach the runner's state in it), its mounts and its bridge."""
    before = _work_dirs(), host.links_named("dybench")
    yield
    assert _work_dirs() <= before[0]
    assert "devyard-bench-start-" not in Path("/proc/self/mounts").read_text()
    assert host.links_named("dybench") <= before[1]


@pytest.mark.slow
def test_quick_run_measures_runc_the_cold_pull_and_devyard() -> None:
    host.require("runc", "skopeo", "umoci", "docker-registry", "nft", "ip")
    with _nothing_left():
        output = _bench("--skip", "docker,devcontainer")
    for label in ("runc run -d + exec true (floor)", "one-shot: runc run true"):
        assert _figures(output, label)[3] == 1
    assert "docker run -d + exec true                   skipped (--skip)" in output
    assert _figures(output, "skopeo copy + umoci unpack")[3] == 1
    assert _figures(output, "devyard image store")[3] == 1
    assert re.search(r"target: devyard [\d.]+x the peer <= 1.2x (ok|MISS)", output), output
    assert _figures(output, "devyard env create -- true (CLI, one command)")[3] == 1
    assert _figures(output, "devyard, same through the API")[3] == 1
    assert re.search(r"runner PSS: [\d.]+ MiB before, [\d.]+ MiB with all running", output), output
    assert "devyard runtime linux" in output


@pytest.mark.slow
def test_quick_run_on_the_fake_runtime_times_each_step_and_the_density() -> None:
    """The devyard part's machinery (server, runner process, CLI, gateway exec, density) on the fake runtime,
    which needs no container: it runs wherever the registry does."""
    host.require("docker-registry")
    with _nothing_left():
        output = _bench("--skip", "runc,docker,devcontainer,cold-pull", "--devyard-runtime", "fake")
    assert _figures(output, "devyard env create -- true (CLI, one command)")[3] == 1
    assert _figures(output, "devyard, same through the API")[3] == 1
    assert re.search(r"of which \(medians\): env create --wait [\d.]+, env exec [\d.]+", output), output
    assert re.search(r"of which \(medians\): create to running [\d.]+, exec \(access ticket", output), output
    assert re.search(r"target \(devyard env create -- true \(CLI, one command\)\): median [\d.]+ s <= 0.25 s", output)
    assert "== idle density: 3 environments on one runner ==" in output
    assert re.search(r"runner RSS: [\d.]+ MiB before, [\d.]+ MiB with all running", output), output
    assert re.search(r"exec true in one environment meanwhile: median [\d.]+ s, max [\d.]+ s \(n=5\)", output)
    assert "devyard ran on the fake runtime" in output


def _peers_installed() -> bool:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "devyard-bench"
    cli = Path(os.environ.get("DEVYARD_BENCH_CACHE") or cache) / "devcontainers-cli/node_modules/.bin/devcontainer"
    return shutil.which("dockerd") is not None and os.access("/usr/bin/docker", os.X_OK) and cli.exists()


@pytest.mark.slow
def test_quick_run_measures_docker_and_devcontainer() -> None:
    host.require("runc", "skopeo")
    if not _peers_installed():
        if host.in_ci():
            pytest.fail("CI=true and docker.io or @devcontainers/cli is missing: scripts/test runs bench/start/setup")
        pytest.skip("docker.io or @devcontainers/cli is missing: bench/start/setup installs them")
    with _nothing_left():
        output = _bench("--skip", "runc,devyard,cold-pull,density", timeout=170)
    for label in ("docker run -d + exec true", "one-shot: docker run --rm true", "devcontainer up"):
        assert _figures(output, label)[3] == 1
    assert re.search(r"Docker Engine [\w.+~-]+, @devcontainers/cli [\d.]+", output), output
