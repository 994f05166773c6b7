"""The reparent controller's shell: carries out the orchestrator's actions.

For each action it journals the record, publishes the events and makes the mechanism call in a
worker thread, because mechanisms block on PyMySQL and the proxy's event loop must keep
relaying. A shard lock in the store keeps two reparents of one shard from running at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import replace

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
from reparent.store import TopologyStore
from reparent.topology import (
    PhaseTiming,
    ReparentKind,
    ReparentRecord,
    Step,
    TopologyEvent,
)

log = logging.getLogger(__name__)


class ReparentRefused(Exception):
    """The reparent cannot start (unknown shard or server, one already running)."""


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
        topo = self.store.read(shard).value
        if to is not None and to not in servers:
            raise ReparentRefused(f"no server {to!r} in shard {shard!r}")
        if to is not None and to == topo.primary:
            raise ReparentRefused(f"{to} is already the primary of shard {shard!r}")
        lease = self.store.lock(shard, self.owner, self.config.controller.lock_ttl)
        if lease is None:
            raise ReparentRefused(f"a reparent of shard {shard!r} is already running")
        try:
            if self.store.journal_get(shard) is not None:
                raise ReparentRefused(
                    f"shard {shard!r} has an unfinished reparent in the journal; "
                    "restart baton to resume it"
                )
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
            return await self._run(orch, orch.start(), timeout, progress)
        finally:
            self.store.unlock(lease)

    async def resume(self) -> list[ReparentRecord]:
        """Finish or undo every reparent a previous run left in the journal."""
        done = []
        for shard in self.store.shards():
            record = self.store.journal_get(shard)
            if record is None:
                continue
            lease = self.store.lock(shard, self.owner, self.config.controller.lock_ttl)
            if lease is None:
                log.warning("shard %s: cannot lock to resume reparent %s", shard, record.id)
                continue
            try:
                log.info("shard %s: resuming reparent %s from %s", shard, record.id, record.step)
                orch = Orchestrator(record)
                done.append(await self._run(orch, orch.resume(), None, None))
            finally:
                self.store.unlock(lease)
        return done

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
    ) -> ReparentRecord:
        while True:
            record = action.record
            # Journal writes fsync: keep them off the proxy's event loop too.
            if action.finished:
                record = replace(record, finished_at=self.clock())
                await asyncio.to_thread(self._journal, record, action.events, True)
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
            await asyncio.to_thread(self._journal, record, action.events, False)
            assert action.call is not None
            started = self.clock()
            t0 = time.perf_counter()
            failpoint.hit("before", action.call)
            try:
                result = await asyncio.to_thread(self._call, action.call, orch, timeout)
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
            action = orch.done(result) if error is None else orch.failed(error)

    def _journal(
        self, record: ReparentRecord, events: tuple[TopologyEvent, ...], finished: bool
    ) -> None:
        """Journal first, then publish: an event is never ahead of the journal."""
        if finished:
            self.store.journal_finish(record)
        else:
            self.store.journal_put(record)
        for event in events:
            self.store.publish(event)

    def _call(self, call: Call, orch: Orchestrator, timeout: float | None) -> object:
        """One mechanism call, in a worker thread."""
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
        return self._commit(orch)

    def _commit(self, orch: Orchestrator) -> None:
        """Publish the new primary and term, unless the shard changed under us."""
        r = orch.record
        new = r.new_primary or r.candidate
        current = self.store.read(r.shard)
        topo = current.value
        if topo.primary == new and topo.term == orch.new_term:
            return  # a resumed reparent whose commit had already happened
        if topo.term != r.term_before:
            raise MechanismError(
                FailureKind.INVALID, f"shard term moved to {topo.term} during the reparent"
            )
        updated = replace(topo, primary=new, term=orch.new_term)
        if not self.store.compare_and_set(r.shard, current.version, updated):
            raise MechanismError(FailureKind.INVALID, "shard topology changed during commit")

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
            wait_drained=lambda grace: self.store.wait_drained(r.shard, term, grace),
            grace=cfg.grace,
            durability=self.config.durability,
        )

    def _servers(self, shard: str) -> dict[str, ServerConfig]:
        for s in self.config.shards:
            if s.name == shard:
                return {server.name: server for server in s.servers}
        raise ReparentRefused(f"no shard {shard!r}")
