"""Dev containers end to end: one whole ``devyard runner --runtime linux`` process against the real server in this
process, environments whose content is a repository served by a real git server (``support.git_server``), images
from the real test registry (busybox), built with buildah.

Each test publishes a repository and asserts what the environment shows from inside (a runc exec) and through
the API (phase, status message, automations, logs): every lifecycle-hook form in the spec's order, and only the
start hooks after a stop and start; a Dockerfile build and its cache; a local and an OCI Feature with options and
containerEnv; automations triggered by the start; a broken devcontainer.json and a failing hook. The runner, the
server and the git server are shared by the module's tests (a runner start and its first pull cost seconds).
"""

from __future__ import annotations

import json
import os
import re
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from devyard.client import Client
from support import host, live_server
from support.git_server import GitServer, publish, serving
from support.registry import RegistryServer

from ..test_features_fetch import feature_tar, push_feature
from .runner_host import PROGRAMS, RunnerHost, RunnerProcess, environment_phase, wait_for
from .test_network import unused_subnet

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="the linux runtime needs root"),
]

#: Seconds an environment may take to run: a pull, a buildah build, hooks.
RUNNING_SECONDS = 120.0


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[live_server.LiveServer]:
    settings = live_server.settings_for(tmp_path_factory.mktemp("dev-containers-server"))
    with live_server.serve_in_thread(settings) as live:
        yield live


@pytest.fixture(scope="module")
def admin(server: live_server.LiveServer) -> Iterator[Client]:
    with server.client() as client:
        yield client


@pytest.fixture(scope="module")
def repositories(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GitServer]:
    with serving(tmp_path_factory.mktemp("dev-containers-git")) as served:
        yield served


@pytest.fixture(scope="module")
def runner_host(
    server: live_server.LiveServer,
    admin: Client,
    registry: RegistryServer,
    busybox_image: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[RunnerHost]:
    """One runner for the module, online before the first test."""
    host.require(*PROGRAMS, "buildah")
    token = secrets.token_hex(3)
    base = Path(f"/var/tmp/devyard-runner-{token}")
    base.mkdir(mode=0o711)
    os.chmod(base, 0o711)
    where = RunnerHost(
        base=base,
        bridge=f"dyr{token}",
        subnet=str(unused_subnet("10.232.0.0/15", 24)),
        registry=registry.host,
        server_url=server.url,
        log=tmp_path_factory.mktemp("dev-containers-runner") / "runner.log",
    )
    created = admin.post("/api/v1/runners", {"metadata": {"name": f"dev-containers-{token}"}})
    where.exchange_token = created["exchange_token"]
    try:
        runner = where.start()
        _wait_online(where, runner, admin)
        yield where
        runner.stop()
    finally:
        where.scrub()


def _wait_online(where: RunnerHost, runner: RunnerProcess, admin: Client) -> None:
    def online() -> bool:
        if runner.process.poll() is not None:
            raise AssertionError(f"the runner exited with {runner.process.returncode}:\n{where.log.read_text()}")
        return any(r["status"]["phase"] == "online" for r in admin.get("/api/v1/runners")["items"])

    wait_for(online, bool, what="the runner online")


# -- helpers ---------------------------------------------------------------------------------------------------


def create(admin: Client, url: str) -> str:
    body = {"spec": {"content": {"git": {"url": url, "ref": "main"}}}}
    return str(admin.post("/api/v1/environments", body)["metadata"]["id"])


def status(admin: Client, environment_id: str) -> dict[str, Any]:
    return dict(admin.get(f"/api/v1/environments/{environment_id}")["status"])


def reach(where: RunnerHost, admin: Client, environment_id: str, phase: str) -> dict[str, Any]:
    """Wait until the environment's phase is ``phase``; its status. A ``failed`` one on the way fails the test
    (unless it is the phase waited for), with its message and the end of the runner's log."""

    def current() -> dict[str, Any]:
        found = status(admin, environment_id)
        if found["phase"] == "failed" and phase != "failed":
            raise AssertionError(f"{environment_id} failed: {found.get('message')}\n{where.log.read_text()[-4000:]}")
        return found

    try:
        return dict(wait_for(current, lambda s: s["phase"] == phase, timeout=RUNNING_SECONDS, what=phase))
    except AssertionError as exc:
        raise AssertionError(f"{exc}\nrunner log:\n{where.log.read_text()[-4000:]}") from None


def inside(where: RunnerHost, environment_id: str, script: str) -> str:
    answer = where.exec(environment_id, script)
    assert answer.returncode == 0, f"{script}: {answer.stderr}"
    return answer.stdout


def logs(admin: Client, environment_id: str, stream: str) -> str:
    """Everything the server holds of the environment's ``stream`` (a prefix ending in ``/``: every stream under
    it), in order."""
    text, after = [], 0
    while True:
        page = admin.get(f"/api/v1/environments/{environment_id}/logs?stream={stream}&after={after}")
        text += [chunk["data"] for chunk in page["items"]]
        after = page["next_after"]
        if not page["more"]:
            return "".join(text)


def whole_build_log(admin: Client, environment_id: str) -> str:
    """The build log once it is complete: the resolve's last line (``dev container ...``) follows every build's."""
    found: str = wait_for(
        lambda: logs(admin, environment_id, "build"),
        lambda text: re.search(r"^dev container ", text, re.MULTILINE) is not None,
        what="the whole build log",
    )
    return found


def set_phase(admin: Client, environment_id: str, desired: str) -> None:
    admin.patch(f"/api/v1/environments/{environment_id}", {"spec": {"desired_phase": desired}})


def delete(where: RunnerHost, admin: Client, environment_id: str) -> None:
    admin.delete(f"/api/v1/environments/{environment_id}")
    wait_for(lambda: environment_phase(admin, environment_id), lambda p: p is None, timeout=60, what="deleted")


def devcontainer(document: dict[str, Any]) -> str:
    return json.dumps(document, indent=2)


# -- tests -----------------------------------------------------------------------------------------------------


def test_every_hook_form_runs_in_the_specs_order_and_a_restart_runs_only_the_start_hooks(
    runner_host: RunnerHost, admin: Client, repositories: GitServer, busybox_image: str
) -> None:
    config = {
        "image": busybox_image,
        "onCreateCommand": "echo onCreate >> markers",
        "updateContentCommand": ["/bin/sh", "-c", "echo updateContent >> markers"],
        "postCreateCommand": {
            "string": "echo postCreate-string >> markers",
            "array": ["/bin/sh", "-c", "echo postCreate-array >> markers"],
        },
        "postStartCommand": "echo postStart >> markers",
        "postAttachCommand": ["/bin/sh", "-c", "echo postAttach >> markers"],
        "forwardPorts": [8080, "db:5432"],
        "portsAttributes": {"8080": {"label": "web", "onAutoForward": "openBrowser"}},
    }
    url = publish(repositories, "hooks.git", {".devcontainer/devcontainer.json": devcontainer(config)})
    environment_id = create(admin, url)
    reach(runner_host, admin, environment_id, "running")

    def markers() -> list[str]:
        return inside(runner_host, environment_id, "cat /workspaces/hooks/markers 2>/dev/null || true").split()

    first = wait_for(markers, lambda m: m[-1:] == ["postAttach"], timeout=30, what="postAttach")
    # The mapping's commands run in parallel: either may be first.
    assert first[:2] == ["onCreate", "updateContent"]
    assert sorted(first[2:4]) == ["postCreate-array", "postCreate-string"]
    assert first[4:] == ["postStart", "postAttach"]

    set_phase(admin, environment_id, "stopped")
    reach(runner_host, admin, environment_id, "stopped")
    set_phase(admin, environment_id, "running")
    reach(runner_host, admin, environment_id, "running")
    again = wait_for(markers, lambda m: len(m) >= 8 and m[-1] == "postAttach", timeout=30, what="postAttach again")
    # The workspace's file outlived the stop; only the start hooks ran again.
    assert again == [*first, "postStart", "postAttach"]
    # Editors open the folder the status names.
    running = admin.get(f"/api/v1/environments/{environment_id}")["status"]
    assert running["workspace_folder"] == "/workspaces/hooks"
    # forwardPorts (of the container itself, not another host's) with its label, before anything listens.
    web = [(p["port"], p["label"], p["on_auto_forward"], p["listening"]) for p in running["ports"]]
    assert web == [(8080, "web", "openBrowser", False)]

    def hooks_condition() -> str | None:
        conditions = {c["type"]: c["status"] for c in status(admin, environment_id)["conditions"]}
        return conditions.get("Hooks")

    wait_for(hooks_condition, lambda found: found == "True", what="the Hooks condition")
    delete(runner_host, admin, environment_id)


def test_a_dockerfile_build_is_what_runs_and_a_second_environment_hits_the_cache(
    runner_host: RunnerHost, admin: Client, repositories: GitServer, busybox_image: str
) -> None:
    dockerfile = (
        f"FROM {busybox_image}\n"
        "ARG GREETING=unset\n"
        'RUN echo "built with $GREETING" > /built.txt\n'
        "COPY hello.txt /hello.txt\n"
    )
    config = {"build": {"dockerfile": "Dockerfile", "args": {"GREETING": "an argument"}}}
    url = publish(
        repositories,
        "built.git",
        {
            ".devcontainer/devcontainer.json": devcontainer(config),
            ".devcontainer/Dockerfile": dockerfile,
            ".devcontainer/hello.txt": "from the context\n",
        },
    )
    first = create(admin, url)
    reach(runner_host, admin, first, "running")
    assert inside(runner_host, first, "cat /built.txt /hello.txt") == "built with an argument\nfrom the context\n"
    first_log = whole_build_log(admin, first)
    assert "(cached)" not in first_log, first_log

    second = create(admin, url)
    reach(runner_host, admin, second, "running")
    assert inside(runner_host, second, "cat /built.txt") == "built with an argument\n"
    second_log = whole_build_log(admin, second)
    assert re.search(r"^built \S+ \(cached\)$", second_log, re.MULTILINE), second_log
    delete(runner_host, admin, first)
    delete(runner_host, admin, second)


def test_a_local_and_an_oci_feature_are_installed_in_order_with_their_options_and_env(
    runner_host: RunnerHost,
    admin: Client,
    repositories: GitServer,
    registry: RegistryServer,
    busybox_image: str,
    tmp_path: Path,
) -> None:
    name = f"features/greeter-{secrets.token_hex(3)}:1"
    greeter = feature_tar(
        "greeter", options={"greeting": {"type": "string", "default": "hey"}}, containerEnv={"GREETER": "on"}
    )
    reference, _, _ = push_feature(registry, tmp_path, name, greeter)
    local = {
        "id": "hello",
        "version": "1.0.0",
        "options": {"colour": {"type": "string", "default": "grey"}},
        "containerEnv": {"HELLO_FEATURE": "installed"},
        "installsAfter": [reference.rsplit(":", 1)[0]],
    }
    # Offline: the build's RUN steps have no network unless the runner's network gives them one.
    install = '#!/bin/sh\nset -e\necho "hello $COLOUR GREETER=$GREETER" >> /features.log\n'
    config = {
        "image": busybox_image,
        "features": {"./features/hello": {"colour": "teal"}, reference: {"greeting": "hi"}},
    }
    url = publish(
        repositories,
        "featured.git",
        {
            ".devcontainer/devcontainer.json": devcontainer(config),
            ".devcontainer/features/hello/devcontainer-feature.json": json.dumps(local),
            ".devcontainer/features/hello/install.sh": install,
        },
        executable=(".devcontainer/features/hello/install.sh",),
    )
    environment_id = create(admin, url)
    reach(runner_host, admin, environment_id, "running")
    # feature_tar's install.sh logs its id, its option and the remote user; the local one runs after it.
    assert inside(runner_host, environment_id, "cat /features.log") == "greeter hi root /root\nhello teal GREETER=on\n"
    assert inside(runner_host, environment_id, 'echo "$GREETER $HELLO_FEATURE"') == "on installed\n"
    delete(runner_host, admin, environment_id)


def test_automations_start_with_the_environment_the_service_gets_ready_and_tasks_run_in_order(
    runner_host: RunnerHost, admin: Client, repositories: GitServer, busybox_image: str
) -> None:
    automations = """
services:
  web:
    name: Web
    triggeredBy: [postEnvironmentStart]
    commands:
      start: "echo web-starting; touch /tmp/web-up; exec sleep 600"
      ready: test -f /tmp/web-up
tasks:
  second:
    command: "echo second-ran; echo second >> /tmp/order"
    dependsOn: [first]
    triggeredBy: [postEnvironmentStart]
  first:
    command: "echo first-ran; echo first >> /tmp/order"
    triggeredBy: [postEnvironmentStart]
"""
    url = publish(
        repositories,
        "automated.git",
        {
            ".devcontainer/devcontainer.json": devcontainer({"image": busybox_image}),
            ".devyard/automations.yaml": automations,
        },
    )
    environment_id = create(admin, url)
    reach(runner_host, admin, environment_id, "running")

    def phases() -> dict[str, str]:
        return {a["id"]: a["phase"] for a in status(admin, environment_id).get("automations", [])}

    done = {"web": "ready", "first": "succeeded", "second": "succeeded"}
    wait_for(phases, lambda p: p == done, timeout=60, what="the automations done")
    assert inside(runner_host, environment_id, "cat /tmp/order").split() == ["first", "second"]
    by_id = {a["id"]: a for a in status(admin, environment_id)["automations"]}
    assert by_id["first"]["finished_at"] <= by_id["second"]["started_at"]
    assert by_id["second"]["triggered_by"] == "postEnvironmentStart"

    def output() -> str:
        return logs(admin, environment_id, "automations/")

    wanted = ("web-starting", "first-ran", "second-ran")
    wait_for(output, lambda text: all(w in text for w in wanted), what="the automations' output in the logs")
    delete(runner_host, admin, environment_id)


def test_a_devcontainer_json_with_a_syntax_error_fails_with_its_line_and_column(
    runner_host: RunnerHost, admin: Client, repositories: GitServer, busybox_image: str
) -> None:
    broken = '{\n  // a comment is fine\n  "image": "' + busybox_image + '",\n  "name": oops\n}\n'
    url = publish(repositories, "broken.git", {".devcontainer/devcontainer.json": broken})
    environment_id = create(admin, url)
    failed = reach(runner_host, admin, environment_id, "failed")
    assert ".devcontainer/devcontainer.json:4:11" in failed["message"], failed["message"]
    delete(runner_host, admin, environment_id)


def test_a_failing_post_create_command_fails_the_environment_and_leaves_it_open_to_look_inside(
    runner_host: RunnerHost, admin: Client, repositories: GitServer, busybox_image: str
) -> None:
    config = {
        "image": busybox_image,
        "onCreateCommand": "echo created > created.txt",
        "postCreateCommand": "echo the-hook-says-why >&2; exit 3",
        # Without it, the environment runs once updateContentCommand ran, and a failing postCreateCommand only
        # sets the Hooks condition False.
        "waitFor": "postCreateCommand",
        "postStartCommand": "echo never > started.txt",
    }
    url = publish(repositories, "failing.git", {".devcontainer/devcontainer.json": devcontainer(config)})
    environment_id = create(admin, url)
    failed = reach(runner_host, admin, environment_id, "failed")
    assert "postCreateCommand" in failed["message"] and "the-hook-says-why" in failed["message"], failed["message"]
    # The container still runs: the user can look inside; the hooks after the failed one did not run.
    assert inside(runner_host, environment_id, "ls /workspaces/failing").split() == ["created.txt"]
    wait_for(lambda: logs(admin, environment_id, "lifecycle"), lambda t: "the-hook-says-why" in t, what="logs")
    delete(runner_host, admin, environment_id)


def test_a_hook_failing_after_wait_for_leaves_the_environment_running_with_the_hooks_condition_false(
    runner_host: RunnerHost, admin: Client, repositories: GitServer, busybox_image: str
) -> None:
    config = {"image": busybox_image, "postCreateCommand": "echo too-late-to-fail >&2; exit 4"}
    url = publish(repositories, "late.git", {".devcontainer/devcontainer.json": devcontainer(config)})
    environment_id = create(admin, url)
    reach(runner_host, admin, environment_id, "running")

    def hooks_condition() -> dict[str, Any]:
        found = [c for c in status(admin, environment_id)["conditions"] if c["type"] == "Hooks"]
        return found[0] if found else {}

    condition = wait_for(hooks_condition, lambda c: c.get("reason") == "HookFailed", what="the Hooks condition")
    assert condition["status"] == "False" and "too-late-to-fail" in condition["message"], condition
    assert status(admin, environment_id)["phase"] == "running"
    delete(runner_host, admin, environment_id)


def test_the_creators_dotfiles_are_installed_after_post_create_once_into_their_own_copy(
    runner_host: RunnerHost, admin: Client, repositories: GitServer, busybox_image: str
) -> None:
    install = '#!/bin/sh\necho "dotfiles in $PWD" >> /workspaces/dotted/markers\n'
    dotfiles_url = publish(repositories, "dotfiles.git", {"install.sh": install, ".vimrc": "set nu\n"})
    me = admin.get("/api/v1/whoami")["id"]
    admin.patch(f"/api/v1/users/{me}", {"spec": {"dotfiles": {"url": dotfiles_url}}})
    try:
        config = {
            "image": busybox_image,
            "postCreateCommand": "echo postCreate >> markers",
            "postStartCommand": "echo postStart >> markers",
        }
        url = publish(repositories, "dotted.git", {".devcontainer/devcontainer.json": devcontainer(config)})
        environment_id = create(admin, url)
    finally:
        admin.patch(f"/api/v1/users/{me}", {"spec": {"dotfiles": None}})
    created = admin.get(f"/api/v1/environments/{environment_id}")
    assert created["spec"]["dotfiles"]["url"] == dotfiles_url, "the creator's setting, copied at creation"
    reach(runner_host, admin, environment_id, "running")

    def markers() -> list[str]:
        return inside(runner_host, environment_id, "cat /workspaces/dotted/markers 2>/dev/null || true").splitlines()

    first = wait_for(markers, lambda m: m[-1:] == ["postStart"], timeout=30, what="postStart")
    assert first == ["postCreate", "dotfiles in /root/dotfiles", "postStart"]
    # The user's own copy: theirs to change (the fetched source is read-only and belongs to nobody inside).
    assert inside(runner_host, environment_id, "stat -c %u /root/dotfiles/.vimrc").strip() == "0"
    assert inside(runner_host, environment_id, "cat /root/dotfiles/.vimrc") == "set nu\n"
    assert runner_host.exec(environment_id, "touch /var/lib/devyard/dotfiles/x").returncode != 0

    set_phase(admin, environment_id, "stopped")
    reach(runner_host, admin, environment_id, "stopped")
    set_phase(admin, environment_id, "running")
    reach(runner_host, admin, environment_id, "running")
    again = wait_for(markers, lambda m: len(m) >= 4, timeout=30, what="postStart again")
    assert again == [*first, "postStart"], "dotfiles are installed once, on the first start"
    assert "dotfiles: " in logs(admin, environment_id, "build")
    delete(runner_host, admin, environment_id)


def test_a_new_runners_first_environment_builds_its_dockerfile_and_local_feature_in_one_build(
    repositories: GitServer, registry: RegistryServer, busybox_image: str, tmp_path: Path
) -> None:
    """A runner that never made an environment (no dev-containers/ directory yet: commit 5feefb5) installs a
    local Feature on a Dockerfile's image; the Feature's stages follow the Dockerfile's in one build."""
    install = '#!/bin/sh\nset -e\necho "feature $WORD on $(cat /from-dockerfile)" > /from-feature\n'
    local = {"id": "word", "version": "1.0.0", "options": {"word": {"type": "string", "default": "unset"}}}
    config = {"build": {"dockerfile": "Dockerfile"}, "features": {"./features/word": {"word": "first"}}}
    url = publish(
        repositories,
        "first-feature.git",
        {
            ".devcontainer/devcontainer.json": devcontainer(config),
            ".devcontainer/Dockerfile": f"FROM {busybox_image}\nRUN echo dockerfile > /from-dockerfile\n",
            ".devcontainer/features/word/devcontainer-feature.json": json.dumps(local),
            ".devcontainer/features/word/install.sh": install,
        },
        executable=(".devcontainer/features/word/install.sh",),
    )
    token = secrets.token_hex(3)
    base = Path(f"/var/tmp/devyard-runner-{token}")
    base.mkdir(mode=0o711)
    os.chmod(base, 0o711)
    with live_server.serve_in_thread(live_server.settings_for(tmp_path / "server")) as server, server.client() as admin:
        where = RunnerHost(
            base=base,
            bridge=f"dyr{token}",
            subnet=str(unused_subnet("10.232.0.0/15", 24)),
            registry=registry.host,
            server_url=server.url,
            log=tmp_path / "runner.log",
        )
        where.exchange_token = admin.post("/api/v1/runners", {"metadata": {"name": f"new-{token}"}})["exchange_token"]
        try:
            runner = where.start()
            _wait_online(where, runner, admin)
            assert not (where.state_dir / "dev-containers").exists()

            environment_id = create(admin, url)
            reach(where, admin, environment_id, "running")

            assert inside(where, environment_id, "cat /from-feature") == "feature first on dockerfile\n"
            build_log = whole_build_log(admin, environment_id)
            assert len(re.findall(r"^built devyard\.local/build:", build_log, re.MULTILINE)) == 1, build_log
            delete(where, admin, environment_id)
            runner.stop()
        finally:
            where.scrub()
