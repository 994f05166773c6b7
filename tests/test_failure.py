"""The failure detector in `baton serve`, against a sandbox of its own: kill -9 of the primary
under a write load, rejoin of the old primary, repairs, quarantine of an errant old primary,
and routing fenced by term.

The tests run in order on one sandbox and one Baton, each starting from the topology the one
before left (the primary moves with every emergency reparent).
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pymysql
import pytest

from harness.baton import Baton, start_baton
from harness.clients import admin_conn, admin_query
from reparent import gtid
from reparent.sandbox import Sandbox
from tests.fixtures import (
    Background,
    metric,
    port_hint,
    private_sandbox,
    server_ports,
    wait_for,
)

# Default interval, failures and probe timeout: the kill-to-writes goal is for these. A short
# cooldown, so the tests' successive emergency reparents need not wait 30 s for each other.
DETECTOR = {"interval": 0.5, "failures": 3, "probe_timeout": 0.4, "cooldown": 1.0}
GOAL = 3.0  # seconds from kill -9 to the first write that succeeds through Baton


@pytest.fixture(scope="module")
def box(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    # Three replicas: each old primary that comes back holding writes no replica received
    # (a kill -9 mid-load, a write in flight when it stopped) is quarantined for good, and
    # the tests after it still need a replica to promote or to repair.
    yield from private_sandbox(tmp_path_factory, "failure-sandbox", replicas=3)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Baton's folder: its store outlives a restart of Baton."""
    return tmp_path_factory.mktemp("failure-baton")


class Running:
    """The module's Baton, which a test may restart on the same store."""

    def __init__(self, box: Sandbox, workdir: Path) -> None:
        self.box = box
        self.workdir = workdir
        self.baton = self.start()

    def start(self) -> Baton:
        return start_baton(
            self.box.config_path,
            self.workdir,
            port_hint() + 80,
            controller={"grace": 1.0, "timeout": 5.0},
            detector=DETECTOR,
        )

    def restart(self) -> None:
        self.baton.stop()
        self.baton = self.start()


@pytest.fixture(scope="module")
def running(box: Sandbox, workdir: Path) -> Iterator[Running]:
    r = Running(box, workdir)
    try:
        conn = r.baton.connect()
        cur = conn.cursor()
        cur.execute("CREATE DATABASE IF NOT EXISTS baton_failure")
        cur.execute(
            "CREATE TABLE IF NOT EXISTS baton_failure.t (id INT AUTO_INCREMENT PRIMARY KEY, v INT)"
        )
        conn.close()
        yield r
    finally:
        r.baton.stop()


def status(b: Baton) -> dict[str, Any]:
    out = b.ctl("--json", "status")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)["shards"][0]


def one(port: int, sql: str) -> Any:
    rows = admin_query(port, sql)
    return rows[0] if rows else None


def pid_of(box: Sandbox, name: str) -> int:
    return next(s["pid"] for s in box.status()["servers"] if s["name"] == name)


def replicates_from(box: Sandbox, replica: str, primary: str) -> bool:
    p = server_ports(box)
    st = one(p[replica], "SHOW SLAVE STATUS")
    return bool(
        st
        and st["Master_Port"] == p[primary]
        and st["Slave_IO_Running"] == "Yes"
        and st["Slave_SQL_Running"] == "Yes"
    )


class Writer(Background):
    """One client inserting through Baton as fast as it is answered, with a ledger: the time
    of every acknowledged insert and every error."""

    def __init__(self, b: Baton) -> None:
        super().__init__()
        self.b = b
        self.acks: list[float] = []
        self.errors: list[tuple[float, str]] = []

    def run(self) -> None:
        conn = None
        while not self.stopping.is_set():
            try:
                if conn is None:
                    conn = self.b.connect(connect_timeout=2, read_timeout=10)
                conn.cursor().execute("INSERT INTO baton_failure.t (v) VALUES (1)")
                self.acks.append(time.monotonic())
            except pymysql.err.MySQLError as e:
                self.errors.append((time.monotonic(), str(e)))
                if conn is not None and not conn.open:
                    conn = None
                time.sleep(0.01)
            time.sleep(0.005)

    def first_ack_after(self, t: float, timeout: float) -> float:
        return wait_for(
            "a write through Baton", lambda: next((a for a in self.acks if a > t), 0), timeout
        )


def kill_primary(r: Running) -> tuple[str, float]:
    old = status(r.baton)["primary"]
    pid = pid_of(r.box, old)
    t0 = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    return old, t0


def wait_new_primary(r: Running, old: str, term: int) -> dict[str, Any]:
    return wait_for(
        "an automatic emergency reparent",
        lambda: (st := status(r.baton))["primary"] != old and st["term"] > term and st,
        timeout=15,
    )


def errant_on(box: Sandbox, server: str, primary: str) -> str:
    p = server_ports(box)
    mine = one(p[server], "SELECT @@gtid_binlog_state AS s")["s"]
    theirs = one(p[primary], "SELECT @@gtid_binlog_state AS s")["s"]
    return gtid.format(gtid.errant(mine, theirs))


def test_kill_9_of_the_primary_under_load_is_an_automatic_reparent(running: Running) -> None:
    r = running
    before = status(r.baton)
    with Writer(r.baton) as w:
        wait_for("writes flowing", lambda: len(w.acks) > 20)
        old, killed = kill_primary(r)
        first = w.first_ack_after(killed, timeout=15)
        elapsed = first - killed
        time.sleep(0.3)
    after = wait_new_primary(r, old, before["term"])
    print(f"\nkill -9 to the first write through Baton: {elapsed:.3f} s, {len(w.errors)} errors")
    text = r.baton.scrape()
    detection = metric(text, "baton_detector_detection_seconds_sum", shard="main")
    print(f"detection (first sign of the fault to the decision): {detection:.3f} s")
    assert elapsed < GOAL, (elapsed, w.errors[-5:])
    assert after["term"] == before["term"] + 1
    assert metric(text, "baton_detector_detections_total", reason="primary_dead") >= 1
    assert metric(text, "baton_detector_actions_total", action="run_ers", outcome="succeeded") >= 1
    history = json.loads(r.baton.ctl("--json", "history").stdout)
    assert history[0]["kind"] == "ers" and history[0]["outcome"] == "succeeded"
    assert history[0]["old_primary"] == old
    # The writer's command was held through the outage, and the report says so.
    held = wait_for(
        "buffer counts in the report",
        lambda: json.loads(r.baton.ctl("--json", "history").stdout)[0]["held"],
    )
    assert held >= 1
    # Exactly one server takes writes, and the writes went there.
    p = server_ports(r.box)
    live = [n for n in p if n != old]
    assert [n for n in live if not one(p[n], "SELECT @@read_only AS r")["r"]] == [after["primary"]]
    conn = r.baton.connect()
    cur = conn.cursor()
    cur.execute("SELECT @@port")
    assert cur.fetchone()[0] == p[after["primary"]]
    conn.close()

    # The old primary comes back writable, as a restarted crashed primary would. Whatever it
    # wrote that no replica received is errant now: it is quarantined then, else it rejoins.
    r.box.start(old)
    new = after["primary"]

    def settled() -> bool:
        st = status(r.baton)
        quarantined = {s["name"] for s in st["servers"] if s["quarantined"]}
        return old in quarantined or replicates_from(r.box, old, new)

    wait_for(f"{old} rejoined or quarantined", settled)
    assert one(p[old], "SELECT @@read_only AS r")["r"] == 1
    errant = errant_on(r.box, old, new)
    quarantined = {s["name"] for s in status(r.baton)["servers"] if s["quarantined"]}
    print(f"{old} after restart: {'quarantined, errant ' + errant if errant else 'rejoined'}")
    assert (old in quarantined) == bool(errant)


def test_old_primary_without_errant_transactions_rejoins_as_a_replica(running: Running) -> None:
    """Quiet at the kill, so every replica has everything: the old primary must rejoin."""
    r = running
    p = server_ports(r.box)
    before = status(r.baton)
    primary = before["primary"]
    pos = one(p[primary], "SELECT @@gtid_binlog_pos AS p")["p"]
    for s in before["servers"]:
        if s["name"] != primary and not s["quarantined"]:
            assert one(p[s["name"]], f"SELECT MASTER_GTID_WAIT('{pos}', 10) AS w")["w"] == 0
    time.sleep(DETECTOR["cooldown"])
    old, _ = kill_primary(r)
    after = wait_new_primary(r, old, before["term"])
    new = after["primary"]
    r.box.start(old)
    wait_for(f"{old} replicating from {new}", lambda: replicates_from(r.box, old, new))
    assert one(p[old], "SELECT @@read_only AS r")["r"] == 1
    assert old not in {s["name"] for s in status(r.baton)["servers"] if s["quarantined"]}
    conn = r.baton.connect()
    conn.cursor().execute("INSERT INTO baton_failure.t (v) VALUES (2)")
    conn.close()
    pos = one(p[new], "SELECT @@gtid_binlog_pos AS p")["p"]
    assert one(p[old], f"SELECT MASTER_GTID_WAIT('{pos}', 10) AS w")["w"] == 0
    assert (
        one(p[old], "CHECKSUM TABLE baton_failure.t")["Checksum"]
        == one(p[new], "CHECKSUM TABLE baton_failure.t")["Checksum"]
    )


def test_primary_cut_off_from_baton_only_is_reported_not_reparented(
    running: Running, tmp_path: Path
) -> None:
    """A blip on Baton's side: Baton reaches the primary through a shim that stops passing
    anything, while the replicas still stream from it directly. Nobody is promoted."""
    from tests.faultshim import FaultShim

    r = running
    r.baton.stop()  # the module's Baton would see nothing wrong; keep the log to one
    before = status_of_store(r)
    p = server_ports(r.box)
    primary = before["primary"]
    with FaultShim(p[primary]) as shim:
        servers = [
            {
                "name": name,
                "host": "127.0.0.1",
                "port": shim.port if name == primary else port,
                "role": "primary" if name == primary else "replica",
                "replication_port": port,
            }
            for name, port in p.items()
        ]
        b = start_baton(
            r.box.config_path, tmp_path, port_hint() + 85, servers=servers, detector=DETECTOR
        )
        try:
            conn = b.connect()
            conn.cursor().execute("INSERT INTO baton_failure.t (v) VALUES (5)")
            conn.close()
            shim.blackhole()
            wait_for(
                "the blip reported",
                lambda: 'reason="primary_unreachable"' in b.scrape(),
                10,
            )
            time.sleep(1.0)  # a few more rounds: still no reparent
            st = status(b)
            assert (st["primary"], st["term"]) == (primary, 1)
            assert json.loads(b.ctl("--json", "history").stdout) == []
            assert one(p[primary], "SELECT @@read_only AS r")["r"] == 0
            shim.restore()
            conn = b.connect()
            conn.cursor().execute("INSERT INTO baton_failure.t (v) VALUES (6)")
            conn.close()
        finally:
            b.stop()
            r.baton = r.start()
    assert "run_ers" not in b.log.read_text()


def test_hung_primary_is_reparented_as_fast_as_a_dead_one(running: Running) -> None:
    """SIGSTOP: the replicas' IO threads say Yes until slave_net_timeout, but no heartbeat
    comes; Baton's probes go unanswered. Detected in the round a dead primary would be, the
    ERS does not wait for the stopped server, and the writer's insert stuck on it gets 2013
    once the new primary is published. Once resumed, the old primary rejoins, or is
    quarantined if it holds writes (a statement that was in flight on it when it stopped
    commits when it resumes)."""
    r = running
    p = server_ports(r.box)
    before = status(r.baton)
    time.sleep(DETECTOR["cooldown"])
    old = before["primary"]
    pid = pid_of(r.box, old)
    with Writer(r.baton) as w:
        wait_for("writes flowing", lambda: len(w.acks) > 20)
        stopped = time.monotonic()
        os.kill(pid, signal.SIGSTOP)
        try:
            first = w.first_ack_after(stopped, timeout=15)
            after = wait_new_primary(r, old, before["term"])
        finally:
            os.kill(pid, signal.SIGCONT)
    elapsed = first - stopped
    ers = json.loads(r.baton.ctl("--json", "history", "--limit", "1").stdout)[0]
    took = (ers["finished_at"] - ers["started_at"]) * 1000
    print(f"\nSIGSTOP to the first write through Baton: {elapsed:.3f} s (ERS {took:.0f} ms)")
    # Goal 2 s as a median (bench.durability --fault stop); one run on a shared machine.
    assert elapsed < GOAL, (elapsed, w.errors[-5:])
    assert took < 500, ers["phases"]
    new = after["primary"]
    conn = r.baton.connect()
    cur = conn.cursor()
    cur.execute("INSERT INTO baton_failure.t (v) VALUES (4)")
    cur.execute("SELECT @@port")
    assert cur.fetchone()[0] == p[new]
    conn.close()

    def settled() -> bool:
        quarantined = {s["name"] for s in status(r.baton)["servers"] if s["quarantined"]}
        return old in quarantined or replicates_from(r.box, old, new)

    wait_for(f"{old} rejoined or quarantined", settled)
    assert one(p[old], "SELECT @@read_only AS r")["r"] == 1
    errant = errant_on(r.box, old, new)
    quarantined = {s["name"] for s in status(r.baton)["servers"] if s["quarantined"]}
    print(f"{old} after SIGCONT: {'quarantined, errant ' + errant if errant else 'rejoined'}")
    assert (old in quarantined) == bool(errant)


def a_replica(r: Running) -> str:
    st = status(r.baton)
    return next(
        s["name"] for s in st["servers"] if s["name"] != st["primary"] and not s["quarantined"]
    )


def test_stopped_replication_is_restarted(running: Running) -> None:
    r = running
    replica = a_replica(r)
    primary = status(r.baton)["primary"]
    c = admin_conn(server_ports(r.box)[replica])
    c.cursor().execute("STOP SLAVE")
    c.close()
    wait_for("replication restarted", lambda: replicates_from(r.box, replica, primary), 5)


def test_writable_replica_is_set_read_only(running: Running) -> None:
    r = running
    replica = a_replica(r)
    port = server_ports(r.box)[replica]
    c = admin_conn(port)
    c.cursor().execute("SET GLOBAL read_only = 0")
    c.close()
    wait_for("read_only again", lambda: one(port, "SELECT @@read_only AS r")["r"] == 1, 5)
    assert "replica_writable" in r.baton.log.read_text()


def test_errant_old_primary_is_quarantined_and_never_routed_to(running: Running) -> None:
    r = running
    p = server_ports(r.box)
    before = status(r.baton)
    time.sleep(DETECTOR["cooldown"])
    old, _ = kill_primary(r)
    new = wait_new_primary(r, old, before["term"])["primary"]
    # Baton is down while the old primary comes back and takes a write of its own: a
    # transaction the new primary never had.
    r.baton.stop()
    r.box.start(old)
    c = admin_conn(p[old])
    cur = c.cursor()
    cur.execute("SET SESSION sql_log_bin = 1")
    cur.execute("INSERT INTO baton_failure.t (v) VALUES (666)")
    c.close()
    assert errant_on(r.box, old, new)
    r.restart()

    def quarantined() -> bool:
        return any(s["name"] == old and s["quarantined"] for s in status(r.baton)["servers"])

    wait_for(f"{old} quarantined", quarantined)
    assert one(p[old], "SELECT @@read_only AS r")["r"] == 1
    assert not replicates_from(r.box, old, new)
    human = r.baton.ctl("status").stdout
    assert re.search(rf"^{old}\s.*True\s*$", human, re.M), human
    # Fence by term: made writable again by hand, the old primary still gets no session.
    c = admin_conn(p[old])
    c.cursor().execute("SET GLOBAL read_only = 0")
    c.close()
    conn = r.baton.connect()
    cur = conn.cursor()
    cur.execute("INSERT INTO baton_failure.t (v) VALUES (3)")
    cur.execute("SELECT @@port")
    assert cur.fetchone()[0] == p[new]
    conn.close()
    # ... and the detector fences it again.
    wait_for("quarantined server read_only", lambda: one(p[old], "SELECT @@read_only AS r")["r"])
    # Nobody replicates from it.
    for name, port in p.items():
        st = one(port, "SHOW SLAVE STATUS")
        assert not st or st["Master_Port"] != p[old], name


def status_of_store(r: Running) -> dict[str, Any]:
    """The shard as the module's store left it (its Baton may be stopped)."""
    doc = json.loads((r.workdir / "baton-state.json").read_text())
    return doc["shards"]["main"]["topology"]
