"""``write_atomically``: a file replaced whole or not at all, for the runner's records and state files.

Its callers (the linux runtime's records, the runner's credential, the lifecycle state, the fake runtime's state)
must never leave a half-written file for the next process to read after a kill or a full disk: the data goes to
a temporary file beside the target, flushed to disk, given its mode, then renamed over the target.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

__all__ = ["write_atomically"]


def write_atomically(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` (making its directory if missing); the old content stays on any error."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(descriptor, mode)
        with os.fdopen(descriptor, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
