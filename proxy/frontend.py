"""The client-facing side: accept, login, then a callback relay of each command to its backend.

Every client socket gets a `ClientConnection`, an asyncio Protocol. Before login it only buffers
bytes (bounded) for the login coroutine (proxy/login.py), which checks the client against the
servers' own accounts and logs the session in to the primary as that account; any refusal is
the error the server would send, and the connection closes. After login, commands are relayed
from the client's `data_received` to the backend and responses back from the backend's, with no
task and no future on the hot path.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import re
import socket
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from proxy import metrics
from proxy.accounts import Accounts
from proxy.admission import Admission, LoginFailure, Refusal
from proxy.auth import nonce as new_nonce
from proxy.auth import stage1
from proxy.backend import BackendConnection, BackendError, BackendLogin
from proxy.buffer import EvictReason
from proxy.client_packets import (
    STMT_HEADER,
    ClientPacketError,
    Malformed,
    check_stmt_header,
    parse_change_user,
)
from proxy.errors import ErrorKind
from proxy.holder import Holder
from proxy.login import LoginRefused, LoginSettings, read_handshake, verify
from proxy.packets import (
    COMMAND_NAMES,
    MAX_PAYLOAD,
    Cap,
    Command,
    Status,
    frame,
    make_err,
    make_ok,
    make_server_handshake,
    proxy_header,
    with_stmt_id,
)
from proxy.response import Phase, ResponseParser
from proxy.router import Router
from proxy.session import (
    READ_BACK_SQL,
    SessionState,
    Unmovable,
    reads_only,
    routine_hazards,
)
from reparent.admin import AdminConnection
from reparent.config import MAX_WORKERS, Config, ServerConfig
from reparent.topology import Aborted, ReparentStarted, TopologyEvent
from reparent.topology import Established as EstablishedEvent

log = logging.getLogger(__name__)

# Stop reading a client that sends this much ahead of its answers.
HIGH_WATER = 1 << 20
_STATS = metrics.COMMAND_STATS

# Set on every backend connection: Baton learns each session's state from OK packets.
TRACKING_ASSIGNMENTS = (
    "session_track_schema=1, session_track_state_change=1, "
    "session_track_system_variables='*', session_track_transaction_info='STATE'"
)
TRACKING_SQL = "SET " + TRACKING_ASSIGNMENTS
# Commands relayed to the backend with a response; anything else is refused with 1047.
_RELAYED = frozenset(
    {
        Command.QUERY,
        Command.INIT_DB,
        Command.PING,
        Command.FIELD_LIST,
        Command.SET_OPTION,
        Command.STATISTICS,
        Command.DEBUG,
    }
)


# Commands that may wait for the next primary after failing on this one: they carry everything
# needed to send them again (a cursor's FETCH does not: its cursor died with the connection).
# The relayed ones but COM_DEBUG, which has the server write to its log, plus PREPARE/EXECUTE.
_RETRYABLE = (_RELAYED - {Command.DEBUG}) | {Command.STMT_PREPARE, Command.STMT_EXECUTE}


# KILL naming a connection by id: the words before the id are kept as they are.
_KILL = re.compile(
    rb"(?is)\s*(kill(?:\s+(?:hard|soft))?(?:\s+(?:connection|query))?)\s+(\d{1,20})\s*;?\s*"
)

_UNMOVABLE_LABELS = {
    Unmovable.TEMPORARY_TABLES: "temporary tables",
    Unmovable.USER_LOCKS: "user locks from GET_LOCK",
    Unmovable.TABLE_LOCKS: "table locks from LOCK TABLES",
    Unmovable.XA: "XA transaction",
    Unmovable.USER_VARIABLES: "user variables set since Baton last read them",
    Unmovable.UNTRACKED_VARIABLES: "variables changed while it had session tracking off",
    Unmovable.SQL_PREPARED: "prepared statements made from a user variable",
    Unmovable.ROUTINE_STATE: "state left by stored routines",
}


class FailureCause(enum.StrEnum):
    """Why a command failed on the primary before any of its result reached the client."""

    READ_ONLY = "read_only"  # the server answered 1290: it is not the writable primary
    LOST = "lost"  # the connection broke; the server may have run the command
    UNREACHABLE = "unreachable"  # no connection could be made: it never ran


@dataclass
class BackendIdentity:
    """How Baton presents itself: the backend's version, collation and capabilities."""

    version: str
    capabilities: int
    collation: int


# Baton's session ids (the connection id in its greeting) start here, above any server's thread
# ids, so that `KILL <id>` can tell a Baton session from a server thread. Worker w of a
# supervisor (proxy/supervisor.py) gives ids from BASE + w * SPAN, so they are unique across
# workers and name their worker; all stay below 2^31 for clients that read them signed.
SESSION_ID_BASE = 1 << 30
SESSION_ID_SPAN = 1 << 24
SESSION_ID_END = SESSION_ID_BASE + MAX_WORKERS * SESSION_ID_SPAN


@dataclass
class ProxyContext:
    """What every client session shares: config, routing, accounts and the live sessions."""

    config: Config
    identity: BackendIdentity
    router: Router
    holder: Holder
    accounts: Accounts
    admission: Admission
    # The largest command a client may send: proxy.max_packet_size, or the primary's
    # max_allowed_packet read at start.
    max_packet: int = 64 << 20
    sessions: dict[int, ClientConnection] = field(default_factory=dict)
    _next_id: int = 0
    # Grows with every published switch; a session's backend from an older epoch is stale.
    epoch: int = 0
    # What each stored routine sessions called may leave behind (session.routine_hazards);
    # None while its body is being read or when it could not be.
    routines: dict[str, list[str] | None] = field(default_factory=dict)
    _probe: asyncio.Future[bool] | None = None
    worker: int = 0  # this process's worker index: the high bits of its session ids
    # Another worker's session by id: (its server's name, its server thread), or None.
    peer_session: Callable[[int], tuple[str, int] | None] | None = None

    def __post_init__(self) -> None:
        self.holder.probe = lambda shard: self.primary_writable()
        admin = self.config.admin
        self._admin_login = BackendLogin(admin.user, stage1(admin.password))

    def new_session_id(self) -> int:
        """The next free session id (ids wrap within their span, skipping live ones)."""
        while True:
            self._next_id = (self._next_id + 1) % SESSION_ID_SPAN
            session_id = SESSION_ID_BASE + self.worker * SESSION_ID_SPAN + self._next_id
            if session_id not in self.sessions:
                return session_id

    def session_thread(self, session_id: int, peers: bool = True) -> tuple[str, int] | None:
        """The server (by name) and server thread of a Baton session of this process, or
        (with `peers`) of another worker; None if none is known."""
        conn = self.sessions.get(session_id)
        if conn is not None:
            thread = conn.server_thread
            server = conn.backend_server
            return None if thread is None or server is None else (server.name, thread)
        if peers and self.peer_session is not None:
            return self.peer_session(session_id)
        return None

    def primary(self) -> ServerConfig:
        return self.router.primary(self.config.proxy.shard)

    def term(self) -> int:
        return self.router.term(self.config.proxy.shard)

    @property
    def can_switch(self) -> bool:
        """Does the shard have a server besides the primary? Without one no new primary can
        come, so a failed command has nothing to wait for."""
        shard = next(s for s in self.config.shards if s.name == self.config.proxy.shard)
        return len(shard.servers) > 1

    async def primary_writable(self) -> bool:
        """Does the primary still take a new connection and writes? Asked after a session
        lost its connection: yes means the loss was that connection's alone (a KILL, a
        timeout), so its client gets the error at once instead of waiting for a switch that
        is not coming. Sessions that fail together share one probe."""
        if self._probe is None or self._probe.done():
            self._probe = asyncio.ensure_future(self._probe_primary())
        return await asyncio.shield(self._probe)

    async def connect(
        self,
        server: ServerConfig,
        login: BackendLogin,
        client_caps: int,
        collation: int,
        schema: str | None,
        client: tuple[str, int] | None = None,
    ) -> BackendConnection:
        """A backend connection to `server`, logged in as `login` (the client's own account).
        With backend.proxy_protocol the server is told `client`'s address first."""
        header = b""
        if client is not None and self.config.backend.proxy_protocol:
            header = proxy_header(client, (server.host, server.port))
        return await BackendConnection.connect(
            server.host,
            server.port,
            login,
            client_caps,
            collation,
            schema,
            self.config.proxy.backend_connect_timeout,
            header,
        )

    async def inspect_routine(self, name: str) -> None:
        """Read a stored routine's body as the admin account and note what it may leave."""
        schema, _, routine = name.partition(".")

        def read() -> bytes | None:
            conn = AdminConnection(self.primary(), self.config.admin, 2.0)
            try:
                rows = conn.query(
                    "SELECT ROUTINE_DEFINITION AS body FROM information_schema.ROUTINES"
                    " WHERE ROUTINE_SCHEMA = %s AND ROUTINE_NAME = %s",
                    (schema, routine),
                )
            finally:
                conn.close()
            return rows[0]["body"].encode() if rows and rows[0]["body"] is not None else None

        try:
            body = await asyncio.to_thread(read)
        except Exception as e:  # unreachable, refused: the routine stays unknown
            log.info("cannot read stored routine %s: %s", name, e)
            self.routines.pop(name, None)
            return
        if body is not None:
            self.routines[name] = routine_hazards(body)

    async def _probe_primary(self) -> bool:
        try:
            backend = await self.connect(
                self.primary(), self._admin_login, 0, self.identity.collation, None
            )
        except BackendError:
            return False
        try:
            rows = await asyncio.wait_for(
                backend.query("SELECT @@read_only"), self.config.proxy.backend_connect_timeout
            )
            return rows[0][0] == b"0"
        except (BackendError, TimeoutError):
            return False
        finally:
            backend.close()

    # -- the router's listener: topology events, on the proxy's loop ---------------------------

    def busy(self, shard: str) -> bool:
        """Any session with a transaction open or a statement in flight on the old primary?
        A held session counts as idle: its command has not been sent."""
        return any(
            (c.busy and c.held_entry is None) or c.state.in_transaction
            for c in self.sessions.values()
        )

    async def prepare_move(self, shard: str) -> None:
        """Read back what tracking does not report, while the old primary still answers.
        The router calls this once no session is in a transaction or mid-statement."""
        for conn in list(self.sessions.values()):
            await conn.refresh_if_stale()

    def topology_event(self, event: TopologyEvent) -> None:
        if isinstance(event, ReparentStarted):
            for conn in self.sessions.values():
                if conn.state.in_transaction:
                    case = "in_transaction"  # runs to its end first, within the grace period
                elif conn.busy and conn.held_entry is None:
                    case = "in_statement"  # its statement ends on the old primary
                else:
                    case = "idle"  # held at its next command
                metrics.SWITCH_SESSIONS.labels(case).inc()
            self.holder.reparent_started(event.shard, event.term)
        elif isinstance(event, EstablishedEvent):
            self.epoch += 1
            for conn in list(self.sessions.values()):
                conn.abandon_stale(event.new_primary)
            self.holder.established(event.shard, event.term)
        elif isinstance(event, Aborted):
            self.epoch += 1
            self.holder.aborted(event.shard)


class ClientConnection(asyncio.Protocol):
    """One client socket: its login, then a byte relay of its session to a backend."""

    def __init__(self, ctx: ProxyContext, session_id: int) -> None:
        self.ctx = ctx
        self.connection_id = session_id
        self.state = SessionState(session_id=session_id, user="", client_address="?")
        self.backend: BackendConnection | None = None
        self.backend_server: ServerConfig | None = None
        self.client_caps = 0
        self.login: BackendLogin | None = None
        self._peer: tuple[str, int] | None = None
        self._nonce = b""
        # True while a command (or Baton's own query) owns the backend connection.
        self.busy = False
        # What the client sent that is not consumed yet: a bytearray read from `_inpos`, so
        # appending is amortized O(1) and taking a command never copies the rest.
        self._inbuf = bytearray()
        self._inpos = 0
        self._reader: asyncio.Future[None] | None = None  # a coroutine waits for bytes
        self._logged_in = False
        self._gone = False
        self._admitted = False
        self._infile = False
        self._paused = False
        self._backend_full = False  # the server reads our writes slower than we send
        self._streaming = 0  # bytes of a large command already passed on, packet by packet
        self._started = 0.0
        self._command_byte = 0
        self._prepare_sql = b""
        # Holding: the buffer's entry for a held command, and for one being flushed.
        self.held_entry: int | None = None
        self._held_raw = b""
        self._flushing: int | None = None
        # The unplanned path: the client's bytes of the command in progress, whether it has
        # already waited once after failing, the error it would have had, and the server
        # that may have run it (never sent there again).
        self._raw = b""
        self._failed_once = False
        self._failure: tuple[bytes, str] | None = None  # (error packet, origin)
        self._avoid: str | None = None
        self._epoch = 0
        self._client_quit = False  # the client said COM_QUIT (else its close was an abort)
        self._lost_from: tuple[ServerConfig, int] | None = None  # (server, epoch) of a loss
        self._connected_before = False  # a later connect moves the session's state
        self._client_slow = False
        self._backend_lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._transport: asyncio.Transport | None = None
        self._parser = ResponseParser(deprecate_eof=False, client_tracks=False)
        self._relayed = False
        self._write: Callable[[bytes], None] = lambda data: None

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass
        self._write = self._transport.write  # type: ignore[union-attr]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer = transport.get_extra_info("peername")
        if peer:
            self._peer = (str(peer[0]), int(peer[1]))
            self.state.client_address = f"{peer[0]}:{peer[1]}"
        ctx = self.ctx
        refusal = ctx.admission.admit(self.address)
        if refusal is not None:
            self._refuse(refusal)
            return
        self._admitted = True
        metrics.CLIENT_CONNECTIONS.inc()
        metrics.CLIENT_CONNECTIONS_TOTAL.inc()
        self._spawn(self._login_and_start())

    def data_received(self, data: bytes) -> None:
        try:
            self._inbuf += data
            self._wake()
            if self._logged_in:
                self._pump()
            if (
                (self.busy or not self._logged_in)
                and not (self._infile or self._streaming)
                and len(self._inbuf) - self._inpos > HIGH_WATER
            ):
                # Nobody takes these bytes now (a login or a command runs): let them wait in
                # the kernel, not in Baton's memory. `_pump` and `read_packet` resume reading.
                self._pause(True)
        except Exception:
            self.crashed()

    def _pause(self, paused: bool) -> None:
        if paused != self._paused and self._transport is not None:
            self._paused = paused
            if paused:
                self._transport.pause_reading()
            else:
                self._transport.resume_reading()

    def eof_received(self) -> bool:
        return False  # close the transport: connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self._gone = True
        self._write = _discard
        self._wake()
        if self.held_entry is not None:
            entry, self.held_entry = self.held_entry, None
            self.ctx.holder.cancel(entry)
        if self._task is not None:
            self._task.cancel()
        if self._logged_in:
            self.ctx.sessions.pop(self.connection_id, None)
            # A client that dropped its socket without COM_QUIT is an aborted client to the
            # server too (Aborted_clients), as it would be direct.
            self._close_backend(quit=self._client_quit)
        if self._admitted:
            self._admitted = False
            self.ctx.admission.closed()
            metrics.CLIENT_CONNECTIONS.dec()

    # The transport calls these around its write-buffer limits: a client that reads slowly
    # stops the server's results at the backend socket instead of in Baton's memory.
    def pause_writing(self) -> None:
        self.client_slow(True)

    def resume_writing(self) -> None:
        self.client_slow(False)

    @property
    def address(self) -> str:
        return self._peer[0] if self._peer else "?"

    def _wake(self) -> None:
        waiter = self._reader
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        self._reader = None

    def _consume(self, n: int) -> None:
        """Drop `n` bytes from the front of the input; the buffer is compacted once at least
        half of it was consumed, so each byte is moved at most a bounded number of times."""
        self._inpos += n
        if self._inpos >= len(self._inbuf):
            self._inbuf.clear()
            self._inpos = 0
        elif self._inpos > 65536 and self._inpos * 2 > len(self._inbuf):
            del self._inbuf[: self._inpos]
            self._inpos = 0

    async def read_packet(self, limit: int) -> tuple[int, bytes]:
        """One whole packet of at most `limit` bytes, for the login and COM_CHANGE_USER; the
        header is checked before the body is waited for."""
        while True:
            buf, pos = self._inbuf, self._inpos
            if len(buf) - pos >= 4:
                length = buf[pos] | buf[pos + 1] << 8 | buf[pos + 2] << 16
                if length > limit:
                    raise ClientPacketError(
                        Malformed.TOO_LONG, f"a packet of {length} bytes, more than {limit}"
                    )
                if len(buf) - pos >= 4 + length:
                    seq = buf[pos + 3]
                    payload = bytes(buf[pos + 4 : pos + 4 + length])
                    self._consume(4 + length)
                    return seq, payload
            if self._gone:
                raise ConnectionResetError("the client closed the connection")
            self._pause(False)
            self._reader = asyncio.get_running_loop().create_future()
            await self._reader

    def write(self, data: bytes) -> None:
        self._write(data)

    # -- login -------------------------------------------------------------------------------

    def _refuse(self, refusal: Refusal) -> None:
        """Too many connections, no descriptors to spare, or a blocked address: the error the
        server would send instead of its greeting, then close."""
        ctx = self.ctx
        metrics.CONNECTIONS_REFUSED.labels(str(refusal)).inc()
        if refusal is Refusal.BLOCKED:
            packet = ErrorKind.HOST_BLOCKED.packet(
                f"Host '{self.address}' is blocked because of many connection errors; "
                f"unblock with 'baton ctl unblock {self.address}'"
            )
        else:
            limit = (
                "proxy.max_connections"
                if refusal is Refusal.MAX_CONNECTIONS
                else ("the file descriptors Baton can spare")
            )
            packet = ErrorKind.TOO_MANY_CONNECTIONS.packet(
                f"Too many connections: Baton serves {ctx.admission.open} client connections, "
                f"the most {limit} allows"
            )
        if ctx.admission.should_log(str(refusal), time.monotonic()):
            log.warning(
                "refusing connections from %s and others (%s): %d open, capacity %d",
                self.address,
                refusal,
                ctx.admission.open,
                ctx.admission.capacity,
            )
        self._write(frame(packet, 0))
        self._transport.close()  # type: ignore[union-attr]

    async def _login_and_start(self) -> None:
        """The greeting, the login and the session's first server connection; then the relay
        takes over. A refused login gets its error and the connection closes."""
        ctx = self.ctx
        cfg = ctx.config.proxy
        try:
            async with asyncio.timeout(cfg.connect_timeout):
                verified, response = await self._authenticate()
            await self._first_backend(verified.seq)
        except LoginRefused as e:
            self._login_failed(e.reason, str(e), e.packet)
            return
        except TimeoutError:
            self._login_failed(
                LoginFailure.TIMEOUT, f"no complete login within {cfg.connect_timeout:g} s", None
            )
            return
        except (ConnectionError, asyncio.CancelledError):
            self._login_failed(LoginFailure.CLIENT_GONE, "the client went away", None)
            return
        except Exception:
            log.exception("session %d: login failed", self.connection_id)
            self._close()
            return
        finally:
            self._task = None
        if self._gone or self._transport.is_closing():  # type: ignore[union-attr]
            # The client left as its login ended (its EOF came in the loop iteration that
            # resumed this task, before connection_lost): nobody to serve, and no session of
            # its own for connection_lost to end, so the server connection is closed here.
            self._close_backend(quit=False)
            self._login_failed(LoginFailure.CLIENT_GONE, "the client went away", None)
            return
        ctx.admission.login_ok(self.address)
        self._write(make_ok(Status.AUTOCOMMIT, verified.seq))
        self._logged_in = True
        ctx.sessions[self.connection_id] = self
        self._transport.set_write_buffer_limits(high=HIGH_WATER)  # type: ignore[union-attr]
        self._pump()  # commands the client pipelined behind its login

    async def _authenticate(self) -> tuple[Any, Any]:
        ctx = self.ctx
        identity = ctx.identity
        offered = identity.capabilities
        if not ctx.config.proxy.allow_load_data_local:
            offered &= ~Cap.LOCAL_FILES
        self._nonce = new_nonce()
        self._write(
            frame(
                make_server_handshake(
                    identity.version,
                    self.connection_id,
                    offered,
                    identity.collation,
                    Status.AUTOCOMMIT,
                    self._nonce,
                ),
                0,
            )
        )
        response = await read_handshake(self, offered)
        self.client_caps = response.capabilities & offered
        self.state.collation = response.collation
        self.state.schema = response.database
        self.state.user = response.user
        self._parser = ResponseParser(
            deprecate_eof=bool(self.client_caps & Cap.DEPRECATE_EOF),
            client_tracks=bool(self.client_caps & Cap.SESSION_TRACK),
        )
        verified = await verify(
            self,
            ctx.accounts,
            self._login_settings(offered),
            response.user,
            response.auth_plugin,
            response.auth_response,
            self._nonce,
            1,
        )
        self.login = verified.login
        return verified, response

    def _login_settings(self, offered: int) -> LoginSettings:
        return LoginSettings(
            offered=offered,
            address=self.address,
            allow_unfenced=self.ctx.config.proxy.allow_unfenced_users,
        )

    async def _first_backend(self, seq: int) -> None:
        """Log the session in to the primary as its own account. The server's refusal (too
        many connections, host blocked, unknown database, a changed password) is the
        client's answer; a server that cannot be reached is not: the session starts and
        its commands wait for, or explain, the primary."""
        try:
            await self._connect_backend()
        except BackendError as e:
            if e.err is None:
                log.info("session %d: no backend yet: %s", self.connection_id, e)
                return
            if e.err.code == 1045:
                # The password changed on the server since Baton read the accounts.
                await self.ctx.accounts.reload("server refused a login", force=True)
            err = e.err
            raise LoginRefused(
                LoginFailure.SERVER_REFUSED,
                frame(make_err(err.code, err.sqlstate, err.message), seq),
                f"the server refused the login: {e.err.code} {e.err.message}",
            )

    def _login_failed(self, reason: LoginFailure, detail: str, packet: bytes | None) -> None:
        """Count, log (rate-limited), tell the client if there is something to tell, close."""
        ctx = self.ctx
        metrics.LOGIN_FAILURES.labels(str(reason)).inc()
        blocked = ctx.admission.login_failed(self.address, reason)
        if reason is not LoginFailure.CLIENT_GONE and ctx.admission.should_log(
            f"login:{reason}", time.monotonic()
        ):
            log.info(
                "login refused (%s): user %r from %s: %s",
                reason,
                self.state.user,
                self.state.client_address,
                detail,
            )
        if blocked:
            log.warning(
                "address %s blocked after %d failed logins in a row; lift with "
                "'baton ctl unblock %s'",
                self.address,
                ctx.config.proxy.max_connect_errors,
                self.address,
            )
        if packet is not None and not self._gone:
            code = int.from_bytes(packet[5:7], "little")
            metrics.ERRORS.labels(str(code), "baton").inc()
            self._write(packet)
        self._close()

    # -- backend -------------------------------------------------------------------------------

    async def _connect_backend(self) -> BackendConnection:
        """A server connection on the current primary, as the client's account, with the
        session's state restored on it."""
        # The epoch of the primary chosen now: a switch published while this connects makes
        # the new connection stale at once, and the next command moves it again.
        epoch = self.ctx.epoch
        server = self.ctx.primary()
        label = server.name
        moving = self._connected_before
        assert self.login is not None
        try:
            backend = await self.ctx.connect(
                server,
                self.login,
                self.client_caps,
                self.state.collation,
                self.state.schema,
                self._peer,
            )
            await self._restore(backend)
        except BackendError:
            metrics.BACKEND_CONNECT_FAILURES.labels(label).inc()
            metrics.BACKEND_UP.labels(label).set(0)
            if moving:
                metrics.SESSIONS_MOVED.labels("failed").inc()
            raise
        if moving:
            metrics.SESSIONS_MOVED.labels("moved").inc()
        self._attach(backend, server, epoch)
        return backend

    def _attach(self, backend: BackendConnection, server: ServerConfig, epoch: int) -> None:
        self._connected_before = True
        metrics.BACKEND_UP.labels(server.name).set(1)
        metrics.BACKEND_CONNECTIONS.labels(server.name).inc()
        self.backend = backend
        self.backend_server = server
        backend.on_full = self.backend_full
        if self._client_slow:
            backend.pause_reading(True)
        self._epoch = epoch
        self.state.backend = f"{server.name} ({server.host}:{server.port})"

    async def _restore(self, backend: BackendConnection) -> None:
        """Give a new server session this session's state: Baton's tracking, the variables
        (character set, sql_mode, time zone, ...), user variables, prepared statements. The
        schema and collation went with the login. One round trip, plus one per statement."""
        assignments = [TRACKING_ASSIGNMENTS, *self.state.restore_assignments()]
        try:
            await backend.query("SET " + ", ".join(assignments))
            for stmt in self.state.statements.values():
                parser, _ = await backend.command(
                    frame(bytes((Command.STMT_PREPARE,)) + stmt.sql, 0)
                )
                stmt.backend_id = parser.backend_stmt_id
                stmt.rebound = False
            for prepare in self.state.restore_sql_prepared():
                await backend.query(prepare)
        except BackendError as e:
            backend.close()
            raise BackendError(f"cannot restore the session's state on {backend.address}: {e}")

    async def refresh_if_stale(self) -> None:
        """Read the state back if tracking marked it stale and no command is in flight; a
        held session's backend is idle, any other session is claimed for the time."""
        state = self.state
        if (
            not state.user_variables_stale
            and not state.last_insert_id_stale
            and state.held_locks_sql() is None
        ):
            return
        claimed = self.held_entry is None
        if claimed and not self.claim():
            return
        try:
            await self.refresh_state()
        except BackendError as e:
            log.info("session %d: cannot read its state back: %s", self.connection_id, e)
        finally:
            if claimed:
                self.release()

    async def refresh_state(self) -> None:
        """Read back what tracking does not report (user variables, collation); needed before
        its state can move to another server. The caller makes sure no command is in flight."""
        async with self._backend_lock:
            backend = self.backend
            if backend is None or not backend.alive:
                return
            self.state.read_back(await backend.query(READ_BACK_SQL))
            exact = self.state.exact_strings_sql()
            if exact is not None:
                self.state.exact_strings((await backend.query(exact))[0])
            locks = self.state.held_locks_sql()
            if locks is not None:
                self.state.held_locks((await backend.query(locks))[0])

    def abandon_stale(self, primary: str) -> None:
        """A new primary was published while this session waits for an answer from another
        server: an emergency's old primary, which is hung or cut off (after a planned switch
        nothing of ours runs there: the demotion drained or killed it). Its answer would come
        late or never, and its client would wait with it; the connection is closed instead,
        and the command fails as on any lost connection (a write gets 1927: it may or may not
        have been executed)."""
        server = self.backend_server
        if (
            self.backend is not None
            and self.backend.alive
            and self.state.in_flight is not None
            and server is not None
            and server.name != primary
        ):
            log.info(
                "session %d: closing its connection to %s, which no longer leads",
                self.connection_id,
                server.name,
            )
            self.backend.close(quit=False)  # abandoned, not ended: no COM_QUIT queued

    def _close_backend(self, quit: bool = True) -> None:
        if self.backend is not None:
            self.backend.close(quit)
            assert self.backend_server is not None
            metrics.BACKEND_CONNECTIONS.labels(self.backend_server.name).dec()
        self.backend = None
        self.state.backend = ""

    async def _ensure_backend(self, raw: bytes) -> BackendConnection | None:
        """The session's backend for the command `raw`, reconnecting (with the session's state)
        to the current primary if it was lost or belongs to an older epoch; None when the
        command was answered with an error or is held for the next primary."""
        if self.backend is not None and self.backend.alive and self._epoch == self.ctx.epoch:
            return self.backend
        if self.backend is not None:
            if self.backend.alive:
                self._close_backend()  # stale: a switch was published since
            else:
                self._drop_backend()
        lost, self._lost_from = self._lost_from, None
        if lost is not None and await self._lost_alone(*lost):
            self._end_by_server(lost[0])
            return None
        if self._connected_before and self._refuse_move(lost is not None):
            return None
        if self.state.in_transaction:
            # The server rolled the transaction back when the connection went. Going on
            # silently would let the client COMMIT a transaction that no longer exists.
            self.state.status &= ~Status.IN_TRANS
            metrics.SWITCH_SESSIONS.labels("rolled_back").inc()
            self._error(
                ErrorKind.TRANSACTION_LOST,
                "The transaction was rolled back: its connection to the primary was closed "
                "(for a switch of the primary, the transaction outlived the grace period). "
                "This statement was not executed; retry the whole transaction.",
            )
            return None
        try:
            return await self._connect_backend()
        except BackendError as e:
            server = self.ctx.primary()
            error = self._error_packet(
                ErrorKind.BACKEND_UNREACHABLE,
                f"Baton cannot reach the primary {server.name} ({server.host}:{server.port}): "
                f"{e}. The statement was not executed; retry when the primary is back.",
            )
            if not (self._may_retry(raw[4]) and self._failed(FailureCause.UNREACHABLE, error)):
                self._write_error(error)
            return None

    def _refuse_move(self, lost: bool) -> bool:
        """A session whose server-side state cannot follow it to a new connection is ended
        with an error naming that state, rather than going on without it. `lost`: the old
        connection broke, so what was not read back from it is gone."""
        found = self.state.unmovable(lost, self.ctx.routines)
        if not found:
            return False
        parts = []
        for reason, names in found.items():
            metrics.SESSIONS_REFUSED.labels(str(reason)).inc()
            label = _UNMOVABLE_LABELS[reason]
            parts.append(f"{label} ({', '.join(names)})" if names else label)
        server = self.ctx.primary()
        self._error(
            ErrorKind.SESSION_NOT_MOVABLE,
            f"This session's connection to the primary was replaced (now {server.name}), and "
            f"its {'; '.join(parts)} existed only there and cannot move with it. The "
            "statement was not executed and Baton closes the session: reconnect and set them "
            "up again.",
        )
        self._close()
        return True

    # -- command phase: a callback relay ---------------------------------------------------------
    #
    # A command the session can relay as it is (the backend is up, the statement id is known)
    # goes to the backend from the client's data_received callback, and the response goes back
    # from the backend's: no task, no future. Commands that need to wait for something (a
    # reconnect, a re-authentication, Baton's own queries) run in a task; meanwhile the
    # client's next bytes wait in `_inbuf`.

    def client_slow(self, slow: bool) -> None:
        self._client_slow = slow
        if self.backend is not None:
            self.backend.pause_reading(slow)

    def backend_full(self, full: bool) -> None:
        """The server's connection has more of our writes queued than it takes (a large
        command or a LOAD DATA file): stop reading the client until it drains."""
        self._backend_full = full
        if full:
            self._pause(True)
        else:
            self._pump()

    def _close(self) -> None:
        self._gone = True
        self._write = _discard  # the transport refuses writes once closed: drop them
        if self._transport is not None:
            self._transport.close()

    def _pump(self) -> None:
        """Take whole packets from the client while the session is free to act on them."""
        if self._gone or self._backend_full:
            return
        limit = self.ctx.max_packet
        buf = self._inbuf
        while (not self.busy or self._infile or self._streaming) and len(buf) - self._inpos >= 4:
            pos = self._inpos
            length = buf[pos] | buf[pos + 1] << 8 | buf[pos + 2] << 16
            if self._streaming:
                if not self._stream_packet(pos, length, limit):
                    break
                continue
            end = pos + 4 + length
            total = length  # the command's payload, over all its packets
            while length == MAX_PAYLOAD and total <= limit:
                # A command of 16 MiB or more spans several packets.
                if len(buf) < end + 4:
                    break
                length = buf[end] | buf[end + 1] << 8 | buf[end + 2] << 16
                end += 4 + length
                total += length
            if total > limit:
                self._too_large(limit)
                return
            if not self._infile and buf[pos + 3] != 0 and length != 0:
                if length == 1 and buf[pos + 4] == Command.QUIT:
                    # MariaDB takes COM_QUIT whatever its sequence id (some clients send it
                    # mid-sequence when they close).
                    self._client_quit = True
                    self._close()
                    return
                self._protocol_error(
                    ErrorKind.PACKETS_OUT_OF_ORDER,
                    "Got packets out of order: a command must start at sequence id 0",
                    seq=(buf[pos + 3] + 1) & 0xFF,
                )
                return
            if (
                total >= MAX_PAYLOAD
                and len(buf) >= pos + 4 + MAX_PAYLOAD
                and not self._infile
                and self._can_stream(buf[pos + 4])
            ):
                # Large commands go on packet by packet as they arrive, not kept whole.
                self._start_stream(pos)
                continue
            if len(buf) < end or length == MAX_PAYLOAD:
                break  # the rest of the command has not arrived yet
            raw = bytes(buf[pos:end])
            self._consume(end - pos)
            if self._infile:
                self._infile_packet(raw)
            elif end == pos + 4:
                self._protocol_error(None, "empty command packet")
                return
            else:
                self._failed_once = False  # a new command from the client
                if self._should_hold():
                    self._hold(raw)
                else:
                    self._command(raw)
            if self._gone:
                return
        if not self.busy or self._infile or self._streaming:
            self._pause(False)

    def _too_large(self, limit: int) -> None:
        self._protocol_error(
            ErrorKind.PACKET_TOO_LARGE,
            f"Got a packet bigger than max_allowed_packet ({limit} bytes); the statement was "
            "not executed and Baton closes the connection",
        )

    def _can_stream(self, command: int) -> bool:
        """A large command is passed on packet by packet only when it would be relayed at
        once; one that must wait (held, or for a reconnect) is kept whole."""
        backend = self.backend
        return (
            command == Command.QUERY
            and backend is not None
            and backend.alive
            and self._epoch == self.ctx.epoch
            and not self._should_hold()
        )

    def _start_stream(self, pos: int) -> None:
        buf = self._inbuf
        first = bytes(buf[pos : pos + 4 + MAX_PAYLOAD])
        self._consume(4 + MAX_PAYLOAD)
        self._raw = b""  # its bytes are not kept: it can never be sent again
        self._command_byte = first[4]
        self._started = time.perf_counter()
        self._streaming = MAX_PAYLOAD
        self._send(first[4], first)

    def _stream_packet(self, pos: int, length: int, limit: int) -> bool:
        """The next packet of a large command; False when it has not arrived whole."""
        end = pos + 4 + length
        if len(self._inbuf) < end:
            return False
        self._streaming += length
        if self._streaming > limit:
            self._drop_backend()
            self._too_large(limit)
            return False
        packet = bytes(self._inbuf[pos:end])
        self._consume(end - pos)
        if length < MAX_PAYLOAD:
            self._streaming = 0
        backend = self.backend
        if backend is not None and backend.alive:
            backend.write(packet)
        return True

    def _protocol_error(self, kind: ErrorKind | None, message: str, seq: int = 1) -> None:
        log.info("session %d: closing: %s", self.connection_id, message)
        metrics.CLIENT_PROTOCOL_ERRORS.inc()
        if kind is not None:
            self._write_error(frame(kind.packet(message), seq))
        self._close()

    def _command(self, raw: bytes) -> None:
        command = raw[4]
        self._raw = raw
        self._command_byte = command
        self._started = time.perf_counter()
        if command == Command.QUIT:
            self._client_quit = True
            self._close()
            return
        backend = self.backend
        ready = backend is not None and backend.alive and self._epoch == self.ctx.epoch
        if ready and (
            command == Command.PROCESS_KILL
            or (command == Command.QUERY and len(raw) > 9 and raw[5] | 0x20 == 0x6B)  # k, K
        ):
            # Translated only on a current connection: a thread id means one server.
            killed = self._kill(raw)
            if killed is None:
                self._finish()
                return
            command, raw = Command.QUERY, killed
        if command in _RELAYED or command == Command.PROCESS_KILL:
            if ready:
                self._send(command, raw)
                return
        elif command in STMT_HEADER:
            try:
                client_id = check_stmt_header(raw[4:])
            except ClientPacketError as e:
                if command not in (Command.STMT_CLOSE, Command.STMT_SEND_LONG_DATA):
                    # The server's answer to a truncated header (it answers neither of those).
                    self._error(ErrorKind.MALFORMED_PACKET, f"Malformed communication packet: {e}")
                self._finish()
                return
            stmt = self.state.statements.get(client_id)
            if stmt is None:
                self._unknown_statement(command, client_id)
                self._finish()
                return
            if command == Command.STMT_CLOSE or command == Command.STMT_SEND_LONG_DATA:
                # No response: write it and go on with the next command.
                if ready:
                    assert backend is not None
                    backend.write(raw[:4] + with_stmt_id(raw[4:], stmt.backend_id))
                if command == Command.STMT_CLOSE:
                    del self.state.statements[client_id]
                self._finish()
                return
            if ready:
                if command == Command.STMT_EXECUTE:
                    payload = stmt.execute_payload(raw[4:])
                    raw = frame(payload, 0) if len(payload) != len(raw) - 4 else raw[:4] + payload
                else:
                    raw = raw[:4] + with_stmt_id(raw[4:], stmt.backend_id)
                self._send(command, raw)
                return
        elif command == Command.STMT_PREPARE:
            if ready:
                self._send(command, raw, self.state.reserve_statement_id())
                return
        elif command == Command.RESET_CONNECTION:
            if ready:
                self._send(command, raw)
                return
        elif command != Command.CHANGE_USER:
            name = COMMAND_NAMES.get(command, f"0x{command:02x}")
            self._error(
                ErrorKind.UNKNOWN_COMMAND,
                f"Unknown command: Baton does not relay COM_{name.upper()}",
            )
            self._finish()
            return
        self.busy = True
        self._spawn(self._slow_command(command, raw))

    def _kill(self, raw: bytes) -> bytes | None:
        """`KILL [CONNECTION | QUERY] <id>` (or COM_PROCESS_KILL) naming a Baton session: the
        same KILL of that session's server thread, sent on this session's own connection, so
        that the server allows it exactly when it would direct (the same user, or CONNECTION
        ADMIN). Any other statement or id goes to the server unchanged. None when answered
        here (no such session)."""
        if raw[4] == Command.PROCESS_KILL:
            if len(raw) < 9:
                self._error(ErrorKind.MALFORMED_PACKET, "Malformed communication packet")
                return None
            words, target = b"KILL", int.from_bytes(raw[5:9], "little")
        else:
            m = _KILL.fullmatch(raw, 5)
            if m is None:
                return raw
            words, target = m.group(1), int(m.group(2))
        if not SESSION_ID_BASE <= target < SESSION_ID_END:
            return raw if raw[4] == Command.QUERY else frame(b"\x03KILL %d" % target, 0)
        found = self.ctx.session_thread(target)
        here = self.backend_server
        if found is None or here is None or found[0] != here.name:
            self._error(ErrorKind.NO_SUCH_THREAD, f"Unknown thread id: {target}")
            return None
        return frame(b"\x03" + words + b" %d" % found[1], 0)

    @property
    def server_thread(self) -> int | None:
        """The server's thread id of this session's connection, if it has one."""
        backend = self.backend
        if backend is None or not backend.alive or backend.handshake is None:
            return None
        return backend.handshake.connection_id

    async def _slow_command(self, command: int, raw: bytes) -> None:
        """Commands that must wait: a reconnect first, or a re-authentication."""
        try:
            if command == Command.CHANGE_USER:
                if not await self._change_user(raw):
                    self._close()
                    return
            else:
                if await self._ensure_backend(raw) is not None:
                    self._command(raw)  # the backend is ready now: the usual path
                    return
                if self.held_entry is not None:
                    return  # held for the next primary: not finished yet
        except BackendError as e:
            if not self._lost_backend(e):
                self._close()
                return
        except asyncio.CancelledError:
            return
        except Exception:
            self.crashed()
            return
        finally:
            self._task = None
        self._finish()

    def _send(self, command: int, raw: bytes, client_stmt_id: int = 0) -> None:
        """Relay one command; `_response_done` is called back when its response has passed."""
        self.busy = True
        parser = self._parser
        parser.begin(
            command,
            client_stmt_id=client_stmt_id,
            infile_allowed=self.ctx.config.proxy.allow_load_data_local,
            withhold_read_only=self._may_retry(command),
        )
        self.state.in_flight = COMMAND_NAMES.get(command)
        self._relayed = False
        if command == Command.STMT_PREPARE:
            self._prepare_sql = raw[5:]
        assert self.backend is not None
        self.backend.send(raw, parser, self._sink, self._response_done)

    def _sink(self, data: bytes) -> None:
        self._relayed = True
        self._write(data)

    def _infile_packet(self, raw: bytes) -> None:
        """LOAD DATA LOCAL: the client's file goes to the server, up to the empty packet."""
        backend = self.backend
        if backend is None or not backend.alive:
            return  # _response_done has already reported the loss
        if len(raw) > 4:
            backend.write(raw)
            return
        self._infile = False
        self._parser.resume_after_infile()
        backend.send(raw, self._parser, self._sink, self._response_done)

    def crashed(self) -> None:
        """A bug must cost this one connection, never leave its client waiting."""
        log.exception("session %d: closing after an internal error", self.connection_id)
        self._close()

    def _response_done(self, exc: BaseException | None) -> None:
        try:
            self._response_finished(exc)
        except Exception:
            self.crashed()

    def _response_finished(self, exc: BaseException | None) -> None:
        parser = self._parser
        if exc is not None and self._gone:
            # The client left first (its connection_lost closed this backend): nobody to
            # answer, nothing to hold or run again.
            self._drop_backend()
            return
        if exc is not None:
            retry = not self._relayed and not self._infile and self._may_retry(parser.command)
            self._infile = False
            if retry:
                self._drop_backend()
                self._spawn(self._after_loss(exc))  # type: ignore[arg-type]
                return
            if not self._lost_backend(exc):  # type: ignore[arg-type]
                self._close()
                return
            self._finish()
            return
        if parser.phase is Phase.INFILE:
            self._infile = True
            self._pump()
            return
        state = self.state
        state.in_flight = None
        if parser.withheld is not None:
            error = frame(parser.withheld, 1)
            if not self._failed(FailureCause.READ_ONLY, error, origin="backend"):
                self._write_error(error, "backend")
                self._finish()
            return
        command = parser.command
        changed = state.apply(parser.status, parser.tracked)
        err = parser.err
        retrack = False
        if err is not None:
            metrics.ERRORS.labels(str(err.code), "backend").inc()
        elif command == Command.QUERY:
            retrack = self._after_statement(self._raw, 5, changed)
        elif command == Command.STMT_EXECUTE:
            stmt = state.statements.get(check_stmt_header(self._raw[4:]))
            if stmt is not None:
                retrack = self._after_statement(stmt.sql, 0, changed)
        elif command == Command.STMT_PREPARE:
            state.add_statement(
                parser.client_stmt_id,
                parser.backend_stmt_id,
                self._prepare_sql,
                parser.prepare_params,
                parser.prepare_columns,
            )
        elif command == Command.RESET_CONNECTION:
            state.reset(state.schema)
            retrack = True
        if retrack:
            self._spawn(self._retrack())
            return
        self._finish()

    def _after_statement(self, sql: bytes, start: int, changed: bool) -> bool:
        """What the statement just run did that the server's reports leave out (its text from
        `start`); True when Baton must set its session tracking again."""
        ok = self._parser.ok
        state = self.state
        retrack = state.after_statement(
            sql, start, changed, ok.last_insert_id if ok is not None else 0
        )
        if state.routines:
            self._inspect_routines()
        return retrack

    def _inspect_routines(self) -> None:
        """Read the body of every stored routine the session called that Baton has not read
        yet (once per routine, through the admin account): what it may leave behind decides
        whether the session can move."""
        for name in self.state.routines - self.ctx.routines.keys():
            self.ctx.routines[name] = None
            asyncio.get_running_loop().create_task(self.ctx.inspect_routine(name))

    async def _retrack(self) -> None:
        """Set Baton's session tracking again: after COM_RESET_CONNECTION the server forgot
        it, and a statement of the client's may have changed it."""
        try:
            assert self.backend is not None
            await self.backend.query(TRACKING_SQL)
        except BackendError as e:
            log.info("session %d: lost backend after reset: %s", self.connection_id, e)
            self._close_backend()
        except asyncio.CancelledError:
            return
        finally:
            self._task = None
        self._finish()

    def _finish(self) -> None:
        """The command is over: account for it and take the next one."""
        _STATS.observe(self._command_byte, time.perf_counter() - self._started)
        self.busy = False
        if self._flushing is not None:
            entry, self._flushing = self._flushing, None
            self.ctx.holder.flushed(entry)
        self._pump()

    # -- holding -------------------------------------------------------------------------------

    def _should_hold(self) -> bool:
        """Hold at the next command while the shard switches; a transaction runs to its end
        on the old primary first (up to the demotion's grace period)."""
        return self.ctx.holder.should_hold(self.ctx.config.proxy.shard) and not (
            self.state.in_transaction
        )

    def _hold(self, raw: bytes) -> None:
        self._started = time.perf_counter()
        self._command_byte = raw[4]
        self._wait(raw, lambda: self.ctx.holder.hold(self, self.connection_id, self._shard))

    def _wait(self, raw: bytes, hold: Callable[[], int | None]) -> bool:
        """Keep `raw` until the buffer flushes or evicts it; False if the buffer refused."""
        self.busy = True
        self._held_raw = raw
        self.held_entry = -1  # the buffer may answer within hold()
        entry = hold()
        if entry is None:
            self.held_entry = None
            self._held_raw = b""
            return False
        if self.held_entry == -1:
            self.held_entry = entry
        return True

    @property
    def _shard(self) -> str:
        return self.ctx.config.proxy.shard

    # -- the unplanned path: a command that failed for want of a writable primary --------------

    def _may_retry(self, command: int) -> bool:
        """Could this command wait for the next primary if it fails on this one? Only once,
        only outside a transaction (the server rolled the rest of it back), and only commands
        that can be sent again as they are."""
        return (
            command in _RETRYABLE
            and bool(self._raw)
            and not self._failed_once
            and not self.state.in_transaction
        )

    def _failed(
        self,
        cause: FailureCause,
        error: bytes,
        avoid: str | None = None,
        origin: str = "baton",
        hopeless: bool = False,
    ) -> bool:
        """Hold the command that just failed (nothing of its result reached the client) until
        a newer primary is published; its client gets `error` if none comes in time. `avoid`
        names the server that may have run it: it is never sent there again. False (nothing
        held) when `hopeless`, or during a flush: it failed on the primary just published."""
        raw = self._raw
        term = self.ctx.term()
        held = (
            not hopeless
            and self._flushing is None
            and self.ctx.can_switch
            and self._wait(
                raw,
                lambda: self.ctx.holder.hold_failed(self, self.connection_id, self._shard, term),
            )
        )
        metrics.FAILED_COMMANDS.labels(str(cause), "held" if held else "passed").inc()
        if held:
            self._failed_once = True
            self._failure = (error, origin)
            self._avoid = avoid
            log.info("session %d: holding a command that failed (%s)", self.connection_id, cause)
        return held

    async def _after_loss(self, exc: BackendError) -> None:
        """The connection broke before any of the result reached the client.

        A command that may have written is not run again anywhere: its commit can reach a
        replica before the connection breaks, and that replica may be the next primary.
        (Measured: an INSERT re-run after kill -9 met its own row there in about a third of
        kills.) Its client gets 2013, which says the statement may have run. A read waits for
        the next primary, unless the primary still takes writes: then the loss was this
        connection's alone (a KILL, a timeout) and the client hears of it now."""
        server = self.backend_server
        error = self._error_packet(ErrorKind.BACKEND_LOST, self._loss_message(exc))
        hopeless = not self._reads_only()
        lost = self._lost_from
        if not hopeless and lost is not None:
            # A read waits for the next primary unless the loss was this session's alone;
            # a write's client hears at once, and its next command finds out which it was.
            self._lost_from = None
            try:
                alone = await self._lost_alone(*lost)
            except asyncio.CancelledError:
                return
            if alone:
                self._write_error(error)
                self._end_by_server(lost[0])
                return
        if not self._failed(
            FailureCause.LOST, error, server.name if server else None, hopeless=hopeless
        ):
            self._write_error(error)
            self._finish()

    def _reads_only(self) -> bool:
        """May the command in progress run twice? Yes if it executes nothing (a PING, a
        PREPARE) or is a read."""
        raw = self._raw
        command = raw[4]
        if command == Command.QUERY:
            return reads_only(raw, 5)
        if command == Command.STMT_EXECUTE:
            stmt = self.state.statements.get(check_stmt_header(raw[4:]))
            return stmt is not None and reads_only(stmt.sql)
        return True

    def resume_held(self, entry: int, to_new: bool) -> None:
        """The buffer let this command go: move to the current primary, then run it."""
        raw, self._held_raw = self._held_raw, b""
        self.held_entry = None
        self._flushing = entry
        self._spawn(self._run_held(raw))

    async def _run_held(self, raw: bytes) -> None:
        try:
            failure, self._failure = self._failure, None
            if failure is not None and self.ctx.primary().name == self._avoid:
                # The reparent was aborted: the only primary is the server that may have run it.
                self._write_error(*failure)
                self._finish()
                return
            async with self._backend_lock:
                backend = await self._ensure_backend(raw)
            if backend is None:
                self._finish()
            else:
                self._command(raw)
        except asyncio.CancelledError:
            return
        except Exception:
            self.crashed()

    def evict_held(self, entry: int, reason: EvictReason, message: str) -> None:
        """Give up on a held command. One that failed on the primary gets the error it had
        then; one held before it was sent gets Baton's own, saying it never ran."""
        self._held_raw = b""
        self.held_entry = None
        failure, self._failure = self._failure, None
        if failure is not None:
            self._write_error(*failure)
        else:
            self._error(
                ErrorKind.HELD_EVICTED,
                f"Baton held this statement while the primary was switched and gave up: "
                f"{message}. The statement was never executed; it is safe to retry.",
            )
        self._finish()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        task.add_done_callback(self._spawned_done)
        self._task = task

    def _spawned_done(self, task: asyncio.Task[None]) -> None:
        """A session task that ended in an exception is a bug: it costs this session only,
        with one log line, never an unretrieved task exception."""
        if not task.cancelled() and task.exception() is not None:
            log.error(
                "session %d: closing after an internal error",
                self.connection_id,
                exc_info=task.exception(),
            )
            self._close()

    def claim(self) -> bool:
        """Claim an idle session for Baton's own queries; False when a command is running."""
        if self.busy:
            return False
        self.busy = True
        return True

    def release(self) -> None:
        self.busy = False
        self._pump()

    def _unknown_statement(self, command: int, client_id: int) -> None:
        if command in (Command.STMT_CLOSE, Command.STMT_SEND_LONG_DATA):
            return  # the server answers neither, not even with an error
        self._error(
            ErrorKind.UNKNOWN_STATEMENT,
            f"Unknown prepared statement handler ({client_id}) given to "
            f"{COMMAND_NAMES[command].replace('stmt_', 'mysqld_stmt_')}",
        )

    async def _change_user(self, raw: bytes) -> bool:
        """COM_CHANGE_USER: check the new login as at connect (always after an auth switch,
        as MariaDB does), then give the session a server connection as the new account. A
        refusal is the error the server would send, and the session stays as it was. False
        when the client cannot be answered any more."""
        ctx = self.ctx
        try:
            change = parse_change_user(raw[4:], self.client_caps)
        except ClientPacketError as e:
            self._error(ErrorKind.MALFORMED_PACKET, f"Malformed communication packet: {e}")
            return True
        try:
            verified = await verify(
                self,
                ctx.accounts,
                self._login_settings(self.client_caps),
                change.user,
                change.auth_plugin,
                change.auth_response,
                None,
                0,
            )
        except LoginRefused as e:
            metrics.LOGIN_FAILURES.labels(str(e.reason)).inc()
            log.info(
                "session %d: change of user to %r refused: %s", self.connection_id, change.user, e
            )
            if e.packet is not None:
                self._write_error(e.packet)
            return e.reason is not LoginFailure.BAD_HANDSHAKE
        collation = change.collation if change.collation is not None else self.state.collation
        epoch = ctx.epoch
        server = ctx.primary()
        try:
            backend = await ctx.connect(
                server, verified.login, self.client_caps, collation, change.database, self._peer
            )
        except BackendError as e:
            err = e.err
            if err is None:
                err_packet = ErrorKind.BACKEND_UNREACHABLE.packet(
                    f"Baton cannot reach the primary {server.name} to change user: {e}"
                )
            else:
                err_packet = make_err(err.code, err.sqlstate, err.message)
            self._write_error(frame(err_packet, verified.seq))
            return True
        self._close_backend()
        self.login = verified.login
        self.state.user = change.user
        self.state.collation = collation
        self.state.reset(change.database)
        try:
            await self._restore(backend)  # only Baton's tracking: the new session is empty
        except BackendError as e:
            lost = ErrorKind.BACKEND_LOST.packet(self._loss_message(e))
            self._write_error(frame(lost, verified.seq))
            return True
        self._attach(backend, server, epoch)
        self._write(make_ok(Status.AUTOCOMMIT, verified.seq))
        return True

    # -- errors ----------------------------------------------------------------------------------

    def _error(self, kind: ErrorKind, message: str) -> None:
        self._write_error(self._error_packet(kind, message))

    @staticmethod
    def _error_packet(kind: ErrorKind, message: str) -> bytes:
        return frame(kind.packet(message), 1)

    def _write_error(self, packet: bytes, origin: str = "baton") -> None:
        """Send an error packet, Baton's own or one the backend sent (counted by origin)."""
        metrics.ERRORS.labels(str(int.from_bytes(packet[5:7], "little")), origin).inc()
        self._write(packet)

    def _drop_backend(self) -> None:
        """The server connection broke: remember where and when, so that the next command can
        tell a switch (move on) from the server ending this session (as direct: it ends)."""
        server = self.backend_server
        if server is not None:
            metrics.BACKEND_LOST.labels(server.name).inc()
            self._lost_from = (server, self._epoch)
        self._close_backend()
        self.state.in_flight = None

    async def _lost_alone(self, server: ServerConfig, epoch: int) -> bool:
        """Was the loss this session's alone (a KILL, its wait_timeout, a network fault on
        this connection)? Yes when no switch came since, none is under way, and the server
        is still the primary and takes writes. Sessions that lose their connections
        together share one probe."""
        ctx = self.ctx
        if epoch != ctx.epoch or ctx.holder.should_hold(self._shard):
            return False
        if ctx.primary().name != server.name:
            return False
        return await ctx.primary_writable()

    def _end_by_server(self, server: ServerConfig) -> None:
        """The server ended this session on its own terms: the client's connection ends too,
        and its library reports the loss (2013 or 2006) as it would direct. Moving the session
        to a new connection would hide the end and lose what the server dropped with it."""
        metrics.SESSIONS_ENDED_BY_SERVER.inc()
        log.info(
            "session %d: %s ended its connection (a KILL, wait_timeout, or a fault on it) while "
            "it is the writable primary; closing the client connection",
            self.connection_id,
            server.name,
        )
        self._close()

    @staticmethod
    def _loss_message(e: BackendError) -> str:
        return (
            f"Lost connection to the primary during the statement ({e}); it may or may not "
            "have been executed. The session's state on the server is gone; reconnect."
        )

    def _lost_backend(self, e: BackendError) -> bool:
        """The backend died under a command: tell the client if the protocol still allows it."""
        self._drop_backend()
        if self._relayed:
            log.info("session %d: backend lost mid-response, closing: %s", self.connection_id, e)
            return False
        self._error(ErrorKind.BACKEND_LOST, self._loss_message(e))
        return True


def _discard(data: bytes) -> None:
    """A closed client's writes."""


class ProxyServer:
    """The listening socket: a `ClientConnection` for every client that connects."""

    def __init__(self, ctx: ProxyContext) -> None:
        self.ctx = ctx
        self._server: asyncio.AbstractServer | None = None

    async def start(self, host: str, port: int, sock: socket.socket | None = None) -> None:
        """Listen on host:port, or accept from `sock` (a worker's, bound by its supervisor)."""
        loop = asyncio.get_running_loop()
        ctx = self.ctx
        factory = lambda: ClientConnection(ctx, ctx.new_session_id())  # noqa: E731
        if sock is not None:
            self._server = await loop.create_server(factory, sock=sock, backlog=1024)
            return
        self._server = await loop.create_server(
            factory, host, port, reuse_address=True, backlog=1024
        )

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
