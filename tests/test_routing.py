"""Read routing end to end on a sandbox of its own (one primary, two replicas): reads spread
across the replicas through the read listener and in split mode, causal reads see the
session's own writes while the replicas lag, reads go on while a replica is killed -9 and
while a planned switch holds the writes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pymysql
import pytest

from harness.baton import Baton, start_baton
from harness.clients import admin_conn
from harness.process import free_port
from reparent.sandbox import Sandbox
from tests.fixtures import (
    Background,
    app_conn,
    metric,
    port_hint,
    private_sandbox,
    server_ports,
    sysbench,
    sysbench_counts,
    wait_for,
)

FAULT = bool(os.environ.get("BATON_FAULT_SUITE"))
CAUSAL_ROUNDS = 10_000 if FAULT else 300


@pytest.fixture(scope="module")
def box(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    yield from private_sandbox(tmp_path_factory, "routing-sandbox")


def routed_baton(
    box: Sandbox, workdir: Path, hint: int, causal: str = "local", **routing: object
) -> Baton:
    read_port = free_port(hint + 5)
    return start_baton(
        box.config_path,
        workdir,
        hint,
        controller={"grace": 1.5},
        extra={
            "routing": {
                "mode": "split",
                "causal_reads": causal,
                "read_port": read_port,
                "monitor_interval": 0.2,
                **routing,
            }
        },
    )


@pytest.fixture(scope="module")
def rbaton(box: Sandbox, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Baton]:
    b = routed_baton(box, tmp_path_factory.mktemp("routing-baton"), port_hint() + 100)
    try:
        yield b
    finally:
        b.stop()


def read_port(b: Baton) -> int:
    import tomllib

    return int(tomllib.loads(b.config.read_text())["routing"]["read_port"])


def reads_on(b: Baton) -> dict[str, float]:
    page = b.scrape()
    return {
        name: metric(page, "baton_routed_commands_total", 0.0, server=name, kind="read")
        for name in ("db1", "db2", "db3")
    }


@pytest.fixture(scope="module")
def prepared(box: Sandbox) -> None:
    port = server_ports(box)["db1"]
    subprocess.run(
        sysbench(port, "--threads=4", "--table-size=2000", "oltp_read_write", "prepare"),
        check=True,
        capture_output=True,
    )
    with admin_conn(port) as conn, conn.cursor() as cur:
        cur.execute("CREATE TABLE IF NOT EXISTS sbtest.causal (id INT PRIMARY KEY, v INT)")
        cur.execute("CREATE DATABASE IF NOT EXISTS baton_routing")
        cur.execute("SELECT @@gtid_binlog_pos")
        pos = cur.fetchone()[0]
    for name, p in server_ports(box).items():
        if name != "db1":
            with admin_conn(p) as conn, conn.cursor() as cur:
                cur.execute("SELECT MASTER_GTID_WAIT(%s, 30)", (pos,))


def run_sysbench(port: int, workload: str, ps_mode: str, *extra: str) -> dict[str, int]:
    """Three seconds of a sysbench workload, 4 threads; any error stops it (and fails)."""
    out = subprocess.run(
        sysbench(
            port,
            "--threads=4",
            "--time=3",
            "--table-size=2000",
            f"--db-ps-mode={ps_mode}",
            "--mysql-ignore-errors=none",
            *extra,
            workload,
            "run",
            timeout=60,
        ),
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    return sysbench_counts(out.stdout)


@pytest.mark.parametrize(
    ("listener", "ps_mode"), [("read", "auto"), ("split", "disable"), ("split", "auto")]
)
def test_oltp_read_only_spreads_reads_across_replicas(
    rbaton: Baton, prepared: None, listener: str, ps_mode: str
) -> None:
    """sysbench oltp_read_only: its reads run inside BEGIN/COMMIT, so in split mode they stay
    on the primary (a transaction is never split); through the read listener, and with
    --oltp-skip-trx in split mode, they go to both replicas."""
    before = reads_on(rbaton)
    port = read_port(rbaton) if listener == "read" else rbaton.port
    counts = run_sysbench(port, "oltp_read_only", ps_mode, "--skip_trx=on")
    assert counts["transactions"] > 100 and counts["errors"] == 0 and counts["reconnects"] == 0
    after = reads_on(rbaton)
    spread = {name: after[name] - before[name] for name in after}
    total = sum(spread.values())
    # Every read of sysbench's ran on a replica, and each replica took a fair share.
    assert spread["db1"] == 0, spread
    assert spread["db2"] > total * 0.25 and spread["db3"] > total * 0.25, spread


@pytest.mark.parametrize("ps_mode", ["disable", "auto"])
def test_oltp_read_write_in_split_mode_has_no_errors(
    rbaton: Baton, prepared: None, ps_mode: str
) -> None:
    counts = run_sysbench(rbaton.port, "oltp_read_write", ps_mode)
    assert counts["transactions"] > 50
    assert (counts["errors"], counts["reconnects"]) == (0, 0)


def test_session_state_reaches_the_replicas(rbaton: Baton, prepared: None) -> None:
    """A SET or USE on the primary reaches the session's replica connections before their
    next read: the reads below run on replicas (counted) and answer as the state says."""
    conn = rbaton.connect(database="sbtest")
    before = reads_on(rbaton)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT COUNT(*) FROM (SELECT id FROM sbtest1 LIMIT 5) t")
            assert cur.fetchone()[0] == 5
            cur.execute("SET SESSION sql_select_limit = 2")
            cur.execute("SELECT id FROM sbtest1 ORDER BY id")
            assert len(cur.fetchall()) == 2
            cur.execute("SET SESSION sql_select_limit = DEFAULT")
            cur.execute("SELECT id FROM sbtest1 ORDER BY id LIMIT 3")
            assert len(cur.fetchall()) == 3
            cur.execute("USE baton_routing")
            cur.execute("SELECT DATABASE()")
            assert cur.fetchone()[0] == "baton_routing"
            cur.execute("SET NAMES latin1")
            cur.execute("SELECT CHARSET('x')")
            assert cur.fetchone()[0] == "latin1"
    finally:
        conn.close()
    after = reads_on(rbaton)
    assert after["db2"] + after["db3"] - before["db2"] - before["db3"] == 5
    assert after["db1"] == before["db1"]


def test_a_replica_that_refuses_the_session_gets_none_of_its_reads(
    box: Sandbox, rbaton: Baton, prepared: None
) -> None:
    """db2 refuses the application's login (its account locked there alone, unlogged): the
    session's reads run on db3 with no error, and db2 is not tried again for each read."""
    port = server_ports(box)["db2"]
    lock = "ALTER USER app@'127.0.0.1' ACCOUNT {}"
    with admin_conn(port) as conn, conn.cursor() as cur:
        cur.execute("SET SESSION sql_log_bin = 0")
        cur.execute(lock.format("LOCK"))
    before = reads_on(rbaton)
    page = rbaton.scrape()
    retries = metric(page, "baton_read_retries_total", 0.0, server="db2")
    try:
        conn = rbaton.connect(database="sbtest")
        with conn.cursor() as cur:
            for _ in range(20):
                cur.execute("SELECT c FROM sbtest1 WHERE id = 3")
                assert len(cur.fetchall()) == 1
        conn.close()
    finally:
        with admin_conn(port) as admin, admin.cursor() as cur:
            cur.execute("SET SESSION sql_log_bin = 0")
            cur.execute(lock.format("UNLOCK"))
    after = reads_on(rbaton)
    assert after["db2"] == before["db2"]
    assert after["db3"] - before["db3"] == 20
    # Refused once, then avoided: not one failed attempt per read.
    page = rbaton.scrape()
    assert metric(page, "baton_read_retries_total", 0.0, server="db2") - retries == 1


def test_show_warnings_runs_where_the_read_ran(rbaton: Baton, prepared: None) -> None:
    """SHOW WARNINGS after a read on a replica shows that read's warnings: it runs on the same
    replica connection (on the primary it would show none)."""
    conn = rbaton.connect(database="sbtest")
    before = reads_on(rbaton)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT CAST('7x' AS SIGNED) FROM sbtest1 WHERE id = 1")
            assert cur.fetchone()[0] == 7
            cur.execute("SHOW WARNINGS")
            codes = [row[1] for row in cur.fetchall()]
            cur.execute("SELECT @@warning_count")
            count = cur.fetchone()[0]
    finally:
        conn.close()
    assert codes == [1292], codes  # "Truncated incorrect INTEGER value"
    assert count == 1
    after = reads_on(rbaton)
    assert after["db2"] + after["db3"] - before["db2"] - before["db3"] == 3


class Lagger(Background):
    """Makes the replicas apply late without stopping replication: a session on each holds a
    read lock on the table the test writes, so its SQL thread waits (Slave_SQL_Running stays
    Yes, and the replica stays in the read pool), half of the time."""

    def __init__(self, ports: list[int], period: float = 0.05) -> None:
        super().__init__()
        self.ports = ports
        self.period = period

    def run(self) -> None:
        conns = [admin_conn(p) for p in self.ports]
        try:
            while not self.stopping.is_set():
                for conn in conns:
                    with conn.cursor() as cur:
                        cur.execute("LOCK TABLES sbtest.causal READ")
                self.stopping.wait(self.period)
                for conn in conns:
                    with conn.cursor() as cur:
                        cur.execute("UNLOCK TABLES")
                self.stopping.wait(self.period)
        finally:
            for conn in conns:
                conn.close()


def stale_reads(port: int, rounds: int, other_session: bool = False) -> int:
    """Write a row and read it back at once, `rounds` times, in the same session or (with
    `other_session`) in a second one: the reads that did not see the write."""
    writer = app_conn(port, database="sbtest")
    reader = app_conn(port, database="sbtest") if other_session else writer
    key = 2 if other_session else 1
    stale = 0
    try:
        with writer.cursor() as w, reader.cursor() as r:
            for i in range(rounds):
                w.execute("REPLACE INTO causal VALUES (%s, %s)", (key, i))
                r.execute("SELECT v FROM causal WHERE id = %s", (key,))
                row = r.fetchone()
                if row is None or row[0] != i:
                    stale += 1
    finally:
        writer.close()
        if reader is not writer:
            reader.close()
    return stale


@pytest.mark.parametrize("causal", ["local", "none"])
def test_causal_reads_see_the_sessions_own_writes(
    box: Sandbox,
    prepared: None,
    causal: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """While the replicas apply late: 0 stale reads with causal_reads = "local"; with "none"
    the same test sees stale reads (so it can fail). The replicas stay in the pool: their lag
    (Seconds_Behind_Master) stays under max_replica_lag."""
    hint = port_hint() + (110 if causal == "local" else 120)
    b = routed_baton(box, tmp_path_factory.mktemp(f"causal-{causal}"), hint, causal=causal)
    ports = server_ports(box)
    try:
        with Lagger([ports["db2"], ports["db3"]]):
            rounds = CAUSAL_ROUNDS
            stale = stale_reads(b.port, rounds)
        reads = reads_on(b)
        page = b.scrape()
    finally:
        b.stop()
    on_replicas = reads["db2"] + reads["db3"]
    if causal == "local":
        assert stale == 0
        # Most reads still ran on a replica, after waiting there for the write.
        assert on_replicas > rounds * 0.5, reads
        assert metric(page, "baton_causal_waits_total", 0.0, outcome="applied") > 0
    else:
        assert stale > 0, (stale, reads)


@pytest.mark.parametrize("causal", ["global", "local"])
def test_global_causal_reads_see_other_sessions_writes(
    box: Sandbox, prepared: None, causal: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """With "global" a read sees every write acknowledged before it started, another
    session's too: 0 stale; "local" promises only the session's own writes, and the same
    test sees stale reads with it (so it can fail)."""
    hint = port_hint() + (130 if causal == "global" else 140)
    b = routed_baton(box, tmp_path_factory.mktemp(f"cross-{causal}"), hint, causal=causal)
    ports = server_ports(box)
    try:
        with Lagger([ports["db2"], ports["db3"]]):
            stale = stale_reads(b.port, CAUSAL_ROUNDS // 3, other_session=True)
        reads = reads_on(b)
    finally:
        b.stop()
    assert reads["db2"] + reads["db3"] > 0, reads
    if causal == "global":
        assert stale == 0
    else:
        assert stale > 0, reads


class Readers(Background):
    """Threads that read through Baton without pause, timing each read."""

    def __init__(self, port: int, threads: int = 4, database: str = "sbtest") -> None:
        super().__init__()
        self.port = port
        self.threads = threads
        self.database = database
        self.errors: list[Exception] = []
        self.latencies: list[tuple[float, float]] = []  # (when, seconds)
        self._lock = threading.Lock()

    def run(self) -> None:
        workers = [threading.Thread(target=self._read) for _ in range(self.threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()

    def _read(self) -> None:
        conn = app_conn(self.port, database=self.database)
        with conn.cursor() as cur:
            while not self.stopping.is_set():
                t0 = time.perf_counter()
                try:
                    cur.execute("SELECT c FROM sbtest1 WHERE id = 7")
                    cur.fetchall()
                except pymysql.MySQLError as e:
                    with self._lock:
                        self.errors.append(e)
                    if isinstance(e, pymysql.err.OperationalError):
                        return
                with self._lock:
                    self.latencies.append((t0, time.perf_counter() - t0))
        conn.close()


def test_reads_go_on_while_a_replica_is_killed(box: Sandbox, rbaton: Baton, prepared: None) -> None:
    """kill -9 of a replica under read load: no client sees an error, and the reads go on
    on the other replica."""
    victim = next(s for s in box.status()["servers"] if s["name"] == "db3")
    try:
        with Readers(read_port(rbaton), threads=4) as readers:
            time.sleep(1.0)
            before = reads_on(rbaton)
            os.kill(victim["pid"], signal.SIGKILL)
            time.sleep(2.0)
            after = reads_on(rbaton)
        assert readers.errors == []
        assert after["db2"] - before["db2"] > 100, (before, after)
    finally:
        box.start("db3")
        wait_for("db3 replicates again", lambda: replicating(box, "db3"), 30)


def replicating(box: Sandbox, name: str) -> bool:
    with admin_conn(server_ports(box)[name]) as conn, conn.cursor() as cur:
        cur.execute("SHOW SLAVE STATUS")
        cols = [d[0] for d in cur.description]
        row = cur.fetchone()
    status = dict(zip(cols, row, strict=True)) if row else {}
    return status.get("Slave_SQL_Running") == "Yes" and status.get("Slave_IO_Running") == "Yes"


def test_reads_are_served_while_a_switch_holds_writes(
    box: Sandbox, rbaton: Baton, prepared: None
) -> None:
    """A transaction left open keeps the planned switch's drain waiting for its grace period
    (1.5 s here), and the shard holds new writes all that time: reads in split mode go on on
    the replicas, never held, while a write waits for the switch to end."""
    page = rbaton.scrape()
    during_before = metric(page, "baton_reads_during_hold_total", 0.0)
    started = metric(page, "baton_switch_sessions_total", 0.0, case="in_transaction")
    holdout = rbaton.connect(database="sbtest")
    with holdout.cursor() as cur:
        cur.execute("BEGIN")
        cur.execute("UPDATE sbtest1 SET k = k + 1 WHERE id = 1")
    status = json.loads(rbaton.ctl("--json", "status").stdout)
    target = "db2" if status["shards"][0]["primary"] == "db1" else "db1"
    writer = rbaton.connect(database="sbtest")
    write_took: list[float] = []
    try:
        with Readers(rbaton.port, threads=4) as readers:
            time.sleep(0.5)
            prs = subprocess.Popen(
                rbaton.ctl_args("--json", "prs", "--to", target), stdout=subprocess.PIPE, text=True
            )
            wait_for(  # the switch has started (it found the open transaction) and holds
                "the switch to start",
                lambda: (
                    metric(
                        rbaton.scrape(), "baton_switch_sessions_total", 0.0, case="in_transaction"
                    )
                    > started
                ),
            )
            t0 = time.perf_counter()
            with writer.cursor() as cur:
                cur.execute("UPDATE sbtest1 SET k = k + 1 WHERE id = 2")
            write_took.append(time.perf_counter() - t0)
            out, _ = prs.communicate(timeout=30)
            assert prs.returncode == 0, out
            time.sleep(0.5)
    finally:
        writer.close()
        holdout.close()
    assert readers.errors == []
    served = metric(rbaton.scrape(), "baton_reads_during_hold_total", 0.0) - during_before
    assert served > 50, served
    # The reparent's report counts them too (this proxy's share: it is the only one).
    report = json.loads(out)
    assert report["outcome"] == "succeeded"
    assert 0 < report["reads_during_hold"] <= served, report
    # The write waited for the switch; no read waited anything like as long.
    assert write_took[0] > 0.5
    slowest = max(s for _, s in readers.latencies)
    assert slowest < write_took[0] / 2, (slowest, write_took)


@pytest.mark.fault
def test_ten_switches_under_mixed_load_leave_reads_unchanged(tmp_path: Path) -> None:
    """The failover benchmark's read path (bench/reads.py): 10 PRS under paced reads and
    writes in split mode: no request fails, every switch succeeds, and the read p99 around
    the switches stays within twice its steady value (bench.reads exits 1 otherwise)."""
    from bench import reads
    from tests.conftest import sandbox_base_port

    out = tmp_path / "out"
    rc = reads.main(
        [
            "--duration",
            "60",
            "--switches",
            "10",
            "--base-port",
            str(sandbox_base_port()),
            "--out",
            str(out),
        ]
    )
    # The figures, for the log of the fault suite.
    print((out / "reads.md").read_text().split("| requests", 1)[-1])
    assert rc == 0, (out / "reads.md").read_text()
