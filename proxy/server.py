"""`baton serve`: the asyncio shell that wires config, listeners, metrics and control together."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from pathlib import Path

import uvloop

from proxy import metrics
from proxy.backend import BackendConnection, BackendError
from proxy.control import ControlServer
from proxy.frontend import BackendIdentity, ProxyContext, ProxyServer
from proxy.hold import Holder
from proxy.packets import PROXY_CAPS, PacketError, parse_server_handshake
from proxy.router import Router
from reparent.admin import AdminPool
from reparent.config import Config, ConfigError, ServerConfig, load
from reparent.controller import Controller
from reparent.establish import GtidEstablishment
from reparent.revoke import FollowerFencing, GracefulDemotion
from reparent.topology import FileStore, ReparentKind
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


async def run(config: Config, adopt: bool = False) -> None:
    primary = config.shard.primary
    try:
        identity = await probe_identity(primary, config.proxy.backend_connect_timeout)
    except (TimeoutError, OSError, BackendError, PacketError) as e:
        log.warning(
            "primary %s unreachable at start (%s); presenting %s", primary.name, e, FALLBACK.version
        )
        identity = FALLBACK
    store = FileStore.open(Path(config.controller.store), config)
    pool = AdminPool()  # one admin connection per server, shared by every mechanism
    controller = Controller(
        config,
        store,
        {ReparentKind.PRS: GracefulDemotion(pool), ReparentKind.ERS: FollowerFencing(pool)},
        GtidEstablishment(max_lag_seconds=config.controller.max_lag, pool=pool),
    )
    router = Router(config, store, controller.owner)
    holder = Holder(config.buffer)
    metrics.REGISTRY.register(holder)
    ctx = ProxyContext(config=config, identity=identity, router=router, holder=holder)
    router.listener = ctx
    await router.start()
    for report in await controller.resume():
        log.info("resumed reparent %s: %s", report.id, report.outcome)
    # Nothing acts on a shard before its servers were compared with the config and store.
    await controller.apply_durability(skip=await controller.check_at_start(adopt))
    server = ProxyServer(ctx)
    await server.start_server(
        host=config.proxy.listen_host, port=config.proxy.listen_port, reuse_address=True
    )
    control = ControlServer(ctx, controller, config.proxy.control_socket)
    await control.start()
    watch = None
    if config.detector.enabled:
        # Its reparents' reports get this proxy's buffer counts, as `ctl ers` ones do.
        watch = Watch(config, store, controller, reported=control.add_buffer_counts)
    if watch is not None:
        watch.start()
    metrics.serve(config.proxy.metrics_host, config.proxy.metrics_port)
    log.info(
        "baton serving %s:%d -> %s (%s); control %s; metrics %s:%d",
        config.proxy.listen_host,
        config.proxy.listen_port,
        primary.name,
        identity.version,
        config.proxy.control_socket,
        config.proxy.metrics_host,
        config.proxy.metrics_port,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("baton stopping")
    if watch is not None:
        watch.close()
    server.close()
    control.close()
    router.close()


def main(config_path: str, adopt: bool = False) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        config = load(config_path)
    except ConfigError as e:
        print(f"baton: bad config: {e}", file=sys.stderr)
        return 2
    try:
        uvloop.run(run(config, adopt))
    except OSError as e:
        print(f"baton: cannot start: {e}", file=sys.stderr)
        return 1
    return 0
