"""Authorization: every principal against every route of the API, allowed and denied, on both databases.

The policy is the table ``POLICY`` below: one row per route (a method and a path whose ``{placeholders}`` name
resources of the world that ``World.build`` makes), one column per principal, each cell the status that
principal gets. ``CASES`` expands it into one test per cell. The rules it spells out come from
``devyard.server.policy``: no or bad credentials get 401; what a principal may not see answers 404; what it may
see but not change answers 403; members see and change only their own environments, tokens, SSH keys and
user secrets; admins see and change everything in their organization; runners see themselves, their
organization (for its policy: the default image), its classes and projects and the environments assigned to
them, and write only their status.

The world, made once per module and database through the public API (on ``module_server``, so that the
hundreds of cells share one set-up):
- organization A (``org``, the bootstrapped ``default``): ``admin`` (the bootstrap admin), the members
  ``member`` (alice) and ``member2`` (bob); the runners ``runner`` and ``runner2``, each the only runner that
  offers one class, so that the scheduler puts ``env_member`` and ``env_admin`` on ``runner`` and
  ``env_member2`` on ``runner2``.
- organization B (``other_org``) and its admin ``other_admin`` (carol): the admin of A made B (which made him
  its admin), made carol a user of B with the admin role, minted her token and left B. So carol and the
  admin of A share no organization, and carol is no user of A at all.
- the ``nobody`` column stands for four principals with bad credentials: none (``anonymous``), a revoked token
  of alice's, an expired one (``spec.expires_at`` a second after it was made) and the token of a suspended
  user (dave). Each gets the cell's status.

A placeholder written ``{fresh:NAME}`` is made anew, like NAME, for a call that is expected to succeed
(deleting the shared one would spoil the cells after it); a denied call goes to the shared one. A cell marked

Each cell checks the status; for a denial, the error envelope; for a denied mutation, that nothing changed
(the target read back by its organization's admin, the collection's members, and no audit event by the
caller); for an allowed mutation, an audit event that names the caller, the target and the source address.
"""

from __future__ import annotations

import base64
import json
import os
import re
import struct
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from support import live_server

# fmt: off
POLICY = """
method path                                                  admin member member2 other_admin runner runner2 nobody
GET    /healthz                                                200   200    200     200         200    200     200
GET    /readyz                                                 200   200    200     200         200    200     200
GET    /api/v1/whoami                                          200   200    200     200         200    200     401

GET    /api/v1/organizations                                   200   200    200     200         403    403     401
POST   /api/v1/organizations                                   201   201    201     201         403    403     401
GET    /api/v1/organizations/{org}                             200   200    200     404         200    200     401
GET    /api/v1/organizations/{other_org}                       404   404    404     200         404    404     401
PATCH  /api/v1/organizations/{spare_org}                       200   403    403     404         404    404     401
DELETE /api/v1/organizations/{fresh:spare_org}                 200   403    403     404         404    404     401
DELETE /api/v1/organizations/{org}                             409   403    403     404         403    403     401

GET    /api/v1/users                                           200   200    200     200         403    403     401
POST   /api/v1/users                                           201   403    403     404         403    403     401
GET    /api/v1/users/{member_user}                             200   200    200     404         404    404     401
GET    /api/v1/users/{other_admin_user}                        404   404    404     200         404    404     401
PATCH  /api/v1/users/{member_user}                             200   200    403     404         404    404     401
PATCH  /api/v1/users/{fresh:member2_user}#suspend              200   403    403     404         404    404     401
PATCH  /api/v1/users/{admin_user}#suspend                      403   403    403     404         404    404     401

GET    /api/v1/memberships                                     200   200    200     200         403    403     401
POST   /api/v1/memberships                                     201   403    403     404         403    403     401
PATCH  /api/v1/memberships/{fresh:member_membership}           200   403    403     404         404    404     401
PATCH  /api/v1/memberships/{admin_membership}                  409   403    403     404         404    404     401
DELETE /api/v1/memberships/{fresh:member_membership}           200   403    403     404         404    404     401

GET    /api/v1/tokens                                          200   200    200     200         403    403     401
POST   /api/v1/tokens                                          201   201    201     404         403    403     401
POST   /api/v1/tokens#for-member                               201   201    404     404         403    403     401
GET    /api/v1/tokens/{member_token}                           200   200    404     404         404    404     401
GET    /api/v1/tokens/{admin_token}                            200   404    404     404         404    404     401
DELETE /api/v1/tokens/{fresh:member_token}                     200   200    404     404         404    404     401

GET    /api/v1/runners                                         200   403    403     200         200    200     401
POST   /api/v1/runners                                         201   403    403     404         403    403     401
GET    /api/v1/runners/{runner}                                200   404    404     404         200    404     401
PATCH  /api/v1/runners/{runner}                                200   404    404     404         403    404     401
DELETE /api/v1/runners/{fresh:runner}                          200   404    404     404         403    404     401
DELETE /api/v1/runners/{runner}                                409   404    404     404         403    404     401
POST   /api/v1/runners/{fresh:runner}/exchange-token           201   404    404     404         403    404     401
PUT    /api/v1/runners/{runner}/status                         403   404    404     404         200    404     401
GET    /api/v1/runners/{runner}/gateway-key                    403   404    404     404         200    404     401
POST   /api/v1/runners/exchange#fresh                          200   200    200     200         200    200     200
POST   /api/v1/runners/exchange#used                           401   401    401     401         401    401     401

GET    /api/v1/environment-classes                             200   200    200     200         200    200     401
POST   /api/v1/environment-classes                             201   403    403     404         403    403     401
GET    /api/v1/environment-classes/{class}                     200   200    200     404         200    200     401
PATCH  /api/v1/environment-classes/{class}                     200   403    403     404         403    403     401
DELETE /api/v1/environment-classes/{fresh:class}               200   403    403     404         403    403     401
DELETE /api/v1/environment-classes/{class}                     409   403    403     404         403    403     401

GET    /api/v1/projects                                        200   200    200     200         200    200     401
POST   /api/v1/projects                                        201   403    403     404         403    403     401
GET    /api/v1/projects/{project}                              200   200    200     404         200    200     401
GET    /api/v1/projects/{other_project}                        404   404    404     200         404    404     401
PATCH  /api/v1/projects/{project}                              200   403    403     404         403    403     401
DELETE /api/v1/projects/{fresh:project}                        200   403    403     404         403    403     401

GET    /api/v1/environments                                    200   200    200     200         200    200     401
GET    /api/v1/environments?organization_id={other_org}        404   404    404     200         404    404     401
POST   /api/v1/environments                                    201   201    201     404         403    403     401
GET    /api/v1/environments/{env_member}                       200   200    404     404         200    404     401
GET    /api/v1/environments/{env_member2}                      200   404    200     404         404    200     401
GET    /api/v1/environments/{env_admin}                        200   404    404     404         200    404     401
GET    /api/v1/environments/{env_other}                        404   404    404     200         404    404     401
PATCH  /api/v1/environments/{env_member}                       200   200    404     404         403    404     401
DELETE /api/v1/environments/{fresh:env_member}                 202   202    404     404         403    404     401
PUT    /api/v1/environments/{env_member}/status                403   403    404     404         200    404     401
PUT    /api/v1/environments/{env_member2}/status               403   404    403     404         404    200     401
GET    /api/v1/environments/{env_member}/secrets               403   403    404     404         200    404     401
GET    /api/v1/environments/{env_member}/authorized-keys       403   403    404     404         200    404     401
POST   /api/v1/environments/{env_member}/access                409   409    404     404         403    404     401
POST   /api/v1/environments/{env_member}/logs                  403   403    404     404         200    404     401
GET    /api/v1/environments/{env_member}/logs                  200   200    404     404         200    404     401

GET    /api/v1/secrets                                         200   200    200     200         403    403     401
POST   /api/v1/secrets                                         201   201    201     404         403    403     401
POST   /api/v1/secrets#organization                            201   403    403     404         403    403     401
GET    /api/v1/secrets/{secret_org}                            200   200    200     404         404    404     401
GET    /api/v1/secrets/{secret_member}                         200   200    404     404         404    404     401
GET    /api/v1/secrets/{secret_other}                          404   404    404     200         404    404     401
PATCH  /api/v1/secrets/{secret_member}                         200   200    404     404         404    404     401
PATCH  /api/v1/secrets/{secret_org}                            200   403    403     404         404    404     401
DELETE /api/v1/secrets/{fresh:secret_member}                   200   200    404     404         404    404     401
DELETE /api/v1/secrets/{fresh:secret_org}                      200   403    403     404         404    404     401

GET    /api/v1/ssh-keys                                        200   200    200     200         403    403     401
GET    /api/v1/ssh-keys?user_id={member_user}                  200   200    200     200         200    200     401
POST   /api/v1/ssh-keys                                        201   201    201     404         403    403     401
GET    /api/v1/ssh-keys/{key_member}                           200   200    404     404         404    404     401
DELETE /api/v1/ssh-keys/{fresh:key_member}                     200   200    404     404         404    404     401

GET    /api/v1/audit-events                                    200   403    403     200         403    403     401
GET    /api/v1/audit-events?organization_id={org}              200   403    403     404         403    403     401
"""
# fmt: on

#: The principals behind the ``nobody`` column.
NOBODY = ("anonymous", "revoked", "expired", "suspended")


#: The request bodies, by route key (exact) or route shape (placeholders as ``*``). ``{unique}`` is new in
#: every call; other placeholders are the world's resources.
BODIES: dict[str, Any] = {
    "POST /api/v1/organizations": {"metadata": {"name": "org-{unique}"}},
    "PATCH /api/v1/organizations/*": {"metadata": {"labels": {"touched": "{unique}"}}},
    "POST /api/v1/users": {"metadata": {"name": "user-{unique}", "organization_id": "{org}"}, "role": "member"},
    "PATCH /api/v1/users/*": {"spec": {"display_name": "name {unique}"}},
    "PATCH /api/v1/users/*#suspend": {"spec": {"suspended": True}},
    "POST /api/v1/memberships": {
        "metadata": {"organization_id": "{org}"},
        "spec": {"user_id": "{fresh:loner_user}", "role": "member"},
    },
    "PATCH /api/v1/memberships/*": {"spec": {"role": "admin"}},
    "PATCH /api/v1/memberships/{admin_membership}": {"spec": {"role": "member"}},
    "POST /api/v1/tokens": {"metadata": {"organization_id": "{org}"}, "spec": {"description": "t {unique}"}},
    "POST /api/v1/tokens#for-member": {"metadata": {"organization_id": "{org}"}, "spec": {"user_id": "{member_user}"}},
    "POST /api/v1/runners": {"metadata": {"name": "runner-{unique}", "organization_id": "{org}"}},
    "PATCH /api/v1/runners/*": {"metadata": {"labels": {"touched": "{unique}"}}},
    "PUT /api/v1/runners/*/status": {"status": {"capacity": 100, "runtime": "test"}},
    "POST /api/v1/runners/exchange#fresh": {"exchange_token": "{fresh:exchange_token}"},
    "POST /api/v1/runners/exchange#used": {"exchange_token": "{used_exchange_token}"},
    "POST /api/v1/environment-classes": {"metadata": {"name": "class-{unique}", "organization_id": "{org}"}},
    "PATCH /api/v1/environment-classes/*": {"metadata": {"labels": {"touched": "{unique}"}}},
    "POST /api/v1/projects": {
        "metadata": {"name": "project-{unique}", "organization_id": "{org}"},
        "spec": {"repository": "https://example.com/{unique}.git"},
    },
    "PATCH /api/v1/projects/*": {"metadata": {"labels": {"touched": "{unique}"}}},
    # The class that no online runner offers: new environments stay unscheduled and quiet.
    "POST /api/v1/environments": {
        "metadata": {"organization_id": "{org}"},
        "spec": {"image": "debian:bookworm", "class_id": "{idle_class}"},
    },
    "PATCH /api/v1/environments/*": {"metadata": {"labels": {"touched": "{unique}"}}},
    "PUT /api/v1/environments/*/status": {"status": {"phase": "creating", "message": "{unique}"}},
    "POST /api/v1/environments/*/logs": {"chunks": [{"stream": "build", "offset": 0, "data": "{unique}\n"}]},
    "POST /api/v1/secrets": {
        "metadata": {"organization_id": "{org}"},
        "spec": {"scope": "user", "target": "VAR_{unique}", "value": "v"},
    },
    "POST /api/v1/secrets#organization": {
        "metadata": {"organization_id": "{org}"},
        "spec": {"scope": "organization", "target": "ORG_{unique}", "value": "v"},
    },
    "PATCH /api/v1/secrets/*": {"value": "changed {unique}"},
    "POST /api/v1/ssh-keys": {"metadata": {"organization_id": "{org}"}, "spec": {"public_key": "{new_public_key}"}},
}

PRINCIPALS = ("admin", "member", "member2", "other_admin", "runner", "runner2")
USER_AGENT = "devyard-authorization-matrix"
ERROR_CODES = {400: "bad_request", 401: "unauthenticated", 403: "forbidden", 404: "not_found", 409: "conflict"}
_PLACEHOLDER = re.compile(r"\{(fresh:)?([a-z0-9_]+)\}")


@dataclass(frozen=True)
class Route:
    method: str
    #: The path as the table writes it: placeholders, a query, and maybe ``#variant`` (never sent).
    template: str

    @property
    def key(self) -> str:
        return f"{self.method} {self.template}"

    @property
    def shape(self) -> str:
        return f"{self.method} {_PLACEHOLDER.sub('*', self.template)}"

    @property
    def openapi_path(self) -> str:
        path = self.template.split("#", 1)[0].split("?", 1)[0]
        return _PLACEHOLDER.sub("{}", path)

    @property
    def mutates(self) -> bool:
        return self.method != "GET"

    def body(self) -> Any:
        for key in (self.key, self.shape):
            if key in BODIES:
                return BODIES[key]
        shape_without_variant = self.shape.split("#", 1)[0]
        return BODIES.get(shape_without_variant)


@dataclass(frozen=True)
class Case:
    principal: str
    route: Route
    expected: int

    @property
    def id(self) -> str:
        return f"{self.principal}-{self.route.key}"


def parse_policy(table: str) -> list[tuple[Route, dict[str, str]]]:
    lines = [line.split() for line in table.strip().splitlines() if line.strip()]
    header, rows = lines[0], lines[1:]
    columns = header[2:]
    parsed = []
    for row in rows:
        method, path, *cells = row
        assert len(cells) == len(columns), f"{method} {path}: {len(cells)} cells for {len(columns)} principals"
        parsed.append((Route(method, path), dict(zip(columns, cells, strict=True))))
    return parsed


def expand(table: str) -> list[Any]:
    params = []
    for route, cells in parse_policy(table):
        for column, cell in cells.items():
            expected = int(cell)
            principals = NOBODY if column == "nobody" else (column,)
            for principal in principals:
                case = Case(principal, route, expected)
                params.append(pytest.param(case, id=case.id))
    return params


ROUTES = parse_policy(POLICY)
CASES = expand(POLICY)


def new_public_key() -> str:
    """A well-formed OpenSSH ed25519 public key line (random, so never registered before)."""
    key_type = b"ssh-ed25519"
    blob = struct.pack(">I", len(key_type)) + key_type + struct.pack(">I", 32) + os.urandom(32)
    return f"ssh-ed25519 {base64.b64encode(blob).decode()} matrix@devyard"


def unique() -> str:
    return uuid.uuid4().hex[:10]


@dataclass
class World:
    """The resources and principals the table names, on one live server."""

    url: str
    #: principal -> its bearer secret (None: no Authorization header)
    secrets: dict[str, str | None] = field(default_factory=dict)
    #: principal -> the id its actions are audited under (None: anonymous)
    actor_ids: dict[str, str | None] = field(default_factory=dict)
    #: placeholder -> resource id (or, for exchange tokens and keys, the value itself)
    ids: dict[str, str] = field(default_factory=dict)
    #: placeholder -> the principal that reads it back (the admin of its organization)
    readers: dict[str, str] = field(default_factory=dict)
    #: placeholder -> a function that makes another one like it and returns its id
    factories: dict[str, Callable[[], str]] = field(default_factory=dict)
    _http: dict[str, httpx.Client] = field(default_factory=dict)

    def http(self, principal: str) -> httpx.Client:
        if principal not in self._http:
            headers = {"User-Agent": USER_AGENT}
            secret = self.secrets[principal]
            if secret is not None:
                headers["Authorization"] = f"Bearer {secret}"
            self._http[principal] = httpx.Client(base_url=self.url, headers=headers, timeout=30.0)
        return self._http[principal]

    def close(self) -> None:
        for client in self._http.values():
            client.close()

    def call(self, principal: str, method: str, path: str, body: Any = None) -> httpx.Response:
        return self.http(principal).request(method, path, json=body)

    def ok(self, principal: str, method: str, path: str, body: Any = None) -> Any:
        response = self.call(principal, method, path, body)
        assert response.is_success, f"{principal} {method} {path}: {response.status_code} {response.text}"
        return response.json()

    # -- placeholders -----------------------------------------------------------------------------------

    def resolve(self, value: Any, *, fresh: bool) -> Any:
        """``value`` with its placeholders replaced; ``{fresh:NAME}`` makes a new NAME when ``fresh``."""
        if isinstance(value, dict):
            return {k: self.resolve(v, fresh=fresh) for k, v in value.items()}
        if isinstance(value, list):
            return [self.resolve(v, fresh=fresh) for v in value]
        if not isinstance(value, str):
            return value
        return _PLACEHOLDER.sub(lambda m: self._value(m.group(2), fresh=fresh and bool(m.group(1))), value)

    def _value(self, name: str, *, fresh: bool) -> str:
        if name == "unique":
            return unique()
        if name == "new_public_key":
            return new_public_key()
        if fresh:
            return self.factories[name]()
        return self.ids[name]

    # -- building ---------------------------------------------------------------------------------------

    @classmethod
    def build(cls, url: str, admin_secret: str) -> World:
        world = cls(url)
        world.secrets["admin"] = admin_secret
        world.secrets["anonymous"] = None
        admin_id = world.ok("admin", "GET", "/api/v1/whoami")["id"]
        world.actor_ids.update(admin=admin_id, anonymous=None)
        org = world.ok("admin", "GET", "/api/v1/organizations")["items"][0]["metadata"]["id"]
        world.ids.update(org=org, admin_user=admin_id)
        world.ids["admin_membership"] = world._membership_of(admin_id, org)

        # An expired token first, so that its second passes while the rest is made.
        alice = world._user("alice", org)
        world.ids["member_user"] = alice
        expires = (datetime.now(UTC) + timedelta(seconds=1)).isoformat()
        world.secrets["expired"] = world._token(alice, org, expires_at=expires)[1]
        expires_by = time.monotonic() + 1.5
        world.actor_ids["expired"] = alice
        world.secrets["member"] = world._token(alice, org)[1]
        world.actor_ids["member"] = alice
        revoked_id, world.secrets["revoked"] = world._token(alice, org)
        world.ok("admin", "DELETE", f"/api/v1/tokens/{revoked_id}")
        world.actor_ids["revoked"] = alice

        bob = world._user("bob", org)
        world.ids["member2_user"] = bob
        world.secrets["member2"] = world._token(bob, org)[1]
        world.actor_ids["member2"] = bob
        dave = world._user("dave", org)
        world.secrets["suspended"] = world._token(dave, org)[1]
        world.actor_ids["suspended"] = dave
        world.ok("admin", "PATCH", f"/api/v1/users/{dave}", {"spec": {"suspended": True}})

        world._build_other_organization()
        world._build_organization_a(org)
        for name in world.ids:
            world.readers.setdefault(name, "admin")
        time.sleep(max(0.0, expires_by - time.monotonic()))
        return world

    def _user(self, name: str, org: str, role: str = "member", as_: str = "admin") -> str:
        body = {"metadata": {"name": name, "organization_id": org}, "role": role}
        return str(self.ok(as_, "POST", "/api/v1/users", body)["metadata"]["id"])

    def _token(self, user_id: str, org: str, *, expires_at: str | None = None, as_: str = "admin") -> tuple[str, str]:
        body = {"metadata": {"organization_id": org}, "spec": {"user_id": user_id, "expires_at": expires_at}}
        created = self.ok(as_, "POST", "/api/v1/tokens", body)
        return created["token"]["metadata"]["id"], created["secret"]

    def _membership_of(self, user_id: str, org: str, as_: str = "admin") -> str:
        page = self.ok(as_, "GET", f"/api/v1/memberships?organization_id={org}&user_id={user_id}")
        [membership] = page["items"]
        return str(membership["metadata"]["id"])

    def _build_other_organization(self) -> None:
        other = self.ok("admin", "POST", "/api/v1/organizations", {"metadata": {"name": "other"}})["metadata"]["id"]
        carol = self._user("carol", other, role="admin")
        self.secrets["other_admin"] = self._token(carol, other)[1]
        self.actor_ids["other_admin"] = carol
        # The admin of A leaves B: carol is its only admin now.
        self.ok("admin", "DELETE", f"/api/v1/memberships/{self._membership_of(self.ids['admin_user'], other)}")
        as_carol = "other_admin"
        project = self.ok(
            as_carol, "POST", "/api/v1/projects", {"spec": {"repository": "https://example.com/other.git"}}
        )
        secret = self.ok(
            as_carol,
            "POST",
            "/api/v1/secrets",
            {"spec": {"scope": "organization", "target": "OTHER", "value": "b"}},
        )
        env = self.ok(as_carol, "POST", "/api/v1/environments", {"spec": {"image": "debian:bookworm"}})
        found = {
            "other_org": other,
            "other_admin_user": carol,
            "other_project": project["metadata"]["id"],
            "secret_other": secret["metadata"]["id"],
            "env_other": env["metadata"]["id"],
        }
        self.ids.update(found)
        self.readers.update(dict.fromkeys(found, "other_admin"))

    def _build_organization_a(self, org: str) -> None:
        ids = self.ids
        for principal, name in (("runner", "r1"), ("runner2", "r2")):
            runner_id, exchange_token = self._runner(name, org)
            credential = self.ok("anonymous", "POST", "/api/v1/runners/exchange", {"exchange_token": exchange_token})
            self.secrets[principal] = credential["token"]
            self.actor_ids[principal] = runner_id
            ids["runner" if principal == "runner" else "runner2_id"] = runner_id
            if principal == "runner":
                ids["used_exchange_token"] = exchange_token
            self.ok(principal, "PUT", f"/api/v1/runners/{runner_id}/status", {"status": {"capacity": 100}})
        # A runner that never comes online, and a class only it offers: environments of that class wait.
        idle_runner, _ = self._runner("never-online", org)
        ids["idle_class"] = self._class("idle", org, [idle_runner])
        ids["class"] = self._class("one", org, [ids["runner"]])
        class2 = self._class("two", org, [ids["runner2_id"]])
        ids["project"] = self.ok(
            "admin",
            "POST",
            "/api/v1/projects",
            {"metadata": {"name": "project"}, "spec": {"repository": "https://example.com/a.git"}},
        )["metadata"]["id"]

        self.factories.update(
            spare_org=lambda: self._spare_org(org),
            member2_user=lambda: self._user(f"user-{unique()}", org),
            loner_user=lambda: self._user(f"loner-{unique()}", ids["spare_org"]),
            # In an organization of its own: promoting it must not give A a second admin.
            member_membership=lambda: self._membership_of(*self._user_in_new_organization()),
            member_token=lambda: self._token(ids["member_user"], org, as_="member")[0],
            runner=lambda: self._runner(f"runner-{unique()}", org)[0],
            exchange_token=lambda: self._runner(f"runner-{unique()}", org)[1],
            **{"class": lambda: self._class(f"class-{unique()}", org, [])},
            project=lambda: self.ok(
                "admin",
                "POST",
                "/api/v1/projects",
                {"metadata": {"organization_id": org}, "spec": {"repository": f"https://example.com/{unique()}.git"}},
            )["metadata"]["id"],
            env_member=lambda: self._environment("member", org, ids["class"]),
            secret_member=lambda: self._secret("member", org, "user"),
            secret_org=lambda: self._secret("admin", org, "organization"),
            key_member=lambda: self._key("member", org),
        )
        ids["spare_org"] = self._spare_org(org)
        ids["loner_user"] = self._user("loner", ids["spare_org"])
        ids["member_membership"] = self._membership_of(ids["member_user"], org)
        ids["member_token"] = self._token(ids["member_user"], org, as_="member")[0]
        ids["admin_token"] = self._token(ids["admin_user"], org, as_="admin")[0]
        ids["secret_member"] = self._secret("member", org, "user")
        self._secret("member2", org, "user")
        ids["secret_org"] = self._secret("admin", org, "organization")
        ids["key_member"] = self._key("member", org)
        self._key("member2", org)
        ids["env_member"] = self._environment("member", org, ids["class"])
        ids["env_member2"] = self._environment("member2", org, class2)
        ids["env_admin"] = self._environment("admin", org, ids["class"])

    def _runner(self, name: str, org: str) -> tuple[str, str]:
        created = self.ok("admin", "POST", "/api/v1/runners", {"metadata": {"name": name, "organization_id": org}})
        return created["runner"]["metadata"]["id"], created["exchange_token"]

    def _class(self, name: str, org: str, runner_ids: list[str]) -> str:
        body = {"metadata": {"name": name, "organization_id": org}, "spec": {"runner_ids": runner_ids}}
        return str(self.ok("admin", "POST", "/api/v1/environment-classes", body)["metadata"]["id"])

    def _spare_org(self, org: str) -> str:
        """An organization the admin of A made, with alice and bob as members."""
        spare = self.ok("admin", "POST", "/api/v1/organizations", {"metadata": {"name": f"spare-{unique()}"}})
        spare_id = spare["metadata"]["id"]
        for user in (self.ids["member_user"], self.ids["member2_user"]):
            body = {"metadata": {"organization_id": spare_id}, "spec": {"user_id": user, "role": "member"}}
            self.ok("admin", "POST", "/api/v1/memberships", body)
        return str(spare_id)

    def _user_in_new_organization(self) -> tuple[str, str]:
        spare = self.ok("admin", "POST", "/api/v1/organizations", {"metadata": {"name": f"spare-{unique()}"}})
        spare_id = str(spare["metadata"]["id"])
        return self._user(f"user-{unique()}", spare_id), spare_id

    def _secret(self, owner: str, org: str, scope: str) -> str:
        body = {
            "metadata": {"organization_id": org},
            "spec": {"scope": scope, "target": f"S_{unique()}", "value": "secret"},
        }
        return str(self.ok(owner, "POST", "/api/v1/secrets", body)["metadata"]["id"])

    def _key(self, owner: str, org: str) -> str:
        body = {"metadata": {"organization_id": org}, "spec": {"public_key": new_public_key()}}
        return str(self.ok(owner, "POST", "/api/v1/ssh-keys", body)["metadata"]["id"])

    def _environment(self, owner: str, org: str, class_id: str) -> str:
        """An environment of ``owner``'s, once the scheduler has put it on the runner that offers the class."""
        body = {"metadata": {"organization_id": org}, "spec": {"image": "debian:bookworm", "class_id": class_id}}
        env_id = str(self.ok(owner, "POST", "/api/v1/environments", body)["metadata"]["id"])
        deadline = time.monotonic() + 20
        while not self.ok("admin", "GET", f"/api/v1/environments/{env_id}")["status"].get("runner_id"):
            assert time.monotonic() < deadline, f"the scheduler did not assign {env_id}"
            time.sleep(0.05)
        return env_id

    # -- reading back ---------------------------------------------------------------------------------

    def target(self, route: Route, path: str) -> tuple[str, str] | None:
        """The placeholder a route acts on and the resolved id, or None for a collection route."""
        template = route.template.split("#", 1)[0].split("?", 1)[0]
        match = _PLACEHOLDER.search(template)
        if match is None:
            return None
        collection = template[: match.start()]
        resource_id = path[len(collection) :].split("/", 1)[0].split("?", 1)[0]
        return match.group(2), resource_id

    def read_back(self, route: Route, path: str) -> Any:
        """The state a denied call must leave alone: the target as its admin sees it, or the collection."""
        template = route.template.split("#", 1)[0].split("?", 1)[0]
        found = self.target(route, path)
        if found is None:
            if not template.startswith("/api/v1/") or template.endswith("/exchange"):
                return None
            readers = ("admin", "other_admin")
            pages = {reader: self.ok(reader, "GET", f"{template}?page_size=1000") for reader in readers}
            return {reader: sorted(item["metadata"]["id"] for item in page["items"]) for reader, page in pages.items()}
        placeholder, resource_id = found
        reader = self.readers.get(placeholder, "admin")
        collection = template[: template.index("{")]
        if collection == "/api/v1/memberships/":
            items = self.ok(reader, "GET", "/api/v1/memberships?page_size=1000")["items"]
            return [item for item in items if item["metadata"]["id"] == resource_id]
        response = self.call(reader, "GET", f"{collection}{resource_id}")
        return response.status_code, response.json()

    def audit_heads(self, actor_id: str | None) -> dict[str, Any]:
        """The newest audit event by ``actor_id`` in each organization."""
        if actor_id is None:
            return {}
        heads = {}
        for reader in ("admin", "other_admin"):
            page = self.ok(reader, "GET", f"/api/v1/audit-events?actor_id={actor_id}&page_size=1")
            heads[reader] = [item["metadata"]["id"] for item in page["items"]]
        return heads

    def audit_events(self, reader: str, **filters: str) -> list[dict[str, Any]]:
        query = "&".join(f"{key}={value}" for key, value in filters.items())
        return list(self.ok(reader, "GET", f"/api/v1/audit-events?{query}")["items"])


#: Runners report only when the matrix says so: a long heartbeat deadline keeps them online meanwhile.
SERVER_SETTINGS = {"heartbeat_timeout": 3600.0}


@pytest.fixture(scope="module")
def world(module_server: live_server.LiveServer) -> Iterator[World]:
    built = World.build(module_server.url, module_server.admin_token)
    try:
        yield built
    finally:
        built.close()


def assert_error_envelope(response: httpx.Response, status: int) -> None:
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"code", "message", "details"}, error
    assert error["code"] == ERROR_CODES[status], error
    assert isinstance(error["message"], str) and error["message"], error


def created_resource(body: dict[str, Any]) -> dict[str, Any]:
    """The resource in a creation's answer (``TokenCreated`` and ``RunnerCreated`` wrap it)."""
    for wrapper in ("token", "runner"):
        if isinstance(body.get(wrapper), dict):
            return dict(body[wrapper])
    return body


@pytest.mark.parametrize("case", CASES)
def test_policy(world: World, case: Case) -> None:
    route, principal = case.route, case.principal
    allowed = case.expected < 300
    path = world.resolve(route.template.split("#", 1)[0], fresh=allowed)
    body = world.resolve(route.body(), fresh=allowed)
    checks_state = route.mutates and not allowed
    if checks_state:
        before = world.read_back(route, path), world.audit_heads(world.actor_ids[principal])

    response = world.call(principal, route.method, path, body)

    assert response.status_code == case.expected, f"{principal} {route.method} {path}: {response.text}"
    if not allowed:
        assert_error_envelope(response, case.expected)
        if case.expected == 401:
            assert response.headers.get("www-authenticate") == "Bearer"
    if checks_state:
        after = world.read_back(route, path), world.audit_heads(world.actor_ids[principal])
        assert after == before, "a refused call changed something"
    if allowed and route.mutates:
        check_audited(world, case, path, response.json())
    if allowed and route.key == "POST /api/v1/organizations":
        # Its creator is its admin now: an admin of some organization would see runners and audit events.
        world.ok(principal, "DELETE", f"/api/v1/organizations/{response.json()['metadata']['id']}")


def check_audited(world: World, case: Case, path: str, answer: Any) -> None:
    """An allowed mutation wrote an audit event naming the caller, the target and where the call came from."""
    route, principal = case.route, case.principal
    if route.template.endswith(("/status", "/logs")):
        return  # heartbeats and status reports are audited only when the phase changes (test below)
    found = world.target(route, path)
    if route.template.startswith("/api/v1/runners/exchange"):
        target_id, reader, actor_type, actor_id = answer["runner_id"], "admin", "anonymous", None
    elif found is None:
        resource = created_resource(answer)
        target_id = resource["metadata"]["id"]
        if resource["kind"] == "Organization":
            reader = principal  # the creator is the new organization's admin
        elif resource["kind"] == "User":
            reader = "admin"
        else:
            reader = "admin" if resource["metadata"]["organization_id"] == world.ids["org"] else "other_admin"
        actor_type, actor_id = _actor(world, principal)
    else:
        placeholder, target_id = found
        if placeholder == "spare_org" and route.method == "DELETE":
            return  # a deleted organization's audit log is no longer anyone's to list
        reader = world.readers.get(placeholder, "admin")
        actor_type, actor_id = _actor(world, principal)
    events = world.audit_events(reader, target_id=target_id)
    mine = [e for e in events if e["spec"]["actor_id"] == actor_id and e["spec"]["actor_type"] == actor_type]
    assert mine, f"no audit event by {principal} on {target_id}; the target's events: {events}"
    event = mine[0]["spec"]
    assert event["source_ip"] == "127.0.0.1" and event["user_agent"] == USER_AGENT, event
    assert event["target_id"] == target_id


def _actor(world: World, principal: str) -> tuple[str, str | None]:
    kind = "runner" if principal.startswith("runner") else "user"
    return kind, world.actor_ids[principal]


#: Where a list shows less than GET would: (principal, collection, placeholder). A runner's class list is the
#: classes it offers (``runner_id`` defaults to itself, api/catalog.py), though it may get any of its organization's.
NARROWER_LISTS = {("runner2", "/api/v1/environment-classes", "class")}


def _visibility_cases() -> list[Any]:
    """(principal, collection, {placeholder: visible}) for every list a principal may read: what it lists is
    what it may get."""
    cells = {route.key: cells for route, cells in ROUTES}
    params = []
    for route, _ in ROUTES:
        if route.method != "GET" or not route.template.startswith("/api/v1/") or "{" in route.template:
            continue
        gets = {
            other.template.rsplit("/", 1)[1].strip("{}"): other_cells
            for other, other_cells in ROUTES
            if other.method == "GET" and re.fullmatch(re.escape(route.template) + r"/\{[a-z0-9_]+\}", other.template)
        }
        for principal in PRINCIPALS:
            if not gets or cells[route.key][principal] != "200":
                continue
            expected = {
                placeholder: row[principal] == "200" and (principal, route.template, placeholder) not in NARROWER_LISTS
                for placeholder, row in gets.items()
            }
            params.append(pytest.param(principal, route.template, expected, id=f"{principal}-{route.template}"))
    return params


@pytest.mark.parametrize(("principal", "collection", "visible"), _visibility_cases())
def test_a_list_shows_what_get_shows(world: World, principal: str, collection: str, visible: dict[str, bool]) -> None:
    items = world.ok(principal, "GET", f"{collection}?page_size=1000")["items"]
    listed = {item["metadata"]["id"] for item in items}
    for placeholder, shown in visible.items():
        assert (world.ids[placeholder] in listed) == shown, (
            f"{placeholder} {'missing from' if shown else 'in'} the list"
        )


def test_the_table_covers_every_operation_of_the_api(world: World) -> None:
    spec = httpx.get(f"{world.url}/openapi.json").json()
    operations = {
        (method.upper(), re.sub(r"\{[^}]+\}", "{}", path)) for path, item in spec["paths"].items() for method in item
    }
    covered = {(route.method, route.openapi_path) for route, _ in ROUTES}
    assert operations - covered == set(), "operations the table has no row for"
    assert covered - operations == set(), "rows for operations the API does not have"


def test_audit_events_say_who_did_what_from_where(world: World) -> None:
    org = world.ids["org"]
    created = world.ok(
        "member", "POST", "/api/v1/environments", {"metadata": {"organization_id": org}, "spec": {"image": "x"}}
    )
    user = world.factories["member2_user"]()
    world.ok("admin", "PATCH", f"/api/v1/users/{user}", {"spec": {"suspended": True}})
    token = world.factories["member_token"]()
    world.ok("member", "DELETE", f"/api/v1/tokens/{token}")
    env = world.ids["env_member"]
    phase = world.ok("admin", "GET", f"/api/v1/environments/{env}")["status"]["phase"]
    new_phase = "starting" if phase != "starting" else "running"
    world.ok("runner", "PUT", f"/api/v1/environments/{env}/status", {"status": {"phase": new_phase}})
    exchanged = world.ok(
        "anonymous", "POST", "/api/v1/runners/exchange", {"exchange_token": world.factories["exchange_token"]()}
    )

    def newest(target_id: str) -> dict[str, Any]:
        events = world.audit_events("admin", target_id=target_id, organization_id=org)
        assert events, f"no audit event on {target_id}"
        return dict(events[0]["spec"])

    expected = [
        (created["metadata"]["id"], "environment.create", "user", world.actor_ids["member"]),
        (user, "user.suspend", "user", world.actor_ids["admin"]),
        (token, "token.revoke", "user", world.actor_ids["member"]),
        (env, "environment.update_status", "runner", world.actor_ids["runner"]),
        (exchanged["runner_id"], "runner.exchange", "anonymous", None),
    ]
    for target_id, action, actor_type, actor_id in expected:
        events = [e["spec"] for e in world.audit_events("admin", target_id=target_id, organization_id=org)]
        event = next((e for e in events if e["action"] == action), None)
        assert event is not None, f"no {action} on {target_id}: {events}"
        assert (event["actor_type"], event["actor_id"]) == (actor_type, actor_id), event
        assert event["source_ip"] == "127.0.0.1" and event["user_agent"] == USER_AGENT, event
    assert newest(env)["details"] == {"phase": new_phase, "from": phase}


@pytest.mark.parametrize(
    ("principal", "own", "others"),
    [
        pytest.param("member2", "env_member2", ["env_member", "env_admin"], id="member2"),
        pytest.param("runner2", "env_member2", ["env_member", "env_admin"], id="runner2"),
        pytest.param("runner", "env_member", ["env_member2"], id="runner"),
    ],
)
def test_a_watch_shows_only_what_the_watcher_may_see(world: World, principal: str, own: str, others: list[str]) -> None:
    resource_version = world.ok(principal, "GET", "/api/v1/environments")["resource_version"]
    touched = [*others, own]
    for placeholder in touched:
        body = {"metadata": {"labels": {"watched": unique()}}}
        world.ok("admin", "PATCH", f"/api/v1/environments/{world.ids[placeholder]}", body)
    params = {"watch": "true", "resource_version": resource_version, "timeout_seconds": "1"}
    with world.http(principal).stream("GET", "/api/v1/environments", params=params) as response:
        assert response.status_code == 200
        events = [json.loads(line) for line in response.iter_lines() if line.strip()]
    seen = {e["object"]["metadata"]["id"] for e in events if e["type"] != "BOOKMARK"}
    assert seen == {world.ids[own]}, f"{principal} saw {seen}"
