"""Loaded into the client suites' own processes by `python -m tests.compat` (tests/compat.py).

It lives in a folder of its own, put on PYTHONPATH alone, because both suites bring a
top-level package named `tests` that Baton's own `tests` package must not shadow.

Two jobs, the same for both suites:
- record each test's outcome as one JSON line in $BATON_COMPAT_RESULTS as soon as it is known,
  so that a suite cut short still leaves every result it reached;
- bound each test's time ($BATON_COMPAT_TEST_TIMEOUT seconds, SIGALRM), so that one test that
  hangs through a proxy costs a bounded time and is reported as a timeout, not a stuck run.

PyMySQL's suite runs under pytest with this module as a plugin (`-p baton_compat_hooks`);
mysql-connector-python's runs under its own unittests.py, started by `run_unittests()`, which
wraps `unittest.TestCase.run` (unittests.py's result class swallows skips, so the outcome is
read at the TestCase, not from the runner's result).
"""

from __future__ import annotations

import json
import os
import runpy
import signal
import sys
import time
import traceback
import unittest
from collections.abc import Callable, Iterator
from types import FrameType, TracebackType
from typing import Any

import pytest

ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None]

TIMEOUT = float(os.environ.get("BATON_COMPAT_TEST_TIMEOUT", "120"))
MESSAGE_LIMIT = 300
# Worst first: a test that failed in one part and passed in another failed.
RANK = ("error", "fail", "xpass", "xfail", "skip", "pass")


class TestTimeout(Exception):
    """The test did not finish within the compat run's per-test bound."""


def _alarm(signum: int, frame: FrameType | None) -> None:
    raise TestTimeout(f"no result within {TIMEOUT:g} s (the compat run's per-test bound)")


def _arm() -> None:
    signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, TIMEOUT)


def _disarm() -> None:
    signal.setitimer(signal.ITIMER_REAL, 0)


def record(test_id: str, outcome: str, message: str, seconds: float, at: float) -> None:
    """One test's line; `at` (Unix time of its start) lines it up with Baton's log."""
    line = {
        "id": test_id,
        "outcome": outcome,
        "message": message[:MESSAGE_LIMIT],
        "s": round(seconds, 4),
        "at": round(at, 3),
    }
    with open(os.environ["BATON_COMPAT_RESULTS"], "a") as out:
        out.write(json.dumps(line) + "\n")


def _worst(a: str, b: str) -> str:
    return a if RANK.index(a) <= RANK.index(b) else b


def _exc_message(err: ExcInfo | None) -> str:
    if err is None:
        return ""
    return traceback.format_exception_only(err[0], err[1])[-1].strip()


# -- pytest (PyMySQL) --------------------------------------------------------------------------

_pytest_state: dict[str, tuple[str, str, float, float]] = {}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    _arm()
    try:
        yield
    finally:
        _disarm()


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if getattr(report, "wasxfail", None) is not None:
        outcome = "xfail" if report.skipped else "xpass"
    elif report.passed:
        outcome = "pass"
    elif report.skipped:
        outcome = "skip"
    else:
        outcome = "fail" if report.when == "call" else "error"
    if outcome == "skip" and isinstance(report.longrepr, tuple):
        message = str(report.longrepr[2])
    elif outcome in ("fail", "error"):
        message = getattr(report.longrepr, "reprcrash", None)
        message = message.message if message is not None else str(report.longrepr)[-300:]
    else:
        message = ""
    before = _pytest_state.get(report.nodeid)
    if before is not None:
        worst = _worst(before[0], outcome)
        message = before[1] if worst == before[0] and before[1] else message
        outcome = worst
    seconds = (before[2] if before else 0.0) + report.duration
    at = before[3] if before else report.start
    _pytest_state[report.nodeid] = (
        outcome,
        message.splitlines()[0] if message else "",
        seconds,
        at,
    )


def pytest_runtest_logfinish(nodeid: str, location: tuple[str, int | None, str]) -> None:
    state = _pytest_state.pop(nodeid, None)
    if state is not None:
        record(nodeid, *state)


# -- unittest (mysql-connector-python's unittests.py) ------------------------------------------


class _Recorder:
    """Stands between a TestCase and the runner's result: notes the outcome, passes it on."""

    def __init__(self, result: unittest.TestResult) -> None:
        self._result = result
        self.outcome = "pass"
        self.message = ""

    def __getattr__(self, name: str) -> Any:
        return getattr(self._result, name)

    def _note(self, outcome: str, message: str) -> None:
        if _worst(outcome, self.outcome) == outcome and outcome != self.outcome:
            self.outcome, self.message = outcome, message

    def addSuccess(self, test: unittest.TestCase) -> None:
        self._result.addSuccess(test)

    def addFailure(self, test: unittest.TestCase, err: ExcInfo) -> None:
        self._note("fail", _exc_message(err))
        self._result.addFailure(test, err)

    def addError(self, test: unittest.TestCase, err: ExcInfo) -> None:
        self._note("error", _exc_message(err))
        self._result.addError(test, err)

    def addSkip(self, test: unittest.TestCase, reason: str) -> None:
        self._note("skip", reason)
        self._result.addSkip(test, reason)

    def addExpectedFailure(self, test: unittest.TestCase, err: ExcInfo) -> None:
        self._note("xfail", _exc_message(err))
        self._result.addExpectedFailure(test, err)

    def addUnexpectedSuccess(self, test: unittest.TestCase) -> None:
        self._note("xpass", "")
        self._result.addUnexpectedSuccess(test)

    def addSubTest(
        self, test: unittest.TestCase, subtest: unittest.TestCase, err: ExcInfo | None
    ) -> None:
        if err is not None:
            failed = issubclass(err[0], test.failureException)
            self._note("fail" if failed else "error", f"{subtest.id()}: {_exc_message(err)}")
        self._result.addSubTest(test, subtest, err)


def bounded(original: Callable[..., Any]) -> Callable[..., Any]:
    """`unittest.TestCase.run` (`original`) with each test bounded and its outcome recorded."""

    def run(self: unittest.TestCase, result: unittest.TestResult | None = None) -> Any:
        if result is None:
            return original(self, result)
        recorder = _Recorder(result)
        # Read before the run: connector's foreach_cnx renames a test as it goes.
        test_id = self.id()
        at, started = time.time(), time.monotonic()
        _arm()
        try:
            return original(self, recorder)
        finally:
            _disarm()
            seconds = time.monotonic() - started
            record(test_id, recorder.outcome, recorder.message, seconds, at)

    return run


def run_unittests(argv: list[str]) -> None:
    """Run unittests.py (in the current folder) with `argv`, every test bounded and recorded."""
    unittest.TestCase.run = bounded(unittest.TestCase.run)  # type: ignore[method-assign]
    sys.argv = ["unittests.py", *argv]
    runpy.run_path("unittests.py", run_name="__main__")
