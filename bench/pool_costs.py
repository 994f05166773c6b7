"""`python -m bench.pool_costs PORT`: what COM_RESET_CONNECTION resets on a MariaDB server, and
what it costs beside a SET, a COM_PING and a new connection (issue 18's choice of a tracked
diff over a reset on every return). PORT: a sandbox server's; logs in as app/app-pass, schema
sbtest."""

import asyncio
import hashlib
import sys
import time

from proxy.backend import BackendConnection, BackendError, BackendLogin
from proxy.link import TRACKING_SQL
from proxy.packets import Cap, frame

PORT = int(sys.argv[1]) if len(sys.argv) > 1 else 25001


async def main() -> None:
    login = BackendLogin("app", hashlib.sha1(b"app-pass").digest())
    caps = (
        Cap.PROTOCOL_41
        | Cap.SECURE_CONNECTION
        | Cap.PLUGIN_AUTH
        | Cap.TRANSACTIONS
        | Cap.MULTI_RESULTS
        | Cap.LONG_PASSWORD
    )
    c = await BackendConnection.connect("127.0.0.1", PORT, login, caps, 45, "sbtest", 2.0)
    q = c.query
    await q("CREATE DATABASE IF NOT EXISTS sbtest")
    await q("USE sbtest")
    await q(TRACKING_SQL)
    await q("SET @u = 5, SESSION sql_mode='ANSI_QUOTES', SESSION time_zone='+03:00', NAMES latin1")
    await q("CREATE TEMPORARY TABLE tt (a int)")
    await q("SELECT GET_LOCK('pl', 0)")
    await q("PREPARE s FROM 'SELECT 1'")
    parser, _ = await c.command(frame(b"\x16SELECT 2", 0))
    sid = parser.backend_stmt_id
    await q("CREATE TABLE IF NOT EXISTS ai (id int auto_increment primary key)")
    await q("INSERT INTO ai VALUES ()")
    await q("BEGIN")
    probe = (
        "SELECT DATABASE(), @u, @@sql_mode, @@time_zone, @@character_set_client,"
        " IS_USED_LOCK('pl') = CONNECTION_ID(), LAST_INSERT_ID(), @@in_transaction,"
        " @@session_track_system_variables, CONNECTION_ID()"
    )
    print("before", await q(probe))
    p, _ = await c.command(frame(b"\x1f", 0))
    print("reset ok, status", p.status)
    print("after ", await q(probe))
    try:
        await q("SELECT * FROM tt")
        print("temp table survives")
    except BackendError as e:
        print("temp table:", e)
    try:
        await q("EXECUTE s")
        print("sql prepared survives")
    except BackendError as e:
        print("sql prepare:", e)
    try:
        await c.command(frame(b"\x17" + sid.to_bytes(4, "little") + b"\x00\x01\x00\x00\x00", 0))
        print("binary stmt survives")
    except BackendError as e:
        print("binary stmt:", e)
    # cost
    n = 2000
    t = time.perf_counter()
    for _ in range(n):
        await c.command(frame(b"\x1f", 0))
    reset = (time.perf_counter() - t) / n
    t = time.perf_counter()
    for _ in range(n):
        await c.command(frame(b"\x1f", 0))
        await q(TRACKING_SQL)
    reset_track = (time.perf_counter() - t) / n
    t = time.perf_counter()
    for _ in range(n):
        await q("SET SESSION sql_mode=DEFAULT")
    one_set = (time.perf_counter() - t) / n
    t = time.perf_counter()
    for _ in range(n):
        await c.command(frame(b"\x0e", 0))
    ping = (time.perf_counter() - t) / n
    t = time.perf_counter()
    for _ in range(200):
        c2 = await BackendConnection.connect("127.0.0.1", PORT, login, caps, 45, "sbtest", 2.0)
        await c2.query(TRACKING_SQL)
        c2.close()
    connect = (time.perf_counter() - t) / 200
    print(
        f"COM_RESET_CONNECTION {reset * 1e6:.0f} us; reset and tracking set again"
        f" {reset_track * 1e6:.0f} us; one SET {one_set * 1e6:.0f} us; COM_PING"
        f" {ping * 1e6:.0f} us; a new connection, login and tracking {connect * 1e6:.0f} us"
    )
    c.close()


asyncio.run(main())
