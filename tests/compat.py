"""Client libraries' own test suites, run once directly against the primary and once through
Baton, compared test by test (`make compat`; not part of `make test`).

What runs (issue 11's conformance bar, and issue 16's compression tests):
- PyMySQL's `pymysql/tests`, under pytest, as its CI runs them. PyMySQL's source distributions
  stopped shipping `pymysql/tests` at 1.0 (1.0.0 to today ship only `tests/test_auth.py`), so
  the suite comes from the newest one that has it, 0.10.1, and runs with that release's own
  `pymysql` (a suite tests its own library). `--pymysql-src DIR` runs another tree's
  `pymysql/tests` instead, for instance a checkout of the repository.
- mysql-connector-python's `tests/` modules cursor, connection, mysql_datatypes, pep249, bugs
  and pooling (bugs holds the three compression tests of issue 16), with its own
  `unittests.py --use-external-server --skip-install`, from the source distribution of the
  version installed in .venv; its pure-Python `lib/` is what they test, and the C extension
  installed with it serves the tests that also run with CMySQLConnection.

Both distributions come from the package index with `pip download` (cached in DIR/dl).

Each side gets a fresh sandbox (a primary and one replica) set up as the suites' CI sets up
its server: the accounts `root`@`127.0.0.1` (no password, every privilege) and `test2`, the
databases test1 and test2, the ed25519 plugin; the server variables connector's bootstrap
gives its own servers (sql_mode '', time zone +00:00, 607 MiB max_allowed_packet) while the
connector suite runs. The Baton side then starts Baton on that sandbox with
`allow_unfenced_users` (the suites log in as root, which holds SUPER) and
`allow_load_data_local` (both suites test LOAD DATA LOCAL), every other setting its default.
Each test is bounded (`--test-timeout`) and recorded as it ends (tests/compat_hooks/).

The output is Markdown: a summary per suite and side, the tests whose outcome differs, and
every test's outcome on both sides. The exit status is 1 if a test passes directly but not
through Baton and is not in KNOWN (a difference README explains), else 0.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import re
import subprocess
import sys
import tarfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pymysql

from bench.process import progress, run_main
from bench.record import ROOT, head_lines, machine_info, neighbours, run_record
from harness.baton import start_baton
from harness.clients import admin_conn
from reparent.sandbox import Sandbox
from tests.conftest import sandbox_base_port
from tests.fixtures import port_hint

HOOKS = ROOT / "tests" / "compat_hooks"
PYMYSQL_SUITE_VERSION = "0.10.1"  # the newest PyMySQL sdist that ships pymysql/tests
CONNECTOR = "mysql-connector-python"
# Issue 11's modules first; then the asyncio connector (a second implementation of the
# protocol), logins, and the qa modules that exercise multi-statements, LOCAL INFILE and
# read/write timeouts. Names as unittests.py knows them (--help-tests).
CONNECTOR_MODULES = (
    "cursor",
    "connection",
    "mysql_datatypes",
    "pep249",
    "bugs",
    "pooling",
    "aio_connection",
    "aio_cursor",
    "aio_pooling",
    "authentication",
    "data_integrity",
    "multibyte_charset",
    "qa_connection_api",
    "qa_multi_statement",
    "qa_local_infile",
    "qa_timeout",
)
SUITE_TIMEOUT = 2400.0  # seconds for one suite on one side
ROOT_ACCOUNT = ("root", "")  # both suites' CI log in as root without a password
TEST2_ACCOUNT = ("test2", "some password")  # PyMySQL's second connection (ci/init.sql)
# mysql-connector-python's unittests.py bootstraps its servers with these (its MY_CNF).
CONNECTOR_GLOBALS = {"sql_mode": "", "time_zone": "+00:00"}
MAX_ALLOWED_PACKET = 636870912  # connector's MY_CNF; set before Baton starts, which reads it

# Tests that pass directly but not through Baton for a reason README gives. Anything else that
# passes directly and not through Baton makes the run exit 1.
KNOWN: dict[str, str] = {
    "tests.test_bugs.BugOra35349093.test_set_compress_true": (
        "SHOW STATUS LIKE 'Compression' is the server's word on its own connection, which "
        "Baton keeps plain; the client's connection to Baton is compressed (README, "
        "Compression; baton_client_compressed_sessions_total)"
    ),
    "pymysql/tests/test_issues.py::TestNewIssues::test_issue_36": (
        "the greeting's connection id is Baton's session id, not the server thread's that "
        "SHOW PROCESSLIST lists (README, identity); KILL by either id works"
    ),
}

OUTCOMES = ("pass", "fail", "error", "skip", "xfail", "xpass", "missing")


@dataclass
class Result:
    outcome: str
    message: str
    seconds: float


@dataclass
class SuiteRun:
    suite: str
    side: str
    seconds: float
    results: dict[str, Result]
    returncode: int | None
    timed_out: bool = False

    def counts(self) -> Counter[str]:
        return Counter(r.outcome for r in self.results.values())


@dataclass
class Suite:
    name: str
    label: str
    src: Path


# -- sources ----------------------------------------------------------------------------------


def download(requirement: str, dest: Path) -> Path:
    """The source distribution of `requirement` (name==version), from the package index;
    kept in `dest` for the next run."""
    name, version = requirement.split("==")
    want = f"{name}-{version}.tar.gz".lower().replace("-", "_")

    def found() -> Path | None:
        paths = dest.glob("*.tar.gz")
        return next((p for p in paths if p.name.lower().replace("-", "_") == want), None)

    if (path := found()) is None:
        dest.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:"]
            + ["-d", str(dest), requirement],
            check=True,
        )
        if (path := found()) is None:
            raise RuntimeError(f"pip downloaded no {want} into {dest}")
    return path


def unpack(archive: Path, dest: Path) -> Path:
    """The archive's top folder, unpacked afresh under `dest` (the suites write files there)."""
    with tarfile.open(archive) as tar:
        top = tar.getnames()[0].split("/")[0]
        target = dest / top
        if target.exists():
            subprocess.run(["rm", "-rf", str(target)], check=True)
        tar.extractall(dest, filter="data")
    return target


# -- the server, as the suites' CI sets it up --------------------------------------------------


def admin(box: Sandbox) -> pymysql.Connection:
    """The controller's account on the primary: it may create accounts and set globals."""
    return admin_conn(primary_port(box))


def primary_port(box: Sandbox) -> int:
    return next(s["port"] for s in box.status()["servers"] if s["role"] == "primary")


def prepare(box: Sandbox) -> dict[str, str]:
    """Accounts, databases and plugins the suites expect; returns the server's own defaults
    of the variables the connector suite changes, to restore for PyMySQL's."""
    with admin(box) as conn, conn.cursor() as cur:
        user, password = ROOT_ACCOUNT
        cur.execute("CREATE USER %s@'127.0.0.1' IDENTIFIED BY %s", (user, password))
        cur.execute(f"GRANT ALL PRIVILEGES ON *.* TO `{user}`@'127.0.0.1' WITH GRANT OPTION")
        # PyMySQL's ci/docker-entrypoint-initdb.d/init.sql and mariadb.sql.
        cur.execute("CREATE DATABASE test1 DEFAULT CHARACTER SET utf8mb4")
        cur.execute("CREATE DATABASE test2 DEFAULT CHARACTER SET utf8mb4")
        user, password = TEST2_ACCOUNT
        for host in ("%", "localhost"):
            cur.execute("CREATE USER %s@%s IDENTIFIED BY %s", (user, host, password))
            cur.execute(f"GRANT ALL ON test2.* TO `{user}`@'{host}'")
        cur.execute("INSTALL SONAME 'auth_ed25519'")
        cur.execute("CREATE FUNCTION ed25519_password RETURNS STRING SONAME 'auth_ed25519.so'")
        cur.execute(f"SET GLOBAL max_allowed_packet = {MAX_ALLOWED_PACKET}")
        cur.execute("SET GLOBAL local_infile = 1")
        cur.execute("SELECT @@GLOBAL.sql_mode, @@GLOBAL.time_zone")
        sql_mode, time_zone = cur.fetchone()
    return {"sql_mode": sql_mode, "time_zone": time_zone}


def set_globals(box: Sandbox, values: dict[str, str]) -> None:
    with admin(box) as conn, conn.cursor() as cur:
        for name, value in values.items():
            cur.execute(f"SET GLOBAL {name} = %s", (value,))


@contextmanager
def side(
    name: str, work: Path, base_port: int | None
) -> Iterator[tuple[Sandbox, int, dict[str, str]]]:
    """A fresh sandbox, the port the suites use (the primary's, or a Baton's on it) and the
    server's defaults of the variables `prepare` reports."""
    base = base_port if base_port is not None else sandbox_base_port()
    box = Sandbox(work / f"sandbox-{name}", base_port=base, replicas=1)
    box.up()
    try:
        defaults = prepare(box)
        if name == "direct":
            yield box, primary_port(box), defaults
            return
        baton = start_baton(
            box.config_path,
            work / "baton",
            base + 100 if base_port is not None else port_hint() + 60,
            proxy={"allow_unfenced_users": True, "allow_load_data_local": True},
        )
        try:
            yield box, baton.port, defaults
        finally:
            baton.stop()
    finally:
        box.down()


# -- running the suites ------------------------------------------------------------------------


def pymysql_databases(src: Path, port: int) -> list[dict[str, object]]:
    """PyMySQL's databases.json as its CI writes it (ci/docker.json), over TCP to `port`. Its
    suites name the password and the schema `passwd` and `db` up to 0.10 and `password` and
    `database` since, and read them back by those names: the tree's base.py says which."""
    new = '"database"' in (src / "pymysql" / "tests" / "base.py").read_text()
    password, database = ("password", "database") if new else ("passwd", "db")
    root = {"user": ROOT_ACCOUNT[0], password: ROOT_ACCOUNT[1], database: "test1"}
    test2 = {"user": TEST2_ACCOUNT[0], password: TEST2_ACCOUNT[1], database: "test2"}
    return [
        {"host": "127.0.0.1", "port": port, **root, "use_unicode": True, "local_infile": True},
        {"host": "127.0.0.1", "port": port, **test2},
    ]


def run_suite(
    suite: Suite,
    side_name: str,
    port: int,
    work: Path,
    test_timeout: float,
    only: tuple[str, ...] = (),
) -> SuiteRun:
    """One suite on one side; `only` names single connector tests to run instead of its
    modules (unittests.py runs one test per `-T`, so one process each)."""
    out = work / f"{suite.name}-{side_name}.jsonl"
    out.unlink(missing_ok=True)
    log = work / f"{suite.name}-{side_name}.log"
    env = {
        **os.environ,
        # The hooks first; a PYTHONPATH of the caller's (a suite's extra test dependencies,
        # say) after them.
        "PYTHONPATH": os.pathsep.join(p for p in (str(HOOKS), os.environ.get("PYTHONPATH")) if p),
        "BATON_COMPAT_RESULTS": str(out),
        "BATON_COMPAT_TEST_TIMEOUT": str(test_timeout),
    }
    if suite.name == "pymysql":
        databases = pymysql_databases(suite.src, port)
        (suite.src / "pymysql" / "tests" / "databases.json").write_text(json.dumps(databases))
        cmd = [sys.executable, "-m", "pytest", "-p", "baton_compat_hooks"]
        cmd += ["-p", "no:cacheprovider", "-q", "-rN", "pymysql/tests"]
        cmds = [cmd]
    else:
        argv = [
            "--use-external-server",
            "--skip-install",
            "--host=127.0.0.1",
            f"--port={port}",
            f"--user={ROOT_ACCOUNT[0]}",
            f"--password={ROOT_ACCOUNT[1]}",
            "--verbosity=2",
        ]
        selections = [["-T", name] for name in only] or [
            ["-r", "^(" + "|".join(CONNECTOR_MODULES) + ")$"]
        ]
        codes = [
            f"import baton_compat_hooks as h; h.run_unittests({argv + sel!r})" for sel in selections
        ]
        cmds = [[sys.executable, "-c", code] for code in codes]
    started = time.monotonic()
    timed_out = False
    returncode: int | None = 0
    with open(log, "wb") as sink:
        for one in cmds:
            proc = subprocess.Popen(
                one,
                cwd=suite.src,
                env=env,
                stdout=sink,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
            try:
                returncode = proc.wait(SUITE_TIMEOUT) or returncode
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                returncode, timed_out = None, True
                break
    seconds = time.monotonic() - started
    results: dict[str, Result] = {}
    if out.exists():
        for line in out.read_text().splitlines():
            row = json.loads(line)
            results[row["id"]] = Result(row["outcome"], row["message"], row["s"])
    return SuiteRun(suite.label, side_name, seconds, results, returncode, timed_out)


# -- the report --------------------------------------------------------------------------------


_DIGITS = re.compile(r"\d+")


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def report(runs: list[tuple[SuiteRun, SuiteRun]], header: list[str]) -> tuple[str, int]:
    """Markdown, and how many tests pass directly but not through Baton outside KNOWN."""
    lines = list(header)
    lines += ["", "## Summary", ""]
    lines.append("| suite | side | tests | " + " | ".join(OUTCOMES[:-1]) + " | wall time |")
    lines.append("|---|---|---:|" + "---:|" * (len(OUTCOMES) - 1) + "---:|")
    for pair in runs:
        for run in pair:
            c = run.counts()
            note = " (cut at the suite bound)" if run.timed_out else ""
            lines.append(
                f"| {run.suite} | {run.side} | {len(run.results)} | "
                + " | ".join(str(c[o]) for o in OUTCOMES[:-1])
                + f" | {run.seconds:.0f} s{note} |"
            )
    unexplained = 0
    lines += ["", "## Tests whose outcome differs", ""]
    lines.append("| suite | test | direct | through Baton | Baton's message | known |")
    lines.append("|---|---|---|---|---|---|")
    any_diff = False
    for direct, baton in runs:
        for test in sorted(set(direct.results) | set(baton.results)):
            d = direct.results.get(test, Result("missing", "", 0.0))
            b = baton.results.get(test, Result("missing", "", 0.0))
            if d.outcome == b.outcome:
                continue
            any_diff = True
            known = KNOWN.get(test, "")
            if d.outcome == "pass" and not known:
                unexplained += 1
            message = b.message if b.outcome != "pass" else d.message
            lines.append(
                f"| {direct.suite} | `{test}` | {d.outcome} | {b.outcome} | "
                f"{_cell(message)} | {_cell(known) or '**no**'} |"
            )
    if not any_diff:
        lines.append("| | (none) | | | | |")
    lines += [
        "",
        "## Tests that fail on both sides, with different messages",
        "",
        "(Numbers aside: a test can fail directly for the server's sake and through Baton for "
        "Baton's.)",
        "",
        "| suite | test | outcome | direct | through Baton |",
        "|---|---|---|---|---|",
    ]
    any_diff = False
    for direct, baton in runs:
        for test in sorted(set(direct.results) & set(baton.results)):
            d, b = direct.results[test], baton.results[test]
            if (
                d.outcome == b.outcome
                and d.outcome in ("fail", "error")
                and _DIGITS.sub("N", d.message) != _DIGITS.sub("N", b.message)
            ):
                any_diff = True
                lines.append(
                    f"| {direct.suite} | `{test}` | {d.outcome} | {_cell(d.message)} | "
                    f"{_cell(b.message)} |"
                )
    if not any_diff:
        lines.append("| | (none) | | | |")
    lines += ["", "## Every test", ""]
    for direct, baton in runs:
        lines += [f"### {direct.suite}", "", "| test | direct | through Baton |", "|---|---|---|"]
        for test in sorted(set(direct.results) | set(baton.results)):
            d = direct.results.get(test, Result("missing", "", 0.0)).outcome
            b = baton.results.get(test, Result("missing", "", 0.0)).outcome
            mark = "" if d == b else " **≠**"
            lines.append(f"| `{test}` | {d} | {b}{mark} |")
        lines.append("")
    return "\n".join(lines) + "\n", unexplained


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default="/tmp/baton-compat", help="work folder")
    parser.add_argument("--base-port", type=int, help="the sandbox's first port (Baton: +100)")
    parser.add_argument("--suite", choices=("pymysql", "connector"), action="append")
    parser.add_argument(
        "--pymysql-src",
        help="a PyMySQL tree (a checkout of its repository, say) whose pymysql/tests to run, "
        "with that tree's pymysql; its pymysql/tests/databases.json is overwritten",
    )
    parser.add_argument("--test-timeout", type=float, default=120.0, help="seconds per test")
    parser.add_argument(
        "--connector-test",
        action="append",
        metavar="NAME",
        help="run only this connector test (tests.test_bugs.BugOra19169990.test_compress, "
        "say) instead of its modules; repeatable",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "compat.md")
    args = parser.parse_args(argv)
    command = " ".join(["python -m tests.compat", *(sys.argv[1:] if argv is None else argv)])
    machine, neighbours_start = machine_info(), neighbours()
    work = Path(args.dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    wanted = args.suite or ["pymysql", "connector"]

    suites: list[Suite] = []
    what: list[str] = []
    if "pymysql" in wanted:
        if args.pymysql_src:
            src = Path(args.pymysql_src).resolve()
            label = f"PyMySQL ({src.name})"
        else:
            sdist = download(f"PyMySQL=={PYMYSQL_SUITE_VERSION}", work / "dl")
            src = unpack(sdist, work / "src")
            label = f"PyMySQL {PYMYSQL_SUITE_VERSION}"
        suites.append(Suite("pymysql", label, src))
        what.append(f"- {label}: `pymysql/tests` under pytest, with that tree's own pymysql.")
        if not args.pymysql_src:
            what.append(
                "  (0.10.1 is the newest PyMySQL source distribution that ships pymysql/tests: "
                "1.0.0 and later ship only tests/test_auth.py.)"
            )
    if "connector" in wanted:
        version = importlib.metadata.version(CONNECTOR)
        sdist = download(f"{CONNECTOR}=={version}", work / "dl")
        src = unpack(sdist, work / "src")
        suites.append(Suite("connector", f"{CONNECTOR} {version}", src))
        what.append(
            f"- {CONNECTOR} {version}: `unittests.py --use-external-server --skip-install`, "
            + (
                f"only the tests {', '.join(args.connector_test)} (one `-T` each)."
                if args.connector_test
                else f"modules {', '.join(CONNECTOR_MODULES)}."
            )
        )

    runs: dict[str, dict[str, SuiteRun]] = {s.name: {} for s in suites}
    for side_name in ("direct", "baton"):
        with side(side_name, work, args.base_port) as (box, port, defaults):
            for suite in suites:
                set_globals(box, CONNECTOR_GLOBALS if suite.name == "connector" else defaults)
                progress(f"{suite.label}, {side_name} (port {port})...")
                only = tuple(args.connector_test or ()) if suite.name == "connector" else ()
                run = run_suite(suite, side_name, port, work, args.test_timeout, only)
                progress(f"  {len(run.results)} tests in {run.seconds:.0f} s: {dict(run.counts())}")
                runs[suite.name][side_name] = run
    record = run_record(args, command, machine, neighbours_start)
    header = head_lines("Client test suites, directly and through Baton", record)
    header += [
        *what,
        "- Each side: a fresh sandbox (one primary, one replica) set up as the suites' CI sets "
        "up its server; the Baton side: `baton serve` on it, `allow_unfenced_users` and "
        "`allow_load_data_local` on, every other setting its default (tests/compat.py says "
        "why).",
        f"- Each test bounded at {args.test_timeout:.0f} s; logs and per-test results in {work}.",
    ]
    text, unexplained = report(
        [(runs[s.name]["direct"], runs[s.name]["baton"]) for s in suites], header
    )
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    return 1 if unexplained else 0


if __name__ == "__main__":
    run_main(main)
