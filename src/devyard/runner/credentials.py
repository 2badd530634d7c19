"""The runner's credential: traded once for the one-time exchange token, then kept in the state directory.

The agent calls ``obtain`` when it starts. A credential file (``<state_dir>/credential.json``, mode 0600)
wins over an exchange token, so a restarted runner needs no new token (and the spent one it may still be
given on its command line does no harm).

The exchange survives a kill at any point: the runner makes its credential itself and writes it to
``credential.json.pending`` before it asks the server to accept it. A runner killed after the server said yes
but before ``credential.json`` was written finds the pending credential on its next start, asks the server
whose it is (``/whoami``) and keeps it; if the server never accepted it, the runner asks again with the same one.
"""

from __future__ import annotations

import json
import logging
import secrets
from pathlib import Path

import httpx
import pydantic

from devyard.client import ApiError, AsyncClient, TransportError
from devyard.runner.atomic_file import write_atomically
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
    _write_private(path, {**credential.model_dump(mode="json"), "server": server})


def _write_private(path: Path, document: dict[str, str]) -> None:
    write_atomically(path, json.dumps(document).encode(), mode=0o600)


def _pending_path(path: Path) -> Path:
    return path.with_name(path.name + ".pending")


def _proposal(pending: Path, server: str) -> str:
    """The credential this runner proposes: the one a killed earlier attempt proposed, or a new random one,
    written down before it is sent."""
    try:
        document = json.loads(pending.read_text())
        proposed = document["credential"]
        if isinstance(proposed, str) and document.get("server") == server:
            return proposed
    except FileNotFoundError:
        pass
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("ignoring the damaged pending credential %s: %s", pending, exc)
    proposed = "dyr_" + secrets.token_urlsafe(32)
    _write_private(pending, {"credential": proposed, "server": server})
    return proposed


async def _accepted(client: AsyncClient, proposed: str) -> RunnerCredential | None:
    """The credential if the server already accepted the proposal (an earlier exchange that was cut off after it
    was committed), None if it does not know it."""
    client.set_token(proposed)
    try:
        who = await client.get("/api/v1/whoami")
    except ApiError as exc:
        if exc.status == 401:
            return None
        raise
    finally:
        client.clear_token()
    if who.get("principal") != "runner" or not who.get("organization_id"):
        return None
    return RunnerCredential(runner_id=who["id"], organization_id=who["organization_id"], token=proposed)


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
    pending = _pending_path(path)
    # After a cut-off attempt the server may have accepted our proposal: ask before proposing again.
    resumed = pending.exists()
    if not exchange_token and not resumed:
        raise CredentialError(f"no credential in {path} and no exchange token to get one")
    clock = clock or SystemClock()
    retry = Backoff(backoff or BackoffPolicy(base=0.5, cap=30.0))
    proposed = _proposal(pending, server)
    async with AsyncClient(server, transport=transport) as client:
        while True:
            try:
                credential = await _accepted(client, proposed) if resumed else None
                if credential is None:
                    if not exchange_token:
                        raise CredentialError(
                            f"no credential in {path}, the server does not know the one proposed in {pending},"
                            " and there is no exchange token to get one"
                        )
                    body = RunnerExchange(exchange_token=exchange_token, credential=proposed)
                    answer = await client.post("/api/v1/runners/exchange", body.model_dump(mode="json"))
                    credential = RunnerCredential.model_validate(answer)
                break
            except TransportError as exc:
                reason = str(exc)
            except ApiError as exc:
                if exc.status < 500 and exc.status != 429:
                    raise CredentialError(f"the server refused the exchange token: {exc}") from exc
                reason = str(exc)
            # The answer may have been lost after the server committed the exchange: ask first next time.
            resumed = True
            delay = retry.next_delay()
            log.warning("cannot exchange the token yet, retrying in %.1fs: %s", delay, reason)
            await clock.sleep(delay)
    save(path, credential, server=server)
    pending.unlink(missing_ok=True)
    log.info("runner %s registered; credential kept in %s", credential.runner_id, path)
    return credential
