"""Establishment by MariaDB GTID replication: choose a replica, catch it up, make it the source.

The rules it stands on (verified against MariaDB 10.11; gtid.py for the arithmetic):
- A candidate is fit when it is reachable, its replication runs, it has no transaction the old
  primary lacks (errant: under gtid_strict_mode it would break every server that replicates
  from it), and it is not lagging.
- Lag is measured as what it costs: the candidate is lagging when it cannot apply everything
  the old primary has committed *now* within `max_lag_seconds` (a bounded MASTER_GTID_WAIT).
  Seconds_Behind_Master is not used: it is NULL whenever the IO thread is stopped, 0 while
  the IO thread itself is behind, and jumps by the length of one long transaction. A GTID
  distance is exact but counts transactions, not time. The wait is free for a healthy
  candidate and bounds a refusal to `max_lag_seconds`, during which nothing is revoked yet.
- In an emergency (the old primary does not answer) only the replicas can be compared. The new
  primary must have received everything any reachable replica received, or that replica would
  hold transactions the new primary lacks; how fast it applies them does not matter, because
  no other replica can do better, so the lag threshold does not apply.
- With `durability = semi_sync` every acknowledged write reached at least one replica's relay
  log, so the replica that received the most (Gtid_IO_Pos) holds all of them once its relay
  log is applied; but only if every replica is compared: one that cannot be reached may hold
  the only copy, and an emergency reparent then refuses rather than lose it (unless the
  operator named that replica with `ctl ers --allow-unreachable`). The new primary
  gets master-side semi-sync before it is writable, every follower slave-side before its IO
  thread starts (durability.py).
- A server that did not answer the emergency's revocation (`ctx.silent`: a hung old primary,
  a hung replica) is not asked again by any later step: each would cost a timeout while
  clients are held. It is left to the failure detector, which rejoins or quarantines it once
  it answers again.
- MASTER_GTID_WAIT waits on gtid_slave_pos only (measured: on a server that is no replica, a
  GTID in its own binlog is never "reached"), so every wait targets a position that arrives
  through the SQL thread.
"""

from __future__ import annotations

import logging

from reparent import durability, gtid
from reparent.admin import PROBE_TIMEOUT, AdminConnection, AdminPool, Replication
from reparent.admin import GtidVariable as Var
from reparent.config import Durability, ServerConfig
from reparent.mechanism import (
    Candidate,
    EstablishmentProof,
    FailureKind,
    MechanismError,
    ReparentContext,
    RevocationProof,
)

log = logging.getLogger(__name__)

MAX_LAG_SECONDS = 5.0
# Every repointing statement must answer within this: the proxies hold clients until the
# reparent is published, and a hung server must not hold them longer. A healthy server answers
# in milliseconds; STOP SLAVE may wait for the event group being applied.
REPOINT_TIMEOUT = 2.0


class GtidEstablishment:
    name = "gtid"

    def __init__(
        self,
        max_lag_seconds: float = MAX_LAG_SECONDS,
        pool: AdminPool | None = None,
        repoint_timeout: float = REPOINT_TIMEOUT,
    ) -> None:
        self.max_lag_seconds = max_lag_seconds
        self.pool = pool or AdminPool()
        self.repoint_timeout = repoint_timeout

    # -- choose --------------------------------------------------------------------------------

    def choose(self, ctx: ReparentContext) -> Candidate:
        """The requested candidate if it is fit, else the fittest replica (see the module's
        rules); MechanismError with the reason of the refusal otherwise."""
        replicas = [s for s in ctx.servers if s.name != ctx.old_primary.name]
        requested = ctx.candidate.name if ctx.candidate is not None else None
        if requested is not None and requested not in {s.name for s in replicas}:
            raise MechanismError(FailureKind.INVALID, f"{requested} is not a replica in the shard")
        asked = [s for s in replicas if s.name not in ctx.silent]
        states = self.pool.each(asked, ctx.admin, AdminConnection.replication)
        states |= {s.name: _silent(s.name) for s in replicas if s.name in ctx.silent}
        reachable = {n: s for n, s in states.items() if isinstance(s, Replication)}
        primary = self._probe(ctx)
        if primary is None:
            _all_compared(ctx, [n for n, s in states.items() if isinstance(s, MechanismError)])
            received = {n: s.final_position for n, s in reachable.items() if s.status}
            refusals = {n: _unfit_emergency(s, received) for n, s in reachable.items()}
        else:
            refusals = {n: _unfit_planned(s, primary) for n, s in reachable.items()}
        refusals.update((n, s) for n, s in states.items() if isinstance(s, MechanismError))
        fit = [s.name for s in replicas if refusals[s.name] is None]  # in the config's order
        if requested is not None:
            refusal = refusals[requested]
            if refusal is not None:
                raise refusal
            name = requested
        elif not fit:
            reasons = "; ".join(str(r) for r in refusals.values())
            raise MechanismError(FailureKind.INVALID, f"no replica can be promoted: {reasons}")
        elif primary is None:
            name = fit[0]  # all fit ones received the same: everything
        else:
            name = min(fit, key=lambda n: gtid.behind(reachable[n].slave_pos, primary.binlog_pos))
        if primary is None:
            return Candidate(name, reachable[name].final_position)
        return self._within_lag(ctx, name, primary.binlog_pos, reachable[name].slave_pos)

    def _probe(self, ctx: ReparentContext) -> Replication | None:
        if ctx.old_primary.name in ctx.silent:
            return None
        try:
            conn = self.pool.get(ctx.old_primary, ctx.admin, PROBE_TIMEOUT)
            with conn.timeout(PROBE_TIMEOUT):
                return conn.replication()
        except MechanismError as e:
            log.info("old primary %s not reached: %s", ctx.old_primary.name, e)
            return None

    def _within_lag(self, ctx: ReparentContext, name: str, target: str, applied: str) -> Candidate:
        conn = self.pool.get(_server(ctx, name), ctx.admin)
        if not conn.master_gtid_wait(target, self.max_lag_seconds):
            raise MechanismError(
                FailureKind.LAGGING,
                f"{name} did not apply the primary's {target} within {self.max_lag_seconds} s"
                f" (it was {gtid.behind(applied, target)} transactions behind)",
            )
        return Candidate(name, conn.gtid(Var.CURRENT_POS))

    # -- prepare -------------------------------------------------------------------------------

    def prepare(self, ctx: ReparentContext, candidate: Candidate) -> None:
        """Wait, while the old primary still serves, until the candidate has applied what the
        old primary had committed when the wait began: afterwards only the transactions
        committed during this wait are left for the blocked window."""
        position = self.pool.get(ctx.old_primary, ctx.admin).gtid(Var.BINLOG_POS)
        self._catch_up(ctx, candidate.name, position)

    def _catch_up(self, ctx: ReparentContext, name: str, position: str) -> AdminConnection:
        conn = self.pool.get(_server(ctx, name), ctx.admin)
        if not conn.master_gtid_wait(position, ctx.timeout):
            raise MechanismError(
                FailureKind.TIMEOUT, f"{name} did not reach {position} within {ctx.timeout} s"
            )
        return conn

    # -- establish -----------------------------------------------------------------------------

    def establish(
        self, ctx: ReparentContext, candidate: Candidate, revoked: RevocationProof
    ) -> EstablishmentProof:
        """Catch up, stop replicating, become writable, then repoint everyone else. Running it
        again (a controller resuming from its journal) changes nothing and returns the same.

        Once the candidate is writable nothing raises any more: a server that cannot be
        repointed is reported in `unreachable` (with the reason in the log), because undoing a
        promotion for the sake of one replica would cost every client another outage.
        """
        # Only an emergency fences replicas, and it always fences at least one.
        if revoked.replica_positions:
            target = self._emergency_target(ctx, candidate, revoked)
        else:
            target = revoked.gtid_position
        conn = self._catch_up(ctx, candidate.name, target)
        conn.stop_replica()
        conn.reset_replica_all()
        durability.as_primary(conn, ctx.durability)
        conn.set_read_only(False)
        position = conn.gtid(Var.BINLOG_POS)
        repointed, failed = self._follow_all(ctx, conn.server, was_primary=ctx.old_primary.name)
        return EstablishmentProof(candidate.name, position, repointed, failed)

    def _emergency_target(
        self, ctx: ReparentContext, candidate: Candidate, revoked: RevocationProof
    ) -> str:
        """What the candidate's SQL thread must apply before it is promoted: everything its IO
        thread received before the fence, provided no fenced replica received more."""
        fenced = revoked.replica_positions
        if candidate.name not in fenced:
            raise MechanismError(FailureKind.INVALID, f"{candidate.name} was not fenced")
        replicas = (s.name for s in ctx.servers if s.name != ctx.old_primary.name)
        _all_compared(ctx, [n for n in replicas if n not in fenced])
        behind = _behind_others(candidate.name, fenced[candidate.name], fenced)
        if behind is not None:
            raise behind
        status = self.pool.get(_server(ctx, candidate.name), ctx.admin).replica_status()
        # None: an earlier attempt already promoted it (a resumed reparent), after catching up.
        return "" if status is None else status["Gtid_IO_Pos"]

    # -- abandon -------------------------------------------------------------------------------

    def abandon(self, ctx: ReparentContext, candidate: Candidate) -> None:
        """Take back a promotion that may have happened (a planned `establish` failed part-way):
        the candidate is made read_only first, the old primary stops replicating, and every
        other server replicates from the old primary again. The old primary stays read_only;
        the revocation's `undo` gives it back its writes."""
        conn = self.pool.get(_server(ctx, candidate.name), ctx.admin)
        conn.set_read_only(True)
        old = self.pool.get(ctx.old_primary, ctx.admin)
        old.stop_replica()
        old.reset_replica_all()
        durability.as_primary(old, ctx.durability)  # it followed the candidate for a while
        # A server that cannot be pointed back is logged, not raised: it is read_only or
        # unreachable either way, and the old primary is what the undo needs.
        self._follow_all(ctx, ctx.old_primary, was_primary=candidate.name)

    # -- rejoin --------------------------------------------------------------------------------

    def rejoin(self, ctx: ReparentContext, server: ServerConfig, source: ServerConfig) -> None:
        """Make `server` a read_only replica of `source`, the way a reparent repoints an old
        primary: read_only first, its own binlog as its replication position, then GTID
        replication. For a server that came back after an emergency reparent, or one that
        replicates from nobody; one holding transactions the source lacks is refused (ERRANT)
        and left read_only."""
        reference = self.pool.get(source, ctx.admin).gtid(Var.CURRENT_POS)
        conn = self.pool.get(server, ctx.admin)
        with conn.timeout(self.repoint_timeout):
            self._follow(ctx, conn, source, reference, was_primary=True)

    # -- repointing ----------------------------------------------------------------------------

    def _follow_all(
        self, ctx: ReparentContext, source: ServerConfig, was_primary: str
    ) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """Point every server but `source` at it, all at once; (repointed, failed) names."""
        reference = self.pool.get(source, ctx.admin).gtid(Var.CURRENT_POS)

        def follow(conn: AdminConnection) -> None:
            with conn.timeout(self.repoint_timeout):
                self._follow(ctx, conn, source, reference, conn.server.name == was_primary)

        others = [s for s in ctx.servers if s.name != source.name and s.name not in ctx.silent]
        results: dict[str, MechanismError | None] = dict(
            self.pool.each(others, ctx.admin, follow, self.repoint_timeout)
        )
        results |= {n: _silent(n) for n in sorted(ctx.silent) if n != source.name}
        for result in results.values():
            if result is not None:
                log.warning("not repointed to %s: %s", source.name, result)
        repointed = tuple(n for n, r in results.items() if r is None)
        return repointed, tuple(n for n, r in results.items() if r is not None)

    @staticmethod
    def _follow(
        ctx: ReparentContext,
        conn: AdminConnection,
        source: ServerConfig,
        reference: str,
        was_primary: bool,
    ) -> None:
        """read_only first, so that whatever happens next this server takes no writes.

        A server holding transactions the source lacks is left alone (read_only, replicating
        from nobody): under gtid_strict_mode it could not replicate anyway, and its extra
        transactions are for a human to look at.

        A server that was primary adopts its own binlog as its replication position first:
        its own transactions reached it through no SQL thread, so gtid_slave_pos does not have
        them, and it would ask the source for them again.

        Before it replicates it takes the durability's replica settings; one that still has
        master-side semi-sync (it was primary) loses its client sessions first (durability.py).
        """
        conn.set_read_only(True)
        conn.stop_replica()
        own = conn.gtid(Var.CURRENT_POS)
        if not gtid.contains(reference, own):
            raise MechanismError(
                FailureKind.ERRANT, f"{conn.server.name} has {own}, {source.name} only {reference}"
            )
        if was_primary:
            conn.set_gtid_slave_pos(conn.gtid(Var.BINLOG_POS))
        durability.as_replica(conn, ctx.durability, {ctx.admin.user, ctx.replication.user})
        conn.change_master(source, ctx.replication)
        conn.start_replica()


def _unfit_planned(state: Replication, primary: Replication) -> MechanismError | None:
    """Why a replica cannot be promoted while the old primary answers, judged without waiting
    (the lag is judged after, on the one chosen). Nothing the old primary committed may be
    lost: a replica whose IO thread is stopped (an emergency's fence, when the old primary
    turns out to answer) is fit only if it already received all of it."""
    refusal = _not_applying(state)
    if refusal is not None:
        return refusal
    extra = gtid.errant(state.binlog_state, primary.binlog_state)
    if extra:
        return MechanismError(
            FailureKind.ERRANT,
            f"{state.server} has {gtid.format(extra)}, which the primary never had",
        )
    status = state.status  # not None: _not_applying refused that
    if status["Slave_IO_Running"] == "No" and not gtid.contains(
        state.final_position, primary.binlog_pos
    ):
        return MechanismError(
            FailureKind.LAGGING,
            f"{state.server}: IO thread stopped ({status['Last_IO_Error'] or 'by a STOP SLAVE'})"
            f" {gtid.behind(state.final_position, primary.binlog_pos)} transactions short of"
            f" the primary's {primary.binlog_pos}",
        )
    return None


def _unfit_emergency(state: Replication, received: dict[str, str]) -> MechanismError | None:
    """Why a replica cannot be promoted when the old primary is gone: it must be able to apply
    its relay log, and must have received what every other reachable replica received."""
    return _not_applying(state) or _behind_others(state.server, state.final_position, received)


def _all_compared(ctx: ReparentContext, missing: list[str]) -> None:
    """With semi_sync, an emergency must compare every replica: an acknowledged write may sit
    in the relay log of only one, and promoting without it would lose that write. Replicas
    the operator allowed (`--allow-unreachable`) are let go, with a warning in the log."""
    if ctx.durability is not Durability.SEMI_SYNC or not missing:
        return
    allowed = sorted(n for n in missing if n in ctx.allow_unreachable)
    if allowed:
        log.warning(
            "durability semi_sync: %s not reached and allowed unreachable by the operator: an"
            " acknowledged write only they received is lost",
            ", ".join(allowed),
        )
    refused = sorted(n for n in missing if n not in ctx.allow_unreachable)
    if refused:
        raise MechanismError(
            FailureKind.UNREACHABLE,
            f"durability semi_sync: {', '.join(refused)} not reached; it may hold the only copy"
            " of an acknowledged write (ctl ers --allow-unreachable to go ahead without it)",
        )


def _silent(name: str) -> MechanismError:
    return MechanismError(FailureKind.UNREACHABLE, f"{name}: did not answer the revocation")


def _not_applying(state: Replication) -> MechanismError | None:
    reason = state.not_applying()
    if reason is None:
        return None
    kind = FailureKind.INVALID if state.status is None else FailureKind.LAGGING
    return MechanismError(kind, f"{state.server}: {reason}")


def _behind_others(name: str, position: str, others: dict[str, str]) -> MechanismError | None:
    ahead = gtid.ahead_of(position, others)
    if not ahead:
        return None
    return MechanismError(
        FailureKind.LAGGING,
        f"{name} received {position or 'nothing'}; others received more: "
        + ", ".join(f"{n} {p}" for n, p in ahead.items()),
    )


def _server(ctx: ReparentContext, name: str) -> ServerConfig:
    found = next((s for s in ctx.servers if s.name == name), None)
    if found is None:
        raise MechanismError(FailureKind.INVALID, f"{name} is not among the shard's live servers")
    return found
