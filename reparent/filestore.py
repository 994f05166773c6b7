"""The embedded topology store: one process, everything in memory, topology and journal also in
one JSON file (the default `[topology] store = "file"`)."""

from __future__ import annotations

import copy
import itertools
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from reparent.config import Config
from reparent.store import (
    Drain,
    Lease,
    LockLostError,
    ProxyInfo,
    ProxyStatus,
    TopologyStore,
    Waiter,
    adopt_shards,
    check_topology_shard,
    notify,
)
from reparent.topology import (
    JournalConflictError,
    ReparentRecord,
    ShardTopology,
    TopologyError,
    TopologyEvent,
    UnknownShardError,
    Versioned,
    catch_up,
    json_get,
    json_mapping,
)

log = logging.getLogger(__name__)

FORMAT = 1  # the store file's layout; bumped when an older Baton could misread a newer file
HISTORY_PER_SHARD = 200  # finished reparents kept per shard, so the file stays small


class CorruptStoreError(TopologyError):
    """The store file cannot be trusted. Starting anyway would forget a term or a half-done
    reparent, so Baton refuses until an operator looks at the file."""


class FileStore(TopologyStore):
    """The embedded store: everything in memory, topology and journal also in one JSON file.

    Locks and proxy registrations live in memory only: after a restart no old lease can be
    honoured and every live proxy re-registers within one heartbeat.

    `clock` decides every expiry (leases, registrations, `wait_drained`'s deadline); it is
    monotonic by default because these are durations, and a wall-clock step would expire or
    prolong every lease at once. `wait` blocks on the store's condition for up to the given
    seconds; with a fake clock, pass one that advances it.
    """

    def __init__(
        self,
        path: Path | str | None,
        clock: Callable[[], float] = time.monotonic,
        *,
        wait: Waiter = threading.Condition.wait,
    ) -> None:
        self._path = None if path is None else Path(path)
        self._clock = clock
        self._wait = wait
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        # Serialises publishing, so that every watcher sees events in the same order.
        self._publishing = threading.RLock()
        self._topology: dict[str, Versioned[ShardTopology]] = {}
        self._in_flight: dict[str, ReparentRecord] = {}
        self._history: list[ReparentRecord] = []  # oldest first
        self._leases: dict[str, tuple[Lease, float]] = {}  # shard -> (lease, ttl)
        self._proxies: dict[str, tuple[ProxyInfo, float]] = {}  # id -> (info, expiry)
        self._reports: dict[tuple[str, str], tuple[int, bool]] = {}  # (proxy, shard) -> report
        self._watchers: dict[int, Callable[[TopologyEvent], None]] = {}
        self._watcher_ids = itertools.count()
        if self._path is not None:
            self._load(self._path)

    @classmethod
    def open(
        cls,
        path: Path | str | None,
        config: Config,
        *,
        clock: Callable[[], float] = time.monotonic,
        wait: Waiter = threading.Condition.wait,
    ) -> FileStore:
        """Load the store and add the config's shards it lacks (term 1, the config's primary).

        For a shard the file already has, the file's primary and term win: they are what the
        last reparent left. Its server list follows the config, because a server only the file
        names has no address to reach it by.
        """
        store = cls(path, clock, wait=wait)
        with store._lock:
            adopt_shards(store, config, f"{path} (remove the shard from the file to start over)")
        return store

    # -- topology ---------------------------------------------------------------------------

    def read(self, shard: str) -> Versioned[ShardTopology]:
        with self._lock:
            return self._known(shard)

    def shards(self) -> list[str]:
        with self._lock:
            return sorted(self._topology)

    def compare_and_set(
        self,
        shard: str,
        expected_version: int,
        new: ShardTopology,
        *,
        lease: Lease | None = None,
    ) -> bool:
        check_topology_shard(shard, new)
        with self._lock:
            self._holds(lease)
            current = self._topology.get(shard)
            version = 0 if current is None else current.version
            if version != expected_version:
                return False
            topology = {**self._topology, shard: Versioned(new, version + 1)}
            self._commit(topology, self._in_flight, self._history)
            return True

    # -- journal ----------------------------------------------------------------------------

    def journal_put(
        self,
        record: ReparentRecord,
        events: tuple[TopologyEvent, ...] = (),
        *,
        lease: Lease | None = None,
    ) -> None:
        if record.outcome is not None:
            raise ValueError(f"reparent {record.id} has an outcome: finish it, do not put it")
        with self._publishing:
            with self._lock:
                self._holds(lease)
                self._known(record.shard)
                self._check_in_flight(record)
                in_flight = {**self._in_flight, record.shard: copy.deepcopy(record)}
                self._commit(self._topology, in_flight, self._history)
            for event in events:
                self.publish(event)

    def journal_get(self, shard: str) -> ReparentRecord | None:
        with self._lock:
            self._known(shard)
            return copy.deepcopy(self._in_flight.get(shard))

    def journal_finish(
        self,
        record: ReparentRecord,
        events: tuple[TopologyEvent, ...] = (),
        *,
        lease: Lease | None = None,
    ) -> None:
        if record.outcome is None:
            raise ValueError(f"reparent {record.id} has no outcome yet")
        with self._publishing:
            self._finish(record, lease)
            for event in events:
                self.publish(event)

    def commit_finish(
        self,
        record: ReparentRecord,
        expected_version: int,
        topology: ShardTopology,
        events: tuple[TopologyEvent, ...] = (),
        *,
        lease: Lease | None = None,
    ) -> bool:
        """One write of the file: the new topology and the finished record together."""
        if record.outcome is None:
            raise ValueError(f"reparent {record.id} has no outcome yet")
        check_topology_shard(record.shard, topology)
        with self._publishing:
            with self._lock:
                if self._known(record.shard).version != expected_version:
                    return False
                self._finish(record, lease, Versioned(topology, expected_version + 1))
            for event in events:
                self.publish(event)
        return True

    def _finish(
        self,
        record: ReparentRecord,
        lease: Lease | None,
        topology: Versioned[ShardTopology] | None = None,
    ) -> None:
        with self._lock:
            self._holds(lease)
            self._known(record.shard)
            self._check_in_flight(record)
            in_flight = {k: v for k, v in self._in_flight.items() if k != record.shard}
            history = [*self._history, copy.deepcopy(record)]
            same = [i for i, r in enumerate(history) if r.shard == record.shard]
            dropped = set(same[: max(0, len(same) - HISTORY_PER_SHARD)])
            history = [r for i, r in enumerate(history) if i not in dropped]
            topologies = self._topology
            if topology is not None:
                topologies = {**topologies, record.shard: topology}
            self._commit(topologies, in_flight, history)

    def history(self, shard: str | None = None, limit: int = 50) -> list[ReparentRecord]:
        with self._lock:
            found = [r for r in reversed(self._history) if shard is None or r.shard == shard]
            return copy.deepcopy(found[: max(0, limit)])

    def annotate(
        self,
        record_id: str,
        proxy_id: str,
        held: int,
        flushed: int,
        evicted: int,
        reads: int = 0,
    ) -> bool:
        counts = {"held": held, "flushed": flushed, "evicted": evicted, "reads": reads}
        with self._lock:
            for i, record in enumerate(self._history):
                if record.id == record_id:
                    history = list(self._history)
                    history[i] = record.with_buffers({**record.buffers, proxy_id: counts})
                    self._commit(self._topology, self._in_flight, history)
                    return True
            return False

    def _check_in_flight(self, record: ReparentRecord) -> None:
        current = self._in_flight.get(record.shard)
        if current is not None and current.id != record.id:
            raise JournalConflictError(
                f"shard {record.shard}: reparent {current.id} is in flight, not {record.id}"
            )

    def _known(self, shard: str) -> Versioned[ShardTopology]:
        try:
            return self._topology[shard]
        except KeyError:
            raise UnknownShardError(f"no shard {shard!r} in the topology store")

    # -- events -----------------------------------------------------------------------------

    def watch(self, callback: Callable[[TopologyEvent], None]) -> Callable[[], None]:
        with self._publishing, self._lock:
            # A switch holding now is told first, so the subscriber holds like the others.
            for name, current in self._topology.items():
                for event in catch_up(None, current.value, self._in_flight.get(name)):
                    callback(event)
            key = next(self._watcher_ids)
            self._watchers[key] = callback

        def unsubscribe() -> None:
            with self._lock:
                self._watchers.pop(key, None)

        return unsubscribe

    def publish(self, event: TopologyEvent) -> None:
        with self._publishing:
            with self._lock:
                watchers = list(self._watchers.values())
            notify(watchers, event)

    # -- shard lock -------------------------------------------------------------------------

    def lock(self, shard: str, owner: str, ttl: float) -> Lease | None:
        if ttl <= 0:
            raise ValueError(f"lock ttl must be positive, got {ttl}")
        with self._lock:
            now = self._clock()
            held = self._leases.get(shard)
            if held is not None and held[0].expires_at > now:
                return None
            lease = Lease(
                shard=shard, owner=owner, token=uuid.uuid4().hex, expires_at=now + ttl, ttl=ttl
            )
            self._leases[shard] = (lease, ttl)
            return lease

    def renew(self, lease: Lease) -> bool:
        with self._lock:
            now = self._clock()
            held = self._leases.get(lease.shard)
            if held is None or held[0].token != lease.token or held[0].expires_at <= now:
                return False
            current, ttl = held
            self._leases[lease.shard] = (replace(current, expires_at=now + ttl), ttl)
            return True

    def check(self, lease: Lease) -> bool:
        with self._lock:
            held = self._leases.get(lease.shard)
            return (
                held is not None
                and held[0].token == lease.token
                and (held[0].expires_at > self._clock())
            )

    def _holds(self, lease: Lease | None) -> None:
        if lease is not None and not self.check(lease):
            raise LockLostError(f"{lease.owner} no longer holds the lock of {lease.shard}")

    def lock_owner(self, shard: str) -> str | None:
        with self._lock:
            held = self._leases.get(shard)
            if held is None or held[0].expires_at <= self._clock():
                return None
            return held[0].owner

    def unlock(self, lease: Lease) -> bool:
        with self._lock:
            held = self._leases.get(lease.shard)
            if held is None or held[0].token != lease.token:
                return False
            del self._leases[lease.shard]
            return True

    # -- drained reports --------------------------------------------------------------------

    def register_proxy(self, proxy: ProxyInfo, ttl: float) -> None:
        with self._changed:
            self._proxies[proxy.id] = (proxy, self._clock() + ttl)
            self._changed.notify_all()

    def unregister_proxy(self, proxy_id: str) -> None:
        with self._changed:
            self._proxies.pop(proxy_id, None)
            self._reports = {k: v for k, v in self._reports.items() if k[0] != proxy_id}
            self._changed.notify_all()

    def proxies(self) -> list[ProxyStatus]:
        with self._lock:
            now = self._clock()
            return [
                ProxyStatus(
                    info,
                    alive=expires > now,
                    drained={s: r for (p, s), r in self._reports.items() if p == proxy_id},
                )
                for proxy_id, (info, expires) in sorted(self._proxies.items())
            ]

    def report_drained(self, proxy_id: str, shard: str, term: int, drained: bool) -> None:
        with self._changed:
            self._reports[(proxy_id, shard)] = (term, drained)
            self._changed.notify_all()

    def wait_drained(self, shard: str, term: int, timeout: float) -> Drain:
        with self._changed:
            deadline = self._clock() + timeout
            seen: set[str] = set()  # every proxy alive at some point of the wait
            while True:
                now = self._clock()
                live = {p: expires for p, (_, expires) in self._proxies.items() if expires > now}
                seen |= set(live)
                # The expiry of each live proxy still owing a report: when one passes, that
                # proxy stops counting, so the wait must look again then even if nobody calls.
                owing = [
                    expires
                    for proxy, expires in live.items()
                    if self._reports.get((proxy, shard)) != (term, True)
                ]
                if not owing or now >= deadline:
                    missing = sorted(
                        p for p in seen if self._reports.get((p, shard)) != (term, True)
                    )
                    return Drain(drained=not owing, missing=tuple(missing))
                self._wait(self._changed, min(deadline, *owing) - now)

    def close(self) -> None:
        """Nothing to stop: the embedded store has no threads or connections."""

    # -- the file ---------------------------------------------------------------------------

    def _commit(
        self,
        topology: dict[str, Versioned[ShardTopology]],
        in_flight: dict[str, ReparentRecord],
        history: list[ReparentRecord],
    ) -> None:
        """Write the new state to the file first and only then adopt it: a failed write
        raises and leaves memory as it was, so memory never holds what the file lacks."""
        if self._path is not None:
            doc = {
                "format": FORMAT,
                "shards": {
                    name: {
                        "version": v.version,
                        "topology": v.value.to_dict(),
                        "in_flight": None if name not in in_flight else in_flight[name].to_dict(),
                    }
                    for name, v in topology.items()
                },
                "history": [r.to_dict() for r in history],
            }
            # Compact: the whole file is written again on each step, some of them while
            # clients are held, and 200 reports indented took 17 ms to encode here.
            _write_atomically(self._path, json.dumps(doc, separators=(",", ":")) + "\n")
        self._topology, self._in_flight, self._history = topology, in_flight, history

    def _load(self, path: Path) -> None:
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return
        except OSError as e:
            raise CorruptStoreError(f"{path}: cannot read the topology store: {e.strerror}")
        try:
            doc = json_mapping(json.loads(raw))
            fmt = json_get(doc, "format", int)
            if fmt != FORMAT:
                raise ValueError(f"format: {fmt} is not {FORMAT}; written by another Baton?")
            for name, raw_entry in json_get(doc, "shards", dict).items():
                try:
                    entry = json_mapping(raw_entry)
                    topo = ShardTopology.from_dict(json_get(entry, "topology", dict))
                    if topo.name != name:
                        raise ValueError(f"topology.name: {topo.name!r} under shard {name!r}")
                    version = json_get(entry, "version", int)
                    if version < 1:
                        raise ValueError(f"version: must be at least 1, got {version}")
                    self._topology[name] = Versioned(topo, version)
                    flight = json_get(entry, "in_flight", dict, type(None))
                    if flight is not None:
                        self._in_flight[name] = ReparentRecord.from_dict(flight)
                except ValueError as e:
                    raise ValueError(f"shards.{name}: {e}")
            for i, r in enumerate(json_get(doc, "history", list)):
                try:
                    self._history.append(ReparentRecord.from_dict(json_mapping(r)))
                except ValueError as e:
                    raise ValueError(f"history[{i}]: {e}")
        except ValueError as e:  # json and UTF-8 decoding errors are ValueErrors too
            raise CorruptStoreError(f"{path}: corrupt topology store: {e}")


def _write_atomically(path: Path, text: str) -> None:
    """Replace the file so that a crash at any point leaves either the old or the new one, and
    the rename itself is on disk before the caller acts on it."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
