"""The pool's pure core (proxy/pool.py): bounds, the wait queue, idle timeout, retirement."""

from __future__ import annotations

import pytest

from proxy.pool import CloseConn, Grant, Open, Pool, Refuse, RefuseReason, Wait
from reparent.config import ConfigError, PoolConfig, parse


def pool(**kw: float) -> Pool[str]:
    return Pool(PoolConfig(**kw))  # type: ignore[arg-type]


def test_opens_up_to_max_then_queues_then_refuses() -> None:
    p = pool(max=2, queue=1)
    assert p.borrow(1, 0.0) == Open(1)
    assert p.borrow(2, 0.0) == Open(2)
    assert p.borrow(3, 0.0) == Wait(3)
    assert p.borrow(4, 0.0) == Refuse(4, RefuseReason.QUEUE_FULL)
    assert p.size == 2
    assert p.opened(1, "a", 0.0) == [Grant(1, "a")]
    # Given back: the waiter gets it, nothing goes idle, the pool never grows past max.
    assert p.give_back("a", 1.0, reusable=True) == [Grant(3, "a")]
    assert p.size == 2 and not p.idle and p.waited == 1 and p.refused == 1


def test_idle_connections_are_reused_newest_first() -> None:
    p = pool(max=3)
    for w, c in ((1, "a"), (2, "b")):
        p.borrow(w, 0.0)
        p.opened(w, c, 0.0)
    p.give_back("a", 1.0, True)
    p.give_back("b", 2.0, True)
    assert p.borrow(5, 3.0) == Grant(5, "b")
    assert p.size == 2


def test_a_waiter_times_out_with_its_own_reason() -> None:
    p = pool(max=1, wait_timeout=2.0)
    p.borrow(1, 0.0)
    assert p.borrow(2, 0.5) == Wait(2)
    assert p.tick(2.4) == []
    assert p.tick(2.5) == [Refuse(2, RefuseReason.WAIT_TIMEOUT)]
    assert not p.waiters


def test_idle_timeout_closes_down_to_min() -> None:
    p = pool(max=4, min=1, idle_timeout=10.0)
    for w, c in ((1, "a"), (2, "b"), (3, "c")):
        p.borrow(w, 0.0)
        p.opened(w, c, 0.0)
    for c in "abc":
        p.give_back(c, 1.0, True)
    assert p.tick(10.9) == []
    closed = p.tick(11.0)
    assert closed == [CloseConn("a"), CloseConn("b")]
    assert p.size == 1  # min stays


def test_min_opens_warm_connections_that_go_idle() -> None:
    p = pool(max=4, min=2)
    assert p.tick(0.0) == [Open(None), Open(None)]
    assert p.tick(0.1) == []  # being opened counts
    assert p.opened(None, "a", 0.2) == []
    assert p.borrow(9, 0.3) == Grant(9, "a")


def test_a_broken_connection_makes_room_for_a_waiter() -> None:
    p = pool(max=1)
    p.borrow(1, 0.0)
    p.opened(1, "a", 0.0)
    assert p.borrow(2, 0.0) == Wait(2)
    assert p.give_back("a", 0.1, reusable=False) == [Open(2)]
    assert p.size == 1


def test_failed_open_lets_a_waiter_try() -> None:
    p = pool(max=1)
    assert p.borrow(1, 0.0) == Open(1)
    assert p.borrow(2, 0.0) == Wait(2)
    assert p.open_failed(1, 0.1) == [Open(2)]
    assert p.open_failed(2, 0.2) == []
    assert p.size == 0


def test_retired_pool_closes_idle_refuses_waiters_and_returns() -> None:
    p = pool(max=2)
    p.borrow(1, 0.0)
    p.opened(1, "a", 0.0)
    p.borrow(2, 0.0)
    p.opened(2, "b", 0.0)
    p.give_back("b", 0.0, True)
    p.borrow(3, 0.0)  # takes b
    assert p.borrow(4, 0.0) == Wait(4)
    assert p.retire() == [Refuse(4, RefuseReason.RETIRED)]
    assert p.give_back("a", 1.0, True) == [CloseConn("a")]
    assert p.borrow(5, 1.0) == Refuse(5, RefuseReason.RETIRED)
    assert p.tick(100.0) == []  # no warm connections for a retired pool


def test_a_cancelled_waiter_is_not_granted() -> None:
    p = pool(max=1)
    p.borrow(1, 0.0)
    p.opened(1, "a", 0.0)
    p.borrow(2, 0.0)
    p.cancel(2)
    assert p.give_back("a", 0.0, True) == []
    assert list(p.idle) == [("a", 0.0)]


@pytest.mark.parametrize(
    "kw, word",
    [
        ({"max": 0}, "max"),
        ({"min": 3, "max": 2}, "min"),
        ({"queue": -1}, "queue"),
        ({"idle_timeout": 0}, "idle_timeout"),
        ({"wait_timeout": float("inf")}, "wait_timeout"),
    ],
)
def test_limits_are_checked(kw: dict[str, float], word: str) -> None:
    with pytest.raises(ValueError, match=word):
        PoolConfig(**kw)  # type: ignore[arg-type]


def _config(extra: dict[str, object]) -> dict[str, object]:
    return {
        "admin": {"user": "a", "password": "p"},
        "shards": [
            {
                "name": "main",
                "servers": [{"name": "db1", "host": "127.0.0.1", "port": 3307, "role": "primary"}],
            }
        ],
        **extra,
    }


def test_the_pool_table_is_read_and_checked() -> None:
    cfg = parse(_config({"pool": {"multiplex": True, "max": 8, "wait_timeout": 1}}))
    assert cfg.pool == PoolConfig(multiplex=True, max=8, wait_timeout=1)
    assert not parse(_config({})).pool.multiplex  # off by default
    with pytest.raises(ConfigError, match="pool.max"):
        parse(_config({"pool": {"max": 0}}))
    with pytest.raises(ConfigError, match="pool.mx"):
        parse(_config({"pool": {"mx": 1}}))
    with pytest.raises(ConfigError, match="proxy_protocol"):
        parse(_config({"pool": {"multiplex": True}, "backend": {"proxy_protocol": True}}))
