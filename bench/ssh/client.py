"""The OpenSSH client's command lines and the timed runs, the same for every target.

Called by ``bench.ssh.__main__``. A ``Target`` is where to connect (host, port, user, the path a copy goes to);
``scp_seconds`` and ``ssh_true_seconds`` time one run each, from starting the client to its exit, as a user
waits for it.
"""

from __future__ import annotations

import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from bench.start import commands

__all__ = ["Target", "negotiated", "run_command", "scp_seconds", "ssh_true_seconds"]

_TIMEOUT = 600.0


@dataclass(frozen=True)
class Target:
    name: str
    host: str
    port: int
    user: str
    #: Where ``scp`` writes the file on the target.
    remote_path: str
    key: Path
    #: A known-hosts file of this target's own, empty at the start of the run.
    known_hosts: Path
    #: Options this target's row adds to the common ones (none for the main rows).
    extra: tuple[str, ...] = ()


def _options(target: Target, port_flag: str) -> list[str]:
    """The options both targets get: no config file, one key, no prompt, no shared connection, the cipher
    defaults, the target's own fresh known-hosts file (its first connection records the host key)."""
    return [
        "-F", "/dev/null", "-i", str(target.key), "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
        "-o", "ControlMaster=no", "-o", "ControlPath=none", "-o", "StrictHostKeyChecking=accept-new",
        "-o", f"UserKnownHostsFile={target.known_hosts}", port_flag, str(target.port), *target.extra,
    ]  # fmt: skip


def run_command(target: Target, command: str, *, verbose: bool = False) -> subprocess.CompletedProcess[str]:
    argv = ["ssh", *_options(target, "-p"), *(["-v"] if verbose else []), f"{target.user}@{target.host}", command]
    return subprocess.run(argv, capture_output=True, text=True, timeout=_TIMEOUT, stdin=subprocess.DEVNULL, check=False)


def ssh_true_seconds(target: Target) -> float:
    argv = ["ssh", *_options(target, "-p"), f"{target.user}@{target.host}", "true"]
    started = time.perf_counter()
    commands.run(argv, timeout=_TIMEOUT)
    return time.perf_counter() - started


def scp_seconds(target: Target, local: Path) -> float:
    argv = ["scp", "-q", *_options(target, "-P"), str(local), f"{target.user}@{target.host}:{target.remote_path}"]
    started = time.perf_counter()
    commands.run(argv, timeout=_TIMEOUT)
    return time.perf_counter() - started


def negotiated(target: Target) -> str:
    """The key exchange, cipher and MAC the client and the target agreed on (from ``ssh -v``)."""
    answer = run_command(target, "true", verbose=True)
    kex = re.search(r"kex: algorithm: (\S+)", answer.stderr)
    found = re.search(r"kex: server->client cipher: (\S+) MAC: (\S+)", answer.stderr)
    if kex is None or found is None:
        return "unknown"
    cipher, mac = found.groups()
    return f"kex {kex.group(1)}, " + (cipher if mac == "<implicit>" else f"{cipher} + {mac}")
