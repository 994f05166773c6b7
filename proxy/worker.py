"""One worker process of a Baton supervisor (proxy/supervisor.py): a proxy and nothing else.

The supervisor spawns it as a new interpreter (`python -m proxy.worker`), never forks it, so no
event loop, thread or client library state is shared. It inherits two descriptors: the
channel to its supervisor, and the clients' listening socket (unless `proxy.reuse_port`, when
it binds the port itself). It takes its config from the supervisor, so every worker of a group
runs the same one.

It is a proxy in the fleet contract under its own id (`<proxy id>/w<index>`): it follows the
topology (through the supervisor's store, or etcd's), holds, reports drained and flushes on its
own, and the controller waits for it like for any proxy. It runs no controller, no detector, no
control socket and no metrics endpoint: the supervisor asks it over the channel for its
sessions, its front door, its accounts and its metrics, and answers for the whole group.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import socket
import sys
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import uvloop
from prometheus_client import generate_latest

from proxy import metrics
from proxy.control import LocalProxies
from proxy.router import default_proxy_id
from proxy.server import DataPath, bind_listener, open_store, start_data_path
from reparent.channel import Channel, ChannelClosed
from reparent.config import Config, StoreKind
from reparent.socketstore import SocketStore
from reparent.store import TopologyStore

log = logging.getLogger(__name__)

T = TypeVar("T")
ASK_TIMEOUT = 30.0  # seconds for the loop to answer one of the supervisor's asks

# What the supervisor asks a worker (request kinds on the channel).
CONFIG = "config"  # worker -> supervisor: the group's config
READY = "ready"  # worker -> supervisor note: accepting clients
PEER_SESSION = "peer_session"  # worker -> supervisor: another worker's session, for KILL
SESSIONS = "sessions"
FRONT_DOOR = "front_door"
USERS = "users"
UNBLOCK = "unblock"
ANNOTATE = "annotate"
METRICS = "metrics"
SESSION_THREAD = "session_thread"
TLS = "tls"


def worker_id(base: str, index: int) -> str:
    """A worker's name in the fleet (store keys, drained reports, `ctl status`)."""
    return f"{base}/w{index}"


class Worker:
    """The worker's side of the channel: answers the supervisor on the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.data: DataPath | None = None
        self.store: SocketStore | None = None
        self.stopped = asyncio.Event()

    def _on_loop(self, make: Callable[[], Awaitable[T]]) -> T:
        """Run a coroutine on the worker's loop from a channel thread, and wait for it."""

        async def run() -> T:
            return await make()

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(ASK_TIMEOUT)

    def handle(self, kind: str, args: tuple[Any, ...]) -> object:
        data = self.data
        if data is None:
            raise RuntimeError("the worker is still starting")
        proxies = LocalProxies(data.ctx)
        if kind == SESSION_THREAD:
            # Read off the loop: one dict lookup and two attribute reads, which the GIL keeps
            # whole, and a KILL waiting on it must not wait for this worker's loop.
            (session_id,) = args
            return data.ctx.session_thread(session_id, peers=False)
        if kind == SESSIONS:
            return self._on_loop(proxies.sessions)
        if kind == FRONT_DOOR:
            return self._on_loop(proxies.front_door)
        if kind == USERS:
            return self._on_loop(lambda: proxies.users(*args))
        if kind == UNBLOCK:
            return self._on_loop(lambda: proxies.unblock(*args))
        if kind == ANNOTATE:
            return self._on_loop(lambda: proxies.annotate(*args))
        if kind == TLS:
            return self._on_loop(lambda: proxies.tls(*args))
        if kind == METRICS:
            return self._on_loop(self._metrics)
        raise ValueError(f"unknown request {kind!r}")

    async def _metrics(self) -> bytes:
        return generate_latest(metrics.REGISTRY)

    def note(self, kind: str, args: tuple[Any, ...]) -> None:
        if self.store is not None and self.store.note(kind, args):
            return
        log.warning("unknown note %r from the supervisor", kind)

    def closed(self) -> None:
        """The supervisor is gone: a worker never serves on without it."""
        self.loop.call_soon_threadsafe(self.stopped.set)


async def run_worker(index: int, channel_fd: int, listen_fd: int | None) -> None:
    loop = asyncio.get_running_loop()
    worker = Worker(loop)
    channel = Channel(
        socket.socket(fileno=channel_fd),
        worker.handle,
        on_note=worker.note,
        on_close=worker.closed,
        name=f"w{index}",
    ).start()
    config = await asyncio.to_thread(channel.call, CONFIG)
    assert isinstance(config, Config)
    store: TopologyStore
    if config.topology.store is StoreKind.FILE:
        store = worker.store = SocketStore(channel)
    else:
        store = await open_store(config)
    base = default_proxy_id(config)
    # The group shares proxy.max_connections: each worker takes its part.
    share = -(-config.proxy.max_connections // config.proxy.workers)
    data = await start_data_path(
        config, store, worker_id(base, index), worker=index, max_connections=share
    )

    def peer_session(session_id: int) -> tuple[str, int] | None:
        try:
            found = channel.call(PEER_SESSION, session_id, timeout=1.0)
        except (ChannelClosed, TimeoutError) as e:
            log.warning("session %d of another worker: no answer (%s)", session_id, e)
            return None
        return found  # type: ignore[return-value]

    data.ctx.peer_session = peer_session
    worker.data = data
    if listen_fd is not None:
        sock = socket.socket(fileno=listen_fd)
        sock.setblocking(False)
    else:
        p = config.proxy
        sock = bind_listener(p.listen_host, p.listen_port, reuse_port=True)
    await data.serve(sock)
    channel.note(READY)
    log.info("worker %d serving as %s", index, data.router.proxy_id)
    loop.add_signal_handler(signal.SIGTERM, worker.stopped.set)
    # Ctrl-C reaches the whole process group: the supervisor decides, and stops its workers.
    # So may a SIGHUP: the supervisor has every worker reload its certificate.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    await worker.stopped.wait()
    log.info("worker %d stopping", index)
    await data.stop()
    store.close()
    channel.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m proxy.worker")
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--channel-fd", type=int, required=True)
    parser.add_argument("--listen-fd", type=int)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s %(levelname)s w{args.index} %(name)s: %(message)s",
    )
    try:
        uvloop.run(run_worker(args.index, args.channel_fd, args.listen_fd))
    except ChannelClosed as e:
        print(f"baton worker {args.index}: supervisor gone: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
