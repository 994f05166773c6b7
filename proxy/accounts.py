"""The accounts Baton lets in: read from the servers, or fixed in the config.

By default Baton reads `mysql.global_priv` and `mysql.roles_mapping` through its admin
connection, so an account created or re-passworded on the primary works through Baton without
touching Baton's config. The list is read again when a login names a user Baton does not know
or whose answer does not fit the known hash (at most once per `RELOAD_MIN_INTERVAL`), on a
timer, and on `baton ctl users reload`.

The read_only fence: demotion relies on `read_only`, which does not stop an account with SUPER
or READ ONLY ADMIN (directly or through a role it may SET). Such accounts are found at each
load; logins to them through Baton are refused unless `proxy.allow_unfenced_users` is set.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

from proxy.auth import (
    NATIVE_PLUGIN,
    Account,
    AccountBook,
    Fence,
    Sha2Cache,
    native_hash,
    parse_native_hash,
)
from reparent.admin import AdminConnection
from reparent.config import PLAIN_BACKEND, BackendSettings, ServerConfig
from reparent.config import Account as ConfigAccount

log = logging.getLogger(__name__)

RELOAD_MIN_INTERVAL = 1.0  # seconds between reloads asked for by logins
REFRESH_INTERVAL = 60.0  # seconds between reloads on the timer
CONNECT_TIMEOUT = 2.0

# Bits of `access` in mysql.global_priv (MariaDB's privilege.h), verified on 10.11: a GRANT
# SUPER added 1<<15, a GRANT READ_ONLY ADMIN 1<<33.
_FENCE_BITS = {Fence.SUPER: 1 << 15, Fence.READ_ONLY_ADMIN: 1 << 33}

ACCOUNTS_SQL = "SELECT User, Host, Priv FROM mysql.global_priv"
ROLES_SQL = "SELECT User, Host, Role FROM mysql.roles_mapping"


def book_from_rows(
    privs: Iterable[tuple[str, str, str]], roles: Iterable[tuple[str, str, str]]
) -> AccountBook:
    """Accounts from the two tables' rows. A role's privileges count for every account it is
    granted to (and roles granted to roles), since the account may SET ROLE at any time."""
    entries: dict[tuple[str, str], dict[str, Any]] = {}
    for user, host, priv in privs:
        try:
            data = json.loads(priv)
        except ValueError:
            log.warning("account '%s'@'%s': unreadable Priv column, skipped", user, host)
            continue
        if isinstance(data, dict):
            entries[(user, host)] = data
    granted: dict[tuple[str, str], set[str]] = {}
    for user, host, role in roles:
        granted.setdefault((user, host), set()).add(role)

    def access(key: tuple[str, str], seen: frozenset[tuple[str, str]]) -> int:
        own = entries.get(key, {}).get("access", 0)
        total = own if isinstance(own, int) else 0
        for role in granted.get(key, ()):
            role_key = (role, "")
            if role_key not in seen:
                total |= access(role_key, seen | {role_key})
        return total

    accounts = []
    for (user, host), data in entries.items():
        if data.get("is_role") or data.get("account_locked"):
            continue
        plugin = data.get("plugin", NATIVE_PLUGIN)
        h2 = None
        if plugin == NATIVE_PLUGIN and not data.get("auth_or"):
            h2 = parse_native_hash(str(data.get("authentication_string", "")))
        bits = access((user, host), frozenset({(user, host)}))
        unfenced = frozenset(f for f, bit in _FENCE_BITS.items() if bits & bit)
        accounts.append(Account(user, host, str(plugin), h2, unfenced))
    return AccountBook(accounts)


def book_from_config(users: Iterable[ConfigAccount]) -> AccountBook:
    """A fixed list from `[[users]]`: one account per name, from any host."""
    return AccountBook(
        Account(u.user, "%", NATIVE_PLUGIN, native_hash(u.password) if u.password else b"")
        for u in users
    )


class Accounts:
    """The current `AccountBook` and when to read it again. Loads run in a worker thread."""

    def __init__(
        self,
        fixed: AccountBook | None,
        servers: Callable[[], list[ServerConfig]],
        admin: ConfigAccount,
        clock: Callable[[], float] = time.monotonic,
        backend: BackendSettings = PLAIN_BACKEND,
    ) -> None:
        self._fixed = fixed
        self._servers = servers
        self._admin = admin
        self._backend = backend  # TLS to the servers
        self._clock = clock
        self.book = fixed if fixed is not None else AccountBook()
        self.loaded_at = 0.0 if fixed is None else clock()
        self.source = "config" if fixed is not None else "servers"
        self.error = ""
        self._last_try = -RELOAD_MIN_INTERVAL
        self._loading: asyncio.Future[bool] | None = None
        # caching_sha2_password's fast-path verifiers, filled by full logins (proxy/auth.py).
        self.sha2 = Sha2Cache()

    def just_read(self) -> bool:
        """Were the accounts read less than RELOAD_MIN_INTERVAL ago? (A login that already
        made them be read for an unknown user need not wait for another read.)"""
        return self._clock() - self.loaded_at < RELOAD_MIN_INTERVAL

    async def reload(self, why: str, force: bool = False) -> bool:
        """Read the accounts again; True if a new list was read. Concurrent callers share one
        load, and logins cannot ask more often than RELOAD_MIN_INTERVAL."""
        if self._fixed is not None:
            return False
        if self._loading is not None and not self._loading.done():
            return await asyncio.shield(self._loading)
        wait = self._last_try + RELOAD_MIN_INTERVAL - self._clock()
        if not force and wait > 0:
            # Too soon after the last read: this login waits for the next one (logins that
            # name unknown users cannot make Baton read the accounts more than once a second).
            self._last_try += RELOAD_MIN_INTERVAL
            self._loading = asyncio.ensure_future(self._load_after(wait, why))
            return await asyncio.shield(self._loading)
        self._last_try = self._clock()
        self._loading = asyncio.ensure_future(self._load(why))
        return await asyncio.shield(self._loading)

    async def _load_after(self, delay: float, why: str) -> bool:
        await asyncio.sleep(delay)
        return await self._load(why)

    async def _load(self, why: str) -> bool:
        for server in self._servers():
            try:
                book = await asyncio.to_thread(self._read, server)
            except Exception as e:  # a server down or refusing: try the next one
                self.error = f"{server.name}: {e}"
                continue
            before = {a.name for a in self.book.unfenced()}
            self.book = book
            self.loaded_at = self._clock()
            self.error = ""
            log.info("accounts: %d read from %s (%s)", len(book), server.name, why)
            for account in book.unfenced():
                if account.name not in before:
                    log.warning(
                        "account %s holds %s: read_only does not fence it; logins through "
                        "Baton are refused unless proxy.allow_unfenced_users is set",
                        account.name,
                        " and ".join(sorted(account.unfenced)),
                    )
            return True
        log.warning("accounts: cannot read them (%s): %s", why, self.error)
        return False

    def _read(self, server: ServerConfig) -> AccountBook:
        conn = AdminConnection(server, self._admin, CONNECT_TIMEOUT, self._backend)
        try:
            privs = conn.query(ACCOUNTS_SQL)
            roles = conn.query(ROLES_SQL)
        finally:
            conn.close()
        return book_from_rows(
            ((r["User"], r["Host"], r["Priv"]) for r in privs),
            ((r["User"], r["Host"], r["Role"]) for r in roles),
        )

    async def refresh_forever(self) -> None:
        while True:
            await self.reload("timer", force=True)
            await asyncio.sleep(REFRESH_INTERVAL)
