"""The control socket: one JSON object per line each way, on a Unix socket of mode 0600.

It is how operators (through `baton ctl`) and tests see inside a running Baton and run reparents.
Every command is a method named `cmd_<name>`. A reparent streams a `{"progress": ...}` line per
finished step before its final `{"ok": ..., "result": report}` line.

Every request line gets exactly one final reply, whatever its bytes: a line is parsed by
`parse_request` (UTF-8, at most MAX_LINE bytes, nesting at most MAX_DEPTH, finite numbers) and a
handler reads its arguments only through `Args`, which checks type and range, so bad input ends
in `{"ok": false, "error": ...}` and the connection carries on with the next line.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import re
import stat
from collections.abc import Callable, Collection
from typing import Any, Protocol, TypeVar

from proxy.context import ProxyContext
from reparent.config import Config
from reparent.controller import Controller, ReparentRefused
from reparent.store import LEADER
from reparent.topology import ReparentKind, ReparentRecord, TopologyError

log = logging.getLogger(__name__)


class ControlError(Exception):
    """A command that cannot be carried out; its message goes back to the caller."""


Emit = Callable[[dict[str, Any]], None]
T = TypeVar("T")

# Requests are a few hundred bytes; a longer line is answered with an error and skipped.
MAX_LINE = 64 * 1024
# Requests are flat objects; this bounds json's recursion far below Python's stack limit.
MAX_DEPTH = 16
MAX_INT_DIGITS = 20  # no argument needs more; Python refuses above 4,300 with a ValueError
MAX_HISTORY = 1000
MAX_TEXT = 256  # names of shards and servers; bounds what an error may echo back
MAX_NAMES = 64  # a list of server names (ers --allow-unreachable)
MAX_TIMEOUT = 3600.0
# A JSON string (closed or running to the end of the line) or one bracket outside strings.
_DEPTH_TOKENS = re.compile(rb'"(?:[^"\\]|\\.)*"?|[\[\]{}]')


def _show(value: Any) -> str:
    """A value for an error message, as JSON and cut short: the reply must not echo a 64 KiB
    line."""
    text = json.dumps(value, default=repr)
    return text if len(text) <= 60 else text[:57] + "..."


def _too_deep(line: bytes) -> bool:
    depth = 0
    for m in _DEPTH_TOKENS.finditer(line):
        token = m.group()
        if token in (b"[", b"{"):
            depth += 1
            if depth > MAX_DEPTH:
                return True
        elif token in (b"]", b"}"):
            depth -= 1
    return False


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise ControlError(f"an integer has more than {MAX_INT_DIGITS} digits")
    return int(text)


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ControlError(f"number {_show(text[:30])} is out of range")
    return value


def _no_constant(text: str) -> Any:
    raise ControlError(f"{text} is not a JSON number")


def parse_request(line: bytes) -> dict[str, Any]:
    """One request line as a dict with a string "cmd", or a ControlError saying what is wrong.

    Total and bounded: invalid UTF-8, a byte-order mark, nesting deeper than MAX_DEPTH (json
    would raise RecursionError), integers too long for int() and NaN/Infinity (which json
    accepts and every comparison then passes) all end in a ControlError."""
    if not line.strip():
        raise ControlError('empty line: send one JSON object per line, like {"cmd": "status"}')
    try:
        text = line.decode()
    except UnicodeDecodeError as e:
        raise ControlError(f"not UTF-8: byte {e.start} is 0x{line[e.start]:02x}")
    if text.startswith("\ufeff"):
        raise ControlError("the line starts with a byte-order mark; send plain UTF-8 JSON")
    if _too_deep(line):
        raise ControlError(f"JSON nested deeper than {MAX_DEPTH} levels")
    try:
        request = json.loads(
            text,
            parse_int=_bounded_int,
            parse_float=_finite_float,
            parse_constant=_no_constant,
        )
    except json.JSONDecodeError as e:
        raise ControlError(f"not JSON: {e}")
    if not isinstance(request, dict) or not isinstance(request.get("cmd"), str):
        raise ControlError('expected a JSON object like {"cmd": "status"}')
    return request


async def read_line(reader: asyncio.StreamReader) -> bytes | None:
    """The next line (the last one may lack its newline); None at the end of the stream.

    A line longer than the reader's limit is read to its end and dropped, and a ControlError
    says so: the next line is then read from its true start, never from the middle of the long
    one (StreamReader.readline would raise, and leave the rest to be read as a line)."""
    try:
        return await reader.readuntil(b"\n")
    except asyncio.IncompleteReadError as e:
        return e.partial or None
    except asyncio.LimitOverrunError as e:
        consumed = e.consumed
    while True:
        await reader.readexactly(consumed)
        try:
            await reader.readuntil(b"\n")
            break
        except asyncio.IncompleteReadError:
            break
        except asyncio.LimitOverrunError as e:
            consumed = e.consumed
    raise ControlError(f"request line longer than {MAX_LINE} bytes; skipped it")


class Args:
    """A request's arguments, each read with its type and range checked.

    Handlers read arguments only through this, so a wrong type or an absurd value ends in a
    ControlError naming the argument, not in a TypeError deep in the controller. `known` are
    the argument names the command takes: any other is refused, so that a misspelt `to` does
    not silently run a reparent to a server of Baton's choosing. JSON null counts as absent.
    """

    def __init__(self, request: dict[str, Any], *known: str) -> None:
        extra = sorted(set(request) - {"cmd", *known})
        if extra:
            takes = ", ".join(known) or "no arguments"
            raise ControlError(
                f"{request['cmd']}: unknown argument {_show(extra[0])} (it takes {takes})"
            )
        self._request = request

    def text(self, key: str, choices: Collection[str] | None = None) -> str | None:
        value = self._request.get(key)
        if value is None:
            return None
        return _text(key, value, choices)

    def texts(self, key: str, choices: Collection[str] | None = None) -> tuple[str, ...]:
        """A list of at most MAX_NAMES strings, each checked as `text` checks one; () if
        absent."""
        value = self._request.get(key)
        if value is None:
            return ()
        if not isinstance(value, list) or len(value) > MAX_NAMES:
            raise ControlError(
                f"{key} must be a list of at most {MAX_NAMES} strings, got {_show(value)}"
            )
        return tuple(_text(key, v, choices) for v in value)

    def integer(self, key: str, default: int, low: int, high: int) -> int:
        value = self._request.get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ControlError(f"{key} must be an integer from {low} to {high}, got {_show(value)}")
        return value

    def flag(self, key: str) -> bool:
        value = self._request.get(key)
        if value is None:
            return False
        if not isinstance(value, bool):
            raise ControlError(f"{key} must be true or false, got {_show(value)}")
        return value

    def seconds(self, key: str, high: float) -> float | None:
        """A positive duration of at most `high` seconds, or None."""
        value = self._request.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= high:
            raise ControlError(
                f"{key} must be a number of seconds above 0 and at most {high:g}, "
                f"got {_show(value)}"
            )
        return float(value)


def _text(key: str, value: Any, choices: Collection[str] | None) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= MAX_TEXT:
        raise ControlError(
            f"{key} must be a non-empty string of at most {MAX_TEXT} characters, got {_show(value)}"
        )
    if choices is not None and value not in choices:
        one_of = ", ".join(sorted(choices))
        raise ControlError(f"{key} must be one of {one_of}, got {_show(value)}")
    return value


# proxy id -> {"held": n, "flushed": n, "evicted": n, "reads": n}
Counts = dict[str, dict[str, int]]


class Proxies(Protocol):
    """The data path the control socket answers for: this process's sessions
    (`LocalProxies`), or every worker's of a supervisor (proxy/supervisor.py)."""

    proxy_id: str

    async def sessions(self) -> list[dict[str, Any]]: ...

    async def front_door(self) -> dict[str, Any]: ...

    async def users(self, reload: bool) -> dict[str, Any]: ...

    async def unblock(self, address: str) -> bool: ...

    async def pools(self) -> dict[str, Any]: ...

    async def annotate(self, shard: str, term: int, record_id: str) -> Counts: ...

    async def tls(self, reload: bool) -> list[dict[str, Any]]: ...


class LocalProxies:
    """The sessions of one proxy process: what a single Baton, or one worker, answers."""

    def __init__(self, ctx: ProxyContext) -> None:
        self.ctx = ctx
        self.proxy_id = ctx.router.proxy_id

    async def sessions(self) -> list[dict[str, Any]]:
        """Every session's state; stale user variables are read back from idle sessions."""
        out = []
        for conn in list(self.ctx.sessions.values()):
            await conn.refresh_if_stale()
            out.append(conn.state.as_dict())
        return out

    async def front_door(self) -> dict[str, Any]:
        admission = self.ctx.admission
        return {
            "sessions": len(self.ctx.sessions),
            "version": self.ctx.identity.version,
            "front_door": {
                "open": admission.open,
                "capacity": admission.capacity,
                "blocked": admission.blocked,
                "refused": {str(k): v for k, v in admission.refused.items()},
            },
            "unfenced_users": [a.name for a in self.ctx.accounts.book.unfenced()],
        }

    async def users(self, reload: bool) -> dict[str, Any]:
        """The accounts Baton lets in; with reload, read them from the servers first."""
        accounts = self.ctx.accounts
        if reload:
            await accounts.reload("ctl users reload", force=True)
        return {
            "source": accounts.source,
            "error": accounts.error,
            "accounts": [
                {
                    "account": a.name,
                    "plugin": a.plugin,
                    "usable": a.usable,
                    "unfenced": sorted(a.unfenced),
                }
                for a in accounts.book
            ],
        }

    async def unblock(self, address: str) -> bool:
        return self.ctx.admission.unblock(address)

    async def pools(self) -> dict[str, Any]:
        """The pools of server connections that sessions share, and why sessions keep theirs."""
        ctx = self.ctx
        sharing = [c.machine for c in ctx.sessions.values() if c.machine.shares]
        return {
            "multiplex": ctx.pools is not None,
            "pools": ctx.pools.snapshot() if ctx.pools is not None else [],
            "sessions": len(ctx.sessions),
            "detached": sum(1 for m in sharing if m.detached),
            "pinned": {str(k): v for k, v in ctx.pinned().items() if v},
        }

    async def tls(self, reload: bool) -> list[dict[str, Any]]:
        """The client certificate in use (with reload: read again first, the old one kept
        if the new one cannot be used); [] when TLS for clients is off."""
        tls = self.ctx.tls
        if tls is None:
            return []
        if reload:
            tls.reload()
        return [tls.status()]

    async def annotate(self, shard: str, term: int, record_id: str) -> Counts:
        """What this proxy held for the switch to `term` (waited for up to a window), also
        added to the report `record_id` in the store."""
        episode = await self.ctx.router.annotate(shard, term, record_id)
        if episode is None:
            return {}
        counts = {
            "held": episode.held,
            "flushed": episode.flushed,
            "evicted": episode.evicted,
            "reads": episode.reads,
        }
        return {self.proxy_id: counts}


class ControlServer:
    def __init__(self, config: Config, controller: Controller, proxies: Proxies, path: str) -> None:
        self.config = config
        self.controller = controller
        self.proxies = proxies
        self.path = path
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        # A stale socket left by a Baton that did not stop cleanly goes; anything else stays,
        # and the bind then fails: a wrong path must never delete a file (check_files says so).
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(os.lstat(self.path).st_mode):
                os.unlink(self.path)
        # The umask makes the socket 0600 from birth, with no window where others could connect.
        old = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(
                self._client, path=self.path, limit=MAX_LINE
            )
        finally:
            os.umask(old)

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
        if os.path.exists(self.path):
            os.unlink(self.path)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        def emit(obj: dict[str, Any]) -> None:
            writer.write(json.dumps(obj).encode() + b"\n")

        try:
            while True:
                try:
                    line = await read_line(reader)
                except ControlError as e:
                    emit({"ok": False, "error": str(e)})
                else:
                    if line is None:
                        break
                    emit(await self.handle(line, emit))
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def handle(self, line: bytes, emit: Emit | None = None) -> dict[str, Any]:
        """The final reply to one request line; never raises for anything the line holds."""
        try:
            request = parse_request(line)
            method = getattr(self, f"cmd_{request['cmd']}", None)
            if method is None:
                known = ", ".join(sorted(n[4:] for n in dir(self) if n.startswith("cmd_")))
                raise ControlError(f"unknown command {_show(request['cmd'])}; known: {known}")
            return {"ok": True, "result": await method(request, emit or (lambda _: None))}
        except (ControlError, ReparentRefused, TopologyError) as e:
            # TopologyError: the store's refusals (a journal conflict, an unknown shard, a lost
            # lock) are written for the operator, as ControlServer._store already passes them.
            return {"ok": False, "error": str(e)}
        except Exception as e:
            # A bug, not bad input: the traceback goes to the log, and the caller still
            # gets its one reply instead of a connection closed without a word.
            log.exception("control request %s failed", _show(line))
            return {"ok": False, "error": f"internal error ({type(e).__name__}); see Baton's log"}

    async def cmd_status(self, request: dict[str, Any], emit: Emit) -> dict[str, Any]:
        Args(request)  # it takes no arguments: refuse any
        store = self.controller.store
        shards = []
        for shard in self.config.shards:
            topo = (await self._store(store.read, shard.name)).value
            in_flight = await self._store(store.journal_get, shard.name)
            shards.append(
                {
                    "name": shard.name,
                    "primary": topo.primary,
                    "term": topo.term,
                    "lock": await self._store(store.lock_owner, shard.name),
                    "reparent": in_flight.to_dict() if in_flight else None,
                    # How the servers contradict the config and store, as the failure detector
                    # last found it; while any, nothing is done about the shard automatically.
                    "mismatches": [m.to_dict() for m in self.controller.mismatches(shard.name)],
                    "servers": [
                        {
                            "name": s.name,
                            "host": s.host,
                            "port": s.port,
                            "role": "primary" if s.name == topo.primary else "replica",
                            "quarantined": s.name in topo.quarantined,
                        }
                        for s in shard.servers
                    ],
                }
            )
        return {
            "shards": shards,
            **await self.proxies.front_door(),
            "proxy": self.proxies.proxy_id,
            "store": str(self.config.topology.store),
            "proxies": [p.to_dict() for p in await self._store(store.proxies)],
            "detector_leader": await self._store(store.lock_owner, LEADER),
        }

    async def cmd_unblock(self, request: dict[str, Any], emit: Emit) -> dict[str, Any]:
        """Lift the block on an address whose logins failed max_connect_errors times."""
        address = Args(request, "address").text("address")
        if address is None:
            raise ControlError("unblock needs an address")
        if not await self.proxies.unblock(address):
            raise ControlError(f"{address} is not blocked")
        log.info("address %s unblocked by an operator", address)
        return {"unblocked": address}

    async def cmd_pools(self, request: dict[str, Any], emit: Emit) -> dict[str, Any]:
        """The pools of server connections sessions share ([pool] multiplex)."""
        Args(request)  # it takes no arguments: refuse any
        return await self.proxies.pools()

    async def cmd_tls(self, request: dict[str, Any], emit: Emit) -> dict[str, Any]:
        """`status` or `reload` of Baton's certificate for clients (every worker's). A reload
        that fails anywhere is an error naming why; the old certificate stays in use there."""
        action = Args(request, "action").text("action", ("status", "reload")) or "status"
        proxies = await self.proxies.tls(action == "reload")
        if not proxies:
            raise ControlError("TLS for clients is off: set [tls] cert and key in the config")
        failed = [p for p in proxies if p["error"]]
        if action == "reload" and failed:
            raise ControlError(
                "tls reload failed, the certificate loaded before stays in use: "
                + "; ".join(
                    (f"worker {p['worker']}: " if "worker" in p else "") + p["error"]
                    for p in failed
                )
            )
        return {"proxies": proxies}

    async def cmd_users(self, request: dict[str, Any], emit: Emit) -> dict[str, Any]:
        """The accounts Baton lets in; with reload, read them from the servers first."""
        return await self.proxies.users(Args(request, "reload").flag("reload"))

    async def cmd_prs(self, request: dict[str, Any], emit: Emit) -> dict[str, Any]:
        return await self._reparent(ReparentKind.PRS, request, emit)

    async def cmd_ers(self, request: dict[str, Any], emit: Emit) -> dict[str, Any]:
        return await self._reparent(ReparentKind.ERS, request, emit)

    async def _reparent(
        self, kind: ReparentKind, request: dict[str, Any], emit: Emit
    ) -> dict[str, Any]:
        args = Args(request, "shard", "to", "timeout", "force", "allow_unreachable")
        shard = args.text("shard", self._shards()) or self.config.proxy.shard
        to = args.text("to")
        timeout = args.seconds("timeout", MAX_TIMEOUT)
        report = await self.controller.reparent(
            kind,
            shard,
            to,
            timeout,
            force=args.flag("force"),
            allow_unreachable=args.texts("allow_unreachable"),
            progress=lambda t: emit(
                {
                    "progress": {
                        "step": str(t.step),
                        "call": t.call,
                        "duration_ms": round(t.duration_ms, 3),
                    }
                }
            ),
        )
        await self.add_buffer_counts(report)
        return report.to_dict()

    async def add_buffer_counts(self, report: ReparentRecord) -> None:
        """What this proxy held for the reparent goes into its report, here and in the
        history (other proxies of a fleet add theirs to the history as their holds end).
        The drain ends moments after the reparent; it is waited for up to a window."""
        found = await self.proxies.annotate(report.shard, report.term_before + 1, report.id)
        if not found:
            return
        updated = report.with_buffers({**report.buffers, **found})
        report.buffers = updated.buffers
        report.held, report.flushed, report.evicted = updated.held, updated.flushed, updated.evicted
        report.reads_during_hold = updated.reads_during_hold

    async def cmd_check(self, request: dict[str, Any], emit: Emit) -> dict[str, Any]:
        """The config and the store against what every server says (reparent/survey.py)."""
        return await self.controller.check(self._shard(Args(request, "shard")))

    async def cmd_adopt(self, request: dict[str, Any], emit: Emit) -> dict[str, Any]:
        """Take the servers' word for the primary, when they agree on one."""
        return await self.controller.adopt(self._shard(Args(request, "shard")))

    async def cmd_quarantine(self, request: dict[str, Any], emit: Emit) -> dict[str, Any]:
        return await self._quarantine(request, True)

    async def cmd_unquarantine(self, request: dict[str, Any], emit: Emit) -> dict[str, Any]:
        return await self._quarantine(request, False)

    async def _quarantine(self, request: dict[str, Any], on: bool) -> dict[str, Any]:
        args = Args(request, "shard", "server", "force")
        server = args.text("server")
        if server is None:
            raise ControlError(f"{request['cmd']} needs a server")
        return await self.controller.quarantine(self._shard(args), server, on, args.flag("force"))

    def _shard(self, args: Args) -> str:
        return args.text("shard", self._shards()) or self.config.proxy.shard

    async def cmd_history(self, request: dict[str, Any], emit: Emit) -> list[dict[str, Any]]:
        args = Args(request, "shard", "limit")
        shard = args.text("shard", self._shards())
        limit = args.integer("limit", 50, 1, MAX_HISTORY)
        records = await self._store(self.controller.store.history, shard, limit)
        return [r.to_dict() for r in records]

    async def _store(self, call: Callable[..., T], *args: object) -> T:
        """A store call off the event loop (a remote store may take its timeout)."""
        try:
            return await asyncio.to_thread(call, *args)
        except TopologyError as e:
            raise ControlError(str(e))

    def _shards(self) -> list[str]:
        return [s.name for s in self.config.shards]

    async def cmd_sessions(self, request: dict[str, Any], emit: Emit) -> list[dict[str, Any]]:
        """Every session's state; stale user variables are read back from idle sessions."""
        Args(request)  # it takes no arguments: refuse any
        return await self.proxies.sessions()
