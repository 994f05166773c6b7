"""`python -m bench.pools_sysbench --sandbox DIR`: sysbench `oltp_read_write` with 256 threads
through Baton with a pool of 32 server connections, and with 256 direct connections, in both
`--db-ps-mode`s (issue 18's done-when). The sandbox needs sysbench's `sbtest` tables (4 x
10,000 rows: `sysbench ... oltp_read_write prepare`). Deadlocks (1213) and lock wait timeouts
(1205) are counted, not fatal: the server's own answer to this load."""

from __future__ import annotations

import argparse
import re
import subprocess
from pathlib import Path

from bench.pools import admin, sandbox_servers
from harness.baton import start_baton


def sysbench(port: int, ps: str, threads: int, seconds: int) -> dict[str, object]:
    cmd = [
        "timeout", "-s", "KILL", str(seconds + 60), "sysbench", "--db-driver=mysql",
        "--mysql-host=127.0.0.1", f"--mysql-port={port}", "--mysql-user=app",
        "--mysql-password=app-pass", "--mysql-db=sbtest", "--tables=4", "--table-size=10000",
        "--rand-type=uniform", f"--threads={threads}", f"--time={seconds}",
        "--mysql-ignore-errors=1213,1205", f"--db-ps-mode={ps}", "oltp_read_write", "run",
    ]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True).stdout
    found = re.search(r"queries:\s+\d+\s+\(([\d.]+) per sec", out)
    if found is None:
        return {"failed": out[-1500:]}
    return {
        "qps": float(found.group(1)),
        "ignored_errors": int(re.search(r"ignored errors:\s+(\d+)", out).group(1)),  # type: ignore[union-attr]
        "p95_ms": float(re.search(r"95th percentile:\s+([\d.]+)", out).group(1)),  # type: ignore[union-attr]
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sandbox", type=Path, required=True)
    ap.add_argument("--port", type=int, default=25400)
    ap.add_argument("--threads", type=int, default=256)
    ap.add_argument("--seconds", type=int, default=20)
    ap.add_argument("--pool-max", type=int, default=32)
    args = ap.parse_args()
    ports, primary = sandbox_servers(args.sandbox)
    admin(ports[primary], f"SET GLOBAL max_connections = {args.threads + 100}")
    b = start_baton(
        args.sandbox / "baton.toml",
        Path(f"/tmp/bench-pools-sysbench-{args.port}"),
        args.port,
        extra={"pool": {"multiplex": True, "max": args.pool_max, "wait_timeout": 30}},
        detector={"enabled": False},
    )
    try:
        for ps in ("auto", "disable"):
            direct = sysbench(ports[primary], ps, args.threads, args.seconds)
            pooled = sysbench(b.port, ps, args.threads, args.seconds)
            ratio = ""
            if "qps" in direct and "qps" in pooled:
                ratio = f" ({pooled['qps'] / direct['qps']:.2f}x)"  # type: ignore[operator]
            print(f"ps-mode={ps}: direct {direct}; pool of {args.pool_max}: {pooled}{ratio}")
            print(b.ctl("pools").stdout, flush=True)
    finally:
        b.stop()
        admin(ports[primary], "SET GLOBAL max_connections = 151")


if __name__ == "__main__":
    main()
