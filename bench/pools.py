"""`python -m bench.pools`: thousands of client sessions on a few server connections (issue 18).

N client sessions (an asyncio client speaking the protocol with Baton's own raw client) each
run one statement a second, spread over the second, for a given time: SELECT 1, or (for the
first W sessions) an INSERT. They go through Baton with `[pool] multiplex = true` against a
server whose max_connections is lowered, or straight to the server with enough connections.
Optionally N planned switchovers (`baton ctl --json prs`) move the primary while they run.

It reports errors by message, latency percentiles, the most server connections seen
(`Threads_connected`, polled every 0.2 s by the admin account), the pool's own figures, and
with switches each one's report and the most commands Baton held at once.

The sandbox is yours (`baton sandbox up`); its sbtest-like schema `bench_pools` is made here.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import random
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pymysql

from harness.baton import Baton, start_baton
from proxy.backend import BackendConnection, BackendError, BackendLogin
from proxy.packets import Cap

CAPS = (
    Cap.PROTOCOL_41
    | Cap.SECURE_CONNECTION
    | Cap.PLUGIN_AUTH
    | Cap.TRANSACTIONS
    | Cap.LONG_PASSWORD
    | Cap.MULTI_RESULTS
)
LOGIN = BackendLogin("app", hashlib.sha1(b"app-pass").digest())
DB = "sbtest"  # the account app may use


def admin(port: int, sql: str) -> list[tuple[Any, ...]]:
    conn = pymysql.connect(
        host="127.0.0.1", port=port, user="baton_admin", password="admin-pass", autocommit=True
    )
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
            return list(cur.fetchall())
    finally:
        conn.close()


class Poller(threading.Thread):
    """The most connections the servers had at once (Threads_connected), every 0.2 s."""

    def __init__(self, ports: list[int]) -> None:
        super().__init__(daemon=True)
        self.ports = ports
        self.most: dict[int, int] = dict.fromkeys(ports, 0)
        self.stop = threading.Event()

    def run(self) -> None:
        conns = {
            p: pymysql.connect(host="127.0.0.1", port=p, user="baton_admin", password="admin-pass")
            for p in self.ports
        }
        while not self.stop.wait(0.2):
            for p, c in conns.items():
                try:
                    with c.cursor() as cur:
                        cur.execute("SHOW GLOBAL STATUS LIKE 'Threads_connected'")
                        self.most[p] = max(self.most[p], int(cur.fetchone()[1]))
                except pymysql.MySQLError:
                    pass


class Load:
    def __init__(self, port: int, sessions: int, writers: int, seconds: float) -> None:
        self.port = port
        self.sessions = sessions
        self.writers = writers
        self.seconds = seconds
        self.latencies: list[float] = []
        self.write_latencies: list[float] = []
        self.errors: Counter[str] = Counter()
        self.connect_errors: Counter[str] = Counter()
        self.statements = 0

    async def session(self, i: int, start: float, go: asyncio.Event) -> None:
        try:
            conn = await BackendConnection.connect(
                "127.0.0.1", self.port, LOGIN, CAPS, 45, DB, 30.0
            )
        except BackendError as e:
            self.connect_errors[str(e)[:160]] += 1
            return
        write = i < self.writers
        sql = f"INSERT INTO {DB}.pools_t (v) VALUES ({i})" if write else "SELECT 1"
        await go.wait()
        rng = random.Random(i)
        next_at = time.monotonic() + rng.random()
        end = start + self.seconds
        try:
            while next_at < end:
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))
                t0 = time.monotonic()
                try:
                    await asyncio.wait_for(conn.query(sql), 30.0)
                except (BackendError, TimeoutError) as e:
                    self.errors[str(e)[:200]] += 1
                    if not conn.alive:
                        return
                else:
                    took = time.monotonic() - t0
                    (self.write_latencies if write else self.latencies).append(took)
                    self.statements += 1
                next_at += 1.0
        finally:
            conn.close()

    async def run(self, ramp: float) -> float:
        """Connect every session (over `ramp` seconds), then run; the start time."""
        go = asyncio.Event()
        start = time.monotonic() + ramp + 1.0
        tasks = []
        for i in range(self.sessions):
            tasks.append(asyncio.ensure_future(self.session(i, start, go)))
            if i % 100 == 99:
                await asyncio.sleep(ramp / max(1, self.sessions / 100))
        await asyncio.sleep(max(0.0, start - time.monotonic()))
        go.set()
        self.started = time.time()
        await asyncio.gather(*tasks)
        return start


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))] * 1000


def summary(name: str, load: Load, most: dict[int, int]) -> dict[str, Any]:
    every = load.latencies + load.write_latencies
    return {
        "name": name,
        "sessions": load.sessions,
        "statements": load.statements,
        "errors": sum(load.errors.values()),
        "connect_errors": sum(load.connect_errors.values()),
        "error_kinds": dict(load.errors.most_common(5)),
        "connect_error_kinds": dict(load.connect_errors.most_common(3)),
        "p50_ms": round(pct(every, 0.5), 2),
        "p99_ms": round(pct(every, 0.99), 2),
        "max_ms": round(pct(every, 1.0), 2),
        "write_p99_ms": round(pct(load.write_latencies, 0.99), 2),
        "write_max_ms": round(pct(load.write_latencies, 1.0), 2),
        "most_server_connections": most,
    }


async def switches(b: Baton, servers: list[str], count: int, every: float) -> list[dict[str, Any]]:
    reports = []
    await asyncio.sleep(every)
    for k in range(count):
        target = servers[(k + 1) % len(servers)]
        out = await asyncio.to_thread(b.ctl, "--json", "prs", "--to", target)
        try:
            r = json.loads(out.stdout)
            reports.append(
                {
                    "to": target,
                    "outcome": r["outcome"],
                    "total_ms": round(sum(p["duration_ms"] for p in r["phases"]), 1),
                    "held": r["held"],
                    "flushed": r["flushed"],
                    "evicted": r["evicted"],
                }
            )
        except (json.JSONDecodeError, KeyError):
            reports.append({"to": target, "error": (out.stdout + out.stderr)[-300:]})
        await asyncio.sleep(every)
    return reports


def sandbox_servers(directory: Path) -> tuple[dict[str, int], str]:
    """A running sandbox's servers by name, and its primary's name."""
    status = json.loads(
        subprocess.run(
            [".venv/bin/baton", "sandbox", "status", "--dir", str(directory), "--json"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    ports = {s["name"]: s["port"] for s in status["servers"]}
    return ports, next(s["name"] for s in status["servers"] if s["role"] == "primary")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sandbox", type=Path, required=True, help="a `baton sandbox up` dir")
    ap.add_argument("--port", type=int, default=25500, help="where Baton's ports start")
    ap.add_argument("--sessions", type=int, default=5000)
    ap.add_argument("--writers", type=int, default=0)
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--ramp", type=float, default=10, help="seconds to connect every session")
    ap.add_argument("--max-connections", type=int, default=200, help="the servers', for Baton")
    ap.add_argument("--pool-max", type=int, default=150, help="0: no sharing (for comparison)")
    ap.add_argument("--prs", type=int, default=0, help="planned switchovers during the run")
    ap.add_argument("--direct", action="store_true", help="also run straight to the primary")
    ap.add_argument("--buffer-size", type=int, default=10000)
    ap.add_argument("--workers", type=int, default=0, help="Baton's worker processes")
    args = ap.parse_args()

    ports, primary = sandbox_servers(args.sandbox)
    admin(ports[primary], f"CREATE DATABASE IF NOT EXISTS {DB}")
    admin(
        ports[primary],
        f"CREATE TABLE IF NOT EXISTS {DB}.pools_t (id BIGINT AUTO_INCREMENT PRIMARY KEY, v INT)",
    )
    results = []
    if args.direct:
        for p in ports.values():
            admin(p, f"SET GLOBAL max_connections = {args.sessions + 100}")
        poller = Poller(list(ports.values()))
        poller.start()
        load = Load(ports[primary], args.sessions, args.writers, args.seconds)
        asyncio.run(load.run(args.ramp))
        poller.stop.set()
        results.append(summary("direct", load, poller.most))
        print(json.dumps(results[-1]), flush=True)
    for p in ports.values():
        admin(p, f"SET GLOBAL max_connections = {args.max_connections}")
        if not args.pool_max:
            admin(p, f"SET GLOBAL max_connections = {args.sessions + 100}")
    b = start_baton(
        args.sandbox / "baton.toml",
        Path(f"/tmp/bench-pools-{args.port}"),
        args.port,
        extra={
            "pool": {
                "multiplex": args.pool_max > 0,
                "max": max(1, args.pool_max),
                "queue": 20000,
                "wait_timeout": 20,
            }
        },
        # Per worker, and the kernel does not split clients evenly between workers.
        proxy={"max_connections": 2 * args.sessions + 1000, "workers": args.workers},
        buffer={
            "size": args.buffer_size,
            "drain_concurrency": 64,
            "window": 20,
            "max_failover": 30,
        },
        controller={"grace": 5.0},
        detector={"enabled": False},
        nofile=20000,
    )
    try:
        poller = Poller(list(ports.values()))
        poller.start()
        load = Load(b.port, args.sessions, args.writers, args.seconds)

        async def both() -> list[dict[str, Any]]:
            run = asyncio.ensure_future(load.run(args.ramp))
            reports: list[dict[str, Any]] = []
            if args.prs:
                await asyncio.sleep(args.ramp + 2)
                every = max(2.0, (args.seconds - 4) / (args.prs + 1))
                reports = await switches(b, sorted(ports), args.prs, every)
            await run
            return reports

        reports = asyncio.run(both())
        poller.stop.set()
        name = f"baton pool.max={args.pool_max} workers={args.workers}"
        result = summary(name, load, poller.most)
        result["switches"] = reports
        metrics = b.scrape()
        keep = (
            "baton_buffer_most_held",
            "baton_pool_borrow_seconds_sum",
            "baton_pool_borrow_seconds_count",
            "baton_pool_restore_seconds_sum",
            "baton_pool_restore_seconds_count",
            "baton_pool_refused_total",
            "baton_buffer_evicted_total",
            "baton_buffer_hold_seconds_bucket",
            "baton_buffer_hold_seconds_sum",
            "baton_buffer_hold_seconds_count",
        )
        result["metrics"] = [line for line in metrics.splitlines() if line.startswith(keep)]
        result["pools"] = b.ctl("pools").stdout
        results.append(result)
        print(json.dumps(result, indent=1), flush=True)
    finally:
        b.stop()
        for p in ports.values():
            admin(p, "SET GLOBAL max_connections = 151")


if __name__ == "__main__":
    main()
