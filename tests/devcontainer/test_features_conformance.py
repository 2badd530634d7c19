"""Every config of the reference CLI's Feature tests (../shared/conformance/devcontainer/cli-feature-configs):
its Feature references parse; where its Features are local and present, they resolve in the expected order;
or it fails with the error stated for it below. A config added to the corpus without an expectation here fails.

Nothing is fetched: references to registries and tarball URLs are parsed and checked only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from devyard.devcontainer import features, jsonc
from devyard.devcontainer.errors import ConfigError

CORPUS = Path(__file__).resolve().parents[3] / "shared" / "conformance" / "devcontainer" / "cli-feature-configs"


@dataclass(frozen=True)
class Order:
    """Local Features: resolved in this order, as (reference, options given)."""

    expected: list[tuple[str, dict[str, Any]]]


@dataclass(frozen=True)
class References:
    """Published Features (or local ones depending on them): the references parse; nothing is fetched."""


@dataclass(frozen=True)
class Fails:
    """Refused, with a message holding this text."""

    message: str


LEGACY_TERRAFORM = (
    "the v1 Feature id 'terraform' is no longer supported: use \"ghcr.io/devcontainers/features/terraform:1\""
)
# localFeatureA is given an option it does not declare ("punctuation"); the reference CLI passes it on unchecked.
UNDECLARED_OPTION = "the Feature ./localFeatureA has no option 'punctuation' (its options: greeting)"
UNDECLARED_OPTION_OUTSIDE = (
    "the Feature ./.devcontainer/localFeatureA has no option 'punctuation' (its options: greeting)"
)

EXPECTED: dict[str, Order | References | Fails] = {
    "dockerfile-with-v2-local-features-config-inside-dev-container-folder/.devcontainer/devcontainer.json": Fails(
        UNDECLARED_OPTION
    ),
    "dockerfile-with-v2-local-features-config-outside-dev-container-folder/.devcontainer.json": Fails(
        UNDECLARED_OPTION_OUTSIDE
    ),
    "dockerfile-with-v2-oci-features/.devcontainer.json": Fails(LEGACY_TERRAFORM),
    "example-installsAfter/.devcontainer.json": References(),
    "example-legacyIds/.devcontainer.json": References(),
    "example-legacyIds-2/.devcontainer.json": References(),
    "feature-dependencies/dependsOn-and-installsAfter/a/.devcontainer.json": References(),
    "feature-dependencies/dependsOn-and-installsAfter/local-simple/.devcontainer/devcontainer.json": Order(
        [("./c", {"magicNumber": "321"}), ("./a", {})]
    ),
    "feature-dependencies/dependsOn/invalid-circular/.devcontainer/devcontainer.json": Fails(
        'form a cycle: ./b, which must install after ./c {"magicNumber": "50"}, which must install after ./a '
        '{"magicNumber": "50"}, which must install after ./b'
    ),
    "feature-dependencies/dependsOn/local-simple/.devcontainer/devcontainer.json": Order(
        [("./b", {"magicNumber": "50"}), ("./a", {})]
    ),
    # The spec sorts a round by the greatest number of user-given options first; the reference CLI sorts the
    # fewest first (its own test puts ./b {} first; devcontainers/cli#1267 flips it to the spec's order).
    "feature-dependencies/dependsOn/local-with-options/.devcontainer/devcontainer.json": Order(
        [
            ("./b", {"optA": "a", "optB": "a"}),
            ("./b", {"optA": "a", "optB": "b"}),
            ("./b", {"optA": "b", "optB": "a"}),
            ("./b", {"optA": "b", "optB": "b"}),
            ("./b", {}),
            ("./d", {}),
            ("./e", {}),
            ("./c", {}),
            ("./a", {"optA": "a", "optB": "b"}),
        ]
    ),
    "feature-dependencies/dependsOn/oci-ab/.devcontainer/devcontainer.json": References(),
    "feature-dependencies/dependsOn/oci-fgh/.devcontainer/devcontainer.json": References(),
    "feature-dependencies/dependsOn/oci-ij/.devcontainer/devcontainer.json": References(),
    "feature-dependencies/dependsOn/tgz-ab/.devcontainer/devcontainer.json": References(),
    "feature-dependencies/installsAfter/invalid-circular/.devcontainer/devcontainer.json": Fails(
        "form a cycle: ./a, which must install after ./b, which must install after ./c, which must install after ./a"
    ),
    "feature-dependencies/installsAfter/local-simple/.devcontainer/devcontainer.json": Order(
        [("./c", {"magicNumber": "321"}), ("./a", {})]
    ),
    "feature-dependencies/overrideFeatureInstallOrder/image-with-v1-features-with-overrideFeatureInstallOrder"
    "/.devcontainer/devcontainer.json": Fails(LEGACY_TERRAFORM),
    "feature-dependencies/overrideFeatureInstallOrder/image-with-v2-features-with-overrideFeatureInstallOrder"
    "/.devcontainer/devcontainer.json": References(),
    "feature-dependencies/overrideFeatureInstallOrder/local-intermediate/.devcontainer/devcontainer.json": Order(
        [("./c", {}), ("./d", {}), ("./b", {}), ("./a", {})]
    ),
    "feature-dependencies/overrideFeatureInstallOrder/local-roundPriority/.devcontainer/devcontainer.json": Order(
        [("./a", {}), ("./b", {}), ("./c", {})]
    ),
    "feature-dependencies/overrideFeatureInstallOrder/local-simple/.devcontainer/devcontainer.json": Order(
        [("./c", {}), ("./b", {}), ("./d", {}), ("./a", {})]
    ),
    # ./a dependsOn ghcr.io/codspace/dependson/b, which cannot be fetched here.
    "feature-dependencies/overrideFeatureInstallOrder/mixed/.devcontainer/devcontainer.json": References(),
    "image-with-v1-features-node-python-local-cache/.devcontainer.json": Fails(
        "the v1 Feature id 'node' is no longer supported: use \"ghcr.io/devcontainers/features/node:1\""
    ),
    "image-with-v2-tarball/.devcontainer.json": References(),
    "invalid-configs/dockerfile-with-v2-local-features-no-dev-container-folder/.devcontainer.json": Fails(
        "the local Feature './local-features/localFeatureA' is not inside the project's .devcontainer folder"
    ),
    "invalid-configs/invalid-v1-features/.devcontainer.json": Fails(
        "'devcontainers/features/myfakefeature' is a v1 Feature reference (a GitHub release), which is no longer "
        'supported: use "ghcr.io/devcontainers/features/myfakefeature:1"'
    ),
    # A well-formed reference to a Feature that does not exist: only a fetch can tell.
    "invalid-configs/invalid-v2-features/.devcontainer.json": References(),
    "lifecycle-hooks-advanced/.devcontainer/devcontainer.json": Order([("./otter", {}), ("./rabbit", {})]),
    "lifecycle-hooks-inline-commands/.devcontainer/devcontainer.json": Order([("./panda", {}), ("./tiger", {})]),
    "lifecycle-hooks-resume-existing-container/.devcontainer/devcontainer.json": Order([("./hippo", {})]),
    "lockfile/.devcontainer.json": References(),
    "lockfile-dependson/.devcontainer.json": References(),
    "lockfile-frozen/.devcontainer.json": References(),
    "lockfile-frozen-no-lockfile/.devcontainer.json": References(),
    "lockfile-generate-from-empty-file/.devcontainer/devcontainer.json": References(),
    "lockfile-generate-from-empty-file-frozen/.devcontainer/devcontainer.json": References(),
    "lockfile-no-lockfile/.devcontainer.json": References(),
    "lockfile-oci-integrity/.devcontainer.json": References(),
    "lockfile-outdated/.devcontainer.json": References(),
    # The first reference that fails: a local Feature beside, not inside, .devcontainer (terraform would be next).
    "lockfile-outdated-command/.devcontainer.json": Fails(
        "the local Feature './features/mylocalfeature2' is not inside the project's .devcontainer folder"
    ),
    "lockfile-tarball-integrity/.devcontainer.json": References(),
    "lockfile-upgrade-command/.devcontainer.json": References(),
    "lockfile-upgrade-feature/expected.devcontainer.json": References(),
    "lockfile-upgrade-feature/input.devcontainer.json": References(),
    "registry-compatibility/azure-anonymous/.devcontainer.json": References(),
    "registry-compatibility/azure-registry-scoped/.devcontainer.json": References(),
    "registry-compatibility/github-anonymous/.devcontainer.json": References(),
    "registry-compatibility/github-private/.devcontainer.json": References(),
}


def corpus_configs() -> list[str]:
    found = [
        path.relative_to(CORPUS).as_posix()
        for path in CORPUS.rglob("*.json")
        if path.name in ("devcontainer.json", ".devcontainer.json") or path.name.endswith(".devcontainer.json")
    ]
    return sorted(found)


def test_every_config_of_the_corpus_has_an_expectation() -> None:
    if not CORPUS.is_dir():
        pytest.skip(f"the conformance corpus is not at {CORPUS}")
    assert corpus_configs() == sorted(EXPECTED)


async def check(config_file: Path, text: str) -> list[tuple[str, dict[str, Any]]] | None:
    """The resolved order of a config's Features when every one is local, else ``None`` once its references
    parse."""
    config, positions = jsonc.parse_with_positions(text, source=str(config_file))
    where = features.Location(str(config_file), positions, ("features",))
    users = features.parse_user_features(config.get("features", {}), config_file=config_file, location=where)
    if not all(isinstance(user.reference, features.LocalReference) for user in users):
        return None
    try:
        resolved = await features.resolve_features(
            config["features"],
            config_file=config_file,
            source=features.LocalFeatureSource(),
            override_order=config.get("overrideFeatureInstallOrder", []),
            positions=positions,
        )
    except ConfigError as exc:
        if "this check fetches nothing" in str(exc):
            return None
        raise
    return [(str(feature.reference), dict(feature.user_options)) for feature in resolved]


@pytest.mark.parametrize("name", sorted(EXPECTED))
async def test_config(name: str) -> None:
    config_file = CORPUS / name
    if not config_file.is_file():
        pytest.skip(f"{config_file} is not in the corpus")
    expectation = EXPECTED[name]
    if isinstance(expectation, Fails):
        with pytest.raises(ConfigError) as raised:
            await check(config_file, config_file.read_text(encoding="utf-8"))
        assert expectation.message in raised.value.message
        # Each of these is a mistake in the devcontainer.json: the error says where.
        assert raised.value.source == str(config_file)
        assert raised.value.line is not None
        return
    result = await check(config_file, config_file.read_text(encoding="utf-8"))
    if isinstance(expectation, Order):
        assert result == expectation.expected
    else:
        assert result is None


async def test_lifecycle_hooks_of_local_features_are_contributed() -> None:
    config_file = CORPUS / "lifecycle-hooks-advanced/.devcontainer/devcontainer.json"
    if not config_file.is_file():
        pytest.skip(f"{config_file} is not in the corpus")
    resolved = await features.resolve_features(
        {"./otter": {}, "./rabbit": {}}, config_file=config_file, source=features.LocalFeatureSource()
    )
    otter = features.metadata_entry(resolved[0])
    assert otter["id"] == "./otter"
    assert otter["onCreateCommand"] == "/usr/features/otter/helper_script.sh onCreateCommand"
    assert otter["postCreateCommand"] == {
        "parallel1": "/usr/features/otter/helper_script.sh parallel_postCreateCommand_1",
        "parallel2": ["/usr/features/otter/helper_script.sh", "parallel_postCreateCommand_2"],
    }
    assert set(otter) == {"id", *features.LIFECYCLE_HOOKS}
