"""The reparent controller's shell: carries out the orchestrator's actions.

For each action it journals the record with its events (one write) and makes the mechanism call
in a worker thread, because mechanisms block on PyMySQL and the proxy's event loop must keep
relaying; store calls go to threads too, since a remote store may take a round trip or time out.

A shard lock in the store keeps two reparents of one shard from running at once, across a
fleet of Batons: the controller renews it while it runs, every journal and topology write
checks it in the same atomic write, and it is checked again before each mechanism call, so a
controller that lost it (stopped, cut off from the store) stops touching servers. Any Baton
finishes or undoes a reparent whose controller died (`follow`): it finds a journal whose lock
lapsed, takes the lock and resumes it from the journal.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from typing import TypeVar

from reparent import durability, failpoint, metrics
from reparent.admin import AdminPool
from reparent.config import Config, ServerConfig
from reparent.mechanism import (
    Establishment,
    FailureKind,
    MechanismError,
    ReparentContext,
    Revocation,
)
from reparent.orchestrator import Action, Call, Orchestrator
from reparent.store import Lease, LockLostError, StoreUnavailableError, TopologyStore
from reparent.topology import (
    PhaseTiming,
    ReparentKind,
    ReparentRecord,
    ShardTopology,
    Step,
    TopologyError,
    TopologyEvent,
)

log = logging.getLogger(__name__)

T = TypeVar("T")


FOLLOW_INTERVAL = 1.0  # seconds between looks for a reparent whose controller died
JOURNAL = "journal"  # the report's name for a store write's phase


class ReparentRefused(Exception):
    """The reparent cannot start (unknown shard or server, one already running, the store out
    of reach), or had to stop (its lock lost); the message says which."""


class Controller:
    def __init__(
        self,
        config: Config,
        store: TopologyStore,
        revocations: dict[ReparentKind, Revocation],
        establishment: Establishment,
        owner: str = "",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.store = store
        self.revocations = revocations
        self.establishment = establishment
        self.owner = owner or f"baton-{uuid.uuid4().hex[:8]}"
        self.clock = clock

    # -- entry points ----------------------------------------------------------------------

    async def reparent(
        self,
        kind: ReparentKind,
        shard: str,
        to: str | None = None,
        timeout: float | None = None,
        progress: Callable[[PhaseTiming], None] | None = None,
    ) -> ReparentRecord:
        """Run one reparent to its end and return its report."""
        servers = self._servers(shard)
        if to is not None and to not in servers:
            raise ReparentRefused(f"no server {to!r} in shard {shard!r}")
        topo = (await self._store(self.store.read, shard)).value
        if to is not None and to == topo.primary:
            raise ReparentRefused(f"{to} is already the primary of shard {shard!r}")
        lease = await self._store(
            self.store.lock, shard, self.owner, self.config.controller.lock_ttl
        )
        if lease is None:
            holder = await self._store(self.store.lock_owner, shard)
            raise ReparentRefused(
                f"a reparent of shard {shard!r} is already running"
                + (f" (the lock is held by {holder})" if holder else "")
            )
        try:
            unfinished = await self._store(self.store.journal_get, shard)
            if unfinished is not None:
                raise ReparentRefused(
                    f"shard {shard!r} has an unfinished reparent {unfinished.id} in the journal "
                    f"(at {unfinished.step}); a Baton finishes or undoes it within "
                    f"{self.config.controller.lock_ttl:g} s: retry then"
                )
            topo = (await self._store(self.store.read, shard)).value  # as of holding the lock
            record = ReparentRecord(
                id=uuid.uuid4().hex[:12],
                kind=kind,
                shard=shard,
                old_primary=topo.primary,
                requested=to,
                candidate=None,
                new_primary=None,
                term_before=topo.term,
                term_after=None,
                step=Step.STARTED,
                phases=[],
                positions={},
                outcome=None,
                started_at=self.clock(),
                finished_at=None,
            )
            orch = Orchestrator(record)
            return await self._held(lease, orch, orch.start(), timeout, progress)
        finally:
            await self._release(lease)

    async def resume(self) -> list[ReparentRecord]:
        """Finish or undo every reparent left in the journal by a controller that died (this
        Baton's previous run, or another Baton of the fleet): those whose lock is free."""
        done = []
        for shard in await self._store(self.store.shards):
            record = await self._store(self.store.journal_get, shard)
            if record is None:
                continue
            lease = await self._store(
                self.store.lock, shard, self.owner, self.config.controller.lock_ttl
            )
            if lease is None:
                continue  # its controller is alive (or its lock not yet lapsed)
            try:
                # Read again under the lock: the controller may have finished it meanwhile.
                record = await self._store(self.store.journal_get, shard)
                if record is None:
                    continue
                log.warning(
                    "shard %s: resuming reparent %s from %s (its controller is gone)",
                    shard,
                    record.id,
                    record.step,
                )
                orch = Orchestrator(record)
                done.append(await self._held(lease, orch, orch.resume(), None, None))
            except ReparentRefused as e:
                log.warning("shard %s: resuming reparent %s stopped: %s", shard, record, e)
            finally:
                await self._release(lease)
        return done

    async def follow(self) -> None:
        """For ever: finish or undo any reparent whose controller died (its lock lapsed with
        the journal unfinished). Every Baton runs this; the shard lock lets one of them act.
        Each proxy adds its own buffer counts to the report when the switch ends for it."""
        reachable = True
        while True:
            await asyncio.sleep(FOLLOW_INTERVAL)
            try:
                for report in await self.resume():
                    log.warning("resumed reparent %s: %s", report.id, report.outcome)
                reachable = True
            except ReparentRefused as e:
                if reachable:
                    log.warning("cannot look for unfinished reparents: %s", e)
                reachable = False

    async def _store(self, call: Callable[..., T], *args: object) -> T:
        """A store call off the event loop; unreachable means nothing can start."""
        try:
            return await asyncio.to_thread(call, *args)
        except StoreUnavailableError as e:
            raise ReparentRefused(str(e))

    async def _release(self, lease: Lease) -> None:
        try:
            await asyncio.to_thread(self.store.unlock, lease)
        except TopologyError as e:
            log.warning("shard %s: lock not released (it lapses by itself): %s", lease.shard, e)

    async def _held(
        self,
        lease: Lease,
        orch: Orchestrator,
        action: Action,
        timeout: float | None,
        progress: Callable[[PhaseTiming], None] | None,
    ) -> ReparentRecord:
        """Run the reparent while renewing its lock; a lock lost or a store out of reach
        stops it where it is (the journal says where), for a live Baton to resume."""
        keeper = asyncio.get_running_loop().create_task(self._keep(lease))
        try:
            return await self._run(orch, action, timeout, progress, lease)
        except (LockLostError, StoreUnavailableError) as e:
            r = orch.record
            raise ReparentRefused(
                f"reparent {r.id} of shard {r.shard} stopped at {r.step}: {e}; a Baton that "
                "holds the shard's lock next finishes or undoes it from the journal"
            )
        finally:
            keeper.cancel()

    async def _keep(self, lease: Lease) -> None:
        """Renew the lock every third of its ttl; a failed renewal is found by the check
        before the next call or write."""
        while True:
            await asyncio.sleep(max(0.5, lease.ttl / 3))
            try:
                if not await asyncio.to_thread(self.store.renew, lease):
                    log.error("shard %s: the reparent's lock lapsed", lease.shard)
                    return
            except TopologyError as e:
                log.warning("shard %s: lock not renewed: %s", lease.shard, e)

    async def apply_durability(self) -> None:
        """At start, after `resume`: every shard's reachable servers get the configured
        durability for the role the store gives them (reparent/durability.py)."""
        pool = AdminPool()
        try:
            for shard in self.config.shards:
                topo = self.store.read(shard.name).value
                servers = [s for s in shard.servers if s.name not in topo.quarantined]
                await asyncio.to_thread(
                    durability.apply,
                    pool,
                    servers,
                    topo.primary,
                    self.config.admin,
                    self.config.replication,
                    self.config.durability,
                )
        finally:
            pool.close()

    # -- the loop ------------------------------------------------------------------------------

    async def _run(
        self,
        orch: Orchestrator,
        action: Action,
        timeout: float | None,
        progress: Callable[[PhaseTiming], None] | None,
        lease: Lease,
    ) -> ReparentRecord:
        commit: tuple[int, ShardTopology] | None = None  # a planned switch's last write
        while True:
            record = action.record
            # Journal writes fsync: keep them off the proxy's event loop too.
            if action.finished:
                record = replace(record, finished_at=self.clock())
                write = self._finish_with(commit) if commit is not None else self._finish
                timing = await self._timed(write, record, action.events, lease)
                # The final write's own time is in the report returned and in the metrics,
                # not in the stored copy (it was written by then).
                record = replace(record, phases=[*record.phases, timing])
                if progress is not None:
                    progress(timing)
                metrics.observe(record)
                log.info(
                    "reparent %s %s of %s: %s -> %s, %s%s",
                    record.id,
                    record.kind,
                    record.shard,
                    record.old_primary,
                    record.new_primary or "-",
                    record.outcome,
                    f" ({record.reason})" if record.reason else "",
                )
                return record
            if action.journal:
                timing = await self._timed(self._put, record, action.events, lease)
                orch.timed(timing)
                if progress is not None:
                    progress(timing)
            assert action.call is not None
            started = self.clock()
            t0 = time.perf_counter()
            failpoint.hit("before", action.call)
            try:
                result = await asyncio.to_thread(self._call, action.call, orch, timeout, lease)
            except MechanismError as e:
                result, error = None, e
            else:
                error = None
            failpoint.hit("after", action.call)
            timing = PhaseTiming(
                record.step, started, (time.perf_counter() - t0) * 1000, str(action.call)
            )
            orch.timed(timing)
            if progress is not None:
                progress(timing)
            if action.call is Call.COMMIT and isinstance(result, tuple):
                commit, result = result, None  # written with the final record
            action = orch.done(result) if error is None else orch.failed(error)

    async def _timed(
        self,
        write: Callable[[ReparentRecord, tuple[TopologyEvent, ...], Lease], None],
        record: ReparentRecord,
        events: tuple[TopologyEvent, ...],
        lease: Lease,
    ) -> PhaseTiming:
        """One store write, off the event loop; its duration is a phase of the report of its
        own (`journal`), so a slow disk or a slow etcd shows apart from the servers' calls."""
        started = self.clock()
        t0 = time.perf_counter()
        await asyncio.to_thread(write, record, events, lease)
        return PhaseTiming(record.step, started, (time.perf_counter() - t0) * 1000, JOURNAL)

    def _put(self, record: ReparentRecord, events: tuple[TopologyEvent, ...], lease: Lease) -> None:
        """The step and its events in one write: an event is never ahead of the journal."""
        self.store.journal_put(record, events, lease=lease)

    def _finish(
        self, record: ReparentRecord, events: tuple[TopologyEvent, ...], lease: Lease
    ) -> None:
        self.store.journal_finish(record, events, lease=lease)

    def _finish_with(
        self, commit: tuple[int, ShardTopology]
    ) -> Callable[[ReparentRecord, tuple[TopologyEvent, ...], Lease], None]:
        """The final write of a planned switch: new primary and term with the finished record.
        Only a config's server list adopted by another Baton can move the shard's version
        meanwhile (the lock keeps other writers out): then it is read and tried again."""

        def write(record: ReparentRecord, events: tuple[TopologyEvent, ...], lease: Lease) -> None:
            version, topo = commit
            for _ in range(3):
                if self.store.commit_finish(record, version, topo, events, lease=lease):
                    return
                current = self.store.read(record.shard)
                if (current.value.primary, current.value.term) != (
                    record.old_primary,
                    record.term_before,
                ):
                    break
                version = current.version
                topo = replace(current.value, primary=topo.primary, term=topo.term)
            raise TopologyError(
                f"shard {record.shard}: the topology moved during the switch; the journal "
                "still says it holds, so the switch is undone when it is resumed"
            )

        return write

    def _call(self, call: Call, orch: Orchestrator, timeout: float | None, lease: Lease) -> object:
        """One mechanism call, in a worker thread, only while the lock is still ours."""
        if not self.store.check(lease):
            raise LockLostError(f"{self.owner} lost the lock of shard {lease.shard}")
        ctx = self._context(orch, timeout)
        p = orch.progress
        kind = orch.record.kind
        if call is Call.CHOOSE:
            return self.establishment.choose(ctx)
        if call is Call.PREPARE:
            assert p.candidate is not None
            return self.establishment.prepare(ctx, p.candidate)
        if call is Call.REVOKE:
            return self.revocations[kind].revoke(ctx)
        if call is Call.ESTABLISH:
            assert p.candidate is not None and p.revoked is not None
            return self.establishment.establish(ctx, p.candidate, p.revoked)
        if call is Call.ABANDON:
            assert p.candidate is not None
            return self.establishment.abandon(ctx, p.candidate)
        if call is Call.UNDO:
            return self.revocations[kind].undo(ctx, p.revoked)
        return self._commit(orch, lease)

    def _commit(self, orch: Orchestrator, lease: Lease) -> tuple[int, ShardTopology] | None:
        """Publish the new primary and term, unless the shard changed under us. A planned
        switch only checks here and returns the write, which goes with its final one."""
        r = orch.record
        new = r.new_primary or r.candidate
        current = self.store.read(r.shard)
        topo = current.value
        if topo.primary == new and topo.term == orch.new_term:
            return None  # a resumed reparent whose commit had already happened
        if topo.term != r.term_before:
            raise MechanismError(
                FailureKind.INVALID, f"shard term moved to {topo.term} during the reparent"
            )
        updated = replace(topo, primary=new, term=orch.new_term)
        if orch.planned:
            return current.version, updated
        if not self.store.compare_and_set(r.shard, current.version, updated, lease=lease):
            raise MechanismError(FailureKind.INVALID, "shard topology changed during commit")
        return None

    def _context(self, orch: Orchestrator, timeout: float | None) -> ReparentContext:
        r = orch.record
        servers = self._servers(r.shard)
        topo = self.store.read(r.shard).value
        live = tuple(s for name, s in servers.items() if name not in topo.quarantined)
        chosen = r.candidate or r.requested
        cfg = self.config.controller
        term = orch.new_term
        return ReparentContext(
            shard=r.shard,
            servers=live,
            old_primary=servers[r.old_primary],
            candidate=servers[chosen] if chosen else None,
            admin=self.config.admin,
            replication=self.config.replication,
            timeout=timeout or cfg.timeout,
            wait_drained=lambda grace: self._wait_drained(orch, term, grace),
            grace=cfg.grace,
            durability=self.config.durability,
        )

    def _wait_drained(self, orch: Orchestrator, term: int, grace: float) -> bool:
        """Wait for the proxies; the report names those that did not report drained."""
        drain = self.store.wait_drained(orch.record.shard, term, grace)
        if drain.missing:
            log.warning(
                "shard %s: going ahead without a drained report from %s",
                orch.record.shard,
                ", ".join(drain.missing),
            )
        orch.not_drained(drain.missing)
        return drain.drained

    def _servers(self, shard: str) -> dict[str, ServerConfig]:
        for s in self.config.shards:
            if s.name == shard:
                return {server.name: server for server in s.servers}
        raise ReparentRefused(f"no shard {shard!r}")
