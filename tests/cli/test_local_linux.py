"""``devyard up`` on the linux runtime, as the README's first command runs it: the bundled example in a real
container of the local Debian image (bash, git, sudo), reached with ``devyard env exec``; it survives the
daemon's restart (adopted, not made again) and leaves nothing on the host once deleted.

The image is imported from the test suite's cached mmdebstrap root (``support.images.debian_rootfs``) under
the name the daemon uses, ``devyard.local/debian:bookworm``; building it on first use is tested with the image
store (``tests/runner/images``).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from devyard.local.daemon import LOCAL_IMAGE
from support import host, images

from .conftest import Cli

HELLO = Path(__file__).resolve().parents[2] / "examples" / "hello"

pytestmark = pytest.mark.slow


@pytest.fixture
def state_dir(cli: Cli) -> Iterator[Path]:
    host.require("runc", "ip", "nft", "mmdebstrap")
    # runc reaches the bundles as an unprivileged id: every directory above them must be searchable (not /tmp's
    # pytest directories, which are 0700).
    path = Path(f"/var/tmp/devyard-up-{secrets.token_hex(4)}")
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


def test_up_runs_the_example_in_a_real_container(cli: Cli, state_dir: Path) -> None:
    rootfs = images.debian_rootfs()
    cli("image", "import", str(rootfs), "--name", LOCAL_IMAGE, "--state-dir", str(state_dir / "runner"))

    up = cli("up", str(HELLO), "--state-dir", str(state_dir), "--runtime", "linux", "-o", "json").json()
    environment = up["environment"]
    environment_id = environment["metadata"]["id"]
    assert up["daemon"]["runtime"] == "linux"
    assert environment["status"]["phase"] == "running", environment["status"]

    inside = cli(
        "env", "exec", environment_id, "--", "bash", "-c", "git --version; sudo -n id -u; cat /etc/debian_version"
    )
    lines = inside.stdout.splitlines()
    assert lines[0].startswith("git version ")
    assert lines[1] == "0"
    assert lines[2].startswith("12")
    cli("env", "exec", environment_id, "--", "sh", "-c", "echo kept > /root/note")
    pid_1_started = cli("env", "exec", environment_id, "--", "stat", "-c", "%Z", "/proc/1").stdout

    # The daemon stops; the container does not. The next `up` adopts it as it is.
    cli("down", "--state-dir", str(state_dir))
    again = cli("up", str(HELLO), "--state-dir", str(state_dir), "--runtime", "linux", "-o", "json").json()
    assert again["environment"]["metadata"]["id"] == environment_id
    assert cli("env", "exec", environment_id, "--", "stat", "-c", "%Z", "/proc/1").stdout == pid_1_started
    assert cli("env", "exec", environment_id, "--", "cat", "/root/note").stdout == "kept\n"

    cli("env", "delete", environment_id, "--wait")
    listed = json.loads(cli("env", "list", "-o", "json").stdout)["items"]
    assert listed == []
    assert not [line for line in Path("/proc/self/mountinfo").read_text().splitlines() if environment_id in line]
    assert not list((state_dir / "runner" / "environments").iterdir())
