"""A real `baton serve`, started as a separate process on free ports from a copy of a
sandbox's config, and stopped by its pid.

A separate process, not an in-process server, so that what runs is what an operator runs: its
signal handlers, its logging, its shutdown.
"""

from __future__ import annotations

import os
import resource
import socket
import subprocess
import sys
import time
import tomllib
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pymysql

from harness.process import free_port, stop_process

ROOT = Path(__file__).resolve().parent.parent


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


def dump_toml(data: dict[str, Any]) -> str:
    """Enough TOML for Baton's config: tables, arrays of tables, scalars, lists of scalars."""
    lines: list[str] = []

    def tables(v: Any) -> bool:
        return isinstance(v, dict) or (isinstance(v, list) and all(isinstance(i, dict) for i in v))

    def table(prefix: str, d: dict[str, Any]) -> None:
        for k, v in d.items():
            if isinstance(v, list) and not tables(v):
                lines.append(f"{k} = [{', '.join(_toml_value(i) for i in v)}]")
            elif not tables(v):
                lines.append(f"{k} = {_toml_value(v)}")
        for k, v in d.items():
            if isinstance(v, dict):
                lines.append(f"\n[{prefix}{k}]")
                table(f"{prefix}{k}.", v)
            elif tables(v):
                for item in v:
                    lines.append(f"\n[[{prefix}{k}]]")
                    table(f"{prefix}{k}.", item)

    table("", data)
    return "\n".join(lines) + "\n"


@dataclass
class Baton:
    """A running `baton serve`; stopped by its pid."""

    proc: subprocess.Popen[bytes]
    config: Path
    port: int
    metrics_port: int
    socket: str
    log: Path

    def connect(self, **kw: Any) -> pymysql.Connection:
        kw.setdefault("user", "app")
        kw.setdefault("password", "app-pass")
        return pymysql.connect(host="127.0.0.1", port=self.port, autocommit=True, **kw)

    def ctl_args(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "proxy.cli", "ctl", "--socket", self.socket, *args]

    def ctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.ctl_args(*args),
            capture_output=True,
            text=True,
            timeout=30,
            cwd=ROOT,
        )

    def scrape(self) -> str:
        """Baton's Prometheus page."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as page:
            return page.read().decode()

    def stop(self) -> None:
        stop_process(self.proc)


def start_baton(
    config_path: Path,
    workdir: Path,
    port_hint: int,
    proxy: dict[str, Any] | None = None,
    servers: list[dict[str, Any]] | None = None,
    controller: dict[str, Any] | None = None,
    detector: dict[str, Any] | None = None,
    buffer: dict[str, Any] | None = None,
    env: dict[str, str] | None = None,
    users: list[dict[str, str]] | None = None,
    nofile: int | None = None,
    extra: dict[str, dict[str, Any]] | None = None,
    adopt: bool = False,
) -> Baton:
    """Start Baton on fresh ports with a copy of the sandbox config, changed as asked
    (`users`: a fixed list of logins instead of the servers' accounts; `nofile`: its limit on
    open files, soft and hard; `extra`: other tables, merged key by key; `adopt`: `baton serve
    --adopt`)."""
    data = tomllib.loads(config_path.read_text())
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port(port_hint)
    metrics_port = free_port(port + 1)
    sock = str(workdir / "baton.sock")
    data["proxy"].update(listen_port=port, metrics_port=metrics_port, control_socket=sock)
    data["proxy"].update(proxy or {})
    data.setdefault("controller", {}).update(controller or {})
    if detector is not None:
        data.setdefault("detector", {}).update(detector)
    if buffer is not None:
        data.setdefault("buffer", {}).update(buffer)
    if servers is not None:
        data["shards"][0]["servers"] = servers
    if users is not None:
        data["users"] = users
    for table, values in (extra or {}).items():
        data.setdefault(table, {}).update(values)
    cfg = workdir / "baton.toml"
    cfg.write_text(dump_toml(data))
    log = workdir / "baton.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "proxy.cli",
                "serve",
                "--config",
                str(cfg),
                *(["--adopt"] if adopt else []),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env={**os.environ, **env} if env else None,
            preexec_fn=(
                (lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile)))
                if nofile
                else None
            ),
        )
    deadline = time.monotonic() + 20
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"baton exited: {log.read_text()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            if os.path.exists(sock):
                break
        except OSError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"baton did not start: {log.read_text()}")
        time.sleep(0.05)
    return Baton(proc, cfg, port, metrics_port, sock, log)
