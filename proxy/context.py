"""What every client session of a proxy shares: the config, routing, the holder, the accounts,
the live sessions, and the facts the session machine asks for (`proxy.session_machine.World`).

It is also the router's listener: a published switch makes every session's connection stale
(the epoch grows), and the drain before a demotion asks it whether any session is busy.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from proxy import metrics
from proxy.accounts import Accounts
from proxy.admission import Admission
from proxy.auth import stage1
from proxy.backend import BackendConnection, BackendError, BackendLogin, Relay
from proxy.classify import Classifier
from proxy.holder import Holder
from proxy.packets import proxy_header
from proxy.pinning import Pin, pins
from proxy.pools import Pools
from proxy.readroute import ReadPool
from proxy.router import Router
from proxy.rsa_key import RsaKey
from proxy.session import routine_hazards
from proxy.tls import ClientTls
from reparent.admin import AdminConnection
from reparent.config import MAX_WORKERS, Config, ServerConfig
from reparent.topology import Aborted, ReparentStarted, TopologyEvent
from reparent.topology import Established as EstablishedEvent

if TYPE_CHECKING:
    from proxy.frontend import ClientConnection

log = logging.getLogger(__name__)


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
TLS_LOG_INTERVAL = 10.0  # seconds between warnings of TLS refused by one server


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
    # The pools of server connections sessions share ([pool] multiplex); None: no sharing.
    pools: Pools | None = None
    # For caching_sha2_password over plain text (proxy/rsa_key.py).
    rsa_key: RsaKey = field(default_factory=RsaKey.generate)
    # TLS for clients ([tls]); None when Baton offers none.
    tls: ClientTls | None = None
    _tls_logged: dict[str, float] = field(default_factory=dict)  # server -> last TLS warning
    # Read routing (proxy/readroute.py): the replicas' health and load, None when no listener
    # routes reads; the statement classifier with its cache, shared by the sessions.
    read_pool: ReadPool | None = None
    classifier: Classifier = field(default_factory=Classifier)

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
            thread, server = conn.link.thread, conn.link.server
            return None if thread is None or server is None else (server.name, thread)
        if peers and self.peer_session is not None:
            return self.peer_session(session_id)
        return None

    def primary(self) -> ServerConfig:
        return self.router.primary(self.config.proxy.shard)

    def server(self, name: str) -> ServerConfig:
        """A server of the shard sessions are routed to, by name."""
        return next(s for s in self.config.shard.servers if s.name == name)

    def term(self) -> int:
        return self.router.term(self.config.proxy.shard)

    def switching(self) -> bool:
        """Does the shard hold new commands now (a switch is under way)?"""
        return self.holder.should_hold(self.config.proxy.shard)

    def may_hold_failed(self) -> bool:
        """May a command that failed on the primary wait for a next one? Only if the shard has
        another server and the holder takes failed commands now."""
        return self.can_switch and self.holder.can_hold_failed(self.config.proxy.shard)

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
        relay: Relay | None = None,
    ) -> BackendConnection:
        """A backend connection to `server`, logged in as `login` (the client's own account).
        With backend.proxy_protocol the server is told `client`'s address first; `relay`
        answers a login only the client can (ed25519)."""
        header = b""
        if client is not None and self.config.backend.proxy_protocol:
            header = proxy_header(client, (server.host, server.port))
        try:
            return await BackendConnection.connect(
                server.host,
                server.port,
                login,
                client_caps,
                collation,
                schema,
                self.config.proxy.backend_connect_timeout,
                header,
                self.config.backend,
                relay,
            )
        except BackendError as e:
            if e.tls:
                metrics.BACKEND_TLS_FAILURES.labels(server.name).inc()
                now = time.monotonic()
                if now - self._tls_logged.get(server.name, -TLS_LOG_INTERVAL) >= TLS_LOG_INTERVAL:
                    self._tls_logged[server.name] = now
                    log.warning("TLS to %s refused: %s", server.name, e)
            raise

    async def inspect_routine(self, name: str) -> None:
        """Read a stored routine's body as the admin account and note what it may leave."""
        schema, _, routine = name.partition(".")

        def read() -> bytes | None:
            conn = AdminConnection(self.primary(), self.config.admin, 2.0, self.config.backend)
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

    def pinned(self) -> dict[Pin, int]:
        """Sharing sessions that keep their connection now, by every rule that pins them."""
        counts = dict.fromkeys(Pin, 0)
        for conn in self.sessions.values():
            machine = conn.machine
            if machine.shares and not machine.detached:
                for pin in pins(conn.state, machine.pending, self.routines):
                    counts[pin] += 1
        return counts

    # -- the router's listener: topology events, on the proxy's loop ---------------------------

    def busy(self, shard: str) -> bool:
        """Any session with a transaction open or a statement in flight on the old primary?
        A held session counts as idle: its command has not been sent."""
        return any(c.machine.busy or c.state.in_transaction for c in self.sessions.values())

    async def prepare_move(self, shard: str) -> None:
        """Read back what tracking does not report, while the old primary still answers.
        The router calls this once no session is in a transaction or mid-statement."""
        for conn in list(self.sessions.values()):
            await conn.refresh_if_stale()

    def topology_event(self, event: TopologyEvent) -> None:
        """The router hands every event to the holder too, which holds and releases the
        commands; here the sessions' connections become stale once a switch is published."""
        if isinstance(event, ReparentStarted):
            for conn in self.sessions.values():
                if conn.state.in_transaction:
                    case = "in_transaction"  # runs to its end first, within the grace period
                elif conn.machine.busy:
                    case = "in_statement"  # its statement ends on the old primary
                else:
                    case = "idle"  # held at its next command
                metrics.SWITCH_SESSIONS.labels(case).inc()
        elif isinstance(event, EstablishedEvent):
            self.epoch += 1
            if self.pools is not None:
                self.pools.retire(keep=event.new_primary)
            for conn in list(self.sessions.values()):
                conn.link.abandon_stale(event.new_primary)
        elif isinstance(event, Aborted):
            self.epoch += 1
