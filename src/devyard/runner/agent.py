"""The runner process: registers, heartbeats, lists and watches its environments, and reconciles them.

``main.run_runner`` runs one ``Agent`` until a signal; the local daemon and the scale benchmark run agents
inside their own event loop. ``Agent.run()`` does, in order:

1. Gets its credential (``credentials.obtain``): the stored one, or a new one for the exchange token.
   With a linux runtime it then holds ``state_lock`` on its state directory until it stops.
2. Starts, side by side, until ``stop()``:
   - the heartbeat: ``PUT /api/v1/runners/{id}/status`` every ``heartbeat_interval`` (jittered); failures
     back off and are retried, except a refused credential, which stops the agent with ``CredentialError``;
   - the informer for ``/api/v1/environments?runner_id=ME``, which feeds the work queue on every change and,
     after every full list, queues everything it knows and everything the runtime holds (adoption and
     garbage collection after a start or a reconnect);
   - the controller: ``workers`` workers running the environment reconciler;
   - the resync: every ``resync_interval`` (jittered) every known environment and container is queued again,
     so drift on the host is corrected even when nothing changes on the server;
   - the gateway (``gateway.Gateway``), unless ``gateway_listen`` is empty: it fetches the runner's gateway
     key (``GET /api/v1/runners/{id}/gateway-key``, retried with backoff), listens (a port that cannot be
     bound is retried too, loudly), and from then on the heartbeat reports its URL in
     ``status.gateway.http_url`` (a heartbeat goes out at once when it starts). Its sessions end on ``stop()``;
   - the port proxy (``ports.PortProxy``) when ``ports_listen`` is set, with the same key; once it listens, running
     environments report their ports' URLs in ``status.ports``;
   - the port watch (``port_detection.PortWatch``): every 2 s it reads the listening ports of each running
     environment and queues one whose ports changed, so that its ``status.ports`` follows what runs inside.
3. On ``stop()``: the queue stops handing out work, reconciles in flight get ``stop_grace`` seconds to
   finish, everything else is cancelled, the runtime is closed. Containers keep running.

Per environment the agent keeps only the informer's cached object and the work queue's bookkeeping: no task,
no timer.
"""

from __future__ import annotations

import asyncio
import logging
import random
import urllib.parse
from collections.abc import Coroutine, Iterable
from functools import partial
from typing import IO, Any

import httpx

from devyard import __version__
from devyard.client import ApiError, AsyncClient, RetryPolicy, TransportError
from devyard.runner import credentials, ports, ssh_gateway, state_lock
from devyard.runner.activity import Activity
from devyard.runner.backoff import Backoff, BackoffPolicy
from devyard.runner.clock import Clock, SystemClock
from devyard.runner.controller import Controller
from devyard.runner.dev_container import DevContainers
from devyard.runner.environments import EnvironmentReconciler
from devyard.runner.errors import CredentialError, RunnerError, StateDirInUse
from devyard.runner.fake_runtime import FakeRuntime, FakeRuntimeConfig
from devyard.runner.gateway import Gateway, TicketCheck, parse_listen
from devyard.runner.informer import Informer
from devyard.runner.log_shipper import LogShipper
from devyard.runner.port_detection import PortWatch
from devyard.runner.runtime import Runtime
from devyard.runner.settings import RunnerSettings
from devyard.runner.workqueue import WorkQueue
from devyard.wire.access import GatewayKey, decode_key
from devyard.wire.environments import Environment, EnvironmentPhase
from devyard.wire.organizations import Organization, Whoami
from devyard.wire.runners import GatewayEndpoint, RunnerPhase, RunnerStatus, RunnerStatusWrite

__all__ = ["Agent", "make_runtime"]

log = logging.getLogger(__name__)


def make_runtime(settings: RunnerSettings, clock: Clock | None = None) -> Runtime:
    """The runtime ``settings.runtime`` names."""
    if settings.runtime == "fake":
        config = FakeRuntimeConfig(
            delays=settings.fake_delays,
            failure_rate=settings.fake_failure_rate,
            failure_permanent=settings.fake_failure_permanent,
        )
        return FakeRuntime(config, clock=clock, state_file=settings.fake_state_path())
    if settings.runtime == "linux":
        from devyard.runner.images.image import IdRange
        from devyard.runner.images.store import ImageStore, store_root
        from devyard.runner.linux.network import Network
        from devyard.runner.linux.runtime import LinuxRuntime

        id_range = IdRange(settings.id_range_start, settings.id_range_size)
        store = ImageStore(store_root(settings.state_dir), id_range=id_range, insecure=settings.insecure_registries)
        return LinuxRuntime(
            settings.state_dir,
            images=store,
            network=Network.from_settings(settings),
            stop_timeout=settings.stop_timeout,
            # As with the network's namespaces: another runner's cgroups must not look like this one's orphans.
            cgroup_parent="devyard" if settings.bridge == "devyard0" else f"devyard-{settings.bridge}",
        )
    raise ValueError(f"unknown runtime {settings.runtime!r}")


class Agent:
    def __init__(
        self,
        settings: RunnerSettings,
        *,
        runtime: Runtime | None = None,
        clock: Clock | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        retry: RetryPolicy | None = None,
        stop_grace: float = 10.0,
    ) -> None:
        """``runtime``, ``clock``, ``transport`` and ``retry`` replace the defaults, for tests and benchmarks."""
        self.settings = settings
        self.clock = clock or SystemClock()
        self.runtime = runtime or make_runtime(settings, self.clock)
        self.queue = WorkQueue(
            clock=self.clock, backoff=BackoffPolicy(base=settings.retry_base, cap=settings.retry_max)
        )
        self.runner_id: str | None = None
        self.informer: Informer[Environment] | None = None
        self.controller: Controller | None = None
        #: Heartbeats the server accepted; for tests and metrics.
        self.heartbeats = 0
        #: Ships the environments' logs to the server, once the agent has its credential.
        self.log_shipper: LogShipper | None = None
        #: The gateway, once it listens.
        self.gateway: Gateway | None = None
        #: The SSH gateway, when ``ssh_listen`` is set.
        self.ssh_gateway: ssh_gateway.SshGateway | None = None
        #: The port proxy, when ``ports_listen`` is set.
        self.port_proxy: ports.PortProxy | None = None
        self._gateway_key: asyncio.Future[bytes] | None = None
        #: When each environment was last used through a gateway; its reconcile reports it (idle timeouts).
        self.activity = Activity(self.queue.add)
        self._report_soon = asyncio.Event()
        self._transport = transport
        self._retry = retry or RetryPolicy()
        self._stop_grace = stop_grace
        self._stopping = asyncio.Event()
        self._started = asyncio.Event()
        self._controller_task: asyncio.Task[None] | None = None
        self._finished = asyncio.Event()
        self._failure: BaseException | None = None

    @property
    def synced(self) -> bool:
        """Whether the agent holds a complete, connected view of its environments."""
        return self.informer is not None and self.informer.synced

    async def wait_synced(self) -> None:
        """Wait until the agent has listed its environments; raises ``RuntimeError`` if ``run`` ends first."""
        synced = asyncio.ensure_future(self._wait_synced())
        finished = asyncio.ensure_future(self._finished.wait())
        try:
            await asyncio.wait({synced, finished}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            synced.cancel()
            finished.cancel()
        if not synced.done() or synced.cancelled():
            raise RuntimeError("the agent stopped before it listed its environments") from self._failure

    async def _wait_synced(self) -> None:
        await self._started.wait()
        assert self.informer is not None
        await self.informer.wait_synced()

    def stop(self) -> None:
        """Ask ``run`` to finish; safe to call from a signal handler, and more than once."""
        self._stopping.set()

    async def run(self) -> None:
        """Run until ``stop()``; raises ``CredentialError`` if the server will not have this runner."""
        serving = asyncio.create_task(self._serve(), name="runner-agent")
        stopping = asyncio.create_task(self._stopping.wait(), name="runner-agent-stop")
        try:
            await asyncio.wait({serving, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
            if not serving.done():
                await self._wind_down(serving)
            if not serving.cancelled():
                self._failure = serving.exception()
            self._finished.set()
        if self._failure is not None:
            raise self._failure

    async def _wind_down(self, serving: asyncio.Task[None]) -> None:
        await self.queue.shutdown()
        controller = self._controller_task
        if controller is not None and not controller.done():
            _, pending = await asyncio.wait({controller}, timeout=self._stop_grace)
            if pending:
                log.warning("reconciles still running after %.0fs; cancelling them", self._stop_grace)
        serving.cancel()
        await asyncio.gather(serving, return_exceptions=True)

    async def _serve(self) -> None:
        settings = self.settings
        credential = await credentials.obtain(
            settings.credential_path(),
            server=settings.server,
            exchange_token=settings.exchange_token,
            transport=self._transport,
            clock=self.clock,
            backoff=self._reconnect_policy(),
        )
        runner_id = credential.runner_id
        self.runner_id = runner_id
        lock = self._hold_state_lock()
        try:
            await self._serve_as(credential.token, runner_id)
        finally:
            if lock is not None:
                lock.close()

    def _hold_state_lock(self) -> IO[str] | None:
        """Lock the state directory while a linux runtime acts on the host: a second runner, or ``devyard runner
        doctor --fix``, repairing the same containers at once would undo each other's steps."""
        if self.runtime.name != "linux":
            return None
        lock = state_lock.hold(self.settings.state_dir)
        if lock is None:
            holder = state_lock.holder(self.settings.state_dir)
            raise StateDirInUse(
                f"another process (pid {holder}) holds {state_lock.lock_path(self.settings.state_dir)}: "
                "a runner, or `devyard runner doctor --fix`, already acts on this state directory"
            )
        return lock

    async def _serve_as(self, token: str, runner_id: str) -> None:
        settings = self.settings
        # Finish or undo what a previous process left half-done (killed in the middle of a start, say) before
        # anything else touches the containers.
        try:
            for repaired in await self.runtime.repair():
                log.warning("repaired: %s", repaired)
        except RunnerError as exc:
            log.error("cannot repair what a previous runner left on this host: %s", exc)
        client = AsyncClient(settings.server, token, transport=self._transport, retry=self._retry)
        try:
            self.informer = Informer(
                client,
                "/api/v1/environments",
                Environment,
                params={"runner_id": runner_id},
                owns=lambda environment: environment.status.runner_id == runner_id,
                on_change=self.queue.add,
                on_sync=self._queue_everything,
                clock=self.clock,
                reconnect=self._reconnect_policy(),
                bookmark_interval=settings.bookmark_interval,
            )
            self.log_shipper = LogShipper(client, settings.log_root(), clock=self.clock)
            reconciler = EnvironmentReconciler(
                client=client,
                runtime=self.runtime,
                informer=self.informer,
                default_image=settings.default_image,
                clock=self.clock,
                dev_containers=self._dev_containers(),
                requeue=self.queue.add,
                ssh_endpoint=self.ssh_endpoint,
                activity=self.activity,
                port_url=self._port_url,
            )
            self.controller = Controller(reconciler, self.queue, workers=settings.workers)
            log.info(
                "runner %s: %s runtime, %d workers, server %s",
                runner_id,
                self.runtime.name,
                settings.workers,
                settings.server,
            )
            self._controller_task = asyncio.create_task(self.controller.run(), name="runner-controller")
            loops = [
                self._controller_task,
                self._spawn(self._heartbeat(client, runner_id), "runner-heartbeat"),
                self._spawn(self.informer.run(), "runner-informer"),
                self._spawn(self._resync(), "runner-resync"),
                self._spawn(self.log_shipper.run(), "runner-log-shipper"),
                self._spawn(PortWatch(self.runtime, self._running, self.queue.add).run(), "runner-port-watch"),
            ]
            if settings.gateway_listen:
                loops.append(self._spawn(self._run_gateway(client, runner_id), "runner-gateway"))
            if settings.ports_listen:
                loops.append(self._spawn(self._run_port_proxy(client, runner_id), "runner-port-proxy"))
            if settings.ssh_listen:
                access = ssh_gateway.SshAccess(
                    runner_id, self._cached_environment, partial(ssh_gateway.server_authorized_keys, client)
                )
                self.ssh_gateway = ssh_gateway.SshGateway(
                    self.runtime,
                    access,
                    listen=settings.ssh_listen,
                    host_key_path=settings.ssh_host_key_path(),
                    activity=self.activity,
                )
                # Running environments report where to reach them by SSH: look at them again once it listens.
                serving = self.ssh_gateway.serve(on_listening=self._listener_ready)
                loops.append(self._spawn(serving, "runner-ssh-gateway"))
            self._started.set()
            await _until_one_fails(loops)
        finally:
            await asyncio.shield(self._close(client))

    def _dev_containers(self) -> DevContainers:
        """What makes dev containers: with the linux runtime, its image store (builds go there) and its network
        (builds' RUN steps get one like an environment's)."""
        settings = self.settings
        images, network = None, None
        if self.runtime.name == "linux":
            from devyard.runner.images.store import ImageStore
            from devyard.runner.linux.runtime import LinuxRuntime

            if isinstance(self.runtime, LinuxRuntime):
                images = self.runtime.images if isinstance(self.runtime.images, ImageStore) else None
                network = self.runtime.network
        return DevContainers(
            self.runtime,
            state_dir=settings.state_dir / "dev-containers",
            log_root=settings.log_root(),
            desktop=settings.desktop,
            images=images,
            network=network,
        )

    async def _close(self, client: AsyncClient) -> None:
        try:
            await self.runtime.close()
        except Exception:
            log.exception("closing the runtime failed")
        await client.aclose()

    def _spawn(self, coroutine: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        return asyncio.create_task(coroutine, name=name)

    def _reconnect_policy(self) -> BackoffPolicy:
        return BackoffPolicy(base=self.settings.reconnect_base, cap=self.settings.reconnect_max)

    async def _queue_everything(self, keys: Iterable[str]) -> None:
        """Queue ``keys`` and every container the runtime holds: those are all that may need a step."""
        wanted = set(keys)
        try:
            wanted.update(container.environment_id for container in await self.runtime.list())
        except Exception:
            log.exception("cannot list the runtime's containers; reconciling the known environments only")
        for key in sorted(wanted):
            self.queue.add(key)

    def _listener_ready(self) -> None:
        """A gateway listener (SSH, port proxy) got its port: the heartbeat reports it, and the running
        environments report how to reach them."""
        self._report_soon.set()
        self._queue_known()

    def _queue_known(self) -> None:
        """Queue every environment the informer knows."""
        known = self.informer.keys() if self.informer is not None else []
        for key in known:
            self.queue.add(key)

    async def _resync(self) -> None:
        interval = self.settings.resync_interval
        while True:
            await self.clock.sleep(interval * random.uniform(0.9, 1.1))
            assert self.informer is not None
            await self._queue_everything(self.informer.keys())

    async def _key(self, client: AsyncClient, runner_id: str) -> bytes:
        """The runner's gateway key, fetched once (retried with backoff) for the gateway and the port proxy."""
        if self._gateway_key is None:
            self._gateway_key = asyncio.ensure_future(self._fetch_key(client, runner_id))
        return await asyncio.shield(self._gateway_key)

    async def _fetch_key(self, client: AsyncClient, runner_id: str) -> bytes:
        backoff = Backoff(self._reconnect_policy())
        while True:
            try:
                answer = GatewayKey.model_validate(await client.get(f"/api/v1/runners/{runner_id}/gateway-key"))
                return decode_key(answer.key)
            except (ApiError, TransportError, ValueError) as exc:
                delay = backoff.next_delay()
                if backoff.failures == 1 or not isinstance(exc, TransportError):
                    log.warning("cannot fetch the gateway key, retrying in %.1fs: %s", delay, exc)
            await self.clock.sleep(delay)

    async def _run_port_proxy(self, client: AsyncClient, runner_id: str) -> None:
        """Fetch the gateway key, listen for the environments' ports, and serve until cancelled."""
        settings = self.settings
        key = await self._key(client, runner_id)

        async def whoami(token: str) -> ports.Identity:
            async with AsyncClient(
                settings.server, token, transport=self._transport, retry=RetryPolicy(attempts=2), timeout=10.0
            ) as asking:
                try:
                    answer = Whoami.model_validate(await asking.get("/api/v1/whoami"))
                except ApiError as exc:
                    if exc.status in (401, 403):
                        raise ports.TokenRefused(str(exc)) from exc
                    raise
            if answer.principal != "user":
                raise ports.TokenRefused("the token is not a user's")
            organizations = frozenset(
                m.metadata.organization_id for m in answer.memberships if m.metadata.organization_id
            )
            return ports.Identity(answer.id, organizations)

        async def allows_public_ports(organization_id: str) -> bool:
            found = Organization.model_validate(await client.get(f"/api/v1/organizations/{organization_id}"))
            return found.spec.policy.allow_public_ports

        access = ports.PortAccess(runner_id, key, self._cached_environment, whoami, allows_public_ports)
        proxy = ports.PortProxy(
            self.runtime,
            access,
            listen=settings.ports_listen,
            domain=settings.ports_domain,
            url=settings.ports_url,
            hostname=settings.hostname,
            activity=self.activity,
            max_connections=settings.ports_max_connections,
            max_per_client=settings.ports_max_connections_per_client,
        )
        self.port_proxy = proxy
        try:
            # Running environments report their ports' URLs: look at them again once it listens.
            await proxy.serve(on_listening=self._listener_ready)
        finally:
            self.port_proxy = None

    def _port_url(self, environment_id: str, port: int) -> str | None:
        proxy = self.port_proxy
        return proxy.port_url(environment_id, port) if proxy is not None else None

    def _running(self) -> list[str]:
        """The environments the informer holds as running on this runner."""
        informer = self.informer
        if informer is None:
            return []
        found, keys = [], informer.keys()
        for key in keys:
            environment = informer.get(key)
            if environment is not None and environment.status.phase is EnvironmentPhase.RUNNING:
                found.append(key)
        return found

    async def _run_gateway(self, client: AsyncClient, runner_id: str) -> None:
        """Fetch the gateway key, listen, and serve until cancelled."""
        settings = self.settings
        backoff = Backoff(self._reconnect_policy())
        key = await self._key(client, runner_id)
        check = TicketCheck(runner_id=runner_id, key=key, environment=self._cached_environment)
        gateway = Gateway(
            self.runtime,
            check,
            listen=settings.gateway_listen,
            url=settings.gateway_url,
            hostname=settings.hostname,
            activity=self.activity,
        )
        backoff.reset()
        while True:
            try:
                await gateway.start()
                break
            except OSError as exc:
                delay = backoff.next_delay()
                log.error("the gateway cannot listen on %s, retrying in %.1fs: %s", settings.gateway_listen, delay, exc)
            await self.clock.sleep(delay)
        self.gateway = gateway
        self._report_soon.set()
        try:
            await asyncio.Event().wait()
        finally:
            self.gateway = None
            await gateway.close()

    def _cached_environment(self, environment_id: str) -> Environment | None:
        return self.informer.get(environment_id) if self.informer is not None else None

    def _status(self) -> dict[str, Any]:
        settings = self.settings
        return RunnerStatusWrite(
            status=RunnerStatus(
                phase=RunnerPhase.ONLINE,
                version=__version__,
                runtime=self.runtime.name,
                hostname=settings.hostname,
                capacity=settings.capacity,
                gateway=self._gateway_endpoint(),
            )
        ).model_dump(mode="json")

    def _gateway_endpoint(self) -> GatewayEndpoint | None:
        ssh = self.ssh_endpoint()
        ports_url = self.port_proxy.base_url if self.port_proxy is not None else None
        if self.gateway is None and ssh is None and ports_url is None:
            return None
        return GatewayEndpoint(
            http_url=self.gateway.url if self.gateway is not None else None,
            ssh_host=ssh[0] if ssh else None,
            ssh_port=ssh[1] if ssh else None,
            ports_url=ports_url,
        )

    def ssh_endpoint(self) -> tuple[str, int] | None:
        """Where users reach the SSH gateway (host, port), once it listens: the host of ``gateway_url`` if one is
        configured, else the listening address (the host's name when it listens on every address)."""
        gateway = self.ssh_gateway
        if gateway is None or gateway.port is None:
            return None
        settings = self.settings
        host, _ = parse_listen(settings.ssh_listen)
        if settings.gateway_url:
            host = urllib.parse.urlsplit(settings.gateway_url).hostname or host
        elif host in ("0.0.0.0", "::", ""):
            host = settings.hostname
        return host, gateway.port

    async def _pause(self, delay: float) -> None:
        """Sleep ``delay`` seconds, or less when something asks for a report sooner."""
        if self._report_soon.is_set():
            self._report_soon.clear()
            return
        sleeping = asyncio.ensure_future(self.clock.sleep(delay))
        poked = asyncio.ensure_future(self._report_soon.wait())
        try:
            await asyncio.wait({sleeping, poked}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            sleeping.cancel()
            poked.cancel()
            await asyncio.gather(sleeping, poked, return_exceptions=True)
        self._report_soon.clear()

    async def _heartbeat(self, client: AsyncClient, runner_id: str) -> None:
        settings = self.settings
        interval = settings.heartbeat_interval
        backoff = Backoff(BackoffPolicy(base=min(0.5, interval), cap=interval))
        while True:
            try:
                await client.put(f"/api/v1/runners/{runner_id}/status", self._status())
            except ApiError as exc:
                if exc.status in (401, 403, 404):
                    raise CredentialError(f"the server no longer accepts runner {runner_id}: {exc}") from exc
                delay = backoff.next_delay()
                log.warning("heartbeat failed, retrying in %.1fs: %s", delay, exc)
            except TransportError as exc:
                delay = backoff.next_delay()
                if backoff.failures == 1:
                    log.warning("heartbeat failed, retrying: %s", exc)
            else:
                if backoff.failures:
                    log.info("heartbeat accepted again")
                backoff.reset()
                self.heartbeats += 1
                delay = interval * random.uniform(0.9, 1.1)
            await self._pause(delay)


async def _until_one_fails(tasks: list[asyncio.Task[None]]) -> None:
    """Wait for the tasks, all meant to run until cancelled; re-raise the first failure; cancel them all
    when leaving."""
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            failure = None if task.cancelled() else task.exception()
            if failure is not None:
                raise failure
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
