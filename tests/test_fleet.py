"""A fleet of three Batons on etcd in front of one sandbox (issue 12): they hold and flush
together, any of them drives a switch and exactly one does, a Baton that dies driving one is
replaced by another, and etcd's own failures leave traffic flowing.

Everything is real: MariaDB, a 3-member etcd cluster (tests/fixtures.etcd_cluster), three
`baton serve` processes, clients through every Baton. `make test` runs the short cases;
`make fault-test` (BATON_FAULT_SUITE=1) runs the long ones (marked `fault`).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from harness.baton import Baton
from harness.clients import admin_query
from harness.fleet import CONTROLLER, Fleet, prs, routed_port, status, wait_until
from harness.ledger import TABLE, Ledger, create_table
from reparent.etcdsandbox import EtcdCluster
from reparent.failpoint import ENV, EXIT_CODE
from reparent.sandbox import Sandbox
from tests.fixtures import (
    WritablePoller,
    etcd_cluster,
    port_hint,
    private_sandbox,
    server_ports,
    sysbench,
    sysbench_counts,
)

HINT = port_hint() + 200


@pytest.fixture(scope="module")
def box(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    yield from private_sandbox(tmp_path_factory, "fleet-sandbox")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    c = etcd_cluster(tmp_path_factory.mktemp("fleet-etcd"), members=3)
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def fleet(
    box: Sandbox, cluster: EtcdCluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Fleet]:
    f = Fleet(box, cluster.endpoints, "/fleet", tmp_path_factory.mktemp("fleet"), HINT)
    setup = f.batons[0].connect()
    create_table(setup)
    setup.close()
    try:
        yield f
    finally:
        f.stop()


def other(box: Sandbox, fleet: Fleet) -> str:
    """A replica to switch to."""
    primary = status(fleet.batons[0])["shards"][0]["primary"]
    return next(s["name"] for s in box.status()["servers"] if s["name"] != primary)


def switches(box: Sandbox, fleet: Fleet, count: int, settle: float, pause: float) -> list[Any]:
    """`count` PRS driven by baton-1, baton-2, baton-3, baton-1, ... in turn, each to another
    server, `settle` seconds after the load started and `pause` seconds apart; their reports."""
    time.sleep(settle)
    reports = []
    for i in range(count):
        out = prs(fleet.batons[i % len(fleet.batons)], "--to", other(box, fleet))
        assert out.returncode == 0, out.stdout + out.stderr
        reports.append(json.loads(out.stdout))
        time.sleep(pause)
    return reports


def switches_under_writes(
    box: Sandbox, fleet: Fleet, writers: int, count: int, settle: float, pause: float
) -> tuple[Ledger, WritablePoller, list[Any]]:
    """`switches` while a ledger's `writers` write through the Batons in turn and every server's
    read_only is polled; the ledger, the poller and the reports."""
    with WritablePoller(server_ports(box)) as poller:
        ledger = Ledger(fleet.connector(), writers=writers).start()
        try:
            reports = switches(box, fleet, count, settle, pause)
        finally:
            ledger.halt()
            ledger.join()
    return ledger, poller, reports


def truncate(fleet: Fleet) -> None:
    conn = fleet.batons[0].connect()
    conn.cursor().execute(f"TRUNCATE {TABLE}")
    conn.close()


def acked_present(box: Sandbox, fleet: Fleet, ledger: Ledger) -> None:
    primary = status(fleet.batons[0])["shards"][0]["primary"]
    rows = admin_query(server_ports(box)[primary], f"SELECT id FROM {TABLE}")
    missing = ledger.acked - {r["id"] for r in rows}
    assert not missing, sorted(missing)[:10]


def every_baton_routes_to_the_primary(box: Sandbox, fleet: Fleet, batons: list[Baton]) -> None:
    primary = status(batons[0])["shards"][0]["primary"]
    port = server_ports(box)[primary]
    for b in batons:
        wait_until(lambda b=b: routed_port(b) == port, 5, f"{b.config} to route to {primary}")


# -- hold and flush together ------------------------------------------------------------------


def test_prs_driven_from_each_baton_with_writers_on_all_three(box: Sandbox, fleet: Fleet) -> None:
    """A ledger's writers spread over the three Batons; each Baton drives a PRS in turn: no
    client error, no acknowledged write lost, never two writable servers, every proxy
    drained before each demotion, and everyone routes to the new primary."""
    truncate(fleet)
    ledger, poller, reports = switches_under_writes(box, fleet, 6, 3, settle=0.5, pause=0.5)
    assert not poller.overlaps, poller.overlaps[:5]
    assert ledger.errors == 0, ledger.error_log[:5]
    assert len(ledger.acked) > 100
    acked_present(box, fleet, ledger)
    for r in reports:
        assert r["outcome"] == "succeeded" and r["not_drained"] == [], r
    every_baton_routes_to_the_primary(box, fleet, fleet.batons)
    # Every proxy's counts end up in the history, each under its own id.
    history = json.loads(fleet.batons[0].ctl("--json", "history", "--limit", "3").stdout)
    wait_until(
        lambda: (
            len(
                json.loads(fleet.batons[0].ctl("--json", "history", "--limit", "1").stdout)[0][
                    "buffers"
                ]
            )
            == 3
        ),
        10,
        "three proxies' buffer counts",
    )
    assert {r["id"] for r in history} == {r["id"] for r in reports}
    st = status(fleet.batons[1])
    assert [(p["id"], p["alive"]) for p in st["proxies"]] == [
        ("baton-1", True),
        ("baton-2", True),
        ("baton-3", True),
    ]
    term = st["shards"][0]["term"]
    assert all(p["terms"] == {"main": term} for p in st["proxies"])


@pytest.mark.fault
def test_sysbench_and_a_ledger_on_three_batons_through_ten_prs(box: Sandbox, fleet: Fleet) -> None:
    """sysbench oltp_write_only through each Baton and a ledger spread over all three, through
    10 PRS driven from the Batons in turn: no client error, no acknowledged write lost, never
    two writable servers."""
    port = server_ports(box)[status(fleet.batons[0])["shards"][0]["primary"]]
    subprocess.run(
        sysbench(port, "--threads=4", "oltp_write_only", "prepare"), check=True, capture_output=True
    )
    truncate(fleet)
    duration = 60
    benches = [
        subprocess.Popen(
            sysbench(
                b.port,
                "--threads=2",
                f"--time={duration}",
                "--mysql-ignore-errors=none",
                "oltp_write_only",
                "run",
                timeout=duration + 60,
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for b in fleet.batons
    ]
    try:
        ledger, poller, reports = switches_under_writes(box, fleet, 3, 10, settle=3, pause=4)
    finally:
        outputs = [p.communicate(timeout=duration + 90)[0] for p in benches]
    assert not poller.overlaps, poller.overlaps[:5]
    assert ledger.errors == 0, ledger.error_log[:5]
    acked_present(box, fleet, ledger)
    for p, output in zip(benches, outputs, strict=True):
        assert p.returncode == 0, output
        counts = sysbench_counts(output)
        assert (counts["errors"], counts["reconnects"]) == (0, 0), output
        assert counts["transactions"] > 100, output
    assert [r["outcome"] for r in reports] == ["succeeded"] * 10
    assert all(r["not_drained"] == [] for r in reports), [r["not_drained"] for r in reports]


def test_a_second_concurrent_prs_is_refused(box: Sandbox, fleet: Fleet) -> None:
    """A transaction left open through baton-2 keeps the first PRS draining for its grace
    period; a PRS asked of baton-3 meanwhile is refused, naming the holder of the lock."""
    target = other(box, fleet)
    busy = fleet.batons[1].connect()
    busy.cursor().execute("BEGIN")
    busy.cursor().execute(f"INSERT INTO {TABLE} (id) VALUES (1)")
    first = subprocess.Popen(
        [*fleet.batons[0].ctl_args("--json", "prs", "--to", target)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until(
            lambda: status(fleet.batons[2])["shards"][0]["lock"] == "baton-1", 10, "the lock"
        )
        second = prs(fleet.batons[2])
        assert second.returncode != 0
        assert "already running" in second.stderr and "baton-1" in second.stderr, second.stderr
    finally:
        out, err = first.communicate(timeout=60)
        busy.close()
    assert first.returncode == 0, out + err
    assert json.loads(out)["not_drained"] == ["baton-2"]  # busy until the grace period ended


def test_a_stopped_proxy_delays_a_prs_by_at_most_its_lease_and_is_named(
    box: Sandbox, fleet: Fleet
) -> None:
    """SIGSTOP of baton-3 (its lease stops being renewed): the PRS from baton-1 waits for it
    no longer than the registration's 3 s lease, and its report names baton-3."""
    stopped = fleet.batons[2]
    target = other(box, fleet)
    os.kill(stopped.proc.pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        out = prs(fleet.batons[0], "--to", target)
        took = time.monotonic() - t0
    finally:
        os.kill(stopped.proc.pid, signal.SIGCONT)
    assert out.returncode == 0, out.stdout + out.stderr
    report = json.loads(out.stdout)
    assert report["not_drained"] == ["baton-3"], report
    # The wait ended when the 3 s lease lapsed (etcd notices within about a second), not at
    # the 5 s grace period.
    assert took < 4.8, took
    wait_until(
        lambda: all(p["alive"] for p in status(fleet.batons[0])["proxies"]), 10, "baton-3 back"
    )
    every_baton_routes_to_the_primary(box, fleet, fleet.batons)


# -- a Baton that dies driving a switch --------------------------------------------------------


def history(b: Baton) -> dict[str, Any] | None:
    """The shard's last finished reparent, as `ctl history` shows it; None if there is none."""
    records = json.loads(b.ctl("--json", "history", "--limit", "1").stdout)
    return records[0] if records else None


PRS_POINTS = [
    pytest.param(
        f"{when}:{call}",
        marks=[]
        if f"{when}:{call}" in ("before:revoke", "after:establish")
        else [pytest.mark.fault],
        id=f"{when}-{call}",
    )
    for call in ("choose", "prepare", "revoke", "establish", "commit")
    for when in ("before", "after")
]


@pytest.mark.parametrize("point", PRS_POINTS)
def test_a_baton_killed_driving_a_prs_is_replaced_by_another(
    box: Sandbox, fleet: Fleet, point: str
) -> None:
    """baton-1 dies (like kill -9) at a journal point of the PRS it drives; baton-2 or baton-3
    finishes or undoes it within the lock's TTL + 2 s, while the writers on those two see no
    error, and two servers are never writable. Before the hold (choose, prepare) nothing is
    journaled: nothing moved, nothing is left to finish, and once the dead Baton's lock lapses
    a survivor drives the next PRS within the same bound."""
    journaled = point.split(":")[1] not in ("choose", "prepare")
    fleet.batons[0].stop()
    fleet.batons[0] = driver = fleet.start(0, env={ENV: point})
    survivors = fleet.batons[1:]
    truncate(fleet)
    before = status(survivors[0])["shards"][0]
    previous = history(survivors[0])
    with WritablePoller(server_ports(box)) as poller:
        ledger = Ledger(fleet.connector(survivors), writers=4).start()
        try:
            time.sleep(0.5)
            to = other(box, fleet)
            driver.ctl("--json", "prs", "--to", to)  # cut off by the crash
            assert driver.proc.wait(30) == EXIT_CODE, driver.log.read_text()[-2000:]
            crashed_at = time.time()
            after = wait_until(
                lambda: (s := status(survivors[0])["shards"][0])["reparent"] is None and s,
                CONTROLLER["lock_ttl"] + 10,
                "another Baton to finish the reparent",
            )
            if not journaled:
                assert after["primary"] == before["primary"], (before, after)
                assert after["term"] == before["term"], (before, after)
                assert history(survivors[0]) == previous  # nothing to finish or undo
                # Refused while the dead driver's lock lives, then driven by a survivor.
                wait_until(
                    lambda: prs(survivors[0], "--to", to).returncode == 0,
                    CONTROLLER["lock_ttl"] + 2,
                    "a survivor's PRS once the lock lapsed",
                )
                after = status(survivors[0])["shards"][0]
            acked = ledger.count()
            wait_until(lambda: ledger.count() > acked + 10, 5, "writes through the survivors")
        finally:
            ledger.halt()
            ledger.join()
            driver.stop()
            fleet.batons[0] = fleet.start(0)
    last = history(survivors[0])
    assert last is not None and last != previous, last
    took = last["finished_at"] - crashed_at
    moved = after["primary"] != before["primary"]
    print(f"{point}: {last['outcome']} {took:.2f} s after the crash, {len(ledger.acked)} acked")
    assert not poller.overlaps, poller.overlaps[:5]
    assert ledger.errors == 0, ledger.error_log[:5]
    acked_present(box, fleet, ledger)
    assert moved == (last["outcome"] == "succeeded"), last
    assert last["outcome"] in ("succeeded", "aborted", "undone"), last
    assert after["term"] == before["term"] + moved
    assert took < CONTROLLER["lock_ttl"] + 2, took
    every_baton_routes_to_the_primary(box, fleet, fleet.batons)


# -- etcd's own failures -------------------------------------------------------------------------


def test_one_etcd_member_down_a_prs_still_works(
    box: Sandbox, fleet: Fleet, cluster: EtcdCluster
) -> None:
    first = cluster.members[0].name  # every Baton tries it first
    cluster.kill(first)
    try:
        out = prs(fleet.batons[2], "--to", other(box, fleet))
        assert out.returncode == 0, out.stdout + out.stderr
        assert json.loads(out.stdout)["not_drained"] == []
    finally:
        cluster.start_member(first)
        cluster.wait_ready()
    every_baton_routes_to_the_primary(box, fleet, fleet.batons)


def test_etcd_down_traffic_flows_and_no_switch_starts_then_back(
    box: Sandbox, fleet: Fleet, cluster: EtcdCluster
) -> None:
    """Every etcd member killed: writes through all three Batons go on to the primary they
    know, a PRS is refused as "topology store unreachable"; etcd back: the next PRS works."""
    truncate(fleet)
    with WritablePoller(server_ports(box)) as poller:
        ledger = Ledger(fleet.connector(), writers=6).start()
        try:
            time.sleep(0.5)
            for m in cluster.members:
                cluster.kill(m.name)
            try:
                time.sleep(4)  # past every lease: registrations, locks
                acked = ledger.count()
                wait_until(lambda: ledger.count() > acked + 50, 5, "writes without etcd")
                refused = prs(fleet.batons[1])
                assert refused.returncode != 0
                assert "topology store unreachable" in refused.stderr, refused.stderr
            finally:
                for m in cluster.members:
                    cluster.start_member(m.name)
                cluster.wait_ready()
            wait_until(
                lambda: all(p["alive"] for p in status(fleet.batons[0])["proxies"]),
                15,
                "every proxy registered again",
            )
            out = prs(fleet.batons[1], "--to", other(box, fleet))
            assert out.returncode == 0, out.stdout + out.stderr
            assert json.loads(out.stdout)["not_drained"] == []
            acked = ledger.count()
            wait_until(lambda: ledger.count() > acked + 50, 5, "writes after the switch")
        finally:
            ledger.halt()
            ledger.join()
    assert not poller.overlaps, poller.overlaps[:5]
    assert ledger.errors == 0, ledger.error_log[:5]
    acked_present(box, fleet, ledger)
    every_baton_routes_to_the_primary(box, fleet, fleet.batons)


# -- the primary dies: one emergency reparent for the fleet ------------------------------------


def test_kill_primary_one_ers_and_writes_flow_through_every_baton(
    tmp_path_factory: pytest.TempPathFactory, cluster: EtcdCluster, tmp_path: Path
) -> None:
    """kill -9 of the primary with three Batons, each with its failure detector: exactly one
    emergency reparent runs (the detector leader's), and writes through each Baton flow again
    within 3 s."""
    with contextmanager(private_sandbox)(tmp_path_factory, "fleet-ers-sandbox") as ers_box:
        fleet = Fleet(ers_box, cluster.endpoints, "/fleet-ers", tmp_path, HINT + 60, detector=True)
        try:
            setup = fleet.batons[0].connect()
            create_table(setup)
            setup.close()
            leader = wait_until(
                lambda: status(fleet.batons[0])["detector_leader"], 10, "a detector leader"
            )
            ledgers = [
                Ledger(fleet.connector([b]), writers=1, first=i).start()
                for i, b in enumerate(fleet.batons)
            ]
            try:
                time.sleep(1.0)
                primary = status(fleet.batons[0])["shards"][0]["primary"]
                pid = next(s["pid"] for s in ers_box.status()["servers"] if s["name"] == primary)
                os.kill(pid, signal.SIGKILL)
                killed_at = time.monotonic()
                wait_until(
                    lambda: status(fleet.batons[1])["shards"][0]["primary"] != primary,
                    15,
                    "the emergency reparent",
                )
                time.sleep(3)  # room for a second, wrong, ERS to show up
            finally:
                for ledger in ledgers:
                    ledger.halt()
                for ledger in ledgers:
                    ledger.join()
            history = json.loads(fleet.batons[2].ctl("--json", "history").stdout)
            ers = [r for r in history if r["kind"] == "ers"]
            assert len(ers) == 1 and ers[0]["outcome"] == "succeeded", history
            flowing = []
            for ledger in ledgers:
                first = min(
                    (acked for sent, acked in ledger.acks if sent > killed_at), default=None
                )
                assert first is not None, (
                    f"no write flowed through a Baton: {ledger.errors} errors "
                    f"{ledger.error_log[-3:]}, {len(ledger.acks)} acked"
                )
                flowing.append(first - killed_at)
            print(f"ERS by the leader {leader}; writes flowing per Baton {flowing}")
            assert max(flowing) < 3.0, flowing
        finally:
            fleet.stop()
