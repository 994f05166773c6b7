"""The front door, tried as an attacker would: nothing a client sends freezes, exhausts or
crashes Baton, and the server's refusals reach the client as errors it can read.

Each attack is followed by the two checks of the issue: a new client gets its greeting within
1 s, and an established session answers within 1 s."""

from __future__ import annotations

import json
import resource
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pymysql
import pytest

from harness.baton import Baton, start_baton
from harness.clients import admin_conn
from proxy.auth import scramble, stage1
from proxy.packets import Cap, Command, frame, lenenc_bytes, parse_err
from reparent.sandbox import Sandbox
from tests.fixtures import app_connector, metric, port_hint, start_baton_without_primary
from tests.rawclient import DEFAULT_CAPS, RawClient


@pytest.fixture(scope="module")
def door(sandbox: Sandbox, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Baton]:
    """A Baton of this module's own: short login timeout, no address blocking (the attacks
    come from 127.0.0.1, like every other test's clients)."""
    b = start_baton(
        sandbox.config_path,
        tmp_path_factory.mktemp("door"),
        port_hint() + 40,
        proxy={"connect_timeout": 2.0, "max_connect_errors": 0},
    )
    try:
        yield b
    finally:
        b.stop()


def greeting_within(port: int, seconds: float = 1.0) -> float:
    """Seconds until a new client has Baton's greeting; fails past `seconds`."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=seconds) as s:
        s.settimeout(seconds)
        head = s.recv(4)
        assert len(head) == 4, "no greeting"
    elapsed = time.monotonic() - started
    assert elapsed < seconds
    return elapsed


def answers_within(conn: pymysql.Connection, seconds: float = 1.0) -> None:
    started = time.monotonic()
    conn.ping(reconnect=False)
    assert time.monotonic() - started < seconds


def still_healthy(b: Baton, canary: pymysql.Connection) -> None:
    greeting_within(b.port)
    answers_within(canary)
    assert b.proc.poll() is None


def raw_login(port: int, payload: bytes) -> bytes:
    """Send `payload` as the login packet; what Baton answers ('' if it closed)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.recv(65536)  # the greeting
        s.sendall(frame(payload, 1))
        s.settimeout(5)
        try:
            return s.recv(65536)
        except (ConnectionResetError, TimeoutError):
            return b""


def login_head(caps: int) -> bytes:
    return struct.pack("<IIB", caps, 1 << 24, 45) + b"\x00" * 23


FROZE_BATON = {
    # The three logins that froze the whole process through mysql-mimic's read_str_null.
    "user_without_nul": login_head(DEFAULT_CAPS) + b"app",
    "plugin_auth_without_plugin_name": (
        login_head(DEFAULT_CAPS | Cap.CONNECT_ATTRS)
        + b"app\x00"
        + lenenc_bytes(b"x" * 20)
        + b"mysql_native_password"
    ),
    "connect_with_db_without_database": (
        login_head(DEFAULT_CAPS | Cap.CONNECT_WITH_DB)
        + b"app\x00"
        + lenenc_bytes(b"x" * 20)
        + b"db"
    ),
}


@pytest.mark.parametrize("name", sorted(FROZE_BATON))
def test_logins_that_froze_baton_get_bad_handshake(door: Baton, name: str) -> None:
    canary = door.connect()
    reply = raw_login(door.port, FROZE_BATON[name])
    assert reply[4:5] == b"\xff", reply
    err = parse_err(reply[4:])
    assert (err.code, err.sqlstate) == (1043, "08S01") and "Bad handshake" in err.message
    still_healthy(door, canary)
    canary.close()


def test_change_user_database_without_nul_gets_one_error_and_the_session_goes_on(
    door: Baton,
) -> None:
    canary = door.connect()
    c = RawClient(door.port)
    body = b"app\x00" + bytes((20,)) + b"x" * 20 + b"baton_test"  # database without its NUL
    c.send(bytes((Command.CHANGE_USER,)) + body)
    _, reply = c.read_packet()
    err = parse_err(reply)
    assert err.code == 1835 and "NUL" in err.message
    assert c.query("SELECT 1")[4:5] == b"\x01"  # still logged in as before
    c.change_bad = c.command(Command.CHANGE_USER, b"\xff\xfe\x00\x14" + b"x" * 20 + b"\x00")
    assert parse_err(c.change_bad[4:]).code == 1835  # a user name that is not UTF-8
    assert c.query("SELECT 1")[4:5] == b"\x01"
    c.close()
    still_healthy(door, canary)
    canary.close()


def test_truncated_statement_commands_get_the_servers_error(door: Baton) -> None:
    c = RawClient(door.port)
    for command in (Command.STMT_EXECUTE, Command.STMT_FETCH, Command.STMT_RESET):
        err = parse_err(c.command(command, b"\x01\x00")[4:])
        assert (err.code, err.sqlstate) == (1835, "HY000")
    assert c.query("SELECT 1")[4:5] == b"\x01"
    c.close()


def test_a_kill_followed_by_64_kib_of_spaces_does_not_stall_baton(door: Baton) -> None:
    """`kill 1` and 64 KiB of spaces before a stray byte: the KILL screen's regex backtracked
    quadratically over the spaces (about 12 s of the event loop, every session waiting; a
    16 MiB statement would take days). Now the statement goes to the server at once and gets
    its syntax error, and Baton stays responsive."""
    c = RawClient(door.port)
    c.sock.settimeout(30)
    started = time.monotonic()
    err = parse_err(c.query("kill 1" + " " * (64 << 10) + "x")[4:])
    assert err.code == 1064
    assert time.monotonic() - started < 2.0
    c.close()
    canary = door.connect()
    still_healthy(door, canary)
    canary.close()


def test_thousands_of_pipelined_commands_baton_answers_itself(door: Baton) -> None:
    """3,000 COM_STMT_CLOSE of unknown statements (the server answers none, nor does Baton)
    sent in one write, then SELECT 1: each was taken by a call nested in the one before, so
    about a thousand of them ended the session in a RecursionError and a traceback."""
    before = door.log.read_text().count("Traceback")
    c = RawClient(door.port)
    c.sock.settimeout(10)
    c.sock.sendall(frame(b"\x19\x07\x00\x00\x00", 0) * 3000 + frame(b"\x03SELECT 1", 0))
    answer = c.response(Command.QUERY)
    assert answer[4:5] == b"\x01", answer[:80]  # one column: SELECT 1 was answered
    c.close()
    time.sleep(0.2)
    assert door.log.read_text().count("Traceback") == before


def test_compression_is_answered_at_once(door: Baton) -> None:
    """mysql-connector-python with compress=True used to hang in connect() for ever, then was
    refused with 1043; now its session is compressed (tests/test_compressed.py)."""
    started = time.monotonic()
    conn = app_connector(door.port, compress=True, connection_timeout=10)
    cur = conn.cursor()
    cur.execute("SELECT 1")
    assert cur.fetchall() == [(1,)]
    conn.close()
    assert time.monotonic() - started < 5


def test_a_login_sent_one_byte_at_a_time_logs_in(door: Baton) -> None:
    """Legal TCP: the header split over four segments, the body byte by byte."""
    with socket.create_connection(("127.0.0.1", door.port), timeout=10) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        greeting = s.recv(65536)
        from proxy.packets import make_handshake_response, parse_server_handshake

        hs = parse_server_handshake(greeting[4:])
        auth = scramble(stage1("app-pass"), hs.auth_data)
        packet = frame(make_handshake_response(DEFAULT_CAPS, 45, "app", auth, None), 1)
        for i in range(len(packet)):
            s.sendall(packet[i : i + 1])
            time.sleep(0.002)
        reply = s.recv(65536)
        assert reply[4:5] == b"\x00", reply


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return int(next(line for line in f if line.startswith("VmRSS:")).split()[1]) / 1024


def test_huge_logins_cost_no_memory(door: Baton) -> None:
    """4 clients that each send a 192 MiB login (16 MiB continuation packets): Baton reads
    the first header, refuses, and closes."""
    chunk = b"\xff\xff\xff\x01" + b"\x00" * 0xFFFFFF
    errors: list[str] = []

    def attack() -> None:
        try:
            with socket.create_connection(("127.0.0.1", door.port), timeout=10) as s:
                s.recv(65536)
                for _ in range(12):
                    s.sendall(chunk)
        except OSError as e:
            errors.append(type(e).__name__)

    threads = [threading.Thread(target=attack) for _ in range(4)]
    for t in threads:
        t.start()
    peak = 0.0
    while any(t.is_alive() for t in threads):
        peak = max(peak, rss_mib(door.proc.pid))
        time.sleep(0.05)
    for t in threads:
        t.join()
    assert len(errors) == 4  # each was cut off, none could send its 192 MiB
    assert peak < 150, f"Baton's RSS reached {peak:.0f} MiB"


def test_idle_sockets_are_closed_after_the_login_timeout(door: Baton) -> None:
    """2,000 clients that connect and say nothing: each is closed after connect_timeout."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 8192)), hard))
    socks = [socket.create_connection(("127.0.0.1", door.port), timeout=10) for _ in range(2000)]
    try:
        time.sleep(4.0)  # connect_timeout is 2 s here
        closed = 0
        for s in socks:
            s.settimeout(2)
            try:
                data = s.recv(65536)  # the greeting, then EOF
                while data:
                    data = s.recv(65536)
                closed += 1
            except (ConnectionResetError, TimeoutError):
                pass
        assert closed == len(socks)
        page = door.scrape()
        assert metric(page, "baton_login_failures_total", reason="timeout") >= len(socks)
    finally:
        for s in socks:
            s.close()


def test_slow_login_is_cut_at_the_timeout(door: Baton) -> None:
    """Slowloris: a byte every half second never finishes a login within connect_timeout."""
    with socket.create_connection(("127.0.0.1", door.port), timeout=10) as s:
        s.recv(65536)
        started = time.monotonic()
        try:
            for _ in range(20):
                s.sendall(b"\x01")
                time.sleep(0.5)
        except OSError:
            pass
        assert time.monotonic() - started < 4.0


def test_max_connections_and_fd_budget(sandbox: Sandbox, tmp_path: Path) -> None:
    """With 256 files Baton can hold (256 - 64) / 2 = 96 connections; the next client gets
    1040 instead of a greeting, and the control socket and metrics still answer."""
    b = start_baton(
        sandbox.config_path,
        tmp_path / "fd",
        port_hint() + 50,
        proxy={"connect_timeout": 30.0},
        nofile=256,
    )
    socks = []
    try:
        for _ in range(96):
            socks.append(socket.create_connection(("127.0.0.1", b.port), timeout=5))
        time.sleep(0.3)
        with socket.create_connection(("127.0.0.1", b.port), timeout=5) as extra:
            extra.settimeout(5)
            reply = extra.recv(65536)
        err = parse_err(reply[4:])
        assert (err.code, err.sqlstate) == (1040, "08004") and "Too many connections" in err.message
        status = b.ctl("status")
        assert status.returncode == 0, status.stderr
        page = b.scrape()
        assert metric(page, "baton_connections_refused_total", reason="fd_budget") >= 1
    finally:
        for s in socks:
            s.close()
        b.stop()
    assert "fd_budget" in b.log.read_text()


def test_backend_refusals_reach_the_client(door: Baton, primary_port: int) -> None:
    """The server's own error at login, as the client would get it direct: a database the
    account may not use, too many connections, a password changed on the server."""
    with pytest.raises(pymysql.err.OperationalError) as exc:
        door.connect(database="mysql")
    assert exc.value.args[0] == 1044
    admin = admin_conn(primary_port)
    cur = admin.cursor()
    cur.execute("SELECT @@global.max_connections")
    (before,) = cur.fetchone()
    # 10 is the server's minimum; ten connections held fill it, whatever else runs.
    holders = [
        pymysql.connect(
            host="127.0.0.1", port=primary_port, user="app", password="app-pass", ssl_disabled=True
        )
        for _ in range(10)
    ]
    try:
        cur.execute("SET GLOBAL max_connections = 10")
        with pytest.raises(pymysql.err.OperationalError) as exc:
            door.connect()
        assert exc.value.args[0] == 1040
    finally:
        cur.execute(f"SET GLOBAL max_connections = {before}")
        for h in holders:
            h.close()
    cur.execute("CREATE USER IF NOT EXISTS 'baton_pw'@'127.0.0.1' IDENTIFIED BY 'one'")
    cur.execute("GRANT SELECT ON baton_test.* TO 'baton_pw'@'127.0.0.1'")
    try:
        door.connect(user="baton_pw", password="one").close()  # Baton reads the new account
        cur.execute("ALTER USER 'baton_pw'@'127.0.0.1' IDENTIFIED BY 'two'")
        with pytest.raises(pymysql.err.OperationalError) as exc:
            door.connect(user="baton_pw", password="one")
        assert exc.value.args[0] == 1045
        conn = door.connect(user="baton_pw", password="two")  # and the changed password
        conn.cursor().execute("SELECT CURRENT_USER()")
        conn.close()
    finally:
        cur.execute("DROP USER 'baton_pw'@'127.0.0.1'")
        admin.close()
    assert "Traceback" not in door.log.read_text()


def test_mariadb_cli_reads_batons_own_errors(sandbox: Sandbox, tmp_path: Path) -> None:
    """libmariadb turns a server-sent code in 2000-2999 into 2027 'malformed packet'; Baton's
    'cannot reach the primary' must arrive with its meaning."""
    b = start_baton_without_primary(sandbox.config_path, tmp_path / "cli", port_hint() + 60)
    try:
        out = subprocess.run(
            [
                "mariadb",
                "-h127.0.0.1",
                f"-P{b.port}",
                "-uapp",
                "-papp-pass",
                "--skip-ssl",
                "-e",
                "SELECT 1",
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert "ERROR 1429" in out.stderr and "cannot reach the primary" in out.stderr, out.stderr
        assert "2027" not in out.stderr
    finally:
        b.stop()


def test_login_failures_are_logged_with_address_user_and_reason(door: Baton) -> None:
    with pytest.raises(pymysql.err.OperationalError):
        door.connect(user="nobody_here", password="x")
    page = door.scrape()
    assert metric(page, "baton_login_failures_total", reason="unknown_user") >= 1
    deadline = time.monotonic() + 5
    while "nobody_here" not in door.log.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    line = next(x for x in door.log.read_text().splitlines() if "nobody_here" in x)
    assert "unknown_user" in line and "127.0.0.1" in line


def test_unfenced_accounts_are_refused_by_name(door: Baton) -> None:
    with pytest.raises(pymysql.err.OperationalError) as exc:
        door.connect(user="baton_admin", password="admin-pass")
    assert exc.value.args[0] == 1045 and "read_only" in exc.value.args[1]


def test_a_60_mib_command_does_not_stall_other_sessions(
    sandbox: Sandbox, tmp_path: Path, primary_port: int
) -> None:
    """One client sends a 60 MiB statement while another runs SELECT 1 in a loop: the second
    is not held up by the first (the client buffer was rebuilt with bytes + bytes on every
    read: 2.4 s for 60 MiB on a quiet machine). The bound is generous for a loaded 2-core
    machine; the figure on a quiet one is in README."""
    admin = admin_conn(primary_port)
    admin.cursor().execute("SET GLOBAL max_allowed_packet = 67108864")
    b = start_baton(
        sandbox.config_path,
        tmp_path / "big",
        port_hint() + 55,
        proxy={"max_packet_size": 64 << 20},
    )
    try:
        healthy = b.connect()
        cur = healthy.cursor()

        def worst(seconds: float, during: threading.Thread | None = None) -> float:
            slowest = 0.0
            end = time.monotonic() + seconds
            while time.monotonic() < end or (during is not None and during.is_alive()):
                started = time.monotonic()
                cur.execute("SELECT 1")
                cur.fetchall()
                slowest = max(slowest, time.monotonic() - started)
            return slowest

        baseline = worst(1.0)
        big = RawClient(b.port)
        statement = b"\x03SELECT LENGTH('" + b"z" * (60 << 20) + b"')"

        answer: list[bytes] = []

        def send() -> None:
            big.sock.sendall(frame(statement, 0))
            big.sock.settimeout(60)
            answer.append(big.response(Command.QUERY))

        sender = threading.Thread(target=send)
        sender.start()
        during = worst(0.2, sender)
        sender.join(60)
        assert answer and str(60 << 20).encode() in answer[0]  # the server got all of it
        print(f"SELECT 1: worst {baseline * 1000:.1f} ms alone, {during * 1000:.1f} ms beside")
        assert during < baseline + 1.0, (baseline, during)  # the quadratic buffer: 2.4 s
        big.close()
        healthy.close()
    finally:
        b.stop()
        admin.cursor().execute("SET GLOBAL max_allowed_packet = DEFAULT")
        admin.close()


def test_failed_logins_block_an_address_until_an_operator_lifts_it(
    sandbox: Sandbox, tmp_path: Path
) -> None:
    b = start_baton(
        sandbox.config_path, tmp_path / "block", port_hint() + 57, proxy={"max_connect_errors": 3}
    )
    try:
        for _ in range(3):
            with pytest.raises(pymysql.err.OperationalError) as exc:
                b.connect(password="wrong")
            assert exc.value.args[0] == 1045
        with pytest.raises(pymysql.err.OperationalError) as exc:
            b.connect()  # the right password too: the address is blocked
        assert exc.value.args[0] == 1129 and "baton ctl unblock 127.0.0.1" in exc.value.args[1]
        status = b.ctl("--json", "status")
        assert json.loads(status.stdout)["front_door"]["blocked"] == ["127.0.0.1"]
        assert b.ctl("unblock", "127.0.0.2").returncode == 1  # not blocked: says so
        done = b.ctl("unblock", "127.0.0.1")
        assert done.returncode == 0 and "may connect again" in done.stdout
        b.connect().close()
    finally:
        b.stop()


def test_ctl_users_lists_the_accounts_and_the_unfenced_ones(door: Baton) -> None:
    out = door.ctl("--json", "users", "--reload")
    assert out.returncode == 0, out.stderr
    users = {a["account"]: a for a in json.loads(out.stdout)["accounts"]}
    assert users["'app'@'127.0.0.1'"]["unfenced"] == [] and users["'app'@'127.0.0.1'"]["usable"]
    assert users["'baton_admin'@'127.0.0.1'"]["unfenced"] == ["READ ONLY ADMIN", "SUPER"]
    status = json.loads(door.ctl("--json", "status").stdout)
    assert "'baton_admin'@'127.0.0.1'" in status["unfenced_users"]
    table = door.ctl("users")
    assert "baton_admin" in table.stdout and "SUPER" in table.stdout


def test_mysqldb_reads_batons_own_errors(sandbox: Sandbox, tmp_path: Path) -> None:
    """MySQLdb (libmariadb) sees 1429 with its message where a 2003 of Baton's became 2027."""
    import MySQLdb

    b = start_baton_without_primary(sandbox.config_path, tmp_path / "mysqldb", port_hint() + 62)
    try:
        with pytest.raises(MySQLdb.OperationalError) as exc:
            # Its connect() runs a statement of its own: the error comes there.
            conn = MySQLdb.connect(host="127.0.0.1", port=b.port, user="app", password="app-pass")
            conn.cursor().execute("SELECT 1")
        assert exc.value.args[0] == 1429 and "cannot reach the primary" in exc.value.args[1]
    finally:
        b.stop()


def test_a_client_gone_during_its_login_leaves_no_session_behind(
    sandbox: Sandbox, tmp_path: Path, primary_port: int
) -> None:
    """A client that sends a good login and closes while Baton's server connection for it is
    still being made (here: the path to the primary is a black hole, so that takes the whole
    backend_connect_timeout): no session stays behind for it, and no traceback. (The fuzzer
    found the tighter race, an EOF in the very loop iteration that ends the login, which a
    test cannot time: `_login_and_start` checks for it.)"""
    from proxy.packets import make_handshake_response, parse_server_handshake
    from tests.faultshim import FaultShim

    with FaultShim(primary_port) as shim:
        shim.blackhole()
        b = start_baton(
            sandbox.config_path,
            tmp_path / "gone",
            port_hint() + 63,
            proxy={"backend_connect_timeout": 1.0},
            servers=[{"name": "db1", "host": "127.0.0.1", "port": shim.port, "role": "primary"}],
            users=[{"name": "app", "password": "app-pass"}],
            detector={"enabled": False},
        )
        try:
            gone = metric(b.scrape(), "baton_login_failures_total", 0.0, reason="client_gone")
            with socket.create_connection(("127.0.0.1", b.port), timeout=5) as s:
                hs = parse_server_handshake(s.recv(65536)[4:])
                auth = scramble(stage1("app-pass"), hs.auth_data)
                s.sendall(frame(make_handshake_response(DEFAULT_CAPS, 45, "app", auth, None), 1))
                time.sleep(0.2)  # Baton is connecting to the black hole
            time.sleep(1.5)  # its connect timed out after the client left
            status = json.loads(b.ctl("--json", "status").stdout)
            assert status["sessions"] == 0
            assert "Traceback" not in b.log.read_text()
            after = metric(b.scrape(), "baton_login_failures_total", reason="client_gone")
            assert after >= gone + 1  # (start_baton's own probe may count once more)
        finally:
            b.stop()
