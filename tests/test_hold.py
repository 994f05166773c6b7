"""Hold and flush: planned switchovers under a real workload that clients do not notice."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Iterator
from typing import Any

import pymysql
import pytest

from harness.baton import Baton, start_baton
from harness.clients import admin_query
from reparent.sandbox import Sandbox
from tests.fixtures import (
    app_connector,
    port_hint,
    private_sandbox,
    prs_across,
    server_ports,
    sysbench,
    sysbench_counts,
)

DURATION = 60
SWITCHES = 10


@pytest.fixture(scope="module")
def box(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    yield from private_sandbox(tmp_path_factory, "hold-sandbox")


@pytest.fixture(scope="module")
def hbaton(box: Sandbox, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Baton]:
    b = start_baton(box.config_path, tmp_path_factory.mktemp("hold-baton"), port_hint() + 70)
    try:
        yield b
    finally:
        b.stop()


def scalar(port: int, sql: str) -> Any:
    return next(iter(admin_query(port, sql)[0].values()))


def primary(b: Baton) -> str:
    out = b.ctl("--json", "status")
    return json.loads(out.stdout)["shards"][0]["primary"]


def checksums_equal(box: Sandbox, b: Baton) -> None:
    p = server_ports(box)
    current = primary(b)
    pos = scalar(p[current], "SELECT @@gtid_binlog_pos")
    sums = set()
    for name, port in p.items():
        if name != current:  # MASTER_GTID_WAIT reads gtid_slave_pos: replicas only
            assert scalar(port, f"SELECT MASTER_GTID_WAIT('{pos}', 30)") == 0
        tables = ", ".join(f"sbtest.sbtest{i}" for i in range(1, 5))
        sums.add(tuple(row["Checksum"] for row in admin_query(port, f"CHECKSUM TABLE {tables}")))
    assert len(sums) == 1, sums


@pytest.fixture(scope="module")
def prepared(box: Sandbox) -> None:
    port = server_ports(box)["db1"]
    subprocess.run(
        sysbench(port, "--threads=4", "oltp_read_write", "prepare"),
        check=True,
        capture_output=True,
    )


@pytest.mark.parametrize("workload", ["oltp_write_only", "oltp_read_write"])
@pytest.mark.parametrize("ps_mode", ["disable", "auto"])
def test_sysbench_sees_no_error_across_planned_switchovers(
    box: Sandbox, hbaton: Baton, prepared: None, workload: str, ps_mode: str
) -> None:
    proc = subprocess.Popen(
        sysbench(
            hbaton.port,
            "--threads=8",
            f"--time={DURATION}",
            f"--db-ps-mode={ps_mode}",
            "--mysql-ignore-errors=none",
            workload,
            "run",
            timeout=DURATION + 60,
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    reports = []
    try:
        time.sleep(2)
        interval = (DURATION - 6) / SWITCHES
        for _ in range(SWITCHES):
            target = "db2" if primary(hbaton) == "db1" else "db1"
            out = hbaton.ctl("--json", "prs", "--to", target)
            assert out.returncode == 0, out.stdout + out.stderr
            reports.append(json.loads(out.stdout))
            time.sleep(interval)
    finally:
        output, _ = proc.communicate(timeout=DURATION + 90)
    assert proc.returncode == 0, output
    counts = sysbench_counts(output)
    assert (counts["errors"], counts["reconnects"]) == (0, 0), output
    assert counts["transactions"] > 1000
    assert len(reports) == SWITCHES and all(r["outcome"] == "succeeded" for r in reports)
    checksums_equal(box, hbaton)


def test_hundred_sessions_keep_their_state_across_a_switch(hbaton: Baton) -> None:
    conns = []
    zones = ["+00:00", "+01:00", "-05:30", "+09:00"]
    modes = ["ANSI_QUOTES", "STRICT_TRANS_TABLES", "NO_ZERO_DATE", "PIPES_AS_CONCAT"]
    charsets = [
        ("utf8mb4", "utf8mb4_general_ci"),
        ("latin1", "latin1_swedish_ci"),
        ("latin1", "latin1_german1_ci"),
        ("utf8mb4", "utf8mb4_bin"),
    ]
    setup = hbaton.connect()
    setup.cursor().execute("CREATE DATABASE IF NOT EXISTS baton_hold_a")
    setup.cursor().execute("CREATE DATABASE IF NOT EXISTS baton_hold_b")
    setup.close()
    for i in range(100):
        conn = app_connector(hbaton.port, autocommit=True)
        cur = conn.cursor()
        cur.execute(f"USE baton_hold_{'ab'[i % 2]}")
        cur.execute(f"SET SESSION sql_mode = '{modes[i % 4]}', time_zone = '{zones[i % 4]}'")
        cs, coll = charsets[i % 4]
        cur.execute(f"SET NAMES {cs} COLLATE {coll}")
        cur.execute(f"SET @me = {i}, @name = 'session-{i}'")
        stmt = conn.cursor(prepared=True)
        stmt.execute("SELECT ? + @me", (1000,))
        assert stmt.fetchall()[0][0] == 1000 + i
        conns.append((conn, cur, stmt))
    target = "db2" if primary(hbaton) == "db1" else "db1"
    out = hbaton.ctl("--json", "prs", "--to", target)
    assert out.returncode == 0, out.stdout + out.stderr
    expected_port = ports_of(hbaton)[target]
    for i, (conn, cur, stmt) in enumerate(conns):
        cs, coll = charsets[i % 4]
        cur.execute(
            "SELECT DATABASE(), @@sql_mode, @@time_zone, @@character_set_client,"
            " @@collation_connection, @me, @name, @@port"
        )
        assert cur.fetchall() == [
            (
                f"baton_hold_{'ab'[i % 2]}",
                modes[i % 4],
                zones[i % 4],
                cs,
                coll,
                i,
                f"session-{i}",
                expected_port,
            )
        ]
        stmt.execute("SELECT ? + @me", (2000,))
        assert stmt.fetchall()[0][0] == 2000 + i
        conn.close()


def ports_of(b: Baton) -> dict[str, int]:
    out = json.loads(b.ctl("--json", "status").stdout)
    return {s["name"]: s["port"] for s in out["shards"][0]["servers"]}


def test_held_command_waits_and_runs_on_the_new_primary(box: Sandbox, hbaton: Baton) -> None:
    """A statement sent while the switch runs is paused, not failed, and lands on the new
    primary; the pause is what the client sees."""
    conn = hbaton.connect()
    cur = conn.cursor()
    cur.execute(
        "CREATE TABLE IF NOT EXISTS baton_hold_a.t (id INT AUTO_INCREMENT PRIMARY KEY, port INT)"
    )
    stop = threading.Event()
    latencies: list[float] = []
    errors: list[Exception] = []

    def writer() -> None:
        c = hbaton.connect()
        k = c.cursor()
        while not stop.is_set():
            t0 = time.perf_counter()
            try:
                k.execute("INSERT INTO baton_hold_a.t (port) VALUES (@@port)")
            except pymysql.err.MySQLError as e:
                errors.append(e)
            latencies.append(time.perf_counter() - t0)
        c.close()

    prs_across(hbaton, [threading.Thread(target=writer) for _ in range(4)], stop)
    assert errors == []
    assert max(latencies) < 5.0
    cur.execute("SELECT COUNT(DISTINCT port) FROM baton_hold_a.t")
    assert cur.fetchone()[0] == 2  # rows written on both sides of the switch
    conn.close()
