"""The fault-injecting shim against a plain echo server: pass, blackhole, reset, restore."""

from __future__ import annotations

import asyncio
import socket
import socketserver
import threading
import time
from collections.abc import Iterator

import pytest

from tests.faultshim import FaultShim


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(65536):
            self.request.sendall(data)


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


@pytest.fixture(scope="module")
def echo() -> Iterator[int]:
    server = _Server(("127.0.0.1", 0), _Echo)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def shim(echo: int) -> Iterator[FaultShim]:
    with FaultShim(echo) as s:
        yield s


def dial(port: int, timeout: float = 2.0) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=timeout)


def roundtrip(conn: socket.socket, data: bytes) -> bytes:
    conn.sendall(data)
    got = b""
    while len(got) < len(data):
        chunk = conn.recv(65536)
        if not chunk:
            break
        got += chunk
    return got


def silent(conn: socket.socket, data: bytes, wait: float = 0.3) -> bool:
    """True when `data` sent on `conn` gets no answer within `wait`."""
    conn.sendall(data)
    conn.settimeout(wait)
    try:
        conn.recv(100)  # data or EOF: not silent
    except TimeoutError:
        return True
    finally:
        conn.settimeout(2.0)
    return False


def test_pass_forwards_both_ways_including_a_large_transfer(shim: FaultShim) -> None:
    with dial(shim.port) as c:
        assert roundtrip(c, b"hello") == b"hello"
        big = bytes(range(256)) * 8192  # 2 MiB: the shim's back-pressure must not lose any
        assert roundtrip(c, big) == big
        assert shim.connections == 1
    deadline = time.monotonic() + 2
    while shim.connections:  # the client's close reaches the echo server and back
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_blackhole_holds_bytes_both_ways_until_restore(shim: FaultShim) -> None:
    old = dial(shim.port)
    assert roundtrip(old, b"before") == b"before"
    shim.blackhole()
    assert silent(old, b"during")
    new = dial(shim.port)  # accepted, but hears nothing
    assert silent(new, b"new one")
    assert shim.connections == 2

    shim.restore()

    assert old.recv(100) == b"during"  # held, not lost: a healed partition
    assert new.recv(100) == b"new one"
    assert roundtrip(old, b"after") == b"after"
    old.close()
    new.close()


def test_reset_closes_connections_and_refuses_new_ones(shim: FaultShim) -> None:
    port = shim.port
    c = dial(port)
    assert roundtrip(c, b"x") == b"x"
    shim.reset()
    with pytest.raises((ConnectionResetError, BrokenPipeError)):
        c.sendall(b"y")
        if c.recv(10) == b"":
            raise ConnectionResetError
    c.close()
    with pytest.raises(ConnectionRefusedError):
        dial(port)
    assert shim.connections == 0

    shim.restore()

    assert shim.port == port
    with dial(port) as c2:
        assert roundtrip(c2, b"back") == b"back"


def test_blackhole_after_reset_and_close_stops_everything(echo: int) -> None:
    s = FaultShim(echo).start()
    s.reset()
    s.blackhole()  # listens again, forwards nothing
    c = dial(s.port)
    assert silent(c, b"z")
    s.close()
    c.settimeout(2)
    try:  # aborted with the shim
        assert c.recv(10) == b""
    except ConnectionResetError:
        pass
    c.close()


async def test_does_not_block_a_test_event_loop(shim: FaultShim) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", shim.port)
    writer.write(b"ping")
    assert await asyncio.wait_for(reader.readexactly(4), 2) == b"ping"
    shim.blackhole()
    writer.write(b"lost?")
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(reader.readexactly(5), 0.2)
    shim.restore()
    assert await asyncio.wait_for(reader.readexactly(5), 2) == b"lost?"
    writer.close()
    await writer.wait_closed()
