"""The benchmarks' smoke tests run one at a time, even under pytest-xdist's two workers: each checks the host
for what its kind leaves behind (work directories, mounts, ``dybench`` bridges), which another benchmark running
meanwhile would have made, and each wants the machine's cores to itself to finish in its time."""

from __future__ import annotations

import fcntl
from collections.abc import Iterator
from pathlib import Path

import pytest

#: Held exclusively by the benchmark smoke test that runs; every test process on the host sees the same file.
_LOCK = Path("/tmp/devyard-bench-smoke.lock")


@pytest.fixture(autouse=True)
def one_benchmark_at_a_time() -> Iterator[None]:
    with _LOCK.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
