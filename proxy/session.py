"""What Baton knows about each client session, kept current from the server's own reports.

The state comes from MariaDB's session tracking in OK packets and from the status flags of every
OK/EOF, not from parsing SQL: schema, changed system variables (character set and collation
among them), autocommit and transaction state. User variables are not tracked by the server, so
a state-change report marks them stale and they are read back when someone asks. Prepared
statements are Baton's own record, because Baton maps their ids.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from proxy.packets import Status, Track, decode_tracked

# Variables Baton sets on every backend connection for its own needs; not the client's state.
BATON_VARIABLES = frozenset(
    {
        "session_track_schema",
        "session_track_state_change",
        "session_track_system_variables",
        "session_track_transaction_info",
    }
)


class TxState(enum.StrEnum):
    IDLE = "idle"
    IN_TRANSACTION = "in_transaction"


@dataclass(slots=True)
class PreparedStatement:
    client_id: int
    backend_id: int
    sql: bytes
    params: int
    columns: int


@dataclass
class SessionState:
    session_id: int
    user: str
    client_address: str
    collation: int = 0
    schema: str | None = None
    variables: dict[str, str] = field(default_factory=dict)
    status: int = Status.AUTOCOMMIT.value
    transaction_state: str = ""
    # GTID of the session's last write, reported by the server: what a replica must have applied.
    last_gtid: str = ""
    state_changed: bool = False
    user_variables: dict[str, str | None] = field(default_factory=dict)
    user_variables_stale: bool = False
    statements: dict[int, PreparedStatement] = field(default_factory=dict)
    next_statement_id: int = 1
    in_flight: str | None = None
    backend: str = ""

    @property
    def autocommit(self) -> bool:
        return bool(self.status & Status.AUTOCOMMIT)

    @property
    def in_transaction(self) -> bool:
        return bool(self.status & Status.IN_TRANS)

    def apply(self, status: int, tracked: list[tuple[int, bytes]]) -> None:
        """Fold one response's status flags and session-state entries into the record."""
        self.status = status
        if not tracked:
            return
        for kind, name, value in decode_tracked(tracked):
            if kind is Track.SYSTEM_VARIABLES:
                if name == "last_gtid":
                    self.last_gtid = value
                elif name not in BATON_VARIABLES:
                    self.variables[name] = value
            elif kind is Track.SCHEMA:
                self.schema = value or None
            elif kind is Track.STATE_CHANGE:
                self.state_changed = value == "1"
                # User variables, temporary tables and the like are not reported one by one.
                self.user_variables_stale = True
            elif kind is Track.TRANSACTION_STATE:
                self.transaction_state = value

    def reset(self, schema: str | None) -> None:
        """COM_RESET_CONNECTION / COM_CHANGE_USER: the server forgot everything."""
        self.schema = schema
        self.variables.clear()
        self.status = Status.AUTOCOMMIT.value
        self.transaction_state = ""
        self.state_changed = False
        self.user_variables.clear()
        self.user_variables_stale = False
        self.statements.clear()

    def reserve_statement_id(self) -> int:
        """A client-facing statement id of Baton's, stable across backend changes."""
        client_id = self.next_statement_id
        self.next_statement_id = client_id % 0xFFFFFFFF + 1
        return client_id

    def add_statement(
        self, client_id: int, backend_id: int, sql: bytes, params: int, columns: int
    ) -> None:
        self.statements[client_id] = PreparedStatement(client_id, backend_id, sql, params, columns)

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.session_id,
            "user": self.user,
            "client": self.client_address,
            "backend": self.backend,
            "schema": self.schema,
            "collation_id": self.collation,
            "autocommit": self.autocommit,
            "in_transaction": self.in_transaction,
            "transaction_state": self.transaction_state,
            "last_gtid": self.last_gtid,
            "state_changed": self.state_changed,
            "in_flight": self.in_flight,
            "variables": dict(sorted(self.variables.items())),
            "user_variables": dict(sorted(self.user_variables.items())),
            "prepared_statements": [
                {
                    "id": s.client_id,
                    "backend_id": s.backend_id,
                    "sql": s.sql.decode("utf-8", "replace"),
                    "params": s.params,
                    "columns": s.columns,
                }
                for s in self.statements.values()
            ],
        }
