"""The failure detector's pure core, the [detector] config, and the router's fence by term."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from pathlib import Path

import pytest

from proxy.router import Router
from reparent import survey
from reparent.config import ConfigError, DetectorConfig, ServerConfig, load
from reparent.controller import Controller
from reparent.detector import (
    CONFIRM,
    Detector,
    MakeWritable,
    Quarantine,
    Reason,
    Rejoin,
    Release,
    Report,
    RestartReplication,
    RunERS,
    ServerView,
    SetReadOnly,
    ShardView,
)
from reparent.establish import GtidEstablishment
from reparent.filestore import FileStore
from reparent.survey import MismatchKind
from reparent.topology import Established, ShardTopology
from reparent.watch import Watch

EXAMPLE = Path(__file__).resolve().parent.parent / "configs" / "example.toml"
SETTINGS = DetectorConfig(interval=0.5, failures=3, cooldown=30.0)
STATE = "0-1-10"


def primary(**kw: object) -> ServerView:
    base = ServerView("db1", True, read_only=False, server_id=1, binlog_state=STATE)
    return replace(base, **kw)  # type: ignore[arg-type]


def replica(name: str, **kw: object) -> ServerView:
    base = ServerView(
        name,
        True,
        read_only=True,
        server_id=int(name[2:]),
        binlog_state=STATE,
        source="db1",
        io_running="Yes",
        sql_running="Yes",
    )
    return replace(base, **kw)  # type: ignore[arg-type]


DOWN = ServerView("db1", False, error="connect refused")
CONNECTING = {"io_running": "Connecting", "io_errno": 2003}


def view(*servers: ServerView, **kw: object) -> ShardView:
    names = {s.name for s in servers}
    full = list(servers)
    for default in (primary(), replica("db2"), replica("db3")):
        if default.name not in names:
            full.append(default)
    full.sort(key=lambda s: s.name)
    return ShardView("main", kw.pop("primary", "db1"), kw.pop("term", 1), tuple(full), **kw)  # type: ignore[arg-type]


def rounds(d: Detector, v: ShardView, n: int, start: float = 0.0, step: float = 0.5) -> list:
    out = []
    for i in range(n):
        out += d.observe(v, start + i * step)
    return out


def work(actions: list) -> list:
    return [a for a in actions if not isinstance(a, Report)]


def test_healthy_shard_needs_nothing() -> None:
    d = Detector(SETTINGS)
    assert rounds(d, view(), 10) == []


def test_dead_primary_runs_ers_after_failures_rounds() -> None:
    d = Detector(SETTINGS)
    dead = view(DOWN, replica("db2", **CONNECTING), replica("db3", io_running="No"))
    assert d.observe(dead, 0.0) == [] and d.observe(dead, 0.5) == []
    (action,) = d.observe(dead, 1.0)
    assert isinstance(action, RunERS)
    assert (action.shard, action.server, action.reason) == ("main", "db1", Reason.PRIMARY_DEAD)
    assert action.first_sign == 0.0  # the round of the first failed probe
    assert "db2 IO Connecting" in action.detail and "run_ers main/db1" in str(action)
    assert d.busy("main")


def test_dead_primary_with_nobody_to_promote_is_reported_once() -> None:
    d = Detector(SETTINGS)
    gone = view(DOWN, ServerView("db2", False), ServerView("db3", False))
    out = rounds(d, gone, 10)
    assert [a.reason for a in out] == [Reason.PRIMARY_DEAD] and isinstance(out[0], Report)
    assert "nobody to promote" in out[0].detail and not d.busy("main")
    alone = ShardView("solo", "db1", 1, (DOWN,))
    out = rounds(Detector(SETTINGS), alone, 10)
    assert [a.reason for a in out] == [Reason.PRIMARY_DEAD] and isinstance(out[0], Report)
    # One replica reachable again (its IO thread lost the primary too): now reparent.
    back = view(DOWN, replica("db2", **CONNECTING), ServerView("db3", False))
    assert isinstance(d.observe(back, 5.0)[0], RunERS)


def test_blip_seen_only_by_baton_is_reported_once_not_reparented() -> None:
    d = Detector(SETTINGS)
    blip = view(DOWN, replica("db2"), replica("db3", **CONNECTING))
    out = rounds(d, blip, 10)
    assert len(out) == 1 and isinstance(out[0], Report)
    assert out[0].reason is Reason.PRIMARY_UNREACHABLE and "db2" in out[0].detail
    assert not d.busy("main")


def test_hung_primary_whose_replicas_hear_nothing_is_dead() -> None:
    """SIGSTOP: the replicas' IO threads still say Yes, but no heartbeat comes any more."""
    d = Detector(SETTINGS)
    beat = {"received": "6:bin.1:100:0-1-10", "heartbeat_period": 1.0}
    assert rounds(d, view(replica("db2", **beat), replica("db3", **beat)), 2, start=-1.0) == []
    silent = {"received": "7:bin.1:100:0-1-10", "heartbeat_period": 1.0}
    hung = view(DOWN, replica("db2", **silent), replica("db3", **silent))
    out = rounds(d, hung, 5)  # 0.0 .. 2.0 s: silent for less than two periods and a round
    assert [a.reason for a in out] == [Reason.PRIMARY_UNREACHABLE]
    (action,) = d.observe(hung, 3.0)
    assert isinstance(action, RunERS) and "IO Yes but silent" in action.detail


def test_replicas_never_seen_receiving_are_no_witness_of_silence() -> None:
    """Just pointed at a new primary, a replica may hear nothing for a while (the primary
    seeks its GTID position): its silence says nothing about the primary."""
    d = Detector(SETTINGS)
    quiet = {"received": "0:bin.1:4:0-1-10", "heartbeat_period": 0.25}
    out = rounds(d, view(DOWN, replica("db2", **quiet), replica("db3", **quiet)), 10)
    assert work(out) == [] and [a.reason for a in out] == [Reason.PRIMARY_UNREACHABLE]


def test_replicas_still_hearing_heartbeats_make_it_a_blip() -> None:
    d = Detector(SETTINGS)
    out = []
    for i in range(20):
        beat = {"received": f"{i}:bin.1:100:0-1-10", "heartbeat_period": 1.0}
        out += d.observe(view(DOWN, replica("db2", **beat), replica("db3", **beat)), i * 0.5)
    assert [a.reason for a in out] == [Reason.PRIMARY_UNREACHABLE]


def test_a_successful_probe_resets_the_count() -> None:
    d = Detector(SETTINGS)
    dead = view(DOWN, replica("db2", **CONNECTING), replica("db3", **CONNECTING))
    assert rounds(d, dead, 2) == []
    assert d.observe(view(replica("db2", **CONNECTING), replica("db3", **CONNECTING)), 1.0) == []
    assert rounds(d, dead, 2, start=1.5) == []
    assert isinstance(d.observe(dead, 2.5)[0], RunERS)


def test_never_two_recoveries_at_once_and_cooldown_after_each() -> None:
    d = Detector(SETTINGS)
    dead = view(DOWN, replica("db2", **CONNECTING), replica("db3", **CONNECTING))
    assert isinstance(rounds(d, dead, 3)[-1], RunERS)
    # Until the shell says the reparent finished, nothing more is decided about the shard.
    assert rounds(d, dead, 20, start=1.5) == []
    d.finished("main", 12.0)
    # Still dead (the reparent failed): within the cooldown only a report, once.
    out = rounds(d, dead, 40, start=12.5)
    assert [a.reason for a in out] == [Reason.COOLDOWN]
    assert "cooldown" in out[0].detail
    # After the cooldown, another try.
    out = rounds(d, dead, 3, start=42.5)
    assert isinstance(out[-1], RunERS)


def test_a_new_primary_resets_the_counters() -> None:
    d = Detector(SETTINGS)
    dead = view(DOWN, replica("db2", **CONNECTING), replica("db3", **CONNECTING))
    assert isinstance(rounds(d, dead, 3)[-1], RunERS)
    d.finished("main", 1.2)
    new = view(
        ServerView("db1", False),
        replica("db2", source=None, read_only=False, io_running="", sql_running=""),
        replica("db3", source="db2"),
        primary="db2",
        term=2,
    )
    assert rounds(d, new, 5, start=1.5) == [Report("main", "db1", Reason.UNREACHABLE, "")]


def test_nothing_is_decided_during_a_reparent() -> None:
    d = Detector(SETTINGS)
    odd = view(DOWN, replica("db2", read_only=False, source=None))
    assert rounds(d, replace(odd, reparent_in_flight=True), 10) == []


def test_stopped_replication_is_restarted_after_confirmation() -> None:
    d = Detector(SETTINGS)
    stopped = view(replica("db2", io_running="No", sql_running="No"))
    assert d.observe(stopped, 0.0) == []
    (action,) = d.observe(stopped, 0.5)
    assert isinstance(action, RestartReplication) and action.server == "db2"
    assert action.reason is Reason.REPLICATION_STOPPED
    assert d.observe(stopped, 1.0) == []  # busy until finished
    d.finished("main", 1.0)
    # Stopped again at once: reported, not fought, within the cooldown.
    out = rounds(d, stopped, 4, start=1.5)
    assert [a.reason for a in out] == [Reason.REPEATED]
    assert not d.busy("main")
    assert isinstance(rounds(d, stopped, 2, start=40.0)[-1], RestartReplication)


def test_replication_stopped_on_an_error_is_only_reported() -> None:
    d = Detector(SETTINGS)
    broken = view(replica("db3", sql_running="No", sql_errno=1062))
    out = rounds(d, broken, 5)
    assert [a.reason for a in out] == [Reason.REPLICATION_BROKEN]


def test_writable_replica_is_set_read_only() -> None:
    d = Detector(SETTINGS)
    (action,) = rounds(d, view(replica("db3", read_only=False)), CONFIRM)
    assert isinstance(action, SetReadOnly) and action.server == "db3"
    assert action.reason is Reason.REPLICA_WRITABLE


def test_read_only_primary_is_made_writable() -> None:
    d = Detector(SETTINGS)
    (action,) = rounds(d, view(primary(read_only=True)), CONFIRM)
    assert isinstance(action, MakeWritable) and action.server == "db1"
    assert action.reason is Reason.PRIMARY_READ_ONLY


def test_two_faults_in_one_round_are_one_batch() -> None:
    d = Detector(SETTINGS)
    v = view(replica("db2", io_running="No", sql_running="No"), replica("db3", read_only=False))
    out = rounds(d, v, CONFIRM)
    assert {type(a) for a in out} == {RestartReplication, SetReadOnly}
    assert d.busy("main")


def test_repair_off_reports_instead() -> None:
    d = Detector(replace(SETTINGS, repair=False))
    v = view(replica("db2", io_running="No", sql_running="No"), replica("db3", read_only=False))
    out = rounds(d, v, 6)
    assert work(out) == [] and {a.reason for a in out} == {
        Reason.REPLICATION_STOPPED,
        Reason.REPLICA_WRITABLE,
    }
    assert all("repair is off" in a.detail for a in out)


def test_old_primary_back_without_errant_rejoins() -> None:
    d = Detector(SETTINGS)
    back = replica("db1", server_id=1, source=None, read_only=False, io_running="")
    v = view(
        back,
        replica("db2", source=None, server_id=2, read_only=False, io_running="", sql_running=""),
        replica("db3", source="db2"),
        primary="db2",
        term=2,
    )
    (action,) = rounds(d, v, CONFIRM)
    assert isinstance(action, Rejoin) and action.server == "db1" and action.primary == "db2"
    assert action.reason is Reason.STRAY and "writable" in action.detail


def test_server_with_errant_transactions_is_quarantined() -> None:
    d = Detector(SETTINGS)
    errant = replica("db1", server_id=1, source=None, binlog_state="0-1-12", io_running="")
    v = view(
        errant,
        replica("db2", source=None, server_id=2, binlog_state="0-1-10,0-2-11", read_only=False),
        replica("db3", source="db2", binlog_state="0-1-10,0-2-11"),
        primary="db2",
        term=2,
    )
    (action,) = rounds(d, v, CONFIRM)
    assert isinstance(action, Quarantine) and action.server == "db1"
    assert action.reason is Reason.ERRANT and action.detail == "0-1-12"


def test_gtids_of_the_primary_itself_are_not_errant() -> None:
    """A replica probed a moment after the primary may have its newer transactions."""
    d = Detector(SETTINGS)
    v = view(primary(binlog_state="0-1-10"), replica("db2", binlog_state="0-1-11"))
    assert rounds(d, v, 5) == []


def test_quarantined_server_is_fenced_and_released_when_healed() -> None:
    d = Detector(SETTINGS)
    # Quarantined by the detector itself (errant), as the store then says.
    errant = view(replica("db3", binlog_state="0-1-10,0-3-1"))
    (action,) = rounds(d, errant, CONFIRM)
    assert isinstance(action, Quarantine)
    d.finished("main", 0.5)
    q = frozenset({"db3"})
    writable = view(replica("db3", read_only=False, source=None), quarantined=q)
    (action,) = rounds(d, writable, CONFIRM)
    assert isinstance(action, SetReadOnly) and action.reason is Reason.QUARANTINED_WRITABLE
    d.finished("main", 1.0)
    # Read-only but still errant or not replicating: left alone, never rejoined.
    assert rounds(d, view(replica("db3", source=None), quarantined=q), 5, start=2) == []
    errant = view(replica("db3", binlog_state="0-1-10,0-3-1"), quarantined=q)
    assert rounds(d, errant, 5, start=5) == []
    (action,) = rounds(d, view(replica("db3"), quarantined=q), CONFIRM, start=10)
    assert isinstance(action, Release) and action.reason is Reason.HEALED


def test_unreachable_replica_and_lost_primary_are_reported_once() -> None:
    d = Detector(SETTINGS)
    v = view(ServerView("db2", False, error="timed out"), replica("db3", **CONNECTING))
    out = rounds(d, v, 8)
    assert sorted(a.reason for a in out) == [Reason.REPLICA_LOST_PRIMARY, Reason.UNREACHABLE]
    assert not d.busy("main")
    # The episode ends, then starts again: reported again.
    d.observe(view(), 5.0)
    assert [a.reason for a in d.observe(v, 5.5)] == [Reason.UNREACHABLE]


def test_unreadable_gtid_state_is_reported() -> None:
    d = Detector(SETTINGS)
    out = rounds(d, view(replica("db2", binlog_state="garbage")), 3)
    assert [a.reason for a in out] == [Reason.UNREADABLE]


def test_reasons_and_action_names_print() -> None:
    assert str(Reason.PRIMARY_DEAD) == "primary_dead"
    assert RunERS("s", "db1", Reason.PRIMARY_DEAD).name == "run_ers"
    assert RestartReplication("s", "db2", Reason.REPLICATION_STOPPED).name == (
        "restart_replication"
    )
    assert SetReadOnly("s", "db2", Reason.REPLICA_WRITABLE).name == "set_read_only"


# -- config ------------------------------------------------------------------------------------


def test_detector_config_defaults_and_example(tmp_path: Path) -> None:
    cfg = load(EXAMPLE)
    assert cfg.detector == DetectorConfig()
    assert (cfg.detector.enabled, cfg.detector.interval, cfg.detector.failures) == (True, 0.5, 3)
    assert cfg.detector.cooldown == 30.0 and cfg.detector.repair is True
    text = EXAMPLE.read_text()
    start = text.index("[detector]")
    end = text.index("\n\n", start)
    p = tmp_path / "no-detector.toml"
    p.write_text(text[:start] + text[end:])
    assert load(p).detector == DetectorConfig()


@pytest.mark.parametrize(
    ("line", "key"),
    [
        ("enabled = 1", "detector.enabled"),
        ("interval = 0", "detector.interval"),
        ("failures = 1.5", "detector.failures"),
        ("probe_timeout = -1", "detector.probe_timeout"),
        ("cooldown = -1", "detector.cooldown"),
        ("bogus = 1", "detector.bogus"),
    ],
)
def test_detector_config_errors_name_the_key(tmp_path: Path, line: str, key: str) -> None:
    text = EXAMPLE.read_text()
    start = text.index("[detector]")
    end = text.index("\n\n", start)
    p = tmp_path / "bad.toml"
    p.write_text(text[:start] + text[end:] + f"\n[detector]\n{line}\n")
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load(p)


# -- fence by term at the router ---------------------------------------------------------------


class CountingStore(FileStore):
    """A store that counts reads, and whose reads can be made to lag, as a remote one's may."""

    stale: ShardTopology | None = None
    reads = 0

    def read(self, shard: str):  # type: ignore[no-untyped-def]
        self.reads += 1
        current = super().read(shard)
        if self.stale is not None:
            return replace(current, value=self.stale)
        return current


async def test_router_routes_only_to_the_primary_of_the_newest_term() -> None:
    cfg = load(EXAMPLE)
    store = CountingStore.open(None, cfg)
    router = Router(cfg, store, "proxy-1")
    await router.start()
    try:
        assert router.primary("main").name == "db1"
        reads = store.reads
        for _ in range(100):
            router.primary("main")
        assert store.reads == reads  # routing never asks the store
        topo = store.read("main")
        store.compare_and_set("main", topo.version, replace(topo.value, primary="db2", term=2))
        assert router.primary("main").name == "db1"  # it follows events, not reads
        store.publish(Established("main", "db2", 2))
        await asyncio.sleep(0.05)  # the event hops onto the loop
        assert router.primary("main").name == "db2" and router.term("main") == 2
        # A late or replayed event of an older term does not send sessions back.
        router._deliver(Established("main", "db1", 1))
        assert router.primary("main").name == "db2"
        router._deliver(Established("main", "db3", 3))
        assert router.primary("main").name == "db3"
        # A proxy starting against a store that lags learns the older term; the next event
        # of a newer one still wins, and nothing older does.
        store.stale = topo.value
        late = Router(cfg, store, "proxy-2")
        await late.start()
        assert late.primary("main").name == "db1"
        late._deliver(Established("main", "db3", 3))
        late._deliver(Established("main", "db2", 2))
        assert late.primary("main").name == "db3"
        late.close()
    finally:
        router.close()


# -- the picture: the servers against the config and the store ---------------------------------


def test_replicas_streaming_from_outside_the_config_are_a_mismatch_not_a_dead_primary() -> None:
    """The typo of issue 15: the primary's port is wrong in the config, so Baton cannot reach
    "db1", while the replicas stream from the real one at an address the config lacks."""
    d = Detector(SETTINGS)
    away = {"source": "127.0.0.1:28501", "received": "1:bin.1:100:0-1-10", "heartbeat_period": 1.0}
    v = view(DOWN, replica("db2", **away), replica("db3", **away))
    out = rounds(d, v, 20)
    assert work(out) == [] and not d.busy("main")
    assert sorted((a.server, a.reason) for a in out) == [
        ("db2", Reason.FOREIGN_SOURCE),
        ("db3", Reason.FOREIGN_SOURCE),
    ]
    assert "127.0.0.1:28501" in out[0].detail and "no server of shard main" in out[0].detail
    assert [m.kind for m in d.mismatches("main")] == [MismatchKind.FOREIGN_SOURCE] * 2


def test_a_replica_repointed_outside_the_config_is_reported_not_rejoined() -> None:
    d = Detector(SETTINGS)
    v = view(replica("db3", source="127.0.0.1:28504"))
    out = rounds(d, v, 10)
    assert [(a.server, a.reason) for a in out] == [("db3", Reason.FOREIGN_SOURCE)]
    assert work(out) == []
    # Pointed back by hand: the picture is right again, and nothing was ever repaired.
    assert rounds(d, view(), 5, start=10) == [] and d.mismatches("main") == ()


def test_no_repair_and_no_reparent_while_the_picture_is_wrong() -> None:
    """Someone switched by hand: db2 leads, db1 and db3 replicate from it, the store still
    says db1. Making db1 writable (a read_only primary) would make two primaries."""
    d = Detector(SETTINGS)
    v = view(
        primary(read_only=True, source="db2", io_running="Yes", sql_running="Yes"),
        replica("db2", source=None, read_only=False, io_running="", sql_running=""),
        replica("db3", source="db2"),
    )
    out = rounds(d, v, 10)
    assert work(out) == []
    assert {(a.server, a.reason) for a in out} == {
        ("db2", Reason.SECOND_PRIMARY),
        ("db1", Reason.PRIMARY_REPLICATES),
    }
    assert survey.adoptable(v) == "db2"


def test_never_promote_while_another_server_takes_writes() -> None:
    d = Detector(SETTINGS)
    dead = view(DOWN, replica("db2", **CONNECTING), replica("db3", read_only=False, source=None))
    out = rounds(d, dead, 10)
    assert work(out) == []
    assert [(a.server, a.reason) for a in out] == [("db3", Reason.SECOND_PRIMARY)]
    assert "does not answer" in out[0].detail


def test_a_primary_behind_all_its_replicas_is_a_mismatch_not_a_quarantine_of_all() -> None:
    d = Detector(SETTINGS)
    ahead = {"binlog_state": "0-1-10,0-7-3"}
    out = rounds(d, view(replica("db2", **ahead), replica("db3", **ahead)), 5)
    assert work(out) == []
    assert [(a.server, a.reason) for a in out] == [("db1", Reason.PRIMARY_BEHIND)]
    # One replica agreeing with the primary makes the other the odd one: quarantined.
    d = Detector(SETTINGS)
    (action,) = rounds(d, view(replica("db3", **ahead)), CONFIRM)
    assert isinstance(action, Quarantine) and action.server == "db3"


def test_hung_primary_is_found_as_fast_as_a_dead_one() -> None:
    """With heartbeats every 0.25 s the replicas of a stopped primary are silent by the third
    failed round, the one a dead primary is decided in."""
    for witness in ({"io_running": "Connecting", "io_errno": 2013}, {}):
        d = Detector(SETTINGS)
        beat = {"heartbeat_period": 0.25}
        healthy = [
            view(replica("db2", received=str(i), **beat), replica("db3", received=str(i), **beat))
            for i in range(4)
        ]
        for i, v in enumerate(healthy):
            assert d.observe(v, i * 0.5) == []
        # The fault at 1.6 s: the round at 2.0 s is the first to fail; the replicas heard a
        # heartbeat between 1.5 and 1.6 s.
        stuck = view(
            DOWN,
            replica("db2", received="4", **beat, **witness),
            replica("db3", received="4", **beat, **witness),
        )
        assert d.observe(stuck, 2.0) == [] and d.observe(stuck, 2.5) == []
        (action,) = d.observe(stuck, 3.0)
        assert isinstance(action, RunERS), witness
        assert action.first_sign == 2.0


def test_a_pause_shorter_than_the_detection_is_not_a_failover() -> None:
    d = Detector(SETTINGS)
    beat = {"heartbeat_period": 0.25}
    out = []
    for i in range(40):
        t = i * 0.5
        paused = 5.0 <= t < 6.0  # two rounds in a row without an answer or a heartbeat
        v = view(
            DOWN if paused else primary(),
            replica("db2", received=str(min(i, 10) if paused else i), **beat),
            replica("db3", received=str(min(i, 10) if paused else i), **beat),
        )
        out += d.observe(v, t)
    assert work(out) == []


def test_adopt_only_what_the_servers_agree_on() -> None:
    switched = {"source": "db2"}
    head = {"source": None, "read_only": False, "io_running": "", "sql_running": ""}
    agreed = view(
        primary(read_only=True, **switched), replica("db2", **head), replica("db3", **switched)
    )
    assert survey.adoptable(agreed) == "db2"
    refusals = {
        "exactly one writable": view(primary(), replica("db2", **head), replica("db3", **switched)),
        "do not replicate from db2": view(
            primary(read_only=True, source=None), replica("db2", **head), replica("db3")
        ),
        "no server of shard": view(
            primary(read_only=True, **switched),
            replica("db2", **head),
            replica("db3", source="10.0.0.9:3306"),
        ),
        "the store's primary already": view(),
        "no server streams": view(
            primary(read_only=True, source="db2", io_running="No"),
            replica("db2", **head),
            replica("db3", source="db2", io_running="No"),
        ),
    }
    for reason, v in refusals.items():
        with pytest.raises(survey.AdoptRefused, match=reason):
            survey.adoptable(v)
    assert survey.compare(view()) == ()


def test_a_quarantine_set_by_hand_is_never_lifted_by_the_detector() -> None:
    d = Detector(SETTINGS)
    healthy = view(replica("db3"), quarantined=frozenset({"db3"}))
    assert rounds(d, healthy, 10) == []


# -- the watch's rounds: how long it waits for whom ------------------------------------------


class PacedProber:
    """Answers each server after the delay its list gives, one entry per probe (the last one
    repeats); a delay past `timeout` is a probe that times out unanswered."""

    def __init__(self, delays: dict[str, list[float]], timeout: float) -> None:
        self.delays = delays
        self.timeout = timeout

    def probe(self, server: ServerConfig) -> ServerView:
        todo = self.delays[server.name]
        delay = todo.pop(0) if len(todo) > 1 else todo[0]
        time.sleep(min(delay, self.timeout))
        if delay >= self.timeout:
            return ServerView(server.name, False, error="timed out")
        return replica(server.name)

    def outsiders(self, views: object) -> list[ServerConfig]:
        return []


async def probe_rounds(
    delays: dict[str, list[float]], rounds_: int, probe_timeout: float = 0.4
) -> tuple[list[list[bool]], list[float]]:
    """Which servers answered, round by round, with rounds 0.5 s apart, and how long each
    round waited for its probes."""
    cfg = load(EXAMPLE)
    cfg = replace(cfg, detector=replace(cfg.detector, probe_timeout=probe_timeout))
    store = FileStore.open(None, cfg)
    watch = Watch(cfg, store, Controller(cfg, store, {}, GtidEstablishment()))
    watch.prober = PacedProber(delays, probe_timeout)  # type: ignore[assignment]
    servers = list(cfg.shards[0].servers)
    answered, waited = [], []
    try:
        for _ in range(rounds_):
            started = time.monotonic()
            views = await watch._probe_all(servers)
            waited.append(time.monotonic() - started)
            answered.append([v.reachable for v in views])
            await asyncio.sleep(max(0.0, 0.5 - (time.monotonic() - started)))
    finally:
        watch.close()
    return answered, waited


async def test_a_hung_server_is_not_waited_for_twice() -> None:
    """With a 1 s probe timeout: the first round waits it out, the next ones only QUICK
    (0.05 s) for the server that did not answer, and count it as failed."""
    answered, waited = await probe_rounds({"db1": [9.0], "db2": [0.0], "db3": [0.0]}, 4, 1.0)
    assert [r[0] for r in answered] == [False] * 4 and all(r[1] and r[2] for r in answered)
    assert waited[0] >= 0.9, waited
    assert max(waited[1:]) < 0.5, waited  # they would take 1 s each if it were waited for


async def test_a_slow_server_never_fails_three_rounds_in_a_row() -> None:
    """A server whose every other probe answers within the timeout, slowly (loaded, not hung),
    fails two rounds in a row at most: after a failed round it gets only a short wait, but its
    slow answer then counts for the round after. Three make a primary dead."""
    delays = {"db1": [9.0, 0.2] * 4, "db2": [0.0], "db3": [0.0]}
    answered, _ = await probe_rounds(delays, 8)
    firsts = [r[0] for r in answered]
    assert firsts.count(False) >= 4  # the timeouts, and the answers that came too late
    streaks = "".join("F" if not a else "T" for a in firsts)
    assert "FFF" not in streaks, streaks
