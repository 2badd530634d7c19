"""The runner's exchange against the real server, and its crash safety: a runner cut off after the server accepted
its credential, but before it wrote the credential down, still ends up with a credential that works."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from devyard.client import ApiError, Client
from devyard.runner import credentials
from devyard.runner.backoff import BackoffPolicy
from devyard.runner.errors import CredentialError
from support import live_server


@pytest.fixture
def live(tmp_path: Path) -> Iterator[live_server.LiveServer]:
    with live_server.serve_in_thread(live_server.settings_for(tmp_path / "server")) as server:
        yield server


def new_runner(live: live_server.LiveServer, name: str = "r1") -> tuple[str, str]:
    with Client(live.url, live.admin_token) as admin:
        created = admin.post("/api/v1/runners", {"metadata": {"name": name}})
    return created["runner"]["metadata"]["id"], created["exchange_token"]


def whoami(live: live_server.LiveServer, token: str) -> dict[str, str]:
    with Client(live.url, token) as client:
        return dict(client.get("/api/v1/whoami"))


def test_the_server_accepts_the_proposed_credential_once(live: live_server.LiveServer) -> None:
    runner_id, token = new_runner(live)
    proposed = "dyr_" + "a" * 43
    with Client(live.url) as anonymous:
        answer = anonymous.post("/api/v1/runners/exchange", {"exchange_token": token, "credential": proposed})
        assert answer["token"] == proposed
        assert whoami(live, proposed)["id"] == runner_id
        with pytest.raises(ApiError) as spent:
            anonymous.post("/api/v1/runners/exchange", {"exchange_token": token, "credential": "dyr_" + "b" * 43})
        assert spent.value.status == 401


def test_a_credential_that_is_taken_or_malformed_is_refused(live: live_server.LiveServer) -> None:
    _, first = new_runner(live, "r1")
    _, second = new_runner(live, "r2")
    proposed = "dyr_" + "c" * 43
    with Client(live.url) as anonymous:
        anonymous.post("/api/v1/runners/exchange", {"exchange_token": first, "credential": proposed})
        with pytest.raises(ApiError) as taken:
            anonymous.post("/api/v1/runners/exchange", {"exchange_token": second, "credential": proposed})
        assert taken.value.status == 409
        with pytest.raises(ApiError) as short:
            anonymous.post("/api/v1/runners/exchange", {"exchange_token": second, "credential": "dyr_short"})
        assert short.value.status == 422
        # Neither refusal spent the second token.
        answer = anonymous.post("/api/v1/runners/exchange", {"exchange_token": second})
    assert whoami(live, answer["token"])["principal"] == "runner"


async def test_obtain_writes_the_credential_and_no_pending_file(live: live_server.LiveServer, tmp_path: Path) -> None:
    runner_id, token = new_runner(live)
    path = tmp_path / "credential.json"
    credential = await credentials.obtain(path, server=live.url, exchange_token=token)
    assert credential.runner_id == runner_id
    assert credentials.load(path) == credential
    assert path.stat().st_mode & 0o777 == 0o600
    assert not (tmp_path / "credential.json.pending").exists()


async def test_a_runner_cut_off_after_the_exchange_keeps_its_credential(
    live: live_server.LiveServer, tmp_path: Path
) -> None:
    """What a kill between the server's commit and the write of credential.json leaves: the pending proposal,
    accepted by the server; the exchange token is spent."""
    runner_id, token = new_runner(live)
    path = tmp_path / "credential.json"
    proposed = "dyr_" + "d" * 43
    (tmp_path / "credential.json.pending").write_text(json.dumps({"credential": proposed, "server": live.url}))
    with Client(live.url) as anonymous:
        anonymous.post("/api/v1/runners/exchange", {"exchange_token": token, "credential": proposed})

    credential = await credentials.obtain(path, server=live.url, exchange_token=token)
    assert (credential.runner_id, credential.token) == (runner_id, proposed)
    assert credential.organization_id == whoami(live, live.admin_token)["memberships"][0]["metadata"]["organization_id"]
    assert credentials.load(path) == credential
    assert not (tmp_path / "credential.json.pending").exists()


async def test_a_runner_cut_off_before_the_exchange_proposes_the_same_credential(
    live: live_server.LiveServer, tmp_path: Path
) -> None:
    runner_id, token = new_runner(live)
    path = tmp_path / "credential.json"
    proposed = "dyr_" + "e" * 43
    (tmp_path / "credential.json.pending").write_text(json.dumps({"credential": proposed, "server": live.url}))
    credential = await credentials.obtain(path, server=live.url, exchange_token=token)
    assert (credential.runner_id, credential.token) == (runner_id, proposed)


async def test_a_lost_answer_is_recovered_without_spending_another_token(
    live: live_server.LiveServer, tmp_path: Path
) -> None:
    """The server commits the exchange but its answer never arrives: the retry asks whoami instead of
    presenting the spent token again."""
    runner_id, token = new_runner(live)

    class LoseFirstExchangeAnswer(httpx.AsyncBaseTransport):
        def __init__(self) -> None:
            self.inner = httpx.AsyncHTTPTransport()
            self.lost = 0

        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            response = await self.inner.handle_async_request(request)
            if request.url.path.endswith("/runners/exchange") and not self.lost:
                await response.aread()
                self.lost += 1
                raise httpx.ReadError("connection reset", request=request)
            return response

    transport = LoseFirstExchangeAnswer()
    path = tmp_path / "credential.json"
    credential = await credentials.obtain(
        path,
        server=live.url,
        exchange_token=token,
        transport=transport,
        backoff=BackoffPolicy(base=0.01, cap=0.01),
    )
    assert transport.lost == 1
    assert credential.runner_id == runner_id
    assert whoami(live, credential.token)["id"] == runner_id


async def test_a_pending_proposal_the_server_never_saw_needs_a_token(
    live: live_server.LiveServer, tmp_path: Path
) -> None:
    path = tmp_path / "credential.json"
    (tmp_path / "credential.json.pending").write_text(json.dumps({"credential": "dyr_" + "f" * 43, "server": live.url}))
    with pytest.raises(CredentialError, match="no exchange token"):
        await credentials.obtain(path, server=live.url, exchange_token=None)
