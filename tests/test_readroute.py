"""The pure decisions of read routing: the replica chooser (health, lag, least outstanding),
whether a session may use a replica, causal reads' step, and state changes that replica
connections must follow."""

from __future__ import annotations

from proxy.packets import Status, Track
from proxy.readroute import (
    SET_ASIDE,
    ReadPool,
    ReplicaHealth,
    Step,
    causal_step,
    covers,
    session_allows_replica,
    state_changed,
    valid_position,
)
from proxy.session import SessionState
from reparent.config import CausalReads


def healthy(name: str, lag: float = 0.0, position: str = "") -> ReplicaHealth:
    return ReplicaHealth(name, True, True, lag, position)


def pool(*seen: ReplicaHealth, max_lag: float = 5.0) -> ReadPool:
    p = ReadPool(max_lag)
    for s in seen:
        p.update(s, 0.0)
    return p


def test_least_outstanding_then_turns() -> None:
    p = pool(healthy("a"), healthy("b"), healthy("c"))
    p.begin("a")
    p.begin("b")
    assert p.choose("primary", 0.0) == "c"
    p.begin("c")
    # All equal: they take turns.
    assert {p.choose("primary", 0.0) for _ in range(6)} == {"a", "b", "c"}
    p.end("a")
    assert p.choose("primary", 0.0) == "a"
    p.end("a")
    p.end("a")  # never below zero
    assert p.outstanding["a"] == 0


def test_unqualified_replicas_get_no_reads() -> None:
    p = pool(
        ReplicaHealth("down", False),
        ReplicaHealth("stopped", True, False, None),
        healthy("lagging", lag=6.0),
        ReplicaHealth("unknown_lag", True, True, None),
        ReplicaHealth("quarantined", True, True, 0.0, quarantined=True),
        healthy("primary"),
    )
    assert p.choose("primary", 0.0) is None
    p.update(healthy("ok", lag=5.0), 0.0)
    assert p.choose("primary", 0.0) == "ok"
    assert p.choose("primary", 0.0, frozenset({"ok"})) is None


def test_failed_replica_is_set_aside_until_seen_healthy_later() -> None:
    p = pool(healthy("a"), healthy("b"))
    p.failed("a", 10.0)
    assert {p.choose("x", 10.0) for _ in range(4)} == {"b"}
    p.update(healthy("a"), 10.0 + SET_ASIDE / 2)  # too soon
    assert {p.choose("x", 11.0) for _ in range(4)} == {"b"}
    p.update(ReplicaHealth("a", False), 10.0 + SET_ASIDE)  # later, but not healthy
    assert {p.choose("x", 12.0) for _ in range(4)} == {"b"}
    p.update(healthy("a"), 10.0 + SET_ASIDE + 1)
    assert {p.choose("x", 13.0) for _ in range(4)} == {"a", "b"}


def test_covers_and_positions() -> None:
    assert covers("0-1-10", "0-1-10")
    assert covers("0-2-11", "0-1-10")  # a later switch: the same domain goes on
    assert not covers("0-1-9", "0-1-10")
    assert not covers("", "0-1-1")
    assert not covers("0-1-1", "")
    assert not covers("garbage", "0-1-1")
    assert covers("0-1-10,1-1-5", "1-1-5")
    assert not covers("0-1-10", "1-1-5")
    p = pool(healthy("a", position="0-1-10"))
    assert p.covers("a", "0-1-10") and not p.covers("a", "0-1-11") and not p.covers("b", "0-1-1")
    assert valid_position("0-1-22") and valid_position("0-1-22,1-2-3")
    for bad in ("", "0-1", "0-1-2'", "0-1-2) OR 1", "0-1-2,", "a-b-c", "0-1-2; DROP"):
        assert not valid_position(bad)


def test_causal_step() -> None:
    local, none, glob = CausalReads.LOCAL, CausalReads.NONE, CausalReads.GLOBAL
    assert causal_step(none, "0-1-5", "", False) is Step.GO
    assert causal_step(local, "", "", False) is Step.GO  # no write yet
    assert causal_step(local, "0-1-5", "", False) is Step.WAIT
    assert causal_step(local, "0-1-5", "0-1-5", False) is Step.GO  # waited here already
    assert causal_step(local, "0-1-6", "0-1-5", False) is Step.WAIT  # a newer write
    assert causal_step(local, "0-1-5", "", True) is Step.GO  # the monitor saw it applied
    assert causal_step(glob, "", "", False) is Step.READ_PRIMARY_POSITION


def test_session_allows_replica() -> None:
    s = SessionState(1, "app", "x")
    assert session_allows_replica(s)
    s.status = int(Status.AUTOCOMMIT) | int(Status.IN_TRANS)
    assert not session_allows_replica(s)  # in a transaction
    s.status = 0
    assert not session_allows_replica(s)  # autocommit off: a SELECT opens one
    s.status = int(Status.AUTOCOMMIT)
    for change, undo in (
        (lambda: s.temporary_tables.add("db.t"), s.temporary_tables.clear),
        (lambda: s.user_locks.add("l"), s.user_locks.clear),
        (lambda: setattr(s, "xa", True), lambda: setattr(s, "xa", False)),
        (lambda: setattr(s, "variables_untracked", True), lambda: None),
        # an ed25519 login: Baton cannot log it in to a replica
        (lambda: setattr(s, "single_login", True), lambda: setattr(s, "single_login", False)),
    ):
        change()
        assert not session_allows_replica(s)
        undo()
    s.variables_untracked = False
    s.transaction_state = "_______L"  # LOCK TABLES
    assert not session_allows_replica(s)
    s.transaction_state = "________"
    assert session_allows_replica(s)


def entry(name: bytes, value: bytes) -> bytes:
    return bytes((len(name),)) + name + bytes((len(value),)) + value


def test_state_changed() -> None:
    gtid = (int(Track.SYSTEM_VARIABLES), entry(b"last_gtid", b"0-1-22"))
    trx = (int(Track.TRANSACTION_STATE), b"\x08T_______")
    assert not state_changed([gtid])
    assert not state_changed([gtid, trx])
    assert state_changed([(int(Track.SYSTEM_VARIABLES), entry(b"sql_mode", b""))])
    assert state_changed([(int(Track.SCHEMA), b"\x02db")])
    assert state_changed([gtid, (int(Track.STATE_CHANGE), b"\x011")])
