"""The `baton` command: serve, sandbox and ctl.

Each subcommand's module is imported only when it runs, so `baton ctl` starts fast and does not
pull in the data path. What `--help` prints is written for operators (DESCRIPTION, EPILOG and
each command's help), not taken from this docstring.
"""

from __future__ import annotations

import argparse
import sys


def _serve(args: argparse.Namespace) -> int:
    from proxy import server

    return server.main(args.config, args.workers, adopt=args.adopt)


def _sandbox(args: argparse.Namespace) -> int:
    from reparent import sandbox

    return sandbox.run(args)


def _ctl(args: argparse.Namespace) -> int:
    from proxy import ctl

    return ctl.run(args)


DESCRIPTION = """\
Baton is a MySQL-protocol proxy for a replicated MariaDB group: applications connect to it as
to MariaDB, and it moves the primary (planned or after a failure) while holding their commands,
so a switchover costs them a pause instead of errors."""

EPILOG = """\
a first try, on this machine:
  baton sandbox up                              # three local servers and .sandbox/baton.toml
  baton serve --config .sandbox/baton.toml &    # the proxy, on 127.0.0.1:23401
  baton ctl --config .sandbox/baton.toml prs    # move the primary under your clients
  baton sandbox down

`baton COMMAND --help` says more about each command."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="baton",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser(
        "serve",
        help="run the proxy: client port, reparent controller, control socket, metrics",
        description="Run Baton as configured in FILE: the port applications connect to, the "
        "reparent controller and failure detector, the control socket `baton ctl` talks to, "
        "and the Prometheus endpoint. A bad config is reported with its key named (exit 2).",
    )
    serve.add_argument("--config", required=True, metavar="FILE", help="path to baton.toml")
    serve.add_argument(
        "--workers",
        metavar="N",
        help='worker processes serving clients, or "auto" for one per core (overrides '
        "proxy.workers; 0: one process, as without workers)",
    )
    serve.add_argument(
        "--adopt",
        action="store_true",
        help="where the servers agree on another primary than the store's, take their word",
    )
    serve.set_defaults(func=_serve)

    sandbox = sub.add_parser(
        "sandbox",
        help="start or stop local MariaDB servers to try Baton on",
        description="A disposable local group: one primary and N replicas of mariadbd on "
        "127.0.0.1 with GTID replication, and a ready baton.toml in DIR. `down` stops only "
        "the sandbox's own processes, by pid, and deletes its data.",
    )
    sandbox.add_argument("action", choices=["up", "down", "status"])
    sandbox.add_argument("--dir", default=".sandbox", help="where datadirs and config live")
    sandbox.add_argument("--base-port", type=int, default=23301, help="port of the first server")
    sandbox.add_argument("--replicas", type=int, default=2, help="replicas of the first server")
    sandbox.add_argument("--json", action="store_true", help="status as JSON, for scripts")
    sandbox.add_argument(
        "--etcd", action="store_true", help="also start etcd: the topology store of a fleet"
    )
    sandbox.add_argument("--etcd-members", type=int, default=1, help="etcd cluster size")
    sandbox.add_argument(
        "--proxies", type=int, default=1, help="Batons of the fleet: one config each (--etcd)"
    )
    sandbox.add_argument(
        "--tls",
        action="store_true",
        help="make a CA and certificates (openssl) and use TLS on both sides: clients to "
        "Baton, Baton and replication to the servers",
    )
    sandbox.set_defaults(func=_sandbox)

    ctl = sub.add_parser(
        "ctl",
        help="operate a running Baton: status, sessions, reparents and their history",
        description="Talk to a running Baton through its control socket. Tables by default, "
        "--json for scripts; the exit is non-zero on an error or a reparent that did not "
        "succeed.",
    )
    ctl.add_argument("--socket", help="control socket (default: $BATON_SOCKET or the config's)")
    ctl.add_argument("--config", help="read the socket path from this config")
    ctl.add_argument("--json", action="store_true", help="print JSON instead of tables")
    ctl.set_defaults(func=_ctl)
    commands = ctl.add_subparsers(dest="ctl_command", required=True, metavar="COMMAND")
    commands.add_parser("status", help="shards, primaries, terms, reparent in flight")
    commands.add_parser("sessions", help="every client session's state")
    users = commands.add_parser(
        "users", help="the accounts Baton lets in, and those it refuses (SUPER, READ ONLY ADMIN)"
    )
    users.add_argument("--reload", action="store_true", help="read them from the servers first")
    tls = commands.add_parser(
        "tls", help="Baton's certificate for clients: its status, or read it again (reload)"
    )
    tls.add_argument("action", choices=["status", "reload"])
    unblock = commands.add_parser(
        "unblock", help="let an address whose logins kept failing (1129) connect again"
    )
    unblock.add_argument("address")
    history = commands.add_parser("history", help="past reparents with their reports")
    history.add_argument("--shard")
    history.add_argument("--limit", type=int, default=20)
    reparents = (
        ("prs", "planned reparent: move the primary while the old one still answers"),
        ("ers", "emergency reparent: promote a replica when the primary is dead"),
    )
    for name, text in reparents:
        reparent = commands.add_parser(name, help=text)
        reparent.add_argument("--shard", help="default: the proxy's shard")
        reparent.add_argument("--to", help="the new primary (default: the best replica)")
        reparent.add_argument(
            "--force",
            action="store_true",
            help="skip the checks first (servers agree with the store; for ers: the primary"
            " neither answers nor takes writes)",
        )
        if name == "prs":
            reparent.add_argument("--timeout", type=float, help="seconds for any one wait")
        else:
            reparent.add_argument(
                "--allow-unreachable",
                action="append",
                metavar="SERVER",
                help="semi_sync: promote without comparing this replica (it may hold the only"
                " copy of an acknowledged write, which is then lost); repeatable",
            )
    for name, text in (
        ("check", "compare the config and the store with what the servers say"),
        ("adopt", "make the primary the servers agree on the store's primary (new term)"),
    ):
        commands.add_parser(name, help=text).add_argument("--shard")
    for name, text in (
        ("quarantine", "never route to, choose or replicate from SERVER (sets it read_only)"),
        ("unquarantine", "lift SERVER's quarantine if it has nothing the primary lacks"),
    ):
        handle = commands.add_parser(name, help=text)
        handle.add_argument("server", metavar="SERVER")
        handle.add_argument("--shard")
        if name == "unquarantine":
            handle.add_argument(
                "--force", action="store_true", help="lift it even if the GTID check fails"
            )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
