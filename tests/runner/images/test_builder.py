"""The image builder with real buildah: Dockerfiles FROM the test registry's busybox and FROM an image only the
store has, built into a real store and read back from its unpacked layers; the cache, its key, and failures."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from devyard.runner.errors import PermanentError
from devyard.runner.images import builder
from devyard.runner.images.builder import BuildFailed, BuildSpec, Built
from devyard.runner.images.store import ImageStore
from devyard.runner.linux import cgroups
from support import host
from support import images as images_support
from support.registry import USERS, RegistryServer

from .conftest import ID_RANGE

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _buildah() -> None:
    if shutil.which("buildah") is None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("CI=true and buildah is missing (Debian package buildah; scripts/setup installs it)")
        pytest.skip("buildah is not installed (Debian package buildah; scripts/setup installs it)")


@pytest.fixture
def builds(tmp_path: Path) -> Iterator[Path]:
    root = tmp_path / "builds"
    yield root
    # Nothing of a build outlives it.
    assert not (root / "work").exists() or not any((root / "work").iterdir())


MULTI_STAGE = """\
ARG BASE={base}
FROM $BASE AS first
ARG GREETING=hello
RUN echo "$GREETING from first" > /greeting
FROM first AS second
COPY data.txt /data.txt
COPY sub/ /sub/
RUN cat /greeting /data.txt > /combined && echo done > /second
FROM second AS third
RUN echo third > /third
"""


def context_with(tmp_path: Path, dockerfile: str, files: dict[str, str] | None = None) -> Path:
    context = tmp_path / "context"
    context.mkdir(exist_ok=True)
    (context / "Dockerfile").write_text(dockerfile)
    for name, text in (files or {}).items():
        path = context / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return context


async def read_file(store: ImageStore, reference: str, path: str) -> str | None:
    """A file of a stored image, from its unpacked layers (the topmost that has it), or ``None``."""
    prepared = await store.prepare(reference, holder="test-reader")
    await store.release("test-reader")
    for layer in reversed(prepared.image.layers):
        candidate = layer / path.lstrip("/")
        if candidate.is_file():
            return candidate.read_text(errors="replace")
    return None


def build_names(store: ImageStore) -> list[str]:
    return [name for image in store.images() for name in image.references if name.startswith("devyard.local/build")]


async def test_a_multi_stage_build_with_args_and_a_copy_lands_in_the_store_and_then_comes_from_the_cache(
    store: ImageStore, busybox_image: str, builds: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    context = context_with(
        tmp_path,
        MULTI_STAGE.format(base=busybox_image),
        {"data.txt": "data from the context\n", "sub/inner.txt": "inner\n", "ignored.txt": "x\n"},
    )
    (context / ".dockerignore").write_text("ignored.txt\n")
    spec = BuildSpec(context, context / "Dockerfile", args={"GREETING": "hi"}, target="second")
    lines: list[str] = []

    built = await builder.build(store, builds, spec, output=lines.append)

    assert not built.cached
    assert built.reference.startswith("devyard.local/build:")
    assert store.lookup(built.reference) == built.digest
    assert await read_file(store, built.reference, "/combined") == "hi from first\ndata from the context\n"
    assert await read_file(store, built.reference, "/sub/inner.txt") == "inner\n"
    assert await read_file(store, built.reference, "/bin/busybox") is not None  # the base's layer is there too
    assert await read_file(store, built.reference, "/third") is None  # a stage after the target
    assert any("STEP" in line and "RUN cat /greeting" in line for line in lines)

    # The same inputs again, and a change to a file the .dockerignore leaves out: the cache, without buildah.
    (context / "ignored.txt").write_text("changed\n")
    monkeypatch.setenv("PATH", str(tmp_path / "no-programs"))
    quiet: list[str] = []
    again = await builder.build(store, builds, spec, output=quiet.append)
    assert again == Built(built.reference, built.digest, cached=True)
    assert quiet == []


async def test_a_changed_context_file_or_arg_misses_the_cache(
    store: ImageStore, busybox_image: str, builds: Path, tmp_path: Path
) -> None:
    context = context_with(
        tmp_path,
        f"FROM {busybox_image}\nARG WHO=nobody\nCOPY data.txt /data.txt\nRUN echo $WHO >> /data.txt\n",
        {"data.txt": "one\n"},
    )
    spec = BuildSpec(context, context / "Dockerfile")
    first = await builder.build(store, builds, spec)

    (context / "data.txt").write_text("two\n")
    changed_file = await builder.build(store, builds, spec)
    changed_arg = await builder.build(store, builds, BuildSpec(context, context / "Dockerfile", args={"WHO": "me"}))
    os.chmod(context / "data.txt", 0o600)
    changed_mode = await builder.build(store, builds, spec)

    assert not changed_file.cached and not changed_arg.cached and not changed_mode.cached
    # --no-cache rebuilds (and renames) what is in the cache.
    forced = BuildSpec(context, context / "Dockerfile", options=("--no-cache",))
    assert [(await builder.build(store, builds, forced)).cached for _ in range(2)] == [False, False]
    assert len({first.reference, changed_file.reference, changed_arg.reference, changed_mode.reference}) == 4
    assert await read_file(store, first.reference, "/data.txt") == "one\nnobody\n"
    assert await read_file(store, changed_file.reference, "/data.txt") == "two\nnobody\n"
    assert await read_file(store, changed_arg.reference, "/data.txt") == "two\nme\n"


async def test_a_failing_run_reports_its_step_and_output_and_leaves_nothing(
    store: ImageStore, busybox_image: str, builds: Path, tmp_path: Path
) -> None:
    context = context_with(
        tmp_path, f"FROM {busybox_image}\nRUN echo fine\nRUN echo 'about to fail' && exit 3\nRUN echo never\n"
    )
    lines: list[str] = []

    with pytest.raises(BuildFailed) as raised:
        await builder.build(store, builds, BuildSpec(context, context / "Dockerfile"), output=lines.append)

    message = str(raised.value)
    assert "STEP 3/4: RUN echo 'about to fail' && exit 3" in message
    assert "about to fail" in raised.value.output
    assert "RUN echo 'about to fail'" in raised.value.step
    assert "about to fail" in lines
    assert not any("never" in line for line in lines)
    assert build_names(store) == []


async def test_from_an_image_only_the_store_has(store: ImageStore, builds: Path, tmp_path: Path) -> None:
    layout = images_support.busybox_layout(tmp_path / "layout")
    await store.import_archive(layout, "devyard.local/test/busybox:1")
    context = tmp_path / "context"
    context.mkdir()
    dockerfile = tmp_path / "elsewhere" / "Dockerfile"  # outside the context
    dockerfile.parent.mkdir()
    dockerfile.write_text("FROM devyard.local/test/busybox:1\nRUN echo from the store > /origin\n")

    built = await builder.build(store, builds, BuildSpec(context, dockerfile))

    assert await read_file(store, built.reference, "/origin") == "from the store\n"


async def test_concurrent_builds_of_one_key_run_buildah_once(
    store: ImageStore, busybox_image: str, builds: Path, tmp_path: Path
) -> None:
    context = context_with(tmp_path, f"FROM {busybox_image}\nRUN echo once > /once\n")
    spec = BuildSpec(context, context / "Dockerfile")
    outputs: list[list[str]] = [[], []]

    results = await asyncio.gather(*(builder.build(store, builds, spec, output=out.append) for out in outputs))

    assert sorted(result.cached for result in results) == [False, True]
    assert results[0].reference == results[1].reference
    assert sum(1 for out in outputs for line in out if "RUN echo once" in line) == 1


async def test_a_cancelled_build_leaves_nothing_and_the_next_one_starts_clean(
    store: ImageStore, busybox_image: str, builds: Path, tmp_path: Path
) -> None:
    context = context_with(tmp_path, f"FROM {busybox_image}\nRUN echo started && sleep 600\n")
    spec = BuildSpec(context, context / "Dockerfile")
    started = asyncio.Event()

    def watch(line: str) -> None:
        if line == "started":
            started.set()

    task = asyncio.ensure_future(builder.build(store, builds, spec, output=watch))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    assert build_names(store) == []
    assert not any((builds / "work").iterdir())


async def test_refused_options_and_a_missing_buildah_are_clear_errors(
    store: ImageStore, busybox_image: str, builds: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    context = context_with(tmp_path, f"FROM {busybox_image}\n")
    with pytest.raises(PermanentError, match=r"--network=host.*refused.*runner host's own services"):
        await builder.build(store, builds, BuildSpec(context, context / "Dockerfile", options=("--network=host",)))
    with pytest.raises(PermanentError, match="FROM names no image"):
        await builder.build(store, builds, BuildSpec(context_with(tmp_path, "FROM\n"), context / "Dockerfile"))
    context_with(tmp_path, "FROM devyard.local/test/missing:1\n")
    with pytest.raises(PermanentError, match=re.escape("devyard.local/test/missing:1 (line 1), which is not in")):
        await builder.build(store, builds, BuildSpec(context, context / "Dockerfile"))
    monkeypatch.setenv("PATH", str(tmp_path / "no-programs"))
    with pytest.raises(PermanentError, match="Debian package buildah"):
        await builder.build(store, builds, BuildSpec(context_with(tmp_path, "FROM scratch\n"), context / "Dockerfile"))


async def test_cached_answers_none_before_a_build_and_with_no_cache_and_the_built_image_after_one(
    store: ImageStore, busybox_image: str, builds: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    context = context_with(tmp_path, f"FROM {busybox_image}\nRUN echo cached > /cached\n")
    spec = BuildSpec(context, context / "Dockerfile")
    forced = BuildSpec(context, context / "Dockerfile", options=("--no-cache",))
    assert await builder.cached(store, spec) is None

    built = await builder.build(store, builds, spec)
    # From here on no program can run: cached only looks the key up.
    monkeypatch.setenv("PATH", str(tmp_path / "no-programs"))

    assert await builder.cached(store, spec) == Built(built.reference, built.digest, cached=True)
    assert await builder.cached(store, forced) is None
    assert build_names(store) == [built.reference]


async def test_stages_appended_to_a_dockerfile_read_a_named_context_in_one_build(
    store: ImageStore, busybox_image: str, builds: Path, tmp_path: Path
) -> None:
    """What the dev container's build does with Features: the Dockerfile's target stage named, stages after it
    that copy from a named context, one build; the named context's files are part of the cache key."""
    context = context_with(
        tmp_path,
        f"FROM {busybox_image}\nCOPY data.txt /data.txt\nFROM {busybox_image}\nRUN echo last > /last\n",
        {"data.txt": "from the context\n"},
    )
    text, stage = builder.named_target((context / "Dockerfile").read_text(), "", dockerfile=context / "Dockerfile")
    assert stage == builder.TARGET_STAGE
    assert builder.named_target(text, "", dockerfile=context / "Dockerfile") == (text, stage)
    first_stage = builder.named_target("FROM x AS base\nFROM base\n", "BASE", dockerfile=context / "Dockerfile")
    assert first_stage[1] == "BASE"
    with pytest.raises(PermanentError, match=r"Dockerfile: the build target 'nothing' is none of its stages"):
        builder.named_target(text, "nothing", dockerfile=context / "Dockerfile")
    extra = tmp_path / "extra"
    extra.mkdir()
    (extra / "added.txt").write_text("from the named context\n")
    combined = tmp_path / "combined" / "Dockerfile"
    combined.parent.mkdir()
    combined.write_text(f"{text}FROM {stage} AS appended\nCOPY --from=extras added.txt /added.txt\n")
    spec = BuildSpec(context, combined, contexts={"extras": extra})

    built = await builder.build(store, builds, spec)

    assert await read_file(store, built.reference, "/added.txt") == "from the named context\n"
    assert await read_file(store, built.reference, "/last") == "last\n"
    assert await read_file(store, built.reference, "/data.txt") is None  # the first stage is not the target
    assert (await builder.build(store, builds, spec)).cached
    (extra / "added.txt").write_text("changed\n")
    assert await builder.cached(store, spec) is None


async def test_the_store_has_the_base_and_shares_its_layer_with_the_build(
    store: ImageStore, busybox_image: str, builds: Path, tmp_path: Path
) -> None:
    """The store pulls a remote base while buildah does: the built image's base layer is the base's own
    directory (unpacked once), and the base stays in the store under its digest."""
    context = context_with(tmp_path, f"FROM {busybox_image}\nRUN echo shared > /shared\n")
    lines: list[str] = []

    built = await builder.build(store, builds, BuildSpec(context, context / "Dockerfile"), output=lines.append)

    (base,) = [image for image in store.images() if any("@sha256:" in name for name in image.references)]
    assert base.references[0].startswith(busybox_image.rsplit(":", 1)[0] + "@sha256:")
    base_layers = (await store.prepare(base.references[0], holder="test-base")).image.layers
    built_layers = (await store.prepare(built.reference, holder="test-built")).image.layers
    assert built_layers[: len(base_layers)] == base_layers
    assert len(list(store.layers.iterdir())) == len(built_layers)  # nothing unpacked twice
    assert any(line.startswith("the image store imported the image") for line in lines)


async def test_a_finished_builds_directory_goes_in_the_background_and_a_crashs_leftovers_with_the_next_build(
    store: ImageStore, busybox_image: str, builds: Path, tmp_path: Path
) -> None:
    leftover = builds / "retired" / "killed-runner"
    (leftover / "root").mkdir(parents=True)
    (leftover / "root" / "file").write_text("left by a runner killed while removing it")
    context = context_with(tmp_path, f"FROM {busybox_image}\nRUN echo retired > /retired\n")

    built = await builder.build(store, builds, BuildSpec(context, context / "Dockerfile"))

    assert await read_file(store, built.reference, "/retired") == "retired\n"
    assert not leftover.exists()
    for _ in range(600):
        if not any((builds / "retired").iterdir()):
            break
        await asyncio.sleep(0.05)
    assert list((builds / "retired").iterdir()) == []


async def test_a_handed_over_layout_is_linked_into_the_store_and_known_blobs_are_not_read(
    store: ImageStore, tmp_path: Path
) -> None:
    """How the builder's result is imported (``hand_over``): its files become the store's blobs without a copy;
    a plain import copies; a blob the store has is never read again (here: made unreadable)."""
    handed = images_support.busybox_layout(tmp_path / "handed")
    copied = images_support.busybox_layout(tmp_path / "copied")
    layer = max((handed / "blobs" / "sha256").iterdir(), key=lambda path: path.stat().st_size)

    await store.import_archive(copied, "devyard.local/test/copied:1")
    assert (store.blobs / layer.name).stat().st_ino != (copied / "blobs" / "sha256" / layer.name).stat().st_ino
    (store.blobs / layer.name).unlink()  # so that the hand-over below brings it again
    await store.import_archive(handed, "devyard.local/test/handed:1", hand_over=True)
    assert (store.blobs / layer.name).stat().st_ino == layer.stat().st_ino

    again = images_support.busybox_layout(tmp_path / "again")
    (again / "blobs" / "sha256" / layer.name).write_bytes(b"not read")
    image = await store.import_archive(again, "devyard.local/test/again:1")
    assert image.digest == store.lookup("devyard.local/test/handed:1")


def test_the_key_follows_dockerignore_exceptions_and_the_options(tmp_path: Path) -> None:
    context = context_with(tmp_path, "FROM scratch\n", {"logs/a.log": "a", "logs/keep.log": "k", "src/x.py": "x"})
    (context / ".dockerignore").write_text("# logs\nlogs/*.log\n!logs/keep.log\n**/*.tmp\n")

    def key(options: tuple[str, ...] = ()) -> str:
        spec = BuildSpec(context, context / "Dockerfile", options=options)
        return builder.cache_key(spec, "FROM scratch\n", builder._context_digest(context), {})

    before = key()
    (context / "logs" / "a.log").write_text("changed")
    (context / "src" / "deep.tmp").write_text("t")
    assert key() == before
    (context / "logs" / "keep.log").write_text("changed")
    assert key() != before
    assert key(("--no-cache",)) != key()


_CHILD = """
import asyncio, sys
from pathlib import Path
from devyard.runner.images.builder import BuildSpec, build
from devyard.runner.images.image import IdRange
from devyard.runner.images.store import ImageStore
from devyard.runner.linux import cgroups

async def main() -> None:
    store_root, registry, context, builds = sys.argv[1:]
    store = ImageStore(Path(store_root), id_range=IdRange({start}, {size}), insecure={{registry}})
    spec = BuildSpec(Path(context), Path(context) / "Dockerfile")
    await build(store, Path(builds), spec, output=lambda line: print(line, flush=True))

asyncio.run(main())
"""


def processes_running(argv: bytes) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "cmdline").read_bytes() == argv:
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


async def test_a_killed_runner_leaves_no_processes_and_the_next_build_of_the_key_starts_clean(
    store: ImageStore, registry: RegistryServer, busybox_image: str, builds: Path, tmp_path: Path
) -> None:
    # 631: a sleep no other test runs, so that a survivor of the kill is recognisable.
    context = context_with(tmp_path, f"FROM {busybox_image}\nRUN echo started && sleep 631\n")
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _CHILD.format(start=ID_RANGE.start, size=ID_RANGE.size),
        str(store.root),
        registry.host,
        str(context),
        str(builds),
        stdout=asyncio.subprocess.PIPE,
    )
    assert child.stdout is not None
    async for line in child.stdout:
        if line.strip() == b"started":
            break
    child.kill()
    await child.wait()
    (work,) = (builds / "work").iterdir()  # what the kill left
    (work / "left-by-the-killed-build").write_text("")

    async with asyncio.timeout(60):  # the RUN step would live for 631 s if the kill did not reach it
        while processes_running(b"sleep\x00631\x00"):  # noqa: ASYNC110 (nothing to wait on but /proc)
            await asyncio.sleep(0.1)

    seen: list[str] = []
    started = asyncio.Event()

    def watch(line: str) -> None:
        seen.append(line)
        if line == "started":
            started.set()

    again = asyncio.ensure_future(
        builder.build(store, builds, BuildSpec(context, context / "Dockerfile"), output=watch)
    )
    await started.wait()
    assert not (work / "left-by-the-killed-build").exists()
    assert (work / "root").is_dir()
    again.cancel()
    with pytest.raises(asyncio.CancelledError):
        await again
    assert build_names(store) == []
    # Neither build left a control group (runc had no chance to remove them).
    relative = builder._cgroup_parent(work).lstrip("/")
    assert [hierarchy for hierarchy in cgroups.hierarchies() if (hierarchy / relative).exists()] == []


async def test_a_base_image_behind_a_password_is_pulled_with_the_given_credentials(
    basic_registry: RegistryServer, basic_image: str, builds: Path, tmp_path: Path
) -> None:
    host.require()
    store = ImageStore(tmp_path / "store", id_range=ID_RANGE, insecure={basic_registry.host})
    try:
        context = context_with(tmp_path, f"FROM {basic_image}\nRUN echo private > /origin\n")
        spec = BuildSpec(context, context / "Dockerfile")
        with pytest.raises(PermanentError):
            await builder.build(store, builds, spec, credentials={basic_registry.host: ("alice", "wrong")})

        authfiles_during_steps: list[list[Path]] = []

        def watch(line: str) -> None:
            if "STEP" in line:
                authfiles_during_steps.append(list(builds.rglob("auth.json")))

        alice = {basic_registry.host: ("alice", USERS["alice"])}
        built = await builder.build(store, builds, spec, credentials=alice, output=watch)

        assert await read_file(store, built.reference, "/origin") == "private\n"
        # The password was on disk only while the base image was pulled, not while the Dockerfile's steps ran.
        assert authfiles_during_steps and all(found == [] for found in authfiles_during_steps)
    finally:
        store.close()


@pytest.fixture
def network_namespace(tmp_path: Path) -> Iterator[Path]:
    """A network namespace made for a build (the runner attaches one like an environment's), here holding only a
    veth pair, bind-mounted at a file."""
    namespace = tmp_path / "netns"
    namespace.touch()
    subprocess.run(["unshare", f"--net={namespace}", "true"], check=True)
    try:
        link = ["ip", "link", "add", "devyardtest0", "type", "veth", "peer", "name", "devyardtest1"]
        subprocess.run(["nsenter", f"--net={namespace}", *link], check=True)
        yield namespace
    finally:
        subprocess.run(["umount", str(namespace)], check=True)


async def test_run_steps_have_no_network_unless_given_a_namespace_to_join(
    store: ImageStore, busybox_image: str, builds: Path, tmp_path: Path, network_namespace: Path
) -> None:
    context = context_with(tmp_path, f"FROM {busybox_image}\nRUN cat /proc/net/dev > /interfaces\n")
    alone = await builder.build(store, builds, BuildSpec(context, context / "Dockerfile"))
    interfaces = await read_file(store, alone.reference, "/interfaces")
    assert interfaces is not None and "lo:" in interfaces
    assert [line for line in interfaces.splitlines() if ":" in line and "lo:" not in line] == []

    # The namespace is not part of the cache key: an arg makes this a build of its own.
    spec = BuildSpec(context, context / "Dockerfile", args={"X": "1"})
    joined = await builder.build(store, builds, spec, network_namespace=network_namespace)
    assert "devyardtest0:" in (await read_file(store, joined.reference, "/interfaces") or "")
