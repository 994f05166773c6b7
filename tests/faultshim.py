"""A fault-injecting TCP shim for tests: listens on a port and forwards to a target, until told
to fail.

Put one between two processes (Baton and a server, or replicas and their primary) and cut that
path alone:

- `blackhole()`: a partition. Open connections stay open but nothing moves either way (reading
  stops on both sides, so TCP holds the bytes as a lossy network would retransmit them); new
  connections are accepted and hear nothing. `restore()` lets the held bytes through, as a
  healed network does, and connects the connections accepted meanwhile.
- `reset()`: a dead host. Every connection is aborted (RST) and new ones are refused (the
  listener is closed) until `restore()` listens again on the same port.

The shim runs its own asyncio loop in a daemon thread, so it serves synchronous tests and never
blocks (or depends on) the event loop of a pytest-asyncio test. Every control call returns once
the shim has acted on it.
"""

from __future__ import annotations

import asyncio
import enum
import socket
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")
HOST = "127.0.0.1"


class Mode(enum.StrEnum):
    PASS = "pass"
    BLACKHOLE = "blackhole"
    RESET = "reset"


class _Side(asyncio.Protocol):
    """One socket of a link; whatever it reads goes to the other side."""

    def __init__(self, link: _Link) -> None:
        self.link = link
        self.transport: asyncio.Transport | None = None
        self.held = bytearray()  # read before the other side existed
        self.eof = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        if self.link.paused:
            transport.pause_reading()

    def data_received(self, data: bytes) -> None:
        peer = self.link.peer(self)
        if peer is None or peer.transport is None:
            self.held += data
        else:
            peer.transport.write(data)

    def eof_received(self) -> bool:
        """A half-close is passed on; the link ends once both sides have closed."""
        self.eof = True
        peer = self.link.peer(self)
        if peer is None or peer.transport is None or peer.eof:
            self.link.close()
            return False
        if peer.transport.can_write_eof():
            peer.transport.write_eof()
            return True
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.link.close()

    # Back-pressure: a peer that cannot keep up pauses our reading.
    def pause_writing(self) -> None:
        other = self.link.peer(self)
        if other is not None and other.transport is not None:
            other.transport.pause_reading()

    def resume_writing(self) -> None:
        other = self.link.peer(self)
        if other is not None and other.transport is not None and not self.link.paused:
            other.transport.resume_reading()


class _Link:
    """A client connection and, once connected, its upstream connection."""

    def __init__(self, shim: FaultShim) -> None:
        self.shim = shim
        self.client = _Side(self)
        self.upstream: _Side | None = None
        self.paused = False
        self.closed = False

    def peer(self, side: _Side) -> _Side | None:
        return self.upstream if side is self.client else self.client

    def sides(self) -> list[_Side]:
        return [s for s in (self.client, self.upstream) if s is not None]

    async def connect(self) -> None:
        loop = asyncio.get_running_loop()
        self.upstream = _Side(self)
        try:
            await loop.create_connection(lambda: self.upstream, *self.shim.target)
        except OSError:
            self.abort()
            return
        if self.closed:  # reset while connecting
            self.abort()
            return
        for side in self.sides():
            peer = self.peer(side)
            if side.held and peer is not None and peer.transport is not None:
                peer.transport.write(bytes(side.held))
                side.held.clear()
        if self.paused:
            self.pause()

    def pause(self) -> None:
        self.paused = True
        for side in self.sides():
            if side.transport is not None and not side.transport.is_closing():
                side.transport.pause_reading()

    def resume(self) -> None:
        self.paused = False
        for side in self.sides():
            if side.transport is not None and not side.transport.is_closing():
                side.transport.resume_reading()

    def abort(self) -> None:
        self.closed = True
        for side in self.sides():
            if side.transport is not None:
                side.transport.abort()
        self.shim._links.discard(self)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for side in self.sides():
            if side.transport is not None:
                side.transport.close()
        self.shim._links.discard(self)


class FaultShim:
    """`FaultShim(target_port).start()`; `.port` is where to connect instead of the target.

    `port=0` picks a free port (the kernel's choice on 127.0.0.1). Use it as a context manager
    or call `close()`: the thread and every socket end with it.
    """

    def __init__(self, target_port: int, target_host: str = HOST, port: int = 0) -> None:
        self.target = (target_host, target_port)
        self.port = port
        self.mode = Mode.PASS
        self.accepted = 0  # connections accepted so far
        self._links: set[_Link] = set()
        self._waiting: list[_Link] = []  # accepted during a blackhole, not connected yet
        self._server: asyncio.Server | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def start(self) -> FaultShim:
        self._thread.start()
        self._run(self._listen())
        return self

    def __enter__(self) -> FaultShim:
        return self.start() if not self._thread.is_alive() else self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def connections(self) -> int:
        """Links open now (a client and its upstream count as one)."""
        return self._run(self._count())

    # -- controls ------------------------------------------------------------------------------

    def blackhole(self) -> None:
        self._run(self._set(Mode.BLACKHOLE))

    def reset(self) -> None:
        self._run(self._set(Mode.RESET))

    def restore(self) -> None:
        self._run(self._set(Mode.PASS))

    pass_ = restore

    def close(self) -> None:
        if not self._thread.is_alive():
            return
        self._run(self._set(Mode.RESET))
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    # -- inside the loop -----------------------------------------------------------------------

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    async def _count(self) -> int:
        return len(self._links)

    async def _listen(self) -> None:
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((HOST, self.port))
        sock.listen(128)
        self.port = sock.getsockname()[1]
        self._server = await loop.create_server(self._accept, sock=sock)

    def _accept(self) -> _Side:
        self.accepted += 1
        link = _Link(self)
        self._links.add(link)
        if self.mode is Mode.BLACKHOLE:
            self._waiting.append(link)
            link.paused = True
        else:
            self._loop.create_task(link.connect())
        return link.client

    async def _set(self, mode: Mode) -> None:
        previous, self.mode = self.mode, mode
        if mode is Mode.RESET:
            if self._server is not None:
                self._server.close()
                self._server = None
            for link in list(self._links):
                link.abort()
            self._waiting.clear()
        elif mode is Mode.BLACKHOLE:
            if previous is Mode.RESET:
                await self._listen()
            for link in list(self._links):
                link.pause()
        else:
            if previous is Mode.RESET:
                await self._listen()
            for link in list(self._links):
                link.resume()
            waiting, self._waiting = self._waiting, []
            for link in waiting:
                if not link.closed:
                    await link.connect()
        await asyncio.sleep(0)


class ShimmedGroup:
    """Two shims in front of every server of a sandbox: `baton[name]` for Baton's traffic
    (admin and clients), `replication[name]` for replicas replicating from it. `servers()` is
    the `[[shards.servers]]` list that routes each path through its shim; `route_replicas()`
    repoints the sandbox's replicas at the primary's replication shim (the sandbox starts them
    replicating directly)."""

    def __init__(self, status: dict[str, Any]) -> None:
        self.status = status
        ports = {s["name"]: s["port"] for s in status["servers"]}
        self.ports = ports
        self.baton = {name: FaultShim(port).start() for name, port in ports.items()}
        self.replication = {name: FaultShim(port).start() for name, port in ports.items()}

    def servers(self) -> list[dict[str, Any]]:
        return [
            {
                "name": s["name"],
                "host": s["host"],
                "port": self.baton[s["name"]].port,
                "role": s["role"],
                "replication_port": self.replication[s["name"]].port,
            }
            for s in self.status["servers"]
        ]

    def route_replicas(self, admin: tuple[str, str]) -> None:
        import pymysql

        primary = next(s["name"] for s in self.status["servers"] if s["role"] == "primary")
        for s in self.status["servers"]:
            if s["name"] == primary:
                continue
            conn = pymysql.connect(
                host=HOST, port=s["port"], user=admin[0], password=admin[1], autocommit=True
            )
            with conn, conn.cursor() as cur:
                cur.execute("STOP SLAVE")
                cur.execute(
                    "CHANGE MASTER TO MASTER_HOST=%s, MASTER_PORT=%s",
                    (HOST, self.replication[primary].port),
                )
                cur.execute("START SLAVE")

    def close(self) -> None:
        for shim in (*self.baton.values(), *self.replication.values()):
            shim.close()
