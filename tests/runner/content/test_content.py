"""``fetch_content`` against a real git server on 127.0.0.1 (``git http-backend``) and real folders."""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path

import pytest

from devyard.runner.content import FetchedContent, GitCredential, fetch_content, git_credentials
from devyard.runner.errors import PermanentError, TemporaryError
from devyard.wire.environments import ContentSpec, GitContent
from devyard.wire.secrets import SecretType, SecretValue

from .conftest import DEEP_BRANCH, PASSWORD, USERNAME, GitServer, git, publish_work

HOST_OF = "127.0.0.1"


def content(url: str, ref: str | None = None, **options: object) -> ContentSpec:
    return ContentSpec(git=GitContent(url=url, ref=ref, **options))


def credential(server: GitServer, password: str = PASSWORD) -> GitCredential:
    return GitCredential(server.url.removeprefix("http://"), USERNAME, password)


def head(workspace: Path) -> str:
    return git("-c", "safe.directory=*", "rev-parse", "HEAD", cwd=workspace)


def names_in(directory: Path) -> list[str]:
    return sorted(os.listdir(directory))


def credential_memory_files() -> list[str]:
    """The runner's descriptors of the in-memory files that hold credentials while git runs."""
    found = []
    for descriptor in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if "devyard-git-credential" in os.readlink(f"/proc/self/fd/{descriptor}"):
                found.append(descriptor)
    return found


def every_byte_under(directory: Path) -> bytes:
    found = []
    for parent, _, files in os.walk(directory):
        for name in files:
            path = Path(parent, name)
            if not path.is_symlink():
                found.append(path.read_bytes())
    return b"\n".join(found)


async def test_clone_the_default_branch(git_server: GitServer, tmp_path: Path) -> None:
    workspace = tmp_path / "workspace"
    fetched = await fetch_content(content(f"{git_server.url}/app.git"), workspace)
    assert fetched.commit == git_server.main == head(workspace)
    assert fetched.fetched and fetched.seconds >= 0
    assert (workspace / "big" / "data.txt").read_text() == "x" * 10_000
    assert git("-c", "safe.directory=*", "branch", "--show-current", cwd=workspace) == "main"


async def test_clone_a_branch_with_slashes(git_server: GitServer, tmp_path: Path) -> None:
    workspace = tmp_path / "workspace"
    fetched = await fetch_content(content(f"{git_server.url}/app.git", DEEP_BRANCH), workspace)
    assert fetched.commit == git_server.branch
    assert (workspace / "feature.txt").read_text() == "on the branch"
    assert git("-c", "safe.directory=*", "branch", "--show-current", cwd=workspace) == DEEP_BRANCH


async def test_clone_a_tag(git_server: GitServer, tmp_path: Path) -> None:
    fetched = await fetch_content(content(f"{git_server.url}/app.git", "v1"), tmp_path / "workspace")
    assert fetched.commit == git_server.tag
    assert (tmp_path / "workspace" / "VERSION").read_text() == "1"


@pytest.mark.parametrize("depth", [None, 1], ids=["full", "shallow"])
async def test_clone_a_commit(git_server: GitServer, tmp_path: Path, depth: int | None) -> None:
    workspace = tmp_path / "workspace"
    fetched = await fetch_content(content(f"{git_server.url}/app.git", git_server.first, depth=depth), workspace)
    assert fetched.commit == git_server.first
    assert names_in(workspace) == [".git", "README.md"]
    commits = git("-c", "safe.directory=*", "rev-list", "--count", "HEAD", cwd=workspace)
    assert commits == "1"


@pytest.mark.parametrize("depth", [None, 1], ids=["full", "shallow"])
async def test_clone_a_full_ref_name(git_server: GitServer, tmp_path: Path, depth: int | None) -> None:
    spec = content(f"{git_server.url}/app.git", f"refs/heads/{DEEP_BRANCH}", depth=depth)
    fetched = await fetch_content(spec, tmp_path / "workspace")
    assert fetched.commit == git_server.branch


async def test_clone_an_abbreviated_commit(git_server: GitServer, tmp_path: Path) -> None:
    fetched = await fetch_content(content(f"{git_server.url}/app.git", git_server.tag[:10]), tmp_path / "w")
    assert fetched.commit == git_server.tag


async def test_a_shallow_clone_has_the_last_commits_only(git_server: GitServer, tmp_path: Path) -> None:
    workspace = tmp_path / "workspace"
    fetched = await fetch_content(content(f"{git_server.url}/app.git", "main", depth=1), workspace)
    assert fetched.commit == git_server.main
    assert git("-c", "safe.directory=*", "rev-list", "--count", "HEAD", cwd=workspace) == "1"
    assert (workspace / ".git" / "shallow").is_file()


async def test_a_partial_clone_leaves_old_file_contents_on_the_server(git_server: GitServer, tmp_path: Path) -> None:
    workspace = tmp_path / "workspace"
    await fetch_content(content(f"{git_server.url}/app.git", filter="blob:none"), workspace)
    assert (workspace / "VERSION").read_text() == "2"
    missing = git("-c", "safe.directory=*", "rev-list", "--objects", "--missing=print", "--all", cwd=workspace)
    assert any(line.startswith("?") for line in missing.splitlines())  # VERSION "1" was never fetched
    assert git("-c", "safe.directory=*", "config", "remote.origin.partialclonefilter", cwd=workspace) == "blob:none"


async def test_submodules_are_fetched(git_server: GitServer, tmp_path: Path) -> None:
    workspace = tmp_path / "workspace"
    await fetch_content(content(f"{git_server.url}/super.git"), workspace)
    assert (workspace / "lib" / "lib.txt").read_text() == "the library"


async def test_a_private_repository_with_its_credential(git_server: GitServer, tmp_path: Path) -> None:
    workspace = tmp_path / "workspace"
    fetched = await fetch_content(
        content(f"{git_server.url}/private.git"), workspace, credentials=[credential(git_server)]
    )
    assert fetched.commit is not None
    assert (workspace / "SECRET_PLANS.md").read_text() == "private"
    assert PASSWORD.encode() not in every_byte_under(workspace)
    origin = git("-c", "safe.directory=*", "remote", "get-url", "origin", cwd=workspace)
    assert origin == f"{git_server.url}/private.git"
    assert "extraheader" not in git("-c", "safe.directory=*", "config", "--list", "--local", cwd=workspace)
    assert credential_memory_files() == []  # the credential's memory is let go


async def test_a_private_repository_with_a_wrong_credential(git_server: GitServer, tmp_path: Path) -> None:
    workspace = tmp_path / "workspace"
    wrong = "wrong-token-77aa"
    with pytest.raises(PermanentError, match="authentication failed") as caught:
        await fetch_content(
            content(f"{git_server.url}/private.git"), workspace, credentials=[credential(git_server, wrong)]
        )
    message = str(caught.value)
    assert "refused the git-credential secret" in message
    assert wrong not in message and PASSWORD not in message
    assert "\n" not in message  # git's one telling line at most, not its output
    assert names_in(tmp_path) == []  # no half-written workspace or scratch beside it


async def test_a_private_repository_without_a_credential(git_server: GitServer, tmp_path: Path) -> None:
    with pytest.raises(PermanentError, match=r"add a git-credential secret for 127\.0\.0\.1"):
        await fetch_content(content(f"{git_server.url}/private.git"), tmp_path / "workspace")


async def test_a_credential_goes_to_its_host_only(git_server: GitServer, tmp_path: Path) -> None:
    elsewhere = GitCredential("git.example.com", USERNAME, PASSWORD)
    with pytest.raises(PermanentError, match="authentication failed"):
        await fetch_content(content(f"{git_server.url}/private.git"), tmp_path / "workspace", credentials=[elsewhere])


async def test_repository_not_found(git_server: GitServer, tmp_path: Path) -> None:
    with pytest.raises(PermanentError, match="not found: check the URL"):
        await fetch_content(content(f"{git_server.url}/missing.git"), tmp_path / "workspace")
    assert names_in(tmp_path) == []


@pytest.mark.parametrize("ref", ["no-such-branch", "abcdef12", "0" * 40], ids=["name", "short-sha", "sha"])
async def test_unknown_ref(git_server: GitServer, tmp_path: Path, ref: str) -> None:
    with pytest.raises(PermanentError, match=f"has no branch, tag or commit '{ref}'"):
        await fetch_content(content(f"{git_server.url}/app.git", ref), tmp_path / "workspace")
    assert names_in(tmp_path) == []


async def test_an_unreachable_server_is_temporary(tmp_path: Path) -> None:
    with socket.socket() as listener:  # a port nobody listens on
        listener.bind(("127.0.0.1", 0))
        port = listener.getsockname()[1]
    with pytest.raises(TemporaryError, match=f"could not reach 127.0.0.1:{port}"):
        await fetch_content(content(f"http://127.0.0.1:{port}/app.git"), tmp_path / "workspace")
    assert names_in(tmp_path) == []


async def test_ownership_goes_to_the_given_user(git_server: GitServer, tmp_path: Path) -> None:
    workspace = tmp_path / "workspace"
    workspace.mkdir()  # as the runtime makes it: empty, the runner's
    await fetch_content(content(f"{git_server.url}/app.git"), workspace, owner=(101000, 101000))
    owners = {(path.lstat().st_uid, path.lstat().st_gid) for path in [workspace, *workspace.rglob("*")]}
    assert owners == {(101000, 101000)}


async def test_a_second_fetch_keeps_the_users_work(git_server: GitServer, tmp_path: Path) -> None:
    workspace = tmp_path / "workspace"
    spec = content(f"{git_server.url}/app.git")
    await fetch_content(spec, workspace)
    (workspace / "VERSION").write_text("my change")
    (workspace / "notes.txt").write_text("mine")
    again = await fetch_content(spec, workspace)
    assert again == FetchedContent(git_server.main, again.seconds, fetched=False)
    assert (workspace / "VERSION").read_text() == "my change"
    assert (workspace / "notes.txt").read_text() == "mine"


async def test_a_local_folder_is_copied(tmp_path: Path) -> None:
    folder = tmp_path / "project"
    (folder / "src").mkdir(parents=True)
    (folder / "src" / "main.py").write_text("print('hi')\n")
    (folder / "link").symlink_to("src/main.py")
    workspace = tmp_path / "env" / "workspace"
    fetched = await fetch_content(ContentSpec(local_path=str(folder)), workspace, desktop=True, owner=(4242, 4242))
    assert fetched.commit is None and fetched.fetched
    (workspace / "src" / "main.py").write_text("changed in the environment\n")
    assert (folder / "src" / "main.py").read_text() == "print('hi')\n"  # a copy, not a hard link
    assert os.readlink(workspace / "link") == "src/main.py"
    assert (workspace / "src").stat().st_uid == 4242 and (folder / "src").stat().st_uid == os.getuid()


async def test_local_content_is_refused_on_a_shared_runner(git_server: GitServer, tmp_path: Path) -> None:
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "a").write_text("a")
    with pytest.raises(PermanentError, match="desktop runner"):
        await fetch_content(ContentSpec(local_path=str(folder)), tmp_path / "w1")
    with pytest.raises(PermanentError, match="only a desktop runner"):
        await fetch_content(content(f"file://{git_server.root}/app.git"), tmp_path / "w2")
    assert names_in(tmp_path) == ["project"]


async def test_a_file_url_on_a_desktop_runner(git_server: GitServer, tmp_path: Path) -> None:
    fetched = await fetch_content(content(f"file://{git_server.root}/app.git", "v1"), tmp_path / "w", desktop=True)
    assert fetched.commit == git_server.tag


def test_git_credentials_from_secrets() -> None:
    secrets = [
        SecretValue(id="sec_1", name="a", type=SecretType.GIT_CREDENTIAL, target="GitHub.com", value="bob:tok1"),
        SecretValue(id="sec_2", name="b", type=SecretType.GIT_CREDENTIAL, target="gitlab.example:8443", value="tok2"),
        SecretValue(id="sec_3", name="c", type=SecretType.ENVIRONMENT_VARIABLE, target="X", value="y"),
    ]
    assert git_credentials(secrets) == [
        GitCredential("github.com", "bob", "tok1"),
        GitCredential("gitlab.example:8443", "git", "tok2"),
    ]
    assert "tok1" not in repr(git_credentials(secrets))


async def test_a_submodule_cannot_name_the_runners_files(git_server: GitServer, tmp_path: Path) -> None:
    work = tmp_path / "sneaky"
    git("init", "--quiet", "--initial-branch=main", str(work))
    git(
        "-c",
        "protocol.file.allow=always",
        "submodule",
        "--quiet",
        "add",
        f"file://{git_server.root}/lib.git",
        "lib",
        cwd=work,
    )
    git("commit", "--quiet", "-m", "a submodule on the runner's host", cwd=work)
    url = publish_work(git_server, work, "sneaky.git")
    with pytest.raises(PermanentError, match="desktop runner only"):
        await fetch_content(content(url), tmp_path / "workspace")
    assert names_in(tmp_path) == ["sneaky"]
