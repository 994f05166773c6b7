"""`baton serve`: the asyncio shell that wires config, listeners, metrics and control together."""

from __future__ import annotations

import asyncio
import logging
import resource
import signal
import socket
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path

import uvloop

from proxy import metrics
from proxy.accounts import Accounts, book_from_config
from proxy.admission import FD_RESERVE, FDS_PER_SESSION, Admission
from proxy.backend import BackendConnection, BackendError
from proxy.context import BackendIdentity, ProxyContext
from proxy.control import ControlServer, LocalProxies, Proxies
from proxy.frontend import ProxyServer
from proxy.holder import Holder
from proxy.link import TRACKING_SQL
from proxy.packets import PROXY_CAPS, PacketError, parse_server_handshake
from proxy.pools import Pools
from proxy.readpath import ReplicaMonitor
from proxy.readroute import ReadPool
from proxy.router import Router, default_proxy_id
from proxy.rsa_key import RsaKey
from proxy.tls import ClientTls
from reparent.admin import AdminConnection, AdminError, AdminPool
from reparent.config import (
    Config,
    ConfigError,
    RoutingMode,
    ServerConfig,
    StoreKind,
    check_files,
    load,
    workers_value,
)
from reparent.controller import Controller
from reparent.establish import GtidEstablishment
from reparent.etcdstore import EtcdStore
from reparent.filestore import FileStore
from reparent.revoke import FollowerFencing, GracefulDemotion
from reparent.store import StoreUnavailableError, TopologyStore
from reparent.topology import ReparentKind, TopologyError
from reparent.watch import Watch

log = logging.getLogger("baton")

# Presented when no backend answers at start-up; replaced by the real one on the first probe.
FALLBACK = BackendIdentity(
    version="5.5.5-10.11.0-MariaDB-baton", capabilities=PROXY_CAPS, collation=45
)


async def probe_identity(server: ServerConfig, timeout: float) -> BackendIdentity:
    """Read the backend's greeting, so clients see its version and only shared capabilities."""
    loop = asyncio.get_running_loop()
    _, conn = await asyncio.wait_for(
        loop.create_connection(BackendConnection, server.host, server.port), timeout
    )
    try:
        _, payload = await asyncio.wait_for(conn.read_packet(), timeout)
        hs = parse_server_handshake(payload)
    finally:
        assert conn.transport is not None
        conn.transport.close()
    return BackendIdentity(
        version=hs.version, capabilities=hs.capabilities & PROXY_CAPS, collation=hs.collation
    )


async def open_store(config: Config) -> TopologyStore:
    """The configured topology store; etcd is waited for at start, since a proxy that does
    not know the term cannot fence by it."""
    if config.topology.store is StoreKind.FILE:
        return FileStore.open(Path(config.controller.store), config)
    t = config.topology
    while True:
        try:
            return await asyncio.to_thread(
                EtcdStore.open, list(t.endpoints), t.prefix, config, t.timeout
            )
        except StoreUnavailableError as e:
            log.warning("waiting for the topology store: %s", e)
            await asyncio.sleep(1.0)


DEFAULT_MAX_PACKET = 64 << 20  # when the primary's max_allowed_packet cannot be read


def file_limit() -> int:
    """Raise the soft limit on open files to the hard one, and return it: every session
    holds two descriptors."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as e:
            log.warning("cannot raise the open-file limit from %d to %d: %s", soft, hard, e)
    return soft


def max_allowed_packet(config: Config) -> int:
    """The largest command a client may send: the config's, else the primary's own limit, so
    an oversized command is refused by Baton at once instead of relayed to be refused."""
    if config.proxy.max_packet_size is not None:
        return config.proxy.max_packet_size
    primary = config.shard.primary
    try:
        conn = AdminConnection(
            primary, config.admin, config.proxy.backend_connect_timeout, config.backend
        )
        try:
            return int(conn.query("SELECT @@global.max_allowed_packet AS m")[0]["m"])
        finally:
            conn.close()
    except AdminError as e:
        log.warning(
            "cannot read max_allowed_packet from %s (%s); using %d",
            primary.name,
            e,
            DEFAULT_MAX_PACKET,
        )
        return DEFAULT_MAX_PACKET


def bind_listener(host: str, port: int, reuse_port: bool = False) -> socket.socket:
    """The clients' listening socket, bound and listening: one a supervisor passes to its
    workers, or (with `reuse_port`) one of each worker's, among which the kernel spreads
    connections."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
        sock.listen(1024)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


@dataclass
class DataPath:
    """One process's proxy: its sessions, routing and buffer, following the store."""

    ctx: ProxyContext
    router: Router
    server: ProxyServer
    refresh: asyncio.Future[None]
    # routing.read_port's listener and the monitor of the replicas, when reads are routed.
    read_server: ProxyServer | None = None
    monitor: ReplicaMonitor | None = None

    async def serve(self, sock: socket.socket | None = None) -> None:
        """Accept clients on the config's address, or from `sock`; and on the read port."""
        config = self.ctx.config
        p = config.proxy
        await self.server.start(p.listen_host, p.listen_port, sock)
        if self.read_server is not None:
            # Bound here by each worker (SO_REUSEPORT when there are several).
            reads = bind_listener(
                p.listen_host, config.routing.read_port, reuse_port=sock is not None
            )
            await self.read_server.start(p.listen_host, config.routing.read_port, reads)

    async def stop(self) -> None:
        self.refresh.cancel()
        self.server.close()
        if self.ctx.pools is not None:
            self.ctx.pools.close()
        if self.read_server is not None:
            self.read_server.close()
        if self.monitor is not None:
            self.monitor.close()
        await self.router.unregister()
        self.router.close()


def rsa_key(config: Config) -> RsaKey:
    """proxy.rsa_private_key's key, or a new one (proxy/rsa_key.py)."""
    path = config.proxy.rsa_private_key
    if not path:
        return RsaKey.generate()
    try:
        return RsaKey.load(path)
    except (OSError, ValueError, TypeError) as e:
        raise ConfigError(f"proxy.rsa_private_key: {path}: {e}")


async def start_data_path(
    config: Config,
    store: TopologyStore,
    proxy_id: str,
    *,
    worker: int = 0,
    max_connections: int | None = None,
) -> DataPath:
    """The proxy side of a Baton (or of one worker): it follows the store at once, and
    accepts clients from `serve`."""
    primary = config.shard.primary
    try:
        identity = await probe_identity(primary, config.proxy.backend_connect_timeout)
    except (TimeoutError, OSError, BackendError, PacketError) as e:
        log.warning(
            "primary %s unreachable at start (%s); presenting %s", primary.name, e, FALLBACK.version
        )
        identity = FALLBACK
    router = Router(config, store, proxy_id)
    holder = Holder(config.buffer)
    metrics.REGISTRY.register(holder)
    accounts = Accounts(
        book_from_config(config.users) if config.users else None,
        lambda: [router.primary(config.proxy.shard), *config.shard.servers],
        config.admin,
        backend=config.backend,
    )
    multiplex = config.pool.multiplex
    admission = Admission(
        max_connections=max_connections or config.proxy.max_connections,
        fd_limit=file_limit(),
        max_connect_errors=config.proxy.max_connect_errors,
        # Sharing: a session holds its client socket only, the pools hold the rest.
        fds_per_session=1 if multiplex else FDS_PER_SESSION,
        reserve=FD_RESERVE + (config.pool.max if multiplex else 0),
    )
    ctx = ProxyContext(
        config=config,
        identity=identity,
        router=router,
        holder=holder,
        accounts=accounts,
        admission=admission,
        max_packet=await asyncio.to_thread(max_allowed_packet, config),
        worker=worker,
        rsa_key=await asyncio.to_thread(rsa_key, config),
        tls=ClientTls(config.tls) if config.tls.enabled else None,
    )
    if multiplex:
        ctx.pools = Pools(config.pool, ctx.connect, TRACKING_SQL)
        ctx.pools.pinned = ctx.pinned
        metrics.REGISTRY.register(ctx.pools)
    router.listener = ctx
    router.holder = holder
    await router.start()
    refresh = asyncio.ensure_future(accounts.refresh_forever())
    routing = config.routing
    data = DataPath(ctx, router, ProxyServer(ctx), refresh)
    if routing.mode is not RoutingMode.PRIMARY or routing.read_port:
        ctx.read_pool = ReadPool(routing.max_replica_lag)
        data.monitor = ReplicaMonitor(config, ctx.read_pool, ctx.primary, store)
        await data.monitor.round()  # reads go to replicas from the first session on
        data.monitor.start()
        if routing.read_port:
            data.read_server = ProxyServer(ctx, read_only=True)
    return data


async def start_controller(controller: Controller, adopt: bool) -> None:
    """Before any switch or client: finish or undo what a dead controller left, compare the
    servers with the config and store, then set durability where they agree."""
    for report in await controller.resume():
        log.info("resumed reparent %s: %s", report.id, report.outcome)
    # Nothing acts on a shard before its servers were compared with the config and store.
    await controller.apply_durability(skip=await controller.check_at_start(adopt))


def make_controller(config: Config, store: TopologyStore, owner: str) -> Controller:
    pool = AdminPool(config.backend)  # one admin connection per server, shared by every mechanism
    return Controller(
        config,
        store,
        {ReparentKind.PRS: GracefulDemotion(pool), ReparentKind.ERS: FollowerFencing(pool)},
        GtidEstablishment(max_lag_seconds=config.controller.max_lag, pool=pool),
        owner=owner,
    )


@dataclass
class ControlPlane:
    """The controller's side of a Baton: the control socket, the failure detector and the
    follower that finishes a dead Baton's switch. In a single process it shares the loop
    with the data path; with workers it is the supervisor's alone."""

    control: ControlServer
    watch: Watch | None
    follower: asyncio.Task[None]

    @classmethod
    async def start(
        cls, config: Config, store: TopologyStore, controller: Controller, proxies: Proxies
    ) -> ControlPlane:
        control = ControlServer(config, controller, proxies, config.proxy.control_socket)
        await control.start()
        watch = None
        if config.detector.enabled:
            # Its reparents' reports get the proxies' buffer counts, as `ctl ers` ones do.
            watch = Watch(config, store, controller, reported=control.add_buffer_counts)
            watch.start()
        # Finish or undo the switch of a Baton that died holding it (any Baton of a fleet).
        follower = asyncio.get_running_loop().create_task(controller.follow())
        return cls(control, watch, follower)

    def stop(self) -> None:
        self.follower.cancel()
        if self.watch is not None:
            self.watch.close()
        self.control.close()


def on_reload_signal(reload: Callable[[], Awaitable[object]]) -> None:
    """SIGHUP reads Baton's certificate for clients again (`baton ctl tls reload` does too);
    what it finds is logged and counted by the reload itself."""
    loop = asyncio.get_running_loop()
    running: set[asyncio.Task[object]] = set()  # the loop keeps only weak references

    def start() -> None:
        task = loop.create_task(reload())
        running.add(task)
        task.add_done_callback(running.discard)

    loop.add_signal_handler(signal.SIGHUP, start)


async def until_stopped() -> None:
    """Until SIGTERM or SIGINT."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


async def run(config: Config, adopt: bool = False) -> None:
    """One process: the data path and the controller on one event loop (`proxy.workers` 0)."""
    store = await open_store(config)
    proxy_id = default_proxy_id(config)
    controller = make_controller(config, store, proxy_id)
    data = await start_data_path(config, store, proxy_id)
    await start_controller(controller, adopt)
    await data.serve()
    proxies = LocalProxies(data.ctx)
    plane = await ControlPlane.start(config, store, controller, proxies)
    on_reload_signal(lambda: proxies.tls(True))
    metrics.serve(config.proxy.metrics_host, config.proxy.metrics_port)
    log.info(
        "baton serving %s:%d -> %s (%s); control %s; metrics %s:%d",
        config.proxy.listen_host,
        config.proxy.listen_port,
        config.shard.primary.name,
        data.ctx.identity.version,
        config.proxy.control_socket,
        config.proxy.metrics_host,
        config.proxy.metrics_port,
    )
    await until_stopped()
    log.info("baton stopping")
    plane.stop()
    await data.stop()
    store.close()


def main(config_path: str, workers: str | None = None, adopt: bool = False) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        config = load(config_path)
        if workers is not None:
            count = workers_value(int(workers) if workers.isdigit() else workers, "--workers")
            config = replace(config, proxy=replace(config.proxy, workers=count))
        check_files(config)
    except ConfigError as e:
        print(f"baton: bad config: {e}", file=sys.stderr)
        return 2
    if config.proxy.workers:
        from proxy.supervisor import run_supervisor

        entry = run_supervisor(config, adopt)
    else:
        entry = run(config, adopt)
    try:
        uvloop.run(entry)
    except (OSError, TopologyError) as e:  # a port in use; a store file that cannot be used
        print(f"baton: cannot start: {e}", file=sys.stderr)
        return 1
    return 0
