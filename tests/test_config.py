"""The config loader names the key that is wrong, and `baton serve` exits non-zero on it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from reparent.config import ConfigError, Role, load

EXAMPLE = Path(__file__).resolve().parent.parent / "configs" / "example.toml"


def write(tmp_path: Path, text: str) -> Path:
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
