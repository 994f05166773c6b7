"""`python -m bench.compress`: what a compressed client session costs Baton, against a plain one.

Compression is Baton's own work (the server leg stays plain): it deflates every result it relays
to a compressed client and inflates every command. This measures it on a result-heavy workload,
where the cost is largest: each of `--clients` libmariadb sessions (MySQLdb) runs the same
SELECT of `--rows` rows (an id, an md5 and a padded string, about 100 bytes a row) again and
again, once with `compress=True` and once without, alternating so both meet the same
neighbours. The figures are Baton's CPU time (utime + stime from /proc) per 1,000 results and
per MiB relayed, the bytes on the client's wire, and the ratios compressed / plain (median of
`--repeat` runs).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import MySQLdb

from bench.cpu import cpu_seconds
from bench.process import exit_on_signals, progress
from bench.record import ROOT, head_lines, load_average, machine_info, neighbours, run_record
from bench.stack import running_stack
from harness.baton import Baton

SQL = "SELECT seq, md5(seq), concat(repeat('x', 40), seq) FROM seq_1_to_{rows}"


def net_bytes(port: int) -> int:
    """Bytes sent from `port` on loopback so far, from the kernel's TCP counters for the
    sockets on it (ss), so compressed and plain are measured the same way."""
    out = subprocess.run(
        ["ss", "-tinH", "state", "established", f"( sport = :{port} )"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    total = 0
    for word in out.split():
        if word.startswith("bytes_acked:"):
            total += int(word.split(":")[1])
    return total


def run(baton: Baton, compress: bool, clients: int, queries: int, rows: int) -> dict[str, float]:
    """`clients` sessions, `queries` results each; Baton's CPU and the client wire's bytes."""
    conns = [
        MySQLdb.connect(
            host="127.0.0.1",
            port=baton.port,
            user="app",
            password="app-pass",
            database="sbtest",
            # mysqlclient turns compression on for any `compress` given, False too.
            **({"compress": True} if compress else {}),
        )
        for _ in range(clients)
    ]
    sql = SQL.format(rows=rows)
    sizes: list[int] = []
    failures: list[BaseException] = []

    def work(conn: MySQLdb.Connection) -> None:
        cur = conn.cursor()
        try:
            for _ in range(queries):
                cur.execute(sql)
                sizes.append(sum(len(r[1]) + len(r[2]) + 8 for r in cur.fetchall()))
        except MySQLdb.Error as e:
            failures.append(e)

    try:
        wire_before = net_bytes(baton.port)
        before = cpu_seconds(baton.proc.pid)
        started = time.monotonic()
        threads = [threading.Thread(target=work, args=(c,)) for c in conns]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        seconds = time.monotonic() - started
        used = cpu_seconds(baton.proc.pid) - before
        wire = net_bytes(baton.port) - wire_before
    finally:
        for c in conns:
            c.close()
    if failures:
        raise SystemExit(f"{len(failures)} clients failed: {failures[0]}")
    results = clients * queries
    return {
        "ms_per_1000": used / results * 1e6,
        "ms_per_mib": used / (sum(sizes) / (1 << 20)) * 1e3,
        "wire_mib": wire / (1 << 20),
        "results_per_s": results / seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.compress", description=__doc__)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--queries", type=int, default=100, help="results per client per run")
    parser.add_argument("--rows", type=int, default=1000, help="rows per result")
    parser.add_argument("--repeat", type=int, default=5, help="runs of each; the median counts")
    parser.add_argument("--base-port", type=int, default=23701, help="port of the primary")
    parser.add_argument("--service-port", type=int, default=23750, help="Baton's ports from")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "compress.md")
    args = parser.parse_args()
    command = " ".join(["python -m bench.compress", *sys.argv[1:]])
    machine, neighbours_start = machine_info(), neighbours()
    lines: list[str] = []
    with exit_on_signals(), running_stack(args.base_port, 1, args.service_port) as stack:
        figures: dict[bool, list[dict[str, float]]] = {False: [], True: []}
        for i in range(args.repeat):
            for compress in (False, True):
                f = run(stack.baton, compress, args.clients, args.queries, args.rows)
                figures[compress].append(f)
                line = (
                    f"run {i + 1} {'compressed' if compress else 'plain'}: "
                    f"{f['ms_per_1000']:.0f} ms CPU per 1,000 results, "
                    f"{f['ms_per_mib']:.1f} ms per MiB, {f['wire_mib']:.1f} MiB on the wire, "
                    f"{f['results_per_s']:.0f} results/s (load {load_average()[0]})"
                )
                progress(line)
                lines.append(f"- {line}")
    median = {
        c: {k: statistics.median(f[k] for f in runs) for k in runs[0]}
        for c, runs in figures.items()
    }
    plain, zipped = median[False], median[True]
    summary = (
        f"{args.clients} clients x {args.queries} results of {args.rows} rows, median of "
        f"{args.repeat}:\n\n"
        "| session | Baton CPU per 1,000 results | per MiB of rows | MiB to clients | results/s |\n"
        "|---|---:|---:|---:|---:|\n"
        + "".join(
            f"| {name} | {m['ms_per_1000']:.0f} ms | {m['ms_per_mib']:.2f} ms | "
            f"{m['wire_mib']:.1f} | {m['results_per_s']:.0f} |\n"
            for name, m in (("plain", plain), ("compressed", zipped))
        )
        + f"\ncompressed / plain: CPU {zipped['ms_per_1000'] / plain['ms_per_1000']:.2f}x, "
        f"bytes to clients {zipped['wire_mib'] / plain['wire_mib']:.2f}x, "
        f"throughput {zipped['results_per_s'] / plain['results_per_s']:.2f}x\n"
    )
    print(summary)
    record = run_record(args, command, machine, neighbours_start)
    header = head_lines("A compressed session's cost to Baton, against a plain one", record)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join([*header, "", summary, "Every run:", "", *lines]) + "\n")


if __name__ == "__main__":
    main()
