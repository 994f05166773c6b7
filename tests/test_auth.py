"""Logins checked against the servers' hashes, accounts matched as MariaDB matches them, and
who may connect: pure logic, no sockets."""

from __future__ import annotations

import hashlib
import json

import pytest

from proxy.accounts import book_from_config, book_from_rows
from proxy.admission import FD_RESERVE, Admission, LoginFailure, Refusal
from proxy.auth import (
    Account,
    AccountBook,
    Fence,
    host_matches,
    native_hash,
    nonce,
    parse_native_hash,
    recover_stage1,
    scramble,
    stage1,
)


def test_stage1_recovered_from_a_clients_answer() -> None:
    """What the client sends for our nonce, and the server's stored hash, give SHA1(pw); with
    it Baton answers any other nonce exactly as the client would."""
    ours, theirs = nonce(), nonce()
    h2 = native_hash("s3cret")
    answer = scramble(stage1("s3cret"), ours)
    h1 = recover_stage1(answer, ours, h2)
    assert h1 == hashlib.sha1(b"s3cret").digest()
    assert scramble(h1, theirs) == scramble(stage1("s3cret"), theirs)
    assert recover_stage1(scramble(stage1("wrong"), ours), ours, h2) is None
    assert recover_stage1(answer[:19], ours, h2) is None
    assert recover_stage1(b"", ours, h2) is None


def test_empty_password() -> None:
    assert recover_stage1(b"", nonce(), b"") == b""
    assert recover_stage1(b"x" * 20, nonce(), b"") is None
    assert scramble(b"", nonce()) == b""


def test_nonce_has_no_nul() -> None:
    for _ in range(200):
        n = nonce()
        assert len(n) == 20 and 0 not in n


def test_stored_hash_forms() -> None:
    assert parse_native_hash("*" + "AB" * 20) == bytes.fromhex("AB" * 20)
    assert parse_native_hash("") == b""
    for bad in ("invalid", "*XYZ", "*" + "A" * 39, "AB" * 20):
        assert parse_native_hash(bad) is None


@pytest.mark.parametrize(
    ("pattern", "address", "matches"),
    [
        ("%", "10.1.2.3", True),
        ("127.0.0.1", "127.0.0.1", True),
        ("127.0.0.1", "127.0.0.2", False),
        ("localhost", "127.0.0.1", False),  # the Unix socket's, never TCP's
        ("10.1.%", "10.1.2.3", True),
        ("10.1.%", "10.11.2.3", False),
        ("10.1._.3", "10.1.2.3", True),
        ("10.1.0.0/255.255.0.0", "10.1.200.3", True),
        ("10.1.0.0/255.255.0.0", "10.2.0.3", False),
        ("10.1.0.0/garbage", "10.1.0.3", False),
        ("%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%%x", "1" * 64, False),  # no blow-up
    ],
)
def test_host_patterns(pattern: str, address: str, matches: bool) -> None:
    assert host_matches(pattern, address) is matches


def test_most_specific_account_first() -> None:
    book = AccountBook(
        [
            Account("app", "%", "mysql_native_password", b"a"),
            Account("app", "127.0.0.1", "mysql_native_password", b"b"),
            Account("app", "127.%", "mysql_native_password", b"c"),
            Account("other", "%", "mysql_native_password", b"d"),
        ]
    )
    assert [a.host for a in book.candidates("app", "127.0.0.1")] == ["127.0.0.1", "127.%", "%"]
    assert [a.host for a in book.candidates("app", "10.0.0.1")] == ["%"]
    assert book.candidates("nobody", "127.0.0.1") == []


def priv(access: int = 0, **extra: object) -> str:
    return json.dumps(
        {
            "access": access,
            "plugin": "mysql_native_password",
            "authentication_string": "*" + "AB" * 20,
            **extra,
        }
    )


def test_accounts_from_the_server_rows_and_the_fence() -> None:
    """SUPER (1<<15) and READ ONLY ADMIN (1<<33), held directly or through a role (granted to
    a role granted to the account), make an account unfenced; locked accounts, roles and
    non-native accounts are not logins Baton can serve."""
    privs = [
        ("app", "%", priv(0b111)),
        ("boss", "%", priv(1 << 15)),
        ("ops", "%", priv()),
        ("r_outer", "", json.dumps({"access": 0, "is_role": True})),
        ("r_inner", "", json.dumps({"access": 1 << 33, "is_role": True})),
        ("locked", "%", priv(account_locked=True)),
        ("ed", "%", json.dumps({"access": 0, "plugin": "ed25519", "authentication_string": "x"})),
        ("broken", "%", "not json"),
    ]
    roles = [("ops", "%", "r_outer"), ("r_outer", "", "r_inner"), ("r_inner", "", "r_outer")]
    book = book_from_rows(privs, roles)
    by_user = {a.user: a for a in book}
    assert set(by_user) == {"app", "boss", "ops", "ed"}
    assert by_user["app"].unfenced == frozenset()
    assert by_user["boss"].unfenced == {Fence.SUPER}
    assert by_user["ops"].unfenced == {Fence.READ_ONLY_ADMIN}
    assert by_user["ed"].h2 is None and by_user["ed"].plugin == "ed25519"
    assert by_user["app"].h2 == bytes.fromhex("AB" * 20)
    assert sorted(a.user for a in book.unfenced()) == ["boss", "ops"]


def test_accounts_from_the_config() -> None:
    from reparent.config import Account as ConfigAccount

    book = book_from_config([ConfigAccount("app", "pw"), ConfigAccount("nopw", "")])
    (app,) = book.candidates("app", "10.0.0.9")
    assert app.h2 == native_hash("pw")
    (nopw,) = book.candidates("nopw", "10.0.0.9")
    assert nopw.h2 == b""


def test_connection_cap_and_fd_budget() -> None:
    adm = Admission(max_connections=3, fd_limit=FD_RESERVE + 2 * 100, max_connect_errors=0)
    assert [adm.admit("a") for _ in range(3)] == [None, None, None]
    assert adm.admit("a") is Refusal.MAX_CONNECTIONS
    adm.closed()
    assert adm.admit("a") is None
    tight = Admission(max_connections=1000, fd_limit=FD_RESERVE + 2 * 2, max_connect_errors=0)
    assert tight.capacity == 2
    assert [tight.admit("a") for _ in range(3)] == [None, None, Refusal.FD_BUDGET]
    assert tight.refused[Refusal.FD_BUDGET] == 1


def test_failed_logins_block_an_address_until_lifted() -> None:
    adm = Admission(max_connections=100, fd_limit=10_000, max_connect_errors=3)
    assert not adm.login_failed("1.2.3.4", LoginFailure.ACCESS_DENIED)
    assert not adm.login_failed("1.2.3.4", LoginFailure.SERVER_REFUSED)  # not the client's
    assert not adm.login_failed("1.2.3.4", LoginFailure.BAD_HANDSHAKE)
    adm.login_ok("1.2.3.4")  # a good login starts the count again
    assert not adm.login_failed("1.2.3.4", LoginFailure.TIMEOUT)
    assert not adm.login_failed("1.2.3.4", LoginFailure.UNKNOWN_USER)
    assert adm.login_failed("1.2.3.4", LoginFailure.ACCESS_DENIED)
    assert adm.admit("1.2.3.4") is Refusal.BLOCKED
    assert adm.admit("5.6.7.8") is None
    assert adm.blocked == ["1.2.3.4"]
    assert adm.unblock("1.2.3.4") and not adm.unblock("1.2.3.4")
    assert adm.admit("1.2.3.4") is None


def test_blocking_off_and_log_rate() -> None:
    adm = Admission(max_connections=100, fd_limit=10_000, max_connect_errors=0)
    for _ in range(1000):
        assert not adm.login_failed("x", LoginFailure.ACCESS_DENIED)
    assert adm.should_log("k", 0.0) and not adm.should_log("k", 5.0) and adm.should_log("k", 11)
