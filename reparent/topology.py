"""The shard topology, the reparent journal and the topology events: the model every store
keeps and every caller reads.

The store that keeps them is `reparent/store.py` (the interface) with its implementations
`reparent/filestore.py` (embedded, the default) and `reparent/etcdstore.py` (a fleet of
Batons). Everything here is plain data, so that it can cross a process or a network boundary as
JSON and come back equal.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Generic, TypeVar

from reparent.config import ShardConfig

T = TypeVar("T")
E = TypeVar("E", bound=enum.Enum)


class TopologyError(Exception):
    """A topology request that cannot be met; the message names the shard or the file."""


class UnknownShardError(TopologyError, LookupError):
    """The store has no such shard: a caller's bug or a config that names a shard never opened."""


class JournalConflictError(TopologyError):
    """Another reparent is in flight on the shard; two must never interleave in one journal."""


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
            name=json_get(d, "name", str),
            servers=tuple(json_str_list(d, "servers")),
            primary=json_get(d, "primary", str),
            term=json_get(d, "term", int),
            quarantined=frozenset(json_str_list(d, "quarantined")),
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
            step=json_enum(d, "step", Step),
            started_at=json_float(d, "started_at"),
            duration_ms=json_float(d, "duration_ms"),
            call=call if isinstance(call, str) else "",
        )


@dataclass(kw_only=True)
class ReparentRecord:
    """One reparent: its journal entry while in flight, its report once finished.

    Keyword-only, because eighteen positional fields invite a silent swap of two of them. The
    fields are the journal's and the report's columns, written once per phase; nothing else
    mutates them.
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
    reads_during_hold: int = 0  # reads the proxies served on replicas while they held
    started_at: float  # wall-clock seconds
    finished_at: float | None = None
    # Proxies that were alive during the drain and had not reported drained when the demotion
    # went ahead (busy at the grace period's end, or gone: stopped, cut off, dead).
    not_drained: list[str] = field(default_factory=list)
    # Each proxy's buffer counts, {"held", "flushed", "evicted"} by proxy id; held, flushed
    # and evicted above are their sums.
    buffers: dict[str, dict[str, int]] = field(default_factory=dict)
    # Replicas an emergency under semi_sync was allowed to leave uncompared (`--allow-
    # unreachable`): the report names them, with the risk the operator took.
    allow_unreachable: tuple[str, ...] = ()

    def with_buffers(self, buffers: Mapping[str, Mapping[str, int]]) -> ReparentRecord:
        """This report with `buffers` as the proxies' counts, and their sums."""
        b = {proxy: dict(counts) for proxy, counts in sorted(buffers.items())}
        return replace(
            self,
            buffers=b,
            held=sum(c.get("held", 0) for c in b.values()),
            flushed=sum(c.get("flushed", 0) for c in b.values()),
            evicted=sum(c.get("evicted", 0) for c in b.values()),
            reads_during_hold=sum(c.get("reads", 0) for c in b.values()),
        )

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
            "reads_during_hold": self.reads_during_hold,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "not_drained": list(self.not_drained),
            "buffers": {p: dict(c) for p, c in self.buffers.items()},
            "allow_unreachable": list(self.allow_unreachable),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ReparentRecord:
        phases = []
        for i, p in enumerate(json_get(d, "phases", list)):
            try:
                phases.append(PhaseTiming.from_dict(json_mapping(p)))
            except ValueError as e:
                raise ValueError(f"phases[{i}]: {e}")
        positions = json_get(d, "positions", dict)
        for key, value in positions.items():
            if not isinstance(value, str):
                raise ValueError(f"positions.{key}: expected str, got {value!r}")
        finished_at = json_get(d, "finished_at", int, float, type(None))
        outcome = json_get(d, "outcome", str, type(None))
        # Absent from records written before the fleet: read as empty.
        not_drained = json_str_list(d, "not_drained") if "not_drained" in d else []
        buffers = {
            proxy: buffer_counts(counts)
            for proxy, counts in (json_get(d, "buffers", dict) if "buffers" in d else {}).items()
        }
        return cls(
            id=json_get(d, "id", str),
            kind=json_enum(d, "kind", ReparentKind),
            shard=json_get(d, "shard", str),
            old_primary=json_get(d, "old_primary", str),
            requested=json_get(d, "requested", str, type(None)),
            candidate=json_get(d, "candidate", str, type(None)),
            new_primary=json_get(d, "new_primary", str, type(None)),
            term_before=json_get(d, "term_before", int),
            term_after=json_get(d, "term_after", int, type(None)),
            step=json_enum(d, "step", Step),
            phases=phases,
            positions=dict(positions),
            outcome=None if outcome is None else json_enum(d, "outcome", Outcome),
            reason=json_get(d, "reason", str),
            held=json_get(d, "held", int),
            flushed=json_get(d, "flushed", int),
            evicted=json_get(d, "evicted", int),
            # Absent from records written before read routing: none.
            reads_during_hold=json_get(d, "reads_during_hold", int)
            if "reads_during_hold" in d
            else 0,
            started_at=json_float(d, "started_at"),
            finished_at=None if finished_at is None else float(finished_at),
            not_drained=not_drained,
            buffers=buffers,
            # Absent from records written before the field existed.
            allow_unreachable=tuple(json_str_list(d, "allow_unreachable"))
            if "allow_unreachable" in d
            else (),
        )


def buffer_counts(value: Any) -> dict[str, int]:
    """One proxy's buffer counts for a reparent: {"held", "flushed", "evicted"}, and
    "reads" (served on replicas during the hold; absent from counts written before it)."""
    d = json_mapping(value)
    keys = ("held", "flushed", "evicted", *(("reads",) if "reads" in d else ()))
    return {key: json_get(d, key, int) for key in keys}


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

_EVENT_CLASSES: dict[EventKind, type[TopologyEvent]] = {
    EventKind.REPARENT_STARTED: ReparentStarted,
    EventKind.REVOKED: Revoked,
    EventKind.ESTABLISHED: Established,
    EventKind.ABORTED: Aborted,
}


def event_to_dict(event: TopologyEvent) -> dict[str, Any]:
    return {"kind": str(event.kind), **asdict(event)}


def event_from_dict(d: Mapping[str, Any]) -> TopologyEvent:
    """An event as a store wrote it; ValueError naming the field if it is damaged."""
    cls = _EVENT_CLASSES[json_enum(d, "kind", EventKind)]
    values = {}
    for f in fields(cls):
        values[f.name] = json_get(d, f.name, int if f.type in ("int", int) else str)
    return cls(**values)


# The steps during which proxies hold for a reparent: `reparent_started` was published when the
# journal reached HOLDING, and nothing has ended it until the record is finished.
HOLDING_STEPS = frozenset(
    {
        Step.HOLDING,
        Step.REVOKING,
        Step.REVOKED,
        Step.ESTABLISHING,
        Step.ESTABLISHED,
        Step.PUBLISHED,
        Step.UNDOING,
    }
)


@dataclass(frozen=True)
class Seen:
    """What a subscriber has been told of one shard: the newest term, and the term it holds
    for (the `reparent_started` it got and nothing has ended yet)."""

    term: int
    holding: int | None = None

    def after(self, event: TopologyEvent) -> Seen:
        if isinstance(event, ReparentStarted):
            return replace(self, holding=event.term)
        if isinstance(event, Established):
            return Seen(max(self.term, event.term), None)
        if isinstance(event, Aborted):
            return replace(self, holding=None)
        return self


def catch_up(
    seen: Seen | None, topo: ShardTopology, journal: ReparentRecord | None
) -> list[TopologyEvent]:
    """The events that bring a subscriber from what it was told (`seen`; None for one that
    was told nothing yet) to the shard as the store has it now, after a gap in its stream (a
    store that was unreachable, a compacted history, a proxy starting mid-switch).

    A newer term is `established` (proxies route to it and flush); a hold that ended in the
    gap is `aborted` (flush back to the primary they know); a reparent holding now is
    `reparent_started`, so the subscriber holds and reports drained like everyone else. Never
    an older term: a stale store read cannot send proxies back to a demoted primary.
    """
    events: list[TopologyEvent] = []
    holding = (
        journal.term_before + 1
        if journal is not None and journal.outcome is None and journal.step in HOLDING_STEPS
        else None
    )
    if seen is not None:
        if topo.term > seen.term:
            events.append(Established(topo.name, topo.primary, topo.term))
            seen = Seen(topo.term)
        elif seen.holding is not None and seen.holding != holding:
            events.append(Aborted(topo.name, "the reparent ended while the store was out of reach"))
            seen = replace(seen, holding=None)
    if holding is not None and (seen is None or seen.holding != holding):
        if seen is None or holding > seen.term:
            events.append(ReparentStarted(topo.name, holding))
    return events


# -- reading JSON that may be damaged ---------------------------------------------------------
# Each helper names the field it rejects, so a damaged store file says where it is damaged.


def json_mapping(value: Any) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise ValueError(f"expected an object, got {type(value).__name__}")
    return value


def json_get(d: Mapping[str, Any], key: str, *kinds: type) -> Any:
    if key not in d:
        raise ValueError(f"{key}: missing")
    value = d[key]
    # bool is an int in Python; a term of `true` is still damage.
    if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
        names = " or ".join("null" if k is type(None) else k.__name__ for k in kinds)
        raise ValueError(f"{key}: expected {names}, got {value!r}")
    return value


def json_float(d: Mapping[str, Any], key: str) -> float:
    return float(json_get(d, key, int, float))


def json_str_list(d: Mapping[str, Any], key: str) -> list[str]:
    items = json_get(d, key, list)
    if not all(isinstance(item, str) for item in items):
        raise ValueError(f"{key}: expected a list of strings, got {items!r}")
    return items


def json_enum(d: Mapping[str, Any], key: str, kind: type[E]) -> E:
    value = json_get(d, key, str)
    try:
        return kind(value)
    except ValueError:
        raise ValueError(f"{key}: unknown value {value!r}")
