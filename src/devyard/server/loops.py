"""The management plane's control loops: scheduling, runner liveness, idle timeouts, change-feed compaction.

Every replica runs ``run``, but only the holder of the ``control-loops`` lease acts; when it dies its lease
lapses and another takes over. Each pass is level-based: it looks at the database as it is, so a pass that
fails is simply done again on the next tick.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import socket
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

from sqlalchemy import func, insert, or_, select, update
from sqlalchemy.exc import IntegrityError

from devyard.server.database.tables import LeaseRow, ResourceRow
from devyard.server.state import ServerState
from devyard.server.store import resources
from devyard.server.store.conditions import get_condition, set_condition
from devyard.server.store.runners import mark_environments
from devyard.wire.environments import EnvironmentPhase
from devyard.wire.runners import RunnerPhase

__all__ = ["check_liveness", "idle_since", "run", "schedule", "stop_idle"]

log = logging.getLogger(__name__)
LEASE = "control-loops"
_BATCH = 500
#: Environments placed closer together than this are a burst of creates...
_BURST_GAP = 0.25
#: ... whose next pass waits this long to gather more of them.
_BURST_GATHER = 0.02
_PENDING = select(ResourceRow.id).where(ResourceRow.kind == "Environment", ResourceRow.runner_id.is_(None))


async def _hold_lease(state: ServerState, holder: str, ttl: float) -> bool:
    now = resources.utcnow()
    expires = now + timedelta(seconds=ttl)
    try:
        async with state.database.write() as session:
            result = await session.execute(
                update(LeaseRow)
                .where(LeaseRow.name == LEASE, or_(LeaseRow.holder == holder, LeaseRow.expires_at < now))
                .values(holder=holder, expires_at=expires)
            )
            if result.rowcount:  # type: ignore[attr-defined]
                return True
            if await session.get(LeaseRow, LEASE) is not None:
                return False
            await session.execute(insert(LeaseRow).values(name=LEASE, holder=holder, expires_at=expires))
            return True
    except IntegrityError:
        return False


def _capacity(runner: ResourceRow) -> int:
    capacity = int(runner.status.get("capacity") or 0)
    cap = runner.spec.get("max_environments")
    return min(capacity, int(cap)) if cap is not None else capacity


async def schedule(state: ServerState) -> int:
    """Assign pending environments to online runners that offer their class and have room; returns how many."""
    async with state.database.read() as session:
        # Most wake-ups find nothing to place: find that out without taking the write lock.
        if await session.scalar(_PENDING.limit(1)) is None:
            return 0
    async with state.database.write() as session:
        tx = resources.Tx(session)
        pending = (
            await session.scalars(
                select(ResourceRow)
                .where(ResourceRow.kind == "Environment", ResourceRow.runner_id.is_(None))
                .order_by(ResourceRow.id)
                .limit(_BATCH)
            )
        ).all()
        if not pending:
            return 0
        organizations = {env.organization_id for env in pending}
        runners = (
            await session.scalars(
                select(ResourceRow)
                .where(ResourceRow.kind == "Runner", ResourceRow.organization_id.in_(organizations))
                .order_by(ResourceRow.id)
            )
        ).all()
        load: Counter[str] = Counter()
        if runners:
            rows = await session.execute(
                select(ResourceRow.runner_id, func.count())
                .where(ResourceRow.kind == "Environment", ResourceRow.runner_id.in_([r.id for r in runners]))
                .group_by(ResourceRow.runner_id)
            )
            load.update({runner_id: int(n) for runner_id, n in rows.all() if runner_id})
        class_ids = {env.spec.get("class_id") for env in pending} - {None}
        classes = (
            {
                row.id: row
                for row in (await session.scalars(select(ResourceRow).where(ResourceRow.id.in_(class_ids)))).all()
            }
            if class_ids
            else {}
        )
        assigned = 0
        for env in pending:
            if env.spec.get("desired_phase") == "deleted":
                env.status = {**env.status, "phase": EnvironmentPhase.DELETED.value}
                tx.remove(env, action=None)
                continue
            verdict = _place(env, runners, classes, load)
            if isinstance(verdict, ResourceRow):
                runner = verdict
                load[runner.id] += 1
                waited = (resources.utcnow() - env.created_at).total_seconds()
                status = set_condition(
                    env.status, "Scheduled", "True", "Assigned", f"assigned to runner {runner.name}", env.generation
                )
                status = set_condition(status, "RunnerAvailable", "True", "RunnerOnline", "", env.generation)
                env.status = {
                    **status,
                    "runner_id": runner.id,
                    "timings": {**status.get("timings", {}), "schedule": round(waited, 4)},
                }
                tx.modify(env, action="schedule", details={"runner_id": runner.id})
                assigned += 1
            else:
                reason, message = verdict
                current = get_condition(env.status, "Scheduled")
                if current is None or (current["status"], current["reason"], current["message"]) != (
                    "False",
                    reason,
                    message,
                ):
                    env.status = set_condition(env.status, "Scheduled", "False", reason, message, env.generation)
                    tx.modify(env, action=None)
        await tx.commit()
    if tx.last_revision is not None:
        state.feed.wake()
    return assigned


def _place(
    env: ResourceRow, runners: Sequence[ResourceRow], classes: dict[str, ResourceRow], load: Counter[str]
) -> ResourceRow | tuple[str, str]:
    class_id = env.spec.get("class_id")
    cls = classes.get(class_id) if class_id else None
    if class_id and cls is None:
        return "ClassNotFound", f"environment class {class_id} no longer exists"
    if cls is not None and not cls.spec.get("enabled", True):
        return "ClassDisabled", f"environment class {cls.name} is disabled"
    offering = [
        r
        for r in runners
        if r.organization_id == env.organization_id
        and (cls is None or not cls.spec.get("runner_ids") or r.id in cls.spec["runner_ids"])
    ]
    if not offering:
        what = f"class {cls.name}" if cls is not None else "environments"
        return "NoRunner", f"no runner of the organization offers {what}"
    online = [r for r in offering if r.status.get("phase") == RunnerPhase.ONLINE.value]
    if not online:
        return "NoRunnerOnline", f"no runner that offers it is online ({', '.join(r.name for r in offering[:5])})"
    roomy = [r for r in online if load[r.id] < _capacity(r)]
    if not roomy:
        return "NoCapacity", "every runner that offers it is full; it waits for room"
    chosen: ResourceRow = min(roomy, key=lambda r: (load[r.id] / max(_capacity(r), 1), r.id))
    return chosen


async def check_liveness(state: ServerState) -> int:
    """Mark runners silent past the deadline offline, and tell their environments; returns how many went."""
    cutoff = resources.utcnow() - timedelta(seconds=state.settings.heartbeat_timeout)
    async with state.database.write() as session:
        tx = resources.Tx(session)
        online = (
            await session.scalars(
                select(ResourceRow).where(ResourceRow.kind == "Runner", ResourceRow.phase == RunnerPhase.ONLINE.value)
            )
        ).all()
        gone = [r for r in online if _heard_before(r, cutoff)]
        for runner in gone:
            runner.status = set_condition(
                {**runner.status, "phase": RunnerPhase.OFFLINE.value},
                "Ready",
                "False",
                "HeartbeatMissed",
                f"no heartbeat since {runner.status.get('last_heartbeat_at')}",
            )
            tx.modify(runner, action="offline")
            await mark_environments(tx, runner, available=False)
        await tx.commit()
    if tx.last_revision is not None:
        state.feed.wake()
    return len(gone)


def idle_since(env: ResourceRow) -> datetime:
    """Since when nobody used a running environment: its last activity through the runner's gateways, or when
    it last became ready, whichever is later (a start counts as use)."""
    moments = [env.created_at]
    ready = get_condition(env.status, "Ready")
    if ready is not None and ready.get("status") == "True" and ready.get("last_transition_time"):
        moments.append(datetime.fromisoformat(str(ready["last_transition_time"])))
    if env.status.get("last_activity_at"):
        moments.append(datetime.fromisoformat(str(env.status["last_activity_at"])))
    return max(_aware(moment) for moment in moments)


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


async def stop_idle(state: ServerState) -> int:
    """Stop running environments nobody used for longer than their timeout (the environment's ``timeout``, else
    its organization's ``default_timeout``; 0 never); returns how many. The stop is a spec change, audited as
    ``idle-timeout``, and the runner carries it out as any stop: the disk is kept."""
    now = resources.utcnow()
    async with state.database.read() as session:
        running = (
            await session.scalars(
                select(ResourceRow).where(
                    ResourceRow.kind == "Environment",
                    ResourceRow.phase == EnvironmentPhase.RUNNING.value,
                    ResourceRow.desired_phase == "running",
                )
            )
        ).all()
        if not running:
            return 0
        organizations = {env.organization_id for env in running}
        defaults = {
            org.id: int(org.spec.get("policy", {}).get("default_timeout", 3600))
            for org in (await session.scalars(select(ResourceRow).where(ResourceRow.id.in_(organizations)))).all()
        }
    #: Environment id -> its timeout, for those past it.
    due: dict[str, int] = {}
    for env in running:
        timeout = env.spec.get("timeout")
        if timeout is None:
            timeout = defaults.get(env.organization_id or "", 0)
        if timeout and (now - idle_since(env)).total_seconds() > timeout:
            due[env.id] = int(timeout)
    if not due:
        return 0
    stopped = 0
    async with state.database.write() as session:
        tx = resources.Tx(session)
        rows = (await session.scalars(select(ResourceRow).where(ResourceRow.id.in_(due)))).all()
        for env in rows:
            # Read again under the write lock: one used or stopped meanwhile is left alone.
            idle = (now - idle_since(env)).total_seconds()
            if env.desired_phase != "running" or idle <= due[env.id]:
                continue
            env.spec = {**env.spec, "desired_phase": "stopped"}
            env.status = set_condition(
                env.status,
                "IdleTimeout",
                "True",
                "Idle",
                f"stopped after {_duration(idle)} without activity (timeout {_duration(due[env.id])}); "
                "`devyard env start` starts it again",
                env.generation + 1,
            )
            tx.modify(env, action="idle-timeout", details={"idle_seconds": round(idle)}, spec_changed=True)
            stopped += 1
        await tx.commit()
    if tx.last_revision is not None:
        state.feed.wake()
    return stopped


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _heard_before(runner: ResourceRow, cutoff: datetime) -> bool:
    heard = runner.status.get("last_heartbeat_at")
    if heard is None:
        return True
    return bool(datetime.fromisoformat(str(heard)) < cutoff)


async def run(state: ServerState) -> None:
    """Run the loops while this replica holds the lease; never returns, never lets an error end it."""
    holder = f"{socket.gethostname()}:{os.getpid()}:{random.getrandbits(32):08x}"
    interval = state.settings.loop_interval
    ttl = max(3 * interval, 5.0)
    last_compaction = 0.0
    last_idle_check = 0.0
    loop = asyncio.get_running_loop()
    leading = False
    last_placed = -_BURST_GAP
    while True:
        try:
            leading = await _hold_lease(state, holder, ttl)
            if leading:
                # Schedule as soon as something changes, a few times per lease renewal.
                renew_at = loop.time() + interval
                while loop.time() < renew_at:
                    state.schedule_soon.clear()
                    placed = await schedule(state)
                    if placed >= _BATCH:
                        continue
                    if placed:
                        last_placed = loop.time()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(state.schedule_soon.wait(), max(renew_at - loop.time(), 0.01))
                    # A create after a quiet spell is placed at once (someone waits for it); while creates keep
                    # coming, the next pass waits a little to take more of them at once.
                    if state.schedule_soon.is_set() and loop.time() - last_placed < _BURST_GAP:
                        await asyncio.sleep(_BURST_GATHER)
                await check_liveness(state)
                if loop.time() - last_idle_check > state.settings.idle_check_interval:
                    await stop_idle(state)
                    last_idle_check = loop.time()
                if loop.time() - last_compaction > state.settings.compaction_interval:
                    await state.feed.compact(timedelta(seconds=state.settings.watch_retention_seconds))
                    last_compaction = loop.time()
            else:
                await asyncio.sleep(interval * random.uniform(0.8, 1.2))
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("a control loop pass failed; it runs again in %.1fs", interval)
            await asyncio.sleep(interval * random.uniform(0.8, 1.2))
