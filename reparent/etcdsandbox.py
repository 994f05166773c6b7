"""Local etcd clusters on loopback for `baton sandbox up --etcd` and the fleet tests.

Each member is a real `etcd` process (Debian's etcd-server) with its own data directory, a
client port and a peer port on 127.0.0.1. Members are stopped by their pid, never by name.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

HOST = "127.0.0.1"
READY_TIMEOUT = 20.0  # seconds for a fresh cluster to elect a leader and answer


class EtcdSandboxError(Exception):
    """etcd is missing, or a member would not start; the message says which and why."""


@dataclass(frozen=True)
class Member:
    name: str
    client_port: int
    peer_port: int

    @property
    def endpoint(self) -> str:
        return f"http://{HOST}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://{HOST}:{self.peer_port}"


def port_free(port: int) -> bool:
    """Nothing listens on `port` of 127.0.0.1. With SO_REUSEADDR as the servers use it, so a
    port in TIME_WAIT still counts as free. (The MariaDB sandbox asks this too.)"""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def pick_ports(count: int, low: int, high: int, seed: int | None = None) -> list[int]:
    """`count` consecutive free ports within [low, high), starting from a block chosen by
    `seed` (the pid by default) so that parallel runs start in different places."""
    span = high - low
    blocks = span // count
    first = (os.getpid() if seed is None else seed) % blocks
    for i in range(blocks):
        base = low + ((first + i) % blocks) * count
        ports = list(range(base, base + count))
        if all(port_free(p) for p in ports):
            return ports
    raise EtcdSandboxError(f"no {count} free ports in {low}-{high - 1}")


class EtcdCluster:
    """`members` etcd processes forming one cluster; `endpoints` is what Baton's config names."""

    def __init__(self, directory: Path, ports: list[int]) -> None:
        if len(ports) % 2:
            raise ValueError("two ports per member: client, peer")
        self.dir = Path(directory)
        self.members = [
            Member(f"etcd{i + 1}", ports[2 * i], ports[2 * i + 1]) for i in range(len(ports) // 2)
        ]
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    @property
    def endpoints(self) -> list[str]:
        return [m.endpoint for m in self.members]

    def start(self) -> None:
        if shutil.which("etcd") is None:
            raise EtcdSandboxError("etcd is not installed: run `make setup` (etcd-server)")
        self.dir.mkdir(parents=True, exist_ok=True)
        for member in self.members:
            self.start_member(member.name, new=True)
        self.wait_ready()

    def start_member(self, name: str, new: bool = False) -> None:
        member = self._member(name)
        cluster = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        log = open(self.dir / f"{name}.log", "ab")
        self.procs[name] = subprocess.Popen(
            [
                "etcd",
                "--name",
                name,
                "--data-dir",
                str(self.dir / name),
                "--listen-client-urls",
                member.endpoint,
                "--advertise-client-urls",
                member.endpoint,
                "--listen-peer-urls",
                member.peer_url,
                "--initial-advertise-peer-urls",
                member.peer_url,
                "--initial-cluster",
                cluster,
                "--initial-cluster-state",
                "new" if new else "existing",
                "--initial-cluster-token",
                f"baton-{self.members[0].client_port}",
                "--heartbeat-interval",
                "100",
                "--election-timeout",
                "1000",
                "--logger",
                "zap",
                "--log-outputs",
                "stderr",
            ],
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
        log.close()
        (self.dir / f"{name}.pid").write_text(str(self.procs[name].pid))

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        """Until every running member answers a linearizable read (a leader exists)."""
        deadline = time.monotonic() + timeout
        for member in self.members:
            if member.name not in self.procs:
                continue
            while True:
                proc = self.procs[member.name]
                if proc.poll() is not None:
                    raise EtcdSandboxError(
                        f"{member.name} exited with {proc.returncode}; see "
                        f"{self.dir / (member.name + '.log')}"
                    )
                if _answers(member):
                    break
                if time.monotonic() > deadline:
                    raise EtcdSandboxError(f"{member.name} did not answer within {timeout:g} s")
                time.sleep(0.05)

    def signal(self, name: str, sig: signal.Signals) -> None:
        proc = self.procs[name]
        if proc.poll() is None:
            os.kill(proc.pid, sig)

    def kill(self, name: str) -> None:
        """kill -9 one member; `start_member(name)` brings it back with its data."""
        proc = self.procs.pop(name)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()

    def stop(self) -> None:
        for name in list(self.procs):
            proc = self.procs.pop(name)
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGCONT)
                proc.terminate()
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()

    def _member(self, name: str) -> Member:
        return next(m for m in self.members if m.name == name)


def _answers(member: Member) -> bool:
    conn = http.client.HTTPConnection(HOST, member.client_port, timeout=1.0)
    try:
        conn.request("POST", "/v3/kv/range", json.dumps({"key": "AA=="}))
        response = conn.getresponse()
        response.read()
        return response.status == 200
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()


def running(pid: int, data_dir: Path) -> bool:
    """True if `pid` is the etcd of `data_dir`: a recycled pid does not count."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    zombie = stat[stat.rindex(")") + 2] in "ZX"
    return not zombie and str(data_dir).encode() in cmdline


def stop_pid(pid: int, data_dir: Path, timeout: float = 10.0) -> None:
    """Stop a member started by an earlier process (`baton sandbox down`), by pid, after
    checking that it is that member."""
    if not running(pid, data_dir):
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while running(pid, data_dir):
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            break
        time.sleep(0.05)
