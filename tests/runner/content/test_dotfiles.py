"""``fetch_dotfiles``: a user's dotfiles repository cloned from a real git server, and the plan to install it."""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

from devyard.runner.dotfiles import DotfileLink, DotfilesPlan, fetch_dotfiles, plan_dotfiles
from devyard.wire.environments import GitContent

from .conftest import GitServer, git, publish

INSIDE = PurePosixPath("/home/vscode/.dotfiles")
HOME = PurePosixPath("/home/vscode")


async def test_an_install_script_is_run_and_nothing_linked(git_server: GitServer, tmp_path: Path) -> None:
    files = {"install.sh": "#!/bin/sh\nln -s .dotfiles/.vimrc ~\n", "setup.sh": "exit 1\n", ".vimrc": "set nu\n"}
    url = publish(git_server, "dotfiles-install.git", files, executable=("install.sh",))
    directory = tmp_path / "dotfiles"
    plan = await fetch_dotfiles(GitContent(url=url), directory, inside=INSIDE, home=HOME, owner=(1000, 1000))
    commit = git("-c", "safe.directory=*", "rev-parse", "HEAD", cwd=directory)
    assert plan == DotfilesPlan(commit, INSIDE, (str(INSIDE / "install.sh"),), ())
    assert {path.lstat().st_uid for path in [directory, *directory.rglob("*")]} == {1000}


async def test_without_a_script_the_dotfiles_are_linked(git_server: GitServer, tmp_path: Path) -> None:
    files = {".bashrc": "alias ll='ls -l'\n", ".config/git/config": "[user]\n", ".gitignore": "*.swp\n"}
    url = publish(git_server, "dotfiles-links.git", files | {"README.md": "mine\n"})
    plan = await fetch_dotfiles(GitContent(url=url, depth=1), tmp_path / "dotfiles", inside=INSIDE, home=HOME)
    assert plan.install is None
    assert plan.links == (
        DotfileLink(HOME / ".bashrc", INSIDE / ".bashrc"),
        DotfileLink(HOME / ".config", INSIDE / ".config"),
    )


def test_the_first_script_in_codespaces_order_wins(tmp_path: Path) -> None:
    (tmp_path / "script").mkdir()
    (tmp_path / "script" / "setup").write_text("#!/bin/sh\n")
    assert plan_dotfiles(tmp_path, inside=INSIDE, home=HOME).install == ("/bin/sh", str(INSIDE / "script/setup"))
    (tmp_path / "setup").write_text("#!/usr/bin/env bash\n")
    assert plan_dotfiles(tmp_path, inside=INSIDE, home=HOME).install == ("/usr/bin/env", "bash", str(INSIDE / "setup"))
    (tmp_path / "bootstrap").write_text("echo no interpreter\n")
    assert plan_dotfiles(tmp_path, inside=INSIDE, home=HOME).install == ("/bin/sh", str(INSIDE / "bootstrap"))
    (tmp_path / "install").write_text("#!/bin/bash\n")
    os.chmod(tmp_path / "install", 0o755)
    assert plan_dotfiles(tmp_path, inside=INSIDE, home=HOME).install == (str(INSIDE / "install"),)


def test_a_script_that_is_a_symbolic_link_is_not_followed(tmp_path: Path) -> None:
    (tmp_path / "install.sh").symlink_to("/etc/passwd")
    (tmp_path / ".profile").write_text("export A=1\n")
    plan = plan_dotfiles(tmp_path, inside=INSIDE, home=HOME)
    assert plan.install is None
    assert plan.links == (DotfileLink(HOME / ".profile", INSIDE / ".profile"),)


async def test_a_second_fetch_keeps_the_users_changes(git_server: GitServer, tmp_path: Path) -> None:
    url = publish(git_server, "dotfiles-again.git", {".zshrc": "from the repository\n"})
    directory = tmp_path / "dotfiles"
    await fetch_dotfiles(GitContent(url=url), directory, inside=INSIDE, home=HOME)
    (directory / ".zshrc").write_text("changed by the user\n")
    plan = await fetch_dotfiles(GitContent(url=url), directory, inside=INSIDE, home=HOME)
    assert (directory / ".zshrc").read_text() == "changed by the user\n"
    assert plan.links == (DotfileLink(HOME / ".zshrc", INSIDE / ".zshrc"),)
