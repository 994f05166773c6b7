"""`baton sandbox`: a disposable local MariaDB group with GTID replication, for tests and demos.

`up` starts one primary and N replicas of `mariadbd` on 127.0.0.1, ports P, P+1, ..., each with
its own folder under DIR (`dbN/data`, `dbN/mysqld.sock`, `dbN/mysqld.pid`, `dbN/error.log`), and
writes `DIR/baton.toml` (a config Baton can serve at once) and `DIR/sandbox.json` (what `status`
and `down` need: ports and pids). `down` stops exactly those pids and deletes the node folders,
the state and the config: a sandbox is disposable, and the next `up` starts from empty GTID state.

Why it is built this way (each point verified with MariaDB 10.11 from Debian 12):
- `mariadb-install-db` runs once per `up` into DIR/template, which is copied per node (and
  deleted when all are up): copying is cheaper than installing three times. Nodes start in
  parallel.
- A node counts as up only when root answers a real query on its socket (`mariadb-admin ping`
  counts "access denied" as alive), and a node that is not up within 20 s is started once more
  from a fresh copy, because the bootstrap here sometimes refuses root's socket login.
- Users and databases are created on the primary after its binlog is on, so they replicate:
  every node ends with the same GTID history and no errant transaction. The application accounts
  `app` (everything on its schemas) and `reporting` (SELECT only) hold no global privilege, so
  `read_only` fences them and neither can touch `mysql.*`; Baton logs each client in as its own
  account. `baton_admin` holds everything and is for the controller only.
- With `--tls` (reparent/certs.py) DIR/tls holds a CA and certificates it signs for 127.0.0.1
  and localhost: the servers' (`server.pem`, given to every mariadbd) and Baton's
  (`baton.pem`). baton.toml then has `[tls]` for clients and `backend.tls = "verify_identity"`
  with `backend.ca`, and replication uses TLS with the same CA. Plain logins stay allowed on
  both sides, so tests can compare.
- Processes are found and stopped only by the pids recorded at launch, checked against their
  command line (`--datadir=` of this sandbox), never by name: other sandboxes and the lab's own
  servers may run on the same machine.
"""

from __future__ import annotations

import argparse
import enum
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pymysql

from reparent import certs, config, etcdsandbox, tls
from reparent.admin import HEARTBEAT_PERIOD
from reparent.config import Role

HOST = "127.0.0.1"
SHARD = "main"
APP = config.Account("app", "app-pass")
REPORTING = config.Account("reporting", "reporting-pass")
ADMIN = config.Account("baton_admin", "admin-pass")
REPL = config.Account("repl", "repl-pass")
STORE_FILE = "baton-state.json"  # the controller's store, beside the config
DATABASES = ("sbtest", "baton_test")

# The application accounts' schemas: `sbtest` (sysbench) and every schema named `baton_...`
# (the tests'). No global privilege: `app` can neither read `mysql.*` nor ALTER another user,
# and read_only fences both accounts (no SUPER, no READ ONLY ADMIN).
APP_SCHEMAS = ("sbtest", "baton\\_%")
APP_PRIVILEGES = "ALL PRIVILEGES"
REPORTING_PRIVILEGES = "SELECT"
# TCP from loopback for clients, the Unix socket for people poking at a node by hand.
USER_HOSTS = ("127.0.0.1", "localhost")

# Both install-db and mariadbd get this, so the template's redo log needs no resize at start.
INNODB_LOG_FILE_SIZE = "48M"
READY_TIMEOUT = 20.0
STOP_TIMEOUT = 15.0
CATCH_UP_TIMEOUT = 20
# Proxy and metrics ports are searched from base_port + this, clear of the servers' ports.
SERVICE_PORT_OFFSET = 100

STATE_FILE = "sandbox.json"
CONFIG_FILE = "baton.toml"
CONTROL_SOCKET = "baton.sock"
TEMPLATE_DIR = "template"
TEMPLATE_TMP = "template-tmp"
ETCD_DIR = "etcd"
TLS_DIR = "tls"


class SandboxError(Exception):
    """The sandbox could not be brought to the requested state; the message says why."""


class State(enum.StrEnum):
    """What `up` finds; it decides between starting, doing nothing and refusing."""

    ABSENT = "absent"  # no sandbox.json: nothing was started here, or it was taken down
    RUNNING = "running"  # every recorded server process is alive
    PARTIAL = "partial"  # some are alive: a crash, or someone killed one; `down` first
    STOPPED = "stopped"  # state left behind but no process alive (a reboot, a crash)


@dataclass(frozen=True)
class Node:
    """One server's name, port, role and files; all derived from the sandbox dir and its index."""

    name: str
    port: int
    role: Role
    home: Path

    @property
    def datadir(self) -> Path:
        return self.home / "data"

    @property
    def socket(self) -> Path:
        return self.home / "mysqld.sock"

    @property
    def pid_file(self) -> Path:
        return self.home / "mysqld.pid"

    @property
    def error_log(self) -> Path:
        return self.home / "error.log"

    @property
    def tmpdir(self) -> Path:
        """Its own, not the shared /tmp: a bootstrap failed here when its temporary table
        vanished from /tmp (`Could not remove temporary table '/tmp/#sql-temptable-...'`, then
        `Unknown table 'mysql.tmp_proxies_priv'`). Servers name them by pid only, so a server
        of the same pid in another pid namespace, or a cleaner, can take them."""
        return self.home / "tmp"


class Sandbox:
    """A sandbox in one folder. `base_port` and `replicas` shape only a new `up`; a sandbox that
    already exists is described by its sandbox.json, so `down` and `status` need only the dir."""

    def __init__(
        self,
        dir: Path | str,
        base_port: int = 23301,
        replicas: int = 2,
        etcd_members: int = 0,
        proxies: int = 1,
        etcd_ports: list[int] | None = None,
        tls: bool = False,
    ) -> None:
        if replicas < 0:
            raise SandboxError(f"replicas must be 0 or more, got {replicas}")
        if etcd_members < 0 or proxies < 1:
            raise SandboxError("etcd members must be 0 or more, and proxies 1 or more")
        if proxies > 1 and not etcd_members:
            raise SandboxError("several proxies share the topology through etcd: add --etcd")
        if not 0 < base_port or base_port + replicas > 65535:
            raise SandboxError(f"ports {base_port}-{base_port + replicas} are out of range")
        self.dir = Path(dir).resolve()
        self.base_port = base_port
        self.replicas = replicas
        self.etcd_members = etcd_members
        self.proxies = proxies
        # Two per member (client, peer); by default the free ones after Baton's.
        self.etcd_ports = etcd_ports
        saved = self._read_state()
        self.tls = tls or (saved is not None and bool(saved.get("tls")))

    @property
    def ca(self) -> certs.Pair:
        """The sandbox's CA (with --tls): it signs the servers' and Baton's certificates."""
        return certs.Pair(self.dir / TLS_DIR / "ca.pem", self.dir / TLS_DIR / "ca.key")

    def _tls_pair(self, name: str) -> certs.Pair:
        return certs.Pair(self.dir / TLS_DIR / f"{name}.pem", self.dir / TLS_DIR / f"{name}.key")

    @property
    def backend_tls(self) -> config.BackendSettings:
        """How Baton and replication reach the servers: verified TLS with --tls, else plain."""
        if not self.tls:
            return config.PLAIN_BACKEND
        return config.BackendSettings(tls=config.BackendTls.VERIFY_IDENTITY, ca=str(self.ca.cert))

    @property
    def config_path(self) -> Path:
        return self.dir / CONFIG_FILE

    @property
    def state_path(self) -> Path:
        return self.dir / STATE_FILE

    @property
    def control_socket(self) -> Path:
        return self.dir / CONTROL_SOCKET

    def nodes(self) -> list[Node]:
        """The servers of the running sandbox if there is one, else of the one `up` would start."""
        state = self._read_state()
        if state is None:
            return self._layout(self.base_port, self.replicas)
        return self._layout(state["base_port"], len(state["servers"]) - 1)

    def state(self) -> State:
        saved = self._read_state()
        if saved is None:
            return State.ABSENT
        alive = [
            self._alive(s["pid"], n) for s, n in zip(saved["servers"], self.nodes(), strict=True)
        ]
        if all(alive):
            return State.RUNNING
        return State.PARTIAL if any(alive) else State.STOPPED

    def running(self) -> bool:
        return self.state() is State.RUNNING

    def up(self) -> bool:
        """Start the sandbox and return True, or return False if it is already running.

        On any failure everything started so far is stopped and removed before the error is
        raised, so a failed `up` leaves nothing behind to confuse the next one.
        """
        current = self.state()
        if current is State.RUNNING:
            return False
        if current is State.PARTIAL:
            raise SandboxError(f"sandbox in {self.dir} is partly running; run `down` first")
        if current is State.STOPPED:
            self._remove_files(self.nodes())
        nodes = self._layout(self.base_port, self.replicas)
        self._preflight(nodes)
        pids: dict[str, int] = {}
        try:
            self._bootstrap(nodes, pids)
            if self.etcd_members:
                self._fleet_up(nodes, pids)
        except BaseException:
            self._stop_etcd()
            self._stop(nodes, pids)
            self._remove_files(nodes)
            raise
        return True

    def down(self) -> bool:
        """Stop this sandbox's servers and delete its files; False if there was nothing to stop.

        Every server gets SIGTERM at once, then SIGKILL if it is still alive after 15 s.
        The control socket is left alone: it belongs to a Baton process that may still run.
        """
        saved = self._read_state()
        if saved is None:
            return False
        nodes = self.nodes()
        pids = {n.name: s["pid"] for n, s in zip(nodes, saved["servers"], strict=True)}
        self._stop_etcd()
        self._stop(nodes, pids)
        self._remove_files(nodes)
        return True

    def start(self, name: str, read_only: bool | None = None) -> int:
        """Start one stopped (killed, crashed) server again on its own datadir, as its role
        says (a "primary" comes back writable, as a crashed primary restarted by its service
        manager would) unless `read_only` says otherwise; return its new pid. For fault tests.
        """
        saved = self._read_state()
        if saved is None:
            raise SandboxError(f"no sandbox in {self.dir}")
        nodes = self.nodes()
        pids = {n.name: s["pid"] for n, s in zip(nodes, saved["servers"], strict=True)}
        node = next((n for n in nodes if n.name == name), None)
        if node is None:
            raise SandboxError(f"no server {name} in the sandbox")
        if self._alive(pids[name], node):
            raise SandboxError(f"{name} is running (pid {pids[name]})")
        if read_only is not None:
            node = replace(node, role=Role.REPLICA if read_only else Role.PRIMARY)
        node.tmpdir.mkdir(exist_ok=True)
        pids[name] = self._launch(node)
        saved["servers"] = [{**s, "pid": pids[s["name"]]} for s in saved["servers"]]
        _atomic_write(self.state_path, json.dumps(saved, indent=2) + "\n")
        if self._wait_ready([node], pids):
            raise SandboxError(f"{name} did not answer root in time:\n{_tail(node.error_log)}")
        return pids[name]

    def status(self) -> dict[str, Any]:
        """The sandbox as scripts see it (`status --json`): servers with live read_only, pids,
        where Baton listens, and the accounts to use. Raises SandboxError if there is none."""
        saved = self._read_state()
        if saved is None:
            raise SandboxError(f"no sandbox in {self.dir}; run `baton sandbox up`")
        servers = []
        for node, s in zip(self.nodes(), saved["servers"], strict=True):
            running = self._alive(s["pid"], node)
            servers.append(
                {
                    "name": node.name,
                    "host": HOST,
                    "port": node.port,
                    "role": node.role.value,
                    "read_only": self._read_only(node) if running else None,
                    "running": running,
                    "pid": s["pid"],
                    "socket": str(node.socket),
                }
            )
        fleet = {}
        if saved.get("etcd"):
            etcd = saved["etcd"]
            fleet = {
                "etcd": {
                    "endpoints": etcd["endpoints"],
                    "members": [
                        {**m, "running": etcdsandbox.running(m["pid"], Path(m["data_dir"]))}
                        for m in etcd["members"]
                    ],
                },
                "proxies": saved["proxies"],
            }
        return {
            "dir": str(self.dir),
            "config": str(self.config_path),
            "servers": servers,
            "proxy": _address(saved["proxy_port"]),
            "control_socket": str(self.control_socket),
            "metrics": _address(saved["metrics_port"]),
            **fleet,
            "users": {
                "app": {"user": APP.user, "password": APP.password},
                "reporting": {"user": REPORTING.user, "password": REPORTING.password},
                "admin": {"user": ADMIN.user, "password": ADMIN.password},
            },
        }

    # -- bootstrap -------------------------------------------------------------------------

    def _layout(self, base_port: int, replicas: int) -> list[Node]:
        return [
            Node(
                name=f"db{i + 1}",
                port=base_port + i,
                role=Role.PRIMARY if i == 0 else Role.REPLICA,
                home=self.dir / f"db{i + 1}",
            )
            for i in range(1 + replicas)
        ]

    def _preflight(self, nodes: list[Node]) -> None:
        """Fail in a second, with the reason, on what would otherwise be a 40 s startup timeout."""
        for tool in ("mariadbd", "mariadb-install-db"):
            _binary(tool)
        longest = max((str(n.socket) for n in nodes), key=len)
        if len(longest.encode()) > config.MAX_SOCKET_PATH:
            raise SandboxError(f"socket path too long: {longest}; use a shorter dir")
        for node in nodes:
            if not etcdsandbox.port_free(node.port):
                raise SandboxError(
                    f"port {node.port} ({node.name}) is in use; use another base port"
                )

    def _bootstrap(self, nodes: list[Node], pids: dict[str, int]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        if self.tls:
            try:
                shutil.rmtree(self.dir / TLS_DIR, ignore_errors=True)
                ca = certs.make_ca(self.dir / TLS_DIR)
                for name in ("server", "baton"):
                    certs.make_cert(self.dir / TLS_DIR, name, ca)
            except certs.CertError as e:
                raise SandboxError(f"cannot make the TLS certificates: {e}")
        self._install_template()
        for node in nodes:
            self._fresh_datadir(node)
            pids[node.name] = self._launch(node)
        self._write_state(nodes, pids, service_ports=None)
        failed = self._wait_ready(nodes, pids)
        if failed:
            # The flaky bootstrap (see the module's docstring): one more try from a fresh copy,
            # then give up.
            for node in failed:
                self._stop([node], pids)
                self._fresh_datadir(node)
                pids[node.name] = self._launch(node)
            self._write_state(nodes, pids, service_ports=None)
            failed = self._wait_ready(failed, pids)
        if failed:
            raise SandboxError(
                "\n".join(
                    f"{n.name} did not answer root in time:\n{_tail(n.error_log)}" for n in failed
                )
            )
        self._create_accounts(nodes[0])
        for replica in nodes[1:]:
            self._start_replication(replica, nodes[0])
        self._wait_caught_up(nodes)
        taken = {n.port for n in nodes}
        proxy_port, metrics_port = _free_ports(nodes[0].port + SERVICE_PORT_OFFSET, 2, taken)
        self._write_state(nodes, pids, service_ports=(proxy_port, metrics_port))
        self._write_config(nodes, proxy_port, metrics_port)
        shutil.rmtree(self.dir / TEMPLATE_DIR)

    def _fleet_up(self, nodes: list[Node], pids: dict[str, int]) -> None:
        """etcd members and one config per proxy (baton.toml is baton-1's), all sharing the
        topology through etcd; recorded in the state file for `status` and `down`."""
        saved = self._read_state()
        assert saved is not None
        taken = {n.port for n in nodes} | {saved["proxy_port"], saved["metrics_port"]}
        if self.etcd_ports is not None:
            etcd_ports = self.etcd_ports
            taken |= set(etcd_ports)
        else:
            etcd_ports = _free_ports(saved["metrics_port"] + 1, 2 * self.etcd_members, taken)
            taken |= set(etcd_ports)
        proxy_ports = _free_ports(saved["metrics_port"] + 1, 2 * (self.proxies - 1), taken)
        cluster = etcdsandbox.EtcdCluster(self.dir / ETCD_DIR, etcd_ports)
        try:
            cluster.start()
        finally:
            # Recorded even when a member failed, so that `down` stops the others.
            saved["etcd"] = {
                "endpoints": cluster.endpoints,
                "members": [
                    {
                        "name": m.name,
                        "endpoint": m.endpoint,
                        "pid": cluster.procs[m.name].pid,
                        "data_dir": str(cluster.dir / m.name),
                    }
                    for m in cluster.members
                    if m.name in cluster.procs
                ],
            }
            _atomic_write(self.state_path, json.dumps(saved, indent=2) + "\n")
        proxies = [
            (self.config_path, self.control_socket, saved["proxy_port"], saved["metrics_port"])
        ]
        for i in range(1, self.proxies):
            proxies.append(
                (
                    self.dir / f"baton-{i + 1}.toml",
                    self.dir / f"baton-{i + 1}.sock",
                    proxy_ports[2 * (i - 1)],
                    proxy_ports[2 * (i - 1) + 1],
                )
            )
        saved["proxies"] = []
        for i, (path, sock, port, metrics_port) in enumerate(proxies):
            name = f"baton-{i + 1}"
            self._write_config(
                nodes,
                port,
                metrics_port,
                path=path,
                control_socket=sock,
                proxy_id=name,
                endpoints=cluster.endpoints,
            )
            saved["proxies"].append(
                {
                    "name": name,
                    "address": f"{HOST}:{port}",
                    "control_socket": str(sock),
                    "metrics": f"{HOST}:{metrics_port}",
                    "config": str(path),
                }
            )
        _atomic_write(self.state_path, json.dumps(saved, indent=2) + "\n")

    def _stop_etcd(self) -> None:
        saved = self._read_state()
        if saved is None or not saved.get("etcd"):
            return
        for m in saved["etcd"]["members"]:
            etcdsandbox.stop_pid(m["pid"], Path(m["data_dir"]))

    def _install_template(self) -> None:
        template = self.dir / TEMPLATE_DIR
        shutil.rmtree(template, ignore_errors=True)
        tmpdir = self.dir / TEMPLATE_TMP  # see Node.tmpdir
        shutil.rmtree(tmpdir, ignore_errors=True)
        tmpdir.mkdir(parents=True)
        result = subprocess.run(
            [
                _binary("mariadb-install-db"),
                "--no-defaults",
                f"--user={_os_user()}",
                "--auth-root-authentication-method=socket",
                "--skip-test-db",
                f"--datadir={template}",
                f"--tmpdir={tmpdir}",
                f"--innodb-log-file-size={INNODB_LOG_FILE_SIZE}",
            ],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
        )
        shutil.rmtree(tmpdir, ignore_errors=True)
        if result.returncode != 0:
            raise SandboxError(f"mariadb-install-db failed:\n{result.stdout}{result.stderr}")

    def _fresh_datadir(self, node: Node) -> None:
        shutil.rmtree(node.home, ignore_errors=True)
        node.home.mkdir(parents=True)
        node.tmpdir.mkdir()
        shutil.copytree(self.dir / TEMPLATE_DIR, node.datadir, symlinks=True)

    def _launch(self, node: Node) -> int:
        """Start mariadbd as a daemon and return its pid.

        `sh` starts it in the background and exits, so mariadbd is nobody's child but init's:
        it outlives the `up` (or test run) that started it and no caller has to reap it. Its
        own session keeps a Ctrl-C meant for the caller from reaching it.
        """
        server_id = int(node.name.removeprefix("db"))
        args = [
            _binary("mariadbd"),
            "--no-defaults",
            f"--user={_os_user()}",
            f"--datadir={node.datadir}",
            f"--socket={node.socket}",
            f"--tmpdir={node.tmpdir}",
            f"--pid-file={node.pid_file}",
            f"--log-error={node.error_log}",
            f"--port={node.port}",
            f"--bind-address={HOST}",
            "--skip-name-resolve",
            f"--server-id={server_id}",
            "--log-bin=mysql-bin",
            "--relay-log=relay-bin",
            "--log-slave-updates",
            "--binlog-format=ROW",
            # Application accounts create their own triggers and routines (as a dump they
            # re-import does), which binary logging otherwise reserves to SUPER.
            "--log-bin-trust-function-creators=1",
            "--gtid-domain-id=0",
            "--gtid-strict-mode=1",
            "--slave-parallel-threads=2",
            f"--read-only={int(node.role is Role.REPLICA)}",
            # Semi-sync is built in and stays off; the emergency fence turns it on when needed.
            "--rpl-semi-sync-master-enabled=0",
            "--rpl-semi-sync-slave-enabled=0",
            # Debian's packaged default, which --no-defaults would otherwise drop for latin1.
            "--character-set-server=utf8mb4",
            "--collation-server=utf8mb4_general_ci",
            # Small and fast: a sandbox trades durability for startup time and memory.
            "--performance-schema=OFF",
            "--innodb-buffer-pool-size=64M",
            f"--innodb-log-file-size={INNODB_LOG_FILE_SIZE}",
            "--innodb-flush-log-at-trx-commit=2",
            "--sync-binlog=0",
            "--innodb-buffer-pool-dump-at-shutdown=0",
            "--innodb-buffer-pool-load-at-startup=0",
        ]
        if self.tls:
            server = self._tls_pair("server")
            args += [
                f"--ssl-ca={self.ca.cert}",
                f"--ssl-cert={server.cert}",
                f"--ssl-key={server.key}",
            ]
        # mariadbd redirects stderr to --log-error itself; this catches what it says before that.
        with node.error_log.open("ab") as log:
            result = subprocess.run(
                ["/bin/sh", "-c", '"$@" >&2 & echo $!', "sh", *args],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=log,
                start_new_session=True,
                check=True,
                text=True,
            )
        return int(result.stdout)

    def _wait_ready(self, nodes: list[Node], pids: dict[str, int]) -> list[Node]:
        """Wait for all nodes at once; return those that did not answer within READY_TIMEOUT."""

        def ready(node: Node) -> bool:
            deadline = time.monotonic() + READY_TIMEOUT
            while time.monotonic() < deadline:
                if _exited(pids[node.name]):
                    return False
                if not node.socket.exists():  # PyMySQL leaks its socket if connect() fails
                    time.sleep(0.02)
                    continue
                try:
                    with _root(node, timeout=2) as conn, conn.cursor() as cur:
                        cur.execute("SELECT 1")
                        return True
                except (pymysql.err.Error, OSError):
                    time.sleep(0.05)
            return False

        with ThreadPoolExecutor(max_workers=len(nodes)) as pool:
            results = list(pool.map(ready, nodes))
        return [n for n, ok in zip(nodes, results, strict=True) if not ok]

    def _create_accounts(self, primary: Node) -> None:
        """Run on the primary with its binlog on, so the replicas get the same GTIDs."""
        with _root(primary) as conn, conn.cursor() as cur:
            for account in (APP, REPORTING, ADMIN):
                for host in USER_HOSTS:
                    _create_user(cur, account, host)
            _create_user(cur, REPL, HOST)
            for account, privileges in ((APP, APP_PRIVILEGES), (REPORTING, REPORTING_PRIVILEGES)):
                for host in USER_HOSTS:
                    for schema in APP_SCHEMAS:
                        pattern = schema.replace("%", "%%")  # PyMySQL formats the statement
                        cur.execute(
                            f"GRANT {privileges} ON `{pattern}`.* TO %s@%s", (account.user, host)
                        )
            for host in USER_HOSTS:
                cur.execute(
                    "GRANT ALL PRIVILEGES ON *.* TO %s@%s WITH GRANT OPTION", (ADMIN.user, host)
                )
            cur.execute("GRANT REPLICATION SLAVE ON *.* TO %s@%s", (REPL.user, HOST))
            for db in DATABASES:
                cur.execute(f"CREATE DATABASE `{db}`")

    def _start_replication(self, replica: Node, primary: Node) -> None:
        ssl_sql, ssl_args = tls.replication_options(self.backend_tls)
        with _root(replica) as conn, conn.cursor() as cur:
            cur.execute(
                "CHANGE MASTER TO MASTER_HOST=%s, MASTER_PORT=%s, MASTER_USER=%s,"
                " MASTER_PASSWORD=%s, MASTER_USE_GTID=slave_pos, MASTER_CONNECT_RETRY=1,"
                " MASTER_HEARTBEAT_PERIOD=%s" + ssl_sql,
                (HOST, primary.port, REPL.user, REPL.password, HEARTBEAT_PERIOD, *ssl_args),
            )
            cur.execute("START SLAVE")

    def _wait_caught_up(self, nodes: list[Node]) -> None:
        """Return only when every replica has applied the accounts, so callers can log in."""
        with _root(nodes[0]) as conn, conn.cursor() as cur:
            cur.execute("SELECT @@gtid_binlog_pos")
            (position,) = cur.fetchone()
        for replica in nodes[1:]:
            with _root(replica, timeout=CATCH_UP_TIMEOUT + 5) as conn, conn.cursor() as cur:
                cur.execute("SELECT MASTER_GTID_WAIT(%s, %s)", (position, CATCH_UP_TIMEOUT))
                (result,) = cur.fetchone()
                if result != 0:
                    cur.execute("SHOW SLAVE STATUS")
                    row = dict(zip([d[0] for d in cur.description], cur.fetchone(), strict=True))
                    raise SandboxError(
                        f"{replica.name} did not reach {position} in {CATCH_UP_TIMEOUT} s: "
                        f"IO error {row.get('Last_IO_Error')!r}, "
                        f"SQL error {row.get('Last_SQL_Error')!r}"
                    )

    # -- files -----------------------------------------------------------------------------

    def _read_state(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.state_path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            raise SandboxError(f"{self.state_path}: unreadable ({e}); remove {self.dir} by hand")

    def _write_state(
        self, nodes: list[Node], pids: dict[str, int], service_ports: tuple[int, int] | None
    ) -> None:
        """Written as soon as pids exist, so a `down` can always find what an `up` started."""
        proxy_port, metrics_port = service_ports or (None, None)
        state = {
            "base_port": nodes[0].port,
            "servers": [
                {"name": n.name, "port": n.port, "role": n.role.value, "pid": pids[n.name]}
                for n in nodes
            ],
            "proxy_port": proxy_port,
            "metrics_port": metrics_port,
            "tls": self.tls,
        }
        _atomic_write(self.state_path, json.dumps(state, indent=2) + "\n")

    def _write_config(
        self,
        nodes: list[Node],
        proxy_port: int,
        metrics_port: int,
        path: Path | None = None,
        control_socket: Path | None = None,
        proxy_id: str = "",
        endpoints: list[str] | None = None,
    ) -> None:
        """Write baton.toml (or a fleet proxy's config) in configs/example.toml's format and
        load it back as a check."""
        q = json.dumps  # a JSON string is a valid TOML basic string
        path = path or self.config_path
        lines = [
            "# Written by `baton sandbox up`; removed by `baton sandbox down`.",
            "",
            "[proxy]",
            f"listen_host = {q(HOST)}",
            f"listen_port = {proxy_port}",
            f"control_socket = {q(str(control_socket or self.control_socket))}",
            f"metrics_host = {q(HOST)}",
            f"metrics_port = {metrics_port}",
            f"shard = {q(SHARD)}",
            *([f"id = {q(proxy_id)}"] if proxy_id else []),
            "",
            "[admin]",
            f"user = {q(ADMIN.user)}",
            f"password = {q(ADMIN.password)}",
            "",
            "[replication]",
            f"user = {q(REPL.user)}",
            f"password = {q(REPL.password)}",
            "",
            "[controller]",
            f"store = {q(STORE_FILE)}",
            "",
            *(
                [
                    "[tls]",
                    f"cert = {q(str(self._tls_pair('baton').cert))}",
                    f"key = {q(str(self._tls_pair('baton').key))}",
                    "",
                    "[backend]",
                    f"tls = {q(str(self.backend_tls.tls))}",
                    f"ca = {q(self.backend_tls.ca)}",
                    "",
                ]
                if self.tls
                else []
            ),
            *(
                [
                    "[topology]",
                    'store = "etcd"',
                    f"endpoints = [{', '.join(q(e) for e in endpoints)}]",
                    f"prefix = {q('/baton')}",
                    "",
                ]
                if endpoints
                else []
            ),
            "[[shards]]",
            f"name = {q(SHARD)}",
        ]
        for node in nodes:
            lines += [
                "",
                "[[shards.servers]]",
                f"name = {q(node.name)}",
                f"host = {q(HOST)}",
                f"port = {node.port}",
                f"role = {q(node.role.value)}",
            ]
        _atomic_write(path, "\n".join(lines) + "\n", mode=0o600)
        config.load(path)

    def _remove_files(self, nodes: Iterable[Node]) -> None:
        for node in nodes:
            shutil.rmtree(node.home, ignore_errors=True)
        shutil.rmtree(self.dir / TEMPLATE_DIR, ignore_errors=True)
        shutil.rmtree(self.dir / TEMPLATE_TMP, ignore_errors=True)
        shutil.rmtree(self.dir / TLS_DIR, ignore_errors=True)
        # The topology store describes these servers only: a new sandbox starts from its config.
        shutil.rmtree(self.dir / ETCD_DIR, ignore_errors=True)
        for path in (
            self.config_path,
            self.state_path,
            self.dir / STORE_FILE,
            *self.dir.glob("baton-*.toml"),
        ):
            path.unlink(missing_ok=True)
        try:
            self.dir.rmdir()  # only if empty: the dir may be the caller's, or hold baton.sock
        except OSError:
            pass

    # -- processes -------------------------------------------------------------------------

    @staticmethod
    def _alive(pid: int, node: Node) -> bool:
        """True if `pid` is this node's mariadbd: a recycled pid or a zombie does not count."""
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return False
        return f"--datadir={node.datadir}".encode() in cmdline

    def _stop(self, nodes: list[Node], pids: dict[str, int]) -> None:
        """SIGTERM all, wait up to STOP_TIMEOUT for a clean shutdown, then SIGKILL the rest.

        Identity is checked once, before any signal; after that we wait for the pid to be gone
        or a zombie, because an exiting process loses its command line before it closes its
        sockets and files.
        """
        live = [pids[n.name] for n in nodes if n.name in pids and self._alive(pids[n.name], n)]
        for pid in live:
            _signal(pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        while live and time.monotonic() < deadline:
            time.sleep(0.02)
            live = [pid for pid in live if not _exited(pid)]
        for pid in live:
            _signal(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while live and time.monotonic() < deadline:
            time.sleep(0.02)
            live = [pid for pid in live if not _exited(pid)]
        if live:
            raise SandboxError(f"could not stop pids {live}")

    def _read_only(self, node: Node) -> bool | None:
        try:
            with _root(node, timeout=2) as conn, conn.cursor() as cur:
                cur.execute("SELECT @@global.read_only")
                return bool(cur.fetchone()[0])
        except (pymysql.err.Error, OSError):
            return None


def _create_user(cur: pymysql.cursors.Cursor, account: config.Account, host: str) -> None:
    cur.execute(
        "CREATE USER %s@%s IDENTIFIED VIA mysql_native_password USING PASSWORD(%s)",
        (account.user, host, account.password),
    )


def _root(node: Node, timeout: float = 10) -> pymysql.Connection:
    """Root over the node's Unix socket (unix_socket auth): no password exists to leak."""
    return pymysql.connect(
        unix_socket=str(node.socket),
        user=_os_user(),
        autocommit=True,
        connect_timeout=timeout,
        read_timeout=timeout,
        write_timeout=timeout,
    )


def _os_user() -> str:
    """mariadbd runs as us, and install-db maps our OS user to the socket-authenticated root."""
    return pwd.getpwuid(os.geteuid()).pw_name


def _binary(name: str) -> str:
    # /usr/sbin is not on every user's PATH, and that is where Debian puts mariadbd.
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin")
    if found is None:
        raise SandboxError(f"{name} not found; install mariadb-server (`make setup`)")
    return found


def _exited(pid: int) -> bool:
    """True once `pid` has released everything: gone, or a zombie waiting for init."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rindex(")") + 2] in "ZX"


def _signal(pid: int, sig: signal.Signals) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _free_ports(start: int, count: int, taken: set[int]) -> list[int]:
    """The first `count` free ports at or after `start`, so sandboxes on other bases don't meet."""
    found: list[int] = []
    port = start
    while len(found) < count:
        if port > 65535:
            raise SandboxError(f"no {count} free ports at or after {start}")
        if port not in taken and etcdsandbox.port_free(port):
            found.append(port)
        port += 1
    return found


def _address(port: int | None) -> str | None:
    """None while an `up` is still bootstrapping: the ports are chosen last."""
    return None if port is None else f"{HOST}:{port}"


def _atomic_write(path: Path, text: str, mode: int = 0o644) -> None:
    """Replace `path` whole. The file has `mode` from birth (the umask may narrow it), not
    after a chmod: baton.toml holds the admin password and is never readable by others, not
    even for a moment."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)  # a leftover keeps its own mode: O_CREAT would not change it
    with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode), "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"({path} not written)"


def format_status(status: dict[str, Any]) -> str:
    """The human table for `baton sandbox status`."""
    rows = [("NAME", "ADDRESS", "ROLE", "READ_ONLY", "RUNNING", "PID")]
    for s in status["servers"]:
        read_only = "-" if s["read_only"] is None else str(int(s["read_only"]))
        running = "yes" if s["running"] else "no"
        address = f"{s['host']}:{s['port']}"
        rows.append((s["name"], address, s["role"], read_only, running, str(s["pid"])))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    table = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    users = status["users"]
    return "\n".join(
        [
            f"sandbox {status['dir']}",
            *table,
            f"proxy    {status['proxy']}  (config {status['config']})",
            f"control  {status['control_socket']}",
            f"metrics  {status['metrics']}",
            *(
                [
                    "etcd     " + " ".join(status["etcd"]["endpoints"]),
                    *(
                        f"proxy    {p['name']} {p['address']}  control {p['control_socket']}"
                        f"  metrics {p['metrics']}  config {p['config']}"
                        for p in status["proxies"]
                    ),
                ]
                if "etcd" in status
                else []
            ),
            "users    " + "  ".join(f"{k} {v['user']}/{v['password']}" for k, v in users.items()),
        ]
    )


def run(args: argparse.Namespace) -> int:
    """`baton sandbox up|down|status`. Exit 0 on success; `status` exits 1 unless all run."""
    try:
        box = Sandbox(
            Path(args.dir),
            args.base_port,
            args.replicas,
            etcd_members=args.etcd_members if args.etcd else 0,
            proxies=args.proxies,
            tls=args.tls,
        )
        if args.action == "up":
            started = time.monotonic()
            if box.up():
                print(f"sandbox up in {time.monotonic() - started:.1f} s")
            else:
                print(f"sandbox in {box.dir} is already running")
            print(format_status(box.status()))
            return 0
        if args.action == "down":
            started = time.monotonic()
            if box.down():
                print(f"sandbox in {box.dir} stopped in {time.monotonic() - started:.1f} s")
            else:
                print(f"no sandbox in {box.dir}")
            return 0
        status = box.status()
        print(json.dumps(status, indent=2) if args.json else format_status(status))
        return 0 if all(s["running"] for s in status["servers"]) else 1
    except SandboxError as e:
        print(f"baton sandbox {args.action}: {e}", file=sys.stderr)
        return 1
