"""The benchmarks' smoke tests run one at a time, even under pytest-xdist's two workers: each checks the host
for what its kind leaves behind (work directories, mounts, ``dybench`` bridges), which another benchmark running
meanwhile would have made, and each wants the machine's cores to itself to finish in its time."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from support import host


@pytest.fixture(autouse=True)
def one_benchmark_at_a_time() -> Iterator[None]:
    with host.one_at_a_time("bench"):
        yield
