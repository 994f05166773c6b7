"""HAProxy in TCP mode, the yardstick every benchmark compares Baton with, and the health
agents that make it a failover peer.

HAProxy is what Baton replaces, and it does nothing a protocol-aware proxy does, so "Baton /
HAProxy" is the price of parsing the protocol. It runs in the foreground in its own session, so
only the benchmark decides when it stops.
"""

from __future__ import annotations

import csv
import os
import socket
import subprocess
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pymysql

from bench.process import binary, wait_listening
from harness.clients import connect
from harness.process import STOP_TIMEOUT, stop_process
from reparent.sandbox import ADMIN, HOST


@dataclass
class HAProxy:
    """A foreground `haproxy` in its own session, so only we decide when it stops."""

    proc: subprocess.Popen[bytes]
    config: Path
    port: int
    log: Path
    stats: Path | None  # its admin socket, in health-check mode

    def stop(self) -> None:
        stop_process(self.proc)

    def up_servers(self) -> list[str]:
        """The servers HAProxy would route to now, by its own health checks."""
        if self.stats is None:
            raise RuntimeError("haproxy was started without health checks")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(str(self.stats))
            s.sendall(b"show stat\n")
            text = b"".join(iter(lambda: s.recv(65536), b"")).decode()
        rows = list(csv.DictReader(text.lstrip("# ").splitlines()))
        return [
            r["svname"]
            for r in rows
            if r["svname"] not in ("FRONTEND", "BACKEND") and r["status"] == "UP"
        ]


def start_haproxy(
    workdir: Path,
    port: int,
    servers: list[tuple[str, int]],
    health_ports: list[int] | None = None,
) -> HAProxy:
    """HAProxy in TCP mode on `port` in front of `servers` (host, port), first one preferred.

    `balance first` sends every connection to the first server that is up, which is how HAProxy
    is put in front of a primary. Without `health_ports` there is no health check, so it never
    marks a server down on its own. With them, each server is checked every 100 ms over HTTP
    on its port there (a HealthAgent: 200 only when writable), one failed check marks it down
    and closes its sessions, one good check marks it up: HAProxy set up as a failover peer, as
    fast as its checks allow. (`option mysql-check` would only test that a server is alive, not
    that it takes writes; without `shutdown-sessions` clients stay on a demoted primary.)
    """
    workdir.mkdir(parents=True, exist_ok=True)
    stats = workdir / "haproxy.sock" if health_ports is not None else None
    # A thread per core, as HAProxy is run in front of a primary (its default since 2.5, said
    # here so the comparison does not hang on the version).
    lines = ["global", "    maxconn 4096", f"    nbthread {len(os.sched_getaffinity(0))}"]
    if stats is not None:
        lines.append(f"    stats socket {stats} mode 600 level admin")
    lines += [
        "",
        "defaults",
        "    mode tcp",
        "    timeout connect 2s",
        "    timeout client 1h",
        "    timeout server 1h",
        "",
        "frontend mysql",
        f"    bind {HOST}:{port}",
        "    default_backend primary",
        "",
        "backend primary",
        "    balance first",
    ]
    checks = [""] * len(servers)
    if health_ports is not None:
        lines += [
            "    option httpchk GET /",
            "    timeout check 500ms",
            "    default-server inter 100 fastinter 100 downinter 100 fall 1 rise 1 "
            "on-marked-down shutdown-sessions",
        ]
        checks = [f" check port {p}" for p in health_ports]
    lines += [
        f"    server db{i + 1} {host}:{p}{check}"
        for i, ((host, p), check) in enumerate(zip(servers, checks, strict=True))
    ]
    config = workdir / "haproxy.cfg"
    config.write_text("\n".join(lines) + "\n")
    log = workdir / "haproxy.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [binary("haproxy"), "-db", "-f", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    wait_listening(proc, port, log, "haproxy")
    return HAProxy(proc, config, port, log, stats)


class _CheckHandler(BaseHTTPRequestHandler):
    """Answers HAProxy's check: 200 when the agent's server is writable, else 503."""

    server: _AgentServer

    def do_GET(self) -> None:
        self.send_response(200 if self.server.agent.writable() else 503)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        """Silent: ten checks a second per server would bury the progress lines."""


class _AgentServer(HTTPServer):
    agent: HealthAgent


class HealthAgent:
    """The tiny script behind HAProxy's HTTP check for one MariaDB server, in a thread.

    It asks `@@read_only` over one persistent admin connection, so a check costs one query, not
    a login; a server that does not answer, or is read-only, gets 503. The admin account is
    used because it is the one that may read a fenced server; it never writes.
    """

    def __init__(self, server_port: int, port: int) -> None:
        self.server_port = server_port
        self.port = port
        self._conn: pymysql.Connection | None = None
        self._http = _AgentServer((HOST, port), _CheckHandler)
        self._http.agent = self
        self._thread = threading.Thread(
            target=self._http.serve_forever, args=(0.05,), name=f"health-{port}", daemon=True
        )
        self._thread.start()

    def writable(self) -> bool:
        try:
            if self._conn is None:
                self._conn = connect(self.server_port, ADMIN, connect_timeout=0.4, read_timeout=0.4)
            with self._conn.cursor() as cur:
                cur.execute("SELECT @@read_only")
                return int(cur.fetchone()[0]) == 0
        except pymysql.MySQLError:
            if self._conn is not None:
                self._conn.close()
            self._conn = None
            return False

    def stop(self) -> None:
        self._http.shutdown()
        self._http.server_close()
        self._thread.join(STOP_TIMEOUT)
        if self._conn is not None:
            self._conn.close()
