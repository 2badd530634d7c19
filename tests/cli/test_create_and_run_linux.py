"""``devyard env create --image REF -- CMD`` on the linux runtime: the command runs in a real container of the
test suite's busybox image (pulled from the registry on 127.0.0.1), with its streams, its exit code and a
terminal, and ``--rm`` deletes the environment."""

from __future__ import annotations

import contextlib
import fcntl
import os
import pty
import secrets
import shutil
import signal
import struct
import subprocess
import termios
from collections.abc import Iterator
from pathlib import Path

import pytest

from support import host

from .conftest import DEVYARD, Cli
from .test_create_and_run import _read_until_exited

pytestmark = pytest.mark.slow


@pytest.fixture
def state_dir(cli: Cli) -> Iterator[Path]:
    """The daemon's state directory; the daemon and the mounts a test leaves there are removed."""
    host.require("runc", "ip", "nft")
    # runc reaches the bundles as an unprivileged id: every directory above them must be searchable (not /tmp's
    # pytest directories, which are 0700).
    path = Path(f"/var/tmp/devyard-run-{secrets.token_hex(4)}")
    path.mkdir(mode=0o711)
    try:
        yield path
    finally:
        if (path / "daemon.pid").exists():
            cli("down", "--state-dir", str(path), ok=None)
        text = (path / "daemon.pid").read_text().strip() if (path / "daemon.pid").exists() else ""
        if text.isdigit():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(text), signal.SIGKILL)
        mounts = [line for line in Path("/proc/self/mountinfo").read_text().splitlines() if str(path) in line]
        for line in reversed(mounts):
            subprocess.run(["umount", "--lazy", line.split(" ")[4]], check=False)
        shutil.rmtree(path, ignore_errors=True)


def test_the_command_runs_in_a_real_container(
    cli: Cli, cli_env: dict[str, str], state_dir: Path, busybox_image: str
) -> None:
    # `up` starts the daemon (its first environment pulls the image) and saves it as the current profile.
    folder = state_dir / "empty"
    folder.mkdir()
    up = cli(
        "up", str(folder), "--image", busybox_image, "--state-dir", str(state_dir), "--runtime", "linux", "-o", "json"
    ).json()  # fmt: skip
    assert up["daemon"]["runtime"] == "linux"

    ran = cli(
        "env", "create", "--image", busybox_image, "--name", "real", "-T", "--",
        "sh", "-c", 'read line; echo "$line from $(cat /proc/1/comm) as $(id -u)"; echo oops >&2; exit 6',
        input="hello\n", ok=None,
    )  # fmt: skip
    assert (ran.returncode, ran.stderr) == (6, "oops\n"), str(ran)
    assert ran.stdout.startswith("hello from ") and ran.stdout.endswith(" as 0\n"), str(ran)
    assert "real" in cli("env", "list").stdout, "without --rm the environment stays"

    removed = cli("env", "create", "--image", busybox_image, "--name", "gone", "--rm", "--", "true")
    assert removed.stdout == ""
    listed = cli("env", "list", "-o", "json").json()["items"]
    assert all(item["spec"]["desired_phase"] == "deleted" for item in listed if item["metadata"]["name"] == "gone")

    master, slave = pty.openpty()
    try:
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
        process = subprocess.Popen(
            [*DEVYARD, "env", "create", "--image", busybox_image, "--rm", "--", "sh", "-c", "tty; stty size; exit 2"],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env=cli_env,
            start_new_session=True,
        )
        try:
            output = _read_until_exited(master, process).decode(errors="replace")
        finally:
            if process.poll() is None:
                process.kill()
            code = process.wait()
        assert code == 2, output
        assert "/dev/pts/" in output and "40 120" in output, output
    finally:
        for fd in (master, slave):
            with contextlib.suppress(OSError):
                os.close(fd)
