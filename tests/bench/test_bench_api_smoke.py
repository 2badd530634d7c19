"""``python -m bench.api --quick`` on SQLite runs to the end and prints every figure of its table.

A smoke test of the benchmark's machinery (server and fleet processes, both load phases, the report), not a
performance test: it asserts no timing.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
FIGURES = (
    "environment creates/s",
    "create-to-Running p50 (ms)",
    "create-to-Running p99 (ms)",
    "create-to-Running max (ms)",
    "API p50 at 50 req/s (ms)",
    "API p99 at 50 req/s (ms)",
)


@pytest.mark.slow
def test_quick_run_on_sqlite_prints_every_figure() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bench.api", "--quick", "--databases", "sqlite"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    output = result.stdout
    assert result.returncode == 0, output + result.stderr
    assert "== SQLite" in output
    for figure in FIGURES:
        match = re.search(rf"^\s*{re.escape(figure)}\s+(\S+)", output, re.MULTILINE)
        assert match is not None, f"{figure!r} missing from:\n{output}"
        float(match.group(1))  # a number, not n/a
    assert "created 30 of 30" in output
    assert "not seen running within the deadline: 0" in output
    assert "errors: none" in output
    assert "0 agents crashed" in output
