"""Login guard, backend failures, malformed and oversized packets."""

from __future__ import annotations

import socket
import struct
import threading
import time
from pathlib import Path

import pymysql
import pytest

from harness.baton import Baton
from harness.clients import admin_conn, admin_query
from proxy.auth import scramble, stage1
from proxy.packets import Command, frame, make_handshake_response
from tests.fixtures import app_conn, metric, port_hint, start_baton_without_primary
from tests.rawclient import DEFAULT_CAPS, RawClient


def database_exists(port: int, name: str) -> bool:
    conn = app_conn(port)
    cur = conn.cursor()
    cur.execute("SELECT COUNT(*) FROM information_schema.SCHEMATA WHERE SCHEMA_NAME = %s", (name,))
    found = cur.fetchone()[0] == 1
    conn.close()
    return found


@pytest.mark.parametrize(("user", "password"), [("app", "wrong"), ("nobody", "app-pass")])
def test_failed_login_is_access_denied(baton: Baton, user: str, password: str) -> None:
    with pytest.raises(pymysql.err.OperationalError) as exc:
        baton.connect(user=user, password=password)
    assert exc.value.args[0] == 1045
    assert f"'{user}'" in exc.value.args[1]


@pytest.mark.parametrize(("user", "password"), [("app", "wrong"), ("nobody", "x")])
def test_client_ignoring_the_login_error_reaches_nothing(
    baton: Baton, primary_port: int, user: str, password: str
) -> None:
    """mysql-mimic would carry on into the command phase; Baton closes the connection."""
    name = f"baton_guard_{user}_{int(time.time() * 1000)}"
    c = RawClient(baton.port, login=False)
    c.send(
        make_handshake_response(
            DEFAULT_CAPS, 45, user, scramble(stage1(password), c.handshake.auth_data), None
        ),
        seq=1,
    )
    _, reply = c.read_packet()
    assert reply[:1] == b"\xff" and struct.unpack_from("<H", reply, 1)[0] == 1045
    try:
        c.send(bytes((Command.QUERY,)) + f"CREATE DATABASE {name}".encode())
        c.sock.settimeout(5)
        assert c.sock.recv(100) == b""
    except ConnectionError:
        pass  # reset: closed just as well
    time.sleep(0.2)
    assert not database_exists(primary_port, name)


def test_handshake_shows_backend_version_and_no_query_attributes(
    baton: Baton, primary_port: int
) -> None:
    proxied = RawClient(baton.port, login=False)
    direct = RawClient(primary_port, login=False)
    assert proxied.handshake.version == direct.handshake.version
    assert proxied.handshake.version.startswith("5.5.5-10.11")
    assert not proxied.handshake.capabilities & (1 << 27)  # CLIENT_QUERY_ATTRIBUTES
    # Compression is offered as the server offers it (Baton speaks it itself).
    assert proxied.handshake.capabilities & (1 << 5) == direct.handshake.capabilities & (1 << 5)
    assert proxied.handshake.collation == direct.handshake.collation
    proxied.sock.close()
    direct.sock.close()


def test_backend_unreachable_gives_an_error_and_the_session_stays(
    sandbox: object, tmp_path: Path
) -> None:
    b = start_baton_without_primary(sandbox.config_path, tmp_path / "b", port_hint() + 20)
    try:
        c = RawClient(b.port)
        assert c.logged_in
        for command, body in (
            (Command.QUERY, b"SELECT 1"),
            (Command.PING, b""),
            (Command.QUERY, b"SELECT 2"),
        ):
            # Each command gets the error, and the session is still usable after it.
            code, state, message = c.error(c.command(command, body))
            assert (code, state) == (1429, "HY000")
            assert "gone" in message and "not executed" in message
        c.close()
    finally:
        b.stop()


def test_backend_killed_mid_session_ends_the_session_as_direct(
    baton: Baton, primary_port: int
) -> None:
    """A KILL of the session's server thread on a healthy primary: the statement gets the
    server's error, and the session is over, as it is direct (Baton does not reconnect it
    behind the client's back: its server-side state is gone)."""
    conn = baton.connect()
    cur = conn.cursor()
    cur.execute("SELECT CONNECTION_ID()")
    backend_id = cur.fetchone()[0]
    admin = admin_conn(primary_port)

    def kill() -> None:
        time.sleep(0.3)
        admin.cursor().execute(f"KILL {backend_id}")

    t = threading.Thread(target=kill)
    t.start()
    with pytest.raises(pymysql.err.OperationalError) as exc:
        cur.execute("SELECT SLEEP(5)")
    t.join()
    # The server's own error passes through (connection killed), or Baton's if it lost the
    # socket first.
    assert exc.value.args[0] == 1927
    with pytest.raises(pymysql.err.OperationalError) as exc:
        cur.execute("SELECT 1")
    assert exc.value.args[0] in (2006, 2013)
    conn.close()
    admin.close()
    fresh = baton.connect()
    fresh.cursor().execute("SELECT 1")
    fresh.close()


def test_oversized_packet_closes_only_that_connection(baton: Baton) -> None:
    other = baton.connect()
    c = RawClient(baton.port)
    # Announce a 16 MiB - 1 packet split into a chain longer than max_packet_size (64 MiB).
    header = struct.pack("<I", 0xFFFFFF)
    try:
        for _ in range(5):
            c.sock.sendall(header + b"\x03" + b"x" * (0xFFFFFF - 1))
            header = struct.pack("<I", 0xFFFFFF | (1 << 24))
    except (BrokenPipeError, ConnectionResetError):
        pass
    c.sock.settimeout(10)
    data = b""
    try:
        while chunk := c.sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    assert b"max_allowed_packet" in data and data[5:7] == (1153).to_bytes(2, "little")
    cur = other.cursor()
    cur.execute("SELECT 2")
    assert cur.fetchone() == (2,)
    other.close()


def test_malformed_packet_closes_only_that_connection(baton: Baton) -> None:
    other = baton.connect()
    c = RawClient(baton.port)
    c.sock.sendall(frame(b"\x03SELECT 1", 5))  # a command must start at sequence 0
    c.sock.settimeout(5)
    seq, reply = c.read_packet()  # the server's own answer, then the connection closes
    assert (seq, reply[1:3]) == (6, (1156).to_bytes(2, "little")), reply
    try:
        assert c.sock.recv(100) == b""
    except ConnectionResetError:
        pass
    s = socket.create_connection(("127.0.0.1", baton.port))
    s.sendall(b"\x01\x00\x00\x01\xff")  # garbage instead of a handshake response
    s.settimeout(5)
    try:
        while s.recv(100):
            pass
    except ConnectionResetError:
        pass
    s.close()
    cur = other.cursor()
    cur.execute("SELECT 3")
    assert cur.fetchone() == (3,)
    other.close()


def test_command_of_exactly_16_mib_is_relayed(baton: Baton) -> None:
    """A payload of 0xFFFFFF bytes is followed by an empty packet; that empty tail is part of
    the command, not a malformed one."""
    c = RawClient(baton.port)
    head = b"\x03SELECT 7 /*"
    payload = head + b"x" * (0xFFFFFF - len(head) - 2) + b"*/"
    assert len(payload) == 0xFFFFFF
    c.sock.sendall(frame(payload, 0))  # frame() adds the empty continuation packet
    _, first = c.read_packet()
    assert first[:1] != b"\xff", first  # a result set: the server got the whole statement
    c.close()


def test_client_paused_mid_command_is_resumed(baton: Baton) -> None:
    """A client that sends a large command while its previous one runs is paused once 1 MiB
    waits; when the first finishes, reading resumes although the second is still partial."""
    c = RawClient(baton.port)
    c.send(b"\x03SELECT SLEEP(0.5)")
    big = b"\x03SELECT LENGTH('" + b"y" * (3 << 20) + b"')"
    sender = threading.Thread(target=c.sock.sendall, args=(frame(big, 0),))
    sender.start()
    c.sock.settimeout(10)
    responses = [c.response(Command.QUERY), c.response(Command.QUERY)]
    sender.join(10)
    assert responses[0][4:5] == b"\x01"  # SLEEP's result set: one column
    assert str(3 << 20).encode() in responses[1]
    c.close()


def test_commands_pipelined_behind_the_login_are_all_answered(baton: Baton) -> None:
    """3 MiB sent right behind the login arrive while Baton still connects the backend: the
    login's stream reader pauses the socket at its limit, and the relay must resume it."""
    big = b"\x03SELECT LENGTH('" + b"z" * (3 << 20) + b"')"
    c = RawClient(baton.port, pipelined=frame(b"\x03SELECT 1", 0) + frame(big, 0))
    assert c.logged_in
    first, second = c.response(Command.QUERY), c.response(Command.QUERY)
    assert b"\x011" in first  # the row "1"
    assert str(3 << 20).encode() in second
    c.close()


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(next(line for line in f if line.startswith("VmRSS:")).split()[1])


def test_slow_client_holds_back_the_server_not_batons_memory(baton: Baton) -> None:
    """64 MiB of rows to a client that does not read: Baton stops reading the backend rather
    than keeping the result in memory, and everything arrives once the client reads."""
    c = RawClient(baton.port)
    c.send(b"\x03SELECT REPEAT('x', 1048576) FROM sbtest.seq_1_to_64")
    before = rss_kib(baton.proc.pid)
    time.sleep(1.5)
    grown = rss_kib(baton.proc.pid) - before
    assert grown < 16 * 1024, f"Baton grew by {grown} KiB for a client that does not read"
    c.sock.settimeout(30)
    out = c.response(Command.QUERY)
    assert out.count(b"x" * 1024) >= 64 * 1024
    c.close()


def aborted_clients(port: int) -> int:
    rows = admin_query(port, "SHOW GLOBAL STATUS LIKE 'Aborted_clients'")
    return int(rows[0]["Value"])


def test_a_dropped_client_is_an_aborted_client_on_the_server_as_direct(
    baton: Baton, primary_port: int
) -> None:
    """A client that drops its socket without COM_QUIT counts in the server's Aborted_clients
    (connector/python's test_shutdown checks it); one that says COM_QUIT, even with a
    sequence id other than 0 as some clients send it, does not, and is no protocol error."""
    for port in (primary_port, baton.port):
        before = aborted_clients(primary_port)
        c = RawClient(port)
        c.query("SELECT 1")
        c.sock.close()  # no COM_QUIT
        time.sleep(0.5)
        assert aborted_clients(primary_port) == before + 1, port
    before = aborted_clients(primary_port)
    errors = metric(baton.scrape(), "baton_client_protocol_errors_total")
    c = RawClient(baton.port)
    c.query("SELECT 1")
    c.sock.sendall(frame(bytes((Command.QUIT,)), 6))
    c.sock.settimeout(5)
    assert c.sock.recv(10) == b""
    time.sleep(0.5)
    assert aborted_clients(primary_port) == before
    assert metric(baton.scrape(), "baton_client_protocol_errors_total") == errors


@pytest.mark.parametrize("payload", [bytes((Command.QUIT,)), b"\x0e"])
def test_a_header_out_of_sequence_whose_byte_comes_later_is_decided_on_it(
    baton: Baton, payload: bytes
) -> None:
    """A one-byte command whose header (sequence id 5) arrives before its byte: Baton waits
    for the byte, then closes quietly for a COM_QUIT or answers 1156 for anything else. The
    fuzzer found the session machine's shell reading the byte before it had come (an
    IndexError and a traceback)."""
    before = baton.log.read_text().count("Traceback")
    c = RawClient(baton.port)
    c.query("SELECT 1")
    c.sock.sendall(b"\x01\x00\x00\x05")
    time.sleep(0.2)
    c.sock.sendall(payload)
    c.sock.settimeout(5)
    if payload[0] == Command.QUIT:
        assert c.sock.recv(10) == b""
    else:
        seq, reply = c.read_packet()
        assert (seq, reply[1:3]) == (6, (1156).to_bytes(2, "little")), reply
    time.sleep(0.2)
    assert baton.log.read_text().count("Traceback") == before


def test_a_16_mib_command_out_of_sequence_is_refused_whatever_its_last_packet(
    baton: Baton,
) -> None:
    """A 16 MiB command starting at sequence id 5, ended by an empty packet: the check read
    the last packet's length (0) instead of the first's and let the command through, for the
    server to refuse (the same code, but from the server, not from Baton)."""
    errors = metric(baton.scrape(), "baton_client_protocol_errors_total")
    c = RawClient(baton.port)
    c.query("SELECT 1")
    body = b"\x03SELECT '" + b"z" * (0xFFFFFF - 10) + b"'"
    assert len(body) == 0xFFFFFF
    try:
        c.sock.sendall(struct.pack("<I", 0xFFFFFF | 5 << 24) + body + struct.pack("<I", 6 << 24))
    except (BrokenPipeError, ConnectionResetError):
        pass
    c.sock.settimeout(10)
    seq, reply = c.read_packet()
    assert (seq, reply[1:3]) == (6, (1156).to_bytes(2, "little")), reply[:80]
    assert metric(baton.scrape(), "baton_client_protocol_errors_total") == errors + 1


def test_a_client_that_leaves_mid_statement_costs_nothing_more(
    baton: Baton, primary_port: int
) -> None:
    """Its statement is not held or sent again for a client that is gone, and the server sees
    no second connection for it."""
    held = metric(baton.scrape(), "baton_failed_commands_total", 0.0, cause="lost", outcome="held")
    c = RawClient(baton.port)
    c.send(b"\x03SELECT SLEEP(1) AS baton_leaving")
    time.sleep(0.3)
    c.sock.close()
    time.sleep(1.5)
    rows = admin_query(
        primary_port,
        "SELECT COUNT(*) AS n FROM information_schema.PROCESSLIST WHERE INFO LIKE '%baton_leaving%'"
        " AND INFO NOT LIKE '%PROCESSLIST%'",
    )
    assert rows[0]["n"] == 0
    after = metric(baton.scrape(), "baton_failed_commands_total", 0.0, cause="lost", outcome="held")
    assert after == held
    assert "Task exception" not in baton.log.read_text()
