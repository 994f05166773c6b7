"""Who may open a connection, and what a failed login costs its address: a pure core.

Baton refuses a new client before its greeting when taking it would leave no room: more client
connections than `proxy.max_connections`, or more than the file descriptors Baton can spare
(each session holds two: the client's and its server connection's, and a reserve stays free
for the control socket, the metrics endpoint and the controller's and detector's admin
connections, so that operators can always look in). An address whose logins failed
`max_connect_errors` times in a row is blocked, as MariaDB blocks a host, until an operator
lifts it (`baton ctl unblock ADDRESS`) or Baton restarts; a good login resets its count.

Refusals are logged at most once per `LOG_INTERVAL` per reason, so a flood does not flood the
log; the metrics count every one.
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from dataclasses import dataclass, field

FDS_PER_SESSION = 2  # the client's socket and its server connection
FD_RESERVE = 64  # for the control socket, metrics, admin connections, store, logs
LOG_INTERVAL = 10.0  # seconds between log lines about one kind of refusal
MAX_TRACKED_ADDRESSES = 10_000  # failure counts kept; the oldest are forgotten first


class Refusal(enum.StrEnum):
    """Why a connection was refused before its greeting; a metrics label."""

    MAX_CONNECTIONS = "max_connections"
    FD_BUDGET = "fd_budget"
    BLOCKED = "blocked"


class LoginFailure(enum.StrEnum):
    """Why a login failed; a metrics label and the word in the log line."""

    ACCESS_DENIED = "access_denied"  # wrong password
    UNKNOWN_USER = "unknown_user"
    UNFENCED_USER = "unfenced_user"  # SUPER / READ ONLY ADMIN, refused through the proxy
    UNSUPPORTED_PLUGIN = "unsupported_plugin"
    CLEARTEXT_WITHOUT_TLS = "cleartext_without_tls"  # a password sent in clear, not under TLS
    BACKEND_UNREACHABLE = "backend_unreachable"  # an ed25519 login needs the primary, now
    BAD_HANDSHAKE = "bad_handshake"  # malformed, oversized or out-of-order login packets
    TIMEOUT = "timeout"  # no complete login within proxy.connect_timeout
    SERVER_REFUSED = "server_refused"  # the server answered Baton's login with an error
    CLIENT_GONE = "client_gone"  # closed the connection before finishing
    INSECURE_TRANSPORT = "insecure_transport"  # a plain login while tls.require is set


# Failures that count against an address: the ones a client controls. A refusal by the server
# (too many connections, unknown database) or a client that hangs up says nothing about it.
_COUNTED = frozenset(
    {
        LoginFailure.ACCESS_DENIED,
        LoginFailure.UNKNOWN_USER,
        LoginFailure.BAD_HANDSHAKE,
        LoginFailure.TIMEOUT,
    }
)


@dataclass
class Admission:
    max_connections: int
    fd_limit: int
    max_connect_errors: int  # 0: no blocking
    fds_per_session: int = FDS_PER_SESSION  # 1 when sessions share pooled connections
    reserve: int = FD_RESERVE  # plus the pools' connections when sessions share them
    open: int = 0  # client connections open now, logged in or not
    refused: dict[Refusal, int] = field(default_factory=lambda: {r: 0 for r in Refusal})
    _failures: OrderedDict[str, int] = field(default_factory=OrderedDict)
    _blocked: set[str] = field(default_factory=set)
    _logged_at: dict[str, float] = field(default_factory=dict)

    @property
    def fd_sessions(self) -> int:
        """Client connections the file-descriptor limit leaves room for."""
        return max(0, (self.fd_limit - self.reserve) // self.fds_per_session)

    @property
    def capacity(self) -> int:
        return min(self.max_connections, self.fd_sessions)

    def admit(self, address: str) -> Refusal | None:
        """Take a new connection from `address`, or say why not (the caller closes it)."""
        refusal = None
        if address in self._blocked:
            refusal = Refusal.BLOCKED
        elif self.open >= self.max_connections:
            refusal = Refusal.MAX_CONNECTIONS
        elif self.open >= self.fd_sessions:
            refusal = Refusal.FD_BUDGET
        if refusal is not None:
            self.refused[refusal] += 1
            return refusal
        self.open += 1
        return None

    def closed(self) -> None:
        self.open -= 1

    def login_failed(self, address: str, reason: LoginFailure) -> bool:
        """Count a failure; True when it blocks the address from now on."""
        if reason not in _COUNTED or self.max_connect_errors <= 0:
            return False
        count = self._failures.pop(address, 0) + 1
        self._failures[address] = count
        while len(self._failures) > MAX_TRACKED_ADDRESSES:
            self._failures.popitem(last=False)
        if count >= self.max_connect_errors and address not in self._blocked:
            self._blocked.add(address)
            return True
        return False

    def login_ok(self, address: str) -> None:
        self._failures.pop(address, None)

    def unblock(self, address: str) -> bool:
        self._failures.pop(address, None)
        if address in self._blocked:
            self._blocked.discard(address)
            return True
        return False

    @property
    def blocked(self) -> list[str]:
        return sorted(self._blocked)

    def should_log(self, key: str, now: float) -> bool:
        """Rate limit for log lines about `key` (a refusal or failure kind)."""
        last = self._logged_at.get(key)
        if last is not None and now - last < LOG_INTERVAL:
            return False
        self._logged_at[key] = now
        return True
