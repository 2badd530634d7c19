"""What one server process holds while it runs: settings, database, change feed, caches, the secrets key.

Made by ``app.create_app``'s lifespan and handed to routes and loops through ``request.app.state.devyard``.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography.fernet import Fernet, InvalidToken

from devyard.server.auth import CredentialCache
from devyard.server.database.engine import Database
from devyard.server.settings import ServerSettings
from devyard.server.watch import ChangeFeed

if TYPE_CHECKING:
    from devyard.server.group_commit import GroupCommit

__all__ = ["SecretBox", "ServerState", "load_secret_key"]


class SecretBox:
    """Encrypts secret values at rest (Fernet: AES-128-CBC with HMAC-SHA256)."""

    def __init__(self, key: str) -> None:
        self._key = key.encode()
        try:
            self._fernet = Fernet(key.encode())
        except (ValueError, TypeError) as exc:
            raise ValueError("the secret key must be 32 bytes in url-safe base64 (Fernet.generate_key())") from exc

    def fingerprint(self) -> str:
        """Names the key without revealing it: an HMAC of a constant."""
        return "hmac-sha256:" + hmac.new(self._key, b"devyard secret key fingerprint", hashlib.sha256).hexdigest()

    def derive_key(self, purpose: bytes) -> bytes:
        """A key for one purpose (HMAC-SHA256 of ``purpose``), the same on every replica that shares the key."""
        return hmac.new(self._key, purpose, hashlib.sha256).digest()

    def seal(self, value: str) -> str:
        return self._fernet.encrypt(value.encode()).decode()

    def open(self, ciphertext: str) -> str:
        try:
            return self._fernet.decrypt(ciphertext.encode()).decode()
        except InvalidToken:
            raise ValueError("a secret cannot be decrypted with this server's key (was the key changed?)") from None


def load_secret_key(settings: ServerSettings) -> str:
    """The key from the settings, else the one kept in the state directory (made there on first start)."""
    if settings.secret_key:
        return settings.secret_key
    path = Path(settings.state_dir) / "secret-key"
    if path.exists():
        return path.read_text().strip()
    key = base64.urlsafe_b64encode(os.urandom(32)).decode()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        # Another process sharing the state directory made it a moment ago: use theirs.
        return _read_when_written(path)
    with os.fdopen(fd, "w") as handle:
        handle.write(key + "\n")
    return key


def _read_when_written(path: Path, attempts: int = 100) -> str:
    for _ in range(attempts):
        key = path.read_text().strip()
        if key:
            return key
        time.sleep(0.01)
    raise RuntimeError(f"{path} stays empty: remove it, or pass the key with --secret-key")


@dataclass
class ServerState:
    settings: ServerSettings
    database: Database
    feed: ChangeFeed
    secrets: SecretBox
    credentials: CredentialCache = field(default_factory=CredentialCache)
    #: Set when something the scheduler cares about changed in this process.
    schedule_soon: asyncio.Event = field(default_factory=asyncio.Event)
    #: Commits bursts of creates together (``group_commit.GroupCommit``); set by the app's lifespan.
    group_commit: GroupCommit | None = None
