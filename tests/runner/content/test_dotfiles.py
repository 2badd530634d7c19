"""``fetch_dotfiles``: a user's dotfiles repository cloned from a real git server, the plan to install it, and the
installer the plan makes, run by a real shell in a home directory of its own."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path, PurePosixPath

from devyard.runner.dotfiles import DotfilesPlan, fetch_dotfiles, plan_dotfiles
from devyard.wire.environments import GitContent

from .conftest import GitServer, git, publish


def install(plan: DotfilesPlan, source: Path, home: Path) -> subprocess.CompletedProcess[str]:
    """Run the plan's installer as the environment would, with ``home`` as $HOME."""
    return subprocess.run(
        ["/bin/sh", "-c", plan.command(source=PurePosixPath(source))],
        env={"HOME": str(home), "PATH": os.environ["PATH"]},
        cwd=home,
        capture_output=True,
        text=True,
        check=False,
    )


async def test_an_install_script_is_run_from_the_users_copy_and_nothing_linked(
    git_server: GitServer, tmp_path: Path
) -> None:
    script = '#!/bin/sh\necho installed > "$HOME/marker"\npwd > "$HOME/ran-in"\n'
    files = {"install.sh": script, "setup.sh": "exit 1\n", ".vimrc": "set nu\n"}
    url = publish(git_server, "dotfiles-install.git", files, executable=("install.sh",))
    directory = tmp_path / "dotfiles"
    plan = await fetch_dotfiles(GitContent(url=url), directory)
    commit = git("-c", "safe.directory=*", "rev-parse", "HEAD", cwd=directory)
    assert plan == DotfilesPlan(commit, ("./install.sh",), ())

    home = tmp_path / "home"
    home.mkdir()
    done = install(plan, directory, home)
    assert done.returncode == 0, done.stderr
    assert (home / "marker").read_text() == "installed\n"
    assert (home / "ran-in").read_text().strip() == str(home / "dotfiles")
    assert (home / "dotfiles" / ".vimrc").read_text() == "set nu\n"
    assert not (home / ".vimrc").exists()


async def test_without_a_script_the_dotfiles_are_linked_and_the_users_files_kept_aside(
    git_server: GitServer, tmp_path: Path
) -> None:
    files = {".bashrc": "alias ll='ls -l'\n", ".config/git/config": "[user]\n", ".gitignore": "*.swp\n"}
    url = publish(git_server, "dotfiles-links.git", files | {"README.md": "mine\n"})
    directory = tmp_path / "dotfiles"
    plan = await fetch_dotfiles(GitContent(url=url, depth=1), directory)
    assert plan.install is None
    assert plan.links == (".bashrc", ".config")

    home = tmp_path / "home"
    home.mkdir()
    (home / ".bashrc").write_text("the image's\n")
    done = install(plan, directory, home)
    assert done.returncode == 0, done.stderr
    assert os.readlink(home / ".bashrc") == str(home / "dotfiles" / ".bashrc")
    assert (home / ".bashrc").read_text() == "alias ll='ls -l'\n"
    assert (home / ".bashrc.before-dotfiles").read_text() == "the image's\n"
    assert (home / ".config" / "git" / "config").read_text() == "[user]\n"
    assert "linked ~/.config" in done.stdout


def test_a_failing_install_script_is_reported_and_does_not_fail(tmp_path: Path) -> None:
    source = tmp_path / "source"
    source.mkdir()
    (source / "install.sh").write_text("echo trying; exit 7\n")
    plan = plan_dotfiles(source)
    assert plan.install == ("/bin/sh", "./install.sh")
    home = tmp_path / "home"
    home.mkdir()
    done = install(plan, source, home)
    assert done.returncode == 0
    assert "trying" in done.stdout
    assert "the install script failed (exit 7)" in done.stderr


def test_an_existing_copy_in_the_home_directory_is_kept(tmp_path: Path) -> None:
    source = tmp_path / "source"
    source.mkdir()
    (source / ".profile").write_text("from the repository\n")
    home = tmp_path / "home"
    (home / "dotfiles").mkdir(parents=True)
    (home / "dotfiles" / ".profile").write_text("changed by the user\n")
    done = install(plan_dotfiles(source), source, home)
    assert done.returncode == 0, done.stderr
    assert (home / ".profile").read_text() == "changed by the user\n"


def test_the_first_script_in_codespaces_order_wins(tmp_path: Path) -> None:
    (tmp_path / "script").mkdir()
    (tmp_path / "script" / "setup").write_text("#!/bin/sh\n")
    assert plan_dotfiles(tmp_path).install == ("/bin/sh", "./script/setup")
    (tmp_path / "setup").write_text("#!/usr/bin/env bash\n")
    assert plan_dotfiles(tmp_path).install == ("/usr/bin/env", "bash", "./setup")
    (tmp_path / "bootstrap").write_text("echo no interpreter\n")
    assert plan_dotfiles(tmp_path).install == ("/bin/sh", "./bootstrap")
    (tmp_path / "install").write_text("#!/bin/bash\n")
    os.chmod(tmp_path / "install", 0o755)
    assert plan_dotfiles(tmp_path).install == ("./install",)


def test_a_script_that_is_a_symbolic_link_is_not_followed(tmp_path: Path) -> None:
    (tmp_path / "install.sh").symlink_to("/etc/passwd")
    (tmp_path / ".profile").write_text("export A=1\n")
    plan = plan_dotfiles(tmp_path)
    assert plan.install is None
    assert plan.links == (".profile",)


async def test_a_second_fetch_keeps_what_is_there(git_server: GitServer, tmp_path: Path) -> None:
    url = publish(git_server, "dotfiles-again.git", {".zshrc": "from the repository\n"})
    directory = tmp_path / "dotfiles"
    await fetch_dotfiles(GitContent(url=url), directory)
    (directory / ".zshrc").write_text("changed\n")
    plan = await fetch_dotfiles(GitContent(url=url), directory)
    assert (directory / ".zshrc").read_text() == "changed\n"
    assert plan.links == (".zshrc",)
