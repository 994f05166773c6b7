"""Blips that must not be taken for a dead primary: no failover at all (issue 15).

A sandbox of its own under semi_sync, whose servers Baton reaches through a fault shim each
(its probes and its clients alike) while the replicas replicate from the primary directly, and
the failure detector at its defaults. A writer inserts through Baton all along. For
BLIP_SECONDS it draws one blip after another (seeded, and printed), each followed by a quiet
spell:

- Baton cut off from the primary (blackholed, or refused connections) for 0.5-4 s: only Baton
  lost it, the replicas still stream from it;
- Baton cut off from a replica, likewise;
- a replica stopped (SIGSTOP) for 0.3-3 s;
- the primary stopped for 0.1-0.8 s, less than the detection time: a stopped primary is
  decided after three failed rounds, the third sent at least 1.05 s after it stopped, and its
  replicas' silence must last 0.75 s (detector.py).

Checked: no reparent in the history and the term unchanged, never two servers writable (polled
directly, not through the shims), no `run_ers` in the log, and every write the writer saw
acknowledged is on the primary. `make fault-test` blips for ten minutes; `make test` for 30 s.
"""

from __future__ import annotations

import json
import os
import random
import signal
import time
import tomllib
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from harness.baton import dump_toml, start_baton
from harness.clients import admin_query
from harness.ledger import TABLE, Ledger, create_table
from reparent.config import DetectorConfig
from reparent.sandbox import Sandbox
from tests.faultshim import FaultShim
from tests.fixtures import WritablePoller, port_hint, private_sandbox, server_ports

DEFAULTS = DetectorConfig()
DETECTOR = {
    "interval": DEFAULTS.interval,
    "failures": DEFAULTS.failures,
    "probe_timeout": DEFAULTS.probe_timeout,
}
LONG = os.environ.get("BATON_FAULT_SUITE") == "1"
BLIP_SECONDS = 600.0 if LONG else 30.0
MAX_PRIMARY_PAUSE = 0.8  # below the 1.05 s a stopped primary takes to be decided at least


@pytest.fixture(scope="module")
def box(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    yield from private_sandbox(tmp_path_factory, "blips-sandbox")


def test_blips_are_never_a_failover(box: Sandbox, tmp_path: Path) -> None:
    assert DetectorConfig(**DETECTOR) == DEFAULTS  # what is tested is what ships
    status = box.status()
    ports = server_ports(box)
    pids = {s["name"]: s["pid"] for s in status["servers"]}
    base = tmp_path / "base.toml"
    data = tomllib.loads(box.config_path.read_text())
    data["replication"]["durability"] = "semi_sync"
    base.write_text(dump_toml(data))
    shims = {name: FaultShim(port).start() for name, port in ports.items()}
    try:
        servers = [
            {
                "name": s["name"],
                "host": "127.0.0.1",
                "port": shims[s["name"]].port,
                "role": s["role"],
                "replication_port": s["port"],  # the replicas' own path, never cut
            }
            for s in status["servers"]
        ]
        b = start_baton(
            base, tmp_path / "baton", port_hint() + 150, servers=servers, detector=DETECTOR
        )
        try:
            with b.connect() as conn:
                create_table(conn)
            seed = int(os.environ.get("BATON_BLIP_SEED", time.time()))
            print(f"\nblips for {BLIP_SECONDS:.0f} s, seed {seed} (BATON_BLIP_SEED)")
            ledger = Ledger(
                lambda: b.connect(connect_timeout=5, read_timeout=30), writers=1
            ).start()
            with WritablePoller(ports) as poller:
                blips = run_blips(random.Random(seed), shims, pids, BLIP_SECONDS)
            ledger.halt()
            ledger.join()
            history = json.loads(b.ctl("--json", "history").stdout)
            st = json.loads(b.ctl("--json", "status").stdout)["shards"][0]
            counts = dict(Counter(kind for kind, _, _ in blips))
            print(f"{len(blips)} blips: {counts}; {len(ledger.acked)} writes acknowledged")
            assert history == [], [(h["kind"], h["old_primary"], h["reason"]) for h in history]
            assert (st["primary"], st["term"]) == ("db1", 1)
            assert not poller.overlaps, poller.overlaps[:5]
            log = b.log.read_text()
            assert "run_ers" not in log, log[-3000:]
            rows = admin_query(ports["db1"], f"SELECT id FROM {TABLE}")
            assert ledger.acked <= {r["id"] for r in rows}
            assert len(ledger.acked) > 0
        finally:
            b.stop()
    finally:
        for shim in shims.values():
            shim.close()
        for pid in pids.values():
            _signal(pid, signal.SIGCONT)  # whatever a failed test left stopped


def run_blips(
    rng: random.Random, shims: dict[str, FaultShim], pids: dict[str, int], seconds: float
) -> list[tuple[str, str, float]]:
    """Blip until `seconds` have passed; every blip as (kind, server, seconds)."""
    replicas = [n for n in shims if n != "db1"]
    kinds: list[tuple[str, Callable[[], tuple[str, float]]]] = [
        ("cut_primary", lambda: ("db1", rng.uniform(0.5, 4.0))),
        ("cut_replica", lambda: (rng.choice(replicas), rng.uniform(0.5, 4.0))),
        ("stop_replica", lambda: (rng.choice(replicas), rng.uniform(0.3, 3.0))),
        ("stop_primary", lambda: ("db1", rng.uniform(0.1, MAX_PRIMARY_PAUSE))),
    ]
    done: list[tuple[str, str, float]] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        kind, draw = rng.choice(kinds)
        server, length = draw()
        if kind.startswith("cut"):
            shim = shims[server]
            shim.blackhole() if rng.random() < 0.5 else shim.reset()
            try:
                time.sleep(length)
            finally:
                shim.restore()
        else:
            _signal(pids[server], signal.SIGSTOP)
            try:
                time.sleep(length)
            finally:
                _signal(pids[server], signal.SIGCONT)
        done.append((kind, server, round(length, 2)))
        time.sleep(rng.uniform(0.5, 2.0))
    return done


def _signal(pid: int, sig: signal.Signals) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
