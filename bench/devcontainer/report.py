"""The figures of a ``bench.devcontainer`` run and the table it prints: per phase (cold, warm) and contender
(``devcontainer up``, devyard) the median, min and max, devyard's ratio to ``devcontainer up``, where devyard's
time went (``status.timings``), and the issue's target beside the warm ratio.

Called by ``bench.devcontainer.__main__``; it asserts nothing, it only says ``ok`` or ``MISS`` against the target.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = ["CONTENDERS", "DEVCONTAINER", "DEVYARD", "PHASES", "Run", "render"]

#: The issue's target: devyard's warm start at most this many times ``devcontainer up``'s.
WARM_VS_DEVCONTAINER = 0.5

COLD = "cold"
WARM = "warm"
PHASES = (COLD, WARM)
DEVCONTAINER = "devcontainer"
DEVYARD = "devyard"
CONTENDERS = (DEVCONTAINER, DEVYARD)
LABELS = {DEVCONTAINER: "devcontainer up", DEVYARD: "devyard (API create)"}


@dataclass
class Run:
    machine: str
    versions: dict[str, str]
    runs: int
    #: The base image the Dockerfile starts from, and the bytes of its layers as the registry serves them.
    base_image: str = ""
    base_size: int = 0
    #: (phase, contender) -> seconds per run.
    samples: dict[tuple[str, str], list[float]] = field(default_factory=dict)
    #: (phase, contender) -> why it has no figure (skipped, or the error it failed with).
    missing: dict[tuple[str, str], str] = field(default_factory=dict)
    #: phase -> devyard's ``status.timings`` step -> seconds per run.
    devyard_steps: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _seconds(value: float) -> str:
    return f"{value:.3f}"


def _median(values: Sequence[float] | None) -> float | None:
    return statistics.median(values) if values else None


def _rows(run: Run) -> list[str]:
    lines = [f"  {'seconds':<34}{'median':>8}{'min':>8}{'max':>8}{'n':>4}   x devcontainer up"]
    for phase in PHASES:
        peer = _median(run.samples.get((phase, DEVCONTAINER)))
        for contender in CONTENDERS:
            label = f"{phase}: {LABELS[contender]}"
            values = run.samples.get((phase, contender))
            if not values:
                lines.append(f"  {label:<34}  {run.missing.get((phase, contender), 'not measured')}")
                continue
            median = statistics.median(values)
            ratio = f"{median / peer:.2f}x" if peer else "-"
            lines.append(
                f"  {label:<34}{_seconds(median):>8}{_seconds(min(values)):>8}{_seconds(max(values)):>8}"
                f"{len(values):>4}   {ratio:>8}"
            )
            steps = run.devyard_steps.get(phase, {}) if contender == DEVYARD else {}
            if steps:
                lines.append(
                    "    of which (status.timings, medians): "
                    + ", ".join(f"{step} {_seconds(statistics.median(s))}" for step, s in steps.items() if s)
                )
    return lines


def _target(run: Run) -> str:
    devyard, peer = _median(run.samples.get((WARM, DEVYARD))), _median(run.samples.get((WARM, DEVCONTAINER)))
    head = f"  target: warm <= {WARM_VS_DEVCONTAINER:g}x devcontainer up: "
    if devyard is None or not peer:
        return head + "not measured (both warm figures are needed)"
    ratio = devyard / peer
    verdict = "ok" if ratio <= WARM_VS_DEVCONTAINER else "MISS"
    return head + f"devyard {_seconds(devyard)} s / devcontainer up {_seconds(peer)} s = {ratio:.2f}x {verdict}"


def render(run: Run) -> str:
    versions = ", ".join(f"{name} {version}" for name, version in run.versions.items())
    lines = [
        f"bench/devcontainer on {run.machine}",
        f"  {versions}; {run.runs} run(s) of each",
        f"  the same folder for both: a Dockerfile FROM {run.base_image}"
        f" ({run.base_size / 2**20:.1f} MiB of layers), two RUN steps;",
        "    a local Feature with an option; a postCreateCommand",
        "  cold: every cache emptied before each run (devyard: a new runner state directory; docker: every image",
        "    and the build cache removed); the base image's pull from the registry on 127.0.0.1 is in both figures",
        "  warm: the build cache kept (a first run, not timed, filled it); a new container / environment each run",
        "== from `devcontainer up` / the create request to the container running with its postCreateCommand done ==",
        *_rows(run),
        _target(run),
    ]
    lines += [f"  NOTE: {note}" for note in run.notes]
    return "\n".join(lines)
