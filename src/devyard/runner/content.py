"""An environment's content, fetched on the runner's host into its workspace before the container is made.

The environment reconciler calls ``fetch_content`` with the environment's ``spec.content``, the host directory
of its workspace (``Runtime.workspace``), the git credentials among its secrets (``git_credentials``) and the
host's view of the remote user (so files the runner makes as root become the environment's); ``dotfiles``
fetches a user's dotfiles repository with the same machinery. Nothing here runs inside the environment: the
image needs no git, and credentials never enter it.

- A git repository is cloned (shallow with ``depth``, partial with ``filter``), then the branch, tag or commit
  is checked out (a commit of a shallow clone is fetched by its SHA), then its submodules.
- A local folder (``local_path``, desktop runners only) is copied, never hard-linked: what the environment
  writes must not change the user's files. ``file://`` URLs are refused on a shared runner as well, and git's
  protocols are limited (``GIT_ALLOW_PROTOCOL``) so a submodule cannot name the host's files either.
- Credentials reach git through a credential helper that reads an anonymous in-memory file (memfd) that only
  git's processes inherit, closed when git is done: nothing on disk, nothing left behind by a kill; the
  command line and the environment of git's processes name only a descriptor. Git runs without the host's
  system and global configuration and home, so no credential store or ssh key of the host is used or kept.
  The remote URL in the clone carries no credential.
- The runner holds git-credential secrets, not ssh keys: ``git@HOST:PATH`` and ``ssh://`` URLs of the
  repository's host and of hosts with a credential are fetched over HTTPS, and the clone's remote keeps the
  URL as given.
- The content is put together in a temporary directory beside the workspace, given to the owner, then renamed
  over the (empty) workspace: a failure or a kill never leaves half a workspace under its name. So a workspace
  that holds anything holds the whole content, and it is left alone: a restart never clobbers the user's work.
- Failures are classified: authentication failed, repository not found, unknown ref and a refused local
  source are permanent (``PermanentError``); network failures are temporary (``TemporaryError``). Their
  messages say what to do, carry git's one telling line rather than all of its output, and never a secret.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import stat
import tempfile
import time
import urllib.parse
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from devyard.runner.errors import PermanentError, RunnerError, TemporaryError
from devyard.wire import git_context
from devyard.wire.environments import ContentSpec, GitContent
from devyard.wire.secrets import SecretType, SecretValue

__all__ = ["FetchedContent", "GitCredential", "fetch_content", "git_credentials"]

#: The user name given with a git-credential secret that holds only a token (GitHub, GitLab and Gitea take any).
DEFAULT_USERNAME: Final = "git"
_FULL_SHA: Final = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")
_SHORT_SHA: Final = re.compile(r"[0-9a-f]{4,39}")
#: The runner's environment variables git may keep: where it finds programs, and the host's proxies.
_PASSED_VARIABLES: Final = ("PATH", "http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY")
_DEFAULT_PATH: Final = "/usr/local/bin:/usr/bin:/bin"


@dataclass(frozen=True)
class GitCredential:
    """What a git-credential secret gives git for one host (``host`` or ``host:port``)."""

    host: str
    username: str
    password: str = field(repr=False)


@dataclass(frozen=True)
class FetchedContent:
    """What ``fetch_content`` found or did: the commit checked out (None for a folder that is no git
    repository), the seconds it took, and whether it fetched anything (False: the workspace held the content)."""

    commit: str | None
    seconds: float
    fetched: bool


def git_credentials(secrets: Iterable[SecretValue]) -> list[GitCredential]:
    """The git credentials among an environment's secrets: the target is the host, the value ``USER:TOKEN``
    or a bare token (given with the user name ``git``)."""
    found = []
    for secret in secrets:
        if secret.type is SecretType.GIT_CREDENTIAL:
            username, colon, password = secret.value.strip().partition(":")
            if not colon:
                username, password = DEFAULT_USERNAME, username
            found.append(GitCredential(secret.target.strip().lower(), username, password))
    return found


async def fetch_content(
    content: ContentSpec,
    workspace: Path,
    *,
    owner: tuple[int, int] | None = None,
    credentials: Sequence[GitCredential] = (),
    desktop: bool = False,
) -> FetchedContent:
    """Fill ``workspace`` with ``content`` unless it already holds anything, and give every file in it to
    ``owner`` (uid, gid as the host sees them). ``desktop``: the runner serves the user on their own machine,
    so a local folder or a ``file://`` repository may be the content.

    Raises PermanentError (authentication failed, no such repository or ref, a local source refused or
    missing) or TemporaryError (the server could not be reached); the workspace is then as it was."""
    started = time.monotonic()
    if _holds_anything(workspace):
        return FetchedContent(await _head(workspace), time.monotonic() - started, fetched=False)
    workspace.parent.mkdir(parents=True, exist_ok=True)
    await asyncio.to_thread(_remove_leftovers, workspace)
    scratch = Path(tempfile.mkdtemp(dir=workspace.parent, prefix=f".{workspace.name}.fetching-"))
    try:
        target = scratch / "content"
        if content.local_path is not None:
            await asyncio.to_thread(_copy_folder, content.local_path, target, desktop)
        elif content.git is not None:
            await _clone(content.git, target, credentials, desktop)
        else:  # ContentSpec holds exactly one of the two
            raise PermanentError("the environment's content names neither a git repository nor a folder")
        commit = await _head(target)
        target.chmod(0o755)
        if owner is not None:
            await asyncio.to_thread(_give, target, owner)
        # An empty directory is replaced whole by rename(2); one with files in it was filled meanwhile.
        try:
            os.rename(target, workspace)
        except OSError as exc:
            if _holds_anything(workspace):
                return FetchedContent(await _head(workspace), time.monotonic() - started, fetched=False)
            raise TemporaryError(f"could not put the content in place at {workspace}: {exc.strerror}") from None
    finally:
        await asyncio.to_thread(shutil.rmtree, scratch, True)
    return FetchedContent(commit, time.monotonic() - started, fetched=True)


def _holds_anything(directory: Path) -> bool:
    try:
        with os.scandir(directory) as entries:
            return any(True for _ in entries)
    except (FileNotFoundError, NotADirectoryError):
        return False


def _remove_leftovers(workspace: Path) -> None:
    """What a runner killed in the middle of a fetch left beside the workspace (one fetch per workspace runs at
    a time: the reconciler runs one reconcile per environment)."""
    for leftover in workspace.parent.glob(f".{workspace.name}.fetching-*"):
        shutil.rmtree(leftover, ignore_errors=True)


# -- a local folder -------------------------------------------------------------------------------------------


def _copy_folder(source: str, target: Path, desktop: bool) -> None:
    if not desktop:
        raise PermanentError(
            "a local folder is content for a desktop runner (devyard up) only; give a git URL for this runner"
        )
    folder = Path(source)
    if not folder.is_absolute():
        raise PermanentError(f"the local folder {source!r} must be an absolute path")
    if not folder.is_dir():
        raise PermanentError(f"the local folder {source} does not exist or is not a folder")
    # The runner's own state may live inside the folder (a state directory kept beside a project): copying it
    # would copy the copy being made, and the runner's secrets with it.
    here = target.resolve().parent

    def runner_state(directory: str, names: list[str]) -> set[str]:
        return {name for name in names if here.is_relative_to(Path(directory, name).resolve())}

    try:
        # Copies, never hard links: the environment writes to its workspace, and the user's files must not change.
        shutil.copytree(folder, target, symlinks=True, copy_function=_copy_regular_file, ignore=runner_state)
    except shutil.Error as exc:
        failures = exc.args[0] if exc.args and isinstance(exc.args[0], list) else []
        first = f"{failures[0][0]}: {failures[0][2]}"[:400] if failures else str(exc)[:400]
        raise PermanentError(f"could not copy {source} ({len(failures) or 1} files failed; first {first})") from None
    except OSError as exc:
        raise PermanentError(f"could not copy {source}: {exc.filename}: {exc.strerror}") from None


def _copy_regular_file(source: str, target: str) -> None:
    """Copy a file with its times and mode; sockets, pipes and devices of a working folder are left out."""
    if stat.S_ISREG(os.lstat(source).st_mode):
        shutil.copy2(source, target)


def _give(root: Path, owner: tuple[int, int]) -> None:
    uid, gid = owner
    os.lchown(root, uid, gid)
    for parent, directories, files in os.walk(root):
        for name in (*directories, *files):
            os.lchown(os.path.join(parent, name), uid, gid)


# -- git ------------------------------------------------------------------------------------------------------


async def _clone(git: GitContent, target: Path, credentials: Sequence[GitCredential], desktop: bool) -> None:
    try:
        git_context.check_git_url(git.url, allow_local=desktop)
    except ValueError as exc:
        raise PermanentError(str(exc)) from None
    with _GitSession(git.url, git.ref, credentials, desktop) as session:
        options = [f"--depth={git.depth}"] if git.depth else []
        options += [f"--filter={git.filter}"] if git.filter else []
        url = git.url if not git.url.startswith("/") else "file://" + urllib.parse.quote(git.url)
        ref = git.ref
        if ref is None:
            await session.run("clone", "--no-hardlinks", *options, "--", url, str(target))
        elif _FULL_SHA.fullmatch(ref.lower()):
            await _clone_commit(session, url, ref.lower(), target, git)
        elif ref.startswith("refs/"):  # a full ref name, such as a merge request's: clone --branch takes none
            await _clone_commit(session, url, ref, target, git)
        else:
            try:
                await session.run("clone", "--no-hardlinks", *options, f"--branch={ref}", "--", url, str(target))
            except _UnknownRef:
                if not _SHORT_SHA.fullmatch(ref.lower()):
                    raise
                # Not a branch or tag, so perhaps an abbreviated commit: only a whole history can tell.
                shutil.rmtree(target, ignore_errors=True)
                partial = [f"--filter={git.filter}"] if git.filter else []
                await session.run("clone", "--no-hardlinks", "--no-checkout", *partial, "--", url, str(target))
                await session.run("-C", str(target), "checkout", "--quiet", "--detach", ref, "--")
        if (target / ".gitmodules").is_file():
            depth = [f"--depth={git.depth}"] if git.depth else []
            await session.run("-C", str(target), "submodule", "update", "--init", "--recursive", *depth)


async def _clone_commit(session: _GitSession, url: str, sha: str, target: Path, git: GitContent) -> None:
    """Check out a commit (or a full ref name): from a whole clone when it is on a branch, else fetched by
    name, which is also how a shallow clone gets it."""
    partial = [f"--filter={git.filter}"] if git.filter else []
    if git.depth is None:
        await session.run("clone", "--no-hardlinks", "--no-checkout", *partial, "--", url, str(target))
        try:
            await session.run("-C", str(target), "checkout", "--quiet", "--detach", sha, "--")
            return
        except _UnknownRef:
            pass  # not on any branch: ask the server for it by name
        await session.run("-C", str(target), "fetch", "--quiet", *partial, "origin", sha)
    else:
        # A shallow clone holds only the branch tips' last commits: fetch the commit itself.
        await session.run("init", "--quiet", "--initial-branch=main", str(target))
        await session.run("-C", str(target), "remote", "add", "origin", url)
        await session.run("-C", str(target), "fetch", "--quiet", f"--depth={git.depth}", *partial, "origin", sha)
    await session.run("-C", str(target), "checkout", "--quiet", "--detach", "FETCH_HEAD")


async def _head(directory: Path) -> str | None:
    """The commit checked out in ``directory``, or None when it is no git repository (or has no commit)."""
    if not (directory / ".git").exists():
        return None
    environment = {"PATH": os.environ.get("PATH", _DEFAULT_PATH), "GIT_CONFIG_NOSYSTEM": "1", "LC_ALL": "C"}
    environment["GIT_CONFIG_GLOBAL"] = os.devnull
    process = await asyncio.create_subprocess_exec(
        *("git", "-c", "safe.directory=*", "-C", str(directory), "rev-parse", "--verify", "--quiet", "HEAD"),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        env=environment,
    )
    output, _ = await process.communicate()
    return output.decode().strip() or None if process.returncode == 0 else None


class _UnknownRef(PermanentError):
    """The repository has no such branch, tag or commit."""


class _GitSession:
    """Git's commands for one fetch. Each credential is an anonymous in-memory file (memfd) that git's
    processes inherit and a credential helper reads: nothing on disk to leave behind if the runner is killed,
    and the command line names only a descriptor. The session must be closed to let the memory go."""

    def __init__(self, url: str, ref: str | None, credentials: Sequence[GitCredential], desktop: bool) -> None:
        self._url = url
        self._ref = ref
        self._credentials = credentials
        self._desktop = desktop
        self._descriptors: list[int] = []
        self._config: list[str] = []
        self._environment: dict[str, str] = {}

    def __enter__(self) -> _GitSession:
        config = [
            "safe.directory=*",
            "advice.detachedHead=false",
            "credential.helper=",
            # A server that stalls is a network failure, not a fetch that hangs the reconcile for ever.
            "http.lowSpeedLimit=1000",
            "http.lowSpeedTime=60",
        ]
        for credential in self._credentials:
            descriptor = os.memfd_create("devyard-git-credential", os.MFD_CLOEXEC)
            self._descriptors.append(descriptor)
            os.write(descriptor, f"username={credential.username}\npassword={credential.password}\n".encode())
            # Only for its host, so a submodule elsewhere never receives it; the helper answers git's "get" only.
            helper = f'!f() {{ test "$1" != get || cat /dev/fd/{descriptor}; }}; f'
            for scheme in ("https", "http"):
                config.append(f"credential.{scheme}://{credential.host}.helper={helper}")
        config += _https_instead_of_ssh(self._url, [credential.host for credential in self._credentials])
        self._config = [argument for setting in config for argument in ("-c", setting)]
        environment = {name: os.environ[name] for name in _PASSED_VARIABLES if name in os.environ}
        environment.setdefault("PATH", _DEFAULT_PATH)
        environment |= {
            # Not the runner's home: its ssh keys and git configuration are no user's to use.
            "HOME": "/nonexistent",
            "LC_ALL": "C",
            "GIT_CONFIG_NOSYSTEM": "1",
            "GIT_CONFIG_GLOBAL": os.devnull,
            "GIT_TERMINAL_PROMPT": "0",
            "GIT_SSH_COMMAND": "ssh -o BatchMode=yes -o ConnectTimeout=30",
            "GIT_ALLOW_PROTOCOL": "https:http:ssh:git" + (":file" if self._desktop else ""),
        }
        self._environment = environment
        return self

    def __exit__(self, *exc_info: object) -> None:
        for descriptor in self._descriptors:
            os.close(descriptor)
        self._descriptors = []

    async def run(self, *arguments: str) -> None:
        """Run ``git ARGUMENTS``; a failure becomes the classified error a user can act on."""
        process = await asyncio.create_subprocess_exec(
            "git",
            *self._config,
            *arguments,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            env=self._environment,
            pass_fds=self._descriptors,
        )
        try:
            _, errors = await process.communicate()
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
            raise
        if process.returncode != 0:
            raise self._failure(errors.decode(errors="replace"), arguments)

    def _failure(self, output: str, arguments: Sequence[str]) -> RunnerError:
        output = self._scrub(output)
        lowered = output.lower()
        host = _host_of(self._url)
        detail = _telling_line(output)
        has_credential = any(credential.host == host.lower() for credential in self._credentials)
        if any(sign in lowered for sign in _AUTHENTICATION_FAILED):
            if has_credential:
                return PermanentError(
                    f"authentication failed for {self._url}: {host} refused the git-credential secret for it; "
                    f"check its user name and token, and that the token may read this repository"
                )
            return PermanentError(
                f"authentication failed for {self._url}: the repository needs a credential; add a git-credential "
                f"secret for {host} (devyard secret create NAME --type git_credential --target {host} "
                f"--value USER:TOKEN)"
            )
        if any(sign in lowered for sign in _UNKNOWN_REF):
            return _UnknownRef(f"{self._url} has no branch, tag or commit {self._ref!r}: check the ref ({detail})")
        if any(sign in lowered for sign in _NOT_FOUND):
            return PermanentError(
                f"repository {self._url} not found: check the URL (a private repository may also answer "
                f"'not found' to a request without its credential)"
            )
        if any(sign in lowered for sign in _LOCAL_REFUSED):
            return PermanentError(f"{detail}: a repository on the runner's host is content for a desktop runner only")
        if any(sign in lowered for sign in _UNREACHABLE):
            return TemporaryError(f"could not reach {host} to fetch {self._url}: {detail}; trying again later")
        return TemporaryError(f"git {arguments[0] if arguments[0] != '-C' else arguments[2]} failed: {detail}")

    def _scrub(self, output: str) -> str:
        for credential in self._credentials:
            if credential.password:
                output = output.replace(credential.password, "***")
        return re.sub(r"(://)[^/@\s]+@", r"\1", output)


def _https_instead_of_ssh(url: str, hosts: Sequence[str]) -> list[str]:
    """Git settings that fetch over HTTPS what names ssh (``git@HOST:PATH``, ``ssh://git@HOST/PATH``) for the
    repository's host and the hosts with a credential: the runner has git-credential secrets, no ssh keys. A
    credential's ``host:port`` is where that host serves HTTPS. The clone keeps the URL as given for its remote,
    so the user pushes as they asked."""
    bases = {host.partition(":")[0].lower(): host for host in hosts if not host.startswith("[")}
    settings = []
    for name, base in sorted(bases.items()):
        settings += [f"url.https://{base}/.insteadOf=git@{name}:", f"url.https://{base}/.insteadOf=ssh://git@{name}/"]
    scp = re.fullmatch(r"(?P<prefix>[^@/:]+@(?P<host>[^:/]+):).*", url)
    ssh = re.fullmatch(r"(?P<prefix>ssh://(?:[^@/]+@)?(?P<host>[^/:]+)(?::\d+)?/).*", url, flags=re.IGNORECASE)
    for match in (scp, ssh):
        if match is not None:
            base = bases.get(match["host"].lower(), match["host"])
            settings.append(f"url.https://{base}/.insteadOf={match['prefix']}")
    return settings


def _host_of(url: str) -> str:
    if "://" in url:
        return urllib.parse.urlsplit(url).netloc.rpartition("@")[2]
    return url.partition("@")[2].partition(":")[0] or url


def _telling_line(output: str) -> str:
    """Git's one line that says what went wrong (its last ``fatal:``), without the progress and hints."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    for prefix in ("fatal:", "error:"):
        found = [line for line in lines if line.startswith(prefix)]
        if found:
            return found[-1].removeprefix(prefix).strip()
    return lines[-1] if lines else "no output"


_AUTHENTICATION_FAILED: Final = (
    "authentication failed",
    "could not read username",
    "could not read password",
    "terminal prompts disabled",
    "invalid username or password",
    "http basic: access denied",
    "the requested url returned error: 401",
    "the requested url returned error: 403",
    "permission denied (publickey",
    "host key verification failed",
)
_UNKNOWN_REF: Final = (
    "not found in upstream origin",
    "couldn't find remote ref",
    "not our ref",
    "did not match any file(s) known to git",
    "reference is not a tree",
    "unknown revision",
    "invalid reference",
    "needed a single revision",
)
_NOT_FOUND: Final = (
    "repository not found",
    "not found",
    "the requested url returned error: 404",
    "does not appear to be a git repository",
)
_LOCAL_REFUSED: Final = ("transport 'file' not allowed",)
_UNREACHABLE: Final = (
    "could not resolve host",
    "could not resolve hostname",
    "failed to connect",
    "connection refused",
    "connection timed out",
    "timed out",
    "operation too slow",
    "connection reset",
    "network is unreachable",
    "no route to host",
    "early eof",
    "rpc failed",
    "unable to access",
    "the requested url returned error: 5",
    "ssl",
    "gnutls",
)
