"""`baton serve` with `proxy.workers = 2` (issue 13): one Baton to operate over two worker
processes. `ctl sessions`, `ctl status` and one `/metrics` scrape cover both workers; a KILL
reaches a session of the other worker; `kill -9` of one worker costs only its own clients
their connections, and the supervisor starts it again; writes flow through PRS with every
worker holding and draining. `make fault-test` adds sysbench oltp_write_only through 10 PRS
in both prepared-statement modes.

Everything is real: a sandbox of the module's own, `baton serve` as an operator runs it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pymysql
import pytest

from harness.baton import Baton, start_baton
from harness.fleet import CONTROLLER, wait_until
from harness.ledger import TABLE, Ledger, create_table
from proxy.context import SESSION_ID_BASE, SESSION_ID_SPAN
from reparent.etcdsandbox import EtcdCluster
from reparent.sandbox import Sandbox
from tests.fixtures import (
    WritablePoller,
    app_conn,
    port_hint,
    private_sandbox,
    server_ports,
    sysbench,
    sysbench_counts,
)

HINT = port_hint() + 120


@pytest.fixture(scope="module")
def box(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    yield from private_sandbox(tmp_path_factory, "workers-sandbox")


@pytest.fixture(scope="module")
def group(box: Sandbox, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Baton]:
    b = start_baton(
        box.config_path,
        tmp_path_factory.mktemp("workers"),
        HINT,
        proxy={"workers": 2},
        controller=CONTROLLER,
        detector={"enabled": False},
    )
    try:
        wait_until(lambda: all(w["serving"] for w in status(b)["workers"]), 20, "two workers")
        yield b
    finally:
        b.stop()


def status(b: Baton) -> dict[str, Any]:
    out = b.ctl("--json", "status")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def worker_of(conn: pymysql.Connection) -> int:
    return (conn.thread_id() - SESSION_ID_BASE) // SESSION_ID_SPAN


def on_both(b: Baton, each: int = 2) -> dict[int, list[pymysql.Connection]]:
    """Connections until each worker has `each` (the kernel decides who accepts)."""
    by_worker: dict[int, list[pymysql.Connection]] = {0: [], 1: []}
    extra = []
    for _ in range(100):
        if all(len(c) >= each for c in by_worker.values()):
            break
        conn = app_conn(b.port)
        mine = by_worker[worker_of(conn)]
        (mine if len(mine) < each else extra).append(conn)
    for conn in extra:
        conn.close()
    assert all(len(c) >= each for c in by_worker.values()), {
        k: len(v) for k, v in by_worker.items()
    }
    return by_worker


def close_all(by_worker: dict[int, list[pymysql.Connection]]) -> None:
    for conns in by_worker.values():
        for c in conns:
            c.close()


def test_ctl_metrics_and_kill_cover_every_worker(group: Baton) -> None:
    by_worker = on_both(group)
    try:
        ids = {c.thread_id(): w for w, conns in by_worker.items() for c in conns}
        sessions = json.loads(group.ctl("--json", "sessions").stdout)
        listed = {s["id"]: s["worker"] for s in sessions}
        assert ids.items() <= listed.items()
        st = status(group)
        assert [w["serving"] for w in st["workers"]] == [True, True]
        assert st["sessions"] == sum(w["sessions"] for w in st["workers"]) >= 4
        assert sorted(p["id"].rsplit("/", 1)[1] for p in st["proxies"]) == ["w0", "w1"]
        page = group.scrape()
        open_by_worker = {
            line.split('worker="')[1][0]: float(line.split()[-1])
            for line in page.splitlines()
            if line.startswith("baton_client_connections_open{")
        }
        assert open_by_worker.keys() == {"0", "1"} and min(open_by_worker.values()) >= 2
        assert "baton_workers_serving 2.0" in page
        # A KILL QUERY from worker 0 of a statement running on worker 1.
        victim, killer = by_worker[1][0], by_worker[0][0]
        errors: list[int] = []

        def sleep() -> None:
            try:
                victim.cursor().execute("SELECT SLEEP(20)")
            except pymysql.MySQLError as e:
                errors.append(e.args[0])

        sleeper = threading.Thread(target=sleep)
        sleeper.start()
        time.sleep(0.3)
        killer.cursor().execute(f"KILL QUERY {victim.thread_id()}")
        sleeper.join(5)
        assert not sleeper.is_alive() and errors == [1317]
        with pytest.raises(pymysql.MySQLError) as e:
            killer.cursor().execute(f"KILL {SESSION_ID_BASE + SESSION_ID_SPAN + 99999}")
        assert e.value.args[0] == 1094
    finally:
        close_all(by_worker)


def test_kill_9_of_a_worker_costs_only_its_own_clients(group: Baton) -> None:
    by_worker = on_both(group)
    survivors, victims = by_worker[0], by_worker[1]
    errors: list[str] = []
    stop = threading.Event()

    def keep_querying(conn: pymysql.Connection) -> None:
        while not stop.is_set():
            try:
                conn.cursor().execute("SELECT 1")
            except pymysql.MySQLError as e:
                errors.append(repr(e))
            time.sleep(0.01)

    threads = [threading.Thread(target=keep_querying, args=(c,)) for c in survivors]
    for t in threads:
        t.start()
    try:
        before = status(group)["workers"][1]
        os.kill(before["pid"], signal.SIGKILL)
        for conn in victims:
            with pytest.raises(pymysql.err.OperationalError):
                conn.cursor().execute("SELECT 1")
        # Its clients reconnect (to whichever worker accepts) and work.
        again = app_conn(group.port)
        again.cursor().execute("SELECT 1")
        again.close()
        wait_until(lambda: status(group)["workers"][1]["serving"], 20, "worker 1 started again")
        after = status(group)["workers"][1]
        assert after["restarts"] == before["restarts"] + 1 and after["pid"] != before["pid"]
    finally:
        stop.set()
        for t in threads:
            t.join()
        close_all(by_worker)
    assert errors == []
    # Both serve again: new clients reach the restarted worker too.
    close_all(on_both(group, 1))


def test_reuse_port_spreads_clients_over_workers_binding_the_port_each(
    box: Sandbox, group: Baton, tmp_path: Path
) -> None:
    """`proxy.reuse_port`: each worker binds the port itself; the kernel spreads clients."""
    b = start_baton(
        box.config_path,
        tmp_path,
        HINT + 10,
        proxy={"workers": 2, "reuse_port": True},
        controller=CONTROLLER,
        detector={"enabled": False},
    )
    try:
        wait_until(lambda: all(w["serving"] for w in status(b)["workers"]), 20, "two workers")
        close_all(on_both(b, 3))
    finally:
        b.stop()


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # A zombie is gone too: its parent (the supervisor) has not reaped it yet.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_no_worker_outlives_its_supervisor(
    box: Sandbox, group: Baton, tmp_path: Path, sig: signal.Signals
) -> None:
    """SIGTERM to the supervisor stops every worker, then itself; a supervisor killed with
    -9 leaves workers that stop on their own (their channel closed)."""
    b = start_baton(
        box.config_path,
        tmp_path,
        HINT + 20,
        proxy={"workers": 2},
        controller=CONTROLLER,
        detector={"enabled": False},
    )
    try:
        wait_until(lambda: all(w["serving"] for w in status(b)["workers"]), 20, "two workers")
        pids = [w["pid"] for w in status(b)["workers"]]
        b.proc.send_signal(sig)
        b.proc.wait(20)
        wait_until(lambda: all(gone(p) for p in pids), 10, "the workers to stop")
    finally:
        b.stop()


def switches(b: Baton, box: Sandbox, count: int, pause: float) -> list[dict[str, Any]]:
    reports = []
    for _ in range(count):
        primary = status(b)["shards"][0]["primary"]
        to = next(name for name in server_ports(box) if name != primary)
        out = b.ctl("--json", "prs", "--to", to)
        assert out.returncode == 0, out.stdout + out.stderr
        reports.append(json.loads(out.stdout))
        time.sleep(pause)
    return reports


def test_writes_through_both_workers_across_prs(group: Baton, box: Sandbox) -> None:
    """A ledger's writers on both workers through 2 PRS: no error, no acknowledged write lost,
    never two writable servers, both workers drained before each demotion."""
    conn = app_conn(group.port)
    create_table(conn)
    conn.cursor().execute(f"TRUNCATE {TABLE}")
    conn.close()
    with WritablePoller(server_ports(box)) as poller:
        ledger = Ledger(lambda: app_conn(group.port), writers=6).start()
        try:
            time.sleep(0.5)
            reports = switches(group, box, 2, 0.5)
        finally:
            ledger.halt()
            ledger.join()
    assert not poller.overlaps, poller.overlaps[:5]
    assert ledger.errors == 0, ledger.error_log[:5]
    assert len(ledger.acked) > 50
    for r in reports:
        assert r["outcome"] == "succeeded" and r["not_drained"] == [], r
    primary = status(group)["shards"][0]["primary"]
    conn = app_conn(server_ports(box)[primary])
    cur = conn.cursor()
    cur.execute(f"SELECT id FROM {TABLE}")
    assert not ledger.acked - {row[0] for row in cur.fetchall()}
    conn.close()


def routed(conn: pymysql.Connection) -> int:
    cur = conn.cursor()
    cur.execute("SELECT @@port")
    return int(cur.fetchone()[0])


def test_workers_on_etcd_each_follow_etcd_and_drain(
    box: Sandbox, group: Baton, etcd: EtcdCluster, tmp_path: Path
) -> None:
    """With etcd each worker talks to etcd itself: both register, hold and drain, and a PRS
    there and back goes through with both drained and both routing to the new primary."""
    b = start_baton(
        box.config_path,
        tmp_path,
        HINT + 30,
        proxy={"workers": 2, "id": "etcd-group"},
        controller=CONTROLLER,
        detector={"enabled": False},
        extra={
            "topology": {
                "store": "etcd",
                "endpoints": etcd.endpoints,
                "prefix": f"/workers-{os.getpid()}",
            }
        },
    )
    try:
        wait_until(lambda: all(w["serving"] for w in status(b)["workers"]), 20, "two workers")
        ids = [p["id"] for p in status(b)["proxies"] if p["alive"]]
        assert ids == ["etcd-group/w0", "etcd-group/w1"]
        by_worker = on_both(b, 1)
        try:
            for _ in range(2):
                (report,) = switches(b, box, 1, 0.2)
                assert report["outcome"] == "succeeded" and report["not_drained"] == [], report
                port = server_ports(box)[report["new_primary"]]
                for conns in by_worker.values():
                    # Each worker hears of the switch from its own etcd watch, moments after
                    # `ctl prs` returns; until then its idle sessions stay where they were.
                    wait_until(lambda c=conns[0], p=port: routed(c) == p, 5, "the new primary")
        finally:
            close_all(by_worker)
    finally:
        b.stop()


@pytest.mark.fault
@pytest.mark.parametrize("ps_mode", ["disable", "auto"])
def test_sysbench_write_only_through_ten_prs(group: Baton, box: Sandbox, ps_mode: str) -> None:
    """sysbench oltp_write_only (8 threads, on both workers) through 10 PRS: no error, no
    reconnect, every switch drained by both workers."""
    primary = status(group)["shards"][0]["primary"]
    port = server_ports(box)[primary]
    subprocess.run(sysbench(port, "oltp_write_only", "cleanup"), capture_output=True)
    subprocess.run(
        sysbench(port, "--threads=4", "oltp_write_only", "prepare"), check=True, capture_output=True
    )
    duration = 50
    bench = subprocess.Popen(
        sysbench(
            group.port,
            "--threads=8",
            f"--time={duration}",
            f"--db-ps-mode={ps_mode}",
            "--mysql-ignore-errors=none",
            "oltp_write_only",
            "run",
            timeout=duration + 60,
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        time.sleep(3)
        reports = switches(group, box, 10, 3.5)
    finally:
        output = bench.communicate(timeout=duration + 90)[0]
    assert bench.returncode == 0, output
    counts = sysbench_counts(output)
    assert (counts["errors"], counts["reconnects"]) == (0, 0), output
    assert counts["transactions"] > 500, output
    assert [r["outcome"] for r in reports] == ["succeeded"] * 10
    assert all(r["not_drained"] == [] for r in reports), [r["not_drained"] for r in reports]
    assert sum(r["held"] for r in reports) > 0, [r["held"] for r in reports]
