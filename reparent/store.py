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

import logging
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from reparent.config import Config
from reparent.topology import (
    ReparentRecord,
    ShardTopology,
    Step,
    TopologyError,
    TopologyEvent,
    UnknownShardError,
    Versioned,
    json_get,
    json_mapping,
)

log = logging.getLogger(__name__)

LEADER = "@leader"  # the lock name of the failure detector's leader; shards are locked by name


class StoreUnavailableError(TopologyError):
    """The store cannot be reached (or has no quorum): nothing was read or written. Callers
    keep what they know and start nothing new until it answers again."""

    def __init__(self, detail: str) -> None:
        super().__init__(f"topology store unreachable: {detail}")


class LockLostError(TopologyError):
    """A write made under a lock found the lock gone (lapsed, or taken over): nothing was
    written, and the holder must stop acting for the shard at once."""


@dataclass(frozen=True)
class Lease:
    """Proof of holding a lock (a shard's, or `LEADER`). `token` is opaque to callers: the
    store checks it in every write made under the lock. `expires_at` is in the store's clock
    as of the acquisition; after `renew` only the store knows the new expiry."""

    shard: str
    owner: str
    token: str
    expires_at: float
    ttl: float = 0.0


@dataclass(frozen=True)
class ProxyInfo:
    """What a proxy tells the fleet about itself with each heartbeat: where to find it, and
    the topology it follows (the newest term it knows, and the shards it holds for)."""

    id: str
    address: str = ""  # host:port applications connect to
    control_socket: str = ""
    metrics: str = ""  # host:port of /metrics
    terms: Mapping[str, int] = field(default_factory=dict)  # shard -> newest term seen
    holding: tuple[str, ...] = ()  # shards it holds commands for right now

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "address": self.address,
            "control_socket": self.control_socket,
            "metrics": self.metrics,
            "terms": dict(self.terms),
            "holding": list(self.holding),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ProxyInfo:
        terms = json_get(d, "terms", dict)
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in terms.values()):
            raise ValueError(f"terms: expected terms by shard, got {terms!r}")
        holding = json_get(d, "holding", list)
        if not all(isinstance(h, str) for h in holding):
            raise ValueError(f"holding: expected shard names, got {holding!r}")
        return cls(
            id=json_get(d, "id", str),
            address=json_get(d, "address", str),
            control_socket=json_get(d, "control_socket", str),
            metrics=json_get(d, "metrics", str),
            terms=dict(terms),
            holding=tuple(holding),
        )


@dataclass(frozen=True)
class ProxyStatus:
    """A proxy as the store knows it: `alive` while its registration lives; `drained` is its
    latest report per shard, (term, drained)."""

    info: ProxyInfo
    alive: bool
    drained: Mapping[str, tuple[int, bool]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.info.to_dict(),
            "alive": self.alive,
            "drained": {s: {"term": t, "drained": d} for s, (t, d) in self.drained.items()},
        }


@dataclass(frozen=True)
class Drain:
    """How a wait for drained reports ended. `missing` names every proxy that was alive at some
    point of the wait and had not reported drained for the term when it ended: the ones that
    were still busy at the deadline, and the ones whose registration lapsed (stopped, cut off,
    dead), which stopped counting then."""

    drained: bool  # every proxy still alive reported before the timeout
    missing: tuple[str, ...] = ()


def report_from_json(value: Any) -> tuple[int, bool]:
    """A drained report as stored: {"term": int, "drained": bool}."""
    d = json_mapping(value)
    return json_get(d, "term", int), json_get(d, "drained", bool)


# -- the store ------------------------------------------------------------------------------


class TopologyStore(ABC):
    """What the controller and the proxies need from a topology store, and no more: a key per
    shard, a transaction per compare-and-set, a lease per lock and a watch per event stream.
    Nothing in it is specific to one process, so a store served over a socket can implement it.

    Every method is thread-safe and may block on the network for a bounded time; a store that
    cannot be reached raises StoreUnavailableError. Event callbacks run on a thread of the
    store (the publisher's for the embedded store, the watch's for etcd), never on an event
    loop: an asyncio subscriber must hop with `loop.call_soon_threadsafe` and return at once.

    Writes that name a `lease` happen only while that lease holds the shard's lock (checked in
    the same atomic write), and raise LockLostError otherwise: a controller that lost its lock
    can never write the journal or the topology again.
    """

    @abstractmethod
    def read(self, shard: str) -> Versioned[ShardTopology]:
        """The shard's topology and version; raises UnknownShardError."""

    @abstractmethod
    def shards(self) -> list[str]:
        """Every shard's name, sorted."""

    @abstractmethod
    def compare_and_set(
        self,
        shard: str,
        expected_version: int,
        new: ShardTopology,
        *,
        lease: Lease | None = None,
    ) -> bool:
        """Write `new` if the shard is still at `expected_version` (0: the shard must not
        exist yet, which is how shards are created); False and nothing written otherwise.
        The version grows by one with each successful write."""

    @abstractmethod
    def journal_put(
        self,
        record: ReparentRecord,
        events: tuple[TopologyEvent, ...] = (),
        *,
        lease: Lease | None = None,
    ) -> None:
        """Make `record` its shard's in-flight reparent and publish `events`, in one durable
        write, before returning: the caller acts on the step only after this, and an event is
        never ahead of the journal. Raises JournalConflictError if a reparent with another id
        is in flight on the shard."""

    @abstractmethod
    def journal_get(self, shard: str) -> ReparentRecord | None:
        """The shard's in-flight reparent, or None."""

    @abstractmethod
    def journal_finish(
        self,
        record: ReparentRecord,
        events: tuple[TopologyEvent, ...] = (),
        *,
        lease: Lease | None = None,
    ) -> None:
        """Move a record with an outcome to the history, clear the in-flight slot and publish
        `events`, in one durable write, so a restart sees the reparent either in flight or
        finished."""

    def commit_finish(
        self,
        record: ReparentRecord,
        expected_version: int,
        topology: ShardTopology,
        events: tuple[TopologyEvent, ...] = (),
        *,
        lease: Lease | None = None,
    ) -> bool:
        """A planned reparent's last write: compare-and-set the shard's `topology` (new
        primary, new term) and finish `record`, then publish `events`. False, and nothing
        written, if the shard is no longer at `expected_version`.

        Stores that can do it in one atomic write override this: inside a switch's hold,
        each durable write is time every held client waits. This default is three writes
        that are safe in any order of crashes: the record is journaled as established first,
        so a controller that dies after the compare-and-set rolls forward from the journal.
        """
        self.journal_put(replace(record, step=Step.ESTABLISHED, outcome=None), lease=lease)
        if not self.compare_and_set(record.shard, expected_version, topology, lease=lease):
            return False
        self.journal_finish(record, events, lease=lease)
        return True

    @abstractmethod
    def history(self, shard: str | None = None, limit: int = 50) -> list[ReparentRecord]:
        """Finished reparents, newest first; of one shard, or of all."""

    @abstractmethod
    def annotate(
        self,
        record_id: str,
        proxy_id: str,
        held: int,
        flushed: int,
        evicted: int,
        reads: int = 0,
    ) -> bool:
        """Record one proxy's buffer counts for a finished reparent (and `reads`: the reads
        it served on replicas while it held); the report shows the sum over proxies. A
        proxy's later counts for the same reparent replace its earlier ones. False if the
        report is no longer kept."""

    @abstractmethod
    def watch(self, callback: Callable[[TopologyEvent], None]) -> Callable[[], None]:
        """Subscribe to every shard's events, in the order they were written; returns the
        unsubscribe function. An event being delivered while unsubscribing may still arrive.
        After a gap in the stream (the store was unreachable, or its history compacted) the
        store delivers what the gap changed (`topology.catch_up`), never a stale term."""

    @abstractmethod
    def publish(self, event: TopologyEvent) -> None:
        """Deliver `event` to every watcher, outside any journal write. A watcher that raises
        is logged and the others still get the event. Watchers must not publish."""

    @abstractmethod
    def lock(self, shard: str, owner: str, ttl: float) -> Lease | None:
        """Take the lock `shard` (a shard's name, or `LEADER`) for `ttl` seconds; None while
        anyone, `owner` included, holds an unexpired lease (a restarted controller cannot
        prove its old self is gone). The holder keeps it with `renew`."""

    @abstractmethod
    def renew(self, lease: Lease) -> bool:
        """Extend the lease by its ttl from now; False if it expired or is no longer held."""

    @abstractmethod
    def check(self, lease: Lease) -> bool:
        """Whether `lease` still holds its lock, as the store sees it now (asked before each
        mechanism call: a controller that lost its lock must not touch a server)."""

    @abstractmethod
    def unlock(self, lease: Lease) -> bool:
        """Release the lock; False (and nothing released) if `lease` no longer holds it."""

    @abstractmethod
    def lock_owner(self, shard: str) -> str | None:
        """Who holds the lock `shard` (a shard's name, or `LEADER`) now, or None."""

    @abstractmethod
    def register_proxy(self, proxy: ProxyInfo, ttl: float) -> None:
        """A proxy's heartbeat: it counts for `wait_drained` for the next `ttl` seconds, and
        `proxies` shows `proxy` as it is now. A proxy must answer every shard's
        `reparent_started`, at once for a shard it does not serve, or the demotion waits for it
        until the grace period ends."""

    @abstractmethod
    def unregister_proxy(self, proxy_id: str) -> None:
        """A proxy that stops cleanly: it no longer counts, and `proxies` forgets it."""

    @abstractmethod
    def proxies(self) -> list[ProxyStatus]:
        """Every proxy the store knows, sorted by id: alive ones and ones whose registration
        lapsed without unregistering (killed, cut off)."""

    @abstractmethod
    def report_drained(self, proxy_id: str, shard: str, term: int, drained: bool) -> None:
        """Whether `proxy_id` has nothing in flight on the old primary of the reparent that
        establishes `term`. The latest report per proxy and shard wins; it lives as long as
        the proxy's registration."""

    @abstractmethod
    def wait_drained(self, shard: str, term: int, timeout: float) -> Drain:
        """Block until every live registered proxy has reported drained for `shard` and
        `term`, or until `timeout` seconds pass. At once when no proxy is registered: there
        is nobody to wait for. A proxy whose registration lapses stops counting then."""

    @abstractmethod
    def close(self) -> None:
        """Stop the store's own threads and connections."""


def check_topology_shard(shard: str, topology: ShardTopology) -> None:
    """Refuse to write a shard's topology under another shard's key: a caller's bug that would
    otherwise move a primary in the wrong shard. Every store checks it before writing."""
    if topology.name != shard:
        raise ValueError(f"topology of shard {topology.name!r} written to shard {shard!r}")


def notify(callbacks: list[Callable[[TopologyEvent], None]], event: TopologyEvent) -> None:
    """Deliver `event` to each callback in turn; one that raises is logged, and the others
    still get the event."""
    for callback in callbacks:
        try:
            callback(event)
        except Exception:
            log.exception("shard %s: a watcher failed on %s", event.shard, event.kind)


def adopt_shards(store: TopologyStore, config: Config, where: str) -> None:
    """Add the config's shards the store lacks (term 1, the config's primary).

    For a shard the store already has, the store's primary and term win: they are what the
    last reparent left. Its server list follows the config, because a server only the store
    names has no address to reach it by. Two Batons starting at once both try: the
    compare-and-set lets one win, and the other reads what it wrote.
    """
    for shard in config.shards:
        wanted = ShardTopology.from_config(shard)
        for _ in range(3):
            try:
                current = store.read(shard.name)
            except UnknownShardError:
                if store.compare_and_set(shard.name, 0, wanted):
                    break
                continue
            topo = current.value
            if set(topo.servers) == set(wanted.servers):
                break
            if topo.primary not in wanted.servers:
                raise TopologyError(
                    f"{where}: shard {shard.name}: the store says {topo.primary} leads at "
                    f"term {topo.term}, but the config has no server {topo.primary}; add it "
                    "back to the config, or remove the shard from the store to start over "
                    "from the config"
                )
            log.warning(
                "shard %s: servers %s in the store, %s in the config; following the config",
                shard.name,
                ",".join(topo.servers),
                ",".join(wanted.servers),
            )
            servers = set(wanted.servers)
            updated = replace(topo, servers=wanted.servers, quarantined=topo.quarantined & servers)
            if store.compare_and_set(shard.name, current.version, updated):
                break


# The real wait; tests pass one that advances a fake clock instead of sleeping.
Waiter = Callable[[threading.Condition, float], object]
