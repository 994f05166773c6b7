"""A small synchronous client of etcd v3's JSON gateway (`/v3/kv/*`, `/v3/lease/*`,
`/v3/watch`), on the standard library's `http.client`. Only `reparent/etcdstore.py` uses it.

Why this and not a gRPC client: the store interface is synchronous and called from worker
threads and the event loop, and the one Python gRPC client verified here (aetcd 1.0.0) is
asynchronous, unmaintained, pins protobuf, has no keepalive loop and no watch resume; Baton
would own both loops anyway. The gateway ships with etcd (3.4 in Debian), speaks JSON with
base64 keys and values, and passed the same checks (txn compare-and-set, prefix watches,
leases, compaction); a request costs about 1.5 ms on loopback. No new dependency.

Every call tries the endpoints in turn, starting with the one that answered last, so a
cluster with a member down keeps working; when none answers (or none has a quorum) it raises
`EtcdUnavailable`. Connections are kept per thread: `http.client` connections are not
thread-safe, and the store is called from many threads.
"""

from __future__ import annotations

import base64
import http.client
import json
import logging
import socket
import threading
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

MAX_RESPONSE = 64 * 1024 * 1024  # a bigger answer is damage, not data
MAX_WATCH_LINE = 16 * 1024 * 1024

# gRPC status codes the gateway passes on that mean "try again, maybe elsewhere".
_UNAVAILABLE_CODES = {4, 14}  # DEADLINE_EXCEEDED, UNAVAILABLE
_UNAVAILABLE_TEXTS = ("no leader", "timed out", "leader changed", "not capable", "stopped")


class EtcdError(Exception):
    """etcd answered, and refused the request (bad request, lease not found, ...)."""

    def __init__(self, message: str, code: int = 0) -> None:
        super().__init__(message)
        self.code = code


class EtcdUnavailable(Exception):
    """No endpoint answered, or none could serve the request (no quorum, no leader)."""


class WatchQuiet(EtcdUnavailable):
    """A watch heard nothing for its idle time: harmless on a quiet store, so the caller
    re-watches from where it got to at once (a hung member cannot freeze the stream)."""


class Compacted(Exception):
    """A watch asked for revisions that etcd has compacted away: re-read, then watch again."""

    def __init__(self, compact_revision: int) -> None:
        super().__init__(f"revisions before {compact_revision} are compacted")
        self.compact_revision = compact_revision


def b64(data: str | bytes) -> str:
    raw = data.encode() if isinstance(data, str) else data
    return base64.b64encode(raw).decode("ascii")


def unb64(text: Any) -> bytes:
    if not isinstance(text, str):
        raise EtcdError(f"expected base64 text from etcd, got {text!r}")
    try:
        return base64.b64decode(text, validate=True)
    except ValueError as e:
        raise EtcdError(f"bad base64 from etcd: {text[:80]!r} ({e})")


def number(value: Any, what: str) -> int:
    """An int64 field of the gateway's JSON (sent as a string, or a number): a damaged one is
    an EtcdError the store handles, never a ValueError that escapes as a crash."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise EtcdError(f"expected a number for {what} from etcd, got {value!r}")
    try:
        return int(value)
    except ValueError:
        raise EtcdError(f"expected a number for {what} from etcd, got {value[:80]!r}")


def items(value: Any, what: str) -> list[Any]:
    """A repeated field of the gateway's JSON: absent is empty, anything but a list is damage."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise EtcdError(f"expected a list for {what} from etcd, got {type(value).__name__}")
    return value


def prefix_end(prefix: str) -> str:
    """The range_end that makes a range (or a watch) cover every key under `prefix`."""
    raw = prefix.encode()
    return (raw[:-1] + bytes([raw[-1] + 1])).decode()


@dataclass(frozen=True)
class KeyValue:
    key: str
    value: bytes
    version: int  # 1 at creation, +1 per put; what the topology's compare-and-set names
    create_revision: int
    mod_revision: int
    lease: int

    @classmethod
    def from_json(cls, d: Any) -> KeyValue:
        if not isinstance(d, dict):
            raise EtcdError(f"expected a key-value object from etcd, got {d!r}")
        key = unb64(d.get("key", ""))
        try:
            name = key.decode()
        except UnicodeDecodeError:
            raise EtcdError(f"a key from etcd is not UTF-8: {key[:80]!r}")
        return cls(
            key=name,
            value=unb64(d.get("value", "")),
            version=number(d.get("version", 0), "version"),
            create_revision=number(d.get("create_revision", 0), "create_revision"),
            mod_revision=number(d.get("mod_revision", 0), "mod_revision"),
            lease=number(d.get("lease", 0), "lease"),
        )


@dataclass(frozen=True)
class WatchEvent:
    kind: str  # "PUT" or "DELETE"
    kv: KeyValue


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int

    @classmethod
    def parse(cls, url: str) -> Endpoint:
        parsed = urllib.parse.urlsplit(url if "://" in url else f"http://{url}")
        if parsed.scheme != "http":
            raise ValueError(f"{url}: only http:// endpoints are supported")
        if not parsed.hostname or parsed.port is None:
            raise ValueError(f"{url}: expected http://host:port")
        return cls(parsed.hostname, parsed.port)

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


class EtcdClient:
    def __init__(self, endpoints: list[str], timeout: float = 2.0) -> None:
        if not endpoints:
            raise ValueError("at least one etcd endpoint is needed")
        self.endpoints = [Endpoint.parse(e) for e in endpoints]
        self.timeout = timeout
        self._local = threading.local()
        self._preferred = 0  # the endpoint that answered last; others are tried after it
        self._lock = threading.Lock()

    # -- requests ------------------------------------------------------------------------------

    def call(self, path: str, body: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
        """One request; tries each endpoint once, the last good one first."""
        errors = []
        with self._lock:
            first = self._preferred
        n = len(self.endpoints)
        for i in range(n):
            index = (first + i) % n
            endpoint = self.endpoints[index]
            try:
                answer = self._request(endpoint, path, body, timeout or self.timeout)
            except EtcdUnavailable as e:
                errors.append(f"{endpoint}: {e}")
                continue
            with self._lock:
                self._preferred = index
            return answer
        raise EtcdUnavailable("; ".join(errors))

    def _request(
        self, endpoint: Endpoint, path: str, body: dict[str, Any], timeout: float
    ) -> dict[str, Any]:
        conns: dict[Endpoint, http.client.HTTPConnection] = self._local.__dict__.setdefault(
            "conns", {}
        )
        # A kept connection may have been closed by a member that restarted since: that
        # failure says nothing about the member now, so it gets one fresh connection.
        for fresh in (endpoint not in conns, True):
            conn = conns.get(endpoint)
            if conn is None:
                conn = conns[endpoint] = http.client.HTTPConnection(
                    endpoint.host, endpoint.port, timeout=timeout
                )
            conn.timeout = timeout
            if conn.sock is not None:
                conn.sock.settimeout(timeout)
            try:
                conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
                response = conn.getresponse()
                raw = response.read(MAX_RESPONSE + 1)
                status = response.status
                break
            except (OSError, http.client.HTTPException) as e:
                conn.close()
                del conns[endpoint]
                if fresh or isinstance(e, TimeoutError):
                    raise EtcdUnavailable(str(e) or type(e).__name__)
        if len(raw) > MAX_RESPONSE:
            conn.close()
            del conns[endpoint]
            raise EtcdUnavailable(f"answer longer than {MAX_RESPONSE} bytes")
        try:
            answer = json.loads(raw)
        except ValueError:
            raise EtcdUnavailable(f"not JSON (HTTP {status}): {raw[:200]!r}")
        if not isinstance(answer, dict):
            raise EtcdUnavailable(f"not a JSON object (HTTP {status})")
        if status != 200 or "error" in answer:
            message = str(answer.get("message") or answer.get("error") or f"HTTP {status}")
            code = answer.get("code", 0)
            code = code if isinstance(code, int) else 0
            if code in _UNAVAILABLE_CODES or any(t in message for t in _UNAVAILABLE_TEXTS):
                raise EtcdUnavailable(message)
            raise EtcdError(message, code)
        return answer

    # -- kv ------------------------------------------------------------------------------------

    def range(self, key: str, *, prefix: bool = False) -> tuple[list[KeyValue], int]:
        """The key (or every key under the prefix), and the revision they were read at."""
        body = {"key": b64(key)}
        if prefix:
            body["range_end"] = b64(prefix_end(key))
        answer = self.call("/v3/kv/range", body)
        kvs = items(answer.get("kvs"), "kvs")
        return [KeyValue.from_json(kv) for kv in kvs], _revision(answer)

    def txn(
        self,
        compare: list[dict[str, Any]],
        success: list[dict[str, Any]],
        failure: list[dict[str, Any]] | None = None,
    ) -> tuple[bool, list[dict[str, Any]], int]:
        """Whether every compare held, the responses of the branch taken, and the revision."""
        answer = self.call(
            "/v3/kv/txn", {"compare": compare, "success": success, "failure": failure or []}
        )
        responses = items(answer.get("responses"), "responses")
        return bool(answer.get("succeeded", False)), responses, _revision(answer)

    def put(self, key: str, value: bytes | str, lease: int = 0) -> int:
        body: dict[str, Any] = {"key": b64(key), "value": b64(value)}
        if lease:
            body["lease"] = str(lease)
        return _revision(self.call("/v3/kv/put", body))

    def delete(self, key: str, *, prefix: bool = False) -> int:
        body = {"key": b64(key)}
        if prefix:
            body["range_end"] = b64(prefix_end(key))
        return _revision(self.call("/v3/kv/deleterange", body))

    def compact(self, revision: int) -> None:
        self.call("/v3/kv/compaction", {"revision": str(revision), "physical": True})

    # -- leases --------------------------------------------------------------------------------

    def grant(self, ttl: int) -> int:
        answer = self.call("/v3/lease/grant", {"TTL": str(ttl)})
        if "ID" not in answer:
            raise EtcdError(f"a lease grant without an ID: {str(answer)[:200]}")
        return number(answer["ID"], "lease ID")

    def keepalive(self, lease: int) -> int:
        """The lease's TTL after this keepalive; 0 when it had already lapsed."""
        answer = self.call("/v3/lease/keepalive", {"ID": str(lease)})
        result = answer.get("result", {})
        return number(result.get("TTL", 0), "TTL") if isinstance(result, dict) else 0

    def revoke(self, lease: int) -> None:
        try:
            self.call("/v3/lease/revoke", {"ID": str(lease)})
        except EtcdError:
            pass  # already gone: that is what revoking wanted

    # -- watch ---------------------------------------------------------------------------------

    def watch(self, prefix: str, start_revision: int, idle: float) -> Watch:
        """A stream of every change under `prefix` from `start_revision` on. `idle` bounds
        each wait for the next message: the caller re-watches from where it got to when a
        connection goes quiet, so a member that hangs cannot freeze the stream for ever."""
        errors = []
        with self._lock:
            first = self._preferred
        n = len(self.endpoints)
        for i in range(n):
            endpoint = self.endpoints[(first + i) % n]
            try:
                return Watch(endpoint, prefix, start_revision, idle)
            except (OSError, http.client.HTTPException) as e:
                errors.append(f"{endpoint}: {e}")
        raise EtcdUnavailable("; ".join(errors))

    def close(self) -> None:
        for conn in self._local.__dict__.get("conns", {}).values():
            conn.close()


class Watch:
    """One watch stream on one connection. Iterate for lists of events; raises Compacted,
    EtcdUnavailable (the connection ended or went quiet), or stops when closed."""

    def __init__(self, endpoint: Endpoint, prefix: str, start_revision: int, idle: float) -> None:
        self.endpoint = endpoint
        self._conn = http.client.HTTPConnection(endpoint.host, endpoint.port, timeout=idle)
        body = {
            "create_request": {
                "key": b64(prefix),
                "range_end": b64(prefix_end(prefix)),
                "start_revision": str(start_revision),
            }
        }
        self._conn.request("POST", "/v3/watch", json.dumps(body))
        self._response = self._conn.getresponse()
        if self._response.status != 200:
            self._conn.close()
            raise http.client.HTTPException(f"watch refused: HTTP {self._response.status}")
        self.closed = False

    def close(self) -> None:
        self.closed = True
        sock = self._conn.sock
        if sock is not None:
            # Wakes a thread blocked reading the stream.
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._conn.close()

    def __iter__(self) -> Iterator[tuple[list[WatchEvent], int]]:
        """(events, revision) per message; the revision is the store's as of that message."""
        while True:
            try:
                line = self._response.readline(MAX_WATCH_LINE)
            except TimeoutError:
                if self.closed:
                    return
                raise WatchQuiet(f"watch on {self.endpoint}: quiet")
            except (OSError, http.client.HTTPException, ValueError, AttributeError) as e:
                # AttributeError: http.client's own, reading a response closed under it.
                if self.closed:
                    return
                raise EtcdUnavailable(f"watch on {self.endpoint}: {e or type(e).__name__}")
            if not line:
                if self.closed:
                    return
                raise EtcdUnavailable(f"watch on {self.endpoint} ended")
            if not line.endswith(b"\n"):
                if self.closed:
                    return
                raise EtcdUnavailable(
                    f"watch on {self.endpoint}: message too long or cut ({len(line)} bytes: "
                    f"{line[:80]!r})"
                )
            try:
                message = json.loads(line)
            except ValueError:
                raise EtcdUnavailable(f"watch on {self.endpoint}: not JSON: {line[:200]!r}")
            result = message.get("result") if isinstance(message, dict) else None
            if not isinstance(result, dict):
                error = message.get("error") if isinstance(message, dict) else message
                raise EtcdUnavailable(f"watch on {self.endpoint}: {error}")
            compacted = number(result.get("compact_revision", 0) or 0, "compact_revision")
            if compacted:
                raise Compacted(compacted)
            if result.get("canceled"):
                raise EtcdUnavailable(f"watch on {self.endpoint} canceled: {result}")
            events = [_event(e) for e in items(result.get("events"), "events")]
            yield events, _revision(result)


def _event(e: Any) -> WatchEvent:
    if not isinstance(e, dict):
        raise EtcdError(f"expected a watch event object from etcd, got {e!r}")
    return WatchEvent(str(e.get("type", "PUT")), KeyValue.from_json(e.get("kv", {})))


def _revision(answer: dict[str, Any]) -> int:
    header = answer.get("header", {})
    return number(header.get("revision", 0), "revision") if isinstance(header, dict) else 0
