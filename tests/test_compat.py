"""The conformance run's own logic (tests/compat.py, tests/compat_hooks/), without the suites:
how outcomes are recorded and bounded, and which differences make `make compat` fail."""

from __future__ import annotations

import importlib.util
import json
import time
import unittest
from pathlib import Path
from types import ModuleType

import pytest

from tests.compat import HOOKS, KNOWN, Result, SuiteRun, report


@pytest.fixture
def hooks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "baton_compat_hooks", HOOKS / "baton_compat_hooks.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setenv("BATON_COMPAT_RESULTS", str(tmp_path / "results.jsonl"))
    monkeypatch.setattr(module, "TIMEOUT", 0.3)
    return module


class _Sample(unittest.TestCase):
    __test__ = False  # run by the test below through the hooks, not by pytest

    def test_pass(self) -> None:
        pass

    def test_fail(self) -> None:
        self.assertEqual(1, 2)

    def test_error(self) -> None:
        raise RuntimeError("boom")

    @unittest.skip("not here")
    def test_skip(self) -> None:
        pass

    def test_subtest_fails(self) -> None:
        for i in range(2):
            with self.subTest(i=i):
                self.assertEqual(i, 0)

    def test_hangs(self) -> None:
        time.sleep(5)

    def test_renamed(self) -> None:
        # mysql-connector-python's foreach_cnx renames the running test.
        self._testMethodName = "test_renamed (using MySQLConnection)"


def test_unittest_outcomes_are_recorded_and_bounded(hooks: ModuleType, tmp_path: Path) -> None:
    run = hooks.bounded(unittest.TestCase.run)
    started = time.monotonic()
    for name in ("pass", "fail", "error", "skip", "subtest_fails", "hangs", "renamed"):
        run(_Sample(f"test_{name}"), unittest.TestResult())
    assert time.monotonic() - started < 3  # the 5 s sleep was cut at 0.3 s
    rows = {
        r["id"].rsplit(".", 1)[1]: r
        for r in map(json.loads, (tmp_path / "results.jsonl").read_text().splitlines())
    }
    outcomes = {name: row["outcome"] for name, row in rows.items()}
    assert outcomes == {
        "test_pass": "pass",
        "test_fail": "fail",
        "test_error": "error",
        "test_skip": "skip",
        "test_subtest_fails": "fail",
        "test_hangs": "error",
        "test_renamed": "pass",
    }
    assert "no result within 0.3 s" in rows["test_hangs"]["message"]
    assert rows["test_error"]["message"] == "RuntimeError: boom"
    assert rows["test_skip"]["message"] == "not here"


def _run(side: str, **outcomes: str) -> SuiteRun:
    results = {t: Result(o, f"{o} in {side} 42", 0.1) for t, o in outcomes.items()}
    return SuiteRun("suite", side, 1.0, results, 0)


def test_only_unexplained_regressions_count() -> None:
    known = next(iter(KNOWN))
    direct = _run("direct", a="pass", b="pass", c="fail", d="skip", e="fail", **{known: "pass"})
    baton = _run("baton", a="pass", b="error", c="pass", d="skip", e="fail", **{known: "fail"})
    text, unexplained = report([(direct, baton)], ["# title"])
    assert unexplained == 1  # b: passes directly, not through Baton, and is not known
    differs = text.split("## Tests whose outcome differs")[1].split("## Tests that fail")[0]
    assert "`b` | pass | error" in differs and "**no**" in differs
    assert "`c` | fail | pass" in differs  # better through Baton: shown, not counted
    assert f"`{known}` | pass | fail" in differs and KNOWN[known] in differs
    assert "`a`" not in differs and "`d`" not in differs
    # e fails on both sides with messages that differ beyond their numbers.
    both = text.split("## Tests that fail on both sides")[1].split("## Every test")[0]
    assert "`e` | fail | fail in direct 42 | fail in baton 42" in both
