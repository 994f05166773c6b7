"""The etcd gateway client's reading of answers: a damaged answer (a number that is not one,
bad base64, a key that is not UTF-8, a list that is an object) is an EtcdError, which the store
turns into its own TopologyError, and never a ValueError or KeyError that escapes as a crash.
A tiny HTTP server on loopback plays the gateway, so the real request path is exercised."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

import pytest

from reparent.etcd import EtcdClient, EtcdError, KeyValue, b64

GOOD_KV = {"key": b64("k"), "value": b64("v"), "version": "1", "mod_revision": "5"}


@pytest.mark.parametrize(
    "kv",
    [
        {**GOOD_KV, "version": "one"},
        {**GOOD_KV, "mod_revision": [5]},
        {**GOOD_KV, "lease": True},
        {**GOOD_KV, "key": "not base64!"},
        {**GOOD_KV, "key": b64(b"\xff\xfe")},
        {**GOOD_KV, "value": 7},
        ["not", "an", "object"],
    ],
)
def test_a_damaged_key_value_is_an_etcd_error(kv: Any) -> None:
    with pytest.raises(EtcdError):
        KeyValue.from_json(kv)


def test_a_good_key_value_reads_whole() -> None:
    kv = KeyValue.from_json(GOOD_KV)
    assert (kv.key, kv.value, kv.version, kv.mod_revision, kv.lease) == ("k", b"v", 1, 5, 0)


class _Gateway(BaseHTTPRequestHandler):
    answer: dict[str, Any] = {}

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        body = json.dumps(self.answer).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def gateway() -> Iterator[tuple[EtcdClient, type[_Gateway]]]:
    handler = type("Gateway", (_Gateway,), {"answer": {}})
    server = HTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    client = EtcdClient([f"http://127.0.0.1:{server.server_address[1]}"], timeout=2.0)
    try:
        yield client, handler
    finally:
        client.close()
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(
    ("call", "answer"),
    [
        ("range", {"kvs": {"key": "x"}}),
        ("range", {"kvs": [{**GOOD_KV, "version": "x"}]}),
        ("range", {"header": {"revision": "soon"}}),
        ("txn", {"succeeded": True, "responses": "all of them"}),
        ("grant", {"TTL": "10"}),
        ("grant", {"ID": "lease-7"}),
        ("keepalive", {"result": {"TTL": None}}),
    ],
)
def test_a_damaged_answer_is_an_etcd_error(
    gateway: tuple[EtcdClient, type[_Gateway]], call: str, answer: dict[str, Any]
) -> None:
    client, handler = gateway
    handler.answer = answer
    requests = {
        "range": lambda: client.range("k", prefix=True),
        "txn": lambda: client.txn([], []),
        "grant": lambda: client.grant(10),
        "keepalive": lambda: client.keepalive(7),
    }
    with pytest.raises(EtcdError):
        requests[call]()


def test_a_good_answer_reads(gateway: tuple[EtcdClient, type[_Gateway]]) -> None:
    client, handler = gateway
    handler.answer = {"header": {"revision": "9"}, "kvs": [GOOD_KV]}
    kvs, revision = client.range("k")
    assert revision == 9 and [kv.key for kv in kvs] == ["k"]
