"""Baton's codec for what clients send: every input ends in a value or a ClientPacketError.

The four logins that froze the whole process under mysql-mimic (a NUL-terminated field without
its NUL) are here, then every truncation of valid packets, then seeded random mutations."""

from __future__ import annotations

import random
import struct

import pytest

from proxy.client_packets import (
    MAX_LOGIN_PACKET,
    ChangeUser,
    ClientPacketError,
    HandshakeResponse,
    Malformed,
    SslRequest,
    check_stmt_header,
    parse_change_user,
    parse_login,
)
from proxy.packets import Cap, Command, lenenc_bytes

OFFERED = int(
    Cap.LONG_PASSWORD
    | Cap.LONG_FLAG
    | Cap.CONNECT_WITH_DB
    | Cap.PROTOCOL_41
    | Cap.TRANSACTIONS
    | Cap.SECURE_CONNECTION
    | Cap.MULTI_STATEMENTS
    | Cap.MULTI_RESULTS
    | Cap.PLUGIN_AUTH
    | Cap.CONNECT_ATTRS
    | Cap.PLUGIN_AUTH_LENENC_CLIENT_DATA
    | Cap.SESSION_TRACK
    | Cap.DEPRECATE_EOF
)
SCRAMBLE = bytes(range(1, 21))


def login(
    caps: int = OFFERED,
    user: bytes = b"app\x00",
    auth: bytes | None = None,
    database: bytes = b"sbtest\x00",
    plugin: bytes = b"mysql_native_password\x00",
    attrs: bytes | None = None,
    extended: int = 0,
) -> bytes:
    """A HandshakeResponse41 built field by field, so a test can break any one of them."""
    out = struct.pack("<IIB", caps & 0xFFFFFFFF, 1 << 24, 45) + b"\x00" * 19
    out += struct.pack("<I", extended)
    out += user
    if auth is None:
        auth = (
            lenenc_bytes(SCRAMBLE)
            if caps & Cap.PLUGIN_AUTH_LENENC_CLIENT_DATA
            else (bytes((20,)) + SCRAMBLE)
        )
    out += auth
    if caps & Cap.CONNECT_WITH_DB:
        out += database
    if caps & Cap.PLUGIN_AUTH:
        out += plugin
    if caps & Cap.CONNECT_ATTRS:
        if attrs is None:
            attrs = lenenc_bytes(lenenc_bytes(b"_client_name") + lenenc_bytes(b"test"))
        out += attrs
    return out


def test_a_valid_login_parses() -> None:
    r = parse_login(login(), OFFERED)
    assert isinstance(r, HandshakeResponse)
    assert (r.user, r.database, r.auth_plugin, r.auth_response) == (
        "app",
        "sbtest",
        "mysql_native_password",
        SCRAMBLE,
    )
    assert r.attrs == {"_client_name": "test"}
    assert r.collation == 45


@pytest.mark.parametrize(
    "payload",
    [
        # The four variants that froze Baton through mysql-mimic's read_str_null.
        login(
            user=b"app",
            auth=b"",
            database=b"",
            plugin=b"",
            attrs=b"",
            caps=OFFERED & ~(Cap.CONNECT_WITH_DB | Cap.PLUGIN_AUTH | Cap.CONNECT_ATTRS),
        ),
        login(plugin=b"mysql_native_password", attrs=lenenc_bytes(b"")[:0] + b"\x05abc"),
        login(
            database=b"sbtest",
            plugin=b"",
            attrs=b"",
            caps=OFFERED & ~(Cap.PLUGIN_AUTH | Cap.CONNECT_ATTRS),
        ),
    ],
    ids=["user_without_nul", "plugin_without_nul_before_attrs", "database_without_nul"],
)
def test_a_missing_nul_is_an_error_not_a_loop(payload: bytes) -> None:
    with pytest.raises(ClientPacketError):
        parse_login(payload, OFFERED)


def test_plugin_name_may_end_with_the_packet() -> None:
    """Older clients send the plugin name as the last field without its NUL."""
    caps = OFFERED & ~Cap.CONNECT_ATTRS
    r = parse_login(login(caps=caps, plugin=b"mysql_native_password"), OFFERED)
    assert isinstance(r, HandshakeResponse) and r.auth_plugin == "mysql_native_password"
    r = parse_login(login(caps=caps, plugin=b""), OFFERED)
    assert isinstance(r, HandshakeResponse) and r.auth_plugin == ""


def test_change_user_database_without_nul() -> None:
    payload = bytes((Command.CHANGE_USER,)) + b"app\x00" + bytes((20,)) + SCRAMBLE + b"sbtest"
    with pytest.raises(ClientPacketError) as e:
        parse_change_user(payload, OFFERED)
    assert e.value.kind is Malformed.NO_TERMINATOR


def test_every_truncation_of_a_login_is_an_error() -> None:
    """Except where the optional trailing fields (plugin name, attributes) begin: a login may
    end there, as older clients' do."""
    full = login()
    optional_from = {full.index(b"sbtest\x00") + 7, full.index(b"password\x00") + 9}
    for n in range(len(full)):
        try:
            parse_login(full[:n], OFFERED)
        except ClientPacketError:
            continue
        assert n in optional_from, f"a login cut at {n} of {len(full)} bytes parsed"


def test_every_truncation_of_change_user_ends_in_a_value_or_an_error() -> None:
    full = (
        bytes((Command.CHANGE_USER,))
        + b"app\x00"
        + bytes((20,))
        + SCRAMBLE
        + b"sbtest\x00"
        + struct.pack("<H", 45)
        + b"mysql_native_password\x00"
        + lenenc_bytes(lenenc_bytes(b"k") + lenenc_bytes(b"v"))
    )
    assert parse_change_user(full, OFFERED) == ChangeUser(
        "app", SCRAMBLE, "sbtest", 45, "mysql_native_password", {"k": "v"}
    )
    for n in range(1, len(full)):
        try:
            parse_change_user(full[:n], OFFERED)
        except ClientPacketError:
            pass


@pytest.mark.parametrize(
    ("payload", "kind"),
    [
        (login(auth=b"\xfc\xff\xff"), Malformed.TRUNCATED),  # a length beyond the packet
        (login(auth=b"\xff"), Malformed.BAD_LENGTH),  # 0xFF is no length prefix
        (login(attrs=b"\xfe" + (1 << 40).to_bytes(8, "little")), Malformed.TOO_LONG),
        (login(attrs=lenenc_bytes(b"\x09abc")), Malformed.TRUNCATED),  # lying inner length
        (login(user="é".encode("latin-1") + b"\x00"), Malformed.NOT_UTF8),
        (login(user=b"a" * 600 + b"\x00"), Malformed.TOO_LONG),
        (login() + b"junk", Malformed.TRAILING),
        (login(caps=OFFERED & ~Cap.PROTOCOL_41), Malformed.OLD_PROTOCOL),
        (b"\x00" * (MAX_LOGIN_PACKET + 1), Malformed.TOO_LONG),
    ],
    ids=[
        "auth_len",
        "bad_prefix",
        "huge_attrs",
        "attr_lie",
        "utf8",
        "long_user",
        "trailing",
        "pre41",
        "oversized",
    ],
)
def test_lies_are_named(payload: bytes, kind: Malformed) -> None:
    with pytest.raises(ClientPacketError) as e:
        parse_login(payload, OFFERED)
    assert e.value.kind is kind, e.value


@pytest.mark.parametrize(
    ("cap", "words"),
    [
        (Cap.COMPRESS, "compression"),
        (Cap.QUERY_ATTRIBUTES, "query attributes"),
        (Cap.ZSTD_COMPRESSION, "zstd"),
    ],
)
def test_a_capability_baton_did_not_offer_is_refused(cap: Cap, words: str) -> None:
    with pytest.raises(ClientPacketError) as e:
        parse_login(login(caps=OFFERED | cap), OFFERED)
    assert e.value.kind is Malformed.UNOFFERED_CAPABILITY and words in str(e.value)


def test_ssl_request() -> None:
    payload = struct.pack("<IIB", OFFERED | Cap.SSL, 1 << 24, 45) + b"\x00" * 23
    assert parse_login(payload, OFFERED | Cap.SSL) == SslRequest(OFFERED | Cap.SSL, 45)
    with pytest.raises(ClientPacketError) as e:
        parse_login(payload, OFFERED)
    assert e.value.kind is Malformed.UNOFFERED_CAPABILITY


def test_mariadb_extended_capabilities_only_without_client_mysql() -> None:
    ext = 1 << 3  # MARIADB_CLIENT_EXTENDED_METADATA's bit in the upper word
    r = parse_login(login(caps=OFFERED & ~Cap.LONG_PASSWORD, extended=ext), OFFERED)
    assert isinstance(r, HandshakeResponse) and r.capabilities >> 32 == ext
    r = parse_login(login(extended=ext), OFFERED)
    assert isinstance(r, HandshakeResponse) and r.capabilities >> 32 == 0


@pytest.mark.parametrize(
    ("command", "need"),
    [
        (Command.STMT_EXECUTE, 9),
        (Command.STMT_FETCH, 8),
        (Command.STMT_SEND_LONG_DATA, 6),
        (Command.STMT_CLOSE, 4),
        (Command.STMT_RESET, 4),
    ],
)
def test_statement_headers(command: Command, need: int) -> None:
    whole = bytes((command,)) + struct.pack("<I", 7) + b"\x00" * (need - 4)
    assert check_stmt_header(whole) == 7
    for n in range(1, len(whole)):
        with pytest.raises(ClientPacketError):
            check_stmt_header(whole[:n])


def test_seeded_mutations_always_end() -> None:
    """Flip, drop, insert and duplicate bytes of valid packets: 20,000 mutations, each ends in
    a value or a ClientPacketError, never another exception."""
    rng = random.Random(20261130)
    seeds = [login(), login(caps=OFFERED & ~Cap.PLUGIN_AUTH_LENENC_CLIENT_DATA)]
    change = bytes((Command.CHANGE_USER,)) + b"app\x00\x14" + SCRAMBLE + b"db\x00\x2d\x00x\x00"
    for _ in range(20_000):
        data = bytearray(rng.choice(seeds + [change]))
        for _ in range(rng.randint(1, 4)):
            op = rng.randrange(4)
            at = rng.randrange(len(data) + 1)
            if op == 0 and data:
                data[min(at, len(data) - 1)] = rng.randrange(256)
            elif op == 1 and data:
                del data[min(at, len(data) - 1)]
            elif op == 2:
                data[at:at] = bytes([rng.randrange(256)])
            else:
                data = data[:at]
        payload = bytes(data)
        for parse in (lambda p: parse_login(p, OFFERED), lambda p: parse_change_user(p, OFFERED)):
            try:
                parse(payload)
            except ClientPacketError:
                pass
