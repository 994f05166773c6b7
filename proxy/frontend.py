"""The client-facing side: mysql-mimic for accept, handshake and login; Baton's own command relay.

mysql-mimic answers queries and prepared statements itself, which a proxy must not do, and it
keeps a session going after a failed login. So Baton uses its server loop, handshake parsing and
auth plugins, sends its own HandshakeV10 (the backend's version, collation and the capabilities
both sides share), closes the connection on any failed login, and replaces the command phase
with a relay that forwards each command to the session's backend connection.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import socket
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from mysql_mimic import packets as mimic_packets
from mysql_mimic.auth import IdentityProvider, NativePasswordAuthPlugin, User
from mysql_mimic.charset import CharacterSet
from mysql_mimic.connection import Connection
from mysql_mimic.errors import ErrorCode
from mysql_mimic.server import MysqlServer
from mysql_mimic.session import BaseSession
from mysql_mimic.stream import ConnectionClosed, MysqlStream
from mysql_mimic.types import Capabilities, ServerStatus

from proxy import metrics
from proxy.backend import BackendConnection, BackendError
from proxy.buffer import EvictReason
from proxy.errors import ErrorKind
from proxy.hold import Holder
from proxy.packets import (
    COMMAND_NAMES,
    MAX_PAYLOAD,
    Cap,
    Command,
    Status,
    frame,
    make_server_handshake,
    stmt_id,
    with_stmt_id,
)
from proxy.response import Phase, ResponseParser
from proxy.router import Router
from proxy.session import READ_BACK_SQL, SessionState, Unmovable, reads_only
from reparent.config import Config, ServerConfig
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
_STMT_COMMANDS = frozenset(
    {
        Command.STMT_EXECUTE,
        Command.STMT_FETCH,
        Command.STMT_RESET,
        Command.STMT_SEND_LONG_DATA,
        Command.STMT_CLOSE,
    }
)


# Commands that may wait for the next primary after failing on this one: they carry everything
# needed to send them again (a cursor's FETCH does not: its cursor died with the connection).
# The relayed ones but COM_DEBUG, which has the server write to its log, plus PREPARE/EXECUTE.
_RETRYABLE = (_RELAYED - {Command.DEBUG}) | {Command.STMT_PREPARE, Command.STMT_EXECUTE}


_UNMOVABLE_LABELS = {
    Unmovable.TEMPORARY_TABLES: "temporary tables",
    Unmovable.USER_LOCKS: "user locks from GET_LOCK",
    Unmovable.TABLE_LOCKS: "table locks from LOCK TABLES",
    Unmovable.XA: "XA transaction",
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


@dataclass
class ProxyContext:
    """What every client session shares: config, routing, identity and the live sessions."""

    config: Config
    identity: BackendIdentity
    router: Router
    holder: Holder
    sessions: dict[int, ClientConnection] = field(default_factory=dict)
    next_id: int = 1
    # Grows with every published switch; a session's backend from an older epoch is stale.
    epoch: int = 0
    _probe: asyncio.Future[bool] | None = None

    def __post_init__(self) -> None:
        self.holder.probe = lambda shard: self.primary_writable()

    def primary(self) -> ServerConfig:
        return self.router.primary(self.config.proxy.shard)

    def term(self) -> int:
        return self.router.store.read(self.config.proxy.shard).value.term

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
        self, server: ServerConfig, client_caps: int, collation: int, schema: str | None
    ) -> BackendConnection:
        """A backend connection to `server` as Baton's backend account."""
        cfg = self.config
        return await BackendConnection.connect(
            server.host,
            server.port,
            cfg.backend.user,
            cfg.backend.password,
            client_caps,
            collation,
            schema,
            cfg.proxy.backend_connect_timeout,
        )

    async def _probe_primary(self) -> bool:
        try:
            backend = await self.connect(self.primary(), 0, self.identity.collation, None)
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


class ConfigIdentityProvider(IdentityProvider):
    """The users from the config, with mysql_native_password only."""

    def __init__(self, users: dict[str, str]) -> None:
        self._users = {
            name: NativePasswordAuthPlugin.create_auth_string(pw) for name, pw in users.items()
        }

    def get_plugins(self) -> list[NativePasswordAuthPlugin]:  # type: ignore[override]
        return [NativePasswordAuthPlugin()]

    async def get_user(self, username: str) -> User | None:
        auth = self._users.get(username)
        if auth is None:
            return None
        return User(name=username, auth_string=auth, auth_plugin=NativePasswordAuthPlugin.name)


class LoginFailed(Exception):
    """Authentication failed; the client has its error and the connection must close."""


class _NoSession(BaseSession):
    """mysql-mimic wants a session object; Baton's state lives in SessionState instead."""


class ClientConnection(Connection):
    """One client session: login through mysql-mimic, then a byte relay to its backend."""

    def __init__(self, stream: MysqlStream, ctx: ProxyContext, session_id: int) -> None:
        identity = ctx.identity
        server_caps = identity.capabilities
        if not ctx.config.proxy.allow_load_data_local:
            server_caps &= ~Cap.LOCAL_FILES
        super().__init__(
            stream=stream,
            session=_NoSession(),
            control=None,  # type: ignore[arg-type]
            identity_provider=ConfigIdentityProvider(
                {u.user: u.password for u in ctx.config.users}
            ),
            server_capabilities=Capabilities(server_caps & 0xFFFFFFFF),
        )
        self.ctx = ctx
        self.connection_id = session_id
        self.status_flags = ServerStatus.SERVER_STATUS_AUTOCOMMIT
        peer = stream.writer.get_extra_info("peername")
        self.state = SessionState(
            session_id=session_id,
            user="",
            client_address=f"{peer[0]}:{peer[1]}" if peer else "?",
        )
        self.backend: BackendConnection | None = None
        self.backend_server: ServerConfig | None = None
        self.client_caps = 0
        # True while a command (or Baton's own query) owns the backend connection.
        self.busy = False
        self._inbuf = b""
        self._infile = False
        self._paused = False
        self._feed_stream = False
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
        self._connected_before = False  # a later connect moves the session's state
        self._client_slow = False
        self._backend_lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._closed: asyncio.Future[None] = asyncio.get_event_loop().create_future()
        self._transport: asyncio.Transport = stream.writer.transport  # type: ignore[assignment]
        self._parser = ResponseParser(deprecate_eof=False, client_tracks=False)
        self._relayed = False
        self._login_user = ""
        self._write: Callable[[bytes], None] = self._transport.write

    # mysql-mimic reads these from its own session variables, which Baton does not keep; they
    # only encode its login errors and auth-switch requests.
    @property
    def server_charset(self) -> CharacterSet:
        return CharacterSet.utf8mb4

    @property
    def client_charset(self) -> CharacterSet:
        return CharacterSet.utf8mb4

    # -- login ---------------------------------------------------------------------------

    async def _start(self) -> None:
        """Login, then relay; a failed login ends here, before any backend is touched."""
        try:
            await self.connection_phase()
        except (LoginFailed, ConnectionError, ConnectionClosed, asyncio.IncompleteReadError):
            return
        except Exception as e:
            log.info("session %d: handshake failed: %s", self.connection_id, e)
            metrics.CLIENT_PROTOCOL_ERRORS.inc()
            return
        self.ctx.sessions[self.connection_id] = self
        try:
            try:
                await self._connect_backend()
            except BackendError as e:
                # The session stays: each command retries and explains with an error packet.
                log.info("session %d: no backend yet: %s", self.connection_id, e)
            await self.command_phase()
        finally:
            self.ctx.sessions.pop(self.connection_id, None)
            self._close_backend()

    async def connection_phase(self) -> None:
        plugin = self.identity_provider.get_default_plugin()
        auth_data, auth_state = await plugin.start()
        assert isinstance(auth_data, bytes)
        self.handshake_auth_data = auth_data
        self.handshake_auth_plugin = plugin.name
        identity = self.ctx.identity
        await self.stream.write(
            make_server_handshake(
                identity.version,
                self.connection_id,
                int(self.server_capabilities),
                identity.collation,
                Status.AUTOCOMMIT,
                auth_data.rstrip(b"\x00"),
            )
        )
        data = await self.stream.read()
        response = mimic_packets.parse_handshake_response(
            capabilities=self.server_capabilities, data=data
        )
        if not isinstance(response, mimic_packets.HandshakeResponse41):
            # An SSL request: Baton offers no TLS, so a client that insists cannot go on.
            raise LoginFailed()
        self.capabilities = response.capabilities
        self.client_caps = int.from_bytes(data[:4], "little") & int(self.server_capabilities)
        self.state.collation = data[8]
        self.state.schema = response.database or None
        self._parser = ResponseParser(
            deprecate_eof=bool(self.client_caps & Cap.DEPRECATE_EOF),
            client_tracks=bool(self.client_caps & Cap.SESSION_TRACK),
        )
        await self.authenticate(
            auth_state=auth_state,
            server_plugin=plugin,
            username=response.username,
            client_plugin_name=response.client_plugin,
            auth_response=response.auth_response,
            connect_attrs=response.connect_attrs,
        )
        self.stream.reset_seq()

    async def authenticate(self, username: str, **kwargs: object) -> None:  # type: ignore[override]
        """mysql-mimic's login, but a refusal always ends the connection."""
        self.session.username = None
        self._login_user = username
        if await self.identity_provider.get_user(username) is None:
            await self._deny(username)
        await super().authenticate(username=username, **kwargs)  # type: ignore[arg-type]
        if self.session.username != username:
            metrics.LOGIN_FAILURES.inc()
            raise LoginFailed()
        self.state.user = username

    async def _deny(self, username: str) -> None:
        """An unknown user gets the same answer as a wrong password: nothing to probe."""
        await self.stream.write(self._access_denied(username))
        metrics.LOGIN_FAILURES.inc()
        raise LoginFailed()

    def _access_denied(self, username: str) -> bytes:
        host = self.state.client_address.rsplit(":", 1)[0]
        return ErrorKind.ACCESS_DENIED.packet(
            f"Access denied for user '{username}'@'{host}' (using password: YES)"
        )

    def error(self, **kwargs: Any) -> bytes:
        """mysql-mimic's login errors, with the server's wording and SQLSTATE for a refusal."""
        if kwargs.get("code") == ErrorCode.ACCESS_DENIED_ERROR:
            return self._access_denied(self._login_user)
        return super().error(**kwargs)

    # -- backend -------------------------------------------------------------------------------

    async def _connect_backend(self) -> BackendConnection:
        # The epoch of the primary chosen now: a switch published while this connects makes
        # the new connection stale at once, and the next command moves it again.
        epoch = self.ctx.epoch
        server = self.ctx.primary()
        label = server.name
        moving = self._connected_before
        try:
            backend = await self.ctx.connect(
                server, self.client_caps, self.state.collation, self.state.schema
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
        self._connected_before = True
        metrics.BACKEND_UP.labels(label).set(1)
        metrics.BACKEND_CONNECTIONS.labels(label).inc()
        self.backend = backend
        self.backend_server = server
        if self._client_slow:
            backend.pause_reading(True)
        self._epoch = epoch
        self.state.backend = f"{server.name} ({server.host}:{server.port})"
        return backend

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
        except BackendError as e:
            backend.close()
            raise BackendError(f"cannot restore the session's state on {backend.address}: {e}")

    async def refresh_if_stale(self) -> None:
        """Read the state back if tracking marked it stale and no command is in flight; a
        held session's backend is idle, any other session is claimed for the time."""
        if not self.state.user_variables_stale and self.state.held_locks_sql() is None:
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
        and the command fails as on any lost connection (a write gets 2013, "may or may not
        have been executed")."""
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
            self.backend.close()

    def _close_backend(self) -> None:
        if self.backend is not None:
            self.backend.close()
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
            self._close_backend()
        if self._connected_before and self._refuse_move():
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

    def _refuse_move(self) -> bool:
        """A session whose server-side state cannot follow it to a new connection is ended
        with an error naming that state, rather than going on without it."""
        found = self.state.unmovable()
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
    # After login the socket is handed to a Protocol. A command the session can relay as it is
    # (the backend is up, the statement id is known) goes to the backend from the client's
    # data_received callback, and the response goes back from the backend's: no task, no future.
    # Commands that need to wait for something (a reconnect, a re-authentication, Baton's own
    # queries) run in a task; meanwhile the client's next bytes wait in `_inbuf`.

    async def command_phase(self) -> None:
        loop = asyncio.get_running_loop()
        self._closed = loop.create_future()
        reader = self.stream.reader
        leftover = bytes(reader._buffer)  # type: ignore[attr-defined]  # sent right after login
        reader._buffer.clear()  # type: ignore[attr-defined]
        self._transport.set_protocol(_ClientProtocol(self))
        self._transport.set_write_buffer_limits(high=HIGH_WATER)
        # A client that sent more than the stream reader's limit right after login (while the
        # backend connected) got its socket paused by the reader, which nobody reads any more:
        # reading resumes here, and the relay's own back-pressure takes over.
        self._transport.resume_reading()
        if leftover:
            self.on_client_data(leftover)
        try:
            await self._closed
        finally:
            if self._task is not None:
                self._task.cancel()

    def on_client_data(self, data: bytes) -> None:
        if self._feed_stream:
            # A task is reading through mysql-mimic's stream (COM_CHANGE_USER's auth switch).
            self.stream.reader.feed_data(data)
            return
        self._inbuf = self._inbuf + data if self._inbuf else data
        if self.busy and len(self._inbuf) > HIGH_WATER and not self._paused:
            self._paused = True
            self._transport.pause_reading()
        self._pump()

    def client_slow(self, slow: bool) -> None:
        self._client_slow = slow
        if self.backend is not None:
            self.backend.pause_reading(slow)

    def on_client_lost(self) -> None:
        if self.held_entry is not None:
            entry, self.held_entry = self.held_entry, None
            self.ctx.holder.cancel(entry)
        if not self._closed.done():
            self._closed.set_result(None)

    def _close(self) -> None:
        self._transport.close()
        self.on_client_lost()

    def _pump(self) -> None:
        """Take whole packets from the client while the session is free to act on them."""
        if self._closed.done():
            return
        limit = self.ctx.config.proxy.max_packet_size
        while (not self.busy or self._infile) and len(self._inbuf) >= 4:
            buf = self._inbuf
            length = buf[0] | buf[1] << 8 | buf[2] << 16
            end = 4 + length
            while length == MAX_PAYLOAD and end - 4 <= limit:
                # A command of 16 MiB or more spans several packets.
                if len(buf) < end + 4:
                    break
                length = buf[end] | buf[end + 1] << 8 | buf[end + 2] << 16
                end += 4 + length
            if end - 4 > limit:
                self._protocol_error(
                    ErrorKind.PACKET_TOO_LARGE,
                    f"Got a packet bigger than max_packet_size ({limit} bytes); "
                    "closing the connection",
                )
                return
            if len(buf) < end or length == MAX_PAYLOAD:
                break  # the rest of the command has not arrived yet
            if len(buf) == end:
                raw, self._inbuf = buf, b""
            else:
                raw, self._inbuf = buf[:end], buf[end:]
            if self._infile:
                self._infile_packet(raw)
            elif raw[3] != 0 or end == 4:
                self._protocol_error(None, "malformed command packet")
                return
            else:
                self._failed_once = False  # a new command from the client
                if self._should_hold():
                    self._hold(raw)
                else:
                    self._command(raw)
            if self._closed.done():
                return
        if self._paused and not self.busy:
            self._paused = False
            self._transport.resume_reading()

    def _protocol_error(self, kind: ErrorKind | None, message: str) -> None:
        log.info("session %d: closing: %s", self.connection_id, message)
        metrics.CLIENT_PROTOCOL_ERRORS.inc()
        if kind is not None:
            self._error(kind, message)
        self._close()

    def _command(self, raw: bytes) -> None:
        command = raw[4]
        self._raw = raw
        self._command_byte = command
        self._started = time.perf_counter()
        if command == Command.QUIT:
            self._close()
            return
        backend = self.backend
        ready = backend is not None and backend._lost is None and self._epoch == self.ctx.epoch
        if command in _RELAYED:
            if ready:
                self._send(command, raw)
                return
        elif command in _STMT_COMMANDS:
            client_id = stmt_id(raw[4:]) if len(raw) >= 9 else -1
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
        if backend is None or backend._lost is not None:
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
        if parser._phase is Phase.INFILE:
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
        if state.apply(parser.status, parser.tracked) and command == Command.QUERY:
            state.note_statement(self._raw[5:])
        err = parser.err
        if err is not None:
            metrics.ERRORS.labels(str(err.code), "backend").inc()
        elif command == Command.QUERY:
            state.note_locks(self._raw, 5)
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
            self._spawn(self._retrack())
            return
        self._finish()

    async def _retrack(self) -> None:
        """After COM_RESET_CONNECTION the server forgot Baton's tracking settings too."""
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
        return command in _RETRYABLE and not self._failed_once and not self.state.in_transaction

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
        if not hopeless:
            try:
                hopeless = await self.ctx.primary_writable()
            except asyncio.CancelledError:
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
            stmt = self.state.statements.get(stmt_id(raw[4:]))
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
        self._task = asyncio.get_running_loop().create_task(coro)

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
        """Re-authenticate against Baton's users, then give the backend session a clean slate."""
        self.stream.seq.value = 1
        change = mimic_packets.parse_com_change_user(
            capabilities=self.capabilities, client_charset=self.client_charset, data=raw[5:]
        )
        self._feed_stream = True
        try:
            await self.authenticate(
                username=change.username,
                auth_response=change.auth_response,
                client_plugin_name=change.client_plugin,
                connect_attrs=change.connect_attrs or {},
            )
        except LoginFailed:
            return False
        finally:
            self._feed_stream = False
            self.stream.reset_seq()
        self.state.reset(change.database or None)
        backend = self.backend
        if backend is not None and backend.alive:
            await backend.command(frame(bytes((Command.RESET_CONNECTION,)), 0))
            await backend.query(TRACKING_SQL)
            if change.database:
                await backend.command(
                    frame(bytes((Command.INIT_DB,)) + change.database.encode(), 0)
                )
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
        server = self.backend_server
        if server is not None:
            metrics.BACKEND_LOST.labels(server.name).inc()
        self._close_backend()
        self.state.in_flight = None

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


class _ClientProtocol(asyncio.Protocol):
    """The client socket's protocol after login; everything goes to the ClientConnection."""

    __slots__ = ("conn",)

    def __init__(self, conn: ClientConnection) -> None:
        self.conn = conn

    def data_received(self, data: bytes) -> None:
        try:
            self.conn.on_client_data(data)
        except Exception:
            self.conn.crashed()

    def connection_lost(self, exc: Exception | None) -> None:
        self.conn.on_client_lost()

    def eof_received(self) -> bool:
        self.conn.on_client_lost()
        return False

    # The transport calls these around its write-buffer limits: a client that reads slowly
    # stops the server's results at the backend socket instead of in Baton's memory.
    def pause_writing(self) -> None:
        self.conn.client_slow(True)

    def resume_writing(self) -> None:
        self.conn.client_slow(False)


class ProxyServer(MysqlServer):
    """mysql-mimic's accept loop, creating Baton's ClientConnection for each socket."""

    def __init__(self, ctx: ProxyContext) -> None:
        super().__init__()
        self.ctx = ctx

    async def _client_connected_cb(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        session_id = self.ctx.next_id
        self.ctx.next_id += 1
        metrics.CLIENT_CONNECTIONS.inc()
        metrics.CLIENT_CONNECTIONS_TOTAL.inc()
        conn = ClientConnection(MysqlStream(reader, writer), self.ctx, session_id)
        try:
            await conn._start()
        except Exception:
            log.exception("session %d failed", session_id)
        finally:
            metrics.CLIENT_CONNECTIONS.dec()
            writer.close()
