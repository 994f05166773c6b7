"""The sandbox's accounts as PyMySQL clients over loopback TCP."""

from __future__ import annotations

from typing import Any

import pymysql

from reparent.config import Account
from reparent.sandbox import ADMIN, APP, HOST


def connect(port: int, account: Account = APP, **options: Any) -> pymysql.Connection:
    """PyMySQL to 127.0.0.1:port as `account`, autocommit and without TLS (the sandbox has
    none); `options` are PyMySQL's (database, timeouts)."""
    return pymysql.connect(
        host=HOST,
        port=port,
        user=account.user,
        password=account.password,
        autocommit=True,
        ssl_disabled=True,
        **options,
    )


def admin_conn(port: int, read_timeout: float | None = None) -> pymysql.Connection:
    """The controller's account: for checks the application user may not make. A
    `read_timeout` keeps a check of a stopped (SIGSTOP) server from hanging."""
    return connect(port, ADMIN, connect_timeout=2, read_timeout=read_timeout)


def admin_query(port: int, sql: str) -> list[dict[str, Any]]:
    """One statement as admin; rows as dicts."""
    conn = admin_conn(port)
    try:
        cur = conn.cursor(pymysql.cursors.DictCursor)
        cur.execute(sql)
        return list(cur.fetchall())
    finally:
        conn.close()
