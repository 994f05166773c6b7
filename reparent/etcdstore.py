"""The topology store on etcd (`[topology] store = "etcd"`): one store for a fleet of Batons.

Keys, under `prefix` (default `/baton`), with shard and proxy names percent-encoded:

    topology/<shard>           ShardTopology JSON. etcd's per-key `version` is the store's
                               version: compare-and-set compares it in a txn.
    journal/<shard>            the in-flight ReparentRecord; absent when none.
    events/<shard>             {"events": [...]}: each put is one step's events, written in the
                               journal's txn; watchers get every put in revision order.
    history/<shard>/<finished>-<id>   a finished ReparentRecord (the last 200 per shard).
    buffers/<id>/<proxy>       one proxy's held/flushed/evicted for reparent <id>; each proxy
                               writes only its own key.
    locks/<shard>, leader      a lock: a key created (create_revision 0) on its holder's lease,
                               {"owner": ...}. The holder's token is the lease and the key's
                               create_revision; every write under the lock compares the
                               create_revision in the same txn.
    proxies/<proxy>            what a proxy said of itself when it registered (no lease:
                               kept, so `ctl status` shows a proxy that died as not alive).
    live/<proxy>               the same, current, on the proxy's lease (TTL 3 s): the proxy
                               is alive while it exists.
    drained/<shard>/<proxy>    {"term", "drained"} on the proxy's lease.

Events reach watchers through one watch thread per store, which also keeps each shard's
topology and journal as of the revision it has delivered, so that after a gap (etcd out of
reach, a compacted revision) it tells its subscribers what changed (`topology.catch_up`) and a
new subscriber what is going on now (a switch holding).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from reparent.config import Config
from reparent.etcd import (
    Compacted,
    EtcdClient,
    EtcdError,
    EtcdUnavailable,
    KeyValue,
    Watch,
    WatchQuiet,
    b64,
    prefix_end,
)
from reparent.store import (
    LEADER,
    Drain,
    Lease,
    LockLostError,
    ProxyInfo,
    ProxyStatus,
    StoreUnavailableError,
    TopologyStore,
    adopt_shards,
    check_topology_shard,
    notify,
    report_from_json,
)
from reparent.topology import (
    JournalConflictError,
    ReparentRecord,
    Seen,
    ShardTopology,
    TopologyError,
    TopologyEvent,
    UnknownShardError,
    Versioned,
    buffer_counts,
    catch_up,
    event_from_dict,
    event_to_dict,
    json_get,
    json_mapping,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

HISTORY_PER_SHARD = 200
MIN_TTL = 2  # etcd's smallest lease, in whole seconds
WATCH_IDLE = 5.0  # seconds a watch may stay silent before it is re-opened where it got to
RETRY = 0.5  # seconds between attempts while etcd is out of reach
CONFLICT_RETRIES = 5


def _q(name: str) -> str:
    return urllib.parse.quote(name, safe="")


def _uq(part: str) -> str:
    return urllib.parse.unquote(part)


def _ttl(seconds: float) -> int:
    return max(MIN_TTL, math.ceil(seconds))


@dataclass(frozen=True)
class _Token:
    lease: int
    revision: int

    def __str__(self) -> str:
        return f"{self.lease:x}:{self.revision}"

    @classmethod
    def parse(cls, text: str) -> _Token:
        lease, _, revision = text.partition(":")
        return cls(int(lease, 16), int(revision))


def _put(key: str, value: Any, lease: int = 0) -> dict[str, Any]:
    body: dict[str, Any] = {"key": b64(key), "value": b64(json.dumps(value))}
    if lease:
        body["lease"] = str(lease)
    return {"request_put": body}


def _range(
    key: str,
    prefix: bool = False,
    limit: int = 0,
    last_first: bool = False,
    keys_only: bool = False,
) -> dict[str, Any]:
    """A range op: the key, or the keys under a prefix (the last by key first, at most
    `limit` of them, without their values)."""
    body: dict[str, Any] = {"key": b64(key)}
    if prefix:
        body["range_end"] = b64(prefix_end(key))
    if limit:
        body["limit"] = str(limit)
    if last_first:
        body.update(sort_order="DESCEND", sort_target="KEY")
    if keys_only:
        body["keys_only"] = True
    return {"request_range": body}


def _delete(key: str) -> dict[str, Any]:
    return {"request_delete_range": {"key": b64(key)}}


def _compare(key: str, target: str, value: int, result: str = "EQUAL") -> dict[str, Any]:
    field = {"VERSION": "version", "CREATE": "create_revision", "MOD": "mod_revision"}[target]
    return {"key": b64(key), "target": target, "result": result, field: str(value)}


def _kvs(response: dict[str, Any]) -> list[KeyValue]:
    return [KeyValue.from_json(kv) for kv in response.get("response_range", {}).get("kvs", [])]


class EtcdStore(TopologyStore):
    def __init__(
        self,
        client: EtcdClient,
        prefix: str = "/baton",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client = client
        self.prefix = prefix.rstrip("/")
        self._clock = clock
        self._lock = threading.RLock()
        # The proxies registered through this store: id -> (lease, what was last written).
        # A lock of their own: a heartbeat waiting on a slow member must not hold up the
        # delivery of events, which runs under `_lock`.
        self._registered: dict[str, tuple[int, dict[str, Any]]] = {}
        self._proxy_lock = threading.Lock()
        self._subscribers: dict[int, Callable[[TopologyEvent], None]] = {}
        self._pending: set[int] = set()  # subscribers not yet told what is going on now
        self._ids = itertools.count()
        self._stream = _Stream(self)

    @classmethod
    def open(
        cls, endpoints: list[str], prefix: str, config: Config, timeout: float = 2.0
    ) -> EtcdStore:
        """Connect and add the config's shards the store lacks, like `FileStore.open`."""
        store = cls(EtcdClient(endpoints, timeout), prefix)
        adopt_shards(store, config, f"etcd {','.join(endpoints)} {store.prefix}")
        return store

    # -- keys ----------------------------------------------------------------------------------

    def _key(self, *parts: str) -> str:
        return "/".join((self.prefix, *parts))

    def _lock_key(self, shard: str) -> str:
        return self._key("leader") if shard == LEADER else self._key("locks", _q(shard))

    @contextlib.contextmanager
    def _reach(self) -> Iterator[None]:
        """etcd's failures as the store's: unreachable, refused, or damaged."""
        try:
            yield
        except EtcdUnavailable as e:
            raise StoreUnavailableError(str(e))
        except EtcdError as e:
            raise TopologyError(f"etcd refused: {e}")

    def _decode(self, kv: KeyValue) -> Any:
        try:
            return json.loads(kv.value)
        except ValueError as e:
            raise TopologyError(f"etcd key {kv.key}: not JSON: {e}")

    def _topology(self, kv: KeyValue) -> Versioned[ShardTopology]:
        try:
            return Versioned(ShardTopology.from_dict(json_mapping(self._decode(kv))), kv.version)
        except ValueError as e:
            raise TopologyError(f"etcd key {kv.key}: damaged topology: {e}")

    def _record(self, kv: KeyValue) -> ReparentRecord:
        try:
            return ReparentRecord.from_dict(json_mapping(self._decode(kv)))
        except ValueError as e:
            raise TopologyError(f"etcd key {kv.key}: damaged reparent record: {e}")

    # -- topology ------------------------------------------------------------------------------

    def read(self, shard: str) -> Versioned[ShardTopology]:
        with self._reach():
            kvs, _ = self.client.range(self._key("topology", _q(shard)))
        if not kvs:
            raise UnknownShardError(f"no shard {shard!r} in the topology store")
        return self._topology(kvs[0])

    def shards(self) -> list[str]:
        with self._reach():
            kvs, _ = self.client.range(self._key("topology", ""), prefix=True)
        return sorted(_uq(kv.key.rsplit("/", 1)[1]) for kv in kvs)

    def compare_and_set(
        self,
        shard: str,
        expected_version: int,
        new: ShardTopology,
        *,
        lease: Lease | None = None,
    ) -> bool:
        check_topology_shard(shard, new)
        key = self._key("topology", _q(shard))
        compare = [_compare(key, "VERSION", expected_version), *self._held(lease)]
        with self._reach():
            ok, _, _ = self.client.txn(compare, [_put(key, new.to_dict())])
        if not ok:
            self._check_held(lease)
        return ok

    def _held(self, lease: Lease | None) -> list[dict[str, Any]]:
        """The compare that makes a write happen only under `lease`'s lock."""
        if lease is None:
            return []
        return [_compare(self._lock_key(lease.shard), "CREATE", _Token.parse(lease.token).revision)]

    def _check_held(self, lease: Lease | None) -> None:
        if lease is not None and not self.check(lease):
            raise LockLostError(f"{lease.owner} no longer holds the lock of {lease.shard}")

    # -- journal -------------------------------------------------------------------------------

    def journal_put(
        self,
        record: ReparentRecord,
        events: tuple[TopologyEvent, ...] = (),
        *,
        lease: Lease | None = None,
    ) -> None:
        if record.outcome is not None:
            raise ValueError(f"reparent {record.id} has an outcome: finish it, do not put it")
        key = self._key("journal", _q(record.shard))
        self._journal_txn(record, lease, [_put(key, record.to_dict())], events)

    def journal_finish(
        self,
        record: ReparentRecord,
        events: tuple[TopologyEvent, ...] = (),
        *,
        lease: Lease | None = None,
    ) -> None:
        self._finish(record, events, lease)

    def commit_finish(
        self,
        record: ReparentRecord,
        expected_version: int,
        topology: ShardTopology,
        events: tuple[TopologyEvent, ...] = (),
        *,
        lease: Lease | None = None,
    ) -> bool:
        """One txn: the new topology, the finished record and the events."""
        check_topology_shard(record.shard, topology)
        return self._finish(record, events, lease, (expected_version, topology))

    def _finish(
        self,
        record: ReparentRecord,
        events: tuple[TopologyEvent, ...],
        lease: Lease | None,
        commit: tuple[int, ShardTopology] | None = None,
    ) -> bool:
        """The record to the history and the in-flight slot cleared, with `commit`'s topology
        if given (False, and nothing written, if the shard moved from its version)."""
        if record.outcome is None:
            raise ValueError(f"reparent {record.id} has no outcome yet")
        shard = _q(record.shard)
        finished = f"{record.finished_at or time.time():020.6f}-{_q(record.id)}"
        ops = [
            _delete(self._key("journal", shard)),
            _put(self._key("history", shard, finished), record.to_dict()),
        ]
        version = None
        if commit is not None:
            version, topology = commit
            ops.append(_put(self._key("topology", shard), topology.to_dict()))
        if not self._journal_txn(record, lease, ops, events, topology_version=version):
            return False
        self._trim_history(record.shard)
        return True

    def _journal_txn(
        self,
        record: ReparentRecord,
        lease: Lease | None,
        ops: list[dict[str, Any]],
        events: tuple[TopologyEvent, ...],
        topology_version: int | None = None,
    ) -> bool:
        """`ops` and the events' put in one txn, if the shard exists, the in-flight slot is
        free or this record's, and `lease` (if any) still holds the lock; with
        `topology_version`, only if the shard's topology is still at it (False if not)."""
        shard = _q(record.shard)
        journal_key = self._key("journal", shard)
        topology_key = self._key("topology", shard)
        if events:
            ops = [
                *ops,
                _put(self._key("events", shard), {"events": [event_to_dict(e) for e in events]}),
            ]
        for _ in range(CONFLICT_RETRIES):
            with self._reach():
                ok, responses, _ = self.client.txn([], [_range(journal_key), _range(topology_key)])
            current, topology = _kvs(responses[0]), _kvs(responses[1])
            if not topology:
                raise UnknownShardError(f"no shard {record.shard!r} in the topology store")
            slot = 0
            if current:
                in_flight = self._record(current[0])
                if in_flight.id != record.id:
                    raise JournalConflictError(
                        f"shard {record.shard}: reparent {in_flight.id} is in flight, "
                        f"not {record.id}"
                    )
                slot = current[0].mod_revision
            compare = [_compare(journal_key, "MOD", slot), *self._held(lease)]
            if topology_version is not None:
                if topology[0].version != topology_version:
                    return False
                compare.append(_compare(topology_key, "VERSION", topology_version))
            with self._reach():
                ok, _, _ = self.client.txn(compare, ops)
            if ok:
                return True
            self._check_held(lease)
        raise JournalConflictError(f"shard {record.shard}: the journal kept changing")

    def _trim_history(self, shard: str) -> None:
        """Keep the newest HISTORY_PER_SHARD reports of the shard (and their buffer counts)."""
        try:
            with self._reach():
                where = _range(self._key("history", _q(shard), ""), prefix=True, keys_only=True)
                ok, responses, _ = self.client.txn([], [where])
                for kv in sorted(_kvs(responses[0]), key=lambda kv: kv.key)[:-HISTORY_PER_SHARD]:
                    self.client.delete(kv.key)
                    record_id = kv.key.rsplit("/", 1)[1].split("-", 1)[1]
                    self.client.delete(self._key("buffers", record_id, ""), prefix=True)
        except TopologyError as e:
            log.warning("shard %s: history not trimmed: %s", shard, e)

    def journal_get(self, shard: str) -> ReparentRecord | None:
        with self._reach():
            ok, responses, _ = self.client.txn(
                [],
                [_range(self._key("journal", _q(shard))), _range(self._key("topology", _q(shard)))],
            )
        if not _kvs(responses[1]):
            raise UnknownShardError(f"no shard {shard!r} in the topology store")
        current = _kvs(responses[0])
        return self._record(current[0]) if current else None

    def history(self, shard: str | None = None, limit: int = 50) -> list[ReparentRecord]:
        """The newest `limit` of each shard asked (history keys sort by finish time), then
        their proxies' counts: two round trips however long the history is, since the
        detector asks for the last report every round."""
        if limit <= 0:
            return []
        shards = [shard] if shard is not None else self.shards()
        newest = [
            _range(self._key("history", _q(s), ""), prefix=True, limit=limit, last_first=True)
            for s in shards
        ]
        with self._reach():
            ok, responses, _ = self.client.txn([], newest)
        records = [self._record(kv) for response in responses for kv in _kvs(response)]
        records.sort(key=lambda r: r.finished_at or r.started_at, reverse=True)
        records = records[:limit]
        if not records:
            return []
        counts = [_range(self._key("buffers", _q(r.id), ""), prefix=True) for r in records]
        with self._reach():
            ok, responses, _ = self.client.txn([], counts)
        kept = []
        for record, response in zip(records, responses, strict=True):
            buffers = {}
            for kv in _kvs(response):
                try:
                    buffers[_uq(kv.key.rsplit("/", 1)[1])] = buffer_counts(self._decode(kv))
                except ValueError as e:
                    log.warning("etcd key %s: damaged buffer counts: %s", kv.key, e)
            kept.append(record.with_buffers(buffers) if buffers else record)
        return kept

    def annotate(
        self,
        record_id: str,
        proxy_id: str,
        held: int,
        flushed: int,
        evicted: int,
        reads: int = 0,
    ) -> bool:
        with self._reach():
            ok, responses, _ = self.client.txn(
                [], [_range(self._key("history", ""), prefix=True, keys_only=True)]
            )
            if not any(kv.key.endswith(f"-{_q(record_id)}") for kv in _kvs(responses[0])):
                return False
            counts = {"held": held, "flushed": flushed, "evicted": evicted, "reads": reads}
            self.client.put(self._key("buffers", _q(record_id), _q(proxy_id)), json.dumps(counts))
        return True

    # -- events --------------------------------------------------------------------------------

    def watch(self, callback: Callable[[TopologyEvent], None]) -> Callable[[], None]:
        with self._lock:
            key = next(self._ids)
            self._subscribers[key] = callback
            self._pending.add(key)
            self._stream.start()
            self._stream.welcome()
        # Until the stream has read the store once, a write made now might be older than
        # where it starts; so wait for that (bounded: etcd may be out of reach, and then the
        # subscriber is told what is going on when it answers again).
        self._stream.synced.wait(self.client.timeout)

        def unsubscribe() -> None:
            with self._lock:
                self._subscribers.pop(key, None)
                self._pending.discard(key)

        return unsubscribe

    def publish(self, event: TopologyEvent) -> None:
        with self._reach():
            self.client.put(
                self._key("events", _q(event.shard)),
                json.dumps({"events": [event_to_dict(event)]}),
            )

    def _deliver(self, event: TopologyEvent, only: set[int] | None = None) -> None:
        """To every subscriber (or those in `only`), on the watch thread."""
        with self._lock:
            targets = [cb for k, cb in self._subscribers.items() if only is None or k in only]
        notify(targets, event)

    # -- locks ---------------------------------------------------------------------------------

    def lock(self, shard: str, owner: str, ttl: float) -> Lease | None:
        if ttl <= 0:
            raise ValueError(f"lock ttl must be positive, got {ttl}")
        key = self._lock_key(shard)
        with self._reach():
            lease = self.client.grant(_ttl(ttl))
            try:
                ok, _, revision = self.client.txn(
                    [_compare(key, "CREATE", 0)], [_put(key, {"owner": owner}, lease)]
                )
            except BaseException:
                with contextlib.suppress(EtcdUnavailable):
                    self.client.revoke(lease)
                raise
            if not ok:
                self.client.revoke(lease)
                return None
        return Lease(
            shard=shard,
            owner=owner,
            token=str(_Token(lease, revision)),
            expires_at=self._clock() + _ttl(ttl),
            ttl=_ttl(ttl),
        )

    def renew(self, lease: Lease) -> bool:
        with self._reach():
            return self.client.keepalive(_Token.parse(lease.token).lease) > 0

    def check(self, lease: Lease) -> bool:
        token = _Token.parse(lease.token)
        with self._reach():
            kvs, _ = self.client.range(self._lock_key(lease.shard))
        return (
            bool(kvs) and kvs[0].create_revision == token.revision and kvs[0].lease == token.lease
        )

    def unlock(self, lease: Lease) -> bool:
        token = _Token.parse(lease.token)
        key = self._lock_key(lease.shard)
        with self._reach():
            ok, _, _ = self.client.txn([_compare(key, "CREATE", token.revision)], [_delete(key)])
            self.client.revoke(token.lease)
        return ok

    def lock_owner(self, shard: str) -> str | None:
        with self._reach():
            kvs, _ = self.client.range(self._lock_key(shard))
        if not kvs:
            return None
        try:
            return json_get(json_mapping(self._decode(kvs[0])), "owner", str)
        except ValueError:
            return "?"

    # -- proxies -------------------------------------------------------------------------------

    def register_proxy(self, proxy: ProxyInfo, ttl: float) -> None:
        info = proxy.to_dict()
        live = self._key("live", _q(proxy.id))
        with self._proxy_lock, self._reach():
            entry = self._registered.get(proxy.id)
            if entry is not None and self.client.keepalive(entry[0]) == 0:
                log.warning("proxy %s: its registration lapsed; registering again", proxy.id)
                entry = None
            if entry is None:
                lease = self.client.grant(_ttl(ttl))
            elif entry[1] != info:
                lease = entry[0]
            else:
                return
            # The kept copy too: a proxy that dies is shown as it last was.
            self.client.txn(
                [], [_put(self._key("proxies", _q(proxy.id)), info), _put(live, info, lease)]
            )
            self._registered[proxy.id] = (lease, info)

    def unregister_proxy(self, proxy_id: str) -> None:
        with self._proxy_lock, self._reach():
            entry = self._registered.pop(proxy_id, None)
            if entry is not None:
                self.client.revoke(entry[0])
            self.client.delete(self._key("proxies", _q(proxy_id)))

    def proxies(self) -> list[ProxyStatus]:
        with self._reach():
            ok, responses, _ = self.client.txn(
                [],
                [
                    _range(self._key("proxies", ""), prefix=True),
                    _range(self._key("live", ""), prefix=True),
                    _range(self._key("drained", ""), prefix=True),
                ],
            )
        known: dict[str, ProxyInfo] = {}
        alive: set[str] = set()
        for i, response in enumerate(responses[:2]):
            for kv in _kvs(response):
                try:
                    info = ProxyInfo.from_dict(json_mapping(self._decode(kv)))
                except ValueError as e:
                    log.warning("etcd key %s: damaged proxy: %s", kv.key, e)
                    continue
                known[info.id] = info
                if i == 1:
                    alive.add(info.id)
        drained: dict[str, dict[str, tuple[int, bool]]] = {}
        for kv in _kvs(responses[2]):
            shard, proxy = (_uq(p) for p in kv.key.rsplit("/", 2)[1:])
            with contextlib.suppress(ValueError, TopologyError):
                drained.setdefault(proxy, {})[shard] = report_from_json(self._decode(kv))
        return [
            ProxyStatus(known[p], alive=p in alive, drained=drained.get(p, {}))
            for p in sorted(known)
        ]

    def report_drained(self, proxy_id: str, shard: str, term: int, drained: bool) -> None:
        with self._proxy_lock:
            entry = self._registered.get(proxy_id)
        if entry is None:
            raise TopologyError(f"proxy {proxy_id} reports drained before it registered")
        with self._reach():
            self.client.put(
                self._key("drained", _q(shard), _q(proxy_id)),
                json.dumps({"term": term, "drained": drained}),
                entry[0],
            )

    def wait_drained(self, shard: str, term: int, timeout: float) -> Drain:
        """Live proxies and their reports read at one revision, then followed by a watch from
        the next revision until nobody owes a report or `timeout` passes."""
        deadline = self._clock() + timeout
        live_prefix = self._key("live", "")
        drained_prefix = self._key("drained", _q(shard), "")
        with self._reach():
            ok, responses, revision = self.client.txn(
                [], [_range(live_prefix, prefix=True), _range(drained_prefix, prefix=True)]
            )
        live = {_uq(kv.key[len(live_prefix) :]) for kv in _kvs(responses[0])}
        reports: dict[str, tuple[int, bool]] = {}
        for kv in _kvs(responses[1]):
            with contextlib.suppress(ValueError, TopologyError):
                reports[_uq(kv.key[len(drained_prefix) :])] = report_from_json(self._decode(kv))
        seen = set(live)

        def result(drained: bool) -> Drain:
            missing = sorted(p for p in seen if reports.get(p) != (term, True))
            return Drain(drained=drained, missing=tuple(missing))

        while True:
            if all(reports.get(p) == (term, True) for p in live):
                return result(True)
            remaining = deadline - self._clock()
            if remaining <= 0:
                return result(False)
            try:
                watch = self.client.watch(self.prefix + "/", revision + 1, remaining)
            except EtcdUnavailable:
                time.sleep(min(RETRY, max(0.0, deadline - self._clock())))
                continue
            try:
                for events, _ in watch:
                    for event in events:
                        key = event.kv.key
                        revision = max(revision, event.kv.mod_revision)
                        if key.startswith(live_prefix):
                            proxy = _uq(key[len(live_prefix) :])
                            if event.kind == "DELETE":
                                live.discard(proxy)
                            else:
                                live.add(proxy)
                                seen.add(proxy)
                        elif key.startswith(drained_prefix):
                            proxy = _uq(key[len(drained_prefix) :])
                            if event.kind == "DELETE":
                                reports.pop(proxy, None)
                            else:
                                with contextlib.suppress(ValueError, TopologyError):
                                    reports[proxy] = report_from_json(self._decode(event.kv))
                    if all(reports.get(p) == (term, True) for p in live):
                        return result(True)
                    if self._clock() >= deadline:
                        return result(False)
            except Compacted:
                return result(False)  # cannot follow: go ahead as at the grace period's end
            except (EtcdUnavailable, EtcdError):
                pass  # quiet, ended, or a damaged message: look again until the deadline
            finally:
                watch.close()

    def close(self) -> None:
        self._stream.stop()
        self.client.close()


class _Stream:
    """The store's one watch: follows `events/`, `topology/` and `journal/` in revision order,
    delivers events, and after a gap tells subscribers what the gap changed."""

    def __init__(self, store: EtcdStore) -> None:
        self.store = store
        self._thread: threading.Thread | None = None
        self._watch: Watch | None = None
        self._stop = threading.Event()
        self.revision = 0  # everything up to here is delivered; 0: no snapshot yet
        self.synced = threading.Event()  # set once the first snapshot is delivered
        self.topology: dict[str, ShardTopology] = {}
        self.journal: dict[str, ReparentRecord] = {}
        self.seen: dict[str, Seen] = {}

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="etcd-watch", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._watch is not None:
            self._watch.close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def welcome(self) -> None:
        """Tell pending subscribers what is going on now (caller holds the store's lock); a
        no-op until the first snapshot, which welcomes them itself."""
        store = self.store
        if not self.revision or not store._pending:
            return
        pending, store._pending = set(store._pending), set()
        for shard, topo in self.topology.items():
            for event in catch_up(None, topo, self.journal.get(shard)):
                store._deliver(event, pending)

    def _run(self) -> None:
        prefix = self.store.prefix + "/"
        while not self._stop.is_set():
            try:
                if not self.revision:
                    self._snapshot()
                self._watch = self.store.client.watch(prefix, self.revision + 1, WATCH_IDLE)
                if self._stop.is_set():
                    return
                for changes, _ in self._watch:
                    for change in changes:
                        self._apply(change.kind, change.kv)
            except Compacted as e:
                log.warning("topology watch: %s; reading the store again", e)
                self.revision = 0
            except WatchQuiet:
                continue
            except (EtcdUnavailable, EtcdError, TopologyError) as e:
                if self._stop.is_set():
                    return
                log.info("topology watch: %s; watching again from %d", e, self.revision + 1)
                self._stop.wait(RETRY)
            except Exception:
                log.exception("topology watch failed; watching again")
                self._stop.wait(RETRY)
            finally:
                if self._watch is not None:
                    self._watch.close()
                    self._watch = None

    def _snapshot(self) -> None:
        """Topology and journals at one revision; what changed since the last delivered state
        goes to the subscribers as catch-up events."""
        store = self.store
        try:
            ok, responses, revision = store.client.txn(
                [],
                [
                    _range(store._key("topology", ""), prefix=True),
                    _range(store._key("journal", ""), prefix=True),
                ],
            )
        except EtcdError as e:
            raise TopologyError(str(e))
        topology = {}
        for kv in _kvs(responses[0]):
            topo = store._topology(kv).value
            topology[topo.name] = topo
        journal = {}
        for kv in _kvs(responses[1]):
            record = store._record(kv)
            journal[record.shard] = record
        with store._lock:
            first = not self.topology
            for name, topo in topology.items():
                record = journal.get(name)
                if name in self.seen and not first:
                    for event in catch_up(self.seen[name], topo, record):
                        self._deliver(event)
                else:
                    holding = catch_up(None, topo, record)
                    self.seen[name] = Seen(topo.term, holding[0].term if holding else None)
            self.topology, self.journal, self.revision = topology, journal, revision
            self.welcome()
        self.synced.set()

    def _apply(self, kind: str, kv: KeyValue) -> None:
        store = self.store
        parts = kv.key[len(store.prefix) + 1 :].split("/")
        with store._lock:
            self.revision = max(self.revision, kv.mod_revision)
            if len(parts) != 2:
                return
            what, shard = parts[0], _uq(parts[1])
            if what == "topology" and kind == "PUT":
                topology = self._parsed(store._topology, kv)
                if topology is not None:
                    self.topology[shard] = topology.value
                    self.seen.setdefault(shard, Seen(topology.value.term))
            elif what == "journal":
                if kind == "PUT":
                    record = self._parsed(store._record, kv)
                    if record is not None:
                        self.journal[shard] = record
                else:
                    self.journal.pop(shard, None)
            elif what == "events" and kind == "PUT":
                try:
                    raw = json_get(json_mapping(store._decode(kv)), "events", list)
                    events = [event_from_dict(json_mapping(e)) for e in raw]
                except (ValueError, KeyError) as e:
                    log.error("etcd key %s: damaged events, skipped: %s", kv.key, e)
                    return
                for event in events:
                    self._deliver(event)

    @staticmethod
    def _parsed(parse: Callable[[KeyValue], T], kv: KeyValue) -> T | None:
        """A damaged value is skipped alone, as damaged events are: raising would watch again
        from after this revision and lose the rest of its transaction (its events)."""
        try:
            return parse(kv)
        except TopologyError as e:
            log.error("%s; skipped", e)
            return None

    def _deliver(self, event: TopologyEvent) -> None:
        seen = self.seen.get(event.shard)
        if seen is not None:
            self.seen[event.shard] = seen.after(event)
        self.store._deliver(event)
