"""A request channel between a Baton supervisor and one of its worker processes.

The supervisor makes a socket pair for each worker it spawns and passes one end to it. Both
ends speak the same frames over it: a request with an id and its one reply, and one-way notes
(topology events, in the order they were sent). Either side may ask the other: a worker asks
the supervisor's topology store (reparent/socketstore.py), the supervisor asks a worker for its
sessions, its metrics or a session's server thread (proxy/worker.py).

It is synchronous and thread-based on purpose: the store interface it carries is synchronous
and thread-safe, and a thread that reads the socket works the same beside an asyncio loop (the
worker's, the supervisor's) as beside the controller's worker threads. Requests are answered on
a small thread pool, so a long one (`wait_drained`) does not stop the replies and notes behind
it; notes are handed over on the reader thread, in order, and their handler must return at
once.

Frames are a 4-byte length and a pickle. Pickle is only safe between processes that trust each
other: the socket pair is made by the supervisor and inherited by its own children, never
bound to a path or an address, so no other process can reach it. A frame over MAX_FRAME ends
the channel rather than being read.
"""

from __future__ import annotations

import itertools
import logging
import pickle
import socket
import struct
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

log = logging.getLogger(__name__)

MAX_FRAME = 64 << 20  # a metrics scrape is the largest answer, tens of KiB
SEND_TIMEOUT = 5.0  # seconds a send may wait for a peer that does not read: then it is stuck
_HEADER = struct.Struct("!I")

Handler = Callable[[str, tuple[Any, ...]], object]
NoteHandler = Callable[[str, tuple[Any, ...]], None]


class ChannelClosed(ConnectionError):
    """The peer is gone (exited, killed) or the channel was closed: nothing was sent, or the
    request's answer will never come."""


class _Remote(Exception):
    """An error the peer raised, when its own class cannot be rebuilt here."""


def _pack_error(e: BaseException) -> tuple[type[BaseException], str]:
    return type(e), str(e)


def _unpack_error(cls: object, message: str) -> BaseException:
    """The peer's exception as the same class with the same message (without calling its
    __init__, whose arguments may differ from its message)."""
    if isinstance(cls, type) and issubclass(cls, Exception):
        e = cls.__new__(cls)
        e.args = (message,)
        return e
    return _Remote(message)


class Channel:
    """One end of the socket pair. `handler(kind, args)` answers the peer's requests (its
    return value or exception goes back); `on_note(kind, args)` takes its notes; `on_close`
    runs once when the peer goes."""

    def __init__(
        self,
        sock: socket.socket,
        handler: Handler,
        on_note: NoteHandler | None = None,
        on_close: Callable[[], None] | None = None,
        name: str = "channel",
        threads: int = 8,
    ) -> None:
        sock.setblocking(True)
        # Sends get a timeout of their own (the kernel's: a Python timeout would make the
        # socket non-blocking for the reader too); the reader waits as long as the peer is quiet.
        whole = int(SEND_TIMEOUT)
        sock.setsockopt(
            socket.SOL_SOCKET,
            socket.SO_SNDTIMEO,
            struct.pack("ll", whole, int((SEND_TIMEOUT - whole) * 1e6)),
        )
        self._sock = sock
        self._handler = handler
        self._on_note = on_note
        self._on_close = on_close
        self.name = name
        self._send_lock = threading.Lock()
        self._ids = itertools.count(1)
        self._pending: dict[int, Future[object]] = {}
        self._pending_lock = threading.Lock()
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix=f"{name}-serve")
        self._closed = threading.Event()
        self._reader = threading.Thread(target=self._read, name=f"{name}-read", daemon=True)

    def start(self) -> Channel:
        self._reader.start()
        return self

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    # -- sending ------------------------------------------------------------------------------

    def call(self, kind: str, *args: Any, timeout: float = 10.0) -> object:
        """Ask the peer and wait for its answer; its exception is raised here. ChannelClosed
        if the peer is gone, TimeoutError if it did not answer within `timeout` seconds."""
        request = next(self._ids)
        future: Future[object] = Future()
        with self._pending_lock:
            if self.closed:
                raise ChannelClosed(f"{self.name}: closed")
            self._pending[request] = future
        try:
            self._send(("req", request, kind, args))
            return future.result(timeout)
        finally:
            with self._pending_lock:
                self._pending.pop(request, None)

    def note(self, kind: str, *args: Any) -> None:
        """Tell the peer something that needs no answer (in order with other notes)."""
        self._send(("note", 0, kind, args))

    def _send(self, frame: tuple[Any, ...]) -> None:
        data = pickle.dumps(frame, protocol=pickle.HIGHEST_PROTOCOL)
        if len(data) > MAX_FRAME:
            raise ValueError(f"{self.name}: a frame of {len(data)} bytes is over {MAX_FRAME}")
        with self._send_lock:
            if self.closed:
                raise ChannelClosed(f"{self.name}: closed")
            try:
                self._sock.sendall(_HEADER.pack(len(data)) + data)
            except OSError as e:  # the peer is gone, or stuck past SEND_TIMEOUT
                self.close()
                raise ChannelClosed(f"{self.name}: {e}") from e

    # -- receiving ----------------------------------------------------------------------------

    def _recv_exactly(self, n: int) -> bytes | None:
        chunks = []
        while n:
            try:
                chunk = self._sock.recv(min(n, 1 << 20))
            except OSError:
                return None
            if not chunk:
                return None
            chunks.append(chunk)
            n -= len(chunk)
        return b"".join(chunks)

    def _read(self) -> None:
        try:
            while True:
                header = self._recv_exactly(_HEADER.size)
                if header is None:
                    return
                (length,) = _HEADER.unpack(header)
                if length > MAX_FRAME:
                    log.error("%s: a frame of %d bytes announced; closing", self.name, length)
                    return
                data = self._recv_exactly(length)
                if data is None:
                    return
                tag, request, kind, payload = pickle.loads(data)
                if tag == "req":
                    self._pool.submit(self._answer, request, kind, payload)
                elif tag == "note":
                    if self._on_note is not None:
                        try:
                            self._on_note(kind, payload)
                        except Exception:
                            log.exception("%s: note %s failed", self.name, kind)
                else:
                    with self._pending_lock:
                        future = self._pending.get(request)
                    if future is not None and not future.done():
                        if tag == "ok":
                            future.set_result(payload)
                        else:
                            future.set_exception(_unpack_error(*payload))
        finally:
            self.close()

    def _answer(self, request: int, kind: str, args: tuple[Any, ...]) -> None:
        try:
            reply: tuple[Any, ...] = ("ok", request, kind, self._handler(kind, args))
        except Exception as e:
            reply = ("err", request, kind, _pack_error(e))
        try:
            self._send(reply)
        except ChannelClosed:
            pass
        except (pickle.PicklingError, TypeError, AttributeError, ValueError) as e:
            log.exception("%s: the answer to %s cannot be sent", self.name, kind)
            self._send(("err", request, kind, _pack_error(RuntimeError(str(e)))))

    def close(self) -> None:
        """Stop: pending calls end in ChannelClosed, and `on_close` runs (once)."""
        with self._pending_lock:
            if self._closed.is_set():
                return
            self._closed.set()
            pending = list(self._pending.values())
        for future in pending:
            if not future.done():
                future.set_exception(ChannelClosed(f"{self.name}: the peer went away"))
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self._on_close is not None:
            self._on_close()
