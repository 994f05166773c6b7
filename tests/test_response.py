"""Unit tests of the response codec: where a response ends, what is rewritten, what is learnt."""

from __future__ import annotations

import random

import pytest

from proxy.packets import (
    MAX_PAYLOAD,
    Command,
    PacketError,
    Status,
    Track,
    decode_tracked,
    frame,
    lenenc,
    lenenc_bytes,
    parse_ok,
)
from proxy.response import INFILE_DISABLED, Phase, ResponseParser


def packets(*payloads: bytes, start: int = 1) -> bytes:
    return b"".join(frame(p, start + i) for i, p in enumerate(payloads))


def ok(
    status: int = Status.AUTOCOMMIT,
    affected: int = 0,
    insert_id: int = 0,
    header: bytes = b"\x00",
    track: bytes = b"",
    info: bytes = b"",
) -> bytes:
    body = (
        header + lenenc(affected) + lenenc(insert_id) + status.to_bytes(2, "little") + b"\x00\x00"
    )
    if track:
        body += lenenc_bytes(info) + lenenc_bytes(track)
    elif info:
        body += lenenc_bytes(info)
    return body


def eof(status: int = Status.AUTOCOMMIT) -> bytes:
    return b"\xfe\x00\x00" + status.to_bytes(2, "little")


def err(code: int = 1146, state: str = "42S02", msg: str = "no table") -> bytes:
    return b"\xff" + code.to_bytes(2, "little") + b"#" + state.encode() + msg.encode()


COLDEF = b"\x03def\x00\x00\x00\x01a\x00\x0c\x3f\x00\x0b\x00\x00\x00\x03\x00\x00\x00\x00\x00"
ROW = lenenc_bytes(b"42")


def run(parser: ResponseParser, data: bytes, chunk: int | None = None) -> bytes:
    if chunk is None:
        return parser.feed(data)
    out = b""
    for i in range(0, len(data), chunk):
        out += parser.feed(data[i : i + chunk])
    return out


@pytest.mark.parametrize("deprecate_eof", [True, False])
@pytest.mark.parametrize("chunk", [None, 1, 3, 7])
def test_text_result_set_ends_at_terminator(deprecate_eof: bool, chunk: int | None) -> None:
    p = ResponseParser(deprecate_eof=deprecate_eof, client_tracks=True)
    assert p.begin(Command.QUERY)
    end = ok(header=b"\xfe") if deprecate_eof else eof()
    mid = [] if deprecate_eof else [eof()]
    data = packets(b"\x01", COLDEF, *mid, ROW, ROW, end)
    assert run(p, data, chunk) == data
    assert p.done and p.results == 1 and p.err is None


def test_partial_response_is_not_done_and_bytes_wait_for_a_whole_packet() -> None:
    p = ResponseParser(deprecate_eof=True, client_tracks=True)
    p.begin(Command.QUERY)
    data = packets(b"\x01", COLDEF, ROW, ok(header=b"\xfe"))
    first = p.feed(data[:-3])
    assert not p.done
    assert first + p.feed(data[-3:]) == data
    assert p.done


def test_multi_results_continue_until_more_results_clears() -> None:
    p = ResponseParser(deprecate_eof=True, client_tracks=True)
    p.begin(Command.QUERY)
    more = Status.AUTOCOMMIT | Status.MORE_RESULTS
    data = packets(
        b"\x01",
        COLDEF,
        ROW,
        ok(header=b"\xfe", status=more),
        ok(status=more, affected=3),
        b"\x01",
        COLDEF,
        ROW,
        ok(header=b"\xfe"),
    )
    p.feed(data[:20])
    assert not p.done
    p.feed(data[20:])
    assert p.done and p.results == 2


def test_error_ends_response_and_is_recorded() -> None:
    p = ResponseParser(deprecate_eof=True, client_tracks=True)
    p.begin(Command.QUERY)
    data = packets(err())
    assert p.feed(data) == data
    assert p.done and p.err is not None
    assert (p.err.code, p.err.sqlstate, p.err.message) == (1146, "42S02", "no table")


def test_error_inside_rows_ends_response() -> None:
    p = ResponseParser(deprecate_eof=True, client_tracks=True)
    p.begin(Command.QUERY)
    p.feed(packets(b"\x01", COLDEF, ROW, err(1317, "70100", "interrupted")))
    assert p.done and p.err is not None and p.err.code == 1317


def test_deadlock_clears_in_transaction() -> None:
    p = ResponseParser(deprecate_eof=True, client_tracks=True)
    p.begin(Command.QUERY)
    p.feed(packets(ok(status=Status.AUTOCOMMIT | Status.IN_TRANS)))
    assert p.status & Status.IN_TRANS
    p.begin(Command.QUERY)
    p.feed(packets(err(1213, "40001", "Deadlock found")))
    assert not p.status & Status.IN_TRANS


def test_ok_records_status_and_tracking() -> None:
    track = (
        bytes((Track.SCHEMA,))
        + lenenc_bytes(lenenc_bytes(b"shop"))
        + bytes((Track.SYSTEM_VARIABLES,))
        + lenenc_bytes(lenenc_bytes(b"sql_mode") + lenenc_bytes(b"ANSI"))
        + bytes((Track.STATE_CHANGE,))
        + lenenc_bytes(b"1")
    )
    status = Status.AUTOCOMMIT | Status.IN_TRANS | Status.SESSION_STATE_CHANGED
    p = ResponseParser(deprecate_eof=True, client_tracks=True)
    p.begin(Command.QUERY)
    data = packets(ok(status=status, affected=2, insert_id=7, track=track))
    assert p.feed(data) == data
    assert p.ok is not None and (p.ok.affected_rows, p.ok.last_insert_id) == (2, 7)
    assert p.status == status
    assert decode_tracked(p.tracked) == [
        (Track.SCHEMA, "", "shop"),
        (Track.SYSTEM_VARIABLES, "sql_mode", "ANSI"),
        (Track.STATE_CHANGE, "", "1"),
    ]


def test_tracking_is_stripped_for_a_client_that_did_not_ask() -> None:
    track = bytes((Track.SCHEMA,)) + lenenc_bytes(lenenc_bytes(b"shop"))
    status = Status.AUTOCOMMIT | Status.SESSION_STATE_CHANGED
    p = ResponseParser(deprecate_eof=True, client_tracks=False)
    p.begin(Command.INIT_DB)
    out = p.feed(packets(ok(status=status, affected=1, track=track)))
    payload = out[4:]
    assert out[3] == 1
    assert payload == ok(status=Status.AUTOCOMMIT, affected=1)
    parsed = parse_ok(payload, session_track=False)
    assert parsed.status == Status.AUTOCOMMIT and parsed.info == b""
    # The session still learns the schema.
    assert decode_tracked(p.tracked) == [(Track.SCHEMA, "", "shop")]


def test_stripping_keeps_a_nonempty_info() -> None:
    track = bytes((Track.STATE_CHANGE,)) + lenenc_bytes(b"1")
    status = Status.AUTOCOMMIT | Status.SESSION_STATE_CHANGED
    p = ResponseParser(deprecate_eof=True, client_tracks=False)
    p.begin(Command.QUERY)
    out = p.feed(packets(ok(status=status, track=track, info=b"Rows matched: 1")))
    assert out[4:] == ok(status=Status.AUTOCOMMIT, info=b"Rows matched: 1")


@pytest.mark.parametrize("deprecate_eof", [True, False])
def test_prepare_ok_is_renumbered_and_counts_definitions(deprecate_eof: bool) -> None:
    p = ResponseParser(deprecate_eof=deprecate_eof, client_tracks=True)
    p.begin(Command.STMT_PREPARE, client_stmt_id=5)
    prepare_ok = b"\x00" + (900).to_bytes(4, "little") + b"\x01\x00" + b"\x02\x00" + b"\x00\x00\x00"
    eofs = [] if deprecate_eof else [eof()]
    data = packets(prepare_ok, COLDEF, COLDEF, *eofs, COLDEF, *eofs)
    out = p.feed(data[:-1])
    assert not p.done
    out += p.feed(data[-1:])
    assert p.done
    assert (p.backend_stmt_id, p.prepare_params, p.prepare_columns) == (900, 2, 1)
    expected = prepare_ok[:1] + (5).to_bytes(4, "little") + prepare_ok[5:]
    assert out[4:16] == expected and out[16:] == data[16:]


def test_prepare_error() -> None:
    p = ResponseParser(deprecate_eof=True, client_tracks=True)
    p.begin(Command.STMT_PREPARE, client_stmt_id=1)
    p.feed(packets(err(1064, "42000", "syntax")))
    assert p.done and p.err is not None and p.err.code == 1064


def test_prepare_without_params_or_columns() -> None:
    p = ResponseParser(deprecate_eof=False, client_tracks=True)
    p.begin(Command.STMT_PREPARE, client_stmt_id=1)
    p.feed(packets(b"\x00" + (3).to_bytes(4, "little") + b"\x00" * 7))
    assert p.done


def test_execute_with_cursor_ends_after_metadata() -> None:
    p = ResponseParser(deprecate_eof=False, client_tracks=True)
    p.begin(Command.STMT_EXECUTE)
    p.feed(packets(b"\x01", COLDEF, eof(Status.AUTOCOMMIT | Status.CURSOR_EXISTS)))
    assert p.done
    p.begin(Command.STMT_FETCH)
    p.feed(packets(ROW, ROW))
    assert not p.done
    p.feed(packets(eof(Status.AUTOCOMMIT | Status.LAST_ROW_SENT)))
    assert p.done


def test_fetch_terminator_with_deprecate_eof_is_final_even_with_cursor() -> None:
    p = ResponseParser(deprecate_eof=True, client_tracks=True)
    p.begin(Command.STMT_EXECUTE)
    p.feed(packets(b"\x01", COLDEF, ok(header=b"\xfe", status=Status.CURSOR_EXISTS)))
    assert p.done
    p.begin(Command.STMT_FETCH)
    p.feed(packets(ROW, ok(header=b"\xfe", status=Status.CURSOR_EXISTS)))
    assert p.done


def test_field_list_until_eof() -> None:
    p = ResponseParser(deprecate_eof=False, client_tracks=True)
    p.begin(Command.FIELD_LIST)
    p.feed(packets(COLDEF, COLDEF))
    assert not p.done
    p.feed(packets(eof()))
    assert p.done


def test_statistics_is_one_packet_of_text() -> None:
    p = ResponseParser(deprecate_eof=True, client_tracks=True)
    p.begin(Command.STATISTICS)
    data = packets(b"Uptime: 5  Threads: 1")
    assert p.feed(data) == data and p.done


def test_commands_without_a_response() -> None:
    p = ResponseParser(deprecate_eof=True, client_tracks=True)
    assert not p.begin(Command.STMT_CLOSE)
    assert not p.begin(Command.STMT_SEND_LONG_DATA)
    assert p.done


def test_local_infile_request_hands_the_turn_to_the_client() -> None:
    p = ResponseParser(deprecate_eof=True, client_tracks=True)
    p.begin(Command.QUERY)
    data = packets(b"\xfb/tmp/data.csv")
    assert p.feed(data) == data
    assert p.phase is Phase.INFILE
    p.resume_after_infile()
    p.feed(packets(ok(affected=3), start=4))
    assert p.done and p.ok is not None and p.ok.affected_rows == 3


def test_refused_local_infile_gets_bartons_message() -> None:
    p = ResponseParser(deprecate_eof=True, client_tracks=True)
    p.begin(Command.QUERY, infile_allowed=False)
    out = p.feed(packets(err(1148, "42000", "The used command is not allowed")))
    assert out == frame(INFILE_DISABLED, 1)
    assert b"allow_load_data_local" in out


def test_packets_of_16_mib_and_more_are_not_classified_by_their_tail() -> None:
    p = ResponseParser(deprecate_eof=True, client_tracks=True)
    p.begin(Command.QUERY)
    # A row of exactly 16 MiB - 1 bytes whose continuation starts with 0xFE must not end it.
    big = lenenc(MAX_PAYLOAD + 10) + b"x" * (MAX_PAYLOAD - 9)
    assert len(big) == MAX_PAYLOAD
    tail = b"\xfe" + b"y" * 18
    # One logical row: a full 16 MiB - 1 packet, then its continuation packet.
    data = packets(b"\x01", COLDEF) + frame(big + tail, 3)
    p.feed(data)
    assert not p.done
    p.feed(packets(ok(header=b"\xfe"), start=5))
    assert p.done


def test_bad_column_count_is_a_packet_error() -> None:
    p = ResponseParser(deprecate_eof=True, client_tracks=True)
    p.begin(Command.QUERY)
    with pytest.raises(PacketError):
        p.feed(packets(b"\xfe" + b"\x00" * 20))


def test_random_chunking_gives_identical_bytes() -> None:
    rng = random.Random(7)
    data = packets(
        b"\x02", COLDEF, COLDEF, *[ROW * rng.randint(1, 30) for _ in range(200)], ok(header=b"\xfe")
    )
    for _ in range(50):
        p = ResponseParser(deprecate_eof=True, client_tracks=True)
        p.begin(Command.QUERY)
        out = b""
        pos = 0
        while pos < len(data):
            step = rng.randint(1, 300)
            out += p.feed(data[pos : pos + step])
            pos += step
        assert out == data and p.done


def test_classic_eof_loses_the_state_changed_flag_for_a_client_that_does_not_track() -> None:
    changed = Status.AUTOCOMMIT | Status.IN_TRANS | Status.SESSION_STATE_CHANGED
    for tracks, expected in ((False, Status.AUTOCOMMIT | Status.IN_TRANS), (True, changed)):
        p = ResponseParser(deprecate_eof=False, client_tracks=tracks)
        p.begin(Command.QUERY)
        out = p.feed(packets(b"\x01", COLDEF, eof(changed), ROW, eof(changed)))
        eofs = [x for x in split(out) if x[:1] == b"\xfe"]
        assert [int.from_bytes(x[3:5], "little") for x in eofs] == [expected, expected]
        assert p.status == changed


def split(data: bytes) -> list[bytes]:
    out = []
    while data:
        n = int.from_bytes(data[:3], "little")
        out.append(data[4 : 4 + n])
        data = data[4 + n :]
    return out


@pytest.mark.parametrize("deprecate_eof", [True, False])
def test_large_rows_in_small_chunks_pass_through_in_linear_time(deprecate_eof: bool) -> None:
    """Rows of 16 MiB and more arriving 64 KiB at a time: each chunk is relayed as it comes
    (no packet is gathered whole), so 40 MiB of rows cost their bytes, not their square, and
    a 16 MiB-1 row whose continuation begins like a terminator does not end the result."""
    import time

    big = lenenc(MAX_PAYLOAD + 10) + b"x" * (MAX_PAYLOAD - 9)
    tail = b"\xfe" + b"y" * 18
    middle = lenenc_bytes(b"z" * (8 << 20))
    end = eof() if not deprecate_eof else ok(header=b"\xfe")
    head = packets(b"\x01", COLDEF) if deprecate_eof else packets(b"\x01", COLDEF, eof())
    seq = 3 if deprecate_eof else 4
    data = head + frame(big + tail, seq) + frame(middle, seq + 2) + frame(end, seq + 3)
    p = ResponseParser(deprecate_eof=deprecate_eof, client_tracks=True)
    p.begin(Command.QUERY)
    out = []
    started = time.perf_counter()
    for i in range(0, len(data), 65536):
        chunk = data[i : i + 65536]
        relayed = p.feed(chunk)
        out.append(relayed)
        if i > len(head) and i + 65536 < len(data) - 100:
            assert len(relayed) == len(chunk)  # nothing held back mid-row
    elapsed = time.perf_counter() - started
    assert b"".join(out) == data and p.done
    assert elapsed < 2.0, f"{elapsed:.2f} s for {len(data) >> 20} MiB"
