"""`make demo`: a sandbox, Baton in front of it, a client whose queries go through, and two
planned switchovers under a write load that the clients see only as a short pause.

It shows the point: the client talks to Baton exactly as to MariaDB, Baton knows the session's
state, and moving the primary costs the applications no error. With --keep, everything stays
up for you to try (`mariadb -h127.0.0.1 -P<port> -uapp -papp-pass`); otherwise it stops what it
started.
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pymysql

from reparent.config import load
from reparent.sandbox import Sandbox


def wait_for_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"baton exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"baton did not listen on {port} within {timeout}s")


# The figures that tell the demo's story: what the clients sent, the two reparents, what the
# buffer held and flushed, the sessions moved, and any error Baton answered with.
FIGURES = (
    "baton_commands_total",
    "baton_reparents_total",
    "baton_buffer_held_total",
    "baton_buffer_flushed_total",
    "baton_buffer_evicted_total",
    "baton_sessions_moved_total",
    "baton_errors_total",
)


def figure_lines(page: str) -> list[str]:
    """FIGURES' samples from a Prometheus page, as `curl` shows them, leaving out the zeros
    (five eviction reasons that did not happen say less than one "0")."""
    lines = page.splitlines()
    shown = []
    for name in FIGURES:
        found = [
            line
            for line in lines
            if line.startswith((name + "{", name + " ")) and float(line.rsplit(" ", 1)[1]) != 0
        ]
        shown += found or [f"{name} 0"]
    return shown


def show_metrics(host: str, port: int) -> None:
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as page:
        for line in figure_lines(page.read().decode()):
            print(f"  {line}")


def step(text: str) -> None:
    print(f"\n== {text}", flush=True)


def ctl(control_socket: str, *args: str) -> subprocess.CompletedProcess[str]:
    """`baton ctl`, as an operator would run it."""
    return subprocess.run(
        [sys.executable, "-m", "proxy.cli", "ctl", "--socket", control_socket, *args],
        capture_output=True,
        text=True,
    )


def switch_under_load(port: int, control_socket: str) -> None:
    """Four clients write while the primary moves to db2 and back; they should see a pause."""
    step("4 clients insert rows while `baton ctl prs` moves the primary to db2, then back")
    stop = threading.Event()
    latencies: list[float] = []
    errors: list[str] = []

    def client() -> None:
        c = pymysql.connect(
            host="127.0.0.1",
            port=port,
            user="app",
            password="app-pass",
            autocommit=True,
            ssl_disabled=True,
        )
        cur = c.cursor()
        while not stop.is_set():
            t0 = time.perf_counter()
            try:
                cur.execute("INSERT INTO baton_demo.visits (at) VALUES (NOW(6))")
            except pymysql.err.MySQLError as e:
                errors.append(str(e))
            latencies.append(time.perf_counter() - t0)
        c.close()

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        for target in ("db2", "db1"):
            time.sleep(1.0)
            out = ctl(control_socket, "prs", "--to", target)
            print(out.stdout.rstrip() or out.stderr.rstrip())
        time.sleep(1.0)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    latencies.sort()
    print(
        f"\nclients: {len(latencies)} inserts, {len(errors)} errors, "
        f"median {latencies[len(latencies) // 2] * 1000:.1f} ms, "
        f"worst {latencies[-1] * 1000:.1f} ms (the pause they saw)"
    )
    for e in errors[:5]:
        print(f"  error: {e}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dir", default=".sandbox")
    parser.add_argument("--base-port", type=int, default=23301)
    parser.add_argument("--keep", action="store_true", help="leave sandbox and Baton running")
    args = parser.parse_args()

    box = Sandbox(Path(args.dir), base_port=args.base_port, replicas=2)
    step(f"sandbox: 1 primary + 2 replicas from port {args.base_port}")
    started_sandbox = box.up()
    cfg = load(box.config_path)
    log = open(box.dir / "baton.log", "ab")  # lives as long as Baton
    step(f"baton serve --config {box.config_path}")
    baton = subprocess.Popen(
        [sys.executable, "-m", "proxy.cli", "serve", "--config", str(box.config_path)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for_port(cfg.proxy.listen_port, baton)
        step(f"a client connects to Baton at 127.0.0.1:{cfg.proxy.listen_port} as app")
        conn = pymysql.connect(
            host="127.0.0.1",
            port=cfg.proxy.listen_port,
            user="app",
            password="app-pass",
            autocommit=True,
        )
        cur = conn.cursor()
        print(f"server version seen by the client: {conn.get_server_info()}")
        for sql in (
            "CREATE DATABASE IF NOT EXISTS baton_demo",
            "USE baton_demo",
            "CREATE TABLE IF NOT EXISTS visits (id INT AUTO_INCREMENT PRIMARY KEY, at DATETIME(6))",
            "INSERT INTO visits (at) VALUES (NOW(6))",
            "SET @greeting = 'hello', time_zone = '+01:00'",
            "SELECT COUNT(*) AS visits, MAX(at) AS last, @@hostname, @@port, @greeting FROM visits",
        ):
            cur.execute(sql)
            rows = cur.fetchall()
            print(f"  {sql}\n    -> {rows if rows else f'OK, {cur.rowcount} row(s)'}")
        step("baton ctl sessions: what Baton knows about that session")
        out = ctl(cfg.proxy.control_socket, "--json", "sessions")
        for s in json.loads(out.stdout):
            keep = ("id", "user", "backend", "schema", "variables", "user_variables", "last_gtid")
            print(json.dumps({k: s[k] for k in keep}, indent=2))
        conn.close()
        switch_under_load(cfg.proxy.listen_port, cfg.proxy.control_socket)
        step(f"metrics: curl http://{cfg.proxy.metrics_host}:{cfg.proxy.metrics_port}/metrics")
        show_metrics(cfg.proxy.metrics_host, cfg.proxy.metrics_port)
        if args.keep:
            print(f"\nleft running: baton pid {baton.pid}, sandbox in {box.dir}")
            print(f"  mariadb -h127.0.0.1 -P{cfg.proxy.listen_port} -uapp -papp-pass")
            print(f"  baton ctl --socket {cfg.proxy.control_socket} sessions")
            print(f"stop with: kill {baton.pid}; baton sandbox down --dir {box.dir}")
            return 0
    finally:
        if not args.keep:
            baton.send_signal(signal.SIGTERM)
            baton.wait(10)
            if started_sandbox:
                box.down()
            step("stopped Baton and the sandbox")
    return 0


if __name__ == "__main__":
    sys.exit(main())
