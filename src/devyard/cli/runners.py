"""``devyard runner``: run a runner on this host (no subcommand), or manage runners (create, list, get, delete).

``devyard runner create`` prints the one-time exchange token and the exact line to run on the runner's host;
``devyard runner --server URL --token EXCHANGE`` then trades it for a credential kept in the state directory,
so later starts need only ``--server`` (or nothing, when the settings come from ``DEVYARD_RUNNER_*``).
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from devyard.cli import _render
from devyard.cli._invocation import Invocation, api_command, output_option

if TYPE_CHECKING:
    from rich.console import RenderableType

    from devyard.runner.doctor import DoctorReport

__all__ = ["runner"]


@click.group(invoke_without_command=True)
@click.option("--server", "server_url", metavar="URL", help="The management plane's URL.")
@click.option("--token", "exchange_token", metavar="EXCHANGE", help="The exchange token from `devyard runner create`.")
@click.option(
    "--state-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Where the runner keeps its credential and environments.",
)
@click.option(
    "--runtime",
    type=click.Choice(["linux", "fake"]),
    help="How environments run: linux (runc containers; the default as root on Linux) or fake (in memory).",
)
@click.option(
    "--insecure-registry",
    "insecure_registries",
    metavar="HOST:PORT",
    multiple=True,
    help="Reach this registry over plain http (repeatable).",
)
@click.option("--gateway-listen", metavar="HOST:PORT", help="Where the gateway (exec, SSH) listens [0.0.0.0:7481].")
@click.option(
    "--ports-listen", metavar="HOST:PORT", help="Where the port proxy (environments' HTTP ports) listens [off]."
)
@click.pass_context
def runner(
    ctx: click.Context,
    server_url: str | None,
    exchange_token: str | None,
    state_dir: Path | None,
    runtime: str | None,
    insecure_registries: tuple[str, ...],
    gateway_listen: str | None,
    ports_listen: str | None,
) -> None:
    """Run a runner on this host, or manage runners with a subcommand.

    \b
    On the runner's host:   devyard runner --server URL --token EXCHANGE [--state-dir DIR] [--runtime linux]
    As an admin:            devyard runner create | list | get | delete
    On the runner's host:   devyard runner doctor [--fix]
    """
    given = {
        "server": server_url,
        "exchange_token": exchange_token,
        "state_dir": state_dir,
        "runtime": runtime,
        "insecure_registries": list(insecure_registries) or None,
        "gateway_listen": gateway_listen,
        "ports_listen": ports_listen,
    }
    if ctx.invoked_subcommand is not None:
        if any(value is not None for value in given.values()):
            raise click.UsageError(
                "--server/--token/--state-dir/--runtime/--insecure-registry/--gateway-listen/--ports-listen before a "
                "subcommand "
                "run a runner; "
                f"put them after `{ctx.invoked_subcommand}` (`devyard runner {ctx.invoked_subcommand} --help`)"
            )
        return
    _run(given)


def _run(given: dict[str, Any]) -> None:
    from devyard.cli.processes import settings_or_exit
    from devyard.runner.settings import RunnerSettings

    settings = settings_or_exit(RunnerSettings, given)
    if settings.exchange_token is None and not settings.credential_path().exists():
        raise click.UsageError(
            f"--token EXCHANGE is needed the first time (there is no credential in {settings.state_dir}); "
            "an admin gets one with `devyard runner create`"
        )
    from devyard.runner.main import run_runner

    run_runner(settings)


@runner.command("create")
@click.option("--name", help="A name; default: generated.")
@click.option("--region", help="The runner's region [default: default].")
@click.option("--description", help="What the runner is for.")
@click.option("--max-environments", type=click.IntRange(min=0), help="Cap the environments it takes.")
@api_command
def create_runner(
    invocation: Invocation,
    name: str | None,
    region: str | None,
    description: str | None,
    max_environments: int | None,
) -> None:
    """Register a runner and print the one-time command that starts it on its host."""
    from devyard.wire.meta import MetadataWrite
    from devyard.wire.runners import RunnerCreate, RunnerSpec

    spec = {
        key: value
        for key, value in (("region", region), ("description", description), ("max_environments", max_environments))
        if value is not None
    }
    body = RunnerCreate(metadata=MetadataWrite(name=name) if name else MetadataWrite(), spec=RunnerSpec(**spec))
    created = invocation.client().post("/api/v1/runners", body.model_dump(mode="json", exclude_unset=True))
    invocation.emit(created, lambda data: _created(data, invocation.server or ""))


@runner.command("list")
@api_command
def list_runners(invocation: Invocation) -> None:
    """List the runners of your organizations."""
    items, version = invocation.client().list_all("/api/v1/runners")
    invocation.emit({"items": items, "resource_version": version}, _runner_table)


@runner.command("get")
@click.argument("runner_ref", metavar="RUNNER")
@api_command
def get_runner(invocation: Invocation, runner_ref: str) -> None:
    """Show a runner (id or name)."""
    from devyard.cli._references import resolve_id

    client = invocation.client()
    runner_id = resolve_id(client, "runners", "Runner", runner_ref)
    invocation.emit(client.get(f"/api/v1/runners/{runner_id}"), _runner_fields)


@runner.command("delete")
@click.argument("runner_ref", metavar="RUNNER")
@api_command
def delete_runner(invocation: Invocation, runner_ref: str) -> None:
    """Delete a runner (id or name); its credential stops working."""
    from devyard.cli._references import resolve_id

    client = invocation.client()
    runner_id = resolve_id(client, "runners", "Runner", runner_ref)
    answer = client.delete(f"/api/v1/runners/{runner_id}")
    invocation.emit(answer, lambda _: _render.plain(f"Deleted runner {runner_id}."))


@runner.command("doctor")
@click.option(
    "--state-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="The runner's state directory [env DEVYARD_RUNNER_STATE_DIR; /var/lib/devyard/runner].",
)
@click.option("--server", "server_url", metavar="URL", help="The server [default: the one the runner registered with].")
@click.option(
    "--fix",
    is_flag=True,
    help="Repair what a killed runner left, delete containers the server no longer assigns here, collect images.",
)
@output_option
def doctor(state_dir: Path | None, server_url: str | None, fix: bool, output: str) -> None:
    """Compare this runner host with what it should be; exit 1 when they differ (after --fix: still differ).

    Reports orphans (runc containers, mounts, cgroups, network namespaces, veths, addresses and half-done steps
    that no environment explains) and drift (containers the server does not assign here, environments that
    should run and do not, or the reverse). Takes the runner's settings (DEVYARD_RUNNER_*) and credential.
    --fix refuses while the runner runs on that state directory; without the server it fixes host orphans only.
    """
    import asyncio
    import json

    from devyard.cli.processes import settings_or_exit
    from devyard.runner import doctor as doctor_module
    from devyard.runner.settings import RunnerSettings

    settings = settings_or_exit(RunnerSettings, {"state_dir": state_dir, "server": server_url})
    try:
        report = asyncio.run(doctor_module.examine(settings, fix=fix))
    except doctor_module.DoctorRefused as exc:
        click.echo(f"Error: {exc}", err=True)
        raise SystemExit(2) from None
    if output == "json":
        click.echo(json.dumps(report.to_json(), indent=2))
    else:
        from rich.console import Console

        Console().print(_doctor_text(report))
    raise SystemExit(0 if report.clean else 1)


def _doctor_text(report: DoctorReport) -> RenderableType:
    from rich.console import Group
    from rich.text import Text

    lines: list[RenderableType] = []
    if report.runner_pid is not None:
        lines.append(Text(f"A runner (pid {report.runner_pid}) is running: what it is doing may show as orphans."))
    if not report.server_reachable:
        lines.append(Text(f"Server not consulted: {report.server_message}. Host-level checks only.", style="yellow"))
    styles = {"ok": "green", "orphan": "red", "drift": "yellow", "unknown": "dim"}
    columns = ["WHAT", "WHERE", "STATUS", "DETAIL"] + (["FIX"] if report.fix_asked else [])
    rows: list[list[RenderableType]] = [
        [
            finding.what,
            finding.where,
            Text(finding.status.value, style=styles.get(finding.status.value, "")),
            finding.detail,
            *([finding.fix] if report.fix_asked else []),
        ]
        for finding in report.findings
    ]
    lines.append(_render.table(columns, rows, empty="Nothing on this host.", whole=("WHERE",)))
    if report.fixed:
        lines += [Text(""), Text("Done:", style="bold"), *(Text(f"  {line}") for line in report.fixed)]
    verdict = "Clean." if report.clean else "Differences found." if not report.fix_asked else "Differences remain."
    lines.append(Text(verdict, style="bold green" if report.clean else "bold red"))
    return Group(*lines)


def _created(data: dict[str, Any], server: str) -> RenderableType:
    from rich.console import Group
    from rich.text import Text

    from devyard.wire.runners import RunnerCreated

    created = RunnerCreated.model_validate(data)
    command = shlex.join(["devyard", "runner", "--server", server, "--token", created.exchange_token])
    return Group(
        Text(f"Created runner {created.runner.metadata.id} ({created.runner.metadata.name}).", style="bold"),
        Text(
            f"Run this on the runner's host before {created.exchange_token_expires_at:%Y-%m-%d %H:%M} UTC; "
            "the token works once and is not shown again:"
        ),
        Text(""),
        Text("  " + command, style="cyan", no_wrap=True, overflow="ignore"),
    )


def _runner_table(data: dict[str, Any]) -> RenderableType:
    from devyard.wire.runners import Runner

    runners = [Runner.model_validate(item) for item in data["items"]]
    return _render.table(
        ["ID", "NAME", "REGION", "PHASE", "RUNTIME", "HOST", "CAPACITY", "HEARTBEAT"],
        (
            (
                r.metadata.id,
                r.metadata.name,
                r.spec.region,
                _render.phase(r.status.phase.value),
                r.status.runtime,
                r.status.hostname,
                str(r.status.capacity),
                _render.age(r.status.last_heartbeat_at) + " ago" if r.status.last_heartbeat_at else "never",
            )
            for r in runners
        ),
        empty="No runners. Register one with `devyard runner create`.",
    )


def _runner_fields(data: dict[str, Any]) -> RenderableType:
    from rich.console import Group

    from devyard.wire.runners import Runner

    r = Runner.model_validate(data)
    gateway = r.status.gateway
    fields = _render.fields(
        f"Runner {r.metadata.id}",
        [
            ("name", r.metadata.name),
            ("region", r.spec.region),
            ("description", r.spec.description),
            ("phase", _render.phase(r.status.phase.value)),
            ("runtime", r.status.runtime),
            ("host", r.status.hostname),
            ("version", r.status.version),
            ("capacity", str(r.status.capacity)),
            ("max environments", str(r.spec.max_environments) if r.spec.max_environments is not None else None),
            ("heartbeat", _render.age(r.status.last_heartbeat_at) + " ago" if r.status.last_heartbeat_at else "never"),
            ("ssh gateway", f"{gateway.ssh_host}:{gateway.ssh_port}" if gateway and gateway.ssh_host else None),
            ("http gateway", gateway.http_url if gateway else None),
        ],
    )
    if not r.status.conditions:
        return fields
    return Group(fields, "", _render.conditions(r.status.conditions))
