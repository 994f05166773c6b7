"""The sandbox against real MariaDB: the facts later tests (and Baton) rely on must hold in it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pymysql
import pytest

from reparent import config
from reparent.config import Role
from reparent.etcdsandbox import pick_ports
from reparent.sandbox import Sandbox, SandboxError, State
from tests.conftest import sandbox_base_port
from tests.fixtures import ETCD_PORTS

pytestmark = pytest.mark.sandbox

ROOT = Path(__file__).resolve().parent.parent
ER_OPTION_PREVENTS_STATEMENT = 1290


def connect(server: dict, account: dict) -> pymysql.Connection:
    return pymysql.connect(
        host=server["host"],
        port=server["port"],
        user=account["user"],
        password=account["password"],
        autocommit=True,
        connect_timeout=5,
    )


def query_one(server: dict, account: dict, sql: str, args: tuple = ()) -> tuple:
    with connect(server, account) as conn, conn.cursor() as cur:
        cur.execute(sql, args)
        return cur.fetchone()


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy.cli", "sandbox", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def gone(pid: int) -> bool:
    """No process, or only a zombie whose parent has not reaped it yet (it holds nothing)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rindex(")") + 2] in "ZX"


@pytest.fixture(scope="module")
def status(sandbox: Sandbox) -> dict:
    return sandbox.status()


@pytest.fixture(scope="module")
def primary(status: dict) -> dict:
    return status["servers"][0]


@pytest.fixture(scope="module")
def replicas(status: dict) -> list[dict]:
    return status["servers"][1:]


def test_every_server_answers_app_over_tcp(status):
    assert [s["name"] for s in status["servers"]] == ["db1", "db2", "db3"]
    for server in status["servers"]:
        assert server["running"] is True
        assert query_one(server, status["users"]["app"], "SELECT 1") == (1,)


def test_primary_is_writable_and_replicas_read_only(status, primary, replicas):
    app = status["users"]["app"]
    assert primary["role"] == "primary" and primary["read_only"] is False
    assert query_one(primary, app, "SELECT @@read_only") == (0,)
    for replica in replicas:
        assert replica["role"] == "replica" and replica["read_only"] is True
        assert query_one(replica, app, "SELECT @@read_only") == (1,)


def test_replicas_replicate_with_gtid_from_the_primary(status, replicas):
    admin = status["users"]["admin"]
    for replica in replicas:
        with connect(replica, admin) as conn, conn.cursor(pymysql.cursors.DictCursor) as cur:
            cur.execute("SHOW SLAVE STATUS")
            row = cur.fetchone()
            cur.execute("SELECT @@gtid_strict_mode AS strict, @@log_slave_updates AS lsu")
            settings = cur.fetchone()
        assert row["Slave_IO_Running"] == "Yes" and row["Slave_SQL_Running"] == "Yes"
        assert row["Using_Gtid"] == "Slave_Pos"
        assert row["Master_Port"] == status["servers"][0]["port"]
        assert row["Master_User"] == "repl"
        assert settings == {"strict": 1, "lsu": 1}
    server_ids = {query_one(s, admin, "SELECT @@server_id")[0] for s in status["servers"]}
    assert len(server_ids) == len(status["servers"])


def test_app_write_on_primary_reaches_every_replica(status, primary, replicas):
    app = status["users"]["app"]
    table = f"baton_test.t_{uuid.uuid4().hex[:12]}"
    with connect(primary, app) as conn, conn.cursor() as cur:
        cur.execute(f"CREATE TABLE {table} (id INT PRIMARY KEY, note VARCHAR(20))")
        cur.execute(f"INSERT INTO {table} VALUES (1, 'hello')")
        cur.execute("SELECT @@gtid_binlog_pos")
        (position,) = cur.fetchone()
    try:
        for replica in replicas:
            with connect(replica, app) as conn, conn.cursor() as cur:
                cur.execute("SELECT MASTER_GTID_WAIT(%s, 10)", (position,))
                assert cur.fetchone() == (0,)
                cur.execute(f"SELECT note FROM {table} WHERE id = 1")
                assert cur.fetchone() == ("hello",)
                # Same history everywhere: no errant transaction on a replica.
                cur.execute("SELECT @@gtid_binlog_pos")
                assert cur.fetchone() == (position,)
    finally:
        with connect(primary, app) as conn, conn.cursor() as cur:
            cur.execute(f"DROP TABLE {table}")


@pytest.mark.parametrize("who", ["app", "reporting"])
def test_read_only_fences_client_users_on_replicas(status, primary, replicas, who):
    account = status["users"][who]
    table = f"baton_test.fence_{who}"
    with connect(primary, status["users"]["app"]) as conn, conn.cursor() as cur:
        cur.execute(f"CREATE TABLE {table} (id INT PRIMARY KEY)")
        cur.execute("SELECT @@gtid_binlog_pos")
        (position,) = cur.fetchone()
    try:
        for replica in replicas:
            with connect(replica, account) as conn, conn.cursor() as cur:
                cur.execute("SELECT MASTER_GTID_WAIT(%s, 10)", (position,))
                assert cur.fetchone() == (0,)
                with pytest.raises(pymysql.err.OperationalError) as caught:
                    cur.execute(f"INSERT INTO {table} VALUES (1)")
                # The server checks read_only before privileges.
                assert caught.value.args[0] == ER_OPTION_PREVENTS_STATEMENT
    finally:
        with connect(primary, status["users"]["app"]) as conn, conn.cursor() as cur:
            cur.execute(f"DROP TABLE {table}")


@pytest.mark.parametrize("who", ["app", "reporting"])
def test_client_users_hold_no_global_privilege(status, replicas, who):
    """Each application account reaches only its schemas: neither SUPER nor READ ONLY ADMIN
    (read_only must fence it), nor anything on *.* (which would cover `mysql.*`)."""
    account = status["users"][who]
    with connect(replicas[0], account) as conn, conn.cursor() as cur:
        cur.execute("SHOW GRANTS")
        grants = [row[0] for row in cur.fetchall()]
    on_all = [g for g in grants if " ON *.* " in g]
    assert len(on_all) == 1 and on_all[0].startswith("GRANT USAGE ON *.*"), grants
    assert any("ON `sbtest`.*" in g for g in grants)
    for grant in grants:
        assert "SUPER" not in grant and "READ_ONLY ADMIN" not in grant


def test_admin_holds_everything(status, replicas):
    with connect(replicas[0], status["users"]["admin"]) as conn, conn.cursor() as cur:
        cur.execute("SHOW GRANTS")
        grants = " ".join(row[0] for row in cur.fetchall())
    assert "GRANT ALL PRIVILEGES ON *.*" in grants and "WITH GRANT OPTION" in grants


def test_databases_exist_everywhere(status):
    for server in status["servers"]:
        with connect(server, status["users"]["app"]) as conn, conn.cursor() as cur:
            cur.execute("SHOW DATABASES")
            names = {row[0] for row in cur.fetchall()}
        assert {"sbtest", "baton_test"} <= names


def test_up_again_is_a_no_op(sandbox, status):
    pids = [s["pid"] for s in status["servers"]]
    assert sandbox.up() is False
    result = cli("up", "--dir", str(sandbox.dir))
    assert result.returncode == 0, result.stderr
    assert "already running" in result.stdout
    assert [s["pid"] for s in sandbox.status()["servers"]] == pids
    assert sandbox.state() is State.RUNNING and sandbox.running()


def test_status_json_has_the_documented_keys(sandbox, status):
    result = cli("status", "--dir", str(sandbox.dir), "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data == status | {"servers": data["servers"]}
    assert set(data) >= {"dir", "config", "servers", "proxy", "control_socket", "metrics", "users"}
    for server in data["servers"]:
        assert set(server) >= {"name", "host", "port", "role", "read_only", "running", "pid"}
    assert [s["pid"] for s in data["servers"]] == [s["pid"] for s in status["servers"]]
    assert set(data["users"]) == {"app", "reporting", "admin"}
    assert data["users"]["reporting"] == {"user": "reporting", "password": "reporting-pass"}
    assert data["control_socket"] == str(sandbox.dir / "baton.sock")
    base = status["servers"][0]["port"]
    proxy_port = int(data["proxy"].rsplit(":", 1)[1])
    metrics_port = int(data["metrics"].rsplit(":", 1)[1])
    assert base + 100 <= proxy_port and proxy_port != metrics_port


def test_status_table_is_readable(sandbox):
    result = cli("status", "--dir", str(sandbox.dir))
    assert result.returncode == 0, result.stderr
    assert "db1" in result.stdout and "primary" in result.stdout and "replica" in result.stdout


def test_config_loads_and_matches_the_sandbox(sandbox, status):
    cfg = config.load(sandbox.config_path)
    assert cfg.proxy.shard == "main"
    assert [(s.name, s.host, s.port) for s in cfg.shard.servers] == [
        (s["name"], s["host"], s["port"]) for s in status["servers"]
    ]
    assert cfg.shard.primary.name == "db1"
    assert [s.role for s in cfg.shard.servers] == [Role.PRIMARY, Role.REPLICA, Role.REPLICA]
    assert cfg.users == ()  # Baton reads the servers' own accounts
    assert not cfg.backend.proxy_protocol
    assert cfg.admin == config.Account("baton_admin", "admin-pass")
    assert cfg.proxy.control_socket == status["control_socket"]
    assert f"{cfg.proxy.listen_host}:{cfg.proxy.listen_port}" == status["proxy"]
    assert f"{cfg.proxy.metrics_host}:{cfg.proxy.metrics_port}" == status["metrics"]


def test_down_stops_its_own_processes_and_removes_its_files(tmp_path):
    box = Sandbox(tmp_path / "extra", base_port=sandbox_base_port() + 10, replicas=1)
    try:
        assert box.up() is True
        pids = [s["pid"] for s in box.status()["servers"]]
        assert len(pids) == 2 and all(not gone(pid) for pid in pids)
    finally:
        result = cli("down", "--dir", str(box.dir))
    assert result.returncode == 0, result.stderr
    assert all(gone(pid) for pid in pids)
    assert not box.dir.exists()
    assert box.state() is State.ABSENT and not box.running()
    with pytest.raises(SandboxError):
        box.status()
    assert cli("status", "--dir", str(box.dir)).returncode == 1
    assert box.down() is False


def dead_pid() -> int:
    """The pid of a process that has already exited: what a node that died at start leaves."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_a_node_that_dies_at_start_is_retried_once(tmp_path, monkeypatch):
    launches: list[str] = []
    real_launch = Sandbox._launch

    def flaky_launch(self, node):
        launches.append(node.name)
        if launches.count(node.name) == 1 and node.name == "db2":
            return dead_pid()
        return real_launch(self, node)

    monkeypatch.setattr(Sandbox, "_launch", flaky_launch)
    box = Sandbox(tmp_path / "retry", base_port=sandbox_base_port() + 10, replicas=1)
    try:
        assert box.up() is True
        assert sorted(launches) == ["db1", "db2", "db2"]
        status = box.status()
        assert [s["running"] for s in status["servers"]] == [True, True]
        assert query_one(status["servers"][1], status["users"]["app"], "SELECT 1") == (1,)
    finally:
        box.down()


def test_a_node_that_dies_twice_fails_up_and_leaves_nothing(tmp_path, monkeypatch):
    started: list[int] = []
    real_launch = Sandbox._launch

    def broken_launch(self, node):
        if node.name == "db2":
            return dead_pid()
        started.append(real_launch(self, node))
        return started[-1]

    monkeypatch.setattr(Sandbox, "_launch", broken_launch)
    box = Sandbox(tmp_path / "broken", base_port=sandbox_base_port() + 10, replicas=1)
    with pytest.raises(SandboxError, match="db2 did not answer"):
        box.up()
    assert len(started) == 1 and gone(started[0])
    assert not box.dir.exists()


def test_a_used_port_is_refused_before_anything_starts(tmp_path, sandbox, status):
    taken = status["servers"][0]["port"]
    box = Sandbox(tmp_path / "clash", base_port=taken, replicas=0)
    with pytest.raises(SandboxError, match=f"port {taken}"):
        box.up()
    assert not (tmp_path / "clash").exists()
    assert os.path.exists(sandbox.state_path)


def test_down_forgets_the_topology_store(tmp_path: Path) -> None:
    """A new sandbox starts with db1 as primary: a store left from the last one must not say
    otherwise, so `down` removes it with the config that names it."""
    from tests.conftest import sandbox_base_port

    box = Sandbox(tmp_path / "sb", base_port=sandbox_base_port(), replicas=1)
    box.up()
    try:
        assert config.load(box.config_path).controller.store == str(box.dir / "baton-state.json")
        (box.dir / "baton-state.json").write_text("{}")
    finally:
        box.down()
    assert not (box.dir / "baton-state.json").exists()


def test_up_with_etcd_writes_a_config_per_proxy_and_down_stops_etcd(tmp_path):
    """`up --etcd --proxies 2`: etcd runs, each proxy has a config naming it and etcd, and
    `status --json` lists both; `down` stops etcd by pid."""
    ports = pick_ports(2, *ETCD_PORTS)
    box = Sandbox(
        tmp_path / "fleet",
        base_port=sandbox_base_port() + 10,
        replicas=1,
        etcd_members=1,
        proxies=2,
        etcd_ports=ports,
    )
    try:
        assert box.up() is True
        status = json.loads(cli("status", "--dir", str(box.dir), "--json").stdout)
        assert status["etcd"]["endpoints"] == [f"http://127.0.0.1:{ports[0]}"]
        (member,) = status["etcd"]["members"]
        assert member["running"]
        assert [p["name"] for p in status["proxies"]] == ["baton-1", "baton-2"]
        configs = [config.load(p["config"]) for p in status["proxies"]]
        assert [c.proxy.id for c in configs] == ["baton-1", "baton-2"]
        assert all(c.topology.endpoints == tuple(status["etcd"]["endpoints"]) for c in configs)
        assert len({c.proxy.listen_port for c in configs}) == 2
        assert len({c.proxy.control_socket for c in configs}) == 2
    finally:
        result = cli("down", "--dir", str(box.dir))
    assert result.returncode == 0, result.stderr
    assert gone(member["pid"])
    assert not box.dir.exists()
