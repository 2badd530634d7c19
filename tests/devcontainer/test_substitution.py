"""Variables in devcontainer.json: the load-time pass, the containerEnv pass, and what stays literal."""

from __future__ import annotations

from devyard.devcontainer import substitution
from devyard.devcontainer.substitution import LoadContext

CONTEXT = LoadContext(
    local_workspace_folder="/srv/work/my-repo",
    container_workspace_folder="/workspaces/my-repo",
    local_env={"HOME": "/home/ann", "EMPTY": ""},
    devcontainer_id="abc123",
)


def test_load_time_variables_in_every_string_value_not_keys() -> None:
    document = {
        "${localEnv:HOME}": "key stays",
        "a": "${localWorkspaceFolder}|${localWorkspaceFolderBasename}",
        "b": ["${containerWorkspaceFolder}", {"c": "${containerWorkspaceFolderBasename}"}],
        "d": "${localEnv:HOME}:${env:HOME}:${localEnv:NOPE}:${localEnv:NOPE:fallback}:${localEnv:EMPTY:x}",
        "e": "vol-${devcontainerId}",
        "f": 3,
        "g": True,
        "h": None,
    }
    assert substitution.substitute(document, CONTEXT) == {
        "${localEnv:HOME}": "key stays",
        "a": "/srv/work/my-repo|my-repo",
        "b": ["/workspaces/my-repo", {"c": "my-repo"}],
        "d": "/home/ann:/home/ann::fallback:",
        "e": "vol-abc123",
        "f": 3,
        "g": True,
        "h": None,
    }


def test_what_stays_literal() -> None:
    text = (
        "${workspaceFolder} ${unknown} ${containerEnv:PATH} $${severity} [$${walltime:%Y-%m-%d %H:%M:%S}] "
        "${localWorkspaceFolder:x} $HOME ${"
    )
    assert substitution.substitute(text, CONTEXT) == text


def test_container_workspace_unknown_yet_stays_literal() -> None:
    early = LoadContext(local_workspace_folder="/srv/r")
    assert substitution.substitute("${containerWorkspaceFolder}/${devcontainerId}", early) == (
        "${containerWorkspaceFolder}/${devcontainerId}"
    )


def test_container_env_pass() -> None:
    value = {"PATH": "${containerEnv:PATH}:/extra", "X": "${containerEnv:MISSING:def}${containerEnv:MISSING}"}
    value["keep"] = "${localEnv:HOME} $${containerEnv:PATH}"
    assert substitution.substitute_container_env(value, {"PATH": "/usr/bin"}) == {
        "PATH": "/usr/bin:/extra",
        "X": "def",
        "keep": "${localEnv:HOME} $${containerEnv:PATH}",
    }


def test_devcontainer_id_is_stable_and_depends_on_inputs() -> None:
    first = substitution.devcontainer_id({"devyard.environment": "env-1", "b": "2"})
    assert first == substitution.devcontainer_id({"b": "2", "devyard.environment": "env-1"})
    assert first != substitution.devcontainer_id({"devyard.environment": "env-2", "b": "2"})
    assert len(first) == 52
    assert set(first) <= set("0123456789abcdefghijklmnopqrstuv")
