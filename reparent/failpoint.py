"""Crash points for the fault tests, in the manner of etcd's gofail.

`BATON_FAILPOINT=before:<call>` ends the process the way `kill -9` would right after the step
before that mechanism call is journaled; `after:<call>` right after the call returned, before
its outcome is journaled. Those are the two places where a controller can die half-way: the
journal says a step began, and whether its call ran (or finished) is unknown. The variable is
read once at start; unset, each check is one string comparison.
"""

from __future__ import annotations

import logging
import os
import sys

ENV = "BATON_FAILPOINT"
EXIT_CODE = 137  # what a shell reports for a process killed by SIGKILL
_SPEC = os.environ.get(ENV, "")

log = logging.getLogger(__name__)


def hit(when: str, call: str) -> None:
    """Die here, without any cleanup, if the environment names this point."""
    if _SPEC and _SPEC == f"{when}:{call}":
        log.critical("failpoint %s:%s: exiting as if killed", when, call)
        for handler in logging.getLogger().handlers:
            handler.flush()
        sys.stderr.flush()
        os._exit(EXIT_CODE)
