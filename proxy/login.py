"""A client's login to Baton: the greeting, its answer, an auth switch if needed, and the check.

Baton checks the client's `mysql_native_password` answer against the hash the server keeps for
that account (proxy/auth.py), which yields the SHA1 of the password: enough to log in to the
servers as the client. Every packet is read with a size bound (`MAX_LOGIN_PACKET`, the header
is checked before the body is read) and under the caller's timeout, and parsed by Baton's own
bounded codec (proxy/client_packets.py) before anything acts on it. A refusal is a
`LoginRefused` that carries the error packet the client gets (the server's own code and wording)
and a reason for the metrics; the caller sends it and closes the connection.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from proxy.accounts import Accounts
from proxy.admission import LoginFailure
from proxy.auth import NATIVE_PLUGIN, Account, nonce, recover_stage1
from proxy.backend import BackendLogin
from proxy.client_packets import (
    MAX_LOGIN_PACKET,
    SCRAMBLE_LENGTH,
    ClientPacketError,
    HandshakeResponse,
    SslRequest,
    parse_auth_switch_response,
    parse_login,
)
from proxy.errors import ErrorKind
from proxy.packets import frame, make_auth_switch


class PacketIO(Protocol):
    """The client connection as the login sees it."""

    async def read_packet(self, limit: int) -> tuple[int, bytes]: ...

    def write(self, data: bytes) -> None: ...

    async def start_tls(self) -> None: ...


class LoginRefused(Exception):
    """The login ends here; `packet` (framed) is what the client is told, if anything."""

    def __init__(self, reason: LoginFailure, packet: bytes | None, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.packet = packet


@dataclass(frozen=True)
class Verified:
    """A client that proved it knows the password of `account`."""

    account: Account
    login: BackendLogin
    seq: int  # the sequence id of Baton's reply (OK or ERR) to the last client packet


@dataclass(frozen=True)
class LoginSettings:
    secure: bool  # the client's connection is under TLS
    offered: int  # capabilities in Baton's greeting
    address: str  # the client's IP, as accounts' host patterns match it
    allow_unfenced: bool


def bad_handshake(seq: int, detail: str) -> LoginRefused:
    packet = frame(ErrorKind.BAD_HANDSHAKE.packet(f"Bad handshake: {detail}"), seq)
    return LoginRefused(LoginFailure.BAD_HANDSHAKE, packet, detail)


async def read_handshake(
    io: PacketIO, offered: int, require_secure: bool = False
) -> tuple[int, HandshakeResponse]:
    """The client's answer to the greeting, checked, and its sequence id (1, or 2 after an SSL
    request: parse_login accepts one only when the greeting offered CLIENT_SSL, and the
    connection turns to TLS and the answer is read over it). With `require_secure`, a login
    not over TLS is refused as the server refuses it under require_secure_transport."""
    seq, payload = await _read(io, 1)
    response = _parse(payload, offered, seq)
    if isinstance(response, SslRequest):
        await io.start_tls()
        seq, payload = await _read(io, seq + 1)
        response = _parse(payload, offered, seq)
        if isinstance(response, SslRequest):
            raise bad_handshake(seq + 1, "a second SSL request, over TLS")
    elif require_secure:
        raise LoginRefused(
            LoginFailure.INSECURE_TRANSPORT,
            frame(ErrorKind.SECURE_TRANSPORT_REQUIRED.packet(INSECURE_MESSAGE), seq + 1),
            "a login without TLS, and tls.require is set",
        )
    return seq, response


# The server's words for a plain login under require_secure_transport.
INSECURE_MESSAGE = (
    "Connections using insecure transport are prohibited while --require_secure_transport=ON."
)


def _parse(payload: bytes, offered: int, seq: int) -> HandshakeResponse | SslRequest:
    try:
        return parse_login(payload, offered)
    except ClientPacketError as e:
        raise bad_handshake(seq + 1, str(e))


async def verify(
    io: PacketIO,
    accounts: Accounts,
    settings: LoginSettings,
    user: str,
    plugin: str,
    response: bytes,
    greeting_nonce: bytes | None,
    seq: int,
) -> Verified:
    """Check a client's answer for `user`: its answer to `greeting_nonce` if it used
    mysql_native_password, else (or with no nonce, as for COM_CHANGE_USER) after an auth
    switch to it. `seq` is the sequence id of the client packet that carried `response`."""
    our_nonce = greeting_nonce
    if (
        greeting_nonce is None
        or plugin not in ("", NATIVE_PLUGIN)
        or len(response)
        not in (
            0,
            SCRAMBLE_LENGTH,
        )
    ):
        our_nonce = nonce()
        io.write(frame(make_auth_switch(NATIVE_PLUGIN, our_nonce), seq + 1))
        seq, payload = await _read(io, seq + 2)
        try:
            response = parse_auth_switch_response(payload)
        except ClientPacketError as e:
            raise bad_handshake(seq + 1, str(e))
    assert our_nonce is not None
    account, h1 = await _check(accounts, settings, user, response, our_nonce, seq)
    if account.unfenced and not settings.allow_unfenced:
        raise _denied(
            LoginFailure.UNFENCED_USER,
            seq + 1,
            f"Access denied for user '{user}'@'{settings.address}': the account holds "
            f"{' and '.join(sorted(account.unfenced))}, which read_only does not stop, so it "
            "could write on a demoted primary; Baton refuses it (set "
            "proxy.allow_unfenced_users to let it in)",
        )
    return Verified(account, BackendLogin(user, h1), seq + 1)


async def _check(
    accounts: Accounts,
    settings: LoginSettings,
    user: str,
    response: bytes,
    our_nonce: bytes,
    seq: int,
) -> tuple[Account, bytes]:
    """The account whose hash fits the answer; the accounts are read again once if none
    does (a user created or re-passworded since the last read)."""
    for attempt in range(2):
        candidates = accounts.book.candidates(user, settings.address)
        for account in candidates:
            if account.h2 is None:
                continue
            h1 = recover_stage1(response, our_nonce, account.h2)
            if h1 is not None:
                return account, h1
        if attempt == 0 and await accounts.reload(
            "unknown user" if not candidates else "password mismatch"
        ):
            continue
        break
    password = "YES" if response else "NO"
    if not candidates:
        raise _denied(
            LoginFailure.UNKNOWN_USER,
            seq + 1,
            f"Access denied for user '{user}'@'{settings.address}' (using password: {password})",
        )
    first = candidates[0]
    if first.h2 is None:
        raise LoginRefused(
            LoginFailure.UNSUPPORTED_PLUGIN,
            frame(
                ErrorKind.AUTH_PLUGIN.packet(
                    f"The account {first.name} uses the {first.plugin} authentication "
                    "plugin; Baton logs clients in with mysql_native_password only"
                ),
                seq + 1,
            ),
            f"account {first.name} uses {first.plugin}",
        )
    raise _denied(
        LoginFailure.ACCESS_DENIED,
        seq + 1,
        f"Access denied for user '{user}'@'{settings.address}' (using password: {password})",
    )


def _denied(reason: LoginFailure, seq: int, message: str) -> LoginRefused:
    return LoginRefused(reason, frame(ErrorKind.ACCESS_DENIED.packet(message), seq), message)


async def _read(io: PacketIO, expected_seq: int) -> tuple[int, bytes]:
    try:
        seq, payload = await io.read_packet(MAX_LOGIN_PACKET)
    except ClientPacketError as e:
        raise bad_handshake(expected_seq + 1, str(e))
    if seq != expected_seq:
        raise bad_handshake(
            seq + 1, f"packet with sequence id {seq} where {expected_seq} was expected"
        )
    return seq, payload
