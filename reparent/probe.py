"""Probing servers over the admin account: what each one says about itself, as `ServerView`s.

The failure detector (reparent/watch.py) probes every round; `baton ctl check`, the checks
before a manual reparent and `baton ctl adopt` probe once (`Prober.shard`). Every probe is
bounded by `timeout` for the connect, the greeting and each answer, so a stopped (SIGSTOP) or
unroutable server costs one timeout and reads as unreachable.

A replica names its source by host and port; a source that is no server of the config gets the
name "host:port" and is probed too (as an outsider), so that what the replicas follow can be
shown and judged even when the config does not know it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from reparent.admin import AdminConnection, AdminPool
from reparent.config import Config, Role, ServerConfig, ShardConfig
from reparent.mechanism import MechanismError
from reparent.survey import ServerView, ShardView
from reparent.topology import ShardTopology


class Prober:
    def __init__(self, config: Config, pool: AdminPool, timeout: float) -> None:
        self.config = config
        self.pool = pool
        self.timeout = timeout
        # A replica names its source by the source's replication address (a shim's, say).
        self._by_address = {
            address: s.name
            for shard in config.shards
            for s in shard.servers
            for address in ((s.host, s.port), (s.replication_host, s.replication_port))
        }

    def probe(self, server: ServerConfig) -> ServerView:
        """One server; unreachable, with the reason, if it does not answer within the timeout.
        Safe to run for different servers in parallel threads, never for one server twice."""
        try:
            return self._bounded(self.pool.get(server, self.config.admin, self.timeout))
        except MechanismError as e:
            return ServerView(server.name, reachable=False, error=str(e))

    def _read(self, conn: AdminConnection, name: str) -> ServerView:
        (row,) = conn.query(
            "SELECT @@global.read_only AS ro, @@global.server_id AS id,"
            " @@global.gtid_binlog_pos AS pos, @@global.gtid_binlog_state AS state"
        )
        # SHOW ALL SLAVES STATUS: SHOW SLAVE STATUS with the heartbeat columns.
        status = next(
            (r for r in conn.query("SHOW ALL SLAVES STATUS") if not r["Connection_name"]), None
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
                "received_pos": status["Gtid_IO_Pos"] or "",
            }
        return ServerView(
            name,
            reachable=True,
            read_only=bool(row["ro"]),
            server_id=int(row["id"]),
            binlog_pos=row["pos"] or "",
            binlog_state=row["state"] or "",
            source=source,
            **extra,
        )

    def outsiders(self, views: Iterable[ServerView]) -> list[ServerConfig]:
        """The sources `views` replicate from that the config does not name, to probe."""
        known = set(self._by_address.values())
        found: dict[str, ServerConfig] = {}
        for v in views:
            if v.source is None or v.source in known or v.source in found:
                continue
            host, _, port = v.source.rpartition(":")
            if host and port.isdigit():
                found[v.source] = ServerConfig(v.source, host, int(port), Role.REPLICA)
        return list(found.values())

    def shard(self, shard: ShardConfig, topo: ShardTopology, in_flight: bool) -> ShardView:
        """One round of the shard, all servers at once, then the outsiders they name."""
        views = self._each(shard.servers)
        outsiders = self._each(self.outsiders(views))
        return view(shard, topo, views, outsiders, in_flight)

    def _each(self, servers: Iterable[ServerConfig]) -> list[ServerView]:
        targets = list(servers)
        out = self.pool.each(targets, self.config.admin, self._bounded, self.timeout)
        return [
            r if isinstance(r, ServerView) else ServerView(s.name, False, error=str(r))
            for s, r in zip(targets, out.values(), strict=True)
        ]

    def _bounded(self, conn: AdminConnection) -> ServerView:
        with conn.timeout(self.timeout):
            return self._read(conn, conn.server.name)


def view(
    shard: ShardConfig,
    topo: ShardTopology,
    servers: Iterable[ServerView],
    outsiders: Iterable[ServerView],
    in_flight: bool,
) -> ShardView:
    return ShardView(
        shard=shard.name,
        primary=topo.primary,
        term=topo.term,
        servers=tuple(servers),
        quarantined=topo.quarantined,
        reparent_in_flight=in_flight,
        outsiders=tuple(outsiders),
    )
