"""Revocation mechanisms: make the old primary unable to complete a write, and prove it.

`GracefulDemotion` is for a planned reparent (the old primary answers): it flips read_only and
kills client sessions there, and hands back the exact position the candidate must reach.
`FollowerFencing` is for an emergency (the old primary is gone or hung): it cannot act on the
old primary, so it acts on everyone who could still listen to it.
"""

from __future__ import annotations

import logging
import threading
import time

from reparent.admin import (
    ER_STATEMENT_TIMEOUT,
    PROBE_TIMEOUT,
    AdminConnection,
    AdminError,
    AdminPool,
    Threads,
)
from reparent.admin import GtidVariable as Var
from reparent.config import BackendSettings, ServerConfig
from reparent.mechanism import FailureKind, MechanismError, ReparentContext, RevocationProof

log = logging.getLogger(__name__)

# How long read_only=1 may wait for write statements still running on the old primary before
# their sessions are killed: the proxies' grace period is over by then.
READ_ONLY_PATIENCE = 1.0
# How long an emergency waits for the old primary's fence once every replica is fenced: enough
# for one that answers or refuses (a millisecond on a LAN). One that has not answered by then
# (hung, unroutable) is fenced in the background and not waited for by any later step.
OLD_PRIMARY_GRACE = 0.1
# The bound of one replica's fence (STOP SLAVE IO_THREAD, then its position). A semi-sync
# replica's stopping IO thread first connects to its primary to end its dump thread there, for
# up to rpl_semi_sync_slave_kill_conn_timeout (1 s, durability.py): measured 1.0 s against a
# SIGSTOPped primary, 2 ms for an asynchronous replica.
FENCE_TIMEOUT = 2.5


def _replicas(ctx: ReparentContext) -> list[ServerConfig]:
    return [s for s in ctx.servers if s.name != ctx.old_primary.name]


class GracefulDemotion:
    """Planned: drain, read_only=1, kill the rest, read the final position.

    read_only=1 alone is not enough: it returns at once while transactions stay open (their
    COMMIT later fails with 1290), and a client keeps retrying on its session for ever. So the
    proxies drain first (`ctx.wait_drained`), and what is left is killed so that its clients
    reconnect through the proxy. `SET GLOBAL read_only=1` waits for write statements in
    progress, so the binlog position read after it is final; a statement that outlasts
    READ_ONLY_PATIENCE is killed with its session rather than allowed to hold the demotion.
    """

    name = "graceful_demotion"

    def __init__(self, pool: AdminPool | None = None) -> None:
        self.pool = pool or AdminPool()

    def revoke(self, ctx: ReparentContext) -> RevocationProof:
        drained = ctx.wait_drained(ctx.grace)
        conn = self.pool.get(ctx.old_primary, ctx.admin)
        # The replication account too: a replica's IO thread is not a 'Binlog Dump' yet while
        # it connects, and a killed one retries only after MASTER_CONNECT_RETRY.
        spare = {ctx.admin.user, ctx.replication.user}
        killed = 0
        try:
            conn.set_read_only(True, within=READ_ONLY_PATIENCE)  # read back: the verification
        except AdminError as e:
            if e.code != ER_STATEMENT_TIMEOUT:
                raise
            killed = conn.kill_clients(spare)
            conn.set_read_only(True, within=ctx.timeout)  # the killed ones still roll back
        killed += conn.kill_clients(spare)
        return RevocationProof(
            old_primary=ctx.old_primary.name,
            gtid_position=conn.gtid(Var.BINLOG_POS),
            killed_connections=killed,
            drained=drained,
        )

    def undo(self, ctx: ReparentContext, revoked: RevocationProof | None) -> None:
        self.pool.get(ctx.old_primary, ctx.admin).set_read_only(False)


class FollowerFencing:
    """Emergency: stop every reachable replica's IO thread, and record where each will be.

    With semi-sync on and a long `rpl_semi_sync_master_timeout`, a primary whose replicas all
    stopped their IO threads cannot acknowledge a commit: that is the fence. Without semi-sync
    it still guarantees that nothing the old primary commits from now on reaches a replica, so
    the replicas' positions are final and comparable.

    The old primary is also made read_only, which fences it for real, in a thread of its own
    and in parallel with the replicas: a stopped (SIGSTOP) server accepts the TCP connection
    and never greets, and waiting for it would cost every held client a timeout. It is waited
    for until the replicas are fenced and OLD_PRIMARY_GRACE more (not at all when the failure
    detector decided the emergency: the old primary answered none of its last three rounds);
    one that has not answered by then is `silent` in the result (later steps skip it) and its
    fence goes on trying, on its own connection, for up to the reparent's timeout: a primary
    that wakes up meanwhile is made read_only before anything else it does. Replicas that did
    not answer are `silent` too.

    Each replica's recorded position is what it will have once its relay log is applied
    (`Replication.final_position`), not what it has applied yet: the SQL thread may still
    be behind when the IO thread stops, and the choice of the new primary must not depend on
    how fast each one happens to apply.
    """

    name = "follower_fencing"

    def __init__(self, pool: AdminPool | None = None) -> None:
        self.pool = pool or AdminPool()

    def revoke(self, ctx: ReparentContext) -> RevocationProof:
        old = _OldPrimaryFence(ctx, self.pool.backend)
        old.start()
        results = self.pool.each(_replicas(ctx), ctx.admin, _fence, PROBE_TIMEOUT)
        answered = old.wait(OLD_PRIMARY_GRACE if ctx.wait_old_primary else 0.0)
        positions = {name: r for name, r in results.items() if isinstance(r, str)}
        silent = [] if answered else [ctx.old_primary.name]
        for name, r in results.items():
            if isinstance(r, MechanismError):
                log.warning("fence %s: %s", name, r)
                if r.kind is FailureKind.UNREACHABLE:
                    silent.append(name)
        if not positions:
            reasons = "; ".join(str(r) for r in results.values())
            raise MechanismError(FailureKind.UNREACHABLE, f"no replica could be fenced: {reasons}")
        return RevocationProof(
            ctx.old_primary.name,
            gtid_position="",
            replica_positions=positions,
            silent=tuple(silent),
        )

    def undo(self, ctx: ReparentContext, revoked: RevocationProof | None) -> None:
        """Restart the IO threads (they resume from where they stopped) and make the old
        primary writable again if it answers; a replica that is down now has nothing to undo."""

        def restart(conn: AdminConnection) -> None:
            if conn.replica_status() is not None:
                conn.start_replica(Threads.IO)

        self.pool.each(_replicas(ctx), ctx.admin, restart, PROBE_TIMEOUT)
        try:
            conn = self.pool.get(ctx.old_primary, ctx.admin, PROBE_TIMEOUT)
            conn.set_read_only(False, within=PROBE_TIMEOUT)
        except MechanismError as e:
            log.info("old primary %s not reached: %s", ctx.old_primary.name, e)


class _OldPrimaryFence(threading.Thread):
    """read_only=1 on an emergency's old primary, over a connection of its own (the pooled
    one may be stuck on the same hung server), bounded by the reparent's timeout."""

    def __init__(self, ctx: ReparentContext, backend: BackendSettings) -> None:
        super().__init__(name=f"fence-{ctx.old_primary.name}", daemon=True)
        self.ctx = ctx
        self.backend = backend
        self.fenced = False
        self._over = threading.Event()  # fenced, or refused or failed: no use waiting

    def wait(self, grace: float) -> bool:
        """True if the old primary is read_only, waiting `grace` seconds more at most."""
        self._over.wait(grace)
        return self.fenced

    def run(self) -> None:
        ctx, t0 = self.ctx, time.monotonic()
        name = ctx.old_primary.name
        try:
            conn = AdminConnection(ctx.old_primary, ctx.admin, ctx.timeout, self.backend)
            try:
                conn.set_read_only(True, within=ctx.timeout)
            finally:
                conn.close()
        except MechanismError as e:
            log.info("old primary %s not fenced (%.2f s): %s", name, time.monotonic() - t0, e)
        else:
            self.fenced = True
            log.info("old primary %s set read_only (%.3f s)", name, time.monotonic() - t0)
        finally:
            self._over.set()


def _fence(conn: AdminConnection) -> str:
    """Stop one replica's IO thread and return its final position. A server that replicates
    from nobody is not fenced: it cannot hear the old primary anyway."""
    with conn.timeout(FENCE_TIMEOUT):
        conn.stop_replica(Threads.IO)  # only a note (1255) if it replicates from nobody
        state = conn.replication()
    if state.status is None:
        raise MechanismError(FailureKind.INVALID, f"{conn.server.name}: not a replica")
    if state.status["Slave_IO_Running"] != "No":
        raise MechanismError(FailureKind.REFUSED, f"{conn.server.name}: IO thread still running")
    return state.final_position
