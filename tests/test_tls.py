"""TLS on both sides, against a `baton sandbox up --tls` group: clients to Baton ([tls]), Baton,
the controller and replication to the servers (backend.tls = verify_identity).

The clients are real ones: the `mariadb` CLI (libmariadb), PyMySQL with an SSL context and
mysql-connector-python with `ssl_ca`, each verifying Baton's certificate against the sandbox's
CA, running queries and prepared statements while the primary moves and back.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import mysql.connector
import pymysql
import pytest

from harness.baton import Baton, start_baton
from harness.clients import admin_query
from reparent import certs
from reparent.config import BackendSettings, BackendTls
from reparent.sandbox import Sandbox
from reparent.tls import replication_options
from tests.conftest import sandbox_base_port
from tests.fixtures import app_connector, mariadb_cli, metric, port_hint, wait_for

TABLE = "baton_test.tls_rows"


@pytest.fixture(scope="module")
def tls_box(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    box = Sandbox(
        tmp_path_factory.mktemp("tls-sandbox"), base_port=sandbox_base_port(), replicas=1, tls=True
    )
    box.up()
    try:
        admin_query(box.nodes()[0].port, f"CREATE TABLE {TABLE} (id INT PRIMARY KEY, who TEXT)")
        yield box
    finally:
        box.down()


@pytest.fixture(scope="module")
def tbaton(tls_box: Sandbox, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Baton]:
    b = start_baton(tls_box.config_path, tmp_path_factory.mktemp("tls-baton"), port_hint() + 200)
    try:
        yield b
    finally:
        b.stop()


def ca_context(box: Sandbox) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(box.ca.cert))


def pymysql_tls(b: Baton, box: Sandbox, **kw: object) -> pymysql.Connection:
    return b.connect(ssl=ca_context(box), **kw)


class Loop(threading.Thread):
    """A client running statements until told to stop; every error is kept."""

    def __init__(self, name: str) -> None:
        super().__init__(name=name, daemon=True)
        self.stop = threading.Event()
        self.errors: list[str] = []
        self.rounds = 0

    def step(self, i: int) -> None:
        raise NotImplementedError

    def run(self) -> None:
        i = 0
        while not self.stop.is_set():
            i += 1
            try:
                self.step(i)
                self.rounds += 1
            except Exception as e:
                self.errors.append(f"{self.name} round {i}: {e!r}")
                return
            time.sleep(0.01)


class PyMySQLLoop(Loop):
    """Text queries, and server-side prepared statements by SQL (PyMySQL has no binary ones)."""

    def __init__(self, b: Baton, box: Sandbox) -> None:
        super().__init__("pymysql")
        self.conn = pymysql_tls(b, box)

    def step(self, i: int) -> None:
        cur = self.conn.cursor()
        cur.execute(f"REPLACE INTO {TABLE} VALUES (%s, 'pymysql')", (1000 + i % 50,))
        cur.execute("PREPARE s FROM 'SELECT COUNT(*) FROM baton_test.tls_rows WHERE id > ?'")
        cur.execute("SET @low = 0")
        cur.execute("EXECUTE s USING @low")
        assert cur.fetchone()[0] >= 1


class ConnectorLoop(Loop):
    """mysql-connector-python with ssl_ca: binary-protocol prepared statements."""

    def __init__(self, b: Baton, box: Sandbox) -> None:
        super().__init__("connector")
        self.conn = mysql.connector.connect(
            host="127.0.0.1",
            port=b.port,
            user="app",
            password="app-pass",
            ssl_ca=str(box.ca.cert),
            ssl_verify_cert=True,
            ssl_verify_identity=True,
            autocommit=True,
        )
        self.cur = self.conn.cursor(prepared=True)

    def step(self, i: int) -> None:
        self.cur.execute(f"REPLACE INTO {TABLE} VALUES (?, ?)", (2000 + i % 50, "connector"))
        self.cur.execute(f"SELECT who FROM {TABLE} WHERE id = ?", (2000 + i % 50,))
        assert self.cur.fetchall() == [("connector",)]


class CliLoop(Loop):
    """One `mariadb` CLI session over verified TLS, fed statements on its stdin; in batch mode
    it stops at its first error, with a non-zero exit."""

    def __init__(self, b: Baton, box: Sandbox) -> None:
        super().__init__("mariadb-cli")
        self.proc = subprocess.Popen(
            [
                "mariadb",
                "-h127.0.0.1",
                f"-P{b.port}",
                "-uapp",
                "-papp-pass",
                "--ssl",
                f"--ssl-ca={box.ca.cert}",
                "--ssl-verify-server-cert",
                "--batch",
                "--skip-column-names",
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def step(self, i: int) -> None:
        assert self.proc.stdin is not None and self.proc.poll() is None, "the CLI exited"
        self.proc.stdin.write(
            f"REPLACE INTO {TABLE} VALUES ({3000 + i % 50}, 'cli');\n"
            f"PREPARE c FROM 'SELECT who FROM {TABLE} WHERE id = ?';\n"
            f"SET @id = {3000 + i % 50}; EXECUTE c USING @id;\n"
        )
        self.proc.stdin.flush()

    def finish(self) -> tuple[int, str, str]:
        out, err = self.proc.communicate("SHOW STATUS LIKE 'Ssl_cipher';\n", timeout=30)
        return self.proc.returncode, out, err


def test_clients_over_tls_across_switches(tbaton: Baton, tls_box: Sandbox) -> None:
    """Three client libraries over verified TLS, queries and prepared statements, while the
    primary moves to the replica and back: no error anywhere, and replication follows over
    verified TLS after each move."""
    before = metric(tbaton.scrape(), "baton_client_tls_handshakes_total", 0, result="ok")
    loops = [PyMySQLLoop(tbaton, tls_box), ConnectorLoop(tbaton, tls_box), CliLoop(tbaton, tls_box)]
    for loop in loops:
        loop.start()
    try:
        wait_for("every client ran", lambda: all(x.rounds >= 3 for x in loops))
        for target in ("db2", "db1"):
            done = tbaton.ctl("prs", "--to", target)
            assert done.returncode == 0, done.stdout + done.stderr
            rounds = [x.rounds for x in loops]
            wait_for(
                f"every client ran on {target}",
                lambda r=rounds: all(x.rounds >= n + 3 for x, n in zip(loops, r, strict=True)),
            )
    finally:
        for loop in loops:
            loop.stop.set()
            loop.join(20)
    assert [e for x in loops for e in x.errors] == []
    code, out, err = loops[2].finish()  # type: ignore[attr-defined]
    assert code == 0, err
    assert "cli" in out
    after = metric(tbaton.scrape(), "baton_client_tls_handshakes_total", 0, result="ok")
    assert after - before == 3  # each client's connection is TLS to Baton
    replica = tls_box.nodes()[1]
    (status,) = admin_query(replica.port, "SHOW SLAVE STATUS")
    assert status["Slave_IO_Running"] == "Yes", status["Last_IO_Error"]
    assert status["Master_SSL_Allowed"] == "Yes"
    assert status["Master_SSL_Verify_Server_Cert"] == "Yes"
    assert status["Master_SSL_CA_File"] == str(tls_box.ca.cert)


def test_sessions_connections_to_the_servers_are_tls(tbaton: Baton, tls_box: Sandbox) -> None:
    """What the server sees of a session's connection (Ssl_version is the server's, of the
    connection Baton made as the client's account), for a plain client too."""
    for conn in (pymysql_tls(tbaton, tls_box), tbaton.connect(ssl_disabled=True)):
        cur = conn.cursor()
        cur.execute("SHOW SESSION STATUS LIKE 'Ssl_version'")
        assert cur.fetchone()[1].startswith("TLSv1.")
        conn.close()


def _ssl_request() -> bytes:
    caps = 0x0001A685 | (1 << 11)  # PROTOCOL_41, SECURE_CONNECTION, PLUGIN_AUTH, ..., SSL
    return struct.pack("<I", 32)[:3] + b"\x01" + struct.pack("<IIB23x", caps, 1 << 24, 45)


def _greeting(sock: socket.socket) -> bytes:
    header = sock.recv(4, socket.MSG_WAITALL)
    return sock.recv(int.from_bytes(header[:3], "little"), socket.MSG_WAITALL)


def test_client_hello_in_the_same_segment_as_the_ssl_request(
    tbaton: Baton, tls_box: Sandbox
) -> None:
    """A client that sends its ClientHello right behind its SSL request, in one write: Baton
    reads both at once and must hand the hello to TLS, not lose it (the handshake then would
    hang until connect_timeout)."""
    ctx = ca_context(tls_box)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")
    with socket.create_connection(("127.0.0.1", tbaton.port), timeout=5) as sock:
        _greeting(sock)
        with pytest.raises(ssl.SSLWantReadError):
            tls.do_handshake()
        sock.sendall(_ssl_request() + outgoing.read())  # one segment
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                if outgoing.pending:
                    sock.sendall(outgoing.read())
                data = sock.recv(65536)
                assert data, "Baton closed the connection during the handshake"
                incoming.write(data)
        if outgoing.pending:
            sock.sendall(outgoing.read())
        assert tls.version() in ("TLSv1.2", "TLSv1.3")
        assert tls.getpeercert()["subject"] == ((("commonName", "baton"),),)


def test_failed_handshake_frees_its_connection(tbaton: Baton) -> None:
    """Garbage where the ClientHello should be: the connection is closed, counted as a failed
    TLS handshake, and no longer counted as open."""
    before = metric(tbaton.scrape(), "baton_client_tls_handshakes_total", 0, result="failed")
    with socket.create_connection(("127.0.0.1", tbaton.port), timeout=5) as sock:
        _greeting(sock)
        sock.sendall(_ssl_request() + b"\x16\x03\x01\x00\x05hello" + b"\x00" * 64)
        assert sock.recv(100) == b""  # closed, nothing in plain text
    page = wait_for(
        "the failure counted",
        lambda: (
            (
                p := tbaton.scrape(),
                metric(p, "baton_client_tls_handshakes_total", 0, result="failed") > before,
            )[1]
            and p
        ),
    )
    assert metric(page, "baton_client_connections_open") == 0


def _plain(b: Baton) -> pymysql.Connection:
    return b.connect(ssl_disabled=True)


def test_plain_login_refused_when_tls_required(
    tls_box: Sandbox, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """tls.require: a login without TLS gets 3159 and the connection ends; over TLS it goes
    on. (MariaDB itself answers such a login with a bare 1045 access denied.) With tls.ca a
    TLS client must show a certificate signed by it."""
    work = tmp_path_factory.mktemp("tls-require")
    client = certs.make_cert(work, "client", tls_box.ca)
    b = start_baton(
        tls_box.config_path,
        work,
        port_hint() + 210,
        extra={"tls": {"require": True, "ca": str(tls_box.ca.cert)}},
    )
    try:
        with pytest.raises(pymysql.err.OperationalError) as refused:
            _plain(b)
        assert refused.value.args == (
            3159,
            "Connections using insecure transport are prohibited while "
            "--require_secure_transport=ON.",
        )
        cli = subprocess.run(
            ["mariadb", "-h127.0.0.1", f"-P{b.port}", "-uapp", "-papp-pass", "--skip-ssl"]
            + ["-e", "SELECT 1"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        assert cli.returncode == 1
        assert "ERROR 3159 (HY000)" in cli.stderr
        with pytest.raises(pymysql.err.OperationalError):
            pymysql_tls(b, tls_box)  # no client certificate
        ctx = ca_context(tls_box)
        ctx.load_cert_chain(client.cert, client.key)
        conn = b.connect(ssl=ctx)
        cur = conn.cursor()
        cur.execute("SELECT CURRENT_USER()")
        assert cur.fetchone()[0] == "app@127.0.0.1"
        conn.close()
        page = b.scrape()
        assert metric(page, "baton_login_failures_total", reason="insecure_transport") == 2
        assert metric(page, "baton_client_tls_handshakes_total", result="failed") == 1
    finally:
        b.stop()


def test_wrong_ca_for_the_servers_is_refused_clearly(
    tls_box: Sandbox, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """backend.tls = verify_ca with a CA that did not sign the servers' certificates: Baton
    talks to no server. A client is told why (1429, naming the certificate check), the log says
    so, and the refusals are counted; with a fixed list of logins the session itself starts and
    its first statement gets the cause at once (no switch of primary would mend it)."""
    work = tmp_path_factory.mktemp("tls-wrong-ca")
    wrong = certs.make_ca(work / "other", "other-ca")
    backend = {"tls": "verify_ca", "ca": str(wrong.cert)}
    cases = [
        # The servers' accounts: Baton could not read them, and the login says why.
        ("accounts", None, "CERTIFICATE_VERIFY_FAILED"),
        # A fixed list: the login passes, the first statement (PyMySQL's autocommit) fails.
        ("fixed", [{"name": "app", "password": "app-pass"}], "certificate does not verify"),
    ]
    for i, (name, users, cause) in enumerate(cases):
        b = start_baton(
            tls_box.config_path,
            work / name,
            port_hint() + 220 + 5 * i,
            detector={"enabled": False},
            extra={"backend": backend},
            users=users,
        )
        try:
            started = time.monotonic()
            with pytest.raises(pymysql.err.OperationalError) as refused:
                pymysql_tls(b, tls_box)
            # At once: not held for buffer.window (10 s) waiting for a primary that verifies.
            assert time.monotonic() - started < 5
            code, message = refused.value.args
            assert code == 1429
            assert cause in message
            assert metric(b.scrape(), "baton_backend_tls_failures_total", 0, server="db1") >= (
                users is not None
            )
            assert users is None or "TLS to db1 refused" in b.log.read_text()
        finally:
            b.stop()


def _cert_subject(port: int, ca: Path) -> str:
    """The subject of the certificate Baton presents now, as `openssl s_client` reads it."""
    out = subprocess.run(
        ["openssl", "s_client", "-starttls", "mysql", "-connect", f"127.0.0.1:{port}"]
        + ["-CAfile", str(ca), "-verify_return_error"],
        input="",
        capture_output=True,
        text=True,
        timeout=10,
    )
    assert "Verify return code: 0 (ok)" in out.stdout, out.stdout + out.stderr
    return next(line for line in out.stdout.splitlines() if line.startswith("subject="))


def test_reload_swaps_the_certificate_without_dropping_sessions(
    tls_box: Sandbox, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """With two worker processes: `ctl tls reload` and SIGHUP make every worker present the
    new certificate to new clients while a live TLS session carries on; a certificate that
    cannot be used is refused by the reload, which says why, and the old one stays."""
    work = tmp_path_factory.mktemp("tls-reload")
    files = work / "certs"
    files.mkdir()
    first = certs.make_cert(files, "first", tls_box.ca)
    second = certs.make_cert(files, "second", tls_box.ca)
    cert, key = files / "baton.pem", files / "baton.key"
    shutil.copy(first.cert, cert)
    shutil.copy(first.key, key)
    b = start_baton(
        tls_box.config_path,
        work,
        port_hint() + 230,
        proxy={"workers": 2},
        extra={"tls": {"cert": str(cert), "key": str(key)}},
    )
    try:
        live = pymysql_tls(b, tls_box)
        cur = live.cursor()
        cur.execute("SET @mine = 'kept'")
        assert "CN = first" in _cert_subject(b.port, tls_box.ca.cert)

        shutil.copy(second.cert, cert)
        shutil.copy(second.key, key)
        done = b.ctl("--json", "tls", "reload")
        assert done.returncode == 0, done.stderr
        proxies = json.loads(done.stdout)["proxies"]
        assert sorted(p["worker"] for p in proxies) == [0, 1]
        for _ in range(4):  # each worker in turn takes new connections
            assert "CN = second" in _cert_subject(b.port, tls_box.ca.cert)

        cert.write_text("not a certificate\n")
        bad = b.ctl("tls", "reload")
        assert bad.returncode == 1
        assert "tls reload failed, the certificate loaded before stays in use" in bad.stderr
        assert "worker 0:" in bad.stderr and "worker 1:" in bad.stderr
        assert "CN = second" in _cert_subject(b.port, tls_box.ca.cert)
        assert "TLS reload failed" in b.log.read_text()
        page = b.scrape()
        assert metric(page, "baton_tls_reloads_total", result="failed", worker="0") == 1

        shutil.copy(first.cert, cert)
        shutil.copy(first.key, key)
        os.kill(b.proc.pid, signal.SIGHUP)
        wait_for(
            "SIGHUP reloaded every worker",
            lambda: all(
                metric(b.scrape(), "baton_tls_reloads_total", 0, result="ok", worker=w) == 2
                for w in ("0", "1")
            ),
        )
        assert "CN = first" in _cert_subject(b.port, tls_box.ca.cert)
        cur.execute("SELECT @mine")
        assert cur.fetchone()[0] == "kept"  # the session from before every reload
        live.close()
    finally:
        b.stop()


@pytest.mark.parametrize(
    ("mode", "sql", "args"),
    [
        (BackendTls.OFF, "", ()),
        (BackendTls.PREFERRED, "", ()),
        (
            BackendTls.REQUIRED,
            ", MASTER_SSL=1, MASTER_SSL_CA='', MASTER_SSL_VERIFY_SERVER_CERT=0",
            (),
        ),
        (
            BackendTls.VERIFY_CA,
            ", MASTER_SSL=1, MASTER_SSL_CA=%s, MASTER_SSL_VERIFY_SERVER_CERT=0",
            ("/ca.pem",),
        ),
        (
            BackendTls.VERIFY_IDENTITY,
            ", MASTER_SSL=1, MASTER_SSL_CA=%s, MASTER_SSL_VERIFY_SERVER_CERT=1",
            ("/ca.pem",),
        ),
    ],
)
def test_replication_follows_backend_tls(mode: BackendTls, sql: str, args: tuple[str]) -> None:
    ca = "/ca.pem" if mode.verifies else ""
    assert replication_options(BackendSettings(tls=mode, ca=ca)) == (sql, args)


def test_emergency_reparent_over_tls(tmp_path_factory: pytest.TempPathFactory) -> None:
    """kill -9 of the primary of a TLS group, `ctl ers`: the fence and the repointing run over
    verified TLS (the admin connections and CHANGE MASTER follow backend.tls), the remaining
    replica replicates from the new primary over verified TLS, and a TLS client's writes go on
    through Baton on the new primary."""
    box = Sandbox(
        tmp_path_factory.mktemp("tls-ers"), base_port=sandbox_base_port(), replicas=2, tls=True
    )
    box.up()
    b = None
    try:
        admin_query(box.nodes()[0].port, "CREATE TABLE baton_test.ers_rows (id INT PRIMARY KEY)")
        b = start_baton(
            box.config_path,
            tmp_path_factory.mktemp("tls-ers-baton"),
            port_hint() + 240,
            detector={"enabled": False},
        )
        conn = pymysql_tls(b, box)
        cur = conn.cursor()
        cur.execute("INSERT INTO baton_test.ers_rows VALUES (1)")
        db1 = next(s for s in box.status()["servers"] if s["name"] == "db1")
        os.kill(db1["pid"], signal.SIGKILL)
        done = b.ctl("ers", "--to", "db2")
        assert done.returncode == 0, done.stdout + done.stderr
        cur.execute("INSERT INTO baton_test.ers_rows VALUES (2)")
        cur.execute("SELECT @@port")
        assert cur.fetchone()[0] == box.nodes()[1].port
        conn.close()
        db3 = box.nodes()[2]
        status = wait_for(
            "db3 replicates from db2",
            lambda: [
                s
                for s in admin_query(db3.port, "SHOW SLAVE STATUS")
                if s["Master_Port"] == box.nodes()[1].port and s["Slave_IO_Running"] == "Yes"
            ],
        )[0]
        assert status["Master_SSL_Allowed"] == "Yes"
        assert status["Master_SSL_Verify_Server_Cert"] == "Yes"
        assert status["Master_SSL_CA_File"] == str(box.ca.cert)
    finally:
        if b is not None:
            b.stop()
        box.down()


def test_servers_without_tls(sandbox: Sandbox, tmp_path_factory: pytest.TempPathFactory) -> None:
    """The shared sandbox has no TLS. `preferred` falls back to plain for the sessions and for
    the admin connections (Baton reads the accounts, so a login works); `required` refuses the
    servers, saying they offer no TLS."""
    work = tmp_path_factory.mktemp("tls-plain-servers")
    b = start_baton(
        sandbox.config_path,
        work / "preferred",
        port_hint() + 250,
        detector={"enabled": False},
        extra={"backend": {"tls": "preferred"}},
    )
    try:
        conn = b.connect(ssl_disabled=True)
        cur = conn.cursor()
        cur.execute("SHOW SESSION STATUS LIKE 'Ssl_version'")
        assert cur.fetchone()[1] == ""  # plain to the server
        conn.close()
    finally:
        b.stop()
    b = start_baton(
        sandbox.config_path,
        work / "required",
        port_hint() + 255,
        detector={"enabled": False},
        extra={"backend": {"tls": "required"}},
        users=[{"name": "app", "password": "app-pass"}],
    )
    try:
        with pytest.raises(pymysql.err.OperationalError) as refused:
            b.connect(ssl_disabled=True)
        code, message = refused.value.args
        assert code == 1429
        assert "offers no TLS, and backend.tls is required" in message
        assert metric(b.scrape(), "baton_backend_tls_failures_total", server="db1") >= 1
    finally:
        b.stop()


def test_compression_inside_tls(tbaton: Baton, tls_box: Sandbox) -> None:
    """Compression is layered inside TLS: the TLS transport hands Baton decrypted bytes to
    inflate, and Baton's deflated writes go out through the TLS transport that replaced the
    plain one at the upgrade. A result of a few MiB (many compressed packets, many TLS
    records) and a prepared statement read back as they do directly."""
    before = metric(tbaton.scrape(), "baton_client_compressed_sessions_total", absent=0.0)

    def session(port: int) -> list[object]:
        conn = mysql.connector.connect(
            host="127.0.0.1",
            port=port,
            user="app",
            password="app-pass",
            ssl_ca=str(tls_box.ca.cert),
            ssl_verify_cert=True,
            compress=True,
        )
        try:
            cur = conn.cursor()
            cur.execute("SHOW SESSION STATUS LIKE 'Ssl_cipher'")
            assert cur.fetchone()[1]  # the server's view: Baton's connection, also TLS
            cur.execute("SELECT REPEAT('x', 3000000), 42")
            big = cur.fetchone()
            pcur = conn.cursor(prepared=True)
            pcur.execute("SELECT ? + 1, CONCAT(?, 'b')", (41, "a"))
            return [len(big[0]), big[1], pcur.fetchone()]
        finally:
            conn.close()

    direct = session(tls_box.nodes()[0].port)
    assert session(tbaton.port) == direct
    after = metric(tbaton.scrape(), "baton_client_compressed_sessions_total", absent=0.0)
    assert after == before + 1


# -- logins over TLS (issue 16, logins) --------------------------------------------------------

LOGIN_USER, LOGIN_PASS = "tls_login", "tls-login-pass"
ED_USER, ED_PASS = "tls_ed", "tls-ed-pass"


@pytest.fixture(scope="module")
def login_accounts(tbaton: Baton, tls_box: Sandbox) -> Iterator[int]:
    """A mysql_native_password and an ed25519 account on the current primary (the ed25519
    plugin loaded on every server first: CREATE USER replicates). Yields the primary's port."""
    ports = {s["name"]: s["port"] for s in tls_box.status()["servers"]}
    for port in ports.values():
        if not admin_query(
            port, "SELECT 1 FROM information_schema.PLUGINS WHERE PLUGIN_NAME = 'ed25519'"
        ):
            admin_query(port, "INSTALL SONAME 'auth_ed25519'")
    primary = ports[json.loads(tbaton.ctl("--json", "status").stdout)["shards"][0]["primary"]]
    for sql in (
        f"CREATE USER '{LOGIN_USER}'@'127.0.0.1' IDENTIFIED BY '{LOGIN_PASS}'",
        f"CREATE USER '{ED_USER}'@'127.0.0.1' IDENTIFIED VIA ed25519 USING PASSWORD('{ED_PASS}')",
        f"GRANT ALL ON baton_test.* TO '{LOGIN_USER}'@'127.0.0.1', '{ED_USER}'@'127.0.0.1'",
    ):
        admin_query(primary, sql)
    yield primary


def _logins(b: Baton, method: str) -> float:
    return metric(b.scrape(), "baton_logins_total", absent=0.0, method=method)


def test_caching_sha2_over_tls_full_then_fast(
    tbaton: Baton, tls_box: Sandbox, login_accounts: int
) -> None:
    """mysql-connector-python offering caching_sha2_password over verified TLS: its first login
    is full (the password itself, under TLS), the next is fast; both run a binary-protocol
    prepared statement as their own account."""
    for method in ("caching_sha2_full", "caching_sha2_fast"):
        before = _logins(tbaton, method)
        conn = app_connector(
            tbaton.port,
            LOGIN_USER,
            LOGIN_PASS,
            auth_plugin="caching_sha2_password",
            ssl_ca=str(tls_box.ca.cert),
            ssl_verify_cert=True,
        )
        cur = conn.cursor(prepared=True)
        cur.execute("SELECT CURRENT_USER(), ?", (7,))
        assert list(cur.fetchone()) == [f"{LOGIN_USER}@127.0.0.1", 7]
        conn.close()
        assert _logins(tbaton, method) == before + 1


LOGIN_SQL = "SELECT CURRENT_USER(); PREPARE s FROM 'SELECT ? + 1'; SET @x = 41; EXECUTE s USING @x"


def _cli(
    port: int, box: Sandbox, user: str, password: str, *options: str
) -> subprocess.CompletedProcess[str]:
    tls = ("--ssl", f"--ssl-ca={box.ca.cert}", "--ssl-verify-server-cert")
    return mariadb_cli(port, user, password, LOGIN_SQL, *tls, *options)


def test_clear_password_over_tls(tbaton: Baton, tls_box: Sandbox, login_accounts: int) -> None:
    """The `mariadb` CLI sending mysql_clear_password: taken under TLS (as direct), where
    over plain text Baton refuses it (tests/test_logins.py)."""
    direct = _cli(
        login_accounts, tls_box, LOGIN_USER, LOGIN_PASS, "--default-auth=mysql_clear_password"
    )
    before = _logins(tbaton, "mysql_clear_password")
    through = _cli(
        tbaton.port, tls_box, LOGIN_USER, LOGIN_PASS, "--default-auth=mysql_clear_password"
    )
    assert direct.returncode == 0 and through.returncode == 0, direct.stderr + through.stderr
    assert through.stdout == direct.stdout == f"{LOGIN_USER}@127.0.0.1\n42\n"
    assert _logins(tbaton, "mysql_clear_password") == before + 1


def test_ed25519_over_tls_as_direct(tbaton: Baton, tls_box: Sandbox, login_accounts: int) -> None:
    direct = _cli(login_accounts, tls_box, ED_USER, ED_PASS)
    before = _logins(tbaton, "ed25519")
    through = _cli(tbaton.port, tls_box, ED_USER, ED_PASS)
    assert direct.returncode == 0 and through.returncode == 0, direct.stderr + through.stderr
    assert through.stdout == direct.stdout == f"{ED_USER}@127.0.0.1\n42\n"
    assert _logins(tbaton, "ed25519") == before + 1
