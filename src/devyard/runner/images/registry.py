"""An OCI distribution client on httpx: resolve a reference to a manifest, download blobs verified, push a layout.

Called by the image store (``resolve`` and ``fetch_blob`` when it pulls) and by the tests' support code
(``push_layout``, to put test images into a test registry). It speaks the distribution API v2: OCI image
indexes and Docker manifest lists are resolved to this host's platform; OCI and Docker schema2 manifests are
read. Authentication: anonymous, bearer tokens (the ``WWW-Authenticate: Bearer realm=...`` flow of Docker Hub and
GHCR, with or without credentials) and basic. https always, except for the registries named ``insecure`` and
those on this host's loopback (``localhost``, 127.0.0.0/8, ``[::1]``), as Docker does: nothing crosses a network.

Errors are classified here: missing images and refused credentials are ``PermanentError``; 5xx, 429 and
connection failures are ``TemporaryError``. ``OSError`` from writing the destination file passes through
unchanged: the store decides what a full disk means.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import ipaddress
import json
import platform as host
import re
import ssl
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from devyard.runner.errors import PermanentError, TemporaryError
from devyard.runner.images.reference import DOCKER_HUB, Reference, is_digest

__all__ = [
    "INDEX_MEDIA_TYPES",
    "MANIFEST_MEDIA_TYPES",
    "Credentials",
    "Descriptor",
    "Manifest",
    "Platform",
    "RegistryClient",
    "host_platform",
    "on_loopback",
    "parse_manifest",
    "select_platform",
    "tls_context",
]

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
INDEX_MEDIA_TYPES = frozenset({OCI_INDEX, DOCKER_LIST})
MANIFEST_MEDIA_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
_ACCEPT = ", ".join([OCI_INDEX, DOCKER_LIST, OCI_MANIFEST, DOCKER_MANIFEST])
#: Manifests are small; a bigger answer is not one.
_MAX_MANIFEST = 4 << 20

#: registry host (``HOST[:PORT]``, as in references) -> (username, password).
Credentials = Mapping[str, tuple[str, str]]


@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: str = ""

    def __str__(self) -> str:
        return "/".join(part for part in (self.os, self.architecture, self.variant) if part)


def host_platform() -> Platform:
    """This host's platform in OCI terms (``platform.machine()`` mapped to GOARCH names)."""
    machine = host.machine().lower()
    if machine in ("x86_64", "amd64"):
        return Platform("linux", "amd64")
    if machine in ("aarch64", "arm64"):
        return Platform("linux", "arm64", "v8")
    if machine.startswith("armv"):
        return Platform("linux", "arm", f"v{machine[4]}")
    return Platform(
        "linux", {"i686": "386", "i386": "386", "ppc64le": "ppc64le", "s390x": "s390x"}.get(machine, machine)
    )


@dataclass(frozen=True)
class Descriptor:
    """A content descriptor: what a manifest says about a blob (or an index about a manifest)."""

    media_type: str
    digest: str
    size: int
    platform: Platform | None = None

    @classmethod
    def from_json(cls, data: Any, context: str) -> Descriptor:
        try:
            digest = str(data["digest"])
            size = int(data["size"])
            media_type = str(data.get("mediaType", ""))
            found = data.get("platform")
        except (KeyError, TypeError, ValueError) as exc:
            raise PermanentError(f"{context}: malformed descriptor {data!r}") from exc
        if not is_digest(digest) or size < 0:
            raise PermanentError(f"{context}: unsupported digest {digest!r} or bad size {size}")
        platform = None
        if isinstance(found, dict):
            platform = Platform(
                str(found.get("os", "")), str(found.get("architecture", "")), str(found.get("variant", ""))
            )
        return cls(media_type, digest, size, platform)


@dataclass(frozen=True)
class Manifest:
    """An image manifest for one platform: its digest, its bytes, its config and its layers (lowest first)."""

    digest: str
    media_type: str
    raw: bytes
    config: Descriptor
    layers: tuple[Descriptor, ...]


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def parse_manifest(raw: bytes, digest: str, media_type: str, context: str) -> Manifest:
    """Read an image manifest (OCI or Docker schema2); ``context`` names the image in error messages."""
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise PermanentError(f"{context}: the manifest is not JSON") from exc
    if not isinstance(data, dict) or data.get("schemaVersion") != 2:
        raise PermanentError(f"{context}: unsupported manifest (only schema version 2, OCI and Docker, is read)")
    media_type = str(data.get("mediaType") or media_type or OCI_MANIFEST)
    if media_type not in MANIFEST_MEDIA_TYPES:
        raise PermanentError(f"{context}: {media_type!r} is not an image manifest")
    layers = data.get("layers")
    if not isinstance(layers, list):
        raise PermanentError(f"{context}: the manifest has no layers list")
    return Manifest(
        digest=digest,
        media_type=media_type,
        raw=raw,
        config=Descriptor.from_json(data.get("config"), context),
        layers=tuple(Descriptor.from_json(layer, context) for layer in layers),
    )


def select_platform(raw: bytes, wanted: Platform, context: str) -> Descriptor:
    """The manifest of an image index (or Docker manifest list) that fits ``wanted``."""
    try:
        entries = json.loads(raw)["manifests"]
    except (ValueError, KeyError, TypeError) as exc:
        raise PermanentError(f"{context}: malformed image index") from exc
    candidates = [Descriptor.from_json(entry, context) for entry in entries]
    fitting = [
        entry
        for entry in candidates
        if entry.platform is not None
        and entry.platform.os == wanted.os
        and entry.platform.architecture == wanted.architecture
    ]
    # The variant matters where the architecture has several (arm v6/v7); arm64 images often leave it out.
    exact = [entry for entry in fitting if entry.platform is not None and entry.platform.variant == wanted.variant]
    if exact:
        return exact[0]
    loose = [
        entry
        for entry in fitting
        if entry.platform is not None and (not entry.platform.variant or wanted.architecture == "arm64")
    ]
    if loose:
        return loose[0]
    offered = ", ".join(str(entry.platform) for entry in candidates if entry.platform is not None) or "none"
    raise PermanentError(f"{context} has no image for this host's platform {wanted} (it offers: {offered})")


_CHALLENGE_PARAM = re.compile(r'(\w+)\s*=\s*(?:"([^"]*)"|([^\s,]+))')


def _parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    scheme, _, rest = header.strip().partition(" ")
    params = {match[1].lower(): match[2] or match[3] for match in _CHALLENGE_PARAM.finditer(rest)}
    return scheme.lower(), params


def _error_detail(response: httpx.Response) -> tuple[str, str]:
    """The first distribution error code and message of an error answer, if it has them."""
    try:
        errors = response.json().get("errors") or []
        first = errors[0]
        return str(first.get("code", "")), str(first.get("message", ""))
    except (ValueError, AttributeError, IndexError, TypeError):
        return "", response.text[:200].strip()


def _retry_after(response: httpx.Response) -> float | None:
    try:
        return float(response.headers["Retry-After"])
    except (KeyError, ValueError):
        return None


class _CorruptBlob(Exception):
    pass


def on_loopback(registry: str) -> bool:
    """Whether ``registry`` (``host`` or ``host:port``) is on this host's loopback interface."""
    host = registry.rsplit(":", 1)[0] if registry.count(":") == 1 or registry.startswith("[") else registry
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@functools.cache
def tls_context() -> ssl.SSLContext:
    """The TLS context of every registry client in this process (httpx's: the system's or ``SSL_CERT_FILE``'s CA
    certificates): making one, which loads the CA bundle, costs about 30 ms here, and a runner makes several
    clients for each environment it starts (the image's pull, a dev container's build and Features)."""
    return httpx.create_ssl_context()


class RegistryClient:
    """One client per store (or per pull); holds an httpx client and the tokens it got. Use ``async with``."""

    def __init__(
        self,
        *,
        insecure: Collection[str] = (),
        credentials: Credentials | None = None,
        attempts: int = 5,
        retry_delay: float = 0.2,
        timeout: float = 30.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.insecure = frozenset(insecure)
        self.credentials: Credentials = credentials or {}
        self.attempts = attempts
        self.retry_delay = retry_delay
        self._client = httpx.AsyncClient(
            verify=tls_context(),
            timeout=httpx.Timeout(timeout, connect=10.0),
            follow_redirects=True,
            transport=transport,
            limits=httpx.Limits(max_connections=16, max_keepalive_connections=8),
        )
        #: (registry, repository, actions) -> the Authorization header that worked.
        self._authorization: dict[tuple[str, str, str], str] = {}
        self._auth_lock = asyncio.Lock()

    async def __aenter__(self) -> RegistryClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._client.aclose()

    # --- URLs and requests -------------------------------------------------------------------------------------

    def _base(self, reference: Reference) -> str:
        registry = reference.registry
        api_host = "registry-1.docker.io" if registry == DOCKER_HUB else registry
        scheme = "http" if registry in self.insecure or on_loopback(registry) else "https"
        return f"{scheme}://{api_host}/v2/{reference.repository}"

    async def _send(
        self,
        reference: Reference,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        content: bytes | None = None,
        actions: str = "pull",
        stream: bool = False,
    ) -> httpx.Response:
        """Send a request, answering one authentication challenge; raises ``httpx.TransportError`` as is."""
        key = (reference.registry, reference.repository, actions)
        for attempt in range(2):
            request_headers = dict(headers or {})
            if key in self._authorization:
                request_headers["Authorization"] = self._authorization[key]
            request = self._client.build_request(method, url, headers=request_headers, content=content)
            response = await self._client.send(request, stream=stream)
            if response.status_code != 401 or attempt == 1:
                return response
            challenge = response.headers.get("WWW-Authenticate", "")
            await response.aclose()
            if not challenge:
                return response
            async with self._auth_lock:
                # Another request may have got a token for the same scope meanwhile.
                if self._authorization.get(key) == request_headers.get("Authorization"):
                    self._authorization[key] = await self._authorize(reference, challenge, actions)
        raise AssertionError("unreachable")

    async def _authorize(self, reference: Reference, challenge: str, actions: str) -> str:
        registry = reference.registry
        credentials = self.credentials.get(registry)
        scheme, params = _parse_challenge(challenge)
        if scheme == "basic":
            if credentials is None:
                raise PermanentError(f"registry {registry} needs credentials (basic authentication); none were given")
            username, password = credentials
            return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()
        if scheme != "bearer" or "realm" not in params:
            raise PermanentError(f"registry {registry} asks for an unsupported authentication: {challenge!r}")
        query = {"scope": f"repository:{reference.repository}:{actions}"}
        if params.get("service"):
            query["service"] = params["service"]
        try:
            response = await self._client.get(
                params["realm"], params=query, auth=httpx.BasicAuth(*credentials) if credentials else None
            )
        except httpx.TransportError as exc:
            raise TemporaryError(
                f"cannot reach the token server {params['realm']} of registry {registry}: {exc}"
            ) from exc
        if response.status_code in (401, 403):
            if credentials is not None:
                raise PermanentError(
                    f"the token server of registry {registry} refused the credentials of user {credentials[0]!r}"
                )
            raise PermanentError(f"the token server of registry {registry} refused anonymous access")
        if response.status_code == 429 or response.status_code >= 500:
            raise TemporaryError(
                f"the token server of registry {registry} answered {response.status_code}",
                retry_after=_retry_after(response),
            )
        if response.status_code != 200:
            raise PermanentError(f"the token server of registry {registry} answered {response.status_code}")
        try:
            body = response.json()
            token = body.get("token") or body.get("access_token")
        except (ValueError, AttributeError):
            token = None
        if not isinstance(token, str) or not token:
            raise PermanentError(f"the token server of registry {registry} answered without a token")
        return f"Bearer {token}"

    def _raise_for_status(self, response: httpx.Response, reference: Reference, what: str) -> None:
        """Classify a non-success answer; the body must have been read."""
        status = response.status_code
        if 200 <= status < 300:
            return
        registry = reference.registry
        code, message = _error_detail(response)
        detail = f" ({status} {code}: {message})" if code or message else f" ({status})"
        if status == 404 or code in ("NAME_UNKNOWN", "MANIFEST_UNKNOWN", "BLOB_UNKNOWN"):
            raise PermanentError(f"image {reference} not found in registry {registry}: no {what}{detail}")
        if status in (401, 403):
            credentials = self.credentials.get(registry)
            if credentials is not None:
                raise PermanentError(
                    f"registry {registry} refused the credentials of user {credentials[0]!r} for {reference}{detail}"
                )
            raise PermanentError(
                f"image {reference} not found in registry {registry}, or it needs credentials that were not "
                f"given{detail}"
            )
        if status in (408, 429) or status >= 500:
            raise TemporaryError(
                f"registry {registry} failed to serve the {what} of {reference}{detail}",
                retry_after=_retry_after(response),
            )
        raise PermanentError(f"registry {registry} refused to serve the {what} of {reference}{detail}")

    # --- pulling -----------------------------------------------------------------------------------------------

    async def _get_manifest(self, reference: Reference, lookup: str) -> tuple[bytes, str, str]:
        url = f"{self._base(reference)}/manifests/{lookup}"
        try:
            response = await self._send(reference, "GET", url, headers={"Accept": _ACCEPT})
        except httpx.TransportError as exc:
            raise TemporaryError(f"cannot reach registry {reference.registry} for {reference}: {exc!r}") from exc
        self._raise_for_status(response, reference, f"manifest {lookup}")
        raw = response.content
        if len(raw) > _MAX_MANIFEST:
            raise PermanentError(f"{reference}: the manifest {lookup} is larger than {_MAX_MANIFEST} bytes")
        digest = _sha256(raw)
        if is_digest(lookup) and digest != lookup:
            raise PermanentError(f"{reference}: registry {reference.registry} served a manifest that is not {lookup}")
        try:
            media_type = str(json.loads(raw).get("mediaType") or "")
        except (ValueError, AttributeError):
            media_type = ""
        media_type = media_type or response.headers.get("Content-Type", "").split(";")[0].strip()
        return raw, media_type, digest

    async def resolve(self, reference: Reference, platform: Platform | None = None) -> Manifest:
        """The manifest ``reference`` names, for ``platform`` (default: this host's) when it names an index."""
        raw, media_type, digest = await self._get_manifest(reference, reference.lookup)
        if media_type in INDEX_MEDIA_TYPES or (not media_type and b'"manifests"' in raw):
            chosen = select_platform(raw, platform or host_platform(), f"image {reference}")
            raw, media_type, digest = await self._get_manifest(reference, chosen.digest)
        return parse_manifest(raw, digest, media_type, f"image {reference}")

    async def fetch_blob(
        self,
        reference: Reference,
        descriptor: Descriptor,
        destination: Path,
        on_bytes: Callable[[int], None] | None = None,
    ) -> None:
        """Download a blob into ``destination`` (created or truncated), verified against its digest and size.

        A connection dropped mid-blob resumes with a Range request (or restarts when the registry ignores it),
        up to ``attempts`` times, then ``TemporaryError``; a blob that does not match its digest is fetched once
        more, then ``PermanentError``. On failure ``destination`` is left for the caller to remove. ``on_bytes``
        gets the bytes added (negative when a restart throws some away).
        """
        report = on_bytes or (lambda _: None)
        url = f"{self._base(reference)}/blobs/{descriptor.digest}"
        failures = 0
        corrupt = 0
        with destination.open("wb") as output:
            hasher = hashlib.sha256()
            written = 0
            while True:
                try:
                    headers = {"Range": f"bytes={written}-"} if written else {}
                    response = await self._send(reference, "GET", url, headers=headers, stream=True)
                    try:
                        if response.status_code == 200 and written:
                            # The registry ignored the Range: start over.
                            output.seek(0)
                            output.truncate()
                            report(-written)
                            hasher, written = hashlib.sha256(), 0
                        elif response.status_code not in (200, 206):
                            await response.aread()
                            self._raise_for_status(response, reference, f"blob {descriptor.digest}")
                            raise PermanentError(
                                f"registry {reference.registry} answered {response.status_code} for blob "
                                f"{descriptor.digest} of {reference}"
                            )
                        async for chunk in response.aiter_bytes():
                            output.write(chunk)
                            hasher.update(chunk)
                            written += len(chunk)
                            report(len(chunk))
                            if written > descriptor.size:
                                raise _CorruptBlob(f"more than the {descriptor.size} bytes its descriptor gives")
                    finally:
                        await response.aclose()
                    if written != descriptor.size:
                        raise _CorruptBlob(f"{written} bytes instead of {descriptor.size}")
                    if "sha256:" + hasher.hexdigest() != descriptor.digest:
                        raise _CorruptBlob(f"its content hashes to sha256:{hasher.hexdigest()}")
                    return
                except _CorruptBlob as exc:
                    corrupt += 1
                    if corrupt >= 2:
                        raise PermanentError(
                            f"blob {descriptor.digest} of image {reference} from registry {reference.registry} is "
                            f"corrupt: {exc}"
                        ) from None
                    output.seek(0)
                    output.truncate()
                    report(-written)
                    hasher, written = hashlib.sha256(), 0
                except (httpx.TransportError, TemporaryError) as exc:
                    failures += 1
                    if failures >= self.attempts:
                        raise TemporaryError(
                            f"downloading blob {descriptor.digest} of image {reference} from registry "
                            f"{reference.registry} failed {failures} times; last: {exc!r}"
                        ) from exc
                    await asyncio.sleep(self.retry_delay * failures)

    # --- pushing -----------------------------------------------------------------------------------------------

    async def push_layout(self, layout: Path, reference: Reference) -> str:
        """Push the image of an OCI image layout directory to ``reference``'s tag; returns its top digest.

        The layout's ``index.json`` must list one manifest (an image manifest or an index); its blobs are
        uploaded (each in one POST and PUT, skipping those the registry has), then the manifests.
        """
        index = json.loads((layout / "index.json").read_bytes())
        entries = index.get("manifests") or []
        if len(entries) != 1:
            raise PermanentError(f"{layout}: index.json must list exactly one manifest, it lists {len(entries)}")
        top = Descriptor.from_json(entries[0], str(layout))
        await self._push_manifest(layout, reference, top, reference.tag or top.digest)
        return top.digest

    async def _push_manifest(self, layout: Path, reference: Reference, descriptor: Descriptor, target: str) -> None:
        raw = _layout_blob(layout, descriptor.digest).read_bytes()
        data = json.loads(raw)
        media_type = str(data.get("mediaType") or descriptor.media_type)
        if media_type in INDEX_MEDIA_TYPES:
            for entry in data["manifests"]:
                child = Descriptor.from_json(entry, str(layout))
                await self._push_manifest(layout, reference, child, child.digest)
        else:
            manifest = parse_manifest(raw, descriptor.digest, media_type, str(layout))
            for blob in (manifest.config, *manifest.layers):
                await self._push_blob(layout, reference, blob.digest)
        url = f"{self._base(reference)}/manifests/{target}"
        response = await self._request(
            reference, "PUT", url, headers={"Content-Type": media_type}, content=raw, actions="pull,push"
        )
        self._raise_for_status(response, reference, f"manifest upload {target}")

    async def _push_blob(self, layout: Path, reference: Reference, digest: str) -> None:
        base = self._base(reference)
        response = await self._request(reference, "HEAD", f"{base}/blobs/{digest}", actions="pull,push")
        if response.status_code == 200:
            return
        response = await self._request(reference, "POST", f"{base}/blobs/uploads/", actions="pull,push")
        self._raise_for_status(response, reference, "blob upload")
        location = str(response.url.join(response.headers["Location"]))
        separator = "&" if "?" in location else "?"
        response = await self._request(
            reference,
            "PUT",
            f"{location}{separator}digest={digest}",
            headers={"Content-Type": "application/octet-stream"},
            content=_layout_blob(layout, digest).read_bytes(),
            actions="pull,push",
        )
        self._raise_for_status(response, reference, f"blob upload {digest}")

    async def _request(
        self,
        reference: Reference,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        content: bytes | None = None,
        actions: str = "pull",
    ) -> httpx.Response:
        try:
            return await self._send(reference, method, url, headers=headers, content=content, actions=actions)
        except httpx.TransportError as exc:
            raise TemporaryError(f"cannot reach registry {reference.registry} for {reference}: {exc!r}") from exc


def _layout_blob(layout: Path, digest: str) -> Path:
    algorithm, _, hex_digest = digest.partition(":")
    return layout / "blobs" / algorithm / hex_digest
