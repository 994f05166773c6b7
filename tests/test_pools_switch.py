"""Sessions sharing a pool across planned switchovers, on a private sandbox: every statement
answered without an error, the servers never past their lowered max_connections, the held
commands flushed onto the new primary's pool. The short version runs in `make test`; the
issue's scale (5,000 sessions, 2,000 of them writing, 10 PRS) is `make fault-test`'s and
`python -m bench.pools`'s."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import pytest

from bench.pools import DB, Load, Poller, admin, switches
from harness.baton import start_baton
from reparent.sandbox import Sandbox
from tests.fixtures import port_hint, private_sandbox, server_ports


@pytest.fixture(scope="module")
def box(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    yield from private_sandbox(tmp_path_factory, "pools-sandbox", replicas=1)


def run(
    box: Sandbox,
    tmp_path_factory: pytest.TempPathFactory,
    sessions: int,
    writers: int,
    seconds: float,
    prs: int,
    max_connections: int,
    pool_max: int,
    workers: int = 0,
) -> None:
    ports = server_ports(box)
    primary = next(s["name"] for s in box.status()["servers"] if s["role"] == "primary")
    admin(ports[primary], f"CREATE DATABASE IF NOT EXISTS {DB}")
    admin(
        ports[primary],
        f"CREATE TABLE IF NOT EXISTS {DB}.pools_t (id BIGINT AUTO_INCREMENT PRIMARY KEY, v INT)",
    )
    for p in ports.values():
        admin(p, f"SET GLOBAL max_connections = {max_connections}")
    b = start_baton(
        box.config_path,
        tmp_path_factory.mktemp("pools-switch-baton"),
        port_hint() + 170,
        # (per worker, and clients do not split evenly between workers)
        proxy={"max_connections": 2 * sessions + 100, "workers": workers},
        extra={"pool": {"multiplex": True, "max": pool_max, "queue": 20000, "wait_timeout": 20}},
        buffer={"size": 10000, "drain_concurrency": 64, "window": 20, "max_failover": 30},
        detector={"enabled": False},
        nofile=min(20000, 4 * sessions + 1000),
    )
    poller = Poller(list(ports.values()))
    poller.start()
    try:
        load = Load(b.port, sessions, writers, seconds)

        async def both() -> list[dict[str, object]]:
            running = asyncio.ensure_future(load.run(ramp=2))
            await asyncio.sleep(3)
            reports = await switches(b, sorted(ports), prs, max(2.0, (seconds - 2) / (prs + 1)))
            await running
            return reports

        reports = asyncio.run(both())
        poller.stop.set()
        assert dict(load.connect_errors) == {}
        assert dict(load.errors) == {}
        assert [r.get("outcome") for r in reports] == ["succeeded"] * prs, reports
        assert load.statements >= sessions * (seconds - 2) * 0.5
        # The servers never had more than their max_connections: every refusal would have
        # been an error above, and the pool stays under it.
        assert all(n <= max_connections for n in poller.most.values()), poller.most
        state = json.loads(b.ctl("--json", "pools").stdout)
        assert all(p["max"] == pool_max for p in state["pools"])
        assert sum(r["held"] for r in reports) > 0  # commands were held and flushed
        assert all(r["evicted"] == 0 for r in reports)
    finally:
        poller.stop.set()
        b.stop()
        for p in ports.values():
            admin(p, "SET GLOBAL max_connections = 151")


def test_sessions_sharing_a_pool_across_switchovers(
    box: Sandbox, tmp_path_factory: pytest.TempPathFactory
) -> None:
    run(
        box,
        tmp_path_factory,
        sessions=300,
        writers=100,
        seconds=12,
        prs=2,
        max_connections=40,
        pool_max=20,
    )


@pytest.mark.fault
def test_five_thousand_sessions_ten_switchovers(
    box: Sandbox, tmp_path_factory: pytest.TempPathFactory
) -> None:
    run(
        box,
        tmp_path_factory,
        sessions=5000,
        writers=2000,
        seconds=70,
        prs=10,
        max_connections=200,
        pool_max=90,
        workers=2,
    )
