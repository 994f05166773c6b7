"""The pools' asyncio shell: opens and closes the sockets the pool cores (proxy/pool.py) ask
for, hands connections to the sessions that borrow them, and exports the pools' figures.

A pool is keyed by server, account (the client's own login, by SHA1(password)) and connection
shape (the capabilities and collation its login was made with, which decide the packets the
server sends back): a borrowed connection never carries another account's identity, and never
answers in a format its client did not ask for. Each connection carries Baton's session
tracking from the moment it opens, and its state as its last borrower left it
(proxy/state_diff.py).

A switch retires the pools of every server but the new primary: their idle connections close,
their waiting borrowers borrow again (from the new primary's pool), and connections given back
to them close. Sessions that were idle at the switch hold nothing, so nothing of theirs moves;
the held commands flush onto the new primary's pool as fast as it lends connections.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from proxy import metrics
from proxy.backend import BackendConnection, BackendError, BackendLogin
from proxy.packets import PROXY_CAPS, Cap
from proxy.pool import Action as PoolAction
from proxy.pool import CloseConn, Grant, Open, Pool, Refuse, RefuseReason, Wait
from proxy.session import SessionState
from proxy.state_diff import BASELINE_SQL, ConnState
from reparent.config import PoolConfig, ServerConfig

log = logging.getLogger(__name__)

TICK = 0.25  # seconds between the pools' clock ticks (wait deadlines, idle timeouts)

# Capabilities that shape only the login, not what the server sends afterwards: sessions that
# differ in them share a pool.
LOGIN_ONLY = (
    Cap.LONG_PASSWORD
    | Cap.CONNECT_WITH_DB
    | Cap.SECURE_CONNECTION
    | Cap.PLUGIN_AUTH
    | Cap.CONNECT_ATTRS
    | Cap.PLUGIN_AUTH_LENENC_CLIENT_DATA
    | Cap.CAN_HANDLE_EXPIRED_PASSWORDS
)
SHAPE_CAPS = PROXY_CAPS & ~LOGIN_ONLY

# server name, login, capabilities (SHAPE_CAPS), collation
PoolKey = tuple[str, BackendLogin, int, int]
Connect = Callable[[ServerConfig, BackendLogin, int, int, str | None], Awaitable[BackendConnection]]


class PoolRefused(Exception):
    """The pool stayed full: the borrower waited too long, or the queue had no room."""

    def __init__(self, reason: RefuseReason, key: PoolKey, limits: PoolConfig) -> None:
        self.reason = reason
        server, login, _, _ = key
        if reason is RefuseReason.QUEUE_FULL:
            why = f"{limits.queue} sessions already wait for it"
        else:
            why = f"no connection came free within {limits.wait_timeout:g} s"
        super().__init__(
            f"Too many connections: the pool of server connections for user '{login.user}' on "
            f"{server} is full ({limits.max} in use, pool.max) and {why}. The statement was "
            "not executed; retry it, or raise pool.max / pool.wait_timeout"
        )


class PoolRetired(Exception):
    """The pool's server stopped leading while the borrower waited: borrow again from the
    current primary's pool."""


@dataclass(eq=False, slots=True)
class Pooled:
    """One pooled server connection: the socket, what it holds, and its pool."""

    backend: BackendConnection
    state: ConnState
    pool: Pool[Pooled]
    key: PoolKey
    server: ServerConfig


class Pools(Collector):
    """Every pool of this process, by key."""

    def __init__(self, config: PoolConfig, connect: Connect, tracking_sql: str) -> None:
        self.config = config
        self._connect = connect
        self._tracking_sql = tracking_sql
        self._pools: dict[PoolKey, Pool[Pooled]] = {}
        self._servers: dict[PoolKey, ServerConfig] = {}
        self._waiters: dict[int, asyncio.Future[PoolAction[Pooled]]] = {}
        self._next_waiter = 0
        self._ticker: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.refused: dict[RefuseReason, int] = {r: 0 for r in RefuseReason}
        # Sharing sessions pinned to their connection now, by rule (set by the proxy).
        self.pinned: Callable[[], Mapping[str, int]] = dict

    @property
    def enabled(self) -> bool:
        return self.config.multiplex

    def _pool(self, key: PoolKey, server: ServerConfig) -> Pool[Pooled]:
        pool = self._pools.get(key)
        if pool is None:
            pool = self._pools[key] = Pool(self.config)
            self._servers[key] = server
        if self._ticker is None:
            self._ticker = asyncio.get_running_loop().create_task(self._tick_forever())
        return pool

    def take_idle(
        self, server: ServerConfig, login: BackendLogin, caps: int, collation: int
    ) -> Pooled | None:
        """An idle connection of the key's pool at once, or None (none idle: `borrow`). The
        common case under load, taken without a task or a future: every hop through the event
        loop is time the connection is lent and serves nobody."""
        pool = self._pools.get((server.name, login, caps & SHAPE_CAPS, collation))
        if pool is None or not pool.idle or pool.retired:
            return None
        self._next_waiter += 1
        action = pool.borrow(self._next_waiter, time.monotonic())
        assert isinstance(action, Grant)
        pooled = action.conn
        if not pooled.backend.alive:
            self._apply(pool.give_back(pooled, time.monotonic(), reusable=False))
            return None
        metrics.POOL_BORROW_SECONDS.observe(0.0)
        return pooled

    def put_back(self, pooled: Pooled) -> None:
        """A connection from `take_idle` that was not used: back as it was."""
        self._apply(pooled.pool.give_back(pooled, time.monotonic(), reusable=True))

    async def borrow(
        self,
        server: ServerConfig,
        login: BackendLogin,
        caps: int,
        collation: int,
        schema: str | None,
    ) -> Pooled:
        """A connection of this key's pool, lent to the caller until `give_back` or
        `discard`. Raises PoolRefused when the pool stays full, BackendError when a new
        connection cannot be made."""
        started = time.perf_counter()
        key = (server.name, login, caps & SHAPE_CAPS, collation)
        pool = self._pool(key, server)
        self._next_waiter += 1
        waiter = self._next_waiter
        action: PoolAction[Pooled] = pool.borrow(waiter, time.monotonic())
        while True:
            if isinstance(action, Wait):
                action = await self._wait(pool, waiter)
            if isinstance(action, Grant):
                pooled = action.conn
                if pooled.backend.alive:
                    metrics.POOL_BORROW_SECONDS.observe(time.perf_counter() - started)
                    return pooled
                self._apply(pool.give_back(pooled, time.monotonic(), reusable=False))
                action = pool.borrow(waiter, time.monotonic())
            elif isinstance(action, Open):
                pooled = await self._open(pool, key, server, waiter, schema)
                metrics.POOL_BORROW_SECONDS.observe(time.perf_counter() - started)
                return pooled
            elif isinstance(action, Refuse):
                if action.reason is RefuseReason.RETIRED:
                    # Its server stopped leading while it waited: the caller borrows from
                    # the new primary's pool.
                    raise PoolRetired(server.name)
                self.refused[action.reason] += 1
                raise PoolRefused(action.reason, key, self.config)

    async def _wait(self, pool: Pool[Pooled], waiter: int) -> PoolAction[Pooled]:
        fut: asyncio.Future[PoolAction[Pooled]] = asyncio.get_running_loop().create_future()
        self._waiters[waiter] = fut
        try:
            return await fut
        except asyncio.CancelledError:
            # The client left while it waited: whatever the pool meant for it goes back.
            if fut.done() and not fut.cancelled():
                given = fut.result()
                if isinstance(given, Grant):
                    self._apply(pool.give_back(given.conn, time.monotonic(), reusable=True))
                elif isinstance(given, Open):
                    self._apply(pool.open_failed(waiter, time.monotonic()))
            else:
                pool.cancel(waiter)
            raise
        finally:
            self._waiters.pop(waiter, None)

    async def _open(
        self,
        pool: Pool[Pooled],
        key: PoolKey,
        server: ServerConfig,
        waiter: int | None,
        schema: str | None,
    ) -> Pooled:
        """A new connection for `waiter` (None: a warm one for `min`), with Baton's tracking
        and its login's character sets read."""
        _, login, caps, collation = key
        backend: BackendConnection | None = None
        try:
            backend = await self._connect(server, login, caps, collation, schema)
            await backend.query(self._tracking_sql)
            row = (await backend.query(BASELINE_SQL))[0]
        except BaseException:
            if backend is not None:
                backend.close()
            self._apply(pool.open_failed(waiter, time.monotonic()))
            raise
        pooled = Pooled(backend, ConnState.opened(schema, row), pool, key, server)
        metrics.POOL_OPENED.labels(server.name).inc()
        actions = pool.opened(waiter, pooled, time.monotonic())
        if waiter is not None:
            assert actions == [Grant(waiter, pooled)], actions
            return pooled
        self._apply(actions)
        return pooled

    def give_back(self, pooled: Pooled, state: SessionState, reset: bool, insert_id: bool) -> None:
        """The borrower is done; the connection now holds its state (ConnState.given_back)."""
        reusable = pooled.backend.alive and pooled.state.given_back(state, reset, insert_id)
        if not reusable:
            pooled.backend.close()
        self._apply(pooled.pool.give_back(pooled, time.monotonic(), reusable))

    def discard(self, pooled: Pooled, quit: bool = True) -> None:
        """The borrower's connection must not be lent again (broken, or its state unknown)."""
        pooled.backend.close(quit)
        self._apply(pooled.pool.give_back(pooled, time.monotonic(), reusable=False))

    def retire(self, keep: str) -> None:
        """A switch was published: every pool but those of server `keep` is retired."""
        for key in [k for k in self._pools if k[0] != keep]:
            self._servers.pop(key, None)
            self._apply(self._pools.pop(key).retire())

    def _apply(self, actions: list[PoolAction[Pooled]]) -> None:
        for action in actions:
            if isinstance(action, CloseConn):
                action.conn.backend.close()
            elif isinstance(action, Open) and action.waiter is None:
                raise AssertionError("only a tick opens warm connections")
            else:
                waiter = action.waiter
                assert waiter is not None
                fut = self._waiters.get(waiter)
                if fut is not None and not fut.done():
                    fut.set_result(action)
                elif isinstance(action, Grant):  # its borrower is gone: back it goes
                    self._apply(action.conn.pool.give_back(action.conn, time.monotonic(), True))

    async def _tick_forever(self) -> None:
        while True:
            await asyncio.sleep(TICK)
            now = time.monotonic()
            for key, pool in list(self._pools.items()):
                for action in pool.tick(now):
                    if isinstance(action, Open):
                        self._warm(pool, key)
                    else:
                        self._apply([action])

    def _warm(self, pool: Pool[Pooled], key: PoolKey) -> None:
        """Open a connection to keep `min` idle (with no schema: a borrower sets its own)."""

        async def open_one() -> None:
            try:
                await self._open(pool, key, self._servers[key], None, None)
            except BackendError as e:
                log.info("pool %s/%s: cannot open a warm connection: %s", key[0], key[1].user, e)

        task = asyncio.get_running_loop().create_task(open_one())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def close(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
        for pool in self._pools.values():
            self._apply(pool.retire())
        self._pools.clear()
        self._servers.clear()

    # -- figures ---------------------------------------------------------------------------------

    def snapshot(self) -> list[dict[str, object]]:
        """Each pool's figures, for `baton ctl pools`."""
        return [
            {
                "server": key[0],
                "user": key[1].user,
                "idle": len(pool.idle),
                "lent": pool.lent,
                "opening": pool.opening,
                "waiting": len(pool.waiters),
                "max": pool.limits.max,
                "borrows": pool.borrows,
                "waited": pool.waited,
                "refused": pool.refused,
            }
            for key, pool in sorted(self._pools.items(), key=lambda kv: (kv[0][0], kv[0][1].user))
        ]

    def collect(self) -> Iterator[Metric]:
        conns = GaugeMetricFamily(
            "baton_pool_connections",
            "Pooled server connections, by server, user and state (idle, lent, opening)",
            labels=["server", "user", "state"],
        )
        waiting = GaugeMetricFamily(
            "baton_pool_waiting", "Sessions waiting for a full pool", labels=["server", "user"]
        )
        borrows = CounterMetricFamily(
            "baton_pool_borrows", "Connections lent by the pools", labels=["server", "user"]
        )
        waited = CounterMetricFamily(
            "baton_pool_waits", "Borrows that waited for a full pool", labels=["server", "user"]
        )
        for (server, login, _, _), pool in self._pools.items():
            for state, n in (
                ("idle", len(pool.idle)),
                ("lent", pool.lent),
                ("opening", pool.opening),
            ):
                conns.add_metric([server, login.user, state], n)
            waiting.add_metric([server, login.user], len(pool.waiters))
            borrows.add_metric([server, login.user], pool.borrows)
            waited.add_metric([server, login.user], pool.waited)
        refused = CounterMetricFamily(
            "baton_pool_refused", "Borrows refused (1040), by reason", labels=["reason"]
        )
        for reason, n in self.refused.items():
            refused.add_metric([str(reason)], n)
        pinned = GaugeMetricFamily(
            "baton_sessions_pinned",
            "Sharing sessions that keep their server connection now, by the rule that pins "
            "them (a session may count under several)",
            labels=["reason"],
        )
        for reason, n in self.pinned().items():
            pinned.add_metric([str(reason)], n)
        yield from (conns, waiting, borrows, waited, refused, pinned)
