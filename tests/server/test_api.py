"""The management plane's API on both databases: resources, metadata, generations, optimistic concurrency,
paging, filters, the error envelope, and secrets encrypted at rest."""

from __future__ import annotations

import sqlite3
import stat
from typing import Any

import pytest

from devyard.client import ApiError, Client
from support.live_server import LiveServer
from support.world import make_user, register_runner


def create_env(client: Client, **spec: Any) -> dict[str, Any]:
    result: dict[str, Any] = client.post("/api/v1/environments", {"spec": spec})
    return result


def test_first_start_bootstraps_an_admin_once(server: LiveServer, admin_client: Client) -> None:
    token_file = server.state_dir / "admin-token"
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    me = admin_client.get("/api/v1/whoami")
    assert me["principal"] == "user" and me["name"] == "admin"
    assert [m["spec"]["role"] for m in me["memberships"]] == ["admin"]
    orgs = admin_client.get("/api/v1/organizations")["items"]
    assert [o["metadata"]["name"] for o in orgs] == ["default"]
    before = token_file.read_text()
    server.restart()
    assert token_file.read_text() == before, "a restart must not make a new admin token"
    assert Client(server.url, before.strip()).get("/api/v1/whoami")["name"] == "admin"


def test_environment_resource_shape_and_generation(admin_client: Client) -> None:
    env = create_env(admin_client, image="debian:bookworm", env={"A": "1"})
    metadata = env["metadata"]
    assert env["kind"] == "Environment"
    assert metadata["id"].startswith("env_") and metadata["generation"] == 1
    assert metadata["creator_id"].startswith("usr_") and metadata["organization_id"].startswith("org_")
    assert env["status"]["phase"] == "pending"
    assert env["spec"]["desired_phase"] == "running" and env["spec"]["env"] == {"A": "1"}

    stopped = admin_client.patch(f"/api/v1/environments/{metadata['id']}", {"spec": {"desired_phase": "stopped"}})
    assert stopped["metadata"]["generation"] == 2
    assert stopped["spec"]["image"] == "debian:bookworm", "a partial patch keeps the fields it does not name"
    assert int(stopped["metadata"]["resource_version"]) > int(metadata["resource_version"])

    relabelled = admin_client.patch(f"/api/v1/environments/{metadata['id']}", {"metadata": {"labels": {"team": "a"}}})
    assert relabelled["metadata"]["generation"] == 2, "label changes are not spec changes"
    assert relabelled["metadata"]["labels"] == {"team": "a"}

    cleared = admin_client.patch(f"/api/v1/environments/{metadata['id']}", {"spec": {"image": None}})
    assert cleared["spec"]["image"] is None, "null clears a field, unlike leaving it out"


def test_stale_resource_version_is_refused_and_changes_nothing(admin_client: Client) -> None:
    created = create_env(admin_client, image="a")
    path = f"/api/v1/environments/{created['metadata']['id']}"
    from support.world import eventually

    # The scheduler writes its verdict (no runner) once; after that only this test writes.
    env = eventually(lambda: (e := admin_client.get(path))["status"]["conditions"] and e)
    first = admin_client.patch(path, {"spec": {"image": "b"}, "resource_version": env["metadata"]["resource_version"]})
    with pytest.raises(ApiError) as stale:
        admin_client.patch(path, {"spec": {"image": "c"}, "resource_version": env["metadata"]["resource_version"]})
    assert stale.value.status == 409 and stale.value.code == "conflict"
    assert stale.value.details == {"current_resource_version": first["metadata"]["resource_version"]}
    assert admin_client.get(path)["spec"]["image"] == "b"


def test_status_is_written_only_through_the_status_endpoint(admin_client: Client) -> None:
    env = create_env(admin_client, image="a")
    with pytest.raises(ApiError) as exc:
        admin_client.patch(f"/api/v1/environments/{env['metadata']['id']}", {"status": {"phase": "running"}})
    assert exc.value.status == 422
    with pytest.raises(ApiError) as exc:
        admin_client.put(f"/api/v1/environments/{env['metadata']['id']}/status", {"status": {"phase": "running"}})
    assert exc.value.status == 403, "a user who sees the environment is still not its runner"


def test_runner_status_keeps_what_the_server_owns(server: LiveServer, admin_client: Client) -> None:
    runner = register_runner(admin_client, "r1")
    runner.heartbeat()
    env = create_env(admin_client, image="a")
    env_id = env["metadata"]["id"]
    from support.world import eventually

    eventually(lambda: admin_client.get(f"/api/v1/environments/{env_id}")["status"].get("runner_id"))
    reported = runner.report(
        env_id,
        phase="running",
        observed_generation=1,
        runner_id="run_forged",
        conditions=[{"type": "Ready", "status": "True"}],
        timings={"start": 0.5},
    )
    assert reported is not None
    status = reported["status"]
    assert status["runner_id"] == runner.id
    assert {c["type"] for c in status["conditions"]} == {"Scheduled", "RunnerAvailable", "Ready"}
    assert set(status["timings"]) == {"schedule", "start"}
    with pytest.raises(ApiError) as exc:
        runner.report(env_id, phase="running", observed_generation=7)
    assert exc.value.status == 400 and "observed_generation" in exc.value.message


def test_asking_a_failed_environment_again_is_a_retry(admin_client: Client) -> None:
    runner = register_runner(admin_client, "r-retry")
    runner.heartbeat()
    env_id = create_env(admin_client, image="a")["metadata"]["id"]
    from support.world import eventually

    eventually(lambda: admin_client.get(f"/api/v1/environments/{env_id}")["status"].get("runner_id"))
    runner.report(env_id, phase="failed", observed_generation=1, message="pull failed")
    same = admin_client.patch(f"/api/v1/environments/{env_id}", {"spec": {"desired_phase": "running"}})
    assert same["metadata"]["generation"] == 2, "a retry is a new generation for the runner to act on"
    runner.report(env_id, phase="running", observed_generation=2)
    again = admin_client.patch(f"/api/v1/environments/{env_id}", {"spec": {"desired_phase": "running"}})
    assert again["metadata"]["generation"] == 2, "asking a running environment to run changes nothing"
    actions = [e["spec"]["action"] for e in admin_client.get("/api/v1/audit-events", {"target_id": env_id})["items"]]
    assert "environment.retry" in actions


def test_list_paging_and_filters(admin_client: Client) -> None:
    created = [create_env(admin_client, image=f"i{n}")["metadata"]["id"] for n in range(7)]
    admin_client.patch(f"/api/v1/environments/{created[2]}", {"metadata": {"labels": {"tier": "gold"}}})
    admin_client.patch(f"/api/v1/environments/{created[5]}", {"spec": {"desired_phase": "stopped"}})
    seen, token = [], None
    while True:
        page = admin_client.get("/api/v1/environments", {"page_size": 3, "page_token": token})
        assert len(page["items"]) <= 3
        seen += [item["metadata"]["id"] for item in page["items"]]
        token = page["next_page_token"]
        if token is None:
            break
    assert seen == created, "pages are in id order, each item once"
    gold = admin_client.get("/api/v1/environments", {"label": "tier=gold"})["items"]
    assert [e["metadata"]["id"] for e in gold] == [created[2]]
    stopped = admin_client.get("/api/v1/environments", {"desired_phase": "stopped"})["items"]
    assert [e["metadata"]["id"] for e in stopped] == [created[5]]


def test_members_see_only_their_own_environments(admin_client: Client) -> None:
    alice, bob = make_user(admin_client, "alice"), make_user(admin_client, "bob")
    mine = create_env(alice, image="a")["metadata"]["id"]
    create_env(bob, image="b")
    assert [e["metadata"]["id"] for e in alice.get("/api/v1/environments")["items"]] == [mine]
    assert len(admin_client.get("/api/v1/environments")["items"]) == 2
    with pytest.raises(ApiError) as exc:
        bob.get(f"/api/v1/environments/{mine}")
    assert exc.value.status == 404


def test_delete_without_runner_removes_at_once(admin_client: Client) -> None:
    env_id = create_env(admin_client, image="a", desired_phase="stopped")["metadata"]["id"]
    deleted = admin_client.delete(f"/api/v1/environments/{env_id}")
    assert deleted["spec"]["desired_phase"] == "deleted"
    with pytest.raises(ApiError) as exc:
        admin_client.get(f"/api/v1/environments/{env_id}")
    assert exc.value.status == 404


def test_tokens_hashed_shown_once_expire_and_revoke(server: LiveServer, admin_client: Client) -> None:
    created = admin_client.post("/api/v1/tokens", {"metadata": {"name": "ci"}, "spec": {"description": "ci"}})
    secret = created["secret"]
    assert secret.startswith("dyu_") and "secret" not in admin_client.get(
        f"/api/v1/tokens/{created['token']['metadata']['id']}"
    )
    user_client = Client(server.url, secret)
    assert user_client.get("/api/v1/whoami")["name"] == "admin"
    admin_client.delete(f"/api/v1/tokens/{created['token']['metadata']['id']}")
    with pytest.raises(ApiError) as exc:
        user_client.get("/api/v1/whoami")
    assert exc.value.status == 401 and "revoked" in exc.value.message
    if server.settings.database is None or server.settings.database.startswith("sqlite"):
        path = (
            server.settings.database.removeprefix("sqlite:///")
            if server.settings.database
            else str(server.state_dir / "devyard.db")
        )
        with sqlite3.connect(path) as db:
            dump = "\n".join(db.iterdump())
        assert secret not in dump, "token secrets are stored only as hashes"


def test_secret_values_are_encrypted_at_rest_and_never_read_back(server: LiveServer, admin_client: Client) -> None:
    value = "hunter2-very-secret-value"
    secret = admin_client.post("/api/v1/secrets", {"spec": {"target": "API_KEY", "value": value}})
    assert "value" not in secret["spec"]
    assert value not in str(admin_client.get(f"/api/v1/secrets/{secret['metadata']['id']}"))
    database = server.settings.database or f"sqlite:///{server.state_dir / 'devyard.db'}"
    if database.startswith("sqlite"):
        with sqlite3.connect(database.removeprefix("sqlite:///")) as db:
            assert value not in "\n".join(db.iterdump())
    runner = register_runner(admin_client, "r-secrets")
    runner.heartbeat()
    env_id = create_env(admin_client, image="a")["metadata"]["id"]
    from support.world import eventually

    eventually(lambda: admin_client.get(f"/api/v1/environments/{env_id}")["status"].get("runner_id"))
    values = runner.client.get(f"/api/v1/environments/{env_id}/secrets")
    assert [(v["target"], v["value"]) for v in values] == [("API_KEY", value)]


def test_a_registry_credential_must_name_a_host_and_hold_user_and_password(admin_client: Client) -> None:
    def refused(spec: dict[str, str]) -> str:
        with pytest.raises(ApiError) as exc:
            admin_client.post("/api/v1/secrets", {"spec": {"type": "registry_credential", **spec}})
        assert exc.value.status == 422
        return str(exc.value)

    assert "USERNAME:PASSWORD" in refused({"target": "ghcr.io", "value": "no-colon"})
    assert "registry's host" in refused({"target": "https://ghcr.io/x", "value": "u:p"})
    secret = admin_client.post(
        "/api/v1/secrets", {"spec": {"type": "registry_credential", "target": "127.0.0.1:5000", "value": "u:p:w"}}
    )
    path = f"/api/v1/secrets/{secret['metadata']['id']}"
    with pytest.raises(ApiError) as exc:
        admin_client.patch(path, {"value": "still-no-colon"})
    assert exc.value.status == 400
    assert "USERNAME:PASSWORD" in str(exc.value)
    admin_client.patch(path, {"value": "user:new-password"})


def test_ssh_keys_are_parsed_and_fingerprinted(admin_client: Client) -> None:
    key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl user@host"
    added = admin_client.post("/api/v1/ssh-keys", {"metadata": {"name": "laptop"}, "spec": {"public_key": key}})
    assert added["status"]["key_type"] == "ssh-ed25519"
    assert added["status"]["fingerprint"].startswith("SHA256:")
    with pytest.raises(ApiError) as exc:
        admin_client.post("/api/v1/ssh-keys", {"spec": {"public_key": key}})
    assert exc.value.status == 409
    with pytest.raises(ApiError) as exc:
        admin_client.post("/api/v1/ssh-keys", {"spec": {"public_key": "ssh-ed25519 not-base64!"}})
    assert exc.value.status == 400


def test_a_patch_that_changes_nothing_writes_nothing(admin_client: Client) -> None:
    cls = admin_client.post("/api/v1/environment-classes", {"metadata": {"name": "small"}, "spec": {"cpu": 1}})
    path = f"/api/v1/environment-classes/{cls['metadata']['id']}"
    same = admin_client.patch(path, {"spec": {"cpu": 1}, "metadata": {"name": "small"}})
    assert same["metadata"]["resource_version"] == cls["metadata"]["resource_version"]
    actions = [
        e["spec"]["action"]
        for e in admin_client.get("/api/v1/audit-events", {"target_id": cls["metadata"]["id"]})["items"]
    ]
    assert actions == ["environment_class.create"]
    renamed = admin_client.patch(path, {"metadata": {"name": "tiny"}})
    assert renamed["metadata"]["name"] == "tiny"
    assert int(renamed["metadata"]["resource_version"]) > int(cls["metadata"]["resource_version"])


def test_every_mutation_is_audited(admin_client: Client) -> None:
    env_id = create_env(admin_client, image="a")["metadata"]["id"]
    admin_client.patch(f"/api/v1/environments/{env_id}", {"spec": {"desired_phase": "stopped"}})
    admin_client.delete(f"/api/v1/environments/{env_id}")
    events = admin_client.get("/api/v1/audit-events", {"target_id": env_id})["items"]
    actions = [e["spec"]["action"] for e in reversed(events)]
    assert actions == ["environment.create", "environment.stop", "environment.delete"]
    assert all(e["spec"]["actor_type"] == "user" and e["spec"]["source_ip"] == "127.0.0.1" for e in events)


def test_error_envelope_for_unknown_routes_and_methods(admin_client: Client) -> None:
    for method, path, status in (("GET", "/api/v1/nothing", 404), ("PUT", "/api/v1/environments", 405)):
        with pytest.raises(ApiError) as exc:
            admin_client.request(method, path, json={})
        assert exc.value.status == status and exc.value.code != "http_error"


def test_openapi_is_served(admin_client: Client) -> None:
    spec = admin_client.get("/openapi.json")
    assert "/api/v1/environments/{environment_id}/status" in spec["paths"]


def test_an_environment_of_a_project_takes_the_projects_settings(admin_client: Client) -> None:
    project = admin_client.post(
        "/api/v1/projects",
        {
            "metadata": {"name": "web"},
            "spec": {
                "repository": "https://git.example/team/web.git",
                "ref": "main",
                "devcontainer_path": ".devcontainer/python/devcontainer.json",
                "automations_path": "ops/automations.yaml",
                "env": {"A": "project", "B": "project"},
            },
        },
    )
    spec = admin_client.post(
        "/api/v1/environments", {"spec": {"project_id": project["metadata"]["id"], "env": {"B": "mine"}}}
    )["spec"]
    assert spec["content"]["git"]["url"] == "https://git.example/team/web.git"
    assert spec["content"]["git"]["ref"] == "main"
    assert spec["devcontainer_path"] == ".devcontainer/python/devcontainer.json"
    assert spec["automations_path"] == "ops/automations.yaml"
    assert spec["env"] == {"A": "project", "B": "mine"}
    # What the environment says wins over the project's.
    own = admin_client.post(
        "/api/v1/environments",
        {"spec": {"project_id": project["metadata"]["id"], "automations_path": ".gitpod/automations.yaml"}},
    )["spec"]
    assert own["automations_path"] == ".gitpod/automations.yaml"


def test_a_new_environment_gets_its_creators_dotfiles_unless_it_says_otherwise(admin_client: Client) -> None:
    bob = make_user(admin_client, "bob")
    me = bob.get("/api/v1/whoami")["id"]
    dotfiles = {"url": "https://git.test/bob/dotfiles.git", "ref": "main"}
    assert (
        bob.patch(f"/api/v1/users/{me}", {"spec": {"dotfiles": dotfiles}})["spec"]["dotfiles"]["url"] == dotfiles["url"]
    )

    inherited = bob.post("/api/v1/environments", {"spec": {"image": "i"}})
    assert inherited["spec"]["dotfiles"]["url"] == dotfiles["url"]
    assert inherited["spec"]["dotfiles"]["ref"] == "main"
    declined = bob.post("/api/v1/environments", {"spec": {"image": "i", "dotfiles": None}})
    assert declined["spec"]["dotfiles"] is None
    # Other people's environments are not theirs to dress.
    assert admin_client.post("/api/v1/environments", {"spec": {"image": "i"}})["spec"]["dotfiles"] is None

    bob.patch(f"/api/v1/users/{me}", {"spec": {"dotfiles": None}})
    assert bob.post("/api/v1/environments", {"spec": {"image": "i"}})["spec"]["dotfiles"] is None
    with pytest.raises(ApiError) as refused:
        bob.patch(f"/api/v1/users/{me}", {"spec": {"dotfiles": {"url": "ext::sh -c evil"}}})
    assert refused.value.status == 422
