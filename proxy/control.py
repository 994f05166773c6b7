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
from typing import Any

from proxy.frontend import ProxyContext
from reparent.controller import Controller, ReparentRefused
from reparent.topology import ReparentKind, ReparentRecord

log = logging.getLogger(__name__)


class ControlError(Exception):
    """A command that cannot be carried out; its message goes back to the caller."""


Emit = Callable[[dict[str, Any]], None]


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
            topo = store.read(shard.name).value
            in_flight = store.journal_get(shard.name)
            shards.append(
                {
                    "name": shard.name,
                    "primary": topo.primary,
                    "term": topo.term,
                    "reparent": in_flight.to_dict() if in_flight else None,
                    # How the servers contradict the config and store, as the failure detector
                    # last found it; while any, nothing is done about the shard automatically.
                    "mismatches": [
                        m.to_dict() for m in self.controller.mismatches(shard.name)
                    ],
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
        allowed = request.get("allow_unreachable", [])
        if not isinstance(allowed, list) or not all(isinstance(n, str) for n in allowed):
            raise ControlError(f"allow_unreachable must be a list of server names, got {allowed!r}")
        report = await self.controller.reparent(
            kind,
            shard,
            request.get("to"),
            timeout,
            preflight=not _flag(request, "force"),
            allow_unreachable=tuple(allowed),
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
        history. The drain ends moments after the reparent; it is waited for up to a window."""
        holder = self.ctx.holder
        episode = await holder.episode(
            report.shard, report.term_before + 1, holder.settings.window
        )
        if episode is None:
            return
        report.held, report.flushed, report.evicted = (
            episode.held,
            episode.flushed,
            episode.evicted,
        )
        await asyncio.to_thread(
            self.controller.store.annotate,
            report.id,
            episode.held,
            episode.flushed,
            episode.evicted,
        )

    async def cmd_check(self, request: dict[str, Any], emit: Emit) -> dict[str, Any]:
        """The config and the store against what every server says (reparent/survey.py)."""
        return await self.controller.check(self._shard(request))

    async def cmd_adopt(self, request: dict[str, Any], emit: Emit) -> dict[str, Any]:
        """Take the servers' word for the primary, when they agree on one."""
        return await self.controller.adopt(self._shard(request))

    async def cmd_quarantine(self, request: dict[str, Any], emit: Emit) -> dict[str, Any]:
        return await self.controller.quarantine(
            self._shard(request), _server(request), True, _flag(request, "force")
        )

    async def cmd_unquarantine(self, request: dict[str, Any], emit: Emit) -> dict[str, Any]:
        return await self.controller.quarantine(
            self._shard(request), _server(request), False, _flag(request, "force")
        )

    def _shard(self, request: dict[str, Any]) -> str:
        shard = request.get("shard") or self.ctx.config.proxy.shard
        if not isinstance(shard, str):
            raise ControlError(f"shard must be a name, got {shard!r}")
        return shard

    async def cmd_history(self, request: dict[str, Any], emit: Emit) -> list[dict[str, Any]]:
        limit = request.get("limit", 50)
        return [r.to_dict() for r in self.controller.store.history(request.get("shard"), limit)]

    async def cmd_sessions(self, request: dict[str, Any], emit: Emit) -> list[dict[str, Any]]:
        """Every session's state; stale user variables are read back from idle sessions."""
        out = []
        for conn in list(self.ctx.sessions.values()):
            await conn.refresh_if_stale()
            out.append(conn.state.as_dict())
        return out


def _flag(request: dict[str, Any], key: str) -> bool:
    value = request.get(key, False)
    if not isinstance(value, bool):
        raise ControlError(f"{key} must be true or false, got {value!r}")
    return value


def _server(request: dict[str, Any]) -> str:
    server = request.get("server")
    if not isinstance(server, str) or not server:
        raise ControlError(f"server must be a server name, got {server!r}")
    return server
