"""``python -m bench.api``: run the API benchmark on each database asked for and print a table per database.

Exits 0 when every database's run completed, whatever its figures; 1 when one could not run (its error is
printed and the next database still runs).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import pstats
import shutil
import sqlite3
import sys
import tempfile
import time
import traceback
from contextlib import ExitStack
from pathlib import Path

from bench.api import cpu, event_loop, load, postgres, report
from bench.api.fleet import running_fleet
from bench.api.server import running_server

DATABASES = ("sqlite", "postgresql")
#: Full run, and --quick (a smoke run: small, few runners, short).
_DEFAULTS = {"runners": 50, "environments": 1000, "rate": 200.0, "duration": 15.0, "warmup": 2.0}
_QUICK = {"runners": 3, "environments": 30, "rate": 50.0, "duration": 2.0, "warmup": 0.5}


def _options(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.api", description=__doc__.splitlines()[0])
    parser.add_argument("--databases", default=",".join(DATABASES), help="comma-separated: sqlite,postgresql")
    helps = {
        "runners": "fake runners",
        "environments": "environments to create",
        "rate": "requests/s of the fixed-rate phase",
        "duration": "measured seconds at that rate",
        "warmup": "unmeasured seconds at that rate before",
    }
    for name, text in helps.items():
        kind = int if isinstance(_DEFAULTS[name], int) else float
        parser.add_argument(f"--{name}", type=kind, help=f"{text} (default {_DEFAULTS[name]:g})")
    parser.add_argument("--concurrency", type=int, default=32, help="creates in flight (default 32)")
    parser.add_argument(
        "--workers", type=int, default=1, help="server processes on PostgreSQL (SQLite always has one; default 1)"
    )
    parser.add_argument(
        "--running-timeout", type=float, default=60.0, help="seconds after the last create to wait for running"
    )
    parser.add_argument("--quick", action="store_true", help="a small smoke run: " + str(_QUICK))
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="run the server under cProfile; write DIR/server-<database>.pstats and print its top functions "
        "(the profiler slows the server: its figures are not the benchmark's)",
    )
    options = parser.parse_args(argv)
    chosen = _QUICK if options.quick else _DEFAULTS
    for name, value in chosen.items():
        if getattr(options, name) is None:
            setattr(options, name, value)
    options.databases = [kind.strip() for kind in options.databases.split(",") if kind.strip()]
    unknown = set(options.databases) - set(DATABASES)
    if unknown or not options.databases:
        parser.error(f"--databases: expected some of {', '.join(DATABASES)}, got {options.databases}")
    if min(options.runners, options.environments, options.concurrency) < 1 or options.rate <= 0:
        parser.error("--runners, --environments, --concurrency and --rate must be positive")
    if options.duration <= 0 or options.warmup < 0:
        parser.error("--duration must be positive and --warmup not negative")
    return options


def _count_warnings(path: Path) -> int:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return 0
    levels = (" WARNING ", " ERROR ", " CRITICAL ")
    return sum(1 for line in text.splitlines() if any(level in line for level in levels))


def run_database(kind: str, options: argparse.Namespace) -> report.DatabaseRun:
    """Start the database, the server and the fleet; run both phases; stop everything; return the figures."""
    with ExitStack() as stack:
        work = Path(tempfile.mkdtemp(prefix=f"devyard-bench-{kind}-"))
        stack.callback(shutil.rmtree, work, ignore_errors=True)
        logs = {"server": work / "server.log", "runners": work / "fleet.log"}
        warnings: dict[str, int] = {}
        # Registered before the processes start, so it runs after they have stopped (an ExitStack unwinds
        # in reverse) and before the directory goes.
        stack.callback(lambda: warnings.update({name: _count_warnings(path) for name, path in logs.items()}))

        sources = {}
        if kind == "postgresql":
            cluster = stack.enter_context(postgres.durable_cluster())
            database_url: str | None = cluster.url
            settings = ", ".join(f"{key}={value}" for key, value in postgres.DURABLE_SETTINGS.items())
            description = f"PostgreSQL {cluster.version} ({settings}); {options.workers} server process(es)"
            sources["postgres"] = lambda: cpu.tree_seconds(cluster.pid)
        else:
            database_url = None
            description = f"SQLite {sqlite3.sqlite_version} (WAL, synchronous=NORMAL, the server's defaults)"
        profile_to = None
        if options.profile is not None:
            options.profile.mkdir(parents=True, exist_ok=True)
            profile_to = (options.profile / f"server-{kind}.pstats").resolve()
            description += ", SERVER UNDER cProfile"
        server = stack.enter_context(
            running_server(
                work / "server",
                database_url,
                logs["server"],
                profile_to=profile_to,
                workers=options.workers if kind == "postgresql" else 1,
            )
        )
        capacity = max(100, math.ceil(2 * options.environments / options.runners))
        fleet = stack.enter_context(
            running_fleet(
                server.url,
                server.admin_token,
                runners=options.runners,
                capacity=capacity,
                state_dir=work / "runners",
                log_path=logs["runners"],
                ready_timeout=60 + options.runners,
                lifetime=900 + options.environments + options.duration,
            )
        )
        sources["server"] = lambda: cpu.tree_seconds(server.pid)  # with its workers, if any
        sources["runners"] = lambda: cpu.process_seconds(fleet.pid)
        meter = cpu.CpuMeter(sources)
        run = report.DatabaseRun(
            kind,
            description,
            options.runners,
            options.concurrency,
            load.CreateResult(options.environments),
            load.RateResult(options.rate, options.duration),
        )

        before, started = meter.read(), time.perf_counter()
        run.creates = event_loop.run(
            load.create_environments(
                server.url,
                server.admin_token,
                count=options.environments,
                concurrency=options.concurrency,
                running_timeout=options.running_timeout,
            )
        )
        run.cpu["creates"], run.wall["creates"] = meter.since(before), time.perf_counter() - started

        before, started = meter.read(), time.perf_counter()
        run.rate = event_loop.run(
            load.fixed_rate(
                server.url,
                server.admin_token,
                run.creates.environment_ids,
                rate=options.rate,
                duration=options.duration,
                warmup=options.warmup,
            )
        )
        run.cpu["fixed rate"], run.wall["fixed rate"] = meter.since(before), time.perf_counter() - started
    run.fleet = fleet.stats
    run.log_warnings = warnings
    if profile_to is not None and profile_to.exists():
        _print_profile(profile_to)
    return run


def _print_profile(path: Path) -> None:
    text = path.with_suffix(".txt")
    with text.open("w") as out:
        pstats.Stats(str(path), stream=out).sort_stats("tottime").print_stats(60)
        pstats.Stats(str(path), stream=out).sort_stats("cumulative").print_stats(60)
    print(f"-- server profile (top by own time; all of it in {text}) --")
    stats = pstats.Stats(str(path), stream=sys.stdout)
    stats.sort_stats("tottime").print_stats(20)


def _machine() -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{os.cpu_count()} cores ({model}), Python {platform.python_version()}, {platform.system()} "
        f"{platform.release()}; the database, the server, the runners and this load generator share them"
    )


def main(argv: list[str] | None = None) -> int:
    options = _options(argv)
    print(f"bench/api on {_machine()}", flush=True)
    status = 0
    for kind in options.databases:
        try:
            run = run_database(kind, options)
        except Exception:
            print(f"== {kind}: the run failed ==", flush=True)
            traceback.print_exc()
            status = 1
            continue
        print(report.render(run, os.cpu_count() or 1), flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
