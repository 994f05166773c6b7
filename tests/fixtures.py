"""Fixtures that run the real `baton serve` against the sandbox, as a separate process, and
the helpers only tests use (the launcher itself and the clients tests share with the benchmarks
live in `harness/`)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Self

import pymysql
import pytest

from harness.baton import Baton, start_baton
from harness.clients import admin_conn
from harness.process import free_port
from reparent.etcdsandbox import EtcdCluster, EtcdSandboxError, pick_ports
from reparent.sandbox import Sandbox


def wait_for(what: str, check: Callable[[], Any], timeout: float = 10.0) -> Any:
    """Poll `check` until it returns something true (returned) or `timeout` passes (an
    AssertionError naming `what` and the last value). A MySQL error counts as not yet."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except pymysql.err.MySQLError as e:
            last = e
        else:
            if last:
                return last
        time.sleep(0.05)
    raise AssertionError(f"{what}: not within {timeout} s (last: {last!r})")


def metric(text: str, name: str, absent: float | None = None, **labels: str) -> float:
    """The sample of `name` whose labels include `labels`, from a scraped page (`absent`, if
    given, for a labelled sample not counted yet)."""
    for line in text.splitlines():
        m = re.fullmatch(rf"{name}(?:\{{(.*)\}})? (\S+)", line)
        if m and all(f'{k}="{v}"' in (m.group(1) or "") for k, v in labels.items()):
            return float(m.group(2))
    if absent is not None:
        return absent
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    raise AssertionError(f"no {name}{{{want}}} in metrics")


class Background:
    """A thread that runs `run` while a `with` block runs; `stopping` tells it to end."""

    JOIN_TIMEOUT = 20.0

    def __init__(self) -> None:
        self.stopping = threading.Event()
        self._thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        self._thread.join(self.JOIN_TIMEOUT)


class WritablePoller(Background):
    """Polls @@read_only on every server every few ms and remembers every moment two were
    writable at once.

    Servers read one after another are never a snapshot: under load one pass can outlast a
    whole switch, and "both read writable in one pass" would report the old primary before its
    demotion and the new one after its promotion. So an overlap is recorded only when it is
    certain: a server read writable twice in a row (so writable all along, unless it flipped
    twice in between) while another was read writable between those two reads. Passes go
    forward and then backward, so every pair of servers has reads of each other in between.
    A server that does not answer within `timeout` (down, killed, stopped) is not writable.
    """

    def __init__(self, ports: dict[str, int], timeout: float = 1.0) -> None:
        super().__init__()
        self.ports = ports
        self.timeout = timeout
        self.overlaps: list[list[str]] = []
        self.rounds = 0
        self._conns: dict[str, pymysql.Connection | None] = dict.fromkeys(ports)

    def _writable(self, name: str) -> bool:
        try:
            conn = self._conns[name] or admin_conn(self.ports[name], self.timeout)
            self._conns[name] = conn
            with conn.cursor() as cur:
                cur.execute("SELECT @@read_only")
                return cur.fetchone()[0] == 0
        except pymysql.MySQLError:
            self._conns[name] = None  # down, or killed: not writable
            return False

    def run(self) -> None:
        names = list(self.ports)
        read = 0  # reads so far, the clock of this poller
        previous: dict[str, tuple[int, bool]] = {}  # each server's last read: (when, writable)
        last_writable: dict[str, int] = {}  # when each server was last read writable
        while not self.stopping.is_set():
            for name in names if self.rounds % 2 == 0 else reversed(names):
                read += 1
                writable = self._writable(name)
                before = previous.get(name)
                previous[name] = (read, writable)
                if not writable:
                    continue
                if before is not None and before[1]:
                    others = [n for n, t in last_writable.items() if n != name and t > before[0]]
                    if others:
                        self.overlaps.append([name, *others])
                last_writable[name] = read
            self.rounds += 1
            self.stopping.wait(0.005)
        for conn in self._conns.values():
            if conn is not None:
                conn.close()


def start_baton_without_primary(
    config_path: Path, workdir: Path, port_hint: int, **changes: Any
) -> Baton:
    """Baton whose only server is a port nothing listens on (with a fixed list of logins:
    there is no server to read the accounts from)."""
    dead = free_port(port_hint)
    return start_baton(
        config_path,
        workdir,
        dead + 1,  # not port_hint + 1: that may be `dead` itself when port_hint was taken
        servers=[{"name": "gone", "host": "127.0.0.1", "port": dead, "role": "primary"}],
        users=[{"name": "app", "password": "app-pass"}],
        **changes,
    )


def current_primary(b: Baton) -> str:
    """The name of the primary Baton routes to now."""
    return str(json.loads(b.ctl("--json", "status").stdout)["shards"][0]["primary"])


def prs_across(b: Baton, threads: list[threading.Thread], stop: threading.Event) -> None:
    """Run `threads` across a planned switch to the other server of a two-server shard: they
    start, the PRS runs half a second later, and `stop` is set half a second after it."""
    for t in threads:
        t.start()
    try:
        time.sleep(0.5)
        target = "db2" if current_primary(b) == "db1" else "db1"
        out = b.ctl("--json", "prs", "--to", target)
        assert out.returncode == 0, out.stdout + out.stderr
        time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join(30)


MARIADB_PLUGIN_DIR = "/usr/lib/x86_64-linux-gnu/libmariadb3/plugin"  # client_ed25519 and others


def mariadb_cli(
    port: int, user: str, password: str, sql: str, *options: str
) -> subprocess.CompletedProcess[str]:
    """The `mariadb` CLI (libmariadb, with its client plugins) running `sql` on baton_test in
    batch mode; `options` choose TLS and the login plugin."""
    return subprocess.run(
        ["mariadb", "-h127.0.0.1", f"-P{port}", f"-u{user}", f"-p{password}"]
        + [f"--plugin-dir={MARIADB_PLUGIN_DIR}", "-N", "-B", *options, "baton_test", "-e", sql],
        capture_output=True,
        text=True,
        timeout=30,
    )


def port_hint() -> int:
    """Ports for Batons of this test run, apart from the sandbox's and other runs'."""
    return 26000 + (os.getpid() % 100) * 30


@pytest.fixture(scope="session")
def baton(sandbox: Sandbox, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Baton]:
    """Baton in front of the sandbox with the sandbox's own config."""
    b = start_baton(sandbox.config_path, tmp_path_factory.mktemp("baton"), port_hint())
    try:
        yield b
    finally:
        b.stop()


@pytest.fixture(scope="session")
def primary_port(sandbox: Sandbox) -> int:
    return next(s["port"] for s in sandbox.status()["servers"] if s["role"] == "primary")


@pytest.fixture
def direct(primary_port: int) -> Iterator[pymysql.Connection]:
    conn = app_conn(primary_port)
    try:
        yield conn
    finally:
        conn.close()


def app_conn(port: int, **kw: Any) -> pymysql.Connection:
    """The application user over TCP (text protocol), autocommit unless said otherwise."""
    kw.setdefault("autocommit", True)
    kw.setdefault("ssl_disabled", True)  # PyMySQL builds a TLS context per connect otherwise
    return pymysql.connect(host="127.0.0.1", port=port, user="app", password="app-pass", **kw)


def app_connector(port: int, user: str = "app", password: str = "app-pass", **kw: Any) -> Any:
    """The application user (or another) through connector/python in pure Python (binary
    protocol)."""
    import mysql.connector

    return mysql.connector.connect(
        host="127.0.0.1", port=port, user=user, password=password, use_pure=True, **kw
    )


def server_ports(box: Sandbox) -> dict[str, int]:
    return {s["name"]: s["port"] for s in box.status()["servers"]}


def private_sandbox(
    tmp_path_factory: pytest.TempPathFactory, name: str, replicas: int = 2
) -> Iterator[Sandbox]:
    """A sandbox of a test module's own, for tests that move the primary: the shared one
    must stay as it is."""
    from tests.conftest import sandbox_base_port

    sb = Sandbox(tmp_path_factory.mktemp(name), base_port=sandbox_base_port(), replicas=replicas)
    sb.up()
    try:
        yield sb
    finally:
        sb.down()


_SYSBENCH = [
    "sysbench",
    "--db-driver=mysql",
    "--mysql-host=127.0.0.1",
    "--mysql-user=app",
    "--mysql-password=app-pass",
    "--mysql-db=sbtest",
    "--tables=4",
    "--table-size=10000",
    "--rand-type=uniform",
]


def sysbench(port: int, *args: str, timeout: int = 120) -> list[str]:
    """sysbench against the sandbox's sbtest schema as the application user, killed if it
    outlives `timeout` (Debian's 1.0.20 can spin past --time on errors)."""
    return ["timeout", "-s", "KILL", str(timeout), *_SYSBENCH, f"--mysql-port={port}", *args]


def sysbench_counts(output: str) -> dict[str, int]:
    """transactions, ignored errors and reconnects from sysbench's summary."""
    names = {"transactions": "transactions", "errors": "ignored errors", "reconnects": "reconnects"}
    return {k: int(re.search(rf"{v}:\s+(\d+)", output).group(1)) for k, v in names.items()}


ETCD_PORTS = (22000, 23000)  # every etcd the tests start listens here, two ports per member


def etcd_cluster(directory: Path, members: int = 1) -> EtcdCluster:
    """A running etcd cluster on free loopback ports; a run that lost a race for its ports to a
    parallel run tries the next block."""
    for attempt in range(5):
        ports = pick_ports(2 * members, *ETCD_PORTS, seed=os.getpid() + attempt * 7919)
        cluster = EtcdCluster(directory / f"try{attempt}", ports)
        try:
            cluster.start()
            return cluster
        except EtcdSandboxError:
            cluster.stop()
            if attempt == 4:
                raise
    raise AssertionError("unreachable")


@pytest.fixture(scope="session")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    """One etcd member shared by the tests that need only a working etcd; each test uses a
    prefix of its own."""
    cluster = etcd_cluster(tmp_path_factory.mktemp("etcd"))
    try:
        yield cluster
    finally:
        cluster.stop()
