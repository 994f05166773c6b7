"""`baton serve --workers N`: a supervisor and N worker processes, one Baton to operate.

Baton's data path is Python on one event loop, so one process uses one core. The supervisor
binds the clients' port once and spawns N workers (proxy/worker.py) that accept from it; each
is a whole proxy. The supervisor itself serves no client: it owns the topology store (the
embedded file store, which it serves to its workers over their channels; with etcd each worker
talks to etcd itself), the reparent controller, the failure detector, the control socket and
the metrics endpoint. So client load, however heavy, never delays a switch: the controller's
loop has nothing else to do.

- A worker that dies is started again (after 0.5 s, longer if it keeps dying at start): only
  its own clients lost their connections. Its registration is dropped at once, so a switch
  does not wait for it.
- `baton ctl` talks to the supervisor, which asks every worker and answers for the group:
  `sessions` lists every worker's sessions, `status` sums their front doors, `users` and
  `unblock` reach each worker.
- One `/metrics` scrape shows the group: each worker's figures labelled `worker="<index>"`, the
  controller's and detector's without the label. prometheus-client's multiprocess mode cannot
  carry Baton's own collectors (commands, buffer), so the supervisor asks each worker for its
  exposition over its channel and merges them.
- SIGTERM (or SIGINT) stops every worker as a single Baton stops, then the supervisor.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from proxy import worker as w
from proxy.context import SESSION_ID_BASE, SESSION_ID_SPAN
from proxy.control import Counts
from proxy.router import default_proxy_id
from proxy.server import (
    ControlPlane,
    bind_listener,
    make_controller,
    on_reload_signal,
    open_store,
    start_controller,
    until_stopped,
)
from reparent import metrics as reparent_metrics
from reparent.channel import Channel, ChannelClosed
from reparent.config import Config
from reparent.socketstore import StoreServer
from reparent.store import TopologyStore
from reparent.topology import TopologyError

log = logging.getLogger(__name__)

READY_TIMEOUT = 60.0  # seconds a worker has to start accepting
STOP_TIMEOUT = 10.0  # seconds a worker has to stop on SIGTERM before SIGKILL
RESTART_DELAY = 0.5  # seconds before a dead worker is started again
MAX_RESTART_DELAY = 10.0  # the delay doubles up to this while workers die young
YOUNG = 5.0  # seconds: a worker that dies sooner after its start doubles the delay
ASK_TIMEOUT = 30.0  # seconds for one worker's answer to ctl or a scrape


@dataclass
class WorkerProcess:
    """One worker as the supervisor sees it."""

    index: int
    proxy_id: str
    process: asyncio.subprocess.Process | None = None
    channel: Channel | None = None
    store_server: StoreServer | None = None
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    started_at: float = 0.0
    restarts: int = 0

    @property
    def serving(self) -> bool:
        return self.ready.is_set() and self.channel is not None and not self.channel.closed

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "id": self.proxy_id,
            "pid": self.process.pid if self.process is not None else None,
            "serving": self.serving,
            "restarts": self.restarts,
        }


class Supervisor:
    def __init__(
        self, config: Config, store: TopologyStore, listener: socket.socket | None
    ) -> None:
        self.config = config
        self.store = store
        self.listener = listener
        base = default_proxy_id(config)
        self.workers = [WorkerProcess(i, w.worker_id(base, i)) for i in range(config.proxy.workers)]
        self._loop = asyncio.get_running_loop()
        self._stopping = False
        self._tasks: set[asyncio.Task[None]] = set()

    # -- the workers' lives -------------------------------------------------------------------

    async def start(self) -> None:
        """Start every worker and wait until each accepts clients."""
        for worker in self.workers:
            await self._spawn(worker)
        for worker in self.workers:
            try:
                await asyncio.wait_for(worker.ready.wait(), READY_TIMEOUT)
            except TimeoutError:
                log.error("worker %d not ready after %g s", worker.index, READY_TIMEOUT)

    async def _spawn(self, worker: WorkerProcess) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        args = [
            sys.executable,
            "-m",
            "proxy.worker",
            "--index",
            str(worker.index),
            "--channel-fd",
            str(theirs.fileno()),
        ]
        fds = [theirs.fileno()]
        if self.listener is not None:
            args += ["--listen-fd", str(self.listener.fileno())]
            fds.append(self.listener.fileno())
        worker.ready.clear()
        worker.store_server = StoreServer(self.store)
        worker.channel = Channel(
            ours,
            lambda kind, a: self._handle(worker, kind, a),
            on_note=lambda kind, a: self._note(worker, kind, a),
            name=f"supervisor-w{worker.index}",
        ).start()
        try:
            worker.process = await asyncio.create_subprocess_exec(*args, pass_fds=fds)
        finally:
            theirs.close()
        worker.started_at = time.monotonic()
        log.info("worker %d started, pid %d", worker.index, worker.process.pid)
        task = self._loop.create_task(self._watch(worker, worker.process))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _watch(self, worker: WorkerProcess, process: asyncio.subprocess.Process) -> None:
        """Wait for the worker to exit; unless stopping, drop it from the fleet and start it
        again."""
        code = await process.wait()
        self._forget(worker)
        if self._stopping:
            return
        log.error(
            "worker %d (pid %d) exited with %s; starting it again", worker.index, process.pid, code
        )
        with contextlib.suppress(TopologyError):
            await asyncio.to_thread(self.store.unregister_proxy, worker.proxy_id)
        young = time.monotonic() - worker.started_at < YOUNG
        worker.restarts += 1
        delay = RESTART_DELAY
        if young:
            delay = min(MAX_RESTART_DELAY, RESTART_DELAY * 2 ** min(worker.restarts, 5))
        await asyncio.sleep(delay)
        if not self._stopping:
            await self._spawn(worker)

    def _forget(self, worker: WorkerProcess) -> None:
        worker.ready.clear()
        if worker.channel is not None:
            worker.channel.close()
        if worker.store_server is not None:
            worker.store_server.close()

    async def stop(self) -> None:
        """SIGTERM every worker (each stops as a single Baton does), then wait for them."""
        self._stopping = True
        processes = [x.process for x in self.workers if x.process is not None]
        for process in processes:
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.terminate()
        for process in processes:
            try:
                await asyncio.wait_for(process.wait(), STOP_TIMEOUT)
            except TimeoutError:
                log.error("worker pid %d did not stop; killing it", process.pid)
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
        for worker in self.workers:
            self._forget(worker)

    # -- the channel: what workers ask ----------------------------------------------------------

    def _handle(self, worker: WorkerProcess, kind: str, args: tuple[Any, ...]) -> object:
        if kind == w.CONFIG:
            return self.config
        if kind == w.PEER_SESSION:
            return self._peer_session(args[0])
        assert worker.store_server is not None and worker.channel is not None
        try:
            return worker.store_server.handle(worker.channel, kind, args)
        except LookupError:
            raise ValueError(f"unknown request {kind!r} from worker {worker.index}") from None

    def _note(self, worker: WorkerProcess, kind: str, args: tuple[Any, ...]) -> None:
        if kind == w.READY:
            self._loop.call_soon_threadsafe(worker.ready.set)
            return
        if worker.store_server is None or not worker.store_server.note(kind, args):
            log.warning("unknown note %r from worker %d", kind, worker.index)

    def _peer_session(self, session_id: int) -> tuple[str, int] | None:
        """A KILL naming another worker's session: that worker says where the session runs.
        The worker is read from the id's high bits."""
        index = (session_id - SESSION_ID_BASE) // SESSION_ID_SPAN
        if not 0 <= index < len(self.workers):
            return None
        owner = self.workers[index]
        if not owner.serving or owner.channel is None:
            return None
        try:
            found = owner.channel.call(w.SESSION_THREAD, session_id, timeout=1.0)
        except (ChannelClosed, TimeoutError):
            return None
        return found  # type: ignore[return-value]

    # -- asking every worker ---------------------------------------------------------------------

    def ask_sync(self, kind: str, *args: Any) -> list[tuple[int, Any]]:
        """Every serving worker's answer, by index; one that fails is logged and left out."""
        answers = []
        for worker in self.workers:
            channel = worker.channel
            if not worker.serving or channel is None:
                continue
            try:
                answers.append((worker.index, channel.call(kind, *args, timeout=ASK_TIMEOUT)))
            except (ChannelClosed, TimeoutError, RuntimeError) as e:
                log.warning("worker %d did not answer %s: %s", worker.index, kind, e)
        return answers

    async def ask(self, kind: str, *args: Any) -> list[tuple[int, Any]]:
        """`ask_sync` off the loop, each worker asked at once."""
        asked = [x for x in self.workers if x.serving]

        async def one(worker: WorkerProcess) -> tuple[int, Any] | None:
            channel = worker.channel
            if channel is None:
                return None
            try:
                answer = await asyncio.to_thread(channel.call, kind, *args, timeout=ASK_TIMEOUT)
            except (ChannelClosed, TimeoutError, RuntimeError) as e:
                log.warning("worker %d did not answer %s: %s", worker.index, kind, e)
                return None
            return worker.index, answer

        found = await asyncio.gather(*(one(x) for x in asked))
        return [a for a in found if a is not None]


class GroupProxies:
    """The control socket's view of the whole group (proxy/control.py's `Proxies`)."""

    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor
        self.proxy_id = default_proxy_id(supervisor.config)

    async def sessions(self) -> list[dict[str, Any]]:
        out = []
        for index, sessions in await self.supervisor.ask(w.SESSIONS):
            out += [{**s, "worker": index} for s in sessions]
        return out

    async def front_door(self) -> dict[str, Any]:
        answers = dict(await self.supervisor.ask(w.FRONT_DOOR))
        doors = [a["front_door"] for a in answers.values()]
        refused: dict[str, int] = {}
        for door in doors:
            for reason, n in door["refused"].items():
                refused[reason] = refused.get(reason, 0) + n
        first = next(iter(answers.values()), None)
        return {
            "sessions": sum(a["sessions"] for a in answers.values()),
            "version": first["version"] if first else "",
            "front_door": {
                "open": sum(d["open"] for d in doors),
                "capacity": sum(d["capacity"] for d in doors),
                "blocked": sorted({b for d in doors for b in d["blocked"]}),
                "refused": refused,
            },
            "unfenced_users": first["unfenced_users"] if first else [],
            "workers": [
                {**x.to_dict(), "sessions": answers[x.index]["sessions"]}
                if x.index in answers
                else x.to_dict()
                for x in self.supervisor.workers
            ],
        }

    async def users(self, reload: bool) -> dict[str, Any]:
        """Every worker reads the accounts itself; the first one's list is shown, with any
        worker's error."""
        answers = await self.supervisor.ask(w.USERS, reload)
        if not answers:
            return {"source": "", "error": "no worker answered", "accounts": []}
        errors = [f"worker {i}: {a['error']}" for i, a in answers if a["error"]]
        return {**answers[0][1], "error": "; ".join(errors) or None}

    async def unblock(self, address: str) -> bool:
        return any(found for _, found in await self.supervisor.ask(w.UNBLOCK, address))

    async def tls(self, reload: bool) -> list[dict[str, Any]]:
        """Every worker's certificate; with reload, each reads it again itself."""
        return [
            {**p, "worker": index}
            for index, found in await self.supervisor.ask(w.TLS, reload)
            for p in found
        ]

    async def annotate(self, shard: str, term: int, record_id: str) -> Counts:
        counts: Counts = {}
        for _, found in await self.supervisor.ask(w.ANNOTATE, shard, term, record_id):
            counts.update(found)
        return counts


class GroupMetrics(Collector):
    """Each worker's exposition, its samples labelled by worker, merged family by family.
    Families the supervisor has itself (the controller's, the detector's) are its own."""

    def __init__(self, supervisor: Supervisor, own: set[str]) -> None:
        self.supervisor = supervisor
        self.own = own

    def collect(self) -> Iterator[Metric]:
        families: dict[str, Metric] = {}
        for index, text in self.supervisor.ask_sync(w.METRICS):
            for family in text_string_to_metric_families(text.decode()):
                if family.name in self.own:
                    continue
                merged = families.get(family.name)
                if merged is None:
                    merged = Metric(family.name, family.documentation, family.type, family.unit)
                    families[family.name] = merged
                for s in family.samples:
                    labels = {**s.labels, "worker": str(index)}
                    merged.add_sample(s.name, labels, s.value, s.timestamp)
        yield from families.values()
        workers = GaugeMetricFamily(
            "baton_workers_serving", "Worker processes accepting clients now"
        )
        workers.add_metric([], sum(x.serving for x in self.supervisor.workers))
        yield workers
        restarts = GaugeMetricFamily(
            "baton_worker_restarts", "Times each worker was started again", labels=["worker"]
        )
        for x in self.supervisor.workers:
            restarts.add_metric([str(x.index)], x.restarts)
        yield restarts


def serve_metrics(config: Config, supervisor: Supervisor) -> None:
    registry = CollectorRegistry(auto_describe=True)
    own = set()
    for collector in reparent_metrics.COLLECTORS:
        registry.register(collector)
        own |= {m.name for m in collector.collect()}
    registry.register(GroupMetrics(supervisor, own))
    start_http_server(config.proxy.metrics_port, addr=config.proxy.metrics_host, registry=registry)


async def run_supervisor(config: Config, adopt: bool = False) -> None:
    store = await open_store(config)
    proxy_id = default_proxy_id(config)
    controller = make_controller(config, store, proxy_id)
    await start_controller(controller, adopt)
    p = config.proxy
    listener = None if p.reuse_port else bind_listener(p.listen_host, p.listen_port)
    supervisor = Supervisor(config, store, listener)
    await supervisor.start()
    proxies = GroupProxies(supervisor)
    plane = await ControlPlane.start(config, store, controller, proxies)
    on_reload_signal(lambda: proxies.tls(True))
    serve_metrics(config, supervisor)
    log.info(
        "baton serving %s:%d with %d workers -> %s; control %s; metrics %s:%d",
        p.listen_host,
        p.listen_port,
        p.workers,
        config.shard.primary.name,
        p.control_socket,
        p.metrics_host,
        p.metrics_port,
    )
    await until_stopped()
    log.info("baton stopping its %d workers", p.workers)
    plane.stop()
    await supervisor.stop()
    if listener is not None:
        listener.close()
    store.close()
