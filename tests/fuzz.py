"""A deterministic, seeded fuzzer for Baton's front door: logins and commands, mutated.

Each frame is one hostile input: a login packet (before authentication) or a command of a
logged-in session (after it), built valid and then broken: truncated, with lying lengths,
without its NULs, with capabilities Baton did not offer, out of sequence, split into tiny
writes, or announcing a 16 MiB continuation that never comes. After every frame the fuzzer
checks the two promises of the front door: a new client gets its greeting within 1 s, and an
established session (the canary) answers within 1 s. At the end: Baton is alive, its log holds
no traceback, and its memory stayed bounded.

`make test` runs a few thousand frames (tests/test_fuzz.py); `make fuzz` runs
`python -m tests.fuzz --frames 100000` against a sandbox of its own.
"""

from __future__ import annotations

import argparse
import random
import socket
import struct
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pymysql

from proxy.auth import scramble, stage1
from proxy.packets import (
    MAX_PAYLOAD,
    Cap,
    Command,
    frame,
    make_handshake_response,
    parse_server_handshake,
)
from tests.rawclient import DEFAULT_CAPS

DEADLINE = 1.0  # seconds: the greeting and the canary's answer, after every frame
READ_WAIT = 0.1  # seconds the fuzzer waits for Baton's answer to a frame
# What every fuzzed login has; the optional capabilities below are mixed in at random.
BASE_CAPS = DEFAULT_CAPS & ~(Cap.PLUGIN_AUTH | Cap.PLUGIN_AUTH_LENENC_CLIENT_DATA)
OPTIONAL_CAPS = (
    Cap.PLUGIN_AUTH,
    Cap.PLUGIN_AUTH_LENENC_CLIENT_DATA,
    Cap.CONNECT_WITH_DB,
    Cap.CONNECT_ATTRS,
    Cap.DEPRECATE_EOF,
    Cap.SESSION_TRACK,
)
# Capabilities Baton does not offer; and compression, which it does: a login that sets it
# starts a compressed session whose fuzzed plain commands its inflater must refuse.
LIES = (Cap.COMPRESS, Cap.SSL, Cap.QUERY_ATTRIBUTES, Cap.ZSTD_COMPRESSION)


@dataclass
class Report:
    frames: int = 0
    freezes: list[str] = field(default_factory=list)
    canary_failures: list[str] = field(default_factory=list)
    crashed: bool = False
    tracebacks: int = 0
    rss_mib_max: float = 0.0
    rss_mib_start: float = 0.0
    outcomes: Counter[str] = field(default_factory=Counter)

    @property
    def clean(self) -> bool:
        return not (self.freezes or self.canary_failures or self.crashed or self.tracebacks)

    def summary(self) -> str:
        return (
            f"{self.frames} frames: {len(self.freezes)} freezes, {int(self.crashed)} crashes, "
            f"{len(self.canary_failures)} canary failures, {self.tracebacks} tracebacks; "
            f"RSS {self.rss_mib_start:.0f} -> max {self.rss_mib_max:.0f} MiB; outcomes "
            + ", ".join(f"{k} {v}" for k, v in sorted(self.outcomes.items()))
        )


def login_packet(rng: random.Random, nonce: bytes, user: str, password: str) -> bytes:
    """A valid HandshakeResponse41 with a random mix of the capabilities Baton offers."""
    caps = int(BASE_CAPS)
    for cap in OPTIONAL_CAPS:
        if rng.random() < 0.5:
            caps |= cap
    attrs = None
    if caps & Cap.CONNECT_ATTRS:
        attrs = {"_client_name": "fuzz", "n": str(rng.randrange(1000))}
    database = "baton_test" if caps & Cap.CONNECT_WITH_DB else None
    auth = scramble(stage1(password), nonce)
    return make_handshake_response(caps, 45, user, auth, database, attrs)


def mutate(rng: random.Random, payload: bytes) -> bytes:
    """Break a valid payload the ways a hostile or buggy client would."""
    data = bytearray(payload)
    for _ in range(rng.randint(1, 3)):
        op = rng.randrange(7)
        if op == 0 and data:  # truncate
            del data[rng.randrange(len(data)) :]
        elif op == 1 and data:  # flip a byte
            data[rng.randrange(len(data))] = rng.randrange(256)
        elif op == 2:  # drop every NUL (unterminated strings)
            data = bytearray(data.replace(b"\x00", b"\x01"))
        elif op == 3 and len(data) >= 4:  # capabilities Baton did not offer, or compression
            caps = struct.unpack_from("<I", data)[0] | rng.choice(LIES)
            struct.pack_into("<I", data, 0, caps & 0xFFFFFFFF)
        elif op == 4:  # a lying length-encoded prefix
            at = rng.randrange(len(data) + 1)
            data[at:at] = rng.choice((b"\xfb", b"\xfc\xff\xff", b"\xfd\xff\xff\xff", b"\xff"))
        elif op == 5:  # junk appended
            data += bytes(rng.randrange(256) for _ in range(rng.randint(1, 40)))
        elif data:  # a byte inserted
            data.insert(rng.randrange(len(data)), rng.randrange(256))
    return bytes(data)


def wire(rng: random.Random, payload: bytes, seq: int) -> list[bytes]:
    """The payload framed, sometimes with a lying header or a bad sequence id, and split
    into the writes the fuzzer sends."""
    header_len = len(payload)
    roll = rng.random()
    if roll < 0.08:
        header_len = rng.choice((0, 1, len(payload) + rng.randint(1, 64), MAX_PAYLOAD))
    elif roll < 0.12:
        seq = rng.randrange(256)
    data = struct.pack("<I", (header_len & 0xFFFFFF) | (seq & 0xFF) << 24) + payload
    if rng.random() < 0.15:
        cuts = sorted(rng.sample(range(1, max(2, len(data))), k=min(3, max(1, len(data) - 1))))
        return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
    return [data]


COMMANDS = (
    Command.QUERY,
    Command.INIT_DB,
    Command.PING,
    Command.FIELD_LIST,
    Command.STATISTICS,
    Command.SET_OPTION,
    Command.STMT_PREPARE,
    Command.STMT_EXECUTE,
    Command.STMT_FETCH,
    Command.STMT_SEND_LONG_DATA,
    Command.STMT_CLOSE,
    Command.STMT_RESET,
    Command.CHANGE_USER,
    Command.PROCESS_KILL,
    Command.RESET_CONNECTION,
    Command.TIME,
    0x3F,  # no such command
)


def command_payload(rng: random.Random, nonce: bytes) -> bytes:
    """A valid-looking command of a random kind (statement ids and parameter counts random)."""
    command = rng.choice(COMMANDS)
    stmt = struct.pack("<I", rng.choice((0, 1, 2, 0xFFFFFFFF, rng.randrange(1 << 32))))
    if command == Command.QUERY:
        body = rng.choice(
            (
                b"SELECT 1",
                b"SELECT GET_LOCK('fuzz', 0), RELEASE_LOCK('fuzz')",
                b"/* c */ SELECT 'x'; SELECT 2",
                b"KILL QUERY 1073741824",
                b"PREPARE f FROM 'SELECT ?'",
                b"SET @fuzz = 1",
            )
        )
    elif command == Command.INIT_DB:
        body = b"baton_test"
    elif command == Command.FIELD_LIST:
        body = b"t\x00"
    elif command == Command.SET_OPTION:
        body = struct.pack("<H", rng.randrange(3))
    elif command == Command.STMT_PREPARE:
        body = b"SELECT ?, ?"
    elif command == Command.STMT_EXECUTE:
        body = stmt + b"\x00\x01\x00\x00\x00" + b"\x00\x01\x08\x00\x08\x00" + b"\x01" * 16
    elif command == Command.STMT_FETCH:
        body = stmt + struct.pack("<I", 10)
    elif command == Command.STMT_SEND_LONG_DATA:
        body = stmt + b"\x00\x00" + b"data"
    elif command in (Command.STMT_CLOSE, Command.STMT_RESET):
        body = stmt
    elif command == Command.CHANGE_USER:
        auth = scramble(stage1("app-pass"), nonce)
        body = b"app\x00" + bytes((len(auth),)) + auth + b"baton_test\x00\x2d\x00"
        body += b"mysql_native_password\x00"
    elif command == Command.PROCESS_KILL:
        # Ids no session has (mutations may still reach the canary's: see `fuzz`).
        body = struct.pack("<I", rng.choice((1 << 30, 0xFFFFFFFF, 999_999_999, 0)))
    else:
        body = b""
    return bytes((command,)) + body


class Fuzzer:
    def __init__(self, port: int, pid: int, log: Path, seed: int) -> None:
        self.port = port
        self.pid = pid
        self.log = log
        self.rng = random.Random(seed)
        self.report = Report()
        self.session: socket.socket | None = None
        self.nonce = b""

    def rss_mib(self) -> float:
        with open(f"/proc/{self.pid}/status") as f:
            kib = int(next(line for line in f if line.startswith("VmRSS:")).split()[1])
        return kib / 1024

    def _connect(self) -> tuple[socket.socket, bytes]:
        s = socket.create_connection(("127.0.0.1", self.port), timeout=DEADLINE)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        head = _recv_exactly(s, 4)
        body = _recv_exactly(s, int.from_bytes(head[:3], "little"))
        return s, parse_server_handshake(body).auth_data

    def _session(self) -> socket.socket:
        """The logged-in session that post-auth frames are sent on (a new one when closed)."""
        if self.session is None:
            s, nonce = self._connect()
            s.sendall(frame(login_packet(self.rng, nonce, "app", "app-pass"), 1))
            reply = _read_some(s, wait=5.0)
            if reply[4:5] != b"\x00":
                s.close()
                raise RuntimeError(f"the fuzzer's own login failed: {reply[:80]!r}")
            self.session, self.nonce = s, nonce
        return self.session

    def frame(self) -> None:
        rng = self.rng
        if rng.random() < 0.5:
            s, nonce = self._connect()
            payload = mutate(rng, login_packet(rng, nonce, "app", "app-pass"))
            seq, kind = 1, "login"
        else:
            s = self._session()
            payload = mutate(rng, command_payload(rng, self.nonce))
            seq, kind = 0, "command"
        try:
            for piece in wire(rng, payload, seq):
                s.sendall(piece)
            reply = _read_some(s)
        except OSError:
            reply = b""
            self.report.outcomes[f"{kind}:reset"] += 1
        else:
            if not reply:
                self.report.outcomes[f"{kind}:no_answer"] += 1
            elif reply[4:5] == b"\xff" and len(reply) >= 7:
                code = int.from_bytes(reply[5:7], "little")
                self.report.outcomes[f"{kind}:{code}"] += 1
            else:
                self.report.outcomes[f"{kind}:answered"] += 1
        if kind == "login":
            s.close()
        elif not reply or _closed(s):
            # Closed by Baton, or left waiting for the rest of a lying packet: a new session.
            s.close()
            self.session = None

    def check(self, canary: pymysql.Connection, n: int) -> None:
        started = time.monotonic()
        try:
            s, _ = self._connect()
            s.close()
        except OSError as e:
            self.report.freezes.append(f"frame {n}: no greeting: {e}")
        if time.monotonic() - started > DEADLINE:
            self.report.freezes.append(f"frame {n}: greeting after {time.monotonic() - started}")
        started = time.monotonic()
        try:
            canary.ping(reconnect=False)
        except pymysql.MySQLError as e:
            self.report.canary_failures.append(f"frame {n}: {e}")
        if time.monotonic() - started > DEADLINE:
            self.report.canary_failures.append(f"frame {n}: answered after >{DEADLINE} s")

    def run(self, frames: int, canary: pymysql.Connection) -> Report:
        report = self.report
        report.rss_mib_start = report.rss_mib_max = self.rss_mib()
        for n in range(frames):
            self.frame()
            report.frames += 1
            self.check(canary, n)
            if n % 200 == 0:
                report.rss_mib_max = max(report.rss_mib_max, self.rss_mib())
                if not Path(f"/proc/{self.pid}").exists():
                    report.crashed = True
                    break
            if len(report.freezes) + len(report.canary_failures) > 20:
                break
        if self.session is not None:
            self.session.close()
        report.rss_mib_max = max(report.rss_mib_max, self.rss_mib())
        text = self.log.read_text(errors="replace")
        report.tracebacks = text.count("Traceback") + text.count("Task exception was never")
        return report


def _recv_exactly(s: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = s.recv(n - len(out))
        if not chunk:
            raise ConnectionError("closed")
        out += chunk
    return out


def _read_some(s: socket.socket, wait: float = READ_WAIT) -> bytes:
    """What Baton sends within `wait` seconds (b'' if nothing or closed)."""
    s.settimeout(wait)
    out = b""
    try:
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return out
            out += chunk
            if len(out) >= 4 and len(out) >= 4 + int.from_bytes(out[:3], "little"):
                s.settimeout(0.02)  # the rest of a multi-packet answer, if any
    except (TimeoutError, BlockingIOError):
        return out
    except OSError:
        return out


def _closed(s: socket.socket) -> bool:
    s.settimeout(0.0)
    try:
        return s.recv(1, socket.MSG_PEEK) == b""
    except (BlockingIOError, TimeoutError):
        return False
    except OSError:
        return True
    finally:
        s.settimeout(READ_WAIT)


def fuzz(port: int, pid: int, log: Path, frames: int, seed: int) -> Report:
    # The canary is another account than the fuzzed sessions' (`app`): a mutated KILL may name
    # the canary's session, and the server lets an account kill its own connections.
    canary = pymysql.connect(
        host="127.0.0.1",
        port=port,
        user="reporting",
        password="reporting-pass",
        ssl_disabled=True,
    )
    try:
        return Fuzzer(port, pid, log, seed).run(frames, canary)
    finally:
        canary.close()


def main(argv: list[str] | None = None) -> int:
    """`make fuzz`: a sandbox and a Baton of its own, then the frames."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=20261130)
    parser.add_argument("--dir", default="/tmp/baton-fuzz")
    args = parser.parse_args(argv)
    from harness.baton import start_baton
    from reparent.sandbox import Sandbox
    from tests.conftest import sandbox_base_port
    from tests.fixtures import port_hint

    work = Path(args.dir)
    box = Sandbox(work / "sandbox", base_port=sandbox_base_port(), replicas=1)
    box.up()
    try:
        b = start_baton(
            box.config_path,
            work / "baton",
            port_hint() + 90,
            proxy={"connect_timeout": 2.0, "max_connect_errors": 0},
            detector={"enabled": False},
        )
        try:
            started = time.monotonic()
            report = fuzz(b.port, b.proc.pid, b.log, args.frames, args.seed)
            print(f"{report.summary()} in {time.monotonic() - started:.0f} s (seed {args.seed})")
            for line in (report.freezes + report.canary_failures)[:20]:
                print("  ", line)
        finally:
            b.stop()
    finally:
        box.down()
    return 0 if report.clean else 1


if __name__ == "__main__":
    sys.exit(main())
