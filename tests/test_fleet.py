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

import pytest

from reparent.etcdsandbox import EtcdCluster
from reparent.sandbox import Sandbox
from tests.fixtures import (
    Baton,
    admin_query,
    etcd_cluster,
    port_hint,
    private_sandbox,
    server_ports,
)
from tests.fleet import Fleet, prs, routed_port, status, wait_until
from tests.ledger import TABLE, Ledger, create_table
from tests.test_crash import WritablePoller

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
    reports = []
    with WritablePoller(server_ports(box)) as poller:
        ledger = Ledger(fleet.connector(), writers=6).start()
        try:
            time.sleep(0.5)
            for b in fleet.batons:
                out = prs(b, "--to", other(box, fleet))
                assert out.returncode == 0, out.stdout + out.stderr
                reports.append(json.loads(out.stdout))
                time.sleep(0.5)
        finally:
            ledger.halt()
            ledger.join()
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
        lambda: len(
            json.loads(fleet.batons[0].ctl("--json", "history", "--limit", "1").stdout)[0][
                "buffers"
            ]
        )
        == 3,
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
