"""The content tests' git server (``support.git_server``) and its repositories: ``app.git`` (main, a deep branch,
a tag, a commit on no branch's tip), ``private.git`` (behind basic auth), ``lib.git`` and ``super.git`` (with
``lib`` as a submodule)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from support.git_server import PASSWORD, USERNAME, commit, git, publish, publish_bare, publish_work, serving
from support.git_server import GitServer as ServedRepositories

__all__ = ["DEEP_BRANCH", "PASSWORD", "USERNAME", "GitServer", "git", "publish", "publish_work"]

#: A branch name with slashes, as people name them.
DEEP_BRANCH = "feature/deep/branch"


@dataclass(frozen=True)
class GitServer(ServedRepositories):
    #: Commits of ``app.git``: the first (only on main's history), main's tip, the deep branch's tip, the tag's.
    first: str
    main: str
    branch: str
    tag: str


@pytest.fixture(scope="session")
def git_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GitServer]:
    base = tmp_path_factory.mktemp("git-server")
    with serving(base) as served:
        yield _build(base, served)


def _build(base: Path, served: ServedRepositories) -> GitServer:
    root, url = served.root, served.url
    app = base / "app"
    git("init", "--quiet", "--initial-branch=main", str(app))
    first = commit(app, "README.md", "first")
    tag = commit(app, "VERSION", "1")
    git("tag", "-a", "v1", "-m", "release 1", cwd=app)
    git("checkout", "--quiet", "-b", DEEP_BRANCH, cwd=app)
    branch = commit(app, "feature.txt", "on the branch")
    git("checkout", "--quiet", "main", cwd=app)
    commit(app, "VERSION", "2")
    main = commit(app, "big/data.txt", "x" * 10_000)
    publish_bare(app, root, "app.git")

    private = base / "private"
    git("init", "--quiet", "--initial-branch=main", str(private))
    commit(private, "SECRET_PLANS.md", "private")
    publish_bare(private, root, "private.git")

    lib = base / "lib"
    git("init", "--quiet", "--initial-branch=main", str(lib))
    commit(lib, "lib.txt", "the library")
    publish_bare(lib, root, "lib.git")

    outer = base / "super"
    git("init", "--quiet", "--initial-branch=main", str(outer))
    commit(outer, "main.txt", "the application")
    git("-c", "protocol.file.allow=always", "submodule", "--quiet", "add", f"{url}/lib.git", "lib", cwd=outer)
    git("commit", "--quiet", "-m", "lib as a submodule", cwd=outer)
    publish_bare(outer, root, "super.git")

    return GitServer(url=url, root=root, first=first, main=main, branch=branch, tag=tag)
