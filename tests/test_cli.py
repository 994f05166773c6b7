"""`baton --help` is written for an operator: what Baton is, what each command is for, and a
first session to try; not how the module imports its subcommands."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def baton_help(*args: str) -> str:
    run = subprocess.run(
        [sys.executable, "-m", "proxy.cli", *args, "--help"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
    )
    assert run.returncode == 0, run.stderr
    return run.stdout


def test_top_level_help_says_what_each_command_is_for() -> None:
    text = baton_help()
    assert "MySQL-protocol proxy" in text
    for command, purpose in (
        ("serve", "run the proxy"),
        ("sandbox", "local MariaDB servers"),
        ("ctl", "operate a running Baton"),
    ):
        line = next(line for line in text.splitlines() if line.strip().startswith(command))
        assert purpose in line, line
    assert "baton sandbox up" in text and "baton ctl --config" in text
    assert "imported" not in text  # the module's note for developers stays in its docstring


def test_each_command_explains_itself() -> None:
    assert "control socket" in baton_help("serve")
    assert "by pid" in baton_help("sandbox")
    ctl = baton_help("ctl")
    assert "planned reparent" in ctl and "emergency reparent" in ctl
