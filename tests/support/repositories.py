"""A git repository made on the spot for tests that need content a desktop runner may take as ``file://``."""

from __future__ import annotations

import subprocess
from pathlib import Path

__all__ = ["make_repository"]


def make_repository(path: Path, files: dict[str, str] | None = None, *, branch: str = "main") -> str:
    """A repository at ``path`` with ``files`` (default: a README) committed on ``branch``; its ``file://`` URL."""
    subprocess.run(["git", "init", "--quiet", f"--initial-branch={branch}", str(path)], check=True)
    for name, text in (files or {"README.md": "a test repository\n"}).items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text(text)
    git = ["git", "-C", str(path), "-c", "user.name=devyard tests", "-c", "user.email=tests@devyard.invalid"]
    subprocess.run([*git, "add", "--all"], check=True)
    subprocess.run([*git, "commit", "--quiet", "-m", "the first commit"], check=True)
    return f"file://{path}"
