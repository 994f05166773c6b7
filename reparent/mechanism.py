"""The contract between the orchestrator and the revocation and establishment mechanisms.

A reparent moves leadership in two steps. Each step is a swappable mechanism with one job and
a check that proves its job is done. The orchestrator never asks how a mechanism works, only
for the facts the next step needs. Mechanisms are synchronous, because they talk to MariaDB over
PyMySQL; the orchestrator's shell runs them in a worker thread, away from the proxy's event
loop. A mechanism raises `MechanismError` to fail its step. The orchestrator decides what
happens next (undo, or roll forward); a mechanism never does.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from reparent.config import Account, Durability, ServerConfig


class FailureKind(enum.StrEnum):
    """Why a step failed; a metrics label and the first word of the report's reason."""

    UNREACHABLE = "unreachable"  # a server did not answer in time
    LAGGING = "lagging"  # the candidate is too far behind
    ERRANT = "errant"  # the candidate has transactions the primary never had
    TIMEOUT = "timeout"  # a wait (catch-up, drain) ran past its limit
    REFUSED = "refused"  # the server returned an error
    INVALID = "invalid"  # the request cannot be met (unknown server, no candidate)


class MechanismError(Exception):
    def __init__(self, kind: FailureKind, message: str) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind


@dataclass(frozen=True)
class ReparentContext:
    """Everything a mechanism may use. It is built by the orchestrator for one reparent."""

    shard: str
    servers: tuple[ServerConfig, ...]
    old_primary: ServerConfig
    candidate: ServerConfig | None  # None: the establishment picks one
    admin: Account
    replication: Account
    timeout: float  # seconds for any one wait (catch-up, drain)
    # Blocks until every registered proxy reports that no transaction or statement is in flight
    # on the old primary, or until the grace period ends; True when all reported drained.
    wait_drained: Callable[[float], bool] = field(default=lambda grace: True)
    grace: float = 5.0
    durability: Durability = Durability.ASYNC
    # Servers that did not answer this reparent's revocation (a hung or dead old primary):
    # later steps do not wait for them again, they count as unreachable at once.
    silent: frozenset[str] = frozenset()
    # Replicas an emergency under semi_sync may leave uncompared: the operator accepted that
    # an acknowledged write only they received would be lost (`ctl ers --allow-unreachable`).
    allow_unreachable: frozenset[str] = frozenset()
    # Whether an emergency waits a moment for its old primary's fence (revoke.py); not when
    # the failure detector decided it, after three rounds the old primary did not answer.
    wait_old_primary: bool = True


@dataclass(frozen=True)
class RevocationProof:
    """Proof that the old primary can no longer complete a write. (The topology event
    `reparent.topology.Revoked` is what the proxies hear of it.)"""

    old_primary: str
    gtid_position: str  # the old primary's final @@gtid_binlog_pos ("" when unreachable)
    # Each fenced replica's final position: what it had received (Gtid_IO_Pos) joined with
    # what it had applied, since its relay log may still be applying (emergency only).
    replica_positions: dict[str, str] = field(default_factory=dict)
    killed_connections: int = 0
    drained: bool = True  # False when the grace period ended with work still in flight
    silent: tuple[str, ...] = ()  # servers that did not answer the revocation (emergency only)


@dataclass(frozen=True)
class Candidate:
    name: str
    gtid_position: str


@dataclass(frozen=True)
class EstablishmentProof:
    """Proof that the new primary takes writes, and which servers now replicate from it. (The
    topology event `reparent.topology.Established` is what the proxies hear of it.)"""

    new_primary: str
    gtid_position: str  # the new primary's @@gtid_binlog_pos once writable
    repointed: tuple[str, ...]  # servers now replicating from the new primary
    unreachable: tuple[str, ...] = ()  # servers that could not be repointed (e.g. a dead old one)


class Revocation(Protocol):
    """Makes the old primary lose every condition that lets it complete a write."""

    name: str

    def revoke(self, ctx: ReparentContext) -> RevocationProof:
        """Act and verify; raise MechanismError if revocation does not hold."""
        ...

    def undo(self, ctx: ReparentContext, revoked: RevocationProof | None) -> None:
        """Give the old primary back what `revoke` took (a failed planned reparent)."""
        ...


class Establishment(Protocol):
    """Makes the new primary gain those conditions and points everyone else at it."""

    name: str

    def choose(self, ctx: ReparentContext) -> Candidate:
        """Pick or validate the candidate before anything is revoked: reachable, not lagging
        beyond the threshold, no errant transactions. Raise MechanismError to refuse."""
        ...

    def prepare(self, ctx: ReparentContext, candidate: Candidate) -> None:
        """Catch the candidate up while the old primary still serves, so that only the last
        few transactions remain after revocation."""
        ...

    def establish(
        self, ctx: ReparentContext, candidate: Candidate, revoked: RevocationProof
    ) -> EstablishmentProof:
        """Catch up to `revoked.gtid_position` (or the most advanced fenced replica), stop
        replicating, become writable, repoint every other server including the old primary."""
        ...
