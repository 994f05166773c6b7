"""Durability policy semi_sync against real MariaDB, with every path through a fault shim.

Each group is a sandbox of its own whose servers Baton reaches through one shim each and whose
replicas replicate through another (`replication_port`), and a Baton with the detector off:
these tests call ERS themselves. The ledger (harness/ledger.py) records every id whose COMMIT was
acknowledged; after `kill -9` of the primary and `baton ctl ers`, those missing from the new
primary are acknowledged writes lost.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from harness.baton import Baton, dump_toml, start_baton
from harness.clients import admin_query
from harness.ledger import TABLE, create_table, kill_primary_then_ers
from reparent.durability import SEMI_SYNC_TIMEOUT_MS
from reparent.sandbox import ADMIN, Sandbox, SandboxError
from tests.conftest import sandbox_base_port
from tests.faultshim import ShimmedGroup
from tests.fixtures import port_hint

pytestmark = pytest.mark.sandbox


@dataclass
class Group:
    box: Sandbox
    shims: ShimmedGroup
    baton: Baton

    @property
    def ports(self) -> dict[str, int]:
        return dict(self.shims.ports)

    @property
    def pids(self) -> dict[str, int]:
        return {s["name"]: s["pid"] for s in self.box.status()["servers"]}

    def one(self, server: str, sql: str) -> Any:
        rows = admin_query(self.ports[server], sql)
        return rows[0] if rows else None

    def ids(self, server: str) -> set[int]:
        return {r["id"] for r in admin_query(self.ports[server], f"SELECT id FROM {TABLE}")}

    def ctl_json(self, *args: str) -> tuple[int, Any]:
        out = self.baton.ctl("--json", *args)
        try:
            return out.returncode, json.loads(out.stdout)
        except json.JSONDecodeError:
            return out.returncode, out.stdout + out.stderr


def start_group(tmp: Path, durability: str, hint: int) -> Group:
    for attempt in range(3):  # two runs may both find one port block free
        box = Sandbox(tmp / "sandbox", base_port=sandbox_base_port(), replicas=2)
        try:
            box.up()
            break
        except SandboxError as e:
            if "in use" not in str(e) or attempt == 2:
                raise
    shims = ShimmedGroup(box.status())
    try:
        shims.route_replicas((ADMIN.user, ADMIN.password))
        data = tomllib.loads(box.config_path.read_text())
        data["replication"]["durability"] = durability
        base = tmp / "base.toml"
        base.write_text(dump_toml(data))
        baton = start_baton(
            base,
            tmp / "baton",
            hint,
            servers=shims.servers(),
            controller={"grace": 1.0, "timeout": 5.0},
            detector={"enabled": False},
        )
    except BaseException:
        shims.close()
        box.down()
        raise
    group = Group(box, shims, baton)
    with baton.connect() as conn:
        create_table(conn)
    return group


def stop_group(group: Group) -> None:
    group.baton.stop()
    group.shims.close()
    group.box.down()


@pytest.fixture(scope="module")
def semi(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Group]:
    g = start_group(tmp_path_factory.mktemp("semi"), "semi_sync", port_hint() + 70)
    try:
        yield g
    finally:
        stop_group(g)


def semi_sync_state(g: Group, server: str) -> dict[str, Any]:
    return g.one(
        server,
        "SELECT @@global.rpl_semi_sync_master_enabled AS master,"
        " @@global.rpl_semi_sync_slave_enabled AS slave,"
        " @@global.rpl_semi_sync_master_timeout AS timeout,"
        " @@global.rpl_semi_sync_master_wait_point AS wait_point,"
        " @@global.rpl_semi_sync_slave_kill_conn_timeout AS kill_conn_timeout",
    )


def assert_semi_sync_primary(g: Group, primary: str) -> None:
    """`primary` waits for acks, the others give them, and every live replica is connected to
    it as a semi-sync client through the primary's replication shim."""
    state = semi_sync_state(g, primary)
    assert (state["master"], state["timeout"], state["wait_point"]) == (
        1,
        SEMI_SYNC_TIMEOUT_MS,
        "AFTER_SYNC",
    )
    running = {s["name"] for s in g.box.status()["servers"] if s["running"]}
    replicas = [n for n in g.ports if n != primary and n in running]
    for name in replicas:
        state = semi_sync_state(g, name)
        assert (state["master"], state["slave"], state["kill_conn_timeout"]) == (0, 1, 1), name
        assert g.one(name, "SHOW SLAVE STATUS")["Master_Port"] == g.shims.replication[primary].port
    deadline = time.monotonic() + 10
    while True:
        status = g.one(primary, "SHOW GLOBAL STATUS LIKE 'Rpl_semi_sync_master_clients'")
        if int(status["Value"]) == len(replicas):
            break
        assert time.monotonic() < deadline, status
        time.sleep(0.05)


def write_through_baton(g: Group, value: int) -> None:
    with g.baton.connect() as conn, conn.cursor() as cur:
        cur.execute(f"INSERT INTO {TABLE} (id) VALUES (%s)", (value,))


def test_semi_sync_applied_at_start(semi: Group) -> None:
    assert_semi_sync_primary(semi, "db1")
    write_through_baton(semi, 1)
    assert semi.one("db1", "SHOW GLOBAL STATUS LIKE 'Rpl_semi_sync_master_no_tx'")["Value"] == "0"


def test_planned_reparents_through_shims_keep_semi_sync(semi: Group) -> None:
    for target, value in (("db2", 2), ("db1", 3)):
        code, report = semi.ctl_json("prs", "--to", target)
        assert code == 0 and report["new_primary"] == target, report
        assert_semi_sync_primary(semi, target)
        write_through_baton(semi, value)


def test_primary_cut_off_from_its_replicas_cannot_acknowledge(semi: Group) -> None:
    """The fence semi_sync gives: no replica hears the primary, so no commit is acknowledged;
    the commit completes when the path heals."""
    done: list[float] = []

    def write() -> None:
        write_through_baton(semi, 4)
        done.append(time.monotonic())

    semi.shims.replication["db1"].blackhole()
    writer = threading.Thread(target=write)
    try:
        writer.start()
        writer.join(1.0)
        assert writer.is_alive() and not done
        waiting = semi.one("db1", "SHOW GLOBAL STATUS LIKE 'Rpl_semi_sync_master_wait_sessions'")
        assert int(waiting["Value"]) >= 1
    finally:
        semi.shims.replication["db1"].restore()
    writer.join(10)
    assert done and 4 in semi.ids("db2") | semi.ids("db3")


def test_semi_sync_loses_no_acknowledged_write_when_the_primary_dies(semi: Group) -> None:
    outcome = kill_primary_then_ers(
        semi.baton.connect, semi.baton.ctl, semi.pids, "db1", semi.ids, "semi_sync"
    )
    print("durability", json.dumps(outcome.summary()))
    assert outcome.acked > 50, outcome.summary()
    assert outcome.lost == [], outcome.summary()
    new = outcome.new_primary
    assert_semi_sync_primary(semi, new)  # the last replica acknowledges the new primary's
    write_through_baton(semi, 5)
    assert 5 in semi.ids(new)


@pytest.mark.parametrize("durability", ["semi_sync", "async"])
def test_primary_cut_off_from_replicas_then_killed(tmp_path: Path, durability: str) -> None:
    """Writes while no replica hears the primary, then kill -9: async acknowledged them and
    loses them; semi_sync acknowledged none of them on the old primary and loses nothing."""
    g = start_group(tmp_path, durability, port_hint() + 80)
    try:
        ledger_before = set(range(100, 110))
        for i in ledger_before:
            write_through_baton(g, i)
        g.shims.replication["db1"].blackhole()
        outcome = kill_primary_then_ers(
            g.baton.connect,
            g.baton.ctl,
            g.pids,
            "db1",
            g.ids,
            durability,
            load_seconds=0.5,
            # Under async every write acknowledged now is on db1 alone: make sure there are some.
            min_acked=20 if durability == "async" else 0,
        )
        print("cut off then killed", json.dumps(outcome.summary()))
        assert ledger_before <= g.ids(outcome.new_primary)
        revoke = next(p for p in outcome.ers["phases"] if p["call"] == "revoke")
        # The fence's STOP SLAVE IO_THREAD tries to reach the cut-off primary; semi-sync
        # replicas give up after rpl_semi_sync_slave_kill_conn_timeout (1 s, set by Baton).
        assert revoke["duration_ms"] < 1800, outcome.ers["phases"]
        if durability == "semi_sync":
            # Only what the new primary itself acknowledged (Baton ran the commits that had
            # waited on the dead one there, once it was established).
            assert outcome.lost == [], outcome.summary()
        else:
            assert len(outcome.lost) > 0, outcome.summary()
    finally:
        stop_group(g)


def test_ers_refuses_under_semi_sync_while_a_replica_is_unreachable() -> None:
    """An unreached replica may hold the only copy of an acknowledged write."""
    from reparent.config import Durability, Role, ServerConfig
    from reparent.establish import GtidEstablishment
    from reparent.mechanism import FailureKind, MechanismError, ReparentContext

    servers = tuple(
        ServerConfig(f"db{i}", "127.0.0.1", 1, Role.REPLICA if i > 1 else Role.PRIMARY)
        for i in (1, 2, 3)
    )
    ctx = ReparentContext(
        "main", servers, servers[0], None, ADMIN, ADMIN, 1.0, durability=Durability.SEMI_SYNC
    )

    class Pool:
        def each(self, targets: Any, account: Any, action: Any, *a: Any) -> dict[str, Any]:
            from reparent.admin import Replication

            pos = "0-1-10"
            status = {"Gtid_IO_Pos": pos, "Slave_SQL_Running": "Yes", "Slave_IO_Running": "No"}
            return {
                "db2": Replication("db2", status, pos, pos, pos, pos),
                "db3": MechanismError(FailureKind.UNREACHABLE, "db3: connect"),
            }

        def get(self, *a: Any, **k: Any) -> Any:
            raise MechanismError(FailureKind.UNREACHABLE, "db1: connect")

    establishment = GtidEstablishment(pool=Pool())  # type: ignore[arg-type]
    with pytest.raises(MechanismError) as caught:
        establishment.choose(ctx)
    assert caught.value.kind is FailureKind.UNREACHABLE and "db3" in str(caught.value)
    async_ctx = ReparentContext("main", servers, servers[0], None, ADMIN, ADMIN, 1.0)
    assert establishment.choose(async_ctx).name == "db2"


def test_ers_allowed_to_leave_an_unreachable_replica_names_the_risk(tmp_path: Path) -> None:
    """A replica dead before the primary blocks every ERS under semi_sync, since it may hold
    the only copy of an acknowledged write; `ctl ers --allow-unreachable` goes ahead without
    it, and its output and the report say what that risks."""
    g = start_group(tmp_path, "semi_sync", port_hint() + 90)
    try:
        write_through_baton(g, 7)
        for name in ("db3", "db1"):
            os.kill(g.pids[name], signal.SIGKILL)
        code, report = g.ctl_json("ers")
        assert code == 1 and report["outcome"] == "failed", report
        assert "db3 not reached" in report["reason"] and "--allow-unreachable" in report["reason"]
        out = g.baton.ctl("ers", "--allow-unreachable", "db9")
        assert out.returncode == 1 and "no replica 'db9'" in out.stderr
        out = g.baton.ctl("ers", "--allow-unreachable", "db3")
        assert out.returncode == 0, out.stdout + out.stderr
        assert "db1 -> db2" in out.stdout and "succeeded" in out.stdout
        assert "allowed unreachable by the operator: db3" in out.stdout
        assert "an acknowledged write only they received is lost" in out.stdout
        (last, *_) = json.loads(g.baton.ctl("--json", "history").stdout)
        assert (last["outcome"], last["allow_unreachable"]) == ("succeeded", ["db3"])
        assert "allowed unreachable by the operator" in g.baton.log.read_text()
        assert 7 in g.ids("db2")
    finally:
        stop_group(g)
