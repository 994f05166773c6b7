"""`make demo-fleet`: three Batons on one etcd in front of one sandbox, a client on each, a
planned switchover that none of the three clients sees as an error, then `kill -9` of one
Baton while the other two keep serving.

It shows what the fleet is for: the proxy is no single point of failure, and the Batons hold
and flush together because they follow one topology store. With --keep, everything stays up.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pymysql

from proxy.demo import ctl, step, wait_for_port
from reparent.config import load
from reparent.sandbox import Sandbox


class Client(threading.Thread):
    """Inserts through one Baton until stopped; counts inserts and errors, and remembers the
    slowest one (the pause it saw)."""

    def __init__(self, name: str, port: int) -> None:
        super().__init__(daemon=True)
        self.name, self.port = name, port
        self.inserts, self.errors, self.worst = 0, [], 0.0
        self.stopping = threading.Event()

    def run(self) -> None:
        conn = None
        while not self.stopping.is_set():
            t0 = time.perf_counter()
            try:
                if conn is None:
                    conn = pymysql.connect(
                        host="127.0.0.1",
                        port=self.port,
                        user="app",
                        password="app-pass",
                        autocommit=True,
                        connect_timeout=2,
                    )
                conn.cursor().execute("INSERT INTO baton_demo.visits (at) VALUES (NOW(6))")
                self.inserts += 1
                self.worst = max(self.worst, time.perf_counter() - t0)
            except pymysql.err.MySQLError as e:
                self.errors.append(str(e)[:120])
                conn = None
                time.sleep(0.2)

    def line(self) -> str:
        return (
            f"  client on {self.name}: {self.inserts} inserts, {len(self.errors)} errors, "
            f"slowest {self.worst * 1000:.0f} ms"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dir", default=".sandbox-fleet")
    parser.add_argument("--base-port", type=int, default=23501)
    parser.add_argument("--keep", action="store_true", help="leave everything running")
    args = parser.parse_args()

    box = Sandbox(Path(args.dir), base_port=args.base_port, replicas=2, etcd_members=1, proxies=3)
    step("sandbox: 1 primary + 2 replicas, etcd, and a config for each of 3 Batons")
    started = box.up()
    status = box.status()
    print(f"etcd at {' '.join(status['etcd']['endpoints'])}")
    batons: dict[str, subprocess.Popen[bytes]] = {}
    sockets: dict[str, str] = {}
    clients: list[Client] = []
    try:
        for p in status["proxies"]:
            cfg = load(p["config"])
            log = open(box.dir / f"{p['name']}.log", "ab")  # lives as long as that Baton
            batons[p["name"]] = subprocess.Popen(
                [sys.executable, "-m", "proxy.cli", "serve", "--config", p["config"]],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            sockets[p["name"]] = cfg.proxy.control_socket
            wait_for_port(cfg.proxy.listen_port, batons[p["name"]])
            print(f"{p['name']} serving {p['address']} (config {p['config']})")
        first = next(iter(sockets.values()))
        setup = pymysql.connect(
            host="127.0.0.1",
            port=int(status["proxies"][0]["address"].rsplit(":", 1)[1]),
            user="app",
            password="app-pass",
            autocommit=True,
        )
        setup.cursor().execute("CREATE DATABASE IF NOT EXISTS baton_demo")
        setup.cursor().execute(
            "CREATE TABLE IF NOT EXISTS baton_demo.visits"
            " (id INT AUTO_INCREMENT PRIMARY KEY, at DATETIME(6))"
        )
        setup.close()
        time.sleep(1.5)  # every Baton registered
        step("baton ctl status (on baton-1): the fleet")
        print(ctl(first, "status").stdout.rstrip())

        step("a client inserting through each Baton; `baton ctl prs` on baton-2 moves the primary")
        for p in status["proxies"]:
            clients.append(Client(p["name"], int(p["address"].rsplit(":", 1)[1])))
        for c in clients:
            c.start()
        time.sleep(1.5)
        out = ctl(sockets["baton-2"], "prs", "--to", "db2")
        print(out.stdout.rstrip() or out.stderr.rstrip())
        time.sleep(1.5)
        for c in clients:
            print(c.line())
        before = {c.name: (c.inserts, len(c.errors)) for c in clients}

        step("kill -9 baton-1: the clients of baton-2 and baton-3 carry on")
        os.kill(batons["baton-1"].pid, signal.SIGKILL)
        batons["baton-1"].wait()
        time.sleep(4)  # past its 3 s registration
        for c in clients:
            inserts, errors = before[c.name]
            print(
                f"  client on {c.name}: {c.inserts - inserts} inserts and "
                f"{len(c.errors) - errors} errors since the kill"
            )
        print(ctl(sockets["baton-3"], "status").stdout.rstrip())
        if args.keep:
            alive = {n: p.pid for n, p in batons.items() if p.poll() is None}
            print(f"\nleft running: Batons {alive}, sandbox in {box.dir}")
            print(
                f"stop with: kill {' '.join(map(str, alive.values()))}; "
                f"baton sandbox down --dir {box.dir}"
            )
            return 0
    finally:
        for c in clients:
            c.stopping.set()
        for c in clients:
            c.join(30)
        if not args.keep:
            for proc in batons.values():
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
                    proc.wait(10)
            if started:
                box.down()
            step("stopped the Batons and the sandbox")
    return 0


if __name__ == "__main__":
    sys.exit(main())
