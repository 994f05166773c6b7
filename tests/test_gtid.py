"""GTID arithmetic without a server: the cases a reparent decides by."""

from __future__ import annotations

import pytest

from reparent import gtid
from reparent.gtid import Gtid, GtidError, Order


def test_parse_and_format_round_trip_in_the_servers_form():
    assert gtid.parse("") == ()
    assert gtid.parse("0-1-42") == (Gtid(0, 1, 42),)
    assert gtid.parse(" 1-3-7 , 0-1-42") == (Gtid(1, 3, 7), Gtid(0, 1, 42))
    assert gtid.format(gtid.parse("1-3-7,0-1-42")) == "0-1-42,1-3-7"
    assert str(Gtid(0, 2, 18446744073709551615)) == "0-2-18446744073709551615"


@pytest.mark.parametrize("text", ["0-1", "0-1-x", "a-b-c", "0-1-2-3", "-1-2-3", "0--1-2"])
def test_parse_rejects_what_is_not_a_gtid(text):
    with pytest.raises(GtidError, match="not a GTID"):
        gtid.parse(text)


def test_a_position_has_one_gtid_per_domain():
    with pytest.raises(GtidError, match="one GTID per domain"):
        gtid.compare("0-1-5,0-2-6", "0-1-5")


def test_compare_per_domain():
    assert gtid.compare("0-1-5", "0-1-5") == {0: Order.EQUAL}
    assert gtid.compare("0-1-6", "0-2-5") == {0: Order.AHEAD}
    assert gtid.compare("0-1-4", "0-1-5") == {0: Order.BEHIND}
    # Same seq from two servers: two different transactions, the histories forked.
    assert gtid.compare("0-2-5", "0-1-5") == {0: Order.DIVERGED}
    assert gtid.compare("0-1-5,1-1-3", "0-1-7,2-4-1") == {
        0: Order.BEHIND,
        1: Order.AHEAD,
        2: Order.BEHIND,
    }


def test_contains():
    assert gtid.contains("0-1-5", "")
    assert gtid.contains("0-2-9", "0-1-5")  # a later primary's GTID follows the earlier one's
    assert gtid.contains("0-1-5,1-1-1", "0-1-5")
    assert not gtid.contains("0-1-5", "0-1-5,1-1-1")
    assert not gtid.contains("0-1-5", "0-1-6")
    assert not gtid.contains("0-1-5", "0-2-5")
    assert not gtid.contains("", "0-1-1")


def test_behind_counts_transactions_to_go():
    assert gtid.behind("0-1-5", "0-1-5") == 0
    assert gtid.behind("0-1-9", "0-1-5") == 0
    assert gtid.behind("0-1-5", "0-2-12") == 7
    assert gtid.behind("0-1-5", "0-1-7,1-1-3") == 5
    assert gtid.behind("", "0-1-4") == 4


def test_newest():
    assert gtid.newest([]) == ""
    assert gtid.newest(["0-1-5,1-1-2", "0-1-7", "1-2-1"]) == "0-1-7,1-1-2"


def test_ahead_of_finds_who_has_more():
    group = {"a": "0-1-5", "b": "0-1-7", "c": "0-1-7"}
    assert gtid.ahead_of("0-1-7", group) == {}
    assert gtid.ahead_of("0-1-5", group) == {"b": "0-1-7", "c": "0-1-7"}
    # Each leads in one domain: neither is the most advanced.
    split = {"a": "0-1-5,1-1-1", "b": "0-1-4,1-1-2"}
    assert gtid.ahead_of(split["a"], split) == {"b": split["b"]}
    assert gtid.ahead_of(split["b"], split) == {"a": split["a"]}
    # Same seq from two servers: forked, neither contains the other.
    assert gtid.ahead_of("0-1-5", {"x": "0-2-5"}) == {"x": "0-2-5"}


def test_errant_compares_binlog_states():
    primary = "0-1-20,0-2-11"
    assert gtid.errant("0-1-18,0-2-11", primary) == ()  # behind is not errant
    assert gtid.errant("", primary) == ()
    # A write on replica 3 that replication then overtook: its position (0-1-20) says
    # nothing, its binlog state still shows 0-3-12.
    assert gtid.errant("0-1-20,0-2-11,0-3-12", primary) == (Gtid(0, 3, 12),)
    # A server the primary knows, but with a seq the primary never had from it.
    assert gtid.errant("0-1-20,0-2-14", primary) == (Gtid(0, 2, 14),)
    assert gtid.errant("5-1-1", primary) == (Gtid(5, 1, 1),)
