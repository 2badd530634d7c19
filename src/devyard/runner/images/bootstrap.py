"""A Debian base image without a registry: mmdebstrap builds a root filesystem, the store imports it.

Called by ``devyard image bootstrap``. The result is named under ``devyard.local``, a registry host that is never
contacted, so environments can use it (``devyard.local/debian:bookworm``) on a host that reaches no registry.
The packages come from the host's Debian mirror (its apt sources), else ``http://deb.debian.org/debian``.
"""

from __future__ import annotations

import asyncio
import re
import secrets
from collections.abc import Sequence
from pathlib import Path

from devyard.runner.errors import PermanentError, TemporaryError
from devyard.runner.images.image import Image
from devyard.runner.images.store import ImageStore

__all__ = ["DEFAULT_PACKAGES", "bootstrap_debian", "host_debian_mirror"]

#: What a development environment expects of a base image (as the Dev Containers base images have them).
DEFAULT_PACKAGES = ("bash", "ca-certificates", "git", "procps", "python3", "sudo")
_FALLBACK_MIRROR = "http://deb.debian.org/debian"
_URI = re.compile(r"(?:^URIs:\s*|^deb\s+(?:\[[^\]]*\]\s+)?)(\S+)", re.MULTILINE)


def host_debian_mirror(sources: Path = Path("/etc/apt")) -> str:
    """The first Debian archive (not the security one) in the host's apt sources, else deb.debian.org."""
    files = [sources / "sources.list"]
    directory = sources / "sources.list.d"
    if directory.is_dir():
        files += sorted(directory.iterdir())
    for path in files:
        try:
            text = path.read_text()
        except OSError:
            continue
        for uri in _URI.findall(text):
            found = str(uri).rstrip("/")
            if found.endswith("/debian"):
                return found
    return _FALLBACK_MIRROR


async def bootstrap_debian(
    store: ImageStore,
    *,
    reference: str = "devyard.local/debian:bookworm",
    suite: str = "bookworm",
    packages: Sequence[str] = DEFAULT_PACKAGES,
    variant: str = "minbase",
    mirror: str | None = None,
) -> Image:
    """Build a Debian ``suite`` root (``variant`` minbase or apt, plus ``packages``) and import it as
    ``reference``. Needs root and mmdebstrap; takes a minute or two."""
    if variant not in ("minbase", "apt", "essential", "required", "important", "standard"):
        raise PermanentError(f"unknown mmdebstrap variant {variant!r}")
    tarball = store.root / f".tmp-bootstrap-{secrets.token_hex(4)}.tar"
    command = ["mmdebstrap", "--quiet", "--format=tar", f"--variant={variant}"]
    if packages:
        command.append(f"--include={','.join(packages)}")
    command += [suite, str(tarball), mirror or host_debian_mirror()]
    try:
        try:
            process = await asyncio.create_subprocess_exec(
                *command, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
            )
        except FileNotFoundError as exc:
            raise PermanentError("mmdebstrap is not installed (apt-get install mmdebstrap)") from exc
        _, stderr = await process.communicate()
        if process.returncode != 0:
            message = stderr.decode(errors="replace").strip()[-2000:]
            # Mirrors fail now and then; a bad package name or suite does not pass by itself.
            kind = (
                TemporaryError
                if re.search(r"(?i)temporary failure|connection|timed out|404", message)
                else PermanentError
            )
            raise kind(f"mmdebstrap {suite} failed (exit {process.returncode}): {message}")
        return await store.import_archive(tarball, reference)
    finally:
        await asyncio.to_thread(tarball.unlink, True)
