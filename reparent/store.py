"""The topology store's interface: what the controller and the proxies need from the one place
that says which server leads a shard and at which term.

The controller writes every step of a reparent to it before acting, so that a controller that
dies half-way is resumed or undone (by itself on restart, or by another Baton of the fleet); the
proxies learn of reparents through its events and tell the controller through it when they have
drained. Both halves talk only to `TopologyStore`, so that the embedded `FileStore` and the
fleet's `EtcdStore` swap the store, not its callers.

Everything here is synchronous and thread-safe: the controller calls it from worker threads,
the proxy from its event loop, and nothing here blocks for long except `wait_drained`.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

from reparent.topology import (
    ReparentRecord,
    ShardTopology,
    TopologyEvent,
    Versioned,
)


@dataclass(frozen=True)
class Lease:
    """Proof of holding a shard's lock. `expires_at` is in the store's clock and as of the
    acquisition; after `renew` only the store knows the new expiry."""

    shard: str
    owner: str
    token: str
    expires_at: float


# -- the store ------------------------------------------------------------------------------


class TopologyStore(ABC):
    """What the controller and the proxies need from a topology store, and no more, so that an
    etcd store can implement it with a key per shard, a transaction per compare-and-set, a
    lease per lock and a watch per event stream.

    Every method is thread-safe. Event callbacks run synchronously on the publisher's thread
    (for the embedded store, the controller's worker thread), never on an event loop: an
    asyncio subscriber must hop with `loop.call_soon_threadsafe` and return at once.
    """

    @abstractmethod
    def read(self, shard: str) -> Versioned[ShardTopology]:
        """The shard's topology and version; raises UnknownShardError."""

    @abstractmethod
    def shards(self) -> list[str]:
        """Every shard's name, sorted."""

    @abstractmethod
    def compare_and_set(self, shard: str, expected_version: int, new: ShardTopology) -> bool:
        """Write `new` if the shard is still at `expected_version` (0: the shard must not
        exist yet, which is how shards are created); False and nothing written otherwise.
        The version grows by one with each successful write."""

    @abstractmethod
    def journal_put(self, record: ReparentRecord) -> None:
        """Make `record` its shard's in-flight reparent, durably, before returning: the caller
        acts on the step only after this. Raises JournalConflictError if a reparent with
        another id is in flight on the shard."""

    @abstractmethod
    def journal_get(self, shard: str) -> ReparentRecord | None:
        """The shard's in-flight reparent, or None."""

    @abstractmethod
    def journal_finish(self, record: ReparentRecord) -> None:
        """Move a record with an outcome to the history and clear the in-flight slot, in one
        durable write, so a restart sees the reparent either in flight or finished."""

    @abstractmethod
    def history(self, shard: str | None = None, limit: int = 50) -> list[ReparentRecord]:
        """Finished reparents, newest first; of one shard, or of all."""

    @abstractmethod
    def annotate(self, record_id: str, held: int, flushed: int, evicted: int) -> bool:
        """Add a proxy's buffer counts to a finished reparent's report (added to what other
        proxies reported); False if the report is no longer kept."""

    @abstractmethod
    def watch(self, callback: Callable[[TopologyEvent], None]) -> Callable[[], None]:
        """Subscribe to every shard's events; returns the unsubscribe function. An event being
        published while unsubscribing may still arrive."""

    @abstractmethod
    def publish(self, event: TopologyEvent) -> None:
        """Deliver `event` to every watcher in subscription order before returning. A watcher
        that raises is logged and the others still get the event. Watchers must not publish."""

    @abstractmethod
    def lock(self, shard: str, owner: str, ttl: float) -> Lease | None:
        """Take the shard's lock for `ttl` seconds; None while anyone, `owner` included, holds
        an unexpired lease (a restarted controller cannot prove its old self is gone)."""

    @abstractmethod
    def renew(self, lease: Lease) -> bool:
        """Extend the lease by its ttl from now; False if it expired or is no longer held."""

    @abstractmethod
    def unlock(self, lease: Lease) -> bool:
        """Release the lock; False (and nothing released) if `lease` no longer holds it."""

    @abstractmethod
    def register_proxy(self, proxy_id: str, ttl: float) -> None:
        """A proxy's heartbeat: it counts for `wait_drained` for the next `ttl` seconds. A
        proxy must answer every shard's `reparent_started`, at once for a shard it does not
        serve, or the demotion waits for it until the grace period ends."""

    @abstractmethod
    def report_drained(self, proxy_id: str, shard: str, term: int, drained: bool) -> None:
        """Whether `proxy_id` has nothing in flight on the old primary of the reparent that
        establishes `term`. The latest report per proxy and shard wins."""

    @abstractmethod
    def wait_drained(self, shard: str, term: int, timeout: float) -> bool:
        """Block until every live registered proxy has reported drained for `shard` and
        `term` (True), or until `timeout` seconds pass (False). True at once when no proxy
        is registered: there is nobody to wait for."""


# The real wait; tests pass one that advances a fake clock instead of sleeping.
Waiter = Callable[[threading.Condition, float], object]
