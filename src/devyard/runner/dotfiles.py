"""A user's dotfiles: their repository fetched on the host, and the plan to install it inside the environment.

The environment reconciler calls ``fetch_dotfiles`` with the user's dotfiles repository, a host directory that
the environment sees at ``inside`` (a mount of its own), and the user's home inside; whoever runs an
environment's first start carries out the returned plan as the remote user. The fetch is ``content``'s (the
same credentials, classification, atomic placement and idempotence: a second call leaves the directory and
the user's changes alone).

The plan follows the GitHub Codespaces convention: the first of ``INSTALL_SCRIPTS`` the repository holds is
run from the repository's directory; a repository with none gets a link from the home directory to each of
its top-level dotfiles (git's own files aside). The repository is not trusted: an install script that is a
symbolic link is not followed on the host (it could point at the host's files); only regular files count.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Final

from devyard.runner import content
from devyard.wire.environments import ContentSpec, GitContent

__all__ = ["INSTALL_SCRIPTS", "DotfileLink", "DotfilesPlan", "fetch_dotfiles", "plan_dotfiles"]

#: The install scripts looked for, in order; the first found is run and nothing is linked.
INSTALL_SCRIPTS: Final = (
    "install.sh",
    "install",
    "bootstrap.sh",
    "bootstrap",
    "script/bootstrap",
    "setup.sh",
    "setup",
    "script/setup",
)
#: Top-level names that belong to the repository, not to the home directory.
_NOT_DOTFILES: Final = frozenset({".git", ".github", ".gitignore", ".gitmodules", ".gitattributes", ".DS_Store"})


@dataclass(frozen=True)
class DotfileLink:
    """A symbolic link to make inside: ``path`` in the home directory, pointing to ``target`` in the
    repository."""

    path: PurePosixPath
    target: PurePosixPath


@dataclass(frozen=True)
class DotfilesPlan:
    """What to do inside the environment, as the remote user, on its first start: run ``install`` (argv) in
    ``working_directory`` when the repository has an install script, else make ``links`` (an existing file in
    the home directory is the executor's to keep or replace)."""

    commit: str | None
    working_directory: PurePosixPath
    install: tuple[str, ...] | None
    links: tuple[DotfileLink, ...]


async def fetch_dotfiles(
    repository: GitContent,
    directory: Path,
    *,
    inside: PurePosixPath,
    home: PurePosixPath,
    owner: tuple[int, int] | None = None,
    credentials: Sequence[content.GitCredential] = (),
    desktop: bool = False,
) -> DotfilesPlan:
    """Clone ``repository`` into the host's ``directory`` (seen inside the environment at ``inside``) unless it
    holds it already, give it to ``owner``, and plan its installation into ``home``. Raises what
    ``content.fetch_content`` raises."""
    fetched = await content.fetch_content(
        ContentSpec(git=repository), directory, owner=owner, credentials=credentials, desktop=desktop
    )
    plan = plan_dotfiles(directory, inside=inside, home=home)
    return DotfilesPlan(fetched.commit, plan.working_directory, plan.install, plan.links)


def plan_dotfiles(directory: Path, *, inside: PurePosixPath, home: PurePosixPath) -> DotfilesPlan:
    """The installation plan of the dotfiles in the host's ``directory``, seen inside at ``inside``."""
    for name in INSTALL_SCRIPTS:
        script = directory / name
        try:
            mode = os.lstat(script).st_mode
        except (FileNotFoundError, NotADirectoryError):
            continue
        if stat.S_ISREG(mode):
            return DotfilesPlan(None, inside, _command(script, mode, inside / name), ())
    links = tuple(
        DotfileLink(home / name, inside / name)
        for name in sorted(os.listdir(directory))
        if name.startswith(".") and name not in _NOT_DOTFILES
    )
    return DotfilesPlan(None, inside, None, links)


def _command(script: Path, mode: int, inside: PurePosixPath) -> tuple[str, ...]:
    """How to run the script: itself when executable, else its ``#!`` interpreter, else ``/bin/sh`` (people
    forget ``chmod +x``)."""
    if mode & stat.S_IXUSR:
        return (str(inside),)
    with script.open("rb") as file:
        first = file.readline(256).decode(errors="replace").strip()
    if first.startswith("#!") and first[2:].strip():
        # As the kernel reads it: the interpreter, then the rest of the line as one argument.
        interpreter, _, argument = first[2:].strip().partition(" ")
        return (interpreter, argument.strip(), str(inside)) if argument.strip() else (interpreter, str(inside))
    return ("/bin/sh", str(inside))
