"""The controller's admin connection to one MariaDB server, and a pool that keeps one per server.

Every statement a reparent sends goes through `AdminConnection`, so that timeouts and error
classification live in one place: a server that does not answer is `UNREACHABLE`, a server that
answers with an error is `REFUSED`, and every message starts with the server's name. The
mechanisms then only say what to do, not how to survive the network.

Why the connections are kept in a pool: a reparent talks to each server in several steps
(choose, prepare, revoke, establish), and the steps after revocation are the window in which
writes are blocked. Opening a connection there costs a round trip or more per server; reusing
the one opened in `choose` costs nothing.

TLS follows `backend.tls` (reparent/tls.py), with one SSL context shared by every connect:
PyMySQL's default ("preferred" TLS) builds a fresh one with the system CA bundle on every
connect, measured here at 21 ms per connection at idle and 40-120 ms under load, against
0.3-0.6 ms without. With `backend.tls = "off"` TLS is disabled outright.
"""

from __future__ import annotations

import enum
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import pymysql
import pymysql.cursors

from reparent import gtid, tls
from reparent.config import PLAIN_BACKEND, Account, BackendSettings, BackendTls, ServerConfig
from reparent.mechanism import FailureKind, MechanismError

CONNECT_TIMEOUT = 1.0
# Every statement but a wait: a healthy server answers an admin statement in milliseconds.
STATEMENT_TIMEOUT = 5.0
# Margin of our read timeout over a limit the server enforces itself (MASTER_GTID_WAIT's
# timeout, max_statement_time): the server must give up first, or a statement we stopped
# waiting for could still take effect later (a read_only=1 landing after an undo).
SERVER_MARGIN = 1.0
# How long an emergency waits for the old primary to answer before treating it as gone.
PROBE_TIMEOUT = 0.5
# Seconds between heartbeats a source sends an idle replica (CHANGE MASTER's
# MASTER_HEARTBEAT_PERIOD); the failure detector reads a replica's silence by it: a replica
# that heard nothing for two periods and half a detector round has lost a hung primary. A
# quarter second makes that 0.75 s at the default interval, within the three failed rounds of
# a dead primary, so a hung one is found as fast; it costs a few bytes a second per replica.
HEARTBEAT_PERIOD = 0.25
# A pooled connection idle for longer is pinged before reuse; within a reparent the steps are
# milliseconds apart, so the ping is only paid between reparents.
REVALIDATE_AFTER = 1.0

# Server errors that mean the connection is gone, not that the statement was refused.
_GONE = {1053, 1927}  # ER_SERVER_SHUTDOWN, ER_CONNECTION_KILLED
_CLIENT_ERRORS = range(2000, 3000)  # CR_*: raised by the client for a lost or refused socket
_UNKNOWN_THREAD = 1094
ER_STATEMENT_TIMEOUT = 1969  # max_statement_time exceeded
# Threads that belong to replication or to the server itself, whoever their user is.
_SERVER_COMMANDS = ("Binlog Dump", "Daemon", "Slave_IO", "Slave_SQL", "Slave_worker")
_SERVER_USERS = ("system user", "event_scheduler")

T = TypeVar("T")


class AdminError(MechanismError):
    """A failed admin statement; `code` is the server's or client's error number (0 if none)."""

    def __init__(self, kind: FailureKind, message: str, code: int) -> None:
        super().__init__(kind, message)
        self.code = code


class Threads(enum.StrEnum):
    """Which replication threads a STOP/START SLAVE addresses."""

    ALL = ""
    IO = "IO_THREAD"
    SQL = "SQL_THREAD"


class GtidVariable(enum.StrEnum):
    """The server's GTID positions; member names are `Replication`'s field names."""

    BINLOG_POS = "gtid_binlog_pos"  # the last GTID this server wrote to its binlog, per domain
    BINLOG_STATE = "gtid_binlog_state"  # ... per domain and server_id: its history, for errant
    SLAVE_POS = "gtid_slave_pos"  # the last GTID its SQL thread applied, per domain
    CURRENT_POS = "gtid_current_pos"  # binlog_pos for domains it wrote last, else slave_pos


@dataclass(frozen=True)
class Replication:
    """One server's replication state at one moment."""

    server: str
    status: dict[str, Any] | None  # SHOW SLAVE STATUS; None when it replicates from nobody
    binlog_pos: str
    binlog_state: str
    slave_pos: str
    current_pos: str

    @property
    def final_position(self) -> str:
        """The position this server reaches once its relay log is applied: what its IO thread
        received (`Gtid_IO_Pos`, which counts only complete transactions) joined with what it
        has itself (`gtid_current_pos`, which includes its own binlog). Right after its IO
        thread stops, gtid_slave_pos and gtid_current_pos understate it while the SQL thread
        is still applying; this is what an emergency compares replicas by."""
        if self.status is None:
            return self.current_pos
        return gtid.newest([self.status["Gtid_IO_Pos"], self.current_pos])

    def not_applying(self) -> str | None:
        """Why this server does not apply what it receives, or None. The IO thread is left to
        the caller: a fenced replica has stopped it on purpose."""
        if self.status is None:
            return "replicates from nobody"
        if self.status["Slave_SQL_Running"] != "Yes":
            return f"SQL thread stopped: {self.status['Last_SQL_Error'] or 'by a STOP SLAVE'}"
        return None


class AdminConnection:
    """One admin session to one server. Not thread-safe: one caller at a time."""

    def __init__(
        self,
        server: ServerConfig,
        account: Account,
        connect_timeout: float,
        backend: BackendSettings = PLAIN_BACKEND,
    ) -> None:
        self.server = server
        self.account = account
        self.backend = backend
        self.last_used = time.monotonic()
        options = tls.pymysql_options(backend)
        try:
            try:
                self._conn = self._connect(connect_timeout, options)
            except pymysql.err.OperationalError as e:
                if backend.tls is not BackendTls.PREFERRED or not tls.server_lacks_tls(e):
                    raise
                self._conn = self._connect(connect_timeout, {"ssl_disabled": True})
        except pymysql.err.Error as e:
            raise _failure(e, f"{server.name}: connect")
        self._conn._read_timeout = self._conn._write_timeout = STATEMENT_TIMEOUT

    def _connect(self, connect_timeout: float, options: dict[str, Any]) -> pymysql.Connection:
        return pymysql.connect(
            host=self.server.host,
            port=self.server.port,
            user=self.account.user,
            password=self.account.password,
            autocommit=True,
            connect_timeout=connect_timeout,
            # The greeting and login must come within the connect timeout too: a hung
            # server accepts TCP connections in its kernel backlog but never greets.
            read_timeout=connect_timeout,
            write_timeout=connect_timeout,
            **options,
        )

    @property
    def open(self) -> bool:
        return bool(self._conn.open)

    def close(self) -> None:
        if self._conn.open:
            self._conn.close()

    def ping(self, timeout: float) -> bool:
        """True if the server still answers on this session within `timeout`."""
        try:
            with self.timeout(timeout):
                self._conn.ping(reconnect=False)
        except pymysql.err.Error:
            self.close()
            return False
        self.last_used = time.monotonic()
        return True

    @contextmanager
    def timeout(self, seconds: float) -> Iterator[None]:
        """Statements inside may take up to `seconds` (a wait) or must answer within them (a
        probe of a server that may be hung). PyMySQL reads its timeouts per packet from these
        attributes, so changing them needs no reconnect."""
        saved = (self._conn._read_timeout, self._conn._write_timeout)
        self._conn._read_timeout = self._conn._write_timeout = seconds
        try:
            yield
        finally:
            self._conn._read_timeout, self._conn._write_timeout = saved

    def query(self, sql: str, args: tuple[Any, ...] | None = None) -> list[dict[str, Any]]:
        """Run one statement; rows as dicts. Raises MechanismError naming the server."""
        self.last_used = time.monotonic()
        try:
            with self._conn.cursor(pymysql.cursors.DictCursor) as cur:
                cur.execute(sql, args)
                return list(cur.fetchall())
        except pymysql.err.Error as e:
            failure = _failure(e, f"{self.server.name}: {sql[:40]}")
            if failure.kind is FailureKind.UNREACHABLE:
                self.close()
            raise failure

    def _value(self, sql: str, args: tuple[Any, ...] | None = None) -> Any:
        (row,) = self.query(sql, args)
        (value,) = row.values()
        return value

    # -- state ---------------------------------------------------------------------------------

    def read_only(self) -> bool:
        return bool(self._value("SELECT @@global.read_only"))

    def set_read_only(self, on: bool, within: float = STATEMENT_TIMEOUT - SERVER_MARGIN) -> None:
        """Set and read back: a step is only done once the server says so.

        Turning read_only on waits for every write statement in progress (measured: 0.8 s
        behind an INSERT ... SELECT SLEEP(1)), but not for an idle open transaction. The server
        gives up after `within` seconds with ER_STATEMENT_TIMEOUT, so the SET never outlives
        this call.
        """
        with self.timeout(within + SERVER_MARGIN):
            self.query(
                "SET STATEMENT max_statement_time = %s FOR SET GLOBAL read_only = %s",
                (within, int(on)),
            )
        if self.read_only() != on:
            raise MechanismError(
                FailureKind.REFUSED, f"{self.server.name}: read_only did not become {int(on)}"
            )

    def gtid(self, variable: GtidVariable) -> str:
        return self._value(f"SELECT @@global.{variable}")

    def replica_status(self) -> dict[str, Any] | None:
        """SHOW SLAVE STATUS as a dict; None when the server replicates from nobody."""
        rows = self.query("SHOW SLAVE STATUS")
        return rows[0] if rows else None

    def replication(self) -> Replication:
        """Everything a reparent compares servers by, in two round trips."""
        status = self.replica_status()
        columns = ", ".join(f"@@global.{v} AS {v.name.lower()}" for v in GtidVariable)
        (row,) = self.query(f"SELECT {columns}")
        return Replication(server=self.server.name, status=status, **row)

    # -- replication ---------------------------------------------------------------------------

    def stop_replica(self, threads: Threads = Threads.ALL) -> None:
        self.query(f"STOP SLAVE {threads}")

    def start_replica(self, threads: Threads = Threads.ALL) -> None:
        self.query(f"START SLAVE {threads}")

    def reset_replica_all(self) -> None:
        """Forget the source entirely, so a promoted server cannot reconnect to the old one."""
        self.query("RESET SLAVE ALL")

    def change_master(self, source: ServerConfig, account: Account) -> None:
        """Replicate from `source` (at its replication address) by GTID from this server's
        gtid_slave_pos.

        MASTER_CONNECT_RETRY=1 because the default 60 s would leave a replica that raced the
        new primary's first start a minute behind. A heartbeat every HEARTBEAT_PERIOD, because
        a replica that hears nothing for longer is how the failure detector tells a hung
        primary from one only Baton cannot reach (the default is half of slave_net_timeout,
        30 s). TLS as backend.tls says (reparent/tls.py's `replication_options`).
        """
        ssl_sql, ssl_args = tls.replication_options(self.backend)
        self.query(
            "CHANGE MASTER TO MASTER_HOST=%s, MASTER_PORT=%s, MASTER_USER=%s,"
            " MASTER_PASSWORD=%s, MASTER_USE_GTID=slave_pos, MASTER_CONNECT_RETRY=1,"
            " MASTER_HEARTBEAT_PERIOD=%s" + ssl_sql,
            (
                source.replication_host,
                source.replication_port,
                account.user,
                account.password,
                HEARTBEAT_PERIOD,
                *ssl_args,
            ),
        )

    def set_gtid_slave_pos(self, position: str) -> None:
        self.query("SET GLOBAL gtid_slave_pos = %s", (position,))

    def master_gtid_wait(self, position: str, timeout: float) -> bool:
        """True once this server's SQL thread has applied `position`; False after `timeout`."""
        with self.timeout(timeout + SERVER_MARGIN):
            return self._value("SELECT MASTER_GTID_WAIT(%s, %s)", (position, timeout)) == 0

    # -- sessions ------------------------------------------------------------------------------

    def kill_clients(self, spare_users: Collection[str]) -> int:
        """Kill every session except this one, those of `spare_users`, and the server's own
        and replication threads; return how many were killed.

        Killing is what makes clients notice a demotion: a client on a read-only server
        otherwise retries error 1290 on the same session for ever.
        """
        spared = (*spare_users, *_SERVER_USERS)
        rows = self.query(
            "SELECT ID FROM information_schema.PROCESSLIST WHERE ID <> CONNECTION_ID()"
            f" AND USER NOT IN ({', '.join(['%s'] * len(spared))})"
            f" AND COMMAND NOT IN ({', '.join(['%s'] * len(_SERVER_COMMANDS))})",
            (*spared, *_SERVER_COMMANDS),
        )
        killed = 0
        for row in rows:
            try:
                self.query("KILL CONNECTION %s", (row["ID"],))
            except AdminError as e:
                if e.code != _UNKNOWN_THREAD:
                    raise
                continue  # it ended between the list and the kill
            killed += 1
        return killed


def _failure(e: pymysql.err.Error, where: str) -> AdminError:
    """UNREACHABLE when the session is gone (lost, refused, timed out, killed), REFUSED when the
    server answered with an error: the first may heal by retrying elsewhere, the second not."""
    code = e.args[0] if e.args and isinstance(e.args[0], int) else 0
    gone = isinstance(e, pymysql.err.InterfaceError) or code in _GONE or code in _CLIENT_ERRORS
    kind = FailureKind.UNREACHABLE if gone else FailureKind.REFUSED
    text = f"({code}, {e.args[1]!r})" if len(e.args) == 2 else repr(e)
    return AdminError(kind, f"{where}: {text}", code)


class AdminPool:
    """One AdminConnection per server and account, opened on first use and reused after.

    Thread-safe for handing out connections; each connection is then used by one thread at a
    time (the mechanisms work on different servers in parallel, never on one). Connections stay
    open between reparents: `close` them when the controller stops.
    """

    def __init__(self, backend: BackendSettings = PLAIN_BACKEND) -> None:
        self.backend = backend  # TLS to the servers (backend.tls)
        self._lock = threading.Lock()
        self._conns: dict[tuple[str, int, Account], AdminConnection] = {}

    def get(
        self, server: ServerConfig, account: Account, connect_timeout: float = CONNECT_TIMEOUT
    ) -> AdminConnection:
        """A live connection to `server`, or MechanismError(UNREACHABLE) once the server did not
        answer within `connect_timeout` (for the TCP connect, and again for its greeting)."""
        key = (server.host, server.port, account)
        with self._lock:
            conn = self._conns.get(key)
        if conn is not None and conn.open:
            if time.monotonic() - conn.last_used < REVALIDATE_AFTER or conn.ping(connect_timeout):
                return conn
        conn = AdminConnection(server, account, connect_timeout, self.backend)
        with self._lock:
            self._conns[key] = conn
        return conn

    def each(
        self,
        servers: Iterable[ServerConfig],
        account: Account,
        action: Callable[[AdminConnection], T],
        connect_timeout: float = CONNECT_TIMEOUT,
    ) -> dict[str, T | MechanismError]:
        """Run `action` on every server at once; per server name, its result or its error.

        In parallel because the steps that touch every server (fencing, repointing) sit in the
        window where writes are blocked, and one dead server must not delay the others by its
        timeout.
        """

        def run(server: ServerConfig) -> T | MechanismError:
            try:
                return action(self.get(server, account, connect_timeout))
            except MechanismError as e:
                return e

        targets = list(servers)
        if not targets:
            return {}
        with ThreadPoolExecutor(max_workers=len(targets)) as workers:
            results = list(workers.map(run, targets))
        return {s.name: r for s, r in zip(targets, results, strict=True)}

    def close(self) -> None:
        with self._lock:
            conns, self._conns = list(self._conns.values()), {}
        for conn in conns:
            conn.close()
