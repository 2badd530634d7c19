"""Ship the environments' log files to the management plane, which never connects to a runner.

Other parts of the runner write ``<log root>/<environment id>/<stream>.log`` (``build.log``, ``lifecycle.log``,
``automations/<id>.log``), appending, and may truncate a file to keep its tail. ``LogShipper.run`` (started by
the agent beside its other loops) looks at them every ``poll_interval`` and sends what is new with
``POST /api/v1/environments/{id}/logs``, a batch per environment of at most ``max_request_bytes``.

- What was shipped, per stream its ``epoch`` and byte ``offset``, is kept in ``<log root>/.shipped.json``
  (replaced whole after each batch), so a restarted runner goes on where it stopped. The server stores a chunk
  once, so a batch sent again after a crash or a lost answer does no harm.
- A file smaller than what was shipped, or another file under the same name, restarted: the stream's epoch goes
  up and the file is shipped from its start, which tells readers so.
- Chunks end at a line's end when they can: a line still being written is held back one poll, then shipped as it
  is (a progress bar never gets its newline). They never end inside a UTF-8 character; bytes that are not UTF-8,
  and NUL, become ``?`` one for one, so that offsets stay byte offsets of the file.
- The server unreachable: the loop backs off (``BackoffPolicy``) and tries again; nothing is lost, the files are
  the buffer. 429: that environment waits the Retry-After. 404 or 403 (the environment is deleted, or no longer
  this runner's): its files are no longer shipped; ``forget`` says the same from the agent.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from devyard.client import ApiError, AsyncClient, TransportError
from devyard.runner.atomic_file import write_atomically
from devyard.runner.backoff import Backoff, BackoffPolicy
from devyard.runner.clock import Clock, SystemClock
from devyard.wire.logs import STREAM_PATTERN

__all__ = ["STATE_FILE", "LogShipper", "text_of"]

log = logging.getLogger(__name__)

#: Where the shipper remembers what it shipped, inside the log root (hidden: not an environment).
STATE_FILE: Final = ".shipped.json"
#: Raw bytes per request: JSON may escape a control character into six bytes, and the server takes 1 MiB.
MAX_REQUEST_BYTES: Final = 128 * 1024
_STREAM = re.compile(STREAM_PATTERN)
#: Bytes that are not UTF-8 (decoded as lone surrogates) and NUL, each to one ``?``.
_UNSHIPPABLE = {0: "?", **{code: "?" for code in range(0xDC80, 0xDD00)}}


def text_of(raw: bytes) -> str:
    """``raw`` as text whose UTF-8 encoding has exactly ``len(raw)`` bytes."""
    return raw.decode("utf-8", "surrogateescape").translate(_UNSHIPPABLE)


def _whole_characters(raw: bytes) -> int:
    """The length of ``raw`` without a UTF-8 character cut off at its end."""
    for back in range(1, min(4, len(raw)) + 1):
        byte = raw[-back]
        if byte & 0xC0 == 0x80:
            continue  # a continuation byte: its lead is further back
        needed = 2 if byte & 0xE0 == 0xC0 else 3 if byte & 0xF0 == 0xE0 else 4 if byte & 0xF8 == 0xF0 else 1
        return len(raw) - back if needed > back else len(raw)
    return len(raw)


@dataclass
class _Stream:
    epoch: int = 0
    offset: int = 0
    inode: int = 0
    #: The size at which a line still being written was held back; shipped when the next look finds the same.
    held_at: int | None = None


@dataclass
class _Environment:
    streams: dict[str, _Stream] = field(default_factory=dict)
    gone: bool = False
    retry_at: float = 0.0
    failures: Backoff = field(default_factory=Backoff)


@dataclass(frozen=True)
class _Piece:
    stream: str
    epoch: int
    offset: int
    raw: bytes
    inode: int


class LogShipper:
    """Ships ``log_root``'s files through ``client`` (the runner's, authenticated as the runner) until cancelled."""

    def __init__(
        self,
        client: AsyncClient,
        log_root: Path,
        *,
        clock: Clock | None = None,
        poll_interval: float = 0.5,
        max_request_bytes: int = MAX_REQUEST_BYTES,
        backoff: BackoffPolicy | None = None,
    ) -> None:
        self.client = client
        self.log_root = log_root
        self.clock = clock or SystemClock()
        self.poll_interval = poll_interval
        self.max_request_bytes = max_request_bytes
        self._backoff = Backoff(backoff or BackoffPolicy(base=0.5, cap=30.0))
        self._environments: dict[str, _Environment] = {}
        self._loaded = False

    async def run(self) -> None:
        """Ship forever; never raises but ``CancelledError``. Unreachable servers are waited out."""
        try:
            while True:
                try:
                    await self.ship_pending()
                    self._backoff.reset()
                    delay = self.poll_interval
                except TransportError as exc:
                    delay = self._backoff.next_delay()
                    log.warning("cannot ship logs (%s); again in %.1fs", exc, delay)
                except Exception:
                    delay = self._backoff.next_delay()
                    log.exception("shipping logs failed; again in %.1fs", delay)
                await self.clock.sleep(delay)
        finally:
            # Stopped (the runner stops): keep what the last pass shipped, so the next runner does not send it
            # again. A killed runner loses at most one pass, which the server then skips as already stored.
            if self._loaded:
                try:
                    self._save()
                except OSError as exc:
                    log.warning("cannot keep what was shipped in %s: %s", self.log_root / STATE_FILE, exc)

    def forget(self, environment_id: str) -> None:
        """Ship no more of the environment's files (it was deleted); its record goes with its directory."""
        self._environments.setdefault(environment_id, _Environment()).gone = True

    async def ship_pending(self) -> None:
        """One pass: every environment's new bytes, in as many batches as they need. ``TransportError`` when the
        server cannot be reached (what was shipped before it is remembered)."""
        if not self._loaded:
            await asyncio.to_thread(self._load)
            self._loaded = True
        present = await asyncio.to_thread(self._environment_ids)
        for environment_id in set(self._environments) - present:
            del self._environments[environment_id]  # its directory went: nothing to ship or remember
        for environment_id in sorted(present):
            environment = self._environments.setdefault(environment_id, _Environment())
            while not environment.gone and environment.retry_at <= self.clock.now():
                pieces, full = await asyncio.to_thread(self._next_batch, environment_id, environment)
                if not pieces:
                    break
                if not await self._send(environment_id, environment, pieces) or not full:
                    break
        await asyncio.to_thread(self._save)

    async def _send(self, environment_id: str, environment: _Environment, pieces: list[_Piece]) -> bool:
        body = {
            "chunks": [
                {"stream": p.stream, "epoch": p.epoch, "offset": p.offset, "data": text_of(p.raw)} for p in pieces
            ]
        }
        try:
            answer = await self.client.post(f"/api/v1/environments/{environment_id}/logs", body)
        except ApiError as exc:
            if exc.status in (403, 404):
                log.info("environment %s is gone or no longer this runner's: its logs stay here", environment_id)
                environment.gone = True
            elif exc.status == 429:
                wait = (exc.details or {}).get("retry_after", 1) if isinstance(exc.details, dict) else 1
                environment.retry_at = self.clock.now() + float(wait)
            else:
                delay = environment.failures.next_delay()
                environment.retry_at = self.clock.now() + delay
                log.error("the server refused logs of %s (%s); again in %.1fs", environment_id, exc, delay)
            return False
        environment.failures.reset()
        for piece in pieces:
            stream = environment.streams.setdefault(piece.stream, _Stream())
            stream.epoch, stream.offset, stream.inode = piece.epoch, piece.offset + len(piece.raw), piece.inode
        for position in (answer or {}).get("positions", []):
            known = environment.streams.get(position["stream"])
            if known is not None and position["epoch"] > known.epoch:
                # The server has a newer epoch than this runner remembers (its state file was lost): go on
                # from where the server stands rather than have every chunk refused as old.
                known.epoch, known.offset = position["epoch"], position["end"]
        return True

    def _environment_ids(self) -> set[str]:
        try:
            entries = list(os.scandir(self.log_root))
        except FileNotFoundError:
            return set()
        return {entry.name for entry in entries if entry.is_dir() and not entry.name.startswith(".")}

    def _next_batch(self, environment_id: str, environment: _Environment) -> tuple[list[_Piece], bool]:
        """The next bytes to ship of the environment's streams, at most ``max_request_bytes``; and whether the
        budget ran out before everything was taken."""
        budget = self.max_request_bytes
        pieces: list[_Piece] = []
        for stream_name, path in sorted(self._streams(self.log_root / environment_id).items()):
            if budget <= 0:
                return pieces, True
            try:
                with path.open("rb") as file:
                    status = os.fstat(file.fileno())
                    stream = environment.streams.setdefault(stream_name, _Stream(inode=status.st_ino))
                    if status.st_size < stream.offset or status.st_ino != stream.inode:
                        log.info("%s restarted: shipping it from its start", path)
                        stream.epoch, stream.offset, stream.inode, stream.held_at = (
                            stream.epoch + 1,
                            0,
                            status.st_ino,
                            None,
                        )
                    if status.st_size == stream.offset:
                        continue
                    file.seek(stream.offset)
                    raw = file.read(min(budget, status.st_size - stream.offset))
            except FileNotFoundError:
                continue
            raw = self._cut(raw, stream, reached_end=stream.offset + len(raw) >= status.st_size, size=status.st_size)
            if raw:
                pieces.append(_Piece(stream_name, stream.epoch, stream.offset, raw, stream.inode))
                budget -= len(raw)
        return pieces, budget <= 0

    @staticmethod
    def _cut(raw: bytes, stream: _Stream, *, reached_end: bool, size: int) -> bytes:
        if reached_end and raw.endswith(b"\n"):
            stream.held_at = None
            return raw
        line_end = raw.rfind(b"\n") + 1
        if not reached_end:
            return raw[:line_end] if line_end else raw[: _whole_characters(raw)]
        if stream.held_at == size:
            stream.held_at = None  # nothing was added since the last look: ship the unfinished line
            return raw
        stream.held_at = size
        return raw[:line_end]

    @staticmethod
    def _streams(directory: Path) -> dict[str, Path]:
        found: dict[str, Path] = {}
        for path in directory.rglob("*.log"):
            name = path.relative_to(directory).as_posix().removesuffix(".log")
            if _STREAM.match(name) and path.is_file():
                found[name] = path
        return found

    def _load(self) -> None:
        try:
            saved = json.loads((self.log_root / STATE_FILE).read_bytes())
        except FileNotFoundError:
            return
        except ValueError as exc:
            log.warning("%s is unreadable (%s): shipping every log again", self.log_root / STATE_FILE, exc)
            return
        for environment_id, record in saved.get("environments", {}).items():
            environment = self._environments.setdefault(environment_id, _Environment())
            environment.gone = bool(record.get("gone", False))
            for name, stream in record.get("streams", {}).items():
                environment.streams[name] = _Stream(int(stream["epoch"]), int(stream["offset"]), int(stream["inode"]))

    def _save(self) -> None:
        record: dict[str, Any] = {
            environment_id: {
                "gone": environment.gone,
                "streams": {
                    name: {"epoch": s.epoch, "offset": s.offset, "inode": s.inode}
                    for name, s in environment.streams.items()
                },
            }
            for environment_id, environment in self._environments.items()
        }
        data = json.dumps({"environments": record}, sort_keys=True).encode()
        path = self.log_root / STATE_FILE
        try:
            if path.read_bytes() == data:
                return
        except FileNotFoundError:
            if not record:
                return
        write_atomically(path, data, mode=0o600)
