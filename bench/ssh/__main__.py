"""``python -m bench.ssh``: scp throughput and ``ssh ... true`` latency through devyard's SSH gateway beside
Debian's OpenSSH sshd, with the same client and options, in one run; prints one report with the issue's targets.

Exits 0 when both targets were measured to the end, whatever the figures; 1 when something failed (the error is
printed). Needs root (the linux runtime), runc, docker-registry, openssh-client and openssh-server
(``bench/ssh/setup``).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import traceback
from contextlib import ExitStack
from pathlib import Path

from bench.ssh import client, devyard_gateway, peer_sshd
from bench.start import commands, test_image
from support import images, registry

#: Targets from issue 5: the gateway's scp throughput and per-command latency against sshd's.
THROUGHPUT_TARGET = 0.5
LATENCY_TARGET = 1.5
_CHUNK = 1 << 20


def _options(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.ssh", description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, help="scp copies into each target (default 5; --quick 1)")
    parser.add_argument("--size-mib", type=int, help="the copied file's size, MiB (default 256; --quick 8)")
    parser.add_argument("--commands", type=int, help="`ssh ... true` runs against each target (default 20; --quick 3)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 1 copy of 8 MiB, 3 commands each")
    options = parser.parse_args(argv)
    options.runs = options.runs if options.runs is not None else (1 if options.quick else 5)
    options.size_mib = options.size_mib if options.size_mib is not None else (8 if options.quick else 256)
    options.commands = options.commands if options.commands is not None else (3 if options.quick else 20)
    if min(options.runs, options.size_mib, options.commands) < 1:
        parser.error("--runs, --size-mib and --commands must be positive")
    return options


def _random_file(path: Path, mib: int) -> None:
    with path.open("wb") as file:
        for _ in range(mib):
            file.write(os.urandom(_CHUNK))


def _percentile(samples: list[float], fraction: float) -> float:
    """Nearest rank: the smallest sample with at least ``fraction`` of them at or below it."""
    ordered = sorted(samples)
    rank = max(1, -(-len(ordered) * fraction // 1))
    return ordered[int(rank) - 1]


def _remote_size(target: client.Target) -> int:
    answer = client.run_command(target, f"wc -c < {target.remote_path}")
    if answer.returncode != 0:
        raise RuntimeError(f"{target.name}: cannot read the copy's size: {answer.stderr.strip()}")
    return int(answer.stdout.strip())


def _measure(options: argparse.Namespace, work: Path, lines: list[str]) -> None:
    with ExitStack() as stack:
        keys = work / "client"
        keys.mkdir(mode=0o700)
        key = keys / "id_ed25519"
        commands.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "bench-ssh", "-f", key], timeout=30)
        public_key = key.with_suffix(".pub").read_text().strip()
        payload = work / "payload.bin"
        _random_file(payload, options.size_mib)

        server, _ = stack.enter_context(registry.running_registry(work / "registry"))
        # The test suite's busybox image: it starts in a fraction of a second and needs no mmdebstrap; what is
        # measured is the gateway (its SFTP worker is the runner's Python, not the image's), not the image.
        layout = test_image.busybox(work / "busybox-oci")
        image = images.push(layout.path, server.host, "bench/busybox:latest")
        endpoint = stack.enter_context(
            devyard_gateway.running_environment(work / "devyard", image, server.host, public_key)
        )
        sshd_port, sshd_home = stack.enter_context(peer_sshd.running_sshd(work / "sshd", public_key))
        targets = [
            client.Target("sshd", "127.0.0.1", sshd_port, peer_sshd.USER, str(sshd_home / "copy.bin"),
                          key, work / "known_hosts.sshd"),
            # The gateway (asyncssh) offers no sntrup761 key exchange, OpenSSH's default, which costs ~0.2 s of
            # CPU per connection here: sshd again with the gateway's key exchange, for a like-for-like latency.
            client.Target("sshd, kex curve25519-sha256", "127.0.0.1", sshd_port, peer_sshd.USER,
                          str(sshd_home / "copy.bin"), key, work / "known_hosts.sshd",
                          ("-o", "KexAlgorithms=curve25519-sha256")),
            client.Target("devyard gateway", endpoint.host, endpoint.port, endpoint.user, "/tmp/copy.bin",
                          key, work / "known_hosts.gateway"),
        ]  # fmt: skip
        main = [targets[0], targets[2]]
        ciphers = {}
        for target in targets:
            first = client.run_command(target, "true")  # not timed: records the host key
            if first.returncode != 0:
                raise RuntimeError(f"{target.name}: ssh true exited {first.returncode}: {first.stderr.strip()}")
            ciphers[target.name] = client.negotiated(target)

        latency: dict[str, list[float]] = {target.name: [] for target in targets}
        throughput: dict[str, list[float]] = {target.name: [] for target in main}
        # Turn about, so that whatever else the machine does falls on both.
        for _ in range(options.commands):
            for target in targets:
                latency[target.name].append(client.ssh_true_seconds(target))
        for _ in range(options.runs):
            for target in main:
                seconds = client.scp_seconds(target, payload)
                throughput[target.name].append(options.size_mib / seconds)
        for target in main:
            size = _remote_size(target)
            if size != options.size_mib * _CHUNK:
                raise RuntimeError(f"{target.name}: the copy has {size} bytes, not {options.size_mib * _CHUNK}")

    sshd, sshd_kex, gateway = (target.name for target in targets)
    lines.append("negotiated:")
    lines.extend(f"  {name}: {cipher}" for name, cipher in ciphers.items())
    lines.append("")
    lines.append(f"throughput: scp of {options.size_mib} MiB of random data, MiB/s   median     min     max   n")
    for name in (sshd, gateway):
        samples = throughput[name]
        lines.append(
            f"  {name:<55}{statistics.median(samples):>8.1f}{min(samples):>8.1f}{max(samples):>8.1f}{len(samples):>4d}"
        )
    ratio = statistics.median(throughput[gateway]) / statistics.median(throughput[sshd])
    met = "met" if ratio >= THROUGHPUT_TARGET else "MISSED"
    lines.append(f"  ratio gateway/sshd {ratio:.2f}x, target >= {THROUGHPUT_TARGET}x: {met}")
    lines.append("")
    lines.append("latency: ssh ... true, a new connection each, seconds     median     p90     min     max   n")
    for name in (sshd, sshd_kex, gateway):
        samples = latency[name]
        lines.append(
            f"  {name:<48}{statistics.median(samples):>9.3f}{_percentile(samples, 0.9):>8.3f}"
            f"{min(samples):>8.3f}{max(samples):>8.3f}{len(samples):>4d}"
        )
    default_ratio = statistics.median(latency[gateway]) / statistics.median(latency[sshd])
    ratio = statistics.median(latency[gateway]) / statistics.median(latency[sshd_kex])
    met = "met" if ratio <= LATENCY_TARGET else "MISSED"
    lines.append(
        f"  ratio gateway/sshd with the same key exchange {ratio:.2f}x (medians), target <= {LATENCY_TARGET}x: {met}"
    )
    lines.append(f"  (gateway/sshd with each one's default key exchange: {default_ratio:.2f}x)")


def _machine() -> str:
    model = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    return f"{os.cpu_count()} cores ({model}), {platform.system()} {platform.release()}"


def main(argv: list[str] | None = None) -> int:
    options = _options(argv)
    import asyncssh

    client_version = subprocess.run(["ssh", "-V"], capture_output=True, text=True, check=False).stderr.strip()
    lines = [
        "== devyard's SSH gateway beside OpenSSH sshd, the same client ==",
        f"machine: {_machine()}",
        f"client: {client_version.split(',')[0]}; sshd: {peer_sshd.version()}; "
        f"gateway: asyncssh {asyncssh.__version__}",
        f"runs: {options.runs} copies of {options.size_mib} MiB and {options.commands} commands against each target, "
        "turn about",
    ]
    failed = False
    work = Path(tempfile.mkdtemp(prefix="devyard-bench-ssh-"))
    # Root inside the environment is an unprivileged id outside: it must reach the runner's state below this.
    work.chmod(0o755)
    try:
        _measure(options, work, lines)
    except Exception as exc:
        traceback.print_exc()
        failed = True
        lines.append(f"FAILED: {exc}".splitlines()[0][:300])
    finally:
        commands.unmount_under(work)
        shutil.rmtree(work, ignore_errors=True)
    print("\n".join(lines), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
