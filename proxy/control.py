"""The control socket: one JSON object per line each way, on a Unix socket of mode 0600.

It is how operators (through `baton ctl`) and tests see inside a running Baton and run reparents.
Every command is a method named `cmd_<name>`. A reparent streams a `{"progress": ...}` line per
finished step before its final `{"ok": ..., "result": report}` line.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Callable
from typing import Any, TypeVar

from proxy.frontend import ProxyContext
from reparent.controller import Controller, ReparentRefused
from reparent.store import LEADER
from reparent.topology import ReparentKind, ReparentRecord, TopologyError

log = logging.getLogger(__name__)


class ControlError(Exception):
    """A command that cannot be carried out; its message goes back to the caller."""


Emit = Callable[[dict[str, Any]], None]
T = TypeVar("T")


class ControlServer:
    def __init__(self, ctx: ProxyContext, controller: Controller, path: str) -> None:
        self.ctx = ctx
        self.controller = controller
        self.path = path
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        if os.path.exists(self.path):
            os.unlink(self.path)
        # The umask makes the socket 0600 from birth, with no window where others could connect.
        old = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(self._client, path=self.path)
        finally:
            os.umask(old)

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
        if os.path.exists(self.path):
            os.unlink(self.path)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():

                def emit(obj: dict[str, Any]) -> None:
                    writer.write(json.dumps(obj).encode() + b"\n")

                emit(await self.handle(line, emit))
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def handle(self, line: bytes, emit: Emit | None = None) -> dict[str, Any]:
        try:
            request = json.loads(line)
            if not isinstance(request, dict) or not isinstance(request.get("cmd"), str):
                raise ControlError('expected a JSON object like {"cmd": "status"}')
            method = getattr(self, f"cmd_{request['cmd']}", None)
            if method is None:
                raise ControlError(f"unknown command {request['cmd']!r}")
            return {"ok": True, "result": await method(request, emit or (lambda _: None))}
        except json.JSONDecodeError as e:
            return {"ok": False, "error": f"not JSON: {e}"}
        except (ControlError, ReparentRefused) as e:
            return {"ok": False, "error": str(e)}

    async def cmd_status(self, request: dict[str, Any], emit: Emit) -> dict[str, Any]:
        store = self.controller.store
        shards = []
        for shard in self.ctx.config.shards:
            topo = (await self._store(store.read, shard.name)).value
            in_flight = await self._store(store.journal_get, shard.name)
            shards.append(
                {
                    "name": shard.name,
                    "primary": topo.primary,
                    "term": topo.term,
                    "lock": await self._store(store.lock_owner, shard.name),
                    "reparent": in_flight.to_dict() if in_flight else None,
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
            "sessions": len(self.ctx.sessions),
            "version": self.ctx.identity.version,
            "proxy": self.ctx.router.proxy_id,
            "store": str(self.ctx.config.topology.store),
            "proxies": [p.to_dict() for p in await self._store(store.proxies)],
            "detector_leader": await self._store(store.lock_owner, LEADER),
        }

    async def cmd_prs(self, request: dict[str, Any], emit: Emit) -> dict[str, Any]:
        return await self._reparent(ReparentKind.PRS, request, emit)

    async def cmd_ers(self, request: dict[str, Any], emit: Emit) -> dict[str, Any]:
        return await self._reparent(ReparentKind.ERS, request, emit)

    async def _reparent(
        self, kind: ReparentKind, request: dict[str, Any], emit: Emit
    ) -> dict[str, Any]:
        shard = request.get("shard") or self.ctx.config.proxy.shard
        timeout = request.get("timeout")
        if timeout is not None and (not isinstance(timeout, int | float) or timeout <= 0):
            raise ControlError(f"timeout must be a positive number of seconds, got {timeout!r}")
        report = await self.controller.reparent(
            kind,
            shard,
            request.get("to"),
            timeout,
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
        router = self.ctx.router
        episode = await router.annotate(report.shard, report.term_before + 1, report.id)
        if episode is None:
            return
        counts = {"held": episode.held, "flushed": episode.flushed, "evicted": episode.evicted}
        updated = report.with_buffers({**report.buffers, router.proxy_id: counts})
        report.buffers = updated.buffers
        report.held, report.flushed, report.evicted = updated.held, updated.flushed, updated.evicted

    async def cmd_history(self, request: dict[str, Any], emit: Emit) -> list[dict[str, Any]]:
        limit = request.get("limit", 50)
        records = await self._store(self.controller.store.history, request.get("shard"), limit)
        return [r.to_dict() for r in records]

    async def _store(self, call: Callable[..., T], *args: object) -> T:
        """A store call off the event loop (a remote store may take its timeout)."""
        try:
            return await asyncio.to_thread(call, *args)
        except TopologyError as e:
            raise ControlError(str(e))

    async def cmd_sessions(self, request: dict[str, Any], emit: Emit) -> list[dict[str, Any]]:
        """Every session's state; stale user variables are read back from idle sessions."""
        out = []
        for conn in list(self.ctx.sessions.values()):
            await conn.refresh_if_stale()
            out.append(conn.state.as_dict())
        return out
