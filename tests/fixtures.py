"""Fixtures that run the real `baton serve` against the sandbox, as a separate process."""

from __future__ import annotations

import os
import re
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
import tomllib
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import pymysql
import pytest

from reparent.sandbox import Sandbox

ROOT = Path(__file__).resolve().parent.parent


def free_port(start: int) -> int:
    """The first port at or after `start` that nothing listens on (within 20000-29999)."""
    for port in range(start, 29999):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port")


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


def dump_toml(data: dict[str, Any]) -> str:
    """Enough TOML for Baton's config: tables, arrays of tables, scalars."""
    lines: list[str] = []

    def table(prefix: str, d: dict[str, Any]) -> None:
        for k, v in d.items():
            if not isinstance(v, dict | list):
                lines.append(f"{k} = {_toml_value(v)}")
        for k, v in d.items():
            if isinstance(v, dict):
                lines.append(f"\n[{prefix}{k}]")
                table(f"{prefix}{k}.", v)
            elif isinstance(v, list):
                for item in v:
                    lines.append(f"\n[[{prefix}{k}]]")
                    table(f"{prefix}{k}.", item)

    table("", data)
    return "\n".join(lines) + "\n"


@dataclass
class Baton:
    """A running `baton serve`; stopped by its pid."""

    proc: subprocess.Popen[bytes]
    config: Path
    port: int
    metrics_port: int
    socket: str
    log: Path

    def connect(self, **kw: Any) -> pymysql.Connection:
        kw.setdefault("user", "app")
        kw.setdefault("password", "app-pass")
        return pymysql.connect(host="127.0.0.1", port=self.port, autocommit=True, **kw)

    def ctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "proxy.cli", "ctl", "--socket", self.socket, *args],
            capture_output=True,
            text=True,
            timeout=30,
            cwd=ROOT,
        )

    def scrape(self) -> str:
        """Baton's Prometheus page."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as page:
            return page.read().decode()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


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


def metric(text: str, name: str, **labels: str) -> float:
    """The sample of `name` whose labels include `labels`, from a scraped page."""
    for line in text.splitlines():
        m = re.fullmatch(rf"{name}\{{(.*)\}} (\S+)", line)
        if m and all(f'{k}="{v}"' in m.group(1) for k, v in labels.items()):
            return float(m.group(2))
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


def start_baton(
    config_path: Path,
    workdir: Path,
    port_hint: int,
    proxy: dict[str, Any] | None = None,
    servers: list[dict[str, Any]] | None = None,
    controller: dict[str, Any] | None = None,
    detector: dict[str, Any] | None = None,
    buffer: dict[str, Any] | None = None,
    env: dict[str, str] | None = None,
    users: list[dict[str, str]] | None = None,
    nofile: int | None = None,
    extra: dict[str, dict[str, Any]] | None = None,
    adopt: bool = False,
) -> Baton:
    """Start Baton on fresh ports with a copy of the sandbox config, changed as asked
    (`users`: a fixed list of logins instead of the servers' accounts; `nofile`: its limit on
    open files, soft and hard; `extra`: other tables, merged key by key; `adopt`: `baton serve
    --adopt`)."""
    data = tomllib.loads(config_path.read_text())
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port(port_hint)
    metrics_port = free_port(port + 1)
    sock = str(workdir / "baton.sock")
    data["proxy"].update(listen_port=port, metrics_port=metrics_port, control_socket=sock)
    data["proxy"].update(proxy or {})
    data.setdefault("controller", {}).update(controller or {})
    if detector is not None:
        data.setdefault("detector", {}).update(detector)
    if buffer is not None:
        data.setdefault("buffer", {}).update(buffer)
    if servers is not None:
        data["shards"][0]["servers"] = servers
    if users is not None:
        data["users"] = users
    for table, values in (extra or {}).items():
        data.setdefault(table, {}).update(values)
    cfg = workdir / "baton.toml"
    cfg.write_text(dump_toml(data))
    log = workdir / "baton.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "proxy.cli",
                "serve",
                "--config",
                str(cfg),
                *(["--adopt"] if adopt else []),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env={**os.environ, **env} if env else None,
            preexec_fn=(
                (lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile)))
                if nofile
                else None
            ),
        )
    deadline = time.monotonic() + 20
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"baton exited: {log.read_text()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            if os.path.exists(sock):
                break
        except OSError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"baton did not start: {log.read_text()}")
        time.sleep(0.05)
    return Baton(proc, cfg, port, metrics_port, sock, log)


class WritablePoller(Background):
    """Polls @@read_only on every server every few ms; remembers any moment two were
    writable at once. A server that does not answer within `timeout` (down, killed,
    stopped) counts as not writable for that poll."""

    def __init__(self, ports: dict[str, int], timeout: float = 1.0) -> None:
        super().__init__()
        self.ports = ports
        self.timeout = timeout
        self.overlaps: list[list[str]] = []

    def run(self) -> None:
        conns: dict[str, pymysql.Connection | None] = dict.fromkeys(self.ports)
        while not self.stopping.is_set():
            writable = []
            for name, port in self.ports.items():
                try:
                    conn = conns[name] or admin_conn(port, self.timeout)
                    conns[name] = conn
                    with conn.cursor() as cur:
                        cur.execute("SELECT @@read_only")
                        if cur.fetchone()[0] == 0:
                            writable.append(name)
                except pymysql.MySQLError:
                    conns[name] = None  # down, or killed: not writable
            if len(writable) > 1:
                self.overlaps.append(writable)
            self.stopping.wait(0.005)
        for conn in conns.values():
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
        port_hint + 1,
        servers=[{"name": "gone", "host": "127.0.0.1", "port": dead, "role": "primary"}],
        users=[{"name": "app", "password": "app-pass"}],
        **changes,
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


def app_connector(port: int, **kw: Any) -> Any:
    """The application user through connector/python in pure Python (binary protocol)."""
    import mysql.connector

    return mysql.connector.connect(
        host="127.0.0.1", port=port, user="app", password="app-pass", use_pure=True, **kw
    )


def admin_conn(port: int, read_timeout: float | None = None) -> pymysql.Connection:
    """The controller's account: for checks the application user may not make. A
    `read_timeout` keeps a check of a stopped (SIGSTOP) server from hanging."""
    return pymysql.connect(
        host="127.0.0.1",
        port=port,
        user="baton_admin",
        password="admin-pass",
        autocommit=True,
        connect_timeout=2,
        read_timeout=read_timeout,
        ssl_disabled=True,
    )


def admin_query(port: int, sql: str) -> list[dict[str, Any]]:
    """One statement as admin; rows as dicts."""
    conn = admin_conn(port)
    try:
        cur = conn.cursor(pymysql.cursors.DictCursor)
        cur.execute(sql)
        return list(cur.fetchall())
    finally:
        conn.close()


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
