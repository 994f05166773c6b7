"""The controller checks its picture against the servers before it acts (issue 15).

One sandbox of four servers: db1 the primary, db2-db4 its replicas. Baton's config names only
db1-db3, so db4 is a server outside the config. Each test starts Baton with the config it
needs, on a store of its own.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from harness.baton import Baton, start_baton
from harness.clients import admin_conn, admin_query
from harness.process import free_port
from reparent.sandbox import Sandbox
from tests.fixtures import (
    WritablePoller,
    metric,
    port_hint,
    private_sandbox,
    server_ports,
    wait_for,
)

DETECTOR = {"interval": 0.5, "failures": 3, "probe_timeout": 0.4, "cooldown": 1.0}


@pytest.fixture(scope="module")
def box(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    yield from private_sandbox(tmp_path_factory, "truth-sandbox", replicas=3)


def config_servers(box: Sandbox, **ports: int) -> list[dict[str, Any]]:
    """db1-db3 as the sandbox has them (db4 left out), with `ports` overriding some."""
    real = server_ports(box)
    return [
        {
            "name": name,
            "host": "127.0.0.1",
            "port": ports.get(name, real[name]),
            "role": "primary" if name == "db1" else "replica",
        }
        for name in ("db1", "db2", "db3")
    ]


def start(box: Sandbox, workdir: Path, adopt: bool = False, **servers: int) -> Baton:
    """Baton on db1-db3 (`servers` overriding ports), the detector as the tests need it."""
    return start_baton(
        box.config_path,
        workdir,
        port_hint() + 100,
        servers=config_servers(box, **servers),
        detector=DETECTOR,
        adopt=adopt,
    )


def status(b: Baton) -> dict[str, Any]:
    out = b.ctl("--json", "status")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)["shards"][0]


def history(b: Baton) -> list[dict[str, Any]]:
    return json.loads(b.ctl("--json", "history").stdout)


def read_only(box: Sandbox) -> dict[str, int]:
    return {
        name: admin_query(port, "SELECT @@read_only AS r")[0]["r"]
        for name, port in server_ports(box).items()
    }


def test_primary_named_on_a_wrong_port_is_a_mismatch_not_a_dead_primary(
    box: Sandbox, tmp_path: Path
) -> None:
    """The typo of the issue: db1's port in the config is one where nothing listens, while
    db1 runs on its real port and db2, db3 replicate from it there. Baton cannot reach "db1",
    and the replicas replicate from an address outside the config: that is a wrong picture,
    not a dead primary. Nobody is promoted, nothing is repaired, and the mismatch is shown."""
    wrong = free_port(port_hint() + 200)
    before = read_only(box)
    assert before == {"db1": 0, "db2": 1, "db3": 1, "db4": 1}
    with WritablePoller(server_ports(box)) as poller:
        b = start(box, tmp_path, db1=wrong)
        try:
            time.sleep(3.0)  # six rounds; the code before ran its ERS after about one second
            assert history(b) == []
            st = status(b)
            assert (st["primary"], st["term"]) == ("db1", 1)
            assert kinds(st) == {("foreign_source", "db2"), ("foreign_source", "db3")}
            assert read_only(box) == before
            assert metric(b.scrape(), "baton_topology_mismatches", shard="main") == 2
            check = b.ctl("check")
            assert check.returncode == 1, check.stdout + check.stderr
            real = f"127.0.0.1:{server_ports(box)['db1']}"
            assert f"MISMATCH foreign_source db2: replicates from {real}" in check.stdout
            assert "(it answers: writable, server_id 1" in check.stdout, check.stdout
            assert "outside config" in check.stdout and "ctl adopt would refuse" in check.stdout
            print("\n" + check.stdout)
        finally:
            b.stop()
    assert not poller.overlaps, poller.overlaps[:5]
    log = b.log.read_text()
    assert "run_ers" not in log, log[-3000:]
    assert "durability not applied: the picture is wrong" in log


def repoint(box: Sandbox, replica: str, source_port: int) -> None:
    """CHANGE MASTER by hand, as an operator would."""
    conn = admin_conn(server_ports(box)[replica])
    with conn, conn.cursor() as cur:
        cur.execute("STOP SLAVE")
        cur.execute("CHANGE MASTER TO MASTER_HOST='127.0.0.1', MASTER_PORT=%s", (source_port,))
        cur.execute("START SLAVE")


def source_port(box: Sandbox, server: str) -> int | None:
    rows = admin_query(server_ports(box)[server], "SHOW SLAVE STATUS")
    return int(rows[0]["Master_Port"]) if rows else None


def kinds(st: dict[str, Any]) -> set[tuple[str, str]]:
    return {(m["kind"], m["server"]) for m in st["mismatches"]}


def test_a_replica_repointed_outside_the_config_is_reported_not_rejoined(
    box: Sandbox, tmp_path: Path
) -> None:
    ports = server_ports(box)
    b = start(box, tmp_path)
    try:
        wait_for("a first round", lambda: "baton_topology_mismatches{" in b.scrape())
        assert status(b)["mismatches"] == []
        repoint(box, "db3", ports["db4"])  # db4 replicates from db1, but the config lacks it
        st = wait_for("the mismatch reported", lambda: (s := status(b))["mismatches"] and s)
        assert kinds(st) == {("foreign_source", "db3")}
        assert f"127.0.0.1:{ports['db4']}" in st["mismatches"][0]["detail"]
        time.sleep(1.5)  # three rounds more: a stray would have been rejoined by now
        assert source_port(box, "db3") == ports["db4"]
        assert history(b) == []
        human = b.ctl("status").stdout
        assert "MISMATCH foreign_source db3" in human, human
        # A manual reparent on a wrong picture is refused too, unless forced.
        out = b.ctl("prs", "--to", "db2")
        assert out.returncode == 1 and "disagree" in out.stderr and "--force" in out.stderr
        repoint(box, "db3", ports["db1"])  # put back by hand: the picture is right again
        wait_for("the mismatch cleared", lambda: status(b)["mismatches"] == [])
        assert metric(b.scrape(), "baton_topology_mismatches", shard="main") == 0
        assert history(b) == []
    finally:
        b.stop()


def test_ers_of_a_healthy_primary_is_refused_and_force_goes_ahead(
    box: Sandbox, tmp_path: Path
) -> None:
    b = start(box, tmp_path)
    try:
        out = b.ctl("ers")
        assert out.returncode == 1
        assert "db1 is reachable and writable; use prs, or ers --force" in out.stderr
        assert history(b) == [] and read_only(box)["db1"] == 0
        with WritablePoller(server_ports(box)) as poller:
            out = b.ctl("--json", "ers", "--force")
        assert out.returncode == 0, out.stdout + out.stderr
        report = json.loads(out.stdout)
        assert (report["outcome"], report["old_primary"]) == ("succeeded", "db1")
        assert not poller.overlaps, poller.overlaps[:5]
        new = report["new_primary"]
        assert [n for n, ro in read_only(box).items() if ro == 0] == [new]
        assert source_port(box, "db1") == server_ports(box)[new]  # the old one follows it
    finally:
        b.stop()


def test_servers_switched_by_hand_are_reported_then_adopted(box: Sandbox, tmp_path: Path) -> None:
    """After the forced ERS above, db2 leads and db1, db3 replicate from it; a Baton started
    on a fresh store believes the config (db1). It must neither make db1 writable (a
    read_only primary is a fault it repairs when the picture is right) nor reparent: it
    reports, and `ctl adopt` (or `serve --adopt`) takes the servers' word."""
    ports = server_ports(box)
    assert [n for n, ro in read_only(box).items() if ro == 0] == ["db2"]
    with WritablePoller(ports) as poller:
        b = start(box, tmp_path / "first")
        try:
            st = wait_for("the mismatch reported", lambda: (s := status(b))["mismatches"] and s)
            assert kinds(st) == {("second_primary", "db2"), ("primary_replicates", "db1")}
            time.sleep(2.0)
            assert read_only(box)["db1"] == 1 and history(b) == []
            check = b.ctl("check")
            assert check.returncode == 1, check.stdout + check.stderr
            assert "ctl adopt would make db2 the primary at term 2" in check.stdout
            assert "MISMATCH second_primary db2" in check.stdout
            out = b.ctl("adopt")
            assert out.returncode == 0, out.stderr
            assert "adopted db2 as the primary at term 2" in out.stdout
            st = status(b)
            assert (st["primary"], st["term"]) == ("db2", 2)
            wait_for("the mismatch cleared", lambda: status(b)["mismatches"] == [])
            conn = b.connect()
            with conn, conn.cursor() as cur:
                cur.execute("SELECT @@port")
                assert cur.fetchone()[0] == ports["db2"]
            assert b.ctl("adopt").returncode == 1  # nothing left to adopt
        finally:
            b.stop()
    assert not poller.overlaps, poller.overlaps[:5]
    b = start(box, tmp_path / "second", adopt=True)
    try:
        st = status(b)
        assert (st["primary"], st["term"], st["mismatches"]) == ("db2", 2, [])
        assert "--adopt: adopted db2 as the primary at term 2" in b.log.read_text()
    finally:
        b.stop()


def test_quarantine_by_hand_shows_the_gtid_check(box: Sandbox, tmp_path: Path) -> None:
    b = start(box, tmp_path, adopt=True)
    ports = server_ports(box)
    try:
        assert status(b)["primary"] == "db2"
        out = b.ctl("quarantine", "db2")
        assert out.returncode == 1 and "is the primary" in out.stderr
        out = b.ctl("quarantine", "db3")
        assert out.returncode == 0, out.stderr
        assert "db3 quarantined" in out.stdout
        assert "GTID check: db3 has nothing the primary db2 lacks" in out.stdout
        assert quarantined(b) == {"db3"} and read_only(box)["db3"] == 1
        out = b.ctl("--json", "unquarantine", "db3")
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["check"]["clean"] is True
        assert quarantined(b) == set()
        # A transaction of db3's own, which db2 never had: the detector quarantines it, and
        # lifting that is refused with the check, unless forced.
        conn = admin_conn(ports["db3"])
        with conn, conn.cursor() as cur:
            cur.execute("CREATE DATABASE IF NOT EXISTS truth_t")
        wait_for("db3 quarantined by the detector", lambda: quarantined(b) == {"db3"})
        out = b.ctl("unquarantine", "db3")
        assert out.returncode == 1
        assert "db3 has 0-3-" in out.stderr and "never had" in out.stderr, out.stderr
        assert "unquarantine --force" in out.stderr
        out = b.ctl("--json", "unquarantine", "db3", "--force")
        assert out.returncode == 0, out.stderr
        result = json.loads(out.stdout)
        assert result["quarantined"] is False and result["check"]["errant"].startswith("0-3-")
    finally:
        b.stop()


def quarantined(b: Baton) -> set[str]:
    return {s["name"] for s in status(b)["servers"] if s["quarantined"]}
