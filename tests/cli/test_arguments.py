"""The CLI's pieces that need no server: the config file, resolving server and token, parameter types,
error messages, and telling a git URL from a folder."""

from __future__ import annotations

import stat
from pathlib import Path

import click
import pytest

from devyard.cli import _config
from devyard.cli._invocation import Invocation, describe_api_error
from devyard.cli._param_types import DURATION, KEY_VALUE, SIZE_GIB, SIZE_MIB
from devyard.cli._render import age
from devyard.cli._waiting import describe_status
from devyard.cli.environments import content_from_context, is_git_url
from devyard.client import ApiError


@pytest.fixture
def config_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    return tmp_path / "config"


def test_config_lives_under_xdg_config_home_and_only_its_owner_reads_it(config_home: Path) -> None:
    config = _config.Config(current_profile="work", profiles={"work": _config.Profile("https://a.example", "t1")})
    path = _config.save(config)
    assert path == config_home / "devyard" / "config.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert _config.load() == config


def test_config_defaults_to_dot_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert _config.config_path() == tmp_path / ".config" / "devyard" / "config.json"


def test_a_missing_config_is_empty(config_home: Path) -> None:
    assert _config.load() == _config.Config()


def test_a_broken_config_is_a_clear_error(config_home: Path) -> None:
    path = config_home / "devyard" / "config.json"
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    with pytest.raises(click.ClickException, match=r"cannot read the config file .*config\.json"):
        _config.load()
    path.write_text("[1, 2]")
    with pytest.raises(click.ClickException, match="not a devyard config"):
        _config.load()


def _save(**profiles: _config.Profile) -> None:
    _config.save(_config.Config(current_profile=next(iter(profiles)), profiles=dict(profiles)))


def test_flags_and_variables_win_over_the_config(config_home: Path) -> None:
    _save(default=_config.Profile("https://saved.example", "saved-token"))
    assert Invocation.resolve(None, None, None).server == "https://saved.example"
    assert Invocation.resolve(None, None, None).token == "saved-token"
    assert Invocation.resolve(None, "given", None).token == "given"
    both = Invocation.resolve("https://other.example/", "given", None)
    assert (both.server, both.token) == ("https://other.example", "given")


def test_a_saved_token_is_never_sent_to_another_server(config_home: Path) -> None:
    _save(default=_config.Profile("https://saved.example", "saved-token"))
    assert Invocation.resolve("https://other.example", None, None).token is None
    assert Invocation.resolve("https://saved.example/", None, None).token == "saved-token"


def test_profiles(config_home: Path) -> None:
    _save(work=_config.Profile("https://work.example", "w"), local=_config.Profile("http://127.0.0.1:1", "l"))
    assert Invocation.resolve(None, None, None).server == "https://work.example"
    assert Invocation.resolve(None, None, "local").token == "l"
    with pytest.raises(click.ClickException, match="no profile 'nope'"):
        Invocation.resolve(None, None, "nope")


def test_no_server_anywhere_says_how_to_get_one(config_home: Path) -> None:
    invocation = Invocation.resolve(None, None, None)
    with pytest.raises(click.ClickException, match="devyard login --server URL"):
        invocation.client()


@pytest.mark.parametrize(
    ("text", "seconds"), [("90", 90), ("90s", 90), ("30m", 1800), ("1.5h", 5400), ("2d", 172800), (" 5 m ", 300)]
)
def test_durations(text: str, seconds: float) -> None:
    assert DURATION.convert(text, None, None) == seconds


@pytest.mark.parametrize("text", ["", "m", "5 weeks", "-1s", "1h30m"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(click.BadParameter, match="is not a duration"):
        DURATION.convert(text, None, None)


def test_sizes() -> None:
    assert SIZE_MIB.convert("4GiB", None, None) == 4096
    assert SIZE_MIB.convert("512", None, None) == 512
    assert SIZE_MIB.convert("1.5g", None, None) == 1536
    assert SIZE_GIB.convert("30", None, None) == 30
    assert SIZE_GIB.convert("1TiB", None, None) == 1024
    with pytest.raises(click.BadParameter, match="whole number of GiB"):
        SIZE_GIB.convert("512MiB", None, None)
    with pytest.raises(click.BadParameter, match="is not a size"):
        SIZE_MIB.convert("lots", None, None)


def test_key_values() -> None:
    assert KEY_VALUE.convert("A=b=c", None, None) == ("A", "b=c")
    assert KEY_VALUE.convert("EMPTY=", None, None) == ("EMPTY", "")
    with pytest.raises(click.BadParameter, match="is not KEY=VALUE"):
        KEY_VALUE.convert("=x", None, None)


@pytest.mark.parametrize(
    "context",
    [
        "https://github.com/gitpod-io/empty",
        "ssh://git@host/repo.git",
        "git@github.com:owner/repo.git",
        "file:///srv/repo",
    ],
)
def test_git_urls(context: str) -> None:
    assert is_git_url(context)
    content = content_from_context(context, ref="main")
    assert content.git is not None
    assert (content.git.url, content.git.ref) == (context, "main")


@pytest.mark.parametrize(
    ("pasted", "url", "ref"),
    [
        ("https://github.com/o/r/tree/feature/deep", "https://github.com/o/r", "feature/deep"),
        ("github.com/o/r", "https://github.com/o/r", None),
        ("https://gitlab.com/g/sub/r/-/tree/dev", "https://gitlab.com/g/sub/r", "dev"),
        ("https://github.com/o/r.git#v1.2", "https://github.com/o/r.git", "v1.2"),
    ],
)
def test_what_people_paste_becomes_a_url_and_a_ref(pasted: str, url: str, ref: str | None) -> None:
    content = content_from_context(pasted)
    assert content.git is not None
    assert (content.git.url.removesuffix(".git"), content.git.ref) == (url.removesuffix(".git"), ref)


def test_a_pasted_ref_and_ref_option_must_agree() -> None:
    with pytest.raises(click.BadParameter, match="disagree"):
        content_from_context("https://github.com/o/r/tree/main", ref="dev")
    with pytest.raises(click.BadParameter, match="user name or password"):
        content_from_context("https://me:secret@github.com/o/r.git")


def test_a_folder_becomes_its_absolute_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "repo").mkdir()
    monkeypatch.chdir(tmp_path)
    assert content_from_context("repo").local_path == str(tmp_path / "repo")
    assert content_from_context(".").local_path == str(tmp_path)


def test_neither_folder_nor_url(tmp_path: Path) -> None:
    with pytest.raises(click.BadParameter, match="neither a folder nor a git URL"):
        content_from_context(str(tmp_path / "absent"))
    with pytest.raises(click.BadParameter, match="git URL only"):
        content_from_context(str(tmp_path), ref="main")


def test_api_errors_read_as_one_line() -> None:
    refused = describe_api_error(ApiError(401, "unauthenticated", "the credential is not valid"))
    assert "refused the credential" in refused and "devyard login" in refused
    assert "none is configured" in describe_api_error(ApiError(401, "unauthenticated", "x"), has_token=False)
    invalid = ApiError(
        422,
        "validation_failed",
        "the body is not valid",
        [{"loc": ["body", "metadata", "name"], "msg": "String should match pattern"}],
    )
    assert describe_api_error(invalid) == (
        "the body is not valid (validation_failed): body.metadata.name: String should match pattern"
    )
    assert describe_api_error(ApiError(404, "not_found", "no environment env_x")) == "no environment env_x (not_found)"
    for error in (refused, describe_api_error(invalid)):
        assert "\n" not in error


def test_status_in_one_line() -> None:
    environment = {
        "status": {
            "phase": "pending",
            "message": "waiting for a runner",
            "conditions": [
                {"type": "Scheduled", "status": "False", "reason": "NoRunner", "message": "no runner offers cls_x"},
                {"type": "Other", "status": "True", "reason": "Fine"},
            ],
        }
    }
    assert describe_status(environment) == (
        "phase pending; waiting for a runner; conditions: Scheduled=False (NoRunner: no runner offers cls_x)"
    )


def test_ages() -> None:
    from datetime import UTC, datetime, timedelta

    now = datetime(2026, 1, 2, tzinfo=UTC)
    assert age(now - timedelta(seconds=42), now) == "42s"
    assert age(now - timedelta(minutes=5, seconds=3), now) == "5m"
    assert age(now - timedelta(days=3, hours=1), now) == "3d"
    assert age(None, now) == ""
