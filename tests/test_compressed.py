"""Compressed client sessions (CLIENT_COMPRESS) through Baton, compared with the same clients
directly on the primary: libmariadb through MySQLdb and the `mariadb` CLI, connector/python's
own compressed reader with the binary protocol, a result over 16 MiB, LOAD DATA LOCAL, Baton's
own errors, a client that lies in a compressed header, and a session across a PRS."""

from __future__ import annotations

import hashlib
import subprocess
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import MySQLdb
import pytest

from harness.baton import Baton, start_baton
from harness.clients import admin_query
from proxy.packets import Cap, frame, parse_err, split_packets
from reparent.sandbox import Sandbox
from tests.fixtures import (
    app_connector,
    current_primary,
    metric,
    port_hint,
    private_sandbox,
    prs_across,
    server_ports,
)
from tests.rawclient import DEFAULT_CAPS, RawClient

BIG = 17 * 1024 * 1024  # a row longer than one packet (16 MiB) and than one compressed packet
ROWS = 20_000


@pytest.fixture(scope="module")
def box(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    yield from private_sandbox(tmp_path_factory, "compress-sandbox", replicas=1)


@pytest.fixture(scope="module")
def zbaton(box: Sandbox, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Baton]:
    for port in server_ports(box).values():
        admin_query(port, "SET GLOBAL max_allowed_packet = 64 * 1024 * 1024")
    b = start_baton(
        box.config_path,
        tmp_path_factory.mktemp("compress-baton"),
        port_hint() + 90,
        proxy={"allow_load_data_local": True},
    )
    try:
        yield b
    finally:
        b.stop()


@pytest.fixture(scope="module")
def infile(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("compress-data") / "rows.csv"
    path.write_text("".join(f"{i},value-{i * 7919 % 10007}\n" for i in range(100_000)))
    return path


def primary_port(box: Sandbox, b: Baton) -> int:
    return server_ports(box)[current_primary(b)]


def compressed_sessions(b: Baton) -> float:
    return metric(b.scrape(), "baton_client_compressed_sessions_total", absent=0.0)


def mysqldb(port: int, **kw: Any) -> MySQLdb.Connection:
    """The application user through libmariadb, compressed unless `plain` (mysqlclient
    compresses for any `compress` given, False too)."""
    if not kw.pop("plain", False):
        kw["compress"] = True
    return MySQLdb.connect(
        host="127.0.0.1", port=port, user="app", password="app-pass", autocommit=True, **kw
    )


def mysqldb_session(port: int, infile: Path, table: str) -> list[Any]:
    """What one compressed libmariadb session sees: rows, a result and a statement over
    16 MiB, a LOAD DATA LOCAL, a prepared statement, an error, and the session's own state."""
    conn = mysqldb(port, database="sbtest", local_infile=1)
    seen: list[Any] = []
    cur = conn.cursor()
    try:
        cur.execute(f"SELECT seq, md5(seq), seq * 1.5 FROM seq_1_to_{ROWS}")
        seen.append(hashlib.sha256(repr(cur.fetchall()).encode()).hexdigest())
        cur.execute(f"SELECT repeat('z', {BIG}), 'after'")
        big, after = cur.fetchone()
        seen.append((len(big), hashlib.sha256(big.encode()).hexdigest(), after))
        # A statement over 16 MiB: libmariadb numbers every packet of it 0 when compressing,
        # which the plain server leg would refuse (1156) unless Baton renumbers them.
        cur.execute("SELECT length(%s), md5(%s)", (big, "s"))
        seen.append(cur.fetchall())
        cur.execute(f"DROP TABLE IF EXISTS {table}")
        cur.execute(f"CREATE TABLE {table} (id INT PRIMARY KEY, v VARCHAR(40))")
        cur.execute(
            f"LOAD DATA LOCAL INFILE '{infile}' INTO TABLE {table} FIELDS TERMINATED BY ','"
        )
        seen.append(cur.rowcount)
        cur.execute(f"SELECT COUNT(*), SUM(CRC32(v)) FROM {table}")
        seen.append(cur.fetchall())
        cur.execute("PREPARE s FROM 'SELECT ? * 2, repeat(?, 3)'")
        cur.execute("SET @a = 21, @b = 'ab'")
        cur.execute("EXECUTE s USING @a, @b")
        seen.append(cur.fetchall())
        try:
            cur.execute("SELECT * FROM no_such_table")
        except MySQLdb.Error as e:
            seen.append(e.args)
        cur.execute("SELECT 'still here'")
        seen.append(cur.fetchall())
    finally:
        conn.close()
    return seen


def test_mysqldb_compressed_sees_what_it_sees_directly(
    box: Sandbox, zbaton: Baton, infile: Path
) -> None:
    before = compressed_sessions(zbaton)
    direct = mysqldb_session(primary_port(box, zbaton), infile, "sbtest.zdirect")
    through = mysqldb_session(zbaton.port, infile, "sbtest.zbaton")
    assert through == direct
    assert direct[1][0] == BIG and direct[3] == 100_000
    assert compressed_sessions(zbaton) == before + 1  # the session through Baton compressed


def test_connector_binary_protocol_compressed(box: Sandbox, zbaton: Baton) -> None:
    """connector/python's own compressed reader, server-side prepared statements (binary
    protocol), and a row relayed in pieces as it arrives."""

    def session(port: int, compress: bool) -> list[Any]:
        conn = app_connector(port, compress=compress, database="sbtest")
        try:
            cur = conn.cursor(prepared=True)
            cur.execute("SELECT ?, repeat('p', ?), md5(?)", (7, 300_000, "x"))
            rows = [(a, len(b), c) for a, b, c in cur.fetchall()]
            cur.execute("SELECT length(?), md5(?)", ("q" * BIG, "r"))  # an execute of 17 MiB
            rows += cur.fetchall()
            cur.execute(f"SELECT seq, md5(seq) FROM seq_1_to_{ROWS} WHERE seq > ?", (5,))
            rows.append(hashlib.sha256(repr(cur.fetchall()).encode()).hexdigest())
            return rows
        finally:
            conn.close()

    before = compressed_sessions(zbaton)
    # Compared with a plain session directly: connector's compressed reader fails on the
    # 20,000 rows straight from MariaDB ("unpack requires a buffer of 4 bytes"), which cuts
    # an ordinary packet's header across two compressed packets; Baton ends each compressed
    # packet with an ordinary one.
    assert session(zbaton.port, True) == session(primary_port(box, zbaton), False)
    assert compressed_sessions(zbaton) == before + 1


def test_mariadb_cli_compressed(box: Sandbox, zbaton: Baton, infile: Path) -> None:
    script = (
        f"SELECT seq, sha1(seq) FROM seq_1_to_{ROWS};"
        f"SELECT length(repeat('c', {BIG})), md5(repeat('c', {BIG}));"
        "DROP TABLE IF EXISTS sbtest.zcli;"
        "CREATE TABLE sbtest.zcli (id INT PRIMARY KEY, v VARCHAR(40));"
        f"LOAD DATA LOCAL INFILE '{infile}' INTO TABLE sbtest.zcli FIELDS TERMINATED BY ',';"
        "SELECT COUNT(*), SUM(CRC32(v)) FROM sbtest.zcli;"
        "PREPARE s FROM 'SELECT ? + 1'; SET @x = 41; EXECUTE s USING @x;"
    )

    def run(port: int) -> str:
        out = subprocess.run(
            ["mariadb", "--compress", "--local-infile=1", "--max-allowed-packet=64M"]
            + ["-h127.0.0.1", f"-P{port}", "-uapp", "-papp-pass", "-e", script, "sbtest"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        return out.stdout

    before = compressed_sessions(zbaton)
    direct = run(primary_port(box, zbaton))
    assert "100000" in direct and "42" in direct
    assert run(zbaton.port) == direct
    assert compressed_sessions(zbaton) == before + 1


def raw_compressed(port: int, pipelined: bytes) -> RawClient:
    client = RawClient(port, caps=DEFAULT_CAPS | Cap.COMPRESS, pipelined=pipelined)
    assert client.logged_in and client.login_reply[:1] == b"\x00"
    return client


def read_compressed(client: RawClient, count: int) -> list[tuple[int, bytes]]:
    """`count` compressed packets as a client reads them: (sequence id, content); fewer if
    Baton closes."""
    buf = client.buf  # what came behind the login's OK
    client.buf = b""
    got: list[tuple[int, bytes]] = []
    while len(got) < count:
        if len(buf) >= 7 and len(buf) >= 7 + int.from_bytes(buf[:3], "little"):
            length, seq, size = int.from_bytes(buf[:3], "little"), buf[3], buf[4:7]
            body = buf[7 : 7 + length]
            got.append((seq, zlib.decompress(body) if size != b"\0\0\0" else body))
            buf = buf[7 + length :]
            continue
        chunk = client.sock.recv(65536)
        if not chunk:
            break
        buf += chunk
    return got


def cpacket(content: bytes, seq: int, squeeze: bool) -> bytes:
    """One compressed packet as a client sends it, deflated or not."""
    body, size = (zlib.compress(content), len(content)) if squeeze else (content, 0)
    return len(body).to_bytes(3, "little") + bytes((seq,)) + size.to_bytes(3, "little") + body


def test_commands_pipelined_behind_the_login_and_batons_own_errors_are_compressed(
    zbaton: Baton,
) -> None:
    """Three commands sent compressed right behind the login (one stored, one deflated, one
    an unknown command Baton answers itself): three compressed answers."""
    ping = frame(b"\x0e", 0)
    pipelined = (
        cpacket(ping, 0, False) + cpacket(ping, 0, True) + cpacket(frame(b"\x99", 0), 0, False)
    )
    client = raw_compressed(zbaton.port, pipelined)
    try:
        answers = read_compressed(client, 3)
        assert [seq for seq, _ in answers] == [1, 1, 1]  # each after its command's packet 0
        ok1, ok2, err = (split_packets(content)[0] for _, content in answers)
        assert ok1[:1] == b"\x00" and ok2[:1] == b"\x00"
        assert parse_err(err).code == 1047  # Baton's own: unknown command
    finally:
        client.close()


def test_answers_baton_writes_together_go_in_one_compressed_packet(zbaton: Baton) -> None:
    """Five unknown commands in one compressed packet: Baton answers each itself, and the
    five errors go out deflated together, in one packet numbered after the client's."""
    commands = frame(b"\x99", 0) * 5
    client = raw_compressed(zbaton.port, cpacket(commands, 0, True))
    try:
        ((seq, content),) = read_compressed(client, 1)
        assert seq == 1
        errors = split_packets(content)
        assert [parse_err(e).code for e in errors] == [1047] * 5
    finally:
        client.close()


_ZEROS = zlib.compress(bytes(4 << 20))
# 4 MiB of zeros, said to be 100 bytes.
BOMB = len(_ZEROS).to_bytes(3, "little") + b"\x00" + (100).to_bytes(3, "little") + _ZEROS


@pytest.mark.parametrize(
    ("lie", "code", "words"),
    [
        (BOMB, 1157, "header"),
        (cpacket(frame(b"\x0e", 0), 5, False), 1156, "out of order"),
    ],
    ids=["inflated length", "sequence id"],
)
def test_a_lying_compressed_packet_gets_the_servers_error_and_the_connection_closes(
    zbaton: Baton, lie: bytes, code: int, words: str
) -> None:
    client = raw_compressed(zbaton.port, b"")
    try:
        client.sock.sendall(lie)
        ((_, content),) = read_compressed(client, 2)
        e = parse_err(split_packets(content)[0])
        assert (e.code, e.sqlstate) == (code, "08S01") and words in e.message
        client.sock.settimeout(5)
        assert client.sock.recv(100) == b""  # closed
    finally:
        client.close()
    zbaton.connect().close()  # Baton serves on


def test_a_compressed_session_survives_a_prs(box: Sandbox, zbaton: Baton) -> None:
    """Writers on compressed sessions across a planned switch: their commands are held and
    flushed on the new primary, none fails, and each session keeps its state."""
    setup = mysqldb(zbaton.port, plain=True)
    setup.cursor().execute(
        "CREATE TABLE IF NOT EXISTS sbtest.zprs (id INT AUTO_INCREMENT PRIMARY KEY, port INT)"
    )
    setup.close()
    stop = threading.Event()
    errors: list[BaseException] = []
    kept: list[Any] = []

    def writer(n: int) -> None:
        conn = mysqldb(zbaton.port)
        cur = conn.cursor()
        cur.execute("SET @mine = %s", (n,))
        try:
            while not stop.is_set():
                cur.execute("INSERT INTO sbtest.zprs (port) VALUES (@@port)")
                cur.execute("SELECT repeat('w', 2000), @mine")
                assert cur.fetchone()[1] == n
            cur.execute("SELECT @mine")
            kept.append(cur.fetchone()[0])
        except BaseException as e:  # any failure is the test's finding
            errors.append(e)
        finally:
            conn.close()

    prs_across(zbaton, [threading.Thread(target=writer, args=(n,)) for n in range(3)], stop)
    assert errors == []
    assert sorted(kept) == [0, 1, 2]
    rows = admin_query(
        primary_port(box, zbaton), "SELECT COUNT(DISTINCT port) AS n FROM sbtest.zprs"
    )
    assert rows[0]["n"] == 2  # written on both sides of the switch


def test_compression_off_refuses_at_once(
    box: Sandbox, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """`proxy.compression = false`: not offered, and a client that asks anyway is refused
    with 1043 naming the setting, at once."""
    b = start_baton(
        box.config_path,
        tmp_path_factory.mktemp("nocompress-baton"),
        port_hint() + 95,
        proxy={"compression": False},
    )
    try:
        client = RawClient(b.port, caps=DEFAULT_CAPS | Cap.COMPRESS)
        assert not client.handshake.capabilities & Cap.COMPRESS
        e = parse_err(client.login_reply)
        assert e.code == 1043 and "proxy.compression" in e.message
        client.close()
        mysqldb(b.port).close()  # libmariadb asks only for what is offered: a plain session
        assert metric(b.scrape(), "baton_client_compressed_sessions_total", absent=0.0) == 0
    finally:
        b.stop()


def test_zstd_is_refused_at_once_saying_what_to_turn_off(zbaton: Baton) -> None:
    client = RawClient(zbaton.port, caps=DEFAULT_CAPS | Cap.ZSTD_COMPRESSION)
    try:
        e = parse_err(client.login_reply)
        assert e.code == 1043 and "zstd" in e.message and "zlib" in e.message
    finally:
        client.close()
