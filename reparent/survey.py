"""What the servers say against what the config and the store say: the controller's picture.

Every automatic action of the controller assumes a picture: the config names the shard's
servers and where they are, the store names the primary and the term. When the servers tell
another story, acting on the picture does harm: with the primary's port mistyped in the config,
Baton could not reach "db1", the replicas still streamed from the real db1 at an address
outside the config, and the detector (which read that as "nobody hears from the primary")
promoted a replica: two writable servers. So the failure detector (and a manual reparent, unless
forced) first compares, and a shard whose servers disagree with the picture gets no automatic
action until they agree again (`compare`). When the servers agree among themselves on a primary
other than the store's, an operator may take their word for it (`adoptable`, `baton ctl adopt`).

Pure: it reads `ShardView`s the shell built from one round of probes (reparent/probe.py).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from reparent import gtid

# Replication threads that are running or trying to: a server with one of these listens to its
# source, or will as soon as it is reachable.
LISTENING = ("Yes", "Connecting")


@dataclass(frozen=True)
class ServerView:
    """One server in one probe round, as Baton's admin account saw it."""

    name: str
    reachable: bool
    read_only: bool = False
    server_id: int = 0
    binlog_pos: str = ""
    binlog_state: str = ""  # @@gtid_binlog_state: what errant transactions are judged by
    # The server it replicates from, by name ("host:port" if not one of the shard's); None
    # when it replicates from nobody (no SHOW SLAVE STATUS row).
    source: str | None = None
    io_running: str = ""  # Slave_IO_Running: Yes, No or Connecting
    sql_running: str = ""  # Slave_SQL_Running: Yes or No
    io_errno: int = 0  # Last_IO_Errno
    sql_errno: int = 0  # Last_SQL_Errno
    # Anything that changes whenever its IO thread hears from the source (heartbeats received,
    # read position), and how often the source sends a heartbeat when idle (0: never).
    received: str = ""
    heartbeat_period: float = 0.0
    received_pos: str = ""  # Gtid_IO_Pos: what its IO thread received
    error: str = ""  # why it was not reachable

    def streams_from(self, source: str) -> bool:
        """Its IO thread is connected to `source` (it may be silent; see the detector)."""
        return self.reachable and self.source == source and self.io_running == "Yes"


@dataclass(frozen=True)
class ShardView:
    """One probe round of a shard: the store's view, and every server's."""

    shard: str
    primary: str
    term: int
    servers: tuple[ServerView, ...]  # every server of the config, the primary's too
    quarantined: frozenset[str] = frozenset()
    reparent_in_flight: bool = False
    # Sources that servers of the shard replicate from but the config does not name, by
    # "host:port", probed with the admin account (unreachable if it does not answer to it).
    outsiders: tuple[ServerView, ...] = ()

    def server(self, name: str) -> ServerView:
        return next(s for s in self.servers if s.name == name)

    @property
    def names(self) -> frozenset[str]:
        return frozenset(s.name for s in self.servers)


class MismatchKind(enum.StrEnum):
    """How the servers contradict the config and the store; a metrics label."""

    # A server replicates from an address that is no server of the shard: the config does not
    # describe the group (a mistyped address, a server left out, a replica repointed by hand).
    FOREIGN_SOURCE = "foreign_source"
    # A server other than the store's primary takes writes while it has replicas of its own,
    # or while the store's primary does not answer: promoting anyone could make one more.
    SECOND_PRIMARY = "second_primary"
    # The store's primary replicates from another server itself.
    PRIMARY_REPLICATES = "primary_replicates"
    # Every replica of the store's primary holds transactions the primary never had: the
    # replicas descend from another primary, or this one was rolled back.
    PRIMARY_BEHIND = "primary_behind"


@dataclass(frozen=True)
class Mismatch:
    kind: MismatchKind
    server: str
    detail: str

    def __str__(self) -> str:
        return f"{self.kind} {self.server}: {self.detail}"

    def to_dict(self) -> dict[str, str]:
        return {"kind": str(self.kind), "server": self.server, "detail": self.detail}


def compare(view: ShardView) -> tuple[Mismatch, ...]:
    """Every way the servers contradict the shard's config and store, in a stable order."""
    found: list[Mismatch] = []
    primary = view.server(view.primary)
    outsiders = {o.name: o for o in view.outsiders}
    for s in view.servers:
        if not s.reachable or s.source is None or s.source in view.names:
            continue
        if s.name in view.quarantined:
            continue  # fenced and never chosen; an operator may be rebuilding it from anywhere
        found.append(
            Mismatch(
                MismatchKind.FOREIGN_SOURCE,
                s.name,
                f"replicates from {s.source} (IO {s.io_running or '-'}), which is no server of"
                f" shard {view.shard}{_outsider(outsiders.get(s.source))}",
            )
        )
    for s in view.servers:
        if s.name == view.primary or not s.reachable or s.read_only:
            continue
        followers = [r.name for r in view.servers if r.streams_from(s.name)]
        if followers:
            why = f"{', '.join(followers)} replicate from it"
        elif not primary.reachable:
            why = f"the store's primary {view.primary} does not answer"
        else:
            continue  # a stray the detector sets read_only or rejoins
        detail = f"writable and {why}; the store names {view.primary} (term {view.term})"
        found.append(Mismatch(MismatchKind.SECOND_PRIMARY, s.name, detail))
    if primary.reachable and primary.source is not None and primary.io_running in LISTENING:
        found.append(
            Mismatch(
                MismatchKind.PRIMARY_REPLICATES,
                primary.name,
                f"the store's primary replicates from {primary.source} (IO {primary.io_running})",
            )
        )
    behind = _primary_behind(view, primary)
    if behind is not None:
        found.append(behind)
    return tuple(found)


def _primary_behind(view: ShardView, primary: ServerView) -> Mismatch | None:
    if not primary.reachable:
        return None
    replicas = [
        s
        for s in view.servers
        if s.reachable
        and s.name != primary.name
        and s.name not in view.quarantined
        and s.source == primary.name
    ]
    extra: dict[str, str] = {}
    for s in replicas:
        try:
            found = errant(s, primary)
        except gtid.GtidError:
            return None  # unreadable: no evidence either way (the detector reports it)
        if not found:
            return None  # one replica agrees with the primary: the others are the odd ones
        extra[s.name] = found
    if not extra:
        return None
    return Mismatch(
        MismatchKind.PRIMARY_BEHIND,
        primary.name,
        "every replica has transactions the store's primary never had: "
        + "; ".join(f"{n} {g}" for n, g in extra.items()),
    )


def errant(s: ServerView, primary: ServerView) -> str:
    """The GTIDs `s` has and the primary lacks ("" if none). GTIDs of the primary's own
    server_id are not counted: the two are probed at nearly but not exactly the same moment,
    so a replica may show a transaction the primary committed after its own probe. Raises
    gtid.GtidError for a state that does not parse."""
    extra = gtid.errant(s.binlog_state, primary.binlog_state)
    return gtid.format(g for g in extra if g.server_id != primary.server_id)


def _outsider(o: ServerView | None) -> str:
    if o is None:
        return ""
    if not o.reachable:
        return f" (it does not answer Baton's admin account: {o.error or 'no answer'})"
    state = "read_only" if o.read_only else "writable"
    return f" (it answers: {state}, server_id {o.server_id}, gtid {o.binlog_pos or '-'})"


class AdoptRefused(Exception):
    """The servers do not name one primary without doubt; the message says why."""


def adoptable(view: ShardView) -> str:
    """The primary the servers agree on, when exactly one reading fits: one reachable,
    writable server of the config that replicates from nobody, every other reachable
    server (quarantined ones aside) replicating from it, at least one of them streaming, and
    no source outside the config. Raises AdoptRefused naming what is in doubt."""
    foreign = [m for m in compare(view) if m.kind is MismatchKind.FOREIGN_SOURCE]
    if foreign:
        raise AdoptRefused(
            "; ".join(str(m) for m in foreign)
            + ": Baton can only adopt a server of its config; fix the config or the replica"
        )
    live = [s for s in view.servers if s.reachable and s.name not in view.quarantined]
    heads = [s for s in live if not s.read_only and not _listening(s)]
    if len(heads) != 1:
        names = ", ".join(s.name for s in heads) or "none"
        raise AdoptRefused(
            f"expected exactly one writable server that replicates from nobody, found {names}"
        )
    head = heads[0]
    strays = [s.name for s in live if s is not head and s.source != head.name]
    if strays:
        raise AdoptRefused(f"{', '.join(strays)} do not replicate from {head.name}")
    if len(view.servers) > 1 and not any(s.streams_from(head.name) for s in live):
        raise AdoptRefused(f"no server streams from {head.name}")
    if head.name == view.primary:
        raise AdoptRefused(f"{head.name} is the store's primary already")
    writable = [s.name for s in view.servers if s.reachable and not s.read_only and s is not head]
    if writable:
        raise AdoptRefused(f"{', '.join(writable)} take writes too")
    return head.name


def _listening(s: ServerView) -> bool:
    return s.source is not None and s.io_running in LISTENING
