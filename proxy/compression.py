"""The compressed client protocol (CLIENT_COMPRESS, zlib), as a pure codec the shell wraps around
the client's byte stream after the login's OK.

On the wire each compressed packet is a 7-byte header and a body: the body's length (3 bytes),
a sequence id of its own (1 byte), and the length of the body once inflated (3 bytes; 0 means
the body was sent as it is). The body carries a slice of the ordinary packet stream, so an
ordinary packet may start in one compressed packet and end in the next. The server leg stays
uncompressed: the shell inflates what the client sends before its packet reader sees it and
deflates what goes to the client, and everything between relays ordinary packets as before.

Inflating is bounded and total, as for every client packet (proxy/client_packets.py): a body is
inflated with `max_length` set from the header, which is never trusted beyond that bound (the
header's 3 bytes cap it at 16 MiB), and must come out exactly that long, with nothing after the
zlib stream; any other input ends in a `ClientPacketError`. Compressed bytes are held until a
whole packet is there (at most 16 MiB and its header), and the shell takes inflated packets one
at a time, as it can act on them, so a small packet that inflates to 16 MiB costs 16 MiB once,
not once per packet a read brought.

Sequence ids follow the server (net_serv.cc): a command starts at 0, each packet either way
takes the next number, and a reply carries the number after the last packet it answers. A
client's packet must carry 0, the number after its previous one, or the number after Baton's
last reply (a LOCAL INFILE's file follows the server's request for it). The shell consumes
inflated bytes a command at a time, possibly after inflating a pipelined command behind it,
so `consumed` maps the bytes taken back to the compressed packet they came in and numbers the
reply from there.
"""

from __future__ import annotations

import zlib
from collections import deque

from proxy.client_packets import ClientPacketError, Malformed

HEADER = 7
MAX_BODY = 0xFFFFFF  # both lengths are 3 bytes
# The server sends shorter payloads as they are (MIN_COMPRESS_LENGTH in MariaDB's net_serv).
MIN_COMPRESS = 50
# Deflate level. MariaDB uses zlib's default (6); on 250 KiB of result rows (ids, md5s, padded
# strings) level 6 took 2.4 times level 1's CPU for a result 4% smaller (0.304 against 0.318 of
# the plain size), and Baton's CPU is the scarcer resource: level 1.
LEVEL = 1
# Packets whose inflated bytes the session has not taken yet that keep their own sequence id:
# enough for any command's packets behind the one the session is on, and a bound on memory
# whatever the client sends (one-byte packets, say).
MAX_ENDS = 64


def _header(body_length: int, seq: int, inflated_length: int) -> bytes:
    return (body_length | (seq & 0xFF) << 24).to_bytes(4, "little") + inflated_length.to_bytes(
        3, "little"
    )


class CompressedStream:
    """Both directions of one client's compressed connection.

    Inbound: `feed` the bytes read, `inflate` one packet's content at a time, and report with
    `consumed` how many inflated bytes the session took. Outbound: `pack` turns bytes for the
    client into compressed packets, numbered as the server would."""

    __slots__ = (
        "level",
        "_buf",
        "_pos",
        "_last_in",
        "_out",
        "_inflated",
        "_used",
        "_ends",
        "_held",
    )

    def __init__(self, level: int = LEVEL) -> None:
        self.level = level
        self._buf = bytearray()  # compressed bytes not inflated yet, read from `_pos`
        self._pos = 0
        self._last_in = -1  # the sequence id of the last packet inflated
        self._out = 0  # the sequence id of the next packet to the client
        self._inflated = 0  # inflated bytes handed out, in all
        self._used = 0  # of those, bytes the session consumed
        # (end, seq) of each inflated packet whose bytes are not all consumed: `end` counts
        # inflated bytes from the start of the connection.
        self._ends: deque[tuple[int, int]] = deque()
        self._held = bytearray()  # the start of a packet for the client, kept until it ends

    # -- from the client ----------------------------------------------------------------------

    @property
    def pending(self) -> int:
        """Compressed bytes held, not yet inflated."""
        return len(self._buf) - self._pos

    def feed(self, data: bytes) -> None:
        self._buf += data

    def ready(self) -> bool:
        """A whole compressed packet waits to be inflated."""
        buf, pos = self._buf, self._pos
        if len(buf) - pos < HEADER:
            return False
        return len(buf) - pos - HEADER >= buf[pos] | buf[pos + 1] << 8 | buf[pos + 2] << 16

    def inflate(self) -> bytes | None:
        """The content of the next whole compressed packet, or None until one has arrived."""
        if not self.ready():
            return None
        buf, pos = self._buf, self._pos
        length = buf[pos] | buf[pos + 1] << 8 | buf[pos + 2] << 16
        seq = buf[pos + 3]
        inflated = buf[pos + 4] | buf[pos + 5] << 8 | buf[pos + 6] << 16
        start = pos + HEADER
        end = start + length
        if seq != 0 and seq != (self._last_in + 1) & 0xFF and seq != self._out:
            raise ClientPacketError(
                Malformed.OUT_OF_ORDER,
                f"Got packets out of order: compressed packet {seq} where 0, "
                f"{(self._last_in + 1) & 0xFF} or {self._out} was expected",
            )
        if inflated == 0:
            data = bytes(buf[start:end])
        else:
            with memoryview(buf)[start:end] as body:  # released before `buf` is resized
                data = _inflate(body, inflated)
        self._pos = end
        if end == len(buf):
            buf.clear()
            self._pos = 0
        elif end > 65536 and end * 2 > len(buf):
            del buf[:end]
            self._pos = 0
        self._last_in = seq
        if data:
            self._inflated += len(data)
            ends = self._ends
            if ends and ends[-1][1] == seq:
                ends[-1] = (self._inflated, seq)  # pipelined commands, each in its packet 0
            else:
                ends.append((self._inflated, seq))
                if len(ends) > MAX_ENDS:
                    # Many packets inflated ahead of the session: the oldest is forgotten, so
                    # a command that ended inside it is answered after the next one's id.
                    ends.popleft()
        return data

    def consumed(self, n: int) -> None:
        """The session took `n` more inflated bytes (a command, or a packet of one): its reply
        is numbered after the compressed packet that held the last of them."""
        self._used += n
        ends = self._ends
        while ends and ends[0][0] < self._used:
            ends.popleft()
        if ends and n:
            self._out = (ends[0][1] + 1) & 0xFF

    # -- to the client --------------------------------------------------------------------

    def pack(self, data: bytes, ends_packet: bool = True) -> list[bytes | memoryview]:
        """`data` as compressed packets, as pieces to write in order: one packet for up to
        16 MiB of content; content shorter than `MIN_COMPRESS`, or that zlib cannot shrink,
        goes as it is (without a copy).

        When `data` stops inside an ordinary packet (a large row relayed as it arrives), it
        is kept, up to 16 MiB, until a later call ends that packet: clients that read the
        compressed protocol (mysql-connector-python's pure one) expect an ordinary packet
        to span at most two compressed ones, as the server sends them."""
        held = self._held
        if held:
            held += data
            if not ends_packet and len(held) < MAX_BODY:
                return []
            data = bytes(held)
            held.clear()
        elif not ends_packet and len(data) < MAX_BODY:
            held += data
            return []
        view = memoryview(data)
        pieces: list[bytes | memoryview] = []
        total = len(view)
        pos = 0
        while True:
            chunk = view[pos : pos + MAX_BODY]
            n = len(chunk)
            seq = self._out
            self._out = (seq + 1) & 0xFF
            body = zlib.compress(chunk, self.level) if n >= MIN_COMPRESS else None
            if body is not None and len(body) < n:
                pieces.append(_header(len(body), seq, n) + body)
            elif n <= 256:
                pieces.append(_header(n, seq, 0) + chunk)
            else:
                pieces.append(_header(n, seq, 0))
                pieces.append(chunk)
            pos += n
            if pos >= total:
                return pieces


def _inflate(body: memoryview, expected: int) -> bytes:
    """One body inflated to exactly `expected` bytes; never more than that is produced."""
    inflater = zlib.decompressobj()
    try:
        data = inflater.decompress(body, expected)
        more = b""
        if not inflater.eof and inflater.unconsumed_tail:
            # The header's length reached: what is left may only end the stream. One more
            # byte of output would be a lie, and is all that is asked for.
            more = inflater.decompress(inflater.unconsumed_tail, 1)
    except zlib.error as e:
        raise ClientPacketError(
            Malformed.BAD_ZLIB, f"Couldn't uncompress communication packet: {e}"
        )
    if more or not inflater.eof:
        raise ClientPacketError(
            Malformed.LENGTH_LIE if more or len(data) == expected else Malformed.BAD_ZLIB,
            "Couldn't uncompress communication packet: "
            + (
                f"it inflates to more than the {expected} bytes its header says"
                if more or len(data) == expected
                else "the zlib stream ends early"
            ),
        )
    if inflater.unused_data:
        raise ClientPacketError(
            Malformed.BAD_ZLIB,
            f"Couldn't uncompress communication packet: {len(inflater.unused_data)} bytes "
            "after its zlib stream",
        )
    if len(data) != expected:
        raise ClientPacketError(
            Malformed.LENGTH_LIE,
            f"Couldn't uncompress communication packet: it inflates to {len(data)} bytes, "
            f"its header says {expected}",
        )
    return data
