"""The topology store of a Baton's worker processes: the supervisor's store, over its channel.

With the embedded store (`[topology] store = "file"`) one process must own the file, its locks
and its registrations, or two processes would each believe their own. That is the supervisor:
it opens the `FileStore`, and each worker reaches it through `SocketStore`, a `TopologyStore`
whose every call is a request on the worker's channel (reparent/channel.py). So a worker is a
proxy in the fleet contract exactly like a Baton of its own: it follows the topology through
`watch`, registers on its own, reports drained, and the controller waits for it.

`StoreServer` is the supervisor's half: it answers a channel's store requests from the real
store, and sends each of the channel's watches its events as notes, in the store's order.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Callable
from typing import Any

from reparent.channel import Channel, ChannelClosed
from reparent.store import (
    Drain,
    Lease,
    ProxyInfo,
    ProxyStatus,
    StoreUnavailableError,
    TopologyStore,
    notify,
)
from reparent.topology import ReparentRecord, ShardTopology, TopologyEvent, Versioned

log = logging.getLogger(__name__)

CALL_TIMEOUT = 10.0  # seconds for one store call; wait_drained gets its own timeout on top
STORE = "store"  # request kinds on the channel
WATCH = "watch"
UNWATCH = "unwatch"
EVENT = "event"  # note kind: (watch id, event)

# The store's methods a worker may call through the channel (watch has requests of its own).
METHODS = frozenset(
    {
        "read",
        "shards",
        "compare_and_set",
        "journal_put",
        "journal_get",
        "journal_finish",
        "commit_finish",
        "history",
        "annotate",
        "publish",
        "lock",
        "renew",
        "check",
        "unlock",
        "lock_owner",
        "register_proxy",
        "unregister_proxy",
        "proxies",
        "report_drained",
        "wait_drained",
    }
)


class SocketStore(TopologyStore):
    """A worker's view of the supervisor's store. Every call is one round trip (about 0.1 ms
    on loopback); a supervisor that is gone makes every call raise StoreUnavailableError,
    as a store out of reach does."""

    def __init__(self, channel: Channel) -> None:
        self._channel = channel
        self._lock = threading.Lock()
        self._watchers: dict[int, Callable[[TopologyEvent], None]] = {}
        self._watch_ids = itertools.count(1)

    def note(self, kind: str, args: tuple[Any, ...]) -> bool:
        """A note from the supervisor; True if it was the store's (an event for a watch)."""
        if kind != EVENT:
            return False
        watch_id, event = args
        with self._lock:
            callback = self._watchers.get(watch_id)
        if callback is not None:
            notify([callback], event)
        return True

    def _call(self, method: str, *args: Any, timeout: float = CALL_TIMEOUT, **kw: Any) -> Any:
        try:
            return self._channel.call(STORE, method, args, kw, timeout=timeout)
        except (ChannelClosed, TimeoutError) as e:
            raise StoreUnavailableError(f"the supervisor's store: {e or 'no answer'}")

    def read(self, shard: str) -> Versioned[ShardTopology]:
        return self._call("read", shard)

    def shards(self) -> list[str]:
        return self._call("shards")

    def compare_and_set(
        self, shard: str, expected_version: int, new: ShardTopology, *, lease: Lease | None = None
    ) -> bool:
        return self._call("compare_and_set", shard, expected_version, new, lease=lease)

    def journal_put(
        self,
        record: ReparentRecord,
        events: tuple[TopologyEvent, ...] = (),
        *,
        lease: Lease | None = None,
    ) -> None:
        self._call("journal_put", record, events, lease=lease)

    def journal_get(self, shard: str) -> ReparentRecord | None:
        return self._call("journal_get", shard)

    def journal_finish(
        self,
        record: ReparentRecord,
        events: tuple[TopologyEvent, ...] = (),
        *,
        lease: Lease | None = None,
    ) -> None:
        self._call("journal_finish", record, events, lease=lease)

    def commit_finish(
        self,
        record: ReparentRecord,
        expected_version: int,
        topology: ShardTopology,
        events: tuple[TopologyEvent, ...] = (),
        *,
        lease: Lease | None = None,
    ) -> bool:
        return self._call("commit_finish", record, expected_version, topology, events, lease=lease)

    def history(self, shard: str | None = None, limit: int = 50) -> list[ReparentRecord]:
        return self._call("history", shard, limit)

    def annotate(
        self,
        record_id: str,
        proxy_id: str,
        held: int,
        flushed: int,
        evicted: int,
        reads: int = 0,
    ) -> bool:
        return self._call("annotate", record_id, proxy_id, held, flushed, evicted, reads)

    def watch(self, callback: Callable[[TopologyEvent], None]) -> Callable[[], None]:
        watch_id = next(self._watch_ids)
        with self._lock:
            self._watchers[watch_id] = callback
        try:
            # The supervisor sends the catch-up events before its answer, on the same socket.
            self._channel.call(WATCH, watch_id, timeout=CALL_TIMEOUT)
        except (ChannelClosed, TimeoutError) as e:
            with self._lock:
                self._watchers.pop(watch_id, None)
            raise StoreUnavailableError(f"the supervisor's store: {e or 'no answer'}")

        def unsubscribe() -> None:
            with self._lock:
                self._watchers.pop(watch_id, None)
            try:
                self._channel.note(UNWATCH, watch_id)
            except ChannelClosed:
                pass

        return unsubscribe

    def publish(self, event: TopologyEvent) -> None:
        self._call("publish", event)

    def lock(self, shard: str, owner: str, ttl: float) -> Lease | None:
        return self._call("lock", shard, owner, ttl)

    def renew(self, lease: Lease) -> bool:
        return self._call("renew", lease)

    def check(self, lease: Lease) -> bool:
        return self._call("check", lease)

    def unlock(self, lease: Lease) -> bool:
        return self._call("unlock", lease)

    def lock_owner(self, shard: str) -> str | None:
        return self._call("lock_owner", shard)

    def register_proxy(self, proxy: ProxyInfo, ttl: float) -> None:
        self._call("register_proxy", proxy, ttl)

    def unregister_proxy(self, proxy_id: str) -> None:
        self._call("unregister_proxy", proxy_id)

    def proxies(self) -> list[ProxyStatus]:
        return self._call("proxies")

    def report_drained(self, proxy_id: str, shard: str, term: int, drained: bool) -> None:
        self._call("report_drained", proxy_id, shard, term, drained)

    def wait_drained(self, shard: str, term: int, timeout: float) -> Drain:
        return self._call("wait_drained", shard, term, timeout, timeout=timeout + CALL_TIMEOUT)

    def close(self) -> None:
        """The channel belongs to the worker, which closes it."""
        with self._lock:
            self._watchers.clear()


class StoreServer:
    """The supervisor's side: one per worker channel, answering from `store`."""

    def __init__(self, store: TopologyStore) -> None:
        self._store = store
        self._lock = threading.Lock()
        self._unwatch: dict[int, Callable[[], None]] = {}

    def handle(self, channel: Channel, kind: str, args: tuple[Any, ...]) -> object:
        """Answer one of the worker's store requests; raises LookupError for other kinds."""
        if kind == STORE:
            method, call_args, kw = args
            if method not in METHODS:
                raise ValueError(f"not a store method: {method!r}")
            return getattr(self._store, method)(*call_args, **kw)
        if kind == WATCH:
            (watch_id,) = args

            def push(event: TopologyEvent) -> None:
                try:
                    channel.note(EVENT, watch_id, event)
                except ChannelClosed:
                    pass  # the worker is gone: close() unsubscribes

            unwatch = self._store.watch(push)
            with self._lock:
                self._unwatch[watch_id] = unwatch
            return None
        raise LookupError(kind)

    def note(self, kind: str, args: tuple[Any, ...]) -> bool:
        """A note from the worker; True if it was the store's (the end of a watch)."""
        if kind != UNWATCH:
            return False
        with self._lock:
            unwatch = self._unwatch.pop(args[0], None)
        if unwatch is not None:
            unwatch()
        return True

    def close(self) -> None:
        """The worker is gone: its watches end."""
        with self._lock:
            unwatches, self._unwatch = list(self._unwatch.values()), {}
        for unwatch in unwatches:
            unwatch()
