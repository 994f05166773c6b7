"""Planned and emergency reparents through `baton ctl`, against a sandbox of their own."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pymysql
import pytest

from harness.baton import Baton, start_baton
from harness.clients import admin_conn, admin_query
from reparent.sandbox import Sandbox
from tests.fixtures import WritablePoller, app_conn, port_hint, private_sandbox, server_ports

# These tests stop replication and kill servers on purpose and reparent by hand: the failure
# detector would repair or reparent under them (tests/test_failure.py tests it).
NO_DETECTOR = {"enabled": False}


def one(port: int, sql: str) -> Any:
    rows = admin_query(port, sql)
    return rows[0] if rows else None


@pytest.fixture(scope="module")
def box(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    yield from private_sandbox(tmp_path_factory, "reparent-sandbox")


@pytest.fixture(scope="module")
def rbaton(box: Sandbox, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Baton]:
    b = start_baton(
        box.config_path,
        tmp_path_factory.mktemp("reparent-baton"),
        port_hint() + 40,
        controller={"max_lag": 2.0, "grace": 1.0, "timeout": 5.0},
        detector=NO_DETECTOR,
    )
    try:
        yield b
    finally:
        b.stop()


ports = server_ports


def ctl_json(b: Baton, *args: str) -> tuple[int, Any]:
    out = b.ctl("--json", *args)
    try:
        return out.returncode, json.loads(out.stdout)
    except json.JSONDecodeError:
        return out.returncode, out.stderr


def status(b: Baton) -> dict[str, Any]:
    code, result = ctl_json(b, "status")
    assert code == 0, result
    return result["shards"][0]


def writable(box: Sandbox) -> dict[str, bool]:
    return {
        name: not one(port, "SELECT @@read_only AS r")["r"] for name, port in ports(box).items()
    }


def checksums(box: Sandbox, primary: str) -> dict[str, Any]:
    p = ports(box)
    pos = one(p[primary], "SELECT @@gtid_binlog_pos AS pos")["pos"]
    out = {}
    for name, port in p.items():
        if name != primary:
            assert one(port, f"SELECT MASTER_GTID_WAIT('{pos}', 10) AS w")["w"] == 0
        out[name] = one(port, "CHECKSUM TABLE baton_reparent.t")["Checksum"]
    return out


@pytest.fixture(scope="module")
def data(box: Sandbox, rbaton: Baton) -> None:
    conn = rbaton.connect()
    cur = conn.cursor()
    cur.execute("CREATE DATABASE IF NOT EXISTS baton_reparent")
    cur.execute(
        "CREATE TABLE IF NOT EXISTS baton_reparent.t (id INT AUTO_INCREMENT PRIMARY KEY, v INT)"
    )
    cur.executemany("INSERT INTO baton_reparent.t (v) VALUES (%s)", [(i,) for i in range(100)])
    conn.close()


def assert_replicates_from(box: Sandbox, replica: str, primary: str) -> None:
    p = ports(box)
    deadline = time.monotonic() + 10
    while True:
        st = one(p[replica], "SHOW SLAVE STATUS")
        if (
            st
            and st["Master_Port"] == p[primary]
            and st["Slave_IO_Running"] == "Yes"
            and st["Slave_SQL_Running"] == "Yes"
        ):
            return
        assert time.monotonic() < deadline, st
        time.sleep(0.1)


def test_planned_reparent_there_and_back(box: Sandbox, rbaton: Baton, data: None) -> None:
    before = status(rbaton)
    assert before["primary"] == "db1"
    code, report = ctl_json(rbaton, "prs", "--to", "db2")
    assert code == 0, report
    assert report["outcome"] == "succeeded" and report["new_primary"] == "db2"
    assert report["term_after"] == before["term"] + 1
    assert writable(box) == {"db1": False, "db2": True, "db3": False}
    assert_replicates_from(box, "db1", "db2")
    assert_replicates_from(box, "db3", "db2")
    conn = rbaton.connect()  # new sessions reach the new primary
    cur = conn.cursor()
    cur.execute("INSERT INTO baton_reparent.t (v) VALUES (1000)")
    cur.execute("SELECT @@port")
    assert cur.fetchone()[0] == ports(box)["db2"]
    conn.close()
    sums = checksums(box, "db2")
    assert len(set(sums.values())) == 1, sums

    code, report = ctl_json(rbaton, "prs")  # automatic choice: the most advanced replica
    assert code == 0, report
    assert report["new_primary"] in ("db1", "db3")
    after = status(rbaton)
    assert after["term"] == before["term"] + 2 and after["primary"] == report["new_primary"]
    if after["primary"] != "db1":
        code, report = ctl_json(rbaton, "prs", "--to", "db1")
        assert code == 0, report
    else:  # asking for the primary it already has is refused
        code, error = ctl_json(rbaton, "prs", "--to", "db1")
        assert code != 0 and "already the primary" in error
    assert status(rbaton)["primary"] == "db1"
    sums = checksums(box, "db1")
    assert len(set(sums.values())) == 1, sums
    code, history = ctl_json(rbaton, "history")
    assert code == 0 and len(history) >= 2
    assert all(r["outcome"] == "succeeded" for r in history)
    assert all(r["phases"] and r["positions"]["old_primary_final"] for r in history)
    text = rbaton.scrape()
    assert f'baton_reparents_total{{kind="prs",outcome="succeeded"}} {len(history)}.0' in text
    assert any(
        line.startswith("baton_reparent_phase_seconds_count{") and 'call="revoke"' in line
        for line in text.splitlines()
    )


def test_human_output_prints_each_phase(rbaton: Baton) -> None:
    primary = status(rbaton)["primary"]
    target = "db2" if primary != "db2" else "db3"
    out = rbaton.ctl("prs", "--to", target)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "revoke " in out.stdout and " ms" in out.stdout and "succeeded" in out.stdout
    back = rbaton.ctl("prs", "--to", primary)
    assert back.returncode == 0, back.stdout + back.stderr


def test_lagging_candidate_aborts_before_demotion(box: Sandbox, rbaton: Baton) -> None:
    p = ports(box)
    primary = status(rbaton)["primary"]
    lagger = next(n for n in p if n != primary)
    c = admin_conn(p[lagger])
    c.cursor().execute("STOP SLAVE SQL_THREAD")
    try:
        conn = app_conn(p[primary])
        cur = conn.cursor()
        cur.execute("INSERT INTO baton_reparent.t (v) VALUES (1)")
        conn.close()
        time.sleep(3)  # beyond max_lag = 2 s
        conn = app_conn(p[primary])
        conn.cursor().execute("INSERT INTO baton_reparent.t (v) VALUES (2)")
        conn.close()
        code, report = ctl_json(rbaton, "prs", "--to", lagger)
        assert code != 0
        assert report["outcome"] == "aborted", report
        assert writable(box)[primary] is True
        assert status(rbaton)["primary"] == primary
    finally:
        c.cursor().execute("START SLAVE SQL_THREAD")
        c.close()


def test_unreachable_candidate_aborts_and_old_primary_stays_writable(
    box: Sandbox, rbaton: Baton, tmp_path: Path
) -> None:
    p = ports(box)
    primary = status(rbaton)["primary"]
    victim = next(n for n in p if n != primary)
    pid = next(s["pid"] for s in box.status()["servers"] if s["name"] == victim)
    os.kill(pid, signal.SIGSTOP)  # there, but not answering
    try:
        code, report = ctl_json(rbaton, "prs", "--to", victim)
        assert code != 0 and report["outcome"] == "aborted", report
        assert "unreachable" in report["reason"]
        assert one(p[primary], "SELECT @@read_only AS r")["r"] == 0
    finally:
        os.kill(pid, signal.SIGCONT)


def test_never_two_writable_servers_during_planned_reparents_under_load(
    box: Sandbox, rbaton: Baton
) -> None:
    p = ports(box)
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            try:
                conn = rbaton.connect()
                cur = conn.cursor()
                while not stop.is_set():
                    cur.execute("INSERT INTO baton_reparent.t (v) VALUES (7)")
            except pymysql.err.MySQLError:
                time.sleep(0.01)  # without the buffer a switch costs a reconnect

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        with WritablePoller(p) as poller:
            for target in ["db2", "db1"] * 10:
                code, report = ctl_json(rbaton, "prs", "--to", target)
                assert code == 0, report
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    assert poller.rounds > 50
    assert poller.overlaps == []
    sums = checksums(box, "db1")
    assert len(set(sums.values())) == 1, sums


@pytest.fixture(scope="module")
def workdir2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The second Baton's folder: its store outlives one test, as a restarted Baton's would."""
    return tmp_path_factory.mktemp("baton-2")


def test_restarted_controller_finishes_a_reparent_from_the_journal(
    box: Sandbox, rbaton: Baton, workdir2: Path
) -> None:
    """Revoked, then the controller died: a new Baton reads the journal and establishes."""
    from reparent.config import load
    from reparent.filestore import FileStore
    from reparent.mechanism import ReparentContext
    from reparent.revoke import GracefulDemotion
    from reparent.topology import ReparentKind, ReparentRecord, Step

    assert status(rbaton)["primary"] == "db1"
    rbaton.stop()
    cfg = load(box.config_path)
    shard = cfg.shard
    servers = {s.name: s for s in shard.servers}
    ctx = ReparentContext(
        shard.name, shard.servers, servers["db1"], servers["db2"], cfg.admin, cfg.replication, 5.0
    )
    revoked = GracefulDemotion().revoke(ctx)
    assert writable(box) == {"db1": False, "db2": False, "db3": False}
    store = FileStore.open(workdir2 / "baton-state.json", cfg)
    store.journal_put(
        ReparentRecord(
            id="crashed",
            kind=ReparentKind.PRS,
            shard=shard.name,
            old_primary="db1",
            requested="db2",
            candidate="db2",
            new_primary=None,
            term_before=1,
            term_after=None,
            step=Step.REVOKED,
            phases=[],
            positions={"db2_chosen": "", "old_primary_final": revoked.gtid_position},
            outcome=None,
            started_at=time.time(),
            finished_at=None,
        )
    )
    b2 = start_baton(box.config_path, workdir2, port_hint() + 50, detector=NO_DETECTOR)
    try:
        st = status(b2)
        assert (st["primary"], st["term"], st["reparent"]) == ("db2", 2, None)
        assert writable(box) == {"db1": False, "db2": True, "db3": False}
        assert_replicates_from(box, "db1", "db2")
        code, history = ctl_json(b2, "history")
        assert history[0]["id"] == "crashed" and history[0]["outcome"] == "succeeded"
        sums = checksums(box, "db2")
        assert len(set(sums.values())) == 1, sums
    finally:
        b2.stop()


def test_emergency_reparent_after_kill_9(box: Sandbox, workdir2: Path) -> None:
    """The primary dies; ERS fences the replicas and promotes the most advanced one."""
    b3 = start_baton(box.config_path, workdir2, port_hint() + 60, detector=NO_DETECTOR)
    try:
        before = status(b3)
        old = before["primary"]
        p = ports(box)
        conn = b3.connect()
        cur = conn.cursor()
        cur.executemany("INSERT INTO baton_reparent.t (v) VALUES (%s)", [(i,) for i in range(50)])
        conn.close()
        pid = next(s["pid"] for s in box.status()["servers"] if s["name"] == old)
        os.kill(pid, signal.SIGKILL)
        code, report = ctl_json(b3, "ers")
        assert code == 0, report
        assert report["outcome"] == "succeeded" and report["new_primary"] != old
        new = report["new_primary"]
        (other,) = set(p) - {old, new}
        assert_replicates_from(box, other, new)
        conn = b3.connect()
        cur = conn.cursor()
        cur.execute("INSERT INTO baton_reparent.t (v) VALUES (99)")
        cur.execute("SELECT @@port")
        assert cur.fetchone()[0] == p[new]
        conn.close()
        pos = one(p[new], "SELECT @@gtid_binlog_pos AS pos")["pos"]
        assert one(p[other], f"SELECT MASTER_GTID_WAIT('{pos}', 10) AS w")["w"] == 0
        assert (
            one(p[new], "CHECKSUM TABLE baton_reparent.t")["Checksum"]
            == one(p[other], "CHECKSUM TABLE baton_reparent.t")["Checksum"]
        )
        assert status(b3)["term"] == before["term"] + 1
    finally:
        b3.stop()
