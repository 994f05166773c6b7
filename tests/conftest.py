"""Shared fixtures: one real MariaDB sandbox per test session.

The sandbox is real on purpose: read_only fencing, GTID catch-up and privileges are the facts
Baton stands on, and a fake would only restate our assumptions. If MariaDB is missing the
fixture fails loudly rather than skipping, so CI cannot pass without having tested them.
"""

from __future__ import annotations

import fcntl
import os
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from reparent.sandbox import Sandbox

_BLOCK_LOCKS: dict[int, int] = {}  # base port -> its lock file, while this process uses it


def sandbox_base_port() -> int:
    """A block of 20 ports of this sandbox's own, so parallel runs on one machine do not
    collide (servers at +0..+2; Baton's own ports are searched from +100 and skip taken ones).

    Blocks lie within 24301-25300. The pid picks the first block tried; a block is taken only
    if this process gets its lock file (so two runs that look at once cannot both take it) and
    none of its ports is in use. The lock is held while the block's servers run.
    """
    lock_dir = Path(tempfile.gettempdir()) / "baton-test-ports"
    lock_dir.mkdir(exist_ok=True)
    # Blocks this process took before and no longer uses (their servers are down) go back:
    # a run starts a dozen sandboxes, and several runs share the 50 blocks.
    for base, fd in list(_BLOCK_LOCKS.items()):
        if all(_free(p) for p in range(base, base + 20)):
            os.close(fd)
            del _BLOCK_LOCKS[base]
    first = os.getpid() % 50
    for i in range(50):
        base = 24301 + ((first + i) % 50) * 20
        fd = os.open(lock_dir / f"{base}.lock", os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue
        if all(_free(p) for p in range(base, base + 20)):
            _BLOCK_LOCKS[base] = fd
            return base
        os.close(fd)
    raise RuntimeError("no free block of 20 ports in 24301-25300")


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


@pytest.fixture(scope="session")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    """A running primary and two replicas; `sandbox.status()` and `sandbox.config_path` say
    where they are. Tests must leave its topology as they found it: it is shared."""
    box = Sandbox(tmp_path_factory.mktemp("sandbox"), base_port=sandbox_base_port(), replicas=2)
    box.up()
    try:
        yield box
    finally:
        box.down()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`make test` runs the short fault suite; `make fault-test` sets BATON_FAULT_SUITE=1 and
    runs the tests marked `fault` too."""
    if os.environ.get("BATON_FAULT_SUITE") == "1":
        return
    skip = pytest.mark.skip(reason="long fault suite: make fault-test")
    for item in items:
        if "fault" in item.keywords:
            item.add_marker(skip)


pytest_plugins = ("tests.fixtures",)
