"""``devyard up`` then ``devyard env exec``: the local daemon's runner serves its gateway on 127.0.0.1, and the
command runs through it (fake runtime: as a host process), with its output, input and exit code."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import Cli

HELLO = Path(__file__).resolve().parents[2] / "examples" / "hello"

pytestmark = pytest.mark.slow


@pytest.fixture
def state_dir(tmp_path: Path, cli: Cli) -> Iterator[Path]:
    """The daemon's state directory; the daemon a test leaves there is stopped."""
    path = tmp_path / "state"
    yield path
    pid_file = path / "daemon.pid"
    if pid_file.exists():
        cli("down", "--state-dir", str(path), ok=None)
    text = pid_file.read_text().strip() if pid_file.exists() else ""
    if text.isdigit():
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(text), signal.SIGKILL)


def test_exec_in_the_environment_that_up_made(cli: Cli, state_dir: Path) -> None:
    up = cli("up", str(HELLO), "--state-dir", str(state_dir), "--runtime", "fake", "-o", "json").json()
    environment_id = up["environment"]["metadata"]["id"]
    name = up["environment"]["metadata"]["name"]
    ran = cli(
        "env",
        "exec",
        name,
        "-T",
        "-e",
        "GREETING=hi",
        "--",
        "sh",
        "-c",
        'cat; echo "$GREETING" >&2; exit 3',
        input="from stdin\n",
        ok=None,
    )
    assert (ran.returncode, ran.stdout, ran.stderr) == (3, "from stdin\n", "hi\n"), str(ran)
    missing = cli("env", "exec", environment_id, "--", "/nonexistent/program", ok=False)
    assert missing.returncode == 255 and "/nonexistent/program" in missing.stderr, str(missing)
