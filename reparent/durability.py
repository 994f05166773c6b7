"""The durability policy (`[replication] durability`), applied to servers by role.

`semi_sync` means a commit is acknowledged to its client only once a replica has received it,
so an emergency reparent that promotes the replica that received the most (establish.py) loses
no acknowledged write. What it takes, measured on MariaDB 10.11.19 here (semi-sync is built in,
no plugin to load):

- On the primary: `rpl_semi_sync_master_enabled=1`, `wait_point=AFTER_SYNC` (the commit waits
  for the ack after the binlog write and before the engine commit, so no other session sees a
  transaction no replica has), `wait_no_slave=1`, and a timeout of a year: the primary never
  falls back to asynchronous replication on its own. With every replica's IO thread stopped, a
  COMMIT waits ("Waiting for semi-sync ACK from slave") and its row stays invisible; the first
  IO thread to come back acknowledges it. That is the emergency fence revoke.py relies on.
- On a replica: `rpl_semi_sync_slave_enabled=1`, read by the IO thread when it starts, so a
  running one is restarted. And `rpl_semi_sync_slave_kill_conn_timeout=1`: a semi-sync IO
  thread that is stopped first connects to its primary to kill its dump thread there. With the
  primary cut off (a blackholed path), STOP SLAVE IO_THREAD, the emergency fence, took 2.0 s at
  the default of 5, 1.0 s at 1, and 24 s at 0 (no limit).
- Never master-side on a replica: with `log_slave_updates` its SQL thread then waits for an
  ack for every replicated transaction, which no one sends, so replication stops.
- Turning master-side off releases every commit waiting for an ack *as acknowledged*, while
  KILLing the waiting session gives its client error 2013 instead (the transaction stays in the
  local binlog). So a server leaving the primary role loses its client sessions first: a write
  that no replica received is never reported as committed.

`async` means Baton keeps master-side semi-sync off; replicas' slave-side setting is left as
found (it costs nothing without a master that asks for acks).
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterable

from reparent.admin import AdminConnection, AdminPool, Threads
from reparent.config import Account, Durability, ServerConfig
from reparent.mechanism import FailureKind, MechanismError

log = logging.getLogger(__name__)

# Milliseconds; a year. Far past any outage, and far from the variable's 2^64-1 maximum, whose
# arithmetic (ms to ns) we would rather not trust.
SEMI_SYNC_TIMEOUT_MS = 365 * 24 * 3600 * 1000
# Seconds; the smallest value that bounds a fence's STOP SLAVE (see above).
KILL_CONN_TIMEOUT = 1


def as_primary(conn: AdminConnection, durability: Durability) -> None:
    """Make `conn`'s server commit under `durability`; call it before the server is writable."""
    if durability is Durability.SEMI_SYNC:
        conn.query(
            "SET GLOBAL rpl_semi_sync_master_wait_point = 'AFTER_SYNC',"
            " GLOBAL rpl_semi_sync_master_wait_no_slave = 1,"
            " GLOBAL rpl_semi_sync_master_timeout = %s,"
            " GLOBAL rpl_semi_sync_master_enabled = 1",
            (SEMI_SYNC_TIMEOUT_MS,),
        )
        (row,) = conn.query("SELECT @@global.rpl_semi_sync_master_enabled AS on_")
        if not row["on_"]:
            raise MechanismError(
                FailureKind.REFUSED, f"{conn.server.name}: semi-sync master did not become 1"
            )
    else:
        conn.query("SET GLOBAL rpl_semi_sync_master_enabled = 0")


def as_replica(conn: AdminConnection, durability: Durability, spare_users: Collection[str]) -> bool:
    """Make `conn`'s server a replica under `durability`; True when a running IO thread must be
    restarted to take it up. A server that still has master-side semi-sync (it was primary)
    first loses its client sessions, then the setting (see the module's notes)."""
    (row,) = conn.query(
        "SELECT @@global.rpl_semi_sync_master_enabled AS master,"
        " @@global.rpl_semi_sync_slave_enabled AS slave"
    )
    if row["master"]:
        killed = conn.kill_clients(spare_users)
        conn.query("SET GLOBAL rpl_semi_sync_master_enabled = 0")
        log.info("%s: master-side semi-sync off (%d sessions killed)", conn.server.name, killed)
    if durability is Durability.SEMI_SYNC:
        conn.query(
            "SET GLOBAL rpl_semi_sync_slave_kill_conn_timeout = %s,"
            " GLOBAL rpl_semi_sync_slave_enabled = 1",
            (KILL_CONN_TIMEOUT,),
        )
        return not row["slave"]
    return False


def apply(
    pool: AdminPool,
    servers: Iterable[ServerConfig],
    primary: str,
    admin: Account,
    replication: Account,
    durability: Durability,
) -> dict[str, MechanismError | None]:
    """Bring one shard's servers to `durability` (at controller start): the primary first, so
    that the replicas' restarted IO threads find it asking for acks. Per server, None or why it
    could not be done; a server that is down gets it at its next establishment or follow."""
    servers = list(servers)
    spare = {admin.user, replication.user}
    results: dict[str, MechanismError | None] = {}
    for server in servers:
        if server.name == primary:
            results |= pool.each([server], admin, lambda c: as_primary(c, durability))

    def replica(conn: AdminConnection) -> None:
        if as_replica(conn, durability, spare):
            status = conn.replica_status()
            if status is not None and status["Slave_IO_Running"] != "No":
                conn.stop_replica(Threads.IO)
                conn.start_replica(Threads.IO)

    results |= pool.each([s for s in servers if s.name != primary], admin, replica)
    for name, error in results.items():
        if error is not None:
            log.warning("durability %s not applied to %s: %s", durability, name, error)
    return results
