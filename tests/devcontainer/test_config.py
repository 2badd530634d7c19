"""Finding and loading devcontainer.json: discovery, the model, paths kept in the repository, lifecycle forms,
runArgs, mounts, host requirements, and the refusals with their line and column."""

from __future__ import annotations

from pathlib import Path

import pytest

from devyard.devcontainer import config
from devyard.devcontainer.config import ForwardPort, GpuRequirement, HostRequirements, LifecycleCommand, Mount
from devyard.devcontainer.errors import ConfigError


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def load_text(tmp_path: Path, text: str, **options: object) -> config.DevContainerConfig:
    path = write(tmp_path / "repo" / ".devcontainer" / "devcontainer.json", text)
    return config.load(path, source="devcontainer.json", **options)  # type: ignore[arg-type]


def refusal(tmp_path: Path, text: str) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        load_text(tmp_path, text)
    return caught.value


# Discovery


def test_find_in_the_order_of_the_spec(tmp_path: Path) -> None:
    with pytest.raises(config.ConfigNotFound, match=r"no devcontainer\.json"):
        config.find(tmp_path)
    only_named = write(tmp_path / ".devcontainer" / "python" / "devcontainer.json", "{}")
    assert config.find(tmp_path) == only_named
    root_file = write(tmp_path / ".devcontainer.json", "{}")
    assert config.find(tmp_path) == root_file
    main = write(tmp_path / ".devcontainer" / "devcontainer.json", "{}")
    assert config.find(tmp_path) == main


def test_several_named_configs_need_a_name(tmp_path: Path) -> None:
    python = write(tmp_path / ".devcontainer" / "python" / "devcontainer.json", "{}")
    write(tmp_path / ".devcontainer" / "node" / "devcontainer.json", "{}")
    with pytest.raises(ConfigError, match="several dev container configs: node, python; choose one") as caught:
        config.find(tmp_path)
    assert not isinstance(caught.value, config.ConfigNotFound)
    assert config.find(tmp_path, "python") == python
    assert config.find(tmp_path, ".devcontainer/python/devcontainer.json") == python
    other = write(tmp_path / "tools" / "dev.json", "{}")
    assert config.find(tmp_path, "tools/dev.json") == other
    with pytest.raises(config.ConfigNotFound, match=r"no dev container config 'go' \(there are: node, python\)"):
        config.find(tmp_path, "go")
    write(tmp_path.parent / f"{tmp_path.name}-outside.json", "{}")
    with pytest.raises(ConfigError, match="outside the repository"):
        config.find(tmp_path, f"../{tmp_path.name}-outside.json")


def test_a_config_linked_from_outside_the_repository_is_refused(tmp_path: Path) -> None:
    outside = write(tmp_path / "elsewhere.json", "{}")
    repository = tmp_path / "repo"
    (repository / ".devcontainer").mkdir(parents=True)
    (repository / ".devcontainer" / "devcontainer.json").symlink_to(outside)
    with pytest.raises(ConfigError, match="outside the repository"):
        config.find(repository)


# The model


def test_an_image_config_resolved(tmp_path: Path) -> None:
    loaded = load_text(
        tmp_path,
        """{
        "name": "dev", "image": "debian:12",
        "features": {"ghcr.io/devcontainers/features/git:1": {}, "./local": {"x": "1"}},
        "overrideFeatureInstallOrder": ["./local"],
        "containerEnv": {"A": "1"}, "remoteEnv": {"PATH": "${containerEnv:PATH}:/x", "GONE": null},
        "containerUser": "root", "remoteUser": "vscode", "updateRemoteUserUID": false,
        "forwardPorts": [3000, "db:5432"], "portsAttributes": {"3000": {"label": "app"}},
        "otherPortsAttributes": {"onAutoForward": "ignore"}, "appPort": [8080, "9000:90"],
        "waitFor": "postCreateCommand", "overrideCommand": false, "capAdd": ["SYS_PTRACE"],
        "securityOpt": ["seccomp=unconfined"], "privileged": true, "init": true,
        "hostRequirements": {"cpus": 4, "memory": "4gb", "storage": "32gb", "gpu": "optional"},
        "shutdownAction": "none", "userEnvProbe": "loginShell",
        "customizations": {"vscode": {"extensions": ["ms-python.python"]}}
    }""",
    )
    assert loaded.name == "dev" and loaded.image == "debian:12" and loaded.build is None
    assert list(loaded.features) == ["ghcr.io/devcontainers/features/git:1", "./local"]
    assert loaded.override_feature_install_order == ("./local",)
    assert loaded.container_env == {"A": "1"}
    assert loaded.remote_env == {"PATH": "${containerEnv:PATH}:/x", "GONE": None}
    assert (loaded.container_user, loaded.remote_user, loaded.update_remote_user_uid) == ("root", "vscode", False)
    assert loaded.forward_ports == (ForwardPort(3000), ForwardPort(5432, "db"))
    assert [str(port) for port in loaded.forward_ports] == ["3000", "db:5432"]
    assert loaded.ports_attributes == {"3000": {"label": "app"}}
    assert loaded.other_ports_attributes == {"onAutoForward": "ignore"}
    assert loaded.app_ports == ("8080", "9000:90")
    assert (loaded.wait_for, loaded.override_command, loaded.privileged, loaded.init) == (
        "postCreateCommand",
        False,
        True,
        True,
    )
    assert (loaded.cap_add, loaded.security_opt) == (("SYS_PTRACE",), ("seccomp=unconfined",))
    assert loaded.host_requirements == HostRequirements(4, 4 << 30, 32 << 30, GpuRequirement("optional"))
    assert (loaded.shutdown_action, loaded.user_env_probe) == ("none", "loginShell")
    assert loaded.customizations == {"vscode": {"extensions": ["ms-python.python"]}}
    # Defaults: the workspace under /workspaces, named after the repository, mounted by the runner.
    assert loaded.workspace_folder == "/workspaces/repo"
    assert loaded.workspace_mount == Mount("bind", "/workspaces/repo", str((tmp_path / "repo").resolve()))
    assert loaded.repository == (tmp_path / "repo").resolve()


def test_unset_properties_are_left_to_the_merge(tmp_path: Path) -> None:
    loaded = load_text(tmp_path, '{"image": "x"}', workspace_name="project")
    assert loaded.workspace_folder == "/workspaces/project"
    assert loaded.workspace_mount.target == "/workspaces/project"
    # A workspaceFolder alone moves where work happens, not the mount.
    sub = load_text(tmp_path, '{"image": "x", "workspaceFolder": "/workspaces/${localWorkspaceFolderBasename}/sub"}')
    assert (sub.workspace_folder, sub.workspace_mount.target) == ("/workspaces/repo/sub", "/workspaces/repo")
    assert (loaded.wait_for, loaded.override_command, loaded.init, loaded.remote_user) == (None, None, None, None)
    assert loaded.hooks == {} and loaded.mounts == () and loaded.host_requirements is None


def test_build_paths_against_the_config_folder(tmp_path: Path) -> None:
    loaded = load_text(
        tmp_path,
        '{"build": {"dockerfile": "Dockerfile", "context": "..", "args": {"V": "1"}, "target": "dev",'
        ' "options": ["--network=host"], "cacheFrom": "ghcr.io/x/cache"}}',
    )
    repository = (tmp_path / "repo").resolve()
    assert loaded.build == config.Build(
        dockerfile=repository / ".devcontainer" / "Dockerfile",
        context=repository,
        args={"V": "1"},
        target="dev",
        options=("--network=host",),
        cache_from=("ghcr.io/x/cache",),
    )
    default_context = load_text(tmp_path, '{"build": {"dockerfile": "../Dockerfile", "cacheFrom": ["a", "b"]}}')
    assert default_context.build is not None
    assert default_context.build.context == repository / ".devcontainer"
    assert default_context.build.dockerfile == repository / "Dockerfile"
    assert default_context.build.cache_from == ("a", "b")


def test_the_legacy_dockerfile_form(tmp_path: Path) -> None:
    loaded = load_text(tmp_path, '{"dockerFile": "Dockerfile", "context": "..", "build": {"args": {"A": "b"}}}')
    repository = (tmp_path / "repo").resolve()
    assert loaded.build is not None
    assert (loaded.build.dockerfile, loaded.build.context, loaded.build.args) == (
        repository / ".devcontainer" / "Dockerfile",
        repository,
        {"A": "b"},
    )


@pytest.mark.parametrize(
    ("text", "line", "column", "words"),
    [
        ('{\n "build": {"dockerfile": "../../Dockerfile"}}', 2, 26, "build.dockerfile: the Dockerfile"),
        ('{\n "build": {"dockerfile": "D",\n  "context": "../.."}}', 3, 14, "build.context: the build context"),
        ('{"dockerFile": "/etc/Dockerfile"}', 1, 16, "dockerFile: the Dockerfile /etc/Dockerfile"),
    ],
)
def test_paths_that_leave_the_repository_are_refused(
    tmp_path: Path, text: str, line: int, column: int, words: str
) -> None:
    error = refusal(tmp_path, text)
    assert (error.line, error.column) == (line, column)
    assert words in error.message and "outside the repository" in error.message


def test_a_dockerfile_linked_outside_is_refused(tmp_path: Path) -> None:
    write(tmp_path / "secret" / "Dockerfile", "FROM x")
    (tmp_path / "repo" / ".devcontainer").mkdir(parents=True)
    (tmp_path / "repo" / ".devcontainer" / "Dockerfile").symlink_to(tmp_path / "secret" / "Dockerfile")
    assert "outside the repository" in refusal(tmp_path, '{"build": {"dockerfile": "Dockerfile"}}').message


def test_lifecycle_commands_in_every_form(tmp_path: Path) -> None:
    loaded = load_text(
        tmp_path,
        """{"image": "x",
        "initializeCommand": "echo host",
        "onCreateCommand": ["make", "setup"],
        "updateContentCommand": {"deps": "npm ci", "tools": ["pip", "install", "x"], "skip": ""},
        "postCreateCommand": "",
        "postStartCommand": [],
        "postAttachCommand": {}
    }""",
    )
    assert loaded.hooks == {
        "initializeCommand": LifecycleCommand("echo host"),
        "onCreateCommand": LifecycleCommand(("make", "setup")),
        "updateContentCommand": LifecycleCommand({"deps": "npm ci", "tools": ("pip", "install", "x")}),
    }
    assert loaded.hooks["updateContentCommand"].parallel
    assert not loaded.hooks["onCreateCommand"].parallel
    assert loaded.hooks["onCreateCommand"].origin == "devcontainer.json"


def test_run_args_devyard_supports(tmp_path: Path) -> None:
    loaded = load_text(
        tmp_path,
        '{"image": "x", "containerEnv": {"A": "1"}, "runArgs": ['
        '"-e", "A=2", "--env=B=x=y", "-eC=3", "--cap-add", "SYS_PTRACE", "--cap-add=NET_ADMIN",'
        '"--security-opt", "seccomp=unconfined", "--security-opt=apparmor=unconfined",'
        '"--init", "--privileged=false", "--gpus", "all"]}',
    )
    assert loaded.run_args == config.RunArgs(
        env={"A": "2", "B": "x=y", "C": "3"},
        cap_add=("SYS_PTRACE", "NET_ADMIN"),
        security_opt=("seccomp=unconfined", "apparmor=unconfined"),
        init=True,
        privileged=False,
        gpus="all",
    )
    assert load_text(tmp_path, '{"image": "x", "runArgs": ["--gpus=device=0", "--privileged"]}').run_args == (
        config.RunArgs(privileged=True, gpus="device=0")
    )


@pytest.mark.parametrize(
    ("run_args", "line", "words"),
    [
        ('"--platform", "linux/amd64"', 3, "'--platform' is not supported (devyard supports -e/--env"),
        ('"--network=host"', 3, "'--network=host' is not supported"),
        ('"-v", "/:/host"', 3, "'-v' is not supported"),
        ('"--cap-add"', 3, "'--cap-add' needs a value"),
        ('"-e", "HOME"', 3, "expected NAME=VALUE"),
        ('"--init=maybe"', 3, "expected --init, --init=true or --init=false"),
        ('"--init",\n    "--device=/dev/kvm"', 4, "'--device=/dev/kvm' is not supported"),
    ],
)
def test_other_run_args_are_refused_by_name(tmp_path: Path, run_args: str, line: int, words: str) -> None:
    error = refusal(tmp_path, '{"image": "x",\n  "runArgs": [\n    ' + run_args + "]}")
    assert error.line == line and error.column == 5
    assert words in error.message


def test_mounts_in_both_forms(tmp_path: Path) -> None:
    loaded = load_text(
        tmp_path,
        """{"image": "x", "workspaceFolder": "/src", "workspaceMount":
        "source=${localWorkspaceFolder},target=/src,type=bind,consistency=cached",
        "mounts": [
            "source=cache,target=/cache,type=volume",
            "type=bind,src=/etc/hosts,dst=/h,readonly",
            "type=tmpfs,destination=/tmp/t",
            "target=/anon",
            {"type": "volume", "source": "v", "target": "/v"},
            {"type": "bind", "source": "/a", "target": "/b"},
            "type=bind,source=/c,target=/d,ro=false"
        ]}""",
    )
    assert loaded.workspace_mount == Mount("bind", "/src", str((tmp_path / "repo").resolve()))
    assert loaded.workspace_folder == "/src"
    assert loaded.mounts == (
        Mount("volume", "/cache", "cache"),
        Mount("bind", "/h", "/etc/hosts", read_only=True),
        Mount("tmpfs", "/tmp/t"),
        Mount("volume", "/anon"),
        Mount("volume", "/v", "v"),
        Mount("bind", "/b", "/a"),
        Mount("bind", "/d", "/c"),
    )


@pytest.mark.parametrize(
    ("mount", "words"),
    [
        ('"type=bind,target=/x"', "a bind mount needs a source"),
        ('"source=x,type=volume"', "absolute target"),
        ('"source=x,target=y"', "absolute target"),
        ('"type=npipe,source=x,target=/y"', "mount type 'npipe' is not supported"),
        ('"source=x,target=/y,volume-opt=a=b"', "mount option volume-opt is not supported"),
        ('"type=tmpfs,source=x,target=/y"', "a tmpfs mount has no source"),
    ],
)
def test_mounts_devyard_cannot_make(tmp_path: Path, mount: str, words: str) -> None:
    error = refusal(tmp_path, '{"image": "x",\n "mounts": [' + mount + "]}")
    assert (error.line, error.column) == (2, 13)
    assert error.message.startswith("mounts[0]: ") and words in error.message


def test_substitution_at_load(tmp_path: Path) -> None:
    loaded = load_text(
        tmp_path,
        '{"image": "x", "workspaceFolder": "/w/${localWorkspaceFolderBasename}",'
        ' "containerEnv": {"W": "${containerWorkspaceFolder}", "H": "${localEnv:HOME:none}",'
        ' "I": "${devcontainerId}", "V": "${workspaceFolder}", "L": "$${literal}"}}',
        local_env={"HOME": "/home/ann"},
        devcontainer_id="the-id",
    )
    assert loaded.workspace_folder == "/w/repo"
    assert loaded.container_env == {
        "W": "/w/repo",
        "H": "/home/ann",
        "I": "the-id",
        "V": "${workspaceFolder}",
        "L": "$${literal}",
    }
    assert load_text(tmp_path, '{"image": "x", "containerEnv": {"H": "${localEnv:HOME}"}}').container_env == {"H": ""}


def test_compose_is_refused_at_the_property(tmp_path: Path) -> None:
    error = refusal(tmp_path, '{\n  "name": "c",\n  "dockerComposeFile": "compose.yml", "service": "app"\n}')
    assert (error.line, error.column) == (3, 3)
    assert "Docker Compose configs (dockerComposeFile) are not supported" in error.message


def test_neither_image_nor_build(tmp_path: Path) -> None:
    assert 'neither "image" nor "build"' in refusal(tmp_path, "{}").message
    assert 'needs "image" or "build"' in refusal(tmp_path, '{"name": "x"}').message


@pytest.mark.parametrize(
    ("text", "line", "column", "words"),
    [
        ('{"image": "x",\n "forwardPorts": [0]}', 2, 19, 'forwardPorts[0]: 0 is not a port number or "host:port"'),
        ('{"image": "x",\n "workspaceFolder": "relative"}', 2, 21, "expected an absolute path"),
        ('{"image": "x",\n "workspaceMount": "type=volume,target=/w"}', 2, 20, "workspaceMount needs workspaceFolder"),
        ('{"image": "x",\n "init": 1}', 2, 10, "init: expected true or false"),
        ('{"image": "x"\n "init": true}', 2, 2, "expected ',' or '}'"),
    ],
)
def test_errors_at_their_line(tmp_path: Path, text: str, line: int, column: int, words: str) -> None:
    error = refusal(tmp_path, text)
    assert (error.line, error.column) == (line, column), str(error)
    assert words in error.message
    assert str(error).startswith(f"devcontainer.json:{line}:{column}: ")


def test_sizes_and_ports() -> None:
    assert config.parse_size("4gb") == 4 << 30
    assert config.parse_size("512MB") == 512 << 20
    assert config.parse_size("100") == 100
    with pytest.raises(ValueError, match="not an amount"):
        config.parse_size("four")
    assert config.parse_forward_port("db:5432") == ForwardPort(5432, "db")
    with pytest.raises(ValueError, match="not a port number"):
        config.parse_forward_port("db:99999")


def test_an_unknown_property_is_named_at_its_line(tmp_path: Path) -> None:
    error = refusal(tmp_path, '{\n  "image": "x",\n  "postCreateComand": "make"\n}')
    assert str(error) == (
        'devcontainer.json:3:3: unknown property "postCreateComand" (did you mean "postCreateCommand"?)'
    )


def test_the_repository_by_default(tmp_path: Path) -> None:
    named = write(tmp_path / "r1" / ".devcontainer" / "python" / "devcontainer.json", '{"image": "x"}')
    assert config.load(named).repository == (tmp_path / "r1").resolve()
    top = write(tmp_path / "r2" / ".devcontainer.json", '{"image": "x"}')
    assert config.load(top).repository == (tmp_path / "r2").resolve()
    assert config.load(top).workspace_folder == "/workspaces/r2"
