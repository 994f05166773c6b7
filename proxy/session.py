"""What Baton knows about each client session, kept current from the server's own reports.

The state comes from MariaDB's session tracking in OK packets and from the status flags of every
OK/EOF, not from parsing SQL: schema, changed system variables (character set and collation
among them), autocommit and transaction state. User variables are not tracked by the server, so
a state-change report marks them stale and they are read back when someone asks. Prepared
statements are Baton's own record, because Baton maps their ids.
"""

from __future__ import annotations

import enum
import re
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


class Unmovable(enum.StrEnum):
    """Session state that lives only in the server session and cannot be given to another."""

    TEMPORARY_TABLES = "temporary_tables"
    USER_LOCKS = "user_locks"  # GET_LOCK
    TABLE_LOCKS = "table_locks"  # LOCK TABLES
    XA = "xa"


# Statements are read only where the server's reports leave a gap: a state change that no
# variable explains (temporary tables), a transaction-state change (XA), and any statement that
# may take or free a user lock, which the server reports nowhere. The cheap pattern screens
# every query; the full ones run on the few it lets through.
_LOCK_HINT = re.compile(rb"_[lL][oO][cC][kK]")
_LOCK_CALL = re.compile(
    rb"(?i)\b(get_lock|release_lock|release_all_locks)\s*\(\s*(?:'((?:[^'\\]|\\.)*)'|\))?"
)
_TEMP_CREATE = re.compile(
    rb"(?is)^\s*create\s+(?:or\s+replace\s+)?temporary\s+table\s+(?:if\s+not\s+exists\s+)?"
    rb"([`\w$.]+)"
)
_TABLE_DROP = re.compile(rb"(?is)^\s*drop\s+(?:temporary\s+)?tables?\s+(?:if\s+exists\s+)?(.*)")
_XA_START = re.compile(rb"(?is)^\s*xa\s+(?:start|begin)\b")
UNKNOWN_LOCK = "?"  # GET_LOCK of an expression: which lock is not known
# Statements that only read, so that running one twice is harmless.
_READS = re.compile(rb"(?is)\s*(?:\(\s*)*(?:select|show|describe|desc|help|values)\b")


def reads_only(sql: bytes, start: int = 0) -> bool:
    """Does this statement only read? A text with `;` before its end may hold several
    statements and counts as a write. (A SELECT that calls a stored function which writes is
    taken for a read: the server's reports do not say.)"""
    if _READS.match(sql, start) is None:
        return False
    end = len(sql)
    while end > start and sql[end - 1] in b" \t\r\n;":
        end -= 1
    return sql.find(b";", start, end) < 0


# One round trip reads back what tracking does not report: user variables (with their types, to
# restore them exactly) and the collation after SET NAMES ... COLLATE. The collation row is the
# one without a name.
READ_BACK_SQL = (
    "SELECT VARIABLE_NAME, VARIABLE_VALUE, VARIABLE_TYPE, CHARACTER_SET_NAME"
    " FROM information_schema.USER_VARIABLES"
    " UNION ALL SELECT NULL, @@collation_connection, NULL, NULL"
)
# Restored first and in this order: each SET of a character set resets the collation after it.
_CHARSET_ORDER = (
    "character_set_client",
    "character_set_results",
    "character_set_connection",
    "collation_connection",
)
_NUMERIC_TYPES = frozenset({"INT", "INT UNSIGNED", "DOUBLE", "DECIMAL"})
_NUMBER = re.compile(r"-?\d+(\.\d+)?(e[+-]?\d+)?", re.I)


def _quote(value: str) -> str:
    """A string literal under the default sql_mode, where a new backend session parses it."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _system_literal(value: str) -> str:
    # Numeric variables refuse a quoted value (1232); everything else is given as a string.
    return value if _NUMBER.fullmatch(value) else _quote(value)


@dataclass(slots=True)
class UserVariable:
    value: str | None  # as information_schema shows it (converted, so not exact for strings)
    type: str  # INT, INT UNSIGNED, DOUBLE, DECIMAL or VARCHAR (information_schema's words)
    charset: str | None
    data: bytes | None = None  # a string's exact bytes, read with HEX(@name)

    def literal(self) -> str:
        """The value as SQL that gives back the same type, bytes and character set."""
        if self.value is None:
            return "NULL"
        if _NUMBER.fullmatch(self.value):
            if self.type == "INT":
                return self.value
            if self.type == "INT UNSIGNED":
                return f"CAST({self.value} AS UNSIGNED)"
            if self.type == "DOUBLE":
                return self.value if "e" in self.value.lower() else f"{self.value}e0"
            if self.type == "DECIMAL":
                return self.value if "." in self.value else f"CAST({self.value} AS DECIMAL(65))"
        raw = self.data if self.data is not None else self.value.encode("utf-8", "surrogateescape")
        if not self.charset or self.charset == "binary":
            return f"X'{raw.hex()}'"
        return f"CONVERT(X'{raw.hex()}' USING {self.charset})"


def _user_variable(name: str) -> str:
    return "@`" + name.replace("`", "``") + "`"


@dataclass(slots=True)
class PreparedStatement:
    client_id: int
    backend_id: int
    sql: bytes
    params: int
    columns: int
    # The parameter types the client bound last. Clients send them with the first execute
    # only; a statement prepared again on another server must be given them once more.
    param_types: bytes = b""
    rebound: bool = True

    def execute_payload(self, payload: bytes) -> bytes:
        """A COM_STMT_EXECUTE for the backend: its statement id, and the parameter types if
        this server has not seen them yet."""
        head = payload[:1] + self.backend_id.to_bytes(4, "little") + payload[5:10]
        if not self.params:
            return head + payload[10:]
        flag_at = 10 + (self.params + 7) // 8
        if flag_at >= len(payload):
            return head + payload[10:]
        if payload[flag_at] == 1:
            self.param_types = payload[flag_at + 1 : flag_at + 1 + 2 * self.params]
            self.rebound = True
            return head + payload[10:]
        if self.rebound or not self.param_types:
            return head + payload[10:]
        self.rebound = True
        return head + payload[10:flag_at] + b"\x01" + self.param_types + payload[flag_at + 1 :]


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
    user_variables: dict[str, UserVariable] = field(default_factory=dict)
    user_variables_stale: bool = False
    statements: dict[int, PreparedStatement] = field(default_factory=dict)
    next_statement_id: int = 1
    in_flight: str | None = None
    backend: str = ""
    # State that cannot move to another server: names as the statements gave them.
    temporary_tables: set[str] = field(default_factory=set)
    user_locks: set[str] = field(default_factory=set)
    xa: bool = False

    @property
    def autocommit(self) -> bool:
        return bool(self.status & Status.AUTOCOMMIT)

    @property
    def in_transaction(self) -> bool:
        return bool(self.status & Status.IN_TRANS)

    def apply(self, status: int, tracked: list[tuple[int, bytes]]) -> bool:
        """Fold one response's status flags and session-state entries into the record; True
        when they report a change the statement itself must explain (see `note_statement`)."""
        self.status = status
        if self.xa and not status & Status.IN_TRANS:
            self.xa = False
        if not tracked:
            return False
        unexplained = False
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
                unexplained = True
            elif kind is Track.TRANSACTION_STATE:
                self.transaction_state = value
                unexplained = True
        return unexplained

    def note_statement(self, sql: bytes) -> None:
        """A statement whose OK reported a change tracking cannot name: temporary tables
        created or dropped, an XA transaction begun."""
        if m := _TEMP_CREATE.match(sql):
            self.temporary_tables.add(self._table_name(m.group(1)))
        elif m := _TABLE_DROP.match(sql):
            for name in m.group(1).split(b","):
                words = name.split()
                if words:
                    self.temporary_tables.discard(self._table_name(words[0]))
        elif _XA_START.match(sql):
            self.xa = True

    def note_locks(self, sql: bytes, start: int = 0) -> None:
        """Any query (its text from `start`, so the hot path copies nothing): GET_LOCK and
        RELEASE_LOCK are function calls the server reports nowhere. A name given as an
        expression is recorded as unknown; `held_locks_sql` checks, while the server still
        answers, which of the named ones the session really holds."""
        if _LOCK_HINT.search(sql, start) is None:
            return
        for m in _LOCK_CALL.finditer(sql, start):
            call, name = m.group(1).lower(), m.group(2)
            text = UNKNOWN_LOCK if name is None else name.decode("utf-8", "surrogateescape")
            if call == b"get_lock":
                self.user_locks.add(text)
            elif call == b"release_all_locks":
                self.user_locks.clear()
            else:
                self.user_locks.discard(text)

    def held_locks_sql(self) -> str | None:
        """Which of the named locks this session holds now; None if no name is known."""
        names = sorted(n for n in self.user_locks if n != UNKNOWN_LOCK)
        if not names:
            return None
        return "SELECT " + ", ".join(
            f"IS_USED_LOCK({_quote(n)}) <=> CONNECTION_ID()" for n in names
        )

    def held_locks(self, row: list[bytes | None]) -> None:
        names = sorted(n for n in self.user_locks if n != UNKNOWN_LOCK)
        for name, held in zip(names, row, strict=True):
            if held != b"1":
                self.user_locks.discard(name)

    def unmovable(self) -> dict[Unmovable, list[str]]:
        """What of this session cannot move to another server, with names where known."""
        found: dict[Unmovable, list[str]] = {}
        if self.temporary_tables:
            found[Unmovable.TEMPORARY_TABLES] = sorted(self.temporary_tables)
        if self.user_locks:
            found[Unmovable.USER_LOCKS] = sorted(self.user_locks)
        if self.transaction_state[7:8] == "L":
            found[Unmovable.TABLE_LOCKS] = []
        if self.xa:
            found[Unmovable.XA] = []
        return found

    def _table_name(self, name: bytes) -> str:
        text = name.decode("utf-8", "surrogateescape").replace("`", "").lower()
        return text if "." in text or not self.schema else f"{self.schema.lower()}.{text}"

    def read_back(self, rows: list[list[bytes | None]]) -> None:
        """Take the answer to READ_BACK_SQL."""
        variables = {}
        for name, value, kind, charset in rows:
            text = None if value is None else value.decode("utf-8", "surrogateescape")
            if name is None:
                self.variables["collation_connection"] = text or ""
            else:
                variables[name.decode()] = UserVariable(
                    text, (kind or b"VARCHAR").decode(), charset.decode() if charset else None
                )
        self.user_variables = variables
        self.user_variables_stale = False

    def exact_strings_sql(self) -> str | None:
        """information_schema converts string values to its own character set; this reads
        their bytes exactly, one column per string variable (None: there are none)."""
        names = self._string_names()
        if not names:
            return None
        return "SELECT " + ", ".join(f"HEX({_user_variable(n)})" for n in names)

    def exact_strings(self, row: list[bytes | None]) -> None:
        for name, hexed in zip(self._string_names(), row, strict=True):
            if hexed is not None:
                self.user_variables[name].data = bytes.fromhex(hexed.decode())

    def _string_names(self) -> list[str]:
        return [
            n
            for n, v in self.user_variables.items()
            if v.type not in _NUMERIC_TYPES and v.value is not None
        ]

    def restore_assignments(self) -> list[str]:
        """SET assignments that give a new server session this session's variables."""
        names = [n for n in _CHARSET_ORDER if n in self.variables]
        names += sorted(n for n in self.variables if n not in _CHARSET_ORDER)
        out = [f"SESSION {n} = {_system_literal(self.variables[n])}" for n in names]
        out += [
            f"@`{n.replace('`', '``')}` = {v.literal()}" for n, v in self.user_variables.items()
        ]
        return out

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
        self.temporary_tables.clear()
        self.user_locks.clear()
        self.xa = False

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
            "unmovable": {str(k): v for k, v in self.unmovable().items()},
            "variables": dict(sorted(self.variables.items())),
            "user_variables": {k: v.value for k, v in sorted(self.user_variables.items())},
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
