"""A few thousand fuzzed frames in `make test` (`make fuzz` runs 100,000): no freeze, no crash,
no canary failure, no traceback, bounded memory (tests/fuzz.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from harness.baton import Baton, start_baton
from reparent.sandbox import Sandbox
from tests.fixtures import port_hint
from tests.fuzz import fuzz

FRAMES = 2000


@pytest.fixture(scope="module")
def fbaton(sandbox: Sandbox, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Baton]:
    b = start_baton(
        sandbox.config_path,
        tmp_path_factory.mktemp("fuzz"),
        port_hint() + 80,
        proxy={"connect_timeout": 2.0, "max_connect_errors": 0},
    )
    try:
        yield b
    finally:
        b.stop()


def test_fuzzed_frames_never_freeze_crash_or_leak(fbaton: Baton) -> None:
    report = fuzz(fbaton.port, fbaton.proc.pid, fbaton.log, FRAMES, seed=7)
    print(report.summary())
    assert report.frames == FRAMES
    assert report.clean, (report.freezes[:5], report.canary_failures[:5], report.tracebacks)
    assert report.rss_mib_max < report.rss_mib_start + 64
    # The fuzzer reached both sides of the door: refusals before login, answers after.
    assert report.outcomes["login:1043"] > 100
    assert sum(v for k, v in report.outcomes.items() if k.startswith("command:")) > 500
