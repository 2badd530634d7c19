"""``devyard image``: the image store of a runner on this host (pull, list, rm, import, bootstrap, gc).

Works on the files directly, not through the management plane: the store of ``--state-dir`` (default: the
runner's ``/var/lib/devyard/runner`` when it exists and we are root, else the local daemon's runner), which a
running runner may use at the same time (the store locks what it must).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, TypeVar

import click

from devyard.cli import _render
from devyard.cli._invocation import output_option

if TYPE_CHECKING:
    from devyard.runner.images.image import Progress
    from devyard.runner.images.store import ImageStore

__all__ = ["default_state_dir", "image"]

P = ParamSpec("P")
T = TypeVar("T")
_RUNNER_STATE_DIR = Path("/var/lib/devyard/runner")


def default_state_dir() -> Path:
    """The system runner's state directory when it is there and we are root, else the local daemon's runner's."""
    if _RUNNER_STATE_DIR.is_dir() and os.geteuid() == 0:
        return _RUNNER_STATE_DIR
    from devyard.local.state_dir import default_state_dir as local_state_dir

    return local_state_dir() / "runner"


@click.group("image")
def image() -> None:
    """Pull, list, import and remove the images of a runner on this host."""


def _store_command(function: Callable[Concatenate[ImageStore, P], None]) -> Callable[..., None]:
    """Give a command ``--state-dir``, ``--insecure-registry`` and ``-o``; it receives the open store, and the
    store's errors become one line on stderr."""

    @functools.wraps(function)
    def wrapper(*args: Any, state_dir: Path | None, insecure_registry: tuple[str, ...], **kwargs: Any) -> None:
        from devyard.runner.errors import RunnerError
        from devyard.runner.images.image import IdRange
        from devyard.runner.images.store import ImageStore, store_root, stored_id_range

        root = store_root(state_dir or default_state_dir())
        try:
            store = ImageStore(root, id_range=stored_id_range(root) or IdRange(), insecure=insecure_registry)
        except (RunnerError, OSError) as exc:
            raise click.ClickException(f"cannot open the image store {root}: {exc}") from exc
        try:
            function(store, *args, **kwargs)
        except (RunnerError, ValueError) as exc:
            raise click.ClickException(str(exc)) from exc
        finally:
            store.close()

    wrapper = click.option(
        "--insecure-registry",
        multiple=True,
        metavar="HOST:PORT",
        help="A registry reached over plain http (repeatable).",
    )(wrapper)
    wrapper = click.option(
        "--state-dir",
        type=click.Path(file_okay=False, path_type=Path),
        help="The runner's state directory; default: /var/lib/devyard/runner (as root), else the local daemon's.",
    )(wrapper)
    return output_option(wrapper)


def _run(work: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(work)


def _emit(output: str, data: Any, render: Callable[[Any], Any]) -> None:
    if output == "json":
        import json

        click.echo(json.dumps(data, indent=2))
        return
    from rich.console import Console

    console = Console()
    console.print(render(data))


def _image_json(image: Any) -> dict[str, Any]:
    return {
        "reference": image.reference,
        "digest": image.digest,
        "size": image.size,
        "layers": [str(layer) for layer in image.layers],
    }


def _size(size: int) -> str:
    value = float(size)
    for unit in ("B", "kB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{size} B"


@contextlib.contextmanager
def _progress_bar(enabled: bool) -> Iterator[Callable[[Progress], None] | None]:
    """A rich progress bar on stderr (bytes and layers) when it is a terminal; else no callback."""
    if not enabled:
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, TextColumn, TransferSpeedColumn
    from rich.progress import Progress as Bar

    console = Console(stderr=True)
    if not console.is_terminal:
        yield None
        return
    with Bar(
        TextColumn("{task.fields[step]:<8}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TextColumn("layers {task.fields[layers]}"),
        console=console,
        transient=True,
    ) as bar:
        task = bar.add_task("pull", total=None, step="resolve", layers="-")

        def update(progress: Progress) -> None:
            bar.update(
                task,
                completed=progress.fetched,
                total=progress.total or None,
                step=progress.step,
                layers=f"{progress.layers_done}/{progress.layers_total}",
            )

        yield update


@image.command("pull")
@click.argument("reference")
@_store_command
def pull(store: ImageStore, reference: str, output: str) -> None:
    """Pull REFERENCE (such as debian:bookworm or HOST:PORT/repo:tag) into the store and unpack it."""
    with _progress_bar(output != "json") as progress:
        prepared = _run(store.pull(reference, progress))
    data = {**_image_json(prepared.image), "timings": dict(prepared.timings)}
    _emit(
        output,
        data,
        lambda item: _render.plain(f"Pulled {item['reference']} ({item['digest']}, {_size(item['size'])} unpacked)."),
    )


@image.command("list")
@_store_command
def list_images(store: ImageStore, output: str) -> None:
    """List the images in the store: names, digest, size and how many environments hold each."""
    items = [
        {
            "references": list(stored.references),
            "digest": stored.digest,
            "size": stored.size,
            "layers": stored.layers,
            "holders": list(stored.holders),
            "created": stored.created,
        }
        for stored in store.images()
    ]
    _emit(output, {"items": items}, _image_table)


def _image_table(data: dict[str, Any]) -> Any:
    rows = []
    for item in data["items"]:
        names = item["references"] or ["<none>"]
        for name in names:
            rows.append(
                (
                    name,
                    item["digest"][len("sha256:") : len("sha256:") + 12],
                    _size(item["size"]),
                    str(len(item["holders"])),
                )
            )
    return _render.table(["REFERENCE", "DIGEST", "SIZE", "HELD BY"], rows, empty="No images.", whole=("REFERENCE",))


@image.command("rm")
@click.argument("references", metavar="REFERENCE|DIGEST...", nargs=-1, required=True)
@click.option("--force", "-f", is_flag=True, help="Remove it even while environments hold it.")
@_store_command
def remove(store: ImageStore, references: tuple[str, ...], force: bool, output: str) -> None:
    """Remove images (a name, or a digest for the image and all its names); refuses images that environments
    hold, unless --force."""
    removed: list[str] = []
    for reference in references:
        removed += _run(store.remove(reference, force=force))
    _emit(
        output, {"removed": removed}, lambda data: _render.plain(f"Removed {', '.join(data['removed']) or 'nothing'}.")
    )


@image.command("import")
@click.argument("path", type=click.Path(exists=True, path_type=Path))
@click.option("--name", "reference", required=True, metavar="REFERENCE", help="The name to give it.")
@_store_command
def import_image(store: ImageStore, path: Path, reference: str, output: str) -> None:
    """Import PATH: an OCI image layout (directory or tar), a `docker save` archive, or a root filesystem
    tarball (made a one-layer image running /bin/sh)."""
    imported = _run(store.import_archive(path, reference))
    _emit(
        output,
        _image_json(imported),
        lambda item: _render.plain(f"Imported {item['reference']} ({item['digest']}, {_size(item['size'])})."),
    )


@image.command("bootstrap")
@click.option("--suite", default="bookworm", show_default=True, help="The Debian suite.")
@click.option(
    "--packages",
    default="bash,ca-certificates,git,sudo",
    show_default=True,
    help="Packages to add, comma-separated.",
)
@click.option("--variant", type=click.Choice(["minbase", "apt"]), default="minbase", show_default=True)
@click.option("--mirror", help="A Debian mirror URL; default: the host's apt sources, else deb.debian.org.")
@click.option("--name", "reference", help="The name to give it; default: devyard.local/debian:SUITE.")
@_store_command
def bootstrap(
    store: ImageStore, suite: str, packages: str, variant: str, mirror: str | None, reference: str | None, output: str
) -> None:
    """Build a Debian image with mmdebstrap (needs root; a minute or two) and import it, without any registry."""
    from devyard.runner.images.bootstrap import bootstrap_debian

    wanted = [package.strip() for package in packages.split(",") if package.strip()]
    if output != "json":
        click.echo(f"Building Debian {suite} ({variant}, {', '.join(wanted) or 'no extra packages'})...", err=True)
    built = _run(
        bootstrap_debian(
            store,
            reference=reference or f"devyard.local/debian:{suite}",
            suite=suite,
            packages=wanted,
            variant=variant,
            mirror=mirror,
        )
    )
    _emit(
        output,
        _image_json(built),
        lambda item: _render.plain(f"Built {item['reference']} ({item['digest']}, {_size(item['size'])})."),
    )


@image.command("gc")
@_store_command
def collect_garbage(store: ImageStore, output: str) -> None:
    """Remove images neither named nor held, unused blobs and layers, and leftovers of interrupted pulls."""
    report = _run(store.gc())
    data = {"images": report.images, "blobs": report.blobs, "layers": report.layers, "temporary": report.temporary}
    _emit(
        output,
        data,
        lambda item: _render.plain(
            f"Removed {item['images']} images, {item['blobs']} blobs, {item['layers']} layers and "
            f"{item['temporary']} leftovers."
        ),
    )
