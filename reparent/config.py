"""Baton's one TOML config, loaded and checked before anything starts.

It lives in `reparent/` because both halves read it and `reparent/` must never import `proxy/`.
Every problem is reported as a `ConfigError` that names the offending key, so an operator can
fix the file without reading code.
"""

from __future__ import annotations

import enum
import math
import os
import re
import socket
import ssl
import stat
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

E = TypeVar("E", bound=enum.StrEnum)
T = TypeVar("T")


class ConfigError(Exception):
    """A config file that cannot be used; the message names the key."""


# A config is a few KiB; the bound keeps `--config /dev/zero` from reading for ever.
MAX_CONFIG_BYTES = 1024 * 1024
# Linux sun_path is 108 bytes including the terminating NUL.
MAX_SOCKET_PATH = 107
# Every (int, float) key is a duration in seconds. A day bounds them: pymysql refuses a
# connect_timeout over a year, and a thread's wait or a socket timeout of 1e12 s raises
# OverflowError ("timestamp out of range for platform time_t").
MAX_SECONDS = 86400
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class Role(enum.StrEnum):
    PRIMARY = "primary"
    REPLICA = "replica"


class Durability(enum.StrEnum):
    """`[replication] durability`: what acknowledging a commit promises (reparent/durability.py)."""

    ASYNC = "async"  # the primary's own commit; a crash may lose what no replica received
    SEMI_SYNC = "semi_sync"  # also received by a replica: an emergency reparent keeps it


@dataclass(frozen=True)
class Account:
    user: str
    password: str


@dataclass(frozen=True)
class ServerConfig:
    name: str
    host: str
    port: int
    role: Role
    # Where replicas connect to replicate from this server; host/port when not set. Differs
    # when replication takes another path than Baton's (a fault-injecting shim in the tests).
    replication_host: str = ""
    replication_port: int = 0

    def __post_init__(self) -> None:
        if not self.replication_host:
            object.__setattr__(self, "replication_host", self.host)
        if not self.replication_port:
            object.__setattr__(self, "replication_port", self.port)


@dataclass(frozen=True)
class ShardConfig:
    name: str
    servers: tuple[ServerConfig, ...]

    @property
    def primary(self) -> ServerConfig:
        return next(s for s in self.servers if s.role is Role.PRIMARY)


@dataclass(frozen=True)
class ProxyConfig:
    listen_host: str = "127.0.0.1"
    listen_port: int = 3306
    control_socket: str = "baton.sock"
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 9104
    shard: str = ""
    allow_load_data_local: bool = False
    # Offer clients the compressed protocol (zlib). Only sessions whose client asks for it pay
    # its CPU; false makes such clients' logins fail at once with 1043.
    compression: bool = True
    # None: the primary's max_allowed_packet, read at start (64 MiB if it cannot be read).
    max_packet_size: int | None = None
    backend_connect_timeout: float = 2.0
    id: str = ""  # this proxy's name in a fleet; hostname:listen_port when empty
    connect_timeout: float = 10.0  # seconds a client has to finish logging in
    max_connections: int = 4096  # client connections, logged in or not
    max_connect_errors: int = 100  # failed logins in a row that block an address; 0: never
    # Let in accounts that read_only does not fence (SUPER, READ ONLY ADMIN).
    allow_unfenced_users: bool = False
    # Worker processes serving clients (proxy/supervisor.py); 0: one process serves clients
    # and runs the controller, as before workers existed. "auto" in the file: the cores.
    workers: int = 0
    reuse_port: bool = False  # each worker binds the port itself (SO_REUSEPORT)
    # The login plugin Baton's greeting names and its auth switch asks for:
    # mysql_native_password, or caching_sha2_password (what MySQL 8.4 servers name).
    auth_plugin: str = "mysql_native_password"
    # A PEM RSA private key for caching_sha2_password over plain text; "" generates one per
    # process at start. Relative to the config file's folder.
    rsa_private_key: str = ""


class BackendTls(enum.StrEnum):
    """`backend.tls`: TLS from Baton to the servers, as the MySQL client's --ssl-mode. It
    covers the sessions' connections, the controller's and detector's admin connections, and
    replication (CHANGE MASTER ... MASTER_SSL)."""

    OFF = "off"
    PREFERRED = "preferred"  # TLS when the server offers it, unverified
    REQUIRED = "required"  # TLS or no connection, unverified
    VERIFY_CA = "verify_ca"  # TLS, the server's certificate signed by backend.ca
    VERIFY_IDENTITY = "verify_identity"  # and issued for the server's configured host

    @property
    def verifies(self) -> bool:
        return self in (BackendTls.VERIFY_CA, BackendTls.VERIFY_IDENTITY)


@dataclass(frozen=True)
class BackendSettings:
    """How Baton connects to the servers for client sessions. Each session logs in as its
    client's own account, so there is no account here."""

    # Send a PROXY protocol v1 header, so the server sees (and grants by) the client's address;
    # the servers must list Baton in proxy_protocol_networks.
    proxy_protocol: bool = False
    tls: BackendTls = BackendTls.OFF
    ca: str = ""  # PEM file of the CA that signs the servers' certificates (verify_* modes)


PLAIN_BACKEND = BackendSettings()  # no PROXY header, no TLS: the default of every connection


class TlsVersion(enum.StrEnum):
    """`tls.min_version`: the oldest TLS a client may use."""

    TLS1_2 = "TLSv1.2"
    TLS1_3 = "TLSv1.3"


@dataclass(frozen=True)
class TlsSettings:
    """`[tls]`: TLS for clients. Off unless `cert` is set; then Baton offers CLIENT_SSL."""

    cert: str = ""  # PEM certificate chain Baton presents
    key: str = ""  # its private key
    ca: str = ""  # PEM CAs whose client certificates Baton asks for and checks (optional)
    require: bool = False  # refuse logins not over TLS (as require_secure_transport)
    min_version: TlsVersion = TlsVersion.TLS1_2
    ciphers: str = ""  # an OpenSSL cipher list for TLS 1.2; empty: Python's defaults

    @property
    def enabled(self) -> bool:
        return bool(self.cert)


@dataclass(frozen=True)
class ControllerConfig:
    store: str = "baton-state.json"  # the embedded topology store; relative to the config
    grace: float = 5.0  # seconds a planned demotion waits for proxies to drain
    timeout: float = 10.0  # seconds for any one wait of a reparent (catch-up, drain)
    max_lag: float = 5.0  # seconds a candidate may take to apply what the primary has now
    # Seconds a shard lock lives unless renewed; the controller renews it every third of
    # that while it runs a reparent, so this is how long a dead controller holds the shard.
    lock_ttl: float = 10.0


class StoreKind(enum.StrEnum):
    """`[topology] store`: where the shard topology and the journal live."""

    FILE = "file"  # embedded: one Baton, a JSON file (controller.store)
    ETCD = "etcd"  # a fleet of Batons sharing one etcd cluster


@dataclass(frozen=True)
class TopologySettings:
    """`[topology]`: the topology store. etcd's keys are all under `prefix`, so several
    fleets can share one etcd cluster."""

    store: StoreKind = StoreKind.FILE
    endpoints: tuple[str, ...] = ()  # etcd client URLs, http://host:port
    prefix: str = "/baton"
    timeout: float = 2.0  # seconds for one etcd request before the next endpoint is tried


@dataclass(frozen=True)
class BufferConfig:
    """`[buffer]`: whether the failover buffer holds, and its bounds (proxy/buffer.py is the
    buffer, proxy/holder.py its shell; both take this one type).

    The bounds are checked here, so a bad config fails at load rather than in the middle of a
    failover; infinite times are refused too, since they would switch the deadline off. A bad
    value raises ValueError naming the field ("size: ..."); `load` reports it as
    `buffer.size: ...`."""

    enabled: bool = True  # false: no command is held; a switch is seen as an error or a pause
    size: int = 1000  # slots shared by all shards
    window: float = 10.0  # seconds one held command may wait
    max_failover: float = 20.0  # seconds after reparent_started when buffering always stops
    min_between: float = 0.0  # seconds after a failover ended before the shard buffers again
    drain_concurrency: int = 16  # commands flushing at once per shard
    dry_run: bool = False  # decide and count as if buffering, but hold nothing

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"size: must be at least 1, got {self.size}")
        for name in ("window", "max_failover"):
            value = getattr(self, name)
            if not (0 < value < math.inf):
                raise ValueError(f"{name}: must be a positive number of seconds, got {value}")
        if not (0 <= self.min_between < math.inf):
            raise ValueError(f"min_between: must be zero or more seconds, got {self.min_between}")
        if self.window > self.max_failover:
            raise ValueError(
                f"window: must not exceed max_failover ({self.window} > {self.max_failover})"
            )
        if self.drain_concurrency < 1:
            raise ValueError(f"drain_concurrency: must be at least 1, got {self.drain_concurrency}")


class RoutingMode(enum.StrEnum):
    """Where a listener's sessions send their statements (proxy/readroute.py)."""

    PRIMARY = "primary"  # everything to the primary
    SPLIT = "split"  # reads that qualify to a replica, everything else to the primary


class CausalReads(enum.StrEnum):
    """What a read sent to a replica must see (proxy/readroute.py)."""

    NONE = "none"  # whatever the replica has applied
    LOCAL = "local"  # the session's own last write
    GLOBAL = "global"  # every write the primary had acknowledged when the read started


@dataclass(frozen=True)
class RoutingConfig:
    """`[routing]`: read routing to replicas. `mode` is the main listener's; `read_port`, when
    set, is a second listener whose sessions are read-only (their writes get the server's
    1792) and send every read that qualifies to a replica."""

    mode: RoutingMode = RoutingMode.PRIMARY
    causal_reads: CausalReads = CausalReads.LOCAL
    max_replica_lag: float = 10.0  # seconds behind the primary beyond which a replica gets no reads
    causal_timeout: float = 1.0  # seconds a read waits on a replica for the session's write
    read_port: int = 0  # 0: no read listener
    monitor_interval: float = 0.5  # seconds between looks at each replica's replication

    def __post_init__(self) -> None:
        for name in ("max_replica_lag", "causal_timeout", "monitor_interval"):
            value = getattr(self, name)
            if not (0 < value < math.inf):
                raise ValueError(f"{name}: must be a positive number of seconds, got {value}")
        if self.read_port and not 0 < self.read_port < 65536:
            raise ValueError(f"read_port: port {self.read_port} out of range 1-65535")


@dataclass(frozen=True)
class PoolConfig:
    """`[pool]`: whether client sessions share server connections, and each pool's bounds
    (proxy/pool.py is the pool, proxy/pools.py its shell; README "Sharing server connections").
    There is one pool per server, account and connection shape, and every pool takes these
    bounds. A bad value raises ValueError naming the field; `load` reports it as
    `pool.<field>: ...`."""

    # Sessions give their connection back between commands when nothing pins them. Off by
    # default: each session then has a connection of its own, as before.
    multiplex: bool = False
    min: int = 0  # connections each pool keeps open while idle
    max: int = 32  # connections each pool may hold: idle, lent and being opened
    idle_timeout: float = 60.0  # seconds an idle connection above `min` stays open
    queue: int = 10_000  # borrowers that may wait for a full pool; more are refused (1040)
    wait_timeout: float = 5.0  # seconds a borrower waits for a full pool before 1040

    def __post_init__(self) -> None:
        if self.max < 1:
            raise ValueError(f"max: must be at least 1, got {self.max}")
        if not 0 <= self.min <= self.max:
            raise ValueError(f"min: must be between 0 and max ({self.max}), got {self.min}")
        if self.queue < 0:
            raise ValueError(f"queue: must be zero or more, got {self.queue}")
        for name in ("idle_timeout", "wait_timeout"):
            value = getattr(self, name)
            if not 0 < value < math.inf:
                raise ValueError(f"{name}: must be a positive number of seconds, got {value}")


@dataclass(frozen=True)
class DetectorConfig:
    """The failure detector (`reparent/detector.py`): how often it probes and when it acts."""

    enabled: bool = True  # false: no probing, no automatic emergency reparent, no repairs
    interval: float = 0.5  # seconds between probe rounds
    failures: int = 3  # consecutive failed probes of the primary before it may be dead
    probe_timeout: float = 0.4  # seconds to connect to, and hear from, one server
    cooldown: float = 30.0  # seconds after a recovery before the shard gets another
    repair: bool = True  # fix small faults (stopped replication, writable replica, rejoin)


@dataclass(frozen=True)
class Config:
    proxy: ProxyConfig
    backend: BackendSettings
    admin: Account
    # A fixed list of logins; empty: the servers' own accounts (proxy/accounts.py).
    users: tuple[Account, ...]
    # The account replicas use to replicate from a new primary; the admin account if absent.
    replication: Account
    controller: ControllerConfig
    buffer: BufferConfig
    shards: tuple[ShardConfig, ...]
    path: Path | None = field(default=None, compare=False)
    detector: DetectorConfig = DetectorConfig()
    durability: Durability = Durability.ASYNC
    topology: TopologySettings = TopologySettings()
    pool: PoolConfig = PoolConfig()
    tls: TlsSettings = TlsSettings()
    routing: RoutingConfig = RoutingConfig()

    @property
    def shard(self) -> ShardConfig:
        """The shard client sessions are routed to."""
        return next(s for s in self.shards if s.name == self.proxy.shard)


_PROXY_TYPES: dict[str, type | tuple[type, ...]] = {
    "listen_host": str,
    "listen_port": int,
    "control_socket": str,
    "metrics_host": str,
    "metrics_port": int,
    "shard": str,
    "allow_load_data_local": bool,
    "compression": bool,
    "max_packet_size": int,
    "backend_connect_timeout": (int, float),
    "id": str,
    "connect_timeout": (int, float),
    "max_connections": int,
    "max_connect_errors": int,
    "allow_unfenced_users": bool,
    "workers": (int, str),
    "reuse_port": bool,
    "auth_plugin": str,
    "rsa_private_key": str,
}

AUTH_PLUGINS = ("mysql_native_password", "caching_sha2_password")

MAX_WORKERS = 64  # session ids carry the worker in their high bits (proxy/frontend.py)


def workers_value(value: int | str, where: str) -> int:
    """A number of worker processes: 0 to MAX_WORKERS, or "auto" for the machine's cores."""
    if value == "auto":
        return min(MAX_WORKERS, len(os.sched_getaffinity(0)))
    if isinstance(value, str) or not 0 <= value <= MAX_WORKERS:
        raise ConfigError(f'{where}: expected 0 to {MAX_WORKERS} or "auto", got {value!r}')
    return value


def _typed(table: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in table:
        raise ConfigError(f"{where}.{key}: missing")
    value = table[key]
    # bool is an int in Python; a port of `true` is still a mistake.
    if (isinstance(value, bool) and kind is not bool) or not isinstance(value, kind):
        raise ConfigError(f"{where}.{key}: expected {_kind_name(kind)}, got {value!r}")
    # TOML has nan and inf, and every `<= 0` check lets them through.
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where}.{key}: expected a finite number, got {value}")
    if kind == (int, float) and value > MAX_SECONDS:
        raise ConfigError(f"{where}.{key}: at most {MAX_SECONDS} seconds, got {value}")
    # Every string key is a name, a host or a path; an empty listen_host would mean all
    # interfaces, an empty control_socket the config's folder. (Passwords go by _secret.)
    if isinstance(value, str) and not value:
        raise ConfigError(f"{where}.{key}: must not be empty")
    # TOML's \u0000 and friends: a NUL in a path or host raised ValueError deep in os or socket.
    if isinstance(value, str) and (bad := _CONTROL.search(value)):
        raise ConfigError(f"{where}.{key}: control character {bad.group()!r} in {value!r}")
    return value


def _secret(table: dict[str, Any], key: str, where: str) -> str:
    """A password: any string, empty too (MariaDB allows it); its value never appears in a
    message, which may end up in a log or a ticket."""
    if key not in table:
        raise ConfigError(f"{where}.{key}: missing")
    if not isinstance(table[key], str):
        raise ConfigError(f"{where}.{key}: expected a quoted string (value not shown)")
    return table[key]


def _kind_name(kind: type | tuple[type, ...]) -> str:
    if isinstance(kind, tuple):
        return " or ".join(k.__name__ for k in kind)
    return kind.__name__


def _table(data: dict[str, Any], key: str, where: str = "") -> dict[str, Any]:
    name = f"{where}.{key}" if where else key
    if key not in data:
        raise ConfigError(f"{name}: missing table")
    if not isinstance(data[key], dict):
        raise ConfigError(f"{name}: expected a table")
    return data[key]


def _unknown(table: dict[str, Any], known: set[str], where: str) -> None:
    extra = sorted(set(table) - known)
    if extra:
        raise ConfigError(f"{where}.{extra[0]}: unknown key")


def _known(table: dict[str, Any], kinds: dict[str, Any], name: str) -> dict[str, Any]:
    """A table's keys, none unknown, each of its kind: what its dataclass is built from."""
    _unknown(table, set(kinds), name)
    return {k: _typed(table, k, kind, name) for k, kind in kinds.items() if k in table}


def _built(cls: Callable[..., T], values: dict[str, Any], name: str) -> T:
    """The table's dataclass; a value its __post_init__ refuses is named with the table."""
    try:
        return cls(**values)
    except ValueError as e:
        raise ConfigError(f"{name}.{e}") from None


def _port(value: int, where: str) -> int:
    if not 0 < value < 65536:
        raise ConfigError(f"{where}: port {value} out of range 1-65535")
    return value


def _host(value: str, where: str) -> str:
    """A host name or address that the resolver takes: one with an empty or over-long label
    (`a..b`, 64+ characters between dots) raised UnicodeError from getaddrinfo at start."""
    try:
        value.encode("idna")
    except UnicodeError as e:
        raise ConfigError(f"{where}: {value!r} is not a valid host name: {e.__cause__ or e}")
    return value


def _account(table: dict[str, Any], where: str, user_key: str = "user") -> Account:
    _unknown(table, {user_key, "password"}, where)
    return Account(
        user=_typed(table, user_key, str, where), password=_secret(table, "password", where)
    )


def _proxy(table: Any, default_shard: str) -> ProxyConfig:
    if not isinstance(table, dict):
        raise ConfigError("proxy: expected a table")
    _unknown(table, set(_PROXY_TYPES), "proxy")
    values: dict[str, Any] = {}
    for key, kind in _PROXY_TYPES.items():
        if key in table:
            values[key] = _typed(table, key, kind, "proxy")
    for key in ("listen_port", "metrics_port"):
        if key in values:
            _port(values[key], f"proxy.{key}")
    for key in ("listen_host", "metrics_host"):
        if key in values:
            _host(values[key], f"proxy.{key}")
    values.setdefault("shard", default_shard)
    if "workers" in values:
        values["workers"] = workers_value(values["workers"], "proxy.workers")
    for key in ("max_packet_size", "connect_timeout", "max_connections"):
        if values.get(key, 1) <= 0:
            raise ConfigError(f"proxy.{key}: must be positive, got {values[key]}")
    if values.get("max_connect_errors", 0) < 0:
        raise ConfigError("proxy.max_connect_errors: must not be negative (0: never block)")
    if values.get("auth_plugin", AUTH_PLUGINS[0]) not in AUTH_PLUGINS:
        raise ConfigError(
            f"proxy.auth_plugin: expected one of {', '.join(AUTH_PLUGINS)}, "
            f"got {values['auth_plugin']!r}"
        )
    return ProxyConfig(**values)


def _controller(table: Any) -> ControllerConfig:
    if not isinstance(table, dict):
        raise ConfigError("controller: expected a table")
    kinds: dict[str, type | tuple[type, ...]] = {
        "store": str,
        "grace": (int, float),
        "timeout": (int, float),
        "max_lag": (int, float),
        "lock_ttl": (int, float),
    }
    values = _known(table, kinds, "controller")
    for key, value in values.items():
        if key != "store" and value <= 0:
            raise ConfigError(f"controller.{key}: must be positive, got {value}")
    return ControllerConfig(**values)


def _buffer(table: Any) -> BufferConfig:
    if not isinstance(table, dict):
        raise ConfigError("buffer: expected a table")
    kinds: dict[str, type | tuple[type, ...]] = {
        "enabled": bool,
        "size": int,
        "window": (int, float),
        "max_failover": (int, float),
        "min_between": (int, float),
        "drain_concurrency": int,
        "dry_run": bool,
    }
    return _built(BufferConfig, _known(table, kinds, "buffer"), "buffer")


def _detector(table: Any) -> DetectorConfig:
    if not isinstance(table, dict):
        raise ConfigError("detector: expected a table")
    kinds: dict[str, type | tuple[type, ...]] = {
        "enabled": bool,
        "interval": (int, float),
        "failures": int,
        "probe_timeout": (int, float),
        "cooldown": (int, float),
        "repair": bool,
    }
    values = _known(table, kinds, "detector")
    for key in ("interval", "failures", "probe_timeout"):
        if key in values and values[key] <= 0:
            raise ConfigError(f"detector.{key}: must be positive, got {values[key]}")
    if values.get("cooldown", 0) < 0:
        raise ConfigError(f"detector.cooldown: must not be negative, got {values['cooldown']}")
    return DetectorConfig(**values)


def _topology(table: Any) -> TopologySettings:
    if not isinstance(table, dict):
        raise ConfigError("topology: expected a table")
    _unknown(table, {"store", "endpoints", "prefix", "timeout"}, "topology")
    kind = _choice(table, "store", StoreKind.FILE, "topology")
    endpoints: tuple[str, ...] = ()
    if "endpoints" in table:
        raw = _typed(table, "endpoints", list, "topology")
        if not all(isinstance(e, str) and e for e in raw):
            raise ConfigError("topology.endpoints: expected a list of http://host:port")
        for e in raw:
            host, _, port = e.removeprefix("http://").partition(":")
            if not e.startswith("http://") or not host or not port.isdigit():
                raise ConfigError(f"topology.endpoints: {e!r} is not http://host:port")
            _port(int(port), f"topology.endpoints: {e}")
        endpoints = tuple(raw)
    if kind is StoreKind.ETCD and not endpoints:
        raise ConfigError("topology.endpoints: store = 'etcd' needs at least one endpoint")
    prefix = "/baton"
    if "prefix" in table:
        prefix = _typed(table, "prefix", str, "topology")
        if not prefix.startswith("/") or prefix.rstrip("/") == "":
            raise ConfigError(f"topology.prefix: expected a key prefix like /baton, got {prefix!r}")
    timeout = 2.0
    if "timeout" in table:
        timeout = _typed(table, "timeout", (int, float), "topology")
        if timeout <= 0:
            raise ConfigError(f"topology.timeout: must be positive, got {timeout}")
    return TopologySettings(store=kind, endpoints=endpoints, prefix=prefix, timeout=timeout)


# Seconds another Baton needs, once a dead controller's lock has lapsed, to notice it and
# finish or undo the switch (it looks every second; the resume itself takes milliseconds).
RESUME_ALLOWANCE = 5.0


def _fleet_bounds(
    topology: TopologySettings, controller: ControllerConfig, buffer: BufferConfig
) -> None:
    """In a fleet the Baton running a switch can die holding it: the others keep holding
    until its lock lapses and one of them finishes the switch, so holding must last that."""
    if topology.store is not StoreKind.ETCD:
        return
    if controller.lock_ttl < 2:
        raise ConfigError(
            f"controller.lock_ttl: etcd leases last at least 2 s, got {controller.lock_ttl}"
        )
    needed = controller.grace + controller.lock_ttl + RESUME_ALLOWANCE
    if buffer.max_failover < needed:
        raise ConfigError(
            f"buffer.max_failover: {buffer.max_failover:g} s is shorter than controller.grace "
            f"+ controller.lock_ttl + {RESUME_ALLOWANCE:g} s = {needed:g} s, the longest a "
            "switch can last when the Baton running it dies; raise it or shorten those"
        )


def _shards(items: Any) -> tuple[ShardConfig, ...]:
    if not isinstance(items, list) or not items:
        raise ConfigError("shards: expected at least one [[shards]] table")
    shards: list[ShardConfig] = []
    for i, raw in enumerate(items):
        where = f"shards[{i}]"
        if not isinstance(raw, dict):
            raise ConfigError(f"{where}: expected a table")
        _unknown(raw, {"name", "servers"}, where)
        name = _typed(raw, "name", str, where)
        if name in (s.name for s in shards):
            raise ConfigError(f"{where}.name: shard {name!r} is named twice")
        servers_raw = raw.get("servers")
        if not isinstance(servers_raw, list) or not servers_raw:
            raise ConfigError(f"{where}.servers: expected at least one [[shards.servers]] table")
        servers = []
        for j, s in enumerate(servers_raw):
            sw = f"{where}.servers[{j}]"
            if not isinstance(s, dict):
                raise ConfigError(f"{sw}: expected a table")
            _unknown(
                s, {"name", "host", "port", "role", "replication_host", "replication_port"}, sw
            )
            role_text = _typed(s, "role", str, sw)
            try:
                role = Role(role_text)
            except ValueError:
                raise ConfigError(f"{sw}.role: expected 'primary' or 'replica', got {role_text!r}")
            servers.append(
                ServerConfig(
                    name=_typed(s, "name", str, sw),
                    host=_host(_typed(s, "host", str, sw), f"{sw}.host"),
                    port=_port(_typed(s, "port", int, sw), f"{sw}.port"),
                    role=role,
                    replication_host=(
                        _host(_typed(s, "replication_host", str, sw), f"{sw}.replication_host")
                        if "replication_host" in s
                        else ""
                    ),
                    replication_port=(
                        _port(_typed(s, "replication_port", int, sw), f"{sw}.replication_port")
                        if "replication_port" in s
                        else 0
                    ),
                )
            )
        primaries = [s for s in servers if s.role is Role.PRIMARY]
        if len(primaries) != 1:
            raise ConfigError(
                f"{where}.servers: expected exactly one primary, got {len(primaries)}"
            )
        names = [s.name for s in servers]
        if len(set(names)) != len(names):
            raise ConfigError(f"{where}.servers: server names must be unique")
        shards.append(ShardConfig(name=name, servers=tuple(servers)))
    _unique_addresses(shards)
    return tuple(shards)


def _address(host: str, port: int) -> tuple[str, int]:
    """What two entries must not share. Host names are compared as written (case aside):
    `localhost` and `127.0.0.1` are not found to be the same server."""
    return host.lower(), port


def _unique_addresses(shards: list[ShardConfig]) -> None:
    """One MariaDB server listed twice (in one shard or two) would be reparented against itself:
    its replica would be its own primary."""
    seen: dict[tuple[str, int], str] = {}
    for i, shard in enumerate(shards):
        for j, server in enumerate(shard.servers):
            where = f"shards[{i}].servers[{j}]"
            first = seen.setdefault(_address(server.host, server.port), where)
            if first != where:
                raise ConfigError(
                    f"{where}: {server.host}:{server.port} is also the address of {first}"
                )


def _check_listeners(proxy: ProxyConfig, shards: tuple[ShardConfig, ...]) -> None:
    """Baton's own listeners must not be a backend's address (Baton would proxy to itself) nor
    each other's (the second bind fails once the first is up)."""
    listen = _address(proxy.listen_host, proxy.listen_port)
    metrics = _address(proxy.metrics_host, proxy.metrics_port)
    if listen == metrics:
        raise ConfigError(
            f"proxy.metrics_port: {proxy.metrics_host}:{proxy.metrics_port} is also the "
            "address of proxy.listen_port"
        )
    for i, shard in enumerate(shards):
        for j, server in enumerate(shard.servers):
            for key, own in (("listen_port", listen), ("metrics_port", metrics)):
                if _address(server.host, server.port) == own:
                    raise ConfigError(
                        f"proxy.{key}: {server.host}:{server.port} is also the address of "
                        f"shards[{i}].servers[{j}] ({server.name})"
                    )


def _check_read_port(
    proxy: ProxyConfig, routing: RoutingConfig, shards: tuple[ShardConfig, ...]
) -> None:
    """The read listener (on proxy.listen_host) is neither another listener nor a backend."""
    if not routing.read_port:
        return
    reads = _address(proxy.listen_host, routing.read_port)
    taken = [
        ("proxy.listen_port", _address(proxy.listen_host, proxy.listen_port)),
        ("proxy.metrics_port", _address(proxy.metrics_host, proxy.metrics_port)),
    ]
    taken += [
        (f"shards[{i}].servers[{j}] ({s.name})", _address(s.host, s.port))
        for i, shard in enumerate(shards)
        for j, s in enumerate(shard.servers)
    ]
    for what, address in taken:
        if address == reads:
            raise ConfigError(
                f"routing.read_port: {proxy.listen_host}:{routing.read_port} is also the "
                f"address of {what}"
            )


def parse(data: dict[str, Any], path: Path | None = None) -> Config:
    """Build a Config from parsed TOML, or raise ConfigError naming the key."""
    _unknown(
        data,
        {
            "proxy",
            "backend",
            "admin",
            "replication",
            "controller",
            "buffer",
            "detector",
            "users",
            "shards",
            "topology",
            "pool",
            "tls",
            "routing",
        },
        "config",
    )
    shards = _shards(data.get("shards"))
    proxy = _proxy(data.get("proxy", {}), default_shard=shards[0].name)
    if proxy.shard not in {s.name for s in shards}:
        raise ConfigError(f"proxy.shard: no shard named {proxy.shard!r}")
    routing = _routing(data.get("routing", {}))
    _check_listeners(proxy, shards)
    _check_read_port(proxy, routing, shards)
    users = _users(data.get("users", []))
    admin = _account(_table(data, "admin"), "admin")
    replication, durability = _replication(data.get("replication", {}), admin)
    topology = _topology(data.get("topology", {}))
    controller = _controller(data.get("controller", {}))
    buffer = _buffer(data.get("buffer", {}))
    _fleet_bounds(topology, controller, buffer)
    backend = _backend(data.get("backend", {}))
    pool = _pool(data.get("pool", {}))
    if pool.multiplex and backend.proxy_protocol:
        raise ConfigError(
            "pool.multiplex: sessions that share a server connection cannot each give the "
            "server their own address; turn off backend.proxy_protocol or pool.multiplex"
        )
    return Config(
        proxy=proxy,
        backend=backend,
        admin=admin,
        users=users,
        replication=replication,
        controller=controller,
        buffer=buffer,
        shards=shards,
        path=path,
        detector=_detector(data.get("detector", {})),
        durability=durability,
        topology=topology,
        pool=pool,
        tls=_tls(data.get("tls", {})),
        routing=routing,
    )


def _pool(table: Any) -> PoolConfig:
    if not isinstance(table, dict):
        raise ConfigError("pool: expected a table")
    kinds: dict[str, type | tuple[type, ...]] = {
        "multiplex": bool,
        "min": int,
        "max": int,
        "idle_timeout": (int, float),
        "queue": int,
        "wait_timeout": (int, float),
    }
    return _built(PoolConfig, _known(table, kinds, "pool"), "pool")


def _tls(table: Any) -> TlsSettings:
    """`[tls]`: only shapes here (which keys go together, known versions, a cipher list
    OpenSSL takes); the files are read by `load`, relative to the config's folder."""
    if not isinstance(table, dict):
        raise ConfigError("tls: expected a table")
    kinds = {"cert": str, "key": str, "ca": str, "require": bool, "ciphers": str}
    _unknown(table, {*kinds, "min_version"}, "tls")
    values: dict[str, Any] = {k: _typed(table, k, t, "tls") for k, t in kinds.items() if k in table}
    values["min_version"] = _choice(table, "min_version", TlsVersion.TLS1_2, "tls")
    settings = TlsSettings(**values)
    if bool(settings.cert) != bool(settings.key):
        missing = "key" if settings.cert else "cert"
        raise ConfigError(f"tls.{missing}: missing (tls.cert and tls.key go together)")
    if not settings.enabled:
        for key in ("ca", "require", "ciphers"):
            if key in table:
                raise ConfigError(f"tls.{key}: set without tls.cert and tls.key, so TLS is off")
        if "min_version" in table:
            raise ConfigError("tls.min_version: set without tls.cert and tls.key, so TLS is off")
    if settings.ciphers:
        try:
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).set_ciphers(settings.ciphers)
        except ssl.SSLError:
            raise ConfigError(f"tls.ciphers: OpenSSL takes no cipher from {settings.ciphers!r}")
    return settings


def _routing(table: Any) -> RoutingConfig:
    if not isinstance(table, dict):
        raise ConfigError("routing: expected a table")
    kinds: dict[str, type | tuple[type, ...]] = {
        "max_replica_lag": (int, float),
        "causal_timeout": (int, float),
        "read_port": int,
        "monitor_interval": (int, float),
    }
    _unknown(table, {*kinds, "mode", "causal_reads"}, "routing")
    values: dict[str, Any] = {
        k: _typed(table, k, kind, "routing") for k, kind in kinds.items() if k in table
    }
    values["mode"] = _choice(table, "mode", RoutingMode.PRIMARY, "routing")
    values["causal_reads"] = _choice(table, "causal_reads", CausalReads.LOCAL, "routing")
    try:
        return RoutingConfig(**values)
    except ValueError as e:
        raise ConfigError(f"routing.{e}") from None


def _backend(table: Any) -> BackendSettings:
    if not isinstance(table, dict):
        raise ConfigError("backend: expected a table")
    for key in ("user", "password"):
        if key in table:
            raise ConfigError(
                f"backend.{key}: Baton has no shared backend account any more; each client "
                "session logs in to the servers as its own account. Remove backend.user and "
                "backend.password."
            )
    _unknown(table, {"proxy_protocol", "tls", "ca"}, "backend")
    values: dict[str, Any] = {}
    if "proxy_protocol" in table:
        values["proxy_protocol"] = _typed(table, "proxy_protocol", bool, "backend")
    tls = values["tls"] = _choice(table, "tls", BackendTls.OFF, "backend")
    if "ca" in table:
        values["ca"] = _typed(table, "ca", str, "backend")
        if not tls.verifies:
            raise ConfigError(
                f"backend.ca: used only by backend.tls = 'verify_ca' or 'verify_identity', "
                f"not {str(tls)!r}"
            )
    elif tls.verifies:
        raise ConfigError(f"backend.ca: backend.tls = {str(tls)!r} needs the servers' CA file")
    return BackendSettings(**values)


def _replication(table: Any, admin: Account) -> tuple[Account, Durability]:
    """`[replication]`: the account replicas use (the admin's when user and password are both
    absent) and the durability policy."""
    if not isinstance(table, dict):
        raise ConfigError("replication: expected a table")
    _unknown(table, {"user", "password", "durability"}, "replication")
    account = admin
    if "user" in table or "password" in table:
        account = _account({k: v for k, v in table.items() if k != "durability"}, "replication")
    durability = _choice(table, "durability", Durability.ASYNC, "replication")
    return account, durability


def _choice(table: dict[str, Any], key: str, default: E, where: str) -> E:
    """An enum's value by name, `default` when absent; the error lists the names it takes."""
    if key not in table:
        return default
    text = _typed(table, key, str, where)
    try:
        return type(default)(text)
    except ValueError:
        names = " or ".join(repr(str(v)) for v in type(default))
        raise ConfigError(f"{where}.{key}: expected {names}, got {text!r}")


def _users(items: Any) -> tuple[Account, ...]:
    """`[[users]]`: a fixed list of logins (none: the servers' own accounts); a name twice
    would leave one password unused."""
    if not isinstance(items, list):
        raise ConfigError("users: expected [[users]] tables (name, password)")
    users: list[Account] = []
    for i, raw in enumerate(items):
        if not isinstance(raw, dict):
            raise ConfigError(f"users[{i}]: expected a table")
        account = _account(raw, f"users[{i}]", user_key="name")
        if account.user in (u.user for u in users):
            raise ConfigError(f"users[{i}].name: user {account.user!r} is listed twice")
        users.append(account)
    return tuple(users)


def _read(p: Path) -> str:
    """The file's text, or a ConfigError saying why not. Only a regular file is opened (a FIFO
    would block, /dev/zero never ends), at most MAX_CONFIG_BYTES are read, and the text must be
    UTF-8 as TOML requires (tomllib then refuses NUL and other control characters)."""
    try:
        if not stat.S_ISREG(p.stat().st_mode):
            raise ConfigError(f"{p}: not a regular file")
        with p.open("rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"{p}: cannot read: {e.strerror}")
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{p}: larger than {MAX_CONFIG_BYTES} bytes; is it the config?")
    try:
        return data.decode()
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ConfigError(f"{p}: not UTF-8 text: byte 0x{data[e.start]:02x} on line {line}")


def load(path: str | Path) -> Config:
    """Read and check a config file; relative socket paths are taken from the file's folder."""
    p = Path(path)
    try:
        data = tomllib.loads(_read(p))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: not valid TOML: {e}")
    cfg = parse(data, path=p)
    sock = Path(cfg.proxy.control_socket)
    if not sock.is_absolute():
        cfg = replace(cfg, proxy=replace(cfg.proxy, control_socket=str(p.parent / sock)))
    if len(os.fsencode(cfg.proxy.control_socket)) > MAX_SOCKET_PATH:
        raise ConfigError(
            f"proxy.control_socket: {cfg.proxy.control_socket} is longer than the "
            f"{MAX_SOCKET_PATH} bytes a Unix socket path may have; use a shorter path"
        )
    store = Path(cfg.controller.store)
    if not store.is_absolute():
        cfg = replace(cfg, controller=replace(cfg.controller, store=str(p.parent / store)))
    key = cfg.proxy.rsa_private_key
    if key and not Path(key).is_absolute():
        cfg = replace(cfg, proxy=replace(cfg.proxy, rsa_private_key=str(p.parent / key)))
    cfg = _tls_files(cfg, p.parent)
    return cfg


def _tls_files(cfg: Config, folder: Path) -> Config:
    """TLS file paths taken from the config's folder, and each read once now, so a missing
    file or a key that does not fit its certificate is named at start, not at the first
    client."""
    from reparent import tls  # tls builds its contexts from this module's types

    def here(path: str) -> str:
        return str(folder / path) if path and not Path(path).is_absolute() else path

    t = cfg.tls
    t = replace(t, cert=here(t.cert), key=here(t.key), ca=here(t.ca))
    backend = replace(cfg.backend, ca=here(cfg.backend.ca))
    try:
        if t.enabled:
            tls.listener_context(t)
        if backend.tls.verifies:
            tls.backend_context(backend)
    except tls.TlsError as e:
        raise ConfigError(str(e))
    return replace(cfg, tls=t, backend=backend)


def check_files(cfg: Config) -> None:
    """What `baton serve` needs of the file system, checked before it binds anything, so that
    a missing folder is named at once, not as a bare ENOENT after the listeners are up: the
    folders of the control socket and the store exist, and the socket's path is free or holds
    a stale socket. Never a file Baton would delete to bind (start() replaces what is there),
    nor a socket another process still serves on (a second Baton would take it over)."""
    sock = Path(cfg.proxy.control_socket)
    _folder(sock, "proxy.control_socket")
    try:
        mode: int | None = sock.lstat().st_mode
    except FileNotFoundError:
        mode = None
    except OSError as e:
        raise ConfigError(f"proxy.control_socket: {sock}: {e.strerror}")
    if mode is not None and not stat.S_ISSOCK(mode):
        raise ConfigError(
            f"proxy.control_socket: {sock} exists and is not a socket; Baton will not replace it"
        )
    if mode is not None and _served(sock):
        raise ConfigError(
            f"proxy.control_socket: {sock} is served by a running process (another Baton?)"
        )
    store = Path(cfg.controller.store)
    _folder(store, "controller.store")
    if store.exists() and not store.is_file():
        raise ConfigError(f"controller.store: {store} is not a regular file")


def _folder(path: Path, key: str) -> None:
    folder = path.parent
    if not folder.is_dir():
        raise ConfigError(f"{key}: folder {folder} does not exist (for {path})")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}: folder {folder} is not writable (for {path})")


def _served(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        try:
            s.connect(str(path))
        except OSError:
            return False  # refused: a stale socket left by a Baton that did not stop cleanly
        return True
