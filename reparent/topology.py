"""The shard topology, the reparent journal, and the store that keeps them.

The store is the one place that says which server leads a shard and at which term. The
controller writes every step of a reparent to it before acting, so that a controller that dies
half-way is resumed or undone on restart; the proxies learn of reparents through its events and
tell the controller through it when they have drained. Both halves talk only to `TopologyStore`,
so that moving from the embedded `FileStore` to etcd (several proxies, one controller) swaps the
store, not its callers.

Everything here is synchronous and thread-safe: the controller calls it from worker threads,
the proxy from its event loop, and nothing here blocks for long except `wait_drained`.
"""

from __future__ import annotations

import copy
import enum
import itertools
import json
import logging
import os
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Generic, TypeVar

from reparent.config import Config, ShardConfig

log = logging.getLogger(__name__)

T = TypeVar("T")
E = TypeVar("E", bound=enum.Enum)

FORMAT = 1  # the store file's layout; bumped when an older Baton could misread a newer file
HISTORY_PER_SHARD = 200  # finished reparents kept per shard, so the file stays small


class TopologyError(Exception):
    """A topology request that cannot be met; the message names the shard or the file."""


class UnknownShardError(TopologyError, LookupError):
    """The store has no such shard: a caller's bug or a config that names a shard never opened."""


class JournalConflictError(TopologyError):
    """Another reparent is in flight on the shard; two must never interleave in one journal."""


class CorruptStoreError(TopologyError):
    """The store file cannot be trusted. Starting anyway would forget a term or a half-done
    reparent, so Baton refuses until an operator looks at the file."""


# -- the model ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardTopology:
    """Who leads a shard and since which term: the one fact a reparent changes."""

    name: str
    servers: tuple[str, ...]
    primary: str
    term: int
    # Servers that must not be routed to or chosen (e.g. a fenced old primary that has not
    # rejoined as a replica).
    quarantined: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        # Coerced, so that a topology built from lists still compares and hashes like one
        # built from tuples.
        object.__setattr__(self, "servers", tuple(self.servers))
        object.__setattr__(self, "quarantined", frozenset(self.quarantined))
        # Checked here, so that neither a bug nor a hand-edited file can describe a shard that
        # no reparent could have produced.
        where = f"shard {self.name}"
        if len(set(self.servers)) != len(self.servers):
            raise ValueError(f"{where}: server names must be unique")
        if self.primary not in self.servers:
            raise ValueError(f"{where}: primary {self.primary!r} is not one of its servers")
        if not self.quarantined <= set(self.servers):
            raise ValueError(f"{where}: quarantined servers must be among its servers")
        if self.primary in self.quarantined:
            raise ValueError(f"{where}: the primary {self.primary!r} cannot be quarantined")
        if self.term < 1:
            raise ValueError(f"{where}: term must be at least 1, got {self.term}")

    @classmethod
    def from_config(cls, shard: ShardConfig) -> ShardTopology:
        """The topology of a shard no reparent has touched yet."""
        return cls(
            name=shard.name,
            servers=tuple(s.name for s in shard.servers),
            primary=shard.primary.name,
            term=1,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "servers": list(self.servers),
            "primary": self.primary,
            "term": self.term,
            "quarantined": sorted(self.quarantined),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ShardTopology:
        return cls(
            name=_get(d, "name", str),
            servers=tuple(_str_list(d, "servers")),
            primary=_get(d, "primary", str),
            term=_get(d, "term", int),
            quarantined=frozenset(_str_list(d, "quarantined")),
        )


@dataclass(frozen=True)
class Versioned(Generic[T]):
    """A value with the version a compare-and-set must name, so that of two writers racing on
    one shard only one can win."""

    value: T
    version: int


class ReparentKind(enum.StrEnum):
    PRS = "prs"  # planned: the old primary is reachable and is demoted gracefully
    ERS = "ers"  # emergency: the old primary is unreachable, the replicas are fenced


class Step(enum.StrEnum):
    """The journaled steps of a reparent, in order. A step is written before it is acted on,
    so on restart the step says what may have been half done."""

    STARTED = "started"
    CANDIDATE_CHOSEN = "candidate_chosen"
    PREPARED = "prepared"  # the candidate caught up while the old primary still served
    HOLDING = "holding"  # proxies hold new commands and drain the old primary
    REVOKING = "revoking"
    REVOKED = "revoked"  # the old primary can no longer complete a write, verified
    ESTABLISHING = "establishing"
    ESTABLISHED = "established"
    PUBLISHED = "published"  # the new primary and term are in the store
    UNDOING = "undoing"
    DONE = "done"


class Outcome(enum.StrEnum):
    SUCCEEDED = "succeeded"
    ABORTED = "aborted"  # failed before anything was revoked
    UNDONE = "undone"  # revoked, then undone: the old primary leads again
    FAILED = "failed"  # could neither finish nor undo; needs an operator


@dataclass(frozen=True)
class PhaseTiming:
    step: Step  # the journaled step the call ran under
    started_at: float  # wall-clock seconds
    duration_ms: float
    call: str = ""  # what ran: choose, prepare, revoke, establish, commit, abandon, undo

    def to_dict(self) -> dict[str, Any]:
        return {
            "step": str(self.step),
            "call": self.call,
            "started_at": self.started_at,
            "duration_ms": self.duration_ms,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PhaseTiming:
        call = d.get("call", "")
        return cls(
            step=_enum(d, "step", Step),
            started_at=_float(d, "started_at"),
            duration_ms=_float(d, "duration_ms"),
            call=call if isinstance(call, str) else "",
        )


@dataclass(kw_only=True)
class ReparentRecord:
    """One reparent: its journal entry while in flight, its report once finished.

    Keyword-only, because eighteen positional fields invite a silent swap of two of them.
    """

    id: str
    kind: ReparentKind
    shard: str
    old_primary: str
    requested: str | None  # the candidate the operator asked for; None lets Baton choose
    candidate: str | None = None
    new_primary: str | None = None
    term_before: int
    term_after: int | None = None
    step: Step = Step.STARTED
    phases: list[PhaseTiming] = field(default_factory=list)
    positions: dict[str, str] = field(default_factory=dict)  # GTID positions by name
    outcome: Outcome | None = None  # None while in flight
    reason: str = ""
    held: int = 0  # buffer counts, filled in by the proxy side
    flushed: int = 0
    evicted: int = 0
    started_at: float  # wall-clock seconds
    finished_at: float | None = None
    # Replicas an emergency under semi_sync was allowed to leave uncompared (`--allow-
    # unreachable`): the report names them, with the risk the operator took.
    allow_unreachable: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": str(self.kind),
            "shard": self.shard,
            "old_primary": self.old_primary,
            "requested": self.requested,
            "candidate": self.candidate,
            "new_primary": self.new_primary,
            "term_before": self.term_before,
            "term_after": self.term_after,
            "step": str(self.step),
            "phases": [p.to_dict() for p in self.phases],
            "positions": dict(self.positions),
            "outcome": None if self.outcome is None else str(self.outcome),
            "reason": self.reason,
            "held": self.held,
            "flushed": self.flushed,
            "evicted": self.evicted,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "allow_unreachable": list(self.allow_unreachable),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ReparentRecord:
        phases = []
        for i, p in enumerate(_get(d, "phases", list)):
            try:
                phases.append(PhaseTiming.from_dict(_mapping(p)))
            except ValueError as e:
                raise ValueError(f"phases[{i}]: {e}")
        positions = _get(d, "positions", dict)
        for key, value in positions.items():
            if not isinstance(value, str):
                raise ValueError(f"positions.{key}: expected str, got {value!r}")
        finished_at = _get(d, "finished_at", int, float, type(None))
        outcome = _get(d, "outcome", str, type(None))
        return cls(
            id=_get(d, "id", str),
            kind=_enum(d, "kind", ReparentKind),
            shard=_get(d, "shard", str),
            old_primary=_get(d, "old_primary", str),
            requested=_get(d, "requested", str, type(None)),
            candidate=_get(d, "candidate", str, type(None)),
            new_primary=_get(d, "new_primary", str, type(None)),
            term_before=_get(d, "term_before", int),
            term_after=_get(d, "term_after", int, type(None)),
            step=_enum(d, "step", Step),
            phases=phases,
            positions=dict(positions),
            outcome=None if outcome is None else _enum(d, "outcome", Outcome),
            reason=_get(d, "reason", str),
            held=_get(d, "held", int),
            flushed=_get(d, "flushed", int),
            evicted=_get(d, "evicted", int),
            started_at=_float(d, "started_at"),
            finished_at=None if finished_at is None else float(finished_at),
            # Absent from records written before the field existed.
            allow_unreachable=tuple(_str_list(d, "allow_unreachable"))
            if "allow_unreachable" in d
            else (),
        )


# -- events ---------------------------------------------------------------------------------


class EventKind(enum.StrEnum):
    REPARENT_STARTED = "reparent_started"
    REVOKED = "revoked"
    ESTABLISHED = "established"
    ABORTED = "aborted"


@dataclass(frozen=True)
class ReparentStarted:
    """Proxies start holding now, before anything is demoted, and report when drained."""

    shard: str
    term: int  # the term being established: term_before + 1

    @property
    def kind(self) -> EventKind:
        return EventKind.REPARENT_STARTED


@dataclass(frozen=True)
class Revoked:
    """The old primary can no longer complete a write; `position` is its final GTID position
    ("" when it was unreachable)."""

    shard: str
    old_primary: str
    position: str

    @property
    def kind(self) -> EventKind:
        return EventKind.REVOKED


@dataclass(frozen=True)
class Established:
    """Proxies flush what they hold to `new_primary` and route writes only to it from now."""

    shard: str
    new_primary: str
    term: int

    @property
    def kind(self) -> EventKind:
        return EventKind.ESTABLISHED


@dataclass(frozen=True)
class Aborted:
    """The old primary leads again (or nobody does, when the reparent failed): proxies flush
    back to the shard's primary as the store now names it."""

    shard: str
    reason: str

    @property
    def kind(self) -> EventKind:
        return EventKind.ABORTED


TopologyEvent = ReparentStarted | Revoked | Established | Aborted


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


class FileStore(TopologyStore):
    """The embedded store: everything in memory, topology and journal also in one JSON file.

    Locks and proxy registrations live in memory only: after a restart no old lease can be
    honoured and every live proxy re-registers within one heartbeat.

    `clock` decides every expiry (leases, registrations, `wait_drained`'s deadline); it is
    monotonic by default because these are durations, and a wall-clock step would expire or
    prolong every lease at once. `wait` blocks on the store's condition for up to the given
    seconds; with a fake clock, pass one that advances it.
    """

    def __init__(
        self,
        path: Path | str | None,
        clock: Callable[[], float] = time.monotonic,
        *,
        wait: Waiter = threading.Condition.wait,
    ) -> None:
        self._path = None if path is None else Path(path)
        self._clock = clock
        self._wait = wait
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        # Serialises publishing, so that every watcher sees events in the same order.
        self._publishing = threading.RLock()
        self._topology: dict[str, Versioned[ShardTopology]] = {}
        self._in_flight: dict[str, ReparentRecord] = {}
        self._history: list[ReparentRecord] = []  # oldest first
        self._leases: dict[str, tuple[Lease, float]] = {}  # shard -> (lease, ttl)
        self._proxies: dict[str, float] = {}  # proxy id -> registration expiry
        self._reports: dict[tuple[str, str], tuple[int, bool]] = {}  # (proxy, shard) -> report
        self._watchers: dict[int, Callable[[TopologyEvent], None]] = {}
        self._watcher_ids = itertools.count()
        if self._path is not None:
            self._load(self._path)

    @classmethod
    def open(
        cls,
        path: Path | str | None,
        config: Config,
        *,
        clock: Callable[[], float] = time.monotonic,
        wait: Waiter = threading.Condition.wait,
    ) -> FileStore:
        """Load the store and add the config's shards it lacks (term 1, the config's primary).

        For a shard the file already has, the file's primary and term win: they are what the
        last reparent left. Its server list follows the config, because a server only the file
        names has no address to reach it by.
        """
        store = cls(path, clock, wait=wait)
        for shard in config.shards:
            store._adopt(shard)
        return store

    def _adopt(self, shard: ShardConfig) -> None:
        wanted = ShardTopology.from_config(shard)
        with self._lock:
            current = self._topology.get(shard.name)
            if current is None:
                self.compare_and_set(shard.name, 0, wanted)
                return
            topo = current.value
            if set(topo.servers) == set(wanted.servers):
                return
            if topo.primary not in wanted.servers:
                raise TopologyError(
                    f"{self._path}: shard {shard.name}: the store says {topo.primary} leads at "
                    f"term {topo.term}, but the config has no server {topo.primary}; add it "
                    "back to the config, or remove the shard from the store file to start over "
                    "from the config"
                )
            log.warning(
                "shard %s: servers %s in the store, %s in the config; following the config",
                shard.name,
                ",".join(topo.servers),
                ",".join(wanted.servers),
            )
            servers = set(wanted.servers)
            self.compare_and_set(
                shard.name,
                current.version,
                replace(topo, servers=wanted.servers, quarantined=topo.quarantined & servers),
            )

    # -- topology ---------------------------------------------------------------------------

    def read(self, shard: str) -> Versioned[ShardTopology]:
        with self._lock:
            return self._known(shard)

    def shards(self) -> list[str]:
        with self._lock:
            return sorted(self._topology)

    def compare_and_set(self, shard: str, expected_version: int, new: ShardTopology) -> bool:
        if new.name != shard:
            raise ValueError(f"topology of shard {new.name!r} written to shard {shard!r}")
        with self._lock:
            current = self._topology.get(shard)
            version = 0 if current is None else current.version
            if version != expected_version:
                return False
            topology = {**self._topology, shard: Versioned(new, version + 1)}
            self._commit(topology, self._in_flight, self._history)
            return True

    # -- journal ----------------------------------------------------------------------------

    def journal_put(self, record: ReparentRecord) -> None:
        if record.outcome is not None:
            raise ValueError(f"reparent {record.id} has an outcome: finish it, do not put it")
        with self._lock:
            self._known(record.shard)
            self._check_in_flight(record)
            in_flight = {**self._in_flight, record.shard: copy.deepcopy(record)}
            self._commit(self._topology, in_flight, self._history)

    def journal_get(self, shard: str) -> ReparentRecord | None:
        with self._lock:
            self._known(shard)
            return copy.deepcopy(self._in_flight.get(shard))

    def journal_finish(self, record: ReparentRecord) -> None:
        if record.outcome is None:
            raise ValueError(f"reparent {record.id} has no outcome yet")
        with self._lock:
            self._known(record.shard)
            self._check_in_flight(record)
            in_flight = {k: v for k, v in self._in_flight.items() if k != record.shard}
            history = [*self._history, copy.deepcopy(record)]
            same = [i for i, r in enumerate(history) if r.shard == record.shard]
            dropped = set(same[: max(0, len(same) - HISTORY_PER_SHARD)])
            history = [r for i, r in enumerate(history) if i not in dropped]
            self._commit(self._topology, in_flight, history)

    def history(self, shard: str | None = None, limit: int = 50) -> list[ReparentRecord]:
        with self._lock:
            found = [r for r in reversed(self._history) if shard is None or r.shard == shard]
            return copy.deepcopy(found[: max(0, limit)])

    def annotate(self, record_id: str, held: int, flushed: int, evicted: int) -> bool:
        with self._lock:
            history = copy.deepcopy(self._history)
            for record in history:
                if record.id == record_id:
                    record.held += held
                    record.flushed += flushed
                    record.evicted += evicted
                    self._commit(self._topology, self._in_flight, history)
                    return True
            return False

    def _check_in_flight(self, record: ReparentRecord) -> None:
        current = self._in_flight.get(record.shard)
        if current is not None and current.id != record.id:
            raise JournalConflictError(
                f"shard {record.shard}: reparent {current.id} is in flight, not {record.id}"
            )

    def _known(self, shard: str) -> Versioned[ShardTopology]:
        try:
            return self._topology[shard]
        except KeyError:
            raise UnknownShardError(f"no shard {shard!r} in the topology store")

    # -- events -----------------------------------------------------------------------------

    def watch(self, callback: Callable[[TopologyEvent], None]) -> Callable[[], None]:
        with self._lock:
            key = next(self._watcher_ids)
            self._watchers[key] = callback

        def unsubscribe() -> None:
            with self._lock:
                self._watchers.pop(key, None)

        return unsubscribe

    def publish(self, event: TopologyEvent) -> None:
        with self._publishing:
            with self._lock:
                watchers = list(self._watchers.values())
            for callback in watchers:
                try:
                    callback(event)
                except Exception:
                    log.exception("shard %s: a watcher failed on %s", event.shard, event.kind)

    # -- shard lock -------------------------------------------------------------------------

    def lock(self, shard: str, owner: str, ttl: float) -> Lease | None:
        if ttl <= 0:
            raise ValueError(f"lock ttl must be positive, got {ttl}")
        with self._lock:
            now = self._clock()
            held = self._leases.get(shard)
            if held is not None and held[0].expires_at > now:
                return None
            lease = Lease(shard=shard, owner=owner, token=uuid.uuid4().hex, expires_at=now + ttl)
            self._leases[shard] = (lease, ttl)
            return lease

    def renew(self, lease: Lease) -> bool:
        with self._lock:
            now = self._clock()
            held = self._leases.get(lease.shard)
            if held is None or held[0].token != lease.token or held[0].expires_at <= now:
                return False
            current, ttl = held
            self._leases[lease.shard] = (replace(current, expires_at=now + ttl), ttl)
            return True

    def unlock(self, lease: Lease) -> bool:
        with self._lock:
            held = self._leases.get(lease.shard)
            if held is None or held[0].token != lease.token:
                return False
            del self._leases[lease.shard]
            return True

    # -- drained reports --------------------------------------------------------------------

    def register_proxy(self, proxy_id: str, ttl: float) -> None:
        with self._changed:
            self._proxies[proxy_id] = self._clock() + ttl
            self._changed.notify_all()

    def report_drained(self, proxy_id: str, shard: str, term: int, drained: bool) -> None:
        with self._changed:
            self._reports[(proxy_id, shard)] = (term, drained)
            self._changed.notify_all()

    def wait_drained(self, shard: str, term: int, timeout: float) -> bool:
        with self._changed:
            deadline = self._clock() + timeout
            while True:
                now = self._clock()
                # The expiry of each live proxy still owing a report: when one passes, that
                # proxy stops counting, so the wait must look again then even if nobody calls.
                owing = [
                    expires
                    for proxy, expires in self._proxies.items()
                    if expires > now and self._reports.get((proxy, shard)) != (term, True)
                ]
                if not owing:
                    return True
                if now >= deadline:
                    return False
                self._wait(self._changed, min(deadline, *owing) - now)

    # -- the file ---------------------------------------------------------------------------

    def _commit(
        self,
        topology: dict[str, Versioned[ShardTopology]],
        in_flight: dict[str, ReparentRecord],
        history: list[ReparentRecord],
    ) -> None:
        """Write the new state to the file first and only then adopt it: a failed write
        raises and leaves memory as it was, so memory never holds what the file lacks."""
        if self._path is not None:
            doc = {
                "format": FORMAT,
                "shards": {
                    name: {
                        "version": v.version,
                        "topology": v.value.to_dict(),
                        "in_flight": None if name not in in_flight else in_flight[name].to_dict(),
                    }
                    for name, v in topology.items()
                },
                "history": [r.to_dict() for r in history],
            }
            _write_atomically(self._path, json.dumps(doc, indent=1) + "\n")
        self._topology, self._in_flight, self._history = topology, in_flight, history

    def _load(self, path: Path) -> None:
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return
        except OSError as e:
            raise CorruptStoreError(f"{path}: cannot read the topology store: {e.strerror}")
        try:
            doc = _mapping(json.loads(raw))
            fmt = _get(doc, "format", int)
            if fmt != FORMAT:
                raise ValueError(f"format: {fmt} is not {FORMAT}; written by another Baton?")
            for name, raw_entry in _get(doc, "shards", dict).items():
                try:
                    entry = _mapping(raw_entry)
                    topo = ShardTopology.from_dict(_get(entry, "topology", dict))
                    if topo.name != name:
                        raise ValueError(f"topology.name: {topo.name!r} under shard {name!r}")
                    version = _get(entry, "version", int)
                    if version < 1:
                        raise ValueError(f"version: must be at least 1, got {version}")
                    self._topology[name] = Versioned(topo, version)
                    flight = _get(entry, "in_flight", dict, type(None))
                    if flight is not None:
                        self._in_flight[name] = ReparentRecord.from_dict(flight)
                except ValueError as e:
                    raise ValueError(f"shards.{name}: {e}")
            for i, r in enumerate(_get(doc, "history", list)):
                try:
                    self._history.append(ReparentRecord.from_dict(_mapping(r)))
                except ValueError as e:
                    raise ValueError(f"history[{i}]: {e}")
        except ValueError as e:  # json and UTF-8 decoding errors are ValueErrors too
            raise CorruptStoreError(f"{path}: corrupt topology store: {e}")


def _write_atomically(path: Path, text: str) -> None:
    """Replace the file so that a crash at any point leaves either the old or the new one, and
    the rename itself is on disk before the caller acts on it."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- reading JSON that may be damaged ---------------------------------------------------------
# Each helper names the field it rejects, so a damaged store file says where it is damaged.


def _mapping(value: Any) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise ValueError(f"expected an object, got {type(value).__name__}")
    return value


def _get(d: Mapping[str, Any], key: str, *kinds: type) -> Any:
    if key not in d:
        raise ValueError(f"{key}: missing")
    value = d[key]
    # bool is an int in Python; a term of `true` is still damage.
    if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
        names = " or ".join("null" if k is type(None) else k.__name__ for k in kinds)
        raise ValueError(f"{key}: expected {names}, got {value!r}")
    return value


def _float(d: Mapping[str, Any], key: str) -> float:
    return float(_get(d, key, int, float))


def _str_list(d: Mapping[str, Any], key: str) -> list[str]:
    items = _get(d, key, list)
    if not all(isinstance(item, str) for item in items):
        raise ValueError(f"{key}: expected a list of strings, got {items!r}")
    return items


def _enum(d: Mapping[str, Any], key: str, kind: type[E]) -> E:
    value = _get(d, key, str)
    try:
        return kind(value)
    except ValueError:
        raise ValueError(f"{key}: unknown value {value!r}")
