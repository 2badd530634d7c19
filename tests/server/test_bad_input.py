"""Bad input: every malformed or unauthorized request gets a 4xx with a clear message in the error envelope,
never a 500, and nothing is left half-written. On both databases.

``BAD_REQUESTS`` is the table: who sends what, and the status, error code and words of the message that
come back. Each row also checks that nothing was written: the global revision (every resource write bumps
it), the newest audit events of both organizations and the size of the list the request names are what they
were before the call.
Requests that need a resource in a given state first (a stale resource_version, a used exchange token) have
tests of their own below, with the same checks after their set-up.

The world (``world``, once per module and database, on ``module_server``): organization A with its ``admin``,
the members ``member`` (alice) and ``member2`` (bob), the runner ``runner`` (online) with the admin's
environment ``env`` on it; organization B with its admin ``other_admin`` (carol), who shares nothing with A,
and a class, a project and a secret of B's to refer to. Placeholders such as ``{env}`` are the world's ids.
"""

# BAD_REQUESTS is a table, one request a line: long lines are meant.
# ruff: noqa: E501

from __future__ import annotations

import base64
import os
import re
import struct
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from support import live_server

MAX_BODY = 64 * 1024
#: Small limits, so that the oversized cases are cheap and the expired exchange token quick to make.
SERVER_SETTINGS = {"heartbeat_timeout": 3600.0, "exchange_token_ttl": 2.0, "max_body_bytes": MAX_BODY}
ERROR_CODES = {
    400: "bad_request",
    401: "unauthenticated",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation_failed",
}
#: The lists whose sizes a bad request must leave alone, as their organization's admin sees them.
COLLECTIONS = (
    "organizations",
    "users",
    "memberships",
    "tokens",
    "runners",
    "environment-classes",
    "projects",
    "environments",
    "secrets",
    "ssh-keys",
)


def public_key() -> str:
    key_type = b"ssh-ed25519"
    blob = struct.pack(">I", len(key_type)) + key_type + struct.pack(">I", 32) + os.urandom(32)
    return f"ssh-ed25519 {base64.b64encode(blob).decode()} bad-input@devyard"


@dataclass
class World:
    url: str
    secrets: dict[str, str] = field(default_factory=dict)
    ids: dict[str, str] = field(default_factory=dict)
    _http: dict[str, httpx.Client] = field(default_factory=dict)

    def http(self, principal: str) -> httpx.Client:
        if principal not in self._http:
            headers = {"Authorization": f"Bearer {self.secrets[principal]}"} if principal in self.secrets else {}
            self._http[principal] = httpx.Client(base_url=self.url, headers=headers, timeout=30.0)
        return self._http[principal]

    def close(self) -> None:
        for client in self._http.values():
            client.close()

    def ok(self, principal: str, method: str, path: str, body: Any = None) -> Any:
        response = self.http(principal).request(method, path, json=body)
        assert response.is_success, f"{principal} {method} {path}: {response.status_code} {response.text}"
        return response.json()

    def resolve(self, value: Any) -> Any:
        if isinstance(value, dict):
            return {self.resolve(k): self.resolve(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.resolve(v) for v in value]
        if isinstance(value, str):
            return re.sub(r"\{([a-z0-9_]+)\}", lambda m: self.ids[m.group(1)], value)
        return value

    def state(self, path: str = "") -> dict[str, Any]:
        """What a refused request must not change: the global revision (every resource write bumps it), the
        newest audit events of both organizations, and the size of the list the request's path names (or of
        every list) in both."""
        named = [c for c in COLLECTIONS if path.startswith(f"/api/v1/{c}")]
        state: dict[str, Any] = {"revision": self.ok("admin", "GET", "/api/v1/organizations")["resource_version"]}
        for reader, org in (("admin", self.ids["org"]), ("other_admin", self.ids["other_org"])):
            audit = self.ok(reader, "GET", "/api/v1/audit-events?page_size=5")["items"]
            state[f"audit {org}"] = [event["metadata"]["id"] for event in audit]
            for collection in named or COLLECTIONS:
                page = self.ok(reader, "GET", f"/api/v1/{collection}?page_size=1000&organization_id={org}")
                state[f"{collection} {org}"] = len(page["items"])
        return state

    @contextmanager
    def unchanged(self, path: str = "") -> Iterator[None]:
        before = self.state(path)
        yield
        assert self.state(path) == before, "a refused request wrote something"

    @classmethod
    def build(cls, url: str, admin_secret: str) -> World:
        world = cls(url, secrets={"admin": admin_secret})
        ids = world.ids
        ids["admin_secret"] = admin_secret
        ids["admin_user"] = world.ok("admin", "GET", "/api/v1/whoami")["id"]
        ids["org"] = world.ok("admin", "GET", "/api/v1/organizations")["items"][0]["metadata"]["id"]
        for principal, name in (("member", "alice"), ("member2", "bob")):
            ids[f"{principal}_user"] = world.ok("admin", "POST", "/api/v1/users", {"metadata": {"name": name}})[
                "metadata"
            ]["id"]
            body = {"spec": {"user_id": ids[f"{principal}_user"]}}
            world.secrets[principal] = world.ok("admin", "POST", "/api/v1/tokens", body)["secret"]

        # An exchange token that expires (the module's exchange_token_ttl is 2 s) while the rest is made.
        expired = world.ok("admin", "POST", "/api/v1/runners", {"metadata": {"name": "late"}})
        ids["expired_exchange_token"] = expired["exchange_token"]
        expires_by = time.monotonic() + 2.5

        # Organization B: the admin makes it, makes carol its admin and leaves.
        ids["other_org"] = world.ok("admin", "POST", "/api/v1/organizations", {"metadata": {"name": "other"}})[
            "metadata"
        ]["id"]
        carol = {"metadata": {"name": "carol", "organization_id": ids["other_org"]}, "role": "admin"}
        ids["other_admin_user"] = world.ok("admin", "POST", "/api/v1/users", carol)["metadata"]["id"]
        body = {"metadata": {"organization_id": ids["other_org"]}, "spec": {"user_id": ids["other_admin_user"]}}
        world.secrets["other_admin"] = world.ok("admin", "POST", "/api/v1/tokens", body)["secret"]
        mine = f"/api/v1/memberships?organization_id={ids['other_org']}&user_id={ids['admin_user']}"
        world.ok(
            "admin", "DELETE", f"/api/v1/memberships/{world.ok('admin', 'GET', mine)['items'][0]['metadata']['id']}"
        )
        ids["other_class"] = world.ok("other_admin", "POST", "/api/v1/environment-classes", {})["metadata"]["id"]
        ids["other_project"] = world.ok(
            "other_admin", "POST", "/api/v1/projects", {"spec": {"repository": "https://example.com/b.git"}}
        )["metadata"]["id"]
        ids["other_secret"] = world.ok(
            "other_admin", "POST", "/api/v1/secrets", {"spec": {"scope": "organization", "target": "B", "value": "b"}}
        )["metadata"]["id"]

        created = world.ok("admin", "POST", "/api/v1/runners", {"metadata": {"name": "r1"}})
        ids["runner"], ids["used_exchange_token"] = created["runner"]["metadata"]["id"], created["exchange_token"]
        exchange = {"exchange_token": ids["used_exchange_token"]}
        world.secrets["runner"] = world.ok("anonymous", "POST", "/api/v1/runners/exchange", exchange)["token"]
        ids["runner_credential"] = world.secrets["runner"]
        world.ok("runner", "PUT", f"/api/v1/runners/{ids['runner']}/status", {"status": {"capacity": 10}})
        replaced = world.ok("admin", "POST", "/api/v1/runners", {"metadata": {"name": "reinstalled"}})
        ids["replaced_exchange_token"] = replaced["exchange_token"]
        world.ok("admin", "POST", f"/api/v1/runners/{replaced['runner']['metadata']['id']}/exchange-token")

        ids["class"] = world.ok("admin", "POST", "/api/v1/environment-classes", {"metadata": {"name": "taken"}})[
            "metadata"
        ]["id"]
        ids["spare_class"] = world.ok("admin", "POST", "/api/v1/environment-classes", {})["metadata"]["id"]
        disabled = {"metadata": {"name": "disabled"}, "spec": {"enabled": False}}
        ids["disabled_class"] = world.ok("admin", "POST", "/api/v1/environment-classes", disabled)["metadata"]["id"]
        for name in ("taken", "other-project"):
            body = {"metadata": {"name": name}, "spec": {"repository": f"https://example.com/{name}.git"}}
            ids[f"project_{name.replace('-', '_')}"] = world.ok("admin", "POST", "/api/v1/projects", body)["metadata"][
                "id"
            ]
        secret = {"metadata": {"name": "bobs"}, "spec": {"target": "BOB", "value": "b"}}
        ids["member2_secret"] = world.ok("member2", "POST", "/api/v1/secrets", secret)["metadata"]["id"]
        ids["public_key"] = public_key()
        world.ok("member", "POST", "/api/v1/ssh-keys", {"spec": {"public_key": ids["public_key"]}})
        world.ok("admin", "POST", "/api/v1/tokens", {"metadata": {"name": "named"}})
        env_spec = {"image": "debian:bookworm", "class_id": ids["class"]}
        env = world.ok("admin", "POST", "/api/v1/environments", {"spec": env_spec})
        ids["env"] = env["metadata"]["id"]
        deadline = time.monotonic() + 20
        while not world.ok("admin", "GET", f"/api/v1/environments/{ids['env']}")["status"].get("runner_id"):
            assert time.monotonic() < deadline, "the scheduler did not assign the environment"
            time.sleep(0.05)
        ids["admin_membership"] = world.ok("admin", "GET", f"/api/v1/memberships?user_id={ids['admin_user']}")["items"][
            0
        ]["metadata"]["id"]
        time.sleep(max(0.0, expires_by - time.monotonic()))
        return world


@pytest.fixture(scope="module")
def world(module_server: live_server.LiveServer) -> Iterator[World]:
    built = World.build(module_server.url, module_server.admin_token)
    try:
        yield built
    finally:
        built.close()


def assert_refused(response: httpx.Response, status: int, words: str = "") -> dict[str, Any]:
    """The response is the error envelope with ``status``, its code, and a message that says ``words``."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "details"}, body
    error: dict[str, Any] = body["error"]
    assert error["code"] == ERROR_CODES[status], error
    assert isinstance(error["message"], str) and error["message"], error
    assert words.lower() in error["message"].lower(), f"{words!r} not in {error['message']!r}"
    if status == 422:
        assert isinstance(error["details"], list) and error["details"], error
        assert all({"loc", "msg", "type"} <= set(d) for d in error["details"]), error
    return error


def bad(
    case_id: str,
    method: str,
    path: str,
    status: int,
    words: str = "",
    *,
    as_: str = "admin",
    loc: list[str | int] | None = None,
    **request: Any,
) -> Any:
    """One row of ``BAD_REQUESTS``; ``request`` goes to httpx (``json``, ``content``, ``headers``, ``params``)."""
    return pytest.param(method, path, status, words, as_, loc, request, id=case_id)


PROJECT = "/api/v1/projects"
ENVS = "/api/v1/environments"
JSON = {"content-type": "application/json"}

# fmt: off
BAD_REQUESTS = [
    # -- the body is not JSON, or not the JSON of an object -------------------------------------------------------
    bad("malformed-json", "POST", PROJECT, 422, "JSON decode error", content=b'{"spec": {"repository": ', headers=JSON),
    bad("trailing-garbage", "POST", PROJECT, 422, "JSON decode error", content=b'{"spec": {}} and more', headers=JSON),
    bad("json-array", "POST", PROJECT, 422, "valid dictionary", content=b"[]", headers=JSON),
    bad("json-null", "POST", PROJECT, 422, "valid dictionary", content=b"null", headers=JSON),
    bad("json-number", "POST", PROJECT, 422, "valid dictionary", content=b"7", headers=JSON),
    bad("no-body", "POST", PROJECT, 422, "field required", loc=["body"]),
    bad("lone-surrogate", "POST", PROJECT, 422, "spec.repository", content=b'{"spec": {"repository": "\\ud800"}}', headers=JSON),
    bad("text-plain", "POST", PROJECT, 415, "not text/plain", content=b'{"spec": {"repository": "x"}}', headers={"content-type": "text/plain"}),
    bad("form-encoded", "POST", PROJECT, 415, "Content-Type: application/json", data={"spec": "x"}),
    bad("no-content-type", "POST", PROJECT, 415, "not none", content=b'{"spec": {"repository": "x"}}'),
    bad("xml", "PATCH", "/api/v1/projects/{project_taken}", 415, "not application/xml", content=b"<spec/>", headers={"content-type": "application/xml"}),
    # -- unknown fields: 422, naming the field --------------------------------------------------------------------
    bad("unknown-top-field", "POST", PROJECT, 422, "body.bogus", loc=["body", "bogus"], json={"spec": {"repository": "x"}, "bogus": 1}),
    bad("unknown-spec-field", "POST", ENVS, 422, "body.spec.imagee", loc=["body", "spec", "imagee"], json={"spec": {"imagee": "x"}}),
    bad("unknown-metadata-field", "POST", PROJECT, 422, "body.metadata.nam", loc=["body", "metadata", "nam"], json={"metadata": {"nam": "x"}, "spec": {"repository": "x"}}),
    bad("status-in-a-patch", "PATCH", "/api/v1/environments/{env}", 422, "body.status", loc=["body", "status"], json={"status": {"phase": "running"}}),
    bad("status-in-a-create", "POST", ENVS, 422, "body.status", loc=["body", "status"], json={"status": {}}),
    bad("unknown-patch-field", "PATCH", "/api/v1/secrets/{member2_secret}", 422, "body.target", as_="member2", json={"value": "v", "target": "X"}),
    # -- wrong types and values -----------------------------------------------------------------------------------
    bad("string-for-int", "POST", ENVS, 422, "body.spec.timeout", loc=["body", "spec", "timeout"], json={"spec": {"timeout": "soon"}}),
    bad("string-for-bool", "POST", "/api/v1/environment-classes", 422, "body.spec.enabled", json={"spec": {"enabled": "perhaps"}}),
    bad("object-for-list", "POST", ENVS, 422, "body.spec.ports", json={"spec": {"ports": {"port": 80}}}),
    bad("port-out-of-range", "POST", ENVS, 422, "body.spec.ports.0.port", json={"spec": {"ports": [{"port": 70000}]}}),
    bad("timeout-too-long", "POST", ENVS, 422, "body.spec.timeout", json={"spec": {"timeout": 10**30}}),
    bad("cpu-nan", "POST", "/api/v1/environment-classes", 422, "body.spec.cpu", content=b'{"spec": {"cpu": NaN}}', headers=JSON),
    bad("bad-enum", "PATCH", "/api/v1/environments/{env}", 422, "body.spec.desired_phase", json={"spec": {"desired_phase": "flying"}}),
    bad("name-not-a-dns-label", "POST", PROJECT, 422, "body.metadata.name", json={"metadata": {"name": "Not A Name"}, "spec": {"repository": "x"}}),
    bad("label-value-not-a-string", "POST", PROJECT, 422, "body.metadata.labels.a", json={"metadata": {"labels": {"a": 1}}, "spec": {"repository": "x"}}),
    bad("content-git-and-path", "POST", ENVS, 422, "exactly one", json={"spec": {"content": {"git": {"url": "x"}, "local_path": "/x"}}}),
    bad("file-secret-relative-path", "POST", "/api/v1/secrets", 422, "absolute path", json={"spec": {"type": "file", "target": "x", "value": "v"}}),
    bad("project-secret-without-project", "POST", "/api/v1/secrets", 422, "project_id", json={"spec": {"scope": "project", "target": "X", "value": "v"}}),
    bad("bad-email", "POST", "/api/v1/users", 422, "body.spec.email", json={"metadata": {"name": "zed"}, "spec": {"email": "nope"}}),
    bad("bad-role", "PATCH", "/api/v1/memberships/{admin_membership}", 422, "body.spec.role", json={"spec": {"role": "owner"}}),
    bad("expires-at-garbage", "POST", "/api/v1/tokens", 422, "body.spec.expires_at", json={"spec": {"expires_at": "tomorrow"}}),
    bad("expires-at-no-zone", "POST", "/api/v1/tokens", 400, "time zone", json={"spec": {"expires_at": "2030-01-01T00:00:00"}}),
    bad("expires-at-past", "POST", "/api/v1/tokens", 400, "in the past", json={"spec": {"expires_at": "2000-01-01T00:00:00Z"}}),
    bad("expires-at-overflows", "POST", "/api/v1/tokens", 400, "out of range", json={"spec": {"expires_at": "9999-12-31T23:59:59-14:00"}}),
    bad("empty-exchange-token", "POST", "/api/v1/runners/exchange", 422, "body.exchange_token", as_="anonymous", json={"exchange_token": ""}),
    bad("ssh-key-garbage", "POST", "/api/v1/ssh-keys", 400, "public key", json={"spec": {"public_key": "hello"}}),
    bad("ssh-key-type", "POST", "/api/v1/ssh-keys", 400, "not supported", json={"spec": {"public_key": "ssh-dss AAAA"}}),
    bad("ssh-key-not-base64", "POST", "/api/v1/ssh-keys", 400, "base64", json={"spec": {"public_key": "ssh-ed25519 !!!"}}),
    bad("new-env-deleted", "POST", ENVS, 400, "deleted", json={"spec": {"desired_phase": "deleted"}}),
    bad("org-in-an-org", "POST", "/api/v1/organizations", 400, "belongs to no organization", json={"metadata": {"name": "x", "organization_id": "{org}"}}),
    bad("org-without-name", "POST", "/api/v1/organizations", 400, "metadata.name", json={"metadata": {}}),
    bad("user-without-name", "POST", "/api/v1/users", 400, "metadata.name", json={"metadata": {}}),
    bad("suspend-yourself", "PATCH", "/api/v1/users/{admin_user}", 403, "yourself", json={"spec": {"suspended": True}}),
    bad("class-of-a-busy-env", "PATCH", "/api/v1/environments/{env}", 400, "cannot change", json={"spec": {"class_id": "{spare_class}"}}),
    bad("observed-generation-ahead", "PUT", "/api/v1/environments/{env}/status", 400, "newer", as_="runner", json={"status": {"observed_generation": 99}}),
    # -- queries --------------------------------------------------------------------------------------------------
    bad("page-size-text", "GET", ENVS, 422, "query.page_size", loc=["query", "page_size"], params={"page_size": "abc"}),
    bad("page-size-zero", "GET", ENVS, 422, "query.page_size", params={"page_size": 0}),
    bad("page-size-too-big", "GET", ENVS, 422, "query.page_size", params={"page_size": 1001}),
    bad("phase-unknown", "GET", ENVS, 422, "query.phase", params={"phase": "flying"}),
    bad("watch-not-a-bool", "GET", ENVS, 422, "query.watch", params={"watch": "perhaps"}),
    bad("timeout-negative", "GET", ENVS, 422, "query.timeout_seconds", params={"watch": "true", "resource_version": "1", "timeout_seconds": -1}),
    bad("page-token-garbage", "GET", ENVS, 400, "page_token", params={"page_token": "!!!"}),
    bad("page-token-not-an-id", "GET", PROJECT, 400, "page_token", params={"page_token": base64.urlsafe_b64encode(b"hello").decode()}),
    bad("page-token-too-long", "GET", PROJECT, 422, "query.page_token", params={"page_token": "a" * 300}),
    bad("audit-page-token", "GET", "/api/v1/audit-events", 400, "page_token", params={"page_token": "zzz"}),
    bad("label-filter-no-equals", "GET", ENVS, 400, "KEY=VALUE", params={"label": "novalue"}),
    bad("label-filter-no-key", "GET", PROJECT, 400, "KEY=VALUE", params={"label": "=v"}),
    bad("watch-without-version", "GET", ENVS, 400, "needs resource_version", params={"watch": "true"}),
    bad("watch-version-garbage", "GET", ENVS, 400, "resource_version", params={"watch": "true", "resource_version": "abc"}),
    bad("watch-version-negative", "GET", PROJECT, 400, "resource_version", params={"watch": "true", "resource_version": "-5"}),
    bad("version-too-long", "GET", ENVS, 422, "query.resource_version", params={"resource_version": "1" * 31}),
    # -- resource_version in writes -------------------------------------------------------------------------------
    bad("patch-version-garbage", "PATCH", "/api/v1/projects/{project_taken}", 400, "resource_version", json={"resource_version": "abc"}),
    bad("patch-version-negative", "PATCH", "/api/v1/projects/{project_taken}", 400, "resource_version", json={"resource_version": "-1"}),
    bad("patch-version-float", "PATCH", "/api/v1/environments/{env}", 400, "resource_version", json={"resource_version": "1.5"}),
    bad("delete-version-garbage", "DELETE", "/api/v1/environments/{env}", 400, "resource_version", params={"resource_version": "abc"}),
    bad("status-version-garbage", "PUT", "/api/v1/runners/{runner}/status", 400, "resource_version", as_="runner", json={"status": {}, "resource_version": "x"}),
    # -- ids and text: absent ids are 404, NUL characters and over-long labels 400 --------------------------------
    bad("id-not-an-id", "GET", "/api/v1/environments/nonsense", 404, "not found"),
    bad("id-of-another-kind", "GET", "/api/v1/environments/{project_taken}", 404, "not found"),
    bad("id-well-formed-absent", "PATCH", "/api/v1/projects/prj_0000000000000000000000000", 404, "not found", json={}),
    bad("id-huge", "DELETE", "/api/v1/environments/" + "e" * 5000, 404, "not found"),
    bad("id-unicode", "GET", "/api/v1/secrets/s\u00e9cret", 404, "not found"),
    bad("id-nul", "GET", "/api/v1/environments/env%00x", 400, "NUL"),
    bad("filter-nul", "GET", ENVS, 400, "NUL", params={"creator_id": "a\x00b"}),
    bad("label-filter-nul", "GET", PROJECT, 400, "NUL", params={"label": "a=\x00"}),
    bad("body-nul", "POST", PROJECT, 400, "NUL", json={"spec": {"repository": "https://x/a\x00b"}}),
    bad("body-nul-label-key", "POST", PROJECT, 400, "NUL", json={"metadata": {"labels": {"\x00": "v"}}, "spec": {"repository": "x"}}),
    bad("body-nul-id", "POST", "/api/v1/memberships", 400, "NUL", json={"spec": {"user_id": "\x00"}}),
    bad("label-key-too-long", "POST", PROJECT, 400, "label", json={"metadata": {"labels": {"k" * 101: "v"}}, "spec": {"repository": "x"}}),
    bad("label-value-too-long", "PATCH", "/api/v1/projects/{project_taken}", 400, "label", json={"metadata": {"labels": {"k": "v" * 256}}}),
    bad("label-key-empty", "POST", PROJECT, 400, "label", json={"metadata": {"labels": {"": "v"}}, "spec": {"repository": "x"}}),
    # -- names already taken: 409 ---------------------------------------------------------------------------------
    bad("project-repository-with-password", "POST", PROJECT, 422, "must not carry a user name or password", json={"spec": {"repository": "https://me:hunter2@git.example/r.git"}}),
    bad("project-repository-option", "PATCH", "/api/v1/projects/{project_taken}", 422, "is not a git URL", json={"spec": {"repository": "--upload-pack=x"}}),
    bad("project-name-taken", "POST", PROJECT, 409, "already exists", json={"metadata": {"name": "taken"}, "spec": {"repository": "x"}}),
    bad("rename-to-taken", "PATCH", "/api/v1/projects/{project_other_project}", 409, "already exists", json={"metadata": {"name": "taken"}}),
    bad("class-name-taken", "POST", "/api/v1/environment-classes", 409, "already exists", json={"metadata": {"name": "taken"}}),
    bad("runner-name-taken", "POST", "/api/v1/runners", 409, "already exists", json={"metadata": {"name": "r1"}}),
    bad("user-name-taken", "POST", "/api/v1/users", 409, "already exists", json={"metadata": {"name": "alice"}}),
    bad("org-name-taken", "POST", "/api/v1/organizations", 409, "already exists", json={"metadata": {"name": "other"}}),
    bad("token-name-taken", "POST", "/api/v1/tokens", 409, "already exists", json={"metadata": {"name": "named"}}),
    bad("secret-name-taken", "POST", "/api/v1/secrets", 409, "already exists", as_="member2", json={"metadata": {"name": "bobs"}, "spec": {"target": "X", "value": "v"}}),
    bad("ssh-key-registered", "POST", "/api/v1/ssh-keys", 409, "already", as_="member", json={"spec": {"public_key": "{public_key}"}}),
    bad("member-already", "POST", "/api/v1/memberships", 409, "member already", json={"spec": {"user_id": "{member_user}"}}),
    # -- references to what is missing or another organization's ---------------------------------------------------
    bad("class-missing", "POST", ENVS, 400, "environment class", json={"spec": {"class_id": "cls_0000000000000000000000000"}}),
    bad("class-of-another-org", "POST", ENVS, 400, "environment class", json={"spec": {"class_id": "{other_class}"}}),
    bad("class-disabled", "POST", ENVS, 400, "disabled", json={"spec": {"class_id": "{disabled_class}"}}),
    bad("project-missing", "POST", ENVS, 400, "project", json={"spec": {"project_id": "prj_0000000000000000000000000"}}),
    bad("project-of-another-org", "POST", ENVS, 400, "project", json={"spec": {"project_id": "{other_project}"}}),
    bad("secret-missing", "POST", ENVS, 400, "secret", json={"spec": {"secrets": ["sec_0000000000000000000000000"]}}),
    bad("secret-of-another-org", "POST", ENVS, 400, "secret", json={"spec": {"secrets": ["{other_secret}"]}}),
    bad("secret-of-another-user", "POST", ENVS, 400, "not yours", as_="member", json={"spec": {"secrets": ["{member2_secret}"]}}),
    bad("patch-to-missing-class", "PATCH", "/api/v1/projects/{project_taken}", 400, "environment class", json={"spec": {"class_id": "{other_class}"}}),
    bad("prebuild-class-of-another-org", "POST", PROJECT, 400, "environment class", json={"spec": {"repository": "x", "prebuild": {"class_id": "{other_class}"}}}),
    bad("runner-missing", "POST", "/api/v1/environment-classes", 400, "runner", json={"spec": {"runner_ids": ["run_0000000000000000000000000"]}}),
    bad("secret-project-of-another-org", "POST", "/api/v1/secrets", 400, "project", json={"spec": {"scope": "project", "project_id": "{other_project}", "target": "X", "value": "v"}}),
    bad("member-of-nobody", "POST", "/api/v1/memberships", 404, "User", json={"spec": {"user_id": "usr_0000000000000000000000000"}}),
    bad("token-for-another-orgs-user", "POST", "/api/v1/tokens", 404, "User", json={"spec": {"user_id": "{other_admin_user}"}}),
    bad("create-in-another-org", "POST", PROJECT, 404, "Organization", json={"metadata": {"organization_id": "{other_org}"}, "spec": {"repository": "x"}}),
    bad("create-in-no-org", "POST", ENVS, 404, "Organization", json={"metadata": {"organization_id": "org_0000000000000000000000000"}}),
    bad("list-another-org", "GET", ENVS, 404, "Organization", params={"organization_id": "{other_org}"}),
    # -- what the state of the world forbids: 409 ------------------------------------------------------------------
    bad("demote-the-last-admin", "PATCH", "/api/v1/memberships/{admin_membership}", 409, "last admin", json={"spec": {"role": "member"}}),
    bad("remove-the-last-admin", "DELETE", "/api/v1/memberships/{admin_membership}", 409, "last admin"),
    bad("delete-a-class-in-use", "DELETE", "/api/v1/environment-classes/{class}", 409, "use"),
    bad("delete-a-busy-runner", "DELETE", "/api/v1/runners/{runner}", 409, "environments"),
    bad("delete-a-busy-org", "DELETE", "/api/v1/organizations/{org}", 409, "delete them first"),
    # -- exchange tokens ------------------------------------------------------------------------------------------
    bad("exchange-used", "POST", "/api/v1/runners/exchange", 401, "already used", as_="anonymous", json={"exchange_token": "{used_exchange_token}"}),
    bad("exchange-replaced", "POST", "/api/v1/runners/exchange", 401, "ask an admin", as_="anonymous", json={"exchange_token": "{replaced_exchange_token}"}),
    bad("exchange-expired", "POST", "/api/v1/runners/exchange", 401, "expired", as_="anonymous", json={"exchange_token": "{expired_exchange_token}"}),
    bad("exchange-unknown", "POST", "/api/v1/runners/exchange", 401, "not valid", as_="anonymous", json={"exchange_token": "dyx_nothing"}),
    bad("runner-credential-as-exchange", "POST", "/api/v1/runners/exchange", 401, "not valid", as_="anonymous", json={"exchange_token": "{runner_credential}"}),
    # -- the Authorization header ---------------------------------------------------------------------------------
    bad("no-credentials", "POST", PROJECT, 401, "no credentials", as_="anonymous", json={"spec": {"repository": "x"}}),
    bad("basic-auth", "POST", PROJECT, 401, "Bearer", as_="anonymous", headers={"Authorization": "Basic YTpi"}, json={"spec": {"repository": "x"}}),
    bad("bearer-without-token", "GET", "/api/v1/whoami", 401, "Bearer", as_="anonymous", headers={"Authorization": "Bearer"}),
    bad("bearer-extra-spaces", "GET", "/api/v1/whoami", 401, "unknown token", as_="anonymous", headers={"Authorization": "Bearer   dyu_x"}),
    bad("token-scheme", "GET", "/api/v1/whoami", 401, "Bearer", as_="anonymous", headers={"Authorization": "Token {admin_secret}"}),
    bad("bearer-and-more", "GET", "/api/v1/whoami", 401, "unknown token", as_="anonymous", headers={"Authorization": "Bearer {admin_secret} extra"}),
    bad("bearer-unknown", "DELETE", "/api/v1/environments/{env}", 401, "unknown token", as_="anonymous", headers={"Authorization": "Bearer dyu_unknown"}),
    bad("bearer-huge", "GET", "/api/v1/whoami", 401, "unknown token", as_="anonymous", headers={"Authorization": "Bearer " + "x" * 20000}),
    bad("bearer-latin-1", "GET", "/api/v1/whoami", 401, "unknown token", as_="anonymous", headers={"Authorization": "Bearer \u00e9t\u00e9".encode("latin-1")}),
    # -- methods and paths ----------------------------------------------------------------------------------------
    bad("method-not-allowed", "PUT", ENVS, 405, "not allowed", json={}),
    bad("method-not-allowed-whoami", "DELETE", "/api/v1/whoami", 405, "not allowed"),
    bad("no-such-path", "GET", "/api/v1/nothing", 404, "not found"),
]
# fmt: on


@pytest.mark.parametrize(("method", "path", "status", "words", "as_", "loc", "request_"), BAD_REQUESTS)
def test_a_bad_request_is_refused_clearly_and_writes_nothing(
    world: World,
    method: str,
    path: str,
    status: int,
    words: str,
    as_: str,
    loc: list[str | int] | None,
    request_: dict[str, Any],
) -> None:
    request_ = {
        key: world.resolve(value) if key in ("json", "params", "headers") else value for key, value in request_.items()
    }
    with world.unchanged(path):
        response = world.http(as_).request(method, world.resolve(path), **request_)
        error = assert_refused(response, status, words)
    if loc is not None:
        assert any(detail["loc"] == loc for detail in error["details"]), error["details"]
    if status == 401:
        assert response.headers.get("www-authenticate") == "Bearer"


def test_an_oversized_body_is_refused_with_its_length_or_without(world: World) -> None:
    body = b'{"spec": {"image": "x", "env": {"A": "' + b"x" * MAX_BODY + b'"}}}'

    def streamed() -> Iterator[bytes]:
        for start in range(0, len(body), 4096):
            yield body[start : start + 4096]

    with world.unchanged():
        sized = world.http("admin").post(ENVS, content=body, headers=JSON)
        assert_refused(sized, 413, f"larger than {MAX_BODY} bytes")
        chunked = world.http("admin").post(ENVS, content=streamed(), headers=JSON)
        assert "content-length" not in chunked.request.headers
        assert_refused(chunked, 413, f"larger than {MAX_BODY} bytes")
    just_fits = b'{"spec": {"target": "BIG", "value": "' + b"x" * (MAX_BODY - 100) + b'"}}'
    created = world.http("admin").post("/api/v1/secrets", content=iter([just_fits]), headers=JSON)
    assert created.status_code == 201, created.text
    world.ok("admin", "DELETE", f"/api/v1/secrets/{created.json()['metadata']['id']}")


@pytest.mark.parametrize(
    ("path", "change"),
    [
        pytest.param("/api/v1/projects/{project}", {"metadata": {"labels": {"a": "b"}}}, id="project"),
        pytest.param("/api/v1/organizations/{org}", {"spec": {"display_name": "A"}}, id="organization"),
        pytest.param("/api/v1/users/{member_user}", {"spec": {"display_name": "Alice"}}, id="user"),
        pytest.param("/api/v1/environment-classes/{class}", {"spec": {"description": "x"}}, id="class"),
        pytest.param("/api/v1/environments/{env}", {"spec": {"image": "debian:trixie"}}, id="environment"),
        pytest.param("/api/v1/secrets/{secret}", {"value": "new"}, id="secret"),
        pytest.param("/api/v1/memberships/{membership}", {"spec": {"role": "member"}}, id="membership"),
        pytest.param("/api/v1/runners/{runner}", {"spec": {"description": "x"}}, id="runner"),
    ],
)
def test_a_stale_resource_version_is_a_conflict_that_names_the_current_one(
    world: World, path: str, change: dict[str, Any]
) -> None:
    ids = dict(world.ids)
    project = {"spec": {"repository": f"https://example.com/{os.urandom(4).hex()}.git"}}
    ids["project"] = world.ok("admin", "POST", PROJECT, project)["metadata"]["id"]
    secret = {"spec": {"scope": "organization", "target": f"S{os.urandom(4).hex()}", "value": "v"}}
    ids["secret"] = world.ok("admin", "POST", "/api/v1/secrets", secret)["metadata"]["id"]
    user = world.ok("admin", "POST", "/api/v1/users", {"metadata": {"name": f"u{os.urandom(4).hex()}"}})
    ids["membership"] = world.ok("admin", "GET", f"/api/v1/memberships?user_id={user['metadata']['id']}")["items"][0][
        "metadata"
    ]["id"]
    target = re.sub(r"\{([a-z_]+)\}", lambda m: ids[m.group(1)], path)
    read = "/api/v1/memberships?page_size=1000" if "memberships" in target else target
    current = _current(world, read, target)
    stale = str(int(current["metadata"]["resource_version"]) - 1)
    with world.unchanged():
        refused = world.http("admin").patch(target, json={**change, "resource_version": stale})
        error = assert_refused(refused, 409, f"not {stale}")
    assert error["details"] == {"current_resource_version": current["metadata"]["resource_version"]}
    assert _current(world, read, target) == current
    accepted = world.http("admin").patch(
        target, json={**change, "resource_version": current["metadata"]["resource_version"]}
    )
    assert accepted.status_code == 200, accepted.text


def _current(world: World, read: str, target: str) -> dict[str, Any]:
    if read == target:
        return dict(world.ok("admin", "GET", read))
    wanted = target.rsplit("/", 1)[1]
    return next(item for item in world.ok("admin", "GET", read)["items"] if item["metadata"]["id"] == wanted)


def test_stale_resource_versions_on_delete_and_status_writes_are_conflicts(world: World) -> None:
    env = world.ok("admin", "GET", f"{ENVS}/{world.ids['env']}")
    version = env["metadata"]["resource_version"]
    stale = str(int(version) - 1)
    with world.unchanged():
        deleted = world.http("admin").delete(f"{ENVS}/{world.ids['env']}", params={"resource_version": stale})
        assert assert_refused(deleted, 409)["details"] == {"current_resource_version": version}
        reported = world.http("runner").put(
            f"{ENVS}/{world.ids['env']}/status", json={"status": {"phase": "running"}, "resource_version": stale}
        )
        assert assert_refused(reported, 409)["details"] == {"current_resource_version": version}
    assert world.ok("admin", "GET", f"{ENVS}/{world.ids['env']}") == env


def test_a_failed_exchange_leaves_the_runner_and_its_credential_alone(world: World) -> None:
    runner = f"/api/v1/runners/{world.ids['runner']}"
    before = world.ok("admin", "GET", runner)
    with world.unchanged():
        for token in (world.ids["used_exchange_token"], world.ids["expired_exchange_token"], "dyx_x"):
            response = world.http("anonymous").post("/api/v1/runners/exchange", json={"exchange_token": token})
            assert_refused(response, 401)
    assert world.ok("admin", "GET", runner) == before
    assert world.ok("runner", "GET", "/api/v1/whoami")["id"] == world.ids["runner"], "the credential still works"


def test_an_exchange_token_is_no_bearer_credential(world: World) -> None:
    created = world.ok("admin", "POST", "/api/v1/runners", {"metadata": {"name": "fresh"}})
    bearer = {"Authorization": f"Bearer {created['exchange_token']}"}
    with world.unchanged():
        assert_refused(world.http("anonymous").get("/api/v1/whoami", headers=bearer), 401, "exchange token")
    exchange = {"exchange_token": created["exchange_token"]}
    assert world.http("anonymous").post("/api/v1/runners/exchange", json=exchange).status_code == 200, "still unused"


def test_a_refused_create_leaves_no_part_of_itself(world: World) -> None:
    """A user whose name is taken: neither the user nor its membership nor an audit event is written; an
    organization whose name is taken: no membership for its would-be admin."""
    with world.unchanged():
        assert_refused(world.http("admin").post("/api/v1/users", json={"metadata": {"name": "bob"}}), 409)
        assert_refused(world.http("member").post("/api/v1/organizations", json={"metadata": {"name": "other"}}), 409)
    memberships = world.ok("member", "GET", "/api/v1/whoami")["memberships"]
    assert [m["metadata"]["organization_id"] for m in memberships] == [world.ids["org"]]


def test_derived_names_follow_the_name_pattern(world: World) -> None:
    """Names made from a repository, a secret's target or a key's fingerprint are DNS-label-like, at most 63
    characters (regression: 'my repo!', now 'My+Repo!' as URLs hold no spaces, and a PostgreSQL 500 past 100 characters)."""
    pattern = re.compile(r"^[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?$")
    long_tail = "A" * 150
    made = [
        world.ok("admin", "POST", PROJECT, {"spec": {"repository": f"https://example.com/{long_tail}.git"}}),
        world.ok("admin", "POST", PROJECT, {"spec": {"repository": "https://example.com/My+Repo!.git"}}),
        world.ok(
            "admin", "POST", "/api/v1/secrets", {"spec": {"type": "file", "target": "/home/u/My File", "value": "v"}}
        ),
        world.ok("member2", "POST", "/api/v1/ssh-keys", {"spec": {"public_key": public_key()}}),
    ]
    for resource in made:
        assert pattern.match(resource["metadata"]["name"]), resource["metadata"]["name"]
    assert made[1]["metadata"]["name"] == "my-repo"
