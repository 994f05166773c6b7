"""The read path's asyncio shell: each session's replica connections, and the monitor that keeps
the process's `ReadPool` (proxy/readroute.py) current.

A session that routes reads keeps one connection per replica it used (`SessionReads`), logged in
as its client's own account with its state restored there as on a switch (variables, character
set, schema): a replica read sees the session's settings. The state is versioned: whenever a
statement on the primary changed it (a SET, USE, a RESET), the version grows and each replica
connection is made again, with the new state, before its next read; that is how `SET` reaches
every connection of the session. Prepared statements are prepared on a replica the first time
one is executed there, under that replica's own statement id.

The monitor reads every non-primary server's replication (`SHOW SLAVE STATUS`, `gtid_slave_pos`)
each `routing.monitor_interval` over the admin account, in a thread, and quarantines from the
topology store; a server it cannot reach gets no reads.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from proxy import metrics
from proxy.backend import BackendConnection, BackendError
from proxy.packets import Command, frame
from proxy.readroute import ReadPool, ReplicaHealth, valid_position
from proxy.session import PreparedStatement, SessionState
from reparent.admin import AdminConnection, GtidVariable
from reparent.config import Config, ServerConfig
from reparent.mechanism import MechanismError
from reparent.store import TopologyStore
from reparent.topology import TopologyError

log = logging.getLogger(__name__)


@dataclass(slots=True)
class ReplicaConn:
    """A session's connection to one replica."""

    server: ServerConfig
    backend: BackendConnection
    version: int  # the session state's version it was made with
    statements: dict[int, int] = field(default_factory=dict)  # client id -> this server's id
    types: dict[int, bytes] = field(default_factory=dict)  # parameter types this server has
    covered: str = ""  # the last position a causal wait here reached


def execute_payload(
    stmt: PreparedStatement, payload: bytes, backend_id: int, types: bytes
) -> tuple[bytes, bytes]:
    """A COM_STMT_EXECUTE for a replica, and the parameter types that replica then has.
    `types`: those it has already. Types the client sends fresh become the statement's (the
    primary must be given them again: `rebound` is cleared)."""
    head = payload[:1] + backend_id.to_bytes(4, "little") + payload[5:10]
    if not stmt.params:
        return head + payload[10:], types
    flag_at = 10 + (stmt.params + 7) // 8
    if flag_at >= len(payload):
        return head + payload[10:], types
    if payload[flag_at] == 1:
        fresh = payload[flag_at + 1 : flag_at + 1 + 2 * stmt.params]
        if fresh != stmt.param_types:
            stmt.param_types = fresh
            stmt.rebound = False
        return head + payload[10:], fresh
    if types == stmt.param_types or not stmt.param_types:
        return head + payload[10:], types
    return (
        head + payload[10:flag_at] + b"\x01" + stmt.param_types + payload[flag_at + 1 :],
        stmt.param_types,
    )


class SessionReads:
    """One session's replica connections and what its reads need to know."""

    def __init__(self, state: SessionState) -> None:
        self.state = state
        self.conns: dict[str, ReplicaConn] = {}
        self.version = 0  # grows when the session's state changes on the primary
        # Replicas that refused the session (its login, or its state) at the state version
        # they refused: they get none of its reads until that state changes.
        self.refused: dict[str, int] = {}
        self.long_data: set[int] = set()  # statements given long data: they run on the primary
        self.target: str | None = None  # the replica chosen for the read in progress
        self.last: str | None = None  # the replica the previous command ran on (None: primary)
        self.sent: str | None = None  # the replica the read in progress was sent to
        self.tried: frozenset[str] = frozenset()  # replicas that failed under this read
        self.primary_only = False  # this command runs on the primary (a causal wait timed out)
        self.kind = "write"  # the command in progress, for the metrics: read or write
        self.client_slow = False  # the client reads slowly: replicas' results wait too

    def avoid(self) -> frozenset[str]:
        """The replicas this read must not go to: those that failed under it, and those
        that refused the session's current state."""
        version = self.version
        refused = [name for name, v in self.refused.items() if v == version]
        return self.tried.union(refused) if refused else self.tried

    def ready(self, name: str) -> ReplicaConn | None:
        """The connection to `name` if it is alive and has the session's current state."""
        conn = self.conns.get(name)
        if conn is None or not conn.backend.alive or conn.version != self.version:
            return None
        return conn

    def changed(self) -> None:
        self.version += 1

    def slow(self, slow: bool) -> None:
        self.client_slow = slow
        for conn in self.conns.values():
            conn.backend.pause_reading(slow)

    def drop(self, name: str) -> None:
        conn = self.conns.pop(name, None)
        if conn is not None:
            conn.backend.close(quit=False)
            metrics.BACKEND_CONNECTIONS.labels(name).dec()

    def close_all(self, quit: bool = True) -> None:
        for name in list(self.conns):
            conn = self.conns.pop(name)
            conn.backend.close(quit)
            metrics.BACKEND_CONNECTIONS.labels(name).dec()

    def forget_statement(self, client_id: int) -> list[tuple[BackendConnection, int]]:
        """COM_STMT_CLOSE: the replica connections that prepared it, with their ids."""
        self.long_data.discard(client_id)
        out = []
        for conn in self.conns.values():
            backend_id = conn.statements.pop(client_id, None)
            conn.types.pop(client_id, None)
            if backend_id is not None and conn.backend.alive:
                out.append((conn.backend, backend_id))
        return out

    def adopt(self, conn: ReplicaConn) -> None:
        old = self.conns.get(conn.server.name)
        if old is not None:
            old.backend.close()
            metrics.BACKEND_CONNECTIONS.labels(conn.server.name).dec()
        self.conns[conn.server.name] = conn
        metrics.BACKEND_CONNECTIONS.labels(conn.server.name).inc()
        if self.client_slow:
            conn.backend.pause_reading(True)


async def restore_on_replica(backend: BackendConnection, state: SessionState) -> None:
    """The session's variables and user variables on a new replica connection (its schema and
    collation went with the login). No tracking: nothing a replica read does is folded into
    the session's state."""
    assignments = state.restore_assignments()
    if assignments:
        await backend.query("SET " + ", ".join(assignments))


async def prepare_on(conn: ReplicaConn, stmt: PreparedStatement) -> int:
    parser, _ = await conn.backend.command(frame(bytes((Command.STMT_PREPARE,)) + stmt.sql, 0))
    conn.statements[stmt.client_id] = parser.backend_stmt_id
    conn.types[stmt.client_id] = b""
    return parser.backend_stmt_id


async def causal_wait(backend: BackendConnection, position: str, timeout: float) -> bool:
    """MASTER_GTID_WAIT on the replica: True once it applied `position`, False on timeout."""
    if not valid_position(position):
        return False
    rows = await backend.query(f"SELECT MASTER_GTID_WAIT('{position}', {timeout:.3f})")
    return bool(rows) and rows[0][0] == b"0"


class ReplicaMonitor:
    """Keeps `pool` current: each server but the primary, every `interval` seconds."""

    def __init__(
        self,
        config: Config,
        pool: ReadPool,
        primary: Callable[[], ServerConfig],
        store: TopologyStore | None,
    ) -> None:
        self.config = config
        self.pool = pool
        self.primary = primary
        self.store = store
        self._conns: dict[str, AdminConnection] = {}
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _run(self) -> None:
        interval = self.config.routing.monitor_interval
        while True:
            try:
                await self.round()
            except Exception:  # a bug here must not stop the monitor: log it, look again
                log.exception("replica monitor round failed")
            await asyncio.sleep(interval)

    async def round(self) -> None:
        """One look at every server but the primary, all at once."""
        shard = self.config.shard
        primary = self.primary().name
        quarantined: frozenset[str] = frozenset()
        if self.store is not None:
            try:
                topo = await asyncio.to_thread(self.store.read, shard.name)
                quarantined = topo.value.quarantined
            except TopologyError as e:
                log.debug("replica monitor: cannot read the topology: %s", e)
        servers = [s for s in shard.servers if s.name != primary]
        seen = await asyncio.gather(*(asyncio.to_thread(self._look, s) for s in servers))
        now = time.monotonic()
        for health in seen:
            health = ReplicaHealth(
                health.name,
                health.reachable,
                health.replicating,
                health.lag,
                health.position,
                health.name in quarantined,
            )
            self.pool.update(health, now)
            metrics.REPLICA_LAG.labels(health.name).set(
                health.lag if health.lag is not None else -1
            )
        self.pool.health.pop(primary, None)

    def _look(self, server: ServerConfig) -> ReplicaHealth:
        timeout = max(0.2, min(2.0, self.config.routing.monitor_interval))
        conn = self._conns.get(server.name)
        try:
            if conn is None or not conn.open:
                conn = AdminConnection(server, self.config.admin, timeout, self.config.backend)
                self._conns[server.name] = conn
            with conn.timeout(timeout):
                status = conn.replica_status()
                position = conn.gtid(GtidVariable.SLAVE_POS)
        except (MechanismError, OSError) as e:
            self._conns.pop(server.name, None)
            log.debug("replica monitor: %s unreachable: %s", server.name, e)
            return ReplicaHealth(server.name, reachable=False)
        if status is None:
            return ReplicaHealth(server.name, reachable=True, position=position or "")
        lag = status.get("Seconds_Behind_Master")
        return ReplicaHealth(
            server.name,
            reachable=True,
            replicating=status.get("Slave_IO_Running") == "Yes"
            and status.get("Slave_SQL_Running") == "Yes",
            lag=float(lag) if lag is not None else None,
            position=position or "",
        )


async def connect_replica(
    connect: Callable[[ServerConfig], Awaitable[BackendConnection]],
    server: ServerConfig,
    state: SessionState,
    version: int,
) -> ReplicaConn:
    """A new connection to `server` as the session's account, with its state."""
    backend = await connect(server)
    try:
        await restore_on_replica(backend, state)
    except (BackendError, asyncio.CancelledError):
        backend.close()
        raise
    return ReplicaConn(server, backend, version)
