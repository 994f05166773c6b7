"""The failover buffer's pure core: which held command runs, fails or keeps waiting, and when.

Like the orchestrator it does no I/O and reads no clock: its shell (`Holder`, proxy/holder.py)
passes `now` into every call and carries out the returned actions. So every decision is a
function of the calls and their times, and the tests can walk any timeline in microseconds. Its
bounds are `[buffer]` (`reparent.config.BufferConfig`), checked when the config is loaded.

Where it departs from vtgate's failover buffer (Vitess, go/vt/vtgate/buffer, whose defaults of
1000 slots, a 10 s window and 20 s of maximum failover are these bounds' defaults too):

- Buffering starts on the controller's `reparent_started`, before anything is demoted, not after
  a request has already failed, so a quiet shard is covered too.
- A command that waited past its window, or was still held when the failover outlasted
  `max_failover`, fails with an error that says it never ran. vtgate retries it blindly against
  a server that may not be the primary.
- Per-session order is kept, and the drain is paced by `drain_concurrency` per shard.

Time-based work is done at the start of every call that takes `now`, not only in `tick`, so the
outcome does not depend on whether the shell's timer fired just before or just after an event.
`now` must not go backwards (use the event loop's monotonic clock).

Choices of its own, where neither vtgate nor the topology contract settles the question:

- A `hold` while DRAINING queues behind the entries that are draining and flushes in turn.
  `buffering(shard)` stays True during a drain only until every entry held before the drain
  began has been flushed (or evicted): later arrivals must not overtake the backlog, but if they
  kept the shard draining for as long as any command was queued, a load needing more than
  `drain_concurrency` would keep the shard throttled forever.
- A command that failed for want of a writable primary (`hold_failed`: its connection to the
  primary broke, or the primary answered read_only, before any byte of the result reached the
  client) is held without a `reparent_started`. The shard becomes SUSPECT: only such failed
  commands wait, every other session goes on as usual (one killed connection must not stall the
  shard). A `reparent_started` turns SUSPECT into BUFFERING; `established` or `aborted` drains it;
  when its last failed command has been evicted it is IDLE again.
- A `reparent_started` while DRAINING starts buffering again at once. Entries not yet flushed
  are held again (they keep their window and their place ahead of new arrivals) and go to
  whichever primary the new reparent ends with; entries already flushing finish where they were
  sent. Waiting for the drain to finish instead would send new commands to a primary that is
  about to be demoted.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

from reparent.config import BufferConfig


class BufferState(enum.StrEnum):
    IDLE = "idle"
    SUSPECT = "suspect"  # only commands that failed on the primary wait
    BUFFERING = "buffering"
    DRAINING = "draining"


class StartReason(enum.StrEnum):
    """Why a shard started holding commands."""

    REPARENT = "reparent"  # the controller announced a reparent
    FAILURE = "failure"  # a command failed on the primary before any reparent was announced


class StopReason(enum.StrEnum):
    """Why a shard stopped buffering."""

    ESTABLISHED = "established"
    ABORTED = "aborted"
    MAX_DURATION = "max_duration"
    SHUTDOWN = "shutdown"
    EMPTIED = "emptied"  # SUSPECT: every failed command held has been evicted
    RECOVERED = "recovered"  # SUSPECT: the primary takes writes again, no reparent needed


class EvictReason(enum.StrEnum):
    """Why a held command failed without running: the client may retry it safely."""

    BUFFER_FULL = "buffer_full"
    WINDOW_EXCEEDED = "window_exceeded"
    MAX_DURATION = "max_duration"
    CLIENT_GONE = "client_gone"
    SHUTDOWN = "shutdown"


class SkipReason(enum.StrEnum):
    """Why a reparent is not buffered."""

    TOO_RECENT = "too_recent"
    DRY_RUN = "dry_run"


# -- actions for the shell --------------------------------------------------------------------


@dataclass(frozen=True)
class Flush:
    """Run this held entry now; to_new is False after an abort (back to the old primary)."""

    entry: int
    shard: str
    to_new: bool


@dataclass(frozen=True)
class Evict:
    """Fail this held entry: it never ran, so the client may retry it."""

    entry: int
    reason: EvictReason


@dataclass(frozen=True)
class Started:
    shard: str
    term: int
    reason: StartReason


@dataclass(frozen=True)
class Stopped:
    shard: str
    reason: StopReason


@dataclass(frozen=True)
class Skipped:
    shard: str
    reason: SkipReason


@dataclass(frozen=True)
class Finished:
    """A shard is idle again: what it held from its start, for the reparent's report."""

    shard: str
    term: int  # the term it held for (for a failure that no reparent followed, the next term)
    held: int
    flushed: int
    evicted: int
    reads: int = 0  # reads served on replicas meanwhile (the holder counts them, not the buffer)


Action = Flush | Evict | Started | Stopped | Skipped | Finished


@dataclass
class Counters:
    """Totals since start, for metrics. Every label is present from the start at zero, so a
    rate() works on the first failover. `held` == `flushed` + all evictions + `Buffer.held()`."""

    held: int = 0  # hold() calls, a newcomer rejected for a full buffer included
    flushed: int = 0  # Flush actions issued
    starts_by_reason: dict[StartReason, int] = field(
        default_factory=lambda: dict.fromkeys(StartReason, 0)
    )
    evicted_by_reason: dict[EvictReason, int] = field(
        default_factory=lambda: dict.fromkeys(EvictReason, 0)
    )
    stops_by_reason: dict[StopReason, int] = field(
        default_factory=lambda: dict.fromkeys(StopReason, 0)
    )
    skips_by_reason: dict[SkipReason, int] = field(
        default_factory=lambda: dict.fromkeys(SkipReason, 0)
    )


# -- the state machine ------------------------------------------------------------------------

# States in which entries wait for a primary to be published, under a deadline.
_HOLDING = frozenset({BufferState.SUSPECT, BufferState.BUFFERING})
# Stops after which a primary is known to take writes: what waits is flushed to it.
_FLUSHING_STOPS = frozenset({StopReason.ESTABLISHED, StopReason.ABORTED, StopReason.RECOVERED})


@dataclass(eq=False)
class _Entry:
    id: int
    session: int
    shard: str
    held_at: float
    seq: int  # hold order across all shards
    flushing: bool = False


@dataclass(eq=False)
class _Shard:
    """One shard's holding: its state, the switch it holds for and its queue, and this
    episode's counts (thirteen fields: what `Finished` and the drain read, kept together)."""

    name: str
    state: BufferState = BufferState.IDLE
    term: int = 0  # the term being established while BUFFERING
    established: int = 0  # the newest term seen established
    deadline: float = math.inf  # while BUFFERING: when buffering stops for MAX_DURATION
    last_end: float | None = None  # when buffering last stopped, for min_between
    to_new: bool = True
    # Entries held before this hold sequence number are the drain's backlog, which later
    # arrivals queue behind.
    drain_from: int = 0
    queue: dict[int, _Entry] = field(default_factory=dict)  # waiting, in hold order
    in_flight: int = 0
    # This episode's counts, from its start until the shard is idle again.
    held: int = 0
    flushed: int = 0
    evicted: int = 0


class Buffer:
    """Holds commands per shard while a reparent is in flight and decides their fate.

    Every held entry ends exactly once: by one Flush (then the shell's `flushed`) or one Evict.
    An entry takes a slot from `hold` until its Evict or its `flushed`.
    """

    def __init__(self, config: BufferConfig) -> None:
        self.config = config
        self.counters = Counters()
        self._seq = 0
        self._shards: dict[str, _Shard] = {}
        self._entries: dict[int, _Entry] = {}  # waiting or flushing: one slot each
        # Waiting entries in hold order across shards, so the next window to expire is first.
        self._waiting: dict[int, _Entry] = {}
        # Each session's entries in hold order: only the first may flush.
        self._sessions: dict[int, dict[int, None]] = {}
        # Shards that may flush more or have emptied, in the order they were touched (a dict,
        # not a set, so that the order of actions does not depend on string hashing).
        self._dirty: dict[str, None] = {}

    # -- queries --------------------------------------------------------------------------

    def state(self, shard: str) -> BufferState:
        sh = self._shards.get(shard)
        return BufferState.IDLE if sh is None else sh.state

    def buffering(self, shard: str) -> bool:
        """Whether the shell must hold a new command of `shard` rather than send it.

        While draining, True until the backlog has left the queue: see the module docstring."""
        sh = self._shards.get(shard)
        if sh is None:
            return False
        if sh.state is BufferState.BUFFERING:
            return not self.config.dry_run
        return (
            sh.state is BufferState.DRAINING
            and bool(sh.queue)
            and next(iter(sh.queue.values())).seq < sh.drain_from
        )

    def held(self, shard: str | None = None) -> int:
        """Entries waiting (not yet flushed), of one shard or of all."""
        if shard is None:
            return len(self._waiting)
        sh = self._shards.get(shard)
        return 0 if sh is None else len(sh.queue)

    def slots_used(self) -> int:
        """Entries waiting or flushing: a flushing entry keeps its slot until `flushed`."""
        return len(self._entries)

    def next_deadline(self) -> float | None:
        """When the shell must call `tick` next; None when nothing is waiting on time."""
        times = [sh.deadline for sh in self._shards.values() if sh.state in _HOLDING]
        if self._waiting:
            times.append(next(iter(self._waiting.values())).held_at + self.config.window)
        return min(times, default=None)

    # -- topology events ------------------------------------------------------------------

    def reparent_started(self, shard: str, term: int, now: float) -> list[Action]:
        """Start holding the shard's commands. A duplicate while buffering changes nothing but
        the term, so it neither extends the deadline nor counts a second start. One for a term
        already established is a replay of a finished reparent: starting on it would hold the
        shard's traffic for nothing until the deadline and then fail it all."""
        out = self._advance(now)
        sh = self._shards.setdefault(shard, _Shard(shard))
        if sh.state is BufferState.BUFFERING:
            sh.term = max(sh.term, term)
        if sh.state is BufferState.BUFFERING or term <= sh.established:
            return out + self._settle()
        suspect = sh.state is BufferState.SUSPECT
        # Failed commands already wait: the announced reparent is what they wait for.
        if not suspect and sh.last_end is not None and now - sh.last_end < self.config.min_between:
            self.counters.skips_by_reason[SkipReason.TOO_RECENT] += 1
            return [*out, Skipped(shard, SkipReason.TOO_RECENT), *self._settle()]
        sh.state = BufferState.BUFFERING
        sh.term = max(sh.term, term) if suspect else term
        sh.deadline = now + self.config.max_failover
        self.counters.starts_by_reason[StartReason.REPARENT] += 1
        out.append(Started(shard, sh.term, StartReason.REPARENT))
        if self.config.dry_run:
            self.counters.skips_by_reason[SkipReason.DRY_RUN] += 1
            out.append(Skipped(shard, SkipReason.DRY_RUN))
        return out + self._settle()

    def established(self, shard: str, term: int, now: float) -> list[Action]:
        """Flush to the new primary. Ignored unless buffering, and for a term older than the one
        being established: a replayed old event must not release commands early."""
        out = self._advance(now)
        sh = self._shards.get(shard)
        if sh is not None and sh.state in _HOLDING and term >= sh.term:
            sh.established = term
            out += self._stop(sh, StopReason.ESTABLISHED, now)
        return out + self._settle()

    def aborted(self, shard: str, now: float) -> list[Action]:
        """Flush back to the old primary, which leads again. Ignored unless holding."""
        out = self._advance(now)
        sh = self._shards.get(shard)
        if sh is not None and sh.state in _HOLDING:
            out += self._stop(sh, StopReason.ABORTED, now)
        return out + self._settle()

    def recovered(self, shard: str, now: float) -> list[Action]:
        """The primary the failed commands failed on takes writes again (its read_only was
        lifted, it came back): they go back to it. Only while SUSPECT: once a reparent is
        announced, the reparent decides where they go."""
        out = self._advance(now)
        sh = self._shards.get(shard)
        if sh is not None and sh.state is BufferState.SUSPECT:
            out += self._stop(sh, StopReason.RECOVERED, now)
        return out + self._settle()

    def shutdown(self, now: float) -> list[Action]:
        """Fail everything still waiting, so no client hangs on a closing proxy. Entries already
        flushing finish and are reported with `flushed` as usual."""
        out = self._advance(now)
        for sh in self._shards.values():
            if sh.state in _HOLDING:
                out += self._stop(sh, StopReason.SHUTDOWN, now)
            else:
                out += self._evict_waiting(sh, EvictReason.SHUTDOWN)
        return out + self._settle()

    # -- commands -------------------------------------------------------------------------

    def hold(self, entry: int, session: int, shard: str, now: float) -> list[Action]:
        """Hold one command; [] when it waits. While draining, the entry queues behind the
        backlog and may be flushed at once (a Flush of `entry` itself).

        When every slot is taken, the oldest waiting entry of this shard makes room; when this
        shard has no other, the newcomer is refused (Evict(entry, BUFFER_FULL)). A command that
        arrives at or after the failover's deadline is evicted with MAX_DURATION, like the rest.
        """
        if not self.buffering(shard):
            raise ValueError(f"shard {shard!r} is not buffering: send entry {entry} instead")
        return self._enqueue(entry, session, self._shards[shard], now)

    def can_hold_failed(self, shard: str) -> bool:
        """Whether a command that failed on the primary may wait here for a new primary. Not
        while draining (the command failed on the primary just published: nothing better is
        coming) and not in dry-run (which never holds)."""
        return not self.config.dry_run and self.state(shard) is not BufferState.DRAINING

    def hold_failed(
        self, entry: int, session: int, shard: str, term: int, now: float
    ) -> list[Action]:
        """Hold a command that failed on the primary of `term` before any of its result
        reached the client, until a newer primary is published (or aborted back). The shard
        becomes SUSPECT if it was idle: the other sessions are not held."""
        if not self.can_hold_failed(shard):
            raise ValueError(f"shard {shard!r} cannot hold failed commands now")
        out = self._advance(now)
        sh = self._shards.setdefault(shard, _Shard(shard))
        if sh.state is BufferState.IDLE:
            sh.state = BufferState.SUSPECT
            sh.term = max(term, sh.established) + 1
            sh.deadline = now + self.config.max_failover
            self.counters.starts_by_reason[StartReason.FAILURE] += 1
            out.append(Started(shard, sh.term, StartReason.FAILURE))
        return out + self._enqueue(entry, session, sh, now)

    def _enqueue(self, entry: int, session: int, sh: _Shard, now: float) -> list[Action]:
        if entry in self._entries:
            raise ValueError(f"entry {entry} is already held")
        shard = sh.name
        e = _Entry(entry, session, shard, now, self._seq)
        self._seq += 1
        self._entries[entry] = e
        self._waiting[entry] = e
        sh.queue[entry] = e
        self._sessions.setdefault(session, {})[entry] = None
        self.counters.held += 1
        sh.held += 1
        self._dirty[shard] = None
        # Added before time moves on, so that a deadline already passed evicts it too.
        out = self._advance(now)
        if entry in sh.queue and len(self._entries) > self.config.size:
            oldest = next(iter(sh.queue.values()))  # the newcomer itself when it is alone
            out.append(self._evict(oldest, EvictReason.BUFFER_FULL))
        return out + self._settle()

    def cancel(self, entry: int, now: float) -> list[Action]:
        """The client is gone. An entry already flushing is left alone: the shell reports it
        with `flushed`, and releasing it here too would free its slot twice."""
        out = self._advance(now)
        e = self._entries.get(entry)
        if e is not None and not e.flushing:
            out.append(self._evict(e, EvictReason.CLIENT_GONE))
        return out + self._settle()

    def flushed(self, entry: int, now: float) -> list[Action]:
        """A flushed entry has finished running: free its slot and flush the next ones."""
        e = self._entries.get(entry)
        if e is None or not e.flushing:
            raise ValueError(f"entry {entry} is not flushing")
        self._release(e)
        return self._advance(now) + self._settle()

    def tick(self, now: float) -> list[Action]:
        """Evict what waited too long and stop buffering past the deadline."""
        return self._advance(now) + self._settle()

    # -- internals ------------------------------------------------------------------------

    def _advance(self, now: float) -> list[Action]:
        """Everything due by `now`, in the order it fell due: an entry whose window ended
        before its shard's deadline is evicted for its window, one still waiting at the
        deadline for the deadline."""
        window = self.config.window
        expired = []
        for e in self._waiting.values():
            if e.held_at + window > now:
                break
            expired.append(e)
        out: list[Action] = []
        for e in expired:
            sh = self._shards[e.shard]
            if not (sh.state in _HOLDING and sh.deadline < e.held_at + window):
                out.append(self._evict(e, EvictReason.WINDOW_EXCEEDED))
        for sh in self._shards.values():
            if sh.state in _HOLDING and sh.deadline <= now:
                out += self._stop(sh, StopReason.MAX_DURATION, sh.deadline)
        return out

    def _stop(self, sh: _Shard, reason: StopReason, at: float) -> list[Action]:
        sh.state = BufferState.DRAINING
        sh.last_end = at
        sh.drain_from = self._seq
        self.counters.stops_by_reason[reason] += 1
        self._dirty[sh.name] = None
        out: list[Action] = [Stopped(sh.name, reason)]
        if reason in _FLUSHING_STOPS:
            sh.to_new = reason is StopReason.ESTABLISHED
        else:
            # No primary is known to be safe: nothing waiting may be flushed. (MAX_DURATION and
            # SHUTDOWN are both a StopReason and an EvictReason, with the same label.)
            out += self._evict_waiting(sh, EvictReason(reason.value))
        return out

    def _evict_waiting(self, sh: _Shard, reason: EvictReason) -> list[Action]:
        return [self._evict(e, reason) for e in list(sh.queue.values())]

    def _evict(self, e: _Entry, reason: EvictReason) -> Evict:
        self._release(e)
        self.counters.evicted_by_reason[reason] += 1
        self._shards[e.shard].evicted += 1
        return Evict(e.id, reason)

    def _release(self, e: _Entry) -> None:
        """Forget an entry and free its slot; its shard, and the shard of its session's next
        entry, may now flush more."""
        del self._entries[e.id]
        sh = self._shards[e.shard]
        if e.flushing:
            sh.in_flight -= 1
        else:
            del self._waiting[e.id]
            del sh.queue[e.id]
        self._dirty[e.shard] = None
        chain = self._sessions[e.session]
        del chain[e.id]
        if chain:
            self._dirty[self._entries[next(iter(chain))].shard] = None
        else:
            del self._sessions[e.session]

    def _settle(self) -> list[Action]:
        """Flush what may run in the shards touched, and let emptied drains go idle."""
        out: list[Action] = []
        while self._dirty:
            name = next(iter(self._dirty))
            del self._dirty[name]
            sh = self._shards[name]
            if sh.state is BufferState.SUSPECT and not sh.queue:
                self.counters.stops_by_reason[StopReason.EMPTIED] += 1
                out += [Stopped(name, StopReason.EMPTIED), self._finish(sh)]
            if sh.state is not BufferState.DRAINING:
                continue
            out += self._pump(sh)
            if not sh.queue and sh.in_flight == 0:
                out.append(self._finish(sh))
        return out

    def _finish(self, sh: _Shard) -> Finished:
        """The episode is over: report its counts and start the next one from zero."""
        sh.state = BufferState.IDLE
        done = Finished(sh.name, sh.term, sh.held, sh.flushed, sh.evicted)
        sh.held = sh.flushed = sh.evicted = 0
        return done

    def _pump(self, sh: _Shard) -> list[Action]:
        """Flush waiting entries in hold order up to the concurrency limit, skipping any whose
        session has an earlier entry waiting or flushing."""
        room = self.config.drain_concurrency - sh.in_flight
        ready: list[_Entry] = []
        if room > 0:
            for e in sh.queue.values():
                if next(iter(self._sessions[e.session])) == e.id:
                    ready.append(e)
                    if len(ready) == room:
                        break
        out: list[Action] = []
        for e in ready:
            del sh.queue[e.id]
            del self._waiting[e.id]
            e.flushing = True
            sh.in_flight += 1
            sh.flushed += 1
            self.counters.flushed += 1
            out.append(Flush(e.id, sh.name, sh.to_new))
        return out
