"""MySQL/MariaDB wire-format pieces Baton reads or makes itself.

Only what the proxy must understand is decoded here: packet headers, OK/ERR/EOF, session-state
tracking, handshakes and prepared-statement ids. Result rows are never decoded on the data path;
they are relayed as bytes (see `response.py`).
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field

MAX_PAYLOAD = 0xFFFFFF

_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")


class Cap(enum.IntFlag):
    """Capability flags; the MariaDB extended ones live in the upper 32 bits."""

    LONG_PASSWORD = 1
    FOUND_ROWS = 1 << 1
    LONG_FLAG = 1 << 2
    CONNECT_WITH_DB = 1 << 3
    NO_SCHEMA = 1 << 4
    COMPRESS = 1 << 5
    ODBC = 1 << 6
    LOCAL_FILES = 1 << 7
    IGNORE_SPACE = 1 << 8
    PROTOCOL_41 = 1 << 9
    INTERACTIVE = 1 << 10
    SSL = 1 << 11
    IGNORE_SIGPIPE = 1 << 12
    TRANSACTIONS = 1 << 13
    RESERVED = 1 << 14
    SECURE_CONNECTION = 1 << 15
    MULTI_STATEMENTS = 1 << 16
    MULTI_RESULTS = 1 << 17
    PS_MULTI_RESULTS = 1 << 18
    PLUGIN_AUTH = 1 << 19
    CONNECT_ATTRS = 1 << 20
    PLUGIN_AUTH_LENENC_CLIENT_DATA = 1 << 21
    CAN_HANDLE_EXPIRED_PASSWORDS = 1 << 22
    SESSION_TRACK = 1 << 23
    DEPRECATE_EOF = 1 << 24
    OPTIONAL_RESULTSET_METADATA = 1 << 25
    ZSTD_COMPRESSION = 1 << 26
    QUERY_ATTRIBUTES = 1 << 27
    MARIADB_PROGRESS = 1 << 32
    MARIADB_COM_MULTI = 1 << 33
    MARIADB_STMT_BULK_OPERATIONS = 1 << 34
    MARIADB_EXTENDED_METADATA = 1 << 35
    MARIADB_CACHE_METADATA = 1 << 36


# What Baton itself can relay faithfully. Compression, TLS, query attributes, progress
# reports, COM_MULTI, bulk and metadata caching are not (yet) spoken by the proxy, so they are
# never offered to a client nor asked of a backend.
PROXY_CAPS = (
    Cap.LONG_PASSWORD
    | Cap.FOUND_ROWS
    | Cap.LONG_FLAG
    | Cap.CONNECT_WITH_DB
    | Cap.NO_SCHEMA
    | Cap.ODBC
    | Cap.LOCAL_FILES
    | Cap.IGNORE_SPACE
    | Cap.PROTOCOL_41
    | Cap.INTERACTIVE
    | Cap.IGNORE_SIGPIPE
    | Cap.TRANSACTIONS
    | Cap.SECURE_CONNECTION
    | Cap.MULTI_STATEMENTS
    | Cap.MULTI_RESULTS
    | Cap.PS_MULTI_RESULTS
    | Cap.PLUGIN_AUTH
    | Cap.CONNECT_ATTRS
    | Cap.PLUGIN_AUTH_LENENC_CLIENT_DATA
    | Cap.SESSION_TRACK
    | Cap.DEPRECATE_EOF
)


class Command(enum.IntEnum):
    SLEEP = 0x00
    QUIT = 0x01
    INIT_DB = 0x02
    QUERY = 0x03
    FIELD_LIST = 0x04
    CREATE_DB = 0x05
    DROP_DB = 0x06
    REFRESH = 0x07
    SHUTDOWN = 0x08
    STATISTICS = 0x09
    PROCESS_INFO = 0x0A
    CONNECT = 0x0B
    PROCESS_KILL = 0x0C
    DEBUG = 0x0D
    PING = 0x0E
    TIME = 0x0F
    DELAYED_INSERT = 0x10
    CHANGE_USER = 0x11
    BINLOG_DUMP = 0x12
    TABLE_DUMP = 0x13
    CONNECT_OUT = 0x14
    REGISTER_SLAVE = 0x15
    STMT_PREPARE = 0x16
    STMT_EXECUTE = 0x17
    STMT_SEND_LONG_DATA = 0x18
    STMT_CLOSE = 0x19
    STMT_RESET = 0x1A
    SET_OPTION = 0x1B
    STMT_FETCH = 0x1C
    DAEMON = 0x1D
    BINLOG_DUMP_GTID = 0x1E
    RESET_CONNECTION = 0x1F


COMMAND_NAMES = {c.value: c.name.lower() for c in Command}


class Status(enum.IntFlag):
    IN_TRANS = 0x0001
    AUTOCOMMIT = 0x0002
    MORE_RESULTS = 0x0008
    NO_GOOD_INDEX = 0x0010
    NO_INDEX = 0x0020
    CURSOR_EXISTS = 0x0040
    LAST_ROW_SENT = 0x0080
    DB_DROPPED = 0x0100
    NO_BACKSLASH_ESCAPES = 0x0200
    METADATA_CHANGED = 0x0400
    QUERY_WAS_SLOW = 0x0800
    PS_OUT_PARAMS = 0x1000
    IN_TRANS_READONLY = 0x2000
    SESSION_STATE_CHANGED = 0x4000


class Track(enum.IntEnum):
    """Session-state tracker entry types in OK packets."""

    SYSTEM_VARIABLES = 0
    SCHEMA = 1
    STATE_CHANGE = 2
    GTIDS = 3
    TRANSACTION_CHARACTERISTICS = 4
    TRANSACTION_STATE = 5


class PacketError(Exception):
    """A packet that does not parse: the connection that sent it cannot be trusted further."""


class ServerRefused(PacketError):
    """The server answered a new connection with an error instead of its greeting."""

    def __init__(self, err: Err) -> None:
        super().__init__(f"server refused the connection: {err.code} {err.message}")
        self.err = err


def frame(payload: bytes, seq: int) -> bytes:
    """Wrap one payload (split at 16 MiB as the protocol requires) into wire packets."""
    if len(payload) < MAX_PAYLOAD:
        return _U32.pack(len(payload) | (seq & 0xFF) << 24) + payload
    parts = []
    pos = 0
    while True:
        chunk = payload[pos : pos + MAX_PAYLOAD]
        parts.append(_U32.pack(len(chunk) | (seq & 0xFF) << 24) + chunk)
        seq += 1
        pos += MAX_PAYLOAD
        if len(chunk) < MAX_PAYLOAD:
            return b"".join(parts)


def split_packets(data: bytes) -> list[bytes]:
    """The payloads of whole packets in `data`, for the small results Baton reads itself."""
    out = []
    pos = 0
    while pos + 4 <= len(data):
        length = int.from_bytes(data[pos : pos + 3], "little")
        out.append(data[pos + 4 : pos + 4 + length])
        pos += 4 + length
    return out


def read_lenenc(buf: bytes, pos: int) -> tuple[int | None, int]:
    """A length-encoded integer at `pos`; None stands for SQL NULL (0xFB)."""
    try:
        first = buf[pos]
        if first < 0xFB:
            return first, pos + 1
        if first == 0xFB:
            return None, pos + 1
        if first == 0xFC:
            return buf[pos + 1] | buf[pos + 2] << 8, pos + 3
        if first == 0xFD:
            return buf[pos + 1] | buf[pos + 2] << 8 | buf[pos + 3] << 16, pos + 4
        if first == 0xFE:
            if pos + 9 > len(buf):
                raise PacketError("truncated length-encoded integer")
            return int.from_bytes(buf[pos + 1 : pos + 9], "little"), pos + 9
    except IndexError:
        raise PacketError("truncated length-encoded integer")
    raise PacketError(f"bad length-encoded integer prefix 0x{first:02x}")


def read_lenenc_bytes(buf: bytes, pos: int) -> tuple[bytes, int]:
    n, pos = read_lenenc(buf, pos)
    if n is None:
        return b"", pos
    end = pos + n
    if end > len(buf):
        raise PacketError("truncated length-encoded string")
    return bytes(buf[pos:end]), end


def lenenc(n: int) -> bytes:
    if n < 0xFB:
        return bytes((n,))
    if n < 1 << 16:
        return b"\xfc" + n.to_bytes(2, "little")
    if n < 1 << 24:
        return b"\xfd" + n.to_bytes(3, "little")
    return b"\xfe" + n.to_bytes(8, "little")


def lenenc_bytes(data: bytes) -> bytes:
    return lenenc(len(data)) + data


@dataclass(slots=True)
class Ok:
    affected_rows: int
    last_insert_id: int
    status: int
    warnings: int
    info: bytes
    # Raw session-state entries (type, data) when SESSION_STATE_CHANGED is set.
    tracked: list[tuple[int, bytes]] = field(default_factory=list)
    # Where the info field ends; a client without SESSION_TRACK is sent only this much.
    info_end: int = 0


def parse_ok(payload: bytes, session_track: bool) -> Ok:
    """An OK packet (header 0x00, or 0xFE when it ends a result set under DEPRECATE_EOF)."""
    affected, pos = read_lenenc(payload, 1)
    insert_id, pos = read_lenenc(payload, pos)
    if pos + 4 > len(payload):
        raise PacketError("truncated OK packet")
    status = payload[pos] | payload[pos + 1] << 8
    warnings = payload[pos + 2] | payload[pos + 3] << 8
    pos += 4
    info = b""
    tracked: list[tuple[int, bytes]] = []
    if session_track:
        if pos < len(payload):
            info, pos = read_lenenc_bytes(payload, pos)
        info_end = pos
        if status & Status.SESSION_STATE_CHANGED and pos < len(payload):
            total, pos = read_lenenc(payload, pos)
            end = pos + (total or 0)
            while pos < end:
                kind = payload[pos]
                data, pos = read_lenenc_bytes(payload, pos + 1)
                tracked.append((kind, data))
    else:
        if pos < len(payload):
            info, pos = read_lenenc_bytes(payload, pos)
        info_end = pos
    return Ok(affected or 0, insert_id or 0, status, warnings, info, tracked, info_end)


def strip_session_track(payload: bytes, ok: Ok) -> bytes:
    """The same OK for a client that did not ask for session tracking.

    MariaDB writes the info as a length-encoded string either way, but adds the state entries
    and an empty info only for tracking clients; the flag is cleared so no client looks for them.
    """
    head = bytearray(payload[: ok.info_end])
    _, pos = read_lenenc(head, 1)
    _, pos = read_lenenc(head, pos)
    status = ok.status & ~Status.SESSION_STATE_CHANGED
    head[pos : pos + 2] = _U16.pack(status)
    if not ok.info:
        del head[pos + 4 :]
    return bytes(head)


@dataclass(slots=True)
class Err:
    code: int
    sqlstate: str
    message: str


def parse_err(payload: bytes) -> Err:
    if len(payload) < 3:
        raise PacketError("truncated ERR packet")
    code = payload[1] | payload[2] << 8
    if len(payload) > 3 and payload[3:4] == b"#":
        return Err(code, payload[4:9].decode("ascii", "replace"), _text(payload[9:]))
    return Err(code, "HY000", _text(payload[3:]))


def _text(b: bytes) -> str:
    return bytes(b).decode("utf-8", "replace")


def make_err(code: int, sqlstate: str, message: str) -> bytes:
    """An ERR payload; the message is what the operator or developer reads, so make it say why."""
    return b"\xff" + _U16.pack(code) + b"#" + sqlstate.encode("ascii")[:5] + message.encode()


def parse_eof_status(payload: bytes) -> int:
    """Status flags of a classic EOF packet (0xFE, warnings, status)."""
    if len(payload) < 5:
        return 0
    return payload[3] | payload[4] << 8


def decode_tracked(
    tracked: list[tuple[int, bytes]],
) -> list[tuple[Track, str, str]]:
    """Session-state entries as (kind, name, value) text, for the session's own record."""
    out: list[tuple[Track, str, str]] = []
    for kind, data in tracked:
        if kind == Track.SYSTEM_VARIABLES:
            name, pos = read_lenenc_bytes(data, 0)
            value, _ = read_lenenc_bytes(data, pos)
            out.append((Track.SYSTEM_VARIABLES, _text(name), _text(value)))
        elif kind == Track.STATE_CHANGE:
            # MariaDB sends the flag bare ("1"); MySQL as a length-encoded string.
            raw = data[1:] if len(data) == 2 and data[0] == 1 else data
            out.append((Track.STATE_CHANGE, "", _text(raw)))
        elif kind in (Track.SCHEMA, Track.TRANSACTION_CHARACTERISTICS, Track.TRANSACTION_STATE):
            value, _ = read_lenenc_bytes(data, 0)
            out.append((Track(kind), "", _text(value)))
    return out


# --- handshakes -------------------------------------------------------------------------


@dataclass(slots=True)
class ServerHandshake:
    version: str
    connection_id: int
    capabilities: int
    collation: int
    status: int
    auth_data: bytes
    auth_plugin: str


def parse_server_handshake(payload: bytes) -> ServerHandshake:
    """HandshakeV10 from a backend, including MariaDB's extended capability bytes. A server
    that refuses the connection sends an ERR instead (1040, 1129): `ServerRefused`."""
    if payload[:1] == b"\xff":
        raise ServerRefused(parse_err(payload))
    if not payload or payload[0] != 10:
        raise PacketError("not a protocol 10 handshake")
    try:
        end = payload.index(b"\x00", 1)
        version = payload[1:end].decode("utf-8", "replace")
        pos = end + 1
        conn_id = _U32.unpack_from(payload, pos)[0]
        auth1 = payload[pos + 4 : pos + 12]
        pos += 13
        caps = _U16.unpack_from(payload, pos)[0]
        collation = payload[pos + 2]
        status = _U16.unpack_from(payload, pos + 3)[0]
        caps |= _U16.unpack_from(payload, pos + 5)[0] << 16
        auth_len = payload[pos + 7]
        # Six filler bytes, then four bytes of MariaDB extended capabilities.
        caps |= _U32.unpack_from(payload, pos + 14)[0] << 32
    except (ValueError, IndexError, struct.error):
        raise PacketError("truncated server handshake")
    pos += 18
    auth2 = b""
    if caps & Cap.SECURE_CONNECTION:
        n = max(13, auth_len - 8)
        auth2 = payload[pos : pos + n].rstrip(b"\x00")
        pos += n
    plugin = ""
    if caps & Cap.PLUGIN_AUTH:
        plugin = payload[pos:].split(b"\x00", 1)[0].decode("ascii", "replace")
    return ServerHandshake(version, conn_id, caps, collation, status, auth1 + auth2, plugin)


def make_server_handshake(
    version: str,
    connection_id: int,
    capabilities: int,
    collation: int,
    status: int,
    nonce: bytes,
    plugin: str = "mysql_native_password",
) -> bytes:
    """HandshakeV10 as Baton presents itself: the backend's version, the shared capabilities."""
    caps_low = capabilities & 0xFFFFFFFF
    return (
        b"\x0a"
        + version.encode()
        + b"\x00"
        + _U32.pack(connection_id)
        + nonce[:8]
        + b"\x00"
        + _U16.pack(caps_low & 0xFFFF)
        + bytes((collation & 0xFF,))
        + _U16.pack(status)
        + _U16.pack(caps_low >> 16)
        + bytes((len(nonce) + 1,))
        + b"\x00" * 6
        + _U32.pack(capabilities >> 32)
        + nonce[8:]
        + b"\x00"
        + plugin.encode()
        + b"\x00"
    )


def make_handshake_response(
    capabilities: int,
    collation: int,
    user: str,
    auth: bytes,
    database: str | None,
    attrs: dict[str, str] | None = None,
) -> bytes:
    """HandshakeResponse41 from Baton to a backend, with `auth` already computed for the
    server's nonce (mysql_native_password)."""
    caps = capabilities
    if database:
        caps |= Cap.CONNECT_WITH_DB
    else:
        caps &= ~Cap.CONNECT_WITH_DB
    if attrs:
        caps |= Cap.CONNECT_ATTRS
    else:
        caps &= ~Cap.CONNECT_ATTRS
    out = bytearray()
    out += _U32.pack(caps & 0xFFFFFFFF)
    out += _U32.pack(MAX_PAYLOAD)
    out.append(collation & 0xFF)
    out += b"\x00" * 19
    out += _U32.pack(caps >> 32)
    out += user.encode() + b"\x00"
    if caps & Cap.PLUGIN_AUTH_LENENC_CLIENT_DATA:
        out += lenenc_bytes(auth)
    else:
        out.append(len(auth))
        out += auth
    if database:
        out += database.encode() + b"\x00"
    if caps & Cap.PLUGIN_AUTH:
        out += b"mysql_native_password\x00"
    if attrs:
        blob = b"".join(
            lenenc_bytes(k.encode()) + lenenc_bytes(v.encode()) for k, v in attrs.items()
        )
        out += lenenc_bytes(blob)
    return bytes(out)


def make_ok(status: int, seq: int) -> bytes:
    """A bare OK packet (no rows, no insert id) with these status flags."""
    return frame(b"\x00\x00\x00" + _U16.pack(status) + b"\x00\x00", seq)


def make_auth_switch(plugin: str, data: bytes) -> bytes:
    """AuthSwitchRequest: log in again with `plugin`, given `data` (exactly: the password
    plugins' 20-byte nonce is sent with a NUL after it, client_ed25519's 32 without)."""
    return b"\xfe" + plugin.encode() + b"\x00" + data


def parse_auth_switch(payload: bytes) -> tuple[str, bytes]:
    """A server's AuthSwitchRequest: the plugin it wants and its data as sent (a nonce, with
    a NUL after it for the password plugins; client_ed25519's may end in a 0 byte of its own)."""
    end = payload.find(b"\x00", 1)
    if end < 0:
        raise PacketError("auth switch request without a plugin name")
    return payload[1:end].decode("ascii", "replace"), payload[end + 1 :]


def proxy_header(client: tuple[str, int], local: tuple[str, int]) -> bytes:
    """A PROXY protocol v1 line: the server sees the client's address instead of Baton's."""
    family = "TCP6" if ":" in client[0] else "TCP4"
    return f"PROXY {family} {client[0]} {local[0]} {client[1]} {local[1]}\r\n".encode()


def stmt_id(payload: bytes) -> int:
    """The statement id of a COM_STMT_* command (bytes 1-4)."""
    if len(payload) < 5:
        raise PacketError("truncated prepared-statement command")
    return _U32.unpack_from(payload, 1)[0]


def with_stmt_id(payload: bytes, new_id: int) -> bytes:
    """The same COM_STMT_* command or PREPARE_OK, naming another statement id."""
    return payload[:1] + _U32.pack(new_id) + payload[5:]


def decode_text_row(payload: bytes, columns: int) -> list[bytes | None]:
    """One text-protocol row, for the few results Baton asks for itself (never on relay)."""
    out: list[bytes | None] = []
    pos = 0
    for _ in range(columns):
        if payload[pos] == 0xFB:
            out.append(None)
            pos += 1
        else:
            value, pos = read_lenenc_bytes(payload, pos)
            out.append(value)
    return out
