"""The pure decisions of read routing: which replica takes a read, whether the session may use
one at all, and what a causal read must wait for. No I/O and no clock of its own: the shell
(proxy/readpath.py and proxy/frontend.py) passes the time and carries the decisions out.

- The pool (`ReadPool`) knows each replica's health as the monitor last saw it (reachable,
  replicating, its lag, quarantined) and the reads each has outstanding from this process. A
  read goes to the qualifying replica with the fewest outstanding reads; none qualifies: the
  primary. A replica that failed under a read is set aside (`failed`) until the monitor sees it
  healthy again after `SET_ASIDE` seconds, so a dead replica is not tried by every read.
- The session (`session_allows_replica`): a read goes to a replica only outside a transaction
  (autocommit on, none open: with autocommit off a SELECT opens one), and while the session has
  no state that lives on its primary connection alone (temporary tables, user locks, table
  locks, XA, variables changed while tracking was off).
- Causal reads (`causal_step`): with "local", a read after the session's own write may run on
  a replica only once that replica has applied the write: at once if the replica's connection
  already waited for it or the monitor saw the replica's position cover it, else after
  `MASTER_GTID_WAIT(last_gtid, timeout)` there; a wait that times out sends the read to the
  primary. "global" waits for the primary's position read when the read starts.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from proxy.packets import Status, Track
from proxy.session import SessionState
from reparent import gtid
from reparent.config import CausalReads

_AUTOCOMMIT = int(Status.AUTOCOMMIT)
_TRANSACTION_BITS = int(Status.AUTOCOMMIT) | int(Status.IN_TRANS)
_TRANSACTION_STATE = int(Track.TRANSACTION_STATE)
_SYSTEM_VARIABLES = int(Track.SYSTEM_VARIABLES)
_LAST_GTID = b"\tlast_gtid"  # the entry's name, after its length byte
SET_ASIDE = 2.0  # seconds a replica that failed under a read gets no reads, at least

# A GTID position as the server reports it: the only text Baton puts into MASTER_GTID_WAIT.
_POSITION = re.compile(r"\d{1,10}-\d{1,10}-\d{1,20}(?:,\d{1,10}-\d{1,10}-\d{1,20}){0,63}")


class Fallback(enum.StrEnum):
    """Why a read that qualified for a replica ran on the primary."""

    NO_REPLICA = "no_replica"  # none is healthy, replicating and within max_replica_lag
    CAUSAL_TIMEOUT = "causal_timeout"  # no replica applied the session's write in time
    REPLICA_FAILED = "replica_failed"  # the replicas it tried failed under it
    SESSION_STATE = "session_state"  # a transaction or state that lives on the primary
    NO_POSITION = "no_position"  # global: the primary's position could not be read


@dataclass(frozen=True, slots=True)
class ReplicaHealth:
    """One server as the monitor last saw it."""

    name: str
    reachable: bool
    replicating: bool = False  # IO and SQL threads running
    lag: float | None = None  # Seconds_Behind_Master; None when not known
    position: str = ""  # gtid_slave_pos: what it has applied
    quarantined: bool = False

    def qualifies(self, max_lag: float) -> bool:
        return (
            self.reachable
            and self.replicating
            and not self.quarantined
            and self.lag is not None
            and self.lag <= max_lag
        )


class ReadPool:
    """The replicas of the shard and the reads this process has on each."""

    def __init__(self, max_lag: float) -> None:
        self.max_lag = max_lag
        self.health: dict[str, ReplicaHealth] = {}
        self.outstanding: dict[str, int] = {}
        self._set_aside: dict[str, float] = {}  # name -> until when
        self._turn = 0  # grows with each choice: equals take turns

    def update(self, seen: ReplicaHealth, now: float) -> None:
        self.health[seen.name] = seen
        until = self._set_aside.get(seen.name)
        if until is not None and now >= until and seen.qualifies(self.max_lag):
            del self._set_aside[seen.name]

    def choose(self, primary: str, now: float, exclude: frozenset[str] = frozenset()) -> str | None:
        """The qualifying replica with the fewest outstanding reads; among equals, each in
        turn (so one client's reads one after another spread too). None: the read goes to the
        primary."""
        best: list[str] = []
        best_load = 0
        for name, seen in self.health.items():
            if name == primary or name in exclude or name in self._set_aside:
                continue
            if not seen.qualifies(self.max_lag):
                continue
            load = self.outstanding.get(name, 0)
            if not best or load < best_load:
                best, best_load = [name], load
            elif load == best_load:
                best.append(name)
        if not best:
            return None
        self._turn += 1
        return best[self._turn % len(best)]

    def begin(self, name: str) -> None:
        self.outstanding[name] = self.outstanding.get(name, 0) + 1

    def end(self, name: str) -> None:
        self.outstanding[name] = max(0, self.outstanding.get(name, 0) - 1)

    def failed(self, name: str, now: float) -> None:
        """A read failed on `name` (lost or refused connection): no reads until the monitor
        sees it healthy after SET_ASIDE seconds."""
        self._set_aside[name] = now + SET_ASIDE

    def covers(self, name: str, position: str) -> bool:
        """Did the monitor see `name` apply `position` already?"""
        seen = self.health.get(name)
        return seen is not None and covers(seen.position, position)


def covers(applied: str, position: str) -> bool:
    """Has a server at `applied` applied `position`? False when either is not a position."""
    if not applied or not position:
        return False
    try:
        return gtid.contains(applied, position)
    except gtid.GtidError:
        return False


def state_changed(tracked: list[tuple[int, bytes]]) -> bool:
    """Did a primary's response report a change of the session's state that its replica
    connections must follow (a variable, the schema, user variables)? The GTID of a write
    (`last_gtid`) and the transaction state are not such changes."""
    return any(
        kind != _TRANSACTION_STATE
        and not (kind == _SYSTEM_VARIABLES and value.startswith(_LAST_GTID))
        for kind, value in tracked
    )


def valid_position(text: str) -> bool:
    """Is `text` a GTID position Baton may put into a statement?"""
    return _POSITION.fullmatch(text) is not None


def session_allows_replica(state: SessionState) -> bool:
    """May this session's next read run on a replica at all? (The text is `classify`'s.)"""
    return (
        state.status & _TRANSACTION_BITS == _AUTOCOMMIT  # autocommit on, none open
        and not state.temporary_tables
        and not state.user_locks
        and not state.xa
        and not state.variables_untracked
        and state.transaction_state[7:8] != "L"  # LOCK TABLES
        # An ed25519 login answered the primary's challenge only: Baton cannot log it in to
        # a replica (proxy/login.py).
        and not state.single_login
    )


class Step(enum.StrEnum):
    """What a causal read does before it runs on the replica chosen."""

    GO = "go"  # run it now
    WAIT = "wait"  # MASTER_GTID_WAIT(position) there first
    READ_PRIMARY_POSITION = "read_primary_position"  # global: learn the position first


def causal_step(mode: CausalReads, last_gtid: str, covered: str, known: bool) -> Step:
    """`last_gtid`: the session's last write; `covered`: the position this replica's
    connection last waited for; `known`: the monitor saw the replica cover `last_gtid`."""
    if mode is CausalReads.NONE:
        return Step.GO
    if mode is CausalReads.GLOBAL:
        return Step.READ_PRIMARY_POSITION
    if not last_gtid or known or (covered and covers(covered, last_gtid)):
        return Step.GO
    return Step.WAIT
