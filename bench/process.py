"""A benchmark as a process on a shared machine: its children, its signals, its exit, its
progress lines.

Every child is started in its own session and stopped by the pid recorded at its start, never
by name; SIGTERM, SIGHUP and Ctrl-C all end a benchmark through its `finally` blocks, so the
servers it started are stopped however it ends.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import NoReturn

from harness.process import stop_process
from reparent.sandbox import HOST

STARTUP_TIMEOUT = 10.0


def wait_listening(proc: subprocess.Popen[bytes], port: int, log: Path, what: str) -> None:
    """Return once `port` accepts connections; raise with the log if `proc` dies or is slow."""
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}:\n{tail(log)}")
        try:
            socket.create_connection((HOST, port), timeout=0.2).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                stop_process(proc)
                raise RuntimeError(f"{what} did not listen on {port}:\n{tail(log)}")
            time.sleep(0.05)


def tail(path: Path, lines: int = 20) -> str:
    """The last `lines` of a log, for an error message; says so if it was never written."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"({path} not written)"


def binary(name: str) -> str:
    """The path of the program `name`, looked for in /usr/sbin too: that is where Debian puts
    haproxy and mariadbd, and it is not on every user's PATH."""
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin")
    if found is None:
        raise RuntimeError(f"{name} not found; run `make setup`")
    return found


@contextmanager
def exit_on_signals() -> Iterator[None]:
    """Turn SIGTERM and SIGHUP into SystemExit, as Ctrl-C already is KeyboardInterrupt, so the
    `finally` blocks that stop servers run when a job runner or a closed terminal ends us."""

    def handler(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def progress(message: str) -> None:
    """One line on stderr, so stdout stays the result table."""
    print(f"[{datetime.now():%H:%M:%S}] {message}", file=sys.stderr, flush=True)


def run_main(main: Callable[[], int]) -> NoReturn:
    """Exit with `main`'s code; Ctrl-C exits with 130 after the clean-up it triggered."""
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        progress("interrupted; everything started was stopped")
        sys.exit(130)
