"""The devcontainer.metadata label and the merge of image, Feature and devcontainer.json metadata by the
spec's rules."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from devyard.devcontainer import config, image_metadata
from devyard.devcontainer.config import ForwardPort, GpuRequirement, HostRequirements, LifecycleCommand, Mount
from devyard.devcontainer.errors import ConfigError


def test_label_forms() -> None:
    assert image_metadata.parse_label('[{"remoteUser": "a"}, {"init": true}]') == [{"remoteUser": "a"}, {"init": True}]
    assert image_metadata.parse_label('{"remoteUser": "a"}') == [{"remoteUser": "a"}]
    with pytest.raises(ConfigError, match="entry 1 is not an object"):
        image_metadata.parse_label('[{}, "x"]')
    with pytest.raises(ConfigError) as caught:
        image_metadata.parse_label('[{"a": 1}', source="image debian:12")
    assert str(caught.value).startswith("image debian:12:1:1: unterminated array")


def test_nothing_to_merge_gives_the_spec_defaults() -> None:
    merged = image_metadata.merge([])
    assert merged == image_metadata.MergedConfig()
    assert (merged.override_command, merged.update_remote_user_uid, merged.wait_for) == (
        True,
        True,
        "updateContentCommand",
    )
    assert (merged.shutdown_action, merged.user_env_probe, merged.init) == (
        "stopContainer",
        "loginInteractiveShell",
        False,
    )


def test_merge_rules(tmp_path: Path) -> None:
    label = image_metadata.parse_label(
        json.dumps(
            [
                {
                    "id": "base",
                    "init": True,
                    "capAdd": ["SYS_PTRACE"],
                    "securityOpt": ["seccomp=unconfined"],
                    "entrypoint": "/usr/local/share/docker-init.sh",
                    "mounts": ["source=a,target=/data,type=volume", {"type": "bind", "source": "/x", "target": "/x"}],
                    "onCreateCommand": "echo image",
                    "postStartCommand": ["echo", "image"],
                    "containerEnv": {"A": "image", "B": "image"},
                    "remoteEnv": {"R": "image"},
                    "remoteUser": "image-user",
                    "containerUser": "root",
                    "overrideCommand": False,
                    "forwardPorts": [3000],
                    "portsAttributes": {"3000": {"label": "image"}, "4000": {"label": "four"}},
                    "hostRequirements": {"cpus": 4, "memory": "2gb", "gpu": "optional"},
                    "customizations": {"vscode": {"extensions": ["a.b"]}},
                },
                {"remoteUser": "second", "userEnvProbe": "none"},
            ]
        )
    )
    features = [
        {
            "id": "ghcr.io/devcontainers/features/docker-in-docker:2",
            "privileged": True,
            "capAdd": ["sys_ptrace", "NET_ADMIN"],
            "entrypoint": "/usr/local/share/dind.sh",
            "mounts": [{"type": "volume", "source": "dind", "target": "/var/lib/docker"}],
            "onCreateCommand": {"x": "echo feature"},
            "containerEnv": {"B": "feature"},
            "forwardPorts": ["db:5432", 3000],
            "hostRequirements": {"cpus": 2, "memory": "8gb", "storage": "10gb"},
        }
    ]
    path = tmp_path / "repo" / ".devcontainer.json"
    path.parent.mkdir()
    path.write_text(
        json.dumps(
            {
                "image": "x",
                "capAdd": ["SYS_ADMIN"],
                "mounts": ["source=mine,target=/data,type=volume"],
                "onCreateCommand": "echo config",
                "postAttachCommand": "echo attach",
                "containerEnv": {"A": "config"},
                "remoteEnv": {"R": None},
                "remoteUser": "vscode",
                "forwardPorts": [8080, 3000],
                "portsAttributes": {"3000": {"label": "config"}},
                "waitFor": "postCreateCommand",
                "hostRequirements": {"gpu": True},
                "runArgs": ["-e", "A=runarg", "--cap-add=SYS_NICE", "--gpus", "all"],
            }
        )
    )
    loaded = config.load(path)
    merged = image_metadata.merge(label, features, loaded)

    assert merged.init and merged.privileged
    assert merged.cap_add == ("SYS_PTRACE", "NET_ADMIN", "SYS_ADMIN", "SYS_NICE")
    assert merged.security_opt == ("seccomp=unconfined",)
    assert merged.entrypoints == ("/usr/local/share/docker-init.sh", "/usr/local/share/dind.sh")
    # The last mount per target wins, in the last one's place.
    assert merged.mounts == (
        Mount("bind", "/x", "/x"),
        Mount("volume", "/var/lib/docker", "dind"),
        Mount("volume", "/data", "mine"),
    )
    assert merged.hooks == {
        "onCreateCommand": (
            LifecycleCommand("echo image", "base"),
            LifecycleCommand({"x": "echo feature"}, "ghcr.io/devcontainers/features/docker-in-docker:2"),
            LifecycleCommand("echo config", "devcontainer.json"),
        ),
        "postStartCommand": (LifecycleCommand(("echo", "image"), "base"),),
        "postAttachCommand": (LifecycleCommand("echo attach", "devcontainer.json"),),
    }
    assert merged.container_env == {"A": "runarg", "B": "feature"}
    assert merged.remote_env == {"R": None}
    assert (merged.remote_user, merged.container_user, merged.user_env_probe) == ("vscode", "root", "none")
    assert merged.override_command is False
    assert merged.wait_for == "postCreateCommand"
    assert merged.forward_ports == (ForwardPort(3000), ForwardPort(5432, "db"), ForwardPort(8080))
    assert merged.ports_attributes == {"3000": {"label": "config"}, "4000": {"label": "four"}}
    assert merged.host_requirements == HostRequirements(
        cpus=4, memory=8 << 30, storage=10 << 30, gpu=GpuRequirement(True)
    )
    assert merged.gpus == "all"
    assert merged.customizations == ({"vscode": {"extensions": ["a.b"]}},)


def test_a_malformed_entry_names_its_origin() -> None:
    with pytest.raises(ConfigError, match=r"the metadata of ghcr\.io/x/y:1: init: expected true or false"):
        image_metadata.merge([], [{"id": "ghcr.io/x/y:1", "init": "yes"}])
    with pytest.raises(ConfigError, match="the metadata of image: a bind mount needs a source"):
        image_metadata.merge([{"mounts": ["type=bind,target=/x"]}])
