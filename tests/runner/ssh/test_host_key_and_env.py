"""The SSH gateway's host key (made once, 0600, the same after a restart) and which client variables a session
gets."""

from __future__ import annotations

import stat
from pathlib import Path

from devyard.runner.ssh_gateway import accepted_env, host_key


def test_the_host_key_is_made_once_private_and_kept(tmp_path: Path) -> None:
    path = tmp_path / "state" / "ssh_host_ed25519_key"
    first = host_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert host_key(path).public_data == first.public_data
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def test_locale_and_terminal_variables_pass_and_nothing_else() -> None:
    sent = {
        "LANG": "C.UTF-8",
        "LC_ALL": "C",
        "LC_TIME": "en_GB.UTF-8",
        "TERM": "xterm-256color",
        "COLORTERM": "truecolor",
        "TZ": "UTC",
        "PATH": "/evil",
        "LD_PRELOAD": "/tmp/x.so",
        "LD_LIBRARY_PATH": "/tmp",
        "BASH_ENV": "/tmp/x",
        "LC_": "empty suffix",
        "HOME": "/root",
    }
    assert accepted_env(sent) == {
        "LANG": "C.UTF-8",
        "LC_ALL": "C",
        "LC_TIME": "en_GB.UTF-8",
        "TERM": "xterm-256color",
        "COLORTERM": "truecolor",
        "TZ": "UTC",
    }
