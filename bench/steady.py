"""`python -m bench.steady`: steady-state throughput and latency, direct vs Baton vs HAProxy.

sysbench runs each workload x threads x ps-mode against the primary of a private sandbox:
directly, through Baton in one process (`baton`, `proxy.workers = 0`), through Baton with one
worker process (`baton-w1`) and with one per core (`baton-wN`), and through HAProxy in TCP
mode with a thread per core. The table gives qps and p95 latency per path, qps as a ratio to
direct (the cost of any hop) and to HAProxy (the cost of Baton over a proxy that only copies
bytes), and each proxy's CPU time per 1,000 commands: utime + stime of all its processes
(supervisor and workers; HAProxy's threads) from /proc over the run, divided by the queries
sysbench counted. Unlike qps, that figure hardly moves with what else runs on the machine. It
goes to stdout and, with the machine, the exact commands and every raw run, to OUT/steady.md
and OUT/steady.json.

Why it is built this way:
- The three paths of one combination run back to back, and repeats cycle through all three, so
  drift (a neighbour's load, a warming cache) falls on every path alike instead of on one.
- Everything shares 2 cores here (sysbench, servers, proxies), so a ratio on this machine is
  only a ratio on this machine; the load average is recorded at the start of every run so that
  noise from other work can be seen in the record.
- Both `--db-ps-mode` values: `disable` sends text queries, `auto` server-side prepared
  statements, which Baton must relay with its own statement ids.
- TLS paths (asked for by name in --paths; the sandbox then takes TLS too): sysbench with
  `--mysql-ssl=on` directly to the primary (`direct-tls`), through HAProxy in TCP mode, which
  passes the TLS session through to the server (`haproxy-tls`), and through a Baton that ends
  the client's TLS and makes its own to the server, verified (`baton-tls`: the sandbox's
  config, `[tls]` and backend.tls = verify_identity). A TLS path's ratios are to the TLS
  paths of the same combination.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench.process import exit_on_signals, progress
from bench.record import ROOT, load_average, machine_info
from bench.stack import BENCH_PORT_HINT, Stack, running_stack
from bench.sysbench import SysbenchRun, run_sysbench, sysbench_command, sysbench_prepare
from harness.baton import Baton, start_baton
from reparent import certs

CORES = len(os.sched_getaffinity(0))
PLAIN_PATHS = ("direct", "baton", "baton-w1", f"baton-w{CORES}", "haproxy")
TLS_PATHS = ("direct-tls", "baton-tls", "haproxy-tls")
PATHS = PLAIN_PATHS + TLS_PATHS
PS_MODES = ("disable", "auto")
PORT_RANGE = range(20000, 30000)  # the ports this machine's benchmarks may use


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _subset(value: str, allowed: tuple[str, ...]) -> list[str]:
    items = _csv(value)
    unknown = [v for v in items if v not in allowed]
    if unknown or not items:
        raise argparse.ArgumentTypeError(f"choose from {','.join(allowed)}; got {value!r}")
    return items


def _thread_counts(value: str) -> list[int]:
    try:
        counts = [int(v) for v in _csv(value)]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"comma-separated positive integers; got {value!r}")
    return counts


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.steady", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--duration", type=int, help="seconds per run (default 10, --quick 3)")
    parser.add_argument(
        "--threads", type=_thread_counts, help="sysbench thread counts (default 8,16, --quick 8)"
    )
    parser.add_argument(
        "--workloads", type=_csv, default="oltp_point_select,oltp_read_write", help="sysbench tests"
    )
    parser.add_argument(
        "--ps-modes",
        type=lambda v: _subset(v, PS_MODES),
        default="disable,auto",
        help="sysbench --db-ps-mode values",
    )
    parser.add_argument(
        "--paths",
        type=lambda v: _subset(v, PATHS),
        default=",".join(PLAIN_PATHS),
        help=f"where sysbench connects (also {','.join(TLS_PATHS)})",
    )
    parser.add_argument("--repeat", type=int, default=1, help="runs per path; the median counts")
    parser.add_argument("--tables", type=int, default=4, help="sysbench --tables")
    parser.add_argument("--table-size", type=int, default=10000, help="rows per table")
    parser.add_argument("--out", type=Path, help="results dir (default bench/results)")
    parser.add_argument("--base-port", type=int, default=22301, help="port of the primary")
    parser.add_argument("--replicas", type=int, default=1, help="replicas of the primary")
    parser.add_argument(
        "--service-port", type=int, default=BENCH_PORT_HINT, help="proxies' ports from here"
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 3 s, 8 threads, results to a temp dir"
    )
    return parser


def resolve(args: argparse.Namespace, parser: argparse.ArgumentParser) -> argparse.Namespace:
    """Apply the --quick defaults, then refuse what would fail only minutes into the run."""
    # argparse applies `type` to string defaults, so these are lists already.
    if args.duration is None:
        args.duration = 3 if args.quick else 10
    if args.threads is None:
        args.threads = [8] if args.quick else [8, 16]
    if args.out is None:
        args.out = (
            Path(tempfile.mkdtemp(prefix="steady-quick-")) if args.quick else ROOT / "bench/results"
        )
    if args.duration < 1 or args.repeat < 1 or args.tables < 1 or args.table_size < 1:
        parser.error("--duration, --repeat, --tables and --table-size must be at least 1")
    if args.base_port not in PORT_RANGE or args.base_port + args.replicas not in PORT_RANGE:
        parser.error(f"servers must fit in ports {PORT_RANGE.start}-{PORT_RANGE.stop - 1}")
    return args


def sysbench_options(
    args: argparse.Namespace, threads: int, ps_mode: str, tls: bool = False
) -> dict[str, str | int]:
    return {
        **({"mysql-ssl": "on"} if tls else {}),
        "tables": args.tables,
        "table-size": args.table_size,
        "threads": threads,
        "time": args.duration,
        "events": 0,
        "report-interval": 0,
        "percentile": 95,
        "rand-type": "uniform",
        "db-ps-mode": ps_mode,
    }


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(utime, stime) of a process (all its threads) so far, in seconds; 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            # The command name (field 2) may hold spaces; the fields after its ')' are fixed.
            fields = f.read().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return 0.0, 0.0
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def process_tree(pid: int) -> list[int]:
    """`pid` and its children (a supervisor's workers), read from /proc now."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except FileNotFoundError:
        return [pid]
    return [pid, *(int(c) for c in children)]


def tree_cpu(pids: list[int]) -> tuple[float, float]:
    """(utime, stime) of the processes, summed."""
    times = [cpu_seconds(p) for p in pids]
    return sum(u for u, _ in times), sum(s for _, s in times)


def sysbench_tls_files(stack: Stack) -> Path:
    """sysbench 1.0's --mysql-ssl=on reads fixed names from its working directory: the CA
    (cacert.pem) that checks the server, and a client certificate and key, here signed by the
    sandbox's CA (the servers verify one they are given; Baton asks for none)."""
    folder = stack.workdir / "sysbench-tls"
    client = certs.make_cert(folder, "client", stack.sandbox.ca)
    client.cert.rename(folder / "client-cert.pem")
    client.key.rename(folder / "client-key.pem")
    shutil.copy(stack.sandbox.ca.cert, folder / "cacert.pem")
    return folder


def start_worker_batons(stack: Stack, paths: list[str]) -> dict[str, Baton]:
    """The Batons with workers the paths ask for, beside the stack's own (one process); each
    with a store of its own and no failure detector (the stack's Baton has one)."""
    batons = {}
    if "baton-tls" in paths:
        batons["baton-tls"] = start_baton(
            stack.sandbox.config_path,
            stack.workdir / "baton_tls",
            stack.haproxy.port + 50,
            controller={"store": str(stack.workdir / "baton_tls" / "store.json")},
            detector={"enabled": False},
        )
    for path in paths:
        if not path.startswith("baton-w"):
            continue
        name = path.replace("-", "_")
        batons[path] = start_baton(
            stack.sandbox.config_path,
            stack.workdir / name,
            stack.haproxy.port + 10 * (len(batons) + 1),
            proxy={"workers": int(path.removeprefix("baton-w"))},
            controller={"store": str(stack.workdir / name / "store.json")},
            detector={"enabled": False},
        )
    return batons


def run_all(
    args: argparse.Namespace,
    ports: dict[str, int],
    check: Callable[[], None],
    pids: dict[str, int],
    tls_dir: Path | None = None,
) -> list[dict[str, Any]]:
    """Every run, in the interleaved order; `check` raises if a proxy has died; `pids` are
    each proxy's main process, whose CPU time (with its children's) is taken over each run;
    TLS paths run sysbench in `tls_dir` (`sysbench_tls_files`)."""
    combos = [
        (w, t, m, r, p)
        for w in args.workloads
        for t in args.threads
        for m in args.ps_modes
        for r in range(args.repeat)
        for p in args.paths
    ]
    runs: list[dict[str, Any]] = []
    for i, (workload, threads, ps_mode, rep, path) in enumerate(combos, 1):
        load = load_average()[0]
        options = sysbench_options(args, threads, ps_mode, path in TLS_PATHS)
        tree = process_tree(pids[path]) if path in pids else []
        cpu_before = tree_cpu(tree)
        command = sysbench_command(workload, ports[path], "run", options)
        if path in TLS_PATHS:
            assert tls_dir is not None
            command = ["env", f"--chdir={tls_dir}", *command]  # where it reads its TLS files
        run: SysbenchRun = run_sysbench(command, args.duration)
        cpu_after = tree_cpu(tree)
        check()
        r = run.result
        cpu_ms = user_ms = None
        if r is not None and tree and r.qps > 0:
            per_1000 = 1e6 / (r.qps * r.seconds)  # seconds -> ms per 1,000 commands
            user_ms = (cpu_after[0] - cpu_before[0]) * per_1000
            cpu_ms = user_ms + (cpu_after[1] - cpu_before[1]) * per_1000
        label = f"[{i}/{len(combos)}] {workload} t={threads} ps={ps_mode} #{rep + 1} {path:7}"
        if r is None:
            progress(f"{label} FAILED: {run.problem}: {run.output.strip()[-300:]}")
        else:
            cpu_text = "" if cpu_ms is None else f"  cpu {cpu_ms:5.1f} ms/1k"
            progress(
                f"{label} {r.qps:9.0f} qps  p95 {r.p95_ms:6.2f} ms  errors {r.errors}"
                f"  reconnects {r.reconnects}{cpu_text}  (load {load})"
            )
        runs.append(
            {
                "workload": workload,
                "threads": threads,
                "ps_mode": ps_mode,
                "repeat": rep + 1,
                "path": path,
                "load_1m_before": load,
                "command": shlex.join(run.command),
                "returncode": run.returncode,
                "problem": run.problem,
                "result": None if r is None else asdict(r),
                "cpu_ms_per_1000": cpu_ms,
                # utime alone: the proxy's own code; the rest (stime) is the kernel's work
                # for it, sockets and scheduling, which every proxy pays alike.
                "user_ms_per_1000": user_ms,
                "output_tail": None if r is not None else run.output[-2000:],
            }
        )
    return runs


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per workload x threads x ps-mode x path: medians of the good runs, sums of
    errors and reconnects, and qps relative to direct and to HAProxy in the same combination."""
    groups: dict[tuple[str, int, str, str], list[dict[str, Any]]] = {}
    for run in runs:
        key = (run["workload"], run["threads"], run["ps_mode"], run["path"])
        groups.setdefault(key, []).append(run)
    rows: list[dict[str, Any]] = []
    for (workload, threads, ps_mode, path), group in groups.items():
        good = [g["result"] for g in group if g["result"] is not None]
        cpu = [g["cpu_ms_per_1000"] for g in group if g.get("cpu_ms_per_1000") is not None]
        rows.append(
            {
                "workload": workload,
                "threads": threads,
                "ps_mode": ps_mode,
                "path": path,
                "runs": len(group),
                "failed": len(group) - len(good),
                "qps": statistics.median(g["qps"] for g in good) if good else None,
                "tps": statistics.median(g["tps"] for g in good) if good else None,
                "p95_ms": statistics.median(g["p95_ms"] for g in good) if good else None,
                "cpu_ms": statistics.median(cpu) if cpu else None,
                "errors": sum(g["errors"] for g in good),
                "reconnects": sum(g["reconnects"] for g in good),
            }
        )
    by_key = {(r["workload"], r["threads"], r["ps_mode"], r["path"]): r for r in rows}
    for row in rows:
        suffix = "-tls" if row["path"] in TLS_PATHS else ""
        for base in ("direct", "haproxy"):
            ref = by_key.get((row["workload"], row["threads"], row["ps_mode"], base + suffix))
            ok = ref is not None and ref["qps"] and row["qps"] is not None
            row[f"ratio_{base}"] = row["qps"] / ref["qps"] if ok else None
        ref = by_key.get((row["workload"], row["threads"], row["ps_mode"], "haproxy" + suffix))
        ok = ref is not None and ref["cpu_ms"] and row["cpu_ms"] is not None
        row["cpu_ratio_haproxy"] = row["cpu_ms"] / ref["cpu_ms"] if ok else None
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    """The markdown table; '-' where a number does not exist (a failed run, a path not run)."""

    def num(value: float | None, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    lines = [
        "| workload | threads | ps-mode | path | qps | p95 ms | ratio to direct "
        "| ratio to HAProxy | CPU ms per 1,000 commands | CPU to HAProxy's | errors | reconnects |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        qps = "FAILED" if r["qps"] is None else f"{r['qps']:,.0f}"
        if r["failed"] and r["qps"] is not None:
            qps += f" ({r['failed']} of {r['runs']} failed)"
        lines.append(
            f"| {r['workload']} | {r['threads']} | {r['ps_mode']} | {r['path']} | {qps} "
            f"| {num(r['p95_ms'], '.2f')} | {num(r['ratio_direct'], '.2f')} "
            f"| {num(r['ratio_haproxy'], '.2f')} | {num(r.get('cpu_ms'), '.1f')} "
            f"| {num(r.get('cpu_ratio_haproxy'), '.2f')} | {r['errors']} | {r['reconnects']} |"
        )
    return "\n".join(lines)


def report(record: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """steady.md: enough to judge and to repeat the numbers without the JSON."""
    m = record["machine"]
    s = record["settings"]
    failures = [r for r in record["runs"] if r["result"] is None]
    lines = [
        "# Steady state: direct vs Baton vs HAProxy",
        "",
        f"- Date: {m['date']}",
        f"- Machine: {m['nproc']} CPUs, {m['host']}, Linux {m['kernel']}, Python {m['python']}",
        f"- Versions: {m['mariadb']}; {m['sysbench']}; {m['haproxy']}",
        f"- Baton commit: {m['commit']}",
        f"- Load average (1/5/15 min): {m['load_average_start']} at start, "
        f"{record['load_average_end']} at end",
        "",
        "Command:",
        "",
        f"    {record['command']}",
        "",
        "Prepared once, directly against the primary:",
        "",
        f"    {record['prepare_command']}",
        "",
        "First run (the others differ only in workload, --threads, --db-ps-mode and port; "
        "every run's command is in steady.json):",
        "",
        f"    {record['runs'][0]['command']}",
        "",
        f"Ports: {', '.join(f'{k} {v}' for k, v in record['ports'].items())}. "
        f"One sandbox (1 primary, {s['replicas']} replica(s)), `baton serve` with the sandbox's "
        "config (`baton`: one process; `baton-wN`: a supervisor and N workers), HAProxy "
        f"`mode tcp`, `nbthread {CORES}`, `balance first`, no health check. CPU: utime + stime "
        "of the proxy's processes over each run per 1,000 queries. sysbench, servers and "
        f"proxies share the same CPUs. {s['duration']} s per run, median of {s['repeat']} "
        "run(s) per path; the paths of one combination run back to back. Ratios are qps "
        "over the qps of the direct (HAProxy) path in the same combination; for a `-tls` path "
        "(sysbench `--mysql-ssl=on`), of `direct-tls` (`haproxy-tls`, which passes TLS through "
        "to the server), and `baton-tls` ends the client's TLS and verifies the server's.",
        "",
        table(rows),
    ]
    if failures:
        lines += ["", "Failed runs:", ""]
        lines += [
            f"- {f['workload']} t={f['threads']} ps={f['ps_mode']} #{f['repeat']} {f['path']}: "
            f"{f['problem']}"
            for f in failures
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = resolve(parser.parse_args(argv), parser)
    command = shlex.join(
        ["python", "-m", "bench.steady", *(sys.argv[1:] if argv is None else argv)]
    )
    machine = machine_info()
    with (
        exit_on_signals(),
        running_stack(
            args.base_port,
            args.replicas,
            args.service_port,
            tls=any(p in TLS_PATHS for p in args.paths),
        ) as stack,
    ):
        ports = stack.ports()
        ports.update({"direct-tls": ports["direct"], "haproxy-tls": ports["haproxy"]})
        prepare = sysbench_command(
            "oltp_read_write",
            ports["direct"],
            "prepare",
            {"tables": args.tables, "table-size": args.table_size, "threads": args.tables},
        )
        progress(f"prepare: {args.tables} tables x {args.table_size} rows")
        sysbench_prepare(prepare)
        batons = start_worker_batons(stack, args.paths)
        try:
            ports = {**ports, **{path: b.port for path, b in batons.items()}}
            pids = {
                "baton": stack.baton.proc.pid,
                "haproxy": stack.haproxy.proc.pid,
                "haproxy-tls": stack.haproxy.proc.pid,
                **{path: b.proc.pid for path, b in batons.items()},
            }

            def check() -> None:
                stack.check_alive()
                for path, b in batons.items():
                    if b.proc.poll() is not None:
                        raise RuntimeError(f"{path} exited with {b.proc.returncode}")

            tls = any(p in TLS_PATHS for p in args.paths)
            runs = run_all(args, ports, check, pids, sysbench_tls_files(stack) if tls else None)
        finally:
            for b in batons.values():
                b.stop()
        load_end = load_average()
    record = {
        "command": command,
        "machine": machine,
        "settings": {k: v if not isinstance(v, Path) else str(v) for k, v in vars(args).items()},
        "ports": ports,
        "prepare_command": shlex.join(prepare),
        "runs": runs,
        "load_average_end": load_end,
    }
    rows = summarize(runs)
    record["summary"] = rows
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "steady.json").write_text(json.dumps(record, indent=2) + "\n")
    (args.out / "steady.md").write_text(report(record, rows))
    print(table(rows))
    progress(f"wrote {args.out / 'steady.md'} and {args.out / 'steady.json'}")
    return 1 if any(r["result"] is None for r in runs) else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        progress("interrupted; everything started was stopped")
        sys.exit(130)
