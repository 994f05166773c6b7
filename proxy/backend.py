"""Baton's own raw-protocol client to MariaDB: connects, logs in, then relays responses as bytes.

During login it reads whole packets; afterwards every byte from the server goes through the
session's `ResponseParser` straight to the client transport, so rows are never decoded or copied
more than the parser needs. With `backend.tls` the connection turns to TLS after the greeting
(an SSL request, then `loop.start_tls`); the transport is swapped and nothing else changes.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from proxy.auth import NATIVE_PLUGIN, scramble
from proxy.packets import (
    PROXY_CAPS,
    Cap,
    Command,
    Err,
    PacketError,
    ServerHandshake,
    ServerRefused,
    decode_text_row,
    frame,
    make_handshake_response,
    parse_auth_switch,
    parse_err,
    parse_server_handshake,
    split_packets,
)
from proxy.response import Phase, ResponseParser
from reparent.config import PLAIN_BACKEND, BackendSettings, BackendTls
from reparent.tls import backend_context


@dataclass(frozen=True, slots=True)
class BackendLogin:
    """Whom a server connection logs in as: the client's own account, by SHA1(password).
    `h1` None: an account Baton cannot answer for (ed25519); only the client can, through
    a `Relay`, once."""

    user: str
    h1: bytes | None


# Hands a server's auth-switch request (plugin, data) to the client and returns its answer.
Relay = Callable[[str, bytes], Awaitable[bytes]]


class BackendError(Exception):
    """The backend could not be reached or dropped the connection."""

    def __init__(self, message: str, err: Err | None = None, tls: bool = False) -> None:
        super().__init__(message)
        self.err = err
        self.tls = tls  # the TLS handshake with the server failed, or it offers no TLS


class BackendConnection(asyncio.Protocol):
    """One server connection owned by one client session."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.handshake: ServerHandshake | None = None
        self.capabilities = 0
        self._inbox = bytearray()
        self._waiter: asyncio.Future[None] | None = None
        self._closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._lost: BaseException | None = None
        self._parser: ResponseParser | None = None
        self._sink: Callable[[bytes], None] | None = None
        self._on_done: Callable[[BaseException | None], None] | None = None
        self.address = ""
        # Told when the server takes our writes slower than we send them (True) and when it
        # caught up (False): the owner stops reading its client meanwhile.
        self.on_full: Callable[[bool], None] | None = None

    # -- asyncio.Protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        parser = self._parser
        if parser is None:
            self._inbox += data
            self._wake()
            return
        try:
            out = parser.feed(data)
        except PacketError as e:
            self._fail(BackendError(f"malformed response from backend: {e}"))
            return
        if out:
            assert self._sink is not None
            self._sink(out)
        phase = parser.phase
        if phase is Phase.DONE or phase is Phase.INFILE:
            self._parser = None
            on_done = self._on_done
            self._on_done = None
            if on_done is not None:
                on_done(None)

    def pause_writing(self) -> None:
        if self.on_full is not None:
            self.on_full(True)

    def resume_writing(self) -> None:
        if self.on_full is not None:
            self.on_full(False)

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = exc or ConnectionResetError("backend closed the connection")
        self._fail(BackendError(f"lost connection to backend {self.address}: {self._lost}"))
        if not self._closed.done():
            self._closed.set_result(None)

    # -- login -----------------------------------------------------------------------------

    @classmethod
    async def connect(
        cls,
        host: str,
        port: int,
        login: BackendLogin,
        client_caps: int,
        collation: int,
        database: str | None,
        timeout: float,
        proxy_header: bytes = b"",
        backend: BackendSettings = PLAIN_BACKEND,
        relay: Relay | None = None,
    ) -> BackendConnection:
        """Open and log in as `login`; capabilities mirror the client's, plus session tracking
        for Baton. `proxy_header` (a PROXY protocol line) goes first when given; TLS as
        `backend.tls` says. A server that asks for a plugin other than mysql_native_password
        is answered by `relay`."""
        if login.h1 is None and relay is None:
            raise BackendError(
                f"the account {login.user} logs in with a plugin only its client can answer; "
                "Baton cannot log it in again"
            )
        loop = asyncio.get_running_loop()
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(cls, host, port), timeout=timeout
            )
        except (TimeoutError, OSError) as e:
            raise BackendError(f"cannot connect to backend {host}:{port}: {e or 'timeout'}")
        conn.address = f"{host}:{port}"
        try:
            if proxy_header:
                conn.write(proxy_header)
            await asyncio.wait_for(
                conn._login(login, client_caps, collation, database, backend, host, relay),
                timeout,
            )
        except TimeoutError:
            conn.close()
            raise BackendError(f"backend {host}:{port} did not finish login in {timeout}s")
        except ServerRefused as e:
            conn.close()
            raise BackendError(f"backend {host}:{port} refused the connection: {e}", e.err)
        except BaseException:
            conn.close()
            raise
        return conn

    async def _login(
        self,
        login: BackendLogin,
        client_caps: int,
        collation: int,
        database: str | None,
        backend: BackendSettings,
        host: str,
        relay: Relay | None,
    ) -> None:
        seq, payload = await self.read_packet()
        hs = parse_server_handshake(payload)
        self.handshake = hs
        caps = (client_caps & PROXY_CAPS & hs.capabilities) | Cap.SESSION_TRACK
        caps |= Cap.PROTOCOL_41 | Cap.SECURE_CONNECTION | Cap.PLUGIN_AUTH
        if not client_caps & Cap.LONG_PASSWORD:
            # MariaDB reads the extended capability bytes only when bit 0 is clear.
            caps &= ~Cap.LONG_PASSWORD
        ctx = backend_context(backend)
        tls = ctx is not None and bool(hs.capabilities & Cap.SSL)
        if ctx is not None and not tls and backend.tls is not BackendTls.PREFERRED:
            raise BackendError(
                f"backend {self.address} offers no TLS, and backend.tls is {backend.tls}", tls=True
            )
        if tls:
            caps |= Cap.SSL
        self.capabilities = caps
        # Without H1 the first answer is empty: the server switches to the account's plugin.
        auth = b"" if login.h1 is None else scramble(login.h1, hs.auth_data)
        response = make_handshake_response(caps, collation, login.user, auth, database)
        if ctx is not None and tls:
            # The SSL request is the response's first 32 bytes: MariaDB keeps the capabilities
            # it read there, so they must be the very ones the response goes on with.
            seq += 1
            self.write(frame(response[:32], seq))
            await self._start_tls(ctx, host if backend.tls is BackendTls.VERIFY_IDENTITY else None)
        self.write(frame(response, seq + 1))
        seq, reply = await self.read_packet()
        if reply[:1] == b"\xfe":
            plugin, data = parse_auth_switch(reply)
            if plugin == NATIVE_PLUGIN and login.h1 is not None:
                answer = scramble(login.h1, data)
            elif relay is not None:
                answer = await relay(plugin, data)
            else:
                raise BackendError(
                    f"backend {self.address} wants auth plugin {plugin} for {login.user}, "
                    "which Baton cannot answer"
                )
            self.write(frame(answer, seq + 1))
            _, reply = await self.read_packet()
        if reply[:1] == b"\xff":
            err = parse_err(reply)
            raise BackendError(f"backend {self.address} refused login: {err.message}", err)

    async def _start_tls(self, ctx: ssl.SSLContext, hostname: str | None) -> None:
        """Turn the connection to TLS; the server sends nothing until our ClientHello, so no
        byte of it can be waiting unread. The new transport calls this same protocol."""
        assert self.transport is not None
        try:
            self.transport = await asyncio.get_running_loop().start_tls(
                self.transport, self, ctx, server_hostname=hostname
            )
        except ssl.SSLCertVerificationError as e:
            raise BackendError(
                f"backend {self.address}: TLS refused, its certificate does not verify "
                f"({e.verify_message}; backend.ca is the CA Baton trusts)",
                tls=True,
            )
        except (ssl.SSLError, ConnectionError) as e:
            raise BackendError(f"backend {self.address}: TLS handshake failed: {e}", tls=True)

    async def read_packet(self) -> tuple[int, bytes]:
        """One whole packet, for login and for Baton's own queries before relaying starts."""
        while True:
            if len(self._inbox) >= 4:
                length = int.from_bytes(self._inbox[:3], "little")
                if len(self._inbox) >= 4 + length:
                    seq = self._inbox[3]
                    payload = bytes(self._inbox[4 : 4 + length])
                    del self._inbox[: 4 + length]
                    return seq, payload
            if self._lost is not None:
                raise BackendError(f"lost connection to backend {self.address}: {self._lost}")
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter

    # -- relaying ----------------------------------------------------------------------------

    def send(
        self,
        packet: bytes,
        parser: ResponseParser,
        sink: Callable[[bytes], None],
        on_done: Callable[[BaseException | None], None],
    ) -> None:
        """Write a framed command and relay its response to `sink`; `on_done` is called once,
        from the event loop's callback, when the parser is done or the connection failed."""
        if self._lost is not None:
            raise BackendError(f"lost connection to backend {self.address}: {self._lost}")
        self._parser = parser
        self._sink = sink
        self._on_done = on_done
        assert self.transport is not None
        if packet:
            self.transport.write(packet)
        if self._inbox:
            leftover = bytes(self._inbox)
            self._inbox.clear()
            self.data_received(leftover)

    async def send_and_wait(
        self, packet: bytes, parser: ResponseParser, sink: Callable[[bytes], None]
    ) -> None:
        """`send` for Baton's own commands, awaited."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def done(exc: BaseException | None) -> None:
            if fut.done():
                return
            if exc is None:
                fut.set_result(None)
            else:
                fut.set_exception(exc)

        self.send(packet, parser, sink, done)
        await fut

    def write(self, data: bytes) -> None:
        """Bytes with no response of their own (file content, COM_STMT_CLOSE)."""
        if self._lost is not None:
            raise BackendError(f"lost connection to backend {self.address}: {self._lost}")
        assert self.transport is not None
        self.transport.write(data)

    async def command(self, packet: bytes) -> tuple[ResponseParser, bytes]:
        """Run one command of Baton's own; its response is collected, never sent to a client."""
        collected: list[bytes] = []
        parser = ResponseParser(
            deprecate_eof=bool(self.capabilities & Cap.DEPRECATE_EOF), client_tracks=True
        )
        parser.begin(packet[4])
        await self.send_and_wait(packet, parser, collected.append)
        if parser.err is not None:
            raise BackendError(f"backend error {parser.err.code}: {parser.err.message}", parser.err)
        return parser, b"".join(collected)

    async def query(self, sql: str) -> list[list[bytes | None]]:
        """Run one statement of Baton's own and return its text rows (small results only)."""
        parser, data = await self.command(frame(b"\x03" + sql.encode(), 0))
        items = split_packets(data)
        if not items or items[0][:1] == b"\x00":
            return []
        ncols = items[0][0]
        body = items[1 + ncols :]
        if not parser.deprecate_eof:
            body = body[1:]
        return [decode_text_row(item, ncols) for item in body[:-1]]

    def pause_reading(self, paused: bool) -> None:
        """Back-pressure from a slow client: stop taking its results from the server."""
        if self.transport is not None and not self.transport.is_closing():
            if paused:
                self.transport.pause_reading()
            else:
                self.transport.resume_reading()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)
        self._waiter = None

    def _fail(self, exc: BaseException) -> None:
        self._wake()
        on_done = self._on_done
        self._on_done = None
        self._parser = None
        if on_done is not None:
            on_done(exc)

    @property
    def alive(self) -> bool:
        return self._lost is None and self.transport is not None and not self.transport.is_closing()

    def close(self, quit: bool = True) -> None:
        """Close the connection; with `quit`, say so first (COM_QUIT). Without it the server
        counts the connection as aborted, as it would the client's own dropped socket."""
        if self.transport is not None and not self.transport.is_closing():
            if quit:
                self.transport.write(frame(bytes((Command.QUIT,)), 0))
            self.transport.close()
