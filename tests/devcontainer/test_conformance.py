"""Every devcontainer.json of the reference CLI's tests and of the official templates
(../shared/conformance/devcontainer/cli-configs and templates) either loads, or fails with the error this file
expects for it: a new failure, or a config that starts loading, fails the test.

Templates are loaded as a repository made from them (``.devcontainer/devcontainer.json``), their
``${templateOption:NAME}`` filled from the defaults in ``_support/<name>/devcontainer-template.json``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from devyard.devcontainer import config, image_metadata
from devyard.devcontainer.config import Mount
from devyard.devcontainer.errors import ConfigError

CORPUS = Path(__file__).resolve().parents[3] / "shared" / "conformance" / "devcontainer"
CLI_CONFIGS = CORPUS / "cli-configs"
TEMPLATES = CORPUS / "templates"

_COMPOSE = "Docker Compose configs (dockerComposeFile) are not supported"
_PLATFORM = "runArgs[0]: '--platform' is not supported"

#: The configs that do not load, and the words their error must have (relative to the corpus).
EXPECTED_FAILURES: dict[str, str] = {
    **{
        f"cli-configs/{name}/.devcontainer/devcontainer.json": _COMPOSE
        for name in (
            "compose-Dockerfile-alpine",
            "compose-Dockerfile-with-features",
            "compose-Dockerfile-with-target",
            "compose-Dockerfile-without-features",
            "compose-image-with-features",
            "compose-image-with-mounts",
            "compose-image-without-features",
            "compose-image-without-features-minimal",
            "compose-with-name",
            "compose-with-name-and-custom-yaml",
            "compose-with-name-using-env-var",
            "compose-without-name",
            "image-containerEnv-issue",
        )
    },
    **{
        f"templates/{name}.json": _COMPOSE
        for name in (
            "anaconda-postgres",
            "cpp-mariadb",
            "docker-existing-docker-compose",
            "docker-outside-of-docker-compose",
            "dotnet-mssql",
            "dotnet-postgres",
            "go-postgres",
            "java-postgres",
            "javascript-node-mongo",
            "javascript-node-postgres",
            "miniconda-postgres",
            "php-mariadb",
            "postgres",
            "ruby-rails-postgres",
            "rust-postgres",
        )
    },
    # Made for `devcontainer set-up` on a container that already exists: no image, no build.
    "cli-configs/set-up-with-config/devcontainer.json": 'needs "image" or "build"',
    # devyard runs the host's platform only.
    "cli-configs/updateUIDamd64-platform-option/.devcontainer.json": _PLATFORM,
    "cli-configs/updateUIDarm64-platform-option/.devcontainer.json": _PLATFORM,
    "cli-configs/updateUIDarm64v8-platform-option/.devcontainer.json": _PLATFORM,
}


def cli_configs() -> list[Path]:
    return sorted(path for path in CLI_CONFIGS.rglob("*") if path.name in ("devcontainer.json", ".devcontainer.json"))


def templates() -> list[Path]:
    return sorted(TEMPLATES.glob("*.json"))


def test_the_corpus_is_there() -> None:
    # Not a skip: without the corpus this file would pass having checked nothing.
    assert len(cli_configs()) >= 40 and len(templates()) >= 40, f"no conformance corpus at {CORPUS}"


def check(relative: str, load: object) -> config.DevContainerConfig | None:
    expected = EXPECTED_FAILURES.get(relative)
    try:
        loaded = load()  # type: ignore[operator]
    except ConfigError as error:
        assert expected is not None, f"{relative} does not load: {error}"
        assert expected in error.message, f"{relative}: expected {expected!r}, got: {error}"
        assert error.line is not None, f"{relative}: no line in {error}"
        return None
    assert expected is None, f"{relative} loads, but is expected to fail with {expected!r}"
    assert isinstance(loaded, config.DevContainerConfig)
    # What the runner does next must work on it too.
    image_metadata.merge([], [], loaded)
    return loaded


@pytest.mark.parametrize("path", cli_configs(), ids=lambda path: str(path.relative_to(CLI_CONFIGS)))
def test_cli_configs(path: Path) -> None:
    repository = CLI_CONFIGS / path.relative_to(CLI_CONFIGS).parts[0]
    relative = str(path.relative_to(CORPUS))
    loaded = check(relative, lambda: config.load(path, repository=repository, local_env={"HOME": "/home/u"}))
    if loaded is not None:
        assert loaded.image is not None or loaded.build is not None


def fill_template(text: str, name: str) -> str:
    options = json.loads((TEMPLATES / "_support" / name / "devcontainer-template.json").read_text()).get("options", {})

    def default(match: re.Match[str]) -> str:
        option = options[match.group(1)]
        return str(option["default"]).lower() if isinstance(option["default"], bool) else str(option["default"])

    return re.sub(r"\$\{templateOption:([^}]+)\}", default, text)


@pytest.mark.parametrize("path", templates(), ids=lambda path: path.stem)
def test_templates(path: Path, tmp_path: Path) -> None:
    repository = tmp_path / path.stem
    config_file = repository / ".devcontainer" / "devcontainer.json"
    config_file.parent.mkdir(parents=True)
    config_file.write_text(fill_template(path.read_text(), path.stem))
    assert "${templateOption:" not in config_file.read_text()
    assert config.find(repository) == config_file
    check(str(path.relative_to(CORPUS)), lambda: config.load(config_file, repository=repository))


def test_the_table_names_only_files_that_exist() -> None:
    for relative in EXPECTED_FAILURES:
        assert (CORPUS / relative).is_file(), relative


def test_what_some_of_them_load_into(tmp_path: Path) -> None:
    parallel_path = CLI_CONFIGS / "dockerfile-with-parallel-commands" / ".devcontainer.json"
    parallel = config.load(parallel_path, repository=parallel_path.parent)
    assert parallel.build is not None and parallel.build.args == {"VARIANT": "16-bullseye"}
    assert parallel.build.dockerfile == CLI_CONFIGS / "dockerfile-with-parallel-commands" / "Dockerfile"
    assert all(parallel.hooks[hook].parallel for hook in ("postCreateCommand", "postStartCommand", "postAttachCommand"))
    assert list(parallel.hooks["postStartCommand"].command) == ["post-start-command-1", "post-start-command-2"]

    helm = tmp_path / "helm"
    (helm / ".devcontainer").mkdir(parents=True)
    (helm / ".devcontainer" / "devcontainer.json").write_text((TEMPLATES / "kubernetes-helm.json").read_text())
    loaded = config.load(helm / ".devcontainer" / "devcontainer.json", local_env={"HOME": "/home/ann"})
    # ${env:NAME} is the older name of ${localEnv:NAME}; a variable the host lacks is empty.
    assert loaded.mounts[0] == Mount("bind", "/usr/local/share/kube-localhost", "/home/ann/.kube")
    assert loaded.hooks["initializeCommand"].command == "cd .devcontainer && bash ensure-mount-sources"
