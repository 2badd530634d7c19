"""The runner's credential: traded once for the one-time exchange token, then kept in the state directory.

The agent calls ``obtain`` when it starts. A credential file (``<state_dir>/credential.json``, mode 0600)
wins over an exchange token, so a restarted runner needs no new token (and the spent one it may still be
given on its command line does no harm).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

import httpx
import pydantic

from devyard.client import ApiError, AsyncClient, TransportError
from devyard.runner.backoff import Backoff, BackoffPolicy
from devyard.runner.clock import Clock, SystemClock
from devyard.runner.errors import CredentialError
from devyard.wire.runners import RunnerCredential, RunnerExchange

__all__ = ["load", "obtain", "save"]

log = logging.getLogger(__name__)


def load(path: Path) -> RunnerCredential | None:
    """The stored credential, or None if there is none; a damaged file is an error, not a reason to forget."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise CredentialError(f"cannot read the runner's credential {path}: {exc}") from exc
    try:
        return RunnerCredential.model_validate_json(text)
    except pydantic.ValidationError as exc:
        raise CredentialError(f"the runner's credential {path} is damaged: {exc}") from exc


def save(path: Path, credential: RunnerCredential, *, server: str) -> None:
    """Write the credential readable by its owner only, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {**credential.model_dump(mode="json"), "server": server}
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=".credential-", suffix=".json")
    try:
        os.fchmod(descriptor, 0o600)
        with os.fdopen(descriptor, "w") as file:
            json.dump(document, file)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


async def obtain(
    path: Path,
    *,
    server: str,
    exchange_token: str | None,
    transport: httpx.AsyncBaseTransport | None = None,
    clock: Clock | None = None,
    backoff: BackoffPolicy | None = None,
) -> RunnerCredential:
    """The stored credential, or a new one for the exchange token (waiting, with backoff, for the server)."""
    stored = load(path)
    if stored is not None:
        return stored
    if not exchange_token:
        raise CredentialError(f"no credential in {path} and no exchange token to get one")
    clock = clock or SystemClock()
    retry = Backoff(backoff or BackoffPolicy(base=0.5, cap=30.0))
    body = RunnerExchange(exchange_token=exchange_token).model_dump(mode="json")
    async with AsyncClient(server, transport=transport) as client:
        while True:
            try:
                answer = await client.post("/api/v1/runners/exchange", body)
                break
            except TransportError as exc:
                reason = str(exc)
            except ApiError as exc:
                if exc.status < 500 and exc.status != 429:
                    raise CredentialError(f"the server refused the exchange token: {exc}") from exc
                reason = str(exc)
            delay = retry.next_delay()
            log.warning("cannot exchange the token yet, retrying in %.1fs: %s", delay, reason)
            await clock.sleep(delay)
    credential = RunnerCredential.model_validate(answer)
    save(path, credential, server=server)
    log.info("runner %s registered; credential kept in %s", credential.runner_id, path)
    return credential
