"""A user's dotfiles: their repository fetched on the host, and the command that installs it inside.

``DevContainers.prepare`` calls ``fetch_dotfiles`` with the environment's ``spec.dotfiles`` (the creator's
dotfiles repository, from their user settings) and a host directory the environment sees read-only at
``SOURCE`` (a volume of its own); the returned plan's ``command`` then runs as a lifecycle command after
``postCreateCommand``, once per container, as the remote user: it copies the repository to ``~/dotfiles`` (the
user's own copy, owned by them; an existing ``~/dotfiles`` is kept) and installs it from there. The fetch is
``content``'s (the same credentials, classification, atomic placement and idempotence: a second call leaves
the directory alone), so an image needs no git and credentials never enter the environment.

The plan follows the GitHub Codespaces convention: the first of ``INSTALL_SCRIPTS`` the repository holds is
run from the repository's directory; a repository with none gets a link from the home directory to each of
its top-level dotfiles (git's own files aside; a file of the same name already in the home directory is moved
aside to ``NAME.before-dotfiles`` first). The repository is not trusted: an install script that is a symbolic
link is not followed on the host (it could point at the host's files); only regular files count. A failing
install is reported in the lifecycle log and does not fail the environment: the user's environment matters
more than their prompt.
"""

from __future__ import annotations

import os
import shlex
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Final

from devyard.runner import content
from devyard.wire.environments import ContentSpec, GitContent

__all__ = ["INSTALL_SCRIPTS", "SOURCE", "TARGET", "DotfilesPlan", "fetch_dotfiles", "plan_dotfiles"]

#: Where the environment sees the fetched repository (read-only), and where the user's copy goes.
SOURCE: Final = PurePosixPath("/var/lib/devyard/dotfiles")
TARGET: Final = "$HOME/dotfiles"

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
class DotfilesPlan:
    """How to install a fetched dotfiles repository: run ``install`` (argv, its script relative to the
    repository) from the repository's directory when it has an install script, else link each of ``links``
    (top-level names) from the home directory."""

    commit: str | None
    install: tuple[str, ...] | None
    links: tuple[str, ...]

    def command(self, *, source: PurePosixPath = SOURCE, target: str = TARGET) -> str:
        """A ``/bin/sh`` script that copies the repository from ``source`` to ``target`` (a shell word: ``$HOME``
        expands) unless it is there, then installs it; it exits 0 even when the install fails, saying so."""
        lines = [
            f'dotfiles="{target}"',
            f'if [ ! -e "$dotfiles" ]; then cp -R {shlex.quote(str(source))} "$dotfiles" || exit 0; fi',
            'cd "$dotfiles" || exit 0',
        ]
        if self.install is not None:
            lines.append(f"echo 'dotfiles: running {shlex.join(self.install)}'")
            lines.append(
                f'{shlex.join(self.install)} || echo "dotfiles: the install script failed (exit $?); '
                'the environment goes on without it" >&2'
            )
        for name in self.links:
            quoted = shlex.quote(name)
            lines.append(
                f'if [ -e "$HOME/"{quoted} ] && [ ! -L "$HOME/"{quoted} ]; then '
                f'mv "$HOME/"{quoted} "$HOME/"{quoted}.before-dotfiles; fi'
            )
            lines.append(f'ln -sfn "$dotfiles/"{quoted} "$HOME/"{quoted} && echo "dotfiles: linked ~/"{quoted}')
        lines.append("exit 0")
        return "\n".join(lines) + "\n"


async def fetch_dotfiles(
    repository: GitContent,
    directory: Path,
    *,
    credentials: Sequence[content.GitCredential] = (),
    desktop: bool = False,
) -> DotfilesPlan:
    """Clone ``repository`` into the host's ``directory`` unless it holds it already, and plan its installation.
    Raises what ``content.fetch_content`` raises."""
    fetched = await content.fetch_content(
        ContentSpec(git=repository), directory, credentials=credentials, desktop=desktop
    )
    plan = plan_dotfiles(directory)
    return DotfilesPlan(fetched.commit, plan.install, plan.links)


def plan_dotfiles(directory: Path) -> DotfilesPlan:
    """The installation plan of the dotfiles in the host's ``directory``."""
    for name in INSTALL_SCRIPTS:
        script = directory / name
        try:
            mode = os.lstat(script).st_mode
        except (FileNotFoundError, NotADirectoryError):
            continue
        if stat.S_ISREG(mode):
            return DotfilesPlan(None, _command(script, mode, f"./{name}"), ())
    links = tuple(name for name in sorted(os.listdir(directory)) if name.startswith(".") and name not in _NOT_DOTFILES)
    return DotfilesPlan(None, None, links)


def _command(script: Path, mode: int, relative: str) -> tuple[str, ...]:
    """How to run the script: itself when executable, else its ``#!`` interpreter, else ``/bin/sh`` (people
    forget ``chmod +x``)."""
    if mode & stat.S_IXUSR:
        return (relative,)
    with script.open("rb") as file:
        first = file.readline(256).decode(errors="replace").strip()
    if first.startswith("#!") and first[2:].strip():
        # As the kernel reads it: the interpreter, then the rest of the line as one argument.
        interpreter, _, argument = first[2:].strip().partition(" ")
        return (interpreter, argument.strip(), relative) if argument.strip() else (interpreter, relative)
    return ("/bin/sh", relative)
