"""The fake runtime's ``open_exec``: a host process in the fake container's scratch directory, with pipes or a
pseudo-terminal, its exit code (128 + N for signal N), and output that waits for its reader instead of piling up
in memory. The canned ``exec`` is tested in ``test_fake_runtime``."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from devyard.runner.errors import ContainerNotRunning, PermanentError
from devyard.runner.fake_runtime import FakeRuntime
from devyard.runner.runtime import ContainerSpec, ExecRequest


@pytest.fixture
async def runtime(tmp_path: Path) -> AsyncIterator[FakeRuntime]:
    runtime = FakeRuntime(state_file=tmp_path / "fake-runtime.json")
    await runtime.create(ContainerSpec(environment_id="env_a", image="debian", env={"FROM_SPEC": "spec"}))
    await runtime.start("env_a")
    try:
        yield runtime
    finally:
        await runtime.close()


async def run(runtime: FakeRuntime, request: ExecRequest) -> tuple[int, bytes, bytes]:
    process = await runtime.open_exec("env_a", request)
    process.stdin.close()
    assert process.stderr is not None
    stdout, stderr = await asyncio.gather(process.stdout.read(), process.stderr.read())
    return await asyncio.wait_for(process.wait(), 10), stdout, stderr


async def test_runs_in_the_containers_scratch_directory_with_its_variables(
    runtime: FakeRuntime, tmp_path: Path
) -> None:
    request = ExecRequest(argv=["sh", "-c", 'mkdir -p sub; pwd; echo "$FROM_SPEC $GIVEN"'], env={"GIVEN": "given"})
    code, stdout, stderr = await run(runtime, request)
    scratch = tmp_path / "fake-containers" / "env_a"
    assert (code, stdout, stderr) == (0, f"{scratch}\nspec given\n".encode(), b"")
    code, stdout, _ = await run(runtime, ExecRequest(argv=["pwd"], cwd="sub"))
    assert stdout == f"{scratch / 'sub'}\n".encode()
    await runtime.stop("env_a")
    await runtime.delete("env_a")
    assert not scratch.exists()


async def test_refuses_what_it_cannot_do(runtime: FakeRuntime) -> None:
    with pytest.raises(PermanentError, match="cannot run them as 'someone-else'"):
        await runtime.open_exec("env_a", ExecRequest(argv=["true"], user="someone-else"))
    await runtime.open_exec("env_a", ExecRequest(argv=["true"], user=str(os.getuid())))
    with pytest.raises(PermanentError, match="does not exist"):
        await runtime.open_exec("env_a", ExecRequest(argv=["true"], cwd="missing"))
    with pytest.raises(PermanentError, match="cannot run"):
        await runtime.open_exec("env_a", ExecRequest(argv=["/nonexistent/program"]))
    await runtime.stop("env_a")
    with pytest.raises(ContainerNotRunning):
        await runtime.open_exec("env_a", ExecRequest(argv=["true"]))


async def test_a_signal_gives_128_plus_its_number(runtime: FakeRuntime) -> None:
    process = await runtime.open_exec("env_a", ExecRequest(argv=["sleep", "30"]))
    await process.signal(9)
    assert await asyncio.wait_for(process.wait(), 10) == 137


async def test_a_terminal_merges_the_streams_and_takes_its_size(runtime: FakeRuntime) -> None:
    process = await runtime.open_exec(
        "env_a", ExecRequest(argv=["sh", "-c", "stty size; echo err >&2; read x; stty size"], tty=True, size=(10, 20))
    )
    assert process.stderr is None
    first = await asyncio.wait_for(process.stdout.readuntil(b"err\r\n"), 10)
    assert first == b"10 20\r\nerr\r\n"
    await process.resize(50, 60)
    process.stdin.write(b"\n")
    await process.stdin.drain()
    rest = await asyncio.wait_for(process.stdout.read(), 10)
    assert rest.endswith(b"50 60\r\n"), rest
    assert await asyncio.wait_for(process.wait(), 10) == 0


async def test_output_waits_for_its_reader(runtime: FakeRuntime) -> None:
    """A process that writes more than the buffers hold blocks until the output is read: it never finishes
    while no one reads, and finishes once someone does."""
    request = ExecRequest(argv=["sh", "-c", "head -c 4000000 /dev/zero; echo done >&2"])
    process = await runtime.open_exec("env_a", request)
    assert process.stderr is not None
    finishing = asyncio.ensure_future(process.stderr.readline())
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(asyncio.shield(finishing), 0.5)
    total = 0
    while chunk := await process.stdout.read(65536):
        total += len(chunk)
    assert total == 4_000_000
    assert await asyncio.wait_for(finishing, 10) == b"done\n"
    assert await process.wait() == 0
