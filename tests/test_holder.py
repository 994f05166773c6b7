"""The holder's tickets (proxy/holder.py): a verdict arrives once, from its own loop callback
after the holder's state is consistent; a ticket is ended exactly once, whatever its state, so
no slot outlives its command. An event loop, no sockets."""

from __future__ import annotations

import asyncio

from proxy.buffer import BufferState, EvictReason
from proxy.holder import Evicted, Holder, Released, TicketState, Verdict
from reparent.config import BufferConfig
from reparent.topology import Aborted, Established, ReparentStarted


class Session:
    """Records its verdicts; `on_verdict` may look at the holder, which must be consistent."""

    def __init__(self, holder: Holder) -> None:
        self.holder = holder
        self.verdicts: list[Verdict] = []
        self.slots_seen: list[int] = []

    def on_verdict(self, verdict: Verdict) -> None:
        self.verdicts.append(verdict)
        self.slots_seen.append(self.holder.buffer.slots_used())


def run(body) -> None:  # type: ignore[no-untyped-def]
    asyncio.run(body())


def switching(**bounds: int) -> tuple[Holder, Session, Session]:
    """A holder whose shard s switches to term 2, and two sessions."""
    holder = Holder(BufferConfig(**bounds))
    holder.topology_event(ReparentStarted("s", 2))
    return holder, Session(holder), Session(holder)


def test_verdict_comes_after_hold_returns_and_after_the_batch() -> None:
    async def body() -> None:
        holder, first, second = switching(size=1)
        assert holder.should_hold("s")
        t1 = holder.hold(1, "s", first.on_verdict)
        # The buffer is full: the oldest is evicted within this call, but told only later.
        t2 = holder.hold(2, "s", second.on_verdict)
        assert first.verdicts == [] and t1.state is TicketState.ENDED
        await asyncio.sleep(0)
        assert first.verdicts == [
            Evicted(EvictReason.BUFFER_FULL, "the failover buffer is full (1 commands held)")
        ]
        holder.topology_event(Established("s", "db2", 2))
        assert second.verdicts == [] and t2.state is TicketState.RELEASED
        await asyncio.sleep(0)
        assert second.verdicts == [Released(True)]
        assert second.slots_seen == [1]  # still held until the command is over
        holder.end(t2)
        assert holder.buffer.slots_used() == 0
        assert holder.buffer.state("s") is BufferState.IDLE
        assert holder.episodes[("s", 2)].flushed == 1

    run(body)


def test_ending_a_released_ticket_lets_the_next_one_flush() -> None:
    async def body() -> None:
        holder, a, b = switching(drain_concurrency=1)
        ta = holder.hold(1, "s", a.on_verdict)
        tb = holder.hold(2, "s", b.on_verdict)
        holder.topology_event(Established("s", "db2", 2))
        await asyncio.sleep(0)
        assert a.verdicts == [Released(True)] and b.verdicts == []
        holder.end(ta)
        await asyncio.sleep(0)
        assert b.verdicts == [Released(True)]
        holder.end(tb)
        holder.end(tb)  # a second end does nothing
        assert holder.buffer.slots_used() == 0

    run(body)


def test_client_gone_before_its_release_was_told_frees_the_slot() -> None:
    """The flush was decided, the session left before hearing of it: it hears nothing, and
    the slot does not stay taken (the shard would drain for ever)."""

    async def body() -> None:
        holder, a, b = switching(drain_concurrency=1)
        ta = holder.hold(1, "s", a.on_verdict)
        holder.hold(2, "s", b.on_verdict)
        holder.topology_event(Established("s", "db2", 2))
        holder.end(ta)  # the client left
        await asyncio.sleep(0)
        assert a.verdicts == []
        assert b.verdicts == [Released(True)]

    run(body)


def test_client_gone_while_held_evicts_without_a_verdict() -> None:
    async def body() -> None:
        holder, a, _ = switching()
        ta = holder.hold(1, "s", a.on_verdict)
        holder.end(ta)
        await asyncio.sleep(0)
        assert a.verdicts == [] and holder.buffer.slots_used() == 0
        assert holder.buffer.counters.evicted_by_reason[EvictReason.CLIENT_GONE] == 1

    run(body)


def test_abort_releases_back_to_the_old_primary() -> None:
    async def body() -> None:
        holder, a, _ = switching()
        holder.hold(1, "s", a.on_verdict)
        holder.topology_event(Aborted("s", "candidate lagged"))
        await asyncio.sleep(0)
        assert a.verdicts == [Released(False)]

    run(body)


def test_failed_command_waits_for_a_newer_term() -> None:
    async def body() -> None:
        holder = Holder(BufferConfig())
        assert holder.can_hold_failed("s") and not holder.should_hold("s")
        a = Session(holder)
        holder.hold_failed(1, "s", 1, a.on_verdict)
        assert not holder.should_hold("s")  # one failed command does not stall the shard
        holder.topology_event(ReparentStarted("s", 2))
        holder.topology_event(Established("s", "db2", 2))
        await asyncio.sleep(0)
        assert a.verdicts == [Released(True)]

    run(body)


def test_disabled_holder_ignores_switches() -> None:
    async def body() -> None:
        holder = Holder(BufferConfig(enabled=False))
        holder.topology_event(ReparentStarted("s", 2))
        assert not holder.should_hold("s") and not holder.can_hold_failed("s")

    run(body)


def test_reads_served_during_a_hold_count_for_its_episode() -> None:
    """Reads served on replicas while the shard holds go into that switch's counts (the
    reparent's report), and only those: none before the hold, none after it."""

    async def body() -> None:
        holder = Holder(BufferConfig())
        holder.read_served("s")  # no hold yet: not counted anywhere
        holder.topology_event(ReparentStarted("s", 2))
        for _ in range(3):
            holder.read_served("s")
        holder.topology_event(Established("s", "db2", 2))
        await asyncio.sleep(0)
        holder.read_served("s")  # after the switch
        assert holder.episodes[("s", 2)].reads == 3
        holder.topology_event(ReparentStarted("s", 3))
        holder.topology_event(Established("s", "db1", 3))
        await asyncio.sleep(0)
        assert holder.episodes[("s", 3)].reads == 0

    run(body)
