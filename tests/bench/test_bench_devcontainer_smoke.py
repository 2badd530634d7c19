"""``python -m bench.devcontainer --quick`` runs to the end, prints a figure for each phase and contender, the
target line, and leaves nothing behind (no temporary directory, no mount, no bridge).

A smoke test of the benchmark's machinery, not a performance test: it asserts no timing. The devcontainer peer
needs ``bench/start/setup`` (docker.io and @devcontainers/cli); where they are missing the test is skipped,
except in CI (``CI=true``), where ``scripts/test`` runs that setup first and a missing peer fails the test.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from support import host

REPO = Path(__file__).resolve().parents[2]
_NUMBERS = r"\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+(\d+)\b"


def _figures(output: str, label: str) -> tuple[float, float, float, int]:
    """The median, min, max and count on the row of ``label``; fails when the row has none."""
    match = re.search(rf"^\s*{re.escape(label)}{_NUMBERS}", output, re.MULTILINE)
    assert match is not None, f"no figures for {label!r} in:\n{output}"
    median, low, high, count = match.groups()
    assert float(low) <= float(median) <= float(high), output
    return float(median), float(low), float(high), int(count)


def _peers_installed() -> bool:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "devyard-bench"
    cli = Path(os.environ.get("DEVYARD_BENCH_CACHE") or cache) / "devcontainers-cli/node_modules/.bin/devcontainer"
    return shutil.which("dockerd") is not None and os.access("/usr/bin/docker", os.X_OK) and cli.exists()


@pytest.mark.slow
def test_quick_run_times_both_contenders_cold_and_warm() -> None:
    host.require("runc", "skopeo", "buildah", "docker-registry", "nft", "ip")
    if not _peers_installed():
        if host.in_ci():
            pytest.fail("CI=true and docker.io or @devcontainers/cli is missing: scripts/test runs bench/start/setup")
        pytest.skip("docker.io or @devcontainers/cli is missing: bench/start/setup installs them")
    work_dirs = set(Path(tempfile.gettempdir()).glob("devyard-bench-devcontainer-*"))
    bridges = host.links_named("dybench")

    result = subprocess.run(
        [sys.executable, "-m", "bench.devcontainer", "--quick"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        stdin=subprocess.DEVNULL,
    )

    output = result.stdout
    assert result.returncode == 0, output + result.stderr[-5000:]
    for phase in ("cold", "warm"):
        assert _figures(output, f"{phase}: devcontainer up")[3] == 1
        assert _figures(output, f"{phase}: devyard (API create)")[3] == 1
    # devyard's rows show their steps as the runner measured them, the build among them.
    assert len(re.findall(r"of which \(status\.timings, medians\): .*\bbuild [\d.]+", output)) == 2, output
    assert re.search(
        r"target: warm <= 0.5x devcontainer up: devyard [\d.]+ s / devcontainer up [\d.]+ s = [\d.]+x (ok|MISS)",
        output,
    ), output
    assert re.search(r"Docker Engine [\w.+~-]+, @devcontainers/cli [\d.]+, devyard runtime linux", output), output
    assert set(Path(tempfile.gettempdir()).glob("devyard-bench-devcontainer-*")) <= work_dirs
    assert "devyard-bench-devcontainer-" not in Path("/proc/self/mounts").read_text()
    assert host.links_named("dybench") <= bridges
