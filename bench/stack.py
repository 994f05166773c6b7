"""The private stack a benchmark measures: one sandbox with Baton and HAProxy in front of it.

Each benchmark starts its own sandbox on its own ports, so a developer's `.sandbox` or a test
run on the same machine is never loaded or touched, and stops every process it started by the
pid it recorded, never by name.
"""

from __future__ import annotations

import shutil
import signal
import tempfile
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.haproxy import HAProxy, HealthAgent, start_haproxy
from bench.process import progress, tail
from harness.baton import Baton, dump_toml, start_baton
from harness.process import free_port
from reparent.sandbox import STORE_FILE, Sandbox

BENCH_PORT_HINT = 22400  # Baton and HAProxy listen from here, apart from the servers' ports


@dataclass
class Stack:
    """One sandbox with Baton and HAProxy in front of it: the paths compared.

    Every Baton of the stack keeps its topology in one store file, so a Baton started after
    another (`restart_baton`) knows the primary and term the last one's switchovers left.
    """

    workdir: Path
    sandbox: Sandbox
    baton: Baton
    haproxy: HAProxy
    service_port: int  # where Baton's ports are searched from
    agents: list[HealthAgent]  # HAProxy's health checks, in health-check mode

    @property
    def primary_port(self) -> int:
        """The port of the primary the sandbox started with (not the current one)."""
        return next(s["port"] for s in self.sandbox.status()["servers"] if s["role"] == "primary")

    def ports(self) -> dict[str, int]:
        """Where a client connects for each path."""
        return {"direct": self.primary_port, "baton": self.baton.port, "haproxy": self.haproxy.port}

    def check_alive(self) -> None:
        """Raise if a proxy died: every later run through it would measure nothing."""
        for name, proc, log in (
            ("baton", self.baton.proc, self.baton.log),
            ("haproxy", self.haproxy.proc, self.haproxy.log),
        ):
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{tail(log)}")

    def restart_baton(self, name: str, buffer: dict[str, Any] | None = None) -> Baton:
        """Stop Baton and start another from the sandbox's config, with `[buffer]` set to
        `buffer` if given; its files go to WORKDIR/name, so each Baton's log is kept apart."""
        self.baton.stop()
        self.baton = _start_baton(self.sandbox, self.workdir, name, self.service_port, buffer)
        return self.baton


def _start_baton(
    sandbox: Sandbox, workdir: Path, name: str, port_hint: int, buffer: dict[str, Any] | None
) -> Baton:
    """`baton serve` on the sandbox, its store in WORKDIR (shared by every Baton of a stack)."""
    config = sandbox.config_path
    if buffer is not None or sandbox.tls:
        data = tomllib.loads(config.read_text())
        if buffer is not None:
            data["buffer"] = buffer
        # The stack's Baton is plain on both legs whatever the sandbox offers; bench.steady
        # starts its own `baton-tls` from the sandbox's config for TLS.
        data.pop("tls", None)
        for key in ("tls", "ca"):
            data.get("backend", {}).pop(key, None)
        (workdir / name).mkdir(parents=True, exist_ok=True)
        config = workdir / name / "source.toml"
        config.write_text(dump_toml(data))
    store = {"store": str(workdir / STORE_FILE)}
    return start_baton(config, workdir / name, port_hint, controller=store)


@contextmanager
def running_stack(
    base_port: int,
    replicas: int,
    service_port: int = BENCH_PORT_HINT,
    health_checks: bool = False,
    tls: bool = False,
) -> Iterator[Stack]:
    """Start a private stack in a temp dir and stop all of it, by pid, however the block ends.

    Baton, HAProxy (and its health agents) listen on free ports from `service_port`. Without
    `health_checks` HAProxy fronts only the primary, unchecked; with them it fronts every
    server and routes to the writable one (see start_haproxy). With `tls` the servers also
    take TLS (`baton sandbox up --tls`); the stack's Baton stays plain.

    The temp dir (logs, generated configs) is deleted after a clean run and kept, with its path
    on stderr, after a failure, because then its logs are the evidence.
    """
    workdir = Path(tempfile.mkdtemp(prefix="baton-bench-"))
    sandbox = Sandbox(workdir / "sandbox", base_port=base_port, replicas=replicas, tls=tls)
    baton: Baton | None = None
    haproxy: HAProxy | None = None
    agents: list[HealthAgent] = []
    stack: Stack | None = None
    ok = False
    try:
        progress(f"sandbox up: {replicas + 1} servers from port {base_port}")
        sandbox.up()
        baton = _start_baton(sandbox, workdir, "baton", service_port, None)
        servers = sandbox.status()["servers"]
        if not health_checks:
            servers = [s for s in servers if s["role"] == "primary"]
        addresses = [(s["host"], s["port"]) for s in servers]
        if health_checks:
            # Each agent listens before the next free port is looked for, so none collide;
            # appended one by one, so the clean-up stops those started before a failure.
            for _, server_port in addresses:
                agents.append(HealthAgent(server_port, free_port(baton.metrics_port + 1)))
        haproxy = start_haproxy(
            workdir / "haproxy",
            free_port(baton.metrics_port + 1),
            addresses,
            [a.port for a in agents] if health_checks else None,
        )
        stack = Stack(workdir, sandbox, baton, haproxy, service_port, agents)
        progress("listening: " + ", ".join(f"{k} {v}" for k, v in stack.ports().items()))
        yield stack
        ok = True
    finally:
        # A second Ctrl-C must not cut the clean-up short and leave servers behind.
        stopping = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
        previous = {s: signal.signal(s, signal.SIG_IGN) for s in stopping}
        try:
            for proxy in (haproxy, stack.baton if stack is not None else baton):
                if proxy is not None:
                    proxy.stop()
            for agent in agents:
                agent.stop()
            sandbox.down()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if ok:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            progress(f"logs kept in {workdir}")
