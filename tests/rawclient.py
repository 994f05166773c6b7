"""A tiny blocking MySQL client that shows the exact bytes of each response.

The tests use it to send commands PyMySQL and connector/python do not expose (FIELD_LIST,
SET_OPTION, cursors with FETCH, a client that ignores a login error) and to compare responses
byte for byte, direct against through Baton.
"""

from __future__ import annotations

import socket
import struct

from proxy.auth import scramble, stage1
from proxy.packets import (
    Cap,
    Command,
    frame,
    make_handshake_response,
    parse_err,
    parse_server_handshake,
    split_packets,
)
from proxy.response import Phase, ResponseParser

__all__ = ["DEFAULT_CAPS", "RawClient", "split_packets"]

DEFAULT_CAPS = (
    Cap.LONG_PASSWORD
    | Cap.LONG_FLAG
    | Cap.PROTOCOL_41
    | Cap.TRANSACTIONS
    | Cap.SECURE_CONNECTION
    | Cap.MULTI_STATEMENTS
    | Cap.MULTI_RESULTS
    | Cap.PS_MULTI_RESULTS
    | Cap.PLUGIN_AUTH
    | Cap.PLUGIN_AUTH_LENENC_CLIENT_DATA
)


class RawClient:
    def __init__(
        self,
        port: int,
        user: str = "app",
        password: str = "app-pass",
        database: str | None = None,
        caps: int = DEFAULT_CAPS,
        login: bool = True,
        pipelined: bytes = b"",
    ) -> None:
        """Connect and log in; `pipelined` bytes go out right behind the login, before its
        reply is read, as a client that pipelines its first commands sends them."""
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.caps = caps
        self.buf = b""
        _, payload = self.read_packet()
        self.handshake = parse_server_handshake(payload)
        self.login_reply = b""
        if login:
            self.send(
                make_handshake_response(
                    caps, 45, user, scramble(stage1(password), self.handshake.auth_data), database
                ),
                seq=1,
            )
            if pipelined:
                self.sock.sendall(pipelined)
            _, self.login_reply = self.read_packet()

    @property
    def logged_in(self) -> bool:
        return self.login_reply[:1] == b"\x00"

    def send(self, payload: bytes, seq: int = 0) -> None:
        self.sock.sendall(frame(payload, seq))

    def read_packet(self) -> tuple[int, bytes]:
        while len(self.buf) < 4:
            self._recv()
        length = int.from_bytes(self.buf[:3], "little")
        while len(self.buf) < 4 + length:
            self._recv()
        seq, payload = self.buf[3], self.buf[4 : 4 + length]
        self.buf = self.buf[4 + length :]
        return seq, payload

    def _recv(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("server closed the connection")
        self.buf += chunk

    def command(self, command: int, body: bytes = b"", stmt_id: int = 0) -> bytes:
        """Send a command and return the raw bytes of its whole response."""
        self.send(bytes((command,)) + body)
        return self.response(command, stmt_id)

    def response(self, command: int, stmt_id: int = 0) -> bytes:
        """The raw bytes of the whole response to a command already sent."""
        parser = ResponseParser(
            deprecate_eof=bool(self.caps & Cap.DEPRECATE_EOF),
            client_tracks=bool(self.caps & Cap.SESSION_TRACK),
        )
        out = b""
        if parser.begin(command, client_stmt_id=stmt_id):
            while not parser.done and parser.phase is not Phase.INFILE:
                if not self.buf:
                    self._recv()
                data, self.buf = self.buf, b""
                out += parser.feed(data)
        self.parser = parser
        return out

    def query(self, sql: str) -> bytes:
        return self.command(Command.QUERY, sql.encode())

    def error(self, response: bytes) -> tuple[int, str, str] | None:
        payload = response[4:]
        if payload[:1] != b"\xff":
            return None
        e = parse_err(payload)
        return e.code, e.sqlstate, e.message

    def prepare(self, sql: str) -> tuple[int, bytes]:
        """The statement id the server gave, and the response with that id zeroed (the parser
        renumbers it), so responses from two servers compare equal."""
        out = self.command(Command.STMT_PREPARE, sql.encode(), stmt_id=0)
        return self.parser.backend_stmt_id, out

    def execute(self, stmt: int, cursor: bool = False, params: bytes = b"") -> bytes:
        flags = 1 if cursor else 0
        return self.command(Command.STMT_EXECUTE, struct.pack("<IBI", stmt, flags, 1) + params)

    def fetch(self, stmt: int, rows: int) -> bytes:
        return self.command(Command.STMT_FETCH, struct.pack("<II", stmt, rows))

    def close(self) -> None:
        try:
            self.send(bytes((Command.QUIT,)))
        except OSError:
            pass
        self.sock.close()
