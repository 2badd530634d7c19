"""``python -m bench.start``: time environment starts beside runc, docker and devcontainer, the cold pull beside
skopeo + umoci, and the idle density; print one report.

Exits 0 when every part that was asked for and could run ran to the end, whatever its figures; 1 when a part
failed (its error is in the report and the other parts still run). A peer whose program is not installed is
reported as skipped, not failed: ``bench/start/setup`` installs them.
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

from bench.start import cold_pull, commands, devyard_start, docker_engine, harness, peers, report, test_image
from support import images, registry

PARTS = ("runc", "docker", "devcontainer", "devyard", "cold-pull", "density")
#: The image every contender starts, as docker and devcontainer name it once loaded.
_DOCKER_IMAGE = "devyard-bench/busybox:latest"


def _options(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.start", description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, help="starts of each contender (default 10; --quick 1)")
    parser.add_argument("--skip", default="", help=f"comma-separated parts to leave out: {','.join(PARTS)}")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run: 1 run each, the busybox image for the cold pull, 3 idle environments",
    )
    parser.add_argument("--density", type=int, help="idle environments to start (default 50; --quick 3)")
    parser.add_argument(
        "--cold-image",
        choices=("debian", "busybox"),
        help="the image of the cold pull: a Debian minbase root from mmdebstrap, cached (default), or busybox",
    )
    parser.add_argument(
        "--devyard-runtime",
        choices=("linux", "fake"),
        default="linux",
        help="the runner's runtime: linux (runc; the figures the issue means) or fake (no container: the "
        "platform's own share of a start, and a check of the benchmark's machinery)",
    )
    parser.add_argument(
        "--cache",
        type=Path,
        default=harness.default_cache(),
        help="where the Debian root and the Dev Containers CLI are kept (default $DEVYARD_BENCH_CACHE or "
        "~/.cache/devyard-bench; bench/start/setup installs the CLI there)",
    )
    options = parser.parse_args(argv)
    options.skip = {part.strip() for part in options.skip.split(",") if part.strip()}
    if options.skip - set(PARTS):
        parser.error(f"--skip: expected some of {', '.join(PARTS)}, got {sorted(options.skip)}")
    options.runs = options.runs if options.runs is not None else (1 if options.quick else 10)
    options.density = options.density if options.density is not None else (3 if options.quick else 50)
    options.cold_image = options.cold_image or ("busybox" if options.quick else "debian")
    if options.runs < 1 or options.density < 0:
        parser.error("--runs must be positive and --density not negative")
    return options


def _peers(
    run: report.Run,
    options: argparse.Namespace,
    work: Path,
    rootfs: Path,
    image: test_image.Layout,
    outcome: harness.Outcome,
) -> None:
    starts = run.starts

    def missing(key: str) -> Callable[[str], None]:
        return lambda reason: starts.missing.__setitem__(key, reason)

    if "runc" in options.skip:
        starts.missing[report.RUNC] = "skipped (--skip)"
    elif shutil.which("runc") is None:
        starts.missing[report.RUNC] = "skipped: runc is not installed (scripts/setup installs it)"
    else:
        run.versions["runc"] = harness.version(["runc", "--version"]).removeprefix("runc version ")
        for key, measure in ((report.RUNC, peers.measure_runc), (report.RUNC_ONE_SHOT, peers.measure_runc_one_shot)):
            samples = outcome.attempt(missing(key), functools.partial(measure, rootfs, work / "runc", options.runs))
            if samples is not None:
                starts.samples[key] = samples

    wanted = {"docker", "devcontainer"} - options.skip
    for part in ("docker", "devcontainer"):
        if part not in wanted:
            starts.missing[part] = "skipped (--skip)"
    if not wanted:
        return
    if commands.find("dockerd", "/usr/sbin/dockerd") is None:
        for part in wanted:
            starts.missing[part] = "skipped: Docker Engine is not installed (bench/start/setup installs docker.io)"
        return
    cli = peers.devcontainer_cli(options.cache / "devcontainers-cli")
    if "devcontainer" in wanted and cli is None:
        starts.missing[report.DEVCONTAINER] = "skipped: @devcontainers/cli is not installed (bench/start/setup)"
        wanted.discard("devcontainer")

    def engine_run() -> None:
        archive = work / "busybox-docker.tar"
        commands.run(
            ["skopeo", "copy", "--quiet", image.reference, f"docker-archive:{archive}:{_DOCKER_IMAGE}"],
            timeout=120,
        )
        with docker_engine.running_engine(work / "docker") as engine:
            run.versions["Docker Engine"] = engine.version
            engine.docker("load", "--input", archive, timeout=120)
            if "docker" in wanted:
                for key, measure in (
                    (report.DOCKER, peers.measure_docker),
                    (report.DOCKER_ONE_SHOT, peers.measure_docker_one_shot),
                ):
                    samples = outcome.attempt(
                        missing(key), functools.partial(measure, engine, _DOCKER_IMAGE, options.runs)
                    )
                    if samples is not None:
                        starts.samples[key] = samples
            if "devcontainer" in wanted and cli is not None:
                run.versions["@devcontainers/cli"] = harness.version([str(cli), "--version"])
                samples = outcome.attempt(
                    missing(report.DEVCONTAINER),
                    lambda: peers.measure_devcontainer(engine, cli, _DOCKER_IMAGE, work / "devcontainer", options.runs),
                )
                if samples is not None:
                    starts.samples[report.DEVCONTAINER] = samples

    def engine_failed(reason: str) -> None:
        for part in wanted:
            starts.missing.setdefault(part, reason)

    outcome.attempt(engine_failed, engine_run)


def _cold_pull(
    run: report.Run, options: argparse.Namespace, work: Path, registry_host: str, busybox: test_image.Layout,
    outcome: harness.Outcome,
) -> None:  # fmt: skip
    layout = test_image.debian(work / "debian-oci") if options.cold_image == "debian" else busybox
    reference = images.push(layout.path, registry_host, f"bench/{options.cold_image}:latest")
    pull = run.cold_pull = report.ColdPull(reference, layout.size)
    run.versions["skopeo"] = harness.version(["skopeo", "--version"]).removeprefix("skopeo version ")
    run.versions["umoci"] = harness.version(["umoci", "--version"]).removeprefix("umoci version ")
    result = outcome.attempt(
        lambda reason: pull.missing.__setitem__("peer", reason),
        lambda: cold_pull.measure_peer(reference, work / "cold-peer", options.runs),
    )
    if result is not None:
        pull.peer, pull.peer_steps = result
    if not devyard_start.image_store_available():
        pull.missing["devyard"] = "NOT MEASURED: the image store (devyard.runner.images.store) has not landed"
        return
    result = outcome.attempt(
        lambda reason: pull.missing.__setitem__("devyard", reason),
        lambda: cold_pull.measure_devyard(reference, work / "cold-devyard", options.runs),
    )
    if result is not None:
        pull.devyard, pull.devyard_steps = result


def main(argv: list[str] | None = None) -> int:
    options = _options(argv)
    run = report.Run(harness.machine(), {}, options.runs)
    outcome = harness.Outcome()
    with ExitStack() as stack:
        work = Path(tempfile.mkdtemp(prefix="devyard-bench-start-"))
        # Root inside an environment is an unprivileged id outside: it must be able to reach the runner's state
        # directory below this one (mkdtemp makes it 0700), as it reaches /var/lib/devyard.
        work.chmod(0o755)
        stack.callback(shutil.rmtree, work, ignore_errors=True)
        busybox = test_image.busybox(work / "busybox-oci")
        rootfs = test_image.busybox_rootfs(busybox, work / "busybox-bundle")
        _peers(run, options, work, rootfs, busybox, outcome)

        if {"devyard", "cold-pull", "density"} - options.skip:
            server, _ = stack.enter_context(registry.running_registry(work / "registry"))
            if "cold-pull" not in options.skip:
                _cold_pull(run, options, work, server.host, busybox, outcome)
            if {"devyard", "density"} - options.skip:
                image = images.push(busybox.path, server.host, "bench/busybox:latest")
                devyard_start.measure(run, options, work / "devyard", image, server.host, outcome.attempt)
    print(report.render(run), flush=True)
    return 1 if outcome.failed else 0


if __name__ == "__main__":
    sys.exit(main())
