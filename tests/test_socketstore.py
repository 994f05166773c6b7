"""The supervisor's store as its workers see it (reparent/socketstore.py over reparent/channel.py):
the same answers, errors and events as the FileStore it serves, over a real socket pair."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from reparent.channel import Channel, ChannelClosed
from reparent.config import load
from reparent.filestore import FileStore
from reparent.socketstore import SocketStore, StoreServer
from reparent.store import ProxyInfo, StoreUnavailableError
from reparent.topology import (
    Established,
    ReparentStarted,
    TopologyEvent,
    UnknownShardError,
)
from tests.test_control import CONFIG


@dataclass
class Pair:
    store: FileStore
    remote: SocketStore
    worker: Channel
    supervisor: Channel


@pytest.fixture
def pair() -> Iterator[Pair]:
    store = FileStore.open(None, CONFIG)
    ours, theirs = socket.socketpair()
    server = StoreServer(store)
    holder: list[Channel] = []
    supervisor = Channel(
        ours,
        lambda kind, args: server.handle(holder[0], kind, args),
        on_note=lambda kind, args: server.note(kind, args) and None,
        on_close=server.close,
        name="supervisor",
    )
    holder.append(supervisor)
    supervisor.start()
    remote: list[SocketStore] = []
    worker = Channel(
        theirs, lambda kind, args: None, on_note=lambda k, a: remote[0].note(k, a) and None
    )
    remote.append(SocketStore(worker))
    worker.start()
    try:
        yield Pair(store, remote[0], worker, supervisor)
    finally:
        worker.close()
        supervisor.close()


def test_reads_writes_and_errors_are_the_stores(pair: Pair) -> None:
    assert pair.remote.shards() == pair.store.shards() == ["main"]
    assert pair.remote.read("main") == pair.store.read("main")
    with pytest.raises(UnknownShardError, match="no shard 'nope'"):
        pair.remote.read("nope")
    pair.remote.register_proxy(ProxyInfo(id="w0", terms={"main": 1}), 3.0)
    assert [p.info.id for p in pair.store.proxies()] == ["w0"]
    lease = pair.remote.lock("main", "me", 5.0)
    assert lease is not None and pair.store.lock_owner("main") == "me"
    assert pair.remote.unlock(lease)


def test_watch_gets_events_in_order_until_unwatched(pair: Pair) -> None:
    pair.store.publish(ReparentStarted("main", 2))  # before the watch: not delivered
    got: list[TopologyEvent] = []
    arrived = threading.Event()

    def callback(event: TopologyEvent) -> None:
        got.append(event)
        if len(got) == 3:
            arrived.set()

    unwatch = pair.remote.watch(callback)
    for term in (2, 3, 4):
        pair.store.publish(Established("main", "db2", term))
    assert arrived.wait(5)
    assert got == [Established("main", "db2", t) for t in (2, 3, 4)]
    unwatch()
    pair.store.publish(Established("main", "db3", 5))
    time.sleep(0.1)
    assert len(got) == 3


def test_drained_reports_reach_a_waiting_controller(pair: Pair) -> None:
    pair.remote.register_proxy(ProxyInfo(id="w0"), 3.0)
    reporter = threading.Timer(0.1, pair.remote.report_drained, ("w0", "main", 2, True))
    reporter.start()
    t0 = time.monotonic()
    drain = pair.store.wait_drained("main", 2, 5.0)
    reporter.join()
    assert drain.drained and drain.missing == ()
    assert time.monotonic() - t0 < 2


def test_a_gone_supervisor_is_a_store_out_of_reach(pair: Pair) -> None:
    pair.supervisor.close()
    with pytest.raises(StoreUnavailableError, match="supervisor's store"):
        pair.remote.read("main")
    with pytest.raises(ChannelClosed):
        pair.worker.call("anything")


def test_only_store_methods_are_served(pair: Pair) -> None:
    with pytest.raises(ValueError, match="not a store method: '_commit'"):
        pair.worker.call("store", "_commit", (), {})


def test_config_crosses_whole() -> None:
    """Workers take their config from the supervisor, over the same channel."""
    loaded = load(str(CONFIG.path))
    ours, theirs = socket.socketpair()
    a = Channel(ours, lambda kind, args: loaded).start()
    b = Channel(theirs, lambda kind, args: None).start()
    try:
        assert b.call("config") == loaded
    finally:
        a.close()
        b.close()
