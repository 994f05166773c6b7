"""Which server a session goes to, and the proxy's side of the topology contracts.

The router follows the store's event stream and keeps, per shard, the primary of the newest
term it has seen; routing decisions read only that, never the store, so a remote store (etcd)
costs nothing per command and a store out of reach leaves routing as it was. A stale view is
safe: the term fence never routes to an older term, and a demoted primary is `read_only`.

It registers this proxy with the store (a heartbeat on a lease, with what it knows: terms and
the shards it holds for), and when a reparent starts it reports "drained" once none of its
sessions has a transaction or a statement in flight on the old primary. Every topology event
goes straight to the holder (proxy/holder.py), which holds new commands and releases them, and
to the listener (the proxy's sessions, proxy/context.py), which marks their connections stale.
Once a switch it held for is over, it adds the holder's counts to the reparent's report.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

from proxy.buffer import Finished
from proxy.holder import Holder
from reparent.config import Config, ServerConfig
from reparent.store import ProxyInfo, TopologyStore
from reparent.topology import (
    Aborted,
    Established,
    ReparentStarted,
    Seen,
    TopologyError,
    TopologyEvent,
)

log = logging.getLogger(__name__)

DRAIN_POLL = 0.002  # seconds between looks at the sessions while a demotion waits
HEARTBEAT = 1.0  # seconds between registrations
REGISTRATION_TTL = 3.0  # seconds a registration outlives the last heartbeat (etcd: the lease)
START_RETRY = 1.0  # seconds between tries to read the topology at start


class Listener(Protocol):
    """The proxy's sessions, and what they do with topology events."""

    def busy(self, shard: str) -> bool: ...

    async def prepare_move(self, shard: str) -> None: ...

    def topology_event(self, event: TopologyEvent) -> None: ...


def default_proxy_id(config: Config) -> str:
    """A proxy's name in the fleet when the config gives none: stable across restarts."""
    return config.proxy.id or f"{socket.gethostname()}:{config.proxy.listen_port}"


class Router:
    def __init__(self, config: Config, store: TopologyStore, proxy_id: str) -> None:
        self.config = config
        self.store = store
        self.proxy_id = proxy_id
        self.listener: Listener | None = None
        self.holder: Holder | None = None  # the proxy's holder: topology events go straight to it
        self._servers = {(shard.name, s.name): s for shard in config.shards for s in shard.servers}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._unwatch: Callable[[], None] | None = None
        self._newest: dict[str, tuple[int, str]] = {}  # shard -> (term, primary)
        self._seen: dict[str, Seen] = {}  # shard -> what the event stream told this proxy
        self._store_ok = True
        self._beat = asyncio.Event()  # set: tell the fleet now what changed, not at the next beat

    # -- routing (the data path: no store access) -------------------------------------------

    def primary(self, shard: str) -> ServerConfig:
        """The primary of the newest term this proxy knows, from the store or an event.

        Fence by term: a store that answers with an older term than one already seen (a
        stale read, a lagging member) does not send sessions back to a server that was
        demoted since. A demoted server becomes a replica and is only ever routed to again
        when a later reparent makes it primary at a newer term.
        """
        return self._servers[(shard, self._newest[shard][1])]

    def term(self, shard: str) -> int:
        """The newest term this proxy knows for `shard`."""
        return self._newest[shard][0]

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

    # -- following the store ----------------------------------------------------------------

    async def start(self) -> None:
        """Subscribe, then read each shard (a read after subscribing cannot miss a switch);
        waits for the store at start, since routing needs a term to fence by."""
        self._loop = asyncio.get_running_loop()
        self._unwatch = await asyncio.to_thread(self.store.watch, self._on_event)
        for shard in self.config.shards:
            while True:
                try:
                    topo = (await asyncio.to_thread(self.store.read, shard.name)).value
                    break
                except TopologyError as e:
                    log.warning("shard %s: waiting for the topology store: %s", shard.name, e)
                    await asyncio.sleep(START_RETRY)
            self._learn(shard.name, topo.term, topo.primary)
            self._seen.setdefault(shard.name, Seen(topo.term))
        self._spawn(self._heartbeat())

    def close(self) -> None:
        if self._unwatch is not None:
            self._unwatch()
        for task in self._tasks:
            task.cancel()

    async def unregister(self) -> None:
        """A clean stop: the fleet stops waiting for this proxy at once."""
        try:
            await asyncio.to_thread(self.store.unregister_proxy, self.proxy_id)
        except TopologyError as e:
            log.warning("could not unregister from the topology store: %s", e)

    def _on_event(self, event: TopologyEvent) -> None:
        """Called from the store's thread: hop onto the proxy's loop."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._deliver, event)

    def _deliver(self, event: TopologyEvent) -> None:
        seen = self._seen.get(event.shard, Seen(0))
        self._seen[event.shard] = seen.after(event)
        if isinstance(event, Established):
            self._learn(event.shard, event.term, event.new_primary)
        if self.listener is not None:
            self.listener.topology_event(event)
        if self.holder is not None:
            self.holder.topology_event(event)
        self._beat.set()
        if isinstance(event, ReparentStarted):
            self._spawn(self._report_drained(event))
        elif isinstance(event, Established | Aborted) and seen.holding is not None:
            self._spawn(self._annotate_for(event.shard, seen.holding))

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def info(self) -> ProxyInfo:
        """What this proxy tells the fleet with each heartbeat."""
        p = self.config.proxy
        return ProxyInfo(
            id=self.proxy_id,
            address=f"{p.listen_host}:{p.listen_port}",
            control_socket=p.control_socket,
            metrics=f"{p.metrics_host}:{p.metrics_port}",
            terms={shard: term for shard, (term, _) in self._newest.items()},
            holding=tuple(sorted(s for s, seen in self._seen.items() if seen.holding)),
        )

    async def _heartbeat(self) -> None:
        while True:
            try:
                await asyncio.to_thread(self.store.register_proxy, self.info(), REGISTRATION_TTL)
                if not self._store_ok:
                    log.warning("topology store reachable again; registered as %s", self.proxy_id)
                self._store_ok = True
            except TopologyError as e:
                if self._store_ok:
                    log.warning("cannot register with the topology store: %s", e)
                self._store_ok = False
            self._beat.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._beat.wait(), HEARTBEAT)

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
        try:
            await asyncio.to_thread(
                self.store.report_drained, self.proxy_id, event.shard, event.term, True
            )
        except TopologyError as e:
            log.warning(
                "shard %s: drained for term %d, not reported: %s", event.shard, event.term, e
            )
            return
        log.info("shard %s: drained for term %d", event.shard, event.term)

    # -- buffer counts ----------------------------------------------------------------------

    async def annotate(self, shard: str, term: int, record_id: str) -> Finished | None:
        """Once this proxy's hold for the switch to `term` is over, its counts go into the
        report `record_id`; returns them (None if it did not hold)."""
        holder = self.holder
        if holder is None:
            return None  # not serving clients: nothing was held
        episode = await holder.episode(shard, term, holder.settings.window)
        if episode is None:
            return None
        try:
            await asyncio.to_thread(
                self.store.annotate,
                record_id,
                self.proxy_id,
                episode.held,
                episode.flushed,
                episode.evicted,
                episode.reads,
            )
        except TopologyError as e:
            log.warning("reparent %s: buffer counts not recorded: %s", record_id, e)
        return episode

    async def _annotate_for(self, shard: str, term: int) -> None:
        """A switch this proxy held for ended (run by any Baton): find its report, which the
        journal's last write put in the history, and add this proxy's counts."""
        try:
            last = await asyncio.to_thread(self.store.history, shard, 1)
        except TopologyError as e:
            log.warning("shard %s: buffer counts for term %d not recorded: %s", shard, term, e)
            return
        if last and last[0].term_before + 1 == term:
            await self.annotate(shard, term, last[0].id)
