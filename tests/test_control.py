"""The control socket answers every request line exactly once, whatever its bytes.

`ControlServer.handle` is driven with a table of hostile lines, with a real Controller over fake
mechanisms (no MariaDB), and the socket loop through a real Unix socket: pipelined after a bad
line, a good one is still answered, and nothing is logged with a traceback. One test does the
same against the socket of a running Baton.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from harness.baton import Baton
from proxy import control
from proxy.accounts import AccountBook, Accounts
from proxy.admission import Admission
from proxy.context import ProxyContext
from proxy.control import ControlServer, LocalProxies
from proxy.holder import Holder
from proxy.router import Router
from proxy.server import FALLBACK
from reparent.controller import Controller
from reparent.filestore import FileStore
from reparent.topology import ReparentKind
from tests.test_orchestrator import CONFIG, Fakes

STATUS = b'{"cmd": "status"}'

# (line, a piece of the error it must get). None of these may reach the controller.
HOSTILE: list[tuple[bytes, str]] = [
    (b"", "empty line"),
    (b"\n", "empty line"),
    (b"   \r\n", "empty line"),
    (b"status", "not JSON"),
    (b'{"cmd": "status"', "not JSON"),
    (b"[1, 2]", "expected a JSON object"),
    (b'"status"', "expected a JSON object"),
    (b"null", "expected a JSON object"),
    (b'{"cmd": 5}', "expected a JSON object"),
    (b'{"command": "status"}', "expected a JSON object"),
    (b'{"cmd": "nope"}', "unknown command"),
    (b'{"cmd": "_client"}', "unknown command"),
    (b'{"cmd": "' + b"x" * 5000 + b'"}', "unknown command"),
    # wrong types
    (b'{"cmd": "history", "limit": "x"}', "limit must be an integer"),
    (b'{"cmd": "history", "limit": true}', "limit must be an integer"),
    (b'{"cmd": "history", "limit": 2.5}', "limit must be an integer"),
    (b'{"cmd": "history", "limit": [1]}', "limit must be an integer"),
    (b'{"cmd": "history", "limit": -1}', "limit must be an integer"),
    (b'{"cmd": "history", "shard": 5}', "shard must be a non-empty string"),
    (b'{"cmd": "history", "shard": "nope"}', "shard must be one of main"),
    (b'{"cmd": "prs", "to": ["db2"]}', "to must be a non-empty string"),
    (b'{"cmd": "prs", "to": {"name": "db2"}}', "to must be a non-empty string"),
    (b'{"cmd": "prs", "to": ""}', "to must be a non-empty string"),
    (b'{"cmd": "prs", "to": "' + b"d" * 60_000 + b'"}', "of at most 256 characters"),
    (b'{"cmd": "prs", "to": "db9"}', "no server 'db9'"),
    (b'{"cmd": "prs", "shard": 5}', "shard must be a non-empty string"),
    (b'{"cmd": "ers", "shard": ["main"]}', "shard must be a non-empty string"),
    (b'{"cmd": "prs", "shard": "nope"}', "shard must be one of main"),
    (b'{"cmd": "prs", "to": "db2", "timeout": true}', "timeout must be a number"),
    (b'{"cmd": "prs", "to": "db2", "timeout": "5"}', "timeout must be a number"),
    (b'{"cmd": "prs", "to": "db2", "timeout": 0}', "timeout must be a number"),
    (b'{"cmd": "prs", "to": "db2", "timeout": -3}', "timeout must be a number"),
    (b'{"cmd": "prs", "to": "db2", "timeout": 1e300}', "timeout must be a number"),
    (b'{"cmd": "prs", "too": "db2"}', 'unknown argument "too"'),
    (b'{"cmd": "status", "verbose": 1}', "unknown argument"),
    # huge numbers
    (b'{"cmd": "history", "limit": 1e400}', "out of range"),
    (b'{"cmd": "history", "limit": -1e400}', "out of range"),
    (b'{"cmd": "history", "limit": 1' + b"0" * 400 + b"}", "more than 20 digits"),
    (b'{"cmd": "history", "limit": 1' + b"0" * 5000 + b"}", "more than 20 digits"),
    (b'{"cmd": "prs", "to": "db2", "timeout": 1e400}', "out of range"),
    (b'{"cmd": "history", "limit": 99999999999999999999}', "limit must be an integer"),
    # NaN and Infinity, which json accepts and every comparison then lets through
    (b'{"cmd": "history", "limit": NaN}', "NaN is not a JSON number"),
    (b'{"cmd": "prs", "to": "db2", "timeout": NaN}', "NaN is not a JSON number"),
    (b'{"cmd": "prs", "to": "db2", "timeout": Infinity}', "Infinity is not a JSON number"),
    (b'{"cmd": "prs", "to": "db2", "timeout": -Infinity}', "-Infinity is not a JSON number"),
    # deep nesting: json recurses, and raises RecursionError well before 100,000 levels
    (b"[" * 100_000, "nested deeper than"),
    (b'{"a":' * 50_000 + b"1" + b"}" * 50_000, "nested deeper than"),
    (b'{"cmd": "status", "x": ' + b"[" * 20 + b"]" * 20 + b"}", "nested deeper than"),
    # byte-order marks and other encodings
    (b"\xef\xbb\xbf" + STATUS, "byte-order mark"),
    (b"\xff\xfe" + STATUS.decode().encode("utf-16-le"), "not UTF-8"),
    (STATUS.decode().encode("utf-16-be"), "not JSON"),  # valid UTF-8, with NULs
    (b'{"cmd": "st\xffatus"}', "not UTF-8: byte 11 is 0xff"),
    (b'{"cmd": "\xc3"}', "not UTF-8"),
    (b'{"cmd": "\xed\xa0\x80"}', "not UTF-8"),  # an encoded surrogate
    (b"\x00" * 10, "not JSON"),
]


def server(path: str = "unused.sock") -> tuple[ControlServer, Fakes, FileStore]:
    """A ControlServer over the example config, a real Controller and store, fake mechanisms."""
    store = FileStore.open(None, CONFIG)
    fakes = Fakes()
    controller = Controller(
        CONFIG, store, {ReparentKind.PRS: fakes, ReparentKind.ERS: fakes}, fakes, owner="test"
    )
    router = Router(CONFIG, store, "test")
    ctx = ProxyContext(
        config=CONFIG,
        identity=FALLBACK,
        router=router,
        holder=Holder(CONFIG.buffer),
        accounts=Accounts(AccountBook(), list, CONFIG.admin),  # a fixed, empty list of logins
        admission=Admission(max_connections=10, fd_limit=1024, max_connect_errors=0),
    )
    return ControlServer(CONFIG, controller, LocalProxies(ctx), path), fakes, store


def tracebacks(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]


@pytest.mark.parametrize(("line", "error"), HOSTILE, ids=[repr(h[0][:40]) for h in HOSTILE])
def test_hostile_line_gets_one_error(
    line: bytes, error: str, caplog: pytest.LogCaptureFixture
) -> None:
    ctl, fakes, store = server()
    reply = asyncio.run(ctl.handle(line))
    assert reply["ok"] is False
    assert error in reply["error"], reply["error"]
    assert len(reply["error"]) < 300, "the error must not echo the line"
    assert fakes.calls == [], "a bad request reached the controller"
    assert store.history() == []
    assert tracebacks(caplog) == []


def test_good_requests_still_work() -> None:
    ctl, fakes, store = server()

    async def go() -> list[dict[str, Any]]:
        lines = [
            STATUS,
            b'{"cmd": "history", "limit": null}',
            b'{"cmd": "prs", "to": "db3", "timeout": 2.5, "shard": "main"}\r\n',
            b'{"cmd": "history", "limit": 1, "shard": "main"}',
            b'{"cmd": "history", "shard": null}',
            b'{"cmd": "sessions"}',
        ]
        return [await ctl.handle(line) for line in lines]

    replies = asyncio.run(go())
    assert all(r["ok"] for r in replies), replies
    assert replies[0]["result"]["shards"][0]["primary"] == "db1"
    assert replies[2]["result"]["new_primary"] == "db3"
    assert [r["new_primary"] for r in replies[3]["result"]] == ["db3"]
    assert replies[2]["result"]["outcome"] == "succeeded"
    assert len(store.history()) == 1
    assert replies[5]["result"] == []


def test_a_bug_in_a_command_still_gets_one_reply(caplog: pytest.LogCaptureFixture) -> None:
    """Not bad input but a bug: the caller gets an error, the log gets the traceback."""
    ctl, _, _ = server()

    async def broken(request: dict[str, Any], emit: Any) -> None:
        raise KeyError("oops")

    ctl.cmd_broken = broken  # type: ignore[attr-defined]
    reply = asyncio.run(ctl.handle(b'{"cmd": "broken"}'))
    assert reply == {"ok": False, "error": "internal error (KeyError); see Baton's log"}
    assert any(r.exc_info for r in caplog.records)


def exchange(path: str, payload: bytes | list[bytes], timeout: float = 10.0) -> list[Any]:
    """Send `payload` (pieces sent one by one), half-close, and read every reply line."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        for piece in [payload] if isinstance(payload, bytes) else payload:
            s.sendall(piece)
        s.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return [json.loads(line) for line in data.splitlines()]


@pytest.fixture
def running(tmp_path: Path) -> Iterator[str]:
    """A ControlServer on a real Unix socket, its loop in a thread."""
    import threading

    loop = asyncio.new_event_loop()
    ctl, _, _ = server(str(tmp_path / "c.sock"))
    loop.run_until_complete(ctl.start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield ctl.path
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        ctl.close()
        loop.close()


def test_pipelined_after_every_hostile_line(running: str, caplog: pytest.LogCaptureFixture) -> None:
    """All the hostile lines that fit on one line, each followed by a good one, in one write."""
    one_line = [line.strip() for line, _ in HOSTILE if b"\n" not in line.strip()]
    payload = b"".join(line + b"\n" + STATUS + b"\n" for line in one_line)
    replies = exchange(running, payload)
    assert len(replies) == 2 * len(one_line)
    for i, line in enumerate(one_line):
        bad, good = replies[2 * i], replies[2 * i + 1]
        assert bad["ok"] is False, (line[:60], bad)
        assert good["ok"] is True, (line[:60], good)
    assert tracebacks(caplog) == []


@pytest.mark.parametrize("pieces", [1, 7])
def test_overlong_line_is_answered_and_skipped(
    running: str, pieces: int, caplog: pytest.LogCaptureFixture
) -> None:
    """A line over the limit gets one error, and the next line is read from its own start:
    the long line's tail (here a valid request) is not taken for a request. Sent in one write,
    and in pieces so that the limit is crossed before the newline arrives."""
    tail = b'{"cmd": "prs", "to": "db2"}'
    long = b" " * (control.MAX_LINE + 10) + tail + b"\n"
    payload = long + STATUS + b"\n" + long + long + STATUS + b"\n"
    size = -(-len(payload) // pieces)
    replies = exchange(running, [payload[i : i + size] for i in range(0, len(payload), size)])
    assert [r["ok"] for r in replies] == [False, True, False, False, True]
    assert f"longer than {control.MAX_LINE} bytes" in replies[0]["error"]
    assert replies[4]["result"]["shards"][0]["primary"] == "db1", "the long line's tail ran"
    assert tracebacks(caplog) == []


def test_line_at_the_limit(running: str) -> None:
    """MAX_LINE bytes before the newline is a request; one more is not."""
    fits = b'{"cmd": "status"' + b" " * (control.MAX_LINE - len(STATUS)) + b"}"
    assert len(fits) == control.MAX_LINE
    replies = exchange(running, fits + b"\n" + b" " + fits + b"\n")
    assert [r["ok"] for r in replies] == [True, False]


def test_last_line_without_newline(running: str) -> None:
    """A last line cut off by the end of the stream is still answered, also an overlong one."""
    assert [r["ok"] for r in exchange(running, STATUS + b"\n" + STATUS)] == [True, True]
    replies = exchange(running, STATUS + b"\n" + b"[" * (control.MAX_LINE * 3))
    assert [r["ok"] for r in replies] == [True, False]


def test_baton_answers_hostile_lines(baton: Baton) -> None:
    """Over the socket of a running Baton: every line answered in order, nothing logged with a
    traceback, and `baton ctl status` works afterwards."""
    before = baton.log.stat().st_size
    lines = [
        b'{"cmd": "history", "limit": "x"}',
        b'{"cmd": "prs", "to": ["db2"]}',
        b'{"cmd": "history", "limit": 1e400}',
        b'{"cmd": "history", "limit": 1' + b"0" * 5000 + b"}",
        b"[" * 100_000,
        b"\xef\xbb\xbf" + STATUS,
        b'{"cmd": "\xff"}',
        b"",
        b" " * (control.MAX_LINE + 1),
        b'{"cmd": "prs", "timeout": NaN}',
    ]
    replies = exchange(baton.socket, b"".join(line + b"\n" + STATUS + b"\n" for line in lines))
    assert [r["ok"] for r in replies] == [False, True] * len(lines)
    proc = baton.ctl("status")
    assert proc.returncode == 0, proc.stderr
    log = baton.log.read_bytes()[before:].decode(errors="replace")
    assert "Traceback" not in log and "ERROR" not in log, log
