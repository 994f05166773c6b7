"""`baton ctl`: the control socket's client, tables for people and JSON for scripts."""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from typing import Any

from reparent.config import ConfigError, load


def socket_path(args: argparse.Namespace) -> str:
    """--socket, then $BATON_SOCKET, then the config's control_socket."""
    if args.socket:
        return args.socket
    if os.environ.get("BATON_SOCKET"):
        return os.environ["BATON_SOCKET"]
    if args.config:
        return load(args.config).proxy.control_socket
    raise ConfigError("no control socket: pass --socket, --config or set BATON_SOCKET")


def request(path: str, cmd: str, **params: Any) -> Any:
    """One command over the socket; raises RuntimeError with Baton's reason on failure."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(path)
        s.sendall(json.dumps({"cmd": cmd, **params}).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    reply = json.loads(data)
    if not reply.get("ok"):
        raise RuntimeError(reply.get("error", "unknown error"))
    return reply["result"]


def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def render(cmd: str, result: Any) -> str:
    if cmd == "sessions":
        rows = [
            {
                **r,
                "variables": ",".join(f"{k}={v}" for k, v in r["variables"].items()),
                "user_variables": ",".join(f"@{k}={v}" for k, v in r["user_variables"].items()),
                "statements": len(r["prepared_statements"]),
            }
            for r in result
        ]
        return table(
            rows,
            [
                "id",
                "user",
                "client",
                "backend",
                "schema",
                "autocommit",
                "in_transaction",
                "statements",
                "variables",
                "user_variables",
            ],
        )
    lines = []
    for shard in result["shards"]:
        lines.append(f"shard {shard['name']}: primary {shard['primary']}")
        lines.append(table(shard["servers"], ["name", "host", "port", "role"]))
    lines.append(f"sessions: {result['sessions']}   version: {result['version']}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    try:
        path = socket_path(args)
        result = request(path, args.ctl_command)
    except (ConfigError, OSError, RuntimeError, ValueError) as e:
        print(f"baton ctl: {e}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2) if args.json else render(args.ctl_command, result))
    return 0
