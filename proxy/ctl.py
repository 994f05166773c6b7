"""`baton ctl`: the control socket's client, tables for people and JSON for scripts."""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from collections.abc import Callable
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


def request(
    path: str, cmd: str, on_progress: Callable[[dict[str, Any]], None] | None = None, **params: Any
) -> Any:
    """One command over the socket; raises RuntimeError with Baton's reason on failure.

    Progress lines (a reparent's finished steps) go to `on_progress` as they arrive."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(path)
        s.sendall(json.dumps({"cmd": cmd, **params}).encode() + b"\n")
        stream = s.makefile("rb")
        for line in stream:
            reply = json.loads(line)
            if not isinstance(reply, dict):
                raise RuntimeError(f"baton sent a reply that is not a JSON object: {line[:80]!r}")
            if "progress" in reply:
                if on_progress is not None:
                    on_progress(reply["progress"])
                continue
            if not reply.get("ok"):
                raise RuntimeError(reply.get("error", "unknown error"))
            return reply["result"]
    raise RuntimeError("baton closed the control connection without an answer")


def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def render_report(r: dict[str, Any]) -> str:
    lines = [
        f"{r['kind']} {r['id']} of shard {r['shard']}: {r['old_primary']} -> "
        f"{r['new_primary'] or '-'}, term {r['term_before']} -> {r['term_after'] or '-'}: "
        f"{r['outcome']}" + (f" ({r['reason']})" if r["reason"] else ""),
    ]
    total = sum(p["duration_ms"] for p in r["phases"])
    lines.append(f"  total {total:.1f} ms over {len(r['phases'])} steps")
    lines.append(f"  commands held {r['held']}, flushed {r['flushed']}, evicted {r['evicted']}")
    if r.get("reads_during_hold"):
        lines.append(f"  reads served on replicas during the hold {r['reads_during_hold']}")
    if r.get("not_drained"):
        lines.append(f"  went ahead without a drained report from {', '.join(r['not_drained'])}")
    if r.get("allow_unreachable"):
        lines.append(
            f"  allowed unreachable by the operator: {', '.join(r['allow_unreachable'])} (under"
            " semi_sync an acknowledged write only they received is lost)"
        )
    for name, pos in r["positions"].items():
        lines.append(f"  {name}: {pos}")
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
    if cmd in ("prs", "ers"):
        return render_report(result)
    if cmd == "check":
        return render_check(result)
    if cmd == "adopt":
        return f"shard {result['shard']}: {result['summary']}"
    if cmd in ("quarantine", "unquarantine"):
        state = "quarantined" if result["quarantined"] else "no longer quarantined"
        return (
            f"shard {result['shard']}: {result['server']} {state}\n  {result['check']['summary']}"
        )
    if cmd == "users":
        rows = [{**a, "unfenced": " and ".join(a["unfenced"]) or "-"} for a in result["accounts"]]
        head = f"accounts from the {result['source']}"
        if result["error"]:
            head += f" (last read failed: {result['error']})"
        return head + "\n" + table(rows, ["account", "plugin", "usable", "unfenced"])
    if cmd == "unblock":
        return f"{result['unblocked']} may connect again"
    if cmd == "tls":
        return "\n".join(
            f"{'worker ' + str(p['worker']) + ': ' if 'worker' in p else ''}{p['cert']}, "
            f"loaded {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(p['loaded_at']))}"
            f"{', clients must use TLS' if p['require'] else ''}"
            for p in result["proxies"]
        )
    if cmd == "history":
        return "\n".join(render_report(r) for r in result) or "no reparents yet"
    lines = []
    for shard in result["shards"]:
        lines.append(f"shard {shard['name']}: primary {shard['primary']}, term {shard['term']}")
        if shard.get("lock"):
            lines.append(f"  locked by {shard['lock']}")
        if shard["reparent"]:
            rp = shard["reparent"]
            lines.append(f"  reparent in flight: {rp['kind']} {rp['id']} at {rp['step']}")
        for m in shard.get("mismatches", []):
            lines.append(f"  MISMATCH {m['kind']} {m['server']}: {m['detail']}")
        if shard.get("mismatches"):
            lines.append("  (nothing is done about this shard automatically; see baton ctl check)")
        lines.append(table(shard["servers"], ["name", "host", "port", "role", "quarantined"]))
    lines.append(f"sessions: {result['sessions']}   version: {result['version']}")
    door = result["front_door"]
    lines.append(
        f"client connections: {door['open']} of {door['capacity']}; refused "
        + ", ".join(f"{k} {v}" for k, v in door["refused"].items())
    )
    if door["blocked"]:
        lines.append("blocked addresses: " + ", ".join(door["blocked"]))
    if result["unfenced_users"]:
        lines.append(
            "refused through Baton (read_only does not fence them): "
            + ", ".join(result["unfenced_users"])
        )
    if "proxies" in result:
        lines.append(
            f"proxy {result['proxy']} ({result['store']} store); "
            f"detector leader: {result['detector_leader'] or '-'}"
        )
        lines.append(table([proxy_row(p) for p in result["proxies"]], PROXY_COLUMNS))
    return "\n".join(lines)


def render_check(r: dict[str, Any]) -> str:
    """`ctl check`: every server as it answers, then the verdict."""
    verdict = "agree" if r["consistent"] else "DISAGREE"
    lines = [
        f"shard {r['shard']}: the store names {r['primary']} at term {r['term']}; the servers"
        f" {verdict}"
    ]
    rows = [
        {
            **s,
            "reachable": "yes" if s["reachable"] else f"no ({s['error']})",
            "read_only": "-" if s["read_only"] is None else int(s["read_only"]),
            **{k: "-" if s[k] is None else s[k] for k in _CHECK_OPTIONAL},
        }
        for s in r["servers"]
    ]
    lines.append(
        table(rows, ["name", "address", "store_role", "reachable", "read_only", *_CHECK_OPTIONAL])
    )
    for m in r["mismatches"]:
        lines.append(f"MISMATCH {m['kind']} {m['server']}: {m['detail']}")
    lines.extend(f"note: {n}" for n in r["notes"])
    lines.append(r["adopt"]["verdict"])
    return "\n".join(lines)


_CHECK_OPTIONAL = ("source", "io", "sql", "heartbeat_period", "gtid_binlog_pos", "gtid_received")


PROXY_COLUMNS = ["id", "address", "alive", "terms", "holding", "drained"]


def proxy_row(p: dict[str, Any]) -> dict[str, Any]:
    """One proxy of the fleet: the term it has seen per shard, what it holds for, and its
    last drained report per shard (term, and whether it was drained)."""
    return {
        "id": p["id"],
        "address": p["address"],
        "alive": "yes" if p["alive"] else "NO",
        "terms": ",".join(f"{s}={t}" for s, t in p["terms"].items()) or "-",
        "holding": ",".join(p["holding"]) or "-",
        "drained": ",".join(
            f"{s}@{d['term']}" + ("" if d["drained"] else "(busy)") for s, d in p["drained"].items()
        )
        or "-",
    }


def run(args: argparse.Namespace) -> int:
    params: dict[str, Any] = {}
    keys = ("shard", "to", "timeout", "limit", "address", "server", "allow_unreachable", "action")
    for key in keys:
        value = getattr(args, key, None)
        if value is not None:
            params[key] = value
    for flag in ("reload", "force"):
        if getattr(args, flag, False):
            params[flag] = True

    def progress(step: dict[str, Any]) -> None:
        if not args.json:
            print(f"  {step['call']:<10} {step['duration_ms']:9.1f} ms", flush=True)

    try:
        path = socket_path(args)
        result = request(path, args.ctl_command, on_progress=progress, **params)
    except (ConfigError, OSError, RuntimeError, ValueError) as e:
        print(f"baton ctl: {e}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2) if args.json else render(args.ctl_command, result))
    if args.ctl_command in ("prs", "ers") and result.get("outcome") != "succeeded":
        return 1
    if args.ctl_command == "check" and not result["consistent"]:
        return 1  # like diff: the servers and the picture differ
    return 0
