"""The failure detector's shell: probe every server each interval, act on the detector's word.

Probes run in a worker thread over the watch's own admin connections (not the controller's:
an `AdminConnection` serves one thread at a time), all servers of a shard at once, each bounded
by `detector.probe_timeout` for the connect, the greeting and every answer, so a server that is
stopped (SIGSTOP) or unroutable costs one timeout, not a stalled loop.

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
from dataclasses import replace
from typing import Any

from reparent import metrics
from reparent.admin import AdminConnection, AdminPool
from reparent.config import Config, ServerConfig, ShardConfig
from reparent.controller import Controller, ReparentRefused
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
from reparent.mechanism import FailureKind, MechanismError, ReparentContext
from reparent.store import LEADER, Lease, TopologyStore
from reparent.topology import ReparentKind, ReparentRecord, TopologyError

log = logging.getLogger(__name__)

# Seconds the detector's lead outlives a leader that stopped renewing it (every round): how long
# a fleet is without failure detection after its leader dies, before another Baton leads.
LEADER_TTL = 3.0
REPAIR_LOCK_TTL = 30.0  # seconds; a repair takes milliseconds, a hung one gives the lock back

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
        self.pool = pool or AdminPool()
        self.clock = clock
        # Called with the report of each reparent the detector ran (the proxy adds its buffer
        # counts), in a task of its own: the shard is not kept busy meanwhile.
        self.reported = reported
        self.detector = Detector(self.settings)
        self.establishment = GtidEstablishment(pool=self.pool)
        self.owner = f"{controller.owner}-detector"
        # A replica names its source by the source's replication address (a shim's, say).
        self._by_address = {
            address: s.name
            for shard in config.shards
            for s in shard.servers
            for address in ((s.host, s.port), (s.replication_host, s.replication_port))
        }
        self._task: asyncio.Task[None] | None = None
        self._leader: Lease | None = None
        self._actions: set[asyncio.Task[None]] = set()

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
        observed = await asyncio.to_thread(self.observe, shard)
        if observed is None:
            return []
        view, generation = observed
        actions = self.detector.observe(view, self.clock())
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

    # -- probing -------------------------------------------------------------------------------

    def observe(self, shard: ShardConfig) -> tuple[ShardView, Generation] | None:
        """One round of probes of `shard`, in a worker thread; None if the topology moved."""
        before = self._generation(shard.name)
        topo = self.store.read(shard.name).value
        results = self.pool.each(
            shard.servers, self.config.admin, self._probe, self.settings.probe_timeout
        )
        generation = self._generation(shard.name)
        if generation != before:
            return None
        servers = []
        for s in shard.servers:
            result = results[s.name]
            if isinstance(result, ServerView):
                servers.append(result)
            else:
                metrics.PROBE_FAILURES.labels(s.name).inc()
                servers.append(ServerView(s.name, reachable=False, error=str(result)))
        view = ShardView(
            shard=shard.name,
            primary=topo.primary,
            term=topo.term,
            servers=tuple(servers),
            quarantined=topo.quarantined,
            reparent_in_flight=generation[1] is not None,
        )
        return view, generation

    def _generation(self, shard: str) -> Generation:
        """What changes whenever a reparent starts, ends or moves the shard."""
        journal = self.store.journal_get(shard)
        last = self.store.history(shard, 1)
        return (
            self.store.read(shard).version,
            journal.id if journal else None,
            last[0].id if last else None,
        )

    def _probe(self, conn: AdminConnection) -> ServerView:
        with conn.timeout(self.settings.probe_timeout):
            (row,) = conn.query(
                "SELECT @@global.read_only AS ro, @@global.server_id AS id,"
                " @@global.gtid_binlog_pos AS pos, @@global.gtid_binlog_state AS state"
            )
            # SHOW ALL SLAVES STATUS: SHOW SLAVE STATUS without the heartbeat columns.
            status = next(
                (r for r in conn.query("SHOW ALL SLAVES STATUS") if not r["Connection_name"]),
                None,
            )
        source: str | None = None
        extra: dict[str, Any] = {}
        if status is not None:
            address = (status["Master_Host"], int(status["Master_Port"]))
            source = self._by_address.get(address, f"{address[0]}:{address[1]}")
            extra = {
                "io_running": status["Slave_IO_Running"],
                "sql_running": status["Slave_SQL_Running"],
                "io_errno": int(status["Last_IO_Errno"] or 0),
                "sql_errno": int(status["Last_SQL_Errno"] or 0),
                "received": "{}:{}:{}:{}".format(
                    status["Slave_received_heartbeats"],
                    status["Master_Log_File"],
                    status["Read_Master_Log_Pos"],
                    status["Gtid_IO_Pos"],
                ),
                "heartbeat_period": float(status["Slave_heartbeat_period"] or 0),
            }
        return ServerView(
            conn.server.name,
            reachable=True,
            read_only=bool(row["ro"]),
            server_id=int(row["id"]),
            binlog_pos=row["pos"] or "",
            binlog_state=row["state"] or "",
            source=source,
            **extra,
        )

    # -- acting --------------------------------------------------------------------------------

    async def _carry_out(
        self, shard: ShardConfig, actions: list[Action], generation: Generation
    ) -> None:
        try:
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
            metrics.LAST_DETECTION.labels(shard.name).set(time.time())
            metrics.DETECTION_SECONDS.labels(shard.name).set(action.unreachable_for)
            try:
                report = await self.controller.reparent(ReparentKind.ERS, shard.name, None)
            except ReparentRefused as e:
                log.warning("detector: emergency reparent of %s refused: %s", shard.name, e)
                return "refused"
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
                self._set_quarantine(
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

    def _set_quarantine(self, shard: str, server: str, on: bool, lease: Lease) -> None:
        current = self.store.read(shard)
        topo = current.value
        quarantined = topo.quarantined | {server} if on else topo.quarantined - {server}
        if not self.store.compare_and_set(
            shard, current.version, replace(topo, quarantined=quarantined), lease=lease
        ):
            raise MechanismError(
                FailureKind.INVALID, f"shard {shard} changed while (un)quarantining {server}"
            )

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
