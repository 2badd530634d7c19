"""``python -m bench.devcontainer``: time a dev container with a Dockerfile and a Feature, cold and warm, by
devyard and by ``devcontainer up`` on Docker Engine; print one report.

Exits 0 when every part that could run ran to the end, whatever its figures; 1 when a part failed (its error is
in the report and the other parts still run). A peer whose program is not installed is reported as skipped:
``bench/start/setup`` installs docker.io and the Dev Containers CLI.
"""

from __future__ import annotations

import argparse
import functools
import shutil
import sys
import tempfile
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

from bench.devcontainer import devcontainer_contender, devyard_contender, project, report
from bench.start import commands, devyard_start, docker_engine, harness, peers, test_image
from support import images, registry

CONTENDERS = report.CONTENDERS


def _options(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.devcontainer", description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, help="runs of each contender in each phase (default 5; --quick 1)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 1 run each, the busybox base image")
    parser.add_argument(
        "--base",
        choices=("debian", "busybox"),
        help="the Dockerfile's base image: the Debian minbase root from mmdebstrap, cached (default), or busybox "
        "(--quick's default)",
    )
    parser.add_argument("--skip", default="", help=f"comma-separated contenders to leave out: {','.join(CONTENDERS)}")
    parser.add_argument(
        "--cache",
        type=Path,
        default=harness.default_cache(),
        help="where the Dev Containers CLI is kept (default $DEVYARD_BENCH_CACHE or ~/.cache/devyard-bench; "
        "bench/start/setup installs it there)",
    )
    options = parser.parse_args(argv)
    options.skip = {part.strip() for part in options.skip.split(",") if part.strip()}
    if options.skip - set(CONTENDERS):
        parser.error(f"--skip: expected some of {', '.join(CONTENDERS)}, got {sorted(options.skip)}")
    options.runs = options.runs if options.runs is not None else (1 if options.quick else 5)
    options.base = options.base or ("busybox" if options.quick else "debian")
    if options.runs < 1:
        parser.error("--runs must be positive")
    return options


def _missing(run: report.Run, contender: str, reason: str) -> None:
    for phase in report.PHASES:
        run.missing.setdefault((phase, contender), reason)


def _recorder(run: report.Run, phase: str, contender: str) -> Callable[[str], None]:
    return lambda reason: run.missing.__setitem__((phase, contender), reason)


def _devcontainer(
    run: report.Run, options: argparse.Namespace, work: Path, folder: Path, outcome: harness.Outcome
) -> None:
    if commands.find("dockerd", "/usr/sbin/dockerd") is None:
        _missing(run, report.DEVCONTAINER, "skipped: Docker Engine is not installed (bench/start/setup)")
        return
    cli = peers.devcontainer_cli(options.cache / "devcontainers-cli")
    if cli is None:
        _missing(run, report.DEVCONTAINER, "skipped: @devcontainers/cli is not installed (bench/start/setup)")
        return

    def engine_run() -> None:
        with docker_engine.running_engine(work) as engine:
            run.versions["Docker Engine"] = engine.version
            run.versions["@devcontainers/cli"] = harness.version([str(cli), "--version"])
            for phase, measure in (
                (report.COLD, devcontainer_contender.measure_cold),
                (report.WARM, devcontainer_contender.measure_warm),
            ):
                timed = functools.partial(measure, engine, cli, folder, options.runs)
                samples = outcome.attempt(_recorder(run, phase, report.DEVCONTAINER), timed)
                if samples is not None:
                    run.samples[(phase, report.DEVCONTAINER)] = samples

    outcome.attempt(lambda reason: _missing(run, report.DEVCONTAINER, reason), engine_run)


def _devyard(
    run: report.Run, options: argparse.Namespace, work: Path, folder: Path, registry_host: str, outcome: harness.Outcome
) -> None:
    run.versions["devyard runtime"] = "linux"
    if not devyard_start.linux_runtime_available():
        _missing(run, report.DEVYARD, "NOT MEASURED: the linux runtime (devyard.runner.linux.runtime) has not landed")
        return
    phases = ((report.COLD, devyard_contender.measure_cold), (report.WARM, devyard_contender.measure_warm))
    for phase, measure in phases:
        starts = outcome.attempt(
            _recorder(run, phase, report.DEVYARD), functools.partial(measure, folder, work, registry_host, options.runs)
        )
        if starts is None:
            continue
        run.samples[(phase, report.DEVYARD)] = [start.seconds for start in starts]
        steps = run.devyard_steps.setdefault(phase, {})
        for start in starts:
            for step, seconds in start.timings.items():
                steps.setdefault(step, []).append(seconds)


def main(argv: list[str] | None = None) -> int:
    options = _options(argv)
    run = report.Run(harness.machine(), {}, options.runs)
    outcome = harness.Outcome()
    with ExitStack() as stack:
        work = Path(tempfile.mkdtemp(prefix="devyard-bench-devcontainer-"))
        # Root inside an environment is an unprivileged id outside: it must reach the runner's state directory
        # below this one (mkdtemp makes it 0700).
        work.chmod(0o755)
        stack.callback(shutil.rmtree, work, ignore_errors=True)
        stack.callback(commands.unmount_under, work)
        server, _ = stack.enter_context(registry.running_registry(work / "registry"))
        make_layout = test_image.debian if options.base == "debian" else test_image.busybox
        layout = make_layout(work / "base-oci")
        run.base_image = images.push(layout.path, server.host, f"bench/{options.base}:latest")
        run.base_size = layout.size
        folder = project.write_project(work / "project", run.base_image)
        for contender in sorted(options.skip):
            _missing(run, contender, "skipped (--skip)")
        if report.DEVCONTAINER not in options.skip:
            _devcontainer(run, options, work / "docker", folder, outcome)
        if report.DEVYARD not in options.skip:
            _devyard(run, options, work / "devyard", folder, server.host, outcome)
    print(report.render(run), flush=True)
    return 1 if outcome.failed else 0


if __name__ == "__main__":
    sys.exit(main())
