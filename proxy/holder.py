"""The buffer's asyncio shell: feeds `proxy.buffer.Buffer` events and time, carries out its
actions on the sessions, and exports its figures.

Topology events arrive here on the proxy's loop (the router hops them over). A session asks
`should_hold` before each command. A held command waits in its session, untouched, until the
buffer says `Flush` (move the session to the current primary, then run it) or `Evict` (answer
with an error saying it never ran).
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import Protocol

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

log = logging.getLogger(__name__)

EPISODES_KEPT = 100  # finished episodes remembered for reports
RECOVERY_PROBE = 0.5  # seconds between checks that a suspect shard's primary is back


class HeldSession(Protocol):
    """What the holder needs of a client session."""

    def resume_held(self, entry: int, to_new: bool) -> None: ...

    def evict_held(self, entry: int, reason: EvictReason, message: str) -> None: ...


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
        self._sessions: dict[int, HeldSession] = {}
        self._held_at: dict[int, float] = {}
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

    # -- topology events (on the loop) ---------------------------------------------------------

    def reparent_started(self, shard: str, term: int) -> None:
        if self.settings.enabled:
            self._shards.add(shard)
            self._apply(self.buffer.reparent_started(shard, term, self._now()))

    def established(self, shard: str, term: int) -> None:
        if self.settings.enabled:
            self._apply(self.buffer.established(shard, term, self._now()))

    def aborted(self, shard: str) -> None:
        if self.settings.enabled:
            self._apply(self.buffer.aborted(shard, self._now()))

    # -- sessions ------------------------------------------------------------------------------

    def should_hold(self, shard: str) -> bool:
        # Asked before every command: a plain attribute answers the common case.
        return self.active and self.buffer.buffering(shard)

    def hold(self, session: HeldSession, session_id: int, shard: str) -> int:
        """Hold a session's next command; the buffer may answer at once (evict, or flush)."""
        return self._enter(
            session, lambda entry, now: self.buffer.hold(entry, session_id, shard, now)
        )

    def hold_failed(
        self, session: HeldSession, session_id: int, shard: str, term: int
    ) -> int | None:
        """Hold a command that failed on the primary of `term` until a newer primary is
        published; None when it cannot wait (disabled, dry run, or a drain is under way)."""
        if not self.settings.enabled or not self.buffer.can_hold_failed(shard):
            return None
        self._shards.add(shard)
        return self._enter(
            session,
            lambda entry, now: self.buffer.hold_failed(entry, session_id, shard, term, now),
        )

    def _enter(self, session: HeldSession, decide: Callable[[int, float], list[Action]]) -> int:
        """A new entry for `session`, registered before the buffer decides on it: the buffer
        may flush or evict it within `decide`."""
        entry = self._next_entry
        self._next_entry += 1
        self._sessions[entry] = session
        now = self._now()
        self._held_at[entry] = now
        self._apply(decide(entry, now))
        return entry

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

    def flushed(self, entry: int) -> None:
        self._apply(self.buffer.flushed(entry, self._now()))

    def cancel(self, entry: int) -> None:
        self._apply(self.buffer.cancel(entry, self._now()))

    # -- the shell -----------------------------------------------------------------------------

    def _now(self) -> float:
        return asyncio.get_running_loop().time()

    def _apply(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, Flush):
                session = self._sessions.pop(action.entry)
                metrics.HOLD_SECONDS.observe(self._now() - self._held_at.pop(action.entry))
                session.resume_held(action.entry, action.to_new)
            elif isinstance(action, Evict):
                session = self._sessions.pop(action.entry)
                self._held_at.pop(action.entry, None)
                why = EVICTION_MESSAGES[action.reason].format(**vars(self.settings))
                session.evict_held(action.entry, action.reason, why)
            elif isinstance(action, Started):
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
                self.episodes[key] = action
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


def _by_reason(name: str, documentation: str, counts: Mapping[enum.StrEnum, int]) -> Metric:
    family = CounterMetricFamily(name, f"{documentation}, by reason", labels=["reason"])
    for reason, n in counts.items():
        family.add_metric([str(reason)], n)
    return family
