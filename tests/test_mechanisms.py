"""The revocation and establishment mechanisms against real MariaDB, driven by hand.

They change the topology, so they run on sandboxes of their own, never the shared one. Every
test on the module's sandbox leaves db1 the primary of db2 and db3, as it found it; the
emergency test kills its primary and gets a sandbox to itself.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import pymysql
import pytest

from harness.process import free_port
from reparent import config, gtid
from reparent.admin import AdminPool
from reparent.config import Role, ServerConfig
from reparent.establish import GtidEstablishment
from reparent.mechanism import (
    Candidate,
    EstablishmentProof,
    FailureKind,
    MechanismError,
    ReparentContext,
    RevocationProof,
)
from reparent.revoke import READ_ONLY_PATIENCE, FollowerFencing, GracefulDemotion
from reparent.sandbox import ADMIN, APP, HOST, REPL, Sandbox, SandboxError
from tests.conftest import sandbox_base_port

pytestmark = pytest.mark.sandbox

ER_OPTION_PREVENTS_STATEMENT = 1290
TABLE = "baton_test.moves"
SANDBOX_ATTEMPTS = 3


# -- helpers -------------------------------------------------------------------------------------


def connect(server: ServerConfig, account: config.Account = ADMIN) -> pymysql.Connection:
    # TLS off: PyMySQL's default builds an SSL context per connect (tens of ms here).
    return pymysql.connect(
        host=server.host,
        port=server.port,
        user=account.user,
        password=account.password,
        autocommit=True,
        connect_timeout=5,
        ssl_disabled=True,
    )


def sql(
    server: ServerConfig, statement: str, args: tuple = (), account: config.Account = ADMIN
) -> list[dict[str, Any]]:
    with connect(server, account) as conn, conn.cursor(pymysql.cursors.DictCursor) as cur:
        cur.execute(statement, args or None)
        return list(cur.fetchall())


def value(server: ServerConfig, statement: str, args: tuple = ()) -> Any:
    (row,) = sql(server, statement, args)
    return next(iter(row.values()))


def write(server: ServerConfig, note: str) -> None:
    """A client's write: the app user, which read_only fences."""
    sql(server, f"INSERT INTO {TABLE} (note) VALUES (%s)", (note,), account=APP)


def context(
    servers: list[ServerConfig], old: ServerConfig, candidate: ServerConfig | None = None
) -> ReparentContext:
    return ReparentContext(
        shard="main",
        servers=tuple(servers),
        old_primary=old,
        candidate=candidate,
        admin=ADMIN,
        replication=REPL,
        timeout=10.0,
    )


def planned(pool: AdminPool, ctx: ReparentContext) -> tuple[RevocationProof, EstablishmentProof]:
    """choose → prepare → revoke → establish, in the orchestrator's order."""
    establishment = GtidEstablishment(pool=pool, max_lag_seconds=5)
    candidate = establishment.choose(ctx)
    establishment.prepare(ctx, candidate)
    revoked = GracefulDemotion(pool).revoke(ctx)
    return revoked, establishment.establish(ctx, candidate, revoked)


def wait_applied(replicas: list[ServerConfig], position: str) -> None:
    for replica in replicas:
        assert value(replica, "SELECT MASTER_GTID_WAIT(%s, 10)", (position,)) == 0, replica.name


def assert_topology(primary: ServerConfig, replicas: list[ServerConfig]) -> None:
    """`primary` takes client writes, every replica applies them from it and is read_only, and
    the table is identical everywhere."""
    write(primary, f"check {primary.name}")
    wait_applied(replicas, value(primary, "SELECT @@gtid_binlog_pos"))
    assert value(primary, "SELECT @@global.read_only") == 0
    assert sql(primary, "SHOW SLAVE STATUS") == []
    for replica in replicas:
        (status,) = sql(replica, "SHOW SLAVE STATUS")
        assert (status["Master_Port"], status["Using_Gtid"]) == (primary.port, "Slave_Pos")
        assert (status["Slave_IO_Running"], status["Slave_SQL_Running"]) == ("Yes", "Yes")
        assert value(replica, "SELECT @@global.read_only") == 1
    checksums = {s.name: sql(s, f"CHECKSUM TABLE {TABLE}")[0]["Checksum"] for s in replicas}
    checksums[primary.name] = sql(primary, f"CHECKSUM TABLE {TABLE}")[0]["Checksum"]
    assert len(set(checksums.values())) == 1, checksums


def refused(action: Any, kind: FailureKind) -> str:
    with pytest.raises(MechanismError) as caught:
        action()
    assert caught.value.kind is kind, caught.value
    return str(caught.value)


@contextmanager
def running_sandbox(dir: Path) -> Iterator[tuple[Sandbox, list[ServerConfig]]]:
    """A primary and two replicas on a port block no other run holds, with the table the tests
    write to; the sandbox and its servers, primary first.

    Two concurrent runs can both find a block free and clash a second later (install-db runs
    before any port is bound; seen here with two runs at once): a clash is retried on the
    next free block.
    """
    for attempt in range(SANDBOX_ATTEMPTS):
        box = Sandbox(dir, base_port=sandbox_base_port(), replicas=2)
        try:
            box.up()
            break
        except SandboxError as e:
            if "in use" not in str(e) or attempt == SANDBOX_ATTEMPTS - 1:
                raise
    try:
        servers = list(config.load(box.config_path).shard.servers)
        sql(servers[0], f"CREATE TABLE {TABLE} (id INT AUTO_INCREMENT PRIMARY KEY, note TEXT)")
        yield box, servers
    finally:
        box.down()


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[ServerConfig]]:
    with running_sandbox(tmp_path_factory.mktemp("mechanisms")) as (_, found):
        yield found


@pytest.fixture(scope="module")
def ghost(servers: list[ServerConfig]) -> ServerConfig:
    """A replica in the config whose port nothing listens on."""
    return ServerConfig("ghost", HOST, free_port(servers[-1].port + 1), Role.REPLICA)


@pytest.fixture
def pool() -> Iterator[AdminPool]:
    p = AdminPool()
    try:
        yield p
    finally:
        p.close()


# -- planned -------------------------------------------------------------------------------------


def test_planned_reparent_there_and_back(servers, ghost, pool):
    db1, db2, db3 = servers
    everyone = [*servers, ghost]
    write(db1, "before")
    idle_client = connect(db1, APP)

    ctx = context(everyone, db1, db2)
    revoked, established = planned(pool, ctx)

    assert revoked.old_primary == "db1" and revoked.drained
    assert revoked.killed_connections >= 1
    with pytest.raises(pymysql.err.OperationalError):
        idle_client.query("SELECT 1")  # killed: its client must reconnect
    assert established.new_primary == "db2"
    assert sorted(established.repointed) == ["db1", "db3"]
    assert established.unreachable == ("ghost",)
    # What a controller resuming from its journal does: the same again, to the same end.
    assert GtidEstablishment(pool=pool).establish(ctx, Candidate("db2", ""), revoked) == established
    assert gtid.contains(established.gtid_position, revoked.gtid_position)
    with pytest.raises(pymysql.err.OperationalError) as caught:
        write(db1, "refused")
    assert caught.value.args[0] == ER_OPTION_PREVENTS_STATEMENT
    assert_topology(db2, [db1, db3])

    _, back = planned(pool, context(everyone, db2, db1))

    assert (back.new_primary, sorted(back.repointed)) == ("db1", ["db2", "db3"])
    assert_topology(db1, [db2, db3])


def test_demotion_undo_gives_writes_back(servers, pool):
    db1 = servers[0]
    grace: list[float] = []
    ctx = context(servers, db1)
    # A proxy that never reported drained: the demotion goes on after the grace period.
    ctx = replace(ctx, wait_drained=lambda g: grace.append(g) or False)
    demotion = GracefulDemotion(pool)

    revoked = demotion.revoke(ctx)

    assert grace == [ctx.grace] and not revoked.drained
    assert revoked.gtid_position == value(db1, "SELECT @@gtid_binlog_pos")
    with pytest.raises(pymysql.err.OperationalError):
        write(db1, "refused")
    demotion.undo(ctx, revoked)
    write(db1, "after undo")
    assert value(db1, "SELECT @@global.read_only") == 0


def test_demotion_kills_a_write_that_outlasts_its_patience(servers, pool):
    db1 = servers[0]
    ctx = context(servers, db1)
    demotion = GracefulDemotion(pool)
    outcome: list[BaseException | None] = []

    def slow_write() -> None:
        try:
            sql(db1, f"INSERT INTO {TABLE} (note) SELECT SLEEP(5)", account=APP)
            outcome.append(None)
        except pymysql.err.Error as e:
            outcome.append(e)

    writer = threading.Thread(target=slow_write)
    writer.start()
    running = "SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE INFO LIKE 'INSERT%'"
    deadline = time.monotonic() + 5
    while value(db1, running) == 0:  # once it runs, read_only=1 has to wait for it
        assert time.monotonic() < deadline, "the slow INSERT did not start"
        time.sleep(0.01)
    started = time.monotonic()
    revoked = demotion.revoke(ctx)
    took = time.monotonic() - started
    writer.join(5)

    assert READ_ONLY_PATIENCE <= took < READ_ONLY_PATIENCE + 2
    assert revoked.killed_connections >= 1
    assert isinstance(outcome[0], pymysql.err.OperationalError)  # killed, not committed
    assert value(db1, f"SELECT COUNT(*) FROM {TABLE} WHERE note = '0'") == 0
    assert revoked.gtid_position == value(db1, "SELECT @@gtid_binlog_pos")
    demotion.undo(ctx, revoked)
    assert_topology(db1, servers[1:])


def test_abandon_after_establish_gives_the_old_primary_back(servers, pool):
    db1, db2, db3 = servers
    ctx = context(servers, db1, db3)
    revoked, established = planned(pool, ctx)
    assert established.new_primary == "db3"

    GtidEstablishment(pool=pool).abandon(ctx, ctx.candidate)  # e.g. the commit failed
    GracefulDemotion(pool).undo(ctx, revoked)

    assert_topology(db1, [db2, db3])


def test_fencing_with_a_live_primary_and_its_undo(servers, pool):
    db1, db2, db3 = servers
    ctx = context(servers, db1)
    fencing = FollowerFencing(pool)

    revoked = fencing.revoke(ctx)

    position = value(db1, "SELECT @@gtid_binlog_pos")
    assert revoked.gtid_position == ""
    assert revoked.replica_positions == {"db2": position, "db3": position}
    assert value(db1, "SELECT @@global.read_only") == 1  # it answered, so it was fenced too
    for replica in (db2, db3):
        assert sql(replica, "SHOW SLAVE STATUS")[0]["Slave_IO_Running"] == "No"
    fencing.undo(ctx, revoked)
    assert_topology(db1, [db2, db3])


def test_emergency_with_a_live_old_primary_loses_nothing(servers, pool):
    """A false alarm: the old primary still answers, so it is fenced read_only too, the new
    primary must hold everything it committed, and it rejoins as a replica."""
    db1, db2, db3 = servers
    write(db1, "before the false alarm")
    wait_applied([db2, db3], value(db1, "SELECT @@gtid_binlog_pos"))
    ctx = context(servers, db1)
    revoked = FollowerFencing(pool).revoke(ctx)
    establishment = GtidEstablishment(pool=pool)

    candidate = establishment.choose(ctx)
    established = establishment.establish(ctx, candidate, revoked)

    assert (candidate.name, sorted(established.repointed)) == ("db2", ["db1", "db3"])
    assert_topology(db2, [db1, db3])
    planned(pool, context(servers, db2, db1))
    assert_topology(db1, [db2, db3])


# -- refusals ------------------------------------------------------------------------------------


def test_unreachable_candidate_is_refused(servers, ghost, pool):
    db1 = servers[0]
    establishment = GtidEstablishment(pool=pool)
    everyone = [*servers, ghost]

    message = refused(
        lambda: establishment.choose(context(everyone, db1, ghost)), FailureKind.UNREACHABLE
    )

    assert message.startswith("unreachable: ghost: connect")
    assert establishment.choose(context(everyone, db1)).name in {"db2", "db3"}


@pytest.mark.parametrize(
    ("why", "break_it", "mend_it"),
    [
        (
            "delayed",
            ("STOP SLAVE", "CHANGE MASTER TO MASTER_DELAY=30", "START SLAVE"),
            ("STOP SLAVE", "CHANGE MASTER TO MASTER_DELAY=0", "START SLAVE"),
        ),
        ("stopped", ("STOP SLAVE SQL_THREAD",), ("START SLAVE SQL_THREAD",)),
    ],
)
def test_lagging_candidate_is_refused(servers, pool, why, break_it, mend_it):
    db1, db2, db3 = servers
    establishment = GtidEstablishment(pool=pool, max_lag_seconds=0.3)
    for statement in break_it:
        sql(db2, statement)
    try:
        write(db1, f"while db2 is {why}")
        wait_applied([db3], value(db1, "SELECT @@gtid_binlog_pos"))

        started = time.monotonic()
        message = refused(
            lambda: establishment.choose(context(servers, db1, db2)), FailureKind.LAGGING
        )
        assert time.monotonic() - started < 3
        assert "SQL thread stopped" in message if why == "stopped" else "within 0.3 s" in message
        assert establishment.choose(context(servers, db1)).name == "db3"
    finally:
        for statement in mend_it:
            sql(db2, statement)
    assert_topology(db1, [db2, db3])


def test_errant_candidate_is_refused(servers, pool):
    db1, db2, db3 = servers
    sql(db1, "CREATE TABLE baton_test.errant (id INT PRIMARY KEY)")
    wait_applied([db2, db3], value(db1, "SELECT @@gtid_binlog_pos"))
    # The admin writes through read_only, and sql_log_bin=1 gives the write db3's own GTID.
    sql(db3, "INSERT INTO baton_test.errant VALUES (1)")
    errant = gtid.Gtid.parse(value(db3, "SELECT @@gtid_binlog_pos"))
    assert errant.server_id == 3
    establishment = GtidEstablishment(pool=pool)

    message = refused(lambda: establishment.choose(context(servers, db1, db3)), FailureKind.ERRANT)

    assert str(errant) in message
    assert establishment.choose(context(servers, db1)).name == "db2"

    # The standard repair: the primary commits the same change under the same GTID, so every
    # history has it (db3 skips it as its own server_id's).
    with connect(db1) as conn, conn.cursor() as cur:
        cur.execute("SET SESSION server_id = %s, gtid_seq_no = %s", (3, errant.seq))
        cur.execute("INSERT INTO baton_test.errant VALUES (1)")
    assert establishment.choose(context(servers, db1, db3)).name == "db3"
    assert_topology(db1, [db2, db3])


# -- emergency -----------------------------------------------------------------------------------


def test_emergency_promotes_the_most_advanced_replica(tmp_path, pool):
    with running_sandbox(tmp_path / "emergency") as (box, servers):
        db1, db2, db3 = servers
        for n in range(3):
            write(db1, f"seen by all {n}")
        wait_applied([db2, db3], value(db1, "SELECT @@gtid_binlog_pos"))
        sql(db2, "STOP SLAVE IO_THREAD")  # db2 will miss what follows
        # db3 receives what follows at once but applies it 2-3 s later (event timestamps are
        # whole seconds): the fence catches it with a relay log still to apply.
        for statement in ("STOP SLAVE", "CHANGE MASTER TO MASTER_DELAY=3", "START SLAVE"):
            sql(db3, statement)
        for n in range(3):
            write(db1, f"seen by db3 only {n}")
        last = value(db1, "SELECT @@gtid_binlog_pos")
        deadline = time.monotonic() + 10
        while sql(db3, "SHOW SLAVE STATUS")[0]["Gtid_IO_Pos"] != last:
            assert time.monotonic() < deadline, "db3 did not receive the last writes"
            time.sleep(0.02)
        os.kill(box.status()["servers"][0]["pid"], signal.SIGKILL)

        ctx = context(servers, db1)
        revoked = FollowerFencing(pool).revoke(ctx)

        assert revoked.gtid_position == ""
        assert revoked.replica_positions["db3"] == last
        assert gtid.behind(value(db3, "SELECT @@gtid_slave_pos"), last) > 0  # not applied yet
        assert gtid.behind(revoked.replica_positions["db2"], last) == 3
        establishment = GtidEstablishment(pool=pool)
        message = refused(
            lambda: establishment.choose(context(servers, db1, db2)), FailureKind.LAGGING
        )
        assert "db3" in message
        candidate = establishment.choose(ctx)
        assert candidate.name == "db3"

        established = establishment.establish(ctx, candidate, revoked)

        assert (established.new_primary, established.repointed) == ("db3", ("db2",))
        assert established.unreachable == ("db1",)
        assert establishment.establish(ctx, candidate, revoked) == established  # resumable
        assert value(db3, f"SELECT COUNT(*) FROM {TABLE}") == 6
        assert_topology(db3, [db2])
