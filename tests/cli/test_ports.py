"""``devyard env port list|open|close|url`` against ``devyard up`` (the local daemon over the fake runtime, whose
programs run on this host): a service started with ``devyard env exec`` is listed with its URL on the runner's port
proxy (host-based, ``PORT-ID.localhost``), curl gets in with the login link and its cookie jar, sharing with
everyone lets curl in without credentials, and closing the port shuts it again."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from .conftest import DEVYARD, Cli

pytestmark = [pytest.mark.slow, pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")]

APP = Path(__file__).parents[1] / "runner" / "ports" / "app.py"


@pytest.fixture
def state_dir(tmp_path: Path, cli: Cli) -> Iterator[Path]:
    path = tmp_path / "state"
    yield path
    cli("down", "--state-dir", str(path), ok=None)


def curl(*args: str) -> tuple[int, str]:
    """curl's HTTP status and body."""
    done = subprocess.run(
        ["curl", "-sS", "--max-time", "20", "-w", "\n%{http_code}", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    body, _, status = done.stdout.rpartition("\n")
    return int(status), body


def wait_for(probe: Callable[[], Any], what: str, timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        found = probe()
        if found:
            return found
        assert time.monotonic() < deadline, f"no {what}"
        time.sleep(0.2)


def test_ports_are_listed_shared_and_closed(cli: Cli, cli_env: dict[str, str], state_dir: Path, tmp_path: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    up = cli("up", str(project), "--state-dir", str(state_dir), "--runtime", "fake")
    environment_id = next(word for word in up.stdout.split() if word.startswith("env_"))

    # The service runs as long as its exec session: in the background of this test.
    service = subprocess.Popen(
        [*DEVYARD, "env", "exec", environment_id, "--", sys.executable, str(APP)],
        env=cli_env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert service.stdout is not None
        http_port = int(service.stdout.readline().split()[0])

        def listed() -> dict[str, Any] | None:
            ports = cli("env", "port", "list", environment_id, "-o", "json").json()
            return next((p for p in ports if p["port"] == http_port and p["listening"] and p["url"]), None)

        entry = wait_for(listed, f"port {http_port} in `env port list`")
        url = entry["url"]
        assert url.startswith(f"http://{http_port}-{environment_id.removeprefix('env_')}.localhost:")
        assert entry["admission"] == "owner"
        table = cli("env", "port", "list", environment_id).stdout
        assert str(http_port) in table and url in table

        status, body = curl(url)
        assert status == 401 and f"devyard env port url {environment_id} {http_port}" in body

        link = cli("env", "port", "url", environment_id, str(http_port)).stdout.strip()
        assert link.startswith(url + "_devyard/login?ticket=")
        jar = tmp_path / "cookies"
        status, body = curl("-L", "-c", str(jar), "-b", str(jar), link)
        assert (status, body) == (200, "hello from /\n")
        status, body = curl("-b", str(jar), url + "headers")
        seen = {name.lower(): value for name, value in json.loads(body)["headers"]}
        assert status == 200 and "cookie" not in seen and "authorization" not in seen

        opened = cli("env", "port", "open", environment_id, str(http_port), "--admission", "everyone", "--name", "web")
        assert url in opened.stdout and "everyone" in opened.stdout
        assert curl(url) == (200, "hello from /\n")
        shared = wait_for(lambda: (p := listed()) and p["admission"] == "everyone" and p, "everyone in the list")
        assert shared["name"] == "web"

        closed = cli("env", "port", "close", environment_id, str(http_port))
        assert "owner's only again" in closed.stdout
        assert curl(url)[0] == 401
        again = cli("env", "port", "close", environment_id, str(http_port))
        assert "was not shared" in again.stderr
    finally:
        with contextlib.suppress(OSError):
            assert service.stdin is not None
            service.stdin.close()
        service.terminate()
        service.wait(20)
