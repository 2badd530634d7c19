"""The resource commands against the real management plane (``server`` runs in the test process; the
command runs in a subprocess, as a user runs it): what they print, what they change, and how they fail."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from support.live_server import LiveServer
from support.repositories import make_repository

from .conftest import DEVYARD, Cli, ssh_public_key


def test_whoami_as_the_admin(cli: Cli, admin_env: dict[str, str]) -> None:
    identity = cli("whoami", "-o", "json", env=admin_env).json()
    assert identity["principal"] == "user"
    assert identity["name"] == "admin"
    assert identity["memberships"][0]["spec"]["role"] == "admin"
    assert "admin" in cli("whoami", env=admin_env).stdout


def test_login_saves_a_verified_server_and_token(cli: Cli, server: LiveServer, home: Path) -> None:
    result = cli("login", "--server", server.url, "--token", server.admin_token)
    assert "Logged in" in result.stdout
    path = home / ".config" / "devyard" / "config.json"
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    saved = json.loads(path.read_text())
    assert saved["current_profile"] == "default"
    assert saved["profiles"]["default"] == {"server": server.url, "token": server.admin_token}
    # The config alone now suffices.
    assert cli("whoami", "-o", "json").json()["name"] == "admin"


def test_login_reads_the_token_from_stdin(cli: Cli, server: LiveServer, home: Path) -> None:
    cli("login", "--server", server.url, "--profile", "work", input=server.admin_token + "\n")
    saved = json.loads((home / ".config" / "devyard" / "config.json").read_text())
    assert saved["current_profile"] == "work"
    assert saved["profiles"]["work"]["token"] == server.admin_token


def test_login_with_a_wrong_token_saves_nothing(cli: Cli, server: LiveServer, home: Path) -> None:
    result = cli("login", "--server", server.url, "--token", "dyu_wrong", ok=False)
    assert "credential" in result.stderr
    assert not (home / ".config" / "devyard" / "config.json").exists()


def test_flag_beats_variable_beats_config(cli: Cli, server: LiveServer) -> None:
    cli("login", "--server", server.url, "--token", server.admin_token)
    # A wrong token in the environment wins over the config file's good one...
    refused = cli("whoami", env={"DEVYARD_TOKEN": "dyu_wrong"}, ok=False)
    assert "refused the credential" in refused.stderr
    # ...and a good flag wins over the wrong variable.
    cli("whoami", "--token", server.admin_token, env={"DEVYARD_TOKEN": "dyu_wrong"})
    # A server from the environment that is not the saved one does not get the saved token.
    elsewhere = cli("whoami", env={"DEVYARD_SERVER": server.url + "/"})  # the same server, spelled differently
    assert "admin" in elsewhere.stdout


def test_errors_are_one_line_and_exit_non_zero(cli: Cli, server: LiveServer, admin_env: dict[str, str]) -> None:
    wrong = cli("env", "list", env={**admin_env, "DEVYARD_TOKEN": "dyu_wrong"}, ok=False)
    assert wrong.returncode == 1
    assert "credential" in wrong.stderr and "DEVYARD_TOKEN" in wrong.stderr
    assert wrong.stderr.count("\n") == 1

    unreachable = cli("env", "list", "--server", "http://127.0.0.1:9", ok=False)
    assert unreachable.stderr.startswith("Error: cannot reach server http://127.0.0.1:9")

    nothing = cli("env", "list", ok=False)
    assert "no server configured" in nothing.stderr

    absent = cli("env", "get", "env_01jh0000000000000000000000", env=admin_env, ok=False)
    assert "not_found" in absent.stderr

    unnamed = cli("env", "get", "no-such-name", env=admin_env, ok=False)
    assert "no environment with the id or name 'no-such-name'" in unnamed.stderr

    invalid = cli("project", "create", "https://example.com/r.git", "--name", "Not A Name", env=admin_env, ok=False)
    assert "invalid input: name: a name is 1 to 63 lower-case letters" in invalid.stderr

    usage = cli("env", "create", env=admin_env, ok=False)
    assert usage.returncode == 2 and "give a CONTEXT (a git URL or a folder), or --image REF" in usage.stderr
    image_only = cli("env", "create", "--image", "busybox", "--ref", "main", env=admin_env, ok=False)
    assert image_only.returncode == 2 and "--ref applies to a git URL only" in image_only.stderr


def test_runner_create_prints_the_exact_command_once(cli: Cli, server: LiveServer, admin_env: dict[str, str]) -> None:
    result = cli("runner", "create", "--name", "east-1", "--region", "eu", env=admin_env)
    line = next(line.strip() for line in result.stdout.splitlines() if line.strip().startswith("devyard runner"))
    words = shlex.split(line)
    assert words[:4] == ["devyard", "runner", "--server", server.url]
    assert words[4] == "--token" and words[5].startswith("dyx_")
    runners = cli("runner", "list", "-o", "json", env=admin_env).json()["items"]
    assert [(r["metadata"]["name"], r["spec"]["region"], r["status"]["phase"]) for r in runners] == [
        ("east-1", "eu", "pending")
    ]
    assert words[5] not in cli("runner", "list", env=admin_env).stdout
    created = cli("runner", "create", "-o", "json", env=admin_env).json()
    assert created["exchange_token"].startswith("dyx_")


def test_classes_projects_orgs(cli: Cli, admin_env: dict[str, str]) -> None:
    cli("class", "create", "large", "--cpu", "8", "--memory", "16GiB", "--disk", "100", "--default", env=admin_env)
    (large,) = cli("class", "list", "-o", "json", env=admin_env).json()["items"]
    wanted = {"cpu": 8.0, "memory_mib": 16384, "disk_gib": 100, "default": True}
    assert {key: large["spec"][key] for key in wanted} == wanted
    assert "large" in cli("class", "list", env=admin_env).stdout

    cli("project", "create", "https://github.com/example/app.git", "--name", "app", "--class", "large", env=admin_env)
    (app,) = cli("project", "list", "-o", "json", env=admin_env).json()["items"]
    assert app["spec"]["class_id"] == large["metadata"]["id"]
    cli("project", "delete", "app", env=admin_env)
    assert cli("project", "list", "-o", "json", env=admin_env).json()["items"] == []

    cli("org", "create", "research", "--display-name", "Research", env=admin_env)
    names = {o["metadata"]["name"] for o in cli("org", "list", "-o", "json", env=admin_env).json()["items"]}
    assert names == {"default", "research"}


def test_users_and_tokens(cli: Cli, server: LiveServer, admin_env: dict[str, str]) -> None:
    made = cli(
        "user",
        "create",
        "ada",
        "--email",
        "ada@example.com",
        "--role",
        "member",
        "--with-token",
        "-o",
        "json",
        env=admin_env,
    )
    secret = made.json()["token"]["secret"]
    ada = {"DEVYARD_SERVER": server.url, "DEVYARD_TOKEN": secret}
    assert cli("whoami", "-o", "json", env=ada).json()["name"] == "ada"
    listing = cli("user", "list", env=admin_env).stdout
    assert "ada@example.com" in listing and "member of" in listing

    # A member may not register runners; the refusal is one clear line.
    forbidden = cli("runner", "create", env=ada, ok=False)
    assert "forbidden" in forbidden.stderr

    cli("user", "set-role", "ada", "admin", env=admin_env)
    cli("runner", "list", env=ada)

    created = cli("token", "create", "--description", "ci", "--expires-in", "30d", "-o", "json", env=ada).json()
    own = {"DEVYARD_SERVER": server.url, "DEVYARD_TOKEN": created["secret"]}
    assert cli("whoami", "-o", "json", env=own).json()["name"] == "ada"
    shown = cli("token", "list", env=ada).stdout
    assert "ci" in shown and created["secret"] not in shown
    cli("token", "revoke", created["token"]["metadata"]["id"], env=ada)
    assert "credential" in cli("whoami", env=own, ok=False).stderr


def test_a_users_dotfiles_setting(cli: Cli, admin_env: dict[str, str]) -> None:
    assert "No dotfiles" in cli("user", "dotfiles", env=admin_env).stdout
    pasted = "https://git.test/me/dotfiles/tree/dev"
    assert "git.test/me/dotfiles.git at dev" in cli("user", "dotfiles", pasted, env=admin_env).stdout
    shown = cli("user", "dotfiles", "-o", "json", env=admin_env).json()
    assert (shown["url"], shown["ref"]) == ("https://git.test/me/dotfiles.git", "dev")
    # A new environment takes them along.
    env = cli("env", "create", "--image", "i", "-o", "json", env=admin_env).json()
    assert env["spec"]["dotfiles"]["url"] == "https://git.test/me/dotfiles.git"
    declined = cli("env", "create", "--image", "i", "--no-dotfiles", "-o", "json", env=admin_env).json()
    assert declined["spec"]["dotfiles"] is None
    other = cli("env", "create", "--image", "i", "--dotfiles", "git.test/me/other", "-o", "json", env=admin_env)
    assert other.json()["spec"]["dotfiles"]["url"] == "https://git.test/me/other"
    assert "No dotfiles" in cli("user", "dotfiles", "--clear", env=admin_env).stdout
    refused = cli("user", "dotfiles", "--clear", "--ref", "x", env=admin_env, ok=False)
    assert "--clear takes no URL" in refused.stderr


def test_ssh_keys_from_a_file_and_stdin(cli: Cli, admin_env: dict[str, str], tmp_path: Path) -> None:
    public_key = ssh_public_key(tmp_path)
    added = cli("ssh-key", "add", str(tmp_path / "id_ed25519.pub"), "--name", "laptop", env=admin_env)
    assert "SHA256:" in added.stdout
    (tmp_path / "second").mkdir()
    second = ssh_public_key(tmp_path / "second")
    cli("ssh-key", "add", "-", "--name", "desktop", input=second + "\n", env=admin_env)
    keys = cli("ssh-key", "list", "-o", "json", env=admin_env).json()["items"]
    assert sorted(k["metadata"]["name"] for k in keys) == ["desktop", "laptop"]
    assert {k["spec"]["public_key"].split()[1] for k in keys} == {public_key.split()[1], second.split()[1]}
    cli("ssh-key", "rm", "laptop", env=admin_env)
    assert [k["metadata"]["name"] for k in cli("ssh-key", "list", "-o", "json", env=admin_env).json()["items"]] == [
        "desktop"
    ]
    private = cli("ssh-key", "add", str(tmp_path / "id_ed25519"), env=admin_env, ok=False)
    assert "private key" in private.stderr


def test_secrets(cli: Cli, admin_env: dict[str, str]) -> None:
    cli("secret", "create", "api-key", "--target", "API_KEY", input="s3cret\n", env=admin_env)
    listing = cli("secret", "list", env=admin_env).stdout
    assert "API_KEY" in listing and "s3cret" not in listing
    cli("secret", "rm", "api-key", env=admin_env)
    assert cli("secret", "list", "-o", "json", env=admin_env).json()["items"] == []


def test_wait_gives_up_with_the_reason(cli: Cli, admin_env: dict[str, str], tmp_path: Path) -> None:
    # No runner at all: the environment stays pending, and --wait says so with its conditions.
    result = cli("env", "create", str(tmp_path), "--wait", "--wait-timeout", "2s", env=admin_env, ok=False)
    assert "is not running after 2s: phase pending" in result.stderr
    assert result.stderr.count("\n") == 1


@pytest.fixture
def runner_process(cli: Cli, server: LiveServer, admin_env: dict[str, str], tmp_path: Path) -> Iterator[str]:
    """``devyard runner`` (fake runtime) on this host, registered with ``devyard runner create``; its id."""
    created = cli("runner", "create", "--name", "here", "-o", "json", env=admin_env).json()
    process = subprocess.Popen(
        [
            *DEVYARD,
            "runner",
            "--server",
            server.url,
            "--token",
            created["exchange_token"],
            "--state-dir",
            str(tmp_path / "runner"),
            "--runtime",
            "fake",
        ],
        # A desktop runner: the test's repository is a file:// URL (nothing leaves the machine).
        env={
            **{key: value for key, value in os.environ.items() if not key.startswith("DEVYARD_")},
            "DEVYARD_RUNNER_DESKTOP": "true",
        },
        stdin=subprocess.DEVNULL,
    )
    try:
        yield created["runner"]["metadata"]["id"]
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0


def test_environment_lifecycle_on_a_runner(
    cli: Cli, admin_env: dict[str, str], runner_process: str, tmp_path: Path
) -> None:
    cli("class", "create", "small", "--runner", "here", "--default", env=admin_env)
    url = make_repository(tmp_path / "app")
    created = cli(
        "env",
        "create",
        url,
        "--ref",
        "main",
        "--name",
        "app",
        "--env",
        "GREETING=hi",
        "--timeout",
        "1h",
        "--wait",
        "-o",
        "json",
        env=admin_env,
    ).json()
    assert created["status"]["phase"] == "running"
    assert created["status"]["runner_id"] == runner_process
    assert created["spec"]["content"]["git"] == {"url": url, "ref": "main", "depth": None, "filter": None}
    assert created["spec"]["env"] == {"GREETING": "hi"}
    assert created["spec"]["timeout"] == 3600

    shown = cli("env", "get", "app", env=admin_env).stdout
    assert "running" in shown and f"{url}#main" in shown

    stopped = cli("env", "stop", "app", "--wait", "-o", "json", env=admin_env).json()
    assert (stopped["spec"]["desired_phase"], stopped["status"]["phase"]) == ("stopped", "stopped")
    started = cli("env", "start", created["metadata"]["id"], "--wait", env=admin_env)
    assert "is running" in started.stdout
    cli("env", "delete", "app", "--wait", env=admin_env)
    assert cli("env", "list", "-o", "json", env=admin_env).json()["items"] == []


def test_runner_without_credential_or_token_fails_clearly(cli: Cli, server: LiveServer, tmp_path: Path) -> None:
    started = time.monotonic()
    result = cli("runner", "--server", server.url, "--state-dir", str(tmp_path / "r"), ok=False)
    assert time.monotonic() - started < 60
    assert "--token EXCHANGE is needed" in result.stderr


def test_runner_options_before_a_subcommand_are_refused(cli: Cli) -> None:
    result = cli("runner", "--server", "http://x", "list", ok=False)
    assert result.returncode == 2 and "put them after `list`" in result.stderr


def test_process_settings_errors_are_one_line(cli: Cli, tmp_path: Path) -> None:
    listen = cli("server", "--listen", "nowhere", "--state-dir", str(tmp_path), ok=False)
    assert listen.returncode == 2 and "expected HOST:PORT" in listen.stderr
    runtime = cli("runner", "--server", "http://x", "--token", "dyx_t", "--runtime", "vmware", ok=False)
    assert runtime.returncode == 2 and "'vmware' is not one of 'linux', 'fake'" in runtime.stderr
    workers = cli("runner", "--server", "http://x", "--token", "dyx_t", env={"DEVYARD_RUNNER_WORKERS": "0"}, ok=False)
    assert "invalid input: workers" in workers.stderr
    assert len(workers.stderr.strip().splitlines()) == 1
