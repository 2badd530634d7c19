"""What a benchmark run shares, whatever it measures: where the peers are cached, the machine's line, a
program's version, and the outcome of its parts (a part that fails is recorded and the others still run).

Called by ``bench.start.__main__`` and ``bench.devcontainer.__main__``.
"""

from __future__ import annotations

import os
import platform
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from bench.start import commands

__all__ = ["Outcome", "default_cache", "machine", "version"]

_T = TypeVar("_T")


def default_cache() -> Path:
    """``$DEVYARD_BENCH_CACHE``, else ``$XDG_CACHE_HOME/devyard-bench`` (``~/.cache/devyard-bench``): where
    ``bench/start/setup`` installs the Dev Containers CLI."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(os.environ.get("DEVYARD_BENCH_CACHE") or Path(base) / "devyard-bench")


def machine() -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} cores ({model}), {platform.system()} {platform.release()}"


def version(argv: list[str]) -> str:
    """The first line ``argv`` prints, or ``unknown``."""
    try:
        return commands.run(argv, timeout=30).strip().splitlines()[0]
    except (commands.CommandFailed, IndexError):
        return "unknown"


class Outcome:
    """Whether every part that ran finished; each part's failure is recorded where the report shows it."""

    def __init__(self) -> None:
        self.failed = False

    def attempt(self, record: Callable[[str], None], action: Callable[[], _T]) -> _T | None:
        """``action()``, or None after printing its traceback and passing its message to ``record``."""
        try:
            return action()
        except Exception as exc:
            traceback.print_exc()
            self.failed = True
            record(f"FAILED: {exc}".splitlines()[0][:300])
            return None
