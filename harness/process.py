"""Ports and child processes, the way every test and benchmark here must treat them.

The machine is shared: other people's MariaDB, Baton and sysbench run beside ours. So a port is
looked for, never assumed, and a process is stopped by the pid we started, never by name.
"""

from __future__ import annotations

import socket
import subprocess

STOP_TIMEOUT = 10.0


def free_port(start: int) -> int:
    """The first port at or after `start` that nothing listens on (within 20000-29999)."""
    for port in range(start, 29999):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port")


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL if it has not exited within STOP_TIMEOUT; always reaped."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(STOP_TIMEOUT)
