"""The failure detector's pure core: what to do about a shard, given one round of probes.

Like the orchestrator and the buffer it does no I/O and reads no clock: the shell
(`reparent/watch.py`) probes every server of a shard each round, hands the result over as a
`ShardView` with the time, and carries out the actions it gets back.

What it decides:
- **A wrong picture** (`Report` of a `survey.Mismatch`): the servers contradict the config or
  the store (a replica streams from an address outside the config, a second server takes
  writes, the primary replicates, the primary lacks what all its replicas have). Nothing is
  done about that shard, neither reparent nor repair, until the servers agree again: every
  action assumes the picture. A replica that streams from a source outside the config is such
  a mismatch, never a sign that the primary is dead.
- **Dead primary** (`RunERS`): Baton failed to reach the primary in `failures` consecutive
  rounds (a probe still unanswered when the round decides counts as failed: a hung server is
  not waited for twice), *and* no replica still streams from it (each replica is unreachable,
  or its IO thread is not `Yes`: `Connecting` after a crash, `No` after a stop; or it has heard
  nothing, not even a heartbeat, for two heartbeat periods and half a round: a hung primary).
  With no replica reachable there is nobody to promote: that is reported instead.
  A primary that only Baton cannot reach while a replica's IO thread still runs is a blip on
  Baton's side (`Report(PRIMARY_UNREACHABLE)`): promoting another server then would only cost a
  switch, and the replicas are the better witnesses of the primary's health.
- **Small faults**, once seen in `CONFIRM` consecutive rounds (a reparent's transient states
  last less): a replica whose replication was stopped without an error is restarted; a writable
  replica is set read_only; a read_only primary is made writable; a server that replicates from
  nobody or from another server (an old primary back after an emergency reparent) rejoins as a
  replica of the primary. With `repair = false` each of these is only reported.
- **Errant transactions** (`Quarantine`): a server holding GTIDs the primary never had cannot
  replicate from it under gtid_strict_mode, and must never be promoted. GTIDs of the primary's
  own server_id are not counted: the two servers are probed at nearly but not exactly the same
  moment, so a replica may show a transaction the primary committed after its own probe.
  A quarantine the detector set is lifted by it once the server replicates cleanly from the
  primary again (an operator rebuilt it); one set by hand is lifted by hand only.

Rules that hold throughout: nothing is decided about a shard while a reparent is in flight, or
while a recovery or repair this detector asked for has not `finished`; after each emergency
reparent the shard waits `cooldown` seconds before another; the same repair of the same server
is not repeated within `cooldown` either, so a fault that comes back at once is reported, not
fought. Every report is made once per episode, not once per round.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

from reparent import gtid
from reparent.config import DetectorConfig
from reparent.survey import Mismatch, ServerView, ShardView, compare, errant

# Consecutive rounds a small fault must be seen in before it is repaired.
CONFIRM = 2


class Reason(enum.StrEnum):
    """Why the detector acts or reports; printed in logs and used as a metrics label."""

    PRIMARY_DEAD = "primary_dead"  # Baton and every replica lost the primary
    PRIMARY_UNREACHABLE = "primary_unreachable"  # only Baton lost it; replicas still stream
    COOLDOWN = "cooldown"  # the primary looks dead, but the shard recovered too recently
    PRIMARY_READ_ONLY = "primary_read_only"  # read_only with no reparent in flight
    REPLICATION_STOPPED = "replication_stopped"  # stopped without an error (a STOP SLAVE)
    REPLICATION_BROKEN = "replication_broken"  # stopped on an error a restart will not fix
    REPLICA_LOST_PRIMARY = "replica_lost_primary"  # its IO thread keeps reconnecting
    REPLICA_WRITABLE = "replica_writable"
    STRAY = "stray"  # replicates from nobody or from another server: rejoin it
    ERRANT = "errant"  # has transactions the primary never had: quarantine it
    QUARANTINED_WRITABLE = "quarantined_writable"
    HEALED = "healed"  # a quarantined server replicates from the primary cleanly again
    UNREACHABLE = "unreachable"  # a server other than the primary does not answer
    UNREADABLE = "unreadable"  # a GTID state that does not parse
    REPEATED = "repeated"  # the fault came back within the cooldown of its repair
    # The picture is wrong (survey.MismatchKind, same names): nothing is done about the shard.
    FOREIGN_SOURCE = "foreign_source"
    SECOND_PRIMARY = "second_primary"
    PRIMARY_REPLICATES = "primary_replicates"
    PRIMARY_BEHIND = "primary_behind"


# -- what the detector asks for ----------------------------------------------------------------


@dataclass(frozen=True)
class Action:
    shard: str
    server: str
    reason: Reason
    detail: str = ""

    @property
    def name(self) -> str:
        """The action's kind, as a metrics label: run_ers, restart_replication, ..."""
        return _snake(type(self).__name__)

    def __str__(self) -> str:
        detail = f": {self.detail}" if self.detail else ""
        return f"{self.name} {self.shard}/{self.server} [{self.reason}]{detail}"


@dataclass(frozen=True)
class RunERS(Action):
    """Emergency reparent of the shard; `server` is the dead primary."""

    # The first sign of the fault, on the detector's clock: the round of the first failed
    # probe, or the first heartbeat a witness should have had and did not, if earlier.
    first_sign: float = 0.0


@dataclass(frozen=True)
class RestartReplication(Action):
    pass


@dataclass(frozen=True)
class SetReadOnly(Action):
    pass


@dataclass(frozen=True)
class MakeWritable(Action):
    pass


@dataclass(frozen=True)
class Rejoin(Action):
    """Make `server` a read_only replica of the shard's primary (it has no errant GTIDs)."""

    primary: str = ""


@dataclass(frozen=True)
class Quarantine(Action):
    """Mark `server` quarantined in the store (never routed to, chosen or replicated from) and
    set it read_only if it answers."""


@dataclass(frozen=True)
class Release(Action):
    """Lift `server`'s quarantine: it replicates from the primary with nothing errant."""


@dataclass(frozen=True)
class Report(Action):
    """Nothing to do, or nothing Baton may do: log it and count it."""


def _snake(name: str) -> str:
    special = {"RunERS": "run_ers"}
    if name in special:
        return special[name]
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in name).lstrip("_")


# -- the state machine -------------------------------------------------------------------------


@dataclass
class _Shard:
    primary: str = ""
    term: int = 0
    failures: int = 0  # consecutive rounds the primary did not answer
    first_failure: float | None = None
    busy: bool = False  # actions handed out and not finished yet
    busy_ers: bool = False
    cooled_until: float = -math.inf  # no emergency reparent before this
    faults: dict[tuple[str, Reason], int] = field(default_factory=dict)  # consecutive rounds
    repaired: dict[tuple[str, Reason], float] = field(default_factory=dict)  # when last done
    reported: set[tuple[str, Reason]] = field(default_factory=set)  # reported this episode
    # Per replica: what it had received, since when, and whether it was ever seen receiving
    # something new from this primary (only then is its silence a witness).
    heard: dict[str, tuple[str, float, bool]] = field(default_factory=dict)
    mismatches: tuple[Mismatch, ...] = ()  # the last round's
    # Servers this detector quarantined itself: only those does it release when healed. A
    # quarantine set by hand (`ctl quarantine`), or found in the store at start, stays until
    # lifted by hand (`ctl unquarantine`, which shows the GTID check).
    quarantined_here: set[str] = field(default_factory=set)


class Detector:
    def __init__(self, settings: DetectorConfig) -> None:
        self.settings = settings
        self._shards: dict[str, _Shard] = {}

    def busy(self, shard: str) -> bool:
        return self._state(shard).busy

    def mismatches(self, shard: str) -> tuple[Mismatch, ...]:
        """How the servers contradicted the picture in the last round that was judged."""
        return self._state(shard).mismatches

    def observe(self, view: ShardView, now: float) -> list[Action]:
        """One probe round of one shard; the actions to carry out (Reports included)."""
        st = self._state(view.shard)
        if (st.primary, st.term) != (view.primary, view.term):
            # A new primary or term: what was counted was about another topology.
            st.primary, st.term = view.primary, view.term
            st.failures, st.first_failure = 0, None
            st.faults, st.reported, st.heard = {}, set(), {}
        for s in view.servers:
            if not s.reachable:
                continue
            before = st.heard.get(s.name)
            if before is None:
                st.heard[s.name] = (s.received, now, False)
            elif before[0] != s.received:
                st.heard[s.name] = (s.received, now, True)
        if st.busy:
            return []  # never two recoveries of one shard at once
        if view.reparent_in_flight:
            st.failures, st.first_failure, st.faults = 0, None, {}
            return []
        st.mismatches = compare(view)
        round_ = _Round(self, st, view, now)
        out = round_.decide()
        st.faults, st.reported = round_.seen, round_.present
        if any(not isinstance(a, Report) for a in out):
            st.busy = True
            st.busy_ers = any(isinstance(a, RunERS) for a in out)
        return out

    def finished(self, shard: str, now: float) -> None:
        """The actions of the last round that returned some are carried out (or failed)."""
        st = self._state(shard)
        if st.busy_ers:
            st.cooled_until = now + self.settings.cooldown
            st.failures, st.first_failure = 0, None
        st.busy = st.busy_ers = False

    def _state(self, shard: str) -> _Shard:
        return self._shards.setdefault(shard, _Shard())


class _Round:
    """The decisions of one round; `seen` and `present` become the shard's counters."""

    def __init__(self, detector: Detector, st: _Shard, view: ShardView, now: float) -> None:
        self.settings = detector.settings
        self.st = st
        self.view = view
        self.now = now
        self.out: list[Action] = []
        self.seen: dict[tuple[str, Reason], int] = {}
        self.present: set[tuple[str, Reason]] = set()

    def decide(self) -> list[Action]:
        view, st = self.view, self.st
        primary = view.server(view.primary)
        if primary.reachable:
            st.failures, st.first_failure = 0, None
        else:
            st.failures += 1
            if st.first_failure is None:
                st.first_failure = self.now
        if st.mismatches:
            # Every action assumes the picture; with the picture wrong, only say so.
            for m in st.mismatches:
                self._report(m.server, Reason(str(m.kind)), m.detail)
            return self.out
        if not primary.reachable:
            if st.failures >= self.settings.failures:
                self._primary_unreachable(primary)
            return self.out
        if primary.read_only:
            self._repair(
                MakeWritable, primary.name, Reason.PRIMARY_READ_ONLY, "no reparent in flight"
            )
        for server in view.servers:
            if server.name != primary.name:
                self._follower(server, primary)
        return self.out

    # -- the primary -------------------------------------------------------------------------

    def _primary_unreachable(self, primary: ServerView) -> None:
        view, st = self.view, self.st
        replicas = [
            s for s in view.servers if s.name != primary.name and s.name not in view.quarantined
        ]
        streaming = [s.name for s in replicas if self._streaming(s, primary.name)]
        probes = f"{st.failures} probes failed ({primary.error or 'no answer'})"
        if streaming:
            self._report(
                primary.name,
                Reason.PRIMARY_UNREACHABLE,
                f"{probes}, but {', '.join(streaming)} still replicate from it",
            )
            return
        witnesses = ", ".join(_witness(s, primary.name) for s in replicas) or "no replicas"
        if not any(s.reachable for s in replicas):
            # Dead as far as anyone can tell, but there is nobody to promote: an emergency
            # reparent would only fail, after telling every proxy to hold.
            self._report(
                primary.name, Reason.PRIMARY_DEAD, f"{probes}; {witnesses}; nobody to promote"
            )
            return
        if self.now < st.cooled_until:
            self._report(
                primary.name,
                Reason.COOLDOWN,
                f"{probes}; {witnesses}; no emergency reparent until the cooldown ends in "
                f"{st.cooled_until - self.now:.1f} s",
            )
            return
        assert st.first_failure is not None
        # The first heartbeat a silent witness missed may come before the first failed probe.
        missed = [
            self._heard_since(s) + s.heartbeat_period
            for s in replicas
            if s.streams_from(primary.name) and s.heartbeat_period > 0
        ]
        self.out.append(
            RunERS(
                view.shard,
                primary.name,
                Reason.PRIMARY_DEAD,
                f"{probes}; {witnesses}",
                first_sign=min([st.first_failure, *missed]),
            )
        )

    def _streaming(self, s: ServerView, primary: str) -> bool:
        """Does `s` still hear from the primary? Its IO thread must say Yes, and, when the
        primary sends heartbeats, it must have heard something (an event or a heartbeat)
        within two heartbeat periods and half a round: a hung primary (SIGSTOP) keeps its
        replicas' IO threads at Yes until slave_net_timeout, but sends them nothing. Half a
        round, not a whole one: rounds see a change at most once a round, and with a round
        of margin a hung primary would wait one round more than a dead one (whose replicas say
        Connecting at once); two periods of a healthy source always show a change.

        A replica never yet seen receiving from this primary (it was just pointed at it, and
        the primary may still be seeking its GTID position in a long binlog: measured under
        load, 100 transactions behind and silent for over a second after a planned switch)
        is no witness of silence: it counts as streaming."""
        if not s.streams_from(primary):
            return False
        if s.heartbeat_period <= 0:
            return True
        _, since, changed = self.st.heard.get(s.name, (s.received, self.now, False))
        if not changed:
            return True
        return self.now - since <= 2 * s.heartbeat_period + self.settings.interval / 2

    def _heard_since(self, s: ServerView) -> float:
        """When the detector last saw `s` receive something."""
        return self.st.heard.get(s.name, (s.received, self.now, False))[1]

    # -- every other server ------------------------------------------------------------------

    def _follower(self, s: ServerView, primary: ServerView) -> None:
        if s.name in self.view.quarantined:
            self._quarantined(s, primary)
            return
        if not s.reachable:
            self._report(s.name, Reason.UNREACHABLE, s.error)
            return
        errant = self._errant(s, primary)
        if errant is None:
            return
        if errant:
            self._repair(Quarantine, s.name, Reason.ERRANT, errant, gated=False)
            return
        if s.source != primary.name:
            where = "nobody" if s.source is None else s.source
            self._repair(
                Rejoin,
                s.name,
                Reason.STRAY,
                f"replicates from {where}, {'read_only' if s.read_only else 'writable'}",
                primary=primary.name,
            )
            return
        if s.io_running == "No" or s.sql_running == "No":
            threads = f"IO {s.io_running}, SQL {s.sql_running}"
            if s.io_errno or s.sql_errno:
                errors = f"IO error {s.io_errno}, SQL error {s.sql_errno}"
                self._report(s.name, Reason.REPLICATION_BROKEN, f"{threads}; {errors}")
            else:
                self._repair(RestartReplication, s.name, Reason.REPLICATION_STOPPED, threads)
        elif s.io_running == "Connecting" and self._fault(s.name, Reason.REPLICA_LOST_PRIMARY) > 1:
            self._report(s.name, Reason.REPLICA_LOST_PRIMARY, f"IO error {s.io_errno}")
        if not s.read_only:
            self._repair(SetReadOnly, s.name, Reason.REPLICA_WRITABLE, "a replica takes no writes")

    def _quarantined(self, s: ServerView, primary: ServerView) -> None:
        if not s.reachable:
            return
        if not s.read_only:
            self._repair(
                SetReadOnly, s.name, Reason.QUARANTINED_WRITABLE, "quarantined", gated=False
            )
            return
        if s.name not in self.st.quarantined_here:
            return
        errant = self._errant(s, primary)
        healthy = s.source == primary.name and s.io_running == "Yes" and s.sql_running == "Yes"
        if errant == "" and healthy:
            self._repair(Release, s.name, Reason.HEALED, "replicates from the primary, no errant")

    def _errant(self, s: ServerView, primary: ServerView) -> str | None:
        """The GTIDs `s` has and the primary lacks ("" if none), None if unreadable."""
        try:
            return errant(s, primary)
        except gtid.GtidError as e:
            self._report(s.name, Reason.UNREADABLE, str(e))
            return None

    # -- helpers -----------------------------------------------------------------------------

    def _fault(self, server: str, reason: Reason) -> int:
        key = (server, reason)
        n = self.seen[key] = self.st.faults.get(key, 0) + 1
        return n

    def _repair(
        self,
        kind: type[Action],
        server: str,
        reason: Reason,
        detail: str,
        gated: bool = True,
        **extra: str,
    ) -> None:
        if self._fault(server, reason) < CONFIRM:
            return
        if gated and not self.settings.repair:
            self._report(server, reason, f"{detail} (detector.repair is off)")
            return
        key = (server, reason)
        last = self.st.repaired.get(key)
        if last is not None and self.now - last < self.settings.cooldown:
            self._report(
                server,
                Reason.REPEATED,
                f"{reason} again {self.now - last:.1f} s after its repair; leaving it",
            )
            return
        self.st.repaired[key] = self.now
        if kind is Quarantine:
            self.st.quarantined_here.add(server)
        elif kind is Release:
            self.st.quarantined_here.discard(server)
        self.out.append(kind(self.view.shard, server, reason, detail, **extra))

    def _report(self, server: str, reason: Reason, detail: str) -> None:
        key = (server, reason)
        self.present.add(key)
        if key not in self.st.reported:
            self.out.append(Report(self.view.shard, server, reason, detail))


def _witness(s: ServerView, primary: str) -> str:
    """What one replica says about the primary, for the log."""
    if not s.reachable:
        return f"{s.name} unreachable"
    if s.source != primary:
        return f"{s.name} replicates from {s.source or 'nobody'}"
    if s.io_running == "Yes":
        return f"{s.name} IO Yes but silent"
    return f"{s.name} IO {s.io_running} (error {s.io_errno})"
