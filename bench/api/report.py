"""The figures of a run and the table ``python -m bench.api`` prints: the issue's targets beside what was
measured, and the context a reader needs to trust them (errors, CPU shares, what the runners did)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from bench.api.cpu import OTHERS
from bench.api.load import FIXED_RATE_CONNECTIONS, LIST_PAGE_SIZE, OPERATIONS, CreateResult, RateResult

__all__ = ["DatabaseRun", "percentile", "render"]

#: Targets from the issue, for this 2-core machine.
CREATES_PER_SECOND = 500.0
TO_RUNNING_P99_MS = 1000.0
API_P99_MS = 50.0


def percentile(values: Sequence[float], fraction: float) -> float | None:
    """The nearest-rank percentile: the smallest value with at least ``fraction`` of the values at or below."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(math.ceil(fraction * len(ordered)) - 1, 0)]


def _ms(value: float | None) -> float | None:
    return None if value is None else value * 1000


@dataclass
class DatabaseRun:
    database: str
    description: str
    runners: int
    concurrency: int
    creates: CreateResult
    rate: RateResult
    #: Phase -> seconds of wall time.
    wall: dict[str, float] = field(default_factory=dict)
    #: Phase -> process -> CPU seconds used in it.
    cpu: dict[str, dict[str, float]] = field(default_factory=dict)
    fleet: dict[str, Any] = field(default_factory=dict)
    #: Log file -> how many WARNING, ERROR or CRITICAL lines it got.
    log_warnings: dict[str, int] = field(default_factory=dict)


def _row(label: str, value: float | None, bound: str = "", target: float | None = None) -> str:
    shown = "n/a" if value is None else f"{value:.1f}"
    if target is None:
        return f"  {label:<36}{shown:>10}"
    ratio = "" if value is None else f"{value / target:.2f}x"
    met = value is not None and (value >= target if bound == ">=" else value <= target)
    verdict = "ok" if met else "MISS"
    return f"  {label:<36}{shown:>10}{bound + ' ' + f'{target:g}':>12}{ratio:>9}   {verdict}"


def _pair(values: Sequence[float]) -> str:
    p50, p99 = _ms(percentile(values, 0.5)), _ms(percentile(values, 0.99))
    if p50 is None or p99 is None:
        return "n/a"
    return f"{p50:.1f}/{p99:.1f} ms (n={len(values)})"


def _cpu_line(phase: str, wall: float, used: Mapping[str, float], cores: int) -> str:
    parts = ", ".join(f"{name} {seconds:.1f}" for name, seconds in used.items())
    total = sum(used.values())
    share = total / (wall * cores) if wall > 0 else 0.0
    line = f"  CPU s during {phase} ({wall:.1f} s wall): {parts}; {share:.0%} of {cores} cores busy"
    others = used.get(OTHERS, 0.0)
    if wall > 0 and others > 0.1 * wall:
        line += f"\n  NOTE: processes outside the benchmark used {others / wall:.0%} of a core: the figures are skewed"
    return line


def render(run: DatabaseRun, cores: int) -> str:
    creates, rate = run.creates, run.rate
    api = rate.all_latencies
    rate_label = f"{rate.rate:g} req/s"
    lines = [
        f"== {run.description} ==",
        f"  {run.runners} fake runners; {creates.requested} environments created, {run.concurrency} in flight; "
        f"then {rate_label} for {rate.duration:g} s (mix: "
        + ", ".join(f"{share:.0%} {name}" for name, share in OPERATIONS.items())
        + f", list page_size={LIST_PAGE_SIZE}; at most {FIXED_RATE_CONNECTIONS} connections)",
        f"  {'':<36}{'measured':>10}{'target':>12}{'ratio':>9}   verdict",
        _row("environment creates/s", creates.throughput, ">=", CREATES_PER_SECOND),
        _row("create-to-Running p50 (ms)", _ms(percentile(creates.to_running, 0.5))),
        _row("create-to-Running p99 (ms)", _ms(percentile(creates.to_running, 0.99)), "<=", TO_RUNNING_P99_MS),
        _row("create-to-Running max (ms)", _ms(max(creates.to_running, default=None))),
        _row(f"API p50 at {rate_label} (ms)", _ms(percentile(api, 0.5))),
        _row(f"API p99 at {rate_label} (ms)", _ms(percentile(api, 0.99)), "<=", API_P99_MS),
        f"  created {creates.created} of {creates.requested} in {creates.seconds:.2f} s; "
        f"POST latency p50/p99 {_pair(creates.create_latencies)}; "
        f"not seen running within the deadline: {creates.not_running}",
        f"  of which create-to-Scheduled (runner assigned) p50/p99 {_pair(creates.to_scheduled)}",
        f"  fixed rate: {rate.measured} requests due in {rate.duration:g} s ({rate.measured / rate.duration:.1f}/s); "
        f"generator's worst lag behind its schedule {rate.worst_send_lag * 1000:.1f} ms",
        "  API p50/p99 by operation: " + "; ".join(f"{name} {_pair(rate.latencies[name])}" for name in OPERATIONS),
        "  errors: "
        + (", ".join(f"{what} x{n}" for what, n in (creates.errors + rate.errors).most_common()) or "none"),
    ]
    for phase, used in run.cpu.items():
        lines.append(_cpu_line(phase, run.wall.get(phase, 0.0), used, cores))
    if run.fleet:
        fleet = run.fleet
        kinds = ("temporary_failures", "permanent_failures", "unknown_failures")
        failures = sum(int(fleet.get(key, 0)) for key in kinds)
        lines.append(
            f"  runners: {fleet.get('reconciles', 0)} reconciles, {failures} failed, {fleet.get('lists', 0)} lists, "
            f"{fleet.get('heartbeats', 0)} heartbeats, {fleet.get('agents_failed', 0)} agents crashed"
        )
    if run.log_warnings:
        lines.append("  warnings in logs: " + ", ".join(f"{name} {count}" for name, count in run.log_warnings.items()))
    return "\n".join(lines)
