"""How long ``devyard --help`` (and a few other cheap invocations) take, wall clock, in a fresh process.

Run: ``.venv/bin/python bench/cli_start.py [--runs N]``. Prints the best and the median of N runs of each; the
target for ``devyard --help`` is under 0.3 s. The tests never assert on time; they check instead that starting
the CLI imports no heavy library (tests/cli/test_startup.py).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

TARGET = 0.3
CASES = [["--help"], ["env", "--help"], ["env", "create", "--help"], ["--version"]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    runs = parser.parse_args().runs
    script = Path(sys.executable).with_name("devyard")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "devyard"]
    # Bytecode written and read as an installed devyard has it, whatever the shell says: with
    # PYTHONDONTWRITEBYTECODE set, every process would compile devyard's modules from source.
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": ""}
    subprocess.run([*command, "--help"], capture_output=True, check=True, env=env)  # the page cache, .pyc files
    for case in CASES:
        times = []
        for _ in range(runs):
            started = time.perf_counter()
            subprocess.run([*command, *case], capture_output=True, check=True, env=env)
            times.append(time.perf_counter() - started)
        verdict = "" if case != ["--help"] else ("  ok" if min(times) < TARGET else f"  SLOWER than {TARGET} s")
        best, median = min(times) * 1000, statistics.median(times) * 1000
        print(f"devyard {' '.join(case):<22} best {best:6.1f} ms  median {median:6.1f} ms{verdict}")


if __name__ == "__main__":
    main()
