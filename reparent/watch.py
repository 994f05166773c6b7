"""The failure detector's shell: probe every server each interval, act on the detector's word.

Probes run in worker threads of the watch's own over its own admin connections (not the
controller's: an `AdminConnection` serves one thread at a time), all servers of a shard at
once, each bounded by `detector.probe_timeout` for the connect, the greeting and every answer
(reparent/probe.py). A round waits for the servers that answered last time, up to that
timeout; a server that did not answer last time gets a fresh probe and `QUICK` seconds, and a
probe still unanswered then counts as a failed one for the round, and goes on alone. So a
stopped (SIGSTOP) primary costs the detector one timeout, the first time, and then rounds come
every interval as for a dead one: a hung primary is found as fast as a dead one. A probe that
answers after its round stopped waiting counts for the next round: a server that answers within
the timeout at least every other time (loaded, not hung) fails two rounds in a row at most.

A round is thrown away if the shard's topology, journal or history moved while it was probed:
a reparent's transient states (a candidate writable before the store names it) must never be
read as faults. Repairs run under the shard's lock, the one reparents take, after checking
again that nothing moved; an emergency reparent goes through the controller like `baton ctl
ers`, so its journal, events, report and metrics are the usual ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial

from reparent import metrics, probe
from reparent.admin import AdminConnection, AdminPool
from reparent.config import Config, ServerConfig, ShardConfig
from reparent.controller import Controller, Initiator, ReparentRefused
from reparent.detector import (
    Action,
    Detector,
    MakeWritable,
    Quarantine,
    Rejoin,
    Release,
    Report,
    RestartReplication,
    RunERS,
    ServerView,
    SetReadOnly,
    ShardView,
)
from reparent.establish import GtidEstablishment
from reparent.mechanism import MechanismError, ReparentContext
from reparent.store import LEADER, Lease, TopologyStore
from reparent.topology import Outcome, ReparentKind, ReparentRecord, TopologyError

log = logging.getLogger(__name__)

# Seconds the detector's lead outlives a leader that stopped renewing it (every round): how long
# a fleet is without failure detection after its leader dies, before another Baton leads.
LEADER_TTL = 3.0
REPAIR_LOCK_TTL = 30.0  # seconds; a repair takes milliseconds, a hung one gives the lock back
# Seconds a round waits for a server whose last probe went unanswered: enough for one that
# came back (a refused connect or an answer takes a millisecond on a LAN), and no more, so a
# hung server is not waited for round after round.
QUICK = 0.05

Generation = tuple[int, str | None, str | None]


class Watch:
    def __init__(
        self,
        config: Config,
        store: TopologyStore,
        controller: Controller,
        pool: AdminPool | None = None,
        clock: Callable[[], float] = time.monotonic,
        reported: Callable[[ReparentRecord], Awaitable[None]] | None = None,
    ) -> None:
        self.config = config
        self.settings = config.detector
        self.store = store
        self.controller = controller
        self.pool = pool or AdminPool(config.backend)
        self.clock = clock
        # Called with the report of each reparent the detector ran (the proxy adds its buffer
        # counts), in a task of its own: the shard is not kept busy meanwhile.
        self.reported = reported
        self.detector = Detector(self.settings)
        self.establishment = GtidEstablishment(pool=self.pool)
        self.prober = probe.Prober(config, self.pool, self.settings.probe_timeout)
        self.owner = f"{controller.owner}-detector"
        self._task: asyncio.Task[None] | None = None
        self._leader: Lease | None = None
        self._actions: set[asyncio.Task[None]] = set()
        # One thread per probe in flight: a hung server's probe must not queue the others'.
        servers = sum(len(s.servers) for s in config.shards)
        self._threads = ThreadPoolExecutor(2 * servers + 4, thread_name_prefix="baton-probe")
        self._in_flight: dict[tuple[str, int], asyncio.Future[ServerView]] = {}
        self._answered: dict[tuple[str, int], bool] = {}  # did its last probe answer in time?
        # Answers that came after their round stopped waiting: evidence for the next round.
        self._late: dict[tuple[str, int], ServerView] = {}

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self.run())
        log.info(
            "detector: probing every %.2f s, primary dead after %d failed probes and its "
            "replicas' word, cooldown %.0f s, repair %s",
            self.settings.interval,
            self.settings.failures,
            self.settings.cooldown,
            "on" if self.settings.repair else "off",
        )

    def close(self) -> None:
        for task in (self._task, *self._actions):
            if task is not None:
                task.cancel()
        self._threads.shutdown(wait=False, cancel_futures=True)
        if self._leader is not None:
            # Hand the lead over now rather than after the lease's TTL.
            with contextlib.suppress(TopologyError):
                self.store.unlock(self._leader)
        self.pool.close()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            if await self.lead():
                for shard in self.config.shards:
                    if self.detector.busy(shard.name):
                        continue
                    try:
                        await self.round(shard)
                    except Exception:
                        log.exception("detector: round of shard %s failed", shard.name)
            await asyncio.sleep(max(0.0, self.settings.interval - (loop.time() - started)))

    async def lead(self) -> bool:
        """Hold (or take) the fleet's detector lease: every Baton runs a detector, and only
        the leader probes and acts, so one failure gets one emergency reparent, not one per
        Baton. A store out of reach means not leading: nothing is decided then."""
        store = self.store
        try:
            if self._leader is not None:
                if await asyncio.to_thread(store.renew, self._leader):
                    return True
                log.warning("detector: lost the lead of the fleet's failure detection")
                self._leader = None
            self._leader = await asyncio.to_thread(store.lock, LEADER, self.owner, LEADER_TTL)
        except TopologyError as e:
            if self._leader is not None:
                log.warning("detector: not leading while the store is out of reach: %s", e)
            self._leader = None
            return False
        if self._leader is not None:
            log.warning("detector: leading the fleet's failure detection as %s", self.owner)
        return self._leader is not None

    async def round(self, shard: ShardConfig) -> list[Action]:
        """Probe one shard, decide, and start carrying out the actions; returns them."""
        observed = await self.observe(shard)
        if observed is None:
            return []
        view, generation, started = observed
        actions = self.detector.observe(view, started)
        self._publish_mismatches(shard.name)
        for action in actions:
            metrics.DETECTIONS.labels(view.shard, str(action.reason)).inc()
            if isinstance(action, Report):
                log.warning("detector: %s", action)
            else:
                log.warning("detector: decided %s", action)
        work = [a for a in actions if not isinstance(a, Report)]
        if work:
            task = asyncio.get_running_loop().create_task(self._carry_out(shard, work, generation))
            self._actions.add(task)
            task.add_done_callback(self._actions.discard)
        return actions

    def _publish_mismatches(self, shard: str) -> None:
        """The last judged round's mismatches, for `ctl status`, the metric and the log."""
        now = self.detector.mismatches(shard)
        if not now and self.controller.mismatches(shard):
            log.warning("detector: shard %s: the servers agree with config and store again", shard)
        self.controller.observed(shard, now)

    # -- probing -------------------------------------------------------------------------------

    async def observe(self, shard: ShardConfig) -> tuple[ShardView, Generation, float] | None:
        """One round of probes of `shard`: its view, the generation it was taken at, and when
        its probes were sent; None if the topology moved meanwhile."""
        before = await asyncio.to_thread(self._generation, shard.name)
        topo = await asyncio.to_thread(lambda: self.store.read(shard.name).value)
        started = self.clock()
        servers = await self._probe_all(list(shard.servers))
        for v in servers:
            if not v.reachable:
                metrics.PROBE_FAILURES.labels(v.name).inc()
        outsiders = await self._probe_all(self.prober.outsiders(servers))
        generation = await asyncio.to_thread(self._generation, shard.name)
        if generation != before:
            return None
        in_flight = generation[1] is not None
        return probe.view(shard, topo, servers, outsiders, in_flight), generation, started

    async def _probe_all(self, servers: list[ServerConfig]) -> list[ServerView]:
        """Probe `servers` at once (see the module's notes on how long a round waits)."""
        futures = {}
        for s in servers:
            key = (s.host, s.port)
            future = self._in_flight.get(key)
            if future is None or future.done():
                future = asyncio.wrap_future(self._threads.submit(self.prober.probe, s))
                future.add_done_callback(partial(self._landed, key))
                self._in_flight[key] = future
            futures[key] = future
        answering = [f for k, f in futures.items() if self._answered.get(k, True)]
        silent = [f for k, f in futures.items() if not self._answered.get(k, True)]
        if answering:
            # A probe bounds itself; this only guards against a probe that never returns.
            await asyncio.wait(answering, timeout=3 * self.settings.probe_timeout)
        if silent:
            await asyncio.wait(silent, timeout=QUICK)
        views = []
        for s in servers:
            key = (s.host, s.port)
            future = futures[key]
            late = self._late.pop(key, None)
            if future.done():
                v = future.result()
            elif late is not None:
                v = late  # it answered since the last round, after that round stopped waiting
            else:
                v = ServerView(s.name, reachable=False, error="no answer yet (probe in flight)")
            self._answered[key] = v.reachable
            views.append(v)
        return views

    def _landed(self, key: tuple[str, int], future: asyncio.Future[ServerView]) -> None:
        """Every probe that answers; the round that collects it takes it back out."""
        if not future.cancelled() and future.exception() is None and future.result().reachable:
            self._late[key] = future.result()

    def _generation(self, shard: str) -> Generation:
        """What changes whenever a reparent starts, ends or moves the shard."""
        journal = self.store.journal_get(shard)
        last = self.store.history(shard, 1)
        return (
            self.store.read(shard).version,
            journal.id if journal else None,
            last[0].id if last else None,
        )

    # -- acting --------------------------------------------------------------------------------

    async def _carry_out(
        self, shard: ShardConfig, actions: list[Action], generation: Generation
    ) -> None:
        try:
            if not any(isinstance(a, RunERS) for a in actions):
                # A repair talks to servers over the watch's connections; a probe left in
                # flight by the last round may still hold one (an ERS uses the controller's).
                pending = [f for f in self._in_flight.values() if not f.done()]
                if pending:
                    await asyncio.wait(pending)
            for action in actions:
                t0 = time.perf_counter()
                outcome = await self._act(shard, action, generation)
                metrics.DETECTOR_ACTIONS.labels(action.name, outcome).inc()
                log.warning(
                    "detector: %s %s: %s (%.0f ms)",
                    action.name,
                    action.server,
                    outcome,
                    (time.perf_counter() - t0) * 1000,
                )
                if outcome != "done":
                    break
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("detector: carrying out %s failed", actions)
        finally:
            self.detector.finished(shard.name, self.clock())

    async def _act(self, shard: ShardConfig, action: Action, generation: Generation) -> str:
        if isinstance(action, RunERS):
            decided = self.clock()
            metrics.LAST_DETECTION.labels(shard.name).set(time.time())
            metrics.DETECTION_SECONDS.labels(shard.name).observe(decided - action.first_sign)
            try:
                report = await self.controller.reparent(
                    ReparentKind.ERS, shard.name, None, initiator=Initiator.DETECTOR
                )
            except ReparentRefused as e:
                log.warning("detector: emergency reparent of %s refused: %s", shard.name, e)
                return "refused"
            if report.outcome is Outcome.SUCCEEDED:
                metrics.RECOVERY_SECONDS.labels(shard.name).observe(self.clock() - decided)
            if self.reported is not None:
                task = asyncio.get_running_loop().create_task(self.reported(report))
                self._actions.add(task)
                task.add_done_callback(self._actions.discard)
            log.warning(
                "detector: emergency reparent %s of %s: %s -> %s, %s%s",
                report.id,
                shard.name,
                report.old_primary,
                report.new_primary or "-",
                report.outcome,
                f" ({report.reason})" if report.reason else "",
            )
            return str(report.outcome)
        try:
            return await asyncio.to_thread(self._repair, shard, action, generation)
        except MechanismError as e:
            log.warning("detector: %s failed: %s", action, e)
            return "failed"

    def _repair(self, shard: ShardConfig, action: Action, generation: Generation) -> str:
        """One repair under the shard's lock, if the shard is as it was when probed."""
        lease = self.store.lock(shard.name, self.owner, REPAIR_LOCK_TTL)
        if lease is None:
            log.info("detector: %s skipped: a reparent holds the shard", action)
            return "skipped"
        try:
            if self._generation(shard.name) != generation:
                log.info("detector: %s skipped: the topology moved", action)
                return "skipped"
            servers = {s.name: s for s in shard.servers}
            server = servers[action.server]
            if isinstance(action, Quarantine | Release):
                self.controller.set_quarantined(
                    shard.name, action.server, isinstance(action, Quarantine), lease
                )
                if isinstance(action, Quarantine):
                    with contextlib.suppress(MechanismError):
                        self._conn(server).set_read_only(True)
                return "done"
            if isinstance(action, Rejoin):
                topo = self.store.read(shard.name).value
                live = tuple(s for n, s in servers.items() if n not in topo.quarantined)
                self.establishment.rejoin(
                    self._context(shard.name, live, server), server, servers[topo.primary]
                )
                return "done"
            conn = self._conn(server)
            if isinstance(action, RestartReplication):
                conn.start_replica()
            elif isinstance(action, SetReadOnly):
                conn.set_read_only(True)
            elif isinstance(action, MakeWritable):
                conn.set_read_only(False)
            else:
                raise AssertionError(f"no repair for {action!r}")
            return "done"
        finally:
            self.store.unlock(lease)

    def _conn(self, server: ServerConfig) -> AdminConnection:
        return self.pool.get(server, self.config.admin, self.settings.probe_timeout)

    def _context(
        self, shard: str, live: tuple[ServerConfig, ...], server: ServerConfig
    ) -> ReparentContext:
        return ReparentContext(
            shard=shard,
            servers=live,
            old_primary=server,
            candidate=None,
            admin=self.config.admin,
            replication=self.config.replication,
            timeout=self.config.controller.timeout,
            durability=self.config.durability,
        )
