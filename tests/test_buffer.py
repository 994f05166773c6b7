"""The failover buffer's pure core: every transition and eviction, then random timelines
checked against the invariants after every step. No sockets, no clock."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest

from proxy.buffer import (
    Action,
    Buffer,
    BufferState,
    Evict,
    EvictReason,
    Finished,
    Flush,
    Skipped,
    SkipReason,
    Started,
    StartReason,
    Stopped,
    StopReason,
)
from reparent.config import BufferConfig

IDLE, BUFFERING, DRAINING = BufferState.IDLE, BufferState.BUFFERING, BufferState.DRAINING
SUSPECT = BufferState.SUSPECT
REPARENT, FAILURE = StartReason.REPARENT, StartReason.FAILURE


class Quiet:
    """A buffer whose episode reports (`Finished`) are set aside in `finished`, so the tests of
    transitions compare only the actions they are about; the episode tests read `finished`."""

    def __init__(self, buf: Buffer) -> None:
        self._buf = buf
        self.finished: list[Finished] = []

    def __getattr__(self, name: str):
        attr = getattr(self._buf, name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):
            out = attr(*args, **kwargs)
            if not isinstance(out, list):
                return out
            self.finished += [a for a in out if isinstance(a, Finished)]
            return [a for a in out if not isinstance(a, Finished)]

        return call


def make(**kw) -> Buffer:
    return Quiet(Buffer(BufferConfig(**kw)))  # type: ignore[return-value]


def flushes(actions: list[Action]) -> list[int]:
    return [a.entry for a in actions if isinstance(a, Flush)]


def evicts(actions: list[Action]) -> dict[int, EvictReason]:
    return {a.entry: a.reason for a in actions if isinstance(a, Evict)}


def started(buf: Buffer, shard: str = "s1", term: int = 2, now: float = 0.0) -> None:
    assert buf.reparent_started(shard, term, now) == [Started(shard, term, REPARENT)]


def hold_all(buf: Buffer, entries: list[int], shard: str = "s1", now: float = 0.0) -> None:
    """Hold entries, each in its own session (session id = entry id)."""
    for entry in entries:
        assert buf.hold(entry, entry, shard, now) == []


# -- config ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kw", "field_name"),
    [
        ({"size": 0}, "size"),
        ({"window": 0}, "window"),
        ({"window": float("nan")}, "window"),
        ({"max_failover": -1}, "max_failover"),
        ({"max_failover": float("inf"), "window": 1}, "max_failover"),
        ({"min_between": -0.1}, "min_between"),
        ({"window": 30, "max_failover": 20}, "window"),
        ({"drain_concurrency": 0}, "drain_concurrency"),
    ],
)
def test_config_rejects_bad_values_naming_the_field(kw, field_name):
    with pytest.raises(ValueError, match=field_name):
        BufferConfig(**kw)


def test_defaults_are_valid_and_enums_print_as_labels():
    assert BufferConfig().size == 1000
    assert str(EvictReason.WINDOW_EXCEEDED) == "window_exceeded"
    assert f"{StopReason.MAX_DURATION}" == "max_duration"
    assert str(SkipReason.TOO_RECENT) == "too_recent"
    assert str(BufferState.DRAINING) == "draining"


# -- transitions -------------------------------------------------------------------------------


def test_unknown_shard_is_idle_and_not_buffering():
    buf = make()
    assert buf.state("s1") is IDLE
    assert not buf.buffering("s1")
    assert buf.held("s1") == 0 and buf.held() == 0 and buf.slots_used() == 0
    assert buf.next_deadline() is None


def test_established_flushes_to_new_then_goes_idle_when_done():
    buf = make()
    started(buf)
    assert buf.state("s1") is BUFFERING and buf.buffering("s1")
    hold_all(buf, [1, 2])
    assert buf.held("s1") == 2 and buf.slots_used() == 2
    out = buf.established("s1", 2, 1.0)
    assert out == [
        Stopped("s1", StopReason.ESTABLISHED),
        Flush(1, "s1", True),
        Flush(2, "s1", True),
    ]
    assert buf.state("s1") is DRAINING
    assert buf.held("s1") == 0 and buf.slots_used() == 2  # flushing entries keep their slots
    assert buf.flushed(1, 1.1) == []
    assert buf.state("s1") is DRAINING
    assert buf.flushed(2, 1.2) == []
    assert buf.state("s1") is IDLE and buf.slots_used() == 0
    assert buf.counters.held == 2 and buf.counters.flushed == 2
    assert buf.counters.stops_by_reason[StopReason.ESTABLISHED] == 1
    # The most held at once stays as a record: the size a switch needed.
    assert buf.counters.most_waiting == 2


def test_aborted_flushes_back_to_the_old_primary():
    buf = make()
    started(buf)
    hold_all(buf, [1])
    assert buf.aborted("s1", 1.0) == [Stopped("s1", StopReason.ABORTED), Flush(1, "s1", False)]
    buf.flushed(1, 1.1)
    assert buf.state("s1") is IDLE


def test_established_with_nothing_held_goes_straight_to_idle():
    buf = make()
    started(buf)
    assert buf.established("s1", 2, 0.5) == [Stopped("s1", StopReason.ESTABLISHED)]
    assert buf.state("s1") is IDLE


def test_established_and_aborted_are_ignored_unless_buffering():
    buf = make()
    assert buf.established("s1", 2, 0.0) == []
    assert buf.aborted("s1", 0.0) == []
    assert buf.state("s1") is IDLE
    started(buf)
    hold_all(buf, [1])
    buf.established("s1", 2, 1.0)
    assert buf.established("s1", 2, 1.0) == []  # duplicate while draining
    assert buf.aborted("s1", 1.0) == []
    buf.flushed(1, 1.1)
    assert buf.established("s1", 2, 1.2) == []  # duplicate once idle
    assert buf.aborted("s1", 1.2) == []
    assert buf.counters.stops_by_reason[StopReason.ESTABLISHED] == 1
    assert buf.counters.stops_by_reason[StopReason.ABORTED] == 0


def test_established_for_an_older_term_is_ignored():
    buf = make()
    started(buf, term=5)
    hold_all(buf, [1])
    assert buf.established("s1", 4, 1.0) == []
    assert buf.state("s1") is BUFFERING
    assert flushes(buf.established("s1", 6, 1.0)) == [1]  # a newer term is a newer primary


def test_duplicate_reparent_started_keeps_the_deadline_and_raises_the_term():
    buf = make(window=5, max_failover=10)
    started(buf, term=3, now=0.0)
    assert buf.reparent_started("s1", 4, 5.0) == []
    assert buf.counters.starts_by_reason[REPARENT] == 1
    assert buf.next_deadline() == 10.0
    assert buf.established("s1", 3, 6.0) == []  # the term being established is now 4
    assert buf.established("s1", 4, 6.0) == [Stopped("s1", StopReason.ESTABLISHED)]


def test_reparent_started_for_a_term_already_established_is_a_replay():
    buf = make()
    started(buf, term=2)
    buf.established("s1", 2, 1.0)
    assert buf.reparent_started("s1", 2, 2.0) == []
    assert buf.state("s1") is IDLE and buf.counters.starts_by_reason[REPARENT] == 1
    assert buf.reparent_started("s1", 3, 3.0) == [Started("s1", 3, REPARENT)]
    buf.aborted("s1", 4.0)
    # A retry after an abort:
    assert buf.reparent_started("s1", 3, 5.0) == [Started("s1", 3, REPARENT)]


def test_reparent_started_while_draining_holds_the_unflushed_again():
    buf = make(drain_concurrency=1)
    started(buf)
    hold_all(buf, [1, 2, 3])
    assert flushes(buf.established("s1", 2, 1.0)) == [1]
    # A new reparent: 1 keeps flushing where it went, 2 and 3 wait for the new primary.
    assert buf.reparent_started("s1", 3, 2.0) == [Started("s1", 3, REPARENT)]
    assert buf.state("s1") is BUFFERING and buf.buffering("s1")
    assert buf.flushed(1, 2.1) == []  # no flush while buffering
    hold_all(buf, [4], now=2.2)
    assert buf.held("s1") == 3
    out = buf.aborted("s1", 3.0)
    assert out == [Stopped("s1", StopReason.ABORTED), Flush(2, "s1", False)]
    assert buf.flushed(2, 3.1) == [Flush(3, "s1", False)]
    assert buf.flushed(3, 3.2) == [Flush(4, "s1", False)]
    assert buf.flushed(4, 3.3) == []
    assert buf.state("s1") is IDLE


def test_reparent_started_while_draining_with_entries_in_flight_counts_them_against_the_limit():
    buf = make(drain_concurrency=2)
    started(buf)
    hold_all(buf, [1, 2, 3])
    assert flushes(buf.established("s1", 2, 1.0)) == [1, 2]
    buf.reparent_started("s1", 3, 1.5)
    assert flushes(buf.established("s1", 3, 2.0)) == []  # 1 and 2 still flushing
    assert buf.flushed(1, 2.1) == [Flush(3, "s1", True)]


# -- holding while draining --------------------------------------------------------------------


def test_hold_while_draining_queues_behind_the_backlog_until_it_has_left():
    buf = make(drain_concurrency=1)
    started(buf)
    hold_all(buf, [1, 2])
    assert flushes(buf.established("s1", 2, 1.0)) == [1]
    assert buf.buffering("s1")  # 2 is still waiting: newcomers go behind it
    assert buf.hold(3, 3, "s1", 1.1) == []
    assert buf.flushed(1, 1.2) == [Flush(2, "s1", True)]
    # The backlog has left the queue: new commands go straight to the server now, and 3,
    # which arrived during the drain, still flushes in turn.
    assert not buf.buffering("s1")
    with pytest.raises(ValueError, match="not buffering"):
        buf.hold(4, 4, "s1", 1.3)
    assert buf.flushed(2, 1.4) == [Flush(3, "s1", True)]
    assert buf.flushed(3, 1.5) == []
    assert buf.state("s1") is IDLE


def test_hold_while_draining_with_room_flushes_at_once():
    buf = make(drain_concurrency=2)
    started(buf)
    buf.hold(1, 1, "s1", 0.0)
    buf.hold(2, 1, "s1", 0.0)  # same session: waits for 1
    assert flushes(buf.established("s1", 2, 1.0)) == [1]
    assert buf.hold(3, 3, "s1", 1.1) == [Flush(3, "s1", True)]


def test_hold_refused_when_not_buffering_and_for_a_live_entry():
    buf = make()
    with pytest.raises(ValueError, match="not buffering"):
        buf.hold(1, 1, "s1", 0.0)
    started(buf)
    hold_all(buf, [1])
    with pytest.raises(ValueError, match="already held"):
        buf.hold(1, 9, "s1", 0.0)
    assert buf.slots_used() == 1 and buf.counters.held == 1


# -- evictions ---------------------------------------------------------------------------------


def test_buffer_full_evicts_the_oldest_of_this_shard():
    buf = make(size=3)
    started(buf, "a")
    started(buf, "b")
    buf.hold(1, 1, "a", 0.0)
    buf.hold(2, 2, "b", 0.1)
    buf.hold(3, 3, "b", 0.2)
    assert buf.hold(4, 4, "b", 0.3) == [Evict(2, EvictReason.BUFFER_FULL)]
    assert buf.held("a") == 1 and buf.held("b") == 2 and buf.slots_used() == 3


def test_buffer_full_refuses_the_newcomer_when_its_shard_holds_nothing():
    buf = make(size=2)
    started(buf, "a")
    started(buf, "b")
    hold_all(buf, [1, 2], "a")
    assert buf.hold(3, 3, "b", 0.1) == [Evict(3, EvictReason.BUFFER_FULL)]
    assert buf.held("a") == 2 and buf.held("b") == 0 and buf.slots_used() == 2
    assert buf.counters.held == 3
    assert buf.counters.evicted_by_reason[EvictReason.BUFFER_FULL] == 1


def test_buffer_full_never_evicts_a_flushing_entry():
    buf = make(size=2, drain_concurrency=1)
    started(buf)
    hold_all(buf, [1, 2])
    buf.established("s1", 2, 1.0)  # 1 flushes, 2 waits, and is the backlog
    # Full: the oldest waiting entry of the shard (2) makes room, not the flushing 1.
    assert buf.hold(3, 3, "s1", 1.1) == [Evict(2, EvictReason.BUFFER_FULL)]
    assert buf.slots_used() == 2


def test_window_evicts_an_entry_held_too_long():
    buf = make(window=5, max_failover=20)
    started(buf)
    hold_all(buf, [1], now=1.0)
    hold_all(buf, [2], now=3.0)
    assert buf.next_deadline() == 6.0
    assert buf.tick(5.9) == []
    assert buf.tick(6.0) == [Evict(1, EvictReason.WINDOW_EXCEEDED)]
    assert buf.next_deadline() == 8.0
    assert buf.state("s1") is BUFFERING and buf.held("s1") == 1


def test_window_applies_while_draining_too():
    buf = make(window=5, max_failover=20, drain_concurrency=1)
    started(buf)
    hold_all(buf, [1, 2])
    buf.established("s1", 2, 1.0)  # 1 flushes and hangs there
    assert buf.tick(5.0) == [Evict(2, EvictReason.WINDOW_EXCEEDED)]
    assert buf.tick(100.0) == []  # a flushing entry is the server's to finish
    assert buf.flushed(1, 100.0) == []
    assert buf.state("s1") is IDLE


def test_deadline_stops_buffering_and_evicts_everything_held():
    buf = make(window=10, max_failover=20)
    started(buf, now=0.0)
    hold_all(buf, [1], now=15.0)
    hold_all(buf, [2], now=16.0)
    assert buf.next_deadline() == 20.0
    assert buf.tick(20.0) == [
        Stopped("s1", StopReason.MAX_DURATION),
        Evict(1, EvictReason.MAX_DURATION),
        Evict(2, EvictReason.MAX_DURATION),
    ]
    assert buf.state("s1") is IDLE and not buf.buffering("s1")
    assert buf.slots_used() == 0 and buf.next_deadline() is None
    assert buf.established("s1", 2, 21.0) == []  # too late: nothing to flush, nothing changes


def test_deadline_is_enforced_by_any_call_not_only_tick():
    buf = make(window=10, max_failover=20)
    started(buf, now=0.0)
    hold_all(buf, [1], now=15.0)
    # The shell's timer has not fired yet when the event arrives: the result is the same.
    assert buf.established("s1", 2, 20.5) == [
        Stopped("s1", StopReason.MAX_DURATION),
        Evict(1, EvictReason.MAX_DURATION),
    ]


def test_hold_at_the_deadline_evicts_the_newcomer_too():
    buf = make(window=10, max_failover=20)
    started(buf, now=0.0)
    hold_all(buf, [1], now=15.0)
    assert buf.buffering("s1")  # tick not called yet
    assert buf.hold(2, 2, "s1", 20.0) == [
        Stopped("s1", StopReason.MAX_DURATION),
        Evict(1, EvictReason.MAX_DURATION),
        Evict(2, EvictReason.MAX_DURATION),
    ]
    assert buf.slots_used() == 0


def test_late_tick_gives_each_entry_the_reason_that_fell_due_first():
    buf = make(window=5, max_failover=10)
    started(buf, now=0.0)
    hold_all(buf, [1], now=1.0)  # window ends at 6, before the deadline
    hold_all(buf, [2], now=5.5)  # window would end at 10.5, after the deadline
    assert buf.tick(30.0) == [
        Evict(1, EvictReason.WINDOW_EXCEEDED),
        Stopped("s1", StopReason.MAX_DURATION),
        Evict(2, EvictReason.MAX_DURATION),
    ]


def test_cancel_of_a_waiting_entry_evicts_it_and_frees_its_slot():
    buf = make()
    started(buf)
    hold_all(buf, [1, 2])
    assert buf.cancel(1, 0.5) == [Evict(1, EvictReason.CLIENT_GONE)]
    assert buf.slots_used() == 1
    assert buf.cancel(1, 0.6) == []  # already gone
    assert buf.cancel(99, 0.6) == []  # never held
    assert flushes(buf.established("s1", 2, 1.0)) == [2]


def test_cancel_of_a_flushing_entry_changes_nothing():
    buf = make()
    started(buf)
    hold_all(buf, [1])
    buf.established("s1", 2, 1.0)
    assert buf.cancel(1, 1.1) == []
    assert buf.slots_used() == 1 and buf.state("s1") is DRAINING
    assert buf.flushed(1, 1.2) == []
    assert buf.slots_used() == 0 and buf.state("s1") is IDLE
    assert buf.cancel(1, 1.3) == []
    assert buf.counters.evicted_by_reason[EvictReason.CLIENT_GONE] == 0


def test_flushed_of_an_entry_not_flushing_is_a_shell_bug():
    buf = make()
    started(buf)
    hold_all(buf, [1])
    with pytest.raises(ValueError, match="not flushing"):
        buf.flushed(1, 0.1)
    with pytest.raises(ValueError, match="not flushing"):
        buf.flushed(2, 0.1)


def test_cancel_unblocks_the_sessions_next_entry():
    buf = make()
    started(buf)
    buf.hold(1, 7, "s1", 0.0)
    buf.hold(2, 7, "s1", 0.0)
    buf.hold(3, 8, "s1", 0.0)
    assert flushes(buf.established("s1", 2, 1.0)) == [1, 3]
    assert buf.flushed(1, 1.1) == [Flush(2, "s1", True)]


def test_shutdown_stops_buffering_and_evicts_what_waits_but_lets_flushes_finish():
    buf = make(drain_concurrency=1)
    started(buf, "a")
    started(buf, "b")
    hold_all(buf, [1, 2], "a")
    hold_all(buf, [3], "b")
    buf.established("a", 2, 1.0)  # 1 flushing, 2 waiting
    assert buf.shutdown(2.0) == [
        Evict(2, EvictReason.SHUTDOWN),
        Stopped("b", StopReason.SHUTDOWN),
        Evict(3, EvictReason.SHUTDOWN),
    ]
    assert not buf.buffering("a") and not buf.buffering("b")
    assert buf.state("b") is IDLE and buf.state("a") is DRAINING
    assert buf.flushed(1, 2.1) == []
    assert buf.state("a") is IDLE and buf.slots_used() == 0


# -- min_between and dry run -------------------------------------------------------------------


def test_min_between_skips_a_reparent_too_soon_after_the_last_failover():
    buf = make(min_between=60)
    started(buf, now=0.0)
    buf.established("s1", 2, 5.0)
    assert buf.reparent_started("s1", 3, 64.9) == [Skipped("s1", SkipReason.TOO_RECENT)]
    assert buf.state("s1") is IDLE and not buf.buffering("s1")
    assert buf.counters.skips_by_reason[SkipReason.TOO_RECENT] == 1
    assert buf.reparent_started("s1", 3, 65.0) == [Started("s1", 3, REPARENT)]


def test_min_between_counts_from_the_deadline_after_a_timeout():
    buf = make(window=5, max_failover=10, min_between=30)
    started(buf, now=0.0)
    buf.tick(25.0)  # stopped at 10, not 25
    assert buf.reparent_started("s1", 3, 39.9)[0] == Skipped("s1", SkipReason.TOO_RECENT)
    assert buf.reparent_started("s1", 3, 40.0) == [Started("s1", 3, REPARENT)]


def test_min_between_skip_while_draining_keeps_draining():
    buf = make(min_between=60, drain_concurrency=1)
    started(buf)
    hold_all(buf, [1, 2])
    buf.established("s1", 2, 1.0)
    assert buf.reparent_started("s1", 3, 2.0) == [Skipped("s1", SkipReason.TOO_RECENT)]
    assert buf.state("s1") is DRAINING
    assert buf.flushed(1, 2.1) == [Flush(2, "s1", True)]


def test_min_between_is_per_shard():
    buf = make(min_between=60)
    started(buf, "a")
    buf.aborted("a", 1.0)
    assert buf.reparent_started("b", 2, 2.0) == [Started("b", 2, REPARENT)]


def test_dry_run_counts_and_stops_as_usual_but_holds_nothing():
    buf = make(dry_run=True, window=5, max_failover=10)
    assert buf.reparent_started("s1", 2, 0.0) == [
        Started("s1", 2, REPARENT),
        Skipped("s1", SkipReason.DRY_RUN),
    ]
    assert buf.state("s1") is BUFFERING and not buf.buffering("s1")
    with pytest.raises(ValueError):
        buf.hold(1, 1, "s1", 0.1)
    assert buf.next_deadline() == 10.0
    assert buf.tick(10.0) == [Stopped("s1", StopReason.MAX_DURATION)]
    buf.reparent_started("s1", 3, 11.0)
    assert buf.established("s1", 3, 12.0) == [Stopped("s1", StopReason.ESTABLISHED)]
    c = buf.counters
    assert c.starts_by_reason[REPARENT] == 2 and c.held == 0
    assert c.skips_by_reason[SkipReason.DRY_RUN] == 2
    assert c.stops_by_reason[StopReason.MAX_DURATION] == 1


# -- drain concurrency and order ---------------------------------------------------------------


def test_drain_concurrency_limits_flushes_per_shard():
    buf = make(drain_concurrency=3)
    started(buf, "a")
    started(buf, "b")
    hold_all(buf, list(range(10)), "a")
    hold_all(buf, list(range(10, 14)), "b")
    assert flushes(buf.established("a", 2, 1.0)) == [0, 1, 2]
    assert flushes(buf.established("b", 2, 1.0)) == [10, 11, 12]  # each shard its own limit
    assert buf.flushed(1, 1.1) == [Flush(3, "a", True)]
    assert buf.flushed(0, 1.1) == [Flush(4, "a", True)]
    assert buf.flushed(12, 1.1) == [Flush(13, "b", True)]


def test_a_session_flushes_in_hold_order_one_at_a_time():
    buf = make(drain_concurrency=4)
    started(buf)
    for entry, session in [(1, 7), (2, 8), (3, 7), (4, 7), (5, 9)]:
        buf.hold(entry, session, "s1", 0.0)
    assert flushes(buf.established("s1", 2, 1.0)) == [1, 2, 5]
    assert buf.flushed(2, 1.1) == []  # 3 waits for 1, not for a free slot
    assert buf.flushed(1, 1.2) == [Flush(3, "s1", True)]
    assert buf.flushed(3, 1.3) == [Flush(4, "s1", True)]


def test_a_session_across_shards_waits_for_its_earlier_entry():
    buf = make()
    started(buf, "a")
    started(buf, "b")
    buf.hold(1, 7, "a", 0.0)
    buf.hold(2, 7, "b", 0.1)
    assert flushes(buf.established("b", 2, 1.0)) == []  # 1 still held in a
    assert buf.established("a", 2, 1.1) == [
        Stopped("a", StopReason.ESTABLISHED),
        Flush(1, "a", True),
    ]
    assert buf.flushed(1, 1.2) == [Flush(2, "b", True)]


# -- next_deadline -----------------------------------------------------------------------------


def test_next_deadline_follows_windows_and_failover_deadlines():
    buf = make(window=4, max_failover=10)
    assert buf.next_deadline() is None
    started(buf, "a", now=0.0)
    assert buf.next_deadline() == 10.0
    started(buf, "b", now=2.0)
    assert buf.next_deadline() == 10.0
    buf.hold(1, 1, "b", 3.0)
    assert buf.next_deadline() == 7.0
    buf.established("b", 2, 3.5)  # 1 flushes: its window no longer matters
    assert buf.next_deadline() == 10.0
    buf.aborted("a", 4.0)
    assert buf.next_deadline() is None
    buf.flushed(1, 4.5)
    assert buf.next_deadline() is None


# -- commands that failed on the primary (the unplanned path) ----------------------------------


def test_a_failed_command_waits_for_the_next_term_while_the_shard_flows():
    buf = make()
    assert buf.hold_failed(1, 1, "s1", 1, 0.0) == [Started("s1", 2, FAILURE)]
    assert buf.state("s1") is SUSPECT and not buf.buffering("s1")  # other sessions go on
    assert buf.next_deadline() == 10.0  # its window comes before the 20 s deadline
    assert buf.established("s1", 1, 0.5) == []  # a replay of the term it failed in
    assert buf.established("s1", 2, 1.0) == [
        Stopped("s1", StopReason.ESTABLISHED),
        Flush(1, "s1", True),
    ]
    assert buf.flushed(1, 1.1) == []
    assert buf.state("s1") is IDLE
    assert buf.finished == [Finished("s1", 2, held=1, flushed=1, evicted=0)]
    assert buf.counters.starts_by_reason == {REPARENT: 0, FAILURE: 1}


def test_a_reparent_announced_after_a_failure_holds_everyone_and_keeps_the_order():
    buf = make(min_between=60.0)
    buf.hold_failed(1, 1, "s1", 1, 0.0)
    assert buf.reparent_started("s1", 2, 1.0) == [Started("s1", 2, REPARENT)]
    assert buf.buffering("s1") and buf.next_deadline() == 10.0
    assert buf.hold(2, 1, "s1", 2.0) == []
    # The deadline counts from the announcement, not from the failure.
    buf2 = make(window=5.0, max_failover=6.0)
    buf2.hold_failed(1, 1, "s1", 1, 0.0)
    buf2.reparent_started("s1", 2, 4.0)
    assert buf2.next_deadline() == 5.0  # entry 1's window
    assert buf2.aborted("s1", 4.5) == [Stopped("s1", StopReason.ABORTED), Flush(1, "s1", False)]


def test_failed_commands_are_flushed_in_session_order_with_later_held_ones():
    buf = make()
    buf.hold_failed(1, 7, "s1", 1, 0.0)
    buf.reparent_started("s1", 2, 0.5)
    buf.hold(2, 7, "s1", 0.6)
    buf.hold(3, 8, "s1", 0.7)
    out = buf.established("s1", 2, 1.0)
    assert flushes(out) == [1, 3]  # 2 waits for its session's earlier command
    assert buf.flushed(1, 1.1) == [Flush(2, "s1", True)]


def test_a_suspect_shard_is_idle_again_once_its_failed_commands_expire():
    buf = make(window=2.0, min_between=60.0)
    buf.hold_failed(1, 1, "s1", 1, 0.0)
    buf.hold_failed(2, 2, "s1", 1, 1.0)
    assert buf.state("s1") is SUSPECT
    assert buf.tick(2.0) == [Evict(1, EvictReason.WINDOW_EXCEEDED)]
    assert buf.cancel(2, 2.5) == [
        Evict(2, EvictReason.CLIENT_GONE),
        Stopped("s1", StopReason.EMPTIED),
    ]
    assert buf.state("s1") is IDLE
    assert buf.finished == [Finished("s1", 2, held=2, flushed=0, evicted=2)]
    # No failover happened: min_between does not apply to the next reparent.
    assert buf.reparent_started("s1", 2, 3.0) == [Started("s1", 2, REPARENT)]


def test_a_suspect_shard_past_its_deadline_evicts_what_failed():
    buf = make(window=10.0, max_failover=12.0)
    buf.hold_failed(1, 1, "s1", 1, 0.0)
    buf.hold_failed(2, 2, "s1", 1, 5.0)
    assert buf.tick(12.0) == [
        Evict(1, EvictReason.WINDOW_EXCEEDED),
        Stopped("s1", StopReason.MAX_DURATION),
        Evict(2, EvictReason.MAX_DURATION),
    ]
    assert buf.state("s1") is IDLE


def test_failed_commands_are_not_held_while_draining_nor_in_dry_run():
    buf = make()
    started(buf)
    hold_all(buf, [1])
    buf.established("s1", 2, 1.0)
    assert buf.state("s1") is DRAINING and not buf.can_hold_failed("s1")
    with pytest.raises(ValueError, match="cannot hold failed"):
        buf.hold_failed(2, 2, "s1", 2, 1.1)
    dry = make(dry_run=True)
    assert not dry.can_hold_failed("s1")
    # While buffering for a reparent a failed command joins the held ones.
    buf3 = make()
    started(buf3)
    assert buf3.can_hold_failed("s1") and buf3.hold_failed(1, 1, "s1", 1, 0.1) == []
    assert buf3.established("s1", 2, 0.2)[1:] == [Flush(1, "s1", True)]


def test_failed_commands_go_back_to_a_primary_that_recovered_without_a_reparent():
    buf = make()
    buf.hold_failed(1, 1, "s1", 1, 0.0)
    assert buf.recovered("s1", 0.5) == [
        Stopped("s1", StopReason.RECOVERED),
        Flush(1, "s1", False),
    ]
    buf.flushed(1, 0.6)
    assert buf.state("s1") is IDLE
    # While a reparent runs, the reparent decides: recovered changes nothing.
    started(buf, term=2, now=1.0)
    buf.hold(2, 2, "s1", 1.1)
    assert buf.recovered("s1", 1.2) == [] and buf.buffering("s1")


def test_every_episode_reports_its_counts_once_it_is_idle():
    buf = make(size=2)
    started(buf)
    hold_all(buf, [1, 2])
    assert buf.hold(3, 3, "s1", 0.0) == [Evict(1, EvictReason.BUFFER_FULL)]
    buf.established("s1", 2, 1.0)
    buf.flushed(2, 1.1)
    buf.flushed(3, 1.2)
    assert buf.finished == [Finished("s1", 2, held=3, flushed=2, evicted=1)]
    started(buf, term=3, now=2.0)
    buf.established("s1", 3, 2.5)
    assert buf.finished[1:] == [Finished("s1", 3, held=0, flushed=0, evicted=0)]


# -- randomized timelines ----------------------------------------------------------------------


@dataclass
class Shell:
    """A shell that believes only the actions it gets, and checks them against the rules."""

    buf: Buffer
    rng: random.Random
    now: float = 0.0
    next_entry: int = 0
    terms: dict[str, int] = field(default_factory=lambda: {"a": 1, "b": 1})
    waiting: dict[int, tuple[int, str, float]] = field(
        default_factory=dict
    )  # entry: (session, shard, held_at)
    flushing: dict[int, tuple[int, str]] = field(default_factory=dict)  # entry: (session, shard)
    ended: set[int] = field(default_factory=set)
    hold_order: dict[int, list[int]] = field(default_factory=dict)  # session: entries held
    flush_order: dict[int, list[int]] = field(default_factory=dict)  # session: entries flushed
    evicted_order: dict[int, list[int]] = field(default_factory=dict)
    started_at: dict[str, float] = field(default_factory=dict)  # while buffering, per shard
    last_stop: dict[str, StopReason] = field(default_factory=dict)
    drain_mark: dict[str, int] = field(default_factory=dict)  # entries below it: the backlog
    # This episode's counts per shard, [held, flushed, evicted], checked against Finished.
    episode: dict[str, list[int]] = field(default_factory=lambda: {"a": [0, 0, 0], "b": [0, 0, 0]})

    def apply(self, actions: list[Action]) -> None:
        cfg = self.buf.config
        for a in actions:
            if isinstance(a, Flush):
                assert a.entry in self.waiting, f"flush of an entry not waiting: {a}"
                session, shard, _ = self.waiting.pop(a.entry)
                assert a.shard == shard
                assert all(s != session for s, _ in self.flushing.values()), "session overlap"
                assert self.last_stop[shard] in (
                    StopReason.ESTABLISHED,
                    StopReason.ABORTED,
                    StopReason.RECOVERED,
                )
                assert a.to_new == (self.last_stop[shard] is StopReason.ESTABLISHED)
                self.flushing[a.entry] = (session, shard)
                self.flush_order.setdefault(session, []).append(a.entry)
                self.episode[shard][1] += 1
            elif isinstance(a, Evict):
                assert a.entry in self.waiting, f"evict of an entry not waiting: {a}"
                session, shard, held_at = self.waiting.pop(a.entry)
                if a.reason is EvictReason.WINDOW_EXCEEDED:
                    assert self.now >= held_at + cfg.window
                self.ended.add(a.entry)
                self.episode[shard][2] += 1
            elif isinstance(a, Started):
                self.started_at[a.shard] = self.now
            elif isinstance(a, Stopped):
                if a.reason is StopReason.MAX_DURATION:
                    assert self.now >= self.started_at[a.shard] + cfg.max_failover
                self.started_at.pop(a.shard)
                self.last_stop[a.shard] = a.reason
                self.drain_mark[a.shard] = self.next_entry
            elif isinstance(a, Finished):
                assert self.buf.state(a.shard) is IDLE
                assert [a.held, a.flushed, a.evicted] == self.episode[a.shard]
                self.episode[a.shard] = [0, 0, 0]
        for shard in ("a", "b"):
            per_shard = sum(1 for _, s in self.flushing.values() if s == shard)
            assert per_shard <= cfg.drain_concurrency
        self.check()

    def check(self) -> None:
        buf, cfg = self.buf, self.buf.config
        assert buf.slots_used() == len(self.waiting) + len(self.flushing) <= cfg.size
        assert buf.held() == len(self.waiting)
        for shard in ("a", "b"):
            in_shard = [e for e, (_, s, _) in self.waiting.items() if s == shard]
            assert buf.held(shard) == len(in_shard)
            state = buf.state(shard)
            if state is BUFFERING:
                # Nothing outlives the failover's deadline, whoever calls first.
                assert self.now < self.started_at[shard] + cfg.max_failover
                assert buf.buffering(shard) is not cfg.dry_run
            elif state is DRAINING:
                # New commands queue behind the backlog, and only while it is there.
                backlog = any(e < self.drain_mark[shard] for e in in_shard)
                assert buf.buffering(shard) is backlog
            elif state is SUSPECT:
                # Only failed commands wait; the rest of the shard's traffic flows.
                assert self.now < self.started_at[shard] + cfg.max_failover
                assert not buf.buffering(shard) and in_shard
                assert all(s != shard for _, s in self.flushing.values())
            elif state is IDLE:
                assert not buf.buffering(shard) and not in_shard
                assert all(s != shard for _, s in self.flushing.values())
                assert shard not in self.started_at
            if in_shard and cfg.dry_run:
                raise AssertionError("dry run held an entry")
        for _, _, held_at in self.waiting.values():
            assert self.now < held_at + cfg.window
        c = buf.counters
        assert c.held == c.flushed + sum(c.evicted_by_reason.values()) + len(self.waiting)
        for session, flushed in self.flush_order.items():
            order = self.hold_order[session]
            assert flushed == sorted(flushed, key=order.index)

    def step(self) -> None:
        rng, buf, cfg = self.rng, self.buf, self.buf.config
        shard = rng.choice(("a", "b"))
        roll = rng.random()
        if roll < 0.08:
            self.terms[shard] += rng.random() < 0.8
            self.apply(buf.reparent_started(shard, self.terms[shard], self.now))
        elif roll < 0.14:
            self.apply(buf.established(shard, self.terms[shard] - (rng.random() < 0.2), self.now))
        elif roll < 0.16:
            self.apply(buf.aborted(shard, self.now))
        elif roll < 0.18:
            self.apply(buf.recovered(shard, self.now))
        elif roll < 0.50:
            entry = self.next_entry
            self.next_entry += 1
            session = rng.randrange(6)
            if rng.random() < 0.8:  # mostly where it is held, sometimes to see it refused
                shard = next((s for s in ("a", "b") if buf.buffering(s)), shard)
            if not buf.buffering(shard):
                with pytest.raises(ValueError):
                    buf.hold(entry, session, shard, self.now)
                return
            self.waiting[entry] = (session, shard, self.now)
            self.hold_order.setdefault(session, []).append(entry)
            self.episode[shard][0] += 1
            self.apply(buf.hold(entry, session, shard, self.now))
        elif roll < 0.56:
            entry = self.next_entry
            self.next_entry += 1
            session = rng.randrange(6)
            if not buf.can_hold_failed(shard):
                assert cfg.dry_run or buf.state(shard) is DRAINING
                with pytest.raises(ValueError):
                    buf.hold_failed(entry, session, shard, self.terms[shard], self.now)
                return
            self.waiting[entry] = (session, shard, self.now)
            self.hold_order.setdefault(session, []).append(entry)
            self.episode[shard][0] += 1
            self.apply(buf.hold_failed(entry, session, shard, self.terms[shard], self.now))
        elif roll < 0.64:
            live = sorted([*self.waiting, *self.flushing, self.next_entry])
            entry = rng.choice(live)
            was_flushing = entry in self.flushing
            out = buf.cancel(entry, self.now)
            if was_flushing:
                assert entry not in evicts(out)
            self.apply(out)
        elif roll < 0.80:
            if self.flushing:
                entry = rng.choice(sorted(self.flushing))
                self.flushing.pop(entry)
                self.ended.add(entry)
                self.apply(buf.flushed(entry, self.now))
        else:
            deadline = buf.next_deadline()
            if deadline is not None and rng.random() < 0.3:
                assert deadline > self.now, "something due now was left undone"
                self.now = deadline
                out = buf.tick(self.now)
                assert out, "next_deadline promised work"
            else:
                self.now += rng.expovariate(1.0 / (buf.config.window / 5))
                if deadline is not None and self.now < deadline:
                    assert buf.tick(self.now) == [], "work before next_deadline"
                    return
                out = buf.tick(self.now)
            self.apply(out)

    def finish(self) -> None:
        """Shut down and let every flush complete: nothing may be left over."""
        self.now += 1.0
        self.apply(self.buf.shutdown(self.now))
        assert not self.waiting
        for entry in sorted(self.flushing):
            self.flushing.pop(entry)
            self.ended.add(entry)
            self.apply(self.buf.flushed(entry, self.now))
        assert self.buf.slots_used() == 0 and self.buf.next_deadline() is None
        assert self.buf.state("a") is IDLE and self.buf.state("b") is IDLE
        held = {e for entries in self.hold_order.values() for e in entries}
        assert self.ended == held, "an entry never ended"


def random_config(rng: random.Random) -> BufferConfig:
    window = rng.uniform(0.5, 3.0)
    return BufferConfig(
        size=rng.randint(1, 6),
        window=window,
        max_failover=window * rng.uniform(1.0, 2.5),
        min_between=rng.choice((0.0, 0.0, 1.0)),
        drain_concurrency=rng.randint(1, 3),
        dry_run=rng.random() < 0.1,
    )


def test_random_timelines_keep_every_invariant():
    for seed in range(2000):
        rng = random.Random(seed)
        shell = Shell(Buffer(random_config(rng)), rng)
        try:
            for _ in range(80):
                shell.step()
            shell.finish()
        except AssertionError as e:
            raise AssertionError(f"seed {seed}: {e}") from e
