"""CPU seconds used by each process of a run, read from ``/proc``: the benchmark shares a small machine's
cores between the server, the runners, PostgreSQL and itself, and says how they were shared."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path

__all__ = ["CpuMeter", "process_seconds", "tree_seconds"]

_TICKS = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name is in parentheses and may hold spaces: split after its closing one.
    return text[text.rindex(")") + 2 :].split()


def process_seconds(pid: int) -> float:
    """User and system CPU seconds of one process (0 once it is gone)."""
    fields = _stat_fields(pid)
    return 0.0 if fields is None else (int(fields[11]) + int(fields[12])) / _TICKS


def tree_seconds(pid: int) -> float:
    """A process, its living children, and the children it has reaped: a postmaster and its backends."""
    fields = _stat_fields(pid)
    if fields is None:
        return 0.0
    total = sum(int(value) for value in fields[11:15])
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            child = _stat_fields(int(entry.name))
            if child is not None and int(child[1]) == pid:
                total += int(child[11]) + int(child[12])
    return total / _TICKS


def _own_seconds() -> float:
    times = os.times()
    return times.user + times.system


class CpuMeter:
    """Readings of named processes; ``since(earlier)`` gives the seconds each used in between."""

    def __init__(self, sources: Mapping[str, Callable[[], float]]) -> None:
        self.sources = {**sources, "load generator": _own_seconds}

    def read(self) -> dict[str, float]:
        return {name: source() for name, source in self.sources.items()}

    def since(self, earlier: Mapping[str, float]) -> dict[str, float]:
        now = self.read()
        return {name: max(now[name] - earlier.get(name, 0.0), 0.0) for name in now}
