"""The runner's port proxy: each environment's ports over HTTP, at a stable URL, to those the port's admission lets in.

The agent starts one ``PortProxy`` when ``ports_listen`` is set, and the reconciler reports ``PortProxy.port_url``
of each port in ``status.ports``. URLs:

- host-based, when ``ports_domain`` is set: ``http://PORT-ULID.DOMAIN[:listen port]/`` (ULID: the environment's id
  without ``env_``, as host names have no underscores; ``*.localhost`` reaches the loopback in curl and browsers);
- path-based otherwise: ``BASE/ports/ENV_ID/PORT/``, the prefix stripped before forwarding and sent as
  ``X-Forwarded-Prefix``.

One request per client connection. The proxy reads the request's head (at most ``MAX_HEAD`` bytes, within
``HEAD_TIMEOUT`` seconds), decides, connects with ``Runtime.connect`` (TLS, unverified, when the port's protocol is
https), sends the head with ``Connection: close`` and ``X-Forwarded-For/Proto/Host``, then the request's body as
its framing says, and relays the response until the upstream closes, with ``Connection: close``. A WebSocket (or
any) upgrade is relayed both ways, as bytes, once the upstream answered 101; streamed and chunked responses pass as
they come. Bytes passing touch the environment's ``Activity`` (idle timeouts).

Admission, per request, by the port's ``spec.ports`` entry (none: owner):

- ``everyone``: no credentials, if the organization's policy (``allow_public_ports``, read from the management
  plane and cached) allows it; when the policy forbids it or cannot be read, the port is treated as
  ``organization``;
- ``owner``: the environment's creator; ``organization``: any member of its organization.
- Credentials: ``Authorization: Bearer`` with a devyard user token (the proxy asks the management plane who it is,
  ``GET /api/v1/whoami``, cached by the token's SHA-256 for ``WHO_CACHE_SECONDS``, failures for
  ``WHO_FAILURE_CACHE_SECONDS``) or a port ticket (``POST /api/v1/environments/{id}/access`` with scope ``port``,
  checked with the gateway key, good many times until it expires); or the proxy's session cookie.
- Browsers: a request without credentials that accepts ``text/html`` is sent to ``/_devyard/login?next=...`` under
  the port's URL. That page takes ``?ticket=`` (what ``devyard env port url`` prints) or a token pasted into its
  form (POST), sets an HttpOnly, SameSite=Lax cookie (Secure when the public URL is https) holding a session the
  runner signed (user, organizations, environment, expiry; HMAC with a key derived from the gateway key), and
  redirects to ``next`` (a path under the port's URL only: no open redirect).
- Otherwise 401 (no or refused credentials) or 403 (someone the port is not shared with), in plain text saying how
  to get in. The proxy removes its cookie and a devyard ``Authorization`` before forwarding: the application never
  sees devyard credentials.

Refusals are plain text: 404 for an unknown environment or one not on this runner, 503 for one that is not running,
502 when nothing listens on the port, 429 past ``max_per_client`` connections from one address, 503 past
``max_connections`` in all, 408 for a head that does not come in time, 400/431 for a malformed or oversized one. A
client's failure ends its connection only; the listener never stops for one.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import hmac
import html
import json
import logging
import re
import ssl
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Final

from devyard.runner.activity import Activity
from devyard.runner.errors import RunnerError
from devyard.runner.gateway import gateway_url, parse_listen, serve_listener
from devyard.runner.runtime import Runtime
from devyard.wire.access import TicketError, verify_ticket
from devyard.wire.environments import Admission, Environment, EnvironmentPhase, PortProtocol

__all__ = [
    "HEAD_TIMEOUT",
    "LOGIN_PATH",
    "MAX_HEAD",
    "SESSION_COOKIE",
    "WHO_CACHE_SECONDS",
    "WHO_FAILURE_CACHE_SECONDS",
    "Identity",
    "PortAccess",
    "PortProxy",
    "TokenRefused",
]

log = logging.getLogger(__name__)

#: The largest request or response head the proxy reads.
MAX_HEAD: Final = 64 * 1024
#: Seconds a client has to send its request's head.
HEAD_TIMEOUT: Final = 10.0
#: Seconds the upstream has to answer with its response's head.
_UPSTREAM_HEAD_TIMEOUT: Final = 300.0
WHO_CACHE_SECONDS: Final = 30.0
WHO_FAILURE_CACHE_SECONDS: Final = 5.0
_POLICY_CACHE_SECONDS: Final = 30.0
SESSION_COOKIE: Final = "devyard_port_session"
_SESSION_SECONDS: Final = 12 * 3600
#: The proxy's own pages, under each port's URL (shadowing the application's paths of that name).
LOGIN_PATH: Final = "/_devyard/login"
_MAX_FORM: Final = 8 * 1024
_READ_CHUNK: Final = 64 * 1024
#: How long a connection that is done may still send what it sent before reading the answer.
_LINGER_SECONDS: Final = 0.5
_PATH_PREFIX: Final = re.compile(r"^/ports/(env_[0-9a-z]{1,64})/(\d{1,5})(/.*)?$")
_HOP_BY_HOP: Final = frozenset(
    {"connection", "keep-alive", "proxy-connection", "te", "trailer", "upgrade", "proxy-authorization"}
)
_TOKEN_CHARS: Final = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")


@dataclass(frozen=True)
class Identity:
    """Who a request comes from: a user and the organizations they belong to."""

    user_id: str
    organization_ids: frozenset[str] = frozenset()


class TokenRefused(Exception):
    """The management plane does not know the token (or it names no user)."""


@dataclass(frozen=True)
class PortAccess:
    """What the proxy needs to decide: this runner's environments and key, and two questions to the management
    plane."""

    runner_id: str
    #: The runner's gateway key: port tickets are signed with it; sessions with a key derived from it.
    key: bytes
    #: The environment as the agent's informer holds it, or None.
    environment: Callable[[str], Environment | None]
    #: Who a user token belongs to; raises ``TokenRefused``, or another exception when the question failed.
    whoami: Callable[[str], Awaitable[Identity]]
    #: Whether an organization's policy allows ports shared with everyone; raises when it cannot be read.
    allows_public_ports: Callable[[str], Awaitable[bool]]
    now: Callable[[], float] = time.time


@dataclass(frozen=True)
class _Route:
    environment_id: str
    port: int
    #: The path the application sees (the prefix stripped), with the query.
    target: str
    #: The path-based prefix (``/ports/ENV/PORT``), or "" for host-based URLs.
    prefix: str


@dataclass
class _Request:
    method: str
    target: str
    version: str
    headers: list[tuple[str, str]]

    def header(self, name: str) -> str | None:
        name = name.lower()
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return None

    def tokens(self, name: str) -> set[str]:
        name = name.lower()
        found: set[str] = set()
        for key, value in self.headers:
            if key.lower() == name:
                found |= {part.strip().lower() for part in value.split(",") if part.strip()}
        return found


class _Refusal(Exception):
    def __init__(self, status: int, text: str, headers: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(text)
        self.status = status
        self.text = text
        self.headers = headers


_REASONS: Final = {
    200: "OK",
    302: "Found",
    303: "See Other",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    413: "Content Too Large",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    502: "Bad Gateway",
    503: "Service Unavailable",
}


@dataclass
class _Limits:
    total: int
    per_client: int
    open: int = 0
    by_client: dict[str, int] = field(default_factory=dict)


class PortProxy:
    """The listener; ``start`` binds it, ``close`` stops it and ends every connection."""

    def __init__(
        self,
        runtime: Runtime,
        access: PortAccess,
        *,
        listen: str,
        domain: str | None = None,
        url: str | None = None,
        hostname: str = "localhost",
        activity: Activity | None = None,
        max_connections: int = 1024,
        max_per_client: int = 128,
        head_timeout: float = HEAD_TIMEOUT,
    ) -> None:
        self._runtime = runtime
        self._access = access
        self._host, self._listen_port = parse_listen(listen)
        self._domain = domain.strip(".").lower() if domain else None
        self._configured_url = url.rstrip("/") if url else None
        self._hostname = hostname
        self._activity = activity or Activity()
        self._limits = _Limits(max_connections, max_per_client)
        self._head_timeout = head_timeout
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._who: dict[str, tuple[float, Identity | None]] = {}
        self._policies: dict[str, tuple[float, bool]] = {}
        self._session_key = hmac.new(access.key, b"devyard port session", hashlib.sha256).digest()
        #: How long an organization's ``allow_public_ports`` is used before it is read again.
        self.policy_cache_seconds = _POLICY_CACHE_SECONDS
        #: The port it listens on; set by ``start``.
        self.port: int | None = None

    # Lifecycle.

    async def start(self) -> None:
        """Listen; ``OSError`` when the address cannot be bound."""
        self._server = await asyncio.start_server(self._connection, self._host, self._listen_port, limit=MAX_HEAD)
        self.port = int(self._server.sockets[0].getsockname()[1])
        log.info("port proxy listening on %s:%d, ports at %s", self._host, self.port, self.port_url("env_ID", 0))

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def serve(self, *, retry_delay: float = 5.0, on_listening: Callable[[], None] | None = None) -> None:
        """Listen (retrying an address that cannot be bound, loudly) and serve until cancelled."""
        what = f"port proxy on {self._host}:{self._listen_port}"
        await serve_listener(self.start, self.close, what=what, retry_delay=retry_delay, on_listening=on_listening)

    # URLs.

    @property
    def _base(self) -> str:
        """The public base URL: the configured one, else the listening address."""
        return gateway_url(self._configured_url, self._host, self.port or self._listen_port, self._hostname)

    @property
    def base_url(self) -> str | None:
        """The public base URL, once the proxy listens."""
        return self._base if self.port is not None else None

    @property
    def secure(self) -> bool:
        return self._base.startswith("https://")

    def port_url(self, environment_id: str, port: int) -> str | None:
        """Where the proxy serves ``port`` of ``environment_id``; None until it listens."""
        if self.port is None:
            return None
        if self._domain is None:
            return f"{self._base}/ports/{environment_id}/{port}/"
        base = urllib.parse.urlsplit(self._base)
        netloc = f"{port}-{environment_id.removeprefix('env_')}.{self._domain}"
        default = 443 if base.scheme == "https" else 80
        if base.port is not None and base.port != default:
            netloc += f":{base.port}"
        return f"{base.scheme}://{netloc}/"

    # One connection.

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Cancelled when the proxy closes: the task is the connection's own, and nobody awaits it.
        with contextlib.suppress(asyncio.CancelledError):
            await self._guarded(reader, writer)

    async def _guarded(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        client = str(peer[0]) if isinstance(peer, tuple) and peer else "unknown"
        limits = self._limits
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            if limits.open >= limits.total:
                await _respond(writer, 503, "the port proxy is at its connection limit: try again shortly\n")
                return
            if limits.by_client.get(client, 0) >= limits.per_client:
                await _respond(writer, 429, f"too many connections from {client}: close some and try again\n")
                return
            limits.open += 1
            limits.by_client[client] = limits.by_client.get(client, 0) + 1
            try:
                await self._serve_one(reader, writer, client)
            finally:
                limits.open -= 1
                left = limits.by_client.get(client, 1) - 1
                if left > 0:
                    limits.by_client[client] = left
                else:
                    limits.by_client.pop(client, None)
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        except Exception:
            log.exception("port proxy connection from %s failed", client)
        finally:
            if task is not None:
                self._tasks.discard(task)
            await _linger(reader, writer)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _serve_one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, client: str) -> None:
        try:
            async with asyncio.timeout(self._head_timeout):
                head = await reader.readuntil(b"\r\n\r\n")
        except TimeoutError:
            await _respond(writer, 408, f"no complete request head within {self._head_timeout:.0f} s\n")
            return
        except asyncio.LimitOverrunError:
            await _respond(writer, 431, f"the request head is larger than {MAX_HEAD // 1024} KiB\n")
            return
        except asyncio.IncompleteReadError:
            return
        try:
            request = _parse_request(head)
            route = self._route(request)
            environment = self._environment(route)
            if route.target.split("?", 1)[0] == LOGIN_PATH:
                await self._login(reader, writer, request, route, environment)
                return
            forwarded_auth = await self._admit(request, route, environment)
        except _Refusal as refusal:
            if refusal.status >= 400 and refusal.status not in (401, 403, 404):
                log.info("port proxy refused %s from %s: %s", refusal.status, client, refusal.text.strip())
            await _respond(writer, refusal.status, refusal.text, refusal.headers)
            return
        await self._forward(reader, writer, request, route, environment, client, keep_authorization=forwarded_auth)

    def _route(self, request: _Request) -> _Route:
        if not request.target.startswith("/"):
            raise _Refusal(400, "the request target must be a path (origin-form)\n")
        if self._domain is not None:
            host = (request.header("host") or "").lower()
            name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
            suffix = "." + self._domain
            if name.endswith(suffix):
                label = name[: -len(suffix)]
                port_text, dash, ulid = label.partition("-")
                if dash and port_text.isdigit() and re.fullmatch(r"[0-9a-z]{1,64}", ulid):
                    return _Route(f"env_{ulid}", _port(port_text), request.target, "")
            raise _Refusal(
                404, f"no port here: ports are at http://PORT-ID.{self._domain}/ (ID: the environment's id)\n"
            )
        path, _, query = request.target.partition("?")
        match = _PATH_PREFIX.match(path)
        if match is None:
            raise _Refusal(404, "no port here: ports are at /ports/ENV_ID/PORT/\n")
        environment_id, port_text, rest = match.groups()
        port = _port(port_text)
        if rest is None:  # /ports/ENV/PORT without its slash: relative links need it
            location = f"/ports/{environment_id}/{port}/" + (f"?{query}" if query else "")
            raise _Refusal(302, f"see {location}\n", (("Location", location),))
        return _Route(environment_id, port, rest + (f"?{query}" if query else ""), f"/ports/{environment_id}/{port}")

    def _environment(self, route: _Route) -> Environment:
        environment = self._access.environment(route.environment_id)
        if environment is None or environment.status.runner_id != self._access.runner_id:
            raise _Refusal(404, f"no environment {route.environment_id} on this runner\n")
        phase = environment.status.phase
        if phase is not EnvironmentPhase.RUNNING:
            hint = (
                f"; start it with `devyard env start {route.environment_id}`"
                if phase is EnvironmentPhase.STOPPED
                else ""
            )
            raise _Refusal(503, f"environment {route.environment_id} is {phase.value}, not running{hint}\n")
        return environment

    # Admission.

    async def _admission(self, environment: Environment, port: int) -> Admission:
        shared = next((entry for entry in environment.spec.ports if entry.port == port), None)
        admission = shared.admission if shared is not None else Admission.OWNER
        if admission is Admission.EVERYONE and not await self._public_allowed(environment):
            return Admission.ORGANIZATION
        return admission

    async def _public_allowed(self, environment: Environment) -> bool:
        organization_id = environment.metadata.organization_id
        if organization_id is None:
            return False
        now = time.monotonic()
        cached = self._policies.get(organization_id)
        if cached is not None and cached[0] > now:
            return cached[1]
        try:
            allowed = await self._access.allows_public_ports(organization_id)
            self._policies[organization_id] = (now + self.policy_cache_seconds, allowed)
        except Exception as exc:
            log.warning("cannot read the policy of %s; public ports count as organization: %s", organization_id, exc)
            allowed = False
            self._policies[organization_id] = (now + WHO_FAILURE_CACHE_SECONDS, allowed)
        return allowed

    async def _admit(self, request: _Request, route: _Route, environment: Environment) -> bool:
        """Let the request through or raise ``_Refusal``; True when its Authorization header is not devyard's (the
        application's own) and is to be forwarded."""
        admission = await self._admission(environment, route.port)
        identity, app_authorization = await self._identity(request, route)
        if admission is Admission.EVERYONE:
            return app_authorization
        what = f"port {route.port} of {route.environment_id}"
        if identity is None:
            accepts = request.header("accept") or ""
            if request.method in ("GET", "HEAD") and "text/html" in accepts:
                location = _login_location(route)
                raise _Refusal(302, f"log in at {location}\n", (("Location", location),))
            raise _Refusal(
                401,
                f"{what} is shared with {_whom(admission)}: send 'Authorization: Bearer TOKEN' with your devyard "
                f"token or a ticket (`devyard env port url {route.environment_id} {route.port}`), "
                "or open it in a browser to log in\n",
                (("WWW-Authenticate", 'Bearer realm="devyard"'),),
            )
        owner = environment.metadata.creator_id
        if identity.user_id == owner:
            return app_authorization
        if admission is Admission.ORGANIZATION and environment.metadata.organization_id in identity.organization_ids:
            return app_authorization
        raise _Refusal(403, f"{what} is shared with {_whom(admission)}; you ({identity.user_id}) are not among them\n")

    async def _identity(self, request: _Request, route: _Route) -> tuple[Identity | None, bool]:
        """Who the request's credentials name, and whether its Authorization header is the application's."""
        authorization = request.header("authorization")
        if authorization is not None:
            scheme, _, credential = authorization.partition(" ")
            credential = credential.strip()
            if scheme.lower() == "bearer" and credential:
                if credential.startswith("dyu_"):
                    return await self._whoami(credential), False
                if "." in credential and not credential.startswith("dy"):
                    return self._ticket_identity(credential, route), False
        session = _cookie(request, SESSION_COOKIE)
        if session is not None:
            identity = self._session_identity(session, route)
            if identity is not None:
                return identity, authorization is not None
        return None, authorization is not None

    async def _whoami(self, token: str) -> Identity:
        digest = hashlib.sha256(token.encode()).hexdigest()
        now = time.monotonic()
        cached = self._who.get(digest)
        if cached is None or cached[0] <= now:
            try:
                identity: Identity | None = await self._access.whoami(token)
                self._who[digest] = (now + WHO_CACHE_SECONDS, identity)
            except TokenRefused:
                identity = None
                self._who[digest] = (now + WHO_FAILURE_CACHE_SECONDS, None)
            except Exception as exc:
                log.warning("cannot ask the management plane who a token is: %s", exc)
                raise _Refusal(
                    503, "the management plane cannot be asked who you are now: try again shortly\n"
                ) from None
            if len(self._who) > 10_000:
                self._who = {k: v for k, v in self._who.items() if v[0] > now}
        else:
            identity = cached[1]
        if identity is None:
            raise _Refusal(401, "the management plane does not accept this token: log in again (`devyard login`)\n")
        return identity

    def _ticket_identity(self, ticket: str, route: _Route) -> Identity:
        try:
            claims = verify_ticket(ticket, self._access.key, now=self._access.now(), scope="port")
        except TicketError as exc:
            raise _Refusal(401, f"{exc}\n") from None
        if claims.runner_id != self._access.runner_id or claims.environment_id != route.environment_id:
            raise _Refusal(403, f"the ticket is for environment {claims.environment_id}, not {route.environment_id}\n")
        organizations = frozenset({claims.organization_id} if claims.organization_id else ())
        return Identity(claims.user_id, organizations)

    def _session(self, identity: Identity, environment_id: str) -> str:
        claims = {
            "u": identity.user_id,
            "o": sorted(identity.organization_ids),
            "e": environment_id,
            "exp": int(self._access.now()) + _SESSION_SECONDS,
        }
        payload = _b64(json.dumps(claims, separators=(",", ":"), sort_keys=True).encode())
        return f"{payload}.{_b64(hmac.new(self._session_key, payload.encode(), hashlib.sha256).digest())}"

    def _session_identity(self, value: str, route: _Route) -> Identity | None:
        payload, _, signature = value.partition(".")
        try:
            given = _unb64(signature)
            wanted = hmac.new(self._session_key, payload.encode(), hashlib.sha256).digest()
            if not hmac.compare_digest(given, wanted):
                return None
            claims = json.loads(_unb64(payload))
            if claims["e"] != route.environment_id or claims["exp"] <= self._access.now():
                return None
            return Identity(str(claims["u"]), frozenset(str(o) for o in claims["o"]))
        except (binascii.Error, ValueError, KeyError, TypeError):
            return None

    # The login page.

    async def _login(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        request: _Request,
        route: _Route,
        environment: Environment,
    ) -> None:
        query = urllib.parse.parse_qs(route.target.partition("?")[2])
        next_path = _safe_next(route, (query.get("next") or [""])[0])
        credential = (query.get("ticket") or [""])[0]
        if request.method == "POST":
            length = request.header("content-length")
            if length is None or not length.isdigit() or int(length) > _MAX_FORM:
                raise _Refusal(413, f"the login form takes at most {_MAX_FORM} bytes, with a Content-Length\n")
            form = urllib.parse.parse_qs((await reader.readexactly(int(length))).decode(errors="replace"))
            credential = (form.get("token") or [""])[0].strip()
            next_path = _safe_next(route, (form.get("next") or [next_path])[0])
        elif request.method not in ("GET", "HEAD"):
            raise _Refusal(405, "the login page takes GET and POST\n")
        if not credential:
            await _respond(writer, 200, _login_page(route, next_path, ""), content_type="text/html; charset=utf-8")
            return
        try:
            if credential.startswith("dyu_"):
                identity = await self._whoami(credential)
            else:
                identity = self._ticket_identity(credential, route)
        except _Refusal as refusal:
            if refusal.status == 503:
                raise
            page = _login_page(route, next_path, refusal.text.strip())
            await _respond(writer, 401 if refusal.status == 401 else 403, page, content_type="text/html; charset=utf-8")
            return
        cookie = (
            f"{SESSION_COOKIE}={self._session(identity, route.environment_id)}; Path={route.prefix or '/'}; "
            f"Max-Age={_SESSION_SECONDS}; HttpOnly; SameSite=Lax" + ("; Secure" if self.secure else "")
        )
        log.info("port proxy session for %s in %s", identity.user_id, environment.metadata.id)
        await _respond(writer, 303, f"logged in; see {next_path}\n", (("Location", next_path), ("Set-Cookie", cookie)))

    # Forwarding.

    async def _forward(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        request: _Request,
        route: _Route,
        environment: Environment,
        client: str,
        *,
        keep_authorization: bool,
    ) -> None:
        environment_id = route.environment_id
        shared = next((entry for entry in environment.spec.ports if entry.port == route.port), None)
        https = shared is not None and shared.protocol is PortProtocol.HTTPS
        try:
            sock = await self._runtime.connect(environment_id, "127.0.0.1", route.port)
        except ConnectionRefusedError:
            await _respond(writer, 502, f"nothing listens on port {route.port} in {environment_id}\n")
            return
        except (RunnerError, OSError) as exc:
            await _respond(writer, 502, f"cannot reach port {route.port} in {environment_id}: {exc}\n")
            return
        try:
            context = None
            if https:
                context = ssl.create_default_context()
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE  # a development server's own certificate
            upstream_reader, upstream_writer = await asyncio.open_connection(
                sock=sock, ssl=context, server_hostname="localhost" if https else None, limit=MAX_HEAD
            )
        except (OSError, ssl.SSLError) as exc:
            sock.close()
            await _respond(writer, 502, f"cannot speak {'TLS' if https else 'HTTP'} to port {route.port}: {exc}\n")
            return
        touch = self._activity.touch
        touch(environment_id)
        upgrade = "upgrade" in request.tokens("connection") and request.header("upgrade") is not None
        upstream_writer.write(self._upstream_head(request, route, client, upgrade, keep_authorization))
        tasks: list[asyncio.Task[None]] = []
        try:
            body = asyncio.ensure_future(_relay_body(request, reader, upstream_writer, environment_id, touch))
            tasks.append(body)
            try:
                async with asyncio.timeout(_UPSTREAM_HEAD_TIMEOUT):
                    head = await upstream_reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, OSError):
                await _respond(writer, 502, f"port {route.port} in {environment_id} sent no valid HTTP response\n")
                return
            switched = head.startswith((b"HTTP/1.1 101", b"HTTP/1.0 101"))
            writer.write(_response_head(head, switched))
            await writer.drain()
            if switched:
                body.cancel()
                await asyncio.gather(body, return_exceptions=True)
                tasks.append(asyncio.ensure_future(_pump(reader, upstream_writer, environment_id, touch)))
            tasks.append(asyncio.ensure_future(_pump(upstream_reader, writer, environment_id, touch, eof=False)))
            # The response ends the exchange: when the upstream is done, so is the client's connection.
            await tasks[-1]
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            upstream_writer.close()

    def _upstream_head(
        self, request: _Request, route: _Route, client: str, upgrade: bool, keep_authorization: bool
    ) -> bytes:
        lines = [f"{request.method} {route.target} HTTP/1.1"]
        forwarded_for = None
        for name, value in request.headers:
            lower = name.lower()
            if lower in _HOP_BY_HOP and not (upgrade and lower == "upgrade"):
                continue
            if lower == "authorization" and not keep_authorization:
                continue
            if lower == "cookie":
                value = _without_cookie(value, SESSION_COOKIE)
                if not value:
                    continue
            if lower == "x-forwarded-for":
                forwarded_for = value
                continue
            if lower in ("x-forwarded-proto", "x-forwarded-host", "x-forwarded-prefix"):
                continue
            lines.append(f"{name}: {value}")
        lines.append("Connection: upgrade" if upgrade else "Connection: close")
        lines.append(f"X-Forwarded-For: {forwarded_for + ', ' if forwarded_for else ''}{client}")
        lines.append(f"X-Forwarded-Proto: {'https' if self.secure else 'http'}")
        host = request.header("host")
        if host is not None:
            lines.append(f"X-Forwarded-Host: {host}")
        if route.prefix:
            lines.append(f"X-Forwarded-Prefix: {route.prefix}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _port(text: str) -> int:
    port = int(text)
    if not 0 < port < 65536:
        raise _Refusal(404, f"{port} is not a TCP port\n")
    return port


def _whom(admission: Admission) -> str:
    return {
        Admission.OWNER: "its owner only",
        Admission.ORGANIZATION: "its organization's members",
        Admission.EVERYONE: "everyone",
    }[admission]


def _parse_request(head: bytes) -> _Request:
    try:
        text = head.decode("latin-1")
    except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes every byte
        raise _Refusal(400, "the request head is not text\n") from None
    lines = text[:-4].split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not _TOKEN_CHARS.match(parts[0]) or parts[2] not in ("HTTP/1.1", "HTTP/1.0"):
        raise _Refusal(400, "a request line is METHOD TARGET HTTP/1.1\n")
    if any(ord(c) < 0x21 or ord(c) == 0x7F for c in parts[1]):
        raise _Refusal(400, "the request target has control characters\n")
    headers = []
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon or not _TOKEN_CHARS.match(name) or any(c in value for c in "\r\n\x00"):
            raise _Refusal(400, f"a malformed header line: {line[:80]!r}\n")
        headers.append((name, value.strip(" \t")))
    request = _Request(parts[0], parts[1], parts[2], headers)
    lengths = {value for key, value in headers if key.lower() == "content-length"}
    if len(lengths) > 1 or any(not v.isdigit() for v in lengths):
        raise _Refusal(400, "a malformed Content-Length\n")
    if lengths and request.header("transfer-encoding") is not None:
        raise _Refusal(400, "both Content-Length and Transfer-Encoding: refused, as RFC 9112 advises\n")
    encoding = request.tokens("transfer-encoding")
    if encoding and encoding != {"chunked"}:
        raise _Refusal(400, "the proxy takes request bodies with Content-Length or chunked only\n")
    return request


def _response_head(head: bytes, switched: bool) -> bytes:
    """The upstream's response head as the client gets it: ``Connection: close`` unless it switched protocols."""
    if switched:
        return head
    lines = head[:-4].split(b"\r\n")
    kept = [lines[0]] + [
        line for line in lines[1:] if line.split(b":", 1)[0].strip().lower() not in (b"connection", b"keep-alive")
    ]
    return b"\r\n".join([*kept, b"Connection: close"]) + b"\r\n\r\n"


async def _relay_body(
    request: _Request,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    environment_id: str,
    touch: Callable[[str], None],
) -> None:
    """Send the request's body as its framing says, and no more: what a client sends after it is not forwarded."""
    length = request.header("content-length")
    if length is not None:
        left = int(length)
        while left > 0:
            data = await reader.read(min(left, _READ_CHUNK))
            if not data:
                return
            left -= len(data)
            touch(environment_id)
            writer.write(data)
            await writer.drain()
        return
    if "chunked" not in request.tokens("transfer-encoding"):
        return
    while True:
        line = await reader.readuntil(b"\r\n")
        writer.write(line)
        size = int(line.split(b";", 1)[0].strip() or b"x", 16)
        if size == 0:
            while True:  # trailers, up to the empty line
                trailer = await reader.readuntil(b"\r\n")
                writer.write(trailer)
                if trailer == b"\r\n":
                    await writer.drain()
                    return
        writer.write(await reader.readexactly(size + 2))
        touch(environment_id)
        await writer.drain()


async def _pump(
    source: asyncio.StreamReader,
    sink: asyncio.StreamWriter,
    environment_id: str,
    touch: Callable[[str], None],
    *,
    eof: bool = True,
) -> None:
    try:
        while data := await source.read(_READ_CHUNK):
            touch(environment_id)
            sink.write(data)
            await sink.drain()
        if eof and sink.can_write_eof():
            sink.write_eof()
    except (ConnectionError, OSError, ssl.SSLError):
        pass


async def _respond(
    writer: asyncio.StreamWriter,
    status: int,
    text: str,
    headers: tuple[tuple[str, str], ...] = (),
    *,
    content_type: str = "text/plain; charset=utf-8",
) -> None:
    body = text.encode()
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}", f"Content-Type: {content_type}"]
    lines += [f"Content-Length: {len(body)}", "Connection: close", "Cache-Control: no-store"]
    lines += [f"{name}: {value}" for name, value in headers]
    with contextlib.suppress(ConnectionError, OSError):
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        await writer.drain()


async def _linger(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Half-close, then read (and drop) what the client still sends for a moment: closing a socket with unread data
    resets it, and the client may then lose the answer it was sent."""
    with contextlib.suppress(Exception):
        if writer.can_write_eof() and not writer.is_closing():
            writer.write_eof()
        async with asyncio.timeout(_LINGER_SECONDS):
            while await reader.read(_READ_CHUNK):
                pass


def _cookie(request: _Request, name: str) -> str | None:
    for key, value in request.headers:
        if key.lower() != "cookie":
            continue
        for part in value.split(";"):
            cookie_name, equals, cookie_value = part.strip().partition("=")
            if equals and cookie_name == name:
                return cookie_value
    return None


def _without_cookie(value: str, name: str) -> str:
    parts = [part.strip() for part in value.split(";")]
    return "; ".join(part for part in parts if part and part.partition("=")[0] != name)


def _login_location(route: _Route) -> str:
    return f"{route.prefix}{LOGIN_PATH}?" + urllib.parse.urlencode({"next": route.prefix + route.target})


def _safe_next(route: _Route, wanted: str) -> str:
    """Where to go after logging in: a path under the port's URL, else its root (never another site)."""
    root = route.prefix + "/"
    if (
        wanted.startswith(root)
        and not wanted.startswith("//")
        and "\\" not in wanted
        and not any(ord(c) < 0x20 for c in wanted)
    ):
        return wanted
    return root


def _login_page(route: _Route, next_path: str, problem: str) -> str:
    action = html.escape(route.prefix + LOGIN_PATH, quote=True)
    hint = html.escape(f"devyard env port url {route.environment_id} {route.port}")
    shown = f'<p class="problem">{html.escape(problem)}</p>' if problem else ""
    return (
        "<!doctype html><html><head><meta charset=utf-8><title>devyard: log in</title></head><body>"
        f"<h1>Port {route.port} of {html.escape(route.environment_id)}</h1>{shown}"
        f"<p>Open the link that <code>{hint}</code> prints, or paste a devyard token or ticket:</p>"
        f'<form method="post" action="{action}">'
        f'<input type="hidden" name="next" value="{html.escape(next_path, quote=True)}">'
        '<input type="password" name="token" autocomplete="off" size="60" autofocus> '
        '<button type="submit">Log in</button></form></body></html>\n'
    )


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
