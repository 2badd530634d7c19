"""The figures of a ``bench.start`` run and the tables it prints: each contender's median, min and max, its
ratio to the peers measured in the same run, and the issue's targets and quoted figures beside them.

Called by ``bench.start.__main__``; it asserts nothing, it only says ``ok`` or ``MISS`` against a target.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = ["ColdPull", "Density", "Run", "Starts", "render"]

#: The issue's targets for devyard.
START_P50_SECONDS = 0.25
START_VS_DOCKER = 1.0
START_VS_DEVCONTAINER = 0.35
DENSITY_ENVIRONMENTS = 50
DENSITY_MIB_PER_ENVIRONMENT = 5.0
COLD_PULL_VS_PEER = 1.2

#: Contender keys, in the order the table shows them, with what each measures.
RUNC = "runc"
DOCKER = "docker"
DEVCONTAINER = "devcontainer"
DEVYARD_CLI = "devyard"
DEVYARD_API = "devyard-api"
RUNC_ONE_SHOT = "runc-one-shot"
DOCKER_ONE_SHOT = "docker-one-shot"
LABELS = {
    RUNC: "runc run -d + exec true (floor)",
    DOCKER: "docker run -d + exec true",
    DEVCONTAINER: "devcontainer up",
    DEVYARD_CLI: "devyard env create -- true (CLI, one command)",
    DEVYARD_API: "devyard, same through the API",
    RUNC_ONE_SHOT: "one-shot: runc run true",
    DOCKER_ONE_SHOT: "one-shot: docker run --rm true",
}
#: What the issue measured "on this kind of machine", seconds.
QUOTED = {RUNC_ONE_SHOT: 0.03, DOCKER_ONE_SHOT: 0.27, DEVCONTAINER: 0.75}
#: The peers a devyard figure is divided by, and the most the issue allows that ratio to be.
PEERS = {RUNC: None, DOCKER: START_VS_DOCKER, DEVCONTAINER: START_VS_DEVCONTAINER}


@dataclass
class Starts:
    #: Contender -> seconds from the first command to the answer of the first command inside, per run.
    samples: dict[str, list[float]] = field(default_factory=dict)
    #: Contender -> why it has no figure (skipped, or the error it failed with).
    missing: dict[str, str] = field(default_factory=dict)
    #: Contender -> its parts (such as ``create --wait`` and ``exec``) -> seconds per run.
    steps: dict[str, dict[str, list[float]]] = field(default_factory=dict)


@dataclass
class ColdPull:
    image: str
    #: Bytes of the layers as the registry serves them.
    size: int = 0
    #: ``skopeo copy docker://... oci:...`` + ``umoci unpack``, per run, seconds; and each step alone.
    peer: list[float] = field(default_factory=list)
    peer_steps: dict[str, list[float]] = field(default_factory=dict)
    #: devyard's image store: pull and unpack into an empty store, per run.
    devyard: list[float] = field(default_factory=list)
    devyard_steps: dict[str, list[float]] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)


@dataclass
class Density:
    environments: int = 0
    #: The runner process's memory before the environments and with all of them running, in KiB.
    before_kib: dict[str, int] = field(default_factory=dict)
    after_kib: dict[str, int] = field(default_factory=dict)
    #: Seconds a ``true`` exec in one environment took while all ran (the host stays responsive).
    probe: list[float] = field(default_factory=list)
    missing: str = ""


@dataclass
class Run:
    machine: str
    versions: dict[str, str]
    runs: int
    starts: Starts = field(default_factory=Starts)
    cold_pull: ColdPull | None = None
    density: Density | None = None
    notes: list[str] = field(default_factory=list)


def _seconds(value: float) -> str:
    return f"{value:.3f}"


def _median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def _verdict(met: bool) -> str:
    return "ok" if met else "MISS"


def _starts(starts: Starts) -> list[str]:
    header = f"  {'started and answered, seconds':<42}{'median':>8}{'min':>8}{'max':>8}{'n':>4}   "
    lines = [header + "x runc  x docker  x devcont.   issue"]
    medians = {key: _median(values) for key, values in starts.samples.items()}
    for key, label in LABELS.items():
        values = starts.samples.get(key)
        if not values:
            if key in starts.missing:
                lines.append(f"  {label:<42}  {starts.missing[key]}")
            continue
        median = statistics.median(values)
        row = (
            f"  {label:<42}{_seconds(median):>8}{_seconds(min(values)):>8}{_seconds(max(values)):>8}{len(values):>4}   "
        )
        for peer, width in ((RUNC, 6), (DOCKER, 10), (DEVCONTAINER, 12)):
            base = medians.get(peer)
            row += (f"{median / base:.2f}x" if base else "-").rjust(width)
        quoted = QUOTED.get(key)
        row += ("~" + _seconds(quoted) if quoted is not None else "").rjust(8)
        lines.append(row)
        steps = starts.steps.get(key, {})
        if steps:
            lines.append(
                "    of which (medians): "
                + ", ".join(f"{step} {_seconds(statistics.median(times))}" for step, times in steps.items() if times)
            )
    for key in (DEVYARD_CLI, DEVYARD_API):
        devyard = medians.get(key)
        if devyard is None:
            continue
        checks = [f"median {_seconds(devyard)} s <= {START_P50_SECONDS:g} s {_verdict(devyard <= START_P50_SECONDS)}"]
        for peer, bound in PEERS.items():
            base = medians.get(peer)
            if bound is not None and base:
                ratio = devyard / base
                checks.append(f"{ratio:.2f}x {peer} <= {bound:g}x {_verdict(ratio <= bound)}")
        lines.append(f"  target ({LABELS[key]}): " + "; ".join(checks))
    return lines


def _cold_pull(pull: ColdPull) -> list[str]:
    lines = [
        f"== cold pull and unpack from a registry on 127.0.0.1: {pull.image} ({pull.size / 2**20:.1f} MiB of layers) =="
    ]
    rows = (
        ("skopeo copy + umoci unpack", pull.peer, pull.peer_steps),
        ("devyard image store", pull.devyard, pull.devyard_steps),
    )
    for label, values, steps in rows:
        if not values:
            reason = pull.missing.get("devyard" if label.startswith("devyard") else "peer", "not measured")
            lines.append(f"  {label:<42}  {reason}")
            continue
        detail = ", ".join(f"{step} {_seconds(statistics.median(times))}" for step, times in steps.items() if times)
        lines.append(
            f"  {label:<42}{_seconds(statistics.median(values)):>8}{_seconds(min(values)):>8}"
            f"{_seconds(max(values)):>8}{len(values):>4}   ({detail})"
        )
    if pull.peer and pull.devyard:
        ratio = statistics.median(pull.devyard) / statistics.median(pull.peer)
        lines.append(
            f"  target: devyard {ratio:.2f}x the peer <= {COLD_PULL_VS_PEER:g}x {_verdict(ratio <= COLD_PULL_VS_PEER)}"
        )
    return lines


def _density(density: Density) -> list[str]:
    lines = [f"== idle density: {density.environments or DENSITY_ENVIRONMENTS} environments on one runner =="]
    if density.missing:
        return [*lines, f"  {density.missing}"]
    if density.environments < DENSITY_ENVIRONMENTS:
        lines.append(f"  (fewer than the target's {DENSITY_ENVIRONMENTS} environments: per-environment figures only)")
    for kind in density.after_kib:
        before, after = density.before_kib.get(kind, 0), density.after_kib[kind]
        per = (after - before) / 1024 / max(density.environments, 1)
        line = f"  {kind}: {before / 1024:.1f} MiB before, {after / 1024:.1f} MiB with all running: "
        line += f"{per:.2f} MiB per environment"
        if kind in ("RSS", "PSS"):  # the target is the runner's own memory
            line = f"  runner {line.lstrip()} (target <= {DENSITY_MIB_PER_ENVIRONMENT:g}) " + _verdict(
                per <= DENSITY_MIB_PER_ENVIRONMENT
            )
        lines.append(line)
    if density.probe:
        lines.append(
            f"  exec true in one environment meanwhile: median {_seconds(statistics.median(density.probe))} s, "
            f"max {_seconds(max(density.probe))} s (n={len(density.probe)})"
        )
    return lines


def render(run: Run) -> str:
    versions = ", ".join(f"{name} {version}" for name, version in run.versions.items())
    lines = [
        f"bench/start on {run.machine}",
        f"  {versions}; {run.runs} run(s) of each; the same busybox root filesystem for every contender",
        "== start: from the first command to the answer of a first command inside the container ==",
        *_starts(run.starts),
    ]
    if run.cold_pull is not None:
        lines += _cold_pull(run.cold_pull)
    if run.density is not None:
        lines += _density(run.density)
    lines += [f"  NOTE: {note}" for note in run.notes]
    return "\n".join(lines)
