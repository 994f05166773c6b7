"""Each application reaches the database as itself: what the server refuses an account direct,
it refuses through Baton, with the same code; connection ids and KILL work as direct; a session
the server ends is ended, not hidden."""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Iterator

import pymysql
import pytest

from harness.baton import Baton, start_baton
from harness.clients import admin_conn
from reparent.sandbox import Sandbox
from tests.fixtures import port_hint


@pytest.fixture(scope="module")
def ibaton(sandbox: Sandbox, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Baton]:
    b = start_baton(sandbox.config_path, tmp_path_factory.mktemp("identity"), port_hint() + 70)
    try:
        yield b
    finally:
        b.stop()


def connect(port: int, user: str = "app", password: str = "app-pass", **kw: object):
    return pymysql.connect(
        host="127.0.0.1",
        port=port,
        user=user,
        password=password,
        autocommit=True,
        ssl_disabled=True,
        **kw,
    )


def error_code(port: int, sql: str, user: str = "app", password: str = "app-pass") -> int:
    conn = connect(port, user, password)
    try:
        conn.cursor().execute(sql)
    except pymysql.err.MySQLError as e:
        return e.args[0]
    finally:
        conn.close()
    return 0


HOSTILE = [
    "ALTER USER 'baton_admin'@'127.0.0.1' IDENTIFIED BY 'owned'",
    "SET PASSWORD FOR 'reporting'@'127.0.0.1' = PASSWORD('owned')",
    "SELECT User, Password FROM mysql.user",
    "SELECT Priv FROM mysql.global_priv",
    "GRANT ALL PRIVILEGES ON *.* TO 'app'@'127.0.0.1'",
    "CREATE USER 'intruder'@'%'",
    "SET GLOBAL read_only = 0",
    "CREATE DATABASE not_for_app",
]


@pytest.mark.parametrize("sql", HOSTILE)
def test_what_the_server_refuses_direct_it_refuses_through_baton(
    ibaton: Baton, primary_port: int, sql: str
) -> None:
    direct = error_code(primary_port, sql)
    through = error_code(ibaton.port, sql)
    assert direct != 0, f"the sandbox lets app run {sql!r}"
    assert through == direct


def test_reporting_reads_but_may_not_write(ibaton: Baton, primary_port: int) -> None:
    for port in (primary_port, ibaton.port):
        conn = connect(port, "reporting", "reporting-pass")
        cur = conn.cursor()
        cur.execute("SELECT CURRENT_USER(), COUNT(*) FROM information_schema.SCHEMATA")
        assert cur.fetchone()[0] == "reporting@127.0.0.1"
        with pytest.raises(pymysql.err.OperationalError) as exc:
            cur.execute("CREATE TABLE baton_test.reporting_t (a INT)")
        assert exc.value.args[0] == 1142
        conn.close()


def test_current_user_is_the_clients_account(ibaton: Baton) -> None:
    conn = connect(ibaton.port)
    cur = conn.cursor()
    cur.execute("SELECT CURRENT_USER(), USER()")
    assert cur.fetchone()[0] == "app@127.0.0.1"
    conn.close()


def test_own_password_change_is_the_accounts_alone(ibaton: Baton, primary_port: int) -> None:
    admin = admin_conn(primary_port)
    a = admin.cursor()
    a.execute("CREATE USER 'baton_self'@'127.0.0.1' IDENTIFIED BY 'first'")
    a.execute("GRANT SELECT ON baton_test.* TO 'baton_self'@'127.0.0.1'")
    try:
        conn = connect(ibaton.port, "baton_self", "first")
        conn.cursor().execute("SET PASSWORD = PASSWORD('second')")
        conn.close()
        # Other accounts are untouched: app still logs in, through Baton and direct.
        connect(ibaton.port).close()
        with pytest.raises(pymysql.err.OperationalError) as exc:
            connect(ibaton.port, "baton_self", "first")
        assert exc.value.args[0] == 1045
        connect(ibaton.port, "baton_self", "second").close()
    finally:
        a.execute("DROP USER 'baton_self'@'127.0.0.1'")
        admin.close()


def thread_of(conn: pymysql.Connection) -> int:
    cur = conn.cursor()
    cur.execute("SELECT CONNECTION_ID()")
    return cur.fetchone()[0]


def test_kill_by_the_greeting_id_reaches_the_right_session(ibaton: Baton) -> None:
    """KILL QUERY and KILL (COM_PROCESS_KILL too) of the id a client got in its greeting."""
    victim = connect(ibaton.port)
    killer = connect(ibaton.port)
    result: list[object] = []

    def sleep() -> None:
        try:
            victim.cursor().execute("SELECT SLEEP(10)")
        except pymysql.err.OperationalError as e:
            result.append(e.args[0])

    t = threading.Thread(target=sleep)
    t.start()
    time.sleep(0.5)
    started = time.monotonic()
    killer.cursor().execute(f"KILL QUERY {victim.thread_id()}")
    t.join(5)
    assert result == [1317] and time.monotonic() - started < 3  # Query execution was interrupted
    victim.cursor().execute("SELECT 1")  # the session survives a KILL QUERY
    killer.kill(victim.thread_id())  # COM_PROCESS_KILL, as PyMySQL sends it
    with pytest.raises(pymysql.err.OperationalError) as exc:
        victim.cursor().execute("SELECT 1")
    assert exc.value.args[0] in (2006, 2013)
    with pytest.raises(pymysql.err.OperationalError) as exc:
        killer.cursor().execute("KILL 1073741823")  # a Baton id no session has
    assert exc.value.args[0] == 1094
    killer.close()


def test_kill_of_another_users_session_is_refused_as_direct(
    ibaton: Baton, primary_port: int
) -> None:
    for port in (primary_port, ibaton.port):
        other = connect(port, "reporting", "reporting-pass")
        app = connect(port)
        with pytest.raises(pymysql.err.OperationalError) as exc:
            app.cursor().execute(f"KILL {other.thread_id()}")
        assert exc.value.args[0] == 1095  # You are not owner of thread
        cur = app.cursor()
        cur.execute("SELECT USER FROM information_schema.PROCESSLIST")
        assert {row[0] for row in cur.fetchall()} == {"app"}  # nobody else's sessions
        other.cursor().execute("SELECT 1")
        other.close()
        app.close()


def test_a_session_the_server_ends_is_ended(ibaton: Baton) -> None:
    """Its wait_timeout expired on the server: the next command fails as direct (2006/2013)
    instead of a silent reconnect that would lose the session's state."""
    conn = connect(ibaton.port)
    cur = conn.cursor()
    cur.execute("SET @keep = 1, wait_timeout = 1")
    time.sleep(2.5)
    with pytest.raises(pymysql.err.OperationalError) as exc:
        cur.execute("SELECT @keep")
    assert exc.value.args[0] in (2006, 2013)
    page = ibaton.scrape()
    assert "baton_sessions_ended_by_server_total" in page


def test_server_thread_kill_by_another_connection_ends_the_session(
    ibaton: Baton, primary_port: int
) -> None:
    conn = connect(ibaton.port)
    server_thread = thread_of(conn)
    admin = admin_conn(primary_port)
    admin.cursor().execute(f"KILL {server_thread}")
    admin.close()
    time.sleep(0.2)
    with pytest.raises(pymysql.err.OperationalError) as exc:
        conn.cursor().execute("SELECT 1")
    assert exc.value.args[0] in (2006, 2013)
    connect(ibaton.port).close()


def run(cmd: list[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=60)


def client(port: int, user: str = "app", password: str = "app-pass") -> list[str]:
    return ["mariadb", "-h127.0.0.1", f"-P{port}", f"-u{user}", f"-p{password}", "--skip-ssl"]


def test_dump_with_definers_reimports_through_baton(ibaton: Baton, primary_port: int) -> None:
    """Routines, triggers and views whose DEFINER is app@127.0.0.1: re-imported through Baton
    as app, as they are direct (through a shared account it stopped with 1227)."""
    schema = "baton_definer"
    setup = [
        f"DROP DATABASE IF EXISTS {schema}",
        f"CREATE DATABASE {schema}",
        f"CREATE TABLE {schema}.t (a INT)",
        f"CREATE TABLE {schema}.log (a INT)",
        f"CREATE TRIGGER {schema}.tr AFTER INSERT ON {schema}.t FOR EACH ROW "
        f"INSERT INTO {schema}.log VALUES (NEW.a)",
        f"CREATE VIEW {schema}.v AS SELECT a FROM {schema}.t",
        f"CREATE PROCEDURE {schema}.p() SELECT COUNT(*) FROM {schema}.t",
    ]
    out = run(client(primary_port), ";\n".join(setup) + ";")
    assert out.returncode == 0, out.stderr
    dump = run(
        [
            "mariadb-dump",
            "-h127.0.0.1",
            f"-P{primary_port}",
            "-uapp",
            "-papp-pass",
            "--skip-ssl",
            "--routines",
            "--triggers",
            "--databases",
            schema,
        ]
    )
    assert dump.returncode == 0, dump.stderr
    assert "DEFINER=`app`@`127.0.0.1`" in dump.stdout
    run(client(primary_port), f"DROP DATABASE {schema};")
    loaded = run(client(ibaton.port), dump.stdout)
    assert loaded.returncode == 0, loaded.stderr
    check = run(
        client(ibaton.port),
        f"INSERT INTO {schema}.t VALUES (7); SELECT a FROM {schema}.log; CALL {schema}.p();",
    )
    assert check.returncode == 0 and "7" in check.stdout, check.stderr
    run(client(primary_port), f"DROP DATABASE {schema};")


def test_proxy_protocol_lets_the_server_see_the_clients_address(
    sandbox: Sandbox, tmp_path_factory: pytest.TempPathFactory, primary_port: int
) -> None:
    """With backend.proxy_protocol, Baton sends a PROXY header: a client bound to 127.0.0.2
    is 'baton_pp'@'127.0.0.2' on the server (host-based grants and audit logs see it),
    where without the header the server would see Baton's 127.0.0.1."""
    b = start_baton(
        sandbox.config_path,
        tmp_path_factory.mktemp("proxy-protocol"),
        port_hint() + 75,
        extra={"backend": {"proxy_protocol": True}},
    )
    admin = admin_conn(primary_port)
    a = admin.cursor()
    a.execute("SET GLOBAL proxy_protocol_networks = '127.0.0.1/32'")
    a.execute("CREATE USER 'baton_pp'@'127.0.0.2' IDENTIFIED BY 'pp'")
    a.execute("GRANT SELECT ON baton_test.* TO 'baton_pp'@'127.0.0.2'")
    try:
        conn = pymysql.connect(
            host="127.0.0.1",
            port=b.port,
            user="baton_pp",
            password="pp",
            bind_address="127.0.0.2",
            ssl_disabled=True,
        )
        cur = conn.cursor()
        cur.execute("SELECT CURRENT_USER(), USER()")
        assert cur.fetchone() == ("baton_pp@127.0.0.2", "baton_pp@127.0.0.2")
        conn.close()
    finally:
        a.execute("DROP USER 'baton_pp'@'127.0.0.2'")
        a.execute("SET GLOBAL proxy_protocol_networks = ''")
        admin.close()
        b.stop()
