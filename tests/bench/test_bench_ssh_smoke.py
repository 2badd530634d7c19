"""``python -m bench.ssh --quick`` runs to the end, prints both targets' rows and the ratios against the issue's
targets, and leaves nothing behind (no temporary directory, mount, bridge, sshd or user of its own).

A smoke test of the benchmark's machinery, not a performance test: it asserts no timing.
"""

from __future__ import annotations

import pwd
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from support import host

REPO = Path(__file__).resolve().parents[2]


def _leftovers() -> tuple[set[Path], set[str]]:
    return set(Path(tempfile.gettempdir()).glob("devyard-bench-ssh-*")), host.links_named("dyssh")


@pytest.mark.slow
def test_quick_run_prints_both_targets_and_the_ratios() -> None:
    host.require("runc", "docker-registry", "ssh", "scp", "ssh-keygen", "nft", "ip", "useradd")
    if not Path("/usr/sbin/sshd").exists():
        if host.in_ci():
            pytest.fail("CI=true and openssh-server is missing: bench/ssh/setup installs it")
        pytest.skip("openssh-server is missing: bench/ssh/setup installs it")
    before = _leftovers()
    result = subprocess.run(
        [sys.executable, "-m", "bench.ssh", "--quick"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    output = result.stdout
    assert result.returncode == 0, output + result.stderr
    numbers = r"\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+(\d+)$"
    for name in ("sshd", "devyard gateway"):
        row = re.search(rf"^  {re.escape(name)}\s{numbers}", output.split("latency:")[0], re.MULTILINE)
        assert row is not None and row.group(4) == "1", output
    assert re.search(r"ratio gateway/sshd [\d.]+x, target >= 0.5x: (met|MISSED)", output), output
    latency = output.split("latency:")[1]
    for name in ("sshd", "sshd, kex curve25519-sha256", "devyard gateway"):
        row = re.search(rf"^  {re.escape(name)}\s+([\d.]+)\s{numbers}", latency, re.MULTILINE)
        assert row is not None and row.group(5) == "3", output
    assert re.search(r"same key exchange [\d.]+x \(medians\), target <= 1.5x: (met|MISSED)", output), output
    assert re.search(r"devyard gateway: kex \S+, \S+", output), output
    assert _leftovers() <= before
    assert "devyard-bench-ssh-" not in Path("/proc/self/mounts").read_text()
    with pytest.raises(KeyError):
        pwd.getpwnam("dybenchssh")
