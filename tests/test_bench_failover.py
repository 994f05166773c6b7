"""`python -m bench.failover --short`: the failover benchmark runs end to end on its own
sandbox and writes results that hold together.

It runs as a separate process, as `make bench-failover` does, so its signal handlers, its
sandbox and its clean-up are the real ones. The numbers of a few seconds on a busy machine
say little; what is checked is what must be true whatever the machine: all four paths ran
and switched, Baton with its buffer gave the client no error and held commands, the client's
acknowledged rows are all there, and every output file exists.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import sandbox_base_port

pytestmark = pytest.mark.sandbox

ROOT = Path(__file__).resolve().parent.parent
PATHS = ["direct", "haproxy", "baton-unbuffered", "baton-buffered"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def short_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """One short run for every test here: it takes most of a minute."""
    out = tmp_path_factory.mktemp("failover")
    # The block's extra-sandbox ports, clear of a session sandbox that may take its first ones.
    base = sandbox_base_port() + 10
    run = subprocess.run(
        [sys.executable, "-m", "bench.failover", "--short", "--out", str(out)]
        + ["--base-port", str(base)],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=ROOT,
    )
    assert run.returncode == 0, f"stdout:\n{run.stdout}\nstderr:\n{run.stderr[-4000:]}"
    return out, run.stdout


def test_every_path_ran_and_switched(short_run):
    out, _ = short_run
    record = json.loads((out / "failover.json").read_text())
    paths = {p["path"]: p for p in record["paths"]}
    assert list(paths) == PATHS
    for name, p in paths.items():
        s = p["summary"]
        assert s["switchovers"] == s["succeeded"] == 1, name
        assert s["client_requests"] > 100, name
        assert s["steady"]["p50_ms"] is not None and s["steady"]["p50_ms"] > 0, name
        assert s["steady_rate_per_bucket"] > 0, name
        assert s["write_pause_max_ms"] is not None and s["write_pause_max_ms"] > 0, name
        assert s["sysbench_runs"] >= 1 and s["sysbench_tps"] > 0, name
        # Every insert the client saw succeed is in its table, on whichever path.
        assert s["client_rows_found"] >= s["client_rows_acknowledged"], name
    assert record["rate"] > 0 and record["machine"]["nproc"]


def test_buffered_baton_hides_the_switch(short_run):
    out, _ = short_run
    record = json.loads((out / "failover.json").read_text())
    paths = {p["path"]: p["summary"] for p in record["paths"]}
    buffered = paths["baton-buffered"]
    assert buffered["client_errors"] == 0
    assert buffered["client_reconnects"] == 0
    assert buffered["held"] > 0
    assert buffered["client_rows_found"] == buffered["client_rows_acknowledged"]
    assert buffered["stranded_sessions"] == []
    # Only Baton with its buffer holds; the paths without Baton report 0.
    assert paths["direct"]["held"] == paths["haproxy"]["held"] == 0
    assert paths["baton-unbuffered"]["held"] == 0


def test_report_table_and_pictures(short_run):
    out, stdout = short_run
    for name in PATHS:
        png = out / f"failover-{name}.png"
        assert png.read_bytes()[:8] == PNG_MAGIC, name
        assert png.stat().st_size > 10_000, name
    md = (out / "failover.md").read_text()
    assert "python -m bench.failover --short" in md
    assert "Load average" in md
    # The summary table has a header, a rule and one row per path, on stdout and in the page.
    rows = [line for line in stdout.splitlines() if line.startswith("|")]
    assert len(rows) == 2 + len(PATHS)
    for row in rows:
        assert row in md
    for name in PATHS:
        assert f"(failover-{name}.png)" in md
