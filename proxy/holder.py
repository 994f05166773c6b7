"""The buffer's asyncio shell: feeds `proxy.buffer.Buffer` events and time, hands each held
command a ticket, and exports the buffer's figures.

Topology events come here straight from the router (`topology_event`). A session asks
`should_hold` before each command; a command to be held is handed over with `hold` (or
`hold_failed`), which returns its `Ticket`: the command itself stays with its session, as a
request stays on its caller's stack in vitess's `WaitForFailoverEnd`. The ticket's verdict,
`Released` (move to the current primary and run it) or `Evicted` (answer with an error saying it
never ran), is delivered once, from the event loop, after the holder has applied the whole batch
of the buffer's actions: like etcd raft's `Ready`, the state is consistent before anyone acts
on it, and no verdict re-enters the holder. A released ticket is `end`ed when its command is
over (vitess's `RetryDoneFunc`), which frees its slot; ending a waiting one (the client left)
evicts it.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, replace

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from proxy import metrics
from proxy.buffer import (
    Action,
    Buffer,
    BufferState,
    Evict,
    EvictReason,
    Finished,
    Flush,
    Skipped,
    Started,
    StartReason,
    Stopped,
)
from reparent.config import BufferConfig
from reparent.topology import Aborted, Established, ReparentStarted, TopologyEvent

log = logging.getLogger(__name__)

EPISODES_KEPT = 100  # finished episodes remembered for reports
RECOVERY_PROBE = 0.5  # seconds between checks that a suspect shard's primary is back


@dataclass(frozen=True, slots=True)
class Released:
    """The switch is over: move the session to the current primary and run the command.
    `to_new` is False after an abort (the old primary leads again)."""

    to_new: bool


@dataclass(frozen=True, slots=True)
class Evicted:
    """The holder gave up on the command: it never ran (the ticket is over)."""

    reason: EvictReason
    message: str


Verdict = Released | Evicted


class TicketState(enum.StrEnum):
    WAITING = "waiting"
    RELEASED = "released"  # its command may run; `end` frees the slot
    ENDED = "ended"


@dataclass(eq=False, slots=True)
class Ticket:
    """One held command's place in the holder."""

    entry: int
    held_at: float
    # Told the verdict once; None once the session ended the ticket (it no longer listens).
    on_verdict: Callable[[Verdict], None] | None
    state: TicketState = TicketState.WAITING


EVICTION_MESSAGES = {
    EvictReason.BUFFER_FULL: "the failover buffer is full ({size} commands held)",
    EvictReason.WINDOW_EXCEEDED: "it waited longer than the {window:g} s window",
    EvictReason.MAX_DURATION: "the switch took longer than {max_failover:g} s",
    EvictReason.CLIENT_GONE: "the client went away",
    EvictReason.SHUTDOWN: "Baton is shutting down",
}


class Holder(Collector):
    def __init__(self, settings: BufferConfig) -> None:
        self.settings = settings
        self.buffer = Buffer(settings)
        self._tickets: dict[int, Ticket] = {}  # by buffer entry, waiting or released
        self._next_entry = 1
        self._timer: asyncio.TimerHandle | None = None
        self._shards: set[str] = set()
        self.active = False  # some shard holds (or drains a backlog) right now
        # The counts of each finished episode by (shard, term), for the reparent's report.
        self.episodes: dict[tuple[str, int], Finished] = {}
        self._episode_waiters: dict[tuple[str, int], asyncio.Event] = {}
        # Does the shard's primary take writes? Asked while failed commands wait (SUSPECT), so
        # that a primary which recovers by itself (read_only lifted, restarted) gets them back.
        self.probe: Callable[[str], Awaitable[bool]] | None = None
        self._watches: dict[str, asyncio.Task[None]] = {}
        # Reads served on replicas while each shard holds, for its episode's report.
        self._reads: dict[str, int] = {}

    def read_served(self, shard: str) -> None:
        """A read ran on a replica while `shard` holds: it counts for the episode's report."""
        if shard in self._reads:
            self._reads[shard] += 1

    # -- topology events, from the router (on the loop) ----------------------------------------

    def topology_event(self, event: TopologyEvent) -> None:
        if not self.settings.enabled:
            return
        now = self._now()
        if isinstance(event, ReparentStarted):
            self._shards.add(event.shard)
            self._apply(self.buffer.reparent_started(event.shard, event.term, now))
        elif isinstance(event, Established):
            self._apply(self.buffer.established(event.shard, event.term, now))
        elif isinstance(event, Aborted):
            self._apply(self.buffer.aborted(event.shard, now))

    # -- sessions ------------------------------------------------------------------------------

    def should_hold(self, shard: str) -> bool:
        # Asked before every command: a plain attribute answers the common case.
        return self.active and self.buffer.buffering(shard)

    def hold(self, session_id: int, shard: str, on_verdict: Callable[[Verdict], None]) -> Ticket:
        """Hold a session's next command while `shard` switches (`should_hold`)."""
        return self._enter(
            on_verdict, lambda entry, now: self.buffer.hold(entry, session_id, shard, now)
        )

    def can_hold_failed(self, shard: str) -> bool:
        """May a command that failed on the primary wait here now? Not when disabled, in a
        dry run, or while a drain is under way (it failed on the primary just published)."""
        return self.settings.enabled and self.buffer.can_hold_failed(shard)

    def hold_failed(
        self, session_id: int, shard: str, term: int, on_verdict: Callable[[Verdict], None]
    ) -> Ticket:
        """Hold a command that failed on the primary of `term` until a newer primary is
        published (`can_hold_failed` first)."""
        self._shards.add(shard)
        return self._enter(
            on_verdict,
            lambda entry, now: self.buffer.hold_failed(entry, session_id, shard, term, now),
        )

    def _enter(
        self, on_verdict: Callable[[Verdict], None], decide: Callable[[int, float], list[Action]]
    ) -> Ticket:
        entry = self._next_entry
        self._next_entry += 1
        now = self._now()
        ticket = Ticket(entry, now, on_verdict)
        self._tickets[entry] = ticket
        self._apply(decide(entry, now))
        return ticket

    def end(self, ticket: Ticket) -> None:
        """The session is done with its ticket: its released command is over (the slot is
        free for the next), or its client left while it waited (it is evicted). Ending an
        ended ticket does nothing; no verdict reaches the session after this."""
        ticket.on_verdict = None
        state, ticket.state = ticket.state, TicketState.ENDED
        if state is TicketState.ENDED:
            return
        if state is TicketState.RELEASED:
            del self._tickets[ticket.entry]
            self._apply(self.buffer.flushed(ticket.entry, self._now()))
        else:  # evicted in this call, and forgotten with its Evict
            self._apply(self.buffer.cancel(ticket.entry, self._now()))

    async def episode(self, shard: str, term: int, timeout: float) -> Finished | None:
        """What the shard held for `term`, once it is idle again; None if not within timeout
        (or if it never held for that term)."""
        key = (shard, term)
        if key not in self.episodes and self.buffer.state(shard) is not BufferState.IDLE:
            waiter = self._episode_waiters.setdefault(key, asyncio.Event())
            try:
                await asyncio.wait_for(waiter.wait(), timeout)
            except TimeoutError:
                pass
        return self.episodes.get(key)

    # -- the shell -----------------------------------------------------------------------------

    def _now(self) -> float:
        return asyncio.get_running_loop().time()

    def _apply(self, actions: list[Action]) -> None:
        """Carry out one batch of the buffer's actions: the holder's own state first, then
        the verdicts, each from its own loop callback, so a session acts on a consistent
        holder and never re-enters it."""
        verdicts: list[tuple[Ticket, Verdict]] = []
        for action in actions:
            if isinstance(action, Flush):
                ticket = self._tickets[action.entry]
                ticket.state = TicketState.RELEASED
                metrics.HOLD_SECONDS.observe(self._now() - ticket.held_at)
                verdicts.append((ticket, Released(action.to_new)))
            elif isinstance(action, Evict):
                ticket = self._tickets.pop(action.entry)
                ticket.state = TicketState.ENDED
                why = EVICTION_MESSAGES[action.reason].format(**vars(self.settings))
                verdicts.append((ticket, Evicted(action.reason, why)))
            elif isinstance(action, Started):
                self._reads[action.shard] = 0
                if action.reason is StartReason.FAILURE:
                    self._watch(action.shard)
                log.info(
                    "shard %s: holding commands for term %d (%s)",
                    action.shard,
                    action.term,
                    action.reason,
                )
            elif isinstance(action, Finished):
                key = (action.shard, action.term)
                self.episodes[key] = replace(action, reads=self._reads.pop(action.shard, 0))
                while len(self.episodes) > EPISODES_KEPT:
                    del self.episodes[next(iter(self.episodes))]
                waiter = self._episode_waiters.pop(key, None)
                if waiter is not None:
                    waiter.set()
            elif isinstance(action, Stopped):
                log.info("shard %s: stopped holding (%s)", action.shard, action.reason)
            elif isinstance(action, Skipped):
                log.info("shard %s: not holding (%s)", action.shard, action.reason)
        self.active = any(self.buffer.buffering(shard) for shard in self._shards)
        self._schedule()
        if verdicts:
            loop = asyncio.get_running_loop()
            for ticket, verdict in verdicts:
                loop.call_soon(_deliver, ticket, verdict)

    def _watch(self, shard: str) -> None:
        if self.probe is not None and shard not in self._watches:
            self._watches[shard] = asyncio.get_running_loop().create_task(self._recovery(shard))

    async def _recovery(self, shard: str) -> None:
        """While failed commands wait and no reparent was announced, see whether the primary
        takes writes again by itself."""
        assert self.probe is not None
        try:
            while self.buffer.state(shard) is BufferState.SUSPECT:
                await asyncio.sleep(RECOVERY_PROBE)
                if self.buffer.state(shard) is BufferState.SUSPECT and await self.probe(shard):
                    log.info("shard %s: the primary takes writes again", shard)
                    self._apply(self.buffer.recovered(shard, self._now()))
        finally:
            self._watches.pop(shard, None)

    def _schedule(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        deadline = self.buffer.next_deadline()
        if deadline is not None:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_at(deadline, self._tick)

    def _tick(self) -> None:
        self._timer = None
        self._apply(self.buffer.tick(self._now()))

    # -- metrics -------------------------------------------------------------------------------

    def collect(self) -> Iterator[Metric]:
        c = self.buffer.counters
        held = CounterMetricFamily("baton_buffer_held", "Commands held during a switch")
        held.add_metric([], c.held)
        yield held
        flushed = CounterMetricFamily("baton_buffer_flushed", "Held commands run after a switch")
        flushed.add_metric([], c.flushed)
        yield flushed
        yield _by_reason(
            "baton_buffer_evicted", "Held commands failed without running", c.evicted_by_reason
        )
        yield _by_reason("baton_buffer_stops", "Times holding stopped", c.stops_by_reason)
        yield _by_reason("baton_buffer_starts", "Times holding started", c.starts_by_reason)
        used = GaugeMetricFamily("baton_buffer_utilization", "Share of buffer slots in use")
        used.add_metric([], self.buffer.slots_used() / self.settings.size)
        yield used


def _deliver(ticket: Ticket, verdict: Verdict) -> None:
    if ticket.on_verdict is not None:
        on_verdict, ticket.on_verdict = ticket.on_verdict, None
        on_verdict(verdict)


def _by_reason(name: str, documentation: str, counts: Mapping[enum.StrEnum, int]) -> Metric:
    family = CounterMetricFamily(name, f"{documentation}, by reason", labels=["reason"])
    for reason, n in counts.items():
        family.add_metric([str(reason)], n)
    return family
