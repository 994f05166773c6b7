"""The config loader names the key that is wrong, and `baton serve` exits non-zero on it."""

from __future__ import annotations

import os
import re
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from reparent.config import ConfigError, Role, check_files, load
from reparent.sandbox import Sandbox

EXAMPLE = Path(__file__).resolve().parent.parent / "configs" / "example.toml"


def write(tmp_path: Path, text: str) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    p = tmp_path / "baton.toml"
    p.write_text(text)
    return p


def test_example_config_loads() -> None:
    cfg = load(EXAMPLE)
    assert cfg.shard.name == "main"
    assert cfg.shard.primary.name == "db1"
    assert [s.role for s in cfg.shard.servers] == [Role.PRIMARY, Role.REPLICA, Role.REPLICA]
    assert cfg.proxy.control_socket == str(EXAMPLE.parent / "baton.sock")
    assert cfg.users == ()  # the servers' own accounts
    assert cfg.proxy.max_packet_size is None  # the primary's max_allowed_packet


def test_users_list_is_optional_and_typed(tmp_path: Path) -> None:
    text = EXAMPLE.read_text() + '\n[[users]]\nname = "app"\npassword = "app-pass"\n'
    assert load(write(tmp_path, text)).users[0].user == "app"
    with pytest.raises(ConfigError, match=r"^users: expected"):
        load(write(tmp_path, 'users = "app"\n' + EXAMPLE.read_text()))


def test_shared_backend_account_is_refused_by_name(tmp_path: Path) -> None:
    text = EXAMPLE.read_text().replace("proxy_protocol = false", 'user = "baton"', 1)
    with pytest.raises(ConfigError, match=r"^backend.user: Baton has no shared backend account"):
        load(write(tmp_path, text))


@pytest.mark.parametrize(
    ("edit", "key"),
    [
        (("listen_port = 23400", 'listen_port = "x"'), "proxy.listen_port"),
        (("listen_port = 23400", "listen_port = 70000"), "proxy.listen_port"),
        (("metrics_port = 23401", "metrics_port = true"), "proxy.metrics_port"),
        (
            ("allow_load_data_local = false", "allow_load_data_local = 1"),
            "proxy.allow_load_data_local",
        ),
        (('shard = "main"', 'shard = "nope"'), "proxy.shard"),
        (("listen_host", "listen_hots"), "proxy.listen_hots"),
        (('role = "primary"', 'role = "leader"'), "shards[0].servers[0].role"),
        (
            (
                'role = "replica"\n\n[[shards.servers]]\nname = "db3"',
                'role = "primary"\n\n[[shards.servers]]\nname = "db3"',
            ),
            "shards[0].servers",
        ),
        (("connect_timeout = 10.0", "connect_timeout = 0"), "proxy.connect_timeout"),
        (("max_connections = 4096", "max_connections = -1"), "proxy.max_connections"),
        (("max_connect_errors = 100", "max_connect_errors = -1"), "proxy.max_connect_errors"),
        (("workers = 0", "workers = 65"), "proxy.workers"),
        (("workers = 0", 'workers = "many"'), "proxy.workers"),
        (("workers = 0", "workers = -1"), "proxy.workers"),
        (("reuse_port = false", "reuse_port = 1"), "proxy.reuse_port"),
        (("proxy_protocol = false", "proxy_protocol = 1"), "backend.proxy_protocol"),
        (("port = 23302", "port = 0"), "shards[0].servers[1].port"),
        (('store = "file"', 'store = "zookeeper"'), "topology.store"),
        (('store = "file"', 'store = "etcd"'), "topology.endpoints"),
        (
            ('store = "file"', 'store = "etcd"\nendpoints = ["127.0.0.1:2379"]'),
            "topology.endpoints",
        ),
        (
            ('store = "file"', 'store = "etcd"\nendpoints = ["http://127.0.0.1:99999"]'),
            "topology.endpoints",
        ),
        (('store = "file"', 'prefix = "baton"'), "topology.prefix"),
        (
            ('store = "file"', 'store = "etcd"\nendpoints = ["http://127.0.0.1:2379"]'),
            None,
        ),
    ],
)
def test_bad_key_is_named(tmp_path: Path, edit: tuple[str, str], key: str | None) -> None:
    text = EXAMPLE.read_text()
    assert edit[0] in text
    if key is None:  # the edit is fine
        assert load(write(tmp_path, text.replace(edit[0], edit[1], 1))).topology.endpoints
        return
    with pytest.raises(ConfigError) as exc:
        load(write(tmp_path, text.replace(edit[0], edit[1], 1)))
    assert str(exc.value).startswith(key), str(exc.value)


def test_missing_sections(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^shards:"):
        load(write(tmp_path, '[admin]\nuser="a"\npassword="b"\n'))


def test_not_toml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        load(write(tmp_path, "[proxy\n"))
    with pytest.raises(ConfigError, match="cannot read"):
        load(tmp_path / "absent.toml")


def test_serve_exits_nonzero_naming_the_key(tmp_path: Path) -> None:
    bad = write(tmp_path, EXAMPLE.read_text().replace("listen_port = 23400", "listen_port = -1"))
    proc = subprocess.run(
        [sys.executable, "-m", "proxy.cli", "serve", "--config", str(bad)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2
    assert "proxy.listen_port" in proc.stderr


def test_workers_auto_is_the_cores(tmp_path: Path) -> None:
    path = tmp_path / "baton.toml"
    path.write_text(EXAMPLE.read_text().replace("workers = 0", 'workers = "auto"'))
    assert load(str(path)).proxy.workers == len(os.sched_getaffinity(0))


def test_durability_and_replication_address(tmp_path: Path) -> None:
    from reparent.config import Durability

    cfg = load(EXAMPLE)
    assert cfg.durability is Durability.ASYNC
    db1 = cfg.shard.servers[0]
    assert (db1.replication_host, db1.replication_port) == (db1.host, db1.port)
    text = EXAMPLE.read_text().replace('durability = "async"', 'durability = "semi_sync"', 1)
    text = text.replace("port = 23301", 'port = 23301\nreplication_host = "10.0.0.1"', 1)
    text = text.replace("port = 23302", "port = 23302\nreplication_port = 29999", 1)
    cfg = load(write(tmp_path, text))
    assert cfg.durability is Durability.SEMI_SYNC
    assert cfg.replication.user == "repl"
    db1, db2, _ = cfg.shard.servers
    assert (db1.replication_host, db1.replication_port) == ("10.0.0.1", 23301)
    assert (db2.replication_host, db2.replication_port) == ("127.0.0.1", 29999)
    # durability alone: the replication account is the admin's
    start, end = text.index("[replication]"), text.index("[controller]")
    alone = text[:start] + '[replication]\ndurability = "async"\n\n' + text[end:]
    cfg = load(write(tmp_path, alone))
    assert cfg.replication == cfg.admin and cfg.durability is Durability.ASYNC


@pytest.mark.parametrize(
    ("edit", "key"),
    [
        ('durability = "quorum"', "replication.durability"),
        ("durability = 1", "replication.durability"),
        ('durabilty = "async"', "replication.durabilty"),
    ],
)
def test_bad_durability_is_named(tmp_path: Path, edit: str, key: str) -> None:
    text = EXAMPLE.read_text().replace('durability = "async"', edit, 1)
    with pytest.raises(ConfigError) as exc:
        load(write(tmp_path, text))
    assert str(exc.value).startswith(key), str(exc.value)


@pytest.mark.parametrize(
    ("edit", "key"),
    [
        ("replication_port = 0", "shards[0].servers[1].replication_port"),
        ('replication_port = "x"', "shards[0].servers[1].replication_port"),
        ("replication_host = 5", "shards[0].servers[1].replication_host"),
    ],
)
def test_bad_replication_address_is_named(tmp_path: Path, edit: str, key: str) -> None:
    text = EXAMPLE.read_text().replace("port = 23302", f"port = 23302\n{edit}", 1)
    with pytest.raises(ConfigError) as exc:
        load(write(tmp_path, text))
    assert str(exc.value).startswith(key), str(exc.value)


def test_a_fleet_holds_long_enough_for_another_baton_to_finish_a_switch(tmp_path: Path) -> None:
    """With etcd, buffer.max_failover must cover grace + lock_ttl + the resume allowance."""
    text = EXAMPLE.read_text().replace(
        'store = "file"', 'store = "etcd"\nendpoints = ["http://127.0.0.1:2379"]'
    )
    assert load(write(tmp_path, text)).buffer.max_failover == 20.0  # 5 + 10 + 5
    with pytest.raises(ConfigError, match="^buffer.max_failover: 19 s is shorter"):
        load(write(tmp_path, text.replace("max_failover = 20.0", "max_failover = 19.0")))


@pytest.mark.parametrize(
    ("edit", "key"),
    [
        (("size = 1000", "size = 0"), "buffer.size"),
        (("window = 10.0", "window = 30.0"), "buffer.window"),
        (("drain_concurrency = 16", "drain_concurrency = 0"), "buffer.drain_concurrency"),
    ],
)
def test_bad_buffer_bound_is_named_at_load(tmp_path: Path, edit: tuple[str, str], key: str) -> None:
    """The buffer's own bounds are checked by the one type the loader, the buffer and its shell
    share, so a bound the buffer would refuse fails the load, not the start of the proxy."""
    text = EXAMPLE.read_text()
    assert edit[0] in text
    with pytest.raises(ConfigError) as exc:
        load(write(tmp_path, text.replace(edit[0], edit[1], 1)))
    assert str(exc.value).startswith(key), str(exc.value)


# -- operator input that must end in a ConfigError naming what is wrong, never a traceback ----

SECRET = "s3cret-Value"
# The example has no [[users]] (the servers' own accounts); these tests want a fixed list too.
WITH_USERS = EXAMPLE.read_text() + '\n[[users]]\nname = "ops"\npassword = "ops-pass"\n'


def edited(tmp_path: Path, old: str, new: str, count: int = 1) -> Path:
    text = WITH_USERS
    assert text.count(old) >= count, old
    return write(tmp_path, text.replace(old, new, count))


@pytest.mark.parametrize(
    ("old", "new", "key"),
    [
        ("backend_connect_timeout = 2.0", "backend_connect_timeout = nan", "proxy.backend_"),
        ("backend_connect_timeout = 2.0", "backend_connect_timeout = inf", "proxy.backend_"),
        ("grace = 5.0", "grace = nan", "controller.grace"),
        ("lock_ttl = 10.0", "lock_ttl = +inf", "controller.lock_ttl"),
        ("interval = 0.5", "interval = nan", "detector.interval"),
        ("cooldown = 30.0", "cooldown = inf", "detector.cooldown"),
        ("min_between = 0.0", "min_between = -1.0", "buffer.min_between"),
        ("min_between = 0.0", "min_between = nan", "buffer.min_between"),
        ("probe_timeout = 0.4", "probe_timeout = 1e12", "detector.probe_timeout"),
        ("grace = 5.0", "grace = 86401", "controller.grace"),
        ('listen_host = "127.0.0.1"', 'listen_host = ""', "proxy.listen_host"),
        ('control_socket = "baton.sock"', 'control_socket = ""', "proxy.control_socket"),
        ('store = "baton-state.json"', 'store = ""', "controller.store"),
        ('user = "baton_admin"', 'user = ""', "admin.user"),
        ('name = "ops"', 'name = ""', "users[0].name"),
        ('name = "main"', 'name = ""', "shards[0].name"),
        ('host = "127.0.0.1"\nport = 23302', 'host = ""\nport = 23302', "shards[0].servers[1]"),
        ('control_socket = "baton.sock"', r'control_socket = "b\u0000.sock"', "proxy.control_"),
        ('store = "baton-state.json"', r'store = "state\n.json"', "controller.store"),
        ('host = "127.0.0.1"\nport = 23302', r'host = "\u007f"' + "\nport = 23302", "shards[0]"),
        # getaddrinfo raised UnicodeError on these at start
        ('listen_host = "127.0.0.1"', 'listen_host = "x..y"', "proxy.listen_host"),
        ('metrics_host = "127.0.0.1"', f'metrics_host = "{"m" * 64}"', "proxy.metrics_host"),
        ('host = "127.0.0.1"\nport = 23302', f'host = "{"h" * 64}.db"\nport = 23302', "shards[0]"),
        ("port = 23302", 'port = 23302\nreplication_host = ".r"', "shards[0].servers[1].repl"),
        ("causal_timeout = 1.0", "causal_timeout = nan", "routing.causal_timeout"),
        ("max_replica_lag = 10.0", "max_replica_lag = 0", "routing.max_replica_lag"),
        ('mode = "primary"', 'mode = "both"', "routing.mode"),
        ('causal_reads = "local"', 'causal_reads = "strong"', "routing.causal_reads"),
        ("read_port = 0", "read_port = 70000", "routing.read_port"),
        ("read_port = 0", "read_port = 23302", "routing.read_port"),  # a server's
        ("read_port = 0", "read_port = 23401", "routing.read_port"),  # the metrics port
    ],
)
def test_bad_value_is_named(tmp_path: Path, old: str, new: str, key: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load(edited(tmp_path, old, new))
    assert str(exc.value).startswith(key), str(exc.value)


def second_shard(port: int, host: str = "127.0.0.1") -> str:
    return (
        f'\n[[shards]]\nname = "other"\n\n[[shards.servers]]\nname = "o1"\n'
        f'host = "{host}"\nport = {port}\nrole = "primary"\n'
    )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        # within a shard, and with the host spelt in capitals
        (("port = 23303", "port = 23302"), "shards[0].servers[2]: 127.0.0.1:23302 is also the"),
        (
            ('host = "127.0.0.1"\nport = 23303', 'host = "LOCALHOST"\nport = 23303'),
            None,  # localhost:23303 is no duplicate of anything
        ),
        # across shards
        (("", second_shard(23301)), "shards[1].servers[0]: 127.0.0.1:23301 is also the address"),
        (("", second_shard(23304)), None),
        # Baton's own listeners
        (("listen_port = 23400", "listen_port = 23302"), "proxy.listen_port: 127.0.0.1:23302"),
        (("metrics_port = 23401", "metrics_port = 23400"), "proxy.metrics_port: 127.0.0.1:23400"),
        (("metrics_port = 23401", "metrics_port = 23303"), "proxy.metrics_port: 127.0.0.1:23303"),
        # names
        (("", second_shard(23304).replace('"other"', '"main"')), "shards[1].name: shard 'main'"),
        (("", '\n[[users]]\nname = "ops"\npassword = "x"\n'), "users[1].name: user 'ops' is"),
    ],
)
def test_duplicates(tmp_path: Path, change: tuple[str, str], message: str | None) -> None:
    text = WITH_USERS
    text = text + change[1] if change[0] == "" else text.replace(change[0], change[1], 1)
    if message is None:
        load(write(tmp_path, text))
        return
    with pytest.raises(ConfigError) as exc:
        load(write(tmp_path, text))
    assert str(exc.value).startswith(message), str(exc.value)


@pytest.mark.parametrize(
    "value",
    ["12345678901", f'["{SECRET}"]', f'{{ x = "{SECRET}" }}', "true", "3.25", "2024-01-02"],
)
@pytest.mark.parametrize(
    ("old", "key"),
    [
        ('password = "admin-pass"', "admin.password"),
        ('password = "repl-pass"', "replication.password"),
        ('password = "ops-pass"', "users[0].password"),
    ],
)
def test_non_string_password_is_not_echoed(tmp_path: Path, old: str, key: str, value: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load(edited(tmp_path, old, f"password = {value}"))
    message = str(exc.value)
    assert message.startswith(key), message
    for piece in (SECRET, "12345678901", "3.25", "2024", "True", "true"):
        assert piece not in message, message


def test_empty_password_is_allowed(tmp_path: Path) -> None:
    """MariaDB accounts may have no password; Baton refuses no account for that."""
    assert load(edited(tmp_path, 'password = "ops-pass"', 'password = ""')).users[0].password == ""


def test_every_key_with_every_type(tmp_path: Path) -> None:
    """Any TOML value at any key of the example ends in a Config or a ConfigError, and a Config
    is one the proxy's own checks accept too (the buffer's BufferConfig)."""
    import copy
    import datetime
    import tomllib

    from proxy.holder import Holder
    from reparent.config import parse

    base = tomllib.loads(WITH_USERS)
    values: list[object] = [0, -1, 2**70, 2.5, -0.5, float("nan"), float("inf"), -float("inf")]
    values += [True, "", "x", [], [1], {}, {"a": 1}, datetime.date(2020, 1, 2)]

    def paths(node: object, prefix: tuple[object, ...] = ()) -> Iterator[tuple[object, ...]]:
        items = node.items() if isinstance(node, dict) else enumerate(node)  # type: ignore[attr-defined]
        for key, child in items:
            yield (*prefix, key)
            if isinstance(child, dict | list):
                yield from paths(child, (*prefix, key))

    tried = 0
    for path in paths(base):
        for value in values:
            data = copy.deepcopy(base)
            parent: Any = data
            for key in path[:-1]:
                parent = parent[key]
            parent[path[-1]] = value
            tried += 1
            try:
                cfg = parse(data)
            except ConfigError:
                continue
            Holder(cfg.buffer)
    assert tried >= 1000  # the loop ran over every key (64 in the example today)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"\xff\xfe" + EXAMPLE.read_bytes(), "not UTF-8 text: byte 0xff on line 1"),
        (EXAMPLE.read_bytes() + b"\n# caf\xe9\n", "not UTF-8 text: byte 0xe9 on line"),
        (EXAMPLE.read_bytes() + b'\nx = "\x00"\n', "not valid TOML"),
        (b"\x00" * 100, "not valid TOML"),
        (b"\x7fELF\x02\x01\x01" + bytes(range(256)), "not UTF-8 text"),
        (b"# padding\n" * 120_000, "larger than 1048576 bytes"),
    ],
)
def test_binary_or_huge_file(tmp_path: Path, content: bytes, message: str) -> None:
    p = tmp_path / "baton.toml"
    p.write_bytes(content)
    with pytest.raises(ConfigError, match=re.escape(message)):
        load(p)


def test_not_a_regular_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a regular file"):
        load(tmp_path)
    fifo = tmp_path / "fifo.toml"
    os.mkfifo(fifo)
    with pytest.raises(ConfigError, match="not a regular file"):
        load(fifo)  # would block in open() for a writer that never comes
    with pytest.raises(ConfigError, match="not a regular file"):
        load("/dev/zero")  # would be read for ever


def test_socket_path_too_long(tmp_path: Path) -> None:
    long = "s" * 110 + ".sock"
    with pytest.raises(ConfigError, match=r"^proxy.control_socket: .* longer than the 107 bytes"):
        load(edited(tmp_path, 'control_socket = "baton.sock"', f'control_socket = "{long}"'))


def test_check_files(tmp_path: Path) -> None:
    """`baton serve`'s look at the file system before it binds anything."""
    cfg = load(write(tmp_path, EXAMPLE.read_text()))
    check_files(cfg)  # nothing there yet: fine
    sock = Path(cfg.proxy.control_socket)
    sock.write_text("precious")
    with pytest.raises(ConfigError, match="exists and is not a socket"):
        check_files(cfg)
    assert sock.read_text() == "precious"
    sock.unlink()
    with socket.socket(socket.AF_UNIX) as live:
        live.bind(str(sock))
        check_files(cfg)  # bound, not listening: a stale socket, which start() replaces
        live.listen()
        with pytest.raises(ConfigError, match="served by a running process"):
            check_files(cfg)
    for old, new, key, folder in [
        ('control_socket = "baton.sock"', 'control_socket = "no/dir/b.sock"', "proxy.", "no/dir"),
        ('store = "baton-state.json"', 'store = "gone/state.json"', "controller.store", "gone"),
    ]:
        sub = tmp_path / key
        cfg = load(edited(sub, old, new))
        with pytest.raises(ConfigError) as exc:
            check_files(cfg)
        assert str(exc.value).startswith(key), str(exc.value)
        assert f"folder {sub / folder} does not exist" in str(exc.value)
    (tmp_path / "dirstore").mkdir()
    cfg = load(edited(tmp_path, 'store = "baton-state.json"', 'store = "dirstore"'))
    with pytest.raises(ConfigError, match="^controller.store: .* is not a regular file"):
        check_files(cfg)


def serve(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy.cli", "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_serve_refuses_bad_operator_input(tmp_path: Path) -> None:
    """Exit 2 with one line that says what is wrong; no traceback, no password. Each of these
    ended in a traceback or a bare errno before (or, for the socket, deleted the file)."""
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"\xff" + EXAMPLE.read_bytes())
    (tmp_path / "pre").write_text("keep me")
    cases: list[tuple[Path, str]] = [
        (binary, "not UTF-8 text"),
        (tmp_path, "not a regular file"),
        (
            edited(tmp_path / "a", 'control_socket = "baton.sock"', 'control_socket = "x/b.sock"'),
            f"proxy.control_socket: folder {tmp_path / 'a' / 'x'} does not exist",
        ),
        (
            edited(tmp_path / "b", 'password = "admin-pass"', f'password = ["{SECRET}"]'),
            "admin.password: expected a quoted string",
        ),
        (
            edited(tmp_path / "c", 'control_socket = "baton.sock"', 'control_socket = "../pre"'),
            "exists and is not a socket",
        ),
        (edited(tmp_path / "d", "min_between = 0.0", "min_between = -2"), "buffer.min_between"),
        (edited(tmp_path / "e", "grace = 5.0", "grace = nan"), "controller.grace"),
    ]
    for config, message in cases:
        proc = serve(config)
        assert proc.returncode == 2, (config, proc.stderr)
        assert message in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr and SECRET not in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert (tmp_path / "pre").read_text() == "keep me"


def test_sandbox_config_is_private(sandbox: Sandbox) -> None:
    """baton.toml holds the admin password: 0600 (written so from birth, see _atomic_write)."""
    assert stat.S_IMODE(sandbox.config_path.stat().st_mode) == 0o600


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with a CA, a certificate and key it signed, another key, and a non-PEM file."""
    from reparent import certs

    folder = tmp_path_factory.mktemp("tls-files")
    ca = certs.make_ca(folder)
    certs.make_cert(folder, "baton", ca)
    certs.make_cert(folder, "other", ca)
    (folder / "junk.pem").write_text("not a certificate\n")
    return folder


GOOD_TLS = '[tls]\ncert = "baton.pem"\nkey = "baton.key"\n'


@pytest.mark.parametrize(
    ("tls", "backend", "key"),
    [
        ("tls = 1\n", "", "tls: expected a table"),
        ('[tls]\ncert = "baton.pem"\n', "", "tls.key: missing (tls.cert and tls.key go"),
        ('[tls]\nkey = "baton.key"\n', "", "tls.cert: missing"),
        ("[tls]\nrequire = true\n", "", "tls.require: set without tls.cert and tls.key"),
        ('[tls]\nmin_version = "TLSv1.3"\n', "", "tls.min_version: set without"),
        (GOOD_TLS + 'min_version = "TLSv1.1"\n', "", "tls.min_version: expected 'TLSv1.2' or"),
        (GOOD_TLS + 'min_version = "1.2"\n', "", "tls.min_version: expected"),
        (GOOD_TLS + 'ciphers = "NO-SUCH-CIPHER"\n', "", "tls.ciphers: OpenSSL takes no cipher"),
        (GOOD_TLS + 'ciphers = ""\n', "", "tls.ciphers: must not be empty"),
        (GOOD_TLS + "require = 1\n", "", "tls.require: expected bool"),
        (GOOD_TLS + 'verify = "yes"\n', "", "tls.verify: unknown key"),
        ('[tls]\ncert = 5\nkey = "baton.key"\n', "", "tls.cert: expected str"),
        ('[tls]\ncert = "missing.pem"\nkey = "baton.key"\n', "", "tls.cert/tls.key: "),
        ('[tls]\ncert = "junk.pem"\nkey = "baton.key"\n', "", "tls.cert/tls.key: cannot use"),
        ('[tls]\ncert = "baton.pem"\nkey = "other.key"\n', "", "tls.cert/tls.key: cannot use"),
        (GOOD_TLS + 'ca = "junk.pem"\n', "", "tls.ca: cannot use"),
        (GOOD_TLS + 'ca = "nope.pem"\n', "", "tls.ca: "),
        ("", 'tls = "on"', "backend.tls: expected 'off' or 'preferred' or 'required' or"),
        ("", 'tls = "verify_ca"', "backend.ca: backend.tls = 'verify_ca' needs the servers' CA"),
        ("", 'tls = "verify_identity"', "backend.ca: backend.tls = 'verify_identity' needs"),
        ("", 'tls = "required"\nca = "ca.pem"', "backend.ca: used only by backend.tls = 'veri"),
        ("", 'ca = "ca.pem"', "backend.ca: used only by"),
        ("", 'tls = "verify_ca"\nca = "nope.pem"', "backend.ca: "),
        ("", 'tls = "verify_ca"\nca = "junk.pem"', "backend.ca: cannot use"),
        ("", 'tls = "verify_ca"\nca = ""', "backend.ca: must not be empty"),
        ("", "tls = true", "backend.tls: expected str"),
    ],
)
def test_bad_tls_is_named(tls_files: Path, tls: str, backend: str, key: str) -> None:
    text = WITH_USERS.replace('tls = "off"\n', backend + "\n" if backend else 'tls = "off"\n')
    with pytest.raises(ConfigError) as exc:
        load(write(tls_files, text + "\n" + tls if tls.startswith("[") else tls + text))
    assert str(exc.value).startswith(key), str(exc.value)


def test_tls_files_are_taken_from_the_configs_folder(tls_files: Path) -> None:
    import ssl

    from reparent.config import BackendTls, TlsVersion
    from reparent.tls import backend_context, listener_context

    text = (
        WITH_USERS.replace('tls = "off"\n', 'tls = "verify_identity"\nca = "ca.pem"\n')
        + "\n"
        + GOOD_TLS
        + 'min_version = "TLSv1.3"\nrequire = true\n'
    )
    cfg = load(write(tls_files, text))
    assert cfg.tls.cert == str(tls_files / "baton.pem")
    assert cfg.tls.key == str(tls_files / "baton.key")
    assert cfg.tls.require and cfg.tls.min_version is TlsVersion.TLS1_3
    assert listener_context(cfg.tls).minimum_version is ssl.TLSVersion.TLSv1_3
    assert cfg.backend.tls is BackendTls.VERIFY_IDENTITY
    assert cfg.backend.ca == str(tls_files / "ca.pem")
    ctx = backend_context(cfg.backend)
    assert ctx is not None and ctx.check_hostname and ctx.verify_mode is ssl.CERT_REQUIRED
    assert load(EXAMPLE).tls.enabled is False  # off unless configured
    assert backend_context(load(EXAMPLE).backend) is None
