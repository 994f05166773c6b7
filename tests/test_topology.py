"""The topology store: versions, journal, events, locks and drained reports, without MariaDB."""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from reparent import filestore
from reparent.config import Role, ServerConfig, ShardConfig, load
from reparent.filestore import CorruptStoreError, FileStore
from reparent.store import ProxyInfo
from reparent.topology import (
    Aborted,
    Established,
    EventKind,
    JournalConflictError,
    Outcome,
    PhaseTiming,
    ReparentKind,
    ReparentRecord,
    ReparentStarted,
    Revoked,
    Seen,
    ShardTopology,
    Step,
    TopologyError,
    TopologyEvent,
    UnknownShardError,
    catch_up,
    event_from_dict,
    event_to_dict,
)

CONFIG = load(Path(__file__).resolve().parent.parent / "configs" / "example.toml")


class FakeClock:
    """A clock that moves only when told, and a wait that moves it instead of sleeping, so
    expiries and timeouts are exact and instant."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now
        self.waits: list[float] = []

    def __call__(self) -> float:
        return self.now

    def wait(self, cond: threading.Condition, timeout: float) -> None:
        self.waits.append(timeout)
        self.now += timeout


def shard(name: str, *servers: str) -> ShardConfig:
    return ShardConfig(
        name=name,
        servers=tuple(
            ServerConfig(s, "127.0.0.1", 3306 + i, Role.PRIMARY if i == 0 else Role.REPLICA)
            for i, s in enumerate(servers)
        ),
    )


def record(id: str = "r1", shard: str = "main", **changes: object) -> ReparentRecord:
    base = ReparentRecord(
        id=id,
        kind=ReparentKind.PRS,
        shard=shard,
        old_primary="db1",
        requested="db2",
        term_before=1,
        started_at=1700000000.25,
    )
    return replace(base, **changes)  # type: ignore[arg-type]


def finished(id: str, shard: str = "main") -> ReparentRecord:
    return record(id, shard, outcome=Outcome.SUCCEEDED, step=Step.DONE, finished_at=1700000001.0)


def fake_store(path: Path | None = None) -> tuple[FileStore, FakeClock]:
    clock = FakeClock()
    return FileStore.open(path, CONFIG, clock=clock, wait=clock.wait), clock


# -- model ----------------------------------------------------------------------------------


def test_from_config_starts_at_term_one() -> None:
    topo = ShardTopology.from_config(CONFIG.shard)
    assert topo == ShardTopology("main", ("db1", "db2", "db3"), "db1", 1)
    assert topo.quarantined == frozenset()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"primary": "db9"}, "not one of its servers"),
        ({"servers": ("db1", "db1")}, "unique"),
        ({"quarantined": frozenset({"db9"})}, "among its servers"),
        ({"quarantined": frozenset({"db1"})}, "cannot be quarantined"),
        ({"term": 0}, "at least 1"),
    ],
)
def test_topology_that_no_reparent_could_produce_is_refused(
    changes: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        replace(ShardTopology.from_config(CONFIG.shard), **changes)  # type: ignore[arg-type]


def test_record_round_trips_through_json() -> None:
    full = record(
        kind=ReparentKind.ERS,
        requested=None,
        candidate="db2",
        new_primary="db2",
        term_after=2,
        step=Step.DONE,
        phases=[PhaseTiming(Step.STARTED, 1700000000.25, 0.125), PhaseTiming(Step.REVOKED, 1.0, 3)],
        positions={"old_primary_final": "0-1-12", "db2": "0-1-12"},
        outcome=Outcome.SUCCEEDED,
        reason="unreachable: db1",
        held=7,
        flushed=6,
        evicted=1,
        finished_at=1700000000.5,
    )
    for r in (full, record()):
        back = ReparentRecord.from_dict(json.loads(json.dumps(r.to_dict())))
        assert back == r
        assert isinstance(back.kind, ReparentKind) and isinstance(back.step, Step)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (("term_before", "2"), "term_before: expected int"),
        (("held", True), "held: expected int"),
        (("step", "dancing"), "step: unknown value 'dancing'"),
        (("phases", [{"step": "started"}]), r"phases\[0\]: started_at: missing"),
        (("positions", {"db2": 5}), "positions.db2: expected str"),
    ],
)
def test_record_from_dict_names_the_bad_field(edit: tuple[str, object], message: str) -> None:
    d = record().to_dict()
    d[edit[0]] = edit[1]
    with pytest.raises(ValueError, match=message):
        ReparentRecord.from_dict(d)


def test_events_say_their_kind() -> None:
    events: list[TopologyEvent] = [
        ReparentStarted("main", 2),
        Revoked("main", "db1", "0-1-12"),
        Established("main", "db2", 2),
        Aborted("main", "revoke failed"),
    ]
    assert [e.kind for e in events] == list(EventKind)
    assert [str(e.kind) for e in events] == [
        "reparent_started",
        "revoked",
        "established",
        "aborted",
    ]


# -- topology and versions ------------------------------------------------------------------


def test_compare_and_set_versions() -> None:
    store, _ = fake_store()
    assert store.shards() == ["main"]
    first = store.read("main")
    assert first.version == 1
    moved = replace(first.value, primary="db2", term=2)
    assert store.compare_and_set("main", 1, moved)
    assert store.read("main").value == moved
    assert store.read("main").version == 2
    # The loser of a race writes nothing.
    assert not store.compare_and_set("main", 1, replace(moved, term=3))
    assert store.read("main").value == moved
    assert store.read("main").version == 2


def test_version_zero_creates_a_shard_only_once() -> None:
    store = FileStore(None)
    new = ShardTopology.from_config(shard("s2", "a", "b"))
    assert store.compare_and_set("s2", 0, new)
    assert not store.compare_and_set("s2", 0, new)
    assert store.read("s2").version == 1


def test_unknown_shard_and_misnamed_write_are_refused() -> None:
    store, _ = fake_store()
    with pytest.raises(UnknownShardError, match="'nope'"):
        store.read("nope")
    with pytest.raises(UnknownShardError):
        store.journal_get("nope")
    with pytest.raises(ValueError, match="written to shard 'other'"):
        store.compare_and_set("other", 0, store.read("main").value)


# -- journal and history ----------------------------------------------------------------------


def test_journal_put_get_finish() -> None:
    store, _ = fake_store()
    assert store.journal_get("main") is None
    r = record()
    store.journal_put(r)
    r.step = Step.REVOKED  # the store keeps what was put, not the caller's object
    assert store.journal_get("main") == record()
    store.journal_put(r)  # the same reparent moves on
    assert store.journal_get("main").step is Step.REVOKED  # type: ignore[union-attr]
    store.journal_finish(finished("r1"))
    assert store.journal_get("main") is None
    assert [h.id for h in store.history("main")] == ["r1"]


def test_journal_refuses_a_second_reparent_and_records_without_outcome() -> None:
    store, _ = fake_store()
    store.journal_put(record("r1"))
    with pytest.raises(JournalConflictError, match="r1 is in flight"):
        store.journal_put(record("r2"))
    with pytest.raises(JournalConflictError):
        store.journal_finish(finished("r2"))
    with pytest.raises(ValueError, match="no outcome"):
        store.journal_finish(record("r1"))
    with pytest.raises(ValueError, match="finish it"):
        store.journal_put(finished("r1"))
    assert store.journal_get("main").id == "r1"  # type: ignore[union-attr]


def test_history_is_newest_first_by_shard_and_limited() -> None:
    store, _ = fake_store()
    store.compare_and_set("other", 0, ShardTopology.from_config(shard("other", "x", "y")))
    for i, s in enumerate(["main", "other", "main", "main"]):
        store.journal_finish(finished(f"r{i}", s))  # finishing what never was put is allowed
    assert [r.id for r in store.history()] == ["r3", "r2", "r1", "r0"]
    assert [r.id for r in store.history("main")] == ["r3", "r2", "r0"]
    assert [r.id for r in store.history("main", limit=2)] == ["r3", "r2"]


def test_history_keeps_a_bounded_number_per_shard(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(filestore, "HISTORY_PER_SHARD", 2)
    store, _ = fake_store()
    store.compare_and_set("other", 0, ShardTopology.from_config(shard("other", "x", "y")))
    store.journal_finish(finished("o1", "other"))
    for i in range(4):
        store.journal_finish(finished(f"m{i}"))
    assert [r.id for r in store.history()] == ["m3", "m2", "o1"]


def test_annotate_adds_each_proxys_buffer_counts_to_a_kept_report(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    store, _ = fake_store(path)
    store.journal_finish(finished("r1"))
    assert store.annotate("r1", "p1", 3, 2, 1, 7) and store.annotate("r1", "p2", 1, 1, 0)
    assert store.annotate("r1", "p2", 1, 1, 0, 2)  # a proxy's later counts replace its own
    assert not store.annotate("gone", "p1", 1, 1, 0)
    (again,) = fake_store(path)[0].history()
    assert (again.held, again.flushed, again.evicted, again.reads_during_hold) == (4, 3, 1, 9)
    assert again.buffers == {
        "p1": {"held": 3, "flushed": 2, "evicted": 1, "reads": 7},
        "p2": {"held": 1, "flushed": 1, "evicted": 0, "reads": 2},
    }
    # Counts and reports written before read routing have no reads: none.
    old = again.to_dict()
    del old["reads_during_hold"]
    old["buffers"] = {"p1": {"held": 3, "flushed": 2, "evicted": 1}}
    back = ReparentRecord.from_dict(old)
    assert back.reads_during_hold == 0 and back.buffers["p1"] == {
        "held": 3,
        "flushed": 2,
        "evicted": 1,
    }


# -- the file -------------------------------------------------------------------------------


def test_reopen_keeps_term_primary_journal_and_history(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    store, _ = fake_store(path)
    current = store.read("main")
    moved = replace(current.value, primary="db2", term=2, quarantined=frozenset({"db1"}))
    assert store.compare_and_set("main", current.version, moved)
    store.journal_finish(finished("r1"))
    in_flight = record("r2", old_primary="db2", term_before=2, step=Step.HOLDING)
    store.journal_put(in_flight)

    again, _ = fake_store(path)
    assert again.read("main") == store.read("main")
    assert again.read("main").value == moved
    assert again.journal_get("main") == in_flight
    assert again.history() == [finished("r1")]
    assert not list(tmp_path.glob("*.tmp"))


def test_open_adds_shards_missing_from_the_file(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    fake_store(path)
    two = replace(CONFIG, shards=(CONFIG.shard, shard("second", "s1", "s2")))
    store = FileStore.open(path, two)
    assert store.shards() == ["main", "second"]
    assert store.read("second").value == ShardTopology("second", ("s1", "s2"), "s1", 1)
    assert FileStore(path).shards() == ["main", "second"]


def test_open_follows_the_configs_servers_but_keeps_primary_and_term(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    store, _ = fake_store(path)
    moved = ShardTopology("main", ("db1", "db2", "db3"), "db2", 5, frozenset({"db1"}))
    assert store.compare_and_set("main", 1, moved)
    config = replace(CONFIG, shards=(shard("main", "db2", "db3", "db4"),))
    topo = FileStore.open(path, config).read("main").value
    assert topo == ShardTopology("main", ("db2", "db3", "db4"), "db2", 5)
    gone = replace(CONFIG, shards=(shard("main", "db3", "db4"),))
    with pytest.raises(TopologyError, match="no server db2"):
        FileStore.open(path, gone)


def test_memory_stays_as_the_file_when_a_write_fails(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "missing" / "state.json")
    with pytest.raises(FileNotFoundError):
        store.compare_and_set("main", 0, ShardTopology.from_config(CONFIG.shard))
    assert store.shards() == []


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"format": 1, "shards": {', "corrupt topology store"),
        (b"\xff\xfe", "corrupt topology store"),
        ("[]", "expected an object"),
        ('{"format": 2, "shards": {}, "history": []}', "format: 2"),
        (
            '{"format": 1, "history": [], "shards": {"main": {"version": 1, "in_flight": null, '
            '"topology": {"name": "main", "servers": ["db1"], "primary": "db1", "term": "x", '
            '"quarantined": []}}}}',
            "shards.main: term: expected int",
        ),
    ],
)
def test_corrupt_file_names_path_and_damage(
    tmp_path: Path, text: str | bytes, message: str
) -> None:
    path = tmp_path / "state.json"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    with pytest.raises(CorruptStoreError) as exc:
        FileStore.open(path, CONFIG)
    assert str(exc.value).startswith(str(path))
    assert message in str(exc.value)


def test_damaged_record_in_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    store, _ = fake_store(path)
    store.journal_finish(finished("r1"))
    doc = json.loads(path.read_text())
    del doc["history"][0]["outcome"]
    path.write_text(json.dumps(doc))
    with pytest.raises(CorruptStoreError, match=r"history\[0\]: outcome: missing"):
        FileStore(path)


# -- events ---------------------------------------------------------------------------------


def test_watchers_get_events_in_subscription_order_until_unsubscribed() -> None:
    store, _ = fake_store()
    seen: list[tuple[str, TopologyEvent]] = []
    stop_a = store.watch(lambda e: seen.append(("a", e)))
    store.watch(lambda e: seen.append(("b", e)))
    started, established = ReparentStarted("main", 2), Established("main", "db2", 2)
    store.publish(started)
    stop_a()
    stop_a()  # twice is harmless
    store.publish(established)
    assert seen == [("a", started), ("b", started), ("b", established)]


def test_a_raising_watcher_does_not_stop_the_others(caplog: pytest.LogCaptureFixture) -> None:
    store, _ = fake_store()
    seen: list[str] = []

    def broken(event: TopologyEvent) -> None:
        raise RuntimeError("boom")

    store.watch(lambda e: seen.append("first"))
    store.watch(broken)
    store.watch(lambda e: seen.append("last"))
    with caplog.at_level(logging.ERROR, logger="reparent.filestore"):
        store.publish(Aborted("main", "test"))
    assert seen == ["first", "last"]
    assert "watcher failed on aborted" in caplog.text and "boom" in caplog.text


# -- shard lock -----------------------------------------------------------------------------


def test_lock_is_exclusive_until_it_expires() -> None:
    store, clock = fake_store()
    lease = store.lock("main", "c1", 10)
    assert lease is not None and (lease.owner, lease.expires_at) == ("c1", 1010.0)
    assert store.lock("main", "c2", 10) is None
    assert store.lock("main", "c1", 10) is None  # not even its owner takes it twice
    assert store.lock("other", "c2", 10) is not None  # locks are per shard
    clock.now += 10
    taken = store.lock("main", "c2", 10)
    assert taken is not None and taken.token != lease.token
    assert not store.renew(lease)
    assert not store.unlock(lease)  # a stale lease releases nothing
    assert store.lock("main", "c1", 10) is None


def test_renew_extends_and_unlock_frees() -> None:
    store, clock = fake_store()
    lease = store.lock("main", "c1", 10)
    assert lease is not None
    clock.now += 8
    assert store.renew(lease)
    clock.now += 8  # past the first expiry, within the renewed one
    assert store.lock("main", "c2", 10) is None
    assert not store.unlock(replace(lease, token="forged"))
    assert store.lock("main", "c2", 10) is None
    assert store.unlock(lease)
    assert store.lock("main", "c2", 10) is not None
    with pytest.raises(ValueError):
        store.lock("x", "c1", 0)


def test_expired_lease_cannot_be_renewed() -> None:
    store, clock = fake_store()
    lease = store.lock("main", "c1", 10)
    assert lease is not None
    clock.now += 10
    assert not store.renew(lease)


# -- drained reports --------------------------------------------------------------------------


def test_wait_drained_without_proxies_is_immediate() -> None:
    store, clock = fake_store()
    assert store.wait_drained("main", 2, 5.0).drained
    assert clock.waits == []


def test_wait_drained_times_out_on_a_silent_proxy() -> None:
    store, clock = fake_store()
    store.register_proxy(ProxyInfo("p1"), 60)
    store.register_proxy(ProxyInfo("p2"), 60)
    store.report_drained("p1", "main", 2, True)
    assert not store.wait_drained("main", 2, 5.0).drained
    assert sum(clock.waits) == 5.0


def test_wait_drained_when_every_proxy_reported() -> None:
    store, clock = fake_store()
    store.register_proxy(ProxyInfo("p1"), 60)
    store.register_proxy(ProxyInfo("p2"), 60)
    store.report_drained("p1", "main", 2, True)
    store.report_drained("p2", "main", 2, True)
    assert store.wait_drained("main", 2, 5.0).drained
    assert clock.waits == []


@pytest.mark.parametrize(
    ("shard", "term", "drained"),
    [("main", 1, True), ("main", 3, True), ("main", 2, False), ("other", 2, True)],
    ids=["older-term", "other-term", "not-drained", "other-shard"],
)
def test_only_a_drained_report_for_this_shard_and_term_counts(
    shard: str, term: int, drained: bool
) -> None:
    store, _ = fake_store()
    store.register_proxy(ProxyInfo("p1"), 60)
    store.report_drained("p1", shard, term, drained)
    assert not store.wait_drained("main", 2, 1.0).drained


def test_a_later_report_replaces_an_earlier_one() -> None:
    store, _ = fake_store()
    store.register_proxy(ProxyInfo("p1"), 60)
    store.report_drained("p1", "main", 2, True)
    store.report_drained("p1", "main", 2, False)
    assert not store.wait_drained("main", 2, 1.0).drained


def test_an_expired_registration_no_longer_counts() -> None:
    store, clock = fake_store()
    store.register_proxy(ProxyInfo("gone"), 3)
    store.register_proxy(ProxyInfo("live"), 60)
    store.report_drained("live", "main", 2, True)
    clock.now += 3
    assert store.wait_drained("main", 2, 5.0).drained
    assert clock.waits == []


def test_a_registration_expiring_during_the_wait_ends_it() -> None:
    store, clock = fake_store()
    store.register_proxy(ProxyInfo("dying"), 2)
    assert store.wait_drained("main", 2, 5.0).drained
    assert clock.waits == [2.0]  # woke at the expiry, not at the timeout


def test_wait_drained_is_woken_by_a_report_from_another_thread() -> None:
    store = FileStore.open(None, CONFIG)
    store.register_proxy(ProxyInfo("p1"), 60)
    reporter = threading.Timer(0.02, store.report_drained, ("p1", "main", 2, True))
    t0 = time.monotonic()
    reporter.start()
    try:
        assert store.wait_drained("main", 2, 5.0).drained
    finally:
        reporter.join()
    assert time.monotonic() - t0 < 2.0


def test_wait_drained_times_out_in_real_time() -> None:
    store = FileStore.open(None, CONFIG)
    store.register_proxy(ProxyInfo("p1"), 60)
    t0 = time.monotonic()
    assert not store.wait_drained("main", 2, 0.05).drained
    assert 0.04 < time.monotonic() - t0 < 1.0


# -- catching up after a gap ------------------------------------------------------------------


TOPO = ShardTopology("main", ("db1", "db2", "db3"), "db1", 1)


def in_flight(step: Step, term_before: int = 1) -> ReparentRecord:
    return ReparentRecord(
        id="r",
        kind=ReparentKind.PRS,
        shard="main",
        old_primary="db1",
        requested=None,
        term_before=term_before,
        step=step,
        started_at=0.0,
    )


@pytest.mark.parametrize(
    ("seen", "topo", "journal", "expected"),
    [
        # a fresh subscriber mid-switch holds; before the hold, or with nothing, it does not
        (None, TOPO, in_flight(Step.REVOKED), [ReparentStarted("main", 2)]),
        (None, TOPO, in_flight(Step.PREPARED), []),
        (None, TOPO, None, []),
        # the switch finished in the gap: the new term, whether it had held or not
        (Seen(1, 2), replace(TOPO, primary="db2", term=2), None, [Established("main", "db2", 2)]),
        (Seen(1), replace(TOPO, primary="db2", term=2), None, [Established("main", "db2", 2)]),
        # it was undone in the gap
        (Seen(1, 2), TOPO, None, [Aborted("main", "")]),
        # it is still holding, or one more started and holds now
        (Seen(1, 2), TOPO, in_flight(Step.ESTABLISHING), []),
        (
            Seen(1),
            replace(TOPO, primary="db2", term=2),
            in_flight(Step.HOLDING, term_before=2),
            [Established("main", "db2", 2), ReparentStarted("main", 3)],
        ),
        # never an older term than the subscriber knows
        (Seen(3), TOPO, None, []),
    ],
    ids=[
        "fresh-mid-switch",
        "fresh-not-yet-holding",
        "fresh-idle",
        "finished-while-holding",
        "finished-unseen",
        "undone",
        "still-holding",
        "finished-and-another-holds",
        "stale-store",
    ],
)
def test_catch_up(
    seen: Seen | None,
    topo: ShardTopology,
    journal: ReparentRecord | None,
    expected: list[TopologyEvent],
) -> None:
    got = catch_up(seen, topo, journal)
    # The reason of a synthesised abort is for people; compare the rest.
    assert [replace(e, reason="") if isinstance(e, Aborted) else e for e in got] == expected


@pytest.mark.parametrize(
    "event",
    [
        ReparentStarted("main", 2),
        Revoked("main", "db1", "0-1-5"),
        Established("main", "db2", 2),
        Aborted("main", "why"),
    ],
)
def test_events_round_trip_as_json(event: TopologyEvent) -> None:
    assert event_from_dict(json.loads(json.dumps(event_to_dict(event)))) == event


def test_a_damaged_event_names_the_field() -> None:
    with pytest.raises(ValueError, match="term"):
        event_from_dict({"kind": "established", "shard": "main", "new_primary": "db2"})
    with pytest.raises(ValueError, match="kind"):
        event_from_dict({"kind": "exploded", "shard": "main"})


def test_a_record_written_before_the_fleet_reads_with_empty_fleet_fields() -> None:
    old = in_flight(Step.DONE).to_dict()
    del old["not_drained"], old["buffers"]
    again = ReparentRecord.from_dict(old)
    assert again.not_drained == [] and again.buffers == {}
