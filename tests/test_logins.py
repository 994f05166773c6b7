"""Today's clients log in through Baton as themselves: caching_sha2_password (MySQL 8.4/9.x
clients; MariaDB has no such server plugin, so Baton checks it against the account's
mysql_native_password hash), MariaDB's ed25519 (passed through to the primary), and
mysql_clear_password only under TLS. Each session runs queries and a prepared statement and is
its own account on the server (CURRENT_USER())."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import mysql.connector
import MySQLdb
import pymysql
import pytest

from harness.baton import Baton, start_baton
from harness.clients import admin_conn
from harness.process import free_port
from reparent.sandbox import Sandbox
from tests.fixtures import (
    app_connector,
    mariadb_cli,
    metric,
    port_hint,
    private_sandbox,
    server_ports,
    wait_for,
)

SHA2_USER, SHA2_PASS = "sha2_user", "sha2-pass"
ED_USER, ED_PASS = "ed_user", "ed-pass"


@pytest.fixture(scope="module")
def accounts(sandbox: Sandbox) -> Iterator[None]:
    """A mysql_native_password account for the caching_sha2 clients and an ed25519 one. The
    ed25519 plugin is loaded on every server first: CREATE USER replicates, and a replica
    without the plugin would stop on it."""
    for port in server_ports(sandbox).values():
        with admin_conn(port) as conn, conn.cursor() as cur:
            cur.execute(
                "SELECT COUNT(*) FROM information_schema.PLUGINS WHERE PLUGIN_NAME='ed25519'"
            )
            if not cur.fetchone()[0]:
                cur.execute("INSTALL SONAME 'auth_ed25519'")
    primary = next(s["port"] for s in sandbox.status()["servers"] if s["role"] == "primary")
    with admin_conn(primary) as conn, conn.cursor() as cur:
        cur.execute(f"CREATE USER '{SHA2_USER}'@'127.0.0.1' IDENTIFIED BY '{SHA2_PASS}'")
        cur.execute(
            f"CREATE USER '{ED_USER}'@'127.0.0.1' "
            f"IDENTIFIED VIA ed25519 USING PASSWORD('{ED_PASS}')"
        )
        for user in (SHA2_USER, ED_USER):
            cur.execute(f"GRANT ALL PRIVILEGES ON baton_test.* TO '{user}'@'127.0.0.1'")
    try:
        yield
    finally:
        with admin_conn(primary) as conn, conn.cursor() as cur:
            cur.execute(f"DROP USER '{SHA2_USER}'@'127.0.0.1', '{ED_USER}'@'127.0.0.1'")


@pytest.fixture(scope="module")
def sha2_baton(
    sandbox: Sandbox, accounts: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Baton]:
    """A Baton whose greeting names caching_sha2_password, as a MySQL 8.4 server's does."""
    b = start_baton(
        sandbox.config_path,
        tmp_path_factory.mktemp("sha2-baton"),
        port_hint() + 90,
        proxy={"auth_plugin": "caching_sha2_password"},
    )
    try:
        yield b
    finally:
        b.stop()


def logins(b: Baton, method: str) -> float:
    return metric(b.scrape(), "baton_logins_total", absent=0.0, method=method)


def failures(b: Baton, reason: str) -> float:
    return metric(b.scrape(), "baton_login_failures_total", absent=0.0, reason=reason)


def pymysql_session(port: int, user: str = SHA2_USER, password: str = SHA2_PASS) -> list:
    """Log in with PyMySQL, run a query and a server-side prepared statement."""
    conn = pymysql.connect(
        host="127.0.0.1", port=port, user=user, password=password, database="baton_test"
    )
    try:
        cur = conn.cursor()
        cur.execute("SELECT CURRENT_USER()")
        who = cur.fetchone()[0]
        cur.execute("PREPARE s FROM 'SELECT ? * 2'")
        cur.execute("SET @x = 21")
        cur.execute("EXECUTE s USING @x")
        return [who, cur.fetchone()[0]]
    finally:
        conn.close()


def connector_session(port: int) -> list:
    """mysql-connector-python offering caching_sha2_password; a binary-protocol statement."""
    conn = app_connector(
        port,
        SHA2_USER,
        SHA2_PASS,
        database="baton_test",
        auth_plugin="caching_sha2_password",
        ssl_disabled=True,
    )
    try:
        cur = conn.cursor(prepared=True)
        cur.execute("SELECT CURRENT_USER(), %s * 2", (21,))
        return list(cur.fetchone())
    finally:
        conn.close()


def test_pymysql_caching_sha2_full_then_fast(sha2_baton: Baton) -> None:
    """PyMySQL follows the greeting: caching_sha2_password. Baton has no verifier yet, so the
    first login is full (PyMySQL asks for Baton's RSA key and sends the password encrypted);
    the second is the fast path against the verifier the first left."""
    full, fast = logins(sha2_baton, "caching_sha2_full"), logins(sha2_baton, "caching_sha2_fast")
    assert pymysql_session(sha2_baton.port) == [f"{SHA2_USER}@127.0.0.1", 42]
    assert logins(sha2_baton, "caching_sha2_full") == full + 1
    assert pymysql_session(sha2_baton.port) == [f"{SHA2_USER}@127.0.0.1", 42]
    assert logins(sha2_baton, "caching_sha2_fast") == fast + 1
    assert logins(sha2_baton, "caching_sha2_full") == full + 1


def test_caching_sha2_wrong_password_is_1045(sha2_baton: Baton) -> None:
    before = failures(sha2_baton, "access_denied")
    with pytest.raises(pymysql.err.OperationalError) as e:
        pymysql_session(sha2_baton.port, password="wrong")
    assert e.value.args[0] == 1045
    assert failures(sha2_baton, "access_denied") == before + 1


def test_connector_caching_sha2(baton: Baton, sha2_baton: Baton, accounts: None) -> None:
    """mysql-connector-python with auth_plugin='caching_sha2_password' against a Baton whose
    greeting says mysql_native_password. Over plain text its full path sends the password in
    clear (the pure-Python connector cannot encrypt it), which Baton refuses as a MySQL 8.4
    server does; once a full login (PyMySQL's, encrypted) left a verifier, the connector logs
    in by the fast path. (Its C extension does not load on this machine: it needs OpenSSL
    3.2, Debian 12 has 3.0.)"""
    before = failures(baton, "cleartext_without_tls")
    with pytest.raises(mysql.connector.Error) as e:
        connector_session(baton.port)
    assert e.value.errno == 1045
    assert "in clear" in str(e.value)
    assert failures(baton, "cleartext_without_tls") == before + 1
    # PyMySQL follows the greeting, so its full login is on the Baton that names sha2.
    assert pymysql_session(sha2_baton.port)[0] == f"{SHA2_USER}@127.0.0.1"
    fast = logins(sha2_baton, "caching_sha2_fast")
    assert connector_session(sha2_baton.port) == [f"{SHA2_USER}@127.0.0.1", 42]
    assert logins(sha2_baton, "caching_sha2_fast") == fast + 1


def test_change_user_with_caching_sha2(sha2_baton: Baton) -> None:
    """COM_CHANGE_USER from a connector that logged in with caching_sha2_password: Baton
    switches it to caching_sha2 with a new nonce, and the account's verifier (left by a
    full login) takes it by the fast path."""
    # Full logins leave both accounts' verifiers (the connector cannot log in full here).
    pymysql_session(sha2_baton.port)
    pymysql_session(sha2_baton.port, "app", "app-pass")
    conn = app_connector(
        sha2_baton.port,
        SHA2_USER,
        SHA2_PASS,
        auth_plugin="caching_sha2_password",
        ssl_disabled=True,
    )
    try:
        fast = logins(sha2_baton, "caching_sha2_fast")
        conn.cmd_change_user("app", "app-pass", "baton_test")
        cur = conn.cursor(prepared=True)
        cur.execute("SELECT CURRENT_USER(), DATABASE(), %s", (1,))
        assert list(cur.fetchone()) == ["app@127.0.0.1", "baton_test", 1]
        assert logins(sha2_baton, "caching_sha2_fast") == fast + 1
    finally:
        conn.close()


def test_change_user_to_an_ed25519_account(baton: Baton, accounts: None) -> None:
    """libmariadb's mysql_change_user to an ed25519 account: the primary's challenge is
    passed to the client as at connect, and the session is that account."""
    conn = MySQLdb.connect(host="127.0.0.1", port=baton.port, user="app", password="app-pass")
    try:
        before = logins(baton, "ed25519")
        conn.change_user(ED_USER, ED_PASS, "baton_test")
        cur = conn.cursor()
        cur.execute("SELECT CURRENT_USER(), DATABASE()")
        assert cur.fetchone() == (f"{ED_USER}@127.0.0.1", "baton_test")
        assert logins(baton, "ed25519") == before + 1
    finally:
        conn.close()


def mariadb(
    port: int, user: str, password: str, sql: str, *options: str
) -> subprocess.CompletedProcess[str]:
    return mariadb_cli(port, user, password, sql, "--skip-ssl", *options)


ED_SQL = "SELECT CURRENT_USER(); PREPARE s FROM 'SELECT ? * 2'; SET @x = 21; EXECUTE s USING @x"


@pytest.mark.parametrize("which", ["baton", "sha2_baton"])
def test_mariadb_cli_ed25519_as_direct(
    request: pytest.FixtureRequest, primary_port: int, accounts: None, which: str
) -> None:
    """The mariadb CLI logs in to an ed25519 account through Baton (whatever its greeting
    names) as it does direct: same output, and the server sees the account itself."""
    b: Baton = request.getfixturevalue(which)
    direct = mariadb(primary_port, ED_USER, ED_PASS, ED_SQL)
    assert direct.returncode == 0, direct.stderr
    before = logins(b, "ed25519")
    through = mariadb(b.port, ED_USER, ED_PASS, ED_SQL)
    assert through.returncode == 0, through.stderr
    assert through.stdout == direct.stdout == f"{ED_USER}@127.0.0.1\n42\n"
    assert logins(b, "ed25519") == before + 1


def test_mariadb_cli_ed25519_wrong_password_as_direct(
    baton: Baton, primary_port: int, accounts: None
) -> None:
    direct = mariadb(primary_port, ED_USER, "wrong", "SELECT 1")
    before = failures(baton, "access_denied")
    through = mariadb(baton.port, ED_USER, "wrong", "SELECT 1")
    assert direct.returncode == through.returncode == 1
    assert "ERROR 1045" in direct.stderr and "ERROR 1045" in through.stderr, through.stderr
    assert failures(baton, "access_denied") == before + 1


def test_a_password_sent_in_clear_without_tls_is_refused(
    baton: Baton, primary_port: int, accounts: None
) -> None:
    """mysql_clear_password is taken under TLS only. Over plain text MariaDB would switch
    such a client to the account's plugin and let it in; Baton refuses it, saying its password
    just crossed the network in clear (a departure from direct, on purpose)."""
    clear = "--default-auth=mysql_clear_password"
    direct = mariadb(primary_port, SHA2_USER, SHA2_PASS, "SELECT CURRENT_USER()", clear)
    assert direct.returncode == 0, direct.stderr
    before = failures(baton, "cleartext_without_tls")
    through = mariadb(baton.port, SHA2_USER, SHA2_PASS, "SELECT CURRENT_USER()", clear)
    assert through.returncode == 1
    assert "ERROR 1045" in through.stderr and "in clear" in through.stderr, through.stderr
    assert failures(baton, "cleartext_without_tls") == before + 1


@pytest.fixture(scope="module")
def switch_box(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    """A sandbox of this module's own (one replica): the switch test moves the primary."""
    yield from private_sandbox(tmp_path_factory, "logins-switch", replicas=1)


def ed25519_account(port: int) -> None:
    with admin_conn(port) as conn, conn.cursor() as cur:
        cur.execute(
            f"CREATE USER '{ED_USER}'@'127.0.0.1' "
            f"IDENTIFIED VIA ed25519 USING PASSWORD('{ED_PASS}')"
        )
        cur.execute(f"GRANT ALL PRIVILEGES ON baton_test.* TO '{ED_USER}'@'127.0.0.1'")


def test_an_ed25519_session_ends_clearly_at_a_switch(
    switch_box: Sandbox, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Baton cannot log an ed25519 session in to the new primary (only its client can sign
    that server's challenge): at a planned switch its next statement gets 1927 saying so, and
    the session ends, counted under baton_sessions_refused_total{reason="login"}. A
    mysql_native_password session beside it moves without an error, and the ed25519 client
    logs in again to the new primary. With read routing, its reads stay on the primary."""
    ports = server_ports(switch_box)
    for port in ports.values():
        with admin_conn(port) as conn, conn.cursor() as cur:
            cur.execute("INSTALL SONAME 'auth_ed25519'")
    ed25519_account(ports["db1"])
    read_port = free_port(port_hint() + 120)
    b = start_baton(
        switch_box.config_path,
        tmp_path_factory.mktemp("switch"),
        port_hint() + 110,
        extra={"routing": {"mode": "split", "read_port": read_port, "monitor_interval": 0.2}},
    )
    try:
        # Reads on the read port: the native session's go to the replica, the ed25519
        # session's stay on the primary (Baton cannot log it in to a replica).
        app_reads = pymysql.connect(
            host="127.0.0.1", port=read_port, user="app", password="app-pass", autocommit=True
        )
        ed_reads = MySQLdb.connect(
            host="127.0.0.1", port=read_port, user=ED_USER, password=ED_PASS, autocommit=True
        )

        def reads_on(name: str) -> float:
            page = b.scrape()
            return metric(page, "baton_routed_commands_total", 0.0, server=name, kind="read")

        def read(conn: object) -> None:
            cur = conn.cursor()  # type: ignore[attr-defined]
            cur.execute("SELECT CURRENT_USER()")
            cur.fetchall()

        def app_read_on_replica() -> bool:
            before = reads_on("db2")
            read(app_reads)
            return reads_on("db2") == before + 1

        wait_for("a read on the replica", app_read_on_replica)

        def fallbacks() -> tuple[float, float]:
            page = b.scrape()
            return (
                metric(page, "baton_read_fallbacks_total", 0.0, reason="session_state"),
                metric(page, "baton_read_fallbacks_total", 0.0, reason="replica_failed"),
            )

        on_primary, on_replica = reads_on("db1"), reads_on("db2")
        state, failed = fallbacks()
        for _ in range(5):
            read(ed_reads)
        assert (reads_on("db1"), reads_on("db2")) == (on_primary + 5, on_replica)
        # Not sent to a replica to fail there first: the session's state keeps it home.
        assert fallbacks() == (state + 5, failed)
        app_reads.close()
        ed_reads.close()
        ed = MySQLdb.connect(
            host="127.0.0.1", port=b.port, user=ED_USER, password=ED_PASS, database="baton_test"
        )
        app = pymysql.connect(
            host="127.0.0.1", port=b.port, user="app", password="app-pass", database="baton_test"
        )
        for conn in (ed, app):
            cur = conn.cursor()
            cur.execute("SELECT @@port")
            assert cur.fetchone()[0] == ports["db1"]
        out = b.ctl("--json", "prs", "--to", "db2")
        assert out.returncode == 0, out.stdout + out.stderr
        cur = app.cursor()
        cur.execute("SELECT @@port")
        assert cur.fetchone()[0] == ports["db2"]
        with pytest.raises(MySQLdb.OperationalError) as e:
            ed.cursor().execute("SELECT @@port")
        assert e.value.args[0] == 1927
        assert "ed25519 login" in e.value.args[1]
        page = b.scrape()
        assert metric(page, "baton_sessions_refused_total", reason="login") == 1
        again = mariadb(b.port, ED_USER, ED_PASS, "SELECT @@port, CURRENT_USER()")
        assert again.returncode == 0, again.stderr
        assert again.stdout == f"{ports['db2']}\t{ED_USER}@127.0.0.1\n"
    finally:
        b.stop()


def test_an_ed25519_session_keeps_its_connection_when_sessions_share(
    sandbox: Sandbox, accounts: None, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """With [pool] multiplex, sessions give their server connections back between statements
    and borrow a pooled one, logged in by Baton as their account. An ed25519 login was passed
    through to the primary once and cannot be made again: that session keeps the connection
    its login made (one server thread throughout) and works as unshared."""
    b = start_baton(
        sandbox.config_path,
        tmp_path_factory.mktemp("ed-pool-baton"),
        port_hint() + 95,
        extra={"pool": {"multiplex": True, "max": 2}},
    )
    try:
        ed = MySQLdb.connect(host="127.0.0.1", port=b.port, user=ED_USER, password=ED_PASS)
        app = MySQLdb.connect(host="127.0.0.1", port=b.port, user="app", password="app-pass")
        try:
            seen = set()
            for i in range(5):
                cur = ed.cursor()
                cur.execute("SELECT CONNECTION_ID(), CURRENT_USER(), %s", (i,))
                thread, user, echo = cur.fetchone()
                assert (user, echo) == (f"{ED_USER}@127.0.0.1", i)
                seen.add(thread)
                app.cursor().execute("SELECT 1")  # the pool lends its connections meanwhile
            assert len(seen) == 1
        finally:
            ed.close()
            app.close()
    finally:
        b.stop()
