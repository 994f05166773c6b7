"""MariaDB GTID positions as values: parse, compare, and find what one server has that another
has not.

MariaDB writes a position as a comma list of `domain-server_id-seq` (`0-1-42,1-3-7`), one GTID
per replication domain (`@@gtid_binlog_pos`, `@@gtid_slave_pos`, `@@gtid_current_pos`, and the
`Gtid_IO_Pos` of SHOW SLAVE STATUS), or one per (domain, server_id) pair in
`@@gtid_binlog_state`. The server has no GTID_SUBSET: "has b everything a has" is computed here.

Everything rests on `gtid_strict_mode=1` (the sandbox sets it; Baton needs it): within a domain
sequence numbers only grow, so one history is one line of seq numbers, and two histories with
the same seq but a different server_id have forked. Positions alone cannot see a fork further
back than their last GTID; `errant` therefore compares binlog states, which keep the last seq of
every server that ever wrote in the domain.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass


class GtidError(ValueError):
    """Text that is not a GTID list; the message quotes it."""


@dataclass(frozen=True, order=True)
class Gtid:
    domain: int
    server_id: int
    seq: int

    @classmethod
    def parse(cls, text: str) -> Gtid:
        parts = text.strip().split("-")
        if len(parts) != 3 or not all(p.isdigit() for p in parts):
            raise GtidError(f"not a GTID (domain-server_id-seq): {text!r}")
        domain, server_id, seq = (int(p) for p in parts)
        return cls(domain, server_id, seq)

    def __str__(self) -> str:
        return f"{self.domain}-{self.server_id}-{self.seq}"


class Order(enum.StrEnum):
    """Where one position stands against another in one domain."""

    EQUAL = "equal"
    AHEAD = "ahead"  # it has every transaction the other has, and more
    BEHIND = "behind"  # the other has transactions it lacks, and nothing it lacks
    DIVERGED = "diverged"  # same seq, another server: the histories forked


def parse(text: str) -> tuple[Gtid, ...]:
    """Any GTID list, as the server prints it ("" is the empty list)."""
    return tuple(Gtid.parse(item) for item in text.split(",") if item.strip())


def format(gtids: Iterable[Gtid]) -> str:
    """The server's own form, sorted, so equal positions print equally."""
    return ",".join(str(g) for g in sorted(gtids))


def _by_domain(position: str) -> dict[int, Gtid]:
    gtids = parse(position)
    by_domain = {g.domain: g for g in gtids}
    if len(by_domain) != len(gtids):
        raise GtidError(f"a position holds one GTID per domain: {position!r}")
    return by_domain


def compare(a: str, b: str) -> dict[int, Order]:
    """How `a` stands against `b` in every domain either one has."""
    mine, theirs = _by_domain(a), _by_domain(b)
    result: dict[int, Order] = {}
    for domain in mine.keys() | theirs.keys():
        x, y = mine.get(domain), theirs.get(domain)
        if x is None:
            result[domain] = Order.BEHIND
        elif y is None:
            result[domain] = Order.AHEAD
        elif x.seq == y.seq:
            result[domain] = Order.EQUAL if x.server_id == y.server_id else Order.DIVERGED
        else:
            result[domain] = Order.AHEAD if x.seq > y.seq else Order.BEHIND
    return result


def contains(outer: str, inner: str) -> bool:
    """True when a server at `outer` has applied every transaction of `inner`, as far as the
    last GTID of each domain can tell (a fork further back needs `errant`)."""
    return all(o in (Order.EQUAL, Order.AHEAD) for o in compare(outer, inner).values())


def behind(position: str, target: str) -> int:
    """How many transactions a server at `position` still has to apply to reach `target`: the
    seq gap summed over domains. A count, not a time: transactions differ in size."""
    mine = _by_domain(position)
    return sum(
        max(0, g.seq - mine[domain].seq if domain in mine else g.seq)
        for domain, g in _by_domain(target).items()
    )


def newest(positions: Iterable[str]) -> str:
    """Per domain, the GTID with the highest seq among `positions` (the first one on a tie): the
    position of a server that received all of them, if they did not fork."""
    best: dict[int, Gtid] = {}
    for position in positions:
        for domain, g in _by_domain(position).items():
            if domain not in best or g.seq > best[domain].seq:
                best[domain] = g
    return format(best.values())


def ahead_of(position: str, others: Mapping[str, str]) -> dict[str, str]:
    """The entries of `others` holding a transaction that a server at `position` lacks. The
    most advanced of a group is one for which this is empty; a group whose histories forked,
    or whose members each lead in another domain, has none."""
    return {name: p for name, p in others.items() if not contains(position, p)}


def errant(candidate_state: str, primary_state: str) -> tuple[Gtid, ...]:
    """The GTIDs of `candidate_state` that `primary_state` does not cover; both are
    `@@gtid_binlog_state` lists (one GTID per domain and server_id).

    Binlog states, not positions, because a position keeps only the last GTID per domain: a
    write on replica 3 becomes 0-3-20, and once the primary is at 0-1-25 that position looks
    merely behind (and without strict mode, replication overwrites it with the primary's
    GTIDs). The state still shows server 3 with a seq the primary never had from it.
    Limitation: a primary whose binlog state was reset (RESET MASTER) has forgotten older
    servers, and their GTIDs then look errant here.
    """
    covered = {(g.domain, g.server_id): g.seq for g in parse(primary_state)}
    return tuple(
        g
        for g in parse(candidate_state)
        if (g.domain, g.server_id) not in covered or g.seq > covered[(g.domain, g.server_id)]
    )
