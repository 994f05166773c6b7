"""The topology store's contract on both stores, and etcd's own failures, against real etcd
processes started on loopback (no MariaDB)."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import pytest

from reparent.config import load
from reparent.etcdsandbox import EtcdCluster, pick_ports
from reparent.etcdstore import EtcdStore, _put
from reparent.filestore import FileStore
from reparent.store import LEADER, LockLostError, ProxyInfo, StoreUnavailableError, TopologyStore
from reparent.topology import (
    Aborted,
    Established,
    JournalConflictError,
    Outcome,
    ReparentKind,
    ReparentRecord,
    ReparentStarted,
    Step,
    TopologyEvent,
    event_to_dict,
)
from tests.faultshim import FaultShim
from tests.fixtures import ETCD_PORTS, etcd_cluster

CONFIG = load(Path(__file__).resolve().parent.parent / "configs" / "example.toml")


def etcd_store(cluster: EtcdCluster, prefix: str = "") -> EtcdStore:
    """A store of its own (a fresh prefix), or another client of `prefix`."""
    return EtcdStore.open(cluster.endpoints, prefix or f"/test-{uuid.uuid4().hex[:8]}", CONFIG)


@pytest.fixture(params=["file", "etcd"])
def store(request: pytest.FixtureRequest) -> Iterator[TopologyStore]:
    if request.param == "file":
        s: TopologyStore = FileStore.open(None, CONFIG)
    else:
        s = etcd_store(request.getfixturevalue("etcd"))
    try:
        yield s
    finally:
        s.close()


def record(rid: str = "r1", step: Step = Step.HOLDING, **kw: object) -> ReparentRecord:
    return ReparentRecord(
        id=rid,
        kind=ReparentKind.PRS,
        shard="main",
        old_primary="db1",
        requested=None,
        term_before=1,
        step=step,
        started_at=time.time(),
        **kw,  # type: ignore[arg-type]
    )


class Events:
    """A subscriber that remembers; `wait_for` waits for a delivery (etcd delivers from its
    watch thread, the file store before the write returns)."""

    def __init__(self, store: TopologyStore) -> None:
        self.got: list[TopologyEvent] = []
        self.changed = threading.Condition()
        self.unsubscribe = store.watch(self._on)

    def _on(self, event: TopologyEvent) -> None:
        with self.changed:
            self.got.append(event)
            self.changed.notify_all()

    def wait_for(self, count: int, timeout: float = 10.0) -> list[TopologyEvent]:
        with self.changed:
            self.changed.wait_for(lambda: len(self.got) >= count, timeout)
            return list(self.got)


def eventually(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


# -- the contract, on both stores ------------------------------------------------------------


def test_compare_and_set_on_the_version(store: TopologyStore) -> None:
    current = store.read("main")
    moved = replace(current.value, primary="db2", term=2)
    assert store.compare_and_set("main", current.version, moved)
    assert not store.compare_and_set("main", current.version, moved)
    again = store.read("main")
    assert again.value == moved and again.version == current.version + 1
    assert store.shards() == ["main"]


def test_journal_and_events_are_written_together_and_delivered_in_order(
    store: TopologyStore,
) -> None:
    events = Events(store)
    r = record()
    store.journal_put(r, (ReparentStarted("main", 2),))
    assert store.journal_get("main") == r
    with pytest.raises(JournalConflictError):
        store.journal_put(record("other"))
    done = replace(r, step=Step.DONE, outcome=Outcome.SUCCEEDED, finished_at=time.time())
    store.journal_finish(done, (Established("main", "db2", 2),))
    assert store.journal_get("main") is None
    assert [h.id for h in store.history("main")] == ["r1"]
    assert events.wait_for(2) == [ReparentStarted("main", 2), Established("main", "db2", 2)]


def test_commit_finish_writes_topology_and_report_at_once_or_nothing(
    store: TopologyStore,
) -> None:
    """A planned switch's last write: the new primary and term, the finished record and the
    event together; a version that moved writes nothing."""
    events = Events(store)
    r = record()
    store.journal_put(r)
    current = store.read("main")
    moved = replace(current.value, primary="db2", term=2)
    done = replace(r, step=Step.DONE, outcome=Outcome.SUCCEEDED, finished_at=time.time())
    assert not store.commit_finish(done, current.version + 1, moved)
    assert store.read("main") == current and store.journal_get("main") == r
    with pytest.raises(ValueError, match="written to shard 'main'"):
        store.commit_finish(done, current.version, replace(moved, name="other"))
    assert store.read("main") == current and store.journal_get("main") == r
    assert store.commit_finish(done, current.version, moved, (Established("main", "db2", 2),))
    assert store.read("main") == type(current)(moved, current.version + 1)
    assert store.journal_get("main") is None
    assert [h.id for h in store.history("main")] == ["r1"]
    assert events.wait_for(1) == [Established("main", "db2", 2)]


def test_a_new_subscriber_mid_switch_is_told_to_hold(store: TopologyStore) -> None:
    store.journal_put(record(step=Step.REVOKING), (ReparentStarted("main", 2),))
    late = Events(store)
    assert late.wait_for(1) == [ReparentStarted("main", 2)]


def test_the_lock_is_exclusive_and_every_write_under_it_checks_it(store: TopologyStore) -> None:
    lease = store.lock("main", "a", 10)
    assert lease is not None
    assert store.lock("main", "b", 10) is None
    assert store.lock_owner("main") == "a" and store.check(lease)
    store.journal_put(record(), lease=lease)
    assert store.renew(lease)
    assert store.unlock(lease)
    assert store.lock_owner("main") is None and not store.check(lease)
    other = store.lock("main", "b", 10)
    assert other is not None
    with pytest.raises(LockLostError):
        store.journal_put(record(step=Step.REVOKING), lease=lease)
    current = store.read("main")
    with pytest.raises(LockLostError):
        store.compare_and_set("main", current.version, current.value, lease=lease)
    assert store.journal_get("main").step is Step.HOLDING  # type: ignore[union-attr]
    assert store.lock(LEADER, "a", 10) is not None  # the detector's leader is another lock
    assert store.lock_owner(LEADER) == "a"


def test_proxies_drained_reports_and_who_did_not_report(store: TopologyStore) -> None:
    store.register_proxy(ProxyInfo("p1", address="127.0.0.1:1"), 3)
    store.register_proxy(ProxyInfo("p2", address="127.0.0.1:2"), 3)
    store.report_drained("p1", "main", 2, True)
    t0 = time.monotonic()
    drain = store.wait_drained("main", 2, 0.3)
    assert not drain.drained and drain.missing == ("p2",)
    assert time.monotonic() - t0 >= 0.25
    threading.Timer(0.2, store.report_drained, ("p2", "main", 2, True)).start()
    drain = store.wait_drained("main", 2, 5.0)
    assert drain.drained and drain.missing == ()
    status = {p.info.id: p for p in store.proxies()}
    assert status["p1"].alive and status["p1"].info.address == "127.0.0.1:1"
    assert status["p2"].drained == {"main": (2, True)}
    store.unregister_proxy("p2")
    assert [p.info.id for p in store.proxies()] == ["p1"]


def test_annotate_keeps_each_proxys_counts(store: TopologyStore) -> None:
    r = replace(record(), step=Step.DONE, outcome=Outcome.ABORTED, finished_at=time.time())
    store.journal_put(record())
    store.journal_finish(r)
    assert store.annotate("r1", "p1", 3, 2, 1, 5)
    assert store.annotate("r1", "p2", 1, 1, 0)
    assert not store.annotate("nope", "p1", 1, 1, 1)
    (h,) = store.history()
    assert (h.held, h.flushed, h.evicted, h.reads_during_hold) == (4, 3, 1, 5)
    assert set(h.buffers) == {"p1", "p2"}


# -- etcd only -------------------------------------------------------------------------------


def test_a_damaged_journal_value_costs_only_itself_not_its_transactions_events(
    etcd: EtcdCluster,
) -> None:
    """A journal value the watch cannot read, written in one txn with events: the value is
    skipped and logged, the events are still delivered (the watch used to raise, watch again
    from after that revision, and so lose the events of the same transaction)."""
    store = etcd_store(etcd)
    try:
        events = Events(store)
        aborted = {"events": [event_to_dict(Aborted("main", "test"))]}
        store.client.txn(
            [],
            [
                _put(store._key("journal", "main"), {"not": "a record"}),
                _put(store._key("events", "main"), aborted),
            ],
        )
        assert events.wait_for(1, timeout=5) == [Aborted("main", "test")]
    finally:
        store.close()


def test_a_lapsed_proxy_stops_counting_and_is_named(etcd: EtcdCluster) -> None:
    """A proxy that stops heartbeating (SIGSTOP, cut off) delays the drain by at most its
    lease's TTL, and the report names it."""
    store = etcd_store(etcd)
    try:
        store.register_proxy(ProxyInfo("stopped"), 2)
        other = etcd_store(etcd, store.prefix)
        other.register_proxy(ProxyInfo("live"), 3)
        keep = threading.Event()

        def heartbeat() -> None:
            while not keep.wait(0.5):
                other.register_proxy(ProxyInfo("live"), 3)

        beat = threading.Thread(target=heartbeat)
        beat.start()
        other.report_drained("live", "main", 2, True)
        t0 = time.monotonic()
        drain = store.wait_drained("main", 2, 10.0)
        waited = time.monotonic() - t0
        keep.set()
        beat.join()
        assert drain.drained and drain.missing == ("stopped",)
        assert 1.0 < waited < 3.5  # the lease's 2 s (etcd may grant a little more), not 10 s
        alive = {p.info.id: p.alive for p in store.proxies()}
        assert alive == {"live": True, "stopped": False}
        other.close()
    finally:
        store.close()


def test_a_lock_holder_that_stops_renewing_loses_the_lock(etcd: EtcdCluster) -> None:
    store = etcd_store(etcd)
    try:
        lease = store.lock("main", "a", 2)
        assert lease is not None
        eventually(lambda: store.lock_owner("main") is None, timeout=5)
        assert not store.check(lease) and not store.renew(lease)
        taken = store.lock("main", "b", 2)
        assert taken is not None
        with pytest.raises(LockLostError):
            store.journal_put(record(), lease=lease)
        store.journal_put(record(), lease=taken)
    finally:
        store.close()


def test_unreachable_then_back(tmp_path: Path) -> None:
    """etcd down: every call fails fast and says so; back: reads, writes and the event stream
    work again with no restart of the store."""
    cluster = etcd_cluster(tmp_path)
    try:
        store = etcd_store(cluster)
        events = Events(store)
        (name,) = list(cluster.procs)
        cluster.kill(name)
        t0 = time.monotonic()
        with pytest.raises(StoreUnavailableError, match="topology store unreachable"):
            store.read("main")
        assert time.monotonic() - t0 < 3.0
        with pytest.raises(StoreUnavailableError):
            store.lock("main", "a", 10)
        cluster.start_member(name)
        cluster.wait_ready()
        store.journal_put(record(), (ReparentStarted("main", 2),))
        assert events.wait_for(1) == [ReparentStarted("main", 2)]
        store.close()
    finally:
        cluster.stop()


@contextmanager
def cut_off(etcd: EtcdCluster) -> Iterator[tuple[FaultShim, EtcdStore, Events, EtcdStore]]:
    """A store that reaches etcd only through a fault shim, with a subscriber whose stream is
    live, and a store that reaches it directly, on one prefix."""
    with FaultShim(etcd.members[0].client_port, port=pick_ports(1, *ETCD_PORTS)[0]) as shim:
        prefix = f"/test-{uuid.uuid4().hex[:8]}"
        behind = EtcdStore.open([f"http://127.0.0.1:{shim.port}"], prefix, CONFIG)
        store = EtcdStore.open(etcd.endpoints, prefix, CONFIG)
        try:
            events = Events(behind)
            behind.publish(Aborted("main", "the stream is live"))
            events.wait_for(1)
            yield shim, behind, events, store
        finally:
            behind.close()
            store.close()


def compact(store: EtcdStore) -> None:
    """Compact away every revision so far (a write outside Baton's keys first, so the last of
    Baton's is compacted too): a watch that resumes from before gets none of them."""
    revision = store.client.put(store.prefix + "-unrelated", "x")
    store.client.compact(revision)


def test_three_members_with_one_down(tmp_path: Path) -> None:
    """One member of three killed: the lock, the journal, compare-and-set and the event stream
    all work through the other two, and the killed member rejoins."""
    cluster = etcd_cluster(tmp_path, members=3)
    try:
        store = etcd_store(cluster)
        events = Events(store)
        cluster.kill(cluster.members[0].name)  # the endpoint every call tries first
        lease = store.lock("main", "b", 10)
        assert lease is not None
        store.journal_put(record(), (ReparentStarted("main", 2),), lease=lease)
        current = store.read("main")
        assert store.compare_and_set("main", current.version, current.value, lease=lease)
        assert events.wait_for(1, timeout=20) == [ReparentStarted("main", 2)]
        cluster.start_member(cluster.members[0].name)
        cluster.wait_ready()
        store.close()
    finally:
        cluster.stop()


def test_a_switch_in_a_compacted_gap_arrives_as_its_new_term(etcd: EtcdCluster) -> None:
    """A subscriber cut off while a switch ran and the history was compacted is told the
    outcome (the new term) when it is back, and reads the new topology."""
    with cut_off(etcd) as (shim, behind, events, store):
        shim.reset()
        lease = store.lock("main", "b", 10)
        assert lease is not None
        r = record()
        store.journal_put(r, (ReparentStarted("main", 2),), lease=lease)
        current = store.read("main")
        moved = replace(current.value, primary="db2", term=2)
        assert store.compare_and_set("main", current.version, moved, lease=lease)
        done = replace(r, step=Step.DONE, outcome=Outcome.SUCCEEDED, finished_at=time.time())
        store.journal_finish(done, (Established("main", "db2", 2),), lease=lease)
        compact(store)
        shim.restore()
        got = events.wait_for(2, timeout=20)
        assert got[1:] == [Established("main", "db2", 2)]
        assert behind.read("main").value == moved


def test_a_hold_that_ended_in_a_compacted_gap_is_aborted(etcd: EtcdCluster) -> None:
    with cut_off(etcd) as (shim, behind, events, store):
        r = record()
        store.journal_put(r, (ReparentStarted("main", 2),))
        assert events.wait_for(2)[1:] == [ReparentStarted("main", 2)]
        shim.reset()
        undone = replace(r, step=Step.DONE, outcome=Outcome.UNDONE, finished_at=time.time())
        store.journal_finish(undone, (Aborted("main", "test"),))
        compact(store)
        shim.restore()
        got = events.wait_for(3, timeout=20)
        assert got[2].kind == "aborted" and got[2].reason != "test"  # caught up, not replayed


def test_history_is_newest_first_and_trimmed(
    store: TopologyStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    from reparent import etcdstore, filestore

    monkeypatch.setattr(etcdstore, "HISTORY_PER_SHARD", 3)
    monkeypatch.setattr(filestore, "HISTORY_PER_SHARD", 3)
    for i in range(5):
        r = record(f"r{i}")
        store.journal_put(r)
        store.journal_finish(
            replace(r, step=Step.DONE, outcome=Outcome.ABORTED, finished_at=1000.0 + i)
        )
    assert store.annotate("r4", "p1", 1, 1, 0)
    assert not store.annotate("r0", "p1", 1, 1, 0)  # trimmed
    assert [r.id for r in store.history("main")] == ["r4", "r3", "r2"]
    assert [r.id for r in store.history(limit=2)] == ["r4", "r3"]
    assert store.history("main", 1)[0].held == 1
