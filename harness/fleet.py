"""A fleet of Batons on one etcd, in front of one sandbox: for tests/test_fleet.py and the
fleet path of the failover benchmark (bench/fleet.py)."""

from __future__ import annotations

import itertools
import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pymysql

from harness.baton import Baton, start_baton
from reparent.sandbox import Sandbox

# Short enough for the tests, and within the config's rule max_failover (20 s by default)
# >= grace + lock_ttl + 5 s.
CONTROLLER = {"grace": 5.0, "timeout": 5.0, "max_lag": 2.0, "lock_ttl": 4}


class Fleet:
    """`n` Batons named baton-1..n sharing `prefix` on the etcd at `endpoints`."""

    def __init__(
        self,
        box: Sandbox,
        endpoints: list[str],
        prefix: str,
        workdir: Path,
        hint: int,
        n: int = 3,
        detector: bool = False,
        env: dict[int, dict[str, str]] | None = None,
    ) -> None:
        self.box = box
        self.endpoints = endpoints
        self.prefix = prefix
        self.workdir = workdir
        self.hint = hint
        self.detector = detector
        self.env = env or {}
        self.batons: list[Baton] = []
        try:
            for i in range(n):
                self.batons.append(self.start(i))
        except BaseException:
            self.stop()
            raise

    def start(self, i: int, env: dict[str, str] | None = None) -> Baton:
        """Start (or restart) baton-<i+1>, with `env` (a failpoint, say) if given."""
        return start_baton(
            self.box.config_path,
            self.workdir / f"baton-{i + 1}",
            self.hint + 10 * i,
            proxy={"id": f"baton-{i + 1}"},
            controller=CONTROLLER,
            detector={"enabled": self.detector},
            extra={
                "topology": {"store": "etcd", "endpoints": self.endpoints, "prefix": self.prefix}
            },
            env=env or self.env.get(i),
        )

    def stop(self) -> None:
        for b in self.batons:
            b.stop()

    def connector(self, batons: list[Baton] | None = None) -> Any:
        """A connect() for ledgers and writers: each call goes to the next Baton in turn."""
        turn = itertools.cycle(batons or self.batons)

        def connect() -> pymysql.Connection:
            b = next(turn)
            return pymysql.connect(
                host="127.0.0.1",
                port=b.port,
                user="app",
                password="app-pass",
                autocommit=True,
                connect_timeout=5,
                read_timeout=60,
            )

        return connect


def status(b: Baton) -> dict[str, Any]:
    out = b.ctl("--json", "status")
    assert out.returncode == 0, out.stdout + out.stderr
    return json.loads(out.stdout)


def prs(b: Baton, *args: str) -> subprocess.CompletedProcess[str]:
    return b.ctl("--json", "prs", *args)


def routed_port(b: Baton) -> int:
    conn = b.connect()
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT @@port")
            return int(cur.fetchone()[0])
    finally:
        conn.close()


def wait_until(check: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
