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

It also holds the operator's handles on the picture a reparent acts on (reparent/survey.py):
before a manual reparent it probes the shard and refuses when the servers contradict the config
or the store, and an emergency reparent of a primary that answers and takes writes, unless
forced; `check` shows the comparison, `adopt` takes the servers' word for the primary when they
agree on one, and `quarantine` sets or lifts a quarantine by hand, showing the GTID check.
Those probes use connections of their own, opened per call: a `ctl check` may run while a
reparent uses the controller's pooled ones, and an `AdminConnection` serves one thread at once.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any, TypeVar

from reparent import durability, failpoint, gtid, metrics, survey
from reparent.admin import PROBE_TIMEOUT, AdminPool
from reparent.config import BackendSettings, Config, Durability, ServerConfig, ShardConfig
from reparent.mechanism import (
    Establishment,
    FailureKind,
    MechanismError,
    ReparentContext,
    Revocation,
)
from reparent.orchestrator import Action, Call, Orchestrator
from reparent.probe import Prober
from reparent.store import Lease, LockLostError, StoreUnavailableError, TopologyStore
from reparent.survey import Mismatch, ServerView, ShardView
from reparent.topology import (
    Established,
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
PREFLIGHT = "preflight"  # ... and for an operator's reparent's probe of the shard


class Initiator(enum.StrEnum):
    """Who asked for a reparent; it decides what is checked before it, and how long an
    emergency waits for its old primary's fence."""

    OPERATOR = "operator"  # baton ctl: the shard is probed and checked first, unless forced
    # The failure detector: its round was the check, moments ago, and the old primary did not
    # answer that round nor the two before it, so the emergency does not wait for it at all.
    DETECTOR = "detector"


class ReparentRefused(Exception):
    """The request cannot be carried out (unknown shard or server, a reparent already running,
    the store out of reach, servers that contradict the picture), or a reparent had to stop
    (its lock lost); the message says which, and what to do."""


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
        # What the failure detector last found wrong with each shard's picture (`observed`).
        self._mismatches: dict[str, tuple[Mismatch, ...]] = {}

    # -- entry points ----------------------------------------------------------------------

    async def reparent(
        self,
        kind: ReparentKind,
        shard: str,
        to: str | None = None,
        timeout: float | None = None,
        progress: Callable[[PhaseTiming], None] | None = None,
        force: bool = False,
        allow_unreachable: tuple[str, ...] = (),
        initiator: Initiator = Initiator.OPERATOR,
    ) -> ReparentRecord:
        """Run one reparent to its end and return its report.

        An operator's reparent probes the shard first and is refused when its servers
        contradict the picture, or (an emergency) when the primary answers and takes writes;
        `force` skips that, and so does the failure detector's (see Initiator).
        `allow_unreachable` names replicas an emergency under semi_sync may leave uncompared,
        at the risk of losing an acknowledged write only they received."""
        servers = self._servers(shard)
        if to is not None and to not in servers:
            raise ReparentRefused(f"no server {to!r} in shard {shard!r}")
        topo = (await self._store(self.store.read, shard)).value
        if to is not None and to == topo.primary:
            raise ReparentRefused(f"{to} is already the primary of shard {shard!r}")
        self._check_allowed(kind, shard, topo.primary, allow_unreachable)
        phases = []
        if initiator is Initiator.OPERATOR and not force:
            started, t0 = self.clock(), time.perf_counter()
            await asyncio.to_thread(self._preflight, kind, shard)
            ms = (time.perf_counter() - t0) * 1000
            phases.append(PhaseTiming(Step.STARTED, started, ms, PREFLIGHT))
            if progress is not None:
                progress(phases[-1])
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
                phases=phases,
                positions={},
                outcome=None,
                started_at=self.clock(),
                finished_at=None,
                allow_unreachable=tuple(sorted(allow_unreachable)),
            )
            if allow_unreachable:
                log.warning(
                    "reparent %s of %s: %s allowed unreachable by the operator; an acknowledged"
                    " write only they received would be lost",
                    record.id,
                    shard,
                    ", ".join(record.allow_unreachable),
                )
            orch = Orchestrator(record)
            wait = initiator is Initiator.OPERATOR
            return await self._held(lease, orch, orch.start(), timeout, progress, wait)
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
        wait_old_primary: bool = True,
    ) -> ReparentRecord:
        """Run the reparent while renewing its lock; a lock lost or a store out of reach
        stops it where it is (the journal says where), for a live Baton to resume."""
        keeper = asyncio.get_running_loop().create_task(self._keep(lease))
        try:
            return await self._run(orch, action, timeout, progress, lease, wait_old_primary)
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

    async def apply_durability(self, skip: frozenset[str] = frozenset()) -> None:
        """At start, after `resume`: every shard's reachable servers get the configured
        durability for the role the store gives them (reparent/durability.py). Shards in
        `skip` (their servers contradict the store) are left alone: master-side semi-sync set
        on a server that is really a replica would stall its replication."""
        for shard in self.config.shards:
            if shard.name in skip:
                log.warning("shard %s: durability not applied: the picture is wrong", shard.name)
                continue
            await asyncio.to_thread(self._apply_durability, shard)

    def _apply_durability(self, shard: ShardConfig) -> None:
        topo = self.store.read(shard.name).value
        servers = [s for s in shard.servers if s.name not in topo.quarantined]
        with _fresh_pool(self.config.backend) as pool:
            durability.apply(
                pool,
                servers,
                topo.primary,
                self.config.admin,
                self.config.replication,
                self.config.durability,
            )

    # -- the picture -----------------------------------------------------------------------

    def observed(self, shard: str, mismatches: tuple[Mismatch, ...]) -> None:
        """The failure detector's latest comparison of a shard (for `ctl status`, metrics)."""
        self._mismatches[shard] = mismatches
        metrics.MISMATCHES.labels(shard).set(len(mismatches))

    def mismatches(self, shard: str) -> tuple[Mismatch, ...]:
        return self._mismatches.get(shard, ())

    async def check_at_start(self, adopt: bool) -> frozenset[str]:
        """Compare every shard with its servers before anything acts on them; with `adopt`
        (`baton serve --adopt`) take the servers' word for a shard whose servers agree on
        another primary. Returns the shards that still disagree."""
        wrong = set()
        for shard in self.config.shards:
            try:
                view = await asyncio.to_thread(self._view, shard.name)
            except ReparentRefused as e:
                log.warning("shard %s: not compared with its servers at start: %s", shard.name, e)
                wrong.add(shard.name)
                continue
            found = survey.compare(view)
            self.observed(shard.name, found)
            if not found:
                continue
            for m in found:
                log.warning("shard %s: the servers disagree with the store: %s", shard.name, m)
            if adopt:
                try:
                    adopted = await self.adopt(shard.name)
                except ReparentRefused as e:
                    log.warning("shard %s: --adopt: %s", shard.name, e)
                else:
                    log.warning("shard %s: --adopt: %s", shard.name, adopted["summary"])
                    continue
            wrong.add(shard.name)
        return frozenset(wrong)

    async def check(self, shard: str) -> dict[str, Any]:
        """`baton ctl check`: the config and the store against what each server says."""
        self._shard_config(shard)
        view = await asyncio.to_thread(self._view, shard)
        found = survey.compare(view)
        try:
            adoptable: str | None = survey.adoptable(view)
            verdict = f"ctl adopt would make {adoptable} the primary at term {view.term + 1}"
        except survey.AdoptRefused as e:
            adoptable, verdict = None, f"ctl adopt would refuse: {e}"
        addresses = {s.name: f"{s.host}:{s.port}" for s in self._shard_config(shard).servers}
        rows = [_row(v, addresses.get(v.name, v.name), view) for v in view.servers]
        rows += [_row(v, v.name, view) for v in view.outsiders]
        notes = [
            f"{v.name}: heartbeat every {v.heartbeat_period:g} s from its source: a hung source"
            f" is seen only after {2 * v.heartbeat_period:g} s of silence"
            for v in view.servers
            if v.heartbeat_period > 1.0
        ]
        return {
            "shard": shard,
            "primary": view.primary,
            "term": view.term,
            "quarantined": sorted(view.quarantined),
            "consistent": not found,
            "mismatches": [m.to_dict() for m in found],
            "servers": rows,
            "adopt": {"primary": adoptable, "verdict": verdict},
            "notes": notes,
        }

    async def adopt(self, shard: str) -> dict[str, Any]:
        """`baton ctl adopt`: make the primary the servers agree on the store's primary, at a
        new term, when exactly one reading fits (survey.adoptable); then apply the durability
        to the shard as at start."""
        return await asyncio.to_thread(self._adopt, shard)

    def _adopt(self, shard: str) -> dict[str, Any]:
        with self._locked(shard, "adopt") as lease:
            view = self._view(shard)
            try:
                new = survey.adoptable(view)
            except survey.AdoptRefused as e:
                raise ReparentRefused(f"shard {shard}: nothing to adopt: {e}")
            current = self.store.read(shard)
            topo = current.value
            if (topo.primary, topo.term) != (view.primary, view.term):
                raise ReparentRefused(f"shard {shard} changed while it was probed; try again")
            term = topo.term + 1
            if not self.store.compare_and_set(
                shard, current.version, replace(topo, primary=new, term=term), lease=lease
            ):
                raise ReparentRefused(f"shard {shard} changed while adopting; try again")
            self.store.publish(Established(shard, new, term))
            summary = (
                f"adopted {new} as the primary at term {term} (the store said {topo.primary}"
                f" at term {topo.term})"
            )
            log.warning("shard %s: %s", shard, summary)
        self._apply_durability(self._shard_config(shard))
        self.observed(shard, ())
        return {
            "shard": shard,
            "old_primary": topo.primary,
            "new_primary": new,
            "term_before": topo.term,
            "term_after": term,
            "summary": summary,
        }

    async def quarantine(
        self, shard: str, server: str, on: bool, force: bool = False
    ) -> dict[str, Any]:
        """`baton ctl quarantine` / `unquarantine`: set or lift a quarantine by hand, under the
        shard's lock. The GTID check (does `server` hold transactions the primary never
        had?) is shown either way; lifting is refused while it finds some, or cannot be made,
        unless `force`. A quarantine set here also makes the server read_only if it answers;
        once lifted, the failure detector rejoins it as a replica."""
        return await asyncio.to_thread(self._quarantine, shard, server, on, force)

    def _quarantine(self, shard: str, server: str, on: bool, force: bool) -> dict[str, Any]:
        servers = self._servers(shard)
        if server not in servers:
            raise ReparentRefused(f"no server {server!r} in shard {shard!r}")
        with self._locked(shard, "quarantine") as lease:
            topo = self.store.read(shard).value
            if server == topo.primary:
                raise ReparentRefused(
                    f"{server} is the primary of shard {shard}; it cannot be"
                    " quarantined (move the primary first: prs or ers)"
                )
            if on == (server in topo.quarantined):
                raise ReparentRefused(
                    f"{server} is {'already' if on else 'not'} quarantined in shard {shard}"
                )
            with _fresh_pool(self.config.backend) as pool:
                prober = Prober(self.config, pool, PROBE_TIMEOUT)
                mine, primary = prober.probe(servers[server]), prober.probe(servers[topo.primary])
                check = _gtid_check(mine, primary)
                if not on and not check["clean"] and not force:
                    raise ReparentRefused(
                        f"{check['summary']}; not unquarantined: rebuild {server} from the"
                        " primary, or unquarantine --force"
                    )
                try:
                    self.set_quarantined(shard, server, on, lease)
                except MechanismError as e:
                    raise ReparentRefused(str(e))
                if on and mine.reachable:
                    try:
                        pool.get(servers[server], self.config.admin, PROBE_TIMEOUT).set_read_only(
                            True
                        )
                    except MechanismError as e:
                        log.warning("quarantine %s: not set read_only: %s", server, e)
        verb = "quarantined" if on else "unquarantined"
        log.warning("shard %s: %s %s by hand (%s)", shard, verb, server, check["summary"])
        return {"shard": shard, "server": server, "quarantined": on, "check": check}

    def set_quarantined(self, shard: str, server: str, on: bool, lease: Lease) -> None:
        """Mark `server` quarantined in the store (never routed to, chosen or replicated
        from) or lift it, while `lease` holds the shard's lock; MechanismError if the shard
        changed meanwhile."""
        current = self.store.read(shard)
        topo = current.value
        quarantined = topo.quarantined | {server} if on else topo.quarantined - {server}
        if not self.store.compare_and_set(
            shard, current.version, replace(topo, quarantined=quarantined), lease=lease
        ):
            raise MechanismError(
                FailureKind.INVALID, f"shard {shard} changed while (un)quarantining {server}"
            )

    def _preflight(self, kind: ReparentKind, shard: str) -> None:
        """Refuse a manual reparent that would act on a wrong picture, and an emergency one of
        a primary that answers and takes writes (a planned one loses nothing there)."""
        view = self._view(shard)
        found = survey.compare(view)
        self.observed(shard, found)
        if found:
            raise ReparentRefused(
                f"shard {shard}: the servers disagree with the config and store: "
                + "; ".join(str(m) for m in found)
                + f". See `baton ctl check`; fix that first, or {kind} --force"
            )
        primary = view.server(view.primary)
        if kind is ReparentKind.ERS and primary.reachable and not primary.read_only:
            raise ReparentRefused(
                f"{primary.name} is reachable and writable; use prs, or ers --force"
            )

    def _check_allowed(
        self, kind: ReparentKind, shard: str, primary: str, allowed: tuple[str, ...]
    ) -> None:
        if not allowed:
            return
        if kind is not ReparentKind.ERS or self.config.durability is not Durability.SEMI_SYNC:
            raise ReparentRefused(
                "--allow-unreachable only loosens the emergency reparent's rule under"
                " durability semi_sync (every replica compared); it means nothing here"
            )
        servers = self._servers(shard)
        for name in allowed:
            if name not in servers or name == primary:
                raise ReparentRefused(f"--allow-unreachable {name}: no replica {name!r} in shard")

    def _view(self, shard: str) -> ShardView:
        """One probe round of `shard` over connections of its own (in a worker thread)."""
        config = self._shard_config(shard)
        try:
            topo = self.store.read(shard).value
            in_flight = self.store.journal_get(shard) is not None
        except StoreUnavailableError as e:
            raise ReparentRefused(str(e))
        with _fresh_pool(self.config.backend) as pool:
            return Prober(self.config, pool, PROBE_TIMEOUT).shard(config, topo, in_flight)

    @contextmanager
    def _locked(self, shard: str, what: str) -> Iterator[Lease]:
        """The shard's lock for an operator's `what` (in a worker thread); refused while a
        reparent or a repair holds it, or the store is out of reach."""
        try:
            lease = self.store.lock(shard, self.owner, self.config.controller.lock_ttl)
        except StoreUnavailableError as e:
            raise ReparentRefused(str(e))
        if lease is None:
            raise ReparentRefused(
                f"shard {shard!r} is locked by a reparent or a repair; {what} again when it is done"
            )
        try:
            yield lease
        finally:
            try:
                self.store.unlock(lease)
            except TopologyError as e:
                log.warning("shard %s: lock not released (it lapses by itself): %s", shard, e)

    # -- the loop ------------------------------------------------------------------------------

    async def _run(
        self,
        orch: Orchestrator,
        action: Action,
        timeout: float | None,
        progress: Callable[[PhaseTiming], None] | None,
        lease: Lease,
        wait_old_primary: bool = True,
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
                result = await asyncio.to_thread(
                    self._call, action.call, orch, timeout, lease, wait_old_primary
                )
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

    def _call(
        self,
        call: Call,
        orch: Orchestrator,
        timeout: float | None,
        lease: Lease,
        wait_old_primary: bool = True,
    ) -> object:
        """One mechanism call, in a worker thread, only while the lock is still ours."""
        if not self.store.check(lease):
            raise LockLostError(f"{self.owner} lost the lock of shard {lease.shard}")
        ctx = replace(self._context(orch, timeout), wait_old_primary=wait_old_primary)
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
        revoked = orch.progress.revoked
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
            silent=frozenset(revoked.silent) if revoked is not None else frozenset(),
            allow_unreachable=frozenset(r.allow_unreachable),
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
        return {server.name: server for server in self._shard_config(shard).servers}

    def _shard_config(self, shard: str) -> ShardConfig:
        for s in self.config.shards:
            if s.name == shard:
                return s
        raise ReparentRefused(f"no shard {shard!r}")


@contextmanager
def _fresh_pool(backend: BackendSettings) -> Iterator[AdminPool]:
    pool = AdminPool(backend)
    try:
        yield pool
    finally:
        pool.close()


def _gtid_check(mine: ServerView, primary: ServerView) -> dict[str, Any]:
    """Does `mine` hold transactions the primary never had? Shown by quarantine commands."""
    check: dict[str, Any] = {
        "server": mine.name,
        "primary": primary.name,
        "server_gtid_binlog_state": mine.binlog_state if mine.reachable else None,
        "primary_gtid_binlog_state": primary.binlog_state if primary.reachable else None,
        "errant": None,
        "clean": False,
    }
    if not mine.reachable or not primary.reachable:
        down = mine if not mine.reachable else primary
        check["summary"] = f"GTID check not made: {down.name} does not answer ({down.error})"
        return check
    try:
        extra = survey.errant(mine, primary)
    except gtid.GtidError as e:
        check["summary"] = f"GTID check not made: {e}"
        return check
    check["errant"] = extra
    check["clean"] = not extra
    if extra:
        check["summary"] = (
            f"GTID check: {mine.name} has {extra}, which the primary {primary.name} never had"
            f" ({mine.name} {mine.binlog_state or '-'}; {primary.name}"
            f" {primary.binlog_state or '-'})"
        )
    else:
        check["summary"] = (
            f"GTID check: {mine.name} has nothing the primary {primary.name} lacks"
            f" ({mine.name} {mine.binlog_state or '-'}; {primary.name}"
            f" {primary.binlog_state or '-'})"
        )
    return check


def _row(v: ServerView, address: str, view: ShardView) -> dict[str, Any]:
    """One server of `ctl check`."""
    if v.name == view.primary:
        role = "primary"
    elif v.name in view.quarantined:
        role = "quarantined"
    elif v.name in view.names:
        role = "replica"
    else:
        role = "outside config"
    return {
        "name": v.name,
        "address": address,
        "store_role": role,
        "reachable": v.reachable,
        "read_only": v.read_only if v.reachable else None,
        "source": v.source,
        "io": v.io_running or None,
        "sql": v.sql_running or None,
        "heartbeat_period": v.heartbeat_period or None,
        "gtid_binlog_pos": v.binlog_pos if v.reachable else None,
        "gtid_received": v.received_pos or None,
        "error": v.error or None,
    }
