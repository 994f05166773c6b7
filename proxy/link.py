"""A client session's connection to its server: made as the client's own account, given the
session's state, read back from, and dropped when it breaks.

`ClientConnection` (proxy/frontend.py) owns one `ServerLink` and carries out the session
machine's CONNECT, BORROW, GIVE_BACK, RETRACK and COM_CHANGE_USER through it. With `[pool]
multiplex` the connection may be a pool's (`lease`): borrowed with only what differs restored
(proxy/state_diff.py), given back with the session's state recorded on it. Whether to
connect, and what a failure means for the command, is the machine's to decide
(proxy/session_machine.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from proxy import metrics
from proxy.backend import BackendConnection, BackendError, BackendLogin
from proxy.context import ProxyContext
from proxy.packets import Command, frame
from proxy.pools import Pooled, PoolRetired
from proxy.session import READ_BACK_SQL, SessionState
from proxy.state_diff import plan, reads_insert_id
from reparent.config import ServerConfig

log = logging.getLogger(__name__)

# Set on every backend connection: Baton learns each session's state from OK packets.
TRACKING_ASSIGNMENTS = (
    "session_track_schema=1, session_track_state_change=1, "
    "session_track_system_variables='*', session_track_transaction_info='STATE'"
)
TRACKING_SQL = "SET " + TRACKING_ASSIGNMENTS


class ServerLink:
    """The session's server connection and what it was made with."""

    def __init__(
        self,
        ctx: ProxyContext,
        state: SessionState,
        on_full: Callable[[bool], None],
    ) -> None:
        self.ctx = ctx
        self.state = state
        self.on_full = on_full  # the server reads our writes slower than we send (True), or not
        self.backend: BackendConnection | None = None
        self.server: ServerConfig | None = None
        self.epoch = 0  # the epoch of the primary it was made to; older is stale
        self.login: BackendLogin | None = None  # the client's account, by SHA1(password)
        self.client_caps = 0
        self.peer: tuple[str, int] | None = None  # the client's address, for PROXY headers
        self.client_slow = False  # the client reads slower than results come: pause the server
        # Baton's own statements on a held session's idle connection, and that session's move
        # once it is released, take turns.
        self.lock = asyncio.Lock()
        self.lease: Pooled | None = None  # the pool's connection it borrowed, if it did
        self.reset = False  # COM_RESET_CONNECTION ran on the borrowed connection
        # The borrowed connection's LAST_INSERT_ID() is the session's (restored, or set by
        # one of its statements); else it is still the one its last borrower left.
        self.insert_id = False

    @property
    def ready(self) -> bool:
        """Alive and made to the current primary (no switch was published since)."""
        backend = self.backend
        return backend is not None and backend.alive and self.epoch == self.ctx.epoch

    @property
    def thread(self) -> int | None:
        """The server's thread id of this connection, if it has one."""
        backend = self.backend
        if backend is None or not backend.alive or backend.handshake is None:
            return None
        return backend.handshake.connection_id

    async def connect(self) -> None:
        """A connection on the current primary, as the client's account, with the session's
        state restored on it. A switch published while this connects makes it stale at once
        (it keeps the epoch of the primary chosen now), and the command moves again."""
        ctx = self.ctx
        epoch = ctx.epoch
        server = ctx.primary()
        label = server.name
        moving = self.server is not None  # it had a connection: its state moves
        assert self.login is not None
        self.close()  # a stale one, still open
        try:
            backend = await ctx.connect(
                server,
                self.login,
                self.client_caps,
                self.state.collation,
                self.state.schema,
                self.peer,
            )
            try:
                await self.restore(backend)
            except asyncio.CancelledError:  # the client left meanwhile
                backend.close()
                raise
        except BackendError:
            metrics.BACKEND_CONNECT_FAILURES.labels(label).inc()
            metrics.BACKEND_UP.labels(label).set(0)
            if moving:
                metrics.SESSIONS_MOVED.labels("failed").inc()
            raise
        if moving:
            metrics.SESSIONS_MOVED.labels("moved").inc()
        self.attach(backend, server, epoch)

    async def borrow(self, raw: bytes = b"") -> None:
        """A connection from the pool of the current primary and the client's account, given
        what of the session's state it lacks (for the command `raw`). Raises PoolRefused (the
        pool stayed full) or BackendError; a switch published meanwhile makes it stale at
        once, as `connect`."""
        ctx = self.ctx
        pools = ctx.pools
        assert pools is not None and self.login is not None
        state = self.state
        self.close()  # a stale one, or its own connection from a login or a move
        while True:
            epoch = ctx.epoch
            server = ctx.primary()
            try:
                pooled = await pools.borrow(
                    server, self.login, self.client_caps, state.collation, state.schema
                )
            except PoolRetired:
                continue  # a switch was published while it waited: the new primary's pool
            insert_id = reads_insert_id(state, raw)
            todo = plan(state, pooled.state, insert_id)
            if not todo.unusable:
                break
            pools.discard(pooled)  # its schema cannot be unset; the pool opens another
        started = time.perf_counter()
        backend = pooled.backend
        try:
            if todo.init_db is not None:
                await backend.command(frame(b"\x02" + todo.init_db.encode(), 0))
            if todo.assignments:
                await backend.query("SET " + ", ".join(todo.assignments))
            for client_id, backend_id in todo.mapped.items():
                state.statements[client_id].backend_id = backend_id
            for client_id in todo.prepare:
                stmt = state.statements[client_id]
                parser, _ = await backend.command(
                    frame(bytes((Command.STMT_PREPARE,)) + stmt.sql, 0)
                )
                stmt.backend_id = parser.backend_stmt_id
            for stmt in state.statements.values():
                stmt.rebound = False  # another borrower may have bound other types
        except BaseException:
            pools.discard(pooled)
            raise
        metrics.POOL_RESTORE_SECONDS.observe(time.perf_counter() - started)
        self.lease = pooled
        self.reset = False
        self.insert_id = insert_id
        self.attach(backend, server, epoch)

    def borrow_idle(self, raw: bytes) -> bool:
        """BORROW at once, when an idle connection needs nothing restored (the same account's
        sessions mostly share their state): True when attached. Otherwise `borrow` waits."""
        ctx = self.ctx
        pools = ctx.pools
        assert pools is not None and self.login is not None
        if self.lock.locked():
            return False
        state = self.state
        server = ctx.primary()
        pooled = pools.take_idle(server, self.login, self.client_caps, state.collation)
        if pooled is None:
            return False
        insert_id = reads_insert_id(state, raw)
        todo = plan(state, pooled.state, insert_id)
        if todo.round_trips or todo.unusable:
            pools.put_back(pooled)
            return False
        self.close()
        for client_id, backend_id in todo.mapped.items():
            stmt = state.statements[client_id]
            stmt.backend_id = backend_id
            stmt.rebound = False
        self.lease = pooled
        self.reset = False
        self.insert_id = insert_id
        self.attach(pooled.backend, server, ctx.epoch)
        return True

    def give_back(self) -> None:
        """GIVE_BACK: nothing pins the session; its connection goes back to its pool, holding
        the session's state. A connection of its own (made at a move or a change of user)
        is closed instead: the pool did not make it."""
        lease = self.lease
        if lease is None or self.backend is not lease.backend:
            self.close()
            return
        self.lease = None
        backend = lease.backend
        backend.on_full = None
        if self.client_slow:
            backend.pause_reading(False)
        self._detach()
        assert self.ctx.pools is not None
        self.ctx.pools.give_back(lease, self.state, self.reset, self.insert_id)


    async def adopt(self, backend: BackendConnection, server: ServerConfig, epoch: int) -> None:
        """Make a connection opened during the login (ed25519) the session's own; closed if
        its state cannot be set or the client leaves meanwhile, as `connect` does."""
        try:
            await self.restore(backend)
        except asyncio.CancelledError:
            backend.close()
            raise
        self.attach(backend, server, epoch)

    def attach(self, backend: BackendConnection, server: ServerConfig, epoch: int) -> None:
        metrics.BACKEND_UP.labels(server.name).set(1)
        metrics.BACKEND_CONNECTIONS.labels(server.name).inc()
        self.backend = backend
        self.server = server
        backend.on_full = self.on_full
        if self.client_slow:
            backend.pause_reading(True)
        self.epoch = epoch
        self.state.backend = f"{server.name} ({server.host}:{server.port})"

    async def restore(self, backend: BackendConnection) -> None:
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

    async def refresh(self) -> None:
        """Read back what tracking does not report (user variables, collation, locks); needed
        before the state can move to another server. The caller holds `lock` and makes sure
        no command is in flight."""
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

    async def retrack(self) -> None:
        """Set Baton's session tracking again: after COM_RESET_CONNECTION the server forgot
        it, and a statement of the client's may have changed it. A failure closes the
        connection; the next command moves."""
        try:
            assert self.backend is not None
            await self.backend.query(TRACKING_SQL)
        except BackendError as e:
            log.info("session %d: lost backend after reset: %s", self.state.session_id, e)
            self.close()

    def abandon_stale(self, primary: str) -> None:
        """A new primary was published while this session waits for an answer from another
        server: an emergency's old primary, which is hung or cut off (after a planned switch
        nothing of ours runs there: the demotion drained or killed it). Its answer would come
        late or never, and its client would wait with it; the connection is closed instead,
        and the command fails as on any lost connection (a write gets 1927: it may or may not
        have been executed)."""
        backend, server = self.backend, self.server
        if (
            backend is not None
            and backend.alive
            and self.state.in_flight is not None
            and server is not None
            and server.name != primary
        ):
            log.info(
                "session %d: closing its connection to %s, which no longer leads",
                self.state.session_id,
                server.name,
            )
            backend.close(quit=False)  # abandoned, not ended: no COM_QUIT queued

    def slow(self, slow: bool) -> None:
        """The client reads slowly (True) or caught up: pause or resume the server's results."""
        self.client_slow = slow
        if self.backend is not None:
            self.backend.pause_reading(slow)

    def close(self, quit: bool = True) -> None:
        """Close the connection; without `quit`, the server counts an aborted client. A
        borrowed one is closed too (its state is the session's, or unknown) and its pool
        told, so that it opens another."""
        lease, self.lease = self.lease, None
        if lease is not None and self.backend is lease.backend:
            assert self.ctx.pools is not None
            self.ctx.pools.discard(lease, quit)
        elif self.backend is not None:
            self.backend.close(quit)
        self._detach()

    def _detach(self) -> None:
        if self.backend is not None:
            assert self.server is not None
            metrics.BACKEND_CONNECTIONS.labels(self.server.name).dec()
        self.backend = None
        self.state.backend = ""

    def drop(self) -> tuple[str, int] | None:
        """The connection broke: close what is left; the server and epoch it was lost on."""
        server = self.server
        if self.backend is None or server is None:
            return None
        self.close()
        self.state.in_flight = None
        metrics.BACKEND_LOST.labels(server.name).inc()
        return server.name, self.epoch
