"""Debian's OpenSSH ``sshd``, the peer: started on a free port of 127.0.0.1 for one run and stopped at its end.

It gets its own host key, config, pid file and authorized_keys under the run's directory, and otherwise Debian's
defaults (ciphers, MACs, key exchange, ``sftp-server`` as the SFTP subsystem, which ``scp`` uses). It logs in one
user with the benchmark's key only; no password, no PAM.

The user it logs in is one the benchmark adds for the run (``USER``, a system user with ``/bin/sh`` as its shell
and a home in the run's directory) and removes at the end: root's own shell would read root's ``~/.bashrc`` (bash
does for every command sshd runs, ``scp``'s SFTP server included), and what a developer's .bashrc does (pyenv,
nvm...) would count against sshd. The environment's user runs busybox ``sh``, which reads nothing either.
Called by ``bench.ssh.__main__``.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bench.start import commands
from support import network

__all__ = ["SSHD", "USER", "running_sshd", "version"]

SSHD = "/usr/sbin/sshd"
_SFTP_SERVER = "/usr/lib/openssh/sftp-server"
#: The user sshd logs in, added for the run and removed after it.
USER = "dybenchssh"
_START_TIMEOUT = 20.0
_STOP_TIMEOUT = 10.0


def version() -> str:
    """``openssh-server 1:9.2p1-2+deb12u10``: sshd names only its upstream version, Debian's package says more."""
    answer = subprocess.run(
        ["dpkg-query", "-W", "-f", "${Version}", "openssh-server"], capture_output=True, text=True, check=False
    )
    return f"openssh-server {answer.stdout.strip() or 'unknown'}"


@contextmanager
def running_sshd(work: Path, public_key: str) -> Iterator[tuple[int, Path]]:
    """sshd on 127.0.0.1 accepting ``public_key`` for ``USER``; yields its port and that user's home."""
    if not os.access(SSHD, os.X_OK):
        raise RuntimeError(f"{SSHD} is not installed: bench/ssh/setup installs openssh-server")
    work.mkdir(parents=True, exist_ok=True)
    home = work / "home"
    with _temporary_user(home), _sshd(work, public_key, home) as port:
        yield port, home


@contextmanager
def _temporary_user(home: Path) -> Iterator[None]:
    with contextlib.suppress(KeyError):
        pwd.getpwnam(USER)
        # A run that was killed left it: its home is gone with that run's directory.
        commands.run(["userdel", USER], timeout=30)
    # Without a password ("*"), not locked ("!"): sshd without PAM refuses locked accounts even with a key.
    argv = ["useradd", "--system", "--no-create-home", "--home-dir", home, "--shell", "/bin/sh", "--password", "*"]
    commands.run([*argv, USER], timeout=30)
    try:
        home.mkdir()
        entry = pwd.getpwnam(USER)
        os.chown(home, entry.pw_uid, entry.pw_gid)
        yield
    finally:
        commands.run(["userdel", USER], timeout=30)


@contextmanager
def _sshd(work: Path, public_key: str, home: Path) -> Iterator[int]:
    host_key = work / "ssh_host_ed25519_key"
    commands.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "bench-sshd", "-f", host_key], timeout=30)
    authorized = work / "authorized_keys"
    authorized.write_text(public_key + "\n")
    authorized.chmod(0o600)
    # sshd reads it as the user.
    os.chown(authorized, pwd.getpwnam(USER).pw_uid, -1)
    port = network.free_port()
    config = work / "sshd_config"
    config.write_text(
        "\n".join(
            [
                f"Port {port}",
                "ListenAddress 127.0.0.1",
                f"HostKey {host_key}",
                f"PidFile {work / 'sshd.pid'}",
                f"AuthorizedKeysFile {authorized}",
                "PermitRootLogin no",
                "PubkeyAuthentication yes",
                "PasswordAuthentication no",
                "KbdInteractiveAuthentication no",
                "UsePAM no",
                # The run's directory is not root's home: its modes are not sshd's business here.
                "StrictModes no",
                "PrintMotd no",
                "PrintLastLog no",
                "UseDNS no",
                f"Subsystem sftp {_SFTP_SERVER}",
                "",
            ]
        )
    )
    # sshd refuses to start without its privilege separation directory (systemd makes it for the service).
    separation = Path("/run/sshd")
    made_separation = not separation.exists()
    if made_separation:
        separation.mkdir(mode=0o755, parents=True)
    commands.run([SSHD, "-t", "-f", config], timeout=30)
    log = (work / "sshd.log").open("ab")
    process = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    log.close()
    try:
        _wait_listening(port, process, work / "sshd.log")
        yield port
    finally:
        process.terminate()
        try:
            process.wait(_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if made_separation:
            shutil.rmtree(separation, ignore_errors=True)


def _wait_listening(port: int, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + _START_TIMEOUT
    while True:
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"sshd did not start (exit status {process.poll()}): {log.read_text()[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
