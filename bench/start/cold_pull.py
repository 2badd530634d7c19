"""The cold pull: an image fetched from a registry on 127.0.0.1 and unpacked onto an empty disk, by the peer
tools (``skopeo copy`` + ``umoci unpack``) and by devyard's image store.

Both unpack with the layers' owners shifted into the runner's id range (umoci's ``--uid-map``/``--gid-map``,
the store's ``IdRange``), so they do the same work. Each run starts from empty directories, removed after
(not timed). Called by ``bench.start.__main__``.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path

from bench.start import commands

__all__ = ["measure_devyard", "measure_peer"]

_TIMEOUT = 600.0
#: The runner's default id range (``RunnerSettings.id_range_start``/``id_range_size``).
_ID_START, _ID_SIZE = 1_000_000, 65536


def measure_peer(reference: str, work: Path, runs: int) -> tuple[list[float], dict[str, list[float]]]:
    """``skopeo copy docker://REFERENCE oci:...`` then ``umoci unpack``, ``runs`` times; the totals, and the
    seconds of each step."""
    totals: list[float] = []
    steps: dict[str, list[float]] = {"skopeo copy": [], "umoci unpack": []}
    id_map = f"0:{_ID_START}:{_ID_SIZE}"
    for number in range(runs):
        target = work / f"peer-{number}"
        target.mkdir(parents=True)
        try:
            started = time.perf_counter()
            commands.run(
                [
                    "skopeo",
                    "copy",
                    "--quiet",
                    "--src-tls-verify=false",
                    f"docker://{reference}",
                    f"oci:{target}/image:pulled",
                ],
                timeout=_TIMEOUT,
            )
            copied = time.perf_counter()
            commands.run(
                ["umoci", "unpack", "--uid-map", id_map, "--gid-map", id_map, "--image", f"{target}/image:pulled",
                 target / "bundle"],
                timeout=_TIMEOUT,
            )  # fmt: skip
            finished = time.perf_counter()
        finally:
            shutil.rmtree(target, ignore_errors=True)
        totals.append(finished - started)
        steps["skopeo copy"].append(copied - started)
        steps["umoci unpack"].append(finished - copied)
    return totals, steps


def measure_devyard(reference: str, work: Path, runs: int) -> tuple[list[float], dict[str, list[float]]]:
    """devyard's image store pulling and unpacking ``reference`` into an empty store, ``runs`` times; the totals
    and the store's own timings by step (``Prepared.timings``)."""
    return asyncio.run(_measure_devyard(reference, work, runs))


async def _measure_devyard(reference: str, work: Path, runs: int) -> tuple[list[float], dict[str, list[float]]]:
    # Imported here: the store is the part under test, and this module must load without it.
    from devyard.runner.images import image, store

    totals: list[float] = []
    steps: dict[str, list[float]] = {}
    host = reference.split("/", 1)[0]
    for number in range(runs):
        root = work / f"store-{number}"
        image_store = store.ImageStore(root, id_range=image.IdRange(_ID_START, _ID_SIZE), insecure=[host])
        try:
            started = time.perf_counter()
            prepared = await image_store.prepare(reference, holder=f"bench-{number}")
            totals.append(time.perf_counter() - started)
            for step, seconds in prepared.timings.items():
                steps.setdefault(step, []).append(seconds)
            await image_store.release(f"bench-{number}")
        finally:
            image_store.close()
            shutil.rmtree(root, ignore_errors=True)
    return totals, steps
