"""``devyard image``: pull, list, rm, import and gc through click's runner, on a store in a temporary state dir."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from devyard.cli.main import cli
from devyard.runner.images.image import IdRange
from devyard.runner.images.store import ImageStore, store_root
from support import host, images
from support.registry import RegistryServer


def _run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    return result.exit_code, result.output


def test_pull_list_rm(tmp_path: Path, registry: RegistryServer, busybox_image: str) -> None:
    host.require()
    state = ["--state-dir", str(tmp_path / "runner")]
    code, output = _run("image", "pull", busybox_image, *state, "--insecure-registry", registry.host, "-o", "json")
    assert code == 0, output
    pulled = json.loads(output)
    assert pulled["reference"] == busybox_image and pulled["digest"].startswith("sha256:")

    code, output = _run("image", "list", *state, "-o", "json")
    assert code == 0, output
    [item] = json.loads(output)["items"]
    assert item["references"] == [busybox_image] and item["holders"] == []

    code, output = _run("image", "list", *state)
    assert busybox_image in output and pulled["digest"][7:19] in output

    # An environment holds it: rm refuses, saying why.
    store = ImageStore(store_root(tmp_path / "runner"), id_range=IdRange())
    try:
        import asyncio

        asyncio.run(store.prepare(busybox_image, holder="env_1"))
    finally:
        store.close()
    code, output = _run("image", "rm", busybox_image, *state)
    assert code == 1 and "held by 1 environment(s) (env_1)" in output
    code, output = _run("image", "rm", busybox_image, "--force", *state, "-o", "json")
    assert code == 0 and json.loads(output) == {"removed": [busybox_image]}
    code, output = _run("image", "list", *state, "-o", "json")
    assert json.loads(output) == {"items": []}


def test_import_and_errors(tmp_path: Path) -> None:
    host.require()
    state = ["--state-dir", str(tmp_path / "runner")]
    layout = images.busybox_layout(tmp_path / "layout")
    code, output = _run("image", "import", str(layout), "--name", "devyard.local/busybox:1", *state, "-o", "json")
    assert code == 0, output
    assert json.loads(output)["reference"] == "devyard.local/busybox:1"
    code, output = _run("image", "pull", "devyard.local/busybox:1", *state)
    assert code == 1 and "never pulled" in output
    code, output = _run("image", "import", str(layout), "--name", "Bad Name", *state)
    assert code == 1 and "invalid image reference" in output
    code, output = _run("image", "gc", *state, "-o", "json")
    assert code == 0 and json.loads(output)["images"] == 0


def test_help_lists_the_commands() -> None:
    code, output = _run("image", "--help")
    assert code == 0
    for command in ("pull", "list", "rm", "import", "bootstrap", "gc"):
        assert command in output


@pytest.mark.slow
def test_bootstrap_builds_a_debian_image(tmp_path: Path) -> None:
    host.require("mmdebstrap")
    state = ["--state-dir", str(tmp_path / "runner")]
    code, output = _run("image", "bootstrap", "--packages", "bash", *state, "-o", "json")
    assert code == 0, output
    built = json.loads(output)
    assert built["reference"] == "devyard.local/debian:bookworm"
    root = Path(built["layers"][0])
    assert (root / "bin" / "bash").exists() or (root / "usr" / "bin" / "bash").exists()
    assert "bookworm" in (root / "etc" / "os-release").read_text()
