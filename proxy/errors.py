"""The errors Baton itself sends to clients, each a real MySQL error with code and SQLSTATE.

Every message says what happened and whether the statement ran, so that a client (or the person
reading its log) knows whether a retry is safe.
"""

from __future__ import annotations

import enum

from proxy.packets import make_err


class ErrorKind(enum.Enum):
    """(code, SQLSTATE) of each error Baton makes; the enum name is the metrics label."""

    ACCESS_DENIED = (1045, "28000")
    BAD_HANDSHAKE = (1043, "08S01")
    AUTH_PLUGIN = (1251, "08004")  # ER_NOT_SUPPORTED_AUTH_MODE
    TOO_MANY_CONNECTIONS = (1040, "08004")
    HOST_BLOCKED = (1129, "HY000")
    MALFORMED_PACKET = (1835, "HY000")  # what MariaDB answers a truncated COM_STMT_*
    PACKETS_OUT_OF_ORDER = (1156, "08S01")  # a command that does not start at sequence 0
    NO_SUCH_THREAD = (1094, "HY000")
    UNCOMPRESS = (1157, "08S01")  # ER_NET_UNCOMPRESS_ERROR: a compressed packet Baton cannot read
    SECURE_TRANSPORT_REQUIRED = (3159, "HY000")  # a plain login under tls.require
    # Client libraries built on libmariadb turn any server-sent code in 2000-2999 into 2027
    # "malformed packet", so Baton's own "cannot reach" and "lost" use server codes of the
    # same meaning: ER_CONNECT_TO_FOREIGN_DATA_SOURCE (never ran) and ER_CONNECTION_KILLED
    # (the connection under the statement ended; it may have run).
    BACKEND_UNREACHABLE = (1429, "HY000")
    BACKEND_LOST = (1927, "70100")
    UNKNOWN_COMMAND = (1047, "08S01")
    UNKNOWN_STATEMENT = (1243, "HY000")
    PACKET_TOO_LARGE = (1153, "08S01")
    # Serialization failure: the transaction was rolled back and may be retried whole.
    TRANSACTION_LOST = (1213, "40001")
    # ER_CONNECTION_KILLED: the session's server-side state is gone and it must reconnect.
    SESSION_NOT_MOVABLE = (1927, "70100")
    # vtgate's choice too: no MySQL code says "held by a proxy, never run".
    HELD_EVICTED = (1105, "HY000")

    @property
    def code(self) -> int:
        return self.value[0]

    def packet(self, message: str) -> bytes:
        """An ERR payload for this kind."""
        return make_err(self.value[0], self.value[1], message)
