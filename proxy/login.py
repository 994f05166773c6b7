"""A client's login to Baton: the greeting, its answer, an auth switch if needed, and the check.

Baton checks the client's `mysql_native_password` answer against the hash the server keeps for
that account (proxy/auth.py), which yields the SHA1 of the password: enough to log in to the
servers as the client. A `caching_sha2_password` client proves the same through Baton's cache
of its last full login, or sends its password (under TLS, or RSA-encrypted over plain text);
`mysql_clear_password` is taken under TLS only. An `ed25519` account's signature answers one
nonce only, so its login is passed through to the primary, and that session cannot move.

Every packet is read with a size bound (`MAX_LOGIN_PACKET`, the header is checked before
the body is read) and under the caller's timeout, and parsed by Baton's own
bounded codec (proxy/client_packets.py) before anything acts on it. A refusal is a
`LoginRefused` that carries the error packet the client gets (the server's own code and wording)
and a reason for the metrics; the caller sends it and closes the connection.
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar

from proxy.accounts import Accounts
from proxy.admission import LoginFailure
from proxy.auth import (
    CLEAR_PLUGIN,
    ED25519_CLIENT_PLUGIN,
    NATIVE_PLUGIN,
    SHA2_PLUGIN,
    Account,
    nonce,
    password_stage1,
    recover_stage1,
)
from proxy.backend import BackendConnection, BackendError, BackendLogin, Relay
from proxy.client_packets import (
    MAX_LOGIN_PACKET,
    SCRAMBLE_LENGTH,
    SHA2_SCRAMBLE_LENGTH,
    ClientPacketError,
    EncryptedPassword,
    HandshakeResponse,
    PublicKeyRequest,
    SslRequest,
    parse_auth_switch_response,
    parse_clear_password,
    parse_ed25519_signature,
    parse_login,
    parse_sha2_full,
    parse_sha2_scramble,
)
from proxy.errors import ErrorKind
from proxy.packets import frame, make_auth_switch, make_err
from proxy.rsa_key import RsaKey

T = TypeVar("T")

# caching_sha2_password's one-byte verdicts after its fast answer (sent as AuthMoreData, 0x01).
FAST_AUTH_SUCCESS = b"\x01\x03"
PERFORM_FULL_AUTHENTICATION = b"\x01\x04"

# Opens the session's first server connection during the login, as `login`, with `relay`
# answering the server's challenge through the client (ed25519).
OpenBackend = Callable[[BackendLogin, Relay], Awaitable[BackendConnection]]


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


class LoginMethod(enum.StrEnum):
    """How a client proved who it is; a metrics label."""

    NATIVE = "mysql_native_password"
    SHA2_FAST = "caching_sha2_fast"  # against Baton's cached verifier
    SHA2_FULL = "caching_sha2_full"  # the password itself, under TLS or RSA-encrypted
    CLEAR = "mysql_clear_password"  # under TLS only
    ED25519 = "ed25519"  # passed through to the primary


@dataclass(frozen=True)
class Verified:
    """A client that proved it knows the password of `account`."""

    account: Account
    login: BackendLogin
    seq: int  # the sequence id of Baton's reply (OK or ERR) to the last client packet
    method: LoginMethod
    # The server connection made during the login (ed25519): the session's first.
    backend: BackendConnection | None = None


@dataclass(frozen=True)
class LoginSettings:
    secure: bool  # the client's connection is under TLS
    address: str  # the client's IP, as accounts' host patterns match it
    allow_unfenced: bool
    plugin: str = NATIVE_PLUGIN  # what Baton's greeting names and its auth switch asks for


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
    rsa: RsaKey,
    open_backend: OpenBackend,
) -> Verified:
    """Check a client's login as `user`, which answered `greeting_nonce` (None for
    COM_CHANGE_USER, which is always switched) with `plugin` and `response`, in the client
    packet of sequence id `seq`.

    An ed25519 account logs in to the primary through the client (its one signature answers
    the server's own nonce). Every other account Baton can log in itself, and its client may
    use mysql_native_password, caching_sha2_password, or over TLS mysql_clear_password; one
    that offered something else is switched to `settings.plugin`."""
    if not accounts.book.candidates(user, settings.address):
        await accounts.reload("unknown user")
    candidates = accounts.book.candidates(user, settings.address)
    if candidates and candidates[0].ed25519:
        return await _ed25519(io, accounts, settings, user, candidates[0], seq, open_backend)
    if plugin == CLEAR_PLUGIN and settings.secure:
        password = _parsed(parse_clear_password, response, seq)
        return await _with_password(
            accounts, settings, user, password.password, seq, LoginMethod.CLEAR
        )
    if plugin == CLEAR_PLUGIN and response:
        # The server would switch this client to the account's plugin and let it in; Baton
        # says instead that its password just crossed the network in clear.
        raise _cleartext(user, settings, seq + 1)
    fits = greeting_nonce is not None and (
        (plugin in ("", NATIVE_PLUGIN) and len(response) in (0, SCRAMBLE_LENGTH))
        or (plugin == SHA2_PLUGIN and len(response) in (0, SHA2_SCRAMBLE_LENGTH))
    )
    our_nonce = greeting_nonce
    if not fits:
        plugin = SHA2_PLUGIN if plugin == SHA2_PLUGIN else settings.plugin
        our_nonce = nonce()
        io.write(frame(make_auth_switch(plugin, our_nonce + b"\x00"), seq + 1))
        seq, payload = await _read(io, seq + 2)
        response = _parsed(parse_auth_switch_response, payload, seq)
    assert our_nonce is not None
    if plugin == SHA2_PLUGIN and response:
        return await _sha2(io, accounts, settings, user, response, our_nonce, seq, rsa)
    account, h1 = await _check(
        accounts, settings, user, lambda a: recover_stage1(response, our_nonce, a.h2), response, seq
    )
    return _admitted(account, BackendLogin(user, h1), settings, seq + 1, LoginMethod.NATIVE)


async def _sha2(
    io: PacketIO,
    accounts: Accounts,
    settings: LoginSettings,
    user: str,
    response: bytes,
    our_nonce: bytes,
    seq: int,
    rsa: RsaKey,
) -> Verified:
    """caching_sha2_password: the fast answer against Baton's cache, else the password itself,
    over TLS as it is, over plain text encrypted with Baton's RSA key (sent on request)."""
    response = _parsed(parse_sha2_scramble, response, seq)
    for account in accounts.book.candidates(user, settings.address):
        h1 = accounts.sha2.check(account, response, our_nonce)
        if h1 is not None:
            io.write(frame(FAST_AUTH_SUCCESS, seq + 1))
            return _admitted(
                account, BackendLogin(user, h1), settings, seq + 2, LoginMethod.SHA2_FAST
            )
    io.write(frame(PERFORM_FULL_AUTHENTICATION, seq + 1))
    seq, payload = await _read(io, seq + 2)
    sent = _parsed(lambda p: parse_sha2_full(p, settings.secure, rsa.size), payload, seq)
    if isinstance(sent, PublicKeyRequest):
        io.write(frame(b"\x01" + rsa.public_pem, seq + 1))
        seq, payload = await _read(io, seq + 2)
        sent = _parsed(lambda p: parse_sha2_full(p, False, rsa.size), payload, seq)
    if isinstance(sent, PublicKeyRequest):
        raise bad_handshake(seq + 1, "caching_sha2_password: the public key asked for twice")
    if isinstance(sent, EncryptedPassword):
        password = rsa.unwrap(sent.ciphertext, our_nonce)
        if password is None:
            raise _denied(
                LoginFailure.ACCESS_DENIED,
                seq + 1,
                f"Access denied for user '{user}'@'{settings.address}': the encrypted password "
                "does not decrypt with Baton's RSA key (a client pinned to another key?)",
            )
    elif not settings.secure:
        raise _cleartext(user, settings, seq + 1)
    else:
        password = sent.password
    verified = await _with_password(accounts, settings, user, password, seq, LoginMethod.SHA2_FULL)
    accounts.sha2.put(verified.account, password, verified.login.h1 or b"")
    return verified


async def _with_password(
    accounts: Accounts,
    settings: LoginSettings,
    user: str,
    password: bytes,
    seq: int,
    method: LoginMethod,
) -> Verified:
    """A password the client sent: it must be the account's (SHA1(SHA1(password)) == H2)."""
    account, h1 = await _check(
        accounts, settings, user, lambda a: password_stage1(password, a.h2), password, seq
    )
    return _admitted(account, BackendLogin(user, h1), settings, seq + 1, method)


async def _ed25519(
    io: PacketIO,
    accounts: Accounts,
    settings: LoginSettings,
    user: str,
    account: Account,
    seq: int,
    open_backend: OpenBackend,
) -> Verified:
    """An ed25519 account: its signature cannot be turned into another login, so the
    session's server connection is made now, with the server's own nonce passed to the
    client and its signature back; the server decides, and its refusal is the client's.

    Baton does not refuse a signature itself (it could check it against the account's
    public key): that would abort the server's handshake half-way, and aborted handshakes
    count toward the server's max_connect_errors against Baton's own address (MaxScale hit
    this: its bug 626). A wrong password costs one server round trip instead, and is
    counted against the client's address by Baton as any other. Such a session cannot move
    to another server."""
    _admitted(account, BackendLogin(user, None), settings, seq + 1, LoginMethod.ED25519)
    last = seq  # the sequence id of the client's latest packet

    async def relay(plugin: str, data: bytes) -> bytes:
        nonlocal last
        if plugin != ED25519_CLIENT_PLUGIN:
            raise _plugin_refused(account, last + 1)
        io.write(frame(make_auth_switch(plugin, data), last + 1))
        last, payload = await _read(io, last + 2)
        return _parsed(parse_ed25519_signature, payload, last)

    login = BackendLogin(user, None)
    try:
        backend = await open_backend(login, relay)
    except BackendError as e:
        err = e.err
        if err is None:
            raise LoginRefused(
                LoginFailure.BACKEND_UNREACHABLE,
                frame(
                    ErrorKind.BACKEND_UNREACHABLE.packet(
                        f"Baton cannot reach the primary to log in {account.name}, an ed25519 "
                        f"account, which only the server's own challenge can log in: {e}"
                    ),
                    last + 1,
                ),
                str(e),
            )
        reason = LoginFailure.ACCESS_DENIED if err.code == 1045 else LoginFailure.SERVER_REFUSED
        raise LoginRefused(
            reason, frame(make_err(err.code, err.sqlstate, err.message), last + 1), str(e)
        )
    return Verified(account, login, last + 1, LoginMethod.ED25519, backend)


def _admitted(
    account: Account, login: BackendLogin, settings: LoginSettings, seq: int, method: LoginMethod
) -> Verified:
    """The login of an account that read_only does not fence is refused unless allowed."""
    if account.unfenced and not settings.allow_unfenced:
        raise _denied(
            LoginFailure.UNFENCED_USER,
            seq,
            f"Access denied for user '{account.user}'@'{settings.address}': the account holds "
            f"{' and '.join(sorted(account.unfenced))}, which read_only does not stop, so it "
            "could write on a demoted primary; Baton refuses it (set "
            "proxy.allow_unfenced_users to let it in)",
        )
    return Verified(account, login, seq, method)


def _parsed(parse: Callable[[bytes], T], payload: bytes, seq: int) -> T:
    """A client packet through its codec; a malformed one ends the login."""
    try:
        return parse(payload)
    except ClientPacketError as e:
        raise bad_handshake(seq + 1, str(e))


async def _check(
    accounts: Accounts,
    settings: LoginSettings,
    user: str,
    match: Callable[[Account], bytes | None],
    response: bytes,
    seq: int,
) -> tuple[Account, bytes]:
    """The account `match` finds the client's proof fits (it returns that account's H1); the
    accounts are read again once if none does (a user created or re-passworded since the
    last read). `response` (the client's answer or password) says whether one was given."""
    for attempt in range(2):
        candidates = accounts.book.candidates(user, settings.address)
        for account in candidates:
            if account.h2 is None:
                continue
            h1 = match(account)
            if h1 is not None:
                return account, h1
        if attempt > 0 or (not candidates and accounts.just_read()):
            break
        if await accounts.reload("unknown user" if not candidates else "password mismatch"):
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
        raise _plugin_refused(first, seq + 1)
    raise _denied(
        LoginFailure.ACCESS_DENIED,
        seq + 1,
        f"Access denied for user '{user}'@'{settings.address}' (using password: {password})",
    )


def _plugin_refused(account: Account, seq: int) -> LoginRefused:
    return LoginRefused(
        LoginFailure.UNSUPPORTED_PLUGIN,
        frame(
            ErrorKind.AUTH_PLUGIN.packet(
                f"The account {account.name} uses the {account.plugin} authentication plugin; "
                "Baton logs in mysql_native_password accounts (with the client plugins "
                "mysql_native_password, caching_sha2_password, and mysql_clear_password over "
                "TLS) and ed25519 accounts (client_ed25519)"
            ),
            seq,
        ),
        f"account {account.name} uses {account.plugin}",
    )


def _cleartext(user: str, settings: LoginSettings, seq: int) -> LoginRefused:
    return _denied(
        LoginFailure.CLEARTEXT_WITHOUT_TLS,
        seq,
        f"Access denied for user '{user}'@'{settings.address}': the client sent its password "
        "in clear over a connection without TLS; connect with TLS, or (caching_sha2_password) "
        "let the client ask for Baton's RSA public key",
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
