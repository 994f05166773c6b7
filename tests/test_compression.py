"""The compressed protocol's codec (proxy/compression.py), without sockets: what it inflates,
how it numbers packets, and every way a client's compressed packet can be cut short or lie."""

from __future__ import annotations

import os
import random
import time
import tracemalloc
import zlib

import pytest

from proxy.client_packets import ClientPacketError, Malformed
from proxy.compression import MAX_BODY, MIN_COMPRESS, CompressedStream


def packet(body: bytes, seq: int, inflated: int) -> bytes:
    return (len(body) | seq << 24).to_bytes(4, "little") + inflated.to_bytes(3, "little") + body


def zipped(content: bytes, seq: int = 0) -> bytes:
    return packet(zlib.compress(content), seq, len(content))


def inflate_all(stream: CompressedStream) -> bytes:
    out = b""
    while (data := stream.inflate()) is not None:
        out += data
    return out


def test_what_is_packed_inflates_back() -> None:
    server, client = CompressedStream(), CompressedStream()
    content = b"\x05\x00\x00\x01hello" * 1000
    wire = b"".join(bytes(p) for p in server.pack(content))
    assert int.from_bytes(wire[4:7], "little") == len(content)  # it was compressed
    assert len(wire) < len(content) // 10
    client.feed(wire)
    assert inflate_all(client) == content


def test_short_and_incompressible_content_goes_as_it_is() -> None:
    stream = CompressedStream()
    short = b"x" * (MIN_COMPRESS - 1)
    (piece,) = stream.pack(short)
    assert bytes(piece) == packet(short, 0, 0)
    noise = os.urandom(4096)
    header, body = stream.pack(noise)
    assert int.from_bytes(bytes(header)[:3], "little") == len(noise)
    assert bytes(header)[3] == 1 and bytes(header)[4:7] == b"\x00\x00\x00"
    assert bytes(body) == noise  # not copied into a new packet


def test_more_than_16_mib_goes_in_several_packets() -> None:
    stream = CompressedStream()
    content = b"\xab" * (MAX_BODY + 1000)
    pieces = stream.pack(content)
    reader = CompressedStream()
    reader.feed(b"".join(bytes(p) for p in pieces))
    first = reader.inflate()
    assert first is not None and len(first) == MAX_BODY
    second = reader.inflate()
    assert second == b"\xab" * 1000
    assert reader.inflate() is None


def test_every_truncation_waits_and_never_fails() -> None:
    """Each prefix of a valid stream gives the whole packets in it and waits for the rest."""
    parts = [b"a" * 300, b"", os.urandom(80), b"b" * 5000]
    packets = [zipped(parts[0], 0), packet(parts[1], 1, 0), packet(parts[2], 2, 0)]
    packets.append(zipped(parts[3], 3))
    wire = b"".join(packets)
    ends = [sum(len(p) for p in packets[: i + 1]) for i in range(len(packets))]
    for cut in range(len(wire) + 1):
        stream = CompressedStream()
        stream.feed(wire[:cut])
        got = inflate_all(stream)
        whole = sum(1 for end in ends if end <= cut)
        assert got == b"".join(parts[:whole]), cut
        assert stream.pending == cut - (ends[whole - 1] if whole else 0)


def test_bytes_arriving_one_at_a_time_inflate_the_same() -> None:
    content = bytes(range(256)) * 64
    wire = zipped(content)
    stream = CompressedStream()
    out = b""
    for i in range(len(wire)):
        stream.feed(wire[i : i + 1])
        out += inflate_all(stream)
    assert out == content


@pytest.mark.parametrize("said", [1, 99, 101, MAX_BODY])
def test_a_lying_inflated_length_is_refused(said: int) -> None:
    stream = CompressedStream()
    stream.feed(packet(zlib.compress(b"q" * 100), 0, said))
    with pytest.raises(ClientPacketError) as e:
        stream.inflate()
    assert e.value.kind in (Malformed.LENGTH_LIE, Malformed.BAD_ZLIB)
    assert "header" in str(e.value) or "ends early" in str(e.value)


def test_a_zip_bomb_inflates_no_further_than_its_header_says() -> None:
    """64 MiB of zeros in 64 KiB, said to be 100 bytes, then said to be 16 MiB: refused, and
    never more than the header's length is made."""
    bomb = zlib.compress(bytes(64 << 20), 9)
    assert len(bomb) < 100_000
    for said in (100, MAX_BODY):
        stream = CompressedStream()
        stream.feed(packet(bomb, 0, said))
        tracemalloc.start()
        started = time.monotonic()
        try:
            with pytest.raises(ClientPacketError) as e:
                stream.inflate()
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert e.value.kind is Malformed.LENGTH_LIE
        # The header's bound (zlib's output buffer and the bytes made of it), not 64 MiB.
        assert peak < 2 * said + (4 << 20), peak
        assert time.monotonic() - started < 2


def test_corrupt_zlib_is_refused() -> None:
    good = zlib.compress(b"r" * 1000)
    cases = {
        "garbage": os.urandom(40),
        "cut short": good[: len(good) // 2],
        "bytes after the stream": good + b"tail",
        "bad checksum": good[:-1] + bytes([good[-1] ^ 0xFF]),
        "empty body": b"",
    }
    for name, body in cases.items():
        stream = CompressedStream()
        stream.feed(packet(body, 0, 1000))
        with pytest.raises(ClientPacketError) as e:
            stream.inflate()
        assert e.value.kind in (Malformed.BAD_ZLIB, Malformed.LENGTH_LIE), name
        assert str(e.value).startswith("Couldn't uncompress communication packet"), name


def test_sequence_ids_follow_the_server() -> None:
    """A command starts at 0 and may go on in the next ids; the reply follows the last packet
    it answers; the client's next packet of the same command follows the reply."""
    stream = CompressedStream()
    stream.feed(zipped(b"c" * 200, 0) + zipped(b"d" * 200, 1))
    assert inflate_all(stream) == b"c" * 200 + b"d" * 200
    stream.consumed(400)
    (reply,) = stream.pack(b"e" * 10)
    assert bytes(reply)[3] == 2
    stream.feed(packet(b"f", 3, 0))  # as a LOCAL INFILE's file follows the server's request
    assert stream.inflate() == b"f"
    stream.feed(packet(b"g", 0, 0))  # a new command
    assert stream.inflate() == b"g"


@pytest.mark.parametrize("seq", [2, 5, 255])
def test_a_packet_out_of_sequence_is_refused(seq: int) -> None:
    stream = CompressedStream()
    stream.feed(packet(b"a", 0, 0) + packet(b"b", seq, 0))
    assert stream.inflate() == b"a"
    with pytest.raises(ClientPacketError) as e:
        stream.inflate()
    assert e.value.kind is Malformed.OUT_OF_ORDER and "out of order" in str(e.value)


def test_a_reply_is_numbered_after_its_own_command_not_a_pipelined_one() -> None:
    """Command A in packets 0-2, command B (pipelined) in packet 0: A's reply is packet 3 even
    though B was inflated before A's reply went out."""
    stream = CompressedStream()
    a = [b"A" * 100, b"A" * 100, b"A" * 100]
    stream.feed(b"".join(zipped(part, i) for i, part in enumerate(a)) + zipped(b"B" * 60, 0))
    assert len(inflate_all(stream)) == 360
    stream.consumed(300)
    assert bytes(stream.pack(b"ok")[0])[3] == 3
    stream.consumed(60)
    assert bytes(stream.pack(b"ok")[0])[3] == 1


def test_a_reply_is_numbered_after_its_command_when_the_next_is_inflated_before_it() -> None:
    """A (packets 0-2) is taken and runs; B (packet 0) is inflated meanwhile; A's reply is 3."""
    stream = CompressedStream()
    stream.feed(b"".join(zipped(b"A" * 100, i) for i in range(3)))
    assert len(inflate_all(stream)) == 300
    stream.consumed(300)
    stream.feed(zipped(b"B" * 60, 0))
    assert stream.inflate() == b"B" * 60
    assert [bytes(p)[3] for p in stream.pack(b"x" * 10) + stream.pack(b"y" * 10)] == [3, 4]
    stream.consumed(60)
    assert bytes(stream.pack(b"ok")[0])[3] == 1


def inflated_length(stream: CompressedStream) -> int:
    n = 0
    while (data := stream.inflate()) is not None:
        n += len(data)
    return n


def test_one_byte_packets_keep_memory_bounded() -> None:
    """20,000 one-byte packets of one command (ids 0, 1, ... 255, 0, ...): the map from bytes
    to ids stays small, and the reply follows the last packet."""
    stream = CompressedStream()
    stream.feed(b"".join(packet(b"c", i & 0xFF, 0) for i in range(20_000)))
    assert inflated_length(stream) == 20_000
    stream.consumed(20_000)
    assert bytes(stream.pack(b"ok")[0])[3] == 20_000 & 0xFF
    stream.feed(b"".join(packet(b"d", i & 0xFF, 0) for i in range(20_000)))
    tracemalloc.start()
    try:
        assert inflated_length(stream) == 20_000
        kept = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert kept < 50_000, kept  # not 20,000 entries of the map (about 1.5 MB)


def test_a_packet_cut_short_is_kept_until_it_ends() -> None:
    stream = CompressedStream()
    assert stream.pack(b"\xff\x00\x00\x01" + b"r" * 100, ends_packet=False) == []
    pieces = stream.pack(b"r" * (0xFF - 100))
    reader = CompressedStream()
    reader.feed(b"".join(bytes(p) for p in pieces))
    assert reader.inflate() == b"\xff\x00\x00\x01" + b"r" * 0xFF
    assert reader.inflate() is None


def test_random_input_ends_in_content_or_an_error() -> None:
    """Total: whatever arrives, `inflate` returns content, None, or a ClientPacketError."""
    rng = random.Random(16)
    for _ in range(3000):
        stream = CompressedStream()
        kind = rng.randrange(3)
        if kind == 0:
            data = rng.randbytes(rng.randrange(64))
        else:
            body = zlib.compress(rng.randbytes(rng.randrange(200)))
            data = bytearray(packet(body, rng.choice((0, 1, 7)), rng.randrange(300)))
            for _ in range(rng.randrange(4)):
                data[rng.randrange(len(data))] = rng.randrange(256)
            data = bytes(data[: rng.randrange(len(data) + 1)]) if kind == 2 else bytes(data)
        stream.feed(data)
        try:
            while stream.inflate() is not None:
                pass
        except ClientPacketError:
            pass
