"""``parse_git_context``: every form people paste becomes a clone URL and a ref, and bad input a clear error;
``GitContent`` refuses what must never reach git."""

from __future__ import annotations

import re

import pytest
from pydantic import ValidationError

from devyard.wire.environments import GitContent
from devyard.wire.git_context import GitContext, parse_git_context

SHA = "0123456789abcdef0123456789abcdef01234567"

# fmt: off
FORMS = [
    ("https://github.com/acme/app.git", "https://github.com/acme/app.git", None),
    ("https://github.com/acme/app", "https://github.com/acme/app", None),
    ("https://github.com/acme/app/", "https://github.com/acme/app", None),
    ("  https://github.com/acme/app  ", "https://github.com/acme/app", None),
    ("https://github.com/acme/app/tree/main", "https://github.com/acme/app.git", "main"),
    ("https://github.com/acme/app/tree/feature/login/form", "https://github.com/acme/app.git", "feature/login/form"),
    (f"https://github.com/acme/app/commit/{SHA}", "https://github.com/acme/app.git", SHA),
    ("https://github.com/acme/app/releases/tag/v1.2.0", "https://github.com/acme/app.git", "v1.2.0"),
    ("https://gitlab.com/group/sub/app/-/tree/fix/a?ref_type=heads", "https://gitlab.com/group/sub/app.git", "fix/a"),
    (f"https://gitlab.com/group/app/-/commit/{SHA}", "https://gitlab.com/group/app.git", SHA),
    ("https://gitlab.com/group/app/-/tags/v2", "https://gitlab.com/group/app.git", "v2"),
    ("https://gitlab.com/group/sub/app", "https://gitlab.com/group/sub/app", None),
    ("https://bitbucket.org/acme/app/src/develop", "https://bitbucket.org/acme/app.git", "develop"),
    ("https://bitbucket.org/acme/app/src/release/2", "https://bitbucket.org/acme/app.git", "release/2"),
    ("https://codeberg.org/acme/app/src/branch/main", "https://codeberg.org/acme/app.git", "main"),
    ("github.com/acme/app", "https://github.com/acme/app", None),
    ("github.com/acme/app/tree/dev", "https://github.com/acme/app.git", "dev"),
    ("git.example.com:8443/acme/app.git", "https://git.example.com:8443/acme/app.git", None),
    ("git@github.com:acme/app.git", "git@github.com:acme/app.git", None),
    ("git@github.com:acme/app.git#dev", "git@github.com:acme/app.git", "dev"),
    ("ssh://git@git.example.com:2222/acme/app.git", "ssh://git@git.example.com:2222/acme/app.git", None),
    ("https://github.com/acme/app.git#v1.0", "https://github.com/acme/app.git", "v1.0"),
    ("https://github.com/acme/app#feature/x", "https://github.com/acme/app", "feature/x"),
    ("http://127.0.0.1:8080/app.git", "http://127.0.0.1:8080/app.git", None),
]
# fmt: on


@pytest.mark.parametrize(("text", "url", "ref"), FORMS, ids=[form[0].strip() for form in FORMS])
def test_each_form_becomes_a_clone_url_and_a_ref(text: str, url: str, ref: str | None) -> None:
    assert parse_git_context(text) == GitContext(url, ref)


# fmt: off
BAD = [
    ("", "empty"),
    ("   ", "empty"),
    ("https://github.com/acme/my app", "white space"),
    ("ftp://example.com/acme/app.git", "ftp: URLs are not supported"),
    ("ftp:acme/app", "ftp: URLs are not supported"),
    ("https://alice:hunter2@github.com/acme/app.git", "git-credential secret for github.com"),
    ("https://ghp_token@github.com/acme/app.git", "git-credential secret for github.com"),
    ("ssh://git:hunter2@github.com/acme/app.git", "git-credential secret"),
    ("acme/app", "not a git URL"),
    ("https://github.com/", "names no repository"),
    ("https://github.com/acme/app/tree/", "names no branch"),
    ("https://github.com/acme/app#", "no ref after it"),
    ("https://github.com/acme/app#a..b", "not a valid branch"),
    ("https://github.com/acme/app#-x", "not a valid branch"),
    ("https://github.com/acme/app/tree/dev#main", "two refs"),
    ("file:///srv/app.git", "only a desktop runner"),
    ("/home/me/app", "only a desktop runner"),
]
# fmt: on


@pytest.mark.parametrize(("text", "words"), BAD, ids=[bad[0] or "nothing" for bad in BAD])
def test_bad_input_is_a_clear_error(text: str, words: str) -> None:
    with pytest.raises(ValueError, match=re.escape(words)) as caught:
        parse_git_context(text)
    assert "hunter2" not in str(caught.value) and "ghp_token" not in str(caught.value)


def test_local_content_where_the_caller_allows_it() -> None:
    assert parse_git_context("file:///srv/app.git", allow_local=True) == GitContext("file:///srv/app.git")
    assert parse_git_context("/home/me/app#dev", allow_local=True) == GitContext("file:///home/me/app", "dev")


def test_git_content_refuses_credentials_bad_refs_and_unknown_filters() -> None:
    content = GitContent(url="https://github.com/acme/app.git", ref="main", depth=1, filter="blob:none")
    assert (content.depth, content.filter) == (1, "blob:none")
    assert GitContent(url="file:///srv/app.git").url == "file:///srv/app.git"  # the runner decides
    with pytest.raises(ValidationError, match="git-credential secret"):
        GitContent(url="https://alice:hunter2@github.com/acme/app.git")
    with pytest.raises(ValidationError, match="not a valid branch"):
        GitContent(url="https://github.com/acme/app.git", ref="--upload-pack=x")
    with pytest.raises(ValidationError, match="not a partial-clone filter"):
        GitContent(url="https://github.com/acme/app.git", filter="sparse:oid=x")
    with pytest.raises(ValidationError, match="greater than or equal to 1"):
        GitContent(url="https://github.com/acme/app.git", depth=0)
