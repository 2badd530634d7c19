"""The port proxy in front of a real application in a fake environment: admission at each level, tickets, the
login page and its cookie, what the application sees, WebSockets and streamed responses, path- and host-based
URLs, refusals, and a flood of connections. The management plane's two answers (who a token is, the organization's
policy) come from a table here; ``test_ports_e2e`` asks the real one."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from websockets.asyncio.client import connect as websocket_connect
from websockets.exceptions import InvalidStatus

from devyard.wire.access import TicketClaims, sign_ticket

from .conftest import KEY, MEMBER, ORG, OWNER, RUNNER, ProxyWorld, environment, make_world


def client(**options: object) -> httpx.AsyncClient:
    return httpx.AsyncClient(trust_env=False, timeout=20, **options)  # type: ignore[arg-type]


def share(world: ProxyWorld, admission: str, port: int | None = None, protocol: str = "http") -> None:
    ports = [{"port": port or world.http, "admission": admission, "protocol": protocol}]
    world.environments["env_01app"] = environment("env_01app", ports=ports)


def ticket(user: str, environment_id: str = "env_01app", *, scope: str = "port", expires_in: int = 60) -> str:
    claims = TicketClaims(
        environment_id=environment_id,
        user_id=user,
        runner_id=RUNNER,
        scope=scope,  # type: ignore[arg-type]
        organization_id=ORG,
        exp=int(time.time()) + expires_in,
        nonce="0123456789",
    )
    return sign_ticket(claims, KEY)


async def test_admission_at_each_level(world: ProxyWorld) -> None:
    url = f"{world.base}/ports/env_01app/{world.http}/hello?x=1"
    world.proxy.policy_cache_seconds = 0
    async with client() as http:
        refused = await http.get(url)
        assert refused.status_code == 401 and "shared with its owner only" in refused.text
        assert "devyard env port url env_01app" in refused.text
        owner = await http.get(url, headers={"Authorization": "Bearer dyu_owner"})
        assert (owner.status_code, owner.text) == (200, "hello from /hello?x=1\n")
        assert owner.headers["connection"] == "close"
        member = await http.get(url, headers={"Authorization": "Bearer dyu_member"})
        assert member.status_code == 403 and "you (usr_member) are not among them" in member.text
        unknown = await http.get(url, headers={"Authorization": "Bearer dyu_nobody"})
        assert unknown.status_code == 401 and "does not accept this token" in unknown.text

        share(world, "organization")
        assert (await http.get(url, headers={"Authorization": "Bearer dyu_member"})).status_code == 200
        stranger = await http.get(url, headers={"Authorization": "Bearer dyu_stranger"})
        assert stranger.status_code == 403

        share(world, "everyone")
        assert (await http.get(url)).status_code == 200
        # The organization no longer allows public ports: the port counts as shared with the organization.
        world.public_ports[ORG] = False
        assert (await http.get(url)).status_code == 401
        assert (await http.get(url, headers={"Authorization": "Bearer dyu_member"})).status_code == 200
    # Tokens are asked about once per cache period, not once per request.
    assert world.whoami_calls.count("dyu_member") == 1
    assert world.activity.last("env_01app") is not None


async def test_port_tickets_are_good_many_times_for_their_environment_only(world: ProxyWorld) -> None:
    url = f"{world.base}/ports/env_01app/{world.http}/"
    async with client() as http:
        good = {"Authorization": f"Bearer {ticket(OWNER)}"}
        assert [(await http.get(url, headers=good)).status_code for _ in range(3)] == [200, 200, 200]
        exec_ticket = await http.get(url, headers={"Authorization": f"Bearer {ticket(OWNER, scope='exec')}"})
        assert exec_ticket.status_code == 401 and "not port" in exec_ticket.text
        other = await http.get(url, headers={"Authorization": f"Bearer {ticket(OWNER, 'env_01other')}"})
        assert other.status_code == 403
        expired = await http.get(url, headers={"Authorization": f"Bearer {ticket(OWNER, expires_in=-1)}"})
        assert expired.status_code == 401 and "expired" in expired.text
        member = await http.get(url, headers={"Authorization": f"Bearer {ticket(MEMBER)}"})
        assert member.status_code == 403


async def test_browsers_log_in_and_the_application_never_sees_devyard_credentials(world: ProxyWorld) -> None:
    prefix = f"/ports/env_01app/{world.http}"
    async with client() as http:
        redirected = await http.get(f"{world.base}{prefix}/headers?a=b", headers={"Accept": "text/html"})
        assert redirected.status_code == 302
        location = redirected.headers["location"]
        assert location == f"{prefix}/_devyard/login?next=%2Fports%2Fenv_01app%2F{world.http}%2Fheaders%3Fa%3Db"
        page = await http.get(world.base + location)
        assert page.status_code == 200 and '<form method="post"' in page.text

        # A pasted token; and a next that leaves the port is replaced by the port's root.
        form = {"token": "dyu_owner", "next": "https://evil.example/"}
        logged_in = await http.post(f"{world.base}{prefix}/_devyard/login", data=form)
        assert logged_in.status_code == 303 and logged_in.headers["location"] == f"{prefix}/"
        cookie = logged_in.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=Lax" in cookie and f"Path={prefix}" in cookie
        assert "Secure" not in cookie  # the proxy's URL is http

        seen = await http.get(
            f"{world.base}{prefix}/headers",
            headers={"Cookie": f"{cookie.split(';')[0]}; theirs=1", "X-Forwarded-For": "10.0.0.9"},
        )
        assert seen.status_code == 200
        headers = {name.lower(): value for name, value in seen.json()["headers"]}
        assert headers["cookie"] == "theirs=1"
        assert "authorization" not in headers
        assert headers["x-forwarded-prefix"] == prefix
        assert headers["x-forwarded-proto"] == "http"
        assert headers["x-forwarded-for"] == "10.0.0.9, 127.0.0.1"
        assert headers["connection"] == "close"

        # The application's own Authorization passes when the devyard credential is the cookie.
        own = await http.get(
            f"{world.base}{prefix}/headers",
            headers={"Cookie": cookie.split(";")[0], "Authorization": "Basic YXBwOmFwcA=="},
        )
        assert {name.lower(): value for name, value in own.json()["headers"]}["authorization"] == "Basic YXBwOmFwcA=="

        # A ticket in the link logs in too; a forged cookie does not.
        by_ticket = await http.get(f"{world.base}{prefix}/_devyard/login?ticket={ticket(OWNER)}&next={prefix}/x")
        assert by_ticket.status_code == 303 and by_ticket.headers["location"] == f"{prefix}/x"
        forged = cookie.split(";")[0][:-4] + "AAAA"
        assert (await http.get(f"{world.base}{prefix}/", headers={"Cookie": forged})).status_code == 401
        bad = await http.get(f"{world.base}{prefix}/_devyard/login?ticket=nonsense.x")
        assert bad.status_code == 401 and "malformed" in bad.text


async def test_request_bodies_websockets_and_streamed_responses_pass(world: ProxyWorld) -> None:
    owner = {"Authorization": "Bearer dyu_owner"}
    async with client() as http:
        posted = await http.post(f"{world.base}/ports/env_01app/{world.http}/headers", content=b"abc", headers=owner)
        assert posted.json()["body"] == "abc" and posted.json()["method"] == "POST"

        url = f"{world.base}/ports/env_01app/{world.http}/stream"
        async with http.stream("GET", url, headers=owner) as streamed:
            chunks = streamed.aiter_raw()
            first = await asyncio.wait_for(chunks.__anext__(), 10)
            assert first == b"first\n"  # before the response ended: it cannot end until /release was asked for
            released = await http.get(f"{world.base}/ports/env_01app/{world.http}/release", headers=owner)
            assert released.status_code == 204
            rest = b"".join([chunk async for chunk in chunks])
        assert rest == b"second\n"

    share(world, "owner", port=world.websocket)
    uri = f"ws://127.0.0.1:{world.proxy.port}/ports/env_01app/{world.websocket}/"
    async with websocket_connect(uri, additional_headers=owner) as websocket:
        for message in ("one", "two", "x" * 100_000):
            await websocket.send(message)
            assert await websocket.recv() == message
    with pytest.raises(InvalidStatus) as refused:
        async with websocket_connect(uri, additional_headers={"Authorization": "Bearer dyu_member"}):
            pass
    assert refused.value.response.status_code == 403


async def test_refusals_say_why(world: ProxyWorld) -> None:
    owner = {"Authorization": "Bearer dyu_owner"}
    async with client() as http:
        nothing = await http.get(f"{world.base}/ports/env_01app/1/", headers=owner)
        assert nothing.status_code == 502 and "nothing listens on port 1 in env_01app" in nothing.text
        unknown = await http.get(f"{world.base}/ports/env_01unknown/80/")
        assert unknown.status_code == 404 and "no environment env_01unknown on this runner" in unknown.text
        stopped = await http.get(f"{world.base}/ports/env_01stopped/80/")
        assert stopped.status_code == 503 and "devyard env start env_01stopped" in stopped.text
        elsewhere = await http.get(f"{world.base}/somewhere")
        assert elsewhere.status_code == 404 and "/ports/ENV_ID/PORT/" in elsewhere.text
        slashless = await http.get(f"{world.base}/ports/env_01app/{world.http}?q=1")
        assert slashless.status_code == 302
        assert slashless.headers["location"] == f"/ports/env_01app/{world.http}/?q=1"
    port = world.proxy.port or 0
    malformed = b"GET /ports/env_01app/80/ HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n"
    assert (await asyncio.to_thread(_raw, port, malformed)).startswith(b"HTTP/1.1 400 ")
    huge = b"GET / HTTP/1.1\r\nX: " + b"y" * 70_000 + b"\r\n\r\n"
    assert (await asyncio.to_thread(_raw, port, huge)).startswith(b"HTTP/1.1 431 ")


@pytest.fixture
async def host_based(tmp_path: Path) -> AsyncIterator[ProxyWorld]:
    async for made in make_world(tmp_path, domain="localhost"):
        yield made


async def test_host_based_urls(host_based: ProxyWorld) -> None:
    world = host_based
    url = world.proxy.port_url("env_01app", world.http)
    assert url == f"http://{world.http}-01app.localhost:{world.proxy.port}/"
    async with client() as http:
        headers = {"Host": f"{world.http}-01app.localhost:{world.proxy.port}", "Authorization": "Bearer dyu_owner"}
        seen = await http.get(f"{world.base}/headers", headers=headers)
        assert seen.status_code == 200 and seen.json()["target"] == "/headers"
        assert "x-forwarded-prefix" not in {name.lower() for name, _ in seen.json()["headers"]}
        login = await http.get(f"{world.base}/x", headers={"Host": headers["Host"], "Accept": "text/html"})
        assert login.headers["location"] == "/_devyard/login?next=%2Fx"
        wrong = await http.get(f"{world.base}/", headers={"Host": "elsewhere.example"})
        assert wrong.status_code == 404


@pytest.fixture
async def small(tmp_path: Path) -> AsyncIterator[ProxyWorld]:
    async for made in make_world(tmp_path, max_connections=6, max_per_client=3, head_timeout=30):
        yield made


async def test_a_flood_is_refused_while_others_still_get_through(small: ProxyWorld) -> None:
    world = small
    port = world.proxy.port or 0
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
    try:
        await asyncio.sleep(0.2)
        refused = await asyncio.to_thread(_exchange, "127.0.0.1", port, world.http)
        assert refused.startswith(b"HTTP/1.1 429 ") and b"too many connections from 127.0.0.1" in refused
        # Another client address still gets in.
        answer = await asyncio.to_thread(_exchange, "127.0.0.2", port, world.http)
        assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"hello from /\n")
        more = [socket.create_connection(("127.0.0.1", port), source_address=(f"127.0.0.{n}", 0)) for n in (3, 4, 5)]
        await asyncio.sleep(0.2)
        full = await asyncio.to_thread(_exchange, "127.0.0.6", port, world.http)
        assert full.startswith(b"HTTP/1.1 503 ") and b"connection limit" in full
        for sock in more:
            sock.close()
    finally:
        for sock in idle:
            sock.close()
    await asyncio.sleep(0.2)
    assert (await asyncio.to_thread(_exchange, "127.0.0.1", port, world.http)).startswith(b"HTTP/1.1 200 ")


async def test_a_slow_head_times_out(tmp_path: Path) -> None:
    async for world in make_world(tmp_path, head_timeout=0.3):
        answer = await asyncio.to_thread(_raw, world.proxy.port or 0, b"GET / HTTP/1.1\r\n")
        assert answer.startswith(b"HTTP/1.1 408 ")


def _raw(port: int, data: bytes) -> bytes:
    """Send ``data`` and read the answer until the proxy closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
        return received


def _exchange(source: str, port: int, app_port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0)) as sock:
        request = f"GET /ports/env_01app/{app_port}/ HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer dyu_owner\r\n\r\n"
        sock.sendall(request.encode())
        received = b""
        while data := sock.recv(65536):
            received += data
        return received
