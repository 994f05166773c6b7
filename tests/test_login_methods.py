"""The login plugins of today's clients, without sockets: caching_sha2_password's verifier
cache and RSA exchange (checked with PyMySQL's own client functions, not with Baton's), the
codec of their packets (truncations and lies), and the login's exchanges packet by packet,
including the TLS branches (mysql_clear_password, caching_sha2's clear full path)."""

from __future__ import annotations

import asyncio
import hashlib
from collections import deque
from collections.abc import Callable

import pytest
from pymysql._auth import scramble_caching_sha2, scramble_native_password, sha2_rsa_encrypt

from proxy.accounts import Accounts, book_from_rows
from proxy.admission import LoginFailure
from proxy.auth import (
    ED25519_PLUGIN,
    NATIVE_PLUGIN,
    SHA2_PLUGIN,
    Account,
    AccountBook,
    Sha2Cache,
    native_hash,
    nonce,
    password_stage1,
)
from proxy.backend import BackendError, BackendLogin, Relay
from proxy.client_packets import (
    ClearPassword,
    ClientPacketError,
    EncryptedPassword,
    Malformed,
    PublicKeyRequest,
    parse_clear_password,
    parse_ed25519_signature,
    parse_sha2_full,
    parse_sha2_scramble,
)
from proxy.login import LoginMethod, LoginRefused, LoginSettings, Verified, verify
from proxy.packets import Err, make_err
from proxy.rsa_key import RsaKey
from reparent.config import Account as ConfigAccount

PASSWORD = b"s3cret-pw"
USER = Account("u", "%", NATIVE_PLUGIN, native_hash(PASSWORD.decode()))
ED_USER = Account("ed", "%", ED25519_PLUGIN, None)


@pytest.fixture(scope="module")
def rsa() -> RsaKey:
    return RsaKey.generate()


# -- the verifier cache and the RSA exchange ---------------------------------------------------


def test_sha2_fast_answer_checked_against_the_cached_verifier() -> None:
    """PyMySQL's fast answer to a nonce proves the password once a full login cached its
    verifier; the account's H1 comes out for the backend login. A wrong password, another
    nonce, or a changed account password do not."""
    cache = Sha2Cache()
    ours = nonce()
    answer = scramble_caching_sha2(PASSWORD, ours)
    assert cache.check(USER, answer, ours) is None  # nothing cached yet
    cache.put(USER, PASSWORD, hashlib.sha1(PASSWORD).digest())
    assert cache.check(USER, answer, ours) == hashlib.sha1(PASSWORD).digest()
    assert cache.check(USER, scramble_caching_sha2(b"wrong", ours), ours) is None
    assert cache.check(USER, answer, nonce()) is None
    assert cache.check(USER, answer[:31], ours) is None
    repassworded = Account(USER.user, USER.host, NATIVE_PLUGIN, native_hash("new"))
    assert cache.check(repassworded, scramble_caching_sha2(b"new", ours), ours) is None


def test_sha2_cache_is_bounded() -> None:
    cache = Sha2Cache(size=2)
    accounts = [Account(f"u{i}", "%", NATIVE_PLUGIN, native_hash("pw")) for i in range(3)]
    for account in accounts:
        cache.put(account, b"pw", hashlib.sha1(b"pw").digest())
    ours = nonce()
    assert len(cache) == 2
    assert cache.check(accounts[0], scramble_caching_sha2(b"pw", ours), ours) is None
    assert cache.check(accounts[2], scramble_caching_sha2(b"pw", ours), ours) is not None


def test_password_checked_against_the_native_hash() -> None:
    assert password_stage1(PASSWORD, USER.h2 or b"") == hashlib.sha1(PASSWORD).digest()
    assert password_stage1(b"wrong", USER.h2 or b"") is None
    assert password_stage1(b"", b"") == b""  # an account without a password
    assert password_stage1(b"x", b"") is None


def test_rsa_unwraps_what_pymysql_encrypts(rsa: RsaKey) -> None:
    ours = nonce()
    ciphertext = sha2_rsa_encrypt(PASSWORD, ours, rsa.public_pem)
    assert len(ciphertext) == rsa.size
    assert rsa.unwrap(ciphertext, ours) == PASSWORD
    assert rsa.unwrap(ciphertext, nonce()) != PASSWORD  # the nonce is part of it
    assert rsa.unwrap(ciphertext[:-1], ours) is None
    assert rsa.unwrap(bytes(rsa.size), ours) is None
    other = RsaKey.generate()
    assert rsa.unwrap(sha2_rsa_encrypt(PASSWORD, ours, other.public_pem), ours) is None


def test_rsa_key_from_a_file(rsa: RsaKey, tmp_path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    path = tmp_path / "key.pem"
    path.write_bytes(
        rsa._key.private_bytes(  # the test's own key, written as an operator would
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    assert RsaKey.load(path).public_pem == rsa.public_pem
    path.write_bytes(
        ed25519.Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(ValueError, match="not an RSA private key"):
        RsaKey.load(path)
    path.write_bytes(b"garbage")
    with pytest.raises(ValueError):
        RsaKey.load(path)


def test_accounts_just_read_within_the_reload_interval() -> None:
    """An unknown user's login reads the accounts before choosing the account's kind; the
    check after its password then need not read (and wait for) them again."""
    now = [100.0]
    book = Accounts(None, lambda: [], ConfigAccount("admin", "x"), clock=lambda: now[0])
    assert not book.just_read()  # never read
    book.loaded_at = 99.5
    assert book.just_read()
    now[0] = 101.0
    assert not book.just_read()


def test_which_accounts_are_usable() -> None:
    """`ctl users` says which accounts a client can log in to through Baton."""
    book = book_from_rows(
        [
            ("n", "%", '{"plugin": "mysql_native_password", "authentication_string": ""}'),
            ("e", "%", '{"plugin": "ed25519", "authentication_string": "x"}'),
            ("s", "%", '{"plugin": "unix_socket", "authentication_string": ""}'),
        ],
        [],
    )
    assert {a.user: a.usable for a in book} == {"n": True, "e": True, "s": False}


# -- the codec -----------------------------------------------------------------------------------


@pytest.mark.parametrize("n", range(0, 70))
def test_sha2_scramble_is_0_or_32_bytes(n: int) -> None:
    if n in (0, 32):
        assert parse_sha2_scramble(b"x" * n) == b"x" * n
    else:
        with pytest.raises(ClientPacketError) as e:
            parse_sha2_scramble(b"x" * n)
        assert e.value.kind is Malformed.BAD_LENGTH


@pytest.mark.parametrize("n", range(0, 130))
def test_ed25519_signature_is_64_bytes(n: int) -> None:
    if n == 64:
        assert parse_ed25519_signature(b"s" * n) == b"s" * n
    else:
        with pytest.raises(ClientPacketError):
            parse_ed25519_signature(b"s" * n)


def test_sha2_full_packets() -> None:
    assert parse_sha2_full(b"\x02", False, 256) == PublicKeyRequest()
    assert parse_sha2_full(b"\x02" * 256, False, 256) == EncryptedPassword(b"\x02" * 256)
    assert parse_sha2_full(b"pw\x00", False, 256) == ClearPassword(b"pw")
    assert parse_sha2_full(b"pw\x00", True, 256) == ClearPassword(b"pw")
    # Under TLS a 256-byte packet is a password like any other, and nothing asks for a key.
    assert parse_sha2_full(b"p" * 255 + b"\x00", True, 256) == ClearPassword(b"p" * 255)
    with pytest.raises(ClientPacketError):
        parse_sha2_full(b"\x02", True, 256)


@pytest.mark.parametrize(
    "payload, kind",
    [
        (b"", Malformed.NO_TERMINATOR),
        (b"pw", Malformed.NO_TERMINATOR),
        (b"p\x00w\x00", Malformed.TRAILING),
        (b"pw\x00\x00", Malformed.TRAILING),
        (b"p" * 600 + b"\x00", Malformed.TOO_LONG),
    ],
)
def test_clear_password_lies(payload: bytes, kind: Malformed) -> None:
    for secure in (False, True):
        with pytest.raises(ClientPacketError) as e:
            parse_sha2_full(payload, secure, 256)
        assert e.value.kind is kind
    with pytest.raises(ClientPacketError) as e:
        parse_clear_password(payload)
    assert e.value.kind is kind


def test_every_truncation_of_a_password_packet_is_refused() -> None:
    whole = b"a longer password\x00"
    for end in range(len(whole)):
        with pytest.raises(ClientPacketError):
            parse_clear_password(whole[:end])
    assert parse_clear_password(whole).password == whole[:-1]


# -- the login, packet by packet -----------------------------------------------------------------


class Client:
    """The client side of a login: `answer` gets each packet Baton wrote (sequence id,
    payload) and returns the client's next packet, or None to wait for more."""

    def __init__(self, answer: Callable[[int, bytes], tuple[int, bytes] | None]) -> None:
        self.answer = answer
        self.written: list[tuple[int, bytes]] = []
        self.inbox: deque[tuple[int, bytes]] = deque()

    async def read_packet(self, limit: int) -> tuple[int, bytes]:
        if not self.inbox:
            raise ConnectionResetError("the scripted client has nothing more to say")
        return self.inbox.popleft()

    def write(self, data: bytes) -> None:
        seq, payload = data[3], data[4:]
        self.written.append((seq, payload))
        reply = self.answer(seq, payload)
        if reply is not None:
            self.inbox.append(reply)


def accounts(*rows: Account) -> Accounts:
    return Accounts(AccountBook(rows), lambda: [], ConfigAccount("admin", "x"))


async def no_backend(login: BackendLogin, relay: Relay) -> object:
    raise AssertionError("this login must not open a server connection")


def login(
    client: Client,
    book: Accounts,
    rsa: RsaKey,
    plugin: str,
    response: bytes,
    greeting: bytes | None,
    user: str = "u",
    open_backend: Callable = no_backend,
    secure: bool = False,
    greeting_plugin: str = NATIVE_PLUGIN,
) -> Verified:
    settings = LoginSettings(
        secure=secure,
        address="127.0.0.1",
        allow_unfenced=False,
        plugin=greeting_plugin,
    )
    return asyncio.run(
        verify(client, book, settings, user, plugin, response, greeting, 1, rsa, open_backend)
    )


def sha2_login(
    client: Client,
    greeting: bytes,
    rsa: RsaKey,
    password: bytes = PASSWORD,
    book: Accounts | None = None,
    secure: bool = False,
) -> Verified:
    """A caching_sha2_password client's login that starts with its fast answer."""
    answer = scramble_caching_sha2(password, greeting)
    book = book or accounts(USER)
    return login(client, book, rsa, SHA2_PLUGIN, answer, greeting, secure=secure)


def pymysql_sha2(password: bytes, greeting: bytes, rsa: RsaKey) -> Client:
    """What PyMySQL does after a caching_sha2 fast answer over plain text."""

    def answer(seq: int, payload: bytes) -> tuple[int, bytes] | None:
        if payload == b"\x01\x04":
            return seq + 1, b"\x02"
        if payload.startswith(b"\x01-----BEGIN PUBLIC KEY"):
            return seq + 1, sha2_rsa_encrypt(password, greeting, payload[1:])
        return None

    return Client(answer)


def test_sha2_full_login_over_plain_text_then_fast(rsa: RsaKey) -> None:
    book = accounts(USER)
    greeting = nonce()
    client = pymysql_sha2(PASSWORD, greeting, rsa)
    verified = sha2_login(client, greeting, rsa, book=book)
    assert [seq for seq, _ in client.written] == [2, 4]
    assert client.written[0][1] == b"\x01\x04"
    assert client.written[1][1] == b"\x01" + rsa.public_pem
    assert verified.seq == 6 and verified.method is LoginMethod.SHA2_FULL
    assert verified.login == BackendLogin("u", hashlib.sha1(PASSWORD).digest())
    # The next login of the account takes the fast path.
    greeting = nonce()
    client = Client(lambda seq, payload: None)
    verified = sha2_login(client, greeting, rsa, book=book)
    assert client.written == [(2, b"\x01\x03")]
    assert verified.seq == 3 and verified.method is LoginMethod.SHA2_FAST
    assert verified.login.h1 == hashlib.sha1(PASSWORD).digest()


def test_sha2_wrong_password_is_denied(rsa: RsaKey) -> None:
    greeting = nonce()
    client = pymysql_sha2(b"wrong", greeting, rsa)
    with pytest.raises(LoginRefused) as e:
        sha2_login(client, greeting, rsa, b"wrong")
    assert e.value.reason is LoginFailure.ACCESS_DENIED
    assert e.value.packet is not None and e.value.packet[3] == 6
    assert int.from_bytes(e.value.packet[5:7], "little") == 1045


def test_sha2_password_in_clear_over_plain_text_is_refused(rsa: RsaKey) -> None:
    """mysql-connector-python's pure-Python plugin sends the password in clear when told to
    log in in full, TLS or not: refused, as a MySQL 8.4 server refuses it."""
    greeting = nonce()
    client = Client(lambda seq, p: (seq + 1, PASSWORD + b"\x00") if p == b"\x01\x04" else None)
    with pytest.raises(LoginRefused) as e:
        sha2_login(client, greeting, rsa)
    assert e.value.reason is LoginFailure.CLEARTEXT_WITHOUT_TLS
    assert int.from_bytes(e.value.packet[5:7], "little") == 1045


def test_sha2_full_login_under_tls_takes_the_password(rsa: RsaKey) -> None:
    greeting = nonce()
    client = Client(lambda seq, p: (seq + 1, PASSWORD + b"\x00") if p == b"\x01\x04" else None)
    verified = sha2_login(client, greeting, rsa, secure=True)
    assert verified.seq == 4 and verified.method is LoginMethod.SHA2_FULL


@pytest.mark.parametrize(
    "lie",
    [
        lambda seq, p: (seq + 1, b"\x02"),  # asks for the key again and again
        lambda seq, p: (seq + 2, b"\x02"),  # out of sequence
        lambda seq, p: (seq + 1, b"\x02" * 1000),  # an oversized answer
    ],
)
def test_sha2_lies_are_a_bad_handshake(rsa: RsaKey, lie: Callable) -> None:
    with pytest.raises(LoginRefused) as e:
        sha2_login(Client(lie), nonce(), rsa)
    assert e.value.reason is LoginFailure.BAD_HANDSHAKE


def test_clear_password_only_under_tls(rsa: RsaKey) -> None:
    greeting = nonce()
    client = Client(lambda seq, p: None)
    verified = login(
        client,
        accounts(USER),
        rsa,
        "mysql_clear_password",
        PASSWORD + b"\x00",
        greeting,
        secure=True,
    )
    assert verified.method is LoginMethod.CLEAR and verified.seq == 2 and client.written == []
    with pytest.raises(LoginRefused) as e:
        login(client, accounts(USER), rsa, "mysql_clear_password", PASSWORD + b"\x00", greeting)
    assert e.value.reason is LoginFailure.CLEARTEXT_WITHOUT_TLS


def switched_to(plugin: str, password: bytes) -> Client:
    """A client that answers an auth switch to `plugin` as PyMySQL would."""

    def answer(seq: int, payload: bytes) -> tuple[int, bytes] | None:
        if payload == b"\x01\x03":  # caching_sha2's fast path: the OK follows
            return None
        name, _, data = payload[1:].partition(b"\x00")
        assert payload[:1] == b"\xfe" and name == plugin.encode()
        salt = data[:-1]
        if plugin == NATIVE_PLUGIN:
            return seq + 1, scramble_native_password(password, salt)
        return seq + 1, scramble_caching_sha2(password, salt)

    return Client(answer)


@pytest.mark.parametrize("greeting_plugin", [NATIVE_PLUGIN, SHA2_PLUGIN])
def test_an_unknown_client_plugin_is_switched_to_the_greetings(
    rsa: RsaKey, greeting_plugin: str
) -> None:
    client = switched_to(greeting_plugin, PASSWORD)
    book = accounts(USER)
    if greeting_plugin == SHA2_PLUGIN:
        book.sha2.put(USER, PASSWORD, hashlib.sha1(PASSWORD).digest())
    verified = login(client, book, rsa, "dialog", b"x", nonce(), greeting_plugin=greeting_plugin)
    assert client.written[0][0] == 2
    assert verified.login.h1 == hashlib.sha1(PASSWORD).digest()


def test_a_native_answer_is_taken_whatever_the_greeting_named(rsa: RsaKey) -> None:
    greeting = nonce()
    verified = login(
        Client(lambda s, p: None),
        accounts(USER),
        rsa,
        NATIVE_PLUGIN,
        scramble_native_password(PASSWORD, greeting),
        greeting,
        greeting_plugin=SHA2_PLUGIN,
    )
    assert verified.method is LoginMethod.NATIVE and verified.seq == 2


def ed25519_backend(nonce32: bytes, reply: Err | None = None) -> Callable:
    """A primary that asks for client_ed25519 with `nonce32` and accepts (or refuses)."""
    seen: list[bytes] = []

    async def open_backend(login: BackendLogin, relay: Relay) -> object:
        assert login == BackendLogin("ed", None)
        seen.append(await relay("client_ed25519", nonce32))
        if reply is not None:
            raise BackendError("refused", reply)
        return seen

    return open_backend


def ed_login(client: Client, rsa: RsaKey, open_backend: Callable) -> Verified:
    """An ed25519 account's login, whatever the client first answered Baton's greeting."""
    return login(
        client, accounts(ED_USER), rsa, NATIVE_PLUGIN, b"x" * 20, nonce(), "ed", open_backend
    )


def test_ed25519_passes_the_servers_nonce_and_the_signature(rsa: RsaKey) -> None:
    nonce32 = bytes(range(1, 32)) + b"\x00"  # ends in 0: must reach the client as it is
    signature = b"S" * 64
    client = Client(lambda seq, p: (seq + 1, signature))
    verified = ed_login(client, rsa, ed25519_backend(nonce32))
    assert client.written == [(2, b"\xfeclient_ed25519\x00" + nonce32)]
    assert verified.backend == [signature]
    assert verified.seq == 4 and verified.method is LoginMethod.ED25519
    assert verified.login.h1 is None


def test_ed25519_short_signature_is_a_bad_handshake(rsa: RsaKey) -> None:
    client = Client(lambda seq, p: (seq + 1, b"S" * 63))
    with pytest.raises(LoginRefused) as e:
        ed_login(client, rsa, ed25519_backend(b"n" * 32))
    assert e.value.reason is LoginFailure.BAD_HANDSHAKE


def test_ed25519_refused_by_the_server_gets_its_error(rsa: RsaKey) -> None:
    client = Client(lambda seq, p: (seq + 1, b"S" * 64))
    denied = Err(1045, "28000", "Access denied for user 'ed'@'127.0.0.1' (using password: YES)")
    with pytest.raises(LoginRefused) as e:
        ed_login(client, rsa, ed25519_backend(b"n" * 32, denied))
    assert e.value.reason is LoginFailure.ACCESS_DENIED
    assert e.value.packet is not None and e.value.packet[3] == 4
    assert e.value.packet[4:] == make_err(1045, "28000", denied.message)


def test_ed25519_unreachable_primary_refuses_the_login(rsa: RsaKey) -> None:
    async def unreachable(login: BackendLogin, relay: Relay) -> object:
        raise BackendError("cannot connect to backend 127.0.0.1:1: refused")

    with pytest.raises(LoginRefused) as e:
        ed_login(Client(lambda s, p: None), rsa, unreachable)
    assert e.value.reason is LoginFailure.BACKEND_UNREACHABLE
    assert int.from_bytes(e.value.packet[5:7], "little") == 1429
