"""Dev container images built from a Dockerfile with buildah, and kept in the runner's image store.

Called by the runner when a devcontainer.json says ``build`` instead of ``image``, and to install Features (a
small Dockerfile on top of an image, or their stages appended to the user's Dockerfile, whose target stage
``named_target`` names, reading their files from a named context: one build for both):
``build(store, builds_root(state_dir), BuildSpec(...))`` returns ``Built``, the stored image's reference
(``devyard.local/build:<cache key>``) and whether the cache had it (``cached`` answers that alone, without
building). The linux runtime then starts it like any other image of the store; its name keeps it from garbage
collection until someone removes it. It is under ``devyard.local`` so that the store never tries to pull it from
a registry.

The cache key hashes everything the result depends on: the Dockerfile, the context's files (names, types, modes,
contents, symlink targets; without what ``.containerignore`` or ``.dockerignore`` leaves out), the build args, the
target, the options and the digests the base images resolve to now. A build whose key is in the store does not
run buildah.

Layout under ``root`` (``<state_dir>/builds``)::

    locks/<key>    flock: one build of a key at a time, across coroutines and processes; the second finds the
                   first one's image in the store
    retired/       finished builds' directories, removed in the background (a crash's leftovers by the next build)
    work/<key>/    one build: buildah's storage (root, runroot), its TMPDIR, a private registries.conf (the
                   runner's insecure registries, plain http only for those), policy.json, storage.conf, the
                   authfile (while the base images are pulled, then removed), the base images handed over from
                   the store (OCI layouts) and the result (``pushed``: uncompressed, as buildah writes a dir:
                   destination; ``result``: the same blobs moved into an OCI layout, handed over to the store)

buildah's storage is never /var/lib/containers, the host's /etc/containers settings do not apply, and no build
shares another's storage (so buildah fetches base images again for each build that misses the cache). While
buildah pulls a remote base, the store pulls it too (kept under its pinned name, as an environment's image): a
cold build's result then arrives with its base layers unpacked already, so the Debian root of a dev container
is written twice (buildah's storage, the store) rather than once more for each hand-over. One thing
buildah's command line cannot move: containers/image keeps a small cache of blob digests in
/var/lib/containers/cache as root.

buildah runs as PID 1 of its own PID and mount namespaces, its RUN steps in a control group per build directory:
when it dies (the runner was killed, or the build cancelled) its processes and mounts go with it, and the next
build of the key removes the control groups and the ``work/<key>`` directory it left. The store gets the image
only once the build has fully succeeded.

Base images are pinned: each ``FROM`` (and ``COPY --from=IMAGE``) is resolved to a digest (at its registry, or
in the store for ``devyard.local/...``, which ``prepare`` bootstraps when it can), buildah pulls exactly that
digest (or reads the store's OCI layout) and tags it with the name the Dockerfile uses, and the build itself runs
with ``--pull=never``. ``RUN`` steps have no network unless the caller gives a network namespace to join (made
for the build like an environment's, with the same isolation); the host's network is never offered.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shlex
import shutil
import signal
import stat
import time
import uuid
from collections.abc import AsyncIterator, Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from devyard.runner.errors import PermanentError, RunnerError, TemporaryError
from devyard.runner.images.reference import LOCAL_REGISTRY, InvalidReference, Reference, parse_reference
from devyard.runner.images.registry import Credentials, RegistryClient
from devyard.runner.images.store import ImageStore, bootstrappable
from devyard.runner.linux import cgroups

__all__ = [
    "ACCEPTED_OPTIONS",
    "BUILD_REPOSITORY",
    "TARGET_STAGE",
    "BuildFailed",
    "BuildSpec",
    "Built",
    "OutputCallback",
    "build",
    "builds_root",
    "cache_key",
    "cached",
    "named_target",
]

#: Where built images are named: ``devyard.local/build:<cache key>``.
BUILD_REPOSITORY = f"{LOCAL_REGISTRY}/build"
#: The name ``named_target`` gives the stage a Dockerfile builds when that stage has none.
TARGET_STAGE = "devyard_dockerfile_target"
#: The ``build.options`` of devcontainer.json that a build accepts; anything else is refused.
ACCEPTED_OPTIONS = (
    "--no-cache",
    "--pull[=always|true|missing|false]",
    "--label K=V",
    "--build-arg K=V",
    "--network=none|default|bridge|private",
    "--progress=...",
    "--rm",
    "--force-rm",
)
_KEY_FORMAT = 1
_TAIL_LINES = 30
_STEP = re.compile(r"^(?:\[\d+/\d+\] )?STEP \d+/\d+: ")
_STOP_GRACE = 10.0
_LOCK_POLL = 0.1
_CGROUP_PARENT = "devyard-builds"
#: Environment variables by which the host's settings would reach buildah; a build uses only its own.
_FOREIGN_SETTINGS = ("BUILDAH_", "CONTAINERS_", "REGISTRY_AUTH_FILE", "DOCKER_CONFIG", "STORAGE_")
_REFUSED_REASONS = {
    "--network": "the host's network would let the build reach the runner host's own services",
    "--security-opt": "the build's confinement is the runner's to choose",
    "--isolation": "the build's confinement is the runner's to choose",
    "--privileged": "the build's confinement is the runner's to choose",
    "--cap-add": "the build's confinement is the runner's to choose",
    "--device": "builds get no host devices",
    "--volume": "builds get no host directories",
    "-v": "builds get no host directories",
    "--secret": "builds get no host files",
    "--ssh": "builds get no host ssh agent",
    "--add-host": "name resolution of a build is the runner's",
    "--platform": "a runner builds for its own platform",
}

log = logging.getLogger(__name__)

#: Receives every line of buildah's output as it comes (the environment's build log).
OutputCallback = Callable[[str], None]


class BuildFailed(PermanentError):
    """buildah failed: ``step`` is the Dockerfile step it was at (``""`` before the first), ``output`` its last
    lines."""

    def __init__(self, message: str, *, step: str, output: Sequence[str]) -> None:
        super().__init__(message)
        self.step = step
        self.output = tuple(output)


@dataclass(frozen=True)
class BuildSpec:
    """What to build: devcontainer.json's ``build`` (paths resolved by the caller)."""

    #: The build context: a directory whose files COPY and ADD see.
    context: Path
    #: The Dockerfile, inside the context or not.
    dockerfile: Path
    args: Mapping[str, str] = field(default_factory=dict)
    #: The stage to build; empty: the last.
    target: str = ""
    #: ``build.options``: only ``ACCEPTED_OPTIONS`` pass.
    options: tuple[str, ...] = ()
    #: Named contexts besides ``context`` (buildah's ``--build-context NAME=DIR``), which the Dockerfile reads
    #: with ``COPY --from=NAME``: the Features' files, for a Dockerfile with Feature stages appended.
    contexts: Mapping[str, Path] = field(default_factory=dict)


@dataclass(frozen=True)
class Built:
    """The built image: its reference in the store (what ``prepare`` takes), its digest, and whether the cache
    had it (no buildah ran)."""

    reference: str
    digest: str
    cached: bool


@dataclass(frozen=True)
class _Options:
    """``build.options`` sorted out: what buildah gets, and what the builder itself does."""

    labels: tuple[str, ...] = ()
    build_args: tuple[tuple[str, str], ...] = ()
    no_cache: bool = False
    no_network: bool = False


@dataclass(frozen=True)
class _Base:
    """A base image the Dockerfile names, where it is named, and the digest it resolves to now."""

    reference: Reference
    line: int
    digest: str = ""


def builds_root(state_dir: Path) -> Path:
    """Where the builds of the runner whose state directory is ``state_dir`` work."""
    return state_dir / "builds"


# --- options and the Dockerfile ----------------------------------------------------------------------------------


def _parse_options(options: Sequence[str]) -> _Options:
    labels: list[str] = []
    build_args: list[tuple[str, str]] = []
    no_cache = no_network = False
    remaining = list(options)
    while remaining:
        option = remaining.pop(0)
        name, equals, value = option.partition("=")
        has_value = bool(equals)
        if name in ("--label", "--build-arg") and not has_value:
            if not remaining:
                raise PermanentError(f"the build option {name} needs a value (K=V)")
            value, has_value = remaining.pop(0), True
        if name == "--no-cache" and not has_value:
            no_cache = True
        elif name == "--pull" and value in ("", "always", "true", "missing", "false"):
            pass  # base images are resolved at their registry for every build anyway
        elif name in ("--rm", "--force-rm", "--progress"):
            pass  # a build's containers are always removed; the output is always plain lines
        elif name == "--label" and "=" in value:
            labels.append(value)
        elif name == "--build-arg" and value:
            key, _, argument = value.partition("=")
            build_args.append((key, argument))
        elif name == "--network" and value in ("none", "default", "bridge", "private"):
            no_network = value == "none"
        else:
            reason = _REFUSED_REASONS.get(name, "it is not one a runner passes on")
            raise PermanentError(
                f"the build option {option!r} is refused ({reason}); accepted: {', '.join(ACCEPTED_OPTIONS)}"
            )
    return _Options(tuple(labels), tuple(build_args), no_cache, no_network)


def _instructions(text: str) -> Iterator[tuple[int, int, str]]:
    """The Dockerfile's instructions with their first and last line numbers: continuations joined, comments
    dropped."""
    lines = text.splitlines()
    escape = "\\"
    for line in lines:
        directive = re.match(r"#\s*([A-Za-z]+)\s*=\s*(\S+)\s*$", line)
        if directive is None:
            break
        if directive.group(1).lower() == "escape":
            escape = directive.group(2)
    pending: list[str] = []
    start = 0
    for number, line in enumerate(lines, 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if not pending:
            start = number
        if stripped.endswith(escape):
            pending.append(stripped[: -len(escape)])
            continue
        pending.append(stripped)
        yield start, number, " ".join(pending)
        pending = []
    if pending:
        yield start, len(lines), " ".join(pending)


_VARIABLE = re.compile(r"\$(?:\{(\w+)(?::([-+])([^}]*))?\}|(\w+))")


def _substitute(text: str, values: Mapping[str, str]) -> str:
    def replace(match: re.Match[str]) -> str:
        value = values.get(match.group(1) or match.group(4) or "", "")
        if match.group(2) == "-":
            return value or match.group(3)
        if match.group(2) == "+":
            return match.group(3) if value else ""
        return value

    return _VARIABLE.sub(replace, text)


def _base_images(text: str, args: Mapping[str, str], dockerfile: Path, contexts: Collection[str] = ()) -> list[_Base]:
    """The images the Dockerfile starts from or copies from (not its own stages, not its named ``contexts``, not
    ``scratch``)."""
    global_args: dict[str, str] = {}
    stages: set[str] = {name.lower() for name in contexts}
    bases: list[_Base] = []
    seen_from = False

    def add(image: str, line: int) -> None:
        if image.lower() in stages or image == "scratch" or image.isdigit():
            return
        try:
            reference = parse_reference(image)
        except InvalidReference as exc:
            raise PermanentError(f"{dockerfile}, line {line}: {exc}") from exc
        if all(base.reference != reference for base in bases):
            bases.append(_Base(reference, line))

    for line, _, instruction in _instructions(text):
        keyword, _, rest = instruction.partition(" ")
        keyword = keyword.upper()
        if keyword == "ARG" and not seen_from:
            try:
                items = shlex.split(rest)
            except ValueError as exc:
                raise PermanentError(f"{dockerfile}, line {line}: ARG {rest!r}: {exc}") from exc
            for item in items:
                name, has_default, default = item.partition("=")
                if name in args:
                    global_args[name] = args[name]
                elif has_default:
                    global_args[name] = _substitute(default, global_args)
        elif keyword == "FROM":
            seen_from = True
            words = [word for word in rest.split() if not word.startswith("--")]
            if not words:
                raise PermanentError(f"{dockerfile}, line {line}: FROM names no image")
            add(_substitute(words[0], global_args), line)
            if len(words) >= 3 and words[1].lower() == "as":
                stages.add(words[2].lower())
        elif keyword in ("COPY", "ADD"):
            for word in rest.split():
                if word.startswith("--from="):
                    add(_substitute(word.removeprefix("--from="), global_args), line)
    return bases


def named_target(text: str, target: str, *, dockerfile: Path) -> tuple[str, str]:
    """``text`` (the Dockerfile at ``dockerfile``) with the stage it builds named, and that name: the stage
    ``target``, else the last one, named ``TARGET_STAGE`` when it has no name. For stages appended after the
    Dockerfile's own, as the dev container's build appends its Features'. Raises ``PermanentError`` when
    ``target`` names no stage."""
    stages: list[tuple[int, str]] = []  # (last line of the FROM instruction, its stage name or "")
    for _, last, instruction in _instructions(text):
        keyword, _, rest = instruction.partition(" ")
        if keyword.upper() == "FROM":
            words = [word for word in rest.split() if not word.startswith("--")]
            stages.append((last, words[2] if len(words) >= 3 and words[1].lower() == "as" else ""))
    if not stages:
        raise PermanentError(f"{dockerfile}: the Dockerfile has no FROM")
    if target:
        if all(name.lower() != target.lower() for _, name in stages):
            raise PermanentError(f"{dockerfile}: the build target {target!r} is none of its stages")
        return text, target
    last, name = stages[-1]
    if name:
        return text, name
    lines = text.splitlines()
    lines[last - 1] = f"{lines[last - 1].rstrip()} AS {TARGET_STAGE}"
    return "\n".join(lines) + "\n", TARGET_STAGE


# --- the context -------------------------------------------------------------------------------------------------


def _translate(pattern: str) -> str:
    """A ``.dockerignore`` pattern (Go's filepath.Match, plus ``**``) as a regular expression."""
    out: list[str] = []
    index = 0
    while index < len(pattern):
        char = pattern[index]
        if pattern.startswith("**", index):
            index += 2
            if pattern.startswith("/", index):
                index += 1
                out.append("(?:.*/)?")
            else:
                out.append(".*")
            continue
        if char == "*":
            out.append("[^/]*")
        elif char == "?":
            out.append("[^/]")
        elif char == "[" and "]" in pattern[index + 2 :]:
            end = pattern.index("]", index + 2)
            body = pattern[index + 1 : end]
            if body.startswith(("^", "!")):
                body = "^" + body[1:]
            out.append("[" + body.replace("\\", "\\\\") + "]")
            index = end + 1
            continue
        elif char == "\\" and index + 1 < len(pattern):
            index += 1
            out.append(re.escape(pattern[index]))
        else:
            out.append(re.escape(char))
        index += 1
    return "".join(out) + r"\Z"


def _ignore_patterns(context: Path) -> list[tuple[bool, re.Pattern[str]]]:
    """(exception, pattern) of the context's ``.containerignore`` or else ``.dockerignore``, as buildah reads
    them."""
    for name in (".containerignore", ".dockerignore"):
        path = context / name
        if path.is_file():
            text = path.read_text(errors="replace")
            break
    else:
        return []
    patterns = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        exception = line.startswith("!")
        cleaned = os.path.normpath(line.removeprefix("!").strip()).lstrip("/")
        if cleaned in ("", "."):
            continue
        patterns.append((exception, re.compile(_translate(cleaned))))
    return patterns


def _excluded(relative: str, patterns: Sequence[tuple[bool, re.Pattern[str]]]) -> bool:
    """Whether the last pattern that matches the path or one of its parents excludes it."""
    parts = relative.split("/")
    candidates = [relative, *("/".join(parts[:count]) for count in range(1, len(parts)))]
    excluded = False
    for exception, pattern in patterns:
        if any(pattern.match(candidate) for candidate in candidates):
            excluded = not exception
    return excluded


def _context_digest(context: Path) -> str:
    """A hash of the context's files that the build sees."""
    patterns = _ignore_patterns(context)
    prune = not any(exception for exception, _ in patterns)
    hasher = hashlib.sha256()

    def walk(directory: Path, prefix: str) -> None:
        with os.scandir(directory) as scan:
            entries = sorted(scan, key=lambda entry: entry.name)
        for entry in entries:
            relative = prefix + entry.name
            excluded = _excluded(relative, patterns)
            info = entry.stat(follow_symlinks=False)
            if not excluded:
                hasher.update(f"{relative}\0{stat.S_IFMT(info.st_mode)}\0{stat.S_IMODE(info.st_mode)}\0".encode())
                if stat.S_ISLNK(info.st_mode):
                    hasher.update(os.readlink(entry.path).encode() + b"\0")
                elif stat.S_ISREG(info.st_mode):
                    hasher.update(_file_digest(Path(entry.path)) + b"\0")
            if stat.S_ISDIR(info.st_mode) and not (excluded and prune):
                walk(Path(entry.path), relative + "/")

    try:
        walk(context, "")
    except OSError as exc:
        raise PermanentError(f"the build context {context} cannot be read: {exc}") from exc
    return hasher.hexdigest()


def _file_digest(path: Path) -> bytes:
    hasher = hashlib.sha256()
    with path.open("rb") as reader:
        while chunk := reader.read(1 << 20):
            hasher.update(chunk)
    return hasher.digest()


def cache_key(
    spec: BuildSpec,
    dockerfile_text: str,
    context_digest: str,
    bases: Mapping[str, str],
    contexts: Mapping[str, str] | None = None,
) -> str:
    """The cache key of a build: ``bases`` maps each base image's reference to its digest, ``contexts`` each
    named context to the digest of its files."""
    document: dict[str, object] = {
        "format": _KEY_FORMAT,
        "dockerfile": hashlib.sha256(dockerfile_text.encode()).hexdigest(),
        "context": context_digest,
        "args": sorted(spec.args.items()),
        "target": spec.target,
        "options": list(spec.options),
        "bases": sorted(bases.items()),
    }
    if contexts:  # absent rather than empty, so that the keys of builds without them stay what they were
        document["contexts"] = sorted(contexts.items())
    return hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()


# --- base images -------------------------------------------------------------------------------------------------


async def _resolve(store: ImageStore, bases: Sequence[_Base], credentials: Credentials) -> list[_Base]:
    resolved: list[_Base] = []
    remote = [base for base in bases if not base.reference.is_local]
    if remote:
        async with RegistryClient(insecure=store.insecure, credentials=credentials) as client:
            for base in remote:
                manifest = await client.resolve(base.reference)
                resolved.append(_Base(base.reference, base.line, manifest.digest))
    for base in bases:
        if not base.reference.is_local:
            continue
        name = str(base.reference)
        digest = store.lookup(name)
        if digest is None and bootstrappable(base.reference):
            holder = f"build-{uuid.uuid4().hex}"
            digest = (await store.prepare(name, holder=holder)).image.digest
            await store.release(holder)
        if digest is None:
            raise PermanentError(
                f"the Dockerfile starts from {name} (line {base.line}), which is not in this runner's image "
                f"store: images under {LOCAL_REGISTRY} come only from `devyard image import` or bootstrap"
            )
        resolved.append(_Base(base.reference, base.line, digest))
    return sorted(resolved, key=lambda base: base.line)


# --- running buildah ---------------------------------------------------------------------------------------------


def _filesystem_type(path: Path) -> str:
    """The type of the file system ``path`` is on (the deepest mount that holds it)."""
    best, kind = Path("/"), ""
    with open("/proc/self/mountinfo") as mountinfo:
        for line in mountinfo:
            fields = line.split(" ")
            point = Path(fields[4])
            if (point == path or point in path.parents) and len(point.parts) >= len(best.parts):
                best, kind = point, fields[fields.index("-") + 1]
    return kind


@dataclass
class _Run:
    """One build's directory and the buildah command line that uses it."""

    work: Path
    output: OutputCallback | None
    tail: collections.deque[str] = field(default_factory=lambda: collections.deque(maxlen=_TAIL_LINES))
    step: str = ""
    driver: str = "overlay"

    @property
    def policy(self) -> Path:
        return self.work / "policy.json"

    @property
    def authfile(self) -> Path:
        return self.work / "auth.json"

    def prepare(self, insecure: Sequence[str], credentials: Credentials, registries: set[str]) -> None:
        for directory in ("root", "run", "tmp", "bases"):
            (self.work / directory).mkdir(parents=True, mode=0o700)
        # Nested overlayfs does not work: on an overlay (a container's root) buildah stores copies instead.
        driver = "vfs" if _filesystem_type(self.work) == "overlay" else "overlay"
        (self.work / "storage.conf").write_text(
            f'[storage]\ndriver = "{driver}"\ngraphroot = "{self.work / "root"}"\nrunroot = "{self.work / "run"}"\n'
        )
        entries = "".join(f'[[registry]]\nlocation = "{host}"\ninsecure = true\n' for host in sorted(insecure))
        (self.work / "registries.conf").write_text(
            f'unqualified-search-registries = ["docker.io"]\nshort-name-mode = "permissive"\n{entries}'
        )
        self.policy.write_text('{"default": [{"type": "insecureAcceptAnything"}]}\n')
        (self.work / "containers.conf").write_text("")
        auths = {
            host: {"auth": base64.b64encode(f"{user}:{password}".encode()).decode()}
            for host, (user, password) in credentials.items()
            if host in registries
        }
        descriptor = os.open(self.authfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        with os.fdopen(descriptor, "w") as file:
            json.dump({"auths": auths}, file)
        self.driver = driver

    def note(self, line: str) -> None:
        """A line of the builder's own in the build's output (where the time went)."""
        if self.output is not None:
            self.output(line)

    def argv(self, *arguments: str) -> list[str]:
        work = self.work
        command = [
            "buildah",
            "--root",
            str(work / "root"),
            "--runroot",
            str(work / "run"),
            "--storage-driver",
            self.driver,
            "--registries-conf",
            str(work / "registries.conf"),
            *arguments,
        ]
        # buildah runs as PID 1 of its own PID namespace, so that when it dies everything it started (runc, the
        # RUN step's processes) dies with it, and in its own mount namespace, so that its mounts go too; and it
        # dies when the runner does (the parent-death signal of unshare, which then kills its child). A killed
        # runner thus leaves only files, which the next build of the key removes.
        return [
            "setpriv",
            "--pdeathsig",
            "KILL",
            "unshare",
            "--pid",
            "--mount",
            "--propagation",
            "private",
            "--mount-proc",
            "--kill-child=SIGKILL",
            *command,
        ]

    def environment(self) -> dict[str, str]:
        work = self.work
        return {
            **{name: value for name, value in os.environ.items() if not name.startswith(_FOREIGN_SETTINGS)},
            "TMPDIR": str(work / "tmp"),
            "CONTAINERS_STORAGE_CONF": str(work / "storage.conf"),
            "CONTAINERS_REGISTRIES_CONF": str(work / "registries.conf"),
            "CONTAINERS_CONF": str(work / "containers.conf"),
            "LC_ALL": "C",
        }

    async def run(self, *arguments: str, show: bool = True) -> tuple[int, list[str]]:
        """Run buildah; every line of its output goes to the callback (unless ``show`` is false) and to the
        tail. Returns its exit code and its standard output's lines."""
        process = await asyncio.create_subprocess_exec(
            *self.argv(*arguments),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=self.environment(),
            start_new_session=True,
            limit=1 << 20,
        )
        assert process.stdout is not None and process.stderr is not None
        lines: list[str] = []
        self.tail.clear()

        async def read(stream: asyncio.StreamReader, keep: bool) -> None:
            async for raw in stream:
                line = raw.decode(errors="replace").rstrip("\r\n")
                if keep:
                    lines.append(line)
                if _STEP.match(line):
                    self.step = line
                self.tail.append(line)
                if show and self.output is not None:
                    self.output(line)

        try:
            await asyncio.gather(read(process.stdout, True), read(process.stderr, False))
            return await process.wait(), lines
        except BaseException:
            await _stop(process)
            raise

    async def check(self, *arguments: str, what: str) -> list[str]:
        code, lines = await self.run(*arguments)
        if code != 0:
            raise TemporaryError(f"buildah could not {what} (exit code {code}): " + " | ".join(list(self.tail)[-5:]))
        return lines


async def _stop(process: asyncio.subprocess.Process) -> None:
    if process.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        await asyncio.wait_for(process.wait(), _STOP_GRACE)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        await process.wait()


def _cgroup_parent(work: Path) -> str:
    """The control group under which a build's RUN steps run: one per build directory (so per runner and key),
    absolute (see ``linux.cgroups``), so that what a killed build left can be found and removed."""
    return f"/{_CGROUP_PARENT}/{hashlib.sha256(str(work).encode()).hexdigest()[:24]}"


def _clear_cgroups(work: Path) -> None:
    relative = _cgroup_parent(work).lstrip("/")
    groups = [hierarchy / relative for hierarchy in cgroups.hierarchies() if (hierarchy / relative).is_dir()]
    for group in groups:
        cgroups.kill_cgroup(group)
    left = set(groups) - set(cgroups.remove_cgroup(groups))
    if left:
        log.warning("control groups of the build in %s still hold processes: %s", work, sorted(left))


async def _clear(work: Path) -> None:
    """Remove a build's control groups (with the processes a killed build left in them) and its directory.

    buildah's containers and mounts need no undoing: the containers are records in the build's own storage, and
    the mounts lived in buildah's mount namespace, which ended with it."""
    await asyncio.to_thread(_clear_cgroups, work)
    if not await asyncio.to_thread(os.path.lexists, work):
        return
    await asyncio.to_thread(shutil.rmtree, work, True)
    if await asyncio.to_thread(os.path.lexists, work):
        log.warning("could not remove all of the build directory %s", work)


#: Directories of finished builds being removed in the background, which a sweep leaves to their task.
_retiring: set[Path] = set()
_retiring_tasks: set[asyncio.Task[None]] = set()


async def _retire(work: Path, root: Path) -> None:
    """After a successful build: its control groups go now, its directory (buildah's copy of the base images,
    most of a second to remove) is renamed under ``retired/`` and removed in the background, so that the image
    is ready that much sooner. What a killed runner leaves there, the next build sweeps away."""
    await asyncio.to_thread(_clear_cgroups, work)
    retired = root / "retired" / f"{work.name}-{uuid.uuid4().hex[:8]}"
    try:
        retired.parent.mkdir(exist_ok=True)
        os.rename(work, retired)
    except OSError:
        await _clear(work)
        return
    _retiring.add(retired)

    async def remove() -> None:
        try:
            await asyncio.to_thread(shutil.rmtree, retired, True)
        finally:
            _retiring.discard(retired)

    task = asyncio.create_task(remove(), name=f"remove {retired}")
    _retiring_tasks.add(task)
    task.add_done_callback(_retiring_tasks.discard)


async def _sweep_retired(root: Path) -> None:
    """Remove what ``_retire`` left under ``retired/`` whose removal no task of this process runs (a killed
    runner's)."""
    directory = root / "retired"
    if not await asyncio.to_thread(directory.is_dir):
        return
    for entry in await asyncio.to_thread(lambda: list(directory.iterdir())):
        if entry not in _retiring:
            await asyncio.to_thread(shutil.rmtree, entry, True)


@contextlib.asynccontextmanager
async def _key_lock(path: Path) -> AsyncIterator[None]:
    """An flock on ``path``, polled so that waiting stays cancellable; two holders conflict even in one process
    (each opens its own file description), so concurrent builds of a key run one after the other."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        while True:
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                await asyncio.sleep(_LOCK_POLL)
        yield
    finally:
        os.close(descriptor)


# --- building ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Keyed:
    """A build's parsed options and arguments, its resolved base images, and its cache key."""

    options: _Options
    args: Mapping[str, str]
    bases: Sequence[_Base]
    credentials: Credentials
    key: str
    name: str


async def _keyed(store: ImageStore, spec: BuildSpec, credentials: Credentials | None) -> _Keyed:
    options = _parse_options(spec.options)
    args = {**dict(options.build_args), **spec.args}
    if not spec.context.is_dir():
        raise PermanentError(f"the build context {spec.context} is not a directory")
    try:
        dockerfile_text = spec.dockerfile.read_text()
    except OSError as exc:
        raise PermanentError(f"the Dockerfile {spec.dockerfile} cannot be read: {exc}") from exc
    for name, directory in spec.contexts.items():
        if not re.fullmatch(r"[a-z0-9][a-z0-9_.-]*", name) or not directory.is_dir():
            raise PermanentError(f"the named build context {name}={directory} is not a named directory")
    all_credentials: Credentials = {**store.credentials, **(credentials or {})}
    named = _base_images(dockerfile_text, args, spec.dockerfile, spec.contexts)
    bases = await _resolve(store, named, all_credentials)
    context_digest = await asyncio.to_thread(_context_digest, spec.context)
    contexts = {name: await asyncio.to_thread(_context_digest, directory) for name, directory in spec.contexts.items()}
    key = cache_key(
        spec, dockerfile_text, context_digest, {str(base.reference): base.digest for base in bases}, contexts
    )
    return _Keyed(options, args, bases, all_credentials, key, f"{BUILD_REPOSITORY}:{key}")


async def cached(store: ImageStore, spec: BuildSpec, *, credentials: Credentials | None = None) -> Built | None:
    """What ``build`` would return without running buildah, or None when it would run it (the store has no
    image of the cache key, or the options say ``--no-cache``). For a caller that must prepare something for a
    real build only, such as a network namespace for its RUN steps. Raises what ``build`` raises before buildah."""
    keyed = await _keyed(store, spec, credentials)
    if keyed.options.no_cache or (digest := store.lookup(keyed.name)) is None:
        return None
    return Built(keyed.name, digest, cached=True)


async def build(
    store: ImageStore,
    root: Path,
    spec: BuildSpec,
    *,
    output: OutputCallback | None = None,
    credentials: Credentials | None = None,
    network_namespace: Path | None = None,
) -> Built:
    """Build ``spec`` with buildah (working under ``root``, see ``builds_root``) into ``store``, unless the store
    has the image of its cache key already (``--no-cache`` builds anyway and renames).

    ``credentials``: registry host -> (username, password), before the store's own. ``network_namespace``: a
    namespace for ``RUN`` steps to join (else they have no network). Raises ``BuildFailed`` (the step and the
    last lines of output), ``PermanentError`` (no buildah, a bad spec or option, a missing base image) or
    ``TemporaryError`` (a registry or buildah's pull failing, a full disk)."""
    keyed = await _keyed(store, spec, credentials)
    name, no_cache = keyed.name, keyed.options.no_cache
    if not no_cache and (digest := store.lookup(name)) is not None:
        return Built(name, digest, cached=True)
    if shutil.which("buildah") is None:
        raise PermanentError(
            "building a dev container image needs buildah, which is not installed on this runner host: install "
            "the Debian package buildah (apt-get install buildah)"
        )
    async with _key_lock(root / "locks" / keyed.key):
        if not no_cache and (digest := store.lookup(name)) is not None:
            return Built(name, digest, cached=True)
        work = root / "work" / keyed.key
        await _clear(work)  # what a killed build of this key left
        await _sweep_retired(root)
        try:
            digest = await _build(
                store,
                _Run(work, output),
                spec,
                keyed.options,
                keyed.args,
                keyed.bases,
                keyed.credentials,
                network_namespace,
                name,
            )
        except BaseException:
            await asyncio.shield(_clear(work))
            raise
        await asyncio.shield(_retire(work, root))
    return Built(name, digest, cached=False)


async def _build(
    store: ImageStore,
    run: _Run,
    spec: BuildSpec,
    options: _Options,
    args: Mapping[str, str],
    bases: Sequence[_Base],
    credentials: Credentials,
    network_namespace: Path | None,
    name: str,
) -> str:
    run.prepare(sorted(store.insecure), credentials, {base.reference.registry for base in bases})
    # The store unpacks each remote base while buildah pulls it: the result holds the base's layers (same diff
    # ids), which the import then finds unpacked instead of unpacking them a second time, after the build.
    storing = [
        asyncio.ensure_future(_store_base(store, base, credentials, run.note))
        for base in bases
        if not base.reference.is_local
    ]
    try:
        return await _build_stored(store, run, spec, options, args, bases, network_namespace, name, storing)
    finally:
        for task in storing:
            task.cancel()
        await asyncio.gather(*storing, return_exceptions=True)


async def _store_base(store: ImageStore, base: _Base, credentials: Credentials, note: Callable[[str], None]) -> None:
    """Pull ``base`` at its digest into the store (kept under that pinned name, like an environment's image).
    A failure is only noted: the import of the build's result unpacks what the store lacks anyway."""
    reference = base.reference
    pinned = str(Reference(reference.registry, reference.repository, digest=base.digest))
    started = time.monotonic()
    holder = f"build-{uuid.uuid4().hex}"
    try:
        await store.prepare(pinned, holder=holder, credentials=credentials)
    except (RunnerError, OSError) as exc:
        note(f"the image store could not pull the base image {reference} ({exc}); the build's import unpacks it")
        return
    finally:
        await store.release(holder)
    note(f"the image store has the base image {reference} ({time.monotonic() - started:.1f}s)")


async def _build_stored(
    store: ImageStore,
    run: _Run,
    spec: BuildSpec,
    options: _Options,
    args: Mapping[str, str],
    bases: Sequence[_Base],
    network_namespace: Path | None,
    name: str,
    storing: Sequence[asyncio.Future[None]],
) -> str:
    started = time.monotonic()
    try:
        for index, base in enumerate(bases):
            await _bring_base(store, run, base, run.work / "bases" / str(index))
    finally:
        run.authfile.unlink(missing_ok=True)
    based = time.monotonic()
    run.note(f"buildah has the base images ({based - started:.1f}s)")
    network = "none" if options.no_network or network_namespace is None else f"ns:{network_namespace}"
    arguments = [
        "bud",
        "--cgroup-parent",
        _cgroup_parent(run.work),
        "--signature-policy",
        str(run.policy),
        "--pull=never",
        # Images made without history (imported root filesystems, some registries' images) break buildah
        # 1.28's multi-stage commits ("history lists N non-empty layers"); the runner never reads history.
        "--omit-history",
        "--isolation",
        "oci",
        "--network",
        network,
        "--iidfile",
        str(run.work / "iid"),
        "--file",
        str(spec.dockerfile),
    ]
    if spec.target:
        arguments += ["--target", spec.target]
    for key, value in sorted(args.items()):
        arguments += ["--build-arg", f"{key}={value}"]
    for label in options.labels:
        arguments += ["--label", label]
    for context_name, directory in sorted(spec.contexts.items()):
        arguments += ["--build-context", f"{context_name}={directory}"]
    code, _ = await run.run(*arguments, str(spec.context))
    if code != 0:
        where = f"the step {run.step!r}" if run.step else "before its first step"
        shown = "\n".join(run.tail)
        raise BuildFailed(
            f"the image build of {spec.dockerfile} failed at {where} (buildah exit code {code}); the last lines "
            f"of its output:\n{shown}",
            step=run.step,
            output=tuple(run.tail),
        )
    built = time.monotonic()
    run.note(f"buildah built the image ({built - based:.1f}s)")
    image_id = (run.work / "iid").read_text().strip()
    # Uncompressed, which buildah 1.28 does only for a dir: destination (an oci: one gets gzip whatever the
    # options): the image goes no further than the store on the same disk, and gzip of the base's layer cost
    # more than the rest of a cold build. The directory then becomes an OCI layout the store takes over.
    await run.check(
        "push",
        "--signature-policy",
        str(run.policy),
        "--disable-compression",
        "--format",
        "oci",
        image_id,
        f"dir:{run.work / 'pushed'}",
        what="export the image",
    )
    await asyncio.to_thread(_layout_of_directory, run.work / "pushed", run.work / "result")
    pushed = time.monotonic()
    run.note(f"buildah wrote the image as an OCI layout ({pushed - built:.1f}s)")
    await asyncio.gather(*storing)
    waited = time.monotonic()
    image = await store.import_archive(run.work / "result", name, hand_over=True)
    run.note(f"the image store imported the image ({time.monotonic() - waited:.1f}s, {waited - pushed:.1f}s waiting)")
    return image.digest


def _layout_of_directory(directory: Path, layout: Path) -> None:
    """Turn what ``buildah push ... dir:DIRECTORY`` wrote (``manifest.json``, ``version`` and blobs named by
    their hex digest) into an OCI image layout at ``layout``, moving the blobs."""
    manifest = (directory / "manifest.json").read_bytes()
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    for entry in directory.iterdir():
        if re.fullmatch(r"[0-9a-f]{64}", entry.name):
            entry.rename(blobs / entry.name)
    digest = hashlib.sha256(manifest).hexdigest()
    (blobs / digest).write_bytes(manifest)
    media_type = json.loads(manifest).get("mediaType") or "application/vnd.oci.image.manifest.v1+json"
    descriptor = {"mediaType": media_type, "digest": f"sha256:{digest}", "size": len(manifest)}
    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": [descriptor]}
    (layout / "index.json").write_text(json.dumps(index))
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')


async def _bring_base(store: ImageStore, run: _Run, base: _Base, layout: Path) -> None:
    """Put ``base`` at its digest into the build's storage under the name the Dockerfile uses."""
    reference = base.reference
    if reference.is_local:
        await store.export_layout(base.digest, layout)
        source = f"oci:{layout}"
    else:
        source = str(Reference(reference.registry, reference.repository, digest=base.digest))
    lines = await run.check(
        "pull",
        "--signature-policy",
        str(run.policy),
        "--authfile",
        str(run.authfile),
        source,
        what=f"pull the base image {reference} ({base.digest})",
    )
    image_id = lines[-1].strip() if lines else ""
    if not image_id:
        raise TemporaryError(f"buildah pulled {reference} but named no image id")
    if reference.tag:
        await run.check("tag", image_id, f"{reference.name}:{reference.tag}", what=f"name {reference}")
