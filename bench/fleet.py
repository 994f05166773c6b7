"""`python -m bench.fleet`: the failover benchmark's fleet path: three Batons on etcd, the load
spread across them, planned switchovers driven from each Baton in turn.

One private sandbox (db1 primary, db2 and db3 replicas), one etcd member, three `baton serve`
on `[topology] store = "etcd"` (tests/fleet.py, the fleet tests' own harness). The load on each
Baton: sysbench `oltp_write_only` at a fixed rate, and a Python client of `--writers` threads
that each insert `--writer-rate` rows a second (paced: a stall is writes that did not happen)
and log every insert's start, end, outcome and Baton. `--switches` PRS, driven by baton-1,
baton-2, baton-3, baton-1, ... at fixed times, move the primary between db1 and db2.

Per Baton and overall: the client's errors, sysbench's errors, and the write pause of each
switch: the longest interval between two successful inserts through that Baton (overall: through
any Baton) that overlaps the switch's `ctl prs` call; its p50 and max over the switches. The
table goes to stdout and, with the exact command, the machine and the raw figures, to
OUT/fleet.md and OUT/fleet.json.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pymysql

from bench.record import load_average, machine_info
from bench.writes import paced_write_command, prepare_writes
from harness.fleet import Fleet, status
from reparent.etcdsandbox import EtcdCluster, pick_ports
from reparent.sandbox import Sandbox

ROOT = Path(__file__).resolve().parent.parent
ETCD_PORTS = (22000, 23000)
TABLE = "baton_test.fleet_probe"


class Writers:
    """`n` paced writers per Baton; `log` holds (baton, start, end, error) per insert."""

    def __init__(self, fleet: Fleet, n: int, rate: float) -> None:
        self.log: list[tuple[int, float, float, str | None]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._write, args=(i, b.port, rate), daemon=True)
            for i, b in enumerate(fleet.batons)
            for _ in range(n)
        ]

    def __enter__(self) -> Writers:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(30)

    def _write(self, baton: int, port: int, rate: float) -> None:
        conn = None
        due = time.monotonic()
        while not self._stop.is_set():
            due += 1 / rate
            start = time.monotonic()
            error = None
            try:
                if conn is None:
                    conn = pymysql.connect(
                        host="127.0.0.1",
                        port=port,
                        user="app",
                        password="app-pass",
                        autocommit=True,
                        connect_timeout=5,
                        read_timeout=60,
                    )
                conn.cursor().execute(f"INSERT INTO {TABLE} (baton) VALUES (%s)", (baton,))
            except pymysql.MySQLError as e:
                error = str(e)[:200]
                conn = None
            with self._lock:
                self.log.append((baton, start, time.monotonic(), error))
            self._stop.wait(max(0.0, due - time.monotonic()))


def pause(ends: list[float], lo: float, hi: float) -> float:
    """The longest gap between consecutive successful completions (sorted) overlapping
    [lo, hi], in ms."""
    gaps = [b - a for a, b in zip(ends, ends[1:], strict=False) if b >= lo and a <= hi]
    return max(gaps, default=0.0) * 1000


def analyse(
    log: list[tuple[int, float, float, str | None]], switches: list[dict[str, Any]], batons: int
) -> dict[str, Any]:
    rows = {}
    for who in [*range(batons), None]:
        mine = [e for e in log if who is None or e[0] == who]
        ends = sorted(end for _, _, end, error in mine if error is None)
        pauses = [pause(ends, s["called"], s["returned"]) for s in switches]
        rows["overall" if who is None else f"baton-{who + 1}"] = {
            "inserts": len(ends),
            "errors": sum(1 for e in mine if e[3] is not None),
            "error_samples": [e[3] for e in mine if e[3] is not None][:5],
            "pause_ms": [round(p, 1) for p in pauses],
            "pause_p50_ms": round(statistics.median(pauses), 1) if pauses else None,
            "pause_max_ms": round(max(pauses), 1) if pauses else None,
        }
    return rows


def table(rows: dict[str, Any], sysbench_errors: dict[str, int]) -> str:
    lines = [
        "| clients of | inserts | client errors | sysbench errors | write pause p50 | max |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, r in rows.items():
        sb = sysbench_errors.get(name, sum(sysbench_errors.values()))
        lines.append(
            f"| {name} | {r['inserts']} | {r['errors']} | {sb} | {r['pause_p50_ms']} ms "
            f"| {r['pause_max_ms']} ms |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fleet", description=__doc__)
    parser.add_argument("--duration", type=int, default=60, help="seconds of load")
    parser.add_argument("--switches", type=int, default=10, help="planned switchovers")
    parser.add_argument("--rate", type=int, default=50, help="sysbench tps per Baton")
    parser.add_argument("--writers", type=int, default=2, help="client writers per Baton")
    parser.add_argument("--writer-rate", type=float, default=100, help="inserts/s per writer")
    parser.add_argument("--base-port", type=int, default=21301, help="the sandbox's first port")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args(argv)
    machine = machine_info()  # its load average is the one at the start
    work = Path(tempfile.mkdtemp(prefix="bench-fleet-"))
    box = Sandbox(work / "sandbox", base_port=args.base_port, replicas=2)
    box.up()
    cluster = EtcdCluster(work / "etcd", pick_ports(2, *ETCD_PORTS))
    fleet = None
    benches: list[subprocess.Popen[str]] = []
    try:
        cluster.start()
        fleet = Fleet(box, cluster.endpoints, "/bench", work, args.base_port + 200)
        ports = {s["name"]: s["port"] for s in box.status()["servers"]}
        prepare_writes(ports["db1"])
        setup = fleet.batons[0].connect()
        setup.cursor().execute(
            f"CREATE TABLE IF NOT EXISTS {TABLE} (id BIGINT AUTO_INCREMENT PRIMARY KEY, baton INT)"
        )
        setup.close()
        print(
            f"fleet up: 3 Batons on etcd {cluster.endpoints[0]}; load {args.duration} s", flush=True
        )
        switches: list[dict[str, Any]] = []
        with Writers(fleet, args.writers, args.writer_rate) as writers:
            benches = [
                subprocess.Popen(
                    [
                        "timeout",
                        "-s",
                        "KILL",
                        str(args.duration + 60),
                        *paced_write_command(b.port, 2, args.duration, args.rate, "all"),
                    ],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                )
                for b in fleet.batons
            ]
            t0 = time.monotonic()
            gap = (args.duration - 6) / max(1, args.switches)
            for i in range(args.switches):
                time.sleep(max(0.0, t0 + 3 + i * gap - time.monotonic()))
                driver = fleet.batons[i % 3]
                primary = status(driver)["shards"][0]["primary"]
                target = "db2" if primary == "db1" else "db1"
                called = time.monotonic()
                out = driver.ctl("--json", "prs", "--to", target)
                returned = time.monotonic()
                report = json.loads(out.stdout) if out.returncode == 0 else None
                switches.append(
                    {
                        "driver": f"baton-{i % 3 + 1}",
                        "from": primary,
                        "to": target,
                        "called": called,
                        "returned": returned,
                        "outcome": report["outcome"] if report else out.stderr.strip()[-300:],
                        "not_drained": report["not_drained"] if report else None,
                        "phases_ms": {p["call"]: p["duration_ms"] for p in report["phases"]}
                        if report
                        else None,
                    }
                )
                print(
                    f"  prs {i + 1} from baton-{i % 3 + 1}: {primary} -> {target}: "
                    f"{switches[-1]['outcome']} in {(returned - called) * 1000:.0f} ms",
                    flush=True,
                )
            outputs = [p.communicate(timeout=args.duration + 90)[0] for p in benches]
        sysbench_errors = {}
        for i, output in enumerate(outputs):
            found = [line for line in output.splitlines() if "ignored errors:" in line]
            sysbench_errors[f"baton-{i + 1}"] = int(found[0].split()[2]) if found else -1
        rows = analyse(writers.log, switches, 3)
        record = {
            "command": shlex.join(["python", "-m", "bench.fleet", *(argv or sys.argv[1:])]),
            "machine": machine,
            "args": vars(args),
            "switches": switches,
            "rows": rows,
            "sysbench_errors": sysbench_errors,
            "load_average_end": load_average(),
        }
        text = "\n".join(
            [
                "# Fleet failover: three Batons on etcd, 10 PRS driven from each in turn",
                "",
                f"`{record['command']}` at commit {record['machine'].get('commit')}; load "
                f"average {record['machine'].get('load_average_start')} at the start, "
                f"{record['load_average_end']} at the end (2 cores, shared).",
                "",
                table(rows, sysbench_errors),
                "",
                "Write pause: per switch, the longest gap between two successful inserts "
                "through that Baton (overall: any Baton) overlapping the `ctl prs` call.",
                "",
                "| prs | driver | outcome | ctl prs ms | not drained |",
                "| ---: | --- | --- | ---: | --- |",
                *(
                    f"| {i + 1} | {s['driver']} | {s['outcome']} | "
                    f"{(s['returned'] - s['called']) * 1000:.0f} | {s['not_drained']} |"
                    for i, s in enumerate(switches)
                ),
                "",
            ]
        )
        print(text)
        out_dir = Path(args.out)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "fleet.md").write_text(text)
        (out_dir / "fleet.json").write_text(json.dumps(record, indent=1) + "\n")
        return 0
    finally:
        for p in benches:
            if p.poll() is None:
                p.kill()
        if fleet is not None:
            fleet.stop()
        cluster.stop()
        box.down()


if __name__ == "__main__":
    sys.exit(main())
