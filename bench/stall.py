"""`python -m bench.stall`: does one client's 60 MiB statement hold up everyone else's?

Issue 10's promise: a 60 MiB command from one client delays a healthy session's `SELECT 1` by
under 50 ms. The client's bytes used to be rebuilt on every read (bytes + bytes, 2.4 s of one
core for 60 MiB, all other sessions waiting), so this is the figure that shows the buffer
stays linear. One connection sends `SELECT LENGTH('zzz...')` of 60 MiB while another runs
`SELECT 1` in a loop; the figure is the loop's slowest `SELECT 1` while the big one is in
flight. The server itself and the load generator share the cores, so the same is measured
direct and through HAProxy, alternated with Baton round by round: the difference is the
proxy's.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from collections.abc import Callable

from bench.process import exit_on_signals, progress
from bench.record import load_average
from bench.stack import running_stack
from harness.clients import admin_conn, connect

BIG = 60 << 20  # bytes of the large statement's string
PACKET = 64 << 20  # max_allowed_packet on the server, which Baton takes as its own bound


def worst_beside_big(port: int) -> float:
    """The slowest `SELECT 1` on one connection while another sends a 60 MiB statement, ms."""
    healthy = connect(port)
    big = connect(port, max_allowed_packet=PACKET, read_timeout=120, write_timeout=120)
    answer: list[int] = []

    def send() -> None:
        cur = big.cursor()
        cur.execute("SELECT LENGTH('" + "z" * BIG + "')")
        answer.append(cur.fetchone()[0])

    sender = threading.Thread(target=send)
    cur = healthy.cursor()
    worst = 0.0
    try:
        sender.start()
        while sender.is_alive():
            started = time.monotonic()
            cur.execute("SELECT 1")
            cur.fetchall()
            worst = max(worst, time.monotonic() - started)
        sender.join()
    finally:
        healthy.close()
        big.close()
    if answer != [BIG]:
        raise SystemExit(f"the large statement failed on port {port}")
    return worst * 1000


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.stall", description=__doc__)
    parser.add_argument("--rounds", type=int, default=5, help="rounds; each path once a round")
    parser.add_argument("--base-port", type=int, default=23601, help="port of the primary")
    parser.add_argument("--service-port", type=int, default=23650, help="proxies' ports from")
    args = parser.parse_args()
    with exit_on_signals(), running_stack(args.base_port, 0, args.service_port) as stack:
        admin = admin_conn(stack.primary_port)
        admin.cursor().execute(f"SET GLOBAL max_allowed_packet = {PACKET}")
        admin.close()
        # Baton reads max_allowed_packet from the primary at start: a new one takes 64 MiB.
        baton = stack.restart_baton("large")
        paths: dict[str, Callable[[], float]] = {
            "direct": lambda: worst_beside_big(stack.primary_port),
            "HAProxy": lambda: worst_beside_big(stack.haproxy.port),
            "Baton": lambda: worst_beside_big(baton.port),
        }
        figures: dict[str, list[float]] = {name: [] for name in paths}
        for i in range(args.rounds):
            for name, measure in paths.items():
                figures[name].append(measure())
                progress(f"round {i + 1} {name}: {figures[name][-1]:.1f} ms")
    print(f"load average at the end: {load_average()}")
    print("| path | worst SELECT 1 beside 60 MiB, median ms | max ms | rounds |")
    print("|---|---:|---:|---|")
    for name, runs in figures.items():
        rounds = ", ".join(f"{f:.1f}" for f in runs)
        print(f"| {name} | {statistics.median(runs):.1f} | {max(runs):.1f} | {rounds} |")


if __name__ == "__main__":
    main()
