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
from dataclasses import dataclass, field
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
            started_at=json_float(d, "started_at"),
            finished_at=None if finished_at is None else float(finished_at),
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
