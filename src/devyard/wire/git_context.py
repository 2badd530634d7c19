"""What people paste as an environment's context, read as a git clone URL and an optional ref.

The CLI (``devyard env create CONTEXT``, ``devyard up``) calls ``parse_git_context`` to turn what a user copied
from a browser or a clone button into ``content.git``; the wire's ``GitContent`` and the runner's content
fetcher call ``check_git_url`` and ``check_ref`` to refuse what must never reach git. Pure functions: no I/O.

Forms understood::

    https://HOST/OWNER/REPO[.git]              a clone URL (any depth of groups, as on GitLab)
    https://HOST/OWNER/REPO/tree/BRANCH/WITH/SLASHES   GitHub, Gitea: the rest of the path is the ref
    https://HOST/OWNER/REPO/commit/SHA         also /commits/SHA (Bitbucket)
    https://HOST/OWNER/REPO/releases/tag/TAG   GitHub; /tags/TAG too
    https://HOST/GROUP/REPO/-/tree/BRANCH      GitLab (also -/commit/SHA, -/tags/TAG)
    https://HOST/OWNER/REPO/src/BRANCH         Bitbucket (Gitea's src/branch|tag|commit/REF elsewhere)
    HOST/OWNER/REPO...                         any of the above without the scheme: https is meant
    git@HOST:OWNER/REPO.git, ssh://[USER@]HOST[:PORT]/PATH
    ANY-OF-THE-ABOVE#REF
    file:///PATH, /PATH                        only where the caller allows local content (a desktop runner)

A URL carrying a password or token (``https://user:token@host/...``) is refused: credentials belong in a
git-credential secret, never in a URL that is stored, logged and written to ``.git/config``.
"""

from __future__ import annotations

import re
import urllib.parse
from dataclasses import dataclass
from typing import Final

__all__ = [
    "GitContext",
    "check_git_url",
    "check_partial_clone_filter",
    "check_ref",
    "check_url_is_safe",
    "is_local_git_url",
    "parse_git_context",
]

#: A host name, an IPv4 address or a bracketed IPv6 address, with an optional port.
_HOST: Final = re.compile(
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9-]+)*|\[[0-9A-Fa-f:.]+\])(?::\d{1,5})?"
)
#: ``user@host:path``, git's scp-like syntax for ssh (the user is an ssh login, never a secret).
_SCP: Final = re.compile(r"(?P<user>[A-Za-z0-9._-]+)@(?P<host>[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\]):(?P<path>[^/].*)")
_SCHEME: Final = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*):")
_SUPPORTED_SCHEMES: Final = ("https", "http", "ssh", "git", "file")
#: Characters and sequences git refuses in a ref name (``git check-ref-format``), plus what a shell or an
#: argument list could misread.
_BAD_REF: Final = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]|\.\.|@\{|//|/\.|\.lock(?:/|$)")
_PARTIAL_CLONE_FILTER: Final = re.compile(r"blob:none|tree:0|blob:limit=[0-9]{1,12}[kmg]?")
_CREDENTIAL_ADVICE: Final = (
    "remove the credentials from the URL and add a git-credential secret for {host} instead "
    "(devyard secret create NAME --type git_credential --target {host})"
)


@dataclass(frozen=True)
class GitContext:
    """A repository to clone and, when the context named one, the branch, tag or commit to check out."""

    url: str
    ref: str | None = None


def parse_git_context(text: str, *, allow_local: bool = False) -> GitContext:
    """Read ``text`` (see the module's forms) as a clone URL and a ref; ``allow_local`` admits ``file://`` URLs
    and absolute paths (as ``file://`` URLs), which only a desktop runner may fetch. Raises ValueError with a
    message for the user on anything else."""
    context = text.strip()
    if not context:
        raise ValueError("the context is empty: give a git URL such as https://github.com/OWNER/REPO")
    if any(character.isspace() for character in context):
        raise ValueError(f"{context!r} holds white space; a git URL has none (quote a path, or encode it as %20)")
    context, hash_sign, fragment = context.partition("#")
    fragment_ref = _ref_or_none(fragment, context) if hash_sign else None
    if hash_sign and fragment_ref is None:
        raise ValueError(f"{text.strip()!r} ends in '#' with no ref after it")
    if context.startswith("/"):
        if not allow_local:
            raise ValueError(f"{context!r} is a local path; only a desktop runner (devyard up) may use one")
        return GitContext("file://" + urllib.parse.quote(context), fragment_ref)
    scp = _SCP.fullmatch(context)
    if scp is not None and _SCHEME.match(context) is None:
        return GitContext(context, fragment_ref)
    scheme_match = _SCHEME.match(context)
    if scheme_match is None or not context[scheme_match.end() :].startswith("//"):
        if "/" in context and _looks_like_host(context.split("/", 1)[0]):
            context = "https://" + context
        elif scheme_match is not None and scheme_match["scheme"].lower() not in _SUPPORTED_SCHEMES:
            raise ValueError(_unsupported_scheme(scheme_match["scheme"]))
        else:
            raise ValueError(
                f"{context!r} is not a git URL: give https://HOST/OWNER/REPO, HOST/OWNER/REPO or git@HOST:OWNER/REPO"
            )
    scheme = context.split(":", 1)[0].lower()
    if scheme not in _SUPPORTED_SCHEMES:
        raise ValueError(_unsupported_scheme(scheme))
    if scheme == "file":
        if not allow_local:
            raise ValueError(
                "file:// URLs are local to the runner's host; only a desktop runner (devyard up) may use one"
            )
        return GitContext(context, fragment_ref)
    url, path_ref = _split_web_url(context) if scheme in ("https", "http") else (context, None)
    check_git_url(url, allow_local=allow_local)
    if path_ref is not None and fragment_ref is not None and path_ref != fragment_ref:
        raise ValueError(f"{text.strip()!r} names two refs, {path_ref!r} in the path and {fragment_ref!r} after '#'")
    return GitContext(url, path_ref or fragment_ref)


def check_git_url(url: str, *, allow_local: bool = False) -> None:
    """Refuse a clone URL git must not be given: white space, an unsupported scheme, credentials in it, a
    missing host or path, and a local one (``file://``, a path) unless ``allow_local``. Raises ValueError."""
    check_url_is_safe(url)
    if url.startswith("/") or is_local_git_url(url):
        if not allow_local:
            raise ValueError(f"{url!r} is local to the runner's host; only a desktop runner (devyard up) may use it")
        return
    if _SCHEME.match(url) is None or "://" not in url:
        scp = _SCP.fullmatch(url)
        if scp is None:
            raise ValueError(f"{url!r} is not a git URL: give https://HOST/OWNER/REPO or git@HOST:OWNER/REPO")
        return
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in _SUPPORTED_SCHEMES:
        raise ValueError(_unsupported_scheme(scheme))
    host = parts.netloc.rpartition("@")[2]
    if not host or not _HOST.fullmatch(host):
        raise ValueError(f"{url!r} has no valid host")
    if parts.path.strip("/") == "":
        raise ValueError(f"{url!r} names no repository: give https://{host}/OWNER/REPO")


def check_url_is_safe(url: str) -> None:
    """The least a stored clone URL must be (the wire's ``GitContent`` checks it; the runner checks the rest with
    ``check_git_url``): no white space or control characters, no leading ``-`` that git would read as an option,
    and no credentials. Raises ValueError."""
    if not url or any(character.isspace() or ord(character) < 0x20 or ord(character) == 0x7F for character in url):
        raise ValueError(f"{url!r} is not a git URL: it is empty or holds white space or control characters")
    if url.startswith("-"):
        raise ValueError(f"{url!r} is not a git URL")
    if "://" not in url:
        return
    parts = urllib.parse.urlsplit(url)
    if "@" in parts.netloc and (parts.scheme.lower() in ("https", "http") or parts.password is not None):
        host = parts.netloc.rpartition("@")[2]
        raise ValueError(
            f"a git URL must not carry a user name or password ({_without_userinfo(url)}): "
            + _CREDENTIAL_ADVICE.format(host=host)
        )


def check_partial_clone_filter(spec: str) -> None:
    """Refuse a partial-clone filter other than those servers commonly allow: ``blob:none``, ``tree:0``,
    ``blob:limit=SIZE`` (``1m``, ``500k``). Raises ValueError."""
    if not _PARTIAL_CLONE_FILTER.fullmatch(spec):
        raise ValueError(f"{spec!r} is not a partial-clone filter: use blob:none, tree:0 or blob:limit=SIZE (as 1m)")


def check_ref(ref: str) -> None:
    """Refuse a ref git would refuse or an argument list could misread (``-x``, ``a..b``, spaces). Raises
    ValueError."""
    if not ref:
        raise ValueError("a ref is a branch, tag or commit: it cannot be empty")
    if ref.startswith(("-", "/", ".")) or ref.endswith(("/", ".")) or _BAD_REF.search(ref) or ref == "@":
        raise ValueError(f"{ref!r} is not a valid branch, tag or commit name")


def is_local_git_url(url: str) -> bool:
    """Whether ``url`` names a repository on the runner's own host (``file://``), which only a desktop runner
    may fetch."""
    return url[:7].lower() == "file://"


def _split_web_url(url: str) -> tuple[str, str | None]:
    """A browser's URL of a repository page as (clone URL, ref); a clone URL as itself and None."""
    parts = urllib.parse.urlsplit(url)
    segments = [urllib.parse.unquote(segment) for segment in parts.path.split("/") if segment]
    host = parts.netloc.rpartition("@")[2].lower()
    found = _find_ref(segments, host)
    if found is None:
        path = parts.path.rstrip("/")
        return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, parts.query, "")), None
    repository, ref = found
    if len(repository) < 2:
        raise ValueError(f"{url!r} names no repository: give https://{host}/OWNER/REPO")
    if not ref:
        raise ValueError(f"{url!r} names no branch, tag or commit after {segments[len(repository)]!r}")
    check_ref(ref)
    name = "/".join(urllib.parse.quote(segment) for segment in repository)
    if not name.endswith(".git"):
        name += ".git"
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, "/" + name, "", "")), ref


def _find_ref(segments: list[str], host: str) -> tuple[list[str], str] | None:
    """Where a repository's path ends and what ref the rest names, or None for a plain repository path."""
    if "-" in segments:  # GitLab: /GROUP/.../REPO/-/tree/REF
        marker = segments.index("-")
        rest = segments[marker + 1 :]
        if len(rest) >= 1 and rest[0] in ("tree", "commit", "commits", "tags", "blob"):
            return segments[:marker], "/".join(rest[1:])
        return None
    if len(segments) < 3:
        return None
    repository, kind, rest = segments[:2], segments[2], segments[3:]
    if kind in ("tree", "commit", "commits", "tags"):
        return repository, "/".join(rest)
    if kind == "releases" and rest[:1] == ["tag"]:
        return repository, "/".join(rest[1:])
    if kind == "src":
        if host != "bitbucket.org" and len(rest) >= 2 and rest[0] in ("branch", "tag", "commit"):
            return repository, "/".join(rest[1:])  # Gitea, Forgejo
        return repository, "/".join(rest)
    return None


def _ref_or_none(text: str, context: str) -> str | None:
    if not text:
        return None
    ref = urllib.parse.unquote(text)
    try:
        check_ref(ref)
    except ValueError as exc:
        raise ValueError(f"{context}#{text}: {exc}") from None
    return ref


def _looks_like_host(text: str) -> bool:
    """A first path segment that is a host (``github.com``, ``git.example:8443``, ``localhost``), not a name
    (``owner/repo`` names no host)."""
    return bool(_HOST.fullmatch(text)) and ("." in text or ":" in text or text.lower() == "localhost")


def _unsupported_scheme(scheme: str) -> str:
    return f"{scheme}: URLs are not supported: give an https:// or ssh:// URL, or git@HOST:OWNER/REPO"


def _without_userinfo(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, parts.query, ""))
