"""Dev Container Features: references, definitions and options, install order, contributions, build context.

Features are real folders written by the tests; ``FolderSource`` stands in for the runner's fetcher behind the
same ``FeatureSource`` interface, serving OCI and tarball references from folders with a digest the test picks.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from devyard.devcontainer import features, jsonc
from devyard.devcontainer.errors import ConfigError


def write_feature(folder: Path, feature_id: str, **definition: Any) -> Path:
    """A Feature folder ``folder/feature_id`` with its devcontainer-feature.json (JSONC) and an install.sh."""
    path = folder / feature_id
    path.mkdir(parents=True, exist_ok=True)
    data = {"id": feature_id, "version": "1.0.0", **definition}
    (path / "devcontainer-feature.json").write_text("// written by the test\n" + json.dumps(data, indent=1))
    (path / "install.sh").write_text(f"#!/bin/sh\necho {feature_id} >> /features.log\n")
    return path


MAGIC = {"magicNumber": {"type": "string", "default": "0"}}


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A project's .devcontainer folder, with its devcontainer.json."""
    folder = tmp_path / "project" / ".devcontainer"
    folder.mkdir(parents=True)
    (folder / "devcontainer.json").write_text("{}")
    return folder


async def order(
    project: Path,
    config_features: Mapping[str, Any],
    override: list[str] | None = None,
    source: features.FeatureSource | None = None,
) -> list[tuple[str, dict[str, Any]]]:
    resolved = await features.resolve_features(
        config_features,
        config_file=project / "devcontainer.json",
        source=source or features.LocalFeatureSource(),
        override_order=override or [],
    )
    return [(str(feature.reference), dict(feature.user_options)) for feature in resolved]


class FolderSource:
    """Serves every reference from a folder the test registered, with the digest it gave."""

    def __init__(self) -> None:
        self.served: dict[str, tuple[Path, str]] = {}
        self.fetches: list[str] = []

    def add(self, reference: str, folder: Path, digest: str) -> None:
        self.served[reference] = (folder, digest)

    async def fetch(self, reference: features.FeatureReference) -> features.FetchedFeature:
        self.fetches.append(str(reference))
        if isinstance(reference, features.LocalReference):
            return features.FetchedFeature(features.checked_local_folder(reference), "")
        folder, digest = self.served[str(reference)]
        return features.FetchedFeature(folder, digest)


def digest(n: int) -> str:
    return "sha256:" + f"{n:x}".rjust(64, "0")


# --- references ---------------------------------------------------------------------------------------------------


def parse(text: str, config: Path = Path("/p/.devcontainer/devcontainer.json")) -> features.FeatureReference:
    return features.parse_feature_reference(text, config_file=config)


def test_oci_references_default_to_latest_and_are_lowercased() -> None:
    reference = parse("ghcr.io/codspace/dependson/A")
    assert isinstance(reference, features.OciReference)
    assert (reference.registry, reference.namespace, reference.feature_id, reference.tag) == (
        "ghcr.io",
        "codspace/dependson",
        "a",
        "latest",
    )
    assert reference.resource == "ghcr.io/codspace/dependson/a"
    assert reference.image_reference == "ghcr.io/codspace/dependson/a:latest"
    pinned = parse("127.0.0.1:5000/team/features/go@sha256:" + "a" * 64)
    assert isinstance(pinned, features.OciReference)
    assert (pinned.registry, pinned.tag, pinned.digest) == ("127.0.0.1:5000", "", "sha256:" + "a" * 64)
    assert pinned.image_reference == "127.0.0.1:5000/team/features/go@sha256:" + "a" * 64
    tagged = parse("ghcr.io/devcontainers/features/node:1.2")
    assert isinstance(tagged, features.OciReference)
    assert tagged.tag == "1.2"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("ghcr.io/features/go@sha256:123", "the digest must be sha256"),
        ("ghcr.io/go", "not an OCI Feature reference"),
        ("ghcr.io/a b/go", "not an OCI Feature reference"),
    ],
)
def test_bad_oci_references_are_refused(text: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        parse(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("node", 'use "ghcr.io/devcontainers/features/node:1"'),
        ("terraform", 'use "ghcr.io/devcontainers/features/terraform:1"'),
        ("common", 'use "ghcr.io/devcontainers/features/common-utils:1"'),
        ("maven", '"ghcr.io/devcontainers/features/java:1", with the option "installMaven": true'),
        ("devcontainers/features/myfakefeature", 'use "ghcr.io/devcontainers/features/myfakefeature:1"'),
        ("codspace/myfeatures/helloworld", "v1 Feature reference .OWNER/REPO/ID"),
        ("codspace/features/devcontainer-feature-go@tarball02", "v1 Feature reference"),
        ("something", "not a Feature reference: write REGISTRY/NAMESPACE/ID"),
    ],
)
def test_legacy_ids_are_refused_with_the_modern_id(text: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected) as raised:
        parse(text)
    assert raised.value.source == "/p/.devcontainer/devcontainer.json"


def test_tarball_references_must_be_https_except_on_loopback() -> None:
    reference = parse("https://example.com/releases/download/1/devcontainer-feature-Go.tgz")
    assert isinstance(reference, features.TarballReference)
    assert reference.feature_id == "go"
    assert reference.resource == "https://example.com/releases/download/1/devcontainer-feature-Go.tgz"
    assert isinstance(parse("http://127.0.0.1:8000/devcontainer-feature-x.tgz"), features.TarballReference)
    with pytest.raises(ConfigError, match="must be https://"):
        parse("http://example.com/devcontainer-feature-x.tgz")
    with pytest.raises(ConfigError, match="must be https://"):
        parse("ftp://example.com/devcontainer-feature-x.tgz")


def test_local_references_stay_inside_the_dev_container_folder(tmp_path: Path) -> None:
    inside = tmp_path / ".devcontainer" / "devcontainer.json"
    reference = parse("./a", inside)
    assert isinstance(reference, features.LocalReference)
    assert reference.folder == tmp_path / ".devcontainer" / "a"
    assert reference.feature_id == "a"
    # A .devcontainer.json at the project's root: its local Features live under .devcontainer/ all the same.
    beside = tmp_path / ".devcontainer.json"
    assert parse("./.devcontainer/a", beside).folder == tmp_path / ".devcontainer" / "a"  # type: ignore[union-attr]
    nested = tmp_path / ".devcontainer" / "python" / "devcontainer.json"
    assert parse("../shared/b", nested).folder == tmp_path / ".devcontainer" / "shared" / "b"  # type: ignore[union-attr]
    for text, config in [
        ("./local-features/a", beside),
        ("../a", inside),
        ("./", inside),
        ("./a/../../b", inside),
    ]:
        with pytest.raises(ConfigError, match=re.escape("not inside the project's .devcontainer folder")):
            parse(text, config)
    with pytest.raises(ConfigError, match="absolute path"):
        parse("/etc/features/a", inside)


async def test_a_local_feature_may_not_leave_the_folder_through_a_symlink(project: Path, tmp_path: Path) -> None:
    outside = write_feature(tmp_path / "elsewhere", "a")
    (project / "a").symlink_to(outside)
    with pytest.raises(ConfigError, match="through a symlink"):
        await order(project, {"./a": {}})


def test_user_features_options() -> None:
    config = Path("/p/.devcontainer/devcontainer.json")
    parsed = features.parse_user_features(
        {"ghcr.io/x/y/go": "1.22", "ghcr.io/x/y/node": {"version": "20", "pnpm": True}}, config_file=config
    )
    assert [dict(user.options) for user in parsed] == [{"version": "1.22"}, {"version": "20", "pnpm": True}]
    with pytest.raises(ConfigError, match=r"option 'version' of 'ghcr.io/x/y/go' is 18; .*write \"18\""):
        features.parse_user_features({"ghcr.io/x/y/go": {"version": 18}}, config_file=config)
    with pytest.raises(ConfigError, match="must be an object of options or a version string"):
        features.parse_user_features({"ghcr.io/x/y/go": ["1"]}, config_file=config)


# --- definitions and options --------------------------------------------------------------------------------------


def test_definition_is_read_as_jsonc_and_checked_against_the_schema(tmp_path: Path) -> None:
    folder = tmp_path / "go"
    folder.mkdir()
    (folder / "devcontainer-feature.json").write_text(
        '{\n  // a comment\n  "id": "go", "version": "1.0.0",\n  "options": {"version": {"type": "string", '
        '"default": "latest",},},\n  "installsAfter": ["ghcr.io/devcontainers/features/common-utils"],\n}'
    )
    definition = features.load_definition(folder)
    assert (definition.id, definition.version) == ("go", "1.0.0")
    assert definition.options["version"] == features.FeatureOption(type="string", default="latest")
    assert definition.installs_after == ("ghcr.io/devcontainers/features/common-utils",)

    (folder / "devcontainer-feature.json").write_text('{"id": "go", "extensions": ["x"]}')
    with pytest.raises(ConfigError) as raised:
        features.load_definition(folder, name="./go")
    assert raised.value.source == str(folder / "devcontainer-feature.json")
    assert "'version' is a required property" in str(raised.value)
    assert "'extensions' was unexpected" in str(raised.value)

    (folder / "devcontainer-feature.json").write_text(
        '{\n  "id": "go", "version": "1.0.0",\n  "options": {"flag": {"type": "boolean", "default": "yes"}}\n}'
    )
    with pytest.raises(ConfigError, match="options/flag") as raised:
        features.load_definition(folder, name="./go")
    assert raised.value.line == 3

    (folder / "devcontainer-feature.json").unlink()
    with pytest.raises(ConfigError, match=r"the Feature ./go has no devcontainer-feature.json"):
        features.load_definition(folder, name="./go")


def definition_with(options: dict[str, Any]) -> features.FeatureDefinition:
    return features.FeatureDefinition(
        id="x",
        version="1",
        options={
            name: features.FeatureOption(type=spec["type"], default=spec["default"], enum=tuple(spec.get("enum", ())))
            for name, spec in options.items()
        },
        depends_on={},
        installs_after=(),
        legacy_ids=(),
        data={},
    )


def test_options_resolve_over_defaults_and_are_type_checked() -> None:
    definition = definition_with(
        {
            "version": {"type": "string", "default": "latest", "enum": ["latest", "3.12"]},
            "pip": {"type": "boolean", "default": True},
            "optimize": {"type": "boolean", "default": True},
        }
    )
    resolved = features.resolve_options(
        definition, {"version": "3.12", "pip": False}, name="py", location=features.Location("f.json")
    )
    assert resolved == {"version": "3.12", "pip": False, "optimize": True}
    assert features.feature_env(resolved) == {"VERSION": "3.12", "PIP": "false", "OPTIMIZE": "true"}
    with pytest.raises(
        ConfigError, match=r"the Feature py has no option 'pypy' \(its options: optimize, pip, version\)"
    ):
        features.resolve_options(definition, {"pypy": "1"}, name="py", location=features.Location("f.json"))
    with pytest.raises(ConfigError, match="is a boolean: write true or false"):
        features.resolve_options(definition, {"pip": "false"}, name="py", location=features.Location("f.json"))
    with pytest.raises(ConfigError, match='is a string: write "true"'):
        features.resolve_options(definition, {"version": True}, name="py", location=features.Location("f.json"))
    with pytest.raises(ConfigError, match=re.escape("must be one of latest, 3.12")):
        features.resolve_options(definition, {"version": "2.7"}, name="py", location=features.Location("f.json"))


@pytest.mark.parametrize(
    ("option", "name"),
    [
        ("version", "VERSION"),
        ("optA", "OPTA"),
        ("install-tools", "INSTALL_TOOLS"),
        ("1st.try", "_ST_TRY"),
        ("__x", "_X"),
        ("a b", "A_B"),
    ],
)
def test_option_environment_names_follow_the_spec(option: str, name: str) -> None:
    assert features.option_env_name(option) == name


# --- install order ------------------------------------------------------------------------------------------------


async def test_depends_on_pulls_in_features_recursively_with_their_options(project: Path) -> None:
    write_feature(project, "a", dependsOn={"./b": {"magicNumber": "7"}}, options=MAGIC)
    write_feature(project, "b", dependsOn={"./c": {}}, options=MAGIC)
    write_feature(project, "c", options=MAGIC)
    assert await order(project, {"./a": {}}) == [("./c", {}), ("./b", {"magicNumber": "7"}), ("./a", {})]


async def test_installs_after_orders_only_features_already_present(project: Path) -> None:
    write_feature(project, "a", installsAfter=["./b", "./c"])
    write_feature(project, "b")
    write_feature(project, "c", installsAfter=["ghcr.io/not/installed"])
    assert await order(project, {"./a": {}, "./c": {}}) == [("./c", {}), ("./a", {})]
    assert await order(project, {"./a": {}, "./b": {}, "./c": {}}) == [("./b", {}), ("./c", {}), ("./a", {})]


async def test_a_round_is_sorted_stably_whatever_the_config_order(project: Path) -> None:
    for name in "dcba":
        write_feature(project, name, options=MAGIC)
    expected = [("./a", {}), ("./b", {}), ("./c", {}), ("./d", {})]
    assert await order(project, {"./d": {}, "./b": {}, "./c": {}, "./a": {}}) == expected
    # The same Feature with several option sets: most user-given options first, then by value.
    write_feature(project, "e", options={**MAGIC, "other": {"type": "boolean", "default": False}})
    write_feature(project, "f", dependsOn={"./e": {}}, options=MAGIC)
    write_feature(project, "g", dependsOn={"./e": {"magicNumber": "1", "other": True}}, options=MAGIC)
    assert await order(project, {"./e": {"magicNumber": "2"}, "./f": {}, "./g": {}}) == [
        ("./e", {"magicNumber": "1", "other": True}),
        ("./e", {"magicNumber": "2"}),
        ("./e", {}),
        ("./f", {}),
        ("./g", {}),
    ]


async def test_override_order_takes_priority_within_what_dependencies_allow(project: Path) -> None:
    write_feature(project, "a", dependsOn={"./b": {}, "./c": {}, "./d": {}})
    write_feature(project, "b")
    write_feature(project, "c")
    write_feature(project, "d", installsAfter=["./b"])
    assert await order(project, {"./a": {}}) == [("./b", {}), ("./c", {}), ("./d", {}), ("./a", {})]
    assert await order(project, {"./a": {}}, ["./c"]) == [("./c", {}), ("./b", {}), ("./d", {}), ("./a", {})]
    # d cannot be pulled before b, which it installs after; once b is in, d goes before c.
    assert await order(project, {"./a": {}}, ["./d", "./b"]) == [("./b", {}), ("./d", {}), ("./c", {}), ("./a", {})]
    with pytest.raises(ConfigError, match=re.escape("overrideFeatureInstallOrder: './e' names none of the Features")):
        await order(project, {"./a": {}}, ["./e"])


@pytest.mark.parametrize("kind", ["dependsOn", "installsAfter"])
async def test_a_cycle_is_an_error_that_names_its_features(project: Path, kind: str) -> None:
    def edge(target: str) -> dict[str, Any]:
        return {"dependsOn": {target: {}}} if kind == "dependsOn" else {"installsAfter": [target]}

    write_feature(project, "a", **edge("./b"))
    write_feature(project, "b", **edge("./c"))
    write_feature(project, "c", **edge("./a"))
    write_feature(project, "d")
    config = {"./a": {}, "./d": {}} if kind == "dependsOn" else {"./a": {}, "./b": {}, "./c": {}, "./d": {}}
    with pytest.raises(ConfigError) as raised:
        await order(project, config)
    message = str(raised.value)
    assert (
        "form a cycle: ./a, which must install after ./b, which must install after ./c, which must install " in message
    )
    assert "./d" not in message
    assert raised.value.source == str(project / "devcontainer.json")


async def test_the_same_feature_with_the_same_options_installs_once(project: Path) -> None:
    write_feature(project, "base", options=MAGIC)
    write_feature(project, "a", dependsOn={"./base": {}})
    write_feature(project, "b", dependsOn={"./base": {"magicNumber": "0"}})
    write_feature(project, "c", dependsOn={"./base": {"magicNumber": "9"}})
    # {} and the default spelled out run the same; another value is another Feature.
    assert await order(project, {"./a": {}, "./b": {}, "./c": {}}) == [
        ("./base", {"magicNumber": "9"}),
        ("./base", {}),
        ("./a", {}),
        ("./b", {}),
        ("./c", {}),
    ]


async def test_oci_features_are_equal_by_digest_and_ordered_by_tag(project: Path, tmp_path: Path) -> None:
    source = FolderSource()
    go = write_feature(tmp_path / "registry", "go", options={"version": {"type": "string", "default": "latest"}})
    common = write_feature(tmp_path / "registry", "common-utils", legacyIds=["common"])
    tool = write_feature(tmp_path / "registry", "tool", installsAfter=["ghcr.io/devcontainers/features/common"])
    source.add("ghcr.io/devcontainers/features/go:1", go, digest(1))
    source.add("ghcr.io/devcontainers/features/go:1.22", go, digest(1))
    source.add("ghcr.io/devcontainers/features/go:latest", go, digest(2))
    source.add("ghcr.io/devcontainers/features/go", go, digest(2))
    source.add("ghcr.io/devcontainers/features/common-utils:2", common, digest(3))
    source.add("ghcr.io/other/features/tool:1", tool, digest(4))
    resolved = await order(
        project,
        {
            "ghcr.io/other/features/tool:1": {},
            "ghcr.io/devcontainers/features/go": {},
            "ghcr.io/devcontainers/features/go:1.22": {},
            "ghcr.io/devcontainers/features/go:1": {},
            "ghcr.io/devcontainers/features/common-utils:2": {},
        },
        source=source,
    )
    # go:1 and go:1.22 are one manifest: installed once. The tool installs after common-utils by its legacy id.
    assert resolved == [
        ("ghcr.io/devcontainers/features/common-utils:2", {}),
        ("ghcr.io/devcontainers/features/go:1.22", {}),
        ("ghcr.io/devcontainers/features/go", {}),
        ("ghcr.io/other/features/tool:1", {}),
    ]


async def test_published_features_may_not_depend_on_local_ones(project: Path, tmp_path: Path) -> None:
    source = FolderSource()
    source.add("ghcr.io/x/y/z:1", write_feature(tmp_path / "registry", "z", dependsOn={"./a": {}}), digest(1))
    write_feature(project, "a")
    with pytest.raises(
        ConfigError, match=re.escape("dependsOn of the Feature ghcr.io/x/y/z:1: ./a is a local Feature")
    ):
        await order(project, {"ghcr.io/x/y/z:1": {}}, source=source)


async def test_a_local_feature_is_named_after_its_folder(project: Path) -> None:
    folder = write_feature(project, "a")
    (folder / "devcontainer-feature.json").write_text('{"id": "b", "version": "1.0.0"}')
    with pytest.raises(ConfigError, match="has the id 'b': a local Feature's folder must be named after its id"):
        await order(project, {"./a": {}})


async def test_the_local_source_fetches_nothing(project: Path) -> None:
    with pytest.raises(ConfigError, match="is not local, and this check fetches nothing"):
        await order(project, {"ghcr.io/devcontainers/features/go:1": {}})


async def test_errors_point_at_their_line_and_column(project: Path) -> None:
    write_feature(project, "a", options=MAGIC)
    folder = write_feature(project, "b")
    (folder / "devcontainer-feature.json").write_text(
        '{\n  "id": "b", "version": "1.0.0",\n  "dependsOn": {\n    "./a": {"magicNumber": true}\n  }\n}'
    )

    async def error(text: str) -> ConfigError:
        config, positions = jsonc.parse_with_positions(text, source="devcontainer.json")
        with pytest.raises(ConfigError) as raised:
            await features.resolve_features(
                config["features"],
                config_file=project / "devcontainer.json",
                source=features.LocalFeatureSource(),
                override_order=config.get("overrideFeatureInstallOrder", []),
                positions=positions,
            )
        return raised.value

    found = await error('{\n  "features": {\n    "./a": {\n      "nope": "1"\n    }\n  }\n}')
    assert (found.line, found.column) == (4, 15)
    assert "has no option 'nope'" in found.message
    found = await error('{\n  "features": {\n    "./a": {},\n    "node": {}\n  }\n}')
    assert (found.line, found.column) == (4, 5)
    found = await error('{"features": {"./a": {}},\n "overrideFeatureInstallOrder": ["./a", "./c"]}')
    assert (found.line, found.column) == (2, 41)
    found = await error('{"features": {"./b": {}}}')
    assert (found.source, found.line, found.column) == (str(folder / "devcontainer-feature.json"), 4, 28)
    assert "the option 'magicNumber' of the Feature ./a is a string" in found.message


# --- contributions --------------------------------------------------------------------------------------------


async def test_metadata_entry_holds_what_the_feature_contributes(project: Path) -> None:
    write_feature(
        project,
        "dind",
        containerEnv={"DOCKER_BUILDKIT": "1"},
        mounts=[{"source": "dind-var-lib-docker-${devcontainerId}", "target": "/var/lib/docker", "type": "volume"}],
        capAdd=["SYS_PTRACE"],
        securityOpt=["seccomp=unconfined"],
        privileged=True,
        init=True,
        entrypoint="/usr/local/share/docker-init.sh",
        customizations={"vscode": {"extensions": ["ms-azuretools.vscode-docker"]}},
        onCreateCommand="echo create",
        postStartCommand=["echo", "start"],
        postAttachCommand={"a": "echo a", "b": ["echo", "b"]},
        name="Docker in Docker",
        description="not contributed",
        options=MAGIC,
    )
    (resolved,) = await features.resolve_features(
        {"./dind": {}}, config_file=project / "devcontainer.json", source=features.LocalFeatureSource()
    )
    assert features.metadata_entry(resolved) == {
        "id": "./dind",
        "containerEnv": {"DOCKER_BUILDKIT": "1"},
        "mounts": [{"source": "dind-var-lib-docker-${devcontainerId}", "target": "/var/lib/docker", "type": "volume"}],
        "capAdd": ["SYS_PTRACE"],
        "securityOpt": ["seccomp=unconfined"],
        "privileged": True,
        "init": True,
        "entrypoint": "/usr/local/share/docker-init.sh",
        "customizations": {"vscode": {"extensions": ["ms-azuretools.vscode-docker"]}},
        "onCreateCommand": "echo create",
        "postStartCommand": ["echo", "start"],
        "postAttachCommand": {"a": "echo a", "b": ["echo", "b"]},
    }
    bare = write_feature(project, "bare")
    assert bare.is_dir()
    (plain,) = await features.resolve_features(
        {"./bare": {}}, config_file=project / "devcontainer.json", source=features.LocalFeatureSource()
    )
    assert features.metadata_entry(plain) == {"id": "./bare"}


# --- build context ------------------------------------------------------------------------------------------------


async def test_build_context_installs_each_feature_in_order(project: Path, tmp_path: Path) -> None:
    write_feature(
        project, "a", options={"greeting": {"type": "string", "default": "hey"}}, containerEnv={"A_HOME": "/opt/a"}
    )
    write_feature(
        project,
        "b",
        dependsOn={"./a": {"greeting": 'it\'s $HOME "quoted"'}},
        options={"flag": {"type": "boolean", "default": False}},
        containerEnv={"PATH": "/opt/b/bin:${PATH}"},
    )
    (project / "b" / "extra.txt").write_text("kept")
    resolved = await features.resolve_features(
        {"./b": {"flag": True}}, config_file=project / "devcontainer.json", source=features.LocalFeatureSource()
    )
    context = tmp_path / "context"
    dockerfile = features.write_build_context(
        context, base_image="127.0.0.1:5000/test/busybox:1", features=resolved, container_user="dev", image_user="dev"
    )
    assert dockerfile.read_text().splitlines() == [
        "FROM 127.0.0.1:5000/test/busybox:1",
        "USER root",
        "COPY --chown=0:0 features/users.sh /tmp/devyard-features/users.sh",
        'ENV A_HOME="/opt/a"',
        "COPY --chown=0:0 features/1-a/ /tmp/devyard-features/1-a/",
        "RUN cd /tmp/devyard-features/1-a && set -a && . /tmp/devyard-features/users.sh && "
        ". ./devcontainer-features.env && set +a && chmod +x ./install.sh && ./install.sh",
        'ENV PATH="/opt/b/bin:${PATH}"',
        "COPY --chown=0:0 features/2-b/ /tmp/devyard-features/2-b/",
        "RUN cd /tmp/devyard-features/2-b && set -a && . /tmp/devyard-features/users.sh && "
        ". ./devcontainer-features.env && set +a && chmod +x ./install.sh && ./install.sh",
        "USER dev",
    ]
    assert (context / "features" / "1-a" / "devcontainer-features.env").read_text() == (
        "GREETING='it'\\''s $HOME \"quoted\"'\n"
    )
    assert (context / "features" / "2-b" / "devcontainer-features.env").read_text() == "FLAG='true'\n"
    assert (context / "features" / "2-b" / "extra.txt").read_text() == "kept"
    users = (context / "features" / "users.sh").read_text()
    assert "_CONTAINER_USER='dev'\n_REMOTE_USER='dev'\n" in users
    with pytest.raises(ValueError, match="is not empty"):
        features.write_build_context(context, base_image="x", features=resolved)

    # Stages to append to a Dockerfile: FROM its stage, the files from a named build context.
    appended = features.write_build_context(
        tmp_path / "appended", base_image="user_stage", features=resolved, content_from="feature_files"
    ).read_text()
    assert appended.splitlines()[:5] == [
        "FROM user_stage",
        "USER root",
        "COPY --chown=0:0 --from=feature_files users.sh /tmp/devyard-features/users.sh",
        'ENV A_HOME="/opt/a"',
        "COPY --chown=0:0 --from=feature_files 1-a/ /tmp/devyard-features/1-a/",
    ]
    assert (tmp_path / "appended" / "features" / "2-b" / "extra.txt").read_text() == "kept"

    (project / "a" / "install.sh").unlink()
    with pytest.raises(ConfigError, match=re.escape("has no install.sh")):
        features.write_build_context(tmp_path / "other", base_image="x", features=resolved)
