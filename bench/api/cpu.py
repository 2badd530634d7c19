"""CPU seconds used by each process of a run, read from ``/proc``: the benchmark shares a small machine's
cores between the server, the runners, PostgreSQL and itself, and says how they were shared."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path

__all__ = ["OTHERS", "CpuMeter", "machine_busy_seconds", "process_seconds", "tree_seconds"]

_TICKS = os.sysconf("SC_CLK_TCK")
_MACHINE = "machine"
#: The name under which ``CpuMeter.since`` reports the CPU that processes outside the benchmark used.
OTHERS = "other processes"


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


def machine_busy_seconds() -> float:
    """CPU seconds all processes of the machine have used since boot (``/proc/stat``: all but idle and iowait)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(value) for value in fields[:8])
    return (user + nice + system + irq + softirq + steal) / _TICKS


def _own_seconds() -> float:
    times = os.times()
    return times.user + times.system


class CpuMeter:
    """Readings of named processes; ``since(earlier)`` gives the seconds each used in between, and under
    ``OTHERS`` what the rest of the machine used meanwhile (another test run, say), which skews the figures."""

    def __init__(self, sources: Mapping[str, Callable[[], float]]) -> None:
        self.sources = {**sources, "load generator": _own_seconds, _MACHINE: machine_busy_seconds}

    def read(self) -> dict[str, float]:
        return {name: source() for name, source in self.sources.items()}

    def since(self, earlier: Mapping[str, float]) -> dict[str, float]:
        now = self.read()
        used = {name: max(now[name] - earlier.get(name, 0.0), 0.0) for name in now}
        machine = used.pop(_MACHINE)
        used[OTHERS] = max(machine - sum(used.values()), 0.0)
        return used
