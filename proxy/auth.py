"""Client logins checked against the servers' own accounts, without any plaintext password.

The server stores `H2 = SHA1(SHA1(password))` for a `mysql_native_password` account. A client
answers Baton's nonce `n` with `R = SHA1(password) XOR SHA1(n + H2)`, so Baton recovers
`H1 = SHA1(password) = R XOR SHA1(n + H2)` and checks `SHA1(H1) == H2`. With `H1` Baton can
answer any server's nonce as that client, which is how each session logs in to MariaDB as its own
account (and logs in again on the next primary after a switch). MaxScale works the same way.

Newer clients log in with other plugins, and each is checked here without Baton keeping a
password: `caching_sha2_password` (MySQL 8.4/9.x clients) either proves, against a verifier
Baton cached at that account's last full login, that it knows the password (`Sha2Cache`), or
sends the password itself (over TLS, or RSA-encrypted with Baton's key): Baton checks
`SHA1(SHA1(password)) == H2` and keeps `H1` as for mysql_native_password. MariaDB's `ed25519`
signs the server's nonce with a key only the password gives: that signature cannot be turned
into a login to another server, so Baton never holds anything to log such an account in with.

Which account a login means follows MariaDB's rule: among the accounts of that user name, the
one with the most specific host pattern that matches the client's address. The server decides
again on its own when Baton logs in; Baton's check only recovers `H1`, and never lets in what
the server would refuse.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import ipaddress
import secrets
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

from proxy.client_packets import SHA2_SCRAMBLE_LENGTH

NATIVE_PLUGIN = "mysql_native_password"
SHA2_PLUGIN = "caching_sha2_password"
CLEAR_PLUGIN = "mysql_clear_password"
ED25519_PLUGIN = "ed25519"  # the server's name for it; the client's is client_ed25519
ED25519_CLIENT_PLUGIN = "client_ed25519"
SHA2_CACHE_SIZE = 10_000  # accounts whose fast-path verifier Baton keeps, least recent dropped


def nonce() -> bytes:
    """20 random bytes for a greeting, none of them NUL (clients read the nonce as a string)."""
    return bytes(b % 255 + 1 for b in secrets.token_bytes(20))


def native_hash(password: str) -> bytes:
    """H2 = SHA1(SHA1(password)), as the server stores it (without its `*` hex form)."""
    return hashlib.sha1(hashlib.sha1(password.encode()).digest()).digest()


def stage1(password: str) -> bytes:
    """H1 = SHA1(password): what Baton keeps to log a session in again."""
    return hashlib.sha1(password.encode()).digest() if password else b""


def scramble(h1: bytes, server_nonce: bytes) -> bytes:
    """The answer to `server_nonce` for the account whose SHA1(password) is `h1`."""
    if not h1:
        return b""
    mix = hashlib.sha1(server_nonce[:20] + hashlib.sha1(h1).digest()).digest()
    return bytes(a ^ b for a, b in zip(h1, mix, strict=True))


def recover_stage1(response: bytes, our_nonce: bytes, h2: bytes) -> bytes | None:
    """H1 from a client's answer to `our_nonce`, or None if the answer does not fit `h2`.

    An account without a password has an empty H2 and must be answered with nothing."""
    if not h2:
        return b"" if not response else None
    if len(response) != 20:
        return None
    mix = hashlib.sha1(our_nonce[:20] + h2).digest()
    h1 = bytes(a ^ b for a, b in zip(response, mix, strict=True))
    return h1 if hashlib.sha1(h1).digest() == h2 else None


def password_stage1(password: bytes, h2: bytes) -> bytes | None:
    """H1 from a password the client sent (caching_sha2's full path, mysql_clear_password),
    or None if it is not the password of the account whose hash is `h2`."""
    h1 = hashlib.sha1(password).digest() if password else b""
    expected = hashlib.sha1(h1).digest() if h1 else b""
    return h1 if hmac.compare_digest(expected, h2) else None


@dataclass(frozen=True, slots=True)
class _Sha2Entry:
    h2: bytes  # the account's hash when cached: a new password makes the entry useless
    stage2: bytes  # SHA256(SHA256(password)), what the client's fast answer is checked with
    sealed: bytes  # H1 XOR a pad only SHA256(password) gives: the cache alone logs nobody in


class Sha2Cache:
    """caching_sha2_password's fast path, as the server's cache is: after a full login Baton
    keeps SHA256(SHA256(password)) per account, and a later client's answer to a nonce proves
    it knows SHA256(password), which also unseals the account's H1 for the backend login.
    Entries are keyed by account and hold its H2, so a changed password misses."""

    def __init__(self, size: int = SHA2_CACHE_SIZE) -> None:
        self._size = size
        self._entries: OrderedDict[str, _Sha2Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    @staticmethod
    def _pad(s1: bytes) -> bytes:
        return hashlib.sha1(b"baton sha2 cache" + s1).digest()

    def put(self, account: Account, password: bytes, h1: bytes) -> None:
        if account.h2 is None or not password:
            return
        s1 = hashlib.sha256(password).digest()
        sealed = bytes(a ^ b for a, b in zip(h1, self._pad(s1), strict=True))
        self._entries[account.name] = _Sha2Entry(account.h2, hashlib.sha256(s1).digest(), sealed)
        self._entries.move_to_end(account.name)
        while len(self._entries) > self._size:
            self._entries.popitem(last=False)

    def check(self, account: Account, response: bytes, our_nonce: bytes) -> bytes | None:
        """H1 of `account` if `response` is its client's fast answer to `our_nonce`:
        SHA256(pw) XOR SHA256(SHA256(SHA256(pw)) + nonce)."""
        entry = self._entries.get(account.name)
        if entry is None or entry.h2 != account.h2 or len(response) != SHA2_SCRAMBLE_LENGTH:
            return None
        mix = hashlib.sha256(entry.stage2 + our_nonce[:20]).digest()
        s1 = bytes(a ^ b for a, b in zip(response, mix, strict=True))
        if not hmac.compare_digest(hashlib.sha256(s1).digest(), entry.stage2):
            return None
        self._entries.move_to_end(account.name)
        h1 = bytes(a ^ b for a, b in zip(entry.sealed, self._pad(s1), strict=True))
        return h1 if hashlib.sha1(h1).digest() == entry.h2 else None


def parse_native_hash(text: str) -> bytes | None:
    """`*<40 hex>` as stored by the server, or '' for no password; None for anything else."""
    if text == "":
        return b""
    if len(text) == 41 and text[0] == "*":
        try:
            return bytes.fromhex(text[1:])
        except ValueError:
            return None
    return None


class Fence(enum.StrEnum):
    """Why `read_only` does not stop an account: it may write on a demoted primary."""

    SUPER = "SUPER"
    READ_ONLY_ADMIN = "READ ONLY ADMIN"


@dataclass(frozen=True, slots=True)
class Account:
    """One `user@host` row of the server, as far as a login through Baton needs it."""

    user: str
    host: str
    plugin: str
    h2: bytes | None  # None: not a mysql_native_password account
    unfenced: frozenset[Fence] = frozenset()

    @property
    def name(self) -> str:
        return f"'{self.user}'@'{self.host}'"

    @property
    def ed25519(self) -> bool:
        """Only its client can log it in (proxy/login.py passes its login through)."""
        return self.plugin == ED25519_PLUGIN

    @property
    def usable(self) -> bool:
        """Can a client log in to it through Baton?"""
        return self.h2 is not None or self.ed25519


def host_matches(pattern: str, address: str) -> bool:
    """MariaDB's host match for a client at IP `address`: a literal, a `%`/`_` wildcard
    pattern, or `ip/netmask`. `localhost` is the Unix socket's, never a TCP client's, and
    host names are not resolved (as with skip-name-resolve)."""
    if pattern == "%" or pattern == "":
        return True
    if "/" in pattern:
        ip, _, mask = pattern.partition("/")
        try:
            net = ipaddress.ip_network(f"{ip}/{mask}", strict=False)
            return ipaddress.ip_address(address) in net
        except ValueError:
            return False
    if "%" in pattern or "_" in pattern:
        return _wildcard(pattern.lower(), address.lower())
    return pattern.lower() == address.lower()


def _wildcard(pattern: str, text: str) -> bool:
    """SQL LIKE without escapes, iteratively (no recursion, linear in practice)."""
    p = t = 0
    star_p, star_t = -1, 0
    while t < len(text):
        if p < len(pattern) and (pattern[p] == "_" or pattern[p] == text[t]):
            p += 1
            t += 1
        elif p < len(pattern) and pattern[p] == "%":
            star_p, star_t = p, t
            p += 1
        elif star_p >= 0:
            p = star_p + 1
            star_t += 1
            t = star_t
        else:
            return False
    while p < len(pattern) and pattern[p] == "%":
        p += 1
    return p == len(pattern)


def _specificity(host: str) -> tuple[int, int]:
    """Sort key: exact hosts first, then patterns with more literal characters before the
    first wildcard, `%` last (MariaDB's acl sort, in short)."""
    if host in ("%", ""):
        return (2, 0)
    if "%" in host or "_" in host:
        first = min(i for i in (host.find("%"), host.find("_")) if i >= 0)
        return (1, -first)
    return (0, 0)


class AccountBook:
    """The accounts Baton knows, by user name; rebuilt whole on each reload."""

    def __init__(self, accounts: Iterable[Account] = ()) -> None:
        self._by_user: dict[str, list[Account]] = {}
        for account in accounts:
            self._by_user.setdefault(account.user, []).append(account)
        for rows in self._by_user.values():
            rows.sort(key=lambda a: _specificity(a.host))

    def __len__(self) -> int:
        return sum(len(rows) for rows in self._by_user.values())

    def __iter__(self) -> Iterable[Account]:  # type: ignore[override]
        for rows in self._by_user.values():
            yield from rows

    def candidates(self, user: str, address: str) -> list[Account]:
        """The accounts a login of `user` from `address` may mean, most specific first."""
        return [a for a in self._by_user.get(user, ()) if host_matches(a.host, address)]

    def unfenced(self) -> list[Account]:
        return [a for a in self if a.unfenced]
