"""Image references: normalization and the refusal of malformed ones."""

from __future__ import annotations

import pytest

from devyard.runner.errors import PermanentError
from devyard.runner.images.reference import parse_reference
from devyard.runner.images.registry import on_loopback

DIGEST = "sha256:" + "a" * 64


@pytest.mark.parametrize(
    ("text", "normalized"),
    [
        ("busybox", "docker.io/library/busybox:latest"),
        ("busybox:1.36", "docker.io/library/busybox:1.36"),
        ("library/busybox", "docker.io/library/busybox:latest"),
        ("index.docker.io/busybox", "docker.io/library/busybox:latest"),
        ("user/app:v1", "docker.io/user/app:v1"),
        ("ghcr.io/org/app", "ghcr.io/org/app:latest"),
        ("host:5000/a/b:tag", "host:5000/a/b:tag"),
        ("localhost/app", "localhost/app:latest"),
        (f"busybox@{DIGEST}", f"docker.io/library/busybox@{DIGEST}"),
        (f"host:5000/a/b:tag@{DIGEST}", f"host:5000/a/b:tag@{DIGEST}"),
        ("devyard.local/debian:bookworm", "devyard.local/debian:bookworm"),
    ],
)
def test_references_are_normalized(text: str, normalized: str) -> None:
    assert str(parse_reference(text)) == normalized


def test_parts_of_a_reference() -> None:
    parsed = parse_reference(f"host:5000/a/b:tag@{DIGEST}")
    assert (parsed.registry, parsed.repository, parsed.tag, parsed.digest) == ("host:5000", "a/b", "tag", DIGEST)
    assert parsed.lookup == DIGEST
    assert parse_reference("devyard.local/x").is_local
    assert not parse_reference("x").is_local


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("", "empty"),
        ("Busybox", "lowercase"),
        ("busybox:", "tag"),
        ("busybox:-x", "tag"),
        ("busybox@sha256:abc", "digest"),
        ("busybox@md5:" + "a" * 32, "digest"),
        ("a//b", "path component"),
        ("host:5000/", "path component"),
        (" busybox", "whitespace"),
        ("a" * 300, "longer"),
    ],
)
def test_bad_references_are_refused_with_a_reason(text: str, complaint: str) -> None:
    with pytest.raises(ValueError, match=complaint) as caught:
        parse_reference(text)
    assert isinstance(caught.value, PermanentError)


@pytest.mark.parametrize(
    ("registry", "loopback"),
    [
        ("localhost:5000", True),
        ("127.0.0.1:5000", True),
        ("127.8.9.10", True),
        ("[::1]:5000", True),
        ("::1", True),
        ("10.0.0.1:5000", False),
        ("ghcr.io", False),
        ("localhost.example.com:5000", False),
    ],
)
def test_registries_on_the_loopback_are_reached_over_http(registry: str, loopback: bool) -> None:
    assert on_loopback(registry) is loopback
