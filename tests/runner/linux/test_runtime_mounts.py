"""What a dev container asks of the linux runtime beyond its image, on real runc: the workspace (content the
runner put there before ``create``, given to the remote user, kept across stop and start, removed by delete),
volumes and tmpfs, the user PID 1 runs as, ``overrideCommand``, added capabilities and ``privileged``, and the
defaults of exec (remote user, remote environment, working directory)."""

from __future__ import annotations

import os

import pytest

from devyard.runner.errors import PermanentError
from devyard.runner.runtime import ContainerSpec, Mount, MountKind

from .runtime_host import ID_RANGE, RuntimeHost, busybox_layer_fixture, running_runtime, runtime_host_fixture  # noqa: F401  (fixtures)

WORKSPACE = Mount(MountKind.WORKSPACE, "/workspaces/project")


def spec(environment_id: str = "env_m", **changes: object) -> ContainerSpec:
    return ContainerSpec(environment_id=environment_id, image="busybox", **changes)  # type: ignore[arg-type]


async def test_the_workspace_is_the_users_kept_across_stop_and_gone_with_delete(runtime_host: RuntimeHost) -> None:
    async with running_runtime(runtime_host) as runtime:
        workspace = runtime.workspace("env_m")
        (workspace / "src").mkdir()
        (workspace / "src" / "main.py").write_text("print('hi')\n")
        await runtime.create(
            spec(
                mounts=(WORKSPACE,),
                workspace_owner="dev",
                remote_user="dev",
                remote_env={"EDITOR": "vi"},
                workdir="/workspaces/project",
            )
        )
        await runtime.start("env_m")
        # Exec defaults to the remote user, in the workspace, with the remote environment.
        result = await runtime.exec("env_m", ["sh", "-c", 'echo "$(id -u) $(pwd) $EDITOR"; cat src/main.py'])
        assert result.stdout == b"1000 /workspaces/project vi\nprint('hi')\n", result.stderr
        # The files are the remote user's, inside and (shifted) outside.
        assert (await runtime.exec("env_m", ["sh", "-c", "echo more >> src/main.py && touch new"])).exit_code == 0
        assert (workspace / "new").stat().st_uid == ID_RANGE.host_id(1000)
        assert (workspace / "src").stat().st_uid == ID_RANGE.host_id(1000)

        await runtime.stop("env_m")
        await runtime.start("env_m")
        assert (await runtime.exec("env_m", ["cat", "src/main.py"])).stdout == b"print('hi')\nmore\n"

        await runtime.delete("env_m")
        assert not workspace.exists()


async def test_volumes_persist_and_tmpfs_starts_empty(runtime_host: RuntimeHost) -> None:
    async with running_runtime(runtime_host) as runtime:
        mounts = (Mount(MountKind.VOLUME, "/cache", source="cache"), Mount(MountKind.TMPFS, "/scratch"))
        await runtime.create(spec(mounts=mounts))
        await runtime.start("env_m")
        write = "echo v > /cache/f && echo t > /scratch/f && grep ' /scratch ' /proc/mounts | cut -d' ' -f3"
        assert (await runtime.exec("env_m", ["sh", "-c", write])).stdout == b"tmpfs\n"
        await runtime.stop("env_m")
        await runtime.start("env_m")
        result = await runtime.exec("env_m", ["sh", "-c", "cat /cache/f; ls /scratch | wc -l"])
        assert result.stdout.split() == [b"v", b"0"]


async def test_user_override_command_and_capabilities(runtime_host: RuntimeHost) -> None:
    async with running_runtime(runtime_host) as runtime:
        await runtime.create(spec(user="dev", override_command=True, capabilities=("SYS_PTRACE",)))
        await runtime.start("env_m")
        status = await runtime.exec("env_m", ["sh", "-c", "cat /proc/1/status"])
        fields = dict(line.split(":", 1) for line in status.stdout.decode().splitlines() if ":" in line)
        assert fields["Uid"].split()[0] == "1000"  # PID 1 runs as dev
        bounding = int(fields["CapBnd"].strip(), 16)
        assert bounding & (1 << 19)  # CAP_SYS_PTRACE
        assert not bounding & (1 << 21)  # CAP_SYS_ADMIN: not without privileged
        assert "sleep" in (await runtime.exec("env_m", ["ps", "-o", "args"])).stdout.decode()

        await runtime.create(spec("env_p", privileged=True))
        await runtime.start("env_p")
        status = await runtime.exec("env_p", ["cat", "/proc/1/status"])
        line = next(x for x in status.stdout.decode().splitlines() if x.startswith("CapBnd:"))
        assert int(line.split()[1], 16) & (1 << 21)
        # Still nobody outside: root inside is the range's first id.
        assert os.stat(f"/proc/{await _pid1(runtime_host, 'env_p')}").st_uid == ID_RANGE.host_id(0)


async def test_an_unknown_capability_or_user_is_a_clear_error(runtime_host: RuntimeHost) -> None:
    async with running_runtime(runtime_host) as runtime:
        with pytest.raises(PermanentError, match="unknown capability 'NOT_A_CAP'"):
            await runtime.create(spec(capabilities=("NOT_A_CAP",)))
        with pytest.raises(PermanentError, match="no user 'nobody-here'"):
            await runtime.create(spec("env_u", user="nobody-here"))


async def _pid1(runtime_host: RuntimeHost, environment_id: str) -> int:
    state = runtime_host.state_dir / "environments" / environment_id / "pid"
    return int(state.read_text())


async def test_registry_credentials_never_reach_the_disk(runtime_host: RuntimeHost) -> None:
    async with running_runtime(runtime_host) as runtime:
        await runtime.create(spec(registry_credentials={"registry.example": ("me", "hunter2-secret")}))
        written = [p for p in (runtime_host.state_dir / "environments" / "env_m").rglob("*") if p.is_file()]
        assert written
        assert not [p for p in written if b"hunter2-secret" in p.read_bytes()]
        # ... and the record still reads back after a restart of the runtime.
        assert (await runtime.inspect("env_m")) is not None
