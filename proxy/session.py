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

# Plain ints: an IntFlag's `&` is a Python-level call, and `in_transaction` runs per command.
_IN_TRANS = int(Status.IN_TRANS)
_AUTOCOMMIT = int(Status.AUTOCOMMIT)


class TxState(enum.StrEnum):
    IDLE = "idle"
    IN_TRANSACTION = "in_transaction"


class Unmovable(enum.StrEnum):
    """Session state that lives only in the server session and cannot be given to another."""

    TEMPORARY_TABLES = "temporary_tables"
    USER_LOCKS = "user_locks"  # GET_LOCK
    TABLE_LOCKS = "table_locks"  # LOCK TABLES
    XA = "xa"
    # Known only while the old server answers; unknown after the connection was lost.
    USER_VARIABLES = "user_variables"  # set since Baton last read them back
    UNTRACKED_VARIABLES = "untracked_variables"  # changed while session tracking was off
    SQL_PREPARED = "sql_prepared"  # PREPARE ... FROM @variable: its text is not known
    ROUTINE_STATE = "routine_state"  # what a stored routine it called may have left
    LOGIN = "login"  # logged in with ed25519: only the client can log in again


# A stored routine's body, screened for state it may leave in the session: what it may leave.
ROUTINE_HAZARDS = (
    (re.compile(rb"(?i)\btemporary\s+table"), "temporary tables"),
    (re.compile(rb"(?i)\bget_lock\s*\("), "user locks"),
    (re.compile(rb"(?i)\block\s+tables?\b"), "table locks"),
    (re.compile(rb"(?i)\bxa\s+(?:start|begin)\b"), "an XA transaction"),
    (re.compile(rb"(?i)\bprepare\b"), "prepared statements"),
    (re.compile(rb"(?i)session_track"), "session tracking"),
    (re.compile(rb"(?i)\bcall\b"), "other routines"),
)


def routine_hazards(body: bytes) -> list[str]:
    """What a routine body may leave behind that cannot be read back (empty: only variables,
    which can)."""
    return [label for pattern, label in ROUTINE_HAZARDS if pattern.search(body)]


# Statements are read only where the server's reports leave a gap: a state change that no
# variable explains (temporary tables), a transaction-state change (XA), and any statement that
# may take or free a user lock, which the server reports nowhere. The cheap pattern screens
# every query; the full ones run on the few it lets through.
_LOCK_HINT = re.compile(rb"_[lL][oO][cC][kK]")
# What every query is screened for, in one scan: GET_LOCK and friends, LAST_INSERT_ID(expr),
# session_track_*. Most statements contain none; those that do are read further.
_HINTS = re.compile(rb"_(?:[lL][oO][cC][kK]|[iI][dD]\b|[tT][rR][aA][cC][kK])")
_LOCK_CALL = re.compile(
    rb"(?i)\b(get_lock|release_lock|release_all_locks)\s*\(\s*(?:'((?:[^'\\]|\\.)*)'|\))?"
)
_TEMP_CREATE = re.compile(
    rb"(?is)create\s+(?:or\s+replace\s+)?temporary\s+table\s+(?:if\s+not\s+exists\s+)?"
    rb"([`\w$.]+)"
)
_TABLE_DROP = re.compile(rb"(?is)drop\s+(?:temporary\s+)?tables?\s+(?:if\s+exists\s+)?(.*)")
_XA_START = re.compile(rb"(?is)xa\s+(?:start|begin)\b")
# Statements read past their leading comments (`/*! ... */` is code, not a comment).
_LEADING = re.compile(rb"(?s)(?:\s+|/\*(?!!).*?\*/|(?:--\s|#)[^\n]*(?:\n|$))*")
_TRACK_HINT = re.compile(rb"(?i)session_track")
# A SET that assigns session_track_* variables and nothing else.
_ONLY_TRACKING = re.compile(
    rb"(?is)set\s+(?:(?:session|local)\s+|@@(?:session\.|local\.)?)?session_track_\w+\s*:?=\s*"
    rb"(?:'[^']*'|\"[^\"]*\"|[\w.-]+)"
    rb"(?:\s*,\s*(?:(?:session|local)\s+|@@(?:session\.|local\.)?)?session_track_\w+\s*:?=\s*"
    rb"(?:'[^']*'|\"[^\"]*\"|[\w.-]+))*\s*;?\s*"
)
_USER_VARIABLE = re.compile(rb"(?<!@)@(?!@)")
_INSERT_ID_CALL = re.compile(rb"(?i)\blast_insert_id\s*\(\s*[^)\s]")
_SQL_PREPARE = re.compile(
    rb"(?is)prepare\s+(`[^`]{1,64}`|\w{1,64})\s+from\s+"
    rb"(?:'((?:[^'\\]|\\.|'')*)'|\"((?:[^\"\\]|\\.|\"\")*)\"|(@))"
)
_SQL_DEALLOCATE = re.compile(rb"(?is)(?:deallocate|drop)\s+prepare\s+(`[^`]{1,64}`|\w{1,64})")
_SQL_EXECUTE = re.compile(rb"(?is)execute\s+(`[^`]{1,64}`|\w{1,64})")
_CALL = re.compile(rb"(?is)call\s+((?:`[^`]{1,64}`|\w{1,64})(?:\.(?:`[^`]{1,64}`|\w{1,64}))?)")
_ESCAPES = {b"0": b"\x00", b"n": b"\n", b"r": b"\r", b"t": b"\t", b"Z": b"\x1a", b"b": b"\b"}


_NOT_A_WORD = frozenset(b" \t\r\n\x0b\x0c/-#")


def statement_start(sql: bytes, start: int = 0) -> int:
    """Where a statement's first word begins, past whitespace and comments."""
    if start >= len(sql) or sql[start] not in _NOT_A_WORD:
        return start  # the common case: the statement starts with its first word
    m = _LEADING.match(sql, start)
    return m.end() if m else start


def _unquote(literal: bytes, quote: bytes) -> bytes:
    """A string literal's bytes (backslash escapes, doubled quotes), as the server reads it
    under the default sql_mode."""
    out = bytearray()
    i = 0
    while i < len(literal):
        c = literal[i : i + 1]
        if c == b"\\" and i + 1 < len(literal):
            nxt = literal[i + 1 : i + 2]
            out += _ESCAPES.get(nxt, nxt)
            i += 2
        elif c == quote and literal[i + 1 : i + 2] == quote:
            out += quote
            i += 2
        else:
            out += c
            i += 1
    return bytes(out)


def _name(raw: bytes) -> str:
    """A name as written (`quoted` parts, a schema.name pair), lower-cased without quotes."""
    return raw.decode("utf-8", "surrogateescape").replace("`", "").lower()


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
    " UNION ALL SELECT NULL, LAST_INSERT_ID(), 'LAST_INSERT_ID', NULL"
)
# Restored first and in this order: each SET of a character set resets the collation after it.
CHARSET_VARIABLES = (
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


def system_assignments(values: dict[str, str | None]) -> list[str]:
    """SET assignments of session variables, character sets first and in their order (None:
    back to the server's default)."""
    names = [n for n in CHARSET_VARIABLES if n in values]
    names += sorted(n for n in values if n not in CHARSET_VARIABLES)
    return [
        f"SESSION {n} = {'DEFAULT' if (v := values[n]) is None else _system_literal(v)}"
        for n in names
    ]


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
    """The record of one client session: every field is a piece of its server-side state
    (what tracking reported, or Baton read back) that must move with it to a new server, or
    that names it for `ctl sessions`; so it has as many fields as the server has kinds of
    session state, and the logic that updates them lives in its methods."""

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
    # SQL-level prepared statements by name: their text, or None when prepared from a user
    # variable (not known to Baton).
    sql_prepared: dict[str, bytes | None] = field(default_factory=dict)
    # LAST_INSERT_ID(): from the last OK that carried one, or read back.
    last_insert_id: int = 0
    last_insert_id_stale: bool = False
    # The client changed session_track_* itself: variables it changed meanwhile may not have
    # been reported, until Baton reads them back.
    variables_untracked: bool = False
    # Stored routines the session called, by `schema.name`.
    routines: set[str] = field(default_factory=set)
    # The login was the client's answer to one server's challenge (ed25519): Baton cannot
    # log in for it again, so it cannot move (the login, not the server session, is the state).
    single_login: bool = False

    @property
    def autocommit(self) -> bool:
        return bool(self.status & _AUTOCOMMIT)

    @property
    def in_transaction(self) -> bool:
        return bool(self.status & _IN_TRANS)

    def apply(self, status: int, tracked: list[tuple[int, bytes]]) -> bool:
        """Fold one response's status flags and session-state entries into the record; True
        when they report a change the statement itself must explain (see `note_statement`)."""
        self.status = status
        if self.xa and not status & _IN_TRANS:
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
                # User variables, temporary tables and the like are not reported one by one:
                # the statement's text says which (`after_statement`).
                self.state_changed = value == "1"
                unexplained = True
            elif kind is Track.TRANSACTION_STATE:
                self.transaction_state = value
                unexplained = True
        return unexplained

    def after_statement(
        self, sql: bytes, start: int, changed: bool, insert_id: int, depth: int = 0
    ) -> bool:
        """Fold in what one successful statement (its text from `start`: a query, or the SQL
        of a prepared statement it executed) did that the server's reports leave out. True
        when Baton must set its session tracking again (the statement touched it)."""
        start = statement_start(sql, start)
        if insert_id:
            self.last_insert_id = insert_id
            self.last_insert_id_stale = False
        if changed:
            self.note_statement(sql, start)
            if _USER_VARIABLE.search(sql, start):
                self.user_variables_stale = True
        hinted = _HINTS.search(sql, start) is not None  # one cheap scan of every query
        if hinted:
            self.note_locks(sql, start)
            if _INSERT_ID_CALL.search(sql, start):
                self.last_insert_id_stale = True
        first = sql[start] | 0x20 if start < len(sql) else 0  # lower-cased, for letters
        if first == 0x70 or first == 0x64:  # p(repare), d(eallocate), d(rop prepare)
            self._note_sql_prepare(sql, start)
        elif first == 0x63 and (m := _CALL.match(sql, start)):
            name = _name(m.group(1))
            if "." not in name and self.schema:
                name = f"{self.schema.lower()}.{name}"
            self.routines.add(name)
            self.user_variables_stale = True
            self.last_insert_id_stale = True
        elif first == 0x65 and depth == 0 and (m := _SQL_EXECUTE.match(sql, start)):
            text = self.sql_prepared.get(_name(m.group(1)))
            if text:
                return self.after_statement(text, 0, changed, 0, depth=1)
        if hinted and _TRACK_HINT.search(sql, start):
            if not _ONLY_TRACKING.fullmatch(sql, start):
                # It may have changed variables while their tracking was off.
                self.variables_untracked = True
            return True
        return False

    def _note_sql_prepare(self, sql: bytes, start: int) -> None:
        if m := _SQL_PREPARE.match(sql, start):
            if m.group(4):
                self.sql_prepared[_name(m.group(1))] = None
            else:
                quote = b"'" if m.group(2) is not None else b'"'
                literal = m.group(2) if m.group(2) is not None else m.group(3)
                self.sql_prepared[_name(m.group(1))] = _unquote(literal, quote)
        elif m := _SQL_DEALLOCATE.match(sql, start):
            self.sql_prepared.pop(_name(m.group(1)), None)

    def note_statement(self, sql: bytes, start: int = 0) -> None:
        """A statement whose OK reported a change tracking cannot name: temporary tables
        created or dropped, an XA transaction begun."""
        while True:
            # Each statement of a multi-statement text, from past its leading comments.
            start = statement_start(sql, start)
            if m := _TEMP_CREATE.match(sql, start):
                self.temporary_tables.add(self._table_name(m.group(1)))
            elif m := _TABLE_DROP.match(sql, start):
                end = sql.find(b";", start)
                for name in m.group(1)[: None if end < 0 else end - m.start(1)].split(b","):
                    words = name.split()
                    if words:
                        self.temporary_tables.discard(self._table_name(words[0]))
            elif _XA_START.match(sql, start):
                self.xa = True
            start = sql.find(b";", start) + 1
            if start <= 0:
                return

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

    def unmovable(
        self, lost: bool = False, routines: dict[str, list[str]] | None = None
    ) -> dict[Unmovable, list[str]]:
        """What of this session cannot move to another server, with names where known.

        `lost`: the old connection is gone, so what Baton has not read back is lost with it.
        `routines`: what each stored routine may leave behind (None for a routine whose body
        Baton could not read: it may leave anything)."""
        found: dict[Unmovable, list[str]] = {}
        if lost and (self.user_variables_stale or self.last_insert_id_stale):
            found[Unmovable.USER_VARIABLES] = (
                ["LAST_INSERT_ID()"] if self.last_insert_id_stale else []
            )
        if self.variables_untracked:
            found[Unmovable.UNTRACKED_VARIABLES] = []
        unknown = sorted(n for n, text in self.sql_prepared.items() if text is None)
        if unknown:
            found[Unmovable.SQL_PREPARED] = unknown
        hazards = []
        for name in sorted(self.routines):
            left = (routines or {}).get(name)
            if left is None:
                left = ["anything (its body was not read)"]
            if left:
                hazards.append(f"{name}: {', '.join(left)}")
        if hazards:
            found[Unmovable.ROUTINE_STATE] = hazards
        if self.temporary_tables:
            found[Unmovable.TEMPORARY_TABLES] = sorted(self.temporary_tables)
        if self.user_locks:
            found[Unmovable.USER_LOCKS] = sorted(self.user_locks)
        if self.transaction_state[7:8] == "L":
            found[Unmovable.TABLE_LOCKS] = []
        if self.xa:
            found[Unmovable.XA] = []
        if self.single_login:
            found[Unmovable.LOGIN] = []
        return found

    def _table_name(self, name: bytes) -> str:
        text = name.decode("utf-8", "surrogateescape").replace("`", "").lower()
        return text if "." in text or not self.schema else f"{self.schema.lower()}.{text}"

    def read_back(self, rows: list[list[bytes | None]]) -> None:
        """Take the answer to READ_BACK_SQL."""
        variables = {}
        for name, value, kind, charset in rows:
            text = None if value is None else value.decode("utf-8", "surrogateescape")
            if name is None and kind == b"LAST_INSERT_ID":
                self.last_insert_id = int(text or 0)
                self.last_insert_id_stale = False
            elif name is None:
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
        out = system_assignments(dict(self.variables))
        out += [
            f"@`{n.replace('`', '``')}` = {v.literal()}" for n, v in self.user_variables.items()
        ]
        if self.last_insert_id:
            out.append(f"last_insert_id = {self.last_insert_id}")
        return out

    def restore_sql_prepared(self) -> list[str]:
        """PREPARE statements that give a new server session this session's SQL-level
        prepared statements (those whose text Baton knows)."""
        return [
            f"PREPARE `{name.replace('`', '``')}` FROM X'{text.hex()}'"
            for name, text in self.sql_prepared.items()
            if text is not None
        ]

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
        self.sql_prepared.clear()
        self.last_insert_id = 0
        self.last_insert_id_stale = False
        self.variables_untracked = False
        self.routines.clear()

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
            "last_insert_id": self.last_insert_id,
            "sql_prepared": sorted(self.sql_prepared),
            "routines": sorted(self.routines),
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
