"""The orchestrator and its shell with fake mechanisms: every branch, no MariaDB."""

from __future__ import annotations

import asyncio
import socket
from dataclasses import replace
from pathlib import Path

import pytest

from reparent.config import load
from reparent.controller import Controller, ReparentRefused
from reparent.filestore import FileStore
from reparent.mechanism import (
    Candidate,
    EstablishmentProof,
    FailureKind,
    MechanismError,
    ReparentContext,
    RevocationProof,
)
from reparent.orchestrator import Orchestrator
from reparent.topology import (
    EventKind,
    Outcome,
    ReparentKind,
    ReparentRecord,
    Step,
    TopologyEvent,
)


def _refusing_port() -> int:
    """A loopback port bound and never listened on: a connect to it is refused at once, on
    any machine. (example.toml's own ports may belong to a sandbox someone is running, and
    an emergency reparent refuses to run while its old primary answers.)"""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    _HELD.append(sock)
    return int(sock.getsockname()[1])


_HELD: list[socket.socket] = []
_EXAMPLE = load(Path(__file__).resolve().parent.parent / "configs" / "example.toml")
CONFIG = replace(
    _EXAMPLE,
    shards=tuple(
        replace(
            shard,
            servers=tuple(
                replace(s, host="127.0.0.1", port=_refusing_port(), replication_port=0)
                for s in shard.servers
            ),
        )
        for shard in _EXAMPLE.shards
    ),
)


class Fakes:
    """Both mechanisms at once, logging every call; `fail` names the calls that raise."""

    name = "fake"

    def __init__(self, fail: set[str] | None = None, choose: str = "db2") -> None:
        self.fail = fail or set()
        self.calls: list[str] = []
        self.choice = choose
        # A resumed reparent was revoked by the controller that died.
        self.revoked_earlier = False

    def _enter(self, call: str) -> None:
        self.calls.append(call)
        if call in self.fail:
            raise MechanismError(FailureKind.REFUSED, f"{call} failed on purpose")

    def choose(self, ctx: ReparentContext) -> Candidate:
        self._enter("choose")
        return Candidate(ctx.candidate.name if ctx.candidate else self.choice, "0-1-10")

    def prepare(self, ctx: ReparentContext, candidate: Candidate) -> None:
        self._enter("prepare")

    def revoke(self, ctx: ReparentContext) -> RevocationProof:
        self._enter("revoke")
        assert "establish" not in self.calls
        return RevocationProof(ctx.old_primary.name, "0-1-12", {"db2": "0-1-12", "db3": "0-1-11"})

    def undo(self, ctx: ReparentContext, revoked: RevocationProof | None) -> None:
        self._enter("undo")

    def establish(
        self, ctx: ReparentContext, candidate: Candidate, revoked: RevocationProof
    ) -> EstablishmentProof:
        self._enter("establish")
        assert "revoke" in self.calls or self.revoked_earlier, "establishment before revocation"
        return EstablishmentProof(candidate.name, "0-2-13", ("db1", "db3"))

    def abandon(self, ctx: ReparentContext, candidate: Candidate) -> None:
        self._enter("abandon")


def run(coro: object) -> object:
    return asyncio.run(coro)  # type: ignore[arg-type]


def setup(fail: set[str] | None = None) -> tuple[Controller, Fakes, FileStore, list[TopologyEvent]]:
    store = FileStore.open(None, CONFIG)
    events: list[TopologyEvent] = []
    store.watch(events.append)
    fakes = Fakes(fail)
    controller = Controller(
        CONFIG, store, {ReparentKind.PRS: fakes, ReparentKind.ERS: fakes}, fakes, owner="test"
    )
    return controller, fakes, store, events


def kinds(events: list[TopologyEvent]) -> list[EventKind]:
    return [e.kind for e in events]


def test_planned_reparent_happy_path() -> None:
    controller, fakes, store, events = setup()
    phases: list[tuple[Step, str]] = []
    report = run(
        controller.reparent(
            ReparentKind.PRS, "main", "db3", progress=lambda t: phases.append((t.step, t.call))
        )
    )
    assert fakes.calls == ["choose", "prepare", "revoke", "establish"]
    assert report.outcome is Outcome.SUCCEEDED
    assert (report.old_primary, report.new_primary) == ("db1", "db3")
    assert (report.term_before, report.term_after) == (1, 2)
    assert kinds(events) == [EventKind.REPARENT_STARTED, EventKind.REVOKED, EventKind.ESTABLISHED]
    assert events[0].term == 2 and events[2].term == 2 and events[2].new_primary == "db3"
    topo = store.read("main").value
    assert (topo.primary, topo.term) == ("db3", 2)
    # Each store write is a phase of its own; there are two: HOLDING, which starts the hold,
    # and the last one, which publishes the new primary and finishes the record at once.
    assert phases == [
        (Step.STARTED, "preflight"),  # an operator's: the shard probed before anything
        (Step.STARTED, "choose"),
        (Step.CANDIDATE_CHOSEN, "prepare"),
        (Step.HOLDING, "journal"),
        (Step.HOLDING, "revoke"),
        (Step.REVOKED, "establish"),
        (Step.ESTABLISHED, "commit"),
        (Step.DONE, "journal"),
    ]
    assert [(p.step, p.call) for p in report.phases] == phases
    assert [p.call for p in store.history("main")[0].phases] == [c for _, c in phases[:-1]]
    assert report.positions["old_primary_final"] == "0-1-12"
    assert store.journal_get("main") is None
    assert store.history("main")[0].id == report.id


def test_planned_reparent_chooses_when_no_candidate_named() -> None:
    controller, _, store, _ = setup()
    report = run(controller.reparent(ReparentKind.PRS, "main"))
    assert report.new_primary == "db2" and store.read("main").value.primary == "db2"


@pytest.mark.parametrize("call", ["choose", "prepare"])
def test_planned_failure_before_revocation_aborts_untouched(call: str) -> None:
    controller, fakes, store, events = setup({call})
    report = run(controller.reparent(ReparentKind.PRS, "main", "db2"))
    assert report.outcome is Outcome.ABORTED
    assert "revoke" not in fakes.calls and "undo" not in fakes.calls
    assert events == []
    assert store.read("main").value.term == 1
    assert call in report.reason


def test_planned_revocation_failure_is_undone() -> None:
    controller, fakes, store, events = setup({"revoke"})
    report = run(controller.reparent(ReparentKind.PRS, "main", "db2"))
    assert fakes.calls == ["choose", "prepare", "revoke", "undo"]
    assert report.outcome is Outcome.UNDONE
    assert kinds(events) == [EventKind.REPARENT_STARTED, EventKind.ABORTED]
    assert store.read("main").value.primary == "db1"


def test_planned_establishment_failure_fences_candidate_then_undoes() -> None:
    controller, fakes, store, events = setup({"establish"})
    report = run(controller.reparent(ReparentKind.PRS, "main", "db2"))
    assert fakes.calls == ["choose", "prepare", "revoke", "establish", "abandon", "undo"]
    assert report.outcome is Outcome.UNDONE
    assert kinds(events) == [EventKind.REPARENT_STARTED, EventKind.REVOKED, EventKind.ABORTED]
    assert store.read("main").value.primary == "db1"


@pytest.mark.parametrize(
    "fail", [{"revoke", "undo"}, {"establish", "abandon"}, {"establish", "undo"}]
)
def test_failed_undo_needs_an_operator(fail: set[str]) -> None:
    controller, _, store, events = setup(fail)
    report = run(controller.reparent(ReparentKind.PRS, "main", "db2"))
    assert report.outcome is Outcome.FAILED
    assert kinds(events)[-1] is EventKind.ABORTED
    assert store.read("main").value.primary == "db1"


def test_commit_conflict_fails() -> None:
    controller, fakes, store, _ = setup()
    original = fakes.establish

    def establish_and_race(
        ctx: ReparentContext, c: Candidate, r: RevocationProof
    ) -> EstablishmentProof:
        current = store.read("main")
        store.compare_and_set("main", current.version, replace(current.value, term=7))
        return original(ctx, c, r)

    fakes.establish = establish_and_race  # type: ignore[method-assign]
    report = run(controller.reparent(ReparentKind.PRS, "main", "db2"))
    assert report.outcome is Outcome.FAILED and "term" in report.reason


def test_emergency_happy_path_fences_before_choosing() -> None:
    controller, fakes, store, events = setup()
    report = run(controller.reparent(ReparentKind.ERS, "main"))
    assert fakes.calls == ["revoke", "choose", "establish"]
    assert report.outcome is Outcome.SUCCEEDED
    assert kinds(events) == [EventKind.REPARENT_STARTED, EventKind.REVOKED, EventKind.ESTABLISHED]
    assert report.positions["db3_fenced"] == "0-1-11"
    assert store.read("main").value.term == 2


@pytest.mark.parametrize("call", ["revoke", "choose", "establish"])
def test_emergency_failures_cannot_be_undone(call: str) -> None:
    controller, fakes, store, events = setup({call})
    report = run(controller.reparent(ReparentKind.ERS, "main"))
    assert report.outcome is Outcome.FAILED
    assert "undo" not in fakes.calls
    assert kinds(events)[-1] is EventKind.ABORTED
    assert store.read("main").value.primary == "db1"


def test_refusals() -> None:
    controller, _, store, _ = setup()
    with pytest.raises(ReparentRefused, match="no server"):
        run(controller.reparent(ReparentKind.PRS, "main", "db9"))
    with pytest.raises(ReparentRefused, match="already the primary"):
        run(controller.reparent(ReparentKind.PRS, "main", "db1"))
    with pytest.raises(ReparentRefused, match="no shard"):
        run(controller.reparent(ReparentKind.PRS, "nope"))
    lease = store.lock("main", "someone-else", 60)
    assert lease is not None
    with pytest.raises(ReparentRefused, match="already running"):
        run(controller.reparent(ReparentKind.PRS, "main", "db2"))


def record_at(
    step: Step, kind: ReparentKind = ReparentKind.PRS, **changes: object
) -> ReparentRecord:
    base = ReparentRecord(
        id="r1",
        kind=kind,
        shard="main",
        old_primary="db1",
        requested="db2",
        candidate=None,
        new_primary=None,
        term_before=1,
        term_after=None,
        step=step,
        phases=[],
        positions={},
        outcome=None,
        started_at=0.0,
        finished_at=None,
    )
    return replace(base, **changes)  # type: ignore[arg-type]


REVOKED = {"candidate": "db2", "positions": {"db2_chosen": "0-1-9", "old_primary_final": "0-1-12"}}


@pytest.mark.parametrize(
    ("record", "calls", "outcome"),
    [
        (record_at(Step.STARTED), [], Outcome.ABORTED),
        (record_at(Step.CANDIDATE_CHOSEN, candidate="db2"), [], Outcome.ABORTED),
        # Nothing inside the hold is journaled: the candidate may have been promoted.
        (record_at(Step.HOLDING, candidate="db2"), ["abandon", "undo"], Outcome.UNDONE),
        (record_at(Step.REVOKING, candidate="db2"), ["abandon", "undo"], Outcome.UNDONE),
        (record_at(Step.HOLDING), ["undo"], Outcome.UNDONE),
        (record_at(Step.UNDOING, candidate="db2"), ["undo"], Outcome.UNDONE),
        (record_at(Step.REVOKED, **REVOKED), ["establish"], Outcome.SUCCEEDED),
        (record_at(Step.ESTABLISHING, **REVOKED), ["establish"], Outcome.SUCCEEDED),
        (record_at(Step.ESTABLISHED, new_primary="db2", **REVOKED), [], Outcome.SUCCEEDED),
        (record_at(Step.REVOKED, candidate="db2"), [], Outcome.FAILED),
        (
            record_at(Step.HOLDING, ReparentKind.ERS),
            ["revoke", "choose", "establish"],
            Outcome.SUCCEEDED,
        ),
        (
            record_at(Step.REVOKED, ReparentKind.ERS, positions={"old_primary_final": ""}),
            ["choose", "establish"],
            Outcome.SUCCEEDED,
        ),
    ],
    ids=lambda v: str(v.step) if isinstance(v, ReparentRecord) else None,
)
def test_resume_from_the_journal(
    record: ReparentRecord, calls: list[str], outcome: Outcome
) -> None:
    controller, fakes, store, _ = setup()
    fakes.revoked_earlier = "old_primary_final" in record.positions
    store.journal_put(record)
    (report,) = run(controller.resume())
    assert fakes.calls == calls
    assert report.outcome is outcome
    assert store.journal_get("main") is None
    expected_primary = "db2" if outcome is Outcome.SUCCEEDED else "db1"
    assert store.read("main").value.primary == expected_primary


def test_resume_decisions_are_deterministic() -> None:
    for step in Step:
        record = record_at(step, **REVOKED)
        first = Orchestrator(record).resume()
        second = Orchestrator(record).resume()
        assert (first.call, first.record.outcome, first.events) == (
            second.call,
            second.record.outcome,
            second.events,
        )


def test_journal_has_each_step_before_its_call() -> None:
    """A planned switch is journaled from HOLDING on: its choice and catch-up leave nothing
    to undo (no journal), and inside its hold, where nothing is written until the end, a
    resume from HOLDING takes back whatever the switch had done."""
    controller, fakes, store, _ = setup()
    seen: list[tuple[str, Step | None]] = []
    for name in ("choose", "prepare", "revoke", "establish"):
        method = getattr(fakes, name)

        def spy(*args: object, _m: object = method, _n: str = name) -> object:
            record = store.journal_get("main")
            seen.append((_n, record.step if record else None))
            return _m(*args)  # type: ignore[operator]

        setattr(fakes, name, spy)
    run(controller.reparent(ReparentKind.PRS, "main", "db2"))
    assert seen == [
        ("choose", None),
        ("prepare", None),
        ("revoke", Step.HOLDING),
        ("establish", Step.HOLDING),
    ]
