"""Which server a session goes to, and the proxy's side of the topology contracts.

The router reads the shard's primary from the topology store, so a session that connects (or
reconnects) after a reparent reaches the new primary. It registers this proxy with the store and,
when a planned reparent starts, reports "drained" once none of its sessions has a transaction or
a statement in flight on the old primary. Every topology event goes on to the listener (the
proxy's sessions and its buffer, proxy/frontend.py), which holds new work and moves the sessions;
the router only learns the new primary and term from `Established`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Protocol

from reparent.config import Config, ServerConfig
from reparent.topology import Established, ReparentStarted, TopologyEvent, TopologyStore

log = logging.getLogger(__name__)

DRAIN_POLL = 0.002  # seconds between looks at the sessions while a demotion waits
HEARTBEAT = 1.0  # seconds between registrations; the registration lives three times as long


class Listener(Protocol):
    """The proxy's side: its sessions, and what it does with topology events."""

    def busy(self, shard: str) -> bool: ...

    async def prepare_move(self, shard: str) -> None: ...

    def topology_event(self, event: TopologyEvent) -> None: ...


class Router:
    def __init__(self, config: Config, store: TopologyStore, proxy_id: str) -> None:
        self.config = config
        self.store = store
        self.proxy_id = proxy_id
        self.listener: Listener | None = None
        self._servers = {(shard.name, s.name): s for shard in config.shards for s in shard.servers}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._unwatch: Callable[[], None] | None = None
        self._newest: dict[str, tuple[int, str]] = {}  # shard -> (term, primary)

    def primary(self, shard: str) -> ServerConfig:
        """The primary of the newest term this proxy knows, from the store or an event.

        Fence by term: a store that answers with an older term than one already seen (a
        stale read, once the store is remote) does not send sessions back to a server that
        was demoted since. A demoted server becomes a replica and is only ever routed to again
        when a later reparent makes it primary at a newer term.
        """
        topo = self.store.read(shard).value
        self._learn(shard, topo.term, topo.primary)
        return self._servers[(shard, self._newest[shard][1])]

    def _learn(self, shard: str, term: int, primary: str) -> None:
        known = self._newest.get(shard)
        if known is None or term > known[0]:
            self._newest[shard] = (term, primary)
        elif term < known[0]:
            log.warning(
                "shard %s: the store names %s at term %d, older than term %d (%s); "
                "routing stays with the newer term",
                shard,
                primary,
                term,
                known[0],
                known[1],
            )

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._unwatch = self.store.watch(self._on_event)
        self._spawn(self._heartbeat())

    def close(self) -> None:
        if self._unwatch is not None:
            self._unwatch()
        for task in self._tasks:
            task.cancel()

    def _on_event(self, event: TopologyEvent) -> None:
        """Called from the controller's thread: hop onto the proxy's loop."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._deliver, event)

    def _deliver(self, event: TopologyEvent) -> None:
        if isinstance(event, Established):
            self._learn(event.shard, event.term, event.new_primary)
        if self.listener is not None:
            self.listener.topology_event(event)
        if isinstance(event, ReparentStarted):
            self._spawn(self._report_drained(event))

    def _spawn(self, coro: object) -> None:
        task = asyncio.ensure_future(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _heartbeat(self) -> None:
        while True:
            self.store.register_proxy(self.proxy_id, HEARTBEAT * 3)
            await asyncio.sleep(HEARTBEAT)

    async def _report_drained(self, event: ReparentStarted) -> None:
        """Report once nothing of this proxy is in flight on the shard's old primary; give up
        when the demotion's grace period is surely over (it goes ahead without us then)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.controller.grace + 1.0
        listener = self.listener
        assert listener is not None
        if listener.busy(event.shard):
            # The sessions already held read their state back now, while the old primary
            # surely answers: a transaction that outlives the grace period must not cost them
            # that. The busy ones follow once they end.
            await listener.prepare_move(event.shard)
        while listener.busy(event.shard):
            if loop.time() > deadline:
                log.info("shard %s: still busy when the grace period ended", event.shard)
                return
            await asyncio.sleep(DRAIN_POLL)
        await listener.prepare_move(event.shard)
        self.store.report_drained(self.proxy_id, event.shard, event.term, True)
        log.info("shard %s: drained for term %d", event.shard, event.term)
