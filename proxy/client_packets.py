"""The packets a client sends that Baton itself must read, parsed bounded and total.

Everything here takes untrusted bytes: every input ends in a value or a `ClientPacketError`
naming what was wrong, never in a loop, an exception of another kind or a read past the end.
Strings are checked where the server checks them (user and schema names must be valid UTF-8),
lengths are checked against what is left of the packet, and nothing is allocated beyond the
packet itself. The login (HandshakeResponse41, the SSL request, an auth-switch response) and
COM_CHANGE_USER are read here; so are the headers of the prepared-statement commands, whose
statement ids Baton maps. Everything else a client sends is relayed as bytes and judged by the
server.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field

from proxy.packets import Cap, Command

_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")

# The server reads a login in a few KiB; a client that sends more is not logging in.
MAX_LOGIN_PACKET = 16 * 1024
# MySQL's own bound on the connection attributes of one login.
MAX_CONNECT_ATTRS = 65535
MAX_NAME = 512  # bytes of a user, schema or plugin name (the server's are far shorter)
SCRAMBLE_LENGTH = 20  # mysql_native_password's answer

# Capabilities that change how the client frames or encodes what follows: a client that sets
# one Baton did not offer would speak a protocol Baton does not read.
FRAMING_CAPS = Cap.COMPRESS | Cap.SSL | Cap.ZSTD_COMPRESSION | Cap.QUERY_ATTRIBUTES
_CAP_NAMES = {
    Cap.COMPRESS: "compression (CLIENT_COMPRESS)",
    Cap.SSL: "TLS (CLIENT_SSL)",
    Cap.ZSTD_COMPRESSION: "zstd compression (CLIENT_ZSTD_COMPRESSION_ALGORITHM)",
    Cap.QUERY_ATTRIBUTES: "query attributes (CLIENT_QUERY_ATTRIBUTES)",
}
# What to turn off, where "connect without it" is not enough to go on.
_CAP_HINTS = {
    Cap.ZSTD_COMPRESSION: (
        "MariaDB does not speak zstd either: connect with zlib compression "
        "(--compression-algorithms=zlib, compress=True) or without compression"
    ),
    Cap.COMPRESS: (
        "connect without compression, or have the operator set proxy.compression = true"
    ),
}


class Malformed(enum.StrEnum):
    """What was wrong with a client packet; a metrics label and a log word."""

    TRUNCATED = "truncated"
    NO_TERMINATOR = "no_terminator"
    BAD_LENGTH = "bad_length"
    TOO_LONG = "too_long"
    NOT_UTF8 = "not_utf8"
    OLD_PROTOCOL = "old_protocol"
    UNOFFERED_CAPABILITY = "unoffered_capability"
    TRAILING = "trailing"
    # The compressed protocol's (proxy/compression.py).
    OUT_OF_ORDER = "out_of_order"
    BAD_ZLIB = "bad_zlib"
    LENGTH_LIE = "length_lie"


class ClientPacketError(Exception):
    """A client packet Baton will not act on; the message says what was wrong with it."""

    def __init__(self, kind: Malformed, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class _Reader:
    """A cursor over one payload: every read checks what is left first."""

    __slots__ = ("data", "pos", "what")

    def __init__(self, data: bytes, pos: int, what: str) -> None:
        self.data = data
        self.pos = pos
        self.what = what

    @property
    def left(self) -> int:
        return len(self.data) - self.pos

    def take(self, n: int, field_name: str) -> bytes:
        if n < 0 or n > self.left:
            raise ClientPacketError(
                Malformed.TRUNCATED,
                f"{self.what}: {field_name} needs {n} bytes, {max(self.left, 0)} left",
            )
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def byte(self, field_name: str) -> int:
        return self.take(1, field_name)[0]

    def u16(self, field_name: str) -> int:
        return _U16.unpack(self.take(2, field_name))[0]

    def u32(self, field_name: str) -> int:
        return _U32.unpack(self.take(4, field_name))[0]

    def null_terminated(self, field_name: str, limit: int = MAX_NAME) -> bytes:
        end = self.data.find(b"\x00", self.pos, self.pos + limit + 1)
        if end < 0:
            if self.data.find(b"\x00", self.pos) < 0:
                raise ClientPacketError(
                    Malformed.NO_TERMINATOR, f"{self.what}: {field_name} has no NUL terminator"
                )
            raise ClientPacketError(
                Malformed.TOO_LONG, f"{self.what}: {field_name} is longer than {limit} bytes"
            )
        out = self.data[self.pos : end]
        self.pos = end + 1
        return out

    def lenenc_int(self, field_name: str) -> int:
        first = self.byte(field_name)
        if first < 0xFB:
            return first
        if first == 0xFC:
            return self.u16(field_name)
        if first == 0xFD:
            return int.from_bytes(self.take(3, field_name), "little")
        if first == 0xFE:
            return int.from_bytes(self.take(8, field_name), "little")
        raise ClientPacketError(
            Malformed.BAD_LENGTH, f"{self.what}: {field_name} has a bad length prefix"
        )

    def lenenc_bytes(self, field_name: str) -> bytes:
        return self.take(self.lenenc_int(field_name), field_name)

    def rest(self) -> bytes:
        out = self.data[self.pos :]
        self.pos = len(self.data)
        return out


def _text(raw: bytes, what: str, field_name: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ClientPacketError(Malformed.NOT_UTF8, f"{what}: {field_name} is not valid UTF-8")


def _connect_attrs(r: _Reader) -> dict[str, str]:
    total = r.lenenc_int("connection attributes length")
    if total > MAX_CONNECT_ATTRS:
        raise ClientPacketError(
            Malformed.TOO_LONG, f"{r.what}: connection attributes of {total} bytes"
        )
    block = _Reader(r.take(total, "connection attributes"), 0, r.what)
    attrs: dict[str, str] = {}
    while block.left:
        key = block.lenenc_bytes("attribute name")
        value = block.lenenc_bytes("attribute value")
        attrs[key.decode("utf-8", "replace")] = value.decode("utf-8", "replace")
    return attrs


def _plugin_name(r: _Reader) -> str:
    """The client's auth plugin: NUL-terminated, though a last field may end with the packet
    (older clients send it so), and an absent one means the default."""
    if not r.left:
        return ""
    if r.data.find(b"\x00", r.pos) < 0:
        raw = r.rest()
        if len(raw) > MAX_NAME:
            raise ClientPacketError(Malformed.TOO_LONG, f"{r.what}: auth plugin name too long")
    else:
        raw = r.null_terminated("auth plugin name")
    return raw.decode("ascii", "replace")


@dataclass(frozen=True, slots=True)
class SslRequest:
    """The short login packet a client sends before starting TLS."""

    capabilities: int
    collation: int


@dataclass(frozen=True, slots=True)
class HandshakeResponse:
    """HandshakeResponse41, with MariaDB's extended capabilities in the upper 32 bits."""

    capabilities: int
    max_packet: int
    collation: int
    user: str
    auth_response: bytes
    database: str | None
    auth_plugin: str
    attrs: dict[str, str] = field(default_factory=dict)


def parse_login(payload: bytes, offered: int) -> HandshakeResponse | SslRequest:
    """The client's answer to Baton's greeting; `offered` is what the greeting offered."""
    what = "handshake response"
    if len(payload) > MAX_LOGIN_PACKET:
        raise ClientPacketError(
            Malformed.TOO_LONG, f"{what}: {len(payload)} bytes, more than {MAX_LOGIN_PACKET}"
        )
    r = _Reader(payload, 0, what)
    caps = r.u32("capabilities")
    if not caps & Cap.PROTOCOL_41:
        raise ClientPacketError(
            Malformed.OLD_PROTOCOL, f"{what}: pre-4.1 clients are not supported"
        )
    max_packet = r.u32("max packet size")
    collation = r.byte("character set")
    filler = r.take(23, "reserved bytes")
    if not caps & Cap.LONG_PASSWORD:
        # MariaDB's extended capabilities, read only from clients that clear CLIENT_MYSQL.
        caps |= _U32.unpack_from(filler, 19)[0] << 32
    unoffered = caps & FRAMING_CAPS & ~offered
    if caps & Cap.SSL and not r.left:
        if unoffered:
            raise _unoffered(what, unoffered)
        return SslRequest(caps, collation)
    if unoffered:
        raise _unoffered(what, unoffered)
    user = _text(r.null_terminated("user name"), what, "user name")
    if caps & Cap.PLUGIN_AUTH_LENENC_CLIENT_DATA:
        auth = r.lenenc_bytes("auth response")
    elif caps & Cap.SECURE_CONNECTION:
        auth = r.take(r.byte("auth response length"), "auth response")
    else:
        auth = r.null_terminated("auth response")
    if len(auth) > MAX_NAME:
        raise ClientPacketError(Malformed.TOO_LONG, f"{what}: auth response too long")
    database = None
    if caps & Cap.CONNECT_WITH_DB:
        database = _text(r.null_terminated("database"), what, "database") or None
    plugin = ""
    if caps & Cap.PLUGIN_AUTH:
        if caps & Cap.CONNECT_ATTRS and r.left:
            plugin = r.null_terminated("auth plugin name").decode("ascii", "replace")
        else:
            plugin = _plugin_name(r)
    attrs: dict[str, str] = {}
    if caps & Cap.CONNECT_ATTRS and r.left:
        attrs = _connect_attrs(r)
    if r.left:
        raise ClientPacketError(Malformed.TRAILING, f"{what}: {r.left} unexpected bytes")
    return HandshakeResponse(caps, max_packet, collation, user, auth, database, plugin, attrs)


def _unoffered(what: str, caps: int) -> ClientPacketError:
    names = [name for cap, name in _CAP_NAMES.items() if caps & cap]
    hints = [hint for cap, hint in _CAP_HINTS.items() if caps & cap]
    return ClientPacketError(
        Malformed.UNOFFERED_CAPABILITY,
        f"{what}: the client asks for {', '.join(names)}, which Baton did not offer; "
        + ("; ".join(hints) if hints else "connect without it"),
    )


@dataclass(frozen=True, slots=True)
class ChangeUser:
    """COM_CHANGE_USER: a new login inside the session."""

    user: str
    auth_response: bytes
    database: str | None
    collation: int | None
    auth_plugin: str
    attrs: dict[str, str] = field(default_factory=dict)


def parse_change_user(payload: bytes, capabilities: int) -> ChangeUser:
    """COM_CHANGE_USER (the command byte included), read as the session's capabilities say."""
    what = "COM_CHANGE_USER"
    r = _Reader(payload, 1, what)
    if payload[:1] != bytes((Command.CHANGE_USER,)):
        raise ClientPacketError(Malformed.TRUNCATED, f"{what}: not a COM_CHANGE_USER")
    user = _text(r.null_terminated("user name"), what, "user name")
    if capabilities & Cap.SECURE_CONNECTION:
        auth = r.take(r.byte("auth response length"), "auth response")
    else:
        auth = r.null_terminated("auth response")
    database = _text(r.null_terminated("database"), what, "database") or None
    collation = None
    plugin = ""
    attrs: dict[str, str] = {}
    if r.left:
        collation = r.u16("character set") & 0xFF
        if capabilities & Cap.PLUGIN_AUTH:
            if capabilities & Cap.CONNECT_ATTRS and r.left:
                plugin = r.null_terminated("auth plugin name").decode("ascii", "replace")
            else:
                plugin = _plugin_name(r)
        if capabilities & Cap.CONNECT_ATTRS and r.left:
            attrs = _connect_attrs(r)
    if r.left:
        raise ClientPacketError(Malformed.TRAILING, f"{what}: {r.left} unexpected bytes")
    return ChangeUser(user, auth, database, collation, plugin, attrs)


def parse_auth_switch_response(payload: bytes) -> bytes:
    """The client's answer to an auth-switch request: the scramble, nothing else."""
    if len(payload) > MAX_NAME:
        raise ClientPacketError(Malformed.TOO_LONG, "auth switch response too long")
    return payload


# The packets of the other login plugins: each has one shape, and anything else is refused
# here, before a hash, a key or a server sees it.

SHA2_SCRAMBLE_LENGTH = 32
ED25519_SIGNATURE_LENGTH = 64
REQUEST_PUBLIC_KEY = b"\x02"  # caching_sha2_password: "send me your RSA public key"


def parse_sha2_scramble(payload: bytes) -> bytes:
    """caching_sha2_password's fast answer: 32 bytes, or none for an empty password."""
    if len(payload) not in (0, SHA2_SCRAMBLE_LENGTH):
        raise ClientPacketError(
            Malformed.BAD_LENGTH,
            f"caching_sha2_password answer of {len(payload)} bytes, not {SHA2_SCRAMBLE_LENGTH}",
        )
    return payload


@dataclass(frozen=True, slots=True)
class PublicKeyRequest:
    """caching_sha2_password over plain text: the client wants Baton's RSA key."""


@dataclass(frozen=True, slots=True)
class ClearPassword:
    """A password as the client typed it (NUL removed)."""

    password: bytes


@dataclass(frozen=True, slots=True)
class EncryptedPassword:
    """RSA-OAEP(password + NUL XOR nonce) with Baton's public key."""

    ciphertext: bytes


def parse_clear_password(payload: bytes, what: str = "mysql_clear_password") -> ClearPassword:
    """A password sent as it is: its bytes and one NUL at the end, none inside."""
    if len(payload) > MAX_NAME:
        raise ClientPacketError(Malformed.TOO_LONG, f"{what}: password too long")
    if not payload.endswith(b"\x00"):
        raise ClientPacketError(Malformed.NO_TERMINATOR, f"{what}: password without its NUL")
    if b"\x00" in payload[:-1]:
        raise ClientPacketError(Malformed.TRAILING, f"{what}: bytes after the password's NUL")
    return ClearPassword(payload[:-1])


def parse_sha2_full(
    payload: bytes, secure: bool, cipher_size: int
) -> PublicKeyRequest | ClearPassword | EncryptedPassword:
    """What a caching_sha2_password client sends when told to log in in full: over TLS its
    password; over plain text a request for Baton's key, then the password encrypted with it
    (exactly one RSA block). A password sent in clear over plain text is read as such (the
    caller refuses it: it already crossed the network unprotected)."""
    what = "caching_sha2_password"
    if len(payload) > MAX_NAME:
        raise ClientPacketError(Malformed.TOO_LONG, f"{what}: {len(payload)} bytes")
    if payload == REQUEST_PUBLIC_KEY and not secure:
        return PublicKeyRequest()
    if not secure and len(payload) == cipher_size:
        return EncryptedPassword(payload)
    return parse_clear_password(payload, what)


def parse_ed25519_signature(payload: bytes) -> bytes:
    """client_ed25519's answer: the 64-byte signature of the server's nonce."""
    if len(payload) != ED25519_SIGNATURE_LENGTH:
        raise ClientPacketError(
            Malformed.BAD_LENGTH,
            f"client_ed25519 answer of {len(payload)} bytes, not {ED25519_SIGNATURE_LENGTH}",
        )
    return payload


# Bytes each prepared-statement command needs after its command byte for Baton to map it:
# the statement id, and for EXECUTE its flags and iteration count, for FETCH the row count,
# for SEND_LONG_DATA the parameter number.
STMT_HEADER = {
    Command.STMT_EXECUTE: 9,
    Command.STMT_FETCH: 8,
    Command.STMT_SEND_LONG_DATA: 6,
    Command.STMT_CLOSE: 4,
    Command.STMT_RESET: 4,
}


def check_stmt_header(payload: bytes) -> int:
    """The statement id of a COM_STMT_* command whose fixed header is whole."""
    need = STMT_HEADER[Command(payload[0])]
    if len(payload) - 1 < need:
        name = Command(payload[0]).name
        raise ClientPacketError(
            Malformed.TRUNCATED,
            f"COM_{name}: {len(payload) - 1} bytes after the command, at least {need} needed",
        )
    return _U32.unpack_from(payload, 1)[0]
