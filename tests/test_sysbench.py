"""A real external client: sysbench oltp_read_write through Baton, text and binary protocol."""

from __future__ import annotations

import subprocess

import pytest

from harness.baton import Baton
from harness.clients import admin_query
from tests.fixtures import sysbench, sysbench_counts


@pytest.fixture(scope="module")
def prepared(primary_port: int) -> None:
    subprocess.run(sysbench(primary_port, "oltp_read_write", "cleanup"), capture_output=True)
    subprocess.run(
        sysbench(primary_port, "oltp_read_write", "prepare"),
        check=True,
        capture_output=True,
    )


@pytest.mark.parametrize("ps_mode", ["disable", "auto"])
def test_oltp_read_write_has_no_errors(
    baton: Baton, prepared: None, ps_mode: str, primary_port: int
) -> None:
    """sysbench ignores deadlocks (1213) and retries; those are InnoDB's own, counted by the
    server, and happen direct as well. Every other error would stop sysbench, and the ignored
    ones must all be deadlocks the server reports: nothing may come from Baton."""
    deadlocks_before = innodb_deadlocks(primary_port)
    out = subprocess.run(
        sysbench(
            baton.port,
            "--threads=8",
            "--time=4",
            f"--db-ps-mode={ps_mode}",
            "oltp_read_write",
            "run",
            timeout=60,
        ),
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    counts = sysbench_counts(out.stdout)
    assert counts["transactions"] > 100
    assert counts["reconnects"] == 0
    assert counts["errors"] == innodb_deadlocks(primary_port) - deadlocks_before


def innodb_deadlocks(port: int) -> int:
    (row,) = admin_query(port, "SHOW GLOBAL STATUS LIKE 'Innodb_deadlocks'")
    return int(row["Value"])
