"""The response codec: finds where a backend's answer to one command ends, without decoding rows.

`ResponseParser` is a pure state machine in the manner of h11: the shell feeds it whatever bytes
arrived from the backend and gets back the bytes to relay to the client and whether the response
is complete. Along the way it records what the proxy must know (status flags, session-state
entries, errors, prepared-statement ids) and rewrites the few packets that must differ for the
client (statement ids, session tracking the client did not ask for, refused LOCAL INFILE).
"""

from __future__ import annotations

import enum

from proxy.packets import (
    MAX_PAYLOAD,
    Command,
    Err,
    Ok,
    PacketError,
    Status,
    frame,
    make_err,
    parse_eof_status,
    parse_err,
    parse_ok,
    strip_session_track,
    with_stmt_id,
)


class Phase(enum.Enum):
    FIRST = "first"  # OK, ERR, LOCAL INFILE request or a column count
    COLUMNS = "columns"  # column definitions of a result set
    COLUMNS_EOF = "columns_eof"  # the EOF after column definitions (no DEPRECATE_EOF)
    ROWS = "rows"  # rows until a terminator
    PREPARE_OK = "prepare_ok"
    PREPARE_PARAMS = "prepare_params"
    PREPARE_PARAMS_EOF = "prepare_params_eof"
    PREPARE_COLUMNS = "prepare_columns"
    PREPARE_COLUMNS_EOF = "prepare_columns_eof"
    FIELD_LIST = "field_list"  # column definitions until EOF
    SINGLE = "single"  # exactly one packet, whatever it is
    INFILE = "infile"  # the server asked for a local file; the client's turn
    DONE = "done"


_PHASE_FOR_COMMAND = {
    Command.QUERY: Phase.FIRST,
    Command.STMT_EXECUTE: Phase.FIRST,
    Command.STMT_FETCH: Phase.ROWS,
    Command.STMT_PREPARE: Phase.PREPARE_OK,
    Command.FIELD_LIST: Phase.FIELD_LIST,
}

INFILE_DISABLED = make_err(
    1148,
    "42000",
    "LOAD DATA LOCAL INFILE is disabled in Baton (proxy.allow_load_data_local = false); "
    "the statement was not executed",
)


_DONE = Phase.DONE
_INFILE = Phase.INFILE
# Plain ints: IntFlag arithmetic costs a Python call per operation on the hot path.
_MORE_RESULTS = int(Status.MORE_RESULTS)
_CURSOR_EXISTS = int(Status.CURSOR_EXISTS)
_STATE_CHANGED = int(Status.SESSION_STATE_CHANGED)
_IN_TRANS = int(Status.IN_TRANS)

# "The MariaDB server is running with the --read-only option so it cannot execute this statement"
ER_OPTION_PREVENTS_STATEMENT = 1290
# What MariaDB (4166) and MySQL (1148) answer when the connection lacks CLIENT_LOCAL_FILES.
_INFILE_REFUSALS = frozenset({1148, 4166})


class ResponseParser:
    """Tracks one command's response at a time; reused across commands to avoid allocation.

    It carries many mutable fields on purpose: one parser per session is reset by `begin` for
    every command instead of a new object per response (the relay's hot path allocates
    nothing), and its public fields are the one response's record the shell reads when it
    ends (status, tracking, error, statement ids)."""

    __slots__ = (
        "deprecate_eof",
        "client_tracks",
        "_phase",
        "_count",
        "_pending",
        "_skip",
        "_continued",
        "_seq",
        "command",
        "status",
        "ok",
        "err",
        "tracked",
        "client_stmt_id",
        "backend_stmt_id",
        "prepare_params",
        "prepare_columns",
        "results",
        "infile_refused",
        "withhold_read_only",
        "withheld",
    )

    def __init__(self, deprecate_eof: bool, client_tracks: bool) -> None:
        self.deprecate_eof = deprecate_eof
        self.client_tracks = client_tracks
        self._phase = Phase.DONE
        self._count = 0
        self._pending = b""
        self._skip = 0
        self._continued = False
        self._seq = 0
        self.command = 0
        self.status = Status.AUTOCOMMIT.value
        self.ok: Ok | None = None
        self.err: Err | None = None
        self.tracked: list[tuple[int, bytes]] = []
        self.client_stmt_id = 0
        self.backend_stmt_id = 0
        self.prepare_params = 0
        self.prepare_columns = 0
        self.results = 0
        self.infile_refused = False
        self.withhold_read_only = False
        self.withheld: bytes | None = None

    @property
    def phase(self) -> Phase:
        return self._phase

    @property
    def done(self) -> bool:
        return self._phase is Phase.DONE

    @property
    def mid_packet(self) -> bool:
        """The bytes the last `feed` returned stop inside a packet (a large row is relayed
        as it arrives): the compressed protocol keeps them until the packet ends."""
        return self._skip > 0

    def begin(
        self,
        command: int,
        client_stmt_id: int = 0,
        infile_allowed: bool = True,
        withhold_read_only: bool = False,
    ) -> bool:
        """Expect the response to `command`; False when the command has none (CLOSE, LONG_DATA).

        With `withhold_read_only`, a read-only refusal (1290) that is the whole response is not
        relayed but kept in `withheld`: the command never ran, and the proxy may hold it for the
        next primary instead."""
        self.command = command
        self.withhold_read_only = withhold_read_only
        self.withheld = None
        self.ok = None
        self.err = None
        self.tracked = []
        self.results = 0
        self.client_stmt_id = client_stmt_id
        self.infile_refused = not infile_allowed
        self._pending = b""
        self._skip = 0
        self._continued = False
        if command in (Command.STMT_CLOSE, Command.STMT_SEND_LONG_DATA, Command.QUIT):
            self._phase = Phase.DONE
            return False
        self._phase = _PHASE_FOR_COMMAND.get(command, Phase.SINGLE)  # type: ignore[call-overload]
        return True

    def resume_after_infile(self) -> None:
        """The client has sent its file; the server now answers with OK or ERR. The file is
        gone, so the command could not be sent again: nothing is withheld."""
        self._phase = Phase.FIRST
        self.withhold_read_only = False

    def feed(self, data: bytes) -> bytes:
        """Take bytes from the backend; return the bytes to relay to the client now."""
        if self._pending:
            data = self._pending + data
            self._pending = b""
        n = len(data)
        pos = 0
        if self._skip:
            # The rest of a large packet whose head was already classified: relay it as it
            # comes, so a row of many MiB costs no more than its bytes.
            pos = min(self._skip, n)
            self._skip -= pos
            if pos == n:
                return data
        out_start = 0
        pieces: list[bytes] | None = None
        rows = Phase.ROWS
        columns = Phase.COLUMNS
        while pos + 4 <= n:
            phase = self._phase
            if phase is _DONE or phase is _INFILE:
                break
            length = data[pos] | data[pos + 1] << 8 | data[pos + 2] << 16
            end = pos + 4 + length
            if end > n:
                if pos + 4 < n and self._passes_through(data[pos + 4], length):
                    self._continued = length == MAX_PAYLOAD
                    self._skip = end - n
                    pos = n
                break
            if self._continued:
                # The tail of a packet of 16 MiB or more: nothing to classify.
                self._continued = length == MAX_PAYLOAD
                pos = end
                continue
            if length == MAX_PAYLOAD:
                self._continued = True
            # The hot path, inline: a row, or a column definition that is not the last.
            if phase is rows:
                first = data[pos + 4] if length else 0
                if first != 0xFE and first != 0xFF or (first == 0xFE and length >= MAX_PAYLOAD):
                    pos = end
                    continue
            elif phase is columns and self._count > 1:
                self._count -= 1
                pos = end
                continue
            replacement = self._packet(data, pos + 4, end, length)
            if replacement is not None:
                if pieces is None:
                    pieces = []
                pieces.append(data[out_start:pos])
                if replacement:
                    pieces.append(frame(replacement, data[pos + 3]))
                out_start = end
            pos = end
        if pos < n:
            self._pending = data[pos:]
        if pieces is None:
            return data[out_start:pos] if (out_start or pos < n) else data
        pieces.append(data[out_start:pos])
        return b"".join(pieces)

    def _passes_through(self, first: int, length: int) -> bool:
        """Is a packet that has not fully arrived one the parser need not read whole: the
        tail of a packet of 16 MiB or more, or a row that is not a terminator? (Its header
        and first byte say so.)"""
        if self._continued:
            return True
        if self._phase is Phase.ROWS:
            return first != 0xFE and first != 0xFF or (first == 0xFE and length >= MAX_PAYLOAD)
        return False

    # -- one complete packet ------------------------------------------------------------

    def _packet(self, data: bytes, start: int, end: int, length: int) -> bytes | None:
        """Advance the state machine by one packet; return a replacement payload, if any.

        An empty replacement drops the packet.
        """
        phase = self._phase
        first = data[start] if length else -1
        if phase is Phase.ROWS:
            if first == 0xFE and length < MAX_PAYLOAD:
                return self._terminator(data[start:end])
            if first == 0xFF:
                return self._error(data[start:end])
            return None
        if (
            phase is Phase.COLUMNS
            or phase is Phase.PREPARE_PARAMS
            or phase is Phase.PREPARE_COLUMNS
        ):
            self._count -= 1
            if self._count == 0:
                self._after_definitions()
            return None
        if phase is Phase.FIRST:
            if first == 0x00:
                return self._ok(data[start:end])
            if first == 0xFF:
                return self._error(data[start:end])
            if first == 0xFB and self.command == Command.QUERY:
                return self._infile()
            self.results += 1
            self._count = _column_count(data, start)
            self._phase = Phase.COLUMNS
            return None
        if phase is Phase.COLUMNS_EOF:
            payload = data[start:end]
            status = parse_eof_status(payload)
            self.status = status
            # A cursor was opened: the rows come later, through COM_STMT_FETCH.
            self._phase = Phase.DONE if status & _CURSOR_EXISTS else Phase.ROWS
            return self._eof_for_client(payload, status)
        if phase is Phase.PREPARE_OK:
            return self._prepare_ok(data[start:end])
        if phase is Phase.PREPARE_PARAMS_EOF:
            self._after_params()
            return None
        if phase is Phase.PREPARE_COLUMNS_EOF:
            self._phase = Phase.DONE
            return None
        if phase is Phase.FIELD_LIST:
            if first == 0xFF:
                return self._error(data[start:end])
            if first == 0xFE and length < MAX_PAYLOAD:
                self._phase = Phase.DONE
            return None
        # SINGLE: OK, ERR, EOF or COM_STATISTICS' plain text.
        self._phase = Phase.DONE
        if first == 0x00:
            return self._ok(data[start:end])
        if first == 0xFF:
            return self._error(data[start:end])
        return None

    def _after_definitions(self) -> None:
        phase = self._phase
        if phase is Phase.COLUMNS:
            # Under DEPRECATE_EOF a cursor is announced by a terminator with CURSOR_EXISTS,
            # which the ROWS phase handles.
            self._phase = Phase.ROWS if self.deprecate_eof else Phase.COLUMNS_EOF
        elif phase is Phase.PREPARE_PARAMS:
            if self.deprecate_eof:
                self._after_params()
            else:
                self._phase = Phase.PREPARE_PARAMS_EOF
        else:
            self._phase = Phase.DONE if self.deprecate_eof else Phase.PREPARE_COLUMNS_EOF

    def _after_params(self) -> None:
        if self.prepare_columns:
            self._count = self.prepare_columns
            self._phase = Phase.PREPARE_COLUMNS
        else:
            self._phase = Phase.DONE

    def _terminator(self, payload: bytes) -> bytes | None:
        if self.deprecate_eof:
            return self._ok(payload)
        status = parse_eof_status(payload)
        self.status = status
        self._phase = Phase.FIRST if status & _MORE_RESULTS else Phase.DONE
        return self._eof_for_client(payload, status)

    def _eof_for_client(self, payload: bytes, status: int) -> bytes | None:
        """An EOF without the state-changed flag that Baton's own tracking caused."""
        if status & _STATE_CHANGED and not self.client_tracks:
            cleared = status & ~_STATE_CHANGED
            return payload[:3] + cleared.to_bytes(2, "little") + payload[5:]
        return None

    def _ok(self, payload: bytes) -> bytes | None:
        ok = parse_ok(payload, session_track=True)
        self.ok = ok
        self.status = ok.status
        if ok.tracked:
            self.tracked.extend(ok.tracked)
        more = ok.status & _MORE_RESULTS
        if self.command == Command.STMT_FETCH or (
            self._phase is Phase.ROWS and ok.status & _CURSOR_EXISTS
        ):
            more = 0
        self._phase = Phase.FIRST if more else Phase.DONE
        if ok.status & _STATE_CHANGED and not self.client_tracks:
            return strip_session_track(payload, ok)
        return None

    def _error(self, payload: bytes) -> bytes | None:
        self.err = parse_err(payload)
        self._phase = Phase.DONE
        if self.err.code == 1213:
            # A deadlock rolls the transaction back, and ERR carries no status flags.
            self.status &= ~_IN_TRANS
        if self.err.code in _INFILE_REFUSALS and self.infile_refused:
            return INFILE_DISABLED
        if (
            self.withhold_read_only
            and self.err.code == ER_OPTION_PREVENTS_STATEMENT
            and self.ok is None
            and self.results == 0
        ):
            self.withheld = payload
            return b""  # dropped: nothing of this response reaches the client
        return None

    def _infile(self) -> bytes | None:
        self._phase = Phase.INFILE
        return None

    def _prepare_ok(self, payload: bytes) -> bytes | None:
        if payload[:1] == b"\xff":
            return self._error(payload)
        if len(payload) < 12:
            raise PacketError("truncated PREPARE_OK")
        self.backend_stmt_id = int.from_bytes(payload[1:5], "little")
        self.prepare_columns = payload[5] | payload[6] << 8
        self.prepare_params = payload[7] | payload[8] << 8
        if self.prepare_params:
            self._count = self.prepare_params
            self._phase = Phase.PREPARE_PARAMS
        else:
            self._after_params()
        return with_stmt_id(payload, self.client_stmt_id)


def _column_count(data: bytes, start: int) -> int:
    first = data[start]
    if first < 0xFB:
        return first
    if first == 0xFC:
        return data[start + 1] | data[start + 2] << 8
    if first == 0xFD:
        return data[start + 1] | data[start + 2] << 8 | data[start + 3] << 16
    raise PacketError(f"unexpected first byte 0x{first:02x} in a response")
