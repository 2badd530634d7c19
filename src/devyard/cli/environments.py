"""``devyard env``: create, list, show, start, stop, delete environments, and run commands in them.

Start and stop set ``spec.desired_phase``; the runner does the work, and ``--wait`` follows it there. ``exec``
asks the management plane for an access ticket and runs the command through the runner's gateway
(``_exec_session``). ``create ... -- CMD`` does all three in one process, as ``docker run IMAGE CMD`` does: it
creates, watches from the create's answer until Running, asks for the ticket at once and runs CMD.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Final, NoReturn

import click

from devyard.cli import _render
from devyard.cli._invocation import Invocation, api_command
from devyard.cli._lazy_group import LazyGroup
from devyard.cli._param_types import DURATION, KEY_VALUE

if TYPE_CHECKING:
    from rich.console import RenderableType

    from devyard.wire.environments import ContentSpec, Environment

__all__ = ["content_from_context", "env", "render_environment", "wait_and_emit"]

# Patterns, not compiled ones: ``re`` compiles (and caches) them on first use, which ``env create --image`` and
# ``env exec`` never come to; compiling them as the module loads cost every command of this module a millisecond.
_URL_PATTERN: Final = r"^[a-z][a-z0-9+.-]*://"
_SCP_PATTERN: Final = r"^[\w.-]+@[\w.-]+:"
DEFAULT_WAIT: Final = 600.0

_wait_options = [
    click.option("--wait", is_flag=True, help="Return only once the runner is done (or it failed)."),
    click.option(
        "--wait-timeout", type=DURATION, default=DEFAULT_WAIT, show_default="10m", help="How long --wait waits."
    ),
]


def wait_options(function: Any) -> Any:
    for option in reversed(_wait_options):
        function = option(function)
    return function


#: The subcommands of other modules, imported when they run or ``env --help`` lists them: ``env create`` and ``env
#: exec`` need none of them (ports' subprocess and shutil, among others).
_ELSEWHERE: Final = {
    "logs": "devyard.cli.logs:logs",
    "open": "devyard.cli.ssh:open_environment",
    "port": "devyard.cli.ports:port",
    "ssh": "devyard.cli.ssh:ssh",
    "ssh-config": "devyard.cli.ssh:ssh_config",
}


@click.group(cls=LazyGroup, lazy_commands=_ELSEWHERE)
def env() -> None:
    """Create, list, show, start, stop and delete environments.

    ENVIRONMENT is an environment's id (env_...) or its name.
    """


def is_git_url(context: str) -> bool:
    return bool(re.match(_URL_PATTERN, context, re.IGNORECASE) or re.match(_SCP_PATTERN, context))


def content_from_context(context: str, ref: str | None = None) -> ContentSpec:
    """A git URL becomes ``content.git``; anything else must be a local folder and becomes ``local_path``."""
    from devyard.wire.environments import ContentSpec

    return ContentSpec.model_validate(_content_json(context, ref))


def _dotfiles_json(text: str) -> dict[str, Any]:
    """A dotfiles repository as the API's JSON: what people paste of a git URL, or a local folder (as a
    ``file://`` URL, which only a desktop runner fetches)."""
    from pathlib import Path

    from devyard.wire import git_context

    folder = Path(text).expanduser()
    try:
        parsed = git_context.parse_git_context(str(folder.resolve()) if folder.is_dir() else text, allow_local=True)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--dotfiles") from None
    return {"url": parsed.url, "ref": parsed.ref}


def _content_json(context: str, ref: str | None) -> dict[str, Any]:
    """``content_from_context`` as the API's JSON, without pydantic (``env create`` must start fast). A folder
    that exists is a folder; anything else is read as what people paste of a repository (a clone URL, a
    ``.../tree/BRANCH`` page, ``HOST/OWNER/REPO``, ``git@HOST:OWNER/REPO``, ``URL#REF``)."""
    from pathlib import Path

    folder = Path(context).expanduser()
    if not is_git_url(context) and (folder.is_dir() or context.startswith(("/", ".", "~"))):
        if not folder.is_dir():
            raise click.BadParameter(f"{context!r} is neither a folder nor a git URL", param_hint="CONTEXT")
        if ref is not None:
            raise click.BadParameter("--ref applies to a git URL only", param_hint="--ref")
        return {"local_path": str(folder.resolve())}
    from devyard.wire import git_context

    try:
        parsed = git_context.parse_git_context(context, allow_local=True)
    except ValueError as exc:
        if not is_git_url(context) and "/" not in context:
            raise click.BadParameter(f"{context!r} is neither a folder nor a git URL", param_hint="CONTEXT") from None
        raise click.BadParameter(str(exc), param_hint="CONTEXT") from None
    if ref is not None and parsed.ref is not None and ref != parsed.ref:
        raise click.BadParameter(
            f"--ref {ref} and the ref in {context!r} ({parsed.ref}) disagree: give one of them", param_hint="--ref"
        )
    return {"git": {"url": parsed.url, "ref": ref or parsed.ref}}


#: Where ``_CreateCommand`` leaves the words after ``--`` for ``create_environment``.
_COMMAND_AFTER_DASHES: Final = "devyard.command"


class _CreateCommand(click.Command):
    """``env create``: the words after ``--`` are the command to run in the environment, never CONTEXT (click
    would hand the first of them to the optional CONTEXT argument)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if "--" in args:
            at = args.index("--")
            ctx.meta[_COMMAND_AFTER_DASHES] = tuple(args[at + 1 :])
            args = args[:at]
        return super().parse_args(ctx, args)

    def collect_usage_pieces(self, ctx: click.Context) -> list[str]:
        return [*super().collect_usage_pieces(ctx), "[-- COMMAND [ARG]...]"]


@env.command("create", cls=_CreateCommand)
@click.argument("context", required=False)
@click.option("--name", help="A name (lower-case letters, digits, '.', '_', '-'); default: generated.")
@click.option("--class", "class_ref", metavar="CLASS", help="Environment class id or name; default: the default class.")
@click.option("--image", help="Use this image instead of the dev container's.")
@click.option("--ref", help="The git branch, tag or commit (git URLs only).")
@click.option("--devcontainer-path", help="The devcontainer.json to use, relative to the repository.")
@click.option("--project", "project_ref", metavar="PROJECT", help="Project id or name.")
@click.option("--timeout", type=DURATION, help="Stop after this long idle (e.g. 30m; 0 never); default: the org's.")
@click.option(
    "--dotfiles",
    metavar="GIT_URL",
    help="A dotfiles repository to install on the first start; default: yours (devyard user dotfiles).",
)
@click.option("--no-dotfiles", is_flag=True, help="Install no dotfiles, not even yours.")
@click.option(
    "--env", "variables", type=KEY_VALUE, multiple=True, metavar="KEY=VALUE", help="Set a variable (repeatable)."
)
@wait_options
@click.option("--rm", "remove", is_flag=True, help="With a COMMAND: delete the environment once it exited.")
@click.option(
    "-t", "--tty", "tty", flag_value="yes", help="With a COMMAND: give it a terminal (default: when stdin and "
    "stdout are terminals)."
)  # fmt: skip
@click.option("-T", "--no-tty", "tty", flag_value="no", help="With a COMMAND: give it no terminal.")
@click.option("-w", "--workdir", metavar="DIR", help="With a COMMAND: its working directory inside.")
@click.option("-u", "--user", metavar="USER", help="With a COMMAND: the user inside (a name, a uid or uid:gid).")
@api_command
def create_environment(
    invocation: Invocation,
    context: str | None,
    name: str | None,
    class_ref: str | None,
    image: str | None,
    ref: str | None,
    devcontainer_path: str | None,
    project_ref: str | None,
    timeout: float | None,
    dotfiles: str | None,
    no_dotfiles: bool,
    variables: tuple[tuple[str, str], ...],
    wait: bool,
    wait_timeout: float,
    remove: bool,
    tty: str | None,
    workdir: str | None,
    user: str | None,
) -> None:
    """Create an environment from CONTEXT: a git URL or a local folder (on a desktop runner); or, with --image
    and no CONTEXT, an environment of that image with no content at all.

    With a COMMAND after --, wait until the environment runs, then run the command in it as `env exec` does
    (its output as it comes, stdin passed on, a terminal when this one has one) and exit with its exit code:
    devyard env create --image busybox -- sh -c 'echo hi'. The environment stays unless --rm is given. Failures
    of the session itself (refused, unreachable, cut off) exit with 255.
    """
    from devyard.cli._references import resolve_id
    from devyard.client import ApiError

    command: tuple[str, ...] | None = click.get_current_context().meta.get(_COMMAND_AFTER_DASHES)
    if command is not None:
        _check_command(invocation, command)
    else:
        given = [flag for flag, value in (("--rm", remove), ("-t/-T", tty), ("-w", workdir), ("-u", user)) if value]
        if given:
            verb = "applies" if len(given) == 1 else "apply"
            raise click.UsageError(f"{', '.join(given)} {verb} with a COMMAND only: put it after --")
    if context is None and image is None:
        raise click.UsageError("give a CONTEXT (a git URL or a folder), or --image REF for an environment without one")
    if context is None and ref is not None:
        raise click.BadParameter("--ref applies to a git URL only", param_hint="--ref")
    client = invocation.client()
    spec: dict[str, Any] = {} if context is None else {"content": _content_json(context, ref)}
    if class_ref is not None:
        spec["class_id"] = resolve_id(client, "environment-classes", "EnvironmentClass", class_ref)
    if project_ref is not None:
        spec["project_id"] = resolve_id(client, "projects", "Project", project_ref)
    for key, value in (("image", image), ("devcontainer_path", devcontainer_path)):
        if value is not None:
            spec[key] = value
    if timeout is not None:
        spec["timeout"] = int(timeout)
    if dotfiles is not None and no_dotfiles:
        raise click.UsageError("--dotfiles and --no-dotfiles contradict each other: give one")
    if no_dotfiles:
        spec["dotfiles"] = None
    elif dotfiles is not None:
        spec["dotfiles"] = _dotfiles_json(dotfiles)
    if variables:
        spec["env"] = dict(variables)
    # Plain JSON, not the pydantic models: they cost the command a tenth of a second to import. The server
    # validates the body; when it refuses it, the models say what is wrong the way the other commands do.
    body = {"metadata": {} if name is None else {"name": name}, "spec": spec}
    try:
        created = client.post("/api/v1/environments", body)
    except ApiError as exc:
        if exc.status == 422:
            _validate_create(name, spec)
        raise
    if command is not None:
        code = _run_in_created(
            invocation, created, command, tty=tty, workdir=workdir, user=user, wait_timeout=wait_timeout, remove=remove
        )
        _exit_now(code)
    if wait:
        wait_and_emit(invocation, created, "running", wait_timeout, "Environment {id} is running.")
    else:
        invocation.emit(created, lambda data: _summary(data, "Created environment {id}."))


def _check_command(invocation: Invocation, command: tuple[str, ...]) -> None:
    if not command:
        raise click.UsageError("give the command to run after --, or leave -- out")
    if invocation.json:
        raise click.UsageError("-o json does not apply with a COMMAND: what it prints is the command's own output")


def _run_in_created(
    invocation: Invocation,
    created: dict[str, Any],
    command: tuple[str, ...],
    *,
    tty: str | None,
    workdir: str | None,
    user: str | None,
    wait_timeout: float,
    remove: bool,
) -> int:
    """Wait until the just created environment runs, run ``command`` in it (``-t``/``-T``, ``-w``, ``-u`` as
    given), and return its exit code; with ``remove``, delete the environment afterwards, however it went."""
    import sys

    from devyard.cli._exec_session import GatewayAccess, SessionOptions, run_session, wants_tty
    from devyard.cli._waiting import wait_for_environment

    environment_id = created["metadata"]["id"]
    path = f"/api/v1/environments/{environment_id}"
    try:
        # A spinner only for people: rich costs the command more to import than the rest of its start.
        interactive = sys.stderr.isatty()
        with invocation.progress(f"Waiting for {environment_id}") if interactive else _no_progress() as update:
            wait_for_environment(
                invocation.client(),
                environment_id,
                "running",
                timeout=wait_timeout,
                on_change=_progress_text(update),
                written=created,
            )
        # The ticket is asked for the moment the environment runs: the server gives none before.
        access = GatewayAccess.from_answer(invocation.client().post(path + "/access"))
        if interactive and not remove:
            name = created["metadata"].get("name") or environment_id
            click.echo(f"Environment {name} ({environment_id}) is running; it stays after the command.", err=True)
        options = SessionOptions(argv=command, tty=wants_tty(tty), env={}, cwd=workdir, user=user)
        if not remove:
            invocation.close()  # the session may last long; the API connection is not needed after it
        return run_session(access, options)
    finally:
        if remove:
            _delete_quietly(invocation, environment_id)


def _exit_now(code: int) -> NoReturn:
    """Exit with the command's exit code (``env create -- CMD``, ``env exec``), skipping the interpreter's teardown
    (freeing every module and object), which costs the process about 30 ms, a tenth of a warm start through these
    commands: nothing is left to do (the terminal is restored, the environment deleted if it had to be, the
    sockets are the kernel's to close) but flushing the output. Not in-process, under click's test runner (its own
    streams): there it raises SystemExit.
    """
    import os
    import sys

    if sys.stdout is not sys.__stdout__ or sys.stderr is not sys.__stderr__:
        raise SystemExit(code)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe: nothing more can be said there
            if stream is not None:
                stream.flush()
    os._exit(code)


@contextlib.contextmanager
def _no_progress() -> Iterator[Any]:
    yield lambda _: None


def _delete_quietly(invocation: Invocation, environment_id: str) -> None:
    """``--rm``: delete the environment; a failure is said on stderr, the command's exit code still counts."""
    from devyard.cli._invocation import describe_api_error
    from devyard.client import ApiError, TransportError

    try:
        invocation.client().delete(f"/api/v1/environments/{environment_id}")
    except ApiError as exc:
        if not exc.is_not_found:
            message = describe_api_error(exc, has_token=invocation.token is not None)
            click.echo(f"Error: could not delete environment {environment_id}: {message}", err=True)
    except TransportError as exc:
        click.echo(f"Error: could not delete environment {environment_id}: {exc}", err=True)


def _validate_create(name: str | None, spec: dict[str, Any]) -> None:
    """Raise pydantic's ValidationError if the body of ``env create`` is invalid, part by part as it is built,
    so that the error names the field as the user gave it (``name``, ``timeout``)."""
    from devyard.wire.environments import ContentSpec, EnvironmentSpec
    from devyard.wire.meta import MetadataWrite

    MetadataWrite(name=name)
    content = spec.get("content")
    EnvironmentSpec(**{**spec, "content": ContentSpec.model_validate(content)} if content is not None else spec)


@env.command("list")
@click.option("--phase", help="Only environments in this phase.")
@click.option("--runner", "runner_ref", metavar="RUNNER", help="Only environments on this runner (id or name).")
@api_command
def list_environments(invocation: Invocation, phase: str | None, runner_ref: str | None) -> None:
    """List the environments you can see."""
    from devyard.cli._references import resolve_id

    client = invocation.client()
    params: dict[str, str] = {}
    if phase is not None:
        params["phase"] = phase
    if runner_ref is not None:
        params["runner_id"] = resolve_id(client, "runners", "Runner", runner_ref)
    items, version = client.list_all("/api/v1/environments", params)
    invocation.emit({"items": items, "resource_version": version}, _environment_table)


@env.command("get")
@click.argument("environment")
@api_command
def get_environment(invocation: Invocation, environment: str) -> None:
    """Show an environment: where it comes from, its phase, how to reach it, its conditions."""
    client = invocation.client()
    invocation.emit(client.get(_path(invocation, environment)), render_environment)


@env.command("start")
@click.argument("environment")
@wait_options
@api_command
def start_environment(invocation: Invocation, environment: str, wait: bool, wait_timeout: float) -> None:
    """Start a stopped environment."""
    _set_desired_phase(invocation, environment, "running", wait, wait_timeout)


@env.command("stop")
@click.argument("environment")
@wait_options
@api_command
def stop_environment(invocation: Invocation, environment: str, wait: bool, wait_timeout: float) -> None:
    """Stop an environment; its disk is kept."""
    _set_desired_phase(invocation, environment, "stopped", wait, wait_timeout)


@env.command("rebuild")
@click.argument("environment")
@wait_options
@api_command
def rebuild_environment(invocation: Invocation, environment: str, wait: bool, wait_timeout: float) -> None:
    """Make the environment's dev container again from its definition (after a change to devcontainer.json or
    its Dockerfile, say); the workspace and its files are kept. Its onCreate and postCreate hooks run again."""
    import secrets

    client = invocation.client()
    changed = client.patch(
        _path(invocation, environment), {"spec": {"desired_phase": "running", "rebuild_request": secrets.token_hex(8)}}
    )
    if wait:
        wait_and_emit(invocation, changed, "running", wait_timeout, "Environment {id} is rebuilt and running.")
    else:
        invocation.emit(changed, lambda data: _summary(data, "Rebuilding environment {id}."))


@env.command("delete")
@click.argument("environment")
@wait_options
@api_command
def delete_environment(invocation: Invocation, environment: str, wait: bool, wait_timeout: float) -> None:
    """Delete an environment and its disk."""
    from devyard.cli._waiting import DELETED, wait_for_environment

    client = invocation.client()
    path = _path(invocation, environment)
    answer = client.delete(path)
    environment_id = path.rsplit("/", 1)[1]
    if wait:
        with invocation.progress(f"Deleting {environment_id}") as update:
            wait_for_environment(
                client, environment_id, DELETED, timeout=wait_timeout, on_change=_progress_text(update)
            )
        invocation.emit(answer, lambda _: _render.plain(f"Deleted environment {environment_id}."))
    else:
        invocation.emit(answer, lambda _: _render.plain(f"Deleting environment {environment_id}."))


@env.command("exec")
@click.argument("environment")
@click.argument("command", nargs=-1, required=True)
@click.option(
    "-t",
    "--tty",
    "tty",
    flag_value="yes",
    help="Give the command a terminal (default: when stdin and stdout are terminals).",
)
@click.option("-T", "--no-tty", "tty", flag_value="no", help="Give the command no terminal.")
@click.option(
    "-e", "--env", "variables", type=KEY_VALUE, multiple=True, metavar="KEY=VALUE", help="Set a variable (repeatable)."
)
@click.option("-w", "--workdir", metavar="DIR", help="The working directory inside the environment.")
@click.option("-u", "--user", metavar="USER", help="The user inside: a name, a uid or uid:gid.")
@api_command
def exec_in_environment(
    invocation: Invocation,
    environment: str,
    command: tuple[str, ...],
    tty: str | None,
    variables: tuple[tuple[str, str], ...],
    workdir: str | None,
    user: str | None,
) -> None:
    """Run COMMAND in the running ENVIRONMENT and exit with its exit code.

    Put -- before the command: devyard env exec my-env -- ls -la. Its output comes as it is written; stdin is
    passed on. Failures of the session itself (refused, unreachable, cut off) exit with 255.
    """
    from devyard.cli._exec_session import GatewayAccess, SessionOptions, run_session, wants_tty

    client = invocation.client()
    path = _path(invocation, environment)
    access = GatewayAccess.from_answer(client.post(path + "/access"))
    options = SessionOptions(argv=command, tty=wants_tty(tty), env=dict(variables), cwd=workdir, user=user)
    invocation.close()  # the session may last long; the API connection is not needed meanwhile
    _exit_now(run_session(access, options))


def _set_desired_phase(invocation: Invocation, reference: str, phase: str, wait: bool, wait_timeout: float) -> None:
    client = invocation.client()
    changed = client.patch(_path(invocation, reference), {"spec": {"desired_phase": phase}})
    if wait:
        done = "Environment {id} is " + phase + "."
        wait_and_emit(invocation, changed, phase, wait_timeout, done)
    else:
        verb = "Starting" if phase == "running" else "Stopping"
        invocation.emit(changed, lambda data: _summary(data, verb + " environment {id}."))


def wait_and_emit(
    invocation: Invocation, environment: dict[str, Any], target: str, timeout: float, done: str
) -> dict[str, Any]:
    """Wait for ``environment`` to reach ``target``, showing its phase meanwhile, then print it."""
    from devyard.cli._waiting import wait_for_environment

    environment_id = environment["metadata"]["id"]
    with invocation.progress(f"Waiting for {environment_id}") as update:
        final = wait_for_environment(
            invocation.client(), environment_id, target, timeout=timeout, on_change=_progress_text(update)
        )
    assert final is not None
    invocation.emit(final, lambda data: _summary(data, done))
    return final


def _progress_text(update: Any) -> Any:
    def on_change(environment: dict[str, Any]) -> None:
        status = environment.get("status") or {}
        text = f"{environment['metadata']['id']}: {status.get('phase', 'pending')}"
        if status.get("message"):
            text += f" ({status['message']})"
        update(text)

    return on_change


def _path(invocation: Invocation, reference: str) -> str:
    from devyard.cli._references import resolve_id

    return "/api/v1/environments/" + resolve_id(invocation.client(), "environments", "Environment", reference)


def _context(environment: Environment) -> str:
    content = environment.spec.content
    if content is None:
        return ""
    if content.git is not None:
        return content.git.url + (f"#{content.git.ref}" if content.git.ref else "")
    return content.local_path or ""


def _phase(environment: Environment) -> RenderableType:
    from rich.text import Text

    phase = environment.status.phase.value
    desired = environment.spec.desired_phase.value
    text = _render.phase(phase)
    if desired != phase and phase != "failed":
        text = Text.assemble(text, (f" → {desired}", "dim"))
    return text


def _environment_table(data: dict[str, Any]) -> RenderableType:
    from devyard.wire.environments import Environment

    environments = [Environment.model_validate(item) for item in data["items"]]
    return _render.table(
        ["ID", "NAME", "PHASE", "CONTEXT", "AGE"],
        (
            (e.metadata.id, e.metadata.name, _phase(e), _context(e), _render.age(e.metadata.created_at))
            for e in environments
        ),
        empty="No environments. Create one with `devyard env create CONTEXT` or `devyard up`.",
    )


def render_environment(data: dict[str, Any]) -> RenderableType:
    from rich.console import Group

    from devyard.wire.environments import Environment

    environment = Environment.model_validate(data)
    spec, status, created = environment.spec, environment.status, environment.metadata.created_at
    ssh = status.ssh
    ports = ", ".join(f"{p.port}" + (f" {p.url}" if p.url else "") for p in status.ports)
    timings = ", ".join(f"{step} {seconds:.1f}s" for step, seconds in status.timings.items())
    panel = _render.fields(
        f"Environment {environment.metadata.id}",
        [
            ("name", environment.metadata.name),
            ("phase", _phase(environment)),
            ("message", status.message),
            ("context", _context(environment)),
            ("class", spec.class_id),
            ("image", spec.image),
            ("project", spec.project_id),
            ("runner", status.runner_id),
            ("ssh", f"ssh -p {ssh.port} {ssh.user}@{ssh.host}" if ssh else None),
            ("ports", ports),
            ("timings", timings),
            ("created", f"{created:%Y-%m-%d %H:%M:%S} ({_render.age(created)} ago)"),
        ],
    )
    if not status.conditions:
        return panel
    return Group(panel, "", _render.conditions(status.conditions))


def _summary(data: dict[str, Any], template: str) -> RenderableType:
    from rich.console import Group

    environment_id = data["metadata"]["id"]
    return Group(
        _render.plain(template.format(id=environment_id)),
        render_environment(data),
    )
