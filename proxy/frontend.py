"""The client-facing side: accept, login, then a callback relay of each command to its server.

Every client socket gets a `ClientConnection`, an asyncio Protocol: a thin shell around the
session machine (proxy/session_machine.py), which decides what happens to every command. Before
login the shell only buffers bytes (bounded) for the login coroutine (proxy/login.py), which
checks the client against the servers' own accounts and logs the session in to the primary as
that account; any refusal is the error the server would send, and the connection closes. After
login the shell cuts the client's bytes into commands, reports each to the machine and carries
out the machine's actions: relay the command (translating statement ids and KILL), hold it,
connect, probe, write an error, close. A relayed command goes from the client's
`data_received` to the server and its response back from the server's, with no task and no
future: one machine call each way. Only what must wait (a connect, a probe, a login) runs in a
task. A client that asks for TLS gets it before its login (`start_tls`, proxy/tls.py): the
transport is swapped and nothing after the login knows.
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import time
from collections.abc import Callable, Coroutine
from typing import Any

from proxy import metrics
from proxy.admission import LoginFailure, Refusal
from proxy.auth import nonce as new_nonce
from proxy.backend import BackendConnection, BackendError, BackendLogin, Relay
from proxy.classify import Verdict as Classified
from proxy.classify import about_previous
from proxy.client_packets import (
    STMT_HEADER,
    ClientPacketError,
    Malformed,
    check_stmt_header,
    parse_change_user,
)
from proxy.compression import CompressedStream
from proxy.context import SESSION_ID_BASE, SESSION_ID_END, ProxyContext
from proxy.errors import ErrorKind
from proxy.holder import Released, Verdict
from proxy.link import ServerLink
from proxy.login import (
    LoginMethod,
    LoginRefused,
    LoginSettings,
    Verified,
    read_handshake,
    verify,
)
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
    with_stmt_id,
)
from proxy.pools import PoolRefused
from proxy.readpath import (
    ReplicaConn,
    SessionReads,
    causal_wait,
    connect_replica,
    execute_payload,
    prepare_on,
)
from proxy.readroute import Fallback, Step, causal_step, session_allows_replica, state_changed
from proxy.response import Phase as ResponsePhase
from proxy.response import ResponseParser
from proxy.session import SessionState
from proxy.session_machine import (
    NEXT,
    RELAYED,
    SEND,
    Actions,
    Close,
    CloseReason,
    Do,
    EndTicket,
    Failed,
    Phase,
    Refused,
    RolledBack,
    SessionMachine,
    WriteError,
    error_packet,
    loss_message,
)
from proxy.tls import upgrade
from reparent.config import CausalReads, RoutingMode, ServerConfig

log = logging.getLogger(__name__)

# Stop reading a client that sends this much ahead of its answers.
HIGH_WATER = 1 << 20
_STATS = metrics.COMMAND_STATS

# KILL naming a connection by id: the words before the id are kept as they are. The tail is
# `\s*(?:;\s*)?`, not `\s*;?\s*`: two adjacent runs of spaces backtrack quadratically over a
# client's long run of them, stalling the event loop.
_KILL = re.compile(
    rb"(?is)\s*(kill(?:\s+(?:hard|soft))?(?:\s+(?:connection|query))?)\s+(\d{1,20})\s*(?:;\s*)?"
)
# Plain names for the hot path (an enum member is an attribute lookup each time).
_LOGIN, _IDLE, _INFILE, _CLOSED = Phase.LOGIN, Phase.IDLE, Phase.INFILE, Phase.CLOSED
_QUIT, _QUERY, _PROCESS_KILL = int(Command.QUIT), int(Command.QUERY), int(Command.PROCESS_KILL)
_INFILE_RESPONSE = ResponsePhase.INFILE
_STMT_EXECUTE, _STMT_CLOSE = int(Command.STMT_EXECUTE), int(Command.STMT_CLOSE)


class ClientConnection(asyncio.Protocol):
    """One client socket: its login, then a byte relay of its session to a server.

    Mutable attributes: the transport and its write, the input buffer's read offset and its
    waiter, four flow-control flags, and four for the command in progress (when it started,
    its command byte, whether any of its result reached the client, the task it waits in).
    The session's lifecycle is the machine's; its server connection is the link's."""

    def __init__(self, ctx: ProxyContext, session_id: int, read_only: bool = False) -> None:
        self.ctx = ctx
        self.connection_id = session_id
        self.state = SessionState(session_id=session_id, user="", client_address="?")
        # Read routing (proxy/readpath.py): None when every command goes to the primary. A
        # session of the read listener is read-only on the server (its writes get 1792).
        routing = ctx.config.routing
        self.reads: SessionReads | None = None
        if ctx.read_pool is not None and (read_only or routing.mode is RoutingMode.SPLIT):
            self.reads = SessionReads(self.state)
        if read_only:
            self.state.variables["tx_read_only"] = "1"
        self.machine = SessionMachine(self.state, ctx)
        self.machine.shares = ctx.pools is not None  # [pool] multiplex
        self.link = ServerLink(ctx, self.state, self.backend_full)
        self._holder = ctx.holder
        self._shard = ctx.config.proxy.shard
        self._parser = ResponseParser(deprecate_eof=False, client_tracks=False)
        # What the client sent that is not consumed yet: a bytearray read from `_inpos`, so
        # appending is amortized O(1) and taking a command never copies the rest.
        self._inbuf = bytearray()
        self._inpos = 0
        self._reader: asyncio.Future[None] | None = None  # a coroutine waits for bytes
        self._transport: asyncio.Transport | None = None
        self._write: Callable[[bytes], None] = _discard
        self._admitted = False
        self._paused = False
        self._backend_full = False  # the server reads our writes slower than we send
        self._pumping = False  # `_take` is running: a nested `_pump` leaves the work to it
        self._streaming = 0  # bytes of a large command already passed on, packet by packet
        self._started = 0.0
        self._command_byte = 0
        self._relayed = False
        self._task: asyncio.Task[None] | None = None
        # The compressed protocol, once the login's OK is out and if the client asked for it;
        # what `_pump` wrote, deflated together when it returns.
        self._zip: CompressedStream | None = None
        self._zqueue: list[bytes] = []
        self._zends = True  # the queue's last write ends a packet
        self._secure = False  # the client's connection is under TLS
        self._gone = False  # connection_lost has run
        # A server connection the login made (ed25519), with its server and epoch.
        self._login_backend: BackendConnection | None = None
        self._login_server: tuple[ServerConfig, int] | None = None
        self._login_method = LoginMethod.NATIVE

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass
        self._write = self._transport.write  # type: ignore[union-attr]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer = transport.get_extra_info("peername")
        if peer:
            self.link.peer = (str(peer[0]), int(peer[1]))
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
            zipped = self._zip
            if zipped is None:
                self._inbuf += data
            else:
                zipped.feed(data)  # inflated as the session takes it (`_pump`, `read_packet`)
            self._wake()
            phase = self.machine.phase
            if phase is not _LOGIN:
                self._pump()
                phase = self.machine.phase
            if (
                phase is not _IDLE
                and phase is not _INFILE
                and not self._streaming
                and len(self._inbuf) - self._inpos + (zipped.pending if zipped else 0) > HIGH_WATER
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
        if self._gone:
            return
        self._gone = True
        self._write = _discard
        self._wake()
        self._carry_out(self.machine.close(CloseReason.GONE))
        if self._task is not None:
            self._task.cancel()
        self.ctx.sessions.pop(self.connection_id, None)
        # A client that dropped its socket without COM_QUIT is an aborted client to the
        # server too (Aborted_clients), as it would be direct. (After COM_QUIT the connection
        # was closed with its own COM_QUIT already.)
        self.link.close(quit=False)
        if self.reads is not None:
            self.reads.close_all(quit=False)
        if self._admitted:
            self._admitted = False
            self.ctx.admission.closed()
            metrics.CLIENT_CONNECTIONS.dec()

    # The transport calls these around its write-buffer limits: a client that reads slowly
    # stops the server's results at the backend socket instead of in Baton's memory.
    def pause_writing(self) -> None:
        self.link.slow(True)
        if self.reads is not None:
            self.reads.slow(True)

    def resume_writing(self) -> None:
        self.link.slow(False)
        if self.reads is not None:
            self.reads.slow(False)

    @property
    def address(self) -> str:
        peer = self.link.peer
        return peer[0] if peer else "?"

    def _wake(self) -> None:
        waiter = self._reader
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        self._reader = None

    def _consume(self, n: int) -> None:
        """Drop `n` bytes from the front of the input; the buffer is compacted once at least
        half of it was consumed, so each byte is moved at most a bounded number of times."""
        self._inpos += n
        if self._zip is not None:
            self._zip.consumed(n)
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
            if self.machine.phase is _CLOSED:
                raise ConnectionResetError("the client closed the connection")
            if self._zip is not None:
                data = self._zip.inflate()
                if data is not None:
                    self._inbuf += data
                    continue
            self._pause(False)
            self._reader = asyncio.get_running_loop().create_future()
            await self._reader

    def write(self, data: bytes) -> None:
        self._write(data)

    async def start_tls(self) -> None:
        """The client sent an SSL request: the rest of its connection is TLS (proxy/tls.py).
        A handshake that fails ends the connection; there is no way left to send it an
        error it could read."""
        tls = self.ctx.tls
        raw = self._transport
        assert tls is not None and raw is not None
        # From here the socket's bytes are TLS's: reading stops now (start_tls resumes it for
        # the TLS layer), and what was read already goes to TLS first.
        raw.pause_reading()
        self._paused = False  # the TLS transport starts reading
        early = bytes(self._inbuf[self._inpos :])
        self._consume(len(early))
        try:
            transport = await upgrade(raw, self, tls.context, early)
        except BaseException as e:
            # A failed handshake (ssl.SSLError is an OSError), or the task cancelled by the
            # login's timeout or by connection_lost (the TLS layer may report the loss).
            metrics.CLIENT_TLS.labels("failed").inc()
            if not isinstance(e, OSError | TimeoutError):
                raise
            raw.close()
            self.connection_lost(None)  # else no one would: the loss came mid-handshake
            raise LoginRefused(LoginFailure.BAD_HANDSHAKE, None, f"TLS handshake failed: {e}")
        metrics.CLIENT_TLS.labels("ok").inc()
        self._transport = transport
        self._write = transport.write
        self._secure = True

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
        self._close(CloseReason.LOGIN_FAILED)

    async def _login_and_start(self) -> None:
        """The greeting, the login and the session's first server connection; then the relay
        takes over. A refused login gets its error and the connection closes."""
        ctx = self.ctx
        cfg = ctx.config.proxy
        try:
            async with asyncio.timeout(cfg.connect_timeout):
                seq = await self._authenticate()
            await self._first_backend(seq)
        except LoginRefused as e:
            self._login_failed(e.reason, str(e), self._unreadable_accounts(e) or e.packet)
            return
        except TimeoutError:
            self._login_failed(
                LoginFailure.TIMEOUT, f"no complete login within {cfg.connect_timeout:g} s", None
            )
            return
        except (ConnectionError, asyncio.CancelledError):
            self._login_failed(LoginFailure.CLIENT_GONE, "the client went away", None)
            return
        if self.machine.phase is _CLOSED or self._transport.is_closing():  # type: ignore[union-attr]
            # The client left as its login ended (its EOF came in the loop iteration that
            # resumed this task, before connection_lost): nobody to serve, and no session of
            # its own for connection_lost to end, so the server connection is closed here.
            self.link.close(quit=False)
            self._login_failed(LoginFailure.CLIENT_GONE, "the client went away", None)
            return
        ctx.admission.login_ok(self.address)
        metrics.LOGINS.labels(str(self._login_method)).inc()
        self._write(make_ok(Status.AUTOCOMMIT, seq))
        if self.link.client_caps & Cap.COMPRESS:
            self._compress()
        self.machine.logged_in()
        ctx.sessions[self.connection_id] = self
        self._transport.set_write_buffer_limits(high=HIGH_WATER)  # type: ignore[union-attr]
        self._pump()  # commands the client pipelined behind its login

    async def _authenticate(self) -> int:
        """The greeting and the client's login, checked; the sequence id to answer with."""
        ctx = self.ctx
        identity = ctx.identity
        offered = identity.capabilities
        if not ctx.config.proxy.allow_load_data_local:
            offered &= ~Cap.LOCAL_FILES
        if ctx.config.proxy.compression:
            offered |= Cap.COMPRESS
        tls = ctx.tls
        if tls is not None:
            offered |= Cap.SSL
        nonce = new_nonce()
        self._write(
            frame(
                make_server_handshake(
                    identity.version,
                    self.connection_id,
                    offered,
                    identity.collation,
                    Status.AUTOCOMMIT,
                    nonce,
                    ctx.config.proxy.auth_plugin,
                ),
                0,
            )
        )
        seq, response = await read_handshake(self, offered, tls is not None and tls.require)
        link = self.link
        link.client_caps = response.capabilities & offered
        self.state.collation = response.collation
        self.state.schema = response.database
        self.state.user = response.user
        self._parser.deprecate_eof = bool(link.client_caps & Cap.DEPRECATE_EOF)
        self._parser.client_tracks = bool(link.client_caps & Cap.SESSION_TRACK)
        verified = await self._verify(
            response.user,
            response.auth_plugin,
            response.auth_response,
            nonce,
            seq,
            response.collation,
            response.database,
        )
        link.login = verified.login
        self._login_backend = verified.backend
        self._login_method = verified.method
        return verified.seq

    async def _verify(
        self,
        user: str,
        plugin: str,
        auth: bytes,
        nonce: bytes | None,
        seq: int,
        collation: int,
        schema: str | None,
    ) -> Verified:
        """The login's check (proxy/login.py). A login that must reach the primary at once
        (ed25519) opens the connection here; the primary and epoch it was made with are kept
        in `_login_server` for the session to adopt it."""
        ctx = self.ctx
        link = self.link

        async def open_backend(login: BackendLogin, relay: Relay) -> BackendConnection:
            epoch, server = ctx.epoch, ctx.primary()
            backend = await ctx.connect(
                server, login, link.client_caps, collation, schema, link.peer, relay
            )
            self._login_server = (server, epoch)
            return backend

        return await verify(
            self,
            ctx.accounts,
            self._login_settings(),
            user,
            plugin,
            auth,
            nonce,
            seq,
            ctx.rsa_key,
            open_backend,
        )

    def _login_settings(self) -> LoginSettings:
        return LoginSettings(
            secure=self._secure,
            address=self.address,
            allow_unfenced=self.ctx.config.proxy.allow_unfenced_users,
            plugin=self.ctx.config.proxy.auth_plugin,
        )

    def _unreadable_accounts(self, refused: LoginRefused) -> bytes | None:
        """An unknown user while Baton has never read the servers' accounts (a server that
        refuses Baton's admin login, a CA that does not verify the servers): the client is told
        that, in the server's words for an unreachable source, not a bare "access denied"."""
        accounts = self.ctx.accounts
        if (
            refused.reason is not LoginFailure.UNKNOWN_USER
            or len(accounts.book)
            or not (accounts.error)
        ):
            return None
        assert refused.packet is not None
        return frame(
            ErrorKind.BACKEND_UNREACHABLE.packet(
                f"Baton cannot read the accounts from the servers to check this login: "
                f"{accounts.error}"
            ),
            refused.packet[3],
        )

    async def _first_backend(self, seq: int) -> None:
        """Log the session in to the primary as its own account. The server's refusal (too
        many connections, host blocked, unknown database, a changed password) is the
        client's answer; a server that cannot be reached is not: the session starts and
        its commands wait for, or explain, the primary. A session that shares connections
        borrows one from its account's pool (which checks the login and the schema the same
        way) and gives it back: it holds none while idle. A login passed through to the primary
        (ed25519) keeps the connection it made, and never shares: Baton cannot log in again
        for it."""
        backend, self._login_backend = self._login_backend, None
        try:
            if backend is not None:
                self.state.single_login = True
                self.machine.shares = False
                await self.link.adopt(backend, *self._login_server)
            elif self.machine.shares:
                await self.link.borrow()
                self.link.give_back()
            else:
                await self.link.connect()
        except PoolRefused as e:
            raise LoginRefused(
                LoginFailure.SERVER_REFUSED,
                frame(ErrorKind.TOO_MANY_CONNECTIONS.packet(str(e)), seq),
                str(e),
            )
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
        if packet is not None and self.machine.phase is not _CLOSED:
            code = int.from_bytes(packet[5:7], "little")
            metrics.ERRORS.labels(str(code), "baton").inc()
            self._write(packet)
        self._close(CloseReason.LOGIN_FAILED)

    # -- the command phase: the client's bytes, cut into commands ----------------------------

    def backend_full(self, full: bool) -> None:
        """The server's connection has more of our writes queued than it takes (a large
        command or a LOAD DATA file): stop reading the client until it drains."""
        self._backend_full = full
        if full:
            self._pause(True)
        else:
            self._pump()

    def _pump(self) -> None:
        """Take whole packets from the client while the session is free to act on them. A
        command Baton answers itself ends within `_take`, whose NEXT calls this again: that
        call returns at once and the running loop takes the next command, so thousands of
        pipelined ones do not nest thousands of calls deep."""
        if self.machine.phase is _CLOSED or self._backend_full or self._pumping:
            return
        self._pumping = True
        try:
            self._take()
            if self._zip is not None:
                while self._inflate():
                    self._take()
        finally:
            self._pumping = False
            if self._zqueue:
                self._zflush()

    # -- the compressed protocol: a layer around the client's byte stream ------------------

    def _compress(self) -> None:
        """The login's OK is out and the client asked for compression: from here on what it
        sends is inflated before `_take` reads it, and what it is sent is deflated, Baton's own
        packets and relayed responses alike. Bytes it pipelined behind its login are already
        compressed."""
        metrics.COMPRESSED_SESSIONS.inc()
        zipped = self._zip = CompressedStream()
        zipped.feed(self._inbuf[self._inpos :])
        self._inbuf.clear()
        self._inpos = 0
        self._write = self._zwrite
        self._sink = self._zsink  # type: ignore[method-assign]

    def _inflate(self) -> bool:
        """Inflate the client's next compressed packet into the input, while the session can
        take what it holds or holds less than HIGH_WATER; True when it did."""
        zipped = self._zip
        machine = self.machine
        phase = machine.phase
        if (
            zipped is None
            or phase is _CLOSED
            or self._backend_full
            or (
                phase is not _IDLE
                and phase is not _INFILE
                and not self._streaming
                and len(self._inbuf) - self._inpos >= HIGH_WATER
            )
        ):
            return False
        try:
            data = zipped.inflate()
        except ClientPacketError as e:
            kind = e.kind
            self._protocol_error(
                ErrorKind.PACKETS_OUT_OF_ORDER
                if kind is Malformed.OUT_OF_ORDER
                else ErrorKind.UNCOMPRESS,
                str(e),
            )
            return False
        if data is None:
            return False
        self._inbuf += data
        return True

    def _renumber(self, pos: int, seq: int) -> None:
        """Give the packet at `pos` of a command of 16 MiB or more the sequence id the server
        expects of its `seq`-th packet. Compressing clients need not number the packets inside
        compressed ones (libmariadb sends them all as 0, which the server, reading compressed,
        ignores), but the server leg is plain and checks them."""
        self._inbuf[pos + 3] = seq & 0xFF

    def _zwrite(self, data: bytes) -> None:
        self._zsend(data, True)

    def _zsink(self, data: bytes) -> None:
        self._relayed = True
        if self._write is not _discard:  # else the client is closed: drop it, as `_sink` does
            self._zsend(data, not self._parser.mid_packet)

    def _zsend(self, data: bytes, ends_packet: bool) -> None:
        """Deflate and write; inside `_pump` (answers to pipelined commands, Baton's own
        errors) the writes wait for its end and go as one compressed packet."""
        if self._pumping:
            self._zqueue.append(data)
            self._zends = ends_packet
            return
        self._zemit(data, ends_packet)

    def _zflush(self) -> None:
        queue = self._zqueue
        data = queue[0] if len(queue) == 1 else b"".join(queue)
        queue.clear()
        self._zemit(data, self._zends)

    def _zemit(self, data: bytes, ends_packet: bool) -> None:
        assert self._zip is not None and self._transport is not None
        pieces = self._zip.pack(data, ends_packet)
        if len(pieces) == 1:
            self._transport.write(pieces[0])
        elif pieces:
            self._transport.writelines(pieces)

    def _take(self) -> None:
        machine = self.machine
        limit = self.ctx.max_packet
        buf = self._inbuf
        while (
            (machine.phase is _IDLE or machine.phase is _INFILE or self._streaming)
            and len(buf) - self._inpos >= 4
            and not self._backend_full
        ):
            pos = self._inpos
            length = buf[pos] | buf[pos + 1] << 8 | buf[pos + 2] << 16
            if self._streaming:
                if not self._stream_packet(pos, length, limit):
                    break
                continue
            infile = machine.phase is _INFILE
            first = length  # the first packet's: the sequence check below is about it
            end = pos + 4 + length
            total = length  # the command's payload, over all its packets
            while length == MAX_PAYLOAD and total <= limit:
                # A command of 16 MiB or more spans several packets.
                if len(buf) < end + 4:
                    break
                length = buf[end] | buf[end + 1] << 8 | buf[end + 2] << 16
                if self._zip is not None and not infile:
                    self._renumber(end, total // MAX_PAYLOAD)
                end += 4 + length
                total += length
            if total > limit:
                self._too_large(limit)
                return
            if not infile and buf[pos + 3] != 0 and first != 0:
                if first == 1 and len(buf) == pos + 4:
                    break  # its byte decides: a COM_QUIT is taken at any sequence id
                if first == 1 and buf[pos + 4] == _QUIT:
                    # MariaDB takes COM_QUIT whatever its sequence id (some clients send it
                    # mid-sequence when they close).
                    self._close(CloseReason.QUIT)
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
                and not infile
                and self._can_stream(buf[pos + 4])
            ):
                # Large commands go on packet by packet as they arrive, not kept whole.
                self._start_stream(pos)
                continue
            if len(buf) < end or length == MAX_PAYLOAD:
                break  # the rest of the command has not arrived yet
            raw = bytes(buf[pos:end])
            self._consume(end - pos)
            if infile:
                self._infile_packet(raw)
            elif end == pos + 4:
                self._protocol_error(None, "empty command packet")
                return
            else:
                self._command(raw)
            if machine.phase is _CLOSED:
                return
        # Not while the server takes our writes slower than they come (backend_full resumes).
        if (
            machine.phase is _IDLE or machine.phase is _INFILE or self._streaming
        ) and not self._backend_full:
            self._pause(False)

    def _command(self, raw: bytes) -> None:
        """A whole command from the client: the machine decides, the shell carries it out."""
        command = raw[4]
        if command == _QUIT:
            self._close(CloseReason.QUIT)
            return
        self._command_byte = command
        self._started = time.perf_counter()
        reads = self.reads
        if reads is not None:
            reads.tried = frozenset()
            reads.primary_only = False
            previous, reads.last = reads.last, None
            if self._route_read(raw, previous):
                return
        self._primary(raw)

    def _primary(self, raw: bytes) -> None:
        """The command goes to the primary (or waits for it, or is held)."""
        holder = self._holder
        hold = holder.active and holder.should_hold(self._shard)
        link = self.link
        backend = link.backend  # (link.ready, inline: this is the hot path)
        ready = backend is not None and backend.alive and link.epoch == self.ctx.epoch
        actions = self.machine.command(raw, hold, ready or self._unready())
        if actions is SEND:
            self._relay(raw)
        else:
            self._carry_out(actions)

    # -- reads on replicas (proxy/readpath.py) ----------------------------------------------------

    def _route_read(self, raw: bytes, previous: str | None = None) -> bool:
        """Send the command to a replica if it is a read that may run on one and one
        qualifies (True); else the caller sends it to the primary. `previous`: the replica
        the previous command ran on, where SHOW WARNINGS and the like must run too."""
        reads = self.reads
        assert reads is not None
        reads.kind = "write"
        if reads.primary_only:
            return False
        verdict = self._classify(raw)
        if verdict is None or not verdict.replica:
            if (
                previous is not None
                and raw[4] == _QUERY
                and reads.ready(previous) is not None
                and about_previous(raw, 5)
            ):
                reads.kind = "read"
                reads.target = previous
                self._carry_out(self.machine.read(raw))
                return True
            return False
        reads.kind = "read"
        if not session_allows_replica(self.state):
            metrics.READ_FALLBACKS.labels(str(Fallback.SESSION_STATE)).inc()
            return False
        ctx = self.ctx
        assert ctx.read_pool is not None
        avoid = reads.avoid()
        target = ctx.read_pool.choose(ctx.primary().name, time.monotonic(), avoid)
        if target is None:
            reason = (
                Fallback.REPLICA_FAILED
                if reads.tried
                else Fallback.SESSION_STATE
                if avoid
                else Fallback.NO_REPLICA
            )
            metrics.READ_FALLBACKS.labels(str(reason)).inc()
            return False
        reads.target = target
        self._carry_out(self.machine.read(raw))
        return True

    def _classify(self, raw: bytes) -> Classified | None:
        """The classifier's verdict on a query or on an executed statement's text; None for
        any other command (a cursor, a statement given long data, one not known)."""
        command = raw[4]
        if command == _QUERY:
            return self.ctx.classifier(raw, 5)
        if command != _STMT_EXECUTE or len(raw) < 14 or raw[9] != 0:  # raw[9]: cursor flags
            return None
        client_id = int.from_bytes(raw[5:9], "little")
        stmt = self.state.statements.get(client_id)
        if stmt is None or client_id in self.reads.long_data:  # type: ignore[union-attr]
            return None
        return self.ctx.classifier(stmt.sql)

    def _read(self) -> None:
        """READ: run the command on the replica chosen, at once when its connection is
        ready and nothing must be waited for; else in a task."""
        reads = self.reads
        assert reads is not None and reads.target is not None
        name = reads.target
        conn = reads.ready(name)
        if conn is not None and self._causal(conn) is Step.GO and self._prepared(conn):
            self._send_read(conn)
        else:
            self._spawn(self._read_after_setup(name))

    def _causal(self, conn: ReplicaConn) -> Step:
        state = self.state
        last = state.last_gtid
        pool = self.ctx.read_pool
        assert pool is not None
        mode = self.ctx.config.routing.causal_reads
        known = bool(last) and mode is CausalReads.LOCAL and pool.covers(conn.server.name, last)
        return causal_step(mode, last, conn.covered, known)

    def _prepared(self, conn: ReplicaConn) -> bool:
        raw = self.machine.raw
        return raw[4] != _STMT_EXECUTE or int.from_bytes(raw[5:9], "little") in conn.statements

    async def _read_after_setup(self, name: str) -> None:
        """Connect to the replica (with the session's state), wait there for the session's
        write (causal reads), prepare the statement there; then send the read. A failure
        routes it again without this replica: nothing of it ran."""
        ctx, reads, link, state = self.ctx, self.reads, self.link, self.state
        assert reads is not None and ctx.read_pool is not None
        routing = ctx.config.routing
        try:
            conn = reads.ready(name)
            if conn is None:
                reads.drop(name)
                conn = await connect_replica(
                    lambda s: ctx.connect(
                        s, link.login, link.client_caps, state.collation, state.schema, link.peer
                    ),
                    ctx.server(name),
                    state,
                    reads.version,
                )
                reads.adopt(conn)
            step = self._causal(conn)
            position = state.last_gtid
            if step is Step.READ_PRIMARY_POSITION:
                position = await self._primary_position()
                if position is None:
                    self._read_on_primary(Fallback.NO_POSITION)
                    return
                step = Step.WAIT if position else Step.GO
            if step is Step.WAIT:
                started = time.perf_counter()
                applied = await causal_wait(conn.backend, position, routing.causal_timeout)
                metrics.CAUSAL_WAIT_SECONDS.observe(time.perf_counter() - started)
                metrics.CAUSAL_WAITS.labels("applied" if applied else "timeout").inc()
                if not applied:
                    self._read_on_primary(Fallback.CAUSAL_TIMEOUT)
                    return
                conn.covered = position
            raw = self.machine.raw
            if raw[4] == _STMT_EXECUTE and not self._prepared(conn):
                stmt = state.statements.get(int.from_bytes(raw[5:9], "little"))
                if stmt is None:  # closed meanwhile cannot happen: one command at a time
                    raise BackendError("the statement is gone")
                await prepare_on(conn, stmt)
        except BackendError as e:
            if self.machine.phase is _CLOSED:
                return
            log.info("session %d: read on %s failed before it ran: %s", self.connection_id, name, e)
            if e.err is None:
                ctx.read_pool.failed(name, time.monotonic())
            else:
                # The replica refused the session (its login, a variable only the primary
                # takes): none of its reads go there until its state changes.
                reads.refused[name] = reads.version
            reads.drop(name)
            if self.machine.phase is Phase.READING:
                metrics.READ_RETRIES.labels(name).inc()
                reads.tried = reads.tried | {name}
                self._carry_out(self.machine.read_lost(False))
            return
        finally:
            if self.machine.phase is _CLOSED:
                reads.close_all(quit=False)  # the client left while this connected
        if self.machine.phase is Phase.READING:
            self._send_read(conn)

    async def _primary_position(self) -> str | None:
        """causal_reads = "global": the primary's position now, read on the session's own
        connection to it (idle: the session's one command is this read). None if it has no
        current connection or the read failed (the read then goes to the primary, which
        finds out what became of that connection)."""
        link = self.link
        if not link.ready:
            return None
        assert link.backend is not None
        try:
            rows = await link.backend.query("SELECT @@global.gtid_binlog_pos")
        except BackendError as e:
            log.info("session %d: cannot read the primary's position: %s", self.connection_id, e)
            return None
        return rows[0][0].decode() if rows and rows[0][0] is not None else ""

    def _read_on_primary(self, reason: Fallback) -> None:
        """The read runs on the primary after all (a causal wait timed out, ...)."""
        metrics.READ_FALLBACKS.labels(str(reason)).inc()
        reads = self.reads
        assert reads is not None
        if self.machine.phase is Phase.READING:
            reads.primary_only = True
            self._carry_out(self.machine.read_lost(False))

    def _send_read(self, conn: ReplicaConn) -> None:
        reads = self.reads
        assert reads is not None and self.ctx.read_pool is not None
        raw = self.machine.raw
        command = raw[4]
        if command == _STMT_EXECUTE:
            client_id = int.from_bytes(raw[5:9], "little")
            stmt = self.state.statements[client_id]
            payload, types = execute_payload(
                stmt, raw[4:], conn.statements[client_id], conn.types.get(client_id, b"")
            )
            conn.types[client_id] = types
            raw = frame(payload, 0)
        self.ctx.read_pool.begin(conn.server.name)
        reads.sent = conn.server.name
        self._parser.begin(command, infile_allowed=False)
        self._relayed = False
        conn.backend.send(raw, self._parser, self._sink, self._read_done)

    def _read_done(self, exc: BaseException | None) -> None:
        try:
            self._read_finished(exc)
        except Exception:
            self.crashed()

    def _read_finished(self, exc: BaseException | None) -> None:
        reads, ctx, machine = self.reads, self.ctx, self.machine
        assert reads is not None and ctx.read_pool is not None and reads.sent is not None
        name = reads.sent
        ctx.read_pool.end(name)
        if exc is not None:
            reads.drop(name)
            ctx.read_pool.failed(name, time.monotonic())
            metrics.BACKEND_LOST.labels(name).inc()
            if machine.phase is _CLOSED:
                return
            if not self._relayed:
                metrics.READ_RETRIES.labels(name).inc()
                reads.tried = reads.tried | {name}
            self._carry_out(machine.read_lost(self._relayed))
            return
        err = self._parser.err
        if err is not None:
            metrics.ERRORS.labels(str(err.code), "backend").inc()
        metrics.ROUTED.labels(name, "read").inc()
        reads.last = name
        if ctx.switching():
            metrics.READS_DURING_HOLD.inc()
            self._holder.read_served(self._shard)
        actions = machine.response_done(False)
        if actions is NEXT:
            _STATS.observe(self._command_byte, time.perf_counter() - self._started)
            self._pump()
        else:
            self._carry_out(actions)

    def _rerouted(self) -> None:
        """REROUTE: the read's replica failed before anything of it ran or reached the
        client: route the same bytes again, without that replica (or to the primary)."""
        raw = self.machine.raw
        if not self._route_read(raw):
            self._primary(raw)

    def _unready(self) -> bool:
        """The connection cannot take the command: a broken one is a loss the machine must
        know of; one from before a switch is closed now (and a transaction on it with it).
        Always False."""
        link = self.link
        if link.backend is not None:
            if link.backend.alive:
                link.close()
            else:
                self._drop()
        return False

    def _too_large(self, limit: int) -> None:
        self._protocol_error(
            ErrorKind.PACKET_TOO_LARGE,
            f"Got a packet bigger than max_allowed_packet ({limit} bytes); the statement was "
            "not executed and Baton closes the connection",
        )

    def _can_stream(self, command: int) -> bool:
        """A large command is passed on packet by packet only when it would be relayed at
        once; one that must wait (held, or for a reconnect) is kept whole."""
        return command == _QUERY and self.link.ready and not self.ctx.switching()

    def _start_stream(self, pos: int) -> None:
        buf = self._inbuf
        first = bytes(buf[pos : pos + 4 + MAX_PAYLOAD])
        self._consume(4 + MAX_PAYLOAD)
        self._command_byte = first[4]
        self._started = time.perf_counter()
        self._streaming = MAX_PAYLOAD
        self.machine.stream()
        self._send(first[4], first)

    def _stream_packet(self, pos: int, length: int, limit: int) -> bool:
        """The next packet of a large command; False when it has not arrived whole."""
        end = pos + 4 + length
        if len(self._inbuf) < end:
            return False
        if self._zip is not None:
            self._renumber(pos, self._streaming // MAX_PAYLOAD)
        self._streaming += length
        if self._streaming > limit:
            self._drop()
            self._too_large(limit)
            return False
        packet = bytes(self._inbuf[pos:end])
        self._consume(end - pos)
        if length < MAX_PAYLOAD:
            self._streaming = 0
        backend = self.link.backend
        if backend is not None and backend.alive:
            backend.write(packet)
        return True

    def _infile_packet(self, raw: bytes) -> None:
        """LOAD DATA LOCAL: the client's file goes to the server, up to the empty packet."""
        backend = self.link.backend
        alive = backend is not None and backend.alive
        if len(raw) > 4:
            if alive:
                backend.write(raw)  # type: ignore[union-attr]
            return
        machine = self.machine
        machine.file_sent()
        if not alive:
            # Lost while the file came: the client had the server's request for it, so no
            # error can take the response's place.
            self._drop()
            self._carry_out(machine.lost_connection(b"", relayed=True))
            return
        self._parser.resume_after_infile()
        backend.send(raw, self._parser, self._sink, self._response_done)  # type: ignore[union-attr]

    def _protocol_error(self, kind: ErrorKind | None, message: str, seq: int = 1) -> None:
        log.info("session %d: closing: %s", self.connection_id, message)
        metrics.CLIENT_PROTOCOL_ERRORS.inc()
        if kind is not None:
            self._write_error(frame(kind.packet(message), seq))
        self._close(CloseReason.PROTOCOL)

    # -- carrying out the machine's actions --------------------------------------------------

    def _carry_out(self, actions: Actions) -> None:
        """Do what the machine said, in its order; nothing here decides anything."""
        machine = self.machine
        for action in actions:
            if action is Do.SEND:
                self._relay(machine.raw)
            elif action is Do.NEXT:
                self._next()
            elif isinstance(action, WriteError):
                self._write_error(action.packet, action.origin)
            elif action is Do.HOLD:
                machine.ticket = self._holder.hold(self.connection_id, self._shard, self._verdict)
            elif action is Do.HOLD_FAILED:
                machine.ticket = self._holder.hold_failed(
                    self.connection_id, self._shard, self.ctx.term(), self._verdict
                )
            elif isinstance(action, EndTicket):
                self._holder.end(action.ticket)
            elif action is Do.CONNECT:
                self._spawn(self._connect())
            elif action is Do.GIVE_BACK:
                self.link.give_back()
            elif action is Do.BORROW:
                if self.link.borrow_idle(machine.raw):
                    self._carry_out(machine.connected(True))
                else:
                    self._spawn(self._borrow())
            elif action is Do.PROBE:
                self._spawn(self._probe())
            elif action is Do.RETRACK:
                self._spawn(self._retrack())
            elif action is Do.CHANGE_USER:
                self._spawn(self._change_user(machine.raw))
            elif action is Do.RESUME:
                self._pump()
            elif action is Do.READ:
                self._read()
            elif action is Do.REROUTE:
                self._rerouted()
            elif isinstance(action, Close):
                self._closed(action.reason)
            elif isinstance(action, Failed):
                if action.held:
                    log.info(
                        "session %d: holding a command that failed (%s)",
                        self.connection_id,
                        action.cause,
                    )
                metrics.FAILED_COMMANDS.labels(
                    str(action.cause), "held" if action.held else "passed"
                ).inc()
            elif isinstance(action, Refused):
                for reason in action.reasons:
                    metrics.SESSIONS_REFUSED.labels(str(reason)).inc()
            elif isinstance(action, RolledBack):
                metrics.SWITCH_SESSIONS.labels("rolled_back").inc()

    def _next(self) -> None:
        """The command is over: account for it and take the next one."""
        _STATS.observe(self._command_byte, time.perf_counter() - self._started)
        self._pump()

    def _close(self, reason: CloseReason) -> None:
        self._carry_out(self.machine.close(reason))

    def _closed(self, reason: CloseReason) -> None:
        if self._zqueue:
            self._zflush()  # the last answers, an error saying why, before the close
        self._write = _discard  # the transport refuses writes once closed: drop them
        if reason is CloseReason.QUIT:
            self.link.close(quit=True)
        elif reason is CloseReason.ENDED_BY_SERVER:
            metrics.SESSIONS_ENDED_BY_SERVER.inc()
            log.info(
                "session %d: the primary ended its connection (a KILL, wait_timeout, or a fault "
                "on it) while it is still the writable primary; closing the client connection",
                self.connection_id,
            )
        elif reason is CloseReason.LOST_MID_RESPONSE:
            log.info("session %d: backend lost mid-response, closing", self.connection_id)
        if self._transport is not None:
            self._transport.close()

    def _verdict(self, verdict: Verdict) -> None:
        """The holder's verdict on the waiting command (from its own loop callback)."""
        if not isinstance(verdict, Released):
            self._carry_out(self.machine.evicted(verdict.message))
        elif self.link.lock.locked():
            # Baton reads this idle session's state back (before a demotion): then it moves.
            self._spawn(self._released_after_refresh())
        else:
            self._carry_out(self.machine.released(self.link.ready or self._unready()))

    async def _released_after_refresh(self) -> None:
        async with self.link.lock:
            pass
        self._carry_out(self.machine.released(self.link.ready or self._unready()))

    # -- the relay -------------------------------------------------------------------------------

    def _relay(self, raw: bytes) -> None:
        """SEND: relay the command on the session's current connection, translated where the
        server must see something else (a KILL naming a Baton session, statement ids); what
        Baton answers itself is answered here."""
        command = raw[4]
        if command == _PROCESS_KILL or (
            command == _QUERY and len(raw) > 9 and raw[5] | 0x20 == 0x6B  # k, K
        ):
            # Translated only on a current connection: a thread id means one server.
            killed = self._kill(raw)
            if killed is None:
                self._carry_out(self.machine.answered())
                return
            command, raw = _QUERY, killed
        if command in RELAYED or command == _PROCESS_KILL or command == Command.RESET_CONNECTION:
            self._send(command, raw)
        elif command in STMT_HEADER:
            self._relay_statement(command, raw)
        elif command == Command.STMT_PREPARE:
            self._send(command, raw, self.state.reserve_statement_id())
        else:
            name = COMMAND_NAMES.get(command, f"0x{command:02x}")
            self._error(
                ErrorKind.UNKNOWN_COMMAND,
                f"Unknown command: Baton does not relay COM_{name.upper()}",
            )
            self._carry_out(self.machine.answered())

    def _relay_statement(self, command: int, raw: bytes) -> None:
        """A COM_STMT_* naming a statement by the client's id: relayed with the server's."""
        try:
            client_id = check_stmt_header(raw[4:])
        except ClientPacketError as e:
            if command not in (Command.STMT_CLOSE, Command.STMT_SEND_LONG_DATA):
                # The server's answer to a truncated header (it answers neither of those).
                self._error(ErrorKind.MALFORMED_PACKET, f"Malformed communication packet: {e}")
            self._carry_out(self.machine.answered())
            return
        stmt = self.state.statements.get(client_id)
        if stmt is None:
            self._unknown_statement(command, client_id)
            self._carry_out(self.machine.answered())
            return
        if command == Command.STMT_CLOSE or command == Command.STMT_SEND_LONG_DATA:
            # No response: write it and go on with the next command.
            link = self.link
            backend = link.backend
            assert backend is not None
            if self.machine.shares:
                self.machine.pending.note(command, client_id, 0, 0, b"")
            if command != Command.STMT_CLOSE or link.lease is None:
                backend.write(raw[:4] + with_stmt_id(raw[4:], stmt.backend_id))
            # (A pooled connection keeps the statement: other sessions of the account may
            # prepare the same text; proxy/state_diff.py bounds how many it keeps.)
            if self.reads is not None:
                if command == Command.STMT_CLOSE:
                    for replica, backend_id in self.reads.forget_statement(client_id):
                        replica.write(
                            frame(bytes((_STMT_CLOSE,)) + backend_id.to_bytes(4, "little"), 0)
                        )
                else:
                    self.reads.long_data.add(client_id)  # it runs on the primary now
            if command == Command.STMT_CLOSE:
                del self.state.statements[client_id]
            self._carry_out(self.machine.answered())
            return
        if command == Command.STMT_EXECUTE:
            payload = stmt.execute_payload(raw[4:])
            raw = frame(payload, 0) if len(payload) != len(raw) - 4 else raw[:4] + payload
        else:
            raw = raw[:4] + with_stmt_id(raw[4:], stmt.backend_id)
        self._send(command, raw)

    def _send(self, command: int, raw: bytes, client_stmt_id: int = 0) -> None:
        """Relay one command; `_response_done` is called back when its response has passed."""
        parser = self._parser
        parser.begin(
            command,
            client_stmt_id=client_stmt_id,
            infile_allowed=self.ctx.config.proxy.allow_load_data_local,
            withhold_read_only=self.machine.may_retry(command),
        )
        self.state.in_flight = COMMAND_NAMES.get(command)
        self._relayed = False
        backend = self.link.backend
        assert backend is not None
        backend.send(raw, parser, self._sink, self._response_done)

    def _sink(self, data: bytes) -> None:
        self._relayed = True
        self._write(data)

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
        here = self.link.server
        if found is None or here is None or found[0] != here.name:
            self._error(ErrorKind.NO_SUCH_THREAD, f"Unknown thread id: {target}")
            return None
        return frame(b"\x03" + words + b" %d" % found[1], 0)

    def _unknown_statement(self, command: int, client_id: int) -> None:
        if command in (Command.STMT_CLOSE, Command.STMT_SEND_LONG_DATA):
            return  # the server answers neither, not even with an error
        self._error(
            ErrorKind.UNKNOWN_STATEMENT,
            f"Unknown prepared statement handler ({client_id}) given to "
            f"{COMMAND_NAMES[command].replace('stmt_', 'mysqld_stmt_')}",
        )

    # -- the response ----------------------------------------------------------------------------

    def crashed(self) -> None:
        """A bug must cost this one connection, never leave its client waiting."""
        log.exception("session %d: closing after an internal error", self.connection_id)
        self._close(CloseReason.INTERNAL)

    def _response_done(self, exc: BaseException | None) -> None:
        try:
            self._response_finished(exc)
        except Exception:
            self.crashed()

    def _response_finished(self, exc: BaseException | None) -> None:
        machine = self.machine
        if exc is not None:
            self._drop()
            if machine.phase is not _CLOSED:  # else the client left first: nobody to answer
                error = error_packet(ErrorKind.BACKEND_LOST, loss_message(str(exc)))
                self._carry_out(machine.lost_connection(error, self._relayed))
            return
        parser = self._parser
        if parser.phase is _INFILE_RESPONSE:
            machine.infile()
            self._pump()
            return
        state = self.state
        state.in_flight = None
        if parser.withheld is not None:
            self._carry_out(machine.withheld(frame(parser.withheld, 1)))
            return
        command = parser.command
        changed = state.apply(parser.status, parser.tracked)
        reads = self.reads
        if reads is not None:
            if parser.tracked and state_changed(parser.tracked):
                reads.changed()  # a SET, USE, ...: the replica connections follow
            server = self.link.server
            metrics.ROUTED.labels(server.name if server else "?", reads.kind).inc()
        err = parser.err
        if machine.shares:
            self._note_pending(command, parser)
        retrack = False
        if err is not None:
            metrics.ERRORS.labels(str(err.code), "backend").inc()
        elif command == _QUERY:
            retrack = self._after_statement(machine.raw, 5, changed)
        elif command == Command.STMT_EXECUTE:
            stmt = state.statements.get(check_stmt_header(machine.raw[4:]))
            if stmt is not None:
                retrack = self._after_statement(stmt.sql, 0, changed)
        elif command == Command.STMT_PREPARE:
            state.add_statement(
                parser.client_stmt_id,
                parser.backend_stmt_id,
                machine.raw[5:],
                parser.prepare_params,
                parser.prepare_columns,
            )
        elif command == Command.RESET_CONNECTION:
            state.reset(state.schema)
            self.link.reset = True  # the server forgot the connection's prepared statements
            if reads is not None:
                reads.changed()
            retrack = True
        actions = machine.response_done(retrack)
        if actions is NEXT:
            _STATS.observe(self._command_byte, time.perf_counter() - self._started)
            self._pump()
        else:
            self._carry_out(actions)

    def _note_pending(self, command: int, parser: ResponseParser) -> None:
        """What the response left on the connection that decides whether it can be given
        back: a cursor, the statement's warnings (proxy/pinning.py)."""
        raw = self.machine.raw
        stmt_id = check_stmt_header(raw[4:]) if command in STMT_HEADER and raw else 0
        self.machine.pending.note(
            command,
            stmt_id,
            parser.status,
            parser.warnings + (parser.err is not None),
            raw[5:] if command == _QUERY else b"",
        )

    def _after_statement(self, sql: bytes, start: int, changed: bool) -> bool:
        """What the statement just run did that the server's reports leave out (its text from
        `start`); True when Baton must set its session tracking again."""
        ok = self._parser.ok
        state = self.state
        insert_id = ok.last_insert_id if ok is not None else 0
        if insert_id:
            self.link.insert_id = True  # the server's LAST_INSERT_ID() is the session's now
        retrack = state.after_statement(sql, start, changed, insert_id)
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

    def _drop(self) -> None:
        """The server connection broke: the machine notes where and when."""
        lost = self.link.drop()
        if lost is not None:
            self.machine.dropped(*lost)

    # -- what waits: a connect, a probe, Baton's own statements, COM_CHANGE_USER -----------------

    async def _connect(self) -> None:
        """CONNECT: a connection on the current primary with the session's state."""
        link = self.link
        try:
            async with link.lock:
                await link.connect()
        except BackendError as e:
            server = self.ctx.primary()
            error = error_packet(
                ErrorKind.BACKEND_UNREACHABLE,
                f"Baton cannot reach the primary {server.name} ({server.host}:{server.port}): "
                f"{e}. The statement was not executed; retry when the primary is back.",
            )
            self._carry_out(self.machine.connect_failed(error, lasting=e.tls))
            return
        self._carry_out(self.machine.connected(link.ready or self._unready()))

    async def _borrow(self) -> None:
        """BORROW: a connection from the pool, with what of the session's state it lacks."""
        link = self.link
        try:
            async with link.lock:
                await link.borrow(self.machine.raw)
        except PoolRefused as e:
            error = error_packet(ErrorKind.TOO_MANY_CONNECTIONS, str(e))
            self._carry_out(self.machine.borrow_refused(error))
            return
        except BackendError as e:
            server = self.ctx.primary()
            error = error_packet(
                ErrorKind.BACKEND_UNREACHABLE,
                f"Baton cannot get a connection to the primary {server.name} "
                f"({server.host}:{server.port}): {e}. The statement was not executed; retry "
                "when the primary is back.",
            )
            self._carry_out(self.machine.connect_failed(error, lasting=e.tls))
            return
        self._carry_out(self.machine.connected(link.ready or self._unready()))

    async def _probe(self) -> None:
        """PROBE: was the loss this session's alone? Sessions that lose their connections
        together share one probe of the primary."""
        alone = await self.ctx.primary_writable()
        self._carry_out(self.machine.probed(alone))

    async def _retrack(self) -> None:
        await self.link.retrack()
        self._carry_out(self.machine.retracked())

    async def refresh_if_stale(self) -> None:
        """Read the state back if tracking marked it stale and no command is in flight; a
        held session's connection is idle, any other session is claimed for the time."""
        state = self.state
        if (
            not state.user_variables_stale
            and not state.last_insert_id_stale
            and state.held_locks_sql() is None
        ):
            return
        machine = self.machine
        claimed = not machine.waiting
        if claimed and not machine.claim():
            return
        try:
            async with self.link.lock:
                # A held session's command may have been released while this waited for the
                # lock: then the connection is its command's, not Baton's.
                if claimed or machine.waiting:
                    await self.link.refresh()
        except BackendError as e:
            log.info("session %d: cannot read its state back: %s", self.connection_id, e)
        finally:
            if claimed:
                self._carry_out(machine.release())

    async def _change_user(self, raw: bytes) -> None:
        """COM_CHANGE_USER: check the new login as at connect (always after an auth switch,
        as MariaDB does), then give the session a server connection as the new account. A
        refusal is the error the server would send, and the session stays as it was."""
        ctx = self.ctx
        link = self.link
        try:
            change = parse_change_user(raw[4:], link.client_caps)
        except ClientPacketError as e:
            self._error(ErrorKind.MALFORMED_PACKET, f"Malformed communication packet: {e}")
            self._carry_out(self.machine.user_changed())
            return
        collation = change.collation if change.collation is not None else self.state.collation
        try:
            verified = await self._verify(
                change.user,
                change.auth_plugin,
                change.auth_response,
                None,
                0,
                collation,
                change.database,
            )
        except LoginRefused as e:
            metrics.LOGIN_FAILURES.labels(str(e.reason)).inc()
            log.info(
                "session %d: change of user to %r refused: %s", self.connection_id, change.user, e
            )
            if e.packet is not None:
                self._write_error(e.packet)
            if e.reason is LoginFailure.BAD_HANDSHAKE:
                self._close(CloseReason.PROTOCOL)  # the client cannot be answered any more
            else:
                self._carry_out(self.machine.user_changed())
            return
        epoch = ctx.epoch
        server = ctx.primary()
        try:
            if verified.backend is not None:
                backend = verified.backend
                server, epoch = self._login_server
            else:
                backend = await ctx.connect(
                    server, verified.login, link.client_caps, collation, change.database, link.peer
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
            self._carry_out(self.machine.user_changed())
            return
        link.close()
        if self.reads is not None:
            self.reads.close_all()  # they were logged in as the old account
        link.login = verified.login
        self.state.single_login = verified.backend is not None
        # A login passed through (ed25519) cannot be repeated on a pooled connection.
        self.machine.shares = self.ctx.pools is not None and not self.state.single_login
        self.state.user = change.user
        self.state.collation = collation
        self.state.reset(change.database)
        try:
            await link.restore(backend)  # only Baton's tracking: the new session is empty
        except asyncio.CancelledError:  # the client left meanwhile
            backend.close()
            raise
        except BackendError as e:
            backend.close()
            lost = ErrorKind.BACKEND_LOST.packet(loss_message(str(e)))
            self._write_error(frame(lost, verified.seq))
        else:
            link.attach(backend, server, epoch)
            metrics.LOGINS.labels(str(verified.method)).inc()
            self._write(make_ok(Status.AUTOCOMMIT, verified.seq))
        self._carry_out(self.machine.user_changed())

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        task.add_done_callback(self._spawned_done)
        self._task = task

    def _spawned_done(self, task: asyncio.Task[None]) -> None:
        """A session task that ended in an exception is a bug: it costs this session only,
        with one log line, never an unretrieved task exception."""
        if self._task is task:
            self._task = None
        if not task.cancelled() and task.exception() is not None:
            log.error(
                "session %d: closing after an internal error",
                self.connection_id,
                exc_info=task.exception(),
            )
            self._close(CloseReason.INTERNAL)

    # -- errors ----------------------------------------------------------------------------------

    def _error(self, kind: ErrorKind, message: str) -> None:
        self._write_error(error_packet(kind, message))

    def _write_error(self, packet: bytes, origin: str = "baton") -> None:
        """Send an error packet, Baton's own or one the backend sent (counted by origin)."""
        metrics.ERRORS.labels(str(int.from_bytes(packet[5:7], "little")), origin).inc()
        self._write(packet)


def _discard(data: bytes) -> None:
    """A closed client's writes."""


class ProxyServer:
    """The listening socket: a `ClientConnection` for every client that connects."""

    def __init__(self, ctx: ProxyContext, read_only: bool = False) -> None:
        self.ctx = ctx
        self.read_only = read_only  # the read listener: read-only sessions, reads to replicas
        self._server: asyncio.AbstractServer | None = None

    async def start(self, host: str, port: int, sock: socket.socket | None = None) -> None:
        """Listen on host:port, or accept from `sock` (a worker's, bound by its supervisor)."""
        loop = asyncio.get_running_loop()
        ctx = self.ctx
        read_only = self.read_only
        factory = lambda: ClientConnection(ctx, ctx.new_session_id(), read_only)  # noqa: E731
        if sock is not None:
            self._server = await loop.create_server(factory, sock=sock, backlog=1024)
            return
        self._server = await loop.create_server(
            factory, host, port, reuse_address=True, backlog=1024
        )

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
